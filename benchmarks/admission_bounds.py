"""What one admission costs at meshguard's limits: the worst ADMITTED inputs and the
refused attacks of issue 30, each in a fresh process.

Run: ``python -m benchmarks.admission_bounds [--quick] [--json FILE]`` (about 1 minute;
``--quick`` about 20 s: one run per case instead of three). Loopback only; no root.

What it measures and how: ``benchmarks/README.md``, section ``admission_bounds.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any, TypedDict

from benchmarks.common import Machine, machine, machine_line, module_argv, script_parser, write_json
from meshguard import annotation_keys
from meshguard.webhook.server import WebhookSettings

MODULE = "benchmarks.admission_bounds"


def _rules_policy(rules: list[dict[str, Any]]) -> str:
    return json.dumps({"defaultAction": "deny", "rules": rules}, separators=(",", ":"))


def _case_pods() -> dict[str, tuple[int, str]]:
    """Case name -> (extra containers, policy text)."""
    named = ["app", "log-shipper", "c0", "c1"]
    http_rule = {
        "from": named[:2],
        "to": "cache",
        "ports": [6379],
        "http": {
            "methods": ["GET", "POST", "PUT", "DELETE"],
            "paths": [f"/api/v1/{'x' * 40}/{i}/*" for i in range(64)],
            "headers": {f"x-h{i}": "v" * 40 for i in range(8)},
        },
    }
    return {
        # admitted, at the limits
        "expansion: '*' x 256 ports, 15 containers": (
            12, _rules_policy([{"from": "*", "to": "app", "ports": list(range(30000, 30256))}])
        ),
        "rules: 100 rules x 8 ports x 4 sources": (
            2, _rules_policy([{"from": named, "to": "cache",
                               "ports": list(range(30000 + 8 * i, 30008 + 8 * i))}
                              for i in range(100)])
        ),
        "containers: 200 containers, no rule": (197, _rules_policy([])),
        "body: 3 MiB review (20 containers' env)": (17, _rules_policy([])),
        "http: 64 KiB of http rules": (2, _rules_policy([http_rule] * 12)),
        # refused (issue 30's attacks)
        "refused: 1,500 aliases of a 1,000-port rule": (
            0,
            "x: &r {from: app, to: cache, ports: [" + ", ".join(map(str, range(1, 1001)))
            + "]}\nrules: [" + ", ".join(["*r"] * 1500) + "]",
        ),
        "refused: 200 containers, one rule of 10,000 ports": (
            200, _rules_policy([{"from": "*", "to": "app", "ports": list(range(1, 10_001))}])
        ),
        "refused: 200 containers, '*' x 256 ports": (
            200, _rules_policy([{"from": "*", "to": "app", "ports": list(range(1, 257))}])
        ),
    }  # fmt: skip


WORST = "body: 3 MiB review (20 containers' env)"


class CaseResult(TypedDict):
    case: str
    answer: str
    seconds: float
    python_peak_mib: float
    rss_before_mib: float
    rss_peak_mib: float
    body_bytes: int


class Document(TypedDict):
    machine: Machine
    seconds: float
    runs: int
    cases: list[CaseResult]


def _body(case: str) -> bytes:
    from tests.support.pods import admission_review, wide_example  # noqa: PLC0415 - in the child

    containers, policy = _case_pods()[case]
    pod = wide_example(containers, policy=policy)
    if case.startswith("body:"):  # the most the API server sends (3 MiB), in env entries
        for container in pod["spec"]["containers"]:
            container["env"] = [{"name": f"V{i}", "value": "x" * 100} for i in range(1200)]
    return admission_review(pod, "bench")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_case(case: str, workers: int, *, trace: bool) -> CaseResult:
    """In the child: one (or ``workers`` concurrent) cold handle() of the case's body;
    ``trace``: under tracemalloc (its peak is the figure; its time is not: tracing slows
    Python several times, so time and RSS come from a run without it)."""
    from meshguard.authz.store import policy_of  # noqa: PLC0415 - in the child
    from meshguard.webhook.review import handle  # noqa: PLC0415 - in the child
    from tests.support.pods import admission_review, example_pod  # noqa: PLC0415

    settings = WebhookSettings(cert_file=__file__, key_file=__file__).inject  # type: ignore[arg-type]
    handle(admission_review(example_pod(), "warm"), settings=settings)
    if case == "authz":
        return _authz_case(policy_of, trace=trace)
    body = _body(case)
    before = _rss_mib()
    if trace:
        tracemalloc.start()
    answers: list[Any] = []
    started = time.perf_counter()
    threads = [
        threading.Thread(target=lambda: answers.append(handle(body, settings=settings)))
        for _ in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    peak = _traced_peak(trace)
    response = answers[0][1]["response"]
    answer = "admitted" if response["allowed"] else response["status"]["message"][:90]
    return {
        "case": case if workers == 1 else f"{workers} workers x {case}",
        "answer": answer,
        "seconds": seconds,
        "python_peak_mib": peak / 2**20,
        "rss_before_mib": before,
        "rss_peak_mib": _rss_mib(),
        "body_bytes": len(body),
    }


def _traced_peak(trace: bool) -> int:
    if not trace:
        return 0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _authz_case(policy_of: Any, *, trace: bool) -> CaseResult:
    from meshguard.inject.transform import InjectSettings, inject_pod  # noqa: PLC0415
    from tests.support.keys import SIGNER, TRUSTED  # noqa: PLC0415
    from tests.support.pods import wide_example  # noqa: PLC0415

    containers, policy = _case_pods()["rules: 100 rules x 8 ports x 4 sources"]
    pod = wide_example(containers, policy=policy)
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    annotations = pod["metadata"]["annotations"]
    size = sum(len(v) for v in annotations.values())
    before = _rss_mib()
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    found = policy_of(pod, trusted=TRUSTED)
    seconds = time.perf_counter() - started
    peak = _traced_peak(trace)
    return {
        "case": "authz: policy_of, admitted record of 100 rules",
        "answer": "refused" if found.refused else f"{len(found.policy.rules)} rules served",
        "seconds": seconds,
        "python_peak_mib": peak / 2**20,
        "rss_before_mib": before,
        "rss_peak_mib": _rss_mib(),
        "body_bytes": size + len(annotations.get(annotation_keys.STATUS, "")),
    }


def _child(case: str, workers: int, mode: str) -> CaseResult:
    process = subprocess.run(
        module_argv(MODULE, "_case", case, str(workers), mode),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if process.returncode != 0:
        raise RuntimeError(f"case {case!r} failed: {process.stderr[-2000:]}")
    result: CaseResult = json.loads(process.stdout.splitlines()[-1])
    return result


def _measure(case: str, workers: int = 1) -> CaseResult:
    """Time and RSS from a plain run, the Python peak from a traced one."""
    timed = _child(case, workers, "plain")
    traced = _child(case, workers, "trace")
    return {**timed, "python_peak_mib": traced["python_peak_mib"]}


def _best(results: list[CaseResult]) -> CaseResult:
    """The run with the median time (memory figures are steady across runs)."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_case"]:
        print(json.dumps(_run_case(argv[1], int(argv[2]), trace=argv[3] == "trace")))
        return 0
    parser: argparse.ArgumentParser = script_parser(
        MODULE, description="cost of one admission at meshguard's limits", quick="about 20 s"
    )
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 3
    started = time.perf_counter()
    workers = WebhookSettings.__dataclass_fields__["admission_workers"].default
    plan = [(case, 1) for case in _case_pods()] + [(WORST, workers), ("authz", 1)]
    cases = [_best([_measure(case, n) for _ in range(runs)]) for case, n in plan]
    print(f"{'case':58} {'answer':>10} {'s':>7} {'py MiB':>7} {'RSS MiB':>14}")
    for r in cases:
        answer = "admitted" if r["answer"] == "admitted" else r["answer"][:10]
        rss = f"{r['rss_before_mib']:.0f} -> {r['rss_peak_mib']:.0f}"
        print(f"{r['case'][:58]:58} {answer:>10} {r['seconds']:7.3f}"
              f" {r['python_peak_mib']:7.1f} {rss:>14}")  # fmt: skip
    for r in cases:
        if r["answer"] != "admitted":
            print(f"  {r['case']}: {r['answer']}")
    seconds = time.perf_counter() - started
    where = machine()
    print(machine_line(where, seconds))
    if args.json:
        write_json(args.json, Document(machine=where, seconds=seconds, runs=runs, cases=cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
