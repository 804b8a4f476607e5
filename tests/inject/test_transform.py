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
from meshguard.init_container import InitContainerSettings, init_container, ruleset_volume
from meshguard.inject.istio import istio_template
from meshguard.inject.l7 import L7_VOLUME
from meshguard.inject.posture import PostureAction, PostureSettings
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import read_pod
from meshguard.rules.ruleset import Ruleset
from tests.support.keys import SIGNER, signing_key_file
from tests.support.samples import SAFE_CONTEXT, injected_sample_names, istio_pod
from tests.support.shared import INJECTOR_SAMPLES, shared_file

PROJECT = Path(__file__).resolve().parents[2]
SETTINGS = InjectSettings(request_template=False, signer=SIGNER)
K8S_VERSION = kubernetes_validate.latest_version()
NOT_INJECTED_BY_ISTIO = {"custom-template.yaml.injected", "hello-host-network.yaml.injected"}
#: Istio's gateway template: the proxy alone, no init step (left alone, see below).
GATEWAYS = {"gateway.yaml.injected"}
SAMPLES = injected_sample_names() or ["(../shared absent)"]

#: JSON pointers (prefixes) meshguard may touch; anything else must stay as Istio left it.
#: meshguard.io/mode: the effective mode (here the default, enforce) is recorded on the pod.
OWN_ANNOTATIONS = (
    "meshguard.io~1ruleset",
    "meshguard.io~1status",
    "meshguard.io~1l7-rbac",
    "meshguard.io~1mode",
    "meshguard.io~1attestation",
    "sidecar.istio.io~1statsInclusionRegexps",  # the listener's stats (meshguard.inject.stats)
)
OWN_LABELS = {"meshguard.io/admitted": "true", "meshguard.io/l7-engine": "native"}


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
        if name in NOT_INJECTED_BY_ISTIO | GATEWAYS:
            assert outcome is Outcome.SKIPPED
            continue
        assert outcome is Outcome.INJECTED
        init_names = [c["name"] for c in template.spec["initContainers"]]
        cni = name.endswith(".cni.injected")
        anchor = "istio-validation" if cni else "istio-init"
        own = "meshguard-validation" if cni else "meshguard-init"
        if anchor in init_names:
            assert init_names[init_names.index(anchor) + 1] == own
        else:
            assert init_names[0] == own
        assert init_names.count(own) == 1
        assert init_names.count("meshguard-init" if cni else "meshguard-validation") == 0
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
            if c["name"]
            not in {
                "istio-init",
                "istio-validation",
                "meshguard-init",
                "meshguard-validation",
                "istio-proxy",
            }
        )
        assert len(set(status["containers"].values())) == len(status["containers"])
        assert template.metadata["labels"]["meshguard.io/admitted"] == "true"


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
                or _is_admitted_label(op)
                or "/initContainers" in path
                or "/volumes" in path
                or "/volumeMounts" in path  # the RBAC document, mounted into istio-proxy
                or "/securityContext" in path  # posture fixes, each reported as a warning
            ), op


def _is_admitted_label(op: dict[str, Any]) -> bool:
    """meshguard's labels, added alone or with a labels map the pod did not have."""
    for key, value in OWN_LABELS.items():
        if op["path"].endswith("/labels/" + key.replace("/", "~1")):
            return bool(op["value"] == value)
    return op["path"].endswith("/metadata/labels") and op["value"] == OWN_LABELS


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
def test_the_cli_gives_the_same_result_as_the_transform(name: str, tmp_path):
    documents = with_policy(load(name))
    text = yaml.safe_dump_all(documents, sort_keys=False)
    key = signing_key_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "inject", "-f", "-", "--signing-key", str(key)],
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
    result = inject_pod(template.metadata, template.spec, settings=InjectSettings(signer=SIGNER))
    assert result.outcome is Outcome.TEMPLATE_REQUESTED
    assert template.metadata["annotations"]["inject.istio.io/templates"] == "sidecar,meshguard"
    template.metadata["annotations"]["inject.istio.io/templates"] = "custom,sidecar"
    inject_pod(template.metadata, template.spec, settings=InjectSettings(signer=SIGNER))
    assert template.metadata["annotations"]["inject.istio.io/templates"] == (
        "custom,sidecar,meshguard"
    )
    # a custom template alone adds no istio-init: the root meshguard-init is not asked for
    # (tests/inject/test_init_step.py)
    template.metadata["annotations"]["inject.istio.io/templates"] = "custom"
    result = inject_pod(template.metadata, template.spec, settings=InjectSettings(signer=SIGNER))
    assert result.outcome is Outcome.SKIPPED
    assert template.metadata["annotations"]["inject.istio.io/templates"] == "custom"


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
    settings = InjectSettings(posture=PostureSettings(default_action=PostureAction.DENY))
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
    # the one the webhook inserts also has the signer's public key, for its consistency check
    assert inserted == init_container(InitContainerSettings(trusted_keys=SIGNER.public_pem()))


