"""The authz server's NetworkPolicy admits every Istio-injected pod's sidecar, wherever Istio
selected it from (namespace label, pod label, revision), and nothing else; values.yaml says
so, and that its label is no proof of identity: the Check channel's mTLS is, and the chart
refuses plaintext unless told that any pod may then ask about any other."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.charts.test_chart import CHART, OBSERVED, one, render
from tests.support.kube import selector_matches
from tests.support.shared import INJECTOR_SAMPLES, shared_file


def _admits(policy: dict[str, Any], namespace: dict[str, str], pod: dict[str, str]) -> bool:
    (grpc,) = (rule for rule in policy["spec"]["ingress"] if rule["ports"][0]["port"] == "grpc")
    return any(
        selector_matches(peer.get("namespaceSelector"), namespace)
        and selector_matches(peer.get("podSelector"), pod)
        for peer in grpc["from"]
    )


@pytest.mark.parametrize(
    "namespace",
    [{}, {"istio-injection": "enabled"}, {"istio.io/rev": "canary"}, {"team": "shop"}],
)
def test_every_injected_pod_reaches_authz_whatever_its_namespace_labels(namespace):
    policy = one(render(OBSERVED), "NetworkPolicy", "meshguard-authz")
    shared_file("istio-injector-samples")
    injected = 0
    for path in sorted(INJECTOR_SAMPLES.glob("*.injected")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") not in {"Pod", "Deployment"}:
                continue
            template = document if document["kind"] == "Pod" else document["spec"]["template"]
            labels = (template.get("metadata") or {}).get("labels") or {}
            annotations = (template.get("metadata") or {}).get("annotations") or {}
            if "sidecar.istio.io/status" not in annotations:
                continue
            has_proxy = any(
                c.get("name") == "istio-proxy"
                for c in [*template["spec"].get("containers", []),
                          *template["spec"].get("initContainers", [])]
            )  # fmt: skip
            if has_proxy and labels.get("security.istio.io/tlsMode"):
                injected += 1
                assert _admits(policy, namespace, labels), path.name
    assert injected >= 5


def test_a_pod_without_istios_sidecar_is_not_admitted():
    policy = one(render(OBSERVED), "NetworkPolicy", "meshguard-authz")
    assert not _admits(policy, {"istio-injection": "enabled"}, {"app": "shop"})


def test_the_values_describe_the_selector_the_policy_uses():
    """values.yaml says what the template selects (a pod label, any namespace), and that the
    label is no proof: it used to describe namespace selection."""
    values = (CHART / "values.yaml").read_text()
    block = values[values.index("networkPolicy:") : values.index("metricsFrom:")]
    assert "security.istio.io/tlsMode" in block and "in any namespace" in block
    assert "mTLS identity" in block
    assert "(istio-injection=enabled or istio.io/rev set)" not in block
    policy = one(render(OBSERVED), "NetworkPolicy", "meshguard-authz")
    (grpc,) = (rule for rule in policy["spec"]["ingress"] if rule["ports"][0]["port"] == "grpc")
    assert grpc["from"][0] == {
        "namespaceSelector": {},
        "podSelector": {
            "matchExpressions": [{"key": "security.istio.io/tlsMode", "operator": "Exists"}]
        },
    }


def test_plaintext_checks_are_refused_unless_acknowledged():
    with pytest.raises(Exception, match="any pod that reaches the authz port"):
        render({"authz": {"mtls": {"enabled": False}}})
    plain = render({"authz": {"mtls": {"enabled": False, "insecureAnyCaller": True}}})
    args = one(plain, "Deployment", "meshguard-authz")["spec"]["template"]["spec"]
    assert "--insecure-plaintext" in args["containers"][0]["args"]
    assert render({"authz": {"mtls": {"insecureAnyCaller": True}}})  # harmless with mTLS on
