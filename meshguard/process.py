"""Running an external tool (iptables, nft, ip) and turning its failure into a clear error.

The rules installer and the sandbox both start tools through :func:`run_command`, so the
error text, the timeout and the environment handling are the same everywhere.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Protocol

from meshguard.errors import MeshguardFailure

COMMAND_TIMEOUT_SECONDS = 30.0


class CommandRunner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str: ...


def run_command(
    argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Run a tool; its stdout, or :class:`MeshguardFailure` with its own error text.

    ``env`` is added to this process's environment for the tool.
    """
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
            env={**os.environ, **env} if env else None,
        )
    except FileNotFoundError:
        raise MeshguardFailure(f"{argv[0]} not found: it is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise MeshguardFailure(
            f"{argv[0]} did not finish within {COMMAND_TIMEOUT_SECONDS:.0f}s"
        ) from None
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise MeshguardFailure(f"{' '.join(argv)} failed: {reason}")
    return done.stdout
