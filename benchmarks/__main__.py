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
    growth_section,
    image_section,
    install_section,
    load_section,
    webhook_section,
)

RESULTS = ROOT / "benchmarks" / "results"
KERNEL_SIZES = (2, 8, 32, 64)
#: The parts each script measures (``python -m benchmarks.SCRIPT --json``), by --only name.
SCRIPTS = {
    "l7": "l7_path",
    "webhook": "webhook",
    "image": "init_image",
    "cni": "cni_install",
    "load": "load",
    "bounds": "admission_bounds",
}
#: The parts measured in this process, and their key in results.json.
IN_PROCESS = {
    "workers": ("authz_workers", lambda quick, log_dir: workers.run(quick=quick, log_dir=log_dir)),
    "admission": ("admission_growth", lambda quick, _: measure.admission_growth(quick=quick)),
    "install": ("rule_install", lambda quick, _: measure.rule_install(quick=quick)),
}
PARTS = ["kernel", *SCRIPTS, *IN_PROCESS]


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
        choices=PARTS,
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
    if args.report_only:
        return rerender()
    quick = ["--quick"] if args.quick else []
    parts = set(args.only or PARTS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    problems: dict[str, str] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="meshguard-bench-logs-"))
    timeout = 240 if args.quick else 900
    runs: dict[str, Any] = {"kernel": {}}
    if "kernel" in parts:
        for n in KERNEL_SIZES:
            argv = [*quick, "--containers", str(n), "--no-install"]  # install: the suite's
            run = run_script(
                f"kernel-{n}", "kernel_path.py", argv, timeout=timeout, log_dir=log_dir
            )
            runs["kernel"][str(n)] = trimmed(run)
    for part, script in SCRIPTS.items():
        args_ = (part, f"{script}.py", quick)
        runs[part] = (
            trimmed(run_script(*args_, timeout=timeout, log_dir=log_dir)) if part in parts else None
        )
    measured = {
        key: step(part, lambda fn=fn: fn(args.quick, log_dir), problems) if part in parts else None
        for part, (key, fn) in IN_PROCESS.items()
    }
    state = {
        "date": date, "quick": args.quick, "parts": sorted(parts),
        "elapsed": time.perf_counter() - started, "load_before": load_before,
        "load_after": os.getloadavg(), "log_dir": str(log_dir), "runs": runs, **measured,
        "problems": problems,
    }  # fmt: skip
    if args.only and (RESULTS / "results.json").exists():
        state = merged(json.loads((RESULTS / "results.json").read_text()), state, parts)
    (RESULTS / "results.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
    return render(state)


#: where each part's figures live in results.json
PART_KEYS = {
    "kernel": ("runs", "kernel"),
    **{part: ("runs", part) for part in SCRIPTS},
    **{part: (key,) for part, (key, _) in IN_PROCESS.items()},
}


def merged(old: dict[str, Any], new: dict[str, Any], parts: set[str]) -> dict[str, Any]:
    """``--only``: the earlier run's figures, with the parts just measured replaced."""
    state: dict[str, Any] = json.loads(json.dumps(old))
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
    kernel_runs = {
        int(n): run for n, r in state["runs"]["kernel"].items() if (run := as_run(r)) is not None
    }
    l7, webhook, init_image, cni_install, load, bounds = (
        as_run(state["runs"].get(part)) for part in SCRIPTS
    )
    worker_result = state["authz_workers"]
    growth = state["admission_growth"]
    install = state["rule_install"]
    load_before, load_after = state["load_before"], state["load_after"]
    elapsed, date, log_dir = state["elapsed"], state["date"], state["log_dir"]

    wh = webhook.data if webhook is not None and webhook.ok else None
    plans = {  # name: (figures, how to draw them into RESULTS / file)
        "kernel": ({n: r.data["traffic"] for n, r in kernel_runs.items() if r and r.ok and r.data},
                   lambda good: plots.kernel(good, KERNEL_GOAL, RESULTS / "kernel_path.png")),
        "l7": (l7.data if l7 is not None and l7.ok else None,
               lambda d: plots.l7(d["http"], d["grpc"], RESULTS / "l7_path.png")),
        "workers": (worker_result, lambda w: plots.workers(w, RESULTS / "authz_workers.png")),
        "admission": (growth, lambda g: plots.admission(wh, g, RESULTS / "admission.png")),
        "install": (install, lambda i: plots.install(i, RESULTS / "rule_install.png")),
    }  # fmt: skip
    for name, (figures, draw) in plans.items():
        if figures:
            make_plot(name, lambda draw=draw, figures=figures: draw(figures), problems)

    report = Report()
    kernel_section(report, kernel_runs) if "kernel" in parts else None
    if "l7" in parts or "workers" in parts:
        l7_section(report, l7, worker_result, problems.get("workers") or problems.get("l7"))
    webhook_section(report, webhook)
    growth_section(report, growth, problems.get("admission"))
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