def test_a_template_placed_container_is_moved_after_istio_init_and_normalized():
    (template,) = pod_templates(load("pod.yaml.injected"))
    stale = {**init_container(InitContainerSettings()), "image": "old"}
    template.spec["initContainers"].append(stale)  # where a template merge would append it
    inject_pod(template.metadata, template.spec, settings=SETTINGS)
    names = [c["name"] for c in template.spec["initContainers"]]
    assert names[:2] == ["istio-init", "meshguard-init"]
    assert names.count("meshguard-init") == 1
    assert template.spec["initContainers"][1] == init_container(
        InitContainerSettings(trusted_keys=SIGNER.public_pem())
    )


# --- Istio's own containers in the samples; disguised ones in the transform ---------------

ISTIO_OWN = ("istio-init", "istio-validation", "istio-proxy", "meshguard-init")
DENY = InjectSettings(
    request_template=False, posture=PostureSettings(default_action=PostureAction.DENY)
)


def harden_workload(template: Any) -> None:
    """Give every workload container of a sample a context that passes every check."""
    view = read_pod(metadata=template.metadata, spec=template.spec)
    for uid, container in enumerate(view.workload, start=2000):
        template.spec[container.field][container.index]["securityContext"] = {
            "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }  # fmt: skip


@pytest.mark.parametrize("name", SAMPLES)
def test_istio_s_own_containers_in_every_sample_pass_deny_mode_untouched(name: str):
    documents = with_policy(load(name))
    for template in pod_templates(documents):
        harden_workload(template)
        istio_before = {
            c["name"]: copy.deepcopy(c)
            for key in ("initContainers", "containers")
            for c in template.spec.get(key) or []
            if c["name"] in ISTIO_OWN
        }
        result = inject_pod(template.metadata, template.spec, settings=DENY)
        assert not any(n in w for w in result.warnings for n in ISTIO_OWN), result.warnings
        if name in NOT_INJECTED_BY_ISTIO | GATEWAYS:
            continue
        assert result.outcome is Outcome.INJECTED
        view = read_pod(metadata=template.metadata, spec=template.spec)
        assert view.proxy is not None
        own_steps = {"istio-init", "istio-validation", "meshguard-init", "meshguard-validation"}
        assert {c.name for c in view.mesh_init} <= own_steps
        own = "meshguard-validation" if name.endswith(".cni.injected") else "meshguard-init"
        assert own in {c.name for c in view.mesh_init}
        for container in template.spec.get("initContainers", []) + template.spec["containers"]:
            if container["name"] in istio_before:
                # only the native engine's RBAC document is added to the proxy's mounts
                mounts = [m for m in container.get("volumeMounts", []) if m["name"] != L7_VOLUME]
                assert {**container, "volumeMounts": mounts} == {
                    **istio_before[container["name"]],
                    "volumeMounts": mounts,
                }
                before = istio_before[container["name"]].get("volumeMounts", [])
                assert mounts == before


def test_a_sample_with_a_host_path_is_refused_naming_volume_and_path():
    (template,) = pod_templates(load("statefulset.yaml.injected", as_is=True))
    with pytest.raises(RefusedError) as caught:
        inject_pod(template.metadata, template.spec, settings=SETTINGS)
    assert (
        "pod: spec.volumes[data].hostPath.path: volume 'data' mounts the node's /mnt/disks/ssd0"
        in (str(caught.value))
    )
    assert "[host-path]" in str(caught.value)


TRANSFORM_ATTACKS = {
    "privileged": ({"privileged": True}, "privileged"),
    "root-net-admin": (
        {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}},
        "net-capability",
    ),
    "uid-1337": ({"runAsUser": 1337}, "proxy-uid"),
    "gid-1337": ({"runAsGroup": 1337}, "proxy-gid"),
}


