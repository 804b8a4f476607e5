"""A first rollout that breaks nothing: the pod's annotation over the namespace's mode (the
webhook's path, ``/inject/<mode>``) over the cluster default; audit mode changes no pod
(posture ``report``, rules that log); the mode is recorded on the pod so that every reader
agrees; misspelled ``meshguard.io/*`` keys are warned about."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from typing import Any

import jsonpatch
import pytest
import yaml

from meshguard.admitted import Admitted, drift
from meshguard.inject.posture import PostureAction, PostureSettings
from meshguard.inject.transform import InjectSettings
from meshguard.policy import Mode
from meshguard.status import read_status
from meshguard.webhook.review import handle
from tests.support.pods import admission_review
from tests.support.shared import INJECTOR_SAMPLES
from tests.webhook.test_server import Served, injected_pod, served  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(
    not INJECTOR_SAMPLES.exists(), reason="../shared/istio-injector-samples is absent"
)

AUDIT_DEFAULT = InjectSettings(request_template=False, default_mode=Mode.AUDIT)
ENFORCE_DEFAULT = InjectSettings(request_template=False, default_mode=Mode.ENFORCE)


def istio_pod() -> dict[str, Any]:
    """Istio's injected hello pod as a team deploys it: no securityContext at all (root by
    the image, every runtime default capability) — what an install day meets."""
    pod = copy.deepcopy(injected_pod())
    pod["metadata"].update(name="hello", namespace="shop")
    assert "securityContext" not in pod["spec"]["containers"][0]
    return pod


def admit(
    pod: dict[str, Any], settings: InjectSettings, namespace_mode: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The response and the pod as admitted (the patch applied)."""
    status, answer, _ = handle(
        admission_review(pod, "u-1"), settings=settings, namespace_mode=namespace_mode
    )
    assert status == 200
    response: dict[str, Any] = answer["response"]  # type: ignore[typeddict-item]
    if not response["allowed"] or "patch" not in response:
        return response, pod
    patch = json.loads(base64.b64decode(response["patch"]))
    return response, jsonpatch.apply_patch(pod, patch)


def ruleset_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["annotations"]["meshguard.io/ruleset"])


def test_install_day_audit_admits_the_pod_unchanged_records_audit_and_logs_instead_of_denying():
    pod = istio_pod()
    response, admitted = admit(pod, AUDIT_DEFAULT)
    assert response["allowed"] is True, response.get("status")
    annotations = admitted["metadata"]["annotations"]
    assert annotations["meshguard.io/mode"] == "audit"
    # the posture is reported, not fixed: the app keeps its uid, capabilities, everything
    assert admitted["spec"]["containers"] == pod["spec"]["containers"]
    assert [c["name"] for c in admitted["spec"]["initContainers"]][:2] == [
        "istio-init",
        "meshguard-init",
    ]
    warnings = response["warnings"]
    assert any("posture report" in w and "[missing-uid]" in w for w in warnings)
    assert any("audit mode: container 'hello' has no runAsUser" in w for w in warnings)
    status = read_status(annotations["meshguard.io/status"])
    assert status is not None and status.mode == "audit"
    assert any("[setuid-capability] (meshguard's own)" in f for f in status.findings)
    assert status.changes == ()
    # the kernel rules log what they would deny and let it pass
    ruleset = ruleset_of(admitted)
    assert "meshguard:audit" in ruleset and "REJECT" not in ruleset


def test_the_same_pod_in_enforce_mode_is_fixed_and_in_enforce_with_report_refused():
    pod = istio_pod()
    response, admitted = admit(pod, ENFORCE_DEFAULT)
    assert response["allowed"] is True
    assert admitted["metadata"]["annotations"]["meshguard.io/mode"] == "enforce"
    context = admitted["spec"]["containers"][0]["securityContext"]
    assert context["runAsUser"] == 20000 and context["allowPrivilegeEscalation"] is False
    assert "REJECT" in ruleset_of(admitted)
    report = InjectSettings(
        request_template=False, posture=PostureSettings(default_action=PostureAction.REPORT)
    )
    refused, _ = admit(pod, report)  # enforcing needs a uid per container: fail closed
    assert refused["allowed"] is False
    assert "container 'hello' has no runAsUser" in refused["status"]["message"]


@pytest.mark.parametrize(
    ("cluster", "namespace", "annotation", "expected"),
    [
        (AUDIT_DEFAULT, None, None, "audit"),
        (AUDIT_DEFAULT, "enforce", None, "enforce"),
        (ENFORCE_DEFAULT, "audit", None, "audit"),
        (AUDIT_DEFAULT, "enforce", "audit", "audit"),
        (ENFORCE_DEFAULT, "audit", "enforce", "enforce"),
        (ENFORCE_DEFAULT, None, " Audit ", "audit"),
    ],
)
def test_pod_annotation_over_namespace_over_cluster_default(
    cluster, namespace, annotation, expected
):
    pod = istio_pod()
    if annotation is not None:
        pod["metadata"]["annotations"]["meshguard.io/mode"] = annotation
    response, admitted = admit(pod, cluster, namespace)
    assert response["allowed"] is True
    status = read_status(admitted["metadata"]["annotations"]["meshguard.io/status"])
    assert status is not None and status.mode == expected
    fixed = admitted["spec"]["containers"] != pod["spec"]["containers"]
    assert fixed is (expected == "enforce")


