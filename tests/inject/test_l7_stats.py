"""The listener's decision stats reach Istio's stats merge: the pod's
``sidecar.istio.io/statsInclusionRegexps`` as the webhook writes it, merged with what the
operator configured (never clobbering it), on Istio's real injector outputs and with Istio's
real istiod chart (helm-python-sdk)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from meshguard.errors import RefusedError
from meshguard.inject.stats import (
    LISTENER_STATS,
    PROXY_CONFIG_ANNOTATION,
    STATS_REGEXPS,
    merge_stats,
)
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import PROXY_CONTAINER
from meshguard.webhook.review import MAX_WARNING_CHARS
from tests.support.samples import give_distinct_uids, injected_sample_names
from tests.support.shared import INJECTOR_SAMPLES, shared_file

ENV_EMPTY = [{"name": "PROXY_CONFIG", "value": "{}\n"}]


def env(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "OTHER", "value": "x"}, {"name": "PROXY_CONFIG", "value": json.dumps(config)}]


def matcher(**fields: list[str]) -> dict[str, Any]:
    return {"proxyStatsMatcher": fields}


@pytest.mark.parametrize(
    ("annotations", "proxy_env", "expected"),
    [
        pytest.param({}, ENV_EMPTY, LISTENER_STATS, id="nothing-configured"),
        pytest.param({}, [], LISTENER_STATS, id="no-proxy-config-env"),
        pytest.param({STATS_REGEXPS: ""}, ENV_EMPTY, LISTENER_STATS, id="empty-is-unset"),
        pytest.param(
            {STATS_REGEXPS: r"a\..*,b"}, ENV_EMPTY, rf"a\..*,b,{LISTENER_STATS}",
            id="operator-annotation-kept",
        ),
        pytest.param(
            {STATS_REGEXPS: r"a\..*"}, env(matcher(inclusionRegexps=["mesh"])),
            rf"a\..*,{LISTENER_STATS}", id="annotation-wins-over-proxy-config-as-in-pilot-agent",
        ),
        pytest.param(
            {}, env(matcher(inclusionRegexps=[r"mesh\..*", "other"])),
            rf"mesh\..*,other,{LISTENER_STATS}", id="mesh-default-config-carried",
        ),
        pytest.param(
            {PROXY_CONFIG_ANNOTATION: "proxyStatsMatcher:\n  inclusionRegexps: [pod]\n"},
            env(matcher(inclusionRegexps=["mesh"])), f"pod,{LISTENER_STATS}",
            id="pod-proxy-config-replaces-the-list",
        ),
        pytest.param(
            {PROXY_CONFIG_ANNOTATION: "proxy_stats_matcher:\n  inclusion_prefixes: [p]\n"},
            env(matcher(inclusionRegexps=["mesh"])), f"mesh,{LISTENER_STATS}",
            id="pod-proxy-config-without-regexps-keeps-the-mesh-list",
        ),
    ],
)  # fmt: skip
def test_the_annotation_adds_the_listener_stats_to_what_the_pod_had(
    annotations: dict[str, str], proxy_env: list[dict[str, Any]], expected: str
):
    assert merge_stats(annotations=annotations, proxy_env=proxy_env).value == expected


@pytest.mark.parametrize(
    ("annotations", "proxy_env"),
    [
        pytest.param({STATS_REGEXPS: f"a,{LISTENER_STATS}"}, ENV_EMPTY, id="already-included"),
        pytest.param({}, env(matcher(inclusionRegexps=["x{1,3}"])), id="a-regex-with-a-comma"),
        pytest.param({PROXY_CONFIG_ANNOTATION: "[unclosed"}, ENV_EMPTY, id="unreadable-annotation"),
        pytest.param({PROXY_CONFIG_ANNOTATION: "- a list"}, ENV_EMPTY, id="not-a-mapping"),
        pytest.param({}, [{"name": "PROXY_CONFIG", "value": "{not json: ["}], id="unreadable-env"),
        pytest.param(
            {}, [{"name": "PROXY_CONFIG", "valueFrom": {"configMapKeyRef": {}}}], id="env-valuefrom"
        ),
        pytest.param({}, env(matcher(inclusionRegexps="x")), id="regexps-not-a-list"),
        pytest.param({}, env({"proxyStatsMatcher": "x"}), id="matcher-not-a-mapping"),
    ],
)  # fmt: skip
def test_what_cannot_be_merged_safely_is_left_alone(
    annotations: dict[str, str], proxy_env: list[dict[str, Any]]
):
    """Writing the annotation would hide a regex meshguard cannot read or carry: the pod
    keeps what it has (the listener's own stats then stay out of Prometheus)."""
    merge = merge_stats(annotations=annotations, proxy_env=proxy_env)
    assert merge.value is None


@pytest.mark.parametrize(
    ("annotations", "proxy_config", "reason"),
    [
        ({}, '{"proxyStatsMatcher": {"inclusionRegexps": ["x{1,3}"]}}', "holds a comma"),
        ({PROXY_CONFIG_ANNOTATION: "[unclosed"}, "{}", "is unreadable"),
        ({}, '{"proxyStatsMatcher": "x"}', "is unreadable"),
    ],
    ids=["a-regex-with-a-comma", "unreadable-annotation", "matcher-not-a-mapping"],
)
def test_the_admission_warns_when_the_listeners_stats_stay_out(annotations, proxy_config, reason):
    """Left as it is, the pod's stats list misses the listener's: the operator hears it (an
    admission warning whole within 256 characters, with the way out), not on a dashboard."""
    pods = _pods()
    if not pods:
        shared_file("istio-injector-samples")
    _, metadata, spec = copy.deepcopy(next(p for p in pods if p[0] == "hello.yaml.injected[0]"))
    metadata["annotations"].update(annotations)
    proxy_env = _proxy(spec)["env"]
    (entry,) = [e for e in proxy_env if e["name"] == "PROXY_CONFIG"]
    entry["value"] = proxy_config
    result = inject_pod(metadata, spec, settings=InjectSettings(request_template=False))
    (warning,) = [w for w in result.warnings if STATS_REGEXPS in w]
    assert reason in warning and "stay out of Prometheus" in warning
    assert len(warning) <= MAX_WARNING_CHARS
    assert STATS_REGEXPS not in metadata["annotations"]
    # merged, no warning
    fine = inject_pod(*copy.deepcopy(next(p for p in pods if p[0] == "hello.yaml.injected[0]"))[1:],
                      settings=InjectSettings(request_template=False))  # fmt: skip
    assert not [w for w in fine.warnings if STATS_REGEXPS in w]


# --- through the injection, on Istio's real outputs ------------------------------------------


def _pods() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for name in injected_sample_names():
        for index, template in enumerate(pod_templates(read_documents(INJECTOR_SAMPLES / name))):
            if not any(
                c.get("name") == PROXY_CONTAINER
                for key in ("containers", "initContainers")
                for c in template.spec.get(key) or []
            ):
                continue
            give_distinct_uids(template)
            found.append((f"{name}[{index}]", template.metadata, template.spec))
    return found


def _proxy(spec: dict[str, Any]) -> dict[str, Any]:
    (proxy,) = [
        c for key in ("containers", "initContainers") for c in spec.get(key) or []
        if c["name"] == PROXY_CONTAINER
    ]  # fmt: skip
    return proxy


def pilot_agent_regexps(annotations: dict[str, str], proxy_config: dict[str, Any]) -> list[str]:
    """What pilot-agent puts in the bootstrap's stats_matcher as regexes
    (``pkg/bootstrap/config.go``, ``getStatsOptions``/``parseOption``: the annotation split
    on commas if set, else the proxy config's list; then Istio's required regex)."""
    annotation = annotations.get(STATS_REGEXPS, "")
    if annotation:
        chosen = annotation.split(",")
    else:
        chosen = list(proxy_config.get("proxyStatsMatcher", {}).get("inclusionRegexps", []))
    return [*chosen, r"vhost\..*\.route\..*"]


def test_every_istio_sample_gets_the_annotation_where_pilot_agent_reads_it():
    pods = _pods()
    if not pods:
        shared_file("istio-injector-samples")
    checked = []
    for name, original_metadata, original_spec in pods:
        metadata, spec = copy.deepcopy(original_metadata), copy.deepcopy(original_spec)
        try:
            inject_pod(metadata, spec, settings=InjectSettings(request_template=False))
        except RefusedError:
            continue  # a posture refusal (hostPath): no pod, nothing to count
        if "meshguard.io/l7-engine" not in (metadata.get("labels") or {}):
            continue  # a gateway: no loopback listener
        checked.append(name)
        annotations = metadata["annotations"]
        assert annotations[STATS_REGEXPS].split(",")[-1] == LISTENER_STATS, name
        # pilot-agent reads the pod's annotations from /etc/istio/pod/annotations, the
        # downward API volume Istio's injection mounts into istio-proxy
        mounts = {m["name"]: m["mountPath"] for m in _proxy(spec).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec["volumes"]}
        podinfo = [
            n for n, path in mounts.items()
            if path == "/etc/istio/pod" and "downwardAPI" in volumes[n]
        ]  # fmt: skip
        assert podinfo, f"{name}: istio-proxy has no downward API volume at /etc/istio/pod"
        (volume,) = [volumes[n] for n in podinfo]
        items = {i["path"]: i["fieldRef"]["fieldPath"] for i in volume["downwardAPI"]["items"]}
        assert items["annotations"] == "metadata.annotations", name
        # injected again (a reinvocation): unchanged
        again_metadata, again_spec = copy.deepcopy(metadata), copy.deepcopy(spec)
        inject_pod(again_metadata, again_spec, settings=InjectSettings(request_template=False))
        assert again_metadata["annotations"][STATS_REGEXPS] == annotations[STATS_REGEXPS], name
    assert len(checked) >= 15, checked


# --- with Istio's real istiod chart: the mesh-wide setting an operator may have ---------------

OPERATOR_REGEX = r"cluster\.outbound\|.*\.upstream_rq_retry"


def _istiod_configmaps(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    helm = pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed (pip install -e '.[test]')"
    )
    with helm.Chart.load(shared_file("istio-charts", "istio-discovery")) as chart:
        rendered = chart.render(values, name="istiod", namespace="istio-system", is_install=True)
    maps = {}
    for name, text in rendered.items():
        if name.endswith(".txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj and obj.get("kind") == "ConfigMap":
                maps[obj["metadata"]["name"]] = obj
    return maps


def test_a_mesh_wide_proxy_stats_matcher_survives_meshguard_s_annotation():
    """The istiod Helm value an operator may set (meshConfig.defaultConfig.proxyStatsMatcher,
    the documented alternative): istiod's chart puts it in the mesh config, Istio's sidecar
    template writes the proxy config into istio-proxy's PROXY_CONFIG and mounts the pod's
    annotations where pilot-agent reads them; meshguard's annotation then carries the
    operator's regex and its own, so pilot-agent's bootstrap includes both."""
    values = {"meshConfig": {"defaultConfig": {"proxyStatsMatcher": {
        "inclusionRegexps": [OPERATOR_REGEX]}}}}  # fmt: skip
    maps = _istiod_configmaps(values)
    mesh = yaml.safe_load(maps["istio"]["data"]["mesh"])
    default_config = mesh["defaultConfig"]
    assert default_config["proxyStatsMatcher"]["inclusionRegexps"] == [OPERATOR_REGEX]
    injector = yaml.safe_load(maps["istio-sidecar-injector"]["data"]["config"])
    sidecar = injector["templates"]["sidecar"]
    assert "- name: PROXY_CONFIG" in sidecar and "protoToJSON .ProxyConfig" in sidecar
    assert "fieldPath: metadata.annotations" in sidecar and "mountPath: /etc/istio/pod" in sidecar

    (template,) = pod_templates(read_documents(shared_file("istio-injector-samples",
                                                          "hello.yaml.injected")))  # fmt: skip
    give_distinct_uids(template)
    metadata, spec = copy.deepcopy(template.metadata), copy.deepcopy(template.spec)
    proxy_env = _proxy(spec)["env"]
    (entry,) = [e for e in proxy_env if e["name"] == "PROXY_CONFIG"]
    entry["value"] = json.dumps(default_config)  # what the template renders for this mesh
    without_meshguard = pilot_agent_regexps(metadata.get("annotations") or {}, default_config)
    inject_pod(metadata, spec, settings=InjectSettings(request_template=False))
    with_meshguard = pilot_agent_regexps(metadata["annotations"], default_config)
    assert with_meshguard == [*without_meshguard[:-1], LISTENER_STATS, without_meshguard[-1]]
    assert OPERATOR_REGEX in with_meshguard