def disguised_pod(name: str, place: str, attack: str, *, native: bool = True) -> dict[str, Any]:
    pod = istio_pod(cni=name == "istio-init", native=native)
    context = {**SAFE_CONTEXT, "runAsUser": 3000, "runAsGroup": 3000,
               **copy.deepcopy(TRANSFORM_ATTACKS[attack][0])}  # fmt: skip
    container = {"name": name, "image": "evil:1", "securityContext": context}
    if place == "regular":
        pod["spec"]["containers"].insert(0, container)
    else:
        if place == "native-sidecar":
            container["restartPolicy"] = "Always"
        pod["spec"]["initContainers"].append(container)
    return pod


@pytest.mark.parametrize("attack", sorted(TRANSFORM_ATTACKS))
@pytest.mark.parametrize("place", ["regular", "native-sidecar", "unlisted-init"])
@pytest.mark.parametrize("name", ["istio-init", "istio-validation"])
def test_disguised_istio_init_steps_are_refused_in_deny_and_fixed_in_fix(name, place, attack):
    pod = disguised_pod(name, place, attack)
    with pytest.raises(RefusedError) as caught:
        inject_pod(pod["metadata"], pod["spec"], settings=DENY)
    assert f"container {name!r} (spec." in str(caught.value)
    assert f"[{TRANSFORM_ATTACKS[attack][1]}]" in str(caught.value)
    result = inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    assert result.outcome is Outcome.INJECTED
    assert any(w.startswith(f"meshguard fixed container {name!r}") for w in result.warnings)
    status = json.loads(pod["metadata"]["annotations"]["meshguard.io/status"])
    assert name in status["containers"]  # a workload container: it has rules of its own
    assert status["containers"][name] != 1337  # root stays root, without NET_ADMIN
    context = next(
        c for key in ("initContainers", "containers") for c in pod["spec"][key]
        if c["name"] == name
    )["securityContext"]  # fmt: skip
    assert context.get("privileged") is not True and context["runAsGroup"] != 1337
    assert "NET_ADMIN" not in context["capabilities"].get("add", [])
    init_names = [c["name"] for c in pod["spec"]["initContainers"]]
    real_step = "istio-validation" if name == "istio-init" else "istio-init"
    own = "meshguard-validation" if real_step == "istio-validation" else "meshguard-init"
    assert init_names[init_names.index(real_step) + 1] == own


@pytest.mark.parametrize("settings", [SETTINGS, DENY], ids=["fix", "deny"])
@pytest.mark.parametrize("attack", sorted(TRANSFORM_ATTACKS))
@pytest.mark.parametrize("place", ["regular", "native-sidecar", "unlisted-init"])
def test_a_disguised_meshguard_init_is_refused_the_name_is_reserved(place, attack, settings):
    pod = disguised_pod("meshguard-init", place, attack)
    with pytest.raises(RefusedError, match=r"container 'meshguard-init' \(spec\.\w+\[\d\]\) is"
                       r" not meshguard's init container"):  # fmt: skip
        inject_pod(pod["metadata"], pod["spec"], settings=settings)


def test_meshguard_init_with_meshguard_s_spec_but_more_privileges_is_refused():
    pod = istio_pod()
    own = init_container(InitContainerSettings())
    own["securityContext"] = {**own["securityContext"], "privileged": True}
    pod["spec"]["initContainers"].insert(1, own)
    with pytest.raises(RefusedError, match="is not meshguard's init container"):
        inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)


