"""The loopback listener configuration: the committed files are the generated ones, Envoy
accepts the bootstrap, and the Istio objects validate against Istio's real CRD schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import meshguard
from meshguard.authz.envoy_config import (
    AUTHZ_ERROR_EVENT,
    AUTHZ_ERROR_STATUS,
    HCM,
    UPSTREAM_CLUSTER,
    authz_cluster,
    denied_filter,
)
from meshguard.authz.istio_config import IstioSettings, envoy_config_text, envoy_filter
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.l7 import L7Engine
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.sandbox.envoy import authz_command, envoy_binary, envoy_command, wait_listening
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.keys import SIGNER, trusted_keys_file
from tests.support.shared import shared_file

PROJECT = Path(__file__).resolve().parents[2]
EXAMPLE_POD = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
GENERATED = {
    "envoy/loopback-listener.yaml": ("bootstrap", L7Engine.EXT_AUTHZ),
    "istio/loopback-listener.envoyfilter.yaml": ("envoyfilter", L7Engine.EXT_AUTHZ),
    "envoy/loopback-listener.native.yaml": ("bootstrap", L7Engine.NATIVE),
    "istio/loopback-listener-native.envoyfilter.yaml": ("envoyfilter", L7Engine.NATIVE),
}


@pytest.mark.parametrize(("path", "generated"), sorted(GENERATED.items()))
def test_committed_configs_are_the_generated_ones(path: str, generated: tuple[str, L7Engine]):
    fmt, engine = generated
    expected = envoy_config_text(fmt, authz_host="127.0.0.1", admin_port=15000, engine=engine)
    assert (PROJECT / path).read_text() == expected, (
        f"{path} is stale: regenerate with meshguard envoy-config --format {fmt}"
        f" --engine {engine.value} > {path}"
    )


def test_the_real_envoy_refuses_the_native_listener_without_its_rbac_file(tmp_path: Path):
    """Why the native EnvoyFilter selects only pods that have the file."""
    config = tmp_path / "native.yaml"
    text = (PROJECT / "envoy/loopback-listener.native.yaml").read_text()
    config.write_text(text.replace("/etc/meshguard/l7/rbac.json", str(tmp_path / "rbac.json")))
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-path", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "rbac.json' does not exist" in done.stdout + done.stderr
    (tmp_path / "rbac.json").write_text(injected_rbac_document())
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-path", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def injected_rbac_document() -> str:
    pod = yaml.safe_load(EXAMPLE_POD.read_text())
    pod["metadata"]["annotations"]["meshguard.io/policy"] = "defaultAction: deny"
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    text: str = pod["metadata"]["annotations"]["meshguard.io/l7-rbac"]
    return text


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
    cluster's name (Istio's outbound cluster of the authz service) and the EnvoyFilter
    named in the route's and the cluster's metadata (as istioctl shows it)."""
    standalone = listeners_and_upstream("envoy/loopback-listener.yaml")
    sidecar = listeners_and_upstream("istio/loopback-listener.envoyfilter.yaml")
    text = yaml.safe_dump(sidecar).replace(IstioSettings().cluster, "meshguard_authz")
    managed_by = {
        "filter_metadata": {
            "istio": {
                "config": "/apis/networking.istio.io/v1alpha3/namespaces/istio-system"
                "/envoy-filter/meshguard-loopback-listener"
            }
        }
    }
    plain = yaml.safe_load(yaml.safe_dump(standalone))
    assert without_metadata(plain) == plain  # standalone: no Istio object to name
    assert without_metadata(yaml.safe_load(text), managed_by) == plain


def without_metadata(value: Any, expected: dict[str, Any] | None = None) -> Any:
    """``value`` without its ``metadata`` keys, each of which must equal ``expected``."""
    if isinstance(value, dict):
        if "metadata" in value:
            assert value["metadata"] == expected
        return {k: without_metadata(v, expected) for k, v in value.items() if k != "metadata"}
    if isinstance(value, list | tuple):
        return [without_metadata(v, expected) for v in value]
    return value


@pytest.mark.parametrize(("path", "generated"), sorted(GENERATED.items()))
def test_the_cli_prints_the_committed_configs(path: str, generated: tuple[str, L7Engine]):
    fmt, engine = generated
    engine_flag = [] if engine is L7Engine.EXT_AUTHZ else ["--engine", engine.value]
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "envoy-config", "--format", fmt, *engine_flag],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout == (PROJECT / path).read_text()


