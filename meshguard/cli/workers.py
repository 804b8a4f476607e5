"""``serve-authz --workers``: the worker processes beside the parent, kept running.

Each worker is another ``serve-authz`` process on the same port (gRPC sets SO_REUSEPORT; the
kernel spreads new connections over the processes that listen). A worker that exits while
the parent serves — killed, out of memory, crashed — is logged and started again, after a
delay that doubles while it keeps dying soon after its start (capped), so that a worker that
cannot start does not spin. Its connections break with it and their clients (Envoy)
reconnect to the processes still listening; a restarted worker is NOT_SERVING until it has its
policies again (from the parent's watch, or from the files). Workers die with the parent
(``PR_SET_PDEATHSIG``) and are stopped with it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Seconds between looks at the workers.
POLL_SECONDS = 0.5
STOP_SECONDS = 10.0


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """The delay before a dead worker starts again: ``initial``, doubled (up to ``maximum``)
    each time it died within ``stable_after`` seconds of its start, else ``initial`` again."""

    initial: float = 1.0
    maximum: float = 30.0
    stable_after: float = 60.0


@dataclass(frozen=True)
class Worker:
    """A started worker process, and what to release when it is gone (its feed)."""

    process: subprocess.Popen[bytes]
    release: Callable[[], None] = lambda: None


@dataclass
class _Slot:
    index: int
    worker: Worker | None
    started_at: float
    delay: float
    restart_at: float | None = None
    restarts: int = 0


class WorkerPool:
    """Workers 1..count-1 (the parent is worker 0), restarted when they exit."""

    def __init__(
        self,
        *,
        count: int,
        start: Callable[[int], Worker],
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._start = start
        self._poll_seconds = poll_seconds
        self._policy = policy
        self._clock = clock
        self._stop = threading.Event()
        self._slots = [
            _Slot(index=i, worker=None, started_at=0.0, delay=policy.initial)
            for i in range(1, count)
        ]
        self._thread = threading.Thread(target=self._watch, name="meshguard-workers", daemon=True)

    def start(self) -> None:
        for slot in self._slots:
            self._launch(slot)
        if self._slots:
            self._thread.start()

    def pids(self) -> list[int | None]:
        return [slot.worker.process.pid if slot.worker else None for slot in self._slots]

    def restarts(self) -> int:
        return sum(slot.restarts for slot in self._slots)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_SECONDS)
        workers = [slot.worker for slot in self._slots if slot.worker is not None]
        for worker in workers:
            worker.process.terminate()
        for worker in workers:
            try:
                worker.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.release()

    def check(self) -> None:
        """One look at every worker: note the dead, start those whose delay is over."""
        now = self._clock()
        for slot in self._slots:
            if slot.worker is not None and slot.worker.process.poll() is not None:
                self._buried(slot, now)
            if slot.worker is None and slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._launch(slot)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.check()
            except Exception:  # the parent keeps serving; the next look tries again
                log.exception(
                    "worker supervision failed", extra={"fields": {"event": "worker-error"}}
                )

    def _launch(self, slot: _Slot) -> None:
        slot.worker = self._start(slot.index)
        slot.started_at = self._clock()
        slot.restart_at = None

    def _buried(self, slot: _Slot, now: float) -> None:
        assert slot.worker is not None
        code = slot.worker.process.returncode
        slot.worker.release()
        slot.worker = None
        lived = now - slot.started_at
        slot.delay = (
            min(slot.delay * 2, self._policy.maximum)
            if lived < self._policy.stable_after and slot.restarts
            else self._policy.initial
        )
        slot.restart_at = now + slot.delay
        log.error(
            "serve-authz worker %d exited (%s) after %.0f s: starting it again in %.1f s",
            slot.index, _exit_status(code), lived, slot.delay,
            extra={"fields": {"event": "worker-exited", "worker": slot.index,
                              "returncode": code, "restart_in_seconds": slot.delay}},
        )  # fmt: skip


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit status {code}"
