"""AdmissionReview handling without a server: answers, refusals, bad input, random input."""

from __future__ import annotations

import base64
import copy
import json
import logging
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard.describe import describe
from meshguard.errors import RefusedError
from meshguard.init_container import InitContainerSettings
from meshguard.inject.posture import PostureAction, PostureSettings
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.l7 import L7Engine
from meshguard.manifests import pod_templates
from meshguard.pod import read_pod
from meshguard.policy import Mode, parse_policy
from meshguard.rules.compiler import CompilerSettings
from meshguard.webhook.review import handle
from tests.support.keys import SIGNER
from tests.support.samples import SAFE_CONTEXT, injected_sample_names, istio_pod
from tests.support.shared import shared_file

SETTINGS = InjectSettings(signer=SIGNER)


def review(
    pod: Any, *, uid: str = "7f0c-1", kind: str = "Pod", operation: str = "CREATE"
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "object": pod,
        },
    }


def post(document: Any) -> tuple[int, dict[str, Any]]:
    status, answer, _ = handle(json.dumps(document).encode(), settings=SETTINGS)
    return status, answer


def sample_pods(name: str) -> list[dict[str, Any]]:
    """Every pod template of a sample, as the Pod the API server would send."""
    documents = list(yaml.safe_load_all(shared_file("istio-injector-samples", name).read_text()))
    pods = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": t.metadata, "spec": t.spec}
        for t in pod_templates([d for d in documents if d])
    ]
    for pod in pods:  # Pod Security Standards baseline forbids hostPath: tested on its own
        if pod["spec"].get("volumes"):
            pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if "hostPath" not in v]
    return pods


