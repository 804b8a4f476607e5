"""Benchmark meshguard's kernel path: loopback TCP with and without its rules, and install cost.

Run as root: ``python -m benchmarks.kernel_path [--quick] [--json FILE] [--cpu N | --no-pin]
[--denials]``.

What it measures and how: ``benchmarks/README.md``, section ``kernel_path.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import (
    Machine,
    machine,
    machine_line,
    script_parser,
    write_json,
)
from benchmarks.kernel.configs import ALL_CONFIGS, DENIAL_CONFIGS, KNOWN_CONFIGS, parse_configs
from benchmarks.kernel.pod import FULL, QUICK, TRAFFIC_POD_SIZE, is_root
from benchmarks.kernel.report import traffic_markdown
from benchmarks.kernel.traffic import helper_main
from benchmarks.kernel.trial import run_traffic, traffic_summary
from benchmarks.suite.measure import RuleInstall, rule_install
from benchmarks.suite.report import script_text
from benchmarks.suite.sections import install_section


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    cpu: int | None  # the CPU client and server were pinned to
    containers: int
    machine: Machine
    traffic: dict[str, Any]  # traffic_summary
    trials: list[dict[str, Any]]  # Trial
    install: list[dict[str, Any]]  # InstallRow of the suite's rule_install
    init_startup_ms: dict[str, float]
    install_profile_ms: dict[str, float]
    seconds: float


def main_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "benchmarks.kernel_path",
        description="Loopback TCP with and without meshguard's rules, and install cost (root).",
        quick="about 20 s",
    )
    parser.add_argument(
        "--containers",
        type=int,
        default=TRAFFIC_POD_SIZE,
        metavar="N",
        help=f"containers in the traffic pod, >= 2 (default: {TRAFFIC_POD_SIZE})",
    )
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=ALL_CONFIGS,
        metavar="A,B,...",
        help="the configurations to measure (default: all: "
        + ", ".join(c.name for c in ALL_CONFIGS)
        + ")",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="measure traffic only (no install cost; python -m benchmarks measures it once)",
    )
    parser.add_argument(
        "--denials",
        action="store_true",
        help="also measure the denial path, with and without the NFLOG rule and its listener",
    )
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument(
        "--cpu", type=int, help="CPU to pin client and server to (default: the first allowed)"
    )
    pin.add_argument("--no-pin", action="store_true", help="let the scheduler place them")
    return parser


def chosen_cpu(args: argparse.Namespace) -> int | None:
    if args.no_pin:
        return None
    return args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in {"_server", "_client", "_refused", "_nflog"}:
        return helper_main(argv)
    args = main_parser().parse_args(argv)
    if args.containers < 2:
        print("--containers needs at least 2", file=sys.stderr)
        return 2
    if not is_root():
        print(
            "kernel_path.py needs root (network namespaces, iptables, setuid): run it as root",
            file=sys.stderr,
        )
        return 2
    profile = QUICK if args.quick else FULL
    cpu = chosen_cpu(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="meshguard-bench-") as tmp:
        workdir = Path(tmp)
        wanted = {*args.configs, *(DENIAL_CONFIGS if args.denials else ())}
        configs = tuple(c for c in KNOWN_CONFIGS if c in wanted)
        trials = run_traffic(profile, workdir, cpu, configs, containers=args.containers,
                             denials=args.denials)  # fmt: skip
    install: RuleInstall | None = None if args.no_install else rule_install(quick=args.quick)
    summary = traffic_summary(trials, configs)
    elapsed = time.perf_counter() - started
    print("\n".join(traffic_markdown(summary, profile, cpu, containers=args.containers)))
    if install is not None:
        print(script_text("install", install, lambda r, run: install_section(r, run.data, None)))
    where = machine()
    print(machine_line(where, elapsed))
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "cpu": cpu,
            "containers": args.containers,
            "machine": where,
            "traffic": summary,
            "trials": [asdict(t) for t in trials],
            "install": [dict(row) for row in install["rows"]] if install else [],
            "init_startup_ms": install["startup_ms"] if install else {},
            "install_profile_ms": install["profile_ms"] if install else {},
            "seconds": elapsed,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
