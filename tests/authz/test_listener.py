"""The loopback listener configuration: the committed files are the generated ones, Envoy
accepts the bootstrap, and the Istio objects validate against Istio's real CRD schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshguard.authz.listener import (
    HCM,
    UPSTREAM_CLUSTER,
    IstioSettings,
    envoy_config_text,
    envoy_filter,
)
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


def listeners_and_upstream(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The loopback listeners and their upstream cluster, from a committed file."""
    document = yaml.safe_load((PROJECT / path).read_text())
    if document.get("kind") == "EnvoyFilter":
        values = [p["patch"]["value"] for p in document["spec"]["configPatches"]]
        listeners = [v for v in values if "filter_chains" in v]
        clusters = [v for v in values if "filter_chains" not in v]
    else:
        listeners = document["static_resources"]["listeners"]
        clusters = document["static_resources"]["clusters"]
    (upstream,) = (c for c in clusters if c["name"] == UPSTREAM_CLUSTER)
    return listeners, upstream


def connection_manager(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (hcm,) = (
        f["typed_config"] for f in chain["filters"] if f["typed_config"]["@type"].endswith(HCM)
    )
    return hcm


@pytest.mark.parametrize("path", ["envoy/loopback-listener.yaml",
                                  "istio/loopback-listener.envoyfilter.yaml"])  # fmt: skip
def test_http11_and_h2c_in_the_apps_protocol_upstream_with_strict_paths(path: str):
    """HTTP/1.1 and h2c prior knowledge downstream (codec AUTO); upstream, the protocol the
    client spoke, which is the app's (an h2 client of an HTTP/1.1 app, or the reverse, is
    the client's error, not the listener's); the strictest path handling Envoy has."""
    listeners, upstream = listeners_and_upstream(path)
    assert len(listeners) == 2
    for listener in listeners:
        hcm = connection_manager(listener)
        assert hcm["codec_type"] == "AUTO"
        assert (hcm["normalize_path"], hcm["merge_slashes"]) == (True, True)
        assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    options = upstream["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["use_downstream_protocol_config"] == {}
    assert "explicit_http_config" not in options and "auto_config" not in options


def test_the_envoyfilter_adds_the_standalone_listeners_and_cluster():
    """Same listeners and upstream cluster in a sidecar as standalone, but for the authz
    cluster's name (Istio's outbound cluster of the authz service)."""
    standalone = listeners_and_upstream("envoy/loopback-listener.yaml")
    sidecar = listeners_and_upstream("istio/loopback-listener.envoyfilter.yaml")
    text = yaml.safe_dump(sidecar).replace(IstioSettings().cluster, "meshguard_authz")
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(standalone))


@pytest.mark.parametrize(("path", "fmt"), sorted(GENERATED.items()))
def test_the_cli_prints_the_committed_configs(path: str, fmt: str):
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "envoy-config", "--format", fmt],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout == (PROJECT / path).read_text()
