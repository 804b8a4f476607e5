"""What a node's credentials may do (issue: every node held a token that may delete any pod
of the cluster). The node agent's token is on every node (the plugin reads it from the CNI
directory), so the chart grants it the least that repair needs:

- by default (``cni.repair.mode: event``) no write on pods at all: ``create`` on events;
- ``delete`` is an opt-in, and then comes with the ValidatingAdmissionPolicy
  ``meshguard-cni-repair-scope``: the agent's service account deletes only pods that
  meshguard admitted in CNI mode on the node its token is bound to
  (``userInfo.extra["authentication.kubernetes.io/node-name"]`` of a pod-bound token,
  Kubernetes >= 1.30); a token without it deletes nothing.

Rendered with the real Helm engine, validated against Kubernetes' schemas, the CEL evaluated
by cel-python with the bindings the API server gives a DELETE (``request``, ``oldObject``,
``object`` null).
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from meshguard.inject.transform import InjectSettings, inject_pod
from tests.charts.test_chart import K8S_VERSION, NAMESPACE, one, render
from tests.charts.test_guard import evaluate
from tests.support.samples import as_cni_mode, istio_pod

SCOPE = "meshguard-cni-repair-scope"
DELETING = {"cni": {"enabled": True, "repair": {"mode": "delete"}}}
AGENT = f"system:serviceaccount:{NAMESPACE}:meshguard-cni"
NODE_KEY = "authentication.kubernetes.io/node-name"


def policies(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in render(values) if o["kind"].startswith("ValidatingAdmissionPolicy")
            and o["metadata"]["name"] == SCOPE]  # fmt: skip


def test_by_default_no_node_may_write_any_pod():
    objects = render({"cni": {"enabled": True}})
    role = one(objects, "ClusterRole", "meshguard-cni")
    for rule in role["rules"]:
        if "pods" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    assert {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]} in role["rules"]
    agent = one(objects, "DaemonSet", "meshguard-cni-node")["spec"]["template"]["spec"]
    assert "--repair-mode=event" in agent["containers"][0]["args"]
    assert policies({"cni": {"enabled": True}}) == []


def test_delete_comes_with_its_scope_and_both_are_valid_kubernetes():
    found = policies(DELETING)
    assert [o["kind"] for o in found] == [
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"
    ]  # fmt: skip
    for obj in found:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:  # pragma: no cover - older schemas
            pytest.skip(f"kubernetes-validate {K8S_VERSION} has no schema for {obj['kind']}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}: {exc.message}")
    policy, binding = found
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["DELETE"] and rule["resources"] == ["pods"]
    assert binding["spec"] == {"policyName": SCOPE, "validationActions": ["Deny"]}
    agent = one(render(DELETING), "DaemonSet", "meshguard-cni-node")["spec"]["template"]["spec"]
    assert "--repair-mode=delete" in agent["containers"][0]["args"]


def test_no_repair_no_scope_no_write():
    values = {"cni": {"enabled": True, "repair": {"enabled": False, "mode": "delete"}}}
    assert policies(values) == []
    role = one(render(values), "ClusterRole", "meshguard-cni")
    assert [r["verbs"] for r in role["rules"]] == [["get", "list", "watch"]]


@pytest.mark.parametrize("mode", ["label", "Delete", ""])
def test_other_modes_are_refused_by_the_schema(mode: str):
    with pytest.raises(Exception, match="mode"):
        render({"cni": {"enabled": True, "repair": {"mode": mode}}})


# --- the CEL, evaluated ----------------------------------------------------------------------


def stuck_pod(node: str = "node-a") -> dict[str, Any]:
    pod = as_cni_mode(istio_pod(native=False))
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    pod["spec"]["nodeName"] = node
    return pod


def deletes(pod: dict[str, Any], *, user: str = AGENT, node: str | None = "node-a",
            extra: dict[str, list[str]] | None = None) -> tuple[bool, list[str]]:  # fmt: skip
    (policy, _) = policies(DELETING)
    info: dict[str, Any] = {"username": user, "groups": ["system:serviceaccounts"]}
    if extra is not None:
        info["extra"] = extra
    elif node is not None:
        info["extra"] = {NODE_KEY: [node], "authentication.kubernetes.io/pod-name": ["agent-x"]}
    return evaluate(policy, pod, None, request={"userInfo": info, "operation": "DELETE"})


def test_the_agent_deletes_a_stuck_pod_of_its_own_node():
    assert deletes(stuck_pod("node-a")) == (True, [])


def test_the_agent_cannot_delete_a_pod_of_another_node():
    allowed, messages = deletes(stuck_pod("node-b"))
    assert not allowed and any("node its token is bound to" in m for m in messages)


@pytest.mark.parametrize(
    "extra",
    [None, {}, {NODE_KEY: []}, {NODE_KEY: ["node-a", "node-b"]}],
    ids=["no-extra", "empty-extra", "no-node", "two-nodes"],
)
def test_a_token_not_bound_to_one_node_deletes_nothing(extra: dict[str, list[str]] | None):
    allowed, messages = deletes(stuck_pod("node-a"), node=None, extra=extra)
    assert not allowed and any("node its token is bound to" in m for m in messages)


def test_a_pod_without_a_node_cannot_be_deleted_by_the_agent():
    pod = stuck_pod()
    del pod["spec"]["nodeName"]
    assert not deletes(pod)[0]


@pytest.mark.parametrize("what", ["not-admitted", "not-cni-mode"])
def test_the_agent_deletes_only_what_its_repair_is_for(what: str):
    pod = stuck_pod("node-a")
    if what == "not-admitted":
        del pod["metadata"]["labels"]["meshguard.io/admitted"]
    else:
        pod = copy.deepcopy(istio_pod(native=False))
        pod["spec"]["nodeName"] = "node-a"
        pod["metadata"]["labels"] = {"meshguard.io/admitted": "true"}
    allowed, messages = deletes(pod)
    assert not allowed and any("admitted in CNI mode" in m for m in messages)


def test_other_users_are_not_matched():
    assert deletes(stuck_pod("node-b"), user="system:serviceaccount:shop:ci", node=None) == (
        True,
        [],
    )
