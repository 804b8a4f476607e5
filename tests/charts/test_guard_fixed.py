"""The chart's guard keeps what meshguard admitted as it was admitted, and the pod within
meshguard's reviews: its CEL, as rendered by the real Helm engine, evaluated by cel-python
against old and new pods (``tests/charts/test_guard.py``'s harness).

- Istio's selection of an admitted pod (``sidecar.istio.io/inject``, ``istio.io/rev``, label
  or annotation; ``sidecar.istio.io/status``) cannot change: relabelling is how the
  ephemeral-container review was escaped (``kubectl label pod P
  sidecar.istio.io/inject=false``, then ``kubectl debug --profile=sysadmin``);
- the ``meshguard.io/admitted`` label, which meshguard's webhook keys its UPDATE and
  ``pods/ephemeralcontainers`` review on, cannot be removed, changed, nor added to a pod
  meshguard never admitted;
- the containers meshguard's guarantees rest on (istio-init / istio-validation,
  meshguard-init / meshguard-validation, istio-proxy as container or native sidecar) and
  meshguard's volume cannot change — Kubernetes lets a running pod's images change; the
  pod's own containers may.

Each variant fails on the guard before this change (it matched only the annotations).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from meshguard.inject.transform import InjectSettings, inject_pod
from tests.charts.test_guard import admits, admitted_pod
from tests.support.samples import as_cni_mode, istio_pod

LABEL = "meshguard.io/admitted"


def relabelled(pod: dict[str, Any], where: str, key: str, value: str | None) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    found = new["metadata"].setdefault(where, {})
    if value is None:
        found.pop(key, None)
    else:
        found[key] = value
    return new


def with_selection(where: str, key: str, value: str) -> dict[str, Any]:
    pod = admitted_pod()
    return relabelled(pod, where, key, value)


@pytest.mark.parametrize("where", ["labels", "annotations"])
@pytest.mark.parametrize(
    ("key", "before", "after"),
    [
        ("sidecar.istio.io/inject", None, "false"),
        ("sidecar.istio.io/inject", "true", "false"),
        ("sidecar.istio.io/inject", "true", None),
        ("istio.io/rev", "canary", None),
        ("istio.io/rev", "canary", "stable"),
        ("istio.io/rev", None, "canary"),
    ],
    ids=["inject-false-added", "inject-true-to-false", "inject-true-removed", "rev-removed",
         "rev-changed", "rev-added"],
)  # fmt: skip
def test_istio_selection_of_an_admitted_pod_cannot_change(
    where: str, key: str, before: str | None, after: str | None
):
    pod = admitted_pod() if before is None else with_selection(where, key, before)
    allowed, messages = admits(pod, relabelled(pod, where, key, after))
    assert not allowed
    assert any("Istio's selection of a pod meshguard admitted" in m for m in messages), messages


@pytest.mark.parametrize("value", [None, '{"initContainers":[],"containers":["app"]}'])
def test_istios_record_of_an_admitted_pod_cannot_change(value: str | None):
    pod = admitted_pod()
    allowed, messages = admits(
        pod, relabelled(pod, "annotations", "sidecar.istio.io/status", value)
    )
    assert not allowed and any("sidecar.istio.io/status" in m for m in messages)


def test_the_admitted_label_cannot_be_added_to_a_pod_meshguard_did_not_admit():
    plain = istio_pod()
    allowed, messages = admits(plain, relabelled(plain, "labels", LABEL, "true"))
    assert not allowed
    assert any("cannot be added to a\npod meshguard did not admit".replace("\n", " ")
               in m.replace("\n", " ") for m in messages), messages  # fmt: skip


def test_a_pod_known_only_by_its_label_keeps_it():
    """An admitted pod that somehow lost its status (another guard off, Warn mode) is still
    matched by its label: the label stays."""
    pod = admitted_pod()
    del pod["metadata"]["annotations"]["meshguard.io/status"]
    allowed, messages = admits(pod, relabelled(pod, "labels", LABEL, None))
    assert not allowed and any("meshguard.io/admitted label" in m for m in messages)


def admitted(pod: dict[str, Any]) -> dict[str, Any]:
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    return pod


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [
        c
        for c in (*pod["spec"].get("initContainers", []), *pod["spec"]["containers"])
        if c["name"] == name
    ]
    assert len(found) == 1, f"{name} not in the pod"
    return found[0]


Edit = Callable[[dict[str, Any]], None]

SWAPS: dict[str, Edit] = {
    "image": lambda c: c.update(image="attacker.example/evil:1"),
    "command": lambda c: c.update(command=["/bin/true"]),
    "args": lambda c: c.update(args=["--noop"]),
    "runAsUser": lambda c: c.setdefault("securityContext", {}).update(runAsUser=4242),
    "runAsGroup": lambda c: c.setdefault("securityContext", {}).update(runAsGroup=4242),
    "capabilities": lambda c: c.setdefault("securityContext", {}).update(
        capabilities={"add": ["NET_ADMIN"]}
    ),
}


@pytest.mark.parametrize("swap", sorted(SWAPS))
@pytest.mark.parametrize(
    ("mode", "name"),
    [
        ("init", "istio-init"),
        ("init", "meshguard-init"),
        ("init", "istio-proxy"),
        ("cni", "istio-validation"),
        ("cni", "meshguard-validation"),
        ("native", "istio-proxy"),
    ],
)
def test_what_meshguard_rests_on_cannot_be_swapped_after_admission(mode: str, name: str, swap: str):
    if mode == "init":
        pod = admitted_pod()
    elif mode == "cni":
        pod = admitted(as_cni_mode(istio_pod(native=False)))
    else:
        pod = admitted(istio_pod(native=True))
    new = copy.deepcopy(pod)
    SWAPS[swap](container(new, name))
    allowed, messages = admits(pod, new)
    assert not allowed
    assert any("what was admitted\nis what runs".replace("\n", " ") in m.replace("\n", " ")
               for m in messages), messages  # fmt: skip


def test_meshguards_volume_cannot_change():
    pod = admitted_pod()
    new = copy.deepcopy(pod)
    volume = next(v for v in new["spec"]["volumes"] if v["name"] == "meshguard-ruleset")
    volume["downwardAPI"] = {"items": []}
    allowed, messages = admits(pod, new)
    assert not allowed and any("meshguard-ruleset volume" in m for m in messages)


def test_the_pods_own_containers_and_its_status_may_change():
    pod = admitted_pod()
    new = copy.deepcopy(pod)
    container(new, "app")["image"] = "example.com/shop/app:1.1"
    new["status"] = {"phase": "Running"}
    new["metadata"].setdefault("labels", {})["team"] = "payments"
    assert admits(pod, new) == (True, [])
