"""Where serve-authz's CPU goes under direct gRPC load: by thread, and with py-spy by part."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import CLOCK_TICKS
from benchmarks.harness import SYSTEM_FIELDS
from benchmarks.l7.bench import Bench, Profile, grpc_job
from benchmarks.l7.envoys import CONCURRENCY


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


#: grpc.aio's threads, by the name the kernel shows (the main thread runs the event loop).
THREAD_NAMES = {
    "python": "grpc.aio poller thread",
    "event_engine": "gRPC EventEngine threads",
}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread kind of a process: the main thread, then by thread name."""
    totals: defaultdict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            comm = (task / "comm").read_text().strip()
            name = "main thread (event loop)" if int(task.name) == pid else comm
            name = THREAD_NAMES.get(name, name)
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            totals[name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return dict(totals)


def run_profile(bench: Bench, profile: Profile) -> dict[str, Any]:
    """``meshguard serve-authz`` under direct gRPC load at the top concurrency: CPU by thread,
    then (with py-spy) where its Python time goes."""
    pid = bench.processes["authz"].pid
    top = CONCURRENCY[-1]
    threads: dict[str, float] = {}

    def threads_begin(_label: str) -> None:
        threads.update(thread_cpu(pid))

    job = grpc_job("meshguard", top, profile.profile_seconds, 0) | {"label": "threads"}
    ((result, cpu),) = bench.grpc_jobs([job], profile.grpc_warmup, on_begin=threads_begin)
    after = thread_cpu(pid)
    spent = {name: after[name] - threads.get(name, 0.0) for name in after}
    other = cpu["busy"] - result["client_cpu"]
    other -= sum(v for k, v in cpu.items() if k not in SYSTEM_FIELDS)
    summary: dict[str, Any] = {
        "noise_cores": other / result["elapsed"],
        "checks_per_second": result["per_second"],
        "server_cpu_us_per_check": cpu["authz"] / result["calls"] * 1e6,
        "thread_cpu_us_per_check": {
            name: seconds / result["calls"] * 1e6
            for name, seconds in sorted(spent.items(), key=lambda item: -item[1])
            if seconds > 0
        },
    }
    binary = py_spy_binary()
    if binary is None:
        return summary | {"skipped": "py-spy not installed (pip install py-spy)"}
    output = bench.workdir / "authz-profile.txt"
    spies: list[subprocess.Popen[bytes]] = []

    def spy_begin(_label: str) -> None:
        # Blocking sampling (py-spy's default): consistent stacks, at the price of slowing
        # the server while it samples; --nonblocking lost a tenth of the samples here.
        spies.append(
            subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--duration", str(profile.profile_seconds),
                 "--rate", "200", "--format", "raw", "--output", str(output)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        )  # fmt: skip

    job = grpc_job("meshguard", top, profile.profile_seconds + 1.5, 0) | {"label": "profile"}
    bench.grpc_jobs([job], profile.grpc_warmup, on_begin=spy_begin)
    (spy,) = spies
    try:
        _, err = spy.communicate(timeout=30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not output.exists():
        detail = err.decode(errors="replace").strip()[-300:]
        return summary | {"skipped": f"py-spy failed: {detail}"}
    return summary | summarize_profile(output.read_text())


#: Inside Check(): first match from the leaf up (py-spy raw frames look like
#: ``function (path/to/file.py:line)``).
CHECK_BUCKETS = (
    ("Check: decision log line (logging + JSON)",
     ("logging/__init__.py", "meshguard/logs.py", "/json/")),
    ("Check: metrics (prometheus_client)", ("prometheus_client",)),
    ("Check: decide() (policy evaluation)", ("meshguard/authz/decision.py",)),
    ("Check: request_of/response_of (protobuf <-> Request)", ("request_of", "response_of")),
    ("Check: the rest", ("meshguard/authz/server.py",)),
)  # fmt: skip
#: Outside Check(): grpc.aio's Cython code has no Python frames of its own, so its time
#: shows under the asyncio callback (Handle._run) or thread that runs it.
OUTSIDE_BUCKETS = (
    "grpc.aio poller thread (Cython, Thread.run)",
    "event loop: grpc.aio RPC handling in Cython (Handle._run)",
    "event loop: epoll select",
    "event loop: other asyncio Python",
)


def summarize_profile(raw: str) -> dict[str, Any]:
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaves[frames[-1].split(" (")[0] + _short_file(frames[-1])] += count
        buckets[_bucket(frames)] += count
    order = [name for name, _ in CHECK_BUCKETS] + list(OUTSIDE_BUCKETS)
    return {
        "samples": total,
        "buckets": {name: buckets[name] / total for name in order if total},
        "top_leaves": [(name, n / total) for name, n in leaves.most_common(10)] if total else [],
    }


def _bucket(frames: Sequence[str]) -> str:
    if any("meshguard/authz/server.py" in f for f in frames):
        for frame in reversed(frames):
            for name, needles in CHECK_BUCKETS:
                if any(needle in frame for needle in needles):
                    return name
    if any(f.startswith("Thread._bootstrap") for f in frames):
        return OUTSIDE_BUCKETS[0]
    if frames[-1].startswith("Handle._run"):
        return OUTSIDE_BUCKETS[1]
    if frames[-1].startswith("EpollSelector.select"):
        return OUTSIDE_BUCKETS[2]
    return OUTSIDE_BUCKETS[3]


def _short_file(frame: str) -> str:
    if "(" not in frame:
        return ""
    location = frame.rsplit("(", 1)[1].rstrip(")")
    path, _, line = location.rpartition(":")
    parts = Path(path).parts
    return f" ({'/'.join(parts[-2:])}:{line})"
