"""Kubernetes Events for loopback denials (optional, off by default; rate-limited per pod).

An operator running ``kubectl describe pod`` sees ``Warning LoopbackDenied`` with the
source and destination container, port and verdict. One Event per pod per
:data:`INTERVAL_SECONDS` at most: the denials in between are only counted, and the next
Event says how many there were. Events are posted from one worker thread through a bounded
queue (a full queue drops the Event, never the reading of denials); a failed post is logged.
The agent needs ``create`` on ``events`` (the chart's ClusterRole has it for repair).
``describe --recent-denials`` reads back only Events reporting :data:`EVENT_COMPONENT`, and
as advisory: anyone who may create Events in the namespace can write the same.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshguard import kube_api
from meshguard.cni.denials import Denial
from meshguard.kube_api import ApiAccess
from meshguard.recent_denials import EVENT_COMPONENT

log = logging.getLogger(__name__)

INTERVAL_SECONDS: Final = 60.0
QUEUE_SIZE: Final = 64
#: Pods whose last Event time is remembered, at most (the oldest forgotten first).
MAX_PODS: Final = 4096


@dataclass(frozen=True, kw_only=True)
class _Due:
    denial: Denial
    suppressed: int


def event_object(denial: Denial, *, suppressed: int, component: str, now: float) -> dict[str, Any]:
    """The core/v1 Event for ``denial`` (pure)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    verb = "denied" if denial.verdict == "denied" else "would deny (audit mode)"
    more = f" ({suppressed} more since the last event)" if suppressed else ""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{denial.pod}.meshguard-", "namespace": denial.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": denial.namespace,
            "name": denial.pod,
        },
        "type": "Warning",
        "reason": "LoopbackDenied" if denial.verdict == "denied" else "LoopbackWouldDeny",
        "message": f"meshguard {verb} {denial.source} -> {denial.destination}"
        f" port {denial.port} {denial.protocol}{more}",
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    """Posts at most one Event per pod per interval; call :meth:`record` for each denial."""

    def __init__(
        self,
        *,
        access: Callable[[], ApiAccess],
        component: str = EVENT_COMPONENT,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self._access = access
        self._component = component
        self._interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._queue: queue.Queue[_Due | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._worker = threading.Thread(target=self._post_all, name="denial-events", daemon=True)
        self._worker.start()

    def record(self, denial: Denial) -> None:
        key = (denial.namespace, denial.pod)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) >= MAX_PODS and key not in self._last:
            oldest = min(self._last, key=self._last.__getitem__)
            self._last.pop(oldest)
            self._suppressed.pop(oldest, None)
        self._last[key] = now
        due = _Due(denial=denial, suppressed=self._suppressed.pop(key, 0))
        try:
            self._queue.put_nowait(due)
        except queue.Full:
            log.warning("denial event dropped: the queue is full",
                        extra={"fields": {"event": "denial-event-dropped"}})  # fmt: skip

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _post_all(self) -> None:
        while (due := self._queue.get()) is not None:
            self._post(due)

    def _post(self, due: _Due) -> None:
        denial = due.denial
        body: Mapping[str, Any] = event_object(
            denial, suppressed=due.suppressed, component=self._component, now=time.time()
        )
        path = f"/api/v1/namespaces/{urllib.parse.quote(denial.namespace, safe='')}/events"
        try:
            kube_api.request(
                self._access(), "POST", path, what=f"an event on pod {denial.pod}",
                limit=64 * 1024, body=body,
            )  # fmt: skip
        except kube_api.ApiError as exc:
            fields = {"event": "denial-event-failed", "namespace": denial.namespace,
                      "pod": denial.pod, "reason": str(exc)}  # fmt: skip
            log.warning("cannot record the denial event: %s", exc, extra={"fields": fields})
