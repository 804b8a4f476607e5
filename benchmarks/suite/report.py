"""benchmarks/results/REPORT.md from the collected figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table

#: The plots made for this report, by name (None: the plot failed).
ASSETS: dict[str, Path | None] = {}


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "met" if ok else "**not met**"


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

    def add_summary(self, benchmark: str, figure: str, value: str, goal: str, ok: bool | None):
        self.summary.append([benchmark, figure, value, goal, verdict(ok)])

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
