"""The L7 benchmark's figures (medians of clean trials, ratios, goals) and its text report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.common import (
    median_of,
)
from benchmarks.harness import NOISE_CORES
from benchmarks.l7.bench import GrpcTrial, HttpTrial, Profile
from benchmarks.l7.envoys import (
    AUTHZ_GOAL,
    CONCURRENCY,
    CONFIG_BY_KEY,
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
    pairs = (("c", "b"), ("c", "a"), ("b", "a"), ("c0", "b"), ("c", "c0"), ("c0", "c0p"),
             ("n", "a"), ("n0", "a"), ("n", "n0"), ("c0", "a"))  # fmt: skip
    ratios = {
        f"{num}/{den}": {
            c: rows[num][c]["per_second"] / rows[den][c]["per_second"] for c in CONCURRENCY
        }
        for num, den in pairs
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "goal_n_over_a": NATIVE_GOAL,
        "stretch_n_over_a": NATIVE_STRETCH,
        "round_ratios_n_over_a": round_ratios(trials, "n", "a"),
        "round_ratios_c_over_c0": round_ratios(trials, "c", "c0"),
        "mtls_added_us": mtls_added(trials, mtls="c0", plain="c0p"),
    }


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
    return {
        "concurrency": first,
        "p50_us": median_of(p50),
        "mean_us": median_of(mean),
        "p50_us_per_round": [round(v, 1) for v in p50],
        "mean_us_per_round": [round(v, 1) for v in mean],
    }


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


def verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else "NOT met"


def format_report(
    profile: Profile,
    http: dict[str, Any],
    grpc_: dict[str, Any],
    extra: dict[str, Any],
) -> str:
    p = profile
    lines = [
        "L7 path: wrk (1 thread, keep-alive, POST /quitquitquit, uid 1000 = app) -> Envoy 1.40"
        " (uid 1337, 1 worker) -> upstream 'pilot-agent' 127.0.0.1:15020 (uid 1337,"
        " Python asyncio); the Check channels of (c) and (c0) are mTLS (a test mesh CA's SPIFFE"
        " certificates, meshguard's server credentials), (c0p)'s is plaintext",
        f"median of {p.rounds} rounds x {p.http_seconds} s per cell, rounds alternate their"
        f" order ({p.name} profile); latency in ms; 'used': rounds without outside CPU noise"
        " ('!': none, all rounds used)",
        "",
        f"{'configuration':<24}{'conc':>5}{'used':>6}{'requests':>10}{'errors':>7}{'req/s':>9}"
        f"{'p50':>8}{'p99':>8}   CPU us/request: client envoy upstream authz other",
    ]
    for config in CONFIGS:
        for concurrency in CONCURRENCY:
            row = http["rows"][config.key][concurrency]
            cpu = row["cpu_us_per_request"]
            authz = f"{cpu[config.authz]:6.0f}" if config.authz else f"{'-':>6}"
            lines.append(
                f"{config.label:<24}{concurrency:>5}{_used(row):>6}{row['requests']:>10,.0f}"
                f"{row['errors']:>7}"
                f"{row['per_second']:>9,.0f}{row['p50_us'] / 1000:>8.2f}"
                f"{row['p99_us'] / 1000:>8.2f}   {cpu['client']:>20.0f}"
                f"{cpu[config.envoy]:>7.0f}{cpu['upstream']:>9.0f}{authz}{cpu['other']:>6.0f}"
            )
    lines += ["", f"{'throughput ratio':<42}" + "".join(f"{'c=' + str(c):>9}" for c in CONCURRENCY)]
    names = {
        "n/a": f"(n) native / (a) no authz [>= {NATIVE_GOAL}]",
        "n0/a": "(n0) native, no log / (a) no authz",
        "n/n0": "(n) native / (n0) native, no log",
        "c/a": "(c) serve-authz / (a) no authz",
        "c0/a": "(c0) do-nothing ext_authz / (a) no authz",
        "c/b": "(c) meshguard / (b) rbac",
        "b/a": "(b) rbac / (a) envoy",
        "c0/b": "(c0) authz-echo / (b) rbac",
        "c/c0": "(c) meshguard / (c0) echo, mTLS",
        "c0/c0p": "(c0) echo mTLS / (c0p) echo plaintext",
    }
    for key, label in names.items():
        values = http["ratios"][key]
        lines.append(f"{label:<42}" + "".join(f"{values[c]:>9.3f}" for c in CONCURRENCY))
    n_over_a, spread = http["ratios"]["n/a"], http["round_ratios_n_over_a"]
    lines.append(
        f"goal (n)/(a) >= {NATIVE_GOAL} (stretch {NATIVE_STRETCH}): "
        + ", ".join(
            f"c={c} {verdict(n_over_a[c], NATIVE_GOAL)}"
            f"{' (stretch met)' if n_over_a[c] >= NATIVE_STRETCH else ''} (rounds {spread[c]})"
            for c in CONCURRENCY
        )
    )
    lines += native_lines(http)
    added = http["mtls_added_us"]
    lines.append(
        f"mTLS on the Check channel adds per request at c={added['concurrency']} ((c0) - (c0p)):"
        f" p50 {added['p50_us']:.0f} us (rounds {added['p50_us_per_round']}), mean"
        f" {added['mean_us']:.0f} us (rounds {added['mean_us_per_round']})"
    )
    lines += [
        "",
        f"Authz servers alone: grpc.aio client (uid 1337, one channel, N concurrent unary"
        f" Check calls, {p.grpc_seconds} s per cell, median of {p.rounds}) sending the"
        f" CheckRequest Envoy sends ({extra['request_size']} bytes)",
        "",
        f"{'server':<26}{'conc':>5}{'used':>6}{'calls':>9}{'errors':>7}{'checks/s':>10}{'p50':>8}"
        f"{'p99':>8}  CPU us/check: server client   busy cores",
    ]
    servers = (
        ("echo", "(d) grpc.aio echo, mTLS"),
        ("meshguard", "serve-authz, mTLS"),
        ("echo-plain", "(d) echo, plaintext"),
        ("meshguard-plain", "serve-authz, plaintext"),
    )
    for server, label in servers:
        for concurrency in CONCURRENCY:
            row = grpc_["rows"][server][concurrency]
            lines.append(
                f"{label:<26}{concurrency:>5}{_used(row):>6}{row['calls']:>9,.0f}{row['errors']:>7}"
                f"{row['per_second']:>10,.0f}{row['p50_us'] / 1000:>8.2f}"
                f"{row['p99_us'] / 1000:>8.2f}  {row['server_cpu_us']:>19.0f}"
                f"{row['client_cpu_us']:>7.0f}{row['busy_cores']:>13.2f}"
            )
    ratios = grpc_["ratio_meshguard_over_echo"]
    lines.append(
        f"{'meshguard / echo checks/s':<31}"
        + "".join(f"  c={c}: {ratios[c]:.3f}" for c in CONCURRENCY)
        + f"   goal >= {AUTHZ_GOAL}: "
        + ", ".join(verdict(ratios[c], AUTHZ_GOAL) for c in CONCURRENCY)
    )
    plain = grpc_["ratio_plain_meshguard_over_echo"]
    lines.append(
        f"{'  the same, both plaintext':<31}"
        + "".join(f"  c={c}: {plain[c]:.3f}" for c in CONCURRENCY)
    )
    added_p50, added_cpu = grpc_["mtls_added_p50_us"], grpc_["mtls_added_cpu_us"]
    lines.append(
        f"mTLS adds per Check at c={CONCURRENCY[0]}, direct gRPC: "
        + ", ".join(
            f"{server} p50 {added_p50[server]:.0f} us, server CPU {added_cpu[server]:.0f} us"
            for server in added_p50
        )
    )
    noisy = [
        cores
        for summary, keys in ((http, [c.key for c in CONFIGS]), (grpc_, list(GRPC_SERVERS)))
        for key in keys
        for row in summary["rows"][key].values()
        for cores in row["noise_cores"]
    ]
    lines.append(
        f"noise: {sum(c >= NOISE_CORES for c in noisy)} of {len(noisy)} trials had >="
        f" {NOISE_CORES} cores busy outside the benchmark's processes (max {max(noisy):.2f});"
        " medians use each cell's clean trials when it has some"
    )
    lines += ["", "Where time goes"]
    lines += breakdown_lines(http, grpc_, extra)
    return "\n".join(lines)


def native_lines(http: dict[str, Any]) -> list[str]:
    """The engines side by side against (a): ratio, latency and CPU per request, and what
    the native engine's decision line costs ((n) against (n0))."""
    rows = http["rows"]
    lines = ["", f"{'engine vs (a)':<24}{'conc':>5}{'ratio':>7}{'p50':>8}{'p99':>8}"
             "   CPU us/request: envoy machine"]  # fmt: skip
    for key in ("a", "n", "n0", "c", "c0"):
        config = CONFIG_BY_KEY[key]
        for c in CONCURRENCY:
            row = rows[key][c]
            cpu = row["cpu_us_per_request"]
            lines.append(
                f"{config.label:<24}{c:>5}{row['per_second'] / rows['a'][c]['per_second']:>7.3f}"
                f"{row['p50_us'] / 1000:>8.2f}{row['p99_us'] / 1000:>8.2f}"
                f"{cpu[config.envoy]:>23.0f}{cpu['busy']:>8.0f}"
            )
    log_cost = [
        rows["n"][c]["cpu_us_per_request"]["envoy_n"]
        - rows["n0"][c]["cpu_us_per_request"]["envoy_n0"]
        for c in CONCURRENCY
    ]
    lines.append(
        "the native decision log line costs Envoy (n) - (n0) per request: "
        + ", ".join(f"c={c} {us:.0f} us" for c, us in zip(CONCURRENCY, log_cost, strict=True))
    )
    return lines


