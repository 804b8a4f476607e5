"""The node agent's repair of pods stuck at meshguard-validation (the API calls).

Every ``interval`` seconds, and only while meshguard's entry is chained on the node (the
node agent calls :meth:`Repairer.run_due` right after a successful install pass — repairing
while the entry is missing would only recreate pods that fail again), it lists the pods
meshguard admitted on this node (label selector ``meshguard.io/admitted=true``, field
selector ``spec.nodeName=<node>``: the API server filters), decides with
:func:`meshguard.cni.repair.assess` and deletes the broken ones — with the pod's UID as a
precondition, so a pod recreated under the same name is never hit — at most ``per_minute``
per minute. Each repair is one JSON log line (``event: cni-repair``, namespace, name,
reason). Failures are logged and retried on the next pass, never fatal.

In the default mode (``event``, :class:`~meshguard.cni.repair.RepairMode`) it deletes
nothing: it records one Warning Event per broken pod (``POST
/api/v1/namespaces/<ns>/events``, once per pod UID, within the same rate) and logs it
(``event: cni-repair-event``); ``delete`` is the opt-in described above.
"""

from __future__ import annotations

import datetime
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshguard import kube_api
from meshguard.cni import repair
from meshguard.cni.node import ApiCredentials
from meshguard.errors import MeshguardError, MeshguardFailure
from meshguard.kube_api import ApiAccess

log = logging.getLogger(__name__)

MAX_LIST_BYTES: Final = 64 * 1024 * 1024
PAGE_SIZE: Final = 500


@dataclass(frozen=True, kw_only=True)
class RepairSettings:
    node_name: str
    interval: float = 10.0
    per_minute: int = 10
    timeout: float = 10.0
    #: event (default: no write on pods) or delete.
    mode: repair.RepairMode = repair.RepairMode.EVENT