def apply(answer: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    response = answer["response"]
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return patched


@pytest.mark.parametrize("name", injected_sample_names() or ["(../shared absent)"])
def test_patch_applied_equals_meshguard_inject(name: str):
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    for pod in sample_pods(name):
        status, answer = post(review(pod, uid=f"uid-{name}"))
        assert status == 200
        response = answer["response"]
        assert response["uid"] == f"uid-{name}"
        assert response["allowed"] is True, response
        patched = apply(answer, copy.deepcopy(pod))
        has_proxy = read_pod(metadata=pod["metadata"], spec=pod["spec"]).proxy is not None
        expected = copy.deepcopy(pod)
        # meshguard inject (no template request) for injected pods; the webhook alone asks
        # Istio for the template when Istio has not injected yet.
        cli = InjectSettings(request_template=False, signer=SIGNER)
        inject_pod(
            expected["metadata"],
            expected["spec"],
            settings=cli if has_proxy else SETTINGS,
            namespace="shop",  # the request's: the attestation is signed for it
        )
        assert patched == expected
        # the authz server's label selector: set on what meshguard admitted, and only there
        admitted = (patched["metadata"].get("labels") or {}).get("meshguard.io/admitted")
        gateway = name == "gateway.yaml.injected"  # left alone: the reason is a warning
        assert admitted == ("true" if has_proxy and not gateway else None)
        if gateway:
            assert any("Istio gateway pod" in w for w in response["warnings"]), response
        if has_proxy and not gateway:
            again = post(review(patched))[1]["response"]
            assert again["allowed"] is True
            assert "patch" not in again  # idempotent: nothing left to change
            assert "warnings" not in again  # every fix was made the first time


#: Every option set the webhook tests admit pods with (and the L7 engine and pull secrets).
OPTION_SETS = {
    "signed": SETTINGS,
    "unsigned": InjectSettings(),
    "no-template": InjectSettings(request_template=False, signer=SIGNER),
    "deny": InjectSettings(posture=PostureSettings(default_action=PostureAction.DENY)),
    "report": InjectSettings(
        request_template=False, posture=PostureSettings(default_action=PostureAction.REPORT)
    ),
    "audit": InjectSettings(request_template=False, default_mode=Mode.AUDIT),
    "ext-authz": InjectSettings(signer=SIGNER, l7_engine=L7Engine.EXT_AUTHZ),
    "pull-secrets": InjectSettings(
        signer=SIGNER, init=InitContainerSettings(pull_secrets=("regcred", "regcred"))
    ),
}


@pytest.mark.parametrize("option", sorted(OPTION_SETS))
@pytest.mark.parametrize("name", injected_sample_names() or ["(../shared absent)"])
def test_the_patch_gives_the_pod_meshguard_inject_makes_under_every_option_set(name, option):
    """The patch is the operations the changes were made with: applied with ``jsonpatch`` to
    the pod as sent, it gives inject_pod's pod exactly; admitted again, nothing to patch."""
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    settings = OPTION_SETS[option]
    for pod in sample_pods(name):
        _, answer, _ = handle(json.dumps(review(pod)).encode(), settings=settings)
        response = answer["response"]
        expected = copy.deepcopy(pod)
        try:
            inject_pod(expected["metadata"], expected["spec"], settings=settings, namespace="shop")
        except RefusedError as exc:
            assert response["allowed"] is False and response["status"]["message"] == str(exc)
            continue
        assert response["allowed"] is True, response
        patched = apply(answer, copy.deepcopy(pod))
        assert patched == expected
        operations = json.loads(base64.b64decode(response.get("patch", "W10=")))
        assert not any(op["path"] in ("", "/metadata", "/spec") for op in operations)
        again = handle(json.dumps(review(patched)).encode(), settings=settings)[1]["response"]
        assert again["allowed"] is True
        assert "patch" not in again  # a reinvocation changes nothing


def test_the_init_step_is_one_small_operation():
    (pod,) = sample_pods("hello.yaml.injected")
    _, answer = post(review(pod))
    operations = json.loads(base64.b64decode(answer["response"]["patch"]))
    init = [op for op in operations if op["path"].startswith("/spec/initContainers")]
    assert [(op["op"], op["path"]) for op in init] == [
        ("add", "/spec/initContainers/1/volumeMounts/9"),  # the native proxy's L7 document
        ("add", "/spec/initContainers/1"),  # meshguard-init right after istio-init
    ]
    assert init[1]["value"]["name"] == "meshguard-init"


def test_a_pod_sent_without_metadata_gets_it_in_the_patch():
    pod: dict[str, Any] = {"spec": {"containers": [{"name": "app", "image": "x"}]}}
    _, answer = post(review(pod))
    assert answer["response"]["allowed"] is True
    expected: dict[str, Any] = {"metadata": {}, "spec": copy.deepcopy(pod["spec"])}
    inject_pod(expected["metadata"], expected["spec"], settings=SETTINGS)
    assert apply(answer, copy.deepcopy(pod)) == expected
    assert expected["metadata"]["annotations"]  # the template request


def test_before_istio_only_the_template_is_requested():
    (pod,) = sample_pods("pod.yaml")
    _, answer = post(review(pod))
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    assert patch == [
        {
            "op": "add",
            "path": "/metadata/annotations",
            "value": {"inject.istio.io/templates": "sidecar,meshguard"},
        }
    ]


def test_refused_pod_is_denied_with_403_and_the_reason():
    (pod,) = sample_pods("pod.yaml.injected")
    pod["spec"]["hostNetwork"] = True
    status, answer = post(review(pod))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert "spec.hostNetwork: the pod uses the node's network" in response["status"]["message"]


def test_bad_policy_is_denied_naming_annotation_and_field():
    (pod,) = sample_pods("pod.yaml.injected")
    pod["metadata"]["annotations"]["meshguard.io/policy"] = "rules: [{from: x, bogus: 1}]"
    _, answer = post(review(pod))
    message = answer["response"]["status"]["message"]
    assert message.startswith("meshguard.io/policy: rules[0].to: got nothing")
    assert "rules[0].bogus: got 'bogus', expected one of the known fields" in message


def test_opted_out_pod_is_allowed_untouched_with_a_warning():
    (pod,) = sample_pods("pod.yaml.injected")
    pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    _, answer = post(review(pod))
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
    assert answer["response"]["warnings"] == [
        'meshguard skipped this pod: opted out (meshguard.io/inject: "false")'
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[]", "expected an AdmissionReview object, got list"),
        (json.dumps({"kind": "Pod", "apiVersion": "v1"}).encode(), "expected kind AdmissionReview"),
        (
            json.dumps(
                {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {}}
            ).encode(),
            "apiVersion 'admission.k8s.io/v1beta1'",
        ),
        (
            json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}).encode(),
            "has no request",
        ),
        (
            json.dumps(
                {
                    "kind": "AdmissionReview",
                    "apiVersion": "admission.k8s.io/v1",
                    "request": {"uid": ""},
                }
            ).encode(),
            "has no uid",
        ),
    ],
)
def test_malformed_reviews_get_400_with_the_reason(body: bytes, message: str):
    status, answer, decision = handle(body, settings=SETTINGS)
    assert status == 400
    assert message in answer["error"]
    assert decision is None


