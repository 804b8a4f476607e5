"""The report's L7 sections, from ``l7_path.py``'s JSON: the native engine and the ext_authz
engines against the same listener with no authorization (issue 25's goal), the authz server
alone, and ``serve-authz --workers``."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import NOISE_CORES
from benchmarks.l7.envoys import AUTHZ_GOAL, CONFIGS, NATIVE_GOAL, NATIVE_STRETCH
from benchmarks.suite.report import ASSETS, Report, image, not_measured, table
from benchmarks.suite.runner import ScriptRun

SHARED_NOTE = (
    "The machine is shared: other work on its 2 CPUs during a run lowers and scatters the"
    " figures; the per-round values and the 'used' column of the script's output show how much."
)
#: The configurations the report shows, in its order (l7_path.py measures them all).
ENGINES = (
    ("a", "(a) no authorization"),
    ("n", "(n) native engine"),
    ("n0", "(n0) native, no decision log"),
    ("nd", "(nd) native, denials logged"),
    ("c", "(c) serve-authz ext_authz, mTLS"),
    ("c0", "(c0) do-nothing ext_authz, mTLS"),
    ("b", "(b) Envoy RBAC, static rule"),
    ("r", "(r) Envoy router alone"),
)


def _by_c(cells: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(cells.items(), key=lambda kv: int(kv[0]))


def _series(values: dict[str, float]) -> str:
    return ", ".join(f"c={c}: {float(v):.2f}" for c, v in _by_c(values))


def l7_section(
    report: Report,
    run: Any,
    worker_result: dict[str, Any] | None,
    worker_problem: str | None,
) -> None:
    """The L7 path and the authz server alone (from ``run``), then the workers."""
    lines = ["## L7 path: the native engine and ext_authz against no authorization", ""]
    if run is None or not run.ok or not run.data or "nd" not in run.data["http"]["rows"]:
        problem = "not run" if run is None else (run.problem or "a run without (nd)")
        lines += not_measured("l7_path.py", problem)
        report.add_summary("L7 path", "(n) native / (a) no authorization", "-", ">= 0.9", None)
        report.add_summary("authz", "serve-authz / bare grpc.aio echo", "-", ">= 0.7", None)
    else:
        lines += _engines(report, run.data)
        lines += _authz_alone(report, run.data["grpc"])
        lines += _where_time_goes(run.data)
        lines += image(ASSETS.get("l7"), "L7 throughput and latency ratios")
    lines += _workers(report, worker_result, worker_problem)
    report.section(lines)


def l7_script_section(report: Report, run: ScriptRun) -> None:
    """What ``l7_path.py`` prints: the section without the suite's workers."""
    l7_section(report, run, None, None)
    del report.sections[report.sections.index("### serve-authz --workers") :]
    report.summary = [row for row in report.summary if row[0] != "authz workers"]


