"""Issue 23.1 against the real plugin path (a real network namespace, a scripted API server
over TLS): the node plugin installs only what meshguard's webhook signed for this very pod.
Each of these pods was started with the author's own rules before the attestation."""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest

from meshguard.attestation import generate, subject_of
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.rules.ruleset import _ruleset_from
from tests.cni.test_plugin_netns import (  # noqa: F401 - fixtures
    api,
    injected_pod,
    netns,
    plugin,
    serve,
)
from tests.support.keys import SIGNER
from tests.support.samples import istio_pod

pytestmark = pytest.mark.root

ALLOW_ALL = json.dumps({"defaultAction": "allow"})


def forged(*, settings: InjectSettings) -> dict[str, Any]:
    """What a workload owner writes without the webhook: `meshguard inject` output of their
    own choosing (allow everything), the admitted label, digests that all match."""
    pod = istio_pod(cni=True)
    pod["metadata"]["annotations"]["meshguard.io/policy"] = ALLOW_ALL
    inject_pod(pod["metadata"], pod["spec"], settings=settings)
    pod["metadata"]["uid"] = "uid-1"
    return pod


def nothing_installed(netns_name: str) -> bool:
    saved = subprocess.run(["ip", "netns", "exec", netns_name, "iptables-save"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    return "MESHGUARD" not in saved


def test_an_unsigned_ruleset_whose_digests_match_is_not_installed(netns, api):  # noqa: F811
    pod = forged(settings=InjectSettings(request_template=False))
    assert "meshguard.io/attestation" not in pod["metadata"]["annotations"]
    serve(pod)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and out["code"] == 103, out
    assert "pod demo/shop" in out["msg"] and "unsigned" in out["msg"]
    assert nothing_installed(netns)


def test_a_ruleset_signed_by_a_key_not_trusted_is_not_installed(netns, api):  # noqa: F811
    pod = forged(settings=InjectSettings(request_template=False, signer=generate()))
    serve(pod)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and out["code"] == 103, out
    assert "not trusted" in out["msg"]
    assert nothing_installed(netns)


@pytest.mark.parametrize(
    "move",
    [
        lambda pod: pod["spec"].__setitem__("serviceAccountName", "other"),
        lambda pod: pod["spec"]["containers"][0]["securityContext"].__setitem__("runAsUser", 4242),
        lambda pod: pod["metadata"].__setitem__("namespace", "elsewhere"),
    ],
    ids=["service-account", "container-uid", "namespace"],
)
def test_signed_annotations_replayed_onto_another_pod_are_not_installed(netns, api, move):  # noqa: F811
    """The webhook signed pod A's annotations; pod B (another service account, another uid,
    another namespace) carries a copy of them."""
    signed = injected_pod()  # signed by the trusted key, for demo/shop as admitted
    other = copy.deepcopy(signed)
    move(other)
    other["metadata"]["namespace"] = other["metadata"].get("namespace", "demo")
    serve(other)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and out["code"] == 103, out
    assert "signed for another pod" in out["msg"]
    assert nothing_installed(netns)


def test_a_signed_status_with_another_ruleset_is_not_installed(netns, api):  # noqa: F811
    """The attestation of an admitted pod, with the ruleset (and status) of a forged one."""
    pod = injected_pod()
    fake = forged(settings=InjectSettings(request_template=False))
    for key in ("meshguard.io/ruleset", "meshguard.io/status"):
        pod["metadata"]["annotations"][key] = fake["metadata"]["annotations"][key]
    serve(pod)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and out["code"] == 103, out
    assert "not the text meshguard's webhook signed" in out["msg"]
    assert nothing_installed(netns)


def test_the_signed_pod_installs(netns, api):  # noqa: F811
    serve(injected_pod())
    assert plugin("ADD", netns, api)[0] == 0
    assert not nothing_installed(netns)
    assert SIGNER.key_id in injected_pod()["metadata"]["annotations"]["meshguard.io/attestation"]


@pytest.mark.parametrize(
    "value",
    ['1337; include "/etc/passwd";', "1337 } table inet evil { }", "1337\n*filter\n-F\nCOMMIT"],
)
def test_a_signed_ruleset_with_a_hostile_value_never_reaches_netfilter(netns, api, value):  # noqa: F811
    """Even signed (a webhook bug, a stolen key), a value that could break out of its place
    in the nft or iptables-restore text is refused where the plugin reads the document."""
    pod = injected_pod()
    annotations = pod["metadata"]["annotations"]
    document = json.loads(annotations["meshguard.io/ruleset"])
    table = document["ipv4"]["tables"][0]
    table["rules"][0] = [table["rules"][0][0], f"-m owner --uid-owner {value} -j RETURN"]
    document["digest"] = _ruleset_from(document).digest  # the digest an attacker computes
    annotations["meshguard.io/ruleset"] = json.dumps(document)
    status = json.loads(annotations["meshguard.io/status"])
    status["ruleset"] = document["digest"]
    annotations["meshguard.io/status"] = json.dumps(status)
    del annotations["meshguard.io/attestation"]
    annotations["meshguard.io/attestation"] = SIGNER.attest(
        subject=subject_of(metadata=pod["metadata"], spec=pod["spec"]), annotations=annotations
    )
    serve(pod)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and out["code"] == 100, out
    assert "ruleset: unexpected content" in out["msg"] and "root:" not in out["msg"]
    assert nothing_installed(netns)