@pytest.mark.parametrize(
    ("document", "code", "message"),
    [
        (
            review({"spec": {}}, kind="Deployment"),
            400,
            "meshguard only handles Pods, got kind 'Deployment'",
        ),
        (review("not a pod"), 400, "request.object is not a pod"),
        (review({"metadata": [], "spec": {}}), 400, "metadata is not a mapping"),
        (
            review({"spec": {"containers": "x"}}),
            400,
            "malformed pod: spec.containers: expected a valid list, got 'x'",
        ),
        (
            review({"spec": {"containers": [{"name": "a", "securityContext": {"runAsUser": -1}}]}}),
            400,
            "runAsUser: expected an integer",
        ),
    ],
)
def test_reviews_of_things_that_are_not_sound_pods_are_denied(document, code, message):
    status, answer = post(document)
    assert status == 200
    response = answer["response"]
    assert response["uid"] == "7f0c-1"
    assert response["allowed"] is False
    assert response["status"]["code"] == code
    assert message in response["status"]["message"]


def test_non_create_operations_are_allowed_unchanged():
    (pod,) = sample_pods("pod.yaml.injected")
    _, answer = post(review(pod, operation="UPDATE"))
    assert answer["response"] == {"uid": "7f0c-1", "allowed": True}


# --- kubectl debug: UPDATE of pods/ephemeralcontainers ---------------------------------------

SAFE_DEBUG = {**SAFE_CONTEXT, "runAsUser": 30000, "runAsGroup": 30000}


def injected_pod() -> dict[str, Any]:
    pod = istio_pod()
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def debug_review(pod: dict[str, Any], *containers: dict[str, Any]) -> dict[str, Any]:
    """The UPDATE ``kubectl debug`` sends: the pod with ``containers`` added."""
    new = copy.deepcopy(pod)
    new["spec"].setdefault("ephemeralContainers", []).extend(containers)
    document = review(new, operation="UPDATE")
    document["request"]["subResource"] = "ephemeralcontainers"
    document["request"]["resource"]["resource"] = "pods"
    document["request"]["oldObject"] = pod
    return document


@pytest.mark.parametrize(
    ("context", "check", "message"),
    [
        ({**SAFE_DEBUG, "runAsUser": 1337}, "proxy-uid", "is the proxy's uid 1337"),
        ({**SAFE_DEBUG, "runAsGroup": 1337}, "proxy-gid", "is the proxy's gid 1337"),
        ({**SAFE_DEBUG, "runAsUser": 1000}, "shared-uid", "uid 1000 is also 'app''s"),
        (None, "missing-uid", "runAsUser: is not set"),
        ({**SAFE_DEBUG, "privileged": True}, "privileged", "securityContext.privileged"),
        ({**SAFE_DEBUG, "capabilities": {"add": ["NET_ADMIN"]}}, "net-capability", "NET_ADMIN"),
        ({**SAFE_DEBUG, "capabilities": {"add": ["SYS_MODULE"], "drop": ["ALL"]}},
         "added-capability", "adds SYS_MODULE"),
    ],
)  # fmt: skip
def test_a_debug_container_that_fails_a_check_is_refused_not_patched(context, check, message):
    debug: dict[str, Any] = {"name": "debugger", "image": "busybox", "stdin": True, "tty": True}
    if context is not None:
        debug["securityContext"] = context
    status, answer = post(debug_review(injected_pod(), debug))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False, response
    assert "patch" not in response
    assert response["status"]["code"] == 403
    text = response["status"]["message"]
    assert "ephemeral container 'debugger': securityContext." in text
    assert message in text and f"[{check}]" in text


def test_a_safe_debug_container_is_allowed_unchanged():
    debug = {"name": "debugger", "image": "busybox", "securityContext": SAFE_DEBUG}
    _, answer = post(debug_review(injected_pod(), debug))
    assert answer["response"] == {"uid": "7f0c-1", "allowed": True}


def test_only_the_added_debug_containers_are_judged():
    pod = injected_pod()
    pod["spec"]["ephemeralContainers"] = [{"name": "old", "image": "busybox"}]  # pre-meshguard
    debug = {"name": "debugger", "image": "busybox", "securityContext": SAFE_DEBUG}
    assert post(debug_review(pod, debug))[1]["response"]["allowed"] is True
    clash = {"name": "second", "image": "x", "securityContext": {**SAFE_DEBUG, "runAsUser": 1337}}
    assert post(debug_review(pod, clash))[1]["response"]["allowed"] is False


def test_a_debug_container_targeting_the_proxy_as_root_is_refused():
    debug = {
        "name": "debugger",
        "image": "busybox",
        "targetContainerName": "istio-proxy",
        "securityContext": {**SAFE_DEBUG, "runAsUser": 0},
    }
    _, answer = post(debug_review(injected_pod(), debug))
    assert "[shared-pid-root]" in answer["response"]["status"]["message"]


