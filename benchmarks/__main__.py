"""Run every benchmark, then write benchmarks/results/REPORT.md and its PNG plots.

Run as root from the project root: ``python -m benchmarks [--quick]`` (full run under
25 minutes, ``--quick`` under 6). Each script in ``benchmarks/`` runs as a subprocess with
``--json``; the authz workers, rule-install and admission-growth figures are measured by
``benchmarks/suite``. Every ratio is against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from benchmarks.suite import measure, plots, workers
from benchmarks.suite.kernel import KERNEL_GOAL, kernel_section
from benchmarks.suite.l7 import l7_section
from benchmarks.suite.report import ASSETS, Report, summary_text
from benchmarks.suite.runner import ScriptRun, run_script
from benchmarks.suite.sections import (
    bounds_section,
    cni_section,
    image_section,
    install_section,
    load_section,
    webhook_section,
)

RESULTS = ROOT / "benchmarks" / "results"
KERNEL_SIZES = (2, 8, 32, 64)


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every meshguard benchmark; write benchmarks/results/REPORT.md + PNGs.",
    )
    parser.add_argument("--quick", action="store_true", help="short run (under 6 minutes)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite REPORT.md and the PNGs from benchmarks/results/results.json",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[
            "kernel",
            "l7",
            "workers",
            "webhook",
            "admission",
            "install",
            "image",
            "cni",
            "load",
            "bounds",
        ],
        help="re-measure only these parts; the others keep the figures of the last run",
    )
    return parser


def step(name: str, fn: Any, problems: dict[str, str]) -> Any:
    """Run one in-process measurement; on failure record it and go on."""
    print(f"[{name}] starting", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:
        problems[name] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {problems[name]}", file=sys.stderr, flush=True)
        return None
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def make_plot(name: str, fn: Any, problems: dict[str, str]) -> None:
    try:
        ASSETS[name] = fn()
    except Exception as exc:
        problems[f"plot {name}"] = f"{type(exc).__name__}: {exc}"
        ASSETS[name] = None


def main(argv: list[str]) -> int:
    args = main_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("python -m benchmarks needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    quick = ["--quick"] if args.quick else []
    parts = set(args.only or [*PART_KEYS])
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    problems: dict[str, str] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="meshguard-bench-logs-"))
    script_timeout = 240 if args.quick else 900

    if args.report_only:
        return rerender()
    kernel_runs: dict[int, ScriptRun] = {}
    if "kernel" in parts:
        for n in KERNEL_SIZES:
            kernel_runs[n] = run_script(
                f"kernel-{n}",
                "kernel_path.py",
                [*quick, "--containers", str(n)],
                timeout=script_timeout,
                log_dir=log_dir,
            )
    l7 = None
    if "l7" in parts:
        if (ROOT / "benchmarks" / "l7_path.py").exists():
            l7 = run_script("l7", "l7_path.py", quick, timeout=script_timeout, log_dir=log_dir)
        else:
            problems["l7"] = "benchmarks/l7_path.py is not there"
    worker_result = None
    if "workers" in parts:
        worker_result = step(
            "workers", lambda: workers.run(quick=args.quick, log_dir=log_dir), problems
        )
    webhook = None
    if "webhook" in parts:
        webhook = run_script(
            "webhook", "webhook.py", quick, timeout=script_timeout, log_dir=log_dir
        )
    growth = None
    if "admission" in parts:
        growth = step("admission", lambda: measure.admission_growth(quick=args.quick), problems)
    install = None
    if "install" in parts:
        install = step("install", lambda: measure.rule_install(quick=args.quick), problems)
    init_image = None
    if "image" in parts:
        init_image = run_script(
            "image", "init_image.py", quick, timeout=script_timeout, log_dir=log_dir
        )
    cni_install = None
    if "cni" in parts:
        cni_install = run_script(
            "cni", "cni_install.py", quick, timeout=script_timeout, log_dir=log_dir
        )
    load = None
    if "load" in parts:
        load = run_script("load", "load.py", quick, timeout=script_timeout, log_dir=log_dir)
    bounds = None
    if "bounds" in parts:
        bounds = run_script(
            "bounds", "admission_bounds.py", quick, timeout=script_timeout, log_dir=log_dir
        )
    state = {
        "date": date,
        "quick": args.quick,
        "parts": sorted(parts),
        "elapsed": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "log_dir": str(log_dir),
        "runs": {
            "kernel": {str(n): trimmed(r) for n, r in kernel_runs.items()},
            "l7": trimmed(l7),
            "webhook": trimmed(webhook),
            "image": trimmed(init_image),
            "cni": trimmed(cni_install),
            "load": trimmed(load),
            "bounds": trimmed(bounds),
        },
        "authz_workers": worker_result,
        "admission_growth": growth,
        "rule_install": install,
        "problems": problems,
    }
    if args.only and (RESULTS / "results.json").exists():
        state = merged(json.loads((RESULTS / "results.json").read_text()), state, parts)
    (RESULTS / "results.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
    return render(state)


#: where each part's figures live in results.json
PART_KEYS = {
    "kernel": ("runs", "kernel"),
    "l7": ("runs", "l7"),
    "webhook": ("runs", "webhook"),
    "load": ("runs", "load"),
    "workers": ("authz_workers",),
    "admission": ("admission_growth",),
    "install": ("rule_install",),
    "image": ("runs", "image"),
    "cni": ("runs", "cni"),
    "bounds": ("runs", "bounds"),
}


def merged(old: dict[str, Any], new: dict[str, Any], parts: set[str]) -> dict[str, Any]:
    """``--only``: the earlier run's figures, with the parts just measured replaced."""
    state = json.loads(json.dumps(old))
    for part in parts:
        *path, key = PART_KEYS[part]
        source, target = new, state
        for step_ in path:
            source, target = source[step_], target.setdefault(step_, {})
        target[key] = source[key]
    state["parts"] = sorted(set(old.get("parts", [])) | parts)
    state["problems"] = {**old.get("problems", {}), **new["problems"]}
    state.setdefault("rerun", []).append({"date": new["date"], "parts": sorted(parts)})
    return state


