"""The admission benchmark's text report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.admission.client import Result
from benchmarks.admission.pod import CONCURRENCIES, GOAL_RATIO, POD_CONTAINERS, Profile
from tests.support.processes import (
    HOST,
)


def ratios(results: Sequence[Result]) -> dict[int, float]:
    by = {(r.server, r.concurrency): r for r in results}
    found = {}
    for concurrency in CONCURRENCIES:
        base = by[("baseline", concurrency)].throughput
        found[concurrency] = by[("meshguard", concurrency)].throughput / base if base else 0.0
    return found


def format_report(
    profile: Profile,
    body: bytes,
    answer_bytes: int,
    results: Sequence[Result],
    metrics: dict[str, Any],
    handle_rows: Sequence[tuple[str, float]],
) -> str:
    tls = "/".join(sorted(set(metrics.get("tls", {}).values()))) or "TLS"
    lines = [
        f"Admission over HTTPS on {HOST} (keep-alive, {tls}, one aiohttp client), pod of"
        f" {POD_CONTAINERS} containers: request {len(body) / 1024:.1f} KiB, answer"
        f" {answer_bytes / 1024:.1f} KiB; {profile.name} profile: {profile.rounds} rounds x"
        f" {profile.requests} requests (+{profile.warmup} warm-up) per server and concurrency",
        "",
        f"{'server':<10} {'conc':>4} {'requests':>8} {'errors':>6} {'adm/s':>8}"
        f" {'p50 ms':>8} {'p99 ms':>8}   rounds adm/s",
    ]
    for r in results:
        per_round = " ".join(f"{x:.0f}" for x in r.round_throughputs)
        lines.append(
            f"{r.server:<10} {r.concurrency:>4} {r.requests:>8} {r.errors:>6}"
            f" {r.throughput:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}   {per_round}"
        )
    for r in results:
        if r.error_kinds:
            lines.append(f"  {r.server} c={r.concurrency} errors: {r.error_kinds}")
    lines.append("")
    for concurrency, ratio in ratios(results).items():
        verdict = "ok" if ratio >= GOAL_RATIO else "BELOW GOAL"
        lines.append(
            f"meshguard/baseline throughput at concurrency {concurrency:>2}: {ratio:.2f}"
            f" (goal >= {GOAL_RATIO}: {verdict})"
        )
    if metrics:
        counted = sum(metrics.get("admissions", {}).values())
        lines.append(
            f"meshguard /metrics: {counted} admissions {metrics.get('admissions')}"
            f" (client sent {metrics.get('sent')}), mean server-side time"
            f" {metrics.get('server_mean_ms', float('nan')):.2f} ms (body read + handle())"
        )
    lines += ["", "In process, no HTTP, per admission of the same body:"]
    width = max(len(label) for label, _ in handle_rows)
    lines += [f"  {label:<{width}} {ms:>8.3f} ms" for label, ms in handle_rows]
    by = {(r.server, r.concurrency): r for r in results}
    top = by[("meshguard", max(CONCURRENCIES))]
    handle_ms = handle_rows[1][1]
    if top.throughput:
        budget_ms = 1000 / top.throughput
        lines.append(
            f"  handle() as served = {handle_ms:.2f} ms of the {budget_ms:.2f} ms per admission"
            f" at concurrency {top.concurrency} (1 / throughput):"
            f" {100 * handle_ms / budget_ms:.0f}%; the rest is HTTP, TLS and the client"
        )
    return "\n".join(lines)