def _where_time_goes(d: dict[str, Any]) -> list[str]:
    """Per-process CPU, the decisions meshguard logged, the authz profile, Envoy's counters
    and the noise from outside the benchmark."""
    http, grpc_, extra = d["http"], d["grpc"], d["extra"]
    rows, ratios = http["rows"], http["ratios"]
    top = _by_c(rows["a"])[-1][0]
    mg, echo = grpc_["rows"]["meshguard"][top], grpc_["rows"]["echo"][top]
    c_cpu, b_cpu = rows["c"][top]["cpu_us_per_request"], rows["b"][top]["cpu_us_per_request"]
    body = [
        [config.label, *(f"{cell['cpu_us_per_request'][config.envoy]:.0f}"
                         for _, cell in _by_c(rows[config.key])),
         f"{ratios['b/r'][top]:.3f}" if config.key == "b" else ""]
        for config in CONFIGS
    ]  # fmt: skip
    lines = ["### Where time goes", "", "Envoy's own CPU per request (µs):", ""]
    lines += table(["configuration", *(f"c={c}" for c, _ in _by_c(rows["a"])), "(b)/(r)"], body)
    decisions, spy = extra["decisions"], extra["profile"]
    lines += [
        f"- per Check, direct gRPC at c={top}: serve-authz {mg['server_cpu_us']:.0f} µs CPU,"
        f" the bare grpc.aio echo {echo['server_cpu_us']:.0f} µs; plaintext ratios"
        f" serve-authz / echo: {_series(grpc_['ratio_plain_meshguard_over_echo'])}; mTLS adds"
        " per Check at c=1: "
        + ", ".join(
            f"{server} p50 {p50:+.0f} µs, server CPU {grpc_['mtls_added_cpu_us'][server]:+.0f} µs"
            for server, p50 in grpc_["mtls_added_p50_us"].items()
        ),
        f"- per request through Envoy at c={top}: authz {c_cpu['authz']:.0f} µs CPU (the echo in"
        f" (c0): {rows['c0'][top]['cpu_us_per_request']['echo']:.0f} µs); the whole machine"
        f" {c_cpu['busy']:.0f} µs with ext_authz, {b_cpu['busy']:.0f} µs with RBAC; (c0)/(b)"
        f" {ratios['c0/b'][top]:.2f}, (c)/(c0) {ratios['c/c0'][top]:.2f}",
        f"- decision time meshguard logs (`us`: translate + decide): p50 {decisions['us_p50']}"
        f" µs, p99 {decisions['us_p99']} µs over {sum(decisions['decisions'].values()):,}"
        f" decisions {decisions['decisions']}",
        f"- serve-authz CPU by thread, direct gRPC at c={top} ({spy['checks_per_second']:,.0f}"
        f" checks/s, {spy['server_cpu_us_per_check']:.0f} µs/check, outside noise"
        f" {spy['noise_cores']:.2f} cores): "
        + ", ".join(f"{name} {us:.0f} µs" for name, us in spy["thread_cpu_us_per_check"].items()),
    ]
    if "skipped" in spy:
        lines.append(f"- profile: {spy['skipped']}")
    else:
        lines.append(
            f"- py-spy on serve-authz, {spy['samples']} non-idle samples: "
            + ", ".join(f"{name} {share:.1%}" for name, share in spy["buckets"].items())
            + "; hottest leaf frames: "
            + ", ".join(f"`{name}` {share:.1%}" for name, share in spy["top_leaves"][:8])
        )
    lines.append(
        "- Envoy counters: "
        + "; ".join(
            f"{key}: " + ", ".join(f"{n.split('.', 1)[-1]}={v:,}" for n, v in sorted(s.items()))
            for key, s in extra["envoy_stats"].items()
            if s
        )
    )
    spread = http["instance_spread"]
    lines.append(
        f"- two Envoy processes of one configuration, instance 1 / instance 0 req/s at c={top}"
        " (why each round alternates them): "
        + ", ".join(f"({key}) {float(by_c[top]):.3f}" for key, by_c in spread.items())
    )
    noisy = [cores for summary in (http, grpc_) for cells in summary["rows"].values()
             for cell in cells.values() for cores in cell["noise_cores"]]  # fmt: skip
    lines += [
        f"- noise: {sum(c >= NOISE_CORES for c in noisy)} of {len(noisy)} trials had >="
        f" {NOISE_CORES} cores busy outside the benchmark's processes (max {max(noisy):.2f});"
        " medians use each cell's clean trials when it has some",
        "",
    ]
    return lines


