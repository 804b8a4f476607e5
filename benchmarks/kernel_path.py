"""Benchmark meshguard's kernel path: loopback TCP with and without its rules, and install cost.

Run as root: ``python -m benchmarks.kernel_path [--quick] [--json FILE] [--cpu N | --no-pin]``.

1. Traffic. A synthetic Istio-injected pod of 16 containers (``c00``..``c15``, uid 2000+i,
   port 8000+i, plus ``istio-proxy`` as uid 1337) whose ``meshguard.io/policy`` lets each
   container reach the next one's port (``c15`` reaches ``c00``). In a fresh network
   namespace per trial, a server running as ``c00``'s uid listens on 127.0.0.1:8000 and a
   client running as ``c15``'s uid — the highest uid, the longest walk through the uid
   dispatch for NEW packets — measures

   - request/response: round trips per second of a small ping-pong on one TCP connection;
   - connect: sequential connect + close per second (the server accepts and closes).

   Configurations, in rounds that alternate their order (ABCD, DCBA, ...):
   ``baseline`` (no netfilter rules at all), ``meshguard`` (rules installed by the real
   ``python -m meshguard init --ruleset-file FILE``, as in production), ``istio`` (Istio's
   IPv4 nat capture in iptables-nft, as istio-init writes it: ``meshguard.sandbox.istio``,
   checked against Istio's goldens; it turns conntrack on as in any Istio pod),
   ``istio+meshguard`` (meshguard-init detects iptables-nft: the uid-range tree),
   ``istio+meshguard-flat`` (one dispatch rule per uid), ``istio-nft`` (Istio's native
   nftables capture, ``table inet istio-proxy-nat``) and ``istio-nft+meshguard`` (the pod
   admitted with ``--native-nftables``: ``table inet meshguard``, uid dispatch through one
   verdict map). ``--configs`` runs a subset. The medians give the ratios: meshguard /
   baseline, istio+meshguard / istio (meshguard's own cost in an Istio pod, iptables) and
   istio-nft+meshguard / istio-nft (the same in native nftables) — both backends in the
   same run. Keep-alive is the request/response rate on one connection, connection per
   request the connect rate. After each meshguard trial a connection from a uid of no
   container must be refused, and (iptables) the packet counter of the client's source
   chain confirms every connection went through the uid dispatch, (nftables) the verdict
   map holds the client's uid. Client and server are pinned to one CPU by default:
   unpinned, cross-CPU wake-ups on a small VM make trials differ by 2-4x.

2. Install cost for pods of 2, 8 and 32 containers: ``compile_pod`` (pure Python),
   ``meshguard init`` as a subprocess (wall time, includes ``ip netns exec`` and Python
   start-up) and the in-process :func:`meshguard.rules.install.install`.

The load generator is this file too (hidden ``_server`` / ``_client`` subcommands), run
inside the namespace; it drops to the container's uid as ``meshguard.sandbox.probe`` does.
Only 127.0.0.1 inside namespaces this script creates is used; the namespaces and their
processes are removed on exit.
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
from benchmarks.kernel.configs import ALL_CONFIGS, parse_configs
from benchmarks.kernel.install import InstallCost, measure_install, startup_ms
from benchmarks.kernel.pod import FULL, INSTALL_POD_SIZES, QUICK, TRAFFIC_POD_SIZE, is_root
from benchmarks.kernel.report import format_install, format_traffic
from benchmarks.kernel.traffic import helper_main
from benchmarks.kernel.trial import installed_python, run_traffic, traffic_summary


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    cpu: int | None  # the CPU client and server were pinned to
    containers: int
    machine: Machine
    traffic: dict[str, Any]  # traffic_summary
    trials: list[dict[str, Any]]  # Trial
    install: list[dict[str, Any]]  # InstallCost
    init_startup_ms: dict[str, float]
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
        "--no-install", action="store_true", help="measure traffic only (no install cost)"
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
    if argv and argv[0] in {"_server", "_client", "_refused"}:
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
        trials = run_traffic(profile, workdir, cpu, args.configs, containers=args.containers)
        costs: list[InstallCost] = []
        startup: dict[str, float] = {}
        if not args.no_install:
            python = installed_python(workdir)
            costs = [measure_install(n, profile, workdir, python=python) for n in INSTALL_POD_SIZES]
            startup = startup_ms(max(3, profile.install_reps), python=python)
    summary = traffic_summary(trials, args.configs)
    elapsed = time.perf_counter() - started
    print(format_traffic(summary, profile, cpu, containers=args.containers))
    if costs:
        print()
        print(format_install(costs, startup, profile))
    where = machine()
    print(f"\n{machine_line(where, elapsed)}")
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "cpu": cpu,
            "containers": args.containers,
            "machine": where,
            "traffic": summary,
            "trials": [asdict(t) for t in trials],
            "install": [asdict(c) for c in costs],
            "init_startup_ms": startup,
            "seconds": elapsed,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
