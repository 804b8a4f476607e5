"""The chart's signing key: the private key in the webhook only, the public keys in every
consumer, stable under GitOps with an existing Secret, rotatable with overlap."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from meshguard.attestation import TrustedKeys, generate, load_signer, private_pem
from tests.charts.test_chart import container, one, render

OTHER = generate()


def pod_spec(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, kind, name)["spec"]["template"]["spec"]
    return spec


def secret_volumes(spec: dict[str, Any]) -> set[str]:
    return {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}


def test_the_generated_key_signs_for_the_trusted_keys_and_only_the_webhook_has_it(tmp_path: Path):
    objects = render({"cni": {"enabled": True}})
    secret = one(objects, "Secret", "meshguard-attestation")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(base64.b64decode(secret["data"]["signing-key.pem"]))
    signer = load_signer(key_file)
    config = one(objects, "ConfigMap", "meshguard-trusted-keys")
    trusted = TrustedKeys.from_pem("".join(config["data"].values()), origin="ConfigMap")
    assert trusted.ids == (signer.key_id,)
    assert "PRIVATE" not in "".join(config["data"].values())
    webhook = pod_spec(objects, "Deployment", "meshguard-webhook")
    assert "meshguard-attestation" in secret_volumes(webhook)
    assert (
        "--signing-key=/etc/meshguard/attestation/signing-key.pem"
        in container(one(objects, "Deployment", "meshguard-webhook"))["args"]
    )
    for kind, name in (("Deployment", "meshguard-authz"), ("DaemonSet", "meshguard-cni-node")):
        spec = pod_spec(objects, kind, name)
        assert "meshguard-attestation" not in secret_volumes(spec), name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["trusted-keys"]["configMap"]["name"] == "meshguard-trusted-keys"
        args = next(c for c in spec["containers"])["args"]
        assert "--trusted-keys=/etc/meshguard/trusted-keys" in args, name


def test_an_existing_secret_renders_the_same_every_time_and_rotates_with_overlap():
    new = generate()
    values = {
        "attestation": {
            "mode": "existingSecret",
            "existingSecret": "my-signing-key",
            "publicKeys": [OTHER.public_pem(), new.public_pem()],
        }
    }
    first, second = render(values), render(values)
    assert first == second  # nothing generated: stable under GitOps
    assert not [
        o for o in first if o["kind"] == "Secret" and "attestation" in o["metadata"]["name"]
    ]
    webhook = pod_spec(first, "Deployment", "meshguard-webhook")
    assert "my-signing-key" in secret_volumes(webhook)
    config = one(first, "ConfigMap", "meshguard-trusted-keys")
    trusted = TrustedKeys.from_pem("".join(config["data"].values()), origin="ConfigMap")
    assert set(trusted.ids) == {OTHER.key_id, new.key_id}


@pytest.mark.parametrize(
    "attestation",
    [{"mode": "existingSecret"}, {"mode": "existingSecret", "existingSecret": "k"}],
)
def test_an_existing_secret_without_its_public_key_is_refused(attestation):
    with pytest.raises(Exception, match=r"attestation\.(existingSecret|publicKeys)"):
        render({"attestation": attestation})


def test_a_private_key_is_refused_as_a_public_key():
    with pytest.raises(Exception, match="publicKeys"):
        render({"attestation": {"publicKeys": [private_pem(OTHER)]}})


def test_refused_pod_opt_out_reads_namespaces_and_nothing_else():
    objects = render({"webhook": {"podOptOut": "refuse"}})
    webhook = one(objects, "Deployment", "meshguard-webhook")
    assert "--opt-out=refuse" in container(webhook)["args"]
    assert webhook["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    role = one(objects, "ClusterRole", "meshguard-webhook-namespaces")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]
    binding = one(objects, "ClusterRoleBinding", "meshguard-webhook-namespaces")
    assert binding["subjects"][0]["name"] == "meshguard-webhook"
    default = render({})
    assert "--opt-out=allow" in container(one(default, "Deployment", "meshguard-webhook"))["args"]
    assert not [o for o in default if o["metadata"]["name"] == "meshguard-webhook-namespaces"]
