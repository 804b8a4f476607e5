"""What compiling and installing a ruleset costs: in-process, as ``meshguard init``, and
its start-up."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.kernel.pod import synthetic_pod
from benchmarks.kernel.trial import meshguard_init
from meshguard.pod import read_pod
from meshguard.process import run_command
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.install import install
from meshguard.rules.ruleset import Ruleset
from meshguard.sandbox.netns import NetworkNamespace


def namespaced(ns: NetworkNamespace) -> Callable[..., str]:
    def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
        return run_command(ns.argv(argv), stdin=stdin)

    return run


def time_compile(n: int, reps: int) -> float:
    pod = synthetic_pod(n)
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
        compile_pod(view, settings=CompilerSettings())
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def time_in_process_install(ruleset: Ruleset) -> float:
    with NetworkNamespace() as ns:
        started = time.perf_counter()
        install(ruleset, run=namespaced(ns))
        return time.perf_counter() - started


def time_init(ruleset_file: Path, *, python: str = sys.executable) -> float:
    with NetworkNamespace() as ns:
        return meshguard_init(ns, ruleset_file, python=python)


#: What ``meshguard init`` imports before it reads the ruleset.
INIT_IMPORTS = "import meshguard.cli, meshguard.cli.init"
#: The standard-library modules among them: what any Python init would pay.
INIT_STDLIB_IMPORTS = (
    "import argparse, concurrent.futures, dataclasses, enum, hashlib, json, logging, pathlib,"
    " shlex, subprocess, typing"
)


def startup_ms(reps: int, *, python: str = sys.executable) -> dict[str, float]:
    """What ``meshguard init`` pays before installing anything: interpreter and imports."""
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import <the standard library modules init uses>'": [
            python,
            "-c",
            INIT_STDLIB_IMPORTS,
        ],
        f"python -c '{INIT_IMPORTS}'": [python, "-c", INIT_IMPORTS],
    }
    with NetworkNamespace() as ns:
        return {label: median_seconds(ns, argv, reps) * 1000 for label, argv in commands.items()}


def median_seconds(ns: NetworkNamespace, argv: Sequence[str], reps: int) -> float:
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        ns.run(argv)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)