@pytest.mark.parametrize("settings", [SETTINGS, DENY], ids=["fix", "deny"])
@pytest.mark.parametrize(
    ("native", "place"),
    [(True, "regular"), (True, "unlisted-init"), (False, "native-sidecar"),
     (False, "unlisted-init")],
    ids=["status-native/regular", "status-native/init", "status-regular/native-sidecar",
         "status-regular/init"],
)  # fmt: skip
def test_an_istio_proxy_where_istio_s_status_does_not_put_it_is_refused(native, place, settings):
    """The status says where Istio put its proxy; an 'istio-proxy' elsewhere (uid 1337) is
    not the proxy, and without the proxy meshguard cannot protect the pod: refused."""
    pod = istio_pod(native=native)
    for key in ("initContainers", "containers"):
        pod["spec"][key] = [c for c in pod["spec"][key] if c["name"] != "istio-proxy"]
    fake = disguised_pod("istio-proxy", place, "uid-1337")["spec"]
    moved = fake["containers"][0] if place == "regular" else fake["initContainers"][-1]
    pod["spec"]["containers" if place == "regular" else "initContainers"].append(moved)
    with pytest.raises(RefusedError, match=r"container 'istio-proxy' \(spec\.\w+\[\d\]\) is not"
                       r" where sidecar\.istio\.io/status says Istio put its proxy"):  # fmt: skip
        inject_pod(pod["metadata"], pod["spec"], settings=settings)


def test_without_any_istio_status_the_pod_is_not_taken_for_istio_injected():
    """A pod that carries Istio's layout but no status was not injected by Istio: nothing in
    it is Istio's, so it is never protected as if it were (the webhook asks Istio for the
    template, and reviews the pod when Istio has injected it)."""
    pod = istio_pod()
    del pod["metadata"]["annotations"]["sidecar.istio.io/status"]
    pod["spec"]["initContainers"].append({"name": "istio-validation", "image": "evil",
        "securityContext": {**SAFE_CONTEXT, "runAsUser": 3000, "runAsGroup": 3000,
                            "privileged": True}})  # fmt: skip
    result = inject_pod(pod["metadata"], pod["spec"], settings=DENY)
    assert result.outcome is not Outcome.INJECTED
    assert result.ruleset is None


def test_a_cronjob_from_kube_inject_carries_its_istio_status_down_to_the_pod_template():
    path = shared_file("istio-injector-samples", "cronjob.yaml.injected")
    (template,) = pod_templates(read_documents(path))
    assert "sidecar.istio.io/status" in template.metadata["annotations"]
    result = inject_pod(template.metadata, template.spec, settings=InjectSettings(signer=SIGNER))
    assert result.outcome is Outcome.INJECTED


@pytest.mark.parametrize(
    ("context", "check"),
    [
        ({**SAFE_CONTEXT, "runAsUser": 1337, "runAsGroup": 30000}, "proxy-uid"),
        ({**SAFE_CONTEXT, "runAsUser": 30000, "runAsGroup": 1337}, "proxy-gid"),
        ({**SAFE_CONTEXT, "runAsUser": 1000, "runAsGroup": 30000}, "shared-uid"),
        (None, "missing-uid"),
    ],
)
def test_meshguard_inject_refuses_an_ephemeral_container_even_in_fix_mode(context, check):
    pod = istio_pod()
    debug: dict[str, Any] = {"name": "debugger", "image": "busybox"}
    if context:
        debug["securityContext"] = context
    pod["spec"]["ephemeralContainers"] = [debug]
    with pytest.raises(RefusedError, match=rf"ephemeral container 'debugger': .*\[{check}\]"):
        inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)


