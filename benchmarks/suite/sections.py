"""The report's sections on admission, rule install, the init image, Istio CNI mode and the
load test, from their scripts' JSON and the suite's in-process measurements."""

from __future__ import annotations

from typing import Any

from benchmarks.suite import measure
from benchmarks.suite.report import ASSETS, Report, code, image, not_measured, table, verdict_of
from benchmarks.suite.runner import ScriptRun

WEBHOOK_GOAL = 0.5


def _handle_steps(handle_ms: dict[str, float]) -> list[tuple[str, float]]:
    """The innermost steps of handle() in the script's indented breakdown (leaves only)."""
    names = list(handle_ms)
    depth = [len(k) - len(k.lstrip()) for k in names]
    return [
        (name.strip(), handle_ms[name])
        for i, name in enumerate(names)
        if depth[i] > 0 and (i + 1 == len(names) or depth[i + 1] <= depth[i])
    ]


def cpus_of(document: dict[str, Any]) -> object:
    """The CPUs a script's JSON document says it ran on (``machine``; at the top level in
    the results.json of earlier runs)."""
    machine = document.get("machine")
    return machine["cpus"] if isinstance(machine, dict) else document.get("cpus")


def webhook_section(report: Report, run: ScriptRun | None) -> None:
    """benchmarks/webhook.py: its own renderer, so the script prints the same section."""
    lines = ["## Admission webhook", ""]
    if run is None or not run.ok or not run.data:
        lines += not_measured("webhook.py", "not run" if run is None else run.problem)
        report.add_summary("admission", "serve-webhook / bare aiohttp", "-", ">= 0.5", None)
        report.section(lines)
        return
    d = run.data
    lines += [
        "`benchmarks/webhook.py`: HTTPS (TLS 1.3, keep-alive) AdmissionReview of a"
        f" {d['pod_containers']}-container Istio pod ({d['request_bytes']:,} B request,"
        f" {d['answer_bytes']:,} B answer), one aiohttp client; baseline = a bare aiohttp"
        " endpoint returning the precomputed answer, measured in the same run.",
        "",
    ]
    rows = [
        [r["server"], r["concurrency"], r["requests"], r["errors"], f"{r['throughput']:,.0f}",
         f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
         ", ".join(f"{x:.0f}" for x in r.get("round_throughputs", [])) or "-",
         r.get("error_kinds") or ""]
        for r in d["results"]
    ]  # fmt: skip
    lines += table(
        ["server", "concurrency", "requests", "errors", "adm/s", "p50 ms", "p99 ms",
         "per round", "error kinds"],
        rows,
    )  # fmt: skip
    ratio = d["throughput_ratio"]
    worst = min(ratio, key=lambda c: ratio[c])
    ok = ratio[worst] >= WEBHOOK_GOAL
    series = ", ".join(f"c={c}: {v:.2f}" for c, v in ratio.items())
    report.add_summary(
        "admission",
        "serve-webhook / bare aiohttp, adm/s (worst concurrency)",
        f"{ratio[worst]:.3f} at c={worst}  ({series})",
        f">= {WEBHOOK_GOAL}",
        ok,
    )
    metrics = d["meshguard_metrics"]
    lines += [f"Goal >= {WEBHOOK_GOAL} at every concurrency: {verdict_of(ok)}.", ""]
    if metrics:
        lines += [
            f"meshguard's /metrics: {sum(metrics.get('admissions', {}).values())} admissions"
            f" {metrics.get('admissions')} (the client sent {metrics.get('sent')}), mean"
            f" server-side time {metrics.get('server_mean_ms', float('nan')):.2f} ms (body read"
            " + handle()).",
            "",
        ]
    handle_ms = d["handle_ms"]
    served = handle_ms.get("handle() (JSON log line, as served)", float("nan"))
    if not ok:
        steps = sorted(_handle_steps(handle_ms), key=lambda kv: -kv[1])
        mg, base = (
            next(r for r in d["results"] if r["server"] == s and str(r["concurrency"]) == worst)
            for s in ("meshguard", "baseline")
        )
        lines += [
            "**What limits it (measured, the script's in-process breakdown).** At"
            f" concurrency {worst} meshguard serves one admission per"
            f" {1000 / mg['throughput']:.2f} ms, the baseline per"
            f" {1000 / base['throughput']:.2f} ms. `handle()` alone (no HTTP) costs"
            f" {served:.2f} ms"
            f" per admission; the server's own mean (body read + handle(), /metrics) is"
            f" {metrics.get('server_mean_ms', float('nan')):.2f} ms."
            " Largest steps: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in steps[:4])
            + ". To reach the goal meshguard must serve one admission in"
            f" {2000 / base['throughput']:.2f} ms at this concurrency; `handle()` alone"
            f" is {served:.2f} ms, so even a free HTTP/TLS layer would not reach it: the"
            f" work inside `handle()` (largest: {steps[0][0]}) has to shrink by"
            f" {served - 2000 / base['throughput']:.2f} ms, or run on more processes. The"
            " baseline endpoint does no work, so at this concurrency it mostly measures the"
            f" client, which shares the {cpus_of(d)} CPUs with the server (the script's own"
            " caveat): the ratio understates meshguard's capacity.",
            "",
        ]
    lines += ["In-process breakdown (ms per admission, no HTTP, the same body):", ""]
    lines += code("\n".join(f"{k:<40}{v:8.3f}" for k, v in handle_ms.items()))
    report.section(lines)


