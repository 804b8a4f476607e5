"""meshguard's webhook sees exactly the pods Istio's sidecar injector sees.

Istio's real istiod chart (``../shared/istio-charts/istio-discovery``) and meshguard's chart
are rendered by the real Helm engine; every MutatingWebhookConfiguration entry of both is
evaluated with Kubernetes' label-selector semantics (an entry is called for a pod when its
namespaceSelector matches the namespace's labels AND its objectSelector the pod's labels)
over a grid of namespace labels x pod labels. For each Istio installation (default revision,
a ``canary`` revision, revision tags, two control planes, enableNamespacesByDefault) and the
meshguard values that declare it, a pod reaches meshguard's webhook if and only if it reaches
one of Istio's, except where meshguard is told to stay away (its opt-out label, its own
namespace, kube-system).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import kubernetes_validate
import pytest
import yaml

from meshguard.cli import build_parser
from tests.charts.test_chart import (
    CHART,
    K8S_VERSION,
    NAMESPACE,
    RELEASE,
    container,
    helm,
    kinds,
    notes,
    one,
    render,
)
from tests.support.kube import selector_matches
from tests.support.shared import shared_file

ISTIO_NAMESPACE: Final = "istio-system"

#: Label values of the grid (None: the label is absent). ``prod`` is a revision tag,
#: ``other`` a revision no istiod serves.
INJECTION_LABELS: Final = ("enabled", "disabled", None)
REVISIONS: Final = ("default", "canary", "prod", "other", None)
POD_INJECT: Final = ("true", "false", None)
#: Namespace names: an ordinary one, one Istio spares in "auto" mode, and meshguard's
#: exclusions (its release namespace and kube-system).
NAMESPACE_NAMES: Final = ("shop", "kube-public", "kube-system", NAMESPACE)
MESHGUARD_EXCLUDED: Final = {"kube-system", NAMESPACE}


@dataclass(frozen=True)
class Scenario:
    """Istio installations (one istiod chart release each) and the meshguard values that
    declare the same revisions and tags."""

    istiods: tuple[dict[str, Any], ...]
    meshguard: dict[str, Any]


SCENARIOS: Final = {
    "default": Scenario(({},), {}),
    "canary": Scenario(({"revision": "canary"},), {"istio": {"revisions": ["canary"]}}),
    "canary+tag-prod": Scenario(
        ({"revision": "canary", "revisionTags": ["prod"]},),
        {"istio": {"revisions": ["canary"], "revisionTags": ["prod"]}},
    ),
    "canary+tag-default": Scenario(
        ({"revision": "canary", "revisionTags": ["default"]},),
        {"istio": {"revisions": ["canary"], "revisionTags": ["default"]}},
    ),
    "default+canary": Scenario(
        ({}, {"revision": "canary"}), {"istio": {"revisions": ["default", "canary"]}}
    ),
    "canary+tags-prod-default": Scenario(
        ({"revision": "canary", "revisionTags": ["prod", "default"]},),
        {"istio": {"revisions": ["canary"], "revisionTags": ["prod", "default"]}},
    ),
    "default+enableNamespacesByDefault": Scenario(
        ({"sidecarInjectorWebhook": {"enableNamespacesByDefault": True}},),
        {"istio": {"enableNamespacesByDefault": True}},
    ),
}


# --- Kubernetes label selectors ----------------------------------------------------------


def calls(hooks: list[dict[str, Any]], namespace: dict[str, str], pod: dict[str, str]) -> list[str]:
    """The webhook entries the API server calls for a pod created in a namespace."""
    return [
        h["name"]
        for h in hooks
        if selector_matches(h.get("namespaceSelector"), namespace)
        and selector_matches(h.get("objectSelector"), pod)
    ]


def labels(pairs: dict[str, str | None]) -> dict[str, str]:
    """The labels whose value is not None."""
    return {key: value for key, value in pairs.items() if value is not None}


# --- rendering ---------------------------------------------------------------------------


@cache
def _istiod_webhooks(values_json: str) -> tuple[tuple[str, str], ...]:
    chart_dir = shared_file("istio-charts", "istio-discovery")
    with helm.Chart.load(chart_dir) as chart:
        rendered = chart.render(
            json.loads(values_json), name="istiod", namespace=ISTIO_NAMESPACE, is_install=True
        )
    found = []
    for name, text in sorted(rendered.items()):
        if name.endswith(".txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj and obj.get("kind") == "MutatingWebhookConfiguration":
                found.append((obj["metadata"]["name"], json.dumps(obj["webhooks"])))
    return tuple(found)


def istio_configurations(scenario: Scenario) -> dict[str, list[dict[str, Any]]]:
    """Name -> webhook entries of every MutatingWebhookConfiguration Istio installs."""
    configurations: dict[str, list[dict[str, Any]]] = {}
    for values in scenario.istiods:
        for name, hooks in _istiod_webhooks(json.dumps(values, sort_keys=True)):
            assert name not in configurations, f"two istiods render {name}"
            configurations[name] = json.loads(hooks)
    assert configurations, "Istio's chart rendered no MutatingWebhookConfiguration"
    return configurations


def meshguard_configuration(values: dict[str, Any]) -> dict[str, Any]:
    (config,) = kinds(render(values), "MutatingWebhookConfiguration")
    return config


def grid() -> list[tuple[dict[str, str], dict[str, str], str]]:
    """(namespace labels, pod labels, namespace name) for every grid case."""
    cases = []
    for name, injection, ns_rev, inject, pod_rev in itertools.product(
        NAMESPACE_NAMES, INJECTION_LABELS, REVISIONS, POD_INJECT, REVISIONS
    ):
        namespace = {"kubernetes.io/metadata.name": name}
        namespace |= labels({"istio-injection": injection, "istio.io/rev": ns_rev})
        pod = {"app": "shop"} | labels({"sidecar.istio.io/inject": inject, "istio.io/rev": pod_rev})
        cases.append((namespace, pod, name))
    return cases


# --- the selection -------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_meshguard_sees_every_pod_istio_injects_and_only_those(scenario: Scenario) -> None:
    istio = [h for hooks in istio_configurations(scenario).values() for h in hooks]
    meshguard = meshguard_configuration(scenario.meshguard)["webhooks"]
    injected = seen = 0
    for namespace, pod, name in grid():
        by_istio = calls(istio, namespace, pod)
        by_meshguard = calls(meshguard, namespace, pod)
        where = f"namespace {namespace}, pod {pod}: Istio {by_istio}, meshguard {by_meshguard}"
        # disjoint entries: meshguard is called once per admission round, never twice
        assert len(by_meshguard) <= 1, where
        if name in MESHGUARD_EXCLUDED:
            assert not by_meshguard, where
            continue
        assert bool(by_meshguard) == bool(by_istio), where
        injected += bool(by_istio)
        seen += bool(by_meshguard)
    assert injected == seen > 0


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_the_opt_out_label_keeps_meshguard_away(scenario: Scenario) -> None:
    meshguard = meshguard_configuration(scenario.meshguard)["webhooks"]
    for namespace, pod, _ in grid():
        opted_out = namespace | {"meshguard.io/inject": "disabled"}
        assert not calls(meshguard, opted_out, pod), (namespace, pod)


def selection_counts(scenario: Scenario) -> dict[str, int]:
    """How many grid cases of the ordinary namespace Istio injects, by which way."""
    istio = istio_configurations(scenario)
    counts: dict[str, int] = {"cases": 0, "injected": 0}
    for namespace, pod, name in grid():
        if name != "shop":
            continue
        counts["cases"] += 1
        hits = [n for hooks in istio.values() for n in calls(hooks, namespace, pod)]
        counts["injected"] += bool(hits)
        for hit in hits:
            way = hit.removesuffix("sidecar-injector.istio.io").rstrip(".")
            counts[way] = counts.get(way, 0) + 1
    return counts


def test_the_grid_exercises_every_way_istio_selects_a_pod() -> None:
    """The grid is not vacuous: each of Istio's selections fires in it."""
    # 5 namespace revisions x 3 pod values x 5 pod revisions per istio-injection value
    assert selection_counts(SCENARIOS["default"]) == {
        "cases": 225,
        "injected": 63,
        "namespace": 50,  # istio-injection=enabled (5 ns revs) x pod not "false" (2) x 5
        "rev.namespace": 10,  # ns istio.io/rev=default, no istio-injection: 2 x 5 pods
        "rev.object": 2,  # unlabeled ns, pod istio.io/rev=default, pod not "false"
        "object": 1,  # unlabeled ns, pod sidecar.istio.io/inject=true, no pod istio.io/rev
    }
    assert selection_counts(SCENARIOS["canary+tag-prod"]) == {
        "cases": 225,
        "injected": 24,
        "rev.namespace": 20,
        "rev.object": 4,
    }
    auto = selection_counts(SCENARIOS["default+enableNamespacesByDefault"])
    assert auto["auto"] == 1  # unlabeled namespace, pod without either label
    tags = selection_counts(SCENARIOS["canary+tags-prod-default"])
    assert tags["injected"] == 87


