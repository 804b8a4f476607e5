"""``kubectl meshguard``: the kubectl plugin (the executable ``kubectl-meshguard`` on PATH, by
kubectl's plugin convention), with the inspection commands of ``meshguard``: ``describe`` and
``unprotected``, the same flags, output and exit status.

kubectl runs a plugin with the arguments after its name and no flag of its own, so the
plugin reads kubeconfig itself (``--kubeconfig``, ``--context``, ``-n``), as kubectl does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from meshguard import __version__
from meshguard.cli import run_command
from meshguard.cli.describe_args import add_commands
from meshguard.cli.flags import HelpFormatter, command

PROG = "kubectl meshguard"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description="meshguard's view of the pods of the cluster kubeconfig points at:"
        " their loopback policy, what was admitted and changed, and the pods Istio injected"
        " without meshguard.",
    )
    parser.add_argument("--version", action="version", version=f"meshguard {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="least severe log record written to stderr",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    add_commands(commands, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
