"""The loopback listener configuration: the committed files are the generated ones, Envoy
accepts the bootstrap, and the Istio objects validate against Istio's real CRD schemas."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshguard.authz.listener import IstioSettings, envoy_config_text, envoy_filter
from meshguard.sandbox.envoy import envoy_binary
from tests.support.shared import shared_file

PROJECT = Path(__file__).resolve().parents[2]
GENERATED = {
    "envoy/loopback-listener.yaml": "bootstrap",
    "istio/loopback-listener.envoyfilter.yaml": "envoyfilter",
    "istio/authz-provider.iop.yaml": "mesh-config",
}


@pytest.mark.parametrize(("path", "fmt"), sorted(GENERATED.items()))
def test_committed_configs_are_the_generated_ones(path: str, fmt: str):
    expected = envoy_config_text(fmt, authz_host="127.0.0.1", authz_port=9191, admin_port=15000)
    assert (PROJECT / path).read_text() == expected, (
        f"{path} is stale: regenerate with meshguard envoy-config --format {fmt} > {path}"
    )


def test_the_real_envoy_accepts_the_bootstrap():
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-path",
         str(PROJECT / "envoy/loopback-listener.yaml")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_the_real_envoy_accepts_the_envoyfilter_listeners_and_cluster(tmp_path: Path):
    """What the EnvoyFilter adds to a sidecar, as a bootstrap Envoy must accept."""
    patches = envoy_filter(IstioSettings())["spec"]["configPatches"]
    values = {p["applyTo"]: [] for p in patches}
    for patch in patches:
        values[patch["applyTo"]].append(patch["patch"]["value"])
    authz = IstioSettings().cluster
    bootstrap = {
        "static_resources": {
            "listeners": values["LISTENER"],
            "clusters": [
                *values["CLUSTER"],
                {
                    "name": authz,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "http2_protocol_options": {},
                },
            ],
        }
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-path", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def crd_schema(kind: str, version: str) -> dict[str, Any]:
    documents = yaml.safe_load_all(shared_file("istio-crds", "crd-all.gen.yaml").read_text())
    for document in documents:
        if document and document["spec"]["names"]["kind"] == kind:
            for entry in document["spec"]["versions"]:
                if entry["name"] == version:
                    schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
                    return schema
    raise AssertionError(f"no CRD schema for {kind} {version}")


def test_envoyfilter_validates_against_istios_crd_schema():
    document = yaml.safe_load((PROJECT / "istio/loopback-listener.envoyfilter.yaml").read_text())
    schema = crd_schema("EnvoyFilter", document["apiVersion"].split("/")[1])
    jsonschema.validate(document, schema)
    patches = document["spec"]["configPatches"]
    assert [(p["applyTo"], p["match"]["context"], p["patch"]["operation"]) for p in patches] == [
        ("LISTENER", "SIDECAR_OUTBOUND", "ADD"),
        ("LISTENER", "SIDECAR_OUTBOUND", "ADD"),
        ("CLUSTER", "SIDECAR_OUTBOUND", "ADD"),
    ]


def test_a_broken_envoyfilter_fails_the_schema():
    document = envoy_filter(IstioSettings())
    document["spec"]["configPatches"][0]["applyTo"] = "LISTENERS"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, crd_schema("EnvoyFilter", "v1alpha3"))


def test_extension_provider_names_the_authz_service_and_fails_closed():
    document = yaml.safe_load((PROJECT / "istio/authz-provider.iop.yaml").read_text())
    (provider,) = document["spec"]["meshConfig"]["extensionProviders"]
    assert provider == {
        "name": "meshguard",
        "envoyExtAuthzGrpc": {
            "service": "meshguard-authz.meshguard-system.svc.cluster.local",
            "port": 9191,
            "timeout": "0.5s",
            "failOpen": False,
        },
    }
