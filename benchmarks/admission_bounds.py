"""What one admission costs at meshguard's limits: the worst ADMITTED inputs and the
refused attacks of issue 30, each in a fresh process.

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
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import Machine, machine, module_argv, script_parser
from meshguard import annotation_keys
from meshguard.webhook.server import WebhookSettings

MODULE = "benchmarks.admission_bounds"


def _rules_policy(rules: list[dict[str, Any]]) -> str:
    return json.dumps({"defaultAction": "deny", "rules": rules}, separators=(",", ":"))


def _case_pods(fit: int) -> dict[str, tuple[int, str, bool]]:
    """Case name -> (extra containers, policy text, admitted by design). ``fit``: the most
    extra containers whose compiled ruleset fits meshguard's limit (:func:`_most_containers`)."""
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
            12, _rules_policy([{"from": "*", "to": "app", "ports": list(range(30000, 30256))}]),
            True,
        ),
        "rules: 100 rules x 8 ports x 4 sources": (
            2, _rules_policy([{"from": named, "to": "cache",
                               "ports": list(range(30000 + 8 * i, 30008 + 8 * i))}
                              for i in range(100)]),
            True,
        ),
        f"containers: {fit + 3} containers (the most a ruleset fits), no rule": (
            fit, _rules_policy([]), True
        ),
        "body: 3 MiB review (20 containers' env)": (17, _rules_policy([]), True),
        "http: 64 KiB of http rules": (2, _rules_policy([http_rule] * 12), True),
        # refused by design: meshguard's limits and issue 30's attacks
        f"refused: {fit + 4} containers, no rule (ruleset over the limit)": (
            fit + 1, _rules_policy([]), False
        ),
        "refused: 1,500 aliases of a 1,000-port rule": (
            0,
            "x: &r {from: app, to: cache, ports: [" + ", ".join(map(str, range(1, 1001)))
            + "]}\nrules: [" + ", ".join(["*r"] * 1500) + "]",
            False,
        ),
        "refused: 200 containers, one rule of 10,000 ports": (
            200, _rules_policy([{"from": "*", "to": "app", "ports": list(range(1, 10_001))}]),
            False,
        ),
        "refused: 200 containers, '*' x 256 ports": (
            200, _rules_policy([{"from": "*", "to": "app", "ports": list(range(1, 257))}]),
            False,
        ),
    }  # fmt: skip


def _most_containers() -> int:
    """The most extra containers of ``wide_example`` (no rule) meshguard admits: its compiled
    ruleset grows with the containers up to ``MAX_RULESET_BYTES`` (meshguard/rules/compiler.py),
    so a pod of more is refused by design. Bisected with ``handle()`` itself, in a child
    process like the cases (the peak RSS a child reports starts at its parent's)."""
    from meshguard.webhook.review import handle  # noqa: PLC0415 - in the child
    from tests.support.pods import admission_review, wide_example  # noqa: PLC0415

    low, high = 0, 512  # admitted, refused
    while high - low > 1:
        middle = (low + high) // 2
        body = admission_review(wide_example(middle, policy=_rules_policy([])), "fit")
        answer: dict[str, Any] = dict(handle(body, settings=_settings())[1])
        low, high = (middle, high) if answer["response"]["allowed"] else (low, middle)
    return low


def _settings() -> Any:
    """The webhook's inject settings, as the server has them."""
    return WebhookSettings(cert_file=__file__, key_file=__file__).inject  # type: ignore[arg-type]


WORST = "body: 3 MiB review (20 containers' env)"


class CaseResult(TypedDict):
    case: str
    answer: str
    expected: str  # admitted, or refused (by design)
    seconds: float
    python_peak_mib: float
    rss_before_mib: float
    rss_peak_mib: float
    body_bytes: int


class Document(TypedDict):
    machine: Machine
    seconds: float
    runs: int
    most_containers: int  # the largest pod admitted (extra containers of the example pod)
    cases: list[CaseResult]


