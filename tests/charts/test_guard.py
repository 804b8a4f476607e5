"""The chart's post-admission guard: a ValidatingAdmissionPolicy that refuses any UPDATE
adding, changing or removing a ``meshguard.io/*`` annotation of a pod meshguard admitted.

Rendered by the real Helm engine, validated against Kubernetes' schemas
(kubernetes-validate), and its CEL — the expressions as rendered — evaluated by cel-python
against old and new pod objects, the way the API server binds ``oldObject`` and ``object``
for an UPDATE.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import meshguard
from meshguard.inject.transform import InjectSettings, inject_pod
from tests.charts.test_chart import K8S_VERSION, one, render
from tests.support.keys import SIGNER

celpy = pytest.importorskip(
    "celpy", reason="cel-python is not installed (pip install -e '.[test]')"
)

NAME = "meshguard-annotation-guard"
EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def guard(values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    objects = render(values)
    return (
        one(objects, "ValidatingAdmissionPolicy", NAME),
        one(objects, "ValidatingAdmissionPolicyBinding", NAME),
    )


def test_the_guard_is_on_by_default_and_valid_kubernetes():
    policy, binding = guard()
    for obj in (policy, binding):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:  # pragma: no cover - older schemas
            pytest.skip(f"kubernetes-validate {K8S_VERSION} has no schema for {obj['kind']}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}: {exc.message}")
        assert "namespace" not in obj["metadata"]  # cluster-scoped
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshguard"
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["UPDATE"]
    assert rule["apiGroups"] == [""] and set(rule["resources"]) == {"pods", "pods/status"}
    assert binding["spec"] == {"policyName": NAME, "validationActions": ["Deny"]}
    for validation in spec["validations"]:
        assert validation["reason"] == "Forbidden"
        assert "delete the pod and create it anew" in validation["message"]


def test_the_guard_can_be_turned_off_or_made_to_warn():
    objects = render({"annotationGuard": {"enabled": False, "validationActions": ["Deny"]}})
    assert not [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")]
    _, binding = guard({"annotationGuard": {"enabled": True, "validationActions": ["Warn"]}})
    assert binding["spec"]["validationActions"] == ["Warn"]


@pytest.mark.parametrize("actions", [["Deny", "Warn"], [], ["Block"]])
def test_the_values_schema_refuses_meaningless_actions(actions):
    with pytest.raises(Exception, match="validationActions"):
        render({"annotationGuard": {"enabled": True, "validationActions": actions}})


# --- the CEL, evaluated --------------------------------------------------------------------


def admitted_pod() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def admits(old: dict[str, Any], new: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the rendered policy lets this UPDATE through, and the messages if not
    (matchConditions first: a pod they do not match is not checked)."""
    policy, _ = guard()
    return evaluate(policy, old, new)


def evaluate(
    policy: dict[str, Any], old: dict[str, Any] | None, new: dict[str, Any] | None, **bound: Any
) -> tuple[bool, list[str]]:
    """A rendered ValidatingAdmissionPolicy's verdict on one request: its matchConditions,
    then its ``variables`` in order (each sees those before it, as ``variables.<name>``), then
    its validations. ``bound``: more of the API server's bindings (``request``)."""
    env = celpy.Environment()
    activation: dict[str, Any] = {
        "oldObject": celpy.json_to_cel(old),
        "object": celpy.json_to_cel(new),
        **{name: celpy.json_to_cel(value) for name, value in bound.items()},
    }

    def value(expression: str) -> Any:
        return env.program(env.compile(expression)).evaluate(activation)

    def true(expression: str) -> bool:
        return bool(value(expression))

    if not all(true(c["expression"]) for c in policy["spec"].get("matchConditions", [])):
        return True, []
    variables = celpy.celtypes.MapType()
    activation["variables"] = variables
    for variable in policy["spec"].get("variables", []):
        variables[celpy.celtypes.StringType(variable["name"])] = value(variable["expression"])
    failed = [v["message"] for v in policy["spec"]["validations"] if not true(v["expression"])]
    return not failed, failed


def edited(pod: dict[str, Any], **changes: str | None) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    annotations = new["metadata"].setdefault("annotations", {})
    for name, value in changes.items():
        if value is None:
            annotations.pop(name, None)
        else:
            annotations[name] = value
    return new