@pytest.mark.parametrize(
    ("segment", "said"),
    [("other", "neither 'audit' nor 'enforce'"), ("Audit", "'Audit'"), ("", "''")],
)
def test_a_namespace_label_that_is_no_mode_refuses_the_pod_naming_the_label(segment, said):
    response, _ = admit(istio_pod(), AUDIT_DEFAULT, segment)
    assert response["allowed"] is False
    message = response["status"]["message"]
    assert f"namespace's meshguard.io/mode label is {said}" in message
    assert "expected 'audit' or 'enforce'" in message


def test_the_recorded_mode_is_what_every_reader_of_the_pod_sees():
    """The mode came from the namespace, not the pod: recorded on the pod, the authz
    server's drift check and ``meshguard describe`` agree with what was admitted."""
    _, admitted = admit(istio_pod(), ENFORCE_DEFAULT, "audit")
    annotations = admitted["metadata"]["annotations"]
    status = read_status(annotations["meshguard.io/status"])
    assert status is not None
    record = Admitted.from_document(status.admitted)
    assert record.mode is Mode.AUDIT
    assert drift(record, annotations) == ()
    described = subprocess.run(
        [sys.executable, "-m", "meshguard", "describe", "-f", "-"],
        input=yaml.safe_dump(admitted),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert described.returncode == 0, described.stderr
    assert "mode: audit" in described.stdout
    assert "STALE" not in described.stdout and "drift" not in described.stdout.lower()


def test_an_ephemeral_container_of_an_audit_pod_is_reported_not_refused():
    _, admitted = admit(istio_pod(), AUDIT_DEFAULT)
    old = copy.deepcopy(admitted)
    admitted["spec"]["ephemeralContainers"] = [
        {"name": "debug", "image": "busybox", "securityContext": {"privileged": True}}
    ]
    body = json.loads(admission_review(admitted, "u-2"))
    body["request"].update(operation="UPDATE", subResource="ephemeralcontainers", oldObject=old)
    status, answer, _ = handle(json.dumps(body).encode(), settings=ENFORCE_DEFAULT)
    response: dict[str, Any] = answer["response"]  # type: ignore[typeddict-item]
    assert status == 200 and response["allowed"] is True
    assert any("[privileged]" in w and "posture report" in w for w in response["warnings"])
    enforced = copy.deepcopy(body)
    enforced["request"]["object"]["metadata"]["annotations"]["meshguard.io/mode"] = "enforce"
    _, refused, _ = handle(json.dumps(enforced).encode(), settings=ENFORCE_DEFAULT)
    assert refused["response"]["allowed"] is False  # type: ignore[typeddict-item]


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("meshguard.io/polciy", "did you mean meshguard.io/policy?"),
        ("meshguard.io/injct", "did you mean meshguard.io/inject?"),
        ("meshguard.io/Mode", "did you mean meshguard.io/mode?"),
        ("meshguard.io/colour", "(known: meshguard.io/"),
    ],
)
def test_a_misspelled_meshguard_annotation_is_warned_in_the_review_and_the_cli(key, hint):
    pod = istio_pod()
    pod["metadata"]["annotations"][key] = "x"
    response, _ = admit(pod, AUDIT_DEFAULT)
    expected = f"unknown annotation {key}: meshguard ignores it"
    assert any(w.startswith(expected) and hint in w for w in response["warnings"])
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "inject", "-f", "-", "--default-mode", "audit"],
        input=yaml.safe_dump(pod),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"warning: Pod shop/hello: {expected}" in done.stderr
    assert hint in done.stderr


def test_a_misspelled_opt_out_is_warned_even_on_a_skipped_pod():
    pod = istio_pod()
    pod["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false"
    pod["metadata"]["annotations"]["meshguard.io/injekt"] = "false"
    response, _ = admit(pod, AUDIT_DEFAULT)
    assert any("unknown annotation meshguard.io/injekt" in w for w in response["warnings"])


def test_the_served_webhook_takes_the_namespace_mode_from_its_path(served: Served):  # noqa: F811
    """``meshguard serve-webhook`` (cluster default: enforce) over real HTTPS: the entry for
    audit namespaces posts to ``/inject/audit`` (the API server adds ``?timeout=``)."""
    paths = (("/inject/audit?timeout=10s", "audit"), ("/inject/enforce", "enforce"),
             ("/inject", "enforce"))  # fmt: skip
    for path, mode in paths:
        status, body = served.request("POST", path, admission_review(istio_pod(), "u-3"))
        assert status == 200
        response = json.loads(body)["response"]
        patch = json.loads(base64.b64decode(response["patch"]))
        admitted = jsonpatch.apply_patch(istio_pod(), patch)
        assert admitted["metadata"]["annotations"]["meshguard.io/mode"] == mode
    status, body = served.request("POST", "/inject/other", admission_review(istio_pod(), "u-4"))
    assert status == 200
    response = json.loads(body)["response"]
    assert response["allowed"] is False
    assert "label is neither 'audit' nor 'enforce'" in response["status"]["message"]