def test_debug_containers_of_pods_meshguard_does_not_protect_are_allowed():
    pod = istio_pod()
    pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    debug = {"name": "debugger", "image": "busybox"}
    assert post(debug_review(pod, debug))[1]["response"]["allowed"] is True


def test_ephemeral_containers_in_a_created_pod_are_refused_on_a_finding():
    pod = istio_pod()
    pod["spec"]["ephemeralContainers"] = [
        {"name": "debugger", "image": "busybox", "securityContext": {**SAFE_DEBUG,
         "runAsUser": 1337}}]  # fmt: skip
    response = post(review(pod))[1]["response"]
    assert response["allowed"] is False
    assert (
        "ephemeral container 'debugger': securityContext.runAsUser"
        in (response["status"]["message"])
    )


# --- containers disguised with Istio's and meshguard's names -------------------------------


@pytest.mark.parametrize("place", ["regular", "native-sidecar", "unlisted-init"])
@pytest.mark.parametrize("name", ["istio-init", "istio-validation", "meshguard-init"])
def test_a_disguised_privileged_container_is_refused_by_the_webhook(name, place):
    pod = istio_pod(cni=name == "istio-init")
    container = {"name": name, "image": "evil", "securityContext": {**SAFE_CONTEXT,
                 "runAsUser": 3000, "runAsGroup": 3000, "privileged": True}}  # fmt: skip
    if place == "regular":
        pod["spec"]["containers"].append(container)
    else:
        if place == "native-sidecar":
            container["restartPolicy"] = "Always"
        pod["spec"]["initContainers"].append(container)
    strict = InjectSettings(posture=PostureSettings(default_action=PostureAction.DENY))
    _, answer, _ = handle(json.dumps(review(pod)).encode(), settings=strict)
    response = answer["response"]
    assert response["allowed"] is False
    message = response["status"]["message"]
    assert f"container {name!r}" in message
    assert "[privileged]" in message or "is not meshguard's init container" in message


# --- random input: always an answer, never an exception -------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
_container = st.fixed_dictionaries(
    {
        "name": st.sampled_from(
            ["app", "istio-proxy", "istio-init", "istio-validation", "meshguard-init", "cache", ""]
        )
        | _json
    },
    optional={
        "securityContext": st.fixed_dictionaries(
            {},
            optional={
                "runAsUser": st.integers(-1, 70000) | _json,
                "runAsGroup": st.integers(-1, 70000),
                "privileged": st.booleans(),
                "capabilities": st.fixed_dictionaries(
                    {},
                    optional={
                        "add": st.lists(st.sampled_from(["NET_ADMIN", "ALL", "SYS_PTRACE", 3]))
                    },
                ),
            },
        )
        | _json,
        "ports": st.lists(st.fixed_dictionaries({"containerPort": st.integers(-1, 70000) | _json}))
        | _json,
        "restartPolicy": st.sampled_from(["Always", "Never"]),
    },
)
_pod = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "annotations": st.dictionaries(
                    st.sampled_from(
                        [
                            "meshguard.io/policy",
                            "meshguard.io/mode",
                            "meshguard.io/inject",
                            "sidecar.istio.io/inject",
                            "inject.istio.io/templates",
                            "sidecar.istio.io/status",
                        ]
                    ),
                    st.text(max_size=40)
                    | st.sampled_from(
                        [
                            "rules: [{from: app, to: cache, ports: [1]}]",
                            "audit",
                            "false",
                            '{"initContainers":["istio-init","istio-proxy"],"containers":null}',
                            '{"initContainers":null,"containers":["istio-proxy"]}',
                            '{"initContainers":[1],"containers":{}}',
                            "[]",
                        ]
                    ),
                )
            },
        )
        | _json,
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "containers": st.lists(_container, max_size=4) | _json,
                "initContainers": st.lists(_container, max_size=3) | _json,
                "ephemeralContainers": st.lists(_container, max_size=2) | _json,
                "shareProcessNamespace": st.booleans(),
                "hostNetwork": st.booleans(),
                "securityContext": _json,
                "volumes": _json,
            },
        )
        | _json,
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def _debug_review(pod: Any) -> dict[str, Any]:
    document = review(pod, operation="UPDATE")
    document["request"]["subResource"] = "ephemeralcontainers"
    return document


@given(st.one_of(_pod.map(review), _pod.map(_debug_review), _json.map(review), _json))
def test_any_review_gets_a_4xx_or_an_answer_with_the_same_uid(document):
    status, answer, _ = handle(json.dumps(document).encode(), settings=SETTINGS)
    assert status in {200, 400}
    if status == 200:
        response = answer["response"]
        assert response["uid"] == document["request"]["uid"]
        if not response["allowed"]:
            assert response["status"]["code"] in {400, 403}, response  # never "meshguard failed"
            assert response["status"]["message"]
    else:
        assert answer["error"]


