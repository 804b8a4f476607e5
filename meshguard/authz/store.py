"""Where the authz server finds each pod's policy: pod files, or a Kubernetes watch cache.

Both stores answer :meth:`PolicyStore.get` from memory, so a Check never waits on a file or
on the API server. The Kubernetes store lists the pods meshguard admitted (the label
``meshguard.io/admitted=true``, selected by the API server, in pages), then watches them from
the list's resourceVersion with bookmarks; a watch that ends or breaks resumes from the last
resourceVersion seen, and only an expired one (410 Gone) lists again. While it reconnects
(capped exponential backoff) the last known policies stay in service.

Both serve only what the webhook admitted (:func:`policy_of`): a pod's live ``policy`` and
``mode`` annotations never widen it; an edit is logged once per pod (``admitted-drift``), and
a pod whose admitted record is missing or does not verify is refused (``admitted-refused``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from meshguard import annotation_keys
from meshguard.admitted import RECORD as ADMITTED_RECORD
from meshguard.attestation import AttestationError, TrustedKeys, verify_pod
from meshguard.authz.decision import PodPolicy
from meshguard.authz.kube import PodPage, ResourceExpired, WatchEvent
from meshguard.errors import MalformedInputError, MeshguardError
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import read_pod
from meshguard.status import MalformedStatusError, PodStatus, read_status

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StoreStats:
    """What the metrics say about a store."""

    pods: int
    #: time.time() of the last complete list or applied watch event (None: never synced).
    synced_at: float | None
    relists: int = 0
    watch_restarts: int = 0


class PolicyStore(Protocol):
    def get(self, key: str) -> PodPolicy | None: ...

    def is_synced(self) -> bool:
        """True once the store holds a complete view (a Check may be answered from it)."""
        ...

    def stats(self) -> StoreStats: ...


def pod_key(namespace: str | None, name: str) -> str:
    return f"{namespace or 'default'}/{name}"


def policy_of(pod: Mapping[str, Any], *, trusted: TrustedKeys) -> PodPolicy:
    """A pod (dict, as in YAML or the API) -> its PodPolicy; MeshguardError if unusable.

    Only what meshguard's webhook admitted and signed is served: a pod whose
    ``meshguard.io/attestation`` does not verify with a ``trusted`` key for this pod (checked
    before anything of its policy is parsed), whose status holds no admitted record (key
    ``admitted``), or one that does not verify, is refused (every request to it denied,
    with the reason); live ``policy``/``mode`` edits are ignored (``drift``).
    """
    metadata = pod.get("metadata") or {}
    view = read_pod(metadata=metadata, spec=pod.get("spec") or {})
    ports = {p.port: c.name for c in view.containers for p in c.ports}
    key = pod_key(view.namespace, view.name)
    account = str((pod.get("spec") or {}).get("serviceAccountName") or "default")
    try:
        verify_pod(trusted, metadata=metadata, spec=pod.get("spec") or {}, where=f"pod {key}")
    except AttestationError as exc:
        return PodPolicy.refusing(key=key, reason=str(exc), ports=ports, service_account=account)
    status = _status_or_none(view.annotations.get(annotation_keys.STATUS))
    if status is None or status.admitted is None:
        # Not admitted: its live policy is never parsed (whoever wrote the pod chose its
        # text, and the pod is refused whatever it says). An admitted record is bounded
        # like the annotation (meshguard.policy's limits, checked before a rule is built).
        return PodPolicy.refusing(
            key=key,
            reason=f"no admitted policy record ({ADMITTED_RECORD}): the pod was admitted by"
            " an older meshguard, or its status was edited; delete the pod so that the"
            " webhook admits it again",
            sources=status.source_containers() if status is not None else {},
            ports=ports,
            service_account=account,
        )
    policy = PodPolicy.from_pod(key=key, annotations=view.annotations, ports=ports)
    return dataclasses.replace(policy, service_account=account)


def _status_or_none(text: str | None) -> PodStatus | None:
    """The pod's status; None when it has none or it does not read (the pod is refused)."""
    try:
        return read_status(text)
    except MalformedStatusError:
        return None