def _engines(report: Report, d: dict[str, Any]) -> list[str]:
    http = d["http"]
    rows, ratios = http["rows"], http["ratios"]
    lines = [
        "`benchmarks/l7_path.py`: wrk (1 thread, keep-alive, POST /quitquitquit as the app"
        " uid) through one Envoy worker per configuration: (a) meshguard's native listener"
        " with no authorization (its original_dst, routing header and ORIGINAL_DST cluster;"
        " only the router, no access log), (n) meshguard's native engine (the ambiguity DENY"
        " regexes and the pod's RBAC by ECDS from a file, its JSON decision line per request),"
        " (n0) the same without that line, (nd) the same logging denials only (the requests"
        " here are allowed: its access-log filter runs, no line is written), (c) ext_authz"
        " to the real `serve-authz` (kernel REDIRECT, mTLS Check channel), (c0) the same"
        " listener asking a do-nothing grpc.aio ext_authz over the same mTLS, (b) Envoy RBAC"
        " holding the rule statically on (r), Envoy's router alone (no original_dst, no"
        " routing header, a static cluster): (a)/(r) is what meshguard's routing costs, not"
        f" authorization. Medians over {d['profile']['rounds']} alternating rounds"
        f" ({d['profile']['name']} profile); every configuration but (c) runs in two Envoy"
        " processes that the rounds alternate (0 1 1 0), as two processes of one"
        " configuration differ by several percent (memory layout). CPU per request from"
        " /proc: the Envoy that served the trial, and the whole machine; 'used': the rounds"
        " without outside CPU noise (none: all rounds used).",
        "",
    ]
    body = [
        [label, c, f"{cell['per_second']:,.0f}", f"{cell['p50_us'] / 1000:.2f}",
         f"{cell['p99_us'] / 1000:.2f}", cell["errors"],
         f"{cell['per_second'] / rows['a'][c]['per_second']:.3f}",
         f"{cell['cpu_us_per_request'][f'envoy_{key}']:.0f}",
         f"{cell['cpu_us_per_request']['busy']:.0f}", f"{cell['used']}/{len(cell['per_round'])}"]
        for key, label in ENGINES
        for c, cell in _by_c(rows[key])
    ]  # fmt: skip
    lines += table(
        ["config", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", "ratio vs (a)",
         "Envoy CPU µs/req", "machine CPU µs/req", "used"],
        body,
    )  # fmt: skip
    native = ratios["n/a"]
    worst = min(native, key=lambda c: float(native[c]))
    ok = float(native[worst]) >= NATIVE_GOAL
    stretch = all(float(v) >= NATIVE_STRETCH for v in native.values())
    report.add_summary("L7 path, native",
                       "(n) native engine / (a) no authorization, req/s (worst concurrency)",
                       f"{float(native[worst]):.3f} at c={worst}  ({_series(native)})",
                       f">= {NATIVE_GOAL} (stretch {NATIVE_STRETCH})", ok)  # fmt: skip
    report.add_summary(
        "L7 path, ext_authz",
        "(c) serve-authz / (a); (c0) do-nothing ext_authz / (a), req/s",
        f"{_series(ratios['c/a'])}; {_series(ratios['c0/a'])}",
        "no goal",
        None,
    )
    log_cost = {key: {c: rows[key][c]["cpu_us_per_request"][f"envoy_{key}"]
                      - rows["n0"][c]["cpu_us_per_request"]["envoy_n0"] for c in rows[key]}
                for key in ("n", "nd")}  # fmt: skip
    added = http["mtls_added_us"]
    lines += [
        f"Goal (n)/(a) >= {NATIVE_GOAL} at every concurrency: "
        + ("met" if ok else "**not met**")
        + f"; stretch >= {NATIVE_STRETCH}: {'met' if stretch else 'not met'}."
        f" Per round: {http['round_ratios_n_over_a']}. Meshguard's routing against Envoy's"
        f" router alone, (a)/(r): {_series(ratios['a/r'])}.",
        "",
        f"**What the decision log line costs.** (n)/(n0): {_series(ratios['n/n0'])}; Envoy CPU"
        " per request with the line minus without: "
        + ", ".join(f"c={c}: {v:+.0f} µs" for c, v in _by_c(log_cost["n"]))
        + f". Logging denials only, (nd)/(a): {_series(ratios['nd/a'])} (no line written for"
        " these allowed requests; its filter's CPU against (n0): "
        + ", ".join(f"c={c}: {v:+.0f} µs" for c, v in _by_c(log_cost["nd"]))
        + "). The benchmark's Envoys write their stdout to /dev/null: a pod's container log"
        " (a pipe to the runtime) costs more per line.",
        "",
        f"**The ext_authz engines** (informative): (c)/(c0), both mTLS: {_series(ratios['c/c0'])}"
        f" (per round {http['round_ratios_c_over_c0']}); mTLS on the Check channel adds per"
        f" request at c={added['concurrency']} ((c0) - (c0p), plaintext): p50"
        f" {added['p50_us']:+.0f} µs (rounds {added['p50_us_per_round']}).",
        "",
    ]
    if not ok:
        cpu_n = rows["n"][worst]["cpu_us_per_request"]
        cpu_a = rows["a"][worst]["cpu_us_per_request"]
        lines += [
            f"**What limits it (measured, c={worst}).** Envoy's CPU per request"
            f" {cpu_n['envoy_n']:.0f} µs with the native engine against {cpu_a['envoy_a']:.0f}"
            f" µs without authorization; the whole machine {cpu_n['busy']:.0f} against"
            f" {cpu_a['busy']:.0f} µs (unattributed cores per round:"
            f" {rows['n'][worst]['noise_cores']}). {SHARED_NOTE}",
            "",
        ]
    return lines


