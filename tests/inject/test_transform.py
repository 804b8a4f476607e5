"""The injection transform over every pod Istio's injector produced in ../shared."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from meshguard.errors import RefusedError
from meshguard.inject.container import InitContainerSettings, init_container, ruleset_volume
from meshguard.inject.istio import istio_template
from meshguard.inject.posture import Action, PostureSettings
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import pod_templates, read_documents
from meshguard.rules.ruleset import Ruleset
from tests.support.samples import injected_sample_names
from tests.support.shared import INJECTOR_SAMPLES, shared_file

PROJECT = Path(__file__).resolve().parents[2]
SETTINGS = InjectSettings(request_template=False)
K8S_VERSION = kubernetes_validate.latest_version()
NOT_INJECTED_BY_ISTIO = {"custom-template.yaml.injected", "hello-host-network.yaml.injected"}
SAMPLES = injected_sample_names() or ["(../shared absent)"]

#: JSON pointers (prefixes) meshguard may touch; anything else must stay as Istio left it.
OWN_ANNOTATIONS = ("meshguard.io~1ruleset", "meshguard.io~1status")


def load(name: str, *, as_is: bool = False) -> list[Any]:
    """A sample's documents; hostPath volumes (Pod Security Standards baseline forbids them:
    refused, see test_a_sample_with_a_host_path_is_refused) are removed unless ``as_is``."""
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    documents = read_documents(shared_file("istio-injector-samples", name))
    if not as_is:
        for template in pod_templates(documents):
            volumes = template.spec.get("volumes")
            if volumes:
                template.spec["volumes"] = [v for v in volumes if "hostPath" not in v]
    return documents


def with_policy(documents: list[Any]) -> list[Any]:
    """Add a policy annotation (every container may reach the first one's port 8080)."""
    for template in pod_templates(documents):
        names = [
            c["name"] for c in template.spec.get("containers", []) if c["name"] != "istio-proxy"
        ]
        if names:
            annotations = template.metadata.setdefault("annotations", {})
            annotations["meshguard.io/policy"] = yaml.safe_dump(
                {"rules": [{"from": "*", "to": names[0], "ports": [8080]}]}
            )
    return documents


def inject_all(documents: list[Any], settings: InjectSettings = SETTINGS) -> list[Outcome]:
    return [
        inject_pod(t.metadata, t.spec, settings=settings).outcome for t in pod_templates(documents)
    ]


@pytest.mark.parametrize("name", SAMPLES)
def test_meshguard_init_follows_istio_init_and_the_status_is_recorded(name: str):
    documents = with_policy(load(name))
    outcomes = inject_all(documents)
    for template, outcome in zip(pod_templates(documents), outcomes, strict=True):
        if name in NOT_INJECTED_BY_ISTIO:
            assert outcome is Outcome.SKIPPED
            continue
        assert outcome is Outcome.INJECTED
        init_names = [c["name"] for c in template.spec["initContainers"]]
        anchor = "istio-validation" if name.endswith(".cni.injected") else "istio-init"
        if anchor in init_names:
            assert init_names[init_names.index(anchor) + 1] == "meshguard-init"
        else:
            assert init_names[0] == "meshguard-init"
        assert init_names.count("meshguard-init") == 1
        annotations = template.metadata["annotations"]
        status = json.loads(annotations["meshguard.io/status"])
        ruleset = Ruleset.from_json(annotations["meshguard.io/ruleset"])
        assert status["ruleset"] == ruleset.digest
        # 0 in TPROXY mode (Envoy runs as root with gid 1337), 1234 where overridden.
        assert status["proxy"]["uid"] in {1337, 1234, 0}
        assert sorted(status["containers"]) == sorted(
            c["name"]
            for key in ("initContainers", "containers")
            for c in template.spec.get(key, [])
            if c["name"] not in {"istio-init", "istio-validation", "meshguard-init", "istio-proxy"}
        )
        assert len(set(status["containers"].values())) == len(status["containers"])


@pytest.mark.parametrize("name", SAMPLES)
def test_injecting_twice_equals_injecting_once(name: str):
    once = with_policy(load(name))
    inject_all(once)
    twice = copy.deepcopy(once)
    inject_all(twice)
    assert twice == once


@pytest.mark.parametrize("name", SAMPLES)
def test_every_other_field_is_unchanged(name: str):
    original = with_policy(load(name))
    injected = copy.deepcopy(original)
    inject_all(injected)
    for ops in (jsonpatch.make_patch(a, b).patch for a, b in zip(original, injected, strict=True)):
        for op in ops:
            path = op["path"]
            assert (
                any(path.endswith("/annotations/" + a) for a in OWN_ANNOTATIONS)
                or "/initContainers" in path
                or "/volumes" in path
                or "/securityContext" in path  # posture fixes, each reported as a warning
            ), op


@pytest.mark.parametrize("name", SAMPLES)
def test_outputs_are_valid_kubernetes_objects(name: str):
    documents = with_policy(load(name))
    inject_all(documents)
    for document in documents:
        validate(document)


def validate(document: dict[str, Any]) -> None:
    """kubernetes-validate has no schema for kind List: validate its items."""
    if document.get("kind") == "List":
        for item in document["items"]:
            validate(item)
    else:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", SAMPLES)
def test_the_cli_gives_the_same_result_as_the_transform(name: str):
    documents = with_policy(load(name))
    text = yaml.safe_dump_all(documents, sort_keys=False)
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "inject", "-f", "-"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    inject_all(documents)
    assert list(yaml.safe_load_all(done.stdout)) == documents
    if name in NOT_INJECTED_BY_ISTIO:
        assert "unchanged, no istio-proxy container" in done.stderr


def test_before_istio_the_meshguard_template_is_requested_keeping_the_others():
    documents = (
        list(yaml.safe_load_all((INJECTOR_SAMPLES / "hello.yaml").read_text()))
        if (INJECTOR_SAMPLES / "hello.yaml").exists()
        else pytest.skip("../shared absent")
    )
    (template,) = pod_templates(documents)
    result = inject_pod(template.metadata, template.spec, settings=InjectSettings())
    assert result.outcome is Outcome.TEMPLATE_REQUESTED
    assert template.metadata["annotations"]["inject.istio.io/templates"] == "sidecar,meshguard"
    template.metadata["annotations"]["inject.istio.io/templates"] = "custom"
    inject_pod(template.metadata, template.spec, settings=InjectSettings())
    assert template.metadata["annotations"]["inject.istio.io/templates"] == "custom,meshguard"


@pytest.mark.parametrize(
    ("annotations", "labels", "reason"),
    [
        ({"meshguard.io/inject": "false"}, {}, "opted out"),
        ({"sidecar.istio.io/inject": "false"}, {}, "Istio injection is disabled"),
        ({}, {"sidecar.istio.io/inject": "false"}, "Istio injection is disabled"),
        ({"ambient.istio.io/redirection": "enabled"}, {}, "ambient-mode pod"),
    ],
)
def test_opted_out_and_ambient_pods_pass_unchanged(annotations, labels, reason):
    (template,) = pod_templates(load("pod.yaml.injected"))
    template.metadata.setdefault("annotations", {}).update(annotations)
    template.metadata.setdefault("labels", {}).update(labels)
    before = copy.deepcopy(template.spec), copy.deepcopy(template.metadata)
    result = inject_pod(template.metadata, template.spec, settings=SETTINGS)
    assert result.outcome is Outcome.SKIPPED
    assert reason in result.reason
    assert (template.spec, template.metadata) == before


def test_deny_mode_refuses_with_every_reason():
    (template,) = pod_templates(load("pod.yaml.injected"))
    settings = InjectSettings(posture=PostureSettings(default_action=Action.DENY))
    with pytest.raises(RefusedError) as caught:
        inject_pod(template.metadata, template.spec, settings=settings)
    message = str(caught.value)
    assert message.startswith("meshguard refuses pod hellopod: container 'hello': ")
    assert "[missing-uid]" in message
    assert "[net-capability]" in message


def test_bad_policy_is_refused_naming_the_annotation():
    (template,) = pod_templates(load("pod.yaml.injected"))
    template.metadata["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: hello, to: nope, ports: [1]}]"
    )
    with pytest.raises(RefusedError, match=r"meshguard\.io/policy: rules\[0\]\.to: got 'nope'"):
        inject_pod(template.metadata, template.spec, settings=SETTINGS)


def test_host_network_pod_with_a_proxy_is_refused():
    (template,) = pod_templates(load("pod.yaml.injected"))
    template.spec["hostNetwork"] = True
    with pytest.raises(RefusedError, match=r"spec\.hostNetwork: the pod uses the node's network"):
        inject_pod(template.metadata, template.spec, settings=SETTINGS)


def test_the_istio_template_container_is_the_one_the_webhook_inserts():
    for fmt, filename in (
        ("iop", "meshguard-template.iop.yaml"),
        ("helm", "meshguard-template.values.yaml"),
    ):
        committed = (PROJECT / "istio" / filename).read_text()
        assert committed == istio_template(InitContainerSettings(), fmt=fmt), (
            f"istio/{filename} is stale: regenerate with meshguard istio-template --format {fmt}"
        )
        document = yaml.safe_load(committed)
        values = document["spec"]["values"] if fmt == "iop" else document
        body = yaml.safe_load(values["sidecarInjectorWebhook"]["templates"]["meshguard"])
        assert body["spec"]["initContainers"] == [init_container(InitContainerSettings())]
        assert body["spec"]["volumes"] == [ruleset_volume()]
    (template,) = pod_templates(load("pod.yaml.injected"))
    inject_pod(template.metadata, template.spec, settings=SETTINGS)
    inserted = next(c for c in template.spec["initContainers"] if c["name"] == "meshguard-init")
    assert inserted == init_container(InitContainerSettings())


def test_a_template_placed_container_is_moved_after_istio_init_and_normalized():
    (template,) = pod_templates(load("pod.yaml.injected"))
    stale = {**init_container(InitContainerSettings()), "image": "old"}
    template.spec["initContainers"].append(stale)  # where a template merge would append it
    inject_pod(template.metadata, template.spec, settings=SETTINGS)
    names = [c["name"] for c in template.spec["initContainers"]]
    assert names[:2] == ["istio-init", "meshguard-init"]
    assert names.count("meshguard-init") == 1
    assert template.spec["initContainers"][1] == init_container(InitContainerSettings())