def test_what_a_fix_changed_is_logged_and_recorded_on_the_pod(caplog):
    """Warnings reach only the pod's creator (for a Deployment, the ReplicaSet controller):
    the texts are logged and recorded in meshguard.io/status, where describe shows them."""
    pod = istio_pod()
    (app,) = pod["spec"]["containers"]
    app["securityContext"] = {**SAFE_CONTEXT, "runAsUser": 1337, "runAsGroup": 1000}
    with caplog.at_level(logging.INFO, logger="meshguard.webhook.review"):
        status, answer, _ = handle(json.dumps(review(pod)).encode(), settings=SETTINGS)
    assert status == 200 and answer["response"]["allowed"] is True
    warnings = answer["response"]["warnings"]
    assert any("assigned runAsUser 20000" in w for w in warnings), warnings
    (record,) = [r for r in caplog.records if r.getMessage() == "admission"]
    fields = record.fields  # type: ignore[attr-defined]
    assert any("assigned runAsUser 20000" in text for text in fields["warning_texts"]), fields
    injected = apply(answer, pod)
    recorded = json.loads(injected["metadata"]["annotations"]["meshguard.io/status"])
    assert any("assigned runAsUser 20000" in text for text in recorded["changes"]), recorded
    described = "\n".join(describe_pod_lines(injected))
    assert "changed by meshguard at admission (posture fixes):" in described
    assert "assigned runAsUser 20000" in described


def test_a_pod_that_needed_no_fix_records_no_changes():
    pod = istio_pod()
    _, answer, _ = handle(json.dumps(review(pod)).encode(), settings=SETTINGS)
    injected = apply(answer, pod)
    recorded = json.loads(injected["metadata"]["annotations"]["meshguard.io/status"])
    assert "changes" not in recorded


def describe_pod_lines(pod: dict[str, Any]) -> list[str]:
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    policy = parse_policy(view.annotations.get("meshguard.io/policy"))
    return describe(view, policy, mode=Mode.ENFORCE, compiled=None, settings=CompilerSettings())


@pytest.mark.parametrize("port", [15000, 15020])
def test_a_rule_opening_a_proxy_control_port_is_allowed_with_a_warning(port: int):
    pod = istio_pod()
    pod["metadata"].setdefault("annotations", {})["meshguard.io/policy"] = (
        f"rules: [{{from: app, to: proxy, ports: [{port}]}}]"
    )
    status, answer = post(review(pod))
    assert status == 200 and answer["response"]["allowed"] is True, answer
    warnings = answer["response"]["warnings"]
    assert any(f"opens the proxy's port {port} to app" in w for w in warnings), warnings


def test_an_http_rule_on_a_control_port_needs_no_warning():
    pod = istio_pod()
    pod["metadata"].setdefault("annotations", {})["meshguard.io/policy"] = (
        "rules: [{from: app, to: proxy, ports: [15020], http: {paths: [/quitquitquit]}}]"
    )
    _, answer = post(review(pod))
    assert not any("opens the proxy's port" in w for w in answer["response"].get("warnings", []))


@pytest.mark.parametrize(
    "relabel",
    [
        {"sidecar.istio.io/inject": "false"},
        {"istio.io/rev": "other"},
        {"security.istio.io/tlsMode": None, "service.istio.io/canonical-name": None},
    ],
    ids=["inject-false", "rev-changed", "istio-labels-removed"],
)
def test_a_relabelled_admitted_pod_still_has_its_debug_containers_reviewed(relabel):
    """Issue 30: after ``kubectl label pod P sidecar.istio.io/inject=false`` (allowed), the
    chart's admitted.meshguard.io entry still sends kubectl debug here (tests/charts/
    test_selection.py), and the review still refuses a container running as the proxy."""
    pod = injected_pod()
    labels = pod["metadata"].setdefault("labels", {})
    for key, value in relabel.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    annotations = pod["metadata"].setdefault("annotations", {})
    annotations.update({k: v for k, v in relabel.items() if k == "sidecar.istio.io/inject"})
    debug = {"name": "debugger", "image": "busybox", "securityContext": {**SAFE_DEBUG,
             "runAsUser": 1337}}  # fmt: skip
    _, answer = post(debug_review(pod, debug))
    assert answer["response"]["allowed"] is False
    assert "is the proxy's uid 1337" in answer["response"]["status"]["message"]
