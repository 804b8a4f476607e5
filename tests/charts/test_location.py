"""Where meshguard runs, in every object that names it: the chart and ``meshguard envoy-config``
carry the release namespace, the authz Service's name and port, Istio's root namespace and
the cluster domain to the EnvoyFilter (its namespace, its ext_authz cluster
``outbound|PORT||SERVICE.NAMESPACE.svc.DOMAIN``), the DestinationRule and NOTES; the chart's
EnvoyFilter is the CLI's, and nothing under istio/ or charts/ touches Istio's
``meshConfig.extensionProviders``.

Rendered by the real Helm engine (helm-python-sdk), validated against Istio's CRD schemas.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshguard.authz.envoy_config import HCM
from meshguard.authz.istio_config import (
    ENVOY_FILTER_NAME,
    IstioSettings,
    envoy_config_text,
    envoy_filter,
    envoy_filter_helm_template,
    envoy_filter_name,
)
from meshguard.cli import main as cli_main
from meshguard.l7 import L7Engine
from tests.support.kube import istio_crd_schema

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install -e '.[test]')"
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "meshguard"
TEMPLATE = CHART / "templates" / "istio-envoyfilter.yaml"
RELEASE = "meshguard"

#: A release that moves everything: namespace sec, Service mg-authz:9443, Istio's root
#: namespace istio-root, cluster domain corp.local.
ELSEWHERE_NAMESPACE = "sec"
ELSEWHERE = {
    "authz": {"service": {"name": "mg-authz", "port": 9443}},
    "istio": {
        "rootNamespace": "istio-root",
        "clusterDomain": "corp.local",
        "envoyFilter": {"enabled": True},
        "destinationRule": {"enabled": True},
    },
}
ELSEWHERE_LOCATION = IstioSettings(
    service="mg-authz",
    namespace="sec",
    port=9443,
    root_namespace="istio-root",
    cluster_domain="corp.local",
)
ELSEWHERE_CLUSTER = "outbound|9443||mg-authz.sec.svc.corp.local"
DEFAULTS_ON = {"istio": {"envoyFilter": {"enabled": True}, "destinationRule": {"enabled": True}}}


@cache
def _render(values_json: str, namespace: str) -> tuple[tuple[str, ...], str]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(
            json.loads(values_json), name=RELEASE, namespace=namespace, is_install=True
        )
    notes = rendered.pop(f"{CHART.name}/templates/NOTES.txt", "")
    return tuple(rendered[name] for name in sorted(rendered)), notes


def render(values: dict[str, Any], namespace: str = "meshguard-system") -> list[dict[str, Any]]:
    documents, _ = _render(json.dumps(values, sort_keys=True), namespace)
    return [obj for text in documents for obj in yaml.safe_load_all(text) if obj]


def notes(values: dict[str, Any], namespace: str = "meshguard-system") -> str:
    return _render(json.dumps(values, sort_keys=True), namespace)[1]


def one(objects: list[dict[str, Any]], kind: str, name: str = ENVOY_FILTER_NAME) -> dict[str, Any]:
    """The one object of ``kind`` (of EnvoyFilters, the one named ``name``: the ext-authz
    engine's by default)."""
    (found,) = (
        o
        for o in objects
        if o["kind"] == kind and (kind != "EnvoyFilter" or o["metadata"]["name"] == name)
    )
    return found


def validate_istio(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, istio_crd_schema(obj["kind"], obj["apiVersion"].split("/")[1]))


def authz_filters(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The ext_authz filter config of each listener the EnvoyFilter adds."""
    found = []
    for patch in document["spec"]["configPatches"]:
        for chain in patch["patch"]["value"].get("filter_chains", []):
            for network in chain["filters"]:
                if network["typed_config"]["@type"].endswith(HCM):
                    found.extend(
                        f["typed_config"]
                        for f in network["typed_config"]["http_filters"]
                        if f["name"] == "envoy.filters.http.ext_authz"
                    )
    return found


def authz_error_logs(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        log["typed_config"]["log_format"]["json_format"]
        for patch in document["spec"]["configPatches"]
        for chain in patch["patch"]["value"].get("filter_chains", [])
        for network in chain["filters"]
        for log in network["typed_config"].get("access_log", [])
    ]


def without_labels(document: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(document))
    copy["metadata"].pop("labels", None)
    return copy


# --- every object carries the location ----------------------------------------------------


def test_every_generated_object_carries_a_non_default_location() -> None:
    objects = render(ELSEWHERE, ELSEWHERE_NAMESPACE)
    envoy = one(objects, "EnvoyFilter")
    validate_istio(envoy)
    assert envoy["metadata"]["namespace"] == "istio-root"
    assert envoy["metadata"]["name"] == ENVOY_FILTER_NAME
    assert envoy["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshguard"
    filters = authz_filters(envoy)
    assert len(filters) == 2
    assert {f["grpc_service"]["envoy_grpc"]["cluster_name"] for f in filters} == {ELSEWHERE_CLUSTER}
    assert {f["status_on_error"]["code"] for f in filters} == {"ServiceUnavailable"}
    assert {log["authz_cluster"] for log in authz_error_logs(envoy)} == {ELSEWHERE_CLUSTER}

    rule = one(objects, "DestinationRule")
    validate_istio(rule)
    assert rule["metadata"]["namespace"] == "sec"
    assert rule["spec"]["host"] == "mg-authz.sec.svc.corp.local" == ELSEWHERE_LOCATION.host

    service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "mg-authz"
    )
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (service["metadata"]["namespace"], grpc["port"]) == ("sec", 9443)
    assert f"outbound|{grpc['port']}||{rule['spec']['host']}" == ELSEWHERE_CLUSTER

    # nothing of the default location is left in the Istio objects
    for obj in (envoy, rule):
        text = yaml.safe_dump(obj)
        for default in ("meshguard-system", "istio-system", "cluster.local", "|9191|"):
            assert default not in text, (obj["kind"], default)


def test_notes_name_the_releases_cluster_and_how_to_check_it() -> None:
    text = notes(ELSEWHERE, ELSEWHERE_NAMESPACE)
    assert ELSEWHERE_CLUSTER in text
    assert "istio-root" in text
    assert "--fqdn mg-authz.sec.svc.corp.local --port 9443" in text
    assert "This release installed that EnvoyFilter" in text
    assert "503" in text and "ext_authz_error" in text
    for default in ("meshguard-system", "istio-system", "cluster.local", "9191"):
        assert default not in text, default


@pytest.mark.parametrize(
    ("values", "namespace"),
    [
        ({}, "meshguard-system"),
        (ELSEWHERE, ELSEWHERE_NAMESPACE),
        ({"istio": {"envoyFilter": {"decisionLog": "denied"}}}, "meshguard-system"),
    ],
    ids=["defaults", "elsewhere", "denied-decision-log"],
)
def test_the_command_notes_print_generates_the_charts_envoyfilter(
    values: dict[str, Any], namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With istio.envoyFilter.enabled=false, NOTES print the envoy-config command for this
    release; it prints exactly what the chart renders when enabled."""
    off = json.loads(json.dumps(values))
    off.setdefault("istio", {}).setdefault("envoyFilter", {})["enabled"] = False
    assert not [o for o in render(off, namespace) if o["kind"] == "EnvoyFilter"]
    printed = []
    for line in notes(off, namespace).splitlines():
        if "meshguard envoy-config" in line:
            argv = shlex.split(line.split("|")[0].strip())
            assert argv[:2] == ["meshguard", "envoy-config"]
            assert cli_main(argv[1:]) == 0
            printed.append(yaml.safe_load(capsys.readouterr().out))
    on = json.loads(json.dumps(values))
    on.setdefault("istio", {}).setdefault("envoyFilter", {})["enabled"] = True
    rendered = [without_labels(o) for o in render(on, namespace) if o["kind"] == "EnvoyFilter"]
    # one command per EnvoyFilter the chart would install (both engines), printing it exactly
    assert sorted(printed, key=str) == sorted(rendered, key=str)
    assert len(printed) == 2


# --- one definition: the chart's EnvoyFilter is the CLI's and istio/'s --------------------


def test_the_committed_chart_template_is_the_generated_one() -> None:
    assert TEMPLATE.read_text() == envoy_filter_helm_template(), (
        f"{TEMPLATE.relative_to(ROOT)} is stale: regenerate it with python -c 'from"
        " meshguard.authz.istio_config import envoy_filter_helm_template as t;"
        ' print(t(), end="")\' > charts/meshguard/templates/istio-envoyfilter.yaml'
    )


@pytest.mark.parametrize(
    ("values", "namespace", "location"),
    [
        (DEFAULTS_ON, "meshguard-system", IstioSettings()),
        (ELSEWHERE, ELSEWHERE_NAMESPACE, ELSEWHERE_LOCATION),
    ],
    ids=["defaults", "elsewhere"],
)
def test_the_charts_envoyfilter_is_the_clis(
    values: dict[str, Any], namespace: str, location: IstioSettings
) -> None:
    rendered = without_labels(one(render(values, namespace), "EnvoyFilter"))
    assert rendered == envoy_filter(location)
    cli = yaml.safe_load(envoy_config_text("envoyfilter", istio=location))
    assert rendered == cli
    if location == IstioSettings():
        committed = yaml.safe_load(
            (ROOT / "istio" / "loopback-listener.envoyfilter.yaml").read_text()
        )
        assert rendered == committed


def test_the_envoyfilter_is_opt_in_like_the_destination_rule() -> None:
    assert not [o for o in render({}) if o["kind"] in {"EnvoyFilter", "DestinationRule"}]
    text = notes({})
    assert (
        "kubectl apply -f istio/loopback-listener.envoyfilter.yaml"
        " -f istio/loopback-listener-native.envoyfilter.yaml"
    ) in text
    assert "outbound|9191||meshguard-authz.meshguard-system.svc.cluster.local" in text


# --- invalid locations are refused --------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"istio": {"rootNamespace": "Istio-System"}}, "/istio/rootNamespace"),
        ({"istio": {"rootNamespace": "istio_system"}}, "/istio/rootNamespace"),
        ({"istio": {"clusterDomain": "corp.local."}}, "/istio/clusterDomain"),
        ({"istio": {"clusterDomain": "Corp.Local"}}, "/istio/clusterDomain"),
        ({"istio": {"clusterDomain": ""}}, "/istio/clusterDomain"),
        ({"istio": {"envoyFilter": {"enabled": "yes"}}}, "/istio/envoyFilter/enabled"),
        ({"authz": {"service": {"name": "9authz"}}}, "/authz/service/name"),
        ({"authz": {"service": {"port": 0}}}, "/authz/service/port"),
        ({"authz": {"service": {"port": 65536}}}, "/authz/service/port"),
    ],
)
def test_bad_location_values_are_rejected(values: dict[str, Any], where: str) -> None:
    with (
        helm.Chart.load(CHART) as chart,
        pytest.raises(helm.HelmValuesError, match=re.escape(where)),
    ):
        chart.render(values, name=RELEASE, namespace="meshguard-system", is_install=True)


