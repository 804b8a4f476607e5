"""``meshguard describe`` finds the pods Istio injected without meshguard.

The input is what an operator pipes in: ``kubectl get namespaces,pods -A -o yaml``, a
``kind: List`` of Pods (and Namespaces). The pods are built from Istio's real injector
outputs in ``../shared/istio-injector-samples`` (each workload's pod template becomes the
Pod the ReplicaSet controller would create), some of them passed through ``meshguard inject``
as the webhook would have.
"""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshguard.cli import main
from meshguard.cli.describe import EXIT_UNPROTECTED
from meshguard.describe import Protection, protection
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import pod_templates, read_documents
from tests.support.keys import SIGNER
from tests.support.shared import shared_file

#: Istio-injected samples whose pods carry Istio's sidecar (istio-init + istio-proxy, CNI
#: mode's istio-validation, a native sidecar, a gateway, a CronJob's pod).
INJECTED = (
    "hello.yaml.injected",
    "hello.yaml.cni.injected",
    "native-sidecar.yaml.injected",
    "pod.yaml.injected",
    "two_container.yaml.injected",
    "cronjob.yaml.injected",
    "statefulset.yaml.injected",
    "gateway.yaml.injected",
)
#: Samples Istio did not give a sidecar: hostNetwork (Istio skips it) and a custom template
#: that adds no proxy.
NO_SIDECAR = ("hello-host-network.yaml.injected", "custom-template.yaml.injected")


def pods_of(sample: str, namespace: str = "shop") -> list[dict[str, Any]]:
    """The Pods a cluster runs for a sample (one per pod template), as kubectl shows them."""
    path = shared_file("istio-injector-samples", sample)
    pods = []
    for template in pod_templates(read_documents(path)):
        metadata = copy.deepcopy(template.metadata)
        prefix = sample.replace("_", "-").replace(".", "-")  # unique in the cluster
        metadata["name"] = f"{prefix}-{template.name}-{len(pods)}"
        metadata["namespace"] = namespace
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": metadata,
                "spec": copy.deepcopy(template.spec),
            }
        )
    return pods


