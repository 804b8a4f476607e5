"""Benchmark the admission webhook over real HTTPS against a bare aiohttp baseline.

What it measures and how: ``benchmarks/README.md``, section ``webhook.py``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import aiohttp

from benchmarks.admission.client import Result, run_http
from benchmarks.admission.inprocess import measure_handle
from benchmarks.admission.pod import (
    CONCURRENCIES,
    FULL,
    GOAL_RATIO,
    POD_CONTAINERS,
    QUICK,
    REVIEW_UID,
    synthetic_pod,
)
from benchmarks.admission.servers import baseline_main
from benchmarks.common import Machine, machine, script_parser
from benchmarks.suite.report import finish_script
from benchmarks.suite.sections import webhook_section
from meshguard.inject.transform import InjectSettings
from meshguard.webhook.review import handle
from tests.support.keys import SIGNER
from tests.support.pods import admission_review


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    pod_containers: int
    request_bytes: int
    answer_bytes: int
    results: list[dict[str, Any]]  # Result
    throughput_ratio: dict[str, float]  # concurrency -> meshguard / baseline
    goal_ratio: float
    meshguard_metrics: dict[str, Any]
    handle_ms: dict[str, float]
    machine: Machine
    seconds: float


def main_parser() -> argparse.ArgumentParser:
    return script_parser(
        "benchmarks.webhook",
        description="Admission latency and throughput of meshguard serve-webhook over HTTPS,"
        " against a bare aiohttp endpoint returning a precomputed answer.",
        quick="about 20 s",
    )


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "_baseline":
        return baseline_main(argv)
    args = main_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server subprocesses are terminated (finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profile = QUICK if args.quick else FULL
    began = time.perf_counter()
    body = admission_review(synthetic_pod(POD_CONTAINERS), REVIEW_UID)
    answer_bytes = len(json.dumps(handle(body, settings=InjectSettings(signer=SIGNER))[1]).encode())
    with tempfile.TemporaryDirectory(prefix="meshguard-bench-webhook-") as tmp:
        results, metrics = run_http(profile, body, Path(tmp))
    handle_rows = measure_handle(profile, body)
    elapsed = time.perf_counter() - began
    where = machine(aiohttp=aiohttp.__version__)
    document: Document = {
        "profile": asdict(profile), "pod_containers": POD_CONTAINERS, "request_bytes": len(body),
        "answer_bytes": answer_bytes, "results": [asdict(r) for r in results],
        "throughput_ratio": {str(c): x for c, x in ratios(results).items()},
        "goal_ratio": GOAL_RATIO, "meshguard_metrics": metrics, "handle_ms": dict(handle_rows),
        "machine": where, "seconds": elapsed,
    }  # fmt: skip
    finish_script("webhook", document, webhook_section, args.json)
    errors = sum(r.errors for r in results)
    return 1 if errors else 0


def ratios(results: Sequence[Result]) -> dict[int, float]:
    """meshguard / baseline throughput per concurrency."""
    by = {(r.server, r.concurrency): r.throughput for r in results}
    return {
        c: by["meshguard", c] / by["baseline", c] if by["baseline", c] else 0.0
        for c in CONCURRENCIES
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
