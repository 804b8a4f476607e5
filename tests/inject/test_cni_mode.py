"""Istio CNI mode (istio-validation instead of istio-init): meshguard adds no container with
added capabilities, privilege or root; meshguard-validation checks the node-side install."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest

from meshguard.errors import RefusedError
from meshguard.init_container import MESHGUARD_VALIDATION, validation_container
from meshguard.inject.init_step import InstallMode, WithoutIstioInit, install_mode
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import Role, read_pod
from meshguard.rules.ruleset import Ruleset
from tests.support import pss
from tests.support.keys import SIGNER
from tests.support.samples import istio_pod
from tests.support.shared import shared_file

SETTINGS = InjectSettings(request_template=False, signer=SIGNER)
CNI_SAMPLE = "hello.yaml.cni.injected"


def _cni_sample() -> list[Any]:
    path = shared_file("istio-injector-samples", CNI_SAMPLE)  # skips when ../shared is absent
    return read_documents(path)


def _own(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in spec.get("initContainers") or [] if c["name"].startswith("meshguard-")]


def test_the_cni_sample_gets_meshguard_validation_and_no_privileged_container():
    documents = _cni_sample()
    for template in pod_templates(documents):
        before = copy.deepcopy(template.spec)
        result = inject_pod(template.metadata, template.spec, settings=SETTINGS)
        assert result.outcome is Outcome.INJECTED
        names = [c["name"] for c in template.spec["initContainers"]]
        assert names[names.index("istio-validation") + 1] == MESHGUARD_VALIDATION
        assert "meshguard-init" not in names
        own = _own(template.spec)
        assert [c["name"] for c in own] == [MESHGUARD_VALIDATION]
        context = own[0]["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
        assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
        # No container meshguard added or changed holds more than before.
        assert not any(v.get("name") == "meshguard-ruleset" for v in template.spec["volumes"])
        assert len(template.spec["initContainers"]) == len(before["initContainers"]) + 1
        view = read_pod(metadata=template.metadata, spec=template.spec)
        assert install_mode(view, without_istio_init=WithoutIstioInit.SKIP) is InstallMode.CNI
        assert next(c for c in view.containers if c.name == MESHGUARD_VALIDATION).role is (
            Role.MESH_INIT
        )
        # Status and ruleset as in init-container mode.
        annotations = template.metadata["annotations"]
        ruleset = Ruleset.from_json(annotations["meshguard.io/ruleset"])
        status = json.loads(annotations["meshguard.io/status"])
        assert status["ruleset"] == ruleset.digest
        # The validation uid belongs to no container and is not the proxy's.
        uids = set(status["containers"].values()) | {status["proxy"]["uid"]}
        assert context["runAsUser"] not in uids
        # Valid Kubernetes object.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template.spec},
            kubernetes_validate.latest_version(),
            strict=True,
        )


def test_an_injected_cni_pod_passes_pss_baseline_and_meshguard_s_container_restricted():
    for template in pod_templates(_cni_sample()):
        template.spec["volumes"] = [v for v in template.spec.get("volumes") or []
                                    if "hostPath" not in v]  # fmt: skip
        inject_pod(template.metadata, template.spec, settings=SETTINGS)
        annotations = template.metadata.get("annotations") or {}
        assert pss.violations(template.spec, level="baseline", annotations=annotations) == set()
        restricted = pss.violations(template.spec, level="restricted", annotations=annotations)
        for container in _own(template.spec):
            assert pss.checks_of(restricted, container["name"]) == set()


def test_the_same_pod_with_istio_init_fails_baseline_because_of_meshguard_init():
    """The check above would catch meshguard-init: NET_ADMIN is outside baseline."""
    pod = istio_pod(cni=False)
    pod["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"] = []
    inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    problems = pss.violations(
        pod["spec"], level="baseline", annotations=pod["metadata"]["annotations"]
    )
    assert problems == {("meshguard-init", "capability NET_ADMIN"),
                        ("meshguard-init", "capability NET_RAW")}  # fmt: skip
    assert [c["name"] for c in pod["spec"]["initContainers"]][1] == "meshguard-init"


@pytest.mark.parametrize("native", [True, False])
def test_minimal_cni_pod_is_injected_with_validation_and_is_idempotent(native: bool):
    pod = istio_pod(cni=True, native=native)
    inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    once = copy.deepcopy(pod)
    inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    assert pod == once
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names[:2] == ["istio-validation", MESHGUARD_VALIDATION]
    annotations = pod["metadata"]["annotations"]
    assert pss.violations(pod["spec"], level="baseline", annotations=annotations) == set()
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    assert [c.name for c in view.workload] == ["app"]


def test_validation_uid_avoids_every_container_uid():
    pod = istio_pod(cni=True)
    pod["spec"]["containers"][0]["securityContext"]["runAsUser"] = 65532
    pod["spec"]["containers"][0]["securityContext"]["runAsGroup"] = 65532
    inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    own = _own(pod["spec"])[0]
    assert own["securityContext"]["runAsUser"] == 65531


def test_audit_mode_is_passed_to_the_validation_container():
    pod = istio_pod(cni=True)
    pod["metadata"]["annotations"]["meshguard.io/mode"] = "audit"
    inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    assert _own(pod["spec"])[0]["args"] == ["cni", "validate", "--mode", "audit"]


@pytest.mark.parametrize("attack", ["privileged", "root", "net-admin", "other-image-args"])
def test_a_disguised_meshguard_validation_is_not_meshguard_s(attack: str):
    """A workload container named meshguard-validation is refused, never trusted."""
    pod = istio_pod(cni=True)
    fake = validation_container(SETTINGS.init, uid=4000, mode="enforce")
    fake["image"] = "evil:1"
    context = fake["securityContext"]
    if attack == "privileged":
        context["privileged"] = True
    elif attack == "root":
        context.update(runAsUser=0, runAsNonRoot=False)
    elif attack == "net-admin":
        context["capabilities"] = {"add": ["NET_ADMIN"], "drop": ["ALL"]}
    else:
        fake["command"] = ["/bin/sh"]
    pod["spec"]["containers"].append(fake)
    with pytest.raises(RefusedError, match="meshguard-validation"):
        inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
