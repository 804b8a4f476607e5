"""What the benchmark scripts share: running themselves as helpers, the machine they ran on,
CPU accounting from /proc, lenient log reading, medians, their JSON documents and the one
Markdown table renderer of the report's sections (what they share with the tests is in
``tests/support``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The L7 benchmarks' policy (``l7_path.py``, ``suite/workers.py``): the e2e test's, without
#: its h2c port; only the rule for app -> proxy:15020 is exercised.
L7_POLICY = """
rules:
  - from: log-shipper
    to: app
    ports: [9090]
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: cache
    to: app
    ports: [8080]
    http: {methods: [GET], paths: ["/api/*"]}
"""


class Machine(TypedDict):
    """Where a benchmark ran, in every JSON document it writes."""

    node: str
    kernel: str
    cpus: int | None
    python: str
    versions: dict[str, str]  # the libraries the figures depend on (grpcio, aiohttp)


def script_parser(module: str, *, description: str, quick: str) -> argparse.ArgumentParser:
    """A script's parser with the options every script has: ``--quick`` (how long it takes
    in ``quick``) and ``--json FILE``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--quick", action="store_true", help=f"shorter run ({quick})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write figures as JSON")
    return parser


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with the checkout on ``sys.path``, from any directory: a
    script starts its own helper processes (servers, clients under other uids) this way."""
    code = (
        f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r});"
        f" runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code, *args]


def machine(**versions: str) -> Machine:
    return {
        "node": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": dict(versions),
    }


def machine_line(where: Machine, seconds: float) -> str:
    """One line for the end of a script's output."""
    versions = "".join(f", {name} {version}" for name, version in where["versions"].items())
    return (
        f"{where['node']}: Linux {where['kernel']}, {where['cpus']} CPUs, Python"
        f" {where['python']}{versions}; the benchmark took {seconds:.0f} s"
    )


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """A script's ``--json FILE``: indented, one trailing newline, anything else as str."""
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


def median_of(values: Iterable[float]) -> float:
    """The median, NaN when there are no values."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads, also finished ones), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def json_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON lines of a log, and how many lines were not JSON."""
    found, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except ValueError:
            bad += 1
    return found, bad


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines (the report's one renderer for tables)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return lines
