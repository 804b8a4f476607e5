"""PNG figures (matplotlib, Agg): each a ratio against the baseline measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

DPI = 110


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _goal(ax: Any, y: float, label: str) -> None:
    ax.axhline(y, color="tab:red", linestyle="--", linewidth=1.5, label=label)


def _baseline(ax: Any, label: str = "baseline (= 1.0)") -> None:
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1.2, label=label)


def _label(ax: Any, title: str, xlabel: str, ylabel: str, *, fontsize: int = 8, loc: str = "best",
           grid: str = "both", ncol: int = 1) -> None:  # fmt: skip
    """Title, axis labels, legend and grid: what every plot sets."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=fontsize, loc=loc, ncol=ncol)
    ax.grid(axis=grid, alpha=0.3)


def kernel(rows: dict[int, dict[str, Any]], goal: float, path: Path) -> Path:
    """Ratio (with meshguard / without) vs containers in the pod."""
    sizes = sorted(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series = (
        ("meshguard / baseline", "rr_per_second", "request/response, meshguard / no rules", "o-"),
        ("meshguard / baseline", "connect_per_second", "connect+close, meshguard / no rules", "s-"),
        ("istio+meshguard / istio", "rr_per_second", "request/response, istio+mg / istio", "o--"),
        ("istio+meshguard / istio", "connect_per_second", "connect+close, istio+mg / istio", "s--"),
    )
    for pair, metric, label, style in series:
        ys = [rows[n]["ratios"][pair][metric] for n in sizes if pair in rows[n]["ratios"]]
        if len(ys) == len(sizes):
            ax.plot(sizes, ys, style, label=label)
    _baseline(ax, "without meshguard (= 1.0)")
    _goal(ax, goal, f"goal >= {goal}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    _label(ax, "Kernel path: loopback TCP with meshguard's rules vs without",
           "containers in the pod (client: the highest uid, the longest dispatch walk)",
           "throughput ratio (with / without meshguard)")  # fmt: skip
    return _save(fig, path)


def l7(http: dict[str, Any], grpc: dict[str, Any], path: Path) -> Path:
    """Throughput by engine vs no authorization, latency, and authz vs bare grpc.aio echo."""
    conc = sorted(int(c) for c in http["rows"]["a"])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    rows = http["rows"]
    # (key, label, baseline): the floor, Envoy RBAC with one rule, against the plain router
    keys = [(k, label, "a") for k, label in (
        ("n", "(n) native"), ("n0", "(n0) native, no log"), ("nd", "(nd) native, denied log"),
        ("c", "(c) serve-authz"), ("c0", "(c0) do-nothing ext_authz"))]  # fmt: skip
    keys = [k for k in keys if k[0] in rows] + [("b", "(b) Envoy RBAC, 1 rule", "r")] * (
        "b" in rows and "r" in rows
    )
    width = 0.8 / len(keys)
    xs = range(len(conc))
    for i, (key, label, base) in enumerate(keys):
        ys = [rows[key][str(c)]["per_second"] / rows[base][str(c)]["per_second"] for c in conc]
        offset = (i - (len(keys) - 1) / 2) * width
        left.bar([x + offset for x in xs], ys, width, label=f"{label} / ({base})")
    _baseline(left, "(a) no authorization (= 1.0)")
    _goal(left, http["goal_n_over_a"], f"goal (n)/(a) >= {http['goal_n_over_a']}")
    left.set_xticks(list(xs), [str(c) for c in conc])
    left.set_ylim(0, 1.5)  # room for the legend above the bars
    _label(left, "L7: HTTP throughput by engine", "concurrent connections (wrk)",
           "requests/s ratio vs (a) no authorization",
           fontsize=7, loc="upper center", grid="y", ncol=2)  # fmt: skip
    for key, label, color in (("a", "(a) no authz", "tab:blue"), ("n", "(n) native", "tab:green"),
                              ("c", "(c) serve-authz", "tab:orange")):  # fmt: skip
        for quantile, style in (("p50", "o-"), ("p99", "^--")):
            ys = [http["rows"][key][str(c)][f"{quantile}_us"] / 1000 for c in conc]
            middle.plot(conc, ys, style, color=color, label=f"{label} {quantile}")
    middle.set_xscale("log", base=2)
    middle.set_yscale("log")
    middle.set_xticks(conc, [str(c) for c in conc])
    _label(middle, "L7: request latency p50 / p99", "concurrent connections (wrk)",
           "latency (ms, log scale)", fontsize=7, ncol=2)  # fmt: skip
    gconc = sorted(int(c) for c in grpc["ratio_meshguard_over_echo"])
    right.plot(gconc, [grpc["ratio_meshguard_over_echo"][str(c)] for c in gconc], "o-",
               label="meshguard serve-authz / bare grpc.aio echo")  # fmt: skip
    _baseline(right, "bare grpc.aio echo (= 1.0)")
    _goal(right, grpc["goal"], f"goal >= {grpc['goal']}")
    right.set_xscale("log", base=2)
    right.set_xticks(gconc, [str(c) for c in gconc])
    right.set_ylim(0, 1.2)
    _label(right, "Authz server alone: Check calls/s", "calls in flight (one gRPC channel)",
           "checks/s ratio vs bare echo", fontsize=7, loc="lower left")  # fmt: skip
    return _save(fig, path)


def workers(result: dict[str, Any], path: Path) -> Path:
    counts = sorted(int(w) for w in result["checks_per_second"])
    base = result["checks_per_second"][str(counts[0])]
    ratios = [result["checks_per_second"][str(w)] / base for w in counts]
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    bars = ax.bar(
        [str(w) for w in counts], ratios, color="tab:orange", label="checks/s vs 1 worker"
    )
    for bar, w in zip(bars, counts, strict=True):
        ax.annotate(f"{result['checks_per_second'][str(w)]:,.0f}/s",
                    (bar.get_x() + 0.2, bar.get_height() + 0.03), fontsize=9)  # fmt: skip
    _baseline(ax, "1 worker (= 1.0)")
    ax.axhline(len(counts), color="tab:green", linestyle="-.", linewidth=1,
               label=f"linear scaling ({len(counts)}x)")  # fmt: skip
    _label(ax, f"serve-authz workers (SO_REUSEPORT), {result['cpus']} CPUs shared with clients",
           "serve-authz --workers", "Check calls/s ratio vs 1 worker",
           loc="upper left", grid="y")  # fmt: skip
    return _save(fig, path)


def admission(webhook: dict[str, Any] | None, growth: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if webhook is not None:
        conc = sorted(int(c) for c in webhook["throughput_ratio"])
        left.bar([str(c) for c in conc], [webhook["throughput_ratio"][str(c)] for c in conc],
                 color="tab:orange", label="meshguard serve-webhook / bare aiohttp")  # fmt: skip
        _baseline(left, "bare aiohttp endpoint (= 1.0)")
        _goal(left, webhook["goal_ratio"], f"goal >= {webhook['goal_ratio']}")
        left.set_ylim(0, 1.15)
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "webhook.py: not measured", ha="center", transform=left.transAxes)
    left.set_xlabel("requests in flight (HTTPS, keep-alive)")
    left.set_ylabel("admissions/s ratio vs bare endpoint")
    left.set_title(
        f"Admission throughput, pod of {webhook['pod_containers'] if webhook else '?'} containers"
    )
    left.grid(axis="y", alpha=0.3)
    rows = growth["rows"]
    sizes = [r["containers"] for r in rows]
    first = rows[0]["handle_ms"]
    right.plot(sizes, [r["handle_ms"] / first for r in rows], "o-",
               label="handle() time / handle() time at 5 containers")  # fmt: skip
    right.plot(sizes, [n / sizes[0] for n in sizes], "-.", color="tab:green",
               label="linear in containers")  # fmt: skip
    _baseline(right, f"{sizes[0]} containers (= 1.0, {first:.2f} ms)")
    for r in rows:
        right.annotate(f"{r['handle_ms']:.2f} ms", (r["containers"], r["handle_ms"] / first),
                       textcoords="offset points", xytext=(4, -12), fontsize=8)  # fmt: skip
    _label(right, "Admission cost growth (in-process handle(), no HTTP)", "containers in the pod",
           "in-process handle() time, ratio vs smallest pod")  # fmt: skip
    return _save(fig, path)


def install(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    sizes = [r["containers"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, style, color, label in (
        ("init_ms", "o-", None, "python -m meshguard init, installed (wall)"),
        ("init_checkout_ms", "^:", "tab:gray",
         "the same from the editable checkout (not byte-compiled)"),
        ("install_in_process_ms", "s--", None,
         "install() in process (iptables save/restore/verify, IPv4+IPv6)"),
    ):  # fmt: skip
        if all(key in r for r in rows):
            ax.plot(sizes, [r[key] for r in rows], style, color=color, label=label)
    start = next((v for k, v in result["startup_ms"].items() if "import meshguard" in k), None)
    if start is not None:
        ax.axhline(start, color="tab:purple", linestyle=":",
                   label=f"interpreter + init's imports ({start:.0f} ms)")  # fmt: skip
    _goal(ax, result["goal_ms"], f"goal < {result['goal_ms']:.0f} ms at 64 containers")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_ylim(0, max(*(r["init_ms"] for r in rows), result["goal_ms"]) * 1.45)
    _label(ax, "Rule install: meshguard-init in a fresh network namespace",
           "containers in the pod", "wall time (ms)", loc="upper left")  # fmt: skip
    return _save(fig, path)
