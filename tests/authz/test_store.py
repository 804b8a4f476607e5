"""Policy stores: pod files, and the Kubernetes watch cache against a scripted source (the
real HTTP API client against a scripted API server: test_watch_api.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.authz.kube import PodPage, ResourceExpired, WatchEvent
from meshguard.authz.store import KubernetesStore, StaticStore
from meshguard.errors import MalformedInputError
from meshguard.inject.transform import InjectSettings, inject_pod
from tests.support.keys import SIGNER, TRUSTED

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def injected_example(name: str = "shop", **annotations: str) -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["name"] = name
    pod["metadata"]["annotations"].update(annotations)
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def test_static_store_reads_injected_pod_files(tmp_path: Path):
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(injected_example()))
    store = StaticStore.from_files([path], trusted=TRUSTED)
    assert store.keys() == ["demo/shop"]
    policy = store.get("demo/shop")
    assert policy is not None
    assert policy.sources["127.0.100.1"] == "app"
    assert policy.sources["fd6d:6775::3"] == "log-shipper"
    assert policy.ports[9090] == "app"


def test_static_store_refuses_pods_meshguard_did_not_inject():
    with pytest.raises(MalformedInputError, match=r"has no meshguard\.io/status annotation"):
        StaticStore.from_files([EXAMPLE], trusted=TRUSTED)


class FakeApi:
    """A scripted Kubernetes API: lists, then watch streams; a step may raise to break it."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[str] = []
        self.done = threading.Event()

    def list(self) -> Iterator[PodPage]:
        self.calls.append("list")
        step = self._next()
        if isinstance(step, Exception):
            raise step
        pods, version = step
        yield PodPage(pods, version)

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        self.calls.append(f"watch@{resource_version}")
        step = self._next()
        for event in step:
            if isinstance(event, Exception):
                raise event
            yield event

    def _next(self) -> Any:
        if not self.script:
            self.done.set()
            raise ConnectionError("script over")
        return self.script.pop(0)


def versioned(pod: dict[str, Any], version: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(pod))
    copy["metadata"]["resourceVersion"] = version
    return copy


def bookmark(version: str) -> WatchEvent:
    return WatchEvent("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": version}})


def test_watch_cache_resumes_from_the_last_version_and_lists_again_only_on_410():
    web, other = injected_example("web"), injected_example("other")
    plain = yaml.safe_load(EXAMPLE.read_text())  # not injected: not cached
    # Re-admitted in audit mode (an edit of the live annotation would not count: see below).
    changed = injected_example("web", **{"meshguard.io/mode": "audit"})
    seen: list[dict[str, str]] = []
    store: KubernetesStore

    def snapshot(_: float) -> bool:
        policies = {key: store.get(key) for key in ("demo/web", "demo/other")}
        seen.append({key: p.mode.value for key, p in policies.items() if p is not None})
        return api.done.is_set()

    api = FakeApi(
        [
            ([versioned(web, "8"), plain], "10"),
            [
                WatchEvent("ADDED", versioned(other, "11")),
                bookmark("15"),
                WatchEvent("MODIFIED", versioned(changed, "16")),
                ConnectionError("watch broke"),
            ],
            ConnectionError("API down"),  # the watch cannot resume: the cache keeps serving
            [bookmark("18")],  # resumed where it was; ended by the server: watch again
            [ResourceExpired("410 Gone")],  # too old: list again (at once)
            ([versioned(changed, "16")], "20"),  # 'other' vanished while we were away
            [WatchEvent("DELETED", versioned(changed, "21"))],
        ]
    )
    store = KubernetesStore(trusted=TRUSTED, source=api, sleep=snapshot, backoff_initial=0.01)
    store.run()
    assert api.calls == [
        "list", "watch@10", "watch@16", "watch@16", "watch@18", "list", "watch@20", "watch@21",
    ]  # fmt: skip
    # After the broken watch and during the API outage, the cache kept its policies.
    assert seen[0] == {"demo/web": "audit", "demo/other": "enforce"}
    assert seen[1] == {"demo/web": "audit", "demo/other": "enforce"}
    assert store.get("demo/web") is None  # deleted by the last event
    assert store.get("demo/other") is None  # gone at the relist
    assert (store.relists, store.expired, store.reconnects) == (2, 1, 4)


def test_a_relist_keeps_the_policies_of_unchanged_pods():
    web = versioned(injected_example("web"), "5")
    api = FakeApi([([web], "10"), [ResourceExpired("410")], ([web], "30")])
    first: list[object] = []
    store = KubernetesStore(
        trusted=TRUSTED, source=api, sleep=lambda _: api.done.is_set(), backoff_initial=0.01
    )
    store.subscribe(lambda change: first.append(store.get("demo/web")))
    store.run()
    assert store.relists == 2
    assert first[0] is store.get("demo/web")  # the same object: not parsed again


def test_watch_cache_serves_what_was_admitted_whatever_the_live_annotations(caplog):
    """An edit of a running pod's mode/policy (MODIFIED) changes nothing served, is logged
    once for the pod (not again at the relist), and a tampered record refuses the pod."""
    caplog.set_level("WARNING", logger="meshguard.authz.store")
    web = injected_example("web")
    edited = json.loads(json.dumps(web))
    edited["metadata"]["annotations"]["meshguard.io/mode"] = "audit"
    edited["metadata"]["annotations"]["meshguard.io/policy"] = "defaultAction: allow"
    forged = json.loads(json.dumps(edited))
    status = json.loads(forged["metadata"]["annotations"]["meshguard.io/status"])
    status["admitted"]["mode"] = "audit"
    forged["metadata"]["annotations"]["meshguard.io/status"] = json.dumps(status)
    seen: list[tuple[str, str, str]] = []
    store: KubernetesStore

    def snapshot(_: float) -> bool:
        policy = store.get("demo/web")
        assert policy is not None
        seen.append((policy.mode.value, policy.policy.default_action.value, policy.refused))
        return api.done.is_set()

    api = FakeApi(
        [
            ([web], "1"),
            [WatchEvent("MODIFIED", edited), ConnectionError("watch broke")],
            [ResourceExpired("410")],  # resumed too late: list again
            ([edited], "2"),
            [WatchEvent("MODIFIED", forged), ConnectionError("watch broke")],
        ]
    )
    store = KubernetesStore(trusted=TRUSTED, source=api, sleep=snapshot, backoff_initial=0.01)
    store.run()
    assert seen[0] == seen[1] == ("enforce", "deny", "")  # the edit, then the 410's wait
    assert seen[2][:2] == ("enforce", "deny")
    assert "not the text meshguard's webhook signed" in seen[2][2]
    events = [r.fields["event"] for r in caplog.records if hasattr(r, "fields")]
    assert events.count("admitted-drift") == 1
    assert events.count("admitted-refused") == 1
    assert (store.report.drifted, store.report.refused) == (1, 1)
