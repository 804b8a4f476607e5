"""Where the authz server finds each pod's policy: pod files, or a Kubernetes watch cache.

Both stores answer :meth:`PolicyStore.get` from memory, so a Check never waits on a file or
on the API server. The Kubernetes store lists the pods meshguard injected (those carrying
``meshguard.io/status``), then watches them; a broken watch keeps the last known policies in
service while it reconnects with capped exponential backoff, and a periodic full relist
repairs anything a missed event left behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from meshguard import names
from meshguard.authz.decision import PodPolicy
from meshguard.errors import MalformedInputError, MeshguardError
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import read_pod

log = logging.getLogger(__name__)


class PolicyStore(Protocol):
    def get(self, key: str) -> PodPolicy | None: ...


def pod_key(namespace: str | None, name: str) -> str:
    return f"{namespace or 'default'}/{name}"


def policy_of(pod: Mapping[str, Any]) -> PodPolicy:
    """A pod (dict, as in YAML or the API) -> its PodPolicy; MeshguardError if unusable."""
    metadata = pod.get("metadata") or {}
    view = read_pod(metadata=metadata, spec=pod.get("spec") or {})
    ports = {p.port: c.name for c in view.containers for p in c.ports}
    return PodPolicy.from_pod(
        key=pod_key(view.namespace, view.name), annotations=view.annotations, ports=ports
    )


class StaticStore:
    """Policies read once from pod manifests (standalone mode, the sandbox, the tests)."""

    def __init__(self, policies: Iterable[PodPolicy]) -> None:
        self._policies = {p.key: p for p in policies}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> StaticStore:
        policies = []
        for path in paths:
            for template in pod_templates(read_documents(path)):
                if names.STATUS not in (template.metadata.get("annotations") or {}):
                    raise MalformedInputError(
                        f"{path}: {template.label} has no {names.STATUS} annotation: run it"
                        " through `meshguard inject` first"
                    )
                policies.append(policy_of({"metadata": template.metadata, "spec": template.spec}))
        return cls(policies)

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

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

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

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
        self._policies = fresh  # one reference swap: readers never see a partial cache
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
        else:
            policies[key] = policy
        self._policies = policies

    @staticmethod
    def _policy_or_none(pod: Mapping[str, Any]) -> PodPolicy | None:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if names.STATUS not in annotations:
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