def with_meshguard(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as the webhook admits it (meshguard.io/status, meshguard-init)."""
    pod = copy.deepcopy(pod)
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(signer=SIGNER))
    assert "meshguard.io/status" in pod["metadata"]["annotations"]
    return pod


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}},
    }


def kubectl_list(*items: dict[str, Any]) -> str:
    """``kubectl get ... -o yaml`` output."""
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "items": list(items), "metadata": {}}
    )


def describe(tmp_path: Path, text: str, *flags: str) -> tuple[int, str]:
    source = tmp_path / "pods.yaml"
    source.write_text(text)
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["describe", "-f", str(source), *flags])
    return code, out.getvalue()


def unprotected_names(output: str) -> set[str]:
    """Pods flagged by --only-unprotected (one ``Pod ns/name: UNPROTECTED: ...`` line each)."""
    flagged = set()
    for line in output.splitlines():
        head, _, rest = line.partition(": ")
        if head.startswith("Pod ") and rest.startswith("UNPROTECTED:"):
            flagged.add(head.removeprefix("Pod "))
    return flagged


# --- the verdict of each real sample -----------------------------------------------------


# A gateway is left alone on purpose: see the gateway test below.
@pytest.mark.parametrize("sample", [name for name in INJECTED if name != "gateway.yaml.injected"])
def test_istio_injected_pods_without_meshguard_are_unprotected(sample: str) -> None:
    for pod in pods_of(sample):
        verdict = protection(pod["metadata"], pod["spec"])
        assert verdict.protection is Protection.UNPROTECTED, pod["metadata"]["name"]
        assert "UNPROTECTED: Istio injected its sidecar" in verdict.line
        assert "no meshguard.io/status" in verdict.line


@pytest.mark.parametrize("sample", ["hello.yaml.injected", "hello.yaml.cni.injected"])
def test_pods_meshguard_admitted_are_protected(sample: str) -> None:
    for pod in map(with_meshguard, pods_of(sample)):
        assert protection(pod["metadata"], pod["spec"]).protection is Protection.PROTECTED


@pytest.mark.parametrize("sample", NO_SIDECAR)
def test_pods_without_istios_sidecar_are_not_flagged(sample: str) -> None:
    for pod in pods_of(sample):
        assert protection(pod["metadata"], pod["spec"]).protection is Protection.NO_SIDECAR
    (plain,) = pods_of("hello.yaml.injected")
    del plain["metadata"]["annotations"]["sidecar.istio.io/status"]
    plain["spec"]["initContainers"] = []
    plain["spec"]["containers"] = plain["spec"]["containers"][:1]
    assert protection(plain["metadata"], plain["spec"]).protection is Protection.NO_SIDECAR


def test_a_proxy_without_istios_status_is_still_flagged() -> None:
    """Deliberately broad: an istio-proxy container is Istio's sidecar for this check."""
    (pod,) = pods_of("hello.yaml.injected")
    del pod["metadata"]["annotations"]["sidecar.istio.io/status"]
    assert protection(pod["metadata"], pod["spec"]).protection is Protection.UNPROTECTED


def test_opted_out_pods_are_reported_but_not_unprotected() -> None:
    (pod,) = pods_of("pod.yaml.injected")
    pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    verdict = protection(pod["metadata"], pod["spec"])
    assert verdict.protection is Protection.OPTED_OUT
    assert 'opted out of meshguard (meshguard.io/inject: "false")' in verdict.line


# --- the command over a cluster's pods ---------------------------------------------------


def cluster() -> tuple[str, set[str]]:
    """A cluster's ``kubectl get namespaces,pods -A -o yaml`` and the pods that must be
    flagged."""
    unprotected = [pod for sample in INJECTED for pod in pods_of(sample)]
    protected = [with_meshguard(pod) for pod in pods_of("hello.yaml.injected")]
    protected += [with_meshguard(pod) for pod in pods_of("hello.yaml.cni.injected")]
    for pod in protected:
        pod["metadata"]["name"] += "-protected"
    plain = [pod for sample in NO_SIDECAR for pod in pods_of(sample)]
    opted_out_pod = pods_of("two_container.yaml.injected")[0]
    opted_out_pod["metadata"]["name"] = "opted-out"
    opted_out_pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    legacy = pods_of("hello.yaml.injected", namespace="legacy")  # namespace opted out
    items = [
        namespace("shop", **{"istio-injection": "enabled"}),
        namespace("legacy", **{"istio-injection": "enabled", "meshguard.io/inject": "disabled"}),
        *protected,
        *unprotected,
        *plain,
        opted_out_pod,
        *legacy,
    ]
    gateways = {p["metadata"]["name"] for p in pods_of("gateway.yaml.injected")}
    # a gateway is left alone on purpose: counted with the opted-out pods
    expected = {f"shop/{p['metadata']['name']}" for p in unprotected} - {
        f"shop/{name}" for name in gateways
    }
    return kubectl_list(*items), expected


def test_only_unprotected_lists_exactly_the_pods_without_meshguard(tmp_path: Path) -> None:
    text, expected = cluster()
    code, out = describe(tmp_path, text, "--only-unprotected")
    assert code == 0
    assert unprotected_names(out) == expected
    summary = out.splitlines()[-1]
    # one unprotected pod per injected sample but the gateway, 2 protected, 1 opted-out pod,
    # 1 pod in an opted-out namespace and the gateway; the pods without a sidecar are not
    # counted
    assert summary.startswith(f"UNPROTECTED: {len(expected)} of {len(expected) + 5} pod(s)")
    assert "3 opted out" in summary
    assert len(out.splitlines()) == len(expected) + 1  # nothing else is printed


def test_fail_on_unprotected_exits_non_zero(tmp_path: Path) -> None:
    text, _ = cluster()
    code, _ = describe(tmp_path, text, "--only-unprotected", "--fail-on-unprotected")
    assert code == EXIT_UNPROTECTED == 3


def test_a_fully_protected_cluster_passes(tmp_path: Path) -> None:
    protected = [with_meshguard(p) for p in pods_of("hello.yaml.injected")]
    plain = pods_of("hello-host-network.yaml.injected")
    text = kubectl_list(namespace("shop"), *protected, *plain)
    code, out = describe(tmp_path, text, "--only-unprotected", "--fail-on-unprotected")
    assert code == 0
    assert out.strip() == "every pod with Istio's sidecar has meshguard (1 pod(s))"


def test_full_description_flags_each_unprotected_pod(tmp_path: Path) -> None:
    (unprotected,) = pods_of("pod.yaml.injected")
    (protected,) = map(with_meshguard, pods_of("hello.yaml.injected"))
    code, out = describe(tmp_path, kubectl_list(unprotected, protected), "--fail-on-unprotected")
    assert code == EXIT_UNPROTECTED
    *body, summary = out.splitlines()
    flagged = [i for i, line in enumerate(body) if line.startswith("  UNPROTECTED:")]
    assert len(flagged) == 1
    assert body[flagged[0] - 1] == f"Pod shop/{unprotected['metadata']['name']}:"
    assert summary.startswith("UNPROTECTED: 1 of 2 pod(s) with Istio's sidecar have no meshguard")
    assert "status: not injected by meshguard yet" in out  # the description is still there


def test_workload_templates_are_not_judged(tmp_path: Path) -> None:
    """A Deployment's template says nothing about its pods: the webhook injects those."""
    text = shared_file("istio-injector-samples", "hello.yaml.injected").read_text()
    code, out = describe(tmp_path, text, "--fail-on-unprotected")
    assert code == 0
    assert "UNPROTECTED" not in out


def test_another_opt_out_label(tmp_path: Path) -> None:
    (pod,) = pods_of("hello.yaml.injected", namespace="legacy")
    text = kubectl_list(namespace("legacy", **{"example.com/meshguard": "off"}), pod)
    code, _ = describe(tmp_path, text, "--only-unprotected", "--fail-on-unprotected")
    assert code == EXIT_UNPROTECTED
    code, out = describe(
        tmp_path,
        text,
        "--only-unprotected",
        "--fail-on-unprotected",
        "--opt-out-label",
        "example.com/meshguard=off",
    )
    assert code == 0, out
    bad, _ = describe(tmp_path, text, "--opt-out-label", "no-equals-sign")
    assert bad == 2


def test_an_istio_gateway_is_reported_as_left_alone_not_unprotected() -> None:
    """The webhook skips Istio's gateway template pods on purpose (nothing privileged is
    added to them): the audit says so instead of failing on them."""
    for pod in pods_of("gateway.yaml.injected"):
        verdict = protection(pod["metadata"], pod["spec"])
        assert verdict.protection is Protection.OPTED_OUT
        assert "left alone by meshguard: Istio gateway pod" in verdict.line
