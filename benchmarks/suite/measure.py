"""Measurements made here: meshguard-init wall time by pod size, admission cost by pod size."""

from __future__ import annotations

import importlib
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict

from benchmarks.admission.pod import REVIEW_UID, synthetic_pod
from benchmarks.kernel.install import startup_ms, time_compile, time_in_process_install, time_init
from benchmarks.kernel.pod import compile_synthetic, rule_count
from benchmarks.kernel.trial import installed_python
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.keys import SIGNER
from tests.support.pods import admission_review

INSTALL_SIZES = (2, 8, 32, 64)
INSTALL_GOAL_MS = 100.0
ADMISSION_SIZES = (5, 10, 30, 64)


class InstallRow(TypedDict):
    """``meshguard init`` for one pod size (ms)."""

    containers: int
    rules: int
    init_ms: float  # median, meshguard installed as in the image
    init_ms_samples: list[float]
    init_checkout_ms: float  # median, from this checkout
    install_in_process_ms: float
    compile_ms: float


class RuleInstall(TypedDict):
    """What :func:`rule_install` measures (``rule_install`` in results.json)."""

    rows: list[InstallRow]
    startup_ms: dict[str, float]
    profile_ms: dict[str, float]
    reps: int
    goal_ms: float


class AdmissionRow(TypedDict):
    """``handle()`` for one pod size."""

    containers: int
    request_bytes: int
    answer_bytes: int
    allowed: bool
    handle_ms: float  # the best of the repeats
    handle_ms_median: float


class AdmissionGrowth(TypedDict):
    """What :func:`admission_growth` measures (``admission_growth`` in results.json)."""

    rows: list[AdmissionRow]
    iterations: int
    repeats: int


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/NAME.py`` (a script run as ``python -m benchmarks.NAME``) to reuse
    its pod builders and timers."""
    return importlib.import_module(f"benchmarks.{name}")


def rule_install(*, quick: bool) -> RuleInstall:
    """``python -m meshguard init --ruleset-file F`` in a fresh netns each time, with
    meshguard installed as in the image (byte-compiled, not editable) and, for comparison,
    from this checkout (sys.executable).

    Also the in-process ``install()`` and the interpreter + import start-up, to show where
    the subprocess's time goes.
    """
    reps = 3 if quick else 7
    rows: list[InstallRow] = []
    with tempfile.TemporaryDirectory(prefix="meshguard-install-") as tmp:
        python = installed_python(Path(tmp))
        for n in INSTALL_SIZES:
            ruleset = compile_synthetic(n)
            ruleset_file = Path(tmp) / f"ruleset-{n}.json"
            ruleset_file.write_text(ruleset.to_json(), encoding="utf-8")
            time_init(ruleset_file, python=python)  # warm the page cache
            init = [time_init(ruleset_file, python=python) * 1000 for _ in range(reps)]
            checkout = [time_init(ruleset_file) * 1000 for _ in range(reps)]
            in_process = [time_in_process_install(ruleset) * 1000 for _ in range(reps)]
            rows.append(
                {"containers": n, "rules": rule_count(ruleset), "init_ms": statistics.median(init),
                 "init_ms_samples": init, "init_checkout_ms": statistics.median(checkout),
                 "install_in_process_ms": statistics.median(in_process),
                 "compile_ms": time_compile(n, 5 if quick else 20) * 1000}
            )  # fmt: skip
            print(f"[install] {n:2} containers: init {rows[-1]['init_ms']:.1f} ms", file=sys.stderr,
                  flush=True)  # fmt: skip
        startup = startup_ms(reps, python=python)
        profile = init_profile(ruleset_file, python=python, directory=Path(tmp))
    return {"rows": rows, "startup_ms": startup, "profile_ms": profile, "reps": reps,
            "goal_ms": INSTALL_GOAL_MS}  # fmt: skip


#: Where meshguard init's time goes: (label, file suffix, function) of cProfile entries.
INIT_PHASES = (
    ("imports (all modules, incl. the subcommand's)", "<frozen importlib._bootstrap>",
     "_find_and_load"),
    ("building the argument parser", "meshguard/cli/__init__.py", "build_parser"),
    ("reading and checking the ruleset", "meshguard/rules/ruleset.py", "from_json"),
    ("install(): iptables save, restore, verify (both families)",
     "meshguard/rules/install.py", "install"),
)  # fmt: skip


def init_profile(ruleset_file: Path, *, python: str, directory: Path) -> dict[str, float]:
    """One ``meshguard init`` under cProfile in a fresh namespace: ms per phase, and the
    whole run inside the interpreter (cProfile adds some overhead to every phase)."""
    out = directory / "init.prof"
    argv = [python, "-m", "cProfile", "-o", str(out), "-m", "meshguard", "init",
            "--ruleset-file", str(ruleset_file)]  # fmt: skip
    with NetworkNamespace() as ns:
        ns.run(argv)
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    phases = {"whole run (in the interpreter)": max(entry[3] for entry in stats.values()) * 1000}
    for label, suffix, function in INIT_PHASES:
        phases[label] = 1000 * sum(
            entry[3] for (file, _, name), entry in stats.items()
            if name == function and file.endswith(suffix)
        )  # fmt: skip
    return phases


def admission_growth(*, quick: bool) -> AdmissionGrowth:
    """In-process ``meshguard.webhook.review.handle()`` per admission, by pod size (no HTTP)."""
    from meshguard.inject.transform import InjectSettings  # noqa: PLC0415
    from meshguard.webhook.review import handle  # noqa: PLC0415

    settings = InjectSettings(signer=SIGNER)
    iterations = 20 if quick else 100
    repeats = 3 if quick else 5
    rows: list[AdmissionRow] = []
    for n in ADMISSION_SIZES:
        body = admission_review(synthetic_pod(n), REVIEW_UID)
        status, answer, _ = handle(body, settings=settings)
        allowed = status == 200 and "error" not in answer and answer["response"]["allowed"]
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(iterations):
                handle(body, settings=settings)
            samples.append((time.perf_counter() - started) / iterations * 1000)
        rows.append(
            {"containers": n, "request_bytes": len(body), "answer_bytes": len(json.dumps(answer)),
             "allowed": bool(allowed), "handle_ms": min(samples),
             "handle_ms_median": statistics.median(samples)}
        )  # fmt: skip
        print(f"[admission] {n:2} containers: handle() {rows[-1]['handle_ms']:.2f} ms",
              file=sys.stderr, flush=True)  # fmt: skip
    return {"rows": rows, "iterations": iterations, "repeats": repeats}