def _authz_alone(report: Report, grpc_: dict[str, Any]) -> list[str]:
    ratio = grpc_["ratio_meshguard_over_echo"]
    body = [
        [server, c, f"{cell['per_second']:,.0f}", f"{cell['p50_us'] / 1000:.2f}",
         f"{cell['p99_us'] / 1000:.2f}", f"{cell['server_cpu_us']:.0f}", cell["errors"],
         f"{float(ratio[c]):.3f}" if server == "meshguard" else "1.000"]
        for server in ("echo", "meshguard")
        for c, cell in _by_c(grpc_["rows"][server])
    ]  # fmt: skip
    lines = ["### Authz server alone (grpc.aio client, one channel)", ""]
    lines += table(
        ["server", "in flight", "checks/s", "p50 ms", "p99 ms", "server CPU µs/call", "errors",
         "ratio vs echo"],
        body,
    )  # fmt: skip
    worst = min(ratio, key=lambda c: float(ratio[c]))
    ok = float(ratio[worst]) >= AUTHZ_GOAL
    report.add_summary(
        "authz",
        "serve-authz / bare grpc.aio echo, checks/s (worst in-flight)",
        f"{float(ratio[worst]):.3f} at {worst}",
        f">= {AUTHZ_GOAL}",
        ok,
    )
    lines += [f"Goal >= {AUTHZ_GOAL}: {'met' if ok else '**not met**'}.", ""]
    if not ok:
        mg, echo = grpc_["rows"]["meshguard"][worst], grpc_["rows"]["echo"][worst]
        lines += [
            f"**What limits it (measured).** Server CPU per call {mg['server_cpu_us']:.0f} µs"
            f" for meshguard vs {echo['server_cpu_us']:.0f} µs for the echo; the extra is the"
            " decision, its JSON log line and the metrics (see the py-spy profile in the"
            " script's output if py-spy is installed).",
            "",
        ]
    return lines


def _workers(
    report: Report, worker_result: dict[str, Any] | None, worker_problem: str | None
) -> list[str]:
    lines = ["### serve-authz --workers", ""]
    if worker_result is None:
        lines += [f"Not measured: {worker_problem or 'not run'}.", ""]
        report.add_summary("authz workers", "2 workers / 1 worker, checks/s", "-", "-", None)
    else:
        w = worker_result
        first = next(iter(next(iter(w["rows"].values()))))
        lines += [
            "Measured by `benchmarks/suite/workers.py`: `python -m meshguard serve-authz --pods"
            " FILE --metrics-port 0 --workers N` on the example pod injected with"
            " `inject_pod(..., InjectSettings(request_template=False))`, driven by"
            f" {first['clients']} client processes x {first['channels_per_client']} gRPC"
            f" channels, {first['concurrency_per_client']} calls in flight each, the same"
            " allowed CheckRequest; median of the rounds. The clients share the"
            f" {w['cpus']} CPUs with the server, so this is a lower bound on what N workers"
            " serve.",
            "",
        ]
        lines += table(
            ["workers", "checks/s", "vs 1 worker", "per round", "errors", "denied",
             "machine busy", "server CPU (cores)"],
            [[n, f"{w['checks_per_second'][n]:,.0f}",
              f"{w['checks_per_second'][n] / w['checks_per_second']['1']:.2f}",
              ", ".join(f"{s['checks_per_second']:,.0f}" for s in samples),
              sum(s["errors"] for s in samples), sum(s["denied"] for s in samples),
              ", ".join(f"{s['machine_busy_share']:.0%}" for s in samples),
              ", ".join(f"{s['server_cores']:.2f}" if "server_cores" in s else "-"
                        for s in samples)]
             for n, samples in sorted(w["rows"].items())],
        )  # fmt: skip
        report.add_summary("authz workers", "2 workers / 1 worker, checks/s",
                           f"{w['speedup_2_over_1']:.2f} ({w['checks_per_second']['1']:,.0f} -> "
                           f"{w['checks_per_second']['2']:,.0f}/s)", "no goal", None)  # fmt: skip
        two = w["rows"]["2"][0]
        lines += [
            f"With {w['cpus']} CPUs and the load generators on the same machine, the second"
            " worker can only use the CPU the clients leave: with 2 workers the machine was"
            f" {two['machine_busy_share']:.0%} busy"
            + (
                f" and the server (all workers) used {two['server_cores']:.2f} cores, the"
                f" clients most of the rest"
                if "server_cores" in two
                else ""
            )
            + ". The gain measured here is bounded by the machine, not by SO_REUSEPORT;"
            " measuring the scaling needs the clients on other cores than the workers.",
            "",
        ]
        lines += image(ASSETS.get("workers"), "serve-authz workers")
    return lines
