"""Every component under load and under a fault: nothing lost, nothing allowed by accident.

- The admission webhook, served for real (``meshguard serve-webhook`` over HTTPS with a
  generated certificate): 2000 admissions of the example pod at concurrency 64; every answer
  is a 200 for its own uid with the same, correct patch, and the server counted (``/metrics``)
  and logged each one exactly once.
- The authz server, ``meshguard serve-authz`` as a subprocess on the injected example pod:
  20000 Checks at concurrency 64 over one gRPC channel (as Envoy's worker keeps one HTTP/2
  connection), a mix of requests the policy allows and denies; every answer is the expected
  one, no gRPC error, one ``decision`` JSON line per Check, and the server's RSS after the
  warm-up and at the end stays within a bound (no per-Check leak).
- A fault with the real Envoy in front (root): the pod of ``tests/authz/test_envoy_e2e.py``
  in a network namespace, a client under the app's uid sending POST /quitquitquit (allowed)
  and GET /quitquitquit (denied) in a loop; ``serve-authz`` is SIGKILLed mid-load, stays
  down for a while, and is restarted. No GET ever gets through, every request while it is
  down gets Envoy's 503 (no decision: distinct from a policy's 403), and POST works again
  after the restart.

No timing is asserted; the figures (throughput, latency percentiles, RSS, counts) are
printed, so ``pytest -s tests/load`` shows them. ``benchmarks/load.py`` runs the same
scenarios with bigger numbers; both take their helpers from ``tests/support/load.py``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import math
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jsonpatch
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc

from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.admissions import Posted, admission_metrics, answer_problem, post_all
from tests.support.keys import SIGNER
from tests.support.latency import percentile
from tests.support.load import (
    APP,
    CheckRun,
    FaultPod,
    LoadClient,
    check_kinds,
    run_checks,
)
from tests.support.pods import admission_review, example_pod, injected_example
from tests.support.processes import (
    HOST,
    free_port,
    https_get,
    rss_kib,
    serve_authz_argv,
    serve_webhook_argv,
    start_logged,
    stop_process,
    wait_grpc_serving,
    wait_https_ready,
)
from tests.support.tls import write_server_files

CONCURRENCY = 64
ADMISSIONS = 2000
CHECKS = 20_000
WARMUP_CHECKS = 2_000
#: The authz server keeps no per-request state: after the warm-up (64 streams open, every
#: code path taken, allocator pools grown) its RSS should stay flat. 20 MiB over the 18000
#: measured Checks is a leak of about 1.1 KiB per Check -- less than one decision's log
#: record, request and response objects -- while leaving room for allocator noise (a few
#: MiB) on any machine.
RSS_GROWTH_LIMIT_KIB = 20 * 1024


# --- shared helpers -------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON log; a line that is not JSON fails the test."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- a. the webhook -------------------------------------------------------------------------


@dataclass
class Webhook:
    port: int
    ca_file: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> tuple[int, bytes]:
        return https_get(self.port, path, self.ca_file)


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    ca_file, cert_file, key_file = write_server_files(tmp_path)
    port = free_port()
    log_file = tmp_path / "webhook.log"
    # Room for every request in flight: this test is about answering each of them; the
    # 429 past the pending bound is tests/webhook/test_bounds.py's.
    argv = [*serve_webhook_argv(cert_file, key_file, port),
            "--max-pending-admissions", str(CONCURRENCY)]  # fmt: skip
    process = start_logged(argv, log_file)
    served = Webhook(port, ca_file, log_file, process)
    try:
        wait_https_ready(
            process, name="serve-webhook", port=port, ca_file=ca_file, log_file=log_file
        )
        yield served
    finally:
        stop_process(process)


@dataclass
class Admission:
    uid: str
    status: int  # 0: no HTTP answer (transport error)
    seconds: float
    response: dict[str, Any] | None = None
    error: str | None = None

    def problem(self) -> str | None:
        """Why this is not a successful injection for its own uid, or None."""
        if self.error:
            return self.error
        if self.status != 200:
            return f"HTTP {self.status}"
        return answer_problem(self.response or {}, self.uid)


async def admit_all(
    url: str, ca_file: Path, bodies: Sequence[tuple[str, bytes]], *, concurrency: int
) -> tuple[list[Admission], float]:
    """POST every body with ``concurrency`` in flight (keep-alive); answers and seconds."""
    answers: list[Admission] = []

    def answered(posted: Posted) -> None:
        if posted.error:
            answers.append(Admission(posted.key, 0, posted.seconds, error=posted.error))
            return
        try:
            response = json.loads(posted.payload)["response"]
        except (ValueError, KeyError, TypeError):
            answers.append(Admission(posted.key, posted.status, posted.seconds,
                                     error="not an AdmissionReview"))  # fmt: skip
            return
        answers.append(Admission(posted.key, posted.status, posted.seconds, response))

    (elapsed,) = await post_all(url, ca_file, [bodies], concurrency=concurrency, answered=answered)
    return answers, elapsed


def test_webhook_answers_every_admission_under_load(webhook: Webhook):
    pod = example_pod()
    uids = [f"load-{i:05d}" for i in range(ADMISSIONS)]
    bodies = [(uid, admission_review(pod, uid)) for uid in uids]
    answers, elapsed = asyncio.run(
        admit_all(f"https://{HOST}:{webhook.port}/inject", webhook.ca_file, bodies,
                  concurrency=CONCURRENCY)
    )  # fmt: skip
    problems = Counter(p for a in answers if (p := a.problem()))
    latencies = sorted(a.seconds for a in answers)
    metrics = admission_metrics(webhook.get("/metrics")[1].decode())
    by_result, observed = metrics["admissions"], metrics.get("seconds_count", 0)
    logged = [line for line in json_lines(webhook.log_file) if line.get("event") == "admission"]
    print(
        f"\nwebhook: {len(answers)} admissions of the example pod ({len(bodies[0][1])} B) over"
        f" HTTPS at concurrency {CONCURRENCY} in {elapsed:.2f} s: {len(answers) / elapsed:.0f}"
        f" admissions/s, p50 {percentile(latencies, 0.5) * 1000:.1f} ms,"
        f" p99 {percentile(latencies, 0.99) * 1000:.1f} ms; errors {sum(problems.values())}"
        f" {dict(problems)}; /metrics {by_result} (histogram {observed}); log lines"
        f" {len(logged)}; server RSS {rss_kib(webhook.process.pid) / 1024:.1f} MiB"
    )
    assert len(answers) == ADMISSIONS
    assert not problems
    assert sorted(a.uid for a in answers) == uids
    # Same pod, same patch, whatever the interleaving -- and it is `meshguard inject`'s.
    (patch,) = {a.response["patch"] for a in answers if a.response}
    patched = jsonpatch.apply_patch(copy.deepcopy(pod), json.loads(base64.b64decode(patch)))
    expected = copy.deepcopy(pod)
    inject_pod(expected["metadata"], expected["spec"], settings=InjectSettings(signer=SIGNER))
    assert patched == expected
    assert by_result == {"injected": ADMISSIONS}
    assert observed == ADMISSIONS
    assert sorted(line["uid"] for line in logged) == uids
    assert {line["result"] for line in logged} == {"injected"}
    assert webhook.process.poll() is None


# --- b. the authz server --------------------------------------------------------------------


@dataclass
class AuthzServer:
    address: str
    process: subprocess.Popen[bytes]
    log_file: Path
    pod: dict[str, Any]


@pytest.fixture
def authz_server(tmp_path: Path) -> Iterator[AuthzServer]:
    pod = injected_example()
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(pod))
    port = free_port()
    log_file = tmp_path / "authz.log"
    process = start_logged(serve_authz_argv(pod_file, port), log_file, stdout=False)
    server = AuthzServer(f"{HOST}:{port}", process, log_file, pod)
    try:
        wait_grpc_serving(server.address, process, log_file)
        yield server
    finally:
        stop_process(process)


def test_authz_answers_every_check_under_load_without_growing(authz_server: AuthzServer):
    kinds = check_kinds(authz_server.pod)
    pid = authz_server.process.pid

    async def load() -> tuple[CheckRun, int, CheckRun, int]:
        async with grpc.aio.insecure_channel(authz_server.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            warmup = await run_checks(
                stub, kinds, first=0, count=WARMUP_CHECKS, concurrency=CONCURRENCY,
                stop_at=math.inf,
            )  # fmt: skip
            rss_warm = rss_kib(pid)
            measured = await run_checks(
                stub, kinds, first=WARMUP_CHECKS, count=CHECKS - WARMUP_CHECKS,
                concurrency=CONCURRENCY, stop_at=math.inf,
            )  # fmt: skip
            return warmup, rss_warm, measured, rss_kib(pid)

    warmup, rss_warm, measured, rss_end = asyncio.run(load())
    stop_process(authz_server.process)  # the log is complete once it exited
    assert authz_server.process.returncode == 0
    lines = json_lines(authz_server.log_file)
    decisions = [line for line in lines if line.get("event") == "decision"]
    sent = warmup.sent + measured.sent
    latencies = sorted(measured.latencies)
    allowed = sum(n for k in kinds if k.allowed for n in [sent[k.name]])
    print(
        f"\nauthz: {warmup.count} warm-up + {measured.count} Checks at concurrency"
        f" {CONCURRENCY} on one channel ({allowed} allowed, {sent.total() - allowed} denied):"
        f" {measured.count / measured.elapsed:.0f} checks/s, p50"
        f" {percentile(latencies, 0.5) * 1000:.2f} ms, p99"
        f" {percentile(latencies, 0.99) * 1000:.2f} ms; gRPC errors"
        f" {dict(warmup.errors + measured.errors)}, wrong answers"
        f" {dict(warmup.wrong + measured.wrong)}; RSS after warm-up {rss_warm / 1024:.1f}"
        f" MiB, at the end {rss_end / 1024:.1f} MiB ({(rss_end - rss_warm) / 1024:+.1f} MiB,"
        f" limit +{RSS_GROWTH_LIMIT_KIB / 1024:.0f}); decision lines {len(decisions)}"
    )
    assert sent.total() == CHECKS
    assert not warmup.errors and not measured.errors
    assert not warmup.wrong and not measured.wrong
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT_KIB
    # Exactly one decision line per Check, saying what was asked and what was answered.
    assert len(decisions) == CHECKS
    logged = Counter(
        (
            (d["pod"], d["request"]["source_address"], d["request"]["port"],
             d["request"]["method"], d["request"]["path"]),
            d["result"],
        )
        for d in decisions
    )  # fmt: skip
    expected: Counter[tuple[Any, str]] = Counter()
    for kind in kinds:
        expected[(kind.key, "allow" if kind.allowed else "deny")] += sent[kind.name]
    assert logged == expected


# --- c. the authz server killed mid-load, with the real Envoy in front ----------------------


@pytest.fixture
def fault_pod(shared_dir: Path) -> Iterator[FaultPod]:
    """The injected example pod in a network namespace: Istio's capture rules, meshguard's
    rules installed by ``meshguard init``, pilot-agent's stand-in on 15020 (uid 1337),
    ``meshguard serve-authz`` (uid 1337) and the real Envoy's loopback listener (uid 1337)."""
    with NetworkNamespace() as ns:
        yield FaultPod(ns, shared_dir)


