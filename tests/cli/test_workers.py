"""serve-authz's worker pool with real processes: a worker that exits is released, logged and
started again after a delay that doubles while it keeps dying young; stop ends them all."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys

import pytest

from meshguard.cli.workers import RestartPolicy, Worker, WorkerPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Starts:
    """Starts sleeping processes as workers; remembers what it started and released."""

    def __init__(self) -> None:
        self.started: list[tuple[int, subprocess.Popen[bytes]]] = []
        self.released: list[int] = []

    def __call__(self, index: int) -> Worker:
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        self.started.append((index, process))
        return Worker(process, lambda: self.released.append(process.pid))

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def pool_parts():
    clock, starts = Clock(), Starts()
    policy = RestartPolicy(initial=1.0, maximum=4.0, stable_after=60.0)
    # the pool's own thread looks only once an hour: the test's check() calls are the looks
    pool = WorkerPool(count=3, start=starts, policy=policy, clock=clock, poll_seconds=3600)
    yield pool, clock, starts
    pool.stop()
    for _, process in starts.started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_dead_worker_is_released_logged_and_started_again(pool_parts, caplog):
    pool, clock, starts = pool_parts
    caplog.set_level(logging.ERROR, logger="meshguard.cli.workers")
    pool.start()
    assert [index for index, _ in starts.started] == [1, 2]
    first = starts.started[0][1]
    starts.kill(first)
    pool.check()
    assert starts.released == [first.pid]
    assert pool.pids()[0] is None and pool.pids()[1] == starts.started[1][1].pid
    (record,) = [r for r in caplog.records if r.fields["event"] == "worker-exited"]  # type: ignore[attr-defined]
    assert record.fields["worker"] == 1 and record.fields["returncode"] == -signal.SIGKILL  # type: ignore[attr-defined]
    assert "signal 9" in record.getMessage()
    clock.now += 0.5
    pool.check()
    assert len(starts.started) == 2  # not before its delay
    clock.now += 0.6
    pool.check()
    assert [index for index, _ in starts.started] == [1, 2, 1]
    assert pool.pids()[0] == starts.started[2][1].pid
    assert pool.restarts() == 1


def test_the_delay_doubles_while_a_worker_dies_young_and_resets_once_it_lived(pool_parts):
    pool, clock, starts = pool_parts
    pool.start()
    delays = []
    for _ in range(4):
        process = next(p for i, p in reversed(starts.started) if i == 1)
        starts.kill(process)
        before = clock.now
        pool.check()
        while pool.pids()[0] is None:
            clock.now += 0.25
            pool.check()
        delays.append(clock.now - before)
    assert delays == [1.0, 2.0, 4.0, 4.0]  # doubled, capped at the maximum
    clock.now += 61  # lived past stable_after: the next death waits the initial delay again
    starts.kill(next(p for i, p in reversed(starts.started) if i == 1))
    before = clock.now
    pool.check()
    while pool.pids()[0] is None:
        clock.now += 0.25
        pool.check()
    assert clock.now - before == 1.0


def test_stop_ends_and_releases_every_worker(pool_parts):
    pool, _, starts = pool_parts
    pool.start()
    pool.stop()
    assert all(process.poll() is not None for _, process in starts.started)
    assert sorted(starts.released) == sorted(p.pid for _, p in starts.started)
