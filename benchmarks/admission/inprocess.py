"""What ``handle()`` costs in process, step by step (no HTTP)."""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jsonpatch

from benchmarks.admission.pod import Profile
from meshguard import logs
from meshguard.inject.posture import review_posture
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.pod import read_pod
from meshguard.policy import parse_mode, parse_policy
from meshguard.rules.compiler import compile_ruleset
from meshguard.webhook.review import handle
from tests.support.keys import SIGNER


def per_call_ms(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one call, in ms."""
    fn()  # warm caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - started) / iterations)
    return statistics.median(samples) * 1000


def fresh_copies(pod: dict[str, Any], count: int) -> Callable[[], dict[str, Any]]:
    copies = iter([copy.deepcopy(pod) for _ in range(count)])
    return lambda: next(copies)


def measure_handle(profile: Profile, body: bytes) -> list[tuple[str, float]]:
    """Per-admission cost of handle() and of its main steps, in ms (no HTTP)."""
    iterations, repeats = profile.handle_iterations, profile.handle_repeats
    count = iterations * repeats + 1
    settings = InjectSettings(signer=SIGNER)
    pod = json.loads(body)["request"]["object"]
    annotations = pod["metadata"]["annotations"]
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    policy = parse_policy(annotations.get("meshguard.io/policy"))
    mode = parse_mode(annotations.get("meshguard.io/mode"))
    ruleset = compile_ruleset(view, policy, mode=mode, settings=settings.compiler)
    mutated = copy.deepcopy(pod)
    patch = inject_pod(mutated["metadata"], mutated["spec"], settings=settings).operations
    _, answer, _ = handle(body, settings=settings)

    def inject_fresh() -> Callable[[], object]:
        next_pod = fresh_copies(pod, count)

        def call() -> object:
            target = next_pod()
            return inject_pod(target["metadata"], target["spec"], settings=settings)

        return call

    rows: list[tuple[str, float]] = []

    def row(label: str, fn: Callable[[], object]) -> None:
        rows.append((label, per_call_ms(fn, iterations, repeats)))

    row("handle() (meshguard log off)", lambda: handle(body, settings=settings))
    meshguard_logger = logging.getLogger("meshguard")
    saved = (meshguard_logger.handlers[:], meshguard_logger.level, meshguard_logger.propagate)
    with open(os.devnull, "w") as devnull:
        logs.configure(stream=devnull)
        try:
            row("handle() (JSON log line, as served)", lambda: handle(body, settings=settings))
        finally:
            meshguard_logger.handlers[:], meshguard_logger.level = saved[0], saved[1]
            meshguard_logger.propagate = saved[2]
    row("  json.loads(request body)", lambda: json.loads(body))
    row("  inject_pod()", inject_fresh())
    row("    parse_policy()", lambda: parse_policy(annotations.get("meshguard.io/policy")))
    row("    read_pod()", lambda: read_pod(metadata=pod["metadata"], spec=pod["spec"]))
    row(
        "    review_posture()",
        lambda: review_posture(pod["spec"], pod=view, settings=settings.posture),
    )
    row(
        "    compile_ruleset()",
        lambda: compile_ruleset(view, policy, mode=mode, settings=settings.compiler),
    )
    row("    ruleset.to_json()", ruleset.to_json)
    row("  json.dumps(patch) (answer's patch)", lambda: json.dumps(patch))
    row("json.dumps(answer) (server's reply)", lambda: json.dumps(answer))
    row(
        "jsonpatch.make_patch() (a diff of the pods, which the change list's operations replace)",
        lambda: jsonpatch.make_patch(pod, mutated),
    )
    return rows
