"""1. The webhook: admissions at a concurrency, every answer checked, nothing lost."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch

from benchmarks.common import json_lines
from benchmarks.stress.rows import Profile, Row
from meshguard.inject.transform import InjectSettings, inject_pod
from tests.support.admissions import Posted, admission_metrics, answer_problem, post_all
from tests.support.keys import SIGNER
from tests.support.latency import latency_ms
from tests.support.pods import admission_review, example_pod
from tests.support.processes import (
    HOST,
    free_port,
    https_get,
    rss_kib,
    serve_webhook_argv,
    start_logged,
    stop_process,
    wait_https_ready,
)
from tests.support.tls import write_server_files


@dataclass
class AdmissionRun:
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # no answer, not 200, not a review
    wrong: Counter[str] = field(default_factory=Counter)  # an answer, but not the right one
    latencies: list[float] = field(default_factory=list)
    answered_uids: list[str] = field(default_factory=list)
    elapsed: float = 0.0


async def admit(
    url: str, ca_file: Path, pod: dict[str, Any], expected: dict[str, Any], *,
    prefix: str, count: int, concurrency: int, max_seconds: float,
) -> AdmissionRun:  # fmt: skip
    run = AdmissionRun()
    good_patches: set[str] = set()

    def answered(posted: Posted) -> None:
        run.sent += 1
        run.latencies.append(posted.seconds)
        if posted.error or posted.status != 200:
            run.errors[posted.error or f"HTTP {posted.status}"] += 1
            return
        try:
            response = json.loads(posted.payload)["response"]
        except (ValueError, KeyError, TypeError):
            run.errors["not an AdmissionReview"] += 1
            return
        run.answered_uids.append(str(response.get("uid")))
        if problem := admission_problem(response, posted.key, pod, expected, good_patches):
            run.wrong[problem] += 1

    # each body made as it is sent, by the worker sending it
    bodies = (
        (uid, admission_review(pod, uid)) for uid in (f"{prefix}-{n:06d}" for n in range(count))
    )
    (run.elapsed,) = await post_all(url, ca_file, [bodies], concurrency=concurrency,
                                    answered=answered, max_seconds=max_seconds)  # fmt: skip
    return run


def admission_problem(
    response: dict[str, Any],
    uid: str,
    pod: dict[str, Any],
    expected: dict[str, Any],
    good: set[str],
) -> str | None:
    """Why an answer is not the right injection for its uid; ``good`` holds the patches
    already found to turn ``pod`` into ``expected`` (inject_pod's result)."""
    if problem := answer_problem(response, uid):
        return problem
    patch = response["patch"]
    if patch not in good:
        patched = jsonpatch.apply_patch(copy.deepcopy(pod), json.loads(base64.b64decode(patch)))
        if patched != expected:
            return "the patched pod is not inject_pod's"
        good.add(patch)
    return None


def run_webhook(profile: Profile, concurrency: int, workdir: Path) -> Row:
    ca_file, cert_file, key_file = write_server_files(workdir)
    pod = example_pod()
    expected = copy.deepcopy(pod)
    inject_pod(expected["metadata"], expected["spec"], settings=InjectSettings(signer=SIGNER))
    port = free_port()
    log_file = workdir / "webhook.log"
    # Room for every request in flight, as tests/load: this is about answering each of them.
    argv = [*serve_webhook_argv(cert_file, key_file, port),
            "--max-pending-admissions", str(concurrency)]  # fmt: skip
    process = start_logged(argv, log_file)
    try:
        wait_https_ready(
            process, name="serve-webhook", port=port, ca_file=ca_file, log_file=log_file
        )
        url = f"https://{HOST}:{port}/inject"

        def load(prefix: str, count: int) -> AdmissionRun:
            return asyncio.run(
                admit(url, ca_file, pod, expected, prefix=prefix, count=count,
                      concurrency=concurrency, max_seconds=profile.phase_seconds)
            )  # fmt: skip

        warmup = load("warmup", profile.admission_warmup)
        rss_warm = rss_kib(process.pid)
        measured = load("load", profile.admissions)
        rss_end = rss_kib(process.pid)
        counted = admission_metrics(https_get(port, "/metrics", ca_file)[1].decode())["admissions"]
        alive = process.poll() is None
    finally:
        stop_process(process)
    lines, not_json = json_lines(log_file)
    logged = Counter(line.get("uid") for line in lines if line.get("event") == "admission")
    sent = warmup.sent + measured.sent
    problems = []
    answered = Counter(warmup.answered_uids + measured.answered_uids)
    if any(n != 1 for n in answered.values()) or answered.total() != sent:
        problems.append(f"webhook: {answered.total()} answers for {sent} admissions sent")
    if counted != {"injected": sent}:
        problems.append(f"webhook: /metrics counted {counted}, sent {sent}")
    if logged.total() != sent or any(n != 1 for n in logged.values()):
        problems.append(f"webhook: {logged.total()} admission log lines for {sent} sent")
    if not_json:
        problems.append(f"webhook: {not_json} log lines are not JSON")
    if not alive:
        problems.append("webhook: the server died")
    errors, wrong = warmup.errors + measured.errors, warmup.wrong + measured.wrong
    problems += [f"webhook: {n} x {what}" for what, n in (errors + wrong).items()]
    body_bytes = len(admission_review(pod, "load-000000"))
    return Row(
        scenario="webhook: admissions (HTTPS)", sent=measured.sent, errors=errors.total(),
        wrong=wrong.total(), rate=measured.sent / measured.elapsed if measured.elapsed else 0.0,
        latency=latency_ms(measured.latencies),
        notes=f"+{warmup.sent} warm-up; review {body_bytes} B; /metrics {counted}; log"
        f" {logged.total()} lines; RSS {rss_warm / 1024:.1f} -> {rss_end / 1024:.1f} MiB",
        problems=problems,
    )  # fmt: skip