def _used(row: dict[str, Any]) -> str:
    """Clean rounds / rounds; ``!`` when none was clean (the cell uses all, noisy, rounds)."""
    return f"{row['used']}/{len(row['per_round'])}" + ("!" if row["used"] == 0 else " ")


def breakdown_lines(
    http: dict[str, Any], grpc_: dict[str, Any], extra: dict[str, Any]
) -> list[str]:
    rows, grows = http["rows"], grpc_["rows"]
    top = CONCURRENCY[-1]
    mg, echo = grows["meshguard"][top], grows["echo"][top]
    c, c0, b = rows["c"][top], rows["c0"][top], rows["b"][top]
    c_cpu, b_cpu = c["cpu_us_per_request"], b["cpu_us_per_request"]
    lines = [
        f"- per Check, direct gRPC at c={top}: meshguard serve-authz {mg['server_cpu_us']:.0f} us"
        f" CPU vs bare grpc.aio echo {echo['server_cpu_us']:.0f} us: meshguard's own Python"
        f" (translate, decide, metrics, JSON log line) adds"
        f" {mg['server_cpu_us'] - echo['server_cpu_us']:.0f} us to grpc.aio's floor",
        f"- per request through Envoy at c={top}: authz {c_cpu['authz']:.0f} us CPU"
        f" (echo in (c0): {c0['cpu_us_per_request']['echo']:.0f} us); Envoy {c_cpu['envoy_c']:.0f}"
        f" us with ext_authz vs {b_cpu['envoy_b']:.0f} us with RBAC; the whole machine"
        f" {c_cpu['busy']:.0f} us vs {b_cpu['busy']:.0f} us per request (2 CPUs)",
        "- Envoy's own CPU per request (us) at c="
        + "/".join(map(str, CONCURRENCY))
        + ": "
        + "; ".join(
            f"{config.label} "
            + "/".join(
                f"{rows[config.key][n]['cpu_us_per_request'][config.envoy]:.0f}"
                for n in CONCURRENCY
            )
            for config in CONFIGS
        ),
        f"- the floor: with an authz server that decides nothing (c0), Envoy reaches"
        f" {http['ratios']['c0/b'][top]:.2f} of RBAC's throughput at c={top}; meshguard's"
        f" decision work keeps {http['ratios']['c/c0'][top]:.2f} of that (c/c0)",
    ]
    decisions = extra["decisions"]
    lines.append(
        f"- decision time meshguard logs (`us`: translate + decide, before metrics and the log"
        f" line): p50 {decisions['us_p50']} us, p99 {decisions['us_p99']} us over"
        f" {sum(decisions['decisions'].values()):,} decisions {decisions['decisions']}"
    )
    spy = extra["profile"]
    lines.append(
        f"- serve-authz CPU by thread, direct gRPC at c={top} ({spy['checks_per_second']:,.0f}"
        f" checks/s, {spy['server_cpu_us_per_check']:.0f} us/check, outside noise"
        f" {spy['noise_cores']:.2f} cores): "
        + ", ".join(f"{name} {us:.0f} us" for name, us in spy["thread_cpu_us_per_check"].items())
    )
    if "skipped" in spy:
        lines.append(f"- profile: {spy['skipped']}")
    else:
        lines.append(
            f"- py-spy on serve-authz, direct gRPC at c={top}, {spy['samples']} non-idle"
            " samples of its Python threads:"
        )
        lines.extend(f"    {share:6.1%}  {name}" for name, share in spy["buckets"].items())
        lines.append("  hottest leaf frames:")
        lines.extend(f"    {share:6.1%}  {name}" for name, share in spy["top_leaves"][:8])
    stats = extra["envoy_stats"]
    lines.append(
        "- Envoy counters: "
        + "; ".join(
            f"{key}: " + ", ".join(f"{n.split('.', 1)[-1]}={v:,}" for n, v in sorted(s.items()))
            for key, s in stats.items()
            if s
        )
    )
    return lines
