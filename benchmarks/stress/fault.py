"""3. The authz server killed mid-load, with the real Envoy in front: every request answered
and none allowed while it is down."""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import json_lines
from benchmarks.stress.rows import FaultCycle, Profile, Row
from meshguard.errors import MeshguardFailure
from meshguard.sandbox.envoy import envoy_binary
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.latency import latency_ms
from tests.support.load import APP, FaultPod, LoadClient


def fault_problem() -> str | None:
    """Why the fault scenario cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, processes under other uids)"
    missing = [t for t in ("ip", "iptables-restore", "ip6tables-restore", "setpriv")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        return f"needs {', '.join(missing)}"
    try:
        envoy_binary()
    except MeshguardFailure as exc:
        return str(exc)
    return None


@dataclass
class Cycle:
    killed: float = 0.0
    dead: float = 0.0
    restarted: float = 0.0
    listening: float = 0.0
    recovered: float | None = None  # end of the first POST allowed after the restart


def classify(record: Sequence[Any], cycles: Sequence[Cycle]) -> str:
    """up: the server serving and Envoy reconnected; down: the server dead for the whole
    request; transition: around a kill or a restart."""
    began, ended = record[0], record[1]
    start = float("-inf")
    for cycle in cycles:
        if began >= start and ended < cycle.killed:
            return "up"
        if began >= cycle.dead and ended <= cycle.restarted:
            return "down"
        start = cycle.recovered if cycle.recovered is not None else float("inf")
    return "up" if began >= start else "transition"


def run_fault(profile: Profile, workdir: Path) -> tuple[Row, list[FaultCycle]]:
    workdir.chmod(0o755)  # the proxy's uid reads the pod file and Envoy's config here
    cycles: list[Cycle] = []
    with NetworkNamespace() as ns:
        pod = FaultPod(ns, workdir)
        client = LoadClient(ns, uid=APP, workers=profile.fault_workers,
                            max_seconds=profile.phase_seconds)  # fmt: skip
        try:
            for _ in range(profile.fault_cycles):
                time.sleep(profile.up_seconds)
                cycle = Cycle(killed=time.monotonic())
                pod.kill_authz()
                cycle.dead = time.monotonic()
                time.sleep(profile.down_seconds)
                cycle.restarted = time.monotonic()
                pod.start_authz()
                cycle.listening = time.monotonic()
                cycles.append(cycle)
            time.sleep(profile.after_seconds)
            records = sorted(client.finish(timeout=60))
        finally:
            client.kill()
    lines, not_json = json_lines(pod.log_file)
    decisions = sum(line.get("event") == "decision" for line in lines)
    for cycle in cycles:
        cycle.recovered = min(
            (r[1] for r in records if r[0] >= cycle.restarted and r[2] == "POST" and r[3] == 200),
            default=None,
        )
    phases = [classify(r, cycles) for r in records]
    problems: list[str] = []
    wrong = Counter[str]()
    for record, phase in zip(records, phases, strict=True):
        _, _, method, status, origin = record
        origin = origin.split(":")[0]
        if method == "GET" and status == 200:
            wrong["GET let through"] += 1
        elif phase == "down" and status != 503:
            wrong[f"{method} {status} while down"] += 1
        elif phase == "up" and method == "POST" and (status, origin) != (200, "upstream"):
            wrong[f"POST {status} ({origin}) while up"] += 1
        elif phase == "up" and method == "GET" and (status, origin) != (403, "meshguard"):
            wrong[f"GET {status} ({origin}) while up"] += 1
    errors = Counter(r[4] for r in records if r[3] == 0)
    decided = sum(r[4] in {"upstream", "meshguard"} for r in records)
    if not decided <= decisions <= decided + profile.fault_workers * len(cycles):
        problems.append(f"fault: {decisions} decision lines for {decided} decided answers")
    if not_json:
        problems.append(f"fault: {not_json} decision log lines are not JSON")
    problems += [f"fault: {n} x {what}" for what, n in (errors + wrong).items()]
    if any(c.recovered is None for c in cycles):
        problems.append("fault: POST never allowed again after a restart")
    details: list[FaultCycle] = []
    for number, cycle in enumerate(cycles, 1):
        window = [(r, p) for r, p in zip(records, phases, strict=True)
                  if r[0] >= cycle.killed - profile.up_seconds
                  and r[0] < cycle.listening + profile.up_seconds]  # fmt: skip
        details.append({
            "cycle": number,
            "down_seconds": cycle.restarted - cycle.dead,
            "restart_to_listening_s": cycle.listening - cycle.restarted,
            "restart_to_allowed_s": (cycle.recovered or float("nan")) - cycle.restarted,
            "by_phase": dict(Counter(f"{p} {r[2]} {r[3]}" for r, p in window)),
        })  # fmt: skip
    span = records[-1][1] - records[0][0] if records else 0.0
    by_phase = Counter(f"{p} {r[2]} {r[3]}" for r, p in zip(records, phases, strict=True))
    up = [r[1] - r[0] for r, p in zip(records, phases, strict=True) if p == "up"]
    row = Row(
        scenario="fault: HTTP via Envoy, authz killed", sent=len(records), errors=errors.total(),
        wrong=wrong.total(), rate=len(records) / span if span else 0.0, latency=latency_ms(up),
        notes=f"{profile.fault_workers} threads (app uid), {len(cycles)} kill(s); latency of"
        f" 'up' requests; {dict(sorted(by_phase.items()))}; answered by meshguard {decided},"
        f" decision lines {decisions}",
        problems=problems,
    )  # fmt: skip
    return row, details