def trimmed(run: ScriptRun | None) -> dict[str, Any] | None:
    """The run as JSON, with its output cut to the last lines (the full logs are in log_dir)."""
    if run is None:
        return None
    value = asdict(run)
    value["stdout"] = run.stdout[-8000:]
    value["stderr"] = run.stderr[-4000:]
    return value


def rerender() -> int:
    return render(json.loads((RESULTS / "results.json").read_text()))


def as_run(value: dict[str, Any] | None) -> ScriptRun | None:
    if not value:
        return None
    known = {f.name for f in dataclasses.fields(ScriptRun)}
    return ScriptRun(**{k: v for k, v in value.items() if k in known})


def render(state: dict[str, Any]) -> int:
    """Plots and REPORT.md from the collected figures."""
    parts = set(state["parts"])
    problems: dict[str, str] = dict(state["problems"])
    kernel_runs = {int(n): as_run(r) for n, r in state["runs"]["kernel"].items()}
    l7, webhook, load = (as_run(state["runs"][k]) for k in ("l7", "webhook", "load"))
    init_image = as_run(state["runs"].get("image"))
    cni_install = as_run(state["runs"].get("cni"))
    bounds = as_run(state["runs"].get("bounds"))
    worker_result = state["authz_workers"]
    growth = state["admission_growth"]
    install = state["rule_install"]
    load_before, load_after = state["load_before"], state["load_after"]
    elapsed, date, log_dir = state["elapsed"], state["date"], state["log_dir"]

    # plots
    good_kernel = {n: r.data["traffic"] for n, r in kernel_runs.items() if r.ok and r.data}
    if good_kernel:
        make_plot(
            "kernel",
            lambda: plots.kernel(good_kernel, KERNEL_GOAL, RESULTS / "kernel_path.png"),
            problems,
        )
    if l7 is not None and l7.ok and l7.data:
        data = l7.data
        make_plot(
            "l7", lambda: plots.l7(data["http"], data["grpc"], RESULTS / "l7_path.png"), problems
        )
    if worker_result is not None:
        make_plot(
            "workers", lambda: plots.workers(worker_result, RESULTS / "authz_workers.png"), problems
        )
    if growth is not None:
        wh = webhook.data if webhook is not None and webhook.ok else None
        make_plot(
            "admission", lambda: plots.admission(wh, growth, RESULTS / "admission.png"), problems
        )
    if install is not None:
        make_plot("install", lambda: plots.install(install, RESULTS / "rule_install.png"), problems)

    report = Report()
    kernel_section(report, kernel_runs) if "kernel" in parts else None
    if "l7" in parts or "workers" in parts:
        l7_section(report, l7, worker_result, problems.get("workers") or problems.get("l7"))
    webhook_section(report, webhook, growth, problems.get("admission"))
    install_section(report, install, problems.get("install"))
    image_section(report, init_image)
    cni_section(report, cni_install)
    load_section(report, load)
    bounds_section(report, bounds) if "bounds" in parts else None
    header = [
        "# meshguard benchmarks",
        "",
        f"Generated by `python -m benchmarks{' --quick' if state['quick'] else ''}` on {date}"
        f" in {elapsed / 60:.1f} min.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}),"
        f" Linux {platform.release()}, Python {platform.python_version()}"
        f" ({sys.executable}). Every ratio is against a baseline measured in the same run;"
        " figures from one small VM vary between runs (see the per-round values).",
        "",
    ]
    notes = ["## Notes", ""]
    runs = [
        *kernel_runs.values(),
        *(r for r in (l7, webhook, init_image, cni_install, load, bounds) if r is not None),
    ]
    notes.append(
        f"- Load average (1/5/15 min) at start {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f}, at end {load_after[0]:.2f}/{load_after[1]:.2f}/"
        f"{load_after[2]:.2f}: anything else running on the {os.cpu_count()} CPUs during the"
        " run (e.g. another benchmark) lowers and scatters the figures."
    )
    notes += [
        f"- Re-measured on {r['date']} with `python -m benchmarks --only"
        f" {' '.join(r['parts'])}`; the other parts are from the main run."
        for r in state.get("rerun", [])
    ]
    notes += [f"- {name}: {problem}" for name, problem in problems.items()]
    notes += [f"- {r.name}: {r.problem} (took {r.seconds:.0f} s)" for r in runs if not r.ok]
    notes += [
        "- Script times: " + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in runs) + ".",
        f"- Raw figures: `results.json`; script logs were in `{log_dir}`.",
        "",
    ]
    text = report.render(header, notes)
    (RESULTS / "REPORT.md").write_text(text, encoding="utf-8")
    print(summary_text(report))
    print(f"wrote {RESULTS / 'REPORT.md'} in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