class AdmissionReport:
    """Logs, once per pod, that its live annotations differ from what was admitted, or that
    its admitted record was refused; counts both (``drifted``, ``refused``)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, ...]] = {}
        self.drifted = 0
        self.refused = 0

    def note(self, policy: PodPolicy, *, uid: str = "") -> None:
        if not policy.drift and not policy.refused:
            self._seen.pop(policy.key, None)
            return
        signature = (uid, policy.refused, *policy.drift)
        if self._seen.get(policy.key) == signature:
            return
        self._seen[policy.key] = signature
        if policy.refused:
            self.refused += 1
            log.warning(
                "pod %s: admitted policy record refused, every request to it is denied: %s",
                policy.key,
                policy.refused,
                extra={
                    "fields": {
                        "event": "admitted-refused",
                        "pod": policy.key,
                        "reason": policy.refused,
                    }
                },
            )
            return
        self.drifted += 1
        log.warning(
            "pod %s: meshguard annotations changed after admission, enforcing what was"
            " admitted (%s mode): %s",
            policy.key,
            policy.mode.value,
            "; ".join(policy.drift),
            extra={
                "fields": {
                    "event": "admitted-drift",
                    "pod": policy.key,
                    "enforced_mode": policy.mode.value,
                    "drift": list(policy.drift),
                }
            },
        )

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._seen.pop(key, None)

    def keep_only(self, keys: Iterable[str]) -> None:
        wanted = set(keys)
        self._seen = {k: v for k, v in self._seen.items() if k in wanted}


class StaticStore:
    """Policies read once from pod manifests (standalone mode, the sandbox, the tests)."""

    def __init__(self, policies: Iterable[PodPolicy]) -> None:
        self._policies = {p.key: p for p in policies}
        self._loaded_at = time.time()
        self.report = AdmissionReport()
        for policy in self._policies.values():
            self.report.note(policy)

    @classmethod
    def from_files(cls, paths: Iterable[Path], *, trusted: TrustedKeys) -> StaticStore:
        policies = []
        for path in paths:
            for template in pod_templates(read_documents(path)):
                if annotation_keys.STATUS not in (template.metadata.get("annotations") or {}):
                    raise MalformedInputError(
                        f"{path}: {template.label} has no"
                        f" {annotation_keys.STATUS} annotation: run it"
                        " through `meshguard inject` first"
                    )
                pod = {"metadata": template.metadata, "spec": template.spec}
                policies.append(policy_of(pod, trusted=trusted))
        return cls(policies)

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

    def is_synced(self) -> bool:
        return True

    def stats(self) -> StoreStats:
        return StoreStats(pods=len(self._policies), synced_at=self._loaded_at)

    def keys(self) -> list[str]:
        return sorted(self._policies)


class PodSource(Protocol):
    """The Kubernetes API as the store needs it (:class:`~meshguard.authz.kube.HttpPodSource`)."""

    def list(self) -> Iterable[PodPage]: ...

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]: ...


@dataclass(frozen=True)
class Snapshot:
    """A complete view (after a LIST), with the watch's figures."""

    policies: Mapping[str, PodPolicy]
    stats: StoreStats


@dataclass(frozen=True)
class Update:
    """One pod's policy changed (None: the pod is gone), or only the figures (key "")."""

    key: str
    policy: PodPolicy | None
    stats: StoreStats


Change = Snapshot | Update


