"""2. The authz server: Checks at a concurrency, every decision checked."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from benchmarks.common import json_lines
from benchmarks.stress.rows import Profile, Row
from meshguard import yaml_io
from tests.support.latency import latency_ms
from tests.support.load import CheckRun, check_kinds, run_checks
from tests.support.pods import injected_example
from tests.support.processes import (
    HOST,
    free_port,
    rss_kib,
    serve_authz_argv,
    start_logged,
    stop_process,
    wait_grpc_serving,
)


def run_authz(profile: Profile, concurrency: int, workdir: Path) -> tuple[Row, list[int]]:
    """The row, and the RSS samples (KiB): after the warm-up, then every rss_every Checks."""
    pod = injected_example()
    kinds = check_kinds(pod)
    pod_file = workdir / "pod.yaml"
    pod_file.write_text(yaml_io.dump(pod, sort_keys=True))
    port = free_port()
    address = f"{HOST}:{port}"
    log_file = workdir / "authz.log"
    process = start_logged(serve_authz_argv(pod_file, port), log_file, stdout=False)
    rss: list[int] = []

    async def load() -> tuple[CheckRun, CheckRun]:
        stop_at = time.monotonic() + profile.phase_seconds
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            warmup = await run_checks(stub, kinds, first=0, count=profile.check_warmup,
                                      concurrency=concurrency, stop_at=stop_at)  # fmt: skip
            rss.append(rss_kib(process.pid))
            measured = CheckRun()
            done = 0
            while done < profile.checks and time.monotonic() < stop_at:
                chunk = min(profile.rss_every, profile.checks - done)
                measured.add(
                    await run_checks(stub, kinds, first=profile.check_warmup + done, count=chunk,
                                     concurrency=concurrency, stop_at=stop_at)
                )  # fmt: skip
                done += chunk
                rss.append(rss_kib(process.pid))
            return warmup, measured

    try:
        wait_grpc_serving(address, process, log_file)
        warmup, measured = asyncio.run(load())
        alive = process.poll() is None
    finally:
        stop_process(process)
    lines, not_json = json_lines(log_file)
    decisions = [line for line in lines if line.get("event") == "decision"]
    sent = warmup.sent + measured.sent
    logged = Counter(
        ((d.get("pod"), d["request"]["source_address"], d["request"]["port"],
          d["request"]["method"], d["request"]["path"]), d["result"])
        for d in decisions
    )  # fmt: skip
    expected: Counter[tuple[Any, str]] = Counter()
    for kind in kinds:
        expected[(kind.key, "allow" if kind.allowed else "deny")] += sent[kind.name]
    problems = []
    if len(decisions) != sent.total():
        problems.append(f"authz: {len(decisions)} decision lines for {sent.total()} Checks")
    elif logged != expected:
        problems.append("authz: the decision lines do not match the Checks sent")
    if not_json:
        problems.append(f"authz: {not_json} log lines are not JSON")
    if not alive or process.returncode != 0:
        problems.append(f"authz: the server died or exited {process.returncode}")
    errors, wrong = warmup.errors + measured.errors, warmup.wrong + measured.wrong
    problems += [f"authz: {n} x {what}" for what, n in (errors + wrong).items()]
    allowed = sum(sent[k.name] for k in kinds if k.allowed)
    growth = (rss[-1] - rss[0]) / 1024 if rss else float("nan")
    per_check = (rss[-1] - rss[0]) * 1024 / measured.sent.total() if measured.sent else 0.0
    row = Row(
        scenario="authz: Checks (gRPC, 1 channel)", sent=measured.sent.total(),
        errors=errors.total(), wrong=wrong.total(),
        rate=measured.sent.total() / measured.elapsed if measured.elapsed else 0.0,
        latency=latency_ms(measured.latencies),
        notes=f"+{warmup.sent.total()} warm-up; {allowed} allowed, {sent.total() - allowed}"
        f" denied; decision lines {len(decisions)}; RSS {rss[0] / 1024:.1f} ->"
        f" {rss[-1] / 1024:.1f} MiB ({growth:+.1f} MiB, {per_check:+.1f} B/Check)",
        problems=problems,
    )  # fmt: skip
    return row, rss