def _body(case: str, fit: int) -> bytes:
    from tests.support.pods import admission_review, wide_example  # noqa: PLC0415 - in the child

    containers, policy, _ = _case_pods(fit)[case]
    pod = wide_example(containers, policy=policy)
    if case.startswith("body:"):  # the most the API server sends (3 MiB), in env entries
        for container in pod["spec"]["containers"]:
            container["env"] = [{"name": f"V{i}", "value": "x" * 100} for i in range(1200)]
    return admission_review(pod, "bench")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_case(case: str, workers: int, fit: int, *, trace: bool) -> CaseResult:
    """In the child: one (or ``workers`` concurrent) cold handle() of the case's body;
    ``trace``: under tracemalloc (its peak is the figure; its time is not: tracing slows
    Python several times, so time and RSS come from a run without it)."""
    from meshguard.webhook.review import handle  # noqa: PLC0415 - in the child
    from tests.support.pods import admission_review, example_pod  # noqa: PLC0415

    settings = _settings()
    handle(admission_review(example_pod(), "warm"), settings=settings)
    if case == "authz":
        return _authz_case(trace=trace)
    body = _body(case, fit)
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
        "expected": "admitted" if _case_pods(fit)[case][2] else "refused",
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


def _authz_case(*, trace: bool) -> CaseResult:
    from meshguard.authz.store import policy_of  # noqa: PLC0415 - in the child
    from meshguard.inject.transform import InjectSettings, inject_pod  # noqa: PLC0415
    from tests.support.keys import SIGNER, TRUSTED  # noqa: PLC0415
    from tests.support.pods import wide_example  # noqa: PLC0415

    containers, policy, _ = _case_pods(0)["rules: 100 rules x 8 ports x 4 sources"]
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
        "expected": "102 rules served",
        "seconds": seconds,
        "python_peak_mib": peak / 2**20,
        "rss_before_mib": before,
        "rss_peak_mib": _rss_mib(),
        "body_bytes": size + len(annotations.get(annotation_keys.STATUS, "")),
    }


def _child(case: str, workers: int, fit: int, mode: str) -> CaseResult:
    process = subprocess.run(
        module_argv(MODULE, "_case", case, str(workers), str(fit), mode),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if process.returncode != 0:
        raise RuntimeError(f"case {case!r} failed: {process.stderr[-2000:]}")
    result: CaseResult = json.loads(process.stdout.splitlines()[-1])
    return result


def _measure(case: str, workers: int, fit: int) -> CaseResult:
    """Time and RSS from a plain run, the Python peak from a traced one."""
    timed = _child(case, workers, fit, "plain")
    traced = _child(case, workers, fit, "trace")
    return {**timed, "python_peak_mib": traced["python_peak_mib"]}


def _best(results: list[CaseResult]) -> CaseResult:
    """The run with the median time (memory figures are steady across runs)."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_fit"]:
        print(_most_containers())
        return 0
    if argv[:1] == ["_case"]:
        result = _run_case(argv[1], int(argv[2]), int(argv[3]), trace=argv[4] == "trace")
        print(json.dumps(result))
        return 0
    parser: argparse.ArgumentParser = script_parser(
        MODULE, description="cost of one admission at meshguard's limits", quick="about 20 s"
    )
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 3
    started = time.perf_counter()
    workers = WebhookSettings(cert_file=Path(), key_file=Path()).admission_workers  # the default
    found = subprocess.run(module_argv(MODULE, "_fit"), capture_output=True, text=True, check=True)
    fit = int(found.stdout)
    plan = [(case, 1) for case in _case_pods(fit)] + [(WORST, workers), ("authz", 1)]
    cases = [_best([_measure(case, n, fit) for _ in range(runs)]) for case, n in plan]
    seconds = time.perf_counter() - started
    where = machine()
    document = Document(machine=where, seconds=seconds, runs=runs, most_containers=fit, cases=cases)
    from benchmarks.suite.report import finish_script  # noqa: PLC0415 - not in the cases' RSS
    from benchmarks.suite.sections import bounds_section  # noqa: PLC0415

    finish_script("bounds", document, bounds_section, args.json)
    return 0 if all(_as_designed(case) for case in cases) else 1


def _as_designed(case: CaseResult) -> bool:
    """A refused case refused (by meshguard's limits), any other answered as declared."""
    if case["expected"] == "refused":
        return case["answer"] != "admitted"
    return case["answer"] == case["expected"]


if __name__ == "__main__":
    raise SystemExit(main())