class Repairer:
    """Lists this node's admitted pods and deletes the broken ones, at a bounded rate."""

    def __init__(
        self,
        settings: RepairSettings,
        *,
        credentials: Callable[[], ApiCredentials],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.node_name:
            raise MeshguardFailure(
                "pod repair needs the node's name (--node-name, or NODE_NAME from the downward API)"
            )
        self._settings = settings
        self._credentials = credentials
        self._clock = clock
        self._last_pass: float | None = None
        self._deleted_at: deque[float] = deque(maxlen=max(settings.per_minute, 1))
        self._reported: set[str] = set()
        self._signalled: set[str] = set()

    def run_due(self) -> list[repair.Broken]:
        """One pass if ``interval`` has passed since the last; the pods deleted."""
        now = self._clock()
        if self._last_pass is not None and now - self._last_pass < self._settings.interval:
            return []
        self._last_pass = now
        try:
            return self.run_once()
        except MeshguardError as exc:
            log.warning(
                "pod repair pass failed: %s",
                exc,
                extra={"fields": {"event": "cni-repair-failed", "reason": str(exc)}},
            )
            return []

    def run_once(self) -> list[repair.Broken]:
        """List, assess, delete within the rate budget; the pods deleted."""
        credentials = self._credentials()
        node = self._settings.node_name
        broken = [b for pod in self._list(credentials) if (b := repair.assess(pod, node_name=node))]
        if self._settings.mode is repair.RepairMode.EVENT:
            return self._signal(credentials, broken)
        deleted: list[repair.Broken] = []
        for pod in broken:
            if pod.action is repair.Action.REPORT:
                self._report(pod)
                continue
            budget = repair.deletion_budget(
                self._deleted_at, now=self._clock(), per_minute=self._settings.per_minute
            )
            if budget == 0:
                log.warning(
                    "pod repair rate limit reached (%d per minute): %s/%s waits",
                    self._settings.per_minute,
                    pod.namespace,
                    pod.name,
                    extra={"fields": {"event": "cni-repair-deferred", "namespace": pod.namespace,
                                      "name": pod.name}},
                )  # fmt: skip
                break
            if self._delete(credentials, pod):
                self._deleted_at.append(self._clock())
                deleted.append(pod)
        return deleted

    def _signal(
        self, credentials: ApiCredentials, broken: list[repair.Broken]
    ) -> list[repair.Broken]:
        """Event mode: one Warning Event per broken pod (once per UID), within the rate."""
        self._signalled &= {pod.uid for pod in broken}  # forget the pods that are gone
        signalled: list[repair.Broken] = []
        for pod in broken:
            if pod.uid in self._signalled:
                continue
            budget = repair.deletion_budget(
                self._deleted_at, now=self._clock(), per_minute=self._settings.per_minute
            )
            if budget == 0:
                break
            if self._record_event(credentials, pod):
                self._deleted_at.append(self._clock())
                self._signalled.add(pod.uid)
                signalled.append(pod)
        return signalled

    def _record_event(self, credentials: ApiCredentials, pod: repair.Broken) -> bool:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        document = repair.event_document(pod, node_name=self._settings.node_name, now=now)
        path = f"/api/v1/namespaces/{urllib.parse.quote(pod.namespace, safe='')}/events"
        try:
            _call(credentials, "POST", path, body=document, timeout=self._settings.timeout)
        except MeshguardError as exc:
            _repair_failed("cannot record an event on pod", pod, exc)
            return False
        log.warning(
            "pod %s/%s is stuck (%s): recorded event %s on it; delete it to repair it",
            pod.namespace,
            pod.name,
            pod.reason,
            repair.EVENT_REASON,
            extra={"fields": {"event": "cni-repair-event", "namespace": pod.namespace,
                              "name": pod.name, "uid": pod.uid, "reason": pod.reason}},
        )  # fmt: skip
        return True

    def _report(self, pod: repair.Broken) -> None:
        if pod.uid in self._reported:
            return
        self._reported.add(pod.uid)
        log.warning(
            "pod %s/%s is stuck (%s) but no controller owns it: delete and recreate it",
            pod.namespace,
            pod.name,
            pod.reason,
            extra={"fields": {"event": "cni-repair-skipped", "namespace": pod.namespace,
                              "name": pod.name, "reason": pod.reason}},
        )  # fmt: skip

    def _list(self, credentials: ApiCredentials) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = []
        token = ""
        while True:
            query = {
                "labelSelector": repair.ADMITTED_SELECTOR,
                "fieldSelector": repair.node_selector(self._settings.node_name),
                "limit": str(PAGE_SIZE),
            }
            if token:
                query["continue"] = token
            page = _call(
                credentials, "GET", "/api/v1/pods?" + urllib.parse.urlencode(query),
                timeout=self._settings.timeout,
            )  # fmt: skip
            if (
                page is None
                or page.get("kind") != "PodList"
                or not isinstance(page.get("items"), list)
            ):
                raise MeshguardFailure("listing pods: the API server's answer is not a PodList")
            pods += [p for p in page["items"] if isinstance(p, dict)]
            metadata = page.get("metadata")
            token = metadata.get("continue", "") if isinstance(metadata, dict) else ""
            if not token:
                return pods

    def _delete(self, credentials: ApiCredentials, pod: repair.Broken) -> bool:
        path = (
            f"/api/v1/namespaces/{urllib.parse.quote(pod.namespace, safe='')}"
            f"/pods/{urllib.parse.quote(pod.name, safe='')}"
        )
        options = {"kind": "DeleteOptions", "apiVersion": "v1",
                   "preconditions": {"uid": pod.uid}}  # fmt: skip
        try:
            _call(credentials, "DELETE", path, body=options, timeout=self._settings.timeout)
        except _Gone:
            return False  # deleted or recreated meanwhile: nothing left to repair
        except MeshguardError as exc:
            _repair_failed("cannot delete pod", pod, exc)
            return False
        log.info(
            "repaired pod %s/%s: deleted (%s); its controller recreates it",
            pod.namespace,
            pod.name,
            pod.reason,
            extra={"fields": {"event": "cni-repair", "namespace": pod.namespace, "name": pod.name,
                              "uid": pod.uid, "reason": pod.reason}},
        )  # fmt: skip
        return True


class _Gone(MeshguardFailure):
    """404 or 409 (UID precondition): the pod is not the one we meant any more."""


def _call(
    credentials: ApiCredentials,
    method: str,
    path: str,
    *,
    timeout: float,
    body: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One API call; its answer as a JSON object (None when it is not one)."""
    access = ApiAccess(
        server=credentials.server, token=credentials.token, ca_pem=credentials.ca_pem,
        timeout=timeout,
    )  # fmt: skip
    try:
        answer = kube_api.request(
            access, method, path, what=f"{method} {path}", limit=MAX_LIST_BYTES, body=body
        )
    except kube_api.ApiError as exc:
        if method == "DELETE" and exc.status in (404, 409):
            raise _Gone(str(exc)) from None
        raise
    return kube_api.json_object(answer)


def _repair_failed(what: str, pod: repair.Broken, exc: MeshguardError) -> None:
    log.warning(
        "%s %s/%s: %s",
        what,
        pod.namespace,
        pod.name,
        exc,
        extra={"fields": {"event": "cni-repair-failed", "namespace": pod.namespace,
                          "name": pod.name, "reason": str(exc)}},
    )  # fmt: skip
