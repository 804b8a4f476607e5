"""The kernel benchmark's section for one pod size: every configuration's medians, the
ratios against their baselines and goals, the per-trial values and the dispatch check."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.common import markdown_table
from benchmarks.kernel.configs import (
    ALL_PAIRS,
    ISTIO_GOAL,
    ISTIO_MESHGUARD,
    ISTIO_MESHGUARD_FLAT,
)
from benchmarks.kernel.pod import BASE_PORT, BASE_UID, GOAL, HOST, Profile, container_name
from meshguard.rules.compiler import source_chain

METRICS = ("rr_per_second", "connect_per_second", "rr_per_cpu_second", "connect_per_cpu_second")


def traffic_markdown(
    summary: dict[str, Any], profile: Profile, cpu: int | None, *, containers: int
) -> list[str]:
    last = containers - 1
    pinning = f"client and server pinned to CPU {cpu}" if cpu is not None else "not pinned"
    configs = summary["configs"]
    medians, trials = summary["medians"], summary["trials"]
    check = summary["dispatch_check"]
    return [
        f"## Kernel path at {containers} containers (benchmarks/kernel_path.py)",
        "",
        f"Loopback TCP in a pod of {containers} containers + istio-proxy: client"
        f" {container_name(last)} (uid {BASE_UID + last}, the longest walk through the uid"
        f" dispatch of {containers}) -> server {container_name(0)} (uid {BASE_UID}) on"
        f" {HOST}:{BASE_PORT}; median of {profile.trials} trials per configuration,"
        f" alternating, fresh namespace per trial, {pinning} ({profile.name} profile).",
        "",
        *markdown_table(
            ["configuration", "rr/s", "connect/s", "rr /cpu-s", "connect /cpu-s",
             "per trial: rr", "connect", "connect /cpu-s"],
            [[name, *(f"{medians[name][m]:,.0f}" for m in METRICS),
              *(", ".join(f"{v:,.0f}" for v in trials[name][m])
                for m in ("rr_per_second", "connect_per_second", "connect_per_cpu_second"))]
             for name in configs],
        ),
        "",
        *markdown_table(
            ["ratio (with / without)", "rr", "connect", "verdict",
             "per-round median: rr", "connect", "rr /cpu-s", "connect /cpu-s"],
            [[pair, f"{ratios['rr_per_second']:.3f}", f"{ratios['connect_per_second']:.3f}",
              _verdict(pair, ratios),
              *(f"{summary['paired_ratios'][pair][m]:.3f}" for m in METRICS)]
             for pair, ratios in summary["ratios"].items()],
        ),
        "",
        f"Dispatch check: {source_chain(BASE_UID + last)} RETURNed"
        f" {check['returned_by_source_chain']:,} NEW packets for {check['connections']:,}"
        " connections opened in the meshguard trials; in the nftables trials the verdict map"
        " held the client's uid, and a uid of no container was refused after every meshguard"
        " trial (iptables trials too). 'baseline' has no netfilter rules at all, so meshguard /"
        " baseline includes turning conntrack on; an Istio pod already has it on (its nat"
        " capture rules).",
        "",
        *_denials(summary, containers=containers),
    ]  # fmt: skip


DENIED = ("denied_per_second", "denied_per_cpu_second", "denied_per_node_cpu_second")


def _denials(summary: dict[str, Any], *, containers: int) -> list[str]:
    """``--denials``: the configurations that measured the denial path, and their ratios."""
    medians, logged = summary["medians"], summary["logged"]
    configs = [c for c in medians if not math.isnan(medians[c].get("denied_per_second", math.nan))]
    if not configs:
        return []
    return [
        f"Denial path (`--denials`): {container_name(containers - 1)} connects in a loop to"
        f" {HOST}:{BASE_PORT + 1}, each attempt refused by meshguard's reset; per CPU second of"
        " the client, then with the NFLOG listener's; what the listener read (benchmarks/"
        "README.md: `-nolog`, `+listener`, `-logall`).",
        "",
        *markdown_table(
            ["configuration", "refused/s", "refused /cpu-s", "with listener's cpu",
             "per trial: logged / refused"],
            [[c, *(f"{medians[c][m]:,.0f}" for m in DENIED),
              ", ".join(f"{'-' if n is None else f'{n:,}'} / {d:,}" for n, d in logged[c])]
             for c in configs],
        ),
        "",
        *markdown_table(
            ["ratio (against no NFLOG rule)", "refused/s", "refused /cpu-s",
             "with listener's cpu"],
            [[pair, *(f"{ratios[m]:.3f}" for m in DENIED)]
             for pair, ratios in summary["ratios"].items() if pair.endswith("-nolog")],
        ),
        "",
    ]  # fmt: skip


def _verdict(pair: str, ratios: dict[str, float]) -> str:
    """Goal >= GOAL on both figures; the Istio pairs: ISTIO_GOAL on the connect rate."""
    if pair == f"{ISTIO_MESHGUARD.name} / {ISTIO_MESHGUARD_FLAT.name}":
        return "no goal (uid-range dispatch vs one rule per uid)"
    if pair.endswith("-nolog"):
        return "no goal (~1.0: only a denied packet reaches the NFLOG rule)"
    if pair in {f"{b.name} / {a.name}" for a, b in ALL_PAIRS[1:3]}:
        met = ratios["connect_per_second"] >= ISTIO_GOAL
        return f"connect {'met' if met else '**not met**'} (>= {ISTIO_GOAL})"
    met = min(ratios["rr_per_second"], ratios["connect_per_second"]) >= GOAL
    return f"{'met' if met else '**not met**'} (>= {GOAL})"
