"""Where the authz server finds each pod's policy: pod files, or a Kubernetes watch cache.

Both stores answer :meth:`PolicyStore.get` from memory, so a Check never waits on a file or
on the API server. The Kubernetes store lists the pods meshguard injected (those carrying
``meshguard.io/status``), then watches them; a broken watch keeps the last known policies in
service while it reconnects with capped exponential backoff, and a periodic full relist
repairs anything a missed event left behind.

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
from meshguard.authz.decision import PodPolicy
from meshguard.errors import MalformedInputError, MeshguardError
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import read_pod

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


def policy_of(pod: Mapping[str, Any]) -> PodPolicy:
    """A pod (dict, as in YAML or the API) -> its PodPolicy; MeshguardError if unusable.

    Only what was admitted is served: a pod whose status holds no admitted record (key
    ``admitted``), or one that does not verify, is refused (every request
    to it denied, with the reason); live ``policy``/``mode`` edits are ignored (``drift``).
    """
    metadata = pod.get("metadata") or {}
    view = read_pod(metadata=metadata, spec=pod.get("spec") or {})
    ports = {p.port: c.name for c in view.containers for p in c.ports}
    key = pod_key(view.namespace, view.name)
    policy = PodPolicy.from_pod(key=key, annotations=view.annotations, ports=ports)
    account = str((pod.get("spec") or {}).get("serviceAccountName") or "default")
    if policy.admitted or policy.refused:
        return dataclasses.replace(policy, service_account=account)
    return PodPolicy.refusing(
        key=key,
        reason=f"no admitted policy record ({ADMITTED_RECORD}): the pod was admitted by an"
        " older meshguard, or its status was edited; delete the pod so that the webhook"
        " admits it again",
        sources=policy.sources,
        ports=ports,
        service_account=account,
    )


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
    def from_files(cls, paths: Iterable[Path]) -> StaticStore:
        policies = []
        for path in paths:
            for template in pod_templates(read_documents(path)):
                if annotation_keys.STATUS not in (template.metadata.get("annotations") or {}):
                    raise MalformedInputError(
                        f"{path}: {template.label} has no"
                        f" {annotation_keys.STATUS} annotation: run it"
                        " through `meshguard inject` first"
                    )
                policies.append(policy_of({"metadata": template.metadata, "spec": template.spec}))
        return cls(policies)

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

    def is_synced(self) -> bool:
        return True

    def stats(self) -> StoreStats:
        return StoreStats(pods=len(self._policies), synced_at=self._loaded_at)

    def keys(self) -> list[str]:
        return sorted(self._policies)


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # ADDED, MODIFIED, DELETED
    pod: Mapping[str, Any]


class PodSource(Protocol):
    """The Kubernetes API as the store needs it (a fake one in unit tests)."""

    def list(self) -> tuple[list[Mapping[str, Any]], str]: ...

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]: ...


class KubernetesStore:
    """A watch cache of the injected pods' policies, kept current in a background thread."""

    def __init__(
        self,
        source: PodSource,
        *,
        resync_seconds: float = 300.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self._source = source
        self._policies: dict[str, PodPolicy] = {}
        self._resync = resync_seconds
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()
        self.reconnects = 0
        self.relists = 0
        self._synced_at: float | None = None
        self.report = AdmissionReport()

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

    def is_synced(self) -> bool:
        return self.synced.is_set()

    def stats(self) -> StoreStats:
        return StoreStats(
            pods=len(self._policies),
            synced_at=self._synced_at,
            relists=self.relists,
            watch_restarts=self.reconnects,
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="meshguard-pod-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def run(self) -> None:
        """List, then watch until the resync period ends or the watch breaks; repeat."""
        delay = self._backoff_initial
        while not self._stop.is_set():
            try:
                version = self._relist()
                self._follow(version)
                delay = self._backoff_initial
            except Exception as exc:  # any API failure: keep serving, retry later
                self.reconnects += 1
                log.warning(
                    "pod watch broken, serving cached policies, retrying in %.1fs: %s",
                    delay,
                    exc,
                    extra={"fields": {"event": "watch-broken", "retry_in": delay}},
                )
                if self._sleep(delay):
                    return
                delay = min(delay * 2, self._backoff_max)

    def _relist(self) -> str:
        pods, version = self._source.list()
        fresh: dict[str, PodPolicy] = {}
        for pod in pods:
            policy = self._policy_or_none(pod)
            if policy is not None:
                fresh[policy.key] = policy
                self.report.note(policy, uid=_uid(pod))
        self.report.keep_only(fresh)
        self._policies = fresh  # one reference swap: readers never see a partial cache
        self.relists += 1
        self._synced_at = time.time()
        self.synced.set()
        log.info("pods listed", extra={"fields": {"event": "relisted", "pods": len(fresh)}})
        return version

    def _follow(self, version: str) -> None:
        for event in self._source.watch(version, int(self._resync)):
            if self._stop.is_set():
                return
            self._apply(event)

    def _apply(self, event: WatchEvent) -> None:
        metadata = event.pod.get("metadata") or {}
        key = pod_key(metadata.get("namespace"), str(metadata.get("name") or ""))
        policies = dict(self._policies)
        policy = None if event.kind == "DELETED" else self._policy_or_none(event.pod)
        if policy is None:
            policies.pop(key, None)
            self.report.forget([key])
        else:
            policies[key] = policy
            self.report.note(policy, uid=_uid(event.pod))
        self._policies = policies

    @staticmethod
    def _policy_or_none(pod: Mapping[str, Any]) -> PodPolicy | None:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if annotation_keys.STATUS not in annotations:
            return None
        try:
            return policy_of(pod)
        except MeshguardError as exc:
            log.warning(
                "pod policy unusable, its requests will be denied: %s",
                exc,
                extra={"fields": {"event": "bad-policy"}},
            )
            return None


def _uid(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid") or "")


class KubernetesPodSource:
    """:class:`PodSource` over the ``kubernetes`` client (in-cluster or kubeconfig)."""

    def __init__(self) -> None:
        from kubernetes import client, config  # noqa: PLC0415 - only in cluster mode

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._api = client.CoreV1Api()
        self._serialize = client.ApiClient().sanitize_for_serialization

    def list(self) -> tuple[list[Mapping[str, Any]], str]:
        result = self._api.list_pod_for_all_namespaces(_request_timeout=30)
        pods = [self._serialize(pod) for pod in result.items]
        return pods, str(result.metadata.resource_version)

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        from kubernetes import watch  # noqa: PLC0415

        stream = watch.Watch().stream(
            self._api.list_pod_for_all_namespaces,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
        )
        for event in stream:
            if event["type"] == "ERROR":
                raise MalformedInputError(f"watch error: {event.get('raw_object')}")
            yield WatchEvent(kind=event["type"], pod=self._serialize(event["object"]))
