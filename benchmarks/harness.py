"""The benchmarks' harness: CPU accounting of a benchmark's processes and of the machine,
noise from outside, alternating rounds."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - getaddrinfo loads it lazily, unreadable after the drop
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    CLOCK_TICKS,
    process_cpu,
)

# --- CPU accounting -------------------------------------------------------------------------

SYSTEM_FIELDS = frozenset({"busy", "sys", "softirq", "steal"})
#: A trial during which processes outside the benchmark used more CPU than this (another
#: workload on a shared machine) is noisy: medians use a cell's clean trials if it has any.
NOISE_CORES = 0.25


def system_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds (all CPUs): busy (not idle, iowait or steal) and parts."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) / CLOCK_TICKS for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return {
        "busy": user + nice + system + irq + softirq,
        "sys": system,
        "softirq": irq + softirq,
        "steal": steal,
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds of the benchmark's long-running processes between two snapshots."""

    pids: dict[str, int]

    def snapshot(self) -> dict[str, float]:
        shot = {name: process_cpu(pid) for name, pid in self.pids.items()}
        shot.update(system_cpu())
        shot["client"] = children_cpu()
        return shot

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


def wait_for_quiet(limit_seconds: float = 60.0) -> float:
    """Until the machine's CPUs are (nearly) idle, at most ``limit_seconds``; the busy cores
    last seen. Other workloads on a shared machine skew every figure below."""
    deadline = time.monotonic() + limit_seconds
    while True:
        before, started = system_cpu()["busy"], time.monotonic()
        time.sleep(1.0)
        busy = (system_cpu()["busy"] - before) / (time.monotonic() - started)
        if busy < NOISE_CORES / 2 or time.monotonic() >= deadline:
            return busy
