"""Benchmark what one Check costs inside the authz process, against a do-nothing servicer.

What it measures and how: ``benchmarks/README.md``, section ``authz_check.py``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from benchmarks.common import Machine, machine, machine_line, script_parser, write_json
from benchmarks.harness import alternating
from benchmarks.l7.servers import _EchoAuthorization
from meshguard import logs
from meshguard.authz.cache import DecisionCache
from meshguard.authz.decision import Decision
from meshguard.authz.identity import SECURITY_PROPERTY, URI_PROPERTY
from meshguard.authz.metrics import AuthzMetrics
from meshguard.authz.server import AuthorizationService, check, header_bytes_of, request_of
from meshguard.authz.store import StaticStore, policy_of
from tests.support.keys import TRUSTED
from tests.support.load import Kind, check_kinds
from tests.support.pods import injected_example

CONFIGS = ("echo", "meshguard", "meshguard, mTLS", "meshguard, no decision log")
#: Memory written between two cold Checks: more than this machine's caches hold.
EVICT_BYTES = 8 * 1024 * 1024
COLD_CHECKS = 400
#: The example pod's workload identity (namespace demo, ServiceAccount default).
POD_SPIFFE_ID = b"spiffe://cluster.local/ns/demo/sa/default"


class Document(TypedDict):
    machine: Machine
    seconds: float
    checks_per_round: int
    rounds: int
    #: configuration -> CPU µs per Check, each round.
    us_per_check: dict[str, list[float]]
    #: configuration -> CPU µs of single Checks after the caches were evicted (median).
    cold_us_per_check: dict[str, float]


class _Context:
    """What Check reads of a grpc.aio ServicerContext: the authentication context."""

    def __init__(self, auth: Mapping[str, Sequence[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return self._auth


Servicer = Callable[
    [external_auth_pb2.CheckRequest, Any], Coroutine[Any, Any, external_auth_pb2.CheckResponse]
]


def run_check(check: Servicer, request: external_auth_pb2.CheckRequest, context: Any) -> Any:
    """One Check to completion: it never awaits, so one step of its coroutine finishes it."""
    coroutine = check(request, context)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("Check awaited something")


def meshguard_service(pod: dict[str, Any], *, identities: bool) -> AuthorizationService:
    store = StaticStore([policy_of(pod, trusted=TRUSTED)])
    cache: DecisionCache[Decision] = DecisionCache()
    return AuthorizationService(
        store=store, metrics=AuthzMetrics(store, cache), identities=identities, cache=cache
    )


def check_answers(check: Servicer, kinds: Sequence[Kind], context: Any) -> None:
    for kind in kinds:
        problem = kind.problem(run_check(check, kind.request, context))
        if problem:
            raise RuntimeError(f"wrong answer before timing: {problem}")


def time_round(check: Servicer, kinds: Sequence[Kind], context: Any, count: int) -> float:
    """CPU µs per Check over ``count`` Checks cycling through ``kinds``."""
    requests = [kind.request for kind in kinds]
    started = time.thread_time()
    for index in range(count):
        run_check(check, requests[index % len(requests)], context)
    return (time.thread_time() - started) / count * 1e6


#: Parts of meshguard's Check, timed cold on their own (the report's "of which" lines).
STAGES = ("translate (request_of)", "translate + decide (check, decision cache)")


def stages(pod: dict[str, Any]) -> dict[str, Servicer]:
    """The first parts of a Check as servicers of their own: the translation of the
    CheckRequest, then that and the decision (what the `us` of a decision line measures)."""
    store = StaticStore([policy_of(pod, trusted=TRUSTED)])
    cache: DecisionCache[Decision] = DecisionCache()

    async def translate(request: external_auth_pb2.CheckRequest, _: Any) -> Any:
        return request_of(request)

    async def decide(request: external_auth_pb2.CheckRequest, _: Any) -> Any:
        size = header_bytes_of(request)
        return check(request_of(request), store, header_bytes=size, cache=cache)

    return dict(zip(STAGES, (translate, decide), strict=True))


def time_cold(check: Servicer, kinds: Sequence[Kind], context: Any, count: int) -> float:
    """Median CPU µs of one Check right after :data:`EVICT_BYTES` of other memory was written."""
    evict = bytearray(EVICT_BYTES)
    samples = []
    for index in range(count):
        evict[:] = bytes([index & 255]) * EVICT_BYTES  # written whole: every line evicted
        started = time.thread_time()
        run_check(check, kinds[index % len(kinds)].request, context)
        samples.append((time.thread_time() - started) * 1e6)
    return statistics.median(samples)


def measure(*, quick: bool) -> Document:
    began = time.monotonic()
    count, rounds = (2_000, 3) if quick else (10_000, 7)
    pod = injected_example()
    kinds = check_kinds(pod)
    plain = _Context({})
    mtls = _Context({SECURITY_PROPERTY: [b"ssl"], URI_PROPERTY: [POD_SPIFFE_ID]})
    decisions_logger = logging.getLogger("meshguard.authz.decisions")
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with (
        tempfile.TemporaryDirectory() as directory,
        open(Path(directory) / "decisions.log", "w", encoding="utf-8") as stream,
    ):
        logs.configure(stream=stream)
        servicers: dict[str, tuple[Servicer, Any, bool]] = {
            "echo": (_EchoAuthorization(None).Check, plain, False),
            "meshguard": (meshguard_service(pod, identities=False).Check, plain, True),
            "meshguard, mTLS": (meshguard_service(pod, identities=True).Check, mtls, True),
            "meshguard, no decision log": (
                meshguard_service(pod, identities=False).Check, plain, False,
            ),
        }  # fmt: skip
        for name, (check, context, _) in servicers.items():
            if name != "echo":
                check_answers(check, kinds, context)
        for index in range(rounds):
            order = alternating(CONFIGS, index)
            for name in order:
                check, context, logged = servicers[name]
                decisions_logger.setLevel(logging.INFO if logged else logging.WARNING)
                results[name].append(time_round(check, kinds, context, count))
        cold = {}
        cold_count = COLD_CHECKS // (4 if quick else 1)
        for name in CONFIGS:
            check, context, logged = servicers[name]
            decisions_logger.setLevel(logging.INFO if logged else logging.WARNING)
            cold[name] = time_cold(check, kinds, context, cold_count)
        decisions_logger.setLevel(logging.NOTSET)
        for name, step in stages(pod).items():
            cold[name] = time_cold(step, kinds, plain, cold_count)
    return {
        "machine": machine(grpcio=grpc.__version__),
        "seconds": time.monotonic() - began,
        "checks_per_round": count,
        "rounds": rounds,
        "us_per_check": results,
        "cold_us_per_check": cold,
    }


def report_lines(document: Document) -> list[str]:
    best = {name: min(values) for name, values in document["us_per_check"].items()}
    echo = best["echo"]
    lines = [
        f"CPU µs per Check, in-process (min of {document['rounds']} rounds of"
        f" {document['checks_per_round']:,} Checks, the load test's 10 kinds):"
    ]
    for name in CONFIGS:
        lines.append(f"  {name:<28} {best[name]:7.2f}   (+{best[name] - echo:.2f} over echo)")
    cold = document["cold_us_per_check"]
    lines.append(f"the same, one Check after {EVICT_BYTES >> 20} MiB were written (caches evicted),"
                 " median:")  # fmt: skip
    for name in CONFIGS:
        extra = cold[name] - cold["echo"]
        lines.append(f"  {name:<28} {cold[name]:7.1f}   (+{extra:.1f} over echo)")
    lines.append("  of meshguard's, on their own:")
    lines += [f"    {name:<44} {cold[name]:7.1f}" for name in STAGES]
    return lines


def main(argv: Sequence[str]) -> int:
    parser = script_parser(
        "benchmarks.authz_check",
        description="CPU per Check inside the authz process against a do-nothing servicer",
        quick="about 3 s",
    )
    args = parser.parse_args(argv)
    document = measure(quick=args.quick)
    if args.json:
        write_json(args.json, document)
    print("\n".join(report_lines(document)))
    print(machine_line(document["machine"], document["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
