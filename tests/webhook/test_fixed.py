"""UPDATEs of a pod meshguard admitted, through the real HTTPS webhook: what must stay as
admitted (:mod:`meshguard.inject.fixed`) is refused with the field named, the rest passes —
and the webhook and the chart's ValidatingAdmissionPolicy (its CEL evaluated by cel-python)
decide every variant alike, so the guard holds where the policy is off (Kubernetes < 1.30,
``annotationGuard`` disabled or warning only)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard.inject.fixed import refused_changes
from tests.charts.test_guard import admits, admitted_pod
from tests.charts.test_guard_fixed import SWAPS, admitted, container, relabelled
from tests.support.pods import admission_update
from tests.support.samples import as_cni_mode, istio_pod
from tests.webhook.test_server import Served, served  # noqa: F401 - the fixture


def answer(served: Served, old: dict[str, Any], new: dict[str, Any], **kw: Any) -> Any:  # noqa: F811
    status, payload = served.request("POST", "/inject", admission_update(old, new, "u1", **kw))
    assert status == 200, payload
    return json.loads(payload)["response"]


def swapped(pod: dict[str, Any], name: str, swap: str) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    SWAPS[swap](container(new, name))
    return new


def test_updates_over_https(served: Served):  # noqa: F811
    pod = admitted_pod()
    refused = answer(served, pod, swapped(pod, "istio-init", "image"))
    assert refused["allowed"] is False and refused["status"]["code"] == 403
    message = refused["status"]["message"]
    assert "container 'istio-init'" in message and "delete the pod" in message
    relabel = relabelled(pod, "labels", "sidecar.istio.io/inject", "false")
    message = answer(served, pod, relabel)["status"]["message"]
    assert "label sidecar.istio.io/inject" in message
    unlabel = relabelled(pod, "labels", "meshguard.io/admitted", None)
    message = answer(served, pod, unlabel, subresource="status")["status"]["message"]
    assert "label meshguard.io/admitted" in message
    plain = istio_pod()
    claimed = relabelled(plain, "labels", "meshguard.io/admitted", "true")
    assert "did not admit" in answer(served, plain, claimed)["status"]["message"]
    app = copy.deepcopy(pod)
    container(app, "app")["image"] = "example.com/shop/app:1.1"
    assert answer(served, pod, app) == {"uid": "u1", "allowed": True}
    resized = copy.deepcopy(pod)
    container(resized, "istio-proxy")["resources"] = {"limits": {"cpu": "2"}}
    assert answer(served, pod, resized, subresource="resize")["allowed"] is True


def pods() -> dict[str, dict[str, Any]]:
    return {
        "init": admitted_pod(),
        "cni": admitted(as_cni_mode(istio_pod(native=False))),
        "native": admitted(istio_pod(native=True)),
        "plain": istio_pod(),
    }


@pytest.mark.parametrize("swap", sorted(SWAPS))
@pytest.mark.parametrize("kind", ["init", "cni", "native", "plain"])
def test_the_webhook_and_the_policy_agree_on_swaps(kind: str, swap: str):
    pod = pods()[kind]
    names = [c["name"] for c in (*pod["spec"].get("initContainers", []),
                                 *pod["spec"]["containers"])]  # fmt: skip
    for name in names:
        new = swapped(pod, name, swap)
        assert (not refused_changes(pod, new)) == admits(pod, new)[0], (kind, name, swap)


_KEYS = st.sampled_from([
    "sidecar.istio.io/inject", "istio.io/rev", "sidecar.istio.io/status", "meshguard.io/admitted",
    "meshguard.io/policy", "meshguard.io/mode", "meshguard.io/x", "app", "team",
])  # fmt: skip
_EDIT = st.tuples(
    st.sampled_from(["labels", "annotations"]), _KEYS, st.none() | st.sampled_from(["true", "x"])
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["init", "native", "plain"]), edits=st.lists(_EDIT, max_size=3))
def test_the_webhook_and_the_policy_agree_on_metadata_edits(
    kind: str, edits: list[tuple[str, str, str | None]]
):
    pod = pods()[kind]
    new = pod
    for where, key, value in edits:
        new = relabelled(new, where, key, value)
    assert (not refused_changes(pod, new)) == admits(pod, new)[0], edits
