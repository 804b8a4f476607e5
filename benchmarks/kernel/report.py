"""The kernel benchmark's text report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.kernel.configs import (
    ALL_CONFIGS,
    ALL_PAIRS,
    ISTIO_GOAL,
    ISTIO_MESHGUARD,
    ISTIO_MESHGUARD_FLAT,
)
from benchmarks.kernel.install import InstallCost
from benchmarks.kernel.pod import (
    BASE_PORT,
    BASE_UID,
    GOAL,
    HOST,
    Profile,
    container_name,
)
from meshguard.rules.compiler import source_chain


def format_traffic(
    summary: dict[str, Any], profile: Profile, cpu: int | None, *, containers: int
) -> str:
    last = containers - 1
    pinning = f"client and server pinned to CPU {cpu}" if cpu is not None else "not pinned"
    lines = [
        f"Loopback TCP in a pod of {containers} containers + istio-proxy:"
        f" client {container_name(last)} (uid {BASE_UID + last}, the longest walk"
        f" through the uid dispatch of {containers}) -> server {container_name(0)}"
        f" (uid {BASE_UID}) on {HOST}:{BASE_PORT}",
        f"median of {profile.trials} trials per configuration, alternating, fresh namespace"
        f" per trial, {pinning} ({profile.name} profile)",
        "",
        f"{'configuration':<26}{'rr (rt/s)':>14}{'connect (conn/s)':>18}"
        f"{'rr /cpu-s':>12}{'connect /cpu-s':>16}",
    ]
    configs = [c for c in ALL_CONFIGS if c.name in summary["medians"]]
    for config in configs:
        medians = summary["medians"][config.name]
        lines.append(
            f"{config.name:<26}{medians['rr_per_second']:>14,.0f}"
            f"{medians['connect_per_second']:>18,.0f}"
            f"{medians['rr_per_cpu_second']:>12,.0f}{medians['connect_per_cpu_second']:>16,.0f}"
        )
    lines += [
        "",
        f"{'ratio (with / without)':<40}{'rr':>10}{'connect':>10}   goal >= {GOAL}"
        f" ({ISTIO_GOAL} on connect for istio pairs)",
    ]
    flat_pair = f"{ISTIO_MESHGUARD.name} / {ISTIO_MESHGUARD_FLAT.name}"
    istio_pairs = {f"{b.name} / {a.name}" for a, b in ALL_PAIRS[1:3]}
    for pair, ratios in summary["ratios"].items():
        verdicts = ", ".join("met" if r >= GOAL else "NOT met" for r in ratios.values())
        if pair in istio_pairs:
            met = ratios["connect_per_second"] >= ISTIO_GOAL
            verdicts = f"connect {'met' if met else 'NOT met'} (>= {ISTIO_GOAL})"
        if pair == flat_pair:
            verdicts = "(no goal: uid-range dispatch vs one rule per uid)"
        lines.append(
            f"{pair:<40}{ratios['rr_per_second']:>10.3f}{ratios['connect_per_second']:>10.3f}"
            f"   {verdicts}"
        )
    lines += [
        "",
        "median of the per-round ratios (rr, connect; per CPU second: rr, connect):",
    ]
    for pair, ratios in summary["paired_ratios"].items():
        lines.append(
            f"  {pair:<38}{ratios['rr_per_second']:>8.3f}{ratios['connect_per_second']:>8.3f}"
            f"   {ratios['rr_per_cpu_second']:>8.3f}{ratios['connect_per_cpu_second']:>8.3f}"
        )
    lines += ["", "per trial:"]
    for config in configs:
        for metric, label in (
            ("rr_per_second", "rr"),
            ("connect_per_second", "connect"),
            ("connect_per_cpu_second", "conn/cpu"),
        ):
            values = ", ".join(f"{v:,.0f}" for v in summary["trials"][config.name][metric])
            lines.append(f"  {config.name:<20} {label:<8} {values}")
    check = summary["dispatch_check"]
    lines.append(
        f"dispatch check: {source_chain(BASE_UID + last)} RETURNed"
        f" {check['returned_by_source_chain']:,} NEW packets for"
        f" {check['connections']:,} connections opened in the meshguard trials"
    )
    lines.append(
        "nftables trials: the verdict map held the client's uid, and a uid of no container"
        " was refused after every meshguard trial (iptables trials too)"
    )
    lines.append(
        "note: 'baseline' has no netfilter rules at all, so meshguard / baseline includes"
        " turning conntrack on; an Istio pod already has it on (its nat capture rules)."
    )
    return "\n".join(lines)


def format_install(
    costs: Sequence[InstallCost], startup: dict[str, float], profile: Profile
) -> str:
    lines = [
        f"Compile and install (median; compile x{profile.compile_reps},"
        f" install x{profile.install_reps}, fresh namespace per install, IPv4 + IPv6)",
        "",
        f"{'containers':>10}{'rules':>8}{'compile ms':>12}{'init subprocess ms':>20}"
        f"{'install() ms':>14}",
    ]
    lines.extend(
        f"{c.containers:>10}{c.rules:>8}{c.compile_ms:>12.2f}{c.init_subprocess_ms:>20.1f}"
        f"{c.install_in_process_ms:>14.1f}"
        for c in costs
    )
    lines.append("part of the init subprocess time (ip netns exec NS ...):")
    lines.extend(f"  {label:<34} {ms:6.1f} ms" for label, ms in startup.items())
    return "\n".join(lines)
