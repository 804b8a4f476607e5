"""Run one benchmark script as a subprocess and collect its ``--json`` output."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT


@dataclass
class ScriptRun:
    """What a script printed and wrote."""

    name: str
    argv: list[str]
    ok: bool
    seconds: float
    data: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""
    problem: str = ""
    notes: list[str] = field(default_factory=list)


def run_script(
    name: str, script: str, args: list[str], *, timeout: float, log_dir: Path
) -> ScriptRun:
    """``python -m benchmarks.SCRIPT ARGS --json FILE`` (SCRIPT without its ``.py``)."""
    run = _attempt(name, script, args, timeout=timeout)
    (log_dir / f"{name}.stdout.txt").write_text(run.stdout, encoding="utf-8")
    (log_dir / f"{name}.stderr.txt").write_text(run.stderr, encoding="utf-8")
    return run


def _attempt(name: str, script: str, args: list[str], *, timeout: float) -> ScriptRun:
    with tempfile.TemporaryDirectory(prefix="meshguard-suite-") as tmp:
        out = Path(tmp) / "out.json"
        module = f"benchmarks.{script.removesuffix('.py')}"
        argv = [sys.executable, "-m", module, *args, "--json", str(out)]
        print(f"[{name}] {' '.join(argv[1:])}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            done = subprocess.run(
                argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
            stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, stderr, returncode = _text(exc.stdout), _text(exc.stderr), None
        data = json.loads(out.read_text()) if out.exists() and returncode is not None else None
    seconds = time.perf_counter() - started
    ok = returncode == 0 and data is not None
    if returncode is None:
        problem = f"timed out after {timeout:.0f} s"
    else:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        problem = "" if ok else f"exit {returncode}: {lines[-1] if lines else 'no output'}"
    print(f"[{name}] {'done' if ok else 'FAILED: ' + problem} in {seconds:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return ScriptRun(name=name, argv=argv, ok=ok, seconds=seconds, data=data, stdout=stdout,
                     stderr=stderr, problem=problem)  # fmt: skip


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