def growth_section(report: Report, growth: dict[str, Any] | None, problem: str | None) -> None:
    """The suite's in-process admission cost by pod size."""
    lines = ["### Admission cost vs pod size", ""]
    if growth is None:
        lines += [f"Not measured: {problem or 'not run'}.", ""]
    else:
        lines += [
            "In-process `meshguard.webhook.review.handle()` timing (no HTTP/TLS — the growth"
            " curve only; best of"
            f" {growth['repeats']} x {growth['iterations']} calls), on `webhook.py`'s"
            " synthetic hardened Istio pod of N containers (N includes istio-proxy; 5 is the"
            " smallest that generator builds).",
            "",
        ]
        rows_g = growth["rows"]
        lines += table(
            ["containers", "request B", "answer B", "allowed", "handle() ms", "vs smallest"],
            [[r["containers"], f"{r['request_bytes']:,}", f"{r['answer_bytes']:,}", r["allowed"],
              f"{r['handle_ms']:.2f}", f"{r['handle_ms'] / rows_g[0]['handle_ms']:.2f}"]
             for r in rows_g],
        )  # fmt: skip
        last = rows_g[-1]
        first = rows_g[0]
        per = (last["handle_ms"] - first["handle_ms"]) / (last["containers"] - first["containers"])
        report.add_summary(
            "admission", f"handle() at {rows_g[0]['containers']} -> {last['containers']}"
            " containers (in-process)",
            f"{rows_g[0]['handle_ms']:.2f} -> {last['handle_ms']:.2f} ms (~{per:.3f} ms/container)",
            "no goal", None,
        )  # fmt: skip
        lines += [
            f"Growth is about linear: ~{per:.3f} ms per extra container, driven by the"
            " answer size (the JSONPatch carries the ruleset, which grows with containers).",
            "",
        ]
    lines += image(ASSETS.get("admission"), "admission ratios and growth")
    report.section(lines)