@pytest.mark.parametrize("fmt", ["bootstrap", "envoyfilter"])
def test_decision_log_denied_is_a_native_listener_option_the_real_envoy_accepts(
    fmt: str, tmp_path: Path
):
    argv = [sys.executable, "-m", "meshguard", "envoy-config", "--format", fmt,
            "--decision-log", "denied"]  # fmt: skip
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2, refused
    assert "--decision-log applies to --engine native only" in refused.stderr
    assert refused.stdout == ""
    done = subprocess.run([*argv, "--engine", "native"], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.startswith(
        f"# Generated by `meshguard envoy-config --format {fmt} --engine native"
    )
    assert "--decision-log denied`" in done.stdout.splitlines()[0]
    document = yaml.safe_load(done.stdout)
    if fmt == "envoyfilter":
        listeners = [
            patch["patch"]["value"]
            for patch in document["spec"]["configPatches"]
            if patch["applyTo"] == "LISTENER"
        ]
    else:
        listeners = document["static_resources"]["listeners"]
    for listener in listeners:
        (hcm,) = listener["filter_chains"][0]["filters"]
        (line,) = hcm["typed_config"]["access_log"]
        assert line["filter"] == denied_filter()
    if fmt == "bootstrap":  # the real Envoy accepts it (with a pod document to read)
        rbac = tmp_path / "rbac.json"
        rbac.write_text('{"resources": []}')
        config = tmp_path / "bootstrap.yaml"
        config.write_text(done.stdout.replace("/etc/meshguard/l7/rbac.json", str(rbac)))
        checked = subprocess.run(
            [str(envoy_binary()), "--mode", "validate", "--config-path", str(config)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr


# --- a misnamed ext_authz cluster, with the real Envoy ------------------------------------

SIDECAR_HAS = IstioSettings()  # the authz Service's cluster Istio gives every sidecar
ADMIN_PORT = 15000
AUTHZ_PORT = LOCAL_AUTHZ_PORT  # plaintext beside the proxy: in its protected range


def sidecar_bootstrap(envoy_filter_calls: IstioSettings) -> dict[str, Any]:
    """A sidecar as the EnvoyFilter leaves it: its listeners and cluster, beside the authz
    Service's outbound cluster as Istio names it (pointing at a real authz server)."""
    patches = envoy_filter(envoy_filter_calls)["spec"]["configPatches"]
    values: dict[str, list[dict[str, Any]]] = {"LISTENER": [], "CLUSTER": []}
    for patch in patches:
        values[patch["applyTo"]].append(patch["patch"]["value"])
    istio_cluster = authz_cluster(host="127.0.0.1", port=AUTHZ_PORT)
    istio_cluster["name"] = istio_cluster["load_assignment"]["cluster_name"] = SIDECAR_HAS.cluster
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}
        },
        "static_resources": {
            "listeners": values["LISTENER"],
            "clusters": [*values["CLUSTER"], istio_cluster],
        },
    }


def http_get(ns: NetworkNamespace, *, port: int, path: str = "/") -> tuple[int, str]:
    """GET http://127.0.0.1:port/path from inside the namespace: (status, body)."""
    script = (
        "import sys, urllib.request, urllib.error\n"
        f"url = 'http://127.0.0.1:{port}{path}'\n"
        "try:\n"
        "    r = urllib.request.urlopen(url, timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    status, _, body = ns.run([sys.executable, "-c", script]).partition("\n")
    return int(status), body


@pytest.mark.root
@pytest.mark.parametrize(
    ("calls", "status", "counter"),
    [
        pytest.param(SIDECAR_HAS, 403, "denied", id="right-cluster:policy-denial-403"),
        pytest.param(IstioSettings(namespace="meshguard"), 503, "error", id="misnamed-cluster:503"),
        pytest.param(
            IstioSettings(cluster_domain="corp.local"), 503, "error", id="wrong-domain:503"
        ),
    ],
)
def test_a_misnamed_authz_cluster_answers_503_and_says_so_not_403(
    tmp_path: Path, calls: IstioSettings, status: int, counter: str
) -> None:
    """An EnvoyFilter whose ext_authz cluster names no cluster of the sidecar loads, and
    fails closed — but with 503, counted as ``ext_authz.error`` and logged with the cluster
    name, where a policy denial (here: a pod the authz server does not know) is a 403
    counted as ``ext_authz.denied``."""
    pod = yaml.safe_load(EXAMPLE_POD.read_text())
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(pod))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(sidecar_bootstrap(calls)))
    envoy_out = tmp_path / "envoy.stdout"
    with NetworkNamespace() as ns, envoy_out.open("w") as out:
        ns.spawn(
            authz_command(
                [pod_file],
                uid=0,
                gid=0,
                port=AUTHZ_PORT,
                trusted_keys=trusted_keys_file(pod_file.parent),
            )
        )
        wait_listening(ns, port=AUTHZ_PORT, uid=0, gid=0)
        envoy = subprocess.Popen(
            ns.argv(envoy_command(config, uid=0, gid=0)), stdout=out,
            stderr=subprocess.DEVNULL, env={**os.environ, "POD_NAMESPACE": "demo",
                                            "POD_NAME": "shop"},
        )  # fmt: skip
        try:
            wait_listening(ns, port=15007, uid=0, gid=0)
            got, body = http_get(ns, port=15007, path="/api/items")
            stats = dict(
                line.split(": ", 1)
                for line in http_get(ns, port=ADMIN_PORT, path="/stats")[1].splitlines()
                if ": " in line
            )
        finally:
            envoy.terminate()
            envoy.wait(timeout=10)
    assert got == status, body
    prefix = "http.meshguard_loopback_ipv4.ext_authz."
    assert int(stats[prefix + counter]) == 1
    assert int(stats.get(prefix + ({"denied", "error"} - {counter}).pop(), "0")) == 0
    logged = [json.loads(line) for line in envoy_out.read_text().splitlines() if "{" in line]
    if status == AUTHZ_ERROR_STATUS:
        (line,) = logged
        assert line["meshguard"] == AUTHZ_ERROR_EVENT
        assert line["authz_cluster"] == calls.cluster != SIDECAR_HAS.cluster
        assert (line["code"], line["pod"], line["port"]) == (503, "demo/shop", 15007)
        assert line["details"] == "ext_authz_error"
        assert '"meshguard":"ext_authz_error"' in envoy_out.read_text()  # what NOTES grep for
    else:
        assert logged == []  # policy denials are the authz server's to log
