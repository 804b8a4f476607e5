"""Watching the denials of every meshguard pod on the node, CNI mode or not.

In init-container mode no CNI call tells the agent about a pod. :class:`NodePods` instead
lists the node's pods from the API server (``fieldSelector=spec.nodeName=<node>``, every
:data:`SYNC_SECONDS`), finds each one's network namespace through its processes' cgroups
(:mod:`meshguard.cni.podnetns`, as Istio's CNI node agent does), verifies its admitted
record (:func:`meshguard.cni.watch.verified_view`: labels come only from what the webhook
signed) and hands it to the agent's :class:`~meshguard.cni.watch.DenialWatch`, keyed by the
pod's UID. A pod gone from the list (or whose namespace is gone) is unwatched. Pods with
``hostNetwork`` are skipped: their netfilter is the node's. The sync itself
(:meth:`NodePods.sync`) is pure of the API: it takes the listed pods.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from meshguard import kube_api
from meshguard.attestation import AttestationError, TrustedKeys
from meshguard.cni import podnetns
from meshguard.cni.watch import DenialWatch, verified_view
from meshguard.errors import MeshguardError
from meshguard.kube_api import ApiAccess

log = logging.getLogger(__name__)

SYNC_SECONDS: Final = 10.0
MAX_LIST_BYTES: Final = 64 * 1024 * 1024
_KEY_PREFIX: Final = "pod:"


class NodePods:
    """Keeps the watch's set of pods equal to the node's verified meshguard pods."""

    def __init__(
        self,
        *,
        watch: DenialWatch,
        trusted: TrustedKeys,
        proc: Path = Path("/proc"),
    ) -> None:
        self._watch = watch
        self._trusted = trusted
        self._proc = proc
        self._refused: set[str] = set()  # pod UIDs whose record did not verify (logged once)

    def sync(self, pods: Sequence[Mapping[str, Any]]) -> set[str]:
        """Watch each of ``pods`` (the node's) meshguard admitted and whose namespace is
        found; unwatch the rest. Returns the UIDs watched."""
        namespaces = podnetns.scan(self._proc)
        wanted: set[str] = set()
        watched = {key for key in self._watch.watch_keys() if key.startswith(_KEY_PREFIX)}
        for pod in pods:
            metadata = pod.get("metadata") or {}
            spec = pod.get("spec") or {}
            uid = str(metadata.get("uid", ""))
            found = namespaces.get(uid)
            if not uid or found is None or spec.get("hostNetwork"):
                continue
            key = _KEY_PREFIX + uid
            if key in watched:
                wanted.add(key)
                continue
            try:
                view = verified_view(pod, trusted=self._trusted)
            except AttestationError as exc:
                if uid not in self._refused:
                    self._refused.add(uid)
                    fields = {"event": "denial-watch-refused", "reason": str(exc)}
                    log.warning("denial watch refused: %s", exc, extra={"fields": fields})
                continue
            if view is not None and self._watch.watch(key=key, view=view, netns=found.path):
                wanted.add(key)
        for key in watched - wanted:
            self._watch.unwatch(key=key)
        # bounded by the node's pods: a refused pod that is gone is forgotten
        self._refused &= {str((p.get("metadata") or {}).get("uid", "")) for p in pods}
        return {key.removeprefix(_KEY_PREFIX) for key in wanted}

    def run(
        self,
        *,
        node: str,
        access: Callable[[], ApiAccess],
        stop: threading.Event,
        interval: float = SYNC_SECONDS,
    ) -> None:
        """Sync every ``interval`` seconds until ``stop``; a failed list is logged and retried."""
        while not stop.is_set():
            try:
                self.sync(list_node_pods(access(), node=node))
            except MeshguardError as exc:
                fields = {"event": "denial-sync-failed", "reason": str(exc)}
                log.warning("cannot list the node's pods: %s", exc, extra={"fields": fields})
            stop.wait(interval)


def list_node_pods(access: ApiAccess, *, node: str) -> list[Mapping[str, Any]]:
    """The pods scheduled to ``node`` (one LIST)."""
    selector = urllib.parse.quote(f"spec.nodeName={node}", safe="")
    body = kube_api.request(
        access, "GET", f"/api/v1/pods?fieldSelector={selector}", what=f"the pods of node {node}",
        limit=MAX_LIST_BYTES,
    )  # fmt: skip
    document = kube_api.json_object(body)
    items = document.get("items") if document else None
    if not isinstance(items, list):
        raise kube_api.ApiError(f"the pods of node {node}: the answer is not a PodList")
    return [item for item in items if isinstance(item, Mapping)]
