"""Which pods the node agent repairs: exactly this node's pods meshguard admitted in CNI mode
whose meshguard-validation failed for want of the node's rules — never any other pod."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshguard.cni import repair
from meshguard.cni.repair import Action, assess, deletion_budget

NODE = "node-a"
FAILED = {"terminated": {"exitCode": 1, "reason": "Error"}}


def pod(
    *,
    validation: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
    restarts: int = 0,
) -> dict[str, Any]:
    """An injected CNI-mode pod on NODE, owned by a ReplicaSet, whose validation is in the
    state ``validation`` (default: exited 1)."""
    status: dict[str, Any] = {
        "name": "meshguard-validation",
        "state": FAILED if validation is None else validation,
        "restartCount": restarts,
    }
    if last is not None:
        status["lastState"] = last
    return {
        "kind": "Pod",
        "metadata": {
            "namespace": "shop",
            "name": "web-7d4b9-x2x",
            "uid": "uid-1",
            "labels": {"app": "web", "meshguard.io/admitted": "true"},
            "annotations": {"meshguard.io/status": "{}", "meshguard.io/ruleset": "{}"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d4b9",
                    "uid": "rs",
                    "controller": True,
                },
            ],
        },
        "spec": {
            "nodeName": NODE,
            "initContainers": [{"name": "istio-validation"}, {"name": "meshguard-validation"}],
            "containers": [{"name": "app"}, {"name": "istio-proxy"}],
        },
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {"name": "istio-validation", "state": {"terminated": {"exitCode": 0}}},
                status,
            ],
        },
    }


def changed(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` set to ``value`` (None: removed)."""
    document = copy.deepcopy(base)
    *parents, last = path.split(".")
    target = document
    for key in parents:
        target = target[key]
    if value is None:
        target.pop(last, None)
    else:
        target[last] = value
    return document


def test_a_pod_whose_validation_exited_1_is_deleted_with_its_identity_and_reason():
    broken = assess(pod(), node_name=NODE)
    assert broken is not None
    assert (broken.namespace, broken.name, broken.uid, broken.action) == (
        "shop",
        "web-7d4b9-x2x",
        "uid-1",
        Action.DELETE,
    )
    assert broken.reason == "meshguard-validation exited 1: meshguard's node rules missing"


def test_crash_loop_after_a_failed_validation_is_broken():
    looping = pod(validation={"waiting": {"reason": "CrashLoopBackOff"}}, last=FAILED, restarts=3)
    broken = assess(looping, node_name=NODE)
    assert broken is not None
    assert "CrashLoopBackOff (restarts: 3)" in broken.reason


@pytest.mark.parametrize(
    ("state", "last"),
    [
        ({"running": {"startedAt": "2026-12-02T14:00:00Z"}}, None),  # still probing
        ({"waiting": {"reason": "PodInitializing"}}, None),  # not run yet
        ({"terminated": {"exitCode": 0, "reason": "Completed"}}, None),  # rules in place
        ({"running": {}}, FAILED),  # restarted after a failure: now probing again
        (
            {"waiting": {"reason": "CrashLoopBackOff"}},
            {"terminated": {"exitCode": 0}},
        ),  # last run succeeded
        ({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, None),  # not the node's
        (
            {"waiting": {"reason": "CrashLoopBackOff"}},
            {"terminated": {"exitCode": 143}},
        ),  # killed by a signal
        ({"terminated": {"exitCode": True}}, None),  # not a number
        ({"terminated": {"exitCode": "1"}}, None),
        ({}, None),
    ],
)
def test_validation_running_waiting_passed_or_killed_otherwise_is_left_alone(state, last):
    assert assess(pod(validation=state, last=last), node_name=NODE) is None


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.nodeName", "node-b"),  # another node's
        ("spec.nodeName", None),  # not scheduled
        ("metadata.labels", {"app": "web"}),  # not admitted
        ("metadata.labels", {"meshguard.io/admitted": "false"}),
        ("metadata.annotations", {"meshguard.io/ruleset": "{}"}),  # no status
        ("metadata.deletionTimestamp", "2026-12-02T14:00:00Z"),  # already going
        ("spec.initContainers", [{"name": "istio-init"}, {"name": "meshguard-init"}]),  # init mode
        ("status.initContainerStatuses", None),  # no status yet
        # Istio's own check failed, not meshguard's
        ("status.initContainerStatuses", [{"name": "istio-validation", "state": FAILED}]),
        ("metadata.uid", None),
        ("metadata.name", ""),
        ("kind", "Node"),
        ("spec", None),
        ("metadata", "garbage"),
    ],
)
def test_other_pods_are_never_touched(path, value):
    assert assess(pod(), node_name=NODE) is not None  # the base pod is broken
    assert assess(changed(pod(), path, value), node_name=NODE) is None


def test_no_node_name_touches_nothing():
    assert assess(changed(pod(), "spec.nodeName", ""), node_name="") is None


@pytest.mark.parametrize(
    "owners",
    [
        None,  # a bare pod
        [],
        [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}],  # not a controller
        [{"kind": "ReplicaSet", "name": "x", "uid": "u", "controller": "true"}],
    ],
)
def test_a_broken_pod_no_controller_recreates_is_only_reported(owners):
    broken = assess(changed(pod(), "metadata.ownerReferences", owners), node_name=NODE)
    assert broken is not None and broken.action is Action.REPORT


def test_the_list_selectors():
    assert repair.ADMITTED_SELECTOR == "meshguard.io/admitted=true"
    assert repair.node_selector(NODE) == "spec.nodeName=node-a"


def test_deletion_budget_counts_the_last_minute_only():
    assert deletion_budget([], now=100.0, per_minute=3) == 3
    assert deletion_budget([50.0, 90.0], now=100.0, per_minute=3) == 1
    assert deletion_budget([30.0, 39.9, 40.0], now=100.0, per_minute=3) == 3
    assert deletion_budget([95.0, 96.0, 97.0, 98.0], now=100.0, per_minute=3) == 0