@dataclass
class FaultTimeline:
    killed: float  # SIGKILL sent
    dead: float  # reaped
    restarted: float  # new server spawned
    recovered: float  # the first POST allowed after the restart came back

    def phase(self, began: float, ended: float) -> str:
        if ended < self.killed:
            return "before"
        if began >= self.dead and ended <= self.restarted:
            return "down"
        if began >= self.recovered:
            return "after"
        return "transition"  # around the kill, or the restart until Envoy reconnected


def test_authz_killed_mid_load_fails_closed_and_recovers(fault_pod: FaultPod):
    client = LoadClient(fault_pod.ns, uid=APP, workers=4, max_seconds=60)
    try:
        time.sleep(1.5)
        killed = time.monotonic()
        fault_pod.kill_authz()
        dead = time.monotonic()
        time.sleep(1.5)
        restarted = time.monotonic()
        fault_pod.start_authz()
        listening = time.monotonic()
        time.sleep(2.0)
        records = client.finish()
    finally:
        client.kill()
    recovered = min(
        (ended for began, ended, method, status, _ in records
         if began >= restarted and method == "POST" and status == 200),
        default=float("inf"),
    )  # fmt: skip
    timeline = FaultTimeline(killed, dead, restarted, recovered)
    by_phase = Counter(
        (timeline.phase(began, ended), method, status, origin.split(":")[0])
        for began, ended, method, status, origin in records
    )
    decided = sum(origin in {"upstream", "meshguard"} for *_, origin in records)
    decisions = sum(line.get("event") == "decision" for line in json_lines(fault_pod.log_file))
    print(f"\nauthz killed mid-load behind Envoy: {len(records)} requests in"
          f" {records[-1][1] - records[0][0]:.1f} s (4 threads, app uid); down"
          f" {restarted - dead:.2f} s, restart to listening {listening - restarted:.2f} s,"
          f" first POST allowed {recovered - restarted:.2f} s after the restart; answered by"
          f" meshguard {decided}, decision lines {decisions}")  # fmt: skip
    for (phase, method, status, origin), count in sorted(by_phase.items()):
        print(f"  {phase:<10} {method:<4} {status} {origin:<9} {count}")
    assert records
    errors = [r for r in records if r[3] == 0]
    assert not errors, errors[:5]  # every request got an HTTP answer
    assert not [r for r in records if r[2] == "GET" and r[3] == 200]  # never let through
    # POST works again after the restart, and keeps working.
    assert recovered != float("inf"), "POST never allowed again after the restart"
    # Up, before the kill and from the recovery on: POST reaches the upstream, GET is
    # refused by meshguard, nothing else.
    for phase in ("before", "after"):
        seen = {key[1:] for key in by_phase if key[0] == phase}
        assert seen == {("POST", 200, "upstream"), ("GET", 403, "meshguard")}, (phase, by_phase)
    # Down: every request refused by Envoy (status_on_error), none allowed by accident.
    down = {key[1:] for key in by_phase if key[0] == "down"}
    assert down == {("POST", 503, "envoy"), ("GET", 503, "envoy")}, by_phase
    # One decision line per answer meshguard decided; a Check decided by the killed server
    # but not delivered, at most one per client thread, is logged without an answer.
    assert decided <= decisions <= decided + 4
