"""Benchmark meshguard's L7 engines: the native one and ext_authz against the same Envoy
listener with no authorization.

The configurations are declared in :mod:`benchmarks.l7.envoys`; what each is, how it is
measured and what it needs: ``benchmarks/README.md``, section ``l7_path.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import grpc
import grpc.aio

from benchmarks.common import Machine, machine, script_parser
from benchmarks.harness import NOISE_CORES, wait_for_quiet
from benchmarks.l7.bench import (
    FULL,
    QUICK,
    decision_stats,
    envoy_stats,
    prepare_check_request,
    run_grpc,
    run_http,
    setup,
    smoke_check,
)
from benchmarks.l7.envoys import injected_pod
from benchmarks.l7.servers import helper_main
from benchmarks.l7.spy import run_profile
from benchmarks.l7.summary import grpc_summary, http_summary
from benchmarks.suite.l7 import l7_script_section
from benchmarks.suite.report import finish_script
from meshguard.sandbox.netns import NetworkNamespace


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    machine: Machine
    http: dict[str, Any]  # http_summary
    grpc: dict[str, Any]  # grpc_summary
    extra: dict[str, Any]  # request size, decisions, profile, Envoy stats, smoke check
    http_trials: list[dict[str, Any]]  # HttpTrial
    grpc_trials: list[dict[str, Any]]  # GrpcTrial
    seconds: float


def main_parser() -> argparse.ArgumentParser:
    return script_parser(
        "benchmarks.l7_path",
        description="HTTP through Envoy alone, with RBAC and with meshguard's ext_authz;"
        " meshguard serve-authz against a bare grpc.aio server (root).",
        quick="about 90 s",
    )


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in {"_upstream", "_echo", "_grpc_client"}:
        return helper_main(argv)
    args = main_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("l7_path.py needs root (network namespaces, iptables, setuid)", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("l7_path.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    started = time.perf_counter()
    busy = wait_for_quiet(limit_seconds=5 if args.quick else 60)
    if busy >= NOISE_CORES:
        print(f"warning: {busy:.2f} cores busy before starting", file=sys.stderr, flush=True)
    pod = injected_pod()
    with tempfile.TemporaryDirectory(prefix="meshguard-l7-") as tmp, NetworkNamespace() as ns:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # read by the processes running as uid 1337 and 1000
        print("setting up the pod namespace ...", file=sys.stderr, flush=True)
        bench = setup(ns, workdir, pod)
        try:
            smoke = smoke_check(bench)
            print("\n".join(["smoke check (as the app, uid 1000):", *smoke]), file=sys.stderr)
            check = prepare_check_request(bench, pod)
            http_trials = run_http(bench, profile)
            http_offset = bench.authz_log.stat().st_size
            grpc_trials = run_grpc(bench, profile)
            spy = run_profile(bench, profile)
            stats = envoy_stats(bench)
            extra = {
                "request_size": bench.request_size, "check_request": str(check),
                "decisions": decision_stats(bench.authz_log),
                "decisions_http_phase": decision_stats(bench.authz_log, 0, http_offset),
                "decisions_grpc_phase": decision_stats(bench.authz_log, http_offset),
                "profile": spy, "envoy_stats": stats, "smoke": smoke,
            }  # fmt: skip
        finally:
            for log in bench.logs:
                log.close()
    http = http_summary(http_trials)
    grpc_ = grpc_summary(grpc_trials)
    elapsed = time.perf_counter() - started
    where = machine(grpcio=grpc.__version__)
    document: Document = {
        "profile": asdict(profile), "machine": where, "http": http, "grpc": grpc_, "extra": extra,
        "http_trials": [asdict(t) for t in http_trials],
        "grpc_trials": [asdict(t) for t in grpc_trials], "seconds": elapsed,
    }  # fmt: skip
    finish_script("l7", document, l7_script_section, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
