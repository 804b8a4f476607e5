"""Load and fault benchmark: every component keeps working, losing nothing, under load.

What it measures and how: ``benchmarks/README.md``, section ``load.py``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
import grpc

from benchmarks.common import Machine, machine, script_parser
from benchmarks.stress.admissions import run_webhook
from benchmarks.stress.checks import run_authz
from benchmarks.stress.fault import fault_problem, run_fault
from benchmarks.stress.rows import FULL, QUICK, FaultCycle, Row, Watchdog
from benchmarks.suite.report import finish_script
from benchmarks.suite.sections import load_section


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    concurrency: int
    rows: list[dict[str, Any]]
    authz_rss_kib: list[int]
    fault_cycles: list[FaultCycle]
    fault_skipped: str | None
    machine: Machine
    seconds: float


def main_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "benchmarks.load",
        description="meshguard's webhook and authz server under load, and the authz server"
        " killed mid-load behind the real Envoy: nothing lost, figures reported.",
        quick="about 25 s",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--no-fault", action="store_true", help="skip the fault scenario")
    return parser


def _watchdog(signum: int, frame: object) -> None:
    raise Watchdog("the benchmark ran past its time limit")


def main(argv: Sequence[str]) -> int:
    args = main_parser().parse_args(argv)
    profile = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C (servers stopped, namespace removed); so does the watchdog.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(profile.watchdog_seconds)
    began = time.perf_counter()
    rows: list[Row] = []
    fault: list[FaultCycle] = []
    skipped = "--no-fault" if args.no_fault else fault_problem()
    with tempfile.TemporaryDirectory(prefix="meshguard-bench-load-") as tmp:
        workdir = Path(tmp)
        for name in ("webhook", "authz", "fault"):
            (workdir / name).mkdir()
        rows.append(run_webhook(profile, args.concurrency, workdir / "webhook"))
        authz_row, rss = run_authz(profile, args.concurrency, workdir / "authz")
        rows.append(authz_row)
        if skipped is None:
            workdir.chmod(0o755)
            fault_row, fault = run_fault(profile, workdir / "fault")
            rows.append(fault_row)
    signal.alarm(0)
    elapsed = time.perf_counter() - began
    where = machine(grpcio=grpc.__version__, aiohttp=aiohttp.__version__)
    document: Document = {
        "profile": asdict(profile), "concurrency": args.concurrency,
        "rows": [asdict(row) for row in rows], "authz_rss_kib": rss, "fault_cycles": fault,
        "fault_skipped": skipped, "machine": where, "seconds": elapsed,
    }  # fmt: skip
    finish_script("load", document, load_section, args.json)
    return 1 if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
