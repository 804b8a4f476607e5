"""benchmarks/results/REPORT.md from the collected figures."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.common import machine_line, markdown_table, write_json
from benchmarks.suite.runner import ScriptRun

#: The plots made for this report, by name (None: the plot failed).
ASSETS: dict[str, Path | None] = {}


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else verdict_of(ok)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A table and the blank line after it."""
    return [*markdown_table(header, rows), ""]


def code(text: str) -> list[str]:
    return ["```", text.rstrip(), "```", ""]


def image(path: Path | None, alt: str) -> list[str]:
    return [f"![{alt}]({path.name})", ""] if path else []


def not_measured(name: str, problem: str) -> list[str]:
    return [f"Not measured: `{name}` failed ({problem}).", ""]


def verdict_of(ok: bool) -> str:
    return "met" if ok else "**not met**"


class Report:
    """Collects sections and the summary table."""

    def __init__(self) -> None:
        self.summary: list[list[Any]] = []
        self.sections: list[str] = []

    def add_summary(
        self, benchmark: str, figure: str, value: str, goal: str, ok: bool | None
    ) -> None:
        """A row of the summary; a figure with "no goal" is "(informative)"."""
        shown = "(informative)" if goal == "no goal" else verdict(ok)
        self.summary.append([benchmark, figure, value, goal, shown])

    def section(self, lines: list[str]) -> None:
        self.sections.extend(lines)

    def render(self, header: list[str], footer: list[str]) -> str:
        summary = [
            "## Summary",
            "",
            *table(["benchmark", "figure", "measured", "goal", "verdict"], self.summary),
        ]
        return "\n".join([*header, *summary, *self.sections, *footer]) + "\n"


def summary_text(report: Report) -> str:
    return "\n".join(table(["benchmark", "figure", "measured", "goal", "verdict"], report.summary))


def script_text(
    name: str, document: Mapping[str, Any], section: Callable[[Report, ScriptRun], None]
) -> str:
    """What a script prints: its section of REPORT.md, rendered from its JSON document as
    ``python -m benchmarks`` reads it back, then its rows of the report's summary."""
    data = json.loads(json.dumps(document, default=str))
    report = Report()
    section(report, ScriptRun(name=name, argv=sys.argv, ok=True, seconds=0.0, data=data))
    return "\n".join([*report.sections, summary_text(report)])


def finish_script(
    name: str, document: Mapping[str, Any], section: Callable[[Report, ScriptRun], None],
    json_file: Path | None,
) -> None:  # fmt: skip
    """A script's end: its section and summary rows (:func:`script_text`), the machine line,
    and ``--json FILE``."""
    print(script_text(name, document, section))
    print(machine_line(document["machine"], document["seconds"]))
    if json_file:
        write_json(json_file, document)
