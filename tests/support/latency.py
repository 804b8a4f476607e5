"""Latency figures of a load run: nearest-rank percentiles, in seconds or milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict


class LatencyMs(TypedDict):
    """Percentiles and maximum of a run's latencies, milliseconds."""

    p50: float
    p99: float
    p999: float
    max: float


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of an ascending sequence; NaN if empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(fraction * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_ms(latencies: Sequence[float]) -> LatencyMs:
    """p50, p99, p99.9 and the maximum of latencies in seconds, as milliseconds."""
    ordered = sorted(latencies)
    return {
        "p50": percentile(ordered, 0.5) * 1000,
        "p99": percentile(ordered, 0.99) * 1000,
        "p999": percentile(ordered, 0.999) * 1000,
        "max": (ordered[-1] if ordered else float("nan")) * 1000,
    }
