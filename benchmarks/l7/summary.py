"""The L7 benchmark's figures: medians of clean trials, ratios, goals (the report's section
renders them: ``benchmarks/suite/l7.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.common import median_of
from benchmarks.harness import NOISE_CORES
from benchmarks.l7.bench import GrpcTrial, HttpTrial
from benchmarks.l7.envoys import (
    AUTHZ_GOAL,
    CONCURRENCY,
    CONFIGS,
    GRPC_SERVERS,
    NATIVE_GOAL,
    NATIVE_STRETCH,
)


def _cell_figures(
    cell: Sequence[HttpTrial] | Sequence[GrpcTrial],
    clean: Sequence[HttpTrial] | Sequence[GrpcTrial],
) -> dict[str, Any]:
    """The figures of one configuration at one concurrency: medians over its clean trials
    (those without noise from outside the benchmark) if it has any, else over all."""
    these = clean or cell
    return {
        "errors": sum(t.errors for t in these),
        "per_second": median_of(t.per_second for t in these),
        "p50_us": median_of(t.p50_us for t in these),
        "p99_us": median_of(t.p99_us for t in these),
        "per_round": [round(t.per_second) for t in cell],
        "noise_cores": [round(t.unattributed_cores, 2) for t in cell],
        "used": len(clean),
    }


def http_summary(trials: Sequence[HttpTrial]) -> dict[str, Any]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for config in CONFIGS:
        for concurrency in CONCURRENCY:
            cell = [t for t in trials if t.config == config.key and t.concurrency == concurrency]
            clean = [t for t in cell if t.unattributed_cores < NOISE_CORES]
            these = clean or cell
            requests = sum(t.requests for t in these)
            cpu_names = ("client", config.envoy, "upstream", "busy", "softirq")
            cpu = {
                name: sum(t.cpu[name] for t in these) / requests * 1e6
                for name in (*cpu_names, *([config.authz] if config.authz else []))
            }
            known = cpu["client"] + cpu[config.envoy] + cpu["upstream"]
            known += cpu[config.authz] if config.authz else 0.0
            cpu["other"] = cpu["busy"] - known
            rows.setdefault(config.key, {})[concurrency] = {
                "requests": median_of(t.requests for t in these),
                **_cell_figures(cell, clean),
                "mean_us": median_of(t.mean_us for t in these),
                "cpu_us_per_request": cpu,
            }
    pairs = (("c", "b"), ("c", "a"), ("b", "r"), ("a", "r"), ("c0", "b"), ("c", "c0"),
             ("c0", "c0p"), ("n", "a"), ("n0", "a"), ("nd", "a"), ("n", "n0"),
             ("c0", "a"))  # fmt: skip
    ratios = {
        f"{num}/{den}": {
            c: rows[num][c]["per_second"] / rows[den][c]["per_second"] for c in CONCURRENCY
        }
        for num, den in pairs
    }
    return {
        "rows": rows, "ratios": ratios, "goal_n_over_a": NATIVE_GOAL,
        "stretch_n_over_a": NATIVE_STRETCH,
        "round_ratios_n_over_a": round_ratios(trials, "n", "a"),
        "round_ratios_c_over_c0": round_ratios(trials, "c", "c0"),
        "mtls_added_us": mtls_added(trials, mtls="c0", plain="c0p"),
        "instance_spread": instance_spread(trials),
    }  # fmt: skip


def instance_spread(trials: Sequence[HttpTrial]) -> dict[str, dict[int, float]]:
    """Instance 1 / instance 0 req/s of each configuration (medians over their rounds): how
    much two Envoy processes of one configuration differ."""

    def speed(key: str, c: int, instance: int) -> float:
        return median_of(
            t.per_second for t in trials
            if (t.config, t.concurrency, t.instance) == (key, c, instance)
        )  # fmt: skip

    return {
        config.key: {c: round(speed(config.key, c, 1) / speed(config.key, c, 0), 3)
                     for c in CONCURRENCY}
        for config in CONFIGS
        if config.instances == 2
    }  # fmt: skip


def round_ratios(trials: Sequence[HttpTrial], num: str, den: str) -> dict[int, list[float]]:
    """``num``/``den`` throughput within each round (the two ran back to back): the spread."""
    by_key = {(t.config, t.concurrency, t.round): t for t in trials}
    return {
        c: [
            round(by_key[num, c, r].per_second / by_key[den, c, r].per_second, 3)
            for r in sorted({t.round for t in trials})
            if (num, c, r) in by_key and (den, c, r) in by_key
        ]
        for c in CONCURRENCY
    }


def mtls_added(trials: Sequence[HttpTrial], *, mtls: str, plain: str) -> dict[str, Any]:
    """Latency the mTLS Check channel adds per request at concurrency 1: ``mtls`` minus
    ``plain`` (the same listener and authz server, only the channel differs), per round
    (p50 and mean) and their medians."""
    first = CONCURRENCY[0]
    by_key = {(t.config, t.round): t for t in trials if t.concurrency == first}
    rounds = sorted(r for (key, r) in by_key if key == mtls and (plain, r) in by_key)
    p50 = [by_key[mtls, r].p50_us - by_key[plain, r].p50_us for r in rounds]
    mean = [by_key[mtls, r].mean_us - by_key[plain, r].mean_us for r in rounds]
    return {"concurrency": first, "p50_us": median_of(p50), "mean_us": median_of(mean),
            "p50_us_per_round": [round(v, 1) for v in p50],
            "mean_us_per_round": [round(v, 1) for v in mean]}  # fmt: skip


def grpc_summary(trials: Sequence[GrpcTrial]) -> dict[str, Any]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for server in GRPC_SERVERS:
        for concurrency in CONCURRENCY:
            cell = [t for t in trials if t.server == server and t.concurrency == concurrency]
            clean = [t for t in cell if t.unattributed_cores < NOISE_CORES]
            these = clean or cell
            calls = sum(t.calls for t in these)
            rows.setdefault(server, {})[concurrency] = {
                "calls": median_of(t.calls for t in these),
                **_cell_figures(cell, clean),
                "server_cpu_us": sum(t.server_cpu for t in these) / calls * 1e6,
                "client_cpu_us": sum(t.client_cpu for t in these) / calls * 1e6,
                "busy_cores": sum(t.busy_cpu for t in these) / sum(t.seconds for t in these),
            }

    def ratio(num: str, den: str) -> dict[int, float]:
        return {c: rows[num][c]["per_second"] / rows[den][c]["per_second"] for c in CONCURRENCY}

    first = CONCURRENCY[0]
    return {
        "rows": rows,
        "ratio_meshguard_over_echo": ratio("meshguard", "echo"),
        "ratio_plain_meshguard_over_echo": ratio("meshguard-plain", "echo-plain"),
        "goal": AUTHZ_GOAL,
        "mtls_added_p50_us": {
            server: rows[server][first]["p50_us"] - rows[f"{server}-plain"][first]["p50_us"]
            for server in ("echo", "meshguard")
        },
        "mtls_added_cpu_us": {
            server: rows[server][first]["server_cpu_us"]
            - rows[f"{server}-plain"][first]["server_cpu_us"]
            for server in ("echo", "meshguard")
        },
    }
