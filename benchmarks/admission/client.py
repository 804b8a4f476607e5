"""The HTTPS client: admissions at a concurrency against each server in alternating rounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.admission.pod import (
    CONCURRENCIES,
    REQUEST_TIMEOUT,
    REVIEW_UID,
    SERVERS,
    Profile,
    answer_error,
)
from benchmarks.admission.servers import Server, baseline_argv, started, tls_version
from benchmarks.harness import alternating
from meshguard.inject.transform import InjectSettings
from meshguard.webhook.review import handle
from tests.support.admissions import Posted, admission_metrics, post_all
from tests.support.keys import SIGNER
from tests.support.latency import percentile
from tests.support.processes import free_port, https_get, log_tail, serve_webhook_argv
from tests.support.tls import write_server_files


@dataclass
class Run:
    """One measured round of one server at one concurrency."""

    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, successful or not
    elapsed: float = 0.0


async def load(
    url: str, body: bytes, ca_file: Path, *, concurrency: int, warmup: int, requests: int,
    max_seconds: float,
) -> Run:  # fmt: skip
    """Warm up, then send ``requests`` POSTs with ``concurrency`` in flight; one session."""
    run = Run()

    def answered(posted: Posted) -> None:
        if posted.key == "warmup":
            return
        run.requests += 1
        run.latencies.append(posted.seconds)
        if error := posted.error or answer_error(posted.status, posted.payload, REVIEW_UID):
            run.errors[error] += 1

    phases = [[("warmup", body)] * max(warmup, concurrency), [("", body)] * requests]
    run.elapsed = (
        await post_all(f"{url}/inject", ca_file, phases, concurrency=concurrency,
                       answered=answered, timeout=REQUEST_TIMEOUT, max_seconds=max_seconds)
    )[1]  # fmt: skip
    return run


@dataclass(frozen=True)
class Result:
    """One server at one concurrency, over every measured round."""

    server: str
    concurrency: int
    requests: int
    errors: int
    error_kinds: dict[str, int]
    throughput: float  # admissions/s over the measured rounds
    p50_ms: float
    p99_ms: float
    mean_ms: float
    round_throughputs: list[float]


def summarize(server: str, concurrency: int, runs: Sequence[Run]) -> Result:
    latencies = sorted(x for run in runs for x in run.latencies)
    errors: Counter[str] = Counter()
    for run in runs:
        errors.update(run.errors)
    requests = sum(run.requests for run in runs)
    elapsed = sum(run.elapsed for run in runs)
    return Result(
        server=server, concurrency=concurrency, requests=requests, errors=sum(errors.values()),
        error_kinds=dict(errors), throughput=requests / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        mean_ms=statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        round_throughputs=[run.requests / run.elapsed if run.elapsed else 0.0 for run in runs],
    )  # fmt: skip


def run_http(profile: Profile, body: bytes, workdir: Path) -> tuple[list[Result], dict[str, Any]]:
    """Both servers at every concurrency; meshguard's own metrics at the end."""
    ca_file, cert_file, key_file = write_server_files(workdir)
    status, answer, _ = handle(body, settings=InjectSettings(signer=SIGNER))
    if status != 200 or answer_error(status, json.dumps(answer).encode(), REVIEW_UID):
        raise RuntimeError(f"the synthetic pod is not injected: {answer}")
    answer_file = workdir / "answer.json"
    answer_file.write_text(json.dumps(answer))
    runs: dict[tuple[str, int], list[Run]] = {}
    sent_to_meshguard = 0
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        port = free_port()
        servers["baseline"] = stack.enter_context(
            started("baseline", baseline_argv(cert_file, key_file, port, answer_file), port,
                    ca_file, workdir)
        )  # fmt: skip
        port = free_port()
        # Room for every request in flight: the benchmark measures answers, not the 429s
        # past serve-webhook's pending bound (16 by default).
        argv = [*serve_webhook_argv(cert_file, key_file, port),
                "--max-pending-admissions", str(max(CONCURRENCIES))]  # fmt: skip
        servers["meshguard"] = stack.enter_context(
            started("meshguard", argv, port, ca_file, workdir)
        )
        for concurrency in CONCURRENCIES:
            for round_ in range(profile.rounds):
                for name in alternating(SERVERS, round_):
                    server = servers[name]
                    run = asyncio.run(
                        load(server.url, body, ca_file, concurrency=concurrency,
                             warmup=profile.warmup, requests=profile.requests,
                             max_seconds=profile.phase_seconds)
                    )  # fmt: skip
                    if server.process.poll() is not None:
                        raise RuntimeError(
                            f"{name} died during the run:\n{log_tail(server.log_file)}"
                        )
                    runs.setdefault((name, concurrency), []).append(run)
                    if name == "meshguard":
                        sent_to_meshguard += max(profile.warmup, concurrency) + run.requests
        metrics = meshguard_metrics(servers["meshguard"].port, ca_file)
        metrics["tls"] = {name: tls_version(s.port, ca_file) for name, s in servers.items()}
    metrics["sent"] = sent_to_meshguard
    results = [
        summarize(name, concurrency, runs[(name, concurrency)])
        for concurrency in CONCURRENCIES
        for name in SERVERS
    ]
    return results, metrics


def meshguard_metrics(port: int, ca_file: Path) -> dict[str, Any]:
    """Admissions counted by meshguard, and its mean server-side time per admission."""
    status, text = https_get(port, "/metrics", ca_file)
    if status != 200:
        return {}
    found = admission_metrics(text.decode())
    if found.get("seconds_count"):
        found["server_mean_ms"] = found["seconds_sum"] / found["seconds_count"] * 1000
    return found
