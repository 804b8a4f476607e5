"""Reading ``iptables-save`` output, and running the iptables tools.

The parser is pure (text in, :class:`SavedState` out) so the install plan can be tested
without root. :class:`CommandRunner` is the only place that starts iptables processes.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshguard.errors import MeshguardFailure

COMMAND_TIMEOUT_SECONDS = 30.0


@dataclass
class SavedTable:
    chains: list[str] = field(default_factory=list)
    builtins: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def rules_of(self, chain: str) -> list[str]:
        return self.rules.get(chain, [])


@dataclass
class SavedState:
    tables: dict[str, SavedTable] = field(default_factory=dict)

    def table(self, name: str) -> SavedTable:
        return self.tables.get(name, SavedTable())


def parse_save(text: str) -> SavedState:
    """Parse ``iptables-save`` output into tables, chains and rule specs (``-A`` stripped)."""
    state = SavedState()
    current: SavedTable | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = state.tables.setdefault(line[1:], SavedTable())
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise MeshguardFailure(f"iptables-save line {number} outside a table: {line!r}")
        elif line.startswith(":"):
            chain, policy, *_ = (line[1:] + " -").split()
            current.chains.append(chain)
            if policy != "-":
                current.builtins.add(chain)
            current.rules.setdefault(chain, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.setdefault(chain, []).append(rest[0] if rest else "")
        else:
            raise MeshguardFailure(f"iptables-save line {number} not understood: {line!r}")
    return state


def jump_target(spec: str) -> str | None:
    """The chain a rule jumps to (``-j X`` / ``-g X``), if any."""
    try:
        words = shlex.split(spec)
    except ValueError:
        words = spec.split()
    for flag, value in itertools.pairwise(words):
        if flag in {"-j", "-g", "--jump", "--goto"}:
            return value
    return None


class CommandRunner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str: ...


def run_command(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run a tool; its stdout, or :class:`MeshguardFailure` with its own error text."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        raise MeshguardFailure(f"{argv[0]} not found: install iptables (nf_tables)") from None
    except subprocess.TimeoutExpired:
        raise MeshguardFailure(
            f"{argv[0]} did not finish within {COMMAND_TIMEOUT_SECONDS:.0f}s"
        ) from None
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise MeshguardFailure(f"{' '.join(argv)} failed: {reason}")
    return done.stdout