def install_section(report: Report, result: dict[str, Any] | None, problem: str | None) -> None:
    lines = ["## Rule install: meshguard-init", ""]
    if result is None:
        lines += [f"Not measured: {problem or 'not run'}.", ""]
        report.add_summary("rule install", "meshguard init at 64 containers", "-", "< 100 ms", None)
        report.section(lines)
        return
    lines += [
        "`python -m meshguard init --ruleset-file F` in a fresh network namespace"
        " (`ip netns exec`), wall time, median of"
        f" {result['reps']} after one warm-up; rulesets of `kernel_path.py`'s synthetic pod"
        " (IPv4 + IPv6). meshguard is installed as in the image: a virtualenv with a plain,"
        " byte-compiled copy of the package (`pip install`, not editable). For comparison,"
        " the same from this checkout (editable install; with PYTHONDONTWRITEBYTECODE set,"
        " every run compiles meshguard's modules again). Also the in-process `install()`"
        " and the interpreter start-up of the installed copy.",
        "",
    ]
    lines += table(
        ["containers", "rules", "compile ms", "install() in-process ms", "meshguard init ms",
         "samples ms", "from checkout ms"],
        [[r["containers"], r["rules"], f"{r['compile_ms']:.2f}",
          f"{r['install_in_process_ms']:.1f}", f"{r['init_ms']:.1f}",
          ", ".join(f"{s:.0f}" for s in r["init_ms_samples"]),
          f"{r['init_checkout_ms']:.1f}" if "init_checkout_ms" in r else "-"]
         for r in result["rows"]],
    )  # fmt: skip
    lines += ["Start-up inside `ip netns exec` (median):", ""]
    lines += table(
        ["command", "ms"], [[f"`{k}`", f"{v:.1f}"] for k, v in result["startup_ms"].items()]
    )
    if result.get("profile_ms"):
        lines += [
            f"One run at {result['rows'][-1]['containers']} containers under cProfile (times"
            " inflated by the profiler; the whole run excludes the interpreter's own start):",
            "",
        ]
        lines += table(["phase", "ms"], [[k, f"{v:.1f}"] for k, v in result["profile_ms"].items()])
    top = result["rows"][-1]
    ok = top["init_ms"] < result["goal_ms"]
    report.add_summary("rule install",
                       f"meshguard init wall time at {top['containers']} containers",
                       f"{top['init_ms']:.1f} ms", f"< {result['goal_ms']:.0f} ms", ok)  # fmt: skip
    lines += [f"Goal < {result['goal_ms']:.0f} ms at 64 containers: {verdict_of(ok)}.", ""]
    if not ok:
        startup = result["startup_ms"]
        start = next((v for k, v in startup.items() if "import meshguard" in k), float("nan"))
        stdlib = next((v for k, v in startup.items() if "standard library" in k), None)
        bare = startup.get("python -c pass", float("nan"))
        lines += [
            "**What limits it (measured).** Of"
            f" {top['init_ms']:.0f} ms, starting the interpreter in the namespace costs"
            f" {bare:.0f} ms and importing what init imports brings it to {start:.0f} ms; the"
            " install itself (in-process `install()`: per family iptables-save, one"
            " iptables-restore, and a read-back to verify) is"
            f" {top['install_in_process_ms']:.0f} ms. Start-up + install ="
            f" {start + top['install_in_process_ms']:.0f} ms; the remaining"
            f" {top['init_ms'] - start - top['install_in_process_ms']:.0f} ms is the rest of"
            " init's run (the profile above: building the argument parser, reading the"
            " ruleset), `ip netns exec` and the process's exit."
            " Removing the imports"
            " beyond the bare interpreter would, from these figures, give about"
            f" {top['init_ms'] - (start - bare):.0f} ms at {top['containers']} containers"
            f" (goal {result['goal_ms']:.0f} ms): the"
            f" {start - bare:.0f} ms of imports on the init path are the largest part"
            + (
                f", and the standard-library modules alone take {stdlib - bare:.0f} ms of them"
                " (meshguard's own modules the rest)"
                if stdlib is not None
                else ""
            )
            + "; the iptables work grows with the rule count"
            f" ({result['rows'][0]['install_in_process_ms']:.0f} ms at"
            f" {result['rows'][0]['containers']} containers,"
            f" {top['install_in_process_ms']:.0f} ms at {top['containers']})."
            " What would close it: an init entry point that is not Python (a static binary"
            " applying the payloads, no interpreter or imports), or one iptables-restore"
            " per family without the read-back before and after — the read-back is what"
            " makes init idempotent and fail closed, so that is a trade-off, not a free win."
            " Suggestions, not measured here.",
            "",
        ]
    lines += image(ASSETS.get("install"), "meshguard init wall time")
    report.section(lines)