class KubernetesStore:
    """A watch cache of the admitted pods' policies, kept current in a background thread.

    LIST (paginated, labelSelector), then WATCH from the list's resourceVersion with
    bookmarks; a watch the server ends or that breaks is resumed from the last
    resourceVersion seen; only 410 Gone lists again. Subscribers (:meth:`subscribe`: the
    ``--workers`` feed) get every change, starting with the current view.
    """

    def __init__(
        self,
        source: PodSource,
        *,
        trusted: TrustedKeys,
        watch_seconds: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self._source = source
        self._trusted = trusted
        self._policies: dict[str, PodPolicy] = {}
        #: key -> "uid/resourceVersion" of the pod each cached policy was built from.
        self._built_from: dict[str, str] = {}
        self._watch_seconds = watch_seconds
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # publishing and subscribing: no change missed
        self._subscribers: list[Callable[[Change], None]] = []
        self._version = ""
        self.synced = threading.Event()
        self.reconnects = 0
        self.relists = 0
        self.expired = 0
        self._synced_at: float | None = None
        self.report = AdmissionReport()

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

    def is_synced(self) -> bool:
        return self.synced.is_set()

    @property
    def resource_version(self) -> str:
        return self._version

    def keys(self) -> list[str]:
        return sorted(self._policies)

    def stats(self) -> StoreStats:
        return StoreStats(
            pods=len(self._policies),
            synced_at=self._synced_at,
            relists=self.relists,
            watch_restarts=self.reconnects,
        )

    def subscribe(self, subscriber: Callable[[Change], None]) -> None:
        """Call ``subscriber`` with every change (from the watch thread), the current view
        first if the store has synced."""
        with self._lock:
            self._subscribers.append(subscriber)
            if self.is_synced():
                subscriber(Snapshot(dict(self._policies), self.stats()))

    def unsubscribe(self, subscriber: Callable[[Change], None]) -> None:
        """No more changes for ``subscriber`` (a worker that is gone)."""
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not subscriber]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="meshguard-pod-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def run(self) -> None:
        """List, then watch (resuming from the last resourceVersion) until 410 Gone; repeat.
        Failures back off (capped, doubling); the cached view stays in service."""
        delay = self._backoff_initial
        listed = False
        failures = 0  # in a row: the first 410 lists again at once, any further one waits
        while not self._stop.is_set():
            try:
                if not listed:
                    self._relist()
                    listed, failures, delay = True, 0, self._backoff_initial
                self._follow()
                failures, delay = 0, self._backoff_initial
                continue
            except ResourceExpired as exc:
                self.expired += 1
                listed = False
                log.info(
                    "pod watch expired (410 Gone), listing again: %s",
                    exc,
                    extra={"fields": {"event": "watch-expired", "version": self._version}},
                )
            except Exception as exc:  # any API failure: keep serving, retry later
                log.warning(
                    "pod watch broken, serving cached policies, retrying in %.1fs: %s",
                    delay,
                    exc,
                    extra={"fields": {"event": "watch-broken", "retry_in": delay}},
                )
                failures += 1  # a broken connection always waits
            self.reconnects += 1
            if failures and self._sleep(delay):
                return
            if failures:
                delay = min(delay * 2, self._backoff_max)
            failures += 1

    def _relist(self) -> None:
        fresh: dict[str, PodPolicy] = {}
        built_from: dict[str, str] = {}
        version = ""
        for page in self._source.list():
            version = page.resource_version
            for pod in page.pods:
                key, origin = _key(pod), _origin(pod)
                kept = self._policies.get(key)
                if kept is not None and self._built_from.get(key) == origin:
                    fresh[key], built_from[key] = kept, origin  # unchanged since: not rebuilt
                    continue
                policy = self._policy_or_none(pod)
                if policy is not None:
                    fresh[policy.key], built_from[policy.key] = policy, origin
                    self.report.note(policy, uid=_uid(pod))
        self.report.keep_only(fresh)
        with self._lock:
            self._policies = fresh  # one reference swap: readers never see a partial cache
            self._built_from = built_from
            self._version = version
            self.relists += 1
            self._synced_at = time.time()
            self.synced.set()
            self._publish(Snapshot(dict(fresh), self.stats()))
        log.info(
            "pods listed",
            extra={"fields": {"event": "relisted", "pods": len(fresh), "version": version}},
        )

    def _follow(self) -> None:
        """Apply one watch's events; bookmarks only advance the resourceVersion."""
        for event in self._source.watch(self._version, self._watch_seconds):
            if self._stop.is_set():
                return
            with self._lock:
                if event.kind != "BOOKMARK":
                    self._apply(event)
                self._version = event.resource_version or self._version
                self._synced_at = time.time()
                if event.kind == "BOOKMARK":
                    self._publish(Update("", None, self.stats()))

    def _apply(self, event: WatchEvent) -> None:
        key = _key(event.pod)
        policy = None if event.kind == "DELETED" else self._policy_or_none(event.pod)
        if policy is None:  # one dict operation each: atomic for readers
            self._policies.pop(key, None)
            self._built_from.pop(key, None)
            self.report.forget([key])
        else:
            self._policies[key] = policy
            self._built_from[key] = _origin(event.pod)
            self.report.note(policy, uid=_uid(event.pod))
        self._publish(Update(key, policy, self.stats()))

    def _publish(self, change: Change) -> None:
        for subscriber in self._subscribers:
            subscriber(change)

    def _policy_or_none(self, pod: Mapping[str, Any]) -> PodPolicy | None:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if annotation_keys.STATUS not in annotations:
            return None
        try:
            return policy_of(pod, trusted=self._trusted)
        except MeshguardError as exc:
            log.warning(
                "pod policy unusable, its requests will be denied: %s",
                exc,
                extra={"fields": {"event": "bad-policy"}},
            )
            return None


def _key(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return pod_key(metadata.get("namespace"), str(metadata.get("name") or ""))


def _uid(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid") or "")


def _origin(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('uid') or ''}/{metadata.get('resourceVersion') or ''}"
