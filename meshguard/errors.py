"""Error types, one per party at fault.

Every meshguard failure says who must act:

- :class:`RefusedError` — the object (a pod, its policy) is not acceptable; its author fixes it.
  The webhook answers ``allowed: false`` with the message, the CLI exits 1.
- :class:`MalformedInputError` — the input itself is unreadable (not YAML, not an
  AdmissionReview, a truncated ruleset); whoever sent it fixes it. HTTP 400, CLI exit 2.
- :class:`UsageError` — a command-line flag's value is wrong. CLI exit 2.
- :class:`MeshguardFailure` — meshguard (or the kernel tooling it drives) failed on a valid
  input; the operator investigates. meshguard-init exits non-zero so the pod never runs
  unprotected.
- :class:`MissingExtraError` — the command needs a library that this install left out (the
  slim core install carries only meshguard-init and the CNI plugin); whoever installed
  meshguard adds the extra it names.

Each class carries the command line's exit status for it (``exit_code``): the CLI maps an
error to its status in one place (:func:`meshguard.cli.exit_status`), never per command.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

#: Exit statuses of the command line (see the README's "Exit status").
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class MeshguardError(Exception):
    """Base class of every error meshguard raises on purpose."""

    #: The command line's exit status when this error ends a command.
    exit_code: ClassVar[int] = EXIT_FAILED


class RefusedError(MeshguardError):
    """The object is refused: its content breaks a meshguard rule."""

    exit_code: ClassVar[int] = EXIT_FAILED


class _Missing:
    def __repr__(self) -> str:
        return "nothing"


#: The "value" of a required field that is absent.
MISSING = _Missing()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an annotation: where, what was found, what was expected."""

    path: str
    value: object
    expected: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}got {_show(self.value)}, expected {self.expected}"


class PolicyError(RefusedError):
    """A meshguard annotation is invalid.

    The message names the annotation, then each problem: field path, bad value, expectation.
    """

    def __init__(self, *, annotation: str, problems: Sequence[Problem]) -> None:
        self.annotation = annotation
        self.problems = tuple(problems)
        super().__init__(f"{annotation}: " + "; ".join(str(p) for p in self.problems))


class LimitError(PolicyError):
    """An annotation is refused for the work it would cost, not for its meaning: it exceeds
    one of meshguard's limits (rules, ports, expansions, the compiled ruleset's size). The
    message names the limit, its value and the field; its author splits or narrows it."""


class CompileError(RefusedError):
    """The pod cannot be isolated as written (e.g. two containers share a uid)."""


class MalformedInputError(MeshguardError):
    """The input cannot be read at all (bad YAML, not UTF-8, not a Kubernetes object, a
    truncated or altered ruleset)."""

    exit_code: ClassVar[int] = EXIT_USAGE


class UsageError(MeshguardError):
    """A command-line flag's value is wrong; the person who typed it fixes it."""

    exit_code: ClassVar[int] = EXIT_USAGE


class MeshguardFailure(MeshguardError):
    """meshguard itself, or a tool it runs, failed on a valid input."""

    exit_code: ClassVar[int] = EXIT_FAILED


class MissingExtraError(MeshguardError):
    """A command needs an optional dependency this install does not have."""

    exit_code: ClassVar[int] = EXIT_FAILED

    def __init__(self, *, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"needs the Python package that provides {module!r}, which this install leaves out"
            f" (the core install runs meshguard-init and the CNI plugin only):"
            f" pip install 'meshguard[{extra}]'"
        )


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