MODE, POLICY, STATUS = "meshguard.io/mode", "meshguard.io/policy", "meshguard.io/status"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({MODE: "audit"}, "cannot be\nchanged or removed"),
        ({POLICY: "defaultAction: allow"}, "changed or removed"),
        ({POLICY: None}, "changed or removed"),
        ({STATUS: None}, "changed or removed"),
        ({STATUS: '{"admitted": {}}'}, "changed or removed"),
        ({"meshguard.io/ruleset": "{}"}, "changed or removed"),
        ({"meshguard.io/inject": "false"}, "can be added"),
        ({"meshguard.io/anything": "x"}, "can be added"),
    ],
    ids=["mode-changed", "policy-changed", "policy-removed", "status-removed",
         "status-changed", "ruleset-changed", "inject-added", "other-added"],
)  # fmt: skip
def test_edits_of_meshguard_annotations_of_an_admitted_pod_are_refused(changes, message):
    pod = admitted_pod()
    allowed, messages = admits(pod, edited(pod, **changes))
    assert not allowed
    assert any(message.replace("\n", " ") in m.replace("\n", " ") for m in messages), messages


def test_a_mode_annotation_added_to_a_pod_admitted_without_one_is_refused():
    pod = admitted_pod()
    del pod["metadata"]["annotations"][MODE]  # absent means enforce
    allowed, messages = admits(pod, edited(pod, **{MODE: "audit"}))
    assert not allowed and "can be added" in messages[0]


def test_other_updates_of_an_admitted_pod_pass():
    pod = admitted_pod()
    labelled = copy.deepcopy(pod)
    labelled["metadata"].setdefault("labels", {})["team"] = "payments"
    assert admits(pod, labelled) == (True, [])
    assert admits(pod, edited(pod, **{"example.com/owner": "ops"})) == (True, [])
    assert admits(pod, copy.deepcopy(pod)) == (True, [])
    every_other = copy.deepcopy(pod)
    every_other["metadata"]["annotations"] = {
        k: v
        for k, v in pod["metadata"]["annotations"].items()
        if k.startswith("meshguard.io/") or k == "sidecar.istio.io/status"
    }
    assert admits(pod, every_other) == (True, [])  # other annotations removed: not meshguard's


LABEL = "meshguard.io/admitted"


@pytest.mark.parametrize("value", [None, "false", ""])
def test_the_admitted_label_of_an_admitted_pod_cannot_be_removed_or_changed(value):
    pod = admitted_pod()
    assert pod["metadata"]["labels"][LABEL] == "true"
    new = copy.deepcopy(pod)
    if value is None:
        del new["metadata"]["labels"][LABEL]
    else:
        new["metadata"]["labels"][LABEL] = value
    allowed, messages = admits(pod, new)
    assert not allowed
    assert any("meshguard.io/admitted label" in m for m in messages), messages


def test_the_admitted_label_can_be_added_to_a_pod_admitted_without_it():
    older = admitted_pod()
    del older["metadata"]["labels"][LABEL]  # admitted by a meshguard that set no label
    labelled = copy.deepcopy(older)
    labelled["metadata"]["labels"][LABEL] = "true"
    assert admits(older, labelled) == (True, [])
    unlabelled = copy.deepcopy(older)
    del unlabelled["metadata"]["labels"]
    assert admits(unlabelled, labelled) == (True, [])


def test_pods_meshguard_did_not_admit_are_not_checked():
    plain: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    assert STATUS not in plain["metadata"]["annotations"]
    assert admits(plain, edited(plain, **{MODE: "audit", POLICY: None})) == (True, [])
    bare = {"metadata": {"name": "bare"}}
    assert admits(bare, edited(bare, **{MODE: "audit"})) == (True, [])


def test_an_admitted_pod_losing_every_annotation_is_refused():
    pod = admitted_pod()
    stripped = copy.deepcopy(pod)
    del stripped["metadata"]["annotations"]
    allowed, _ = admits(pod, stripped)
    assert not allowed
    assert json.loads(pod["metadata"]["annotations"][STATUS])["admitted"]  # what it guards
