"""The benchmarks' harness: CPU accounting of a benchmark's processes and of the machine,
noise from outside, alternating rounds."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from benchmarks.common import CLOCK_TICKS, process_cpu

T = TypeVar("T")

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


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (as /proc shows them now)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pending += [int(child) for child in children]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants (e.g. serve-authz's workers)."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):  # gone since
            total += process_cpu(member)
    return total


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


# --- rounds ---------------------------------------------------------------------------------


def alternating(items: Sequence[T], index: int) -> tuple[T, ...]:
    """``items`` in the order of round ``index``: forward, then reversed (ABCD DCBA ...), so a
    burst of outside load hits the configurations compared alike."""
    return tuple(items) if index % 2 == 0 else tuple(reversed(items))


def schedule(
    rounds: int, concurrencies: Sequence[int], configs: Sequence[T]
) -> Iterator[tuple[int, int, T]]:
    """(round, concurrency, configuration) in the order the trials run: the configurations
    compared back to back at each concurrency, both levels alternating."""
    for index in range(rounds):
        for position, concurrency in enumerate(alternating(concurrencies, index)):
            for config in alternating(configs, index + position):
                yield index, concurrency, config
