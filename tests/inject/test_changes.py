"""The changes of an admission as data: deciding them edits nothing, making them is
:func:`meshguard.inject.changes.apply_changes`, and the pod is read once."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from meshguard.inject.changes import (
    ByName,
    InsertAfter,
    RemoveItem,
    RemoveKey,
    ReplaceNamed,
    SetKey,
    apply_changes,
)
from meshguard.inject.posture import PostureAction, PostureSettings, apply_fixes, review_posture
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import read_pod
from tests.support.samples import istio_pod

FIX = PostureSettings(default_action=PostureAction.FIX)


def test_a_posture_review_decides_its_fixes_without_editing_the_spec() -> None:
    pod = istio_pod()
    app = pod["spec"]["containers"][0]
    app["securityContext"] = {"capabilities": {"add": ["NET_RAW", "SYS_ADMIN"]}}
    before = copy.deepcopy(pod["spec"])
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    findings = review_posture(pod["spec"], pod=view, settings=FIX)
    assert pod["spec"] == before  # decided, not made
    fixed = [f for f in findings if f.fixed]
    assert fixed and all(f.fix is not None for f in fixed)
    assert all(f.fix is None for f in findings if not f.fixed)
    apply_fixes(pod["spec"], findings)
    once = copy.deepcopy(pod["spec"])
    apply_fixes(pod["spec"], findings)
    assert pod["spec"] == once  # making them again changes nothing
    context = pod["spec"]["containers"][0]["securityContext"]
    assert context["capabilities"]["add"] == []
    assert context["allowPrivilegeEscalation"] is False
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] != 1337
    # the view of the fixed spec is what the transform derives without reading it again
    again = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    assert review_posture(pod["spec"], pod=again, settings=FIX) == []


def test_changes_address_the_pod_by_path_and_create_only_mappings() -> None:
    metadata: dict[str, Any] = {"name": "p", "annotations": None}
    spec: dict[str, Any] = {
        "initContainers": [{"name": "a"}, {"name": "old"}, {"name": "b"}],
        "containers": [{"name": "istio-proxy", "volumeMounts": [{"name": "x"}, {"name": "v"}]}],
    }
    apply_changes(
        (
            SetKey(at=("metadata", "annotations"), key="k", value="v"),  # null replaced
            SetKey(at=("metadata", "annotations"), key="k", value="w", keep=True),
            RemoveKey(at=("metadata", "labels"), key="absent"),
            RemoveItem(at=("spec",), key="initContainers", index=1),
            InsertAfter(
                at=("spec",), key="initContainers", item={"name": "new"}, after="a",
                replacing=frozenset({"new"}),
            ),
            ReplaceNamed(at=("spec",), key="volumes", name="v"),  # no list: none made
            ReplaceNamed(at=("spec", "containers", ByName("istio-proxy")), key="volumeMounts",
                         name="v", item={"name": "v", "readOnly": True}),
            ReplaceNamed(at=("spec", "ephemeralContainers", ByName("x")), key="m", name="m"),
        ),
        metadata=metadata,
        spec=spec,
    )  # fmt: skip
    assert metadata == {"name": "p", "annotations": {"k": "v"}}  # removing makes no labels
    assert [c["name"] for c in spec["initContainers"]] == ["a", "new", "b"]
    assert "volumes" not in spec and "ephemeralContainers" not in spec
    assert spec["containers"][0]["volumeMounts"] == [{"name": "x"}, {"name": "v", "readOnly": True}]


def test_containers_sharing_one_security_context_through_a_yaml_anchor_are_fixed_apart() -> None:
    """A manifest may give two containers one securityContext (``&ctx`` / ``*ctx``): fixing
    one must not edit the other (it did: both got the same assigned uid, and the pod was
    refused as sharing it)."""
    pod = istio_pod()
    shared = {"capabilities": {"add": ["NET_RAW"]}}
    app = pod["spec"]["containers"][0]
    app["securityContext"] = shared
    pod["spec"]["containers"].append({**app, "name": "web", "ports": [{"containerPort": 81}]})
    text = yaml.safe_dump(pod)
    assert "*id" in text  # the dump writes the shared mapping as an alias
    (template,) = pod_templates(read_documents(text))
    assert (
        template.spec["containers"][0]["securityContext"]
        is (template.spec["containers"][1]["securityContext"])
    )
    result = inject_pod(
        template.metadata, template.spec, settings=InjectSettings(request_template=False)
    )
    assert result.outcome is Outcome.INJECTED
    uids = [c["securityContext"]["runAsUser"] for c in template.spec["containers"][:2]]
    assert len(set(uids)) == 2, uids


def test_a_pod_with_null_annotations_gets_the_template_request() -> None:
    """``annotations: null`` is a valid pod; asking Istio for the template crashed on it
    (AttributeError: the webhook answered 500)."""
    metadata: dict[str, Any] = {"name": "x", "annotations": None}
    result = inject_pod(metadata, {"containers": [{"name": "a"}]}, settings=InjectSettings())
    assert result.outcome is Outcome.TEMPLATE_REQUESTED
    assert metadata["annotations"] == {"inject.istio.io/templates": "sidecar,meshguard"}