def image_section(report: Report, run: ScriptRun | None) -> None:
    """benchmarks/init_image.py: its own renderer, so the script prints the same section."""
    if run is None or not run.data:
        lines = ["## The slim init image (benchmarks/init_image.py)", ""]
        lines += not_measured("init_image.py", run.problem) if run else ["Not run.", ""]
        report.add_summary("init image", "init image / servers' image, installed", "-", "<= 0.25",
                           None)  # fmt: skip
        report.section(lines)
        return
    data = run.data
    report.add_summary(
        "init image", "init image / servers' image, installed (virtualenv + apt)",
        f"{data['size_ratio']:.3f} ({data['totals_kib']['init'] / 1024:.0f} MB /"
        f" {data['totals_kib']['server'] / 1024:.0f} MB)",
        f"<= {data['goal_ratio']}", data["size_ratio"] <= data["goal_ratio"],
    )  # fmt: skip
    init_at = ", ".join(f"{r['containers']}: {r['init_ms']['init']:.0f} ms" for r in data["init"])
    report.add_summary("init image", "meshguard init from the init image", init_at, "no goal", None)
    report.section(measure.load_script("init_image").markdown(data))


def cni_section(report: Report, run: ScriptRun | None) -> None:
    """benchmarks/cni_install.py: its own renderer, so the script prints the same section."""
    if run is None or not run.data:
        lines = ["## Istio CNI mode: node-side install time (benchmarks/cni_install.py)", ""]
        lines += not_measured("cni_install.py", run.problem) if run else ["Not run.", ""]
        report.section(lines)
        return
    data = run.data
    script = measure.load_script("cni_install")
    at = ", ".join(
        f"{r['containers']}: pass-through {r['ms']['shim-pass']:.1f} ms wall,"
        f" {r['cpu_ms']['shim-pass']:.1f} ms CPU; ADD"
        f" {r['ms']['shim-add'] / r['ms']['netfilter']:.2f} x netfilter"
        for r in data["rows"]
    )
    report.add_summary(
        "cni", "meshguard-cni through shim -> agent (pass-through; ADD / the install's netfilter"
        " time)", at,
        f"pass-through <= {script.PASS_WALL_GOAL_MS:g} ms wall, <= {script.PASS_CPU_GOAL_MS:g} ms"
        f" CPU; ADD <= {script.ADD_NETFILTER_GOAL:g} x netfilter",
        all(script.goals(data).values()),
    )  # fmt: skip
    report.section(script.markdown(data))