def test_pod_labels_and_tags_reach_meshguard() -> None:
    """The cases the old two-entry configuration missed."""
    unlabeled = {"kubernetes.io/metadata.name": "shop"}
    default = meshguard_configuration({})["webhooks"]
    assert calls(default, unlabeled, {"sidecar.istio.io/inject": "true"}) == [
        "object.inject.meshguard.io"
    ]
    assert calls(default, unlabeled, {"istio.io/rev": "default"}) == [
        "rev.object.inject.meshguard.io"
    ]
    tagged = meshguard_configuration(SCENARIOS["canary+tag-prod"].meshguard)["webhooks"]
    assert calls(tagged, unlabeled | {"istio.io/rev": "prod"}, {}) == [
        "rev.namespace.inject.meshguard.io"
    ]
    assert calls(tagged, unlabeled, {"istio.io/rev": "prod"}) == ["rev.object.inject.meshguard.io"]
    # a revision no istiod serves: Istio injects nothing, meshguard is not called
    assert not calls(tagged, unlabeled | {"istio.io/rev": "other"}, {})
    # the default revision's selections exist only where "default" is declared
    assert not calls(tagged, unlabeled | {"istio-injection": "enabled"}, {})


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_configuration_is_valid_and_sorts_before_istios(scenario: Scenario) -> None:
    config = meshguard_configuration(scenario.meshguard)
    kubernetes_validate.validate(config, K8S_VERSION, strict=True)
    for name in istio_configurations(scenario):
        assert config["metadata"]["name"] < name  # meshguard first, reinvoked after Istio
    names = [h["name"] for h in config["webhooks"]]
    assert len(names) == len(set(names))
    for hook in config["webhooks"]:
        assert hook["reinvocationPolicy"] == "IfNeeded"
    report = helm.lint(CHART, scenario.meshguard, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"istio": {"revisions": ["Canary"]}}, "/istio/revisions/0"),
        ({"istio": {"revisionTags": ["prod", "prod"]}}, "/istio/revisionTags"),
        ({"istio": {"enableNamespacesByDefault": "yes"}}, "/istio/enableNamespacesByDefault"),
    ],
)
def test_bad_revision_values_are_rejected(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=where):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_no_revision_at_all_is_refused() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(Exception, match="would see no pod"):
        chart.render(
            {"istio": {"revisions": []}}, name=RELEASE, namespace=NAMESPACE, is_install=True
        )


# --- the template is opt-in -------------------------------------------------------------


def test_default_install_needs_no_template_in_istiod() -> None:
    main = container(one(render(), "Deployment", "meshguard-webhook"))
    assert build_parser().parse_args(main["args"]).no_template is True
    text = notes()
    assert "istiod needs no template" in text
    assert "meshguard-template" not in text
    assert "not found" not in text


def test_requesting_the_template_is_an_opt_in_with_its_failure_spelled_out() -> None:
    values = {"webhook": {"requestTemplate": True}}
    main = container(one(render(values), "Deployment", "meshguard-webhook"))
    assert build_parser().parse_args(main["args"]).no_template is False
    text = notes(values)
    assert "istio/meshguard-template.iop.yaml" in text
    assert 'requested template "meshguard" not found' in text