# --- nobody replaces meshConfig.extensionProviders ----------------------------------------


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {key for value in node.values() for key in _keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in _keys(value)}
    return set()


def test_nothing_under_istio_or_charts_sets_mesh_config_extension_providers() -> None:
    """istioctl's overlay merge replaces lists: an IstioOperator setting
    meshConfig.extensionProviders would drop the operator's OTel/OPA providers. The loopback
    listener calls the authz cluster directly and needs no provider."""
    files = [p for d in ("istio", "charts") for p in sorted((ROOT / d).rglob("*")) if p.is_file()]
    assert files
    for path in files:
        text = path.read_text()
        assert not re.search(r"^\s*-?\s*extensionProviders\s*:", text, flags=re.MULTILINE), path
        if path.suffix in {".yaml", ".yml"} and "{{" not in text:
            for document in yaml.safe_load_all(text):
                assert "extensionProviders" not in _keys(document), path
                # the injection template is YAML inside a string
                for value in _strings(document):
                    if "extensionProviders" in value:
                        pytest.fail(f"{path}: extensionProviders in an embedded document")
    for values in ({}, ELSEWHERE, DEFAULTS_ON, {"webhook": {"requestTemplate": True}}):
        for obj in render(values):
            assert "extensionProviders" not in _keys(obj), obj["kind"]
    assert not (ROOT / "istio" / "authz-provider.iop.yaml").exists()


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


def test_helm_lint_strict_with_the_istio_objects_elsewhere() -> None:
    report = helm.lint(CHART, ELSEWHERE, strict=True, namespace=ELSEWHERE_NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_charts_native_envoyfilter_is_the_clis_and_selects_only_native_pods() -> None:
    objects = render(DEFAULTS_ON, "meshguard-system")
    name = envoy_filter_name(L7Engine.NATIVE)
    rendered = without_labels(one(objects, "EnvoyFilter", name))
    validate_istio(rendered)
    assert rendered == envoy_filter(IstioSettings(), engine=L7Engine.NATIVE)
    committed = (ROOT / "istio" / "loopback-listener-native.envoyfilter.yaml").read_text()
    assert rendered == yaml.safe_load(committed)
    assert rendered["spec"]["workloadSelector"] == {"labels": {"meshguard.io/l7-engine": "native"}}
    ext_authz = one(objects, "EnvoyFilter")
    assert ext_authz["spec"]["workloadSelector"] == {
        "labels": {"meshguard.io/l7-engine": "ext-authz"}
    }
