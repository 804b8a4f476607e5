"""The load test's text report."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.stress.rows import FaultCycle, Profile, Row


def format_report(
    profile: Profile, concurrency: int, rows: Sequence[Row], rss: Sequence[int],
    fault: Sequence[FaultCycle], skipped: str | None,
) -> str:  # fmt: skip
    lines = [
        f"meshguard under load ({profile.name} profile, concurrency {concurrency};"
        " latency as the client sees it)",
        "",
        f"{'scenario':<36} {'sent':>7} {'errors':>6} {'wrong':>5} {'per s':>8}"
        f" {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7}",
    ]
    for row in rows:
        lat = row.latency
        lines.append(
            f"{row.scenario:<36} {row.sent:>7} {row.errors:>6} {row.wrong:>5} {row.rate:>8.1f}"
            f" {lat['p50']:>7.2f} {lat['p99']:>7.2f} {lat['p999']:>8.2f} {lat['max']:>7.1f}"
        )
    lines.append("")
    lines += [f"{row.scenario}: {row.notes}" for row in rows]
    if rss:
        lines.append(
            "authz RSS (MiB) after the warm-up, then every chunk of Checks: "
            + " ".join(f"{kib / 1024:.1f}" for kib in rss)
        )
    if fault:
        lines += [
            "",
            f"{'kill':>4} {'down s':>7} {'restart->listening s':>21}"
            f" {'restart->first allowed s':>25}   requests around it (phase method status)",
        ]
        for cycle in fault:
            phases = ", ".join(f"{k}: {v}" for k, v in sorted(cycle["by_phase"].items()))
            lines.append(
                f"{cycle['cycle']:>4} {cycle['down_seconds']:>7.2f}"
                f" {cycle['restart_to_listening_s']:>21.2f}"
                f" {cycle['restart_to_allowed_s']:>25.2f}   {phases}"
            )
    if skipped:
        lines += ["", f"fault scenario skipped: {skipped}"]
    problems = [p for row in rows for p in row.problems]
    lines += ["", "PROBLEMS:" if problems else "Nothing lost, nothing wrong."]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)