def test_a_safe_ephemeral_container_gets_no_rules_and_no_status_entry():
    pod = istio_pod()
    pod["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox",
        "securityContext": {**SAFE_CONTEXT, "runAsUser": 30000, "runAsGroup": 30000}}]  # fmt: skip
    result = inject_pod(pod["metadata"], pod["spec"], settings=DENY)
    assert result.outcome is Outcome.INJECTED
    status = json.loads(pod["metadata"]["annotations"]["meshguard.io/status"])
    assert "debugger" not in status["containers"]
    assert result.ruleset is not None
    assert "30000" not in result.ruleset.ipv4.payload()


def test_the_cli_refuses_a_disguised_container_in_deny_mode():
    pod = disguised_pod("istio-validation", "regular", "privileged")
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "inject", "-f", "-", "--posture-action", "deny"],
        input=yaml.safe_dump(pod), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "container 'istio-validation' (spec.containers[0], not Istio's" in done.stderr


def test_an_istio_gateway_gets_nothing_privileged_and_the_reason_is_given():
    """Istio's gateway template keeps the pod capability-free (no istio-init): meshguard
    adds no root init container with NET_ADMIN/NET_RAW to it, and says why."""
    documents = load("gateway.yaml.injected")
    before = copy.deepcopy(documents)
    (template,) = pod_templates(documents)
    result = inject_pod(template.metadata, template.spec, settings=SETTINGS)
    assert result.outcome is Outcome.SKIPPED
    assert "Istio gateway pod (injection template gateway)" in result.reason
    assert "no privileged init container" in result.reason
    assert documents == before
    # the sidecar template's proxy-only pod has istio-init (NET_ADMIN already): protected
    (sidecar,) = pod_templates(load("only-proxy-container.yaml.injected"))
    assert inject_pod(sidecar.metadata, sidecar.spec, settings=SETTINGS).outcome is (
        Outcome.INJECTED
    )


def _unmeshed(pod: dict[str, Any]) -> dict[str, Any]:
    """``pod`` before Istio's injection: its workload alone, no status."""
    pod["metadata"]["annotations"].pop("sidecar.istio.io/status")
    pod["spec"]["initContainers"] = []
    pod["spec"]["containers"] = [c for c in pod["spec"]["containers"] if c["name"] == "app"]
    return pod


def _gateway(_: dict[str, Any]) -> dict[str, Any]:
    """A pod as Istio's gateway template makes it: the proxy alone, no init step."""
    pod = istio_pod(native=False)
    pod["spec"]["initContainers"] = []
    pod["spec"]["containers"] = [c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy"]
    return pod


def _opted_out(pod: dict[str, Any]) -> dict[str, Any]:
    pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    return pod


@pytest.mark.parametrize(
    ("shape", "settings", "outcome"),
    [
        (_unmeshed, SETTINGS, Outcome.SKIPPED),
        (_unmeshed, InjectSettings(), Outcome.TEMPLATE_REQUESTED),
        (_gateway, SETTINGS, Outcome.SKIPPED),
        (_opted_out, SETTINGS, Outcome.SKIPPED),
        (lambda pod: pod, SETTINGS, Outcome.INJECTED),
    ],
    ids=["no-proxy", "no-proxy-template", "gateway", "opted-out", "injected"],
)
def test_a_misspelled_annotation_is_warned_on_every_path(shape, settings, outcome):
    """Whatever meshguard does with the pod, a misspelled ``meshguard.io/*`` key is warned
    (the no-istio-proxy skip dropped it), next to the removal of a forged mark."""
    pod = shape(istio_pod())
    pod["metadata"]["annotations"]["meshguard.io/polciy"] = "x"
    pod["metadata"]["labels"] = {"meshguard.io/admitted": "true"}  # forged
    result = inject_pod(pod["metadata"], pod["spec"], settings=settings)
    assert result.outcome is outcome, result.reason
    assert any(
        w.startswith("unknown annotation meshguard.io/polciy") and "meshguard.io/policy?" in w
        for w in result.warnings
    ), result.warnings
    if outcome is not Outcome.INJECTED:
        assert any("meshguard removed label meshguard.io/admitted" in w for w in result.warnings)
        assert "meshguard.io/admitted" not in pod["metadata"]["labels"]