def load_section(report: Report, run: ScriptRun | None) -> None:
    """benchmarks/load.py: its own renderer, so the script prints the same section."""
    lines = ["## Load and fault (benchmarks/load.py)", ""]
    if run is None or not run.data:
        lines += not_measured("load.py", run.problem) if run else ["Not run.", ""]
        report.section(lines)
        return
    d = run.data
    lines += [
        f"`benchmarks/load.py` ({d['profile']['name']} profile, concurrency {d['concurrency']};"
        " latency as the client sees it; no goal but nothing lost)"
        + (" — exited non-zero: " + run.problem if not run.ok else "") + ".",
        "",
    ]  # fmt: skip
    rows = d["rows"]
    lines += table(
        ["scenario", "sent", "errors", "wrong", "per s", "p50 ms", "p99 ms", "p99.9 ms",
         "max ms", "notes"],
        [[r["scenario"], r["sent"], r["errors"], r["wrong"], f"{r['rate']:.1f}",
          *(f"{r['latency'][k]:.2f}" for k in ("p50", "p99", "p999")),
          f"{r['latency']['max']:.1f}", r["notes"]] for r in rows],
    )  # fmt: skip
    if d["authz_rss_kib"]:
        lines += ["authz RSS (MiB) after the warm-up, then every chunk of Checks: "
                  + " ".join(f"{kib / 1024:.1f}" for kib in d["authz_rss_kib"]), ""]  # fmt: skip
    if d["fault_cycles"]:
        lines += table(
            ["kill", "down s", "restart -> listening s", "restart -> first allowed s",
             "requests around it (phase method status)"],
            [[c["cycle"], f"{c['down_seconds']:.2f}", f"{c['restart_to_listening_s']:.2f}",
              f"{c['restart_to_allowed_s']:.2f}",
              ", ".join(f"{k}: {v}" for k, v in sorted(c["by_phase"].items()))]
             for c in d["fault_cycles"]],
        )  # fmt: skip
    if d["fault_skipped"]:
        lines += [f"Fault scenario skipped: {d['fault_skipped']}.", ""]
    problems = [p for row in rows for p in row.get("problems") or []]
    lines += [f"- problem: {p}" for p in problems] or ["Nothing lost, nothing wrong."]
    report.add_summary(
        "load + fault",
        "problems found by load.py (lost or wrong answers)",
        f"{len(problems)} in {len(rows)} scenarios",
        "0",
        not problems,
    )
    report.section([*lines, ""])


def bounds_section(report: Report, run: ScriptRun | None) -> None:
    """One admission at meshguard's limits: time, peak RSS, Python's peak allocations."""
    lines = ["## One admission at meshguard's limits (benchmarks/admission_bounds.py)", ""]
    if run is None or not run.ok or not run.data:
        lines += not_measured("admission_bounds.py", "not run" if run is None else run.problem)
        report.section(lines)
        return
    d = run.data
    lines += [
        "Each case is one AdmissionReview answered by `handle()` in a fresh process, cold;"
        f" the median of {d['runs']} run(s). The cases are meshguard's limits: the largest"
        " admitted inputs, and inputs refused by design (over a limit, or issue 30's"
        " attacks); a case answered otherwise than declared is marked **unexpected**."
        " `workers x worst` is the worst admitted input on every webhook worker at once;"
        " `authz` is the authz cache's `policy_of` of a record near the limits. The chart's"
        " memory limits are set from these figures.",
        "",
    ]
    rows = [
        [c["case"], _bounds_answer(c), f"{c['seconds'] * 1000:.0f}",
         f"{c['python_peak_mib']:.1f}", f"{c['rss_before_mib']:.0f} -> {c['rss_peak_mib']:.0f}"]
        for c in d["cases"]
    ]  # fmt: skip
    lines += table(["case", "answer", "ms", "Python peak MiB", "RSS MiB"], rows)
    worst = max(d["cases"], key=lambda c: c["rss_peak_mib"])
    report.add_summary(
        "admission bounds",
        "peak RSS of one admission at the limits (worst case)",
        f"{worst['rss_peak_mib']:.0f} MiB ({worst['case']})",
        "no goal",
        None,
    )
    report.section(lines)


def _bounds_answer(case: dict[str, Any]) -> str:
    """admitted, or refused (by design) and the refusal's first words; **unexpected** when
    the answer is not the case's declared one (runs before ``expected`` have none)."""
    answer: str = case["answer"]
    expected = case.get("expected", answer)
    if answer.startswith("meshguard"):
        answer = f"refused: {answer[:60]}"
    if (expected == "admitted") != (case["answer"] == "admitted"):
        return f"**unexpected** {answer}"
    return answer.replace("refused:", "refused by design:") if expected == "refused" else answer
