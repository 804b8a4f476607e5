"""meshguard's webhook sees every pod Istio injects, whatever the revision, and trips no analyzer.

Istio's real istiod chart (``../shared/istio-charts/istio-discovery``) is rendered by the
real Helm engine beside meshguard's chart at its defaults (no revision declared anywhere):
a default revision, a ``canary`` revision, a revision plus tags, two control planes,
enableNamespacesByDefault. Every namespace labels x pod labels permutation is admitted
through the API server's mutating chain as kube-apiserver runs it (tests/support/webhooks.py:
configurations by name, selectors on the object as the webhooks before left it, no first
call in a reinvocation), with Istio's webhooks adding the labels Istio's injection adds
(taken from Istio's own injector samples in ../shared). A pod reaches meshguard if and only
if Istio injected it (except where meshguard is told to stay away), and Istio's webhook
analyzer (IST0139, reimplemented from ../shared/istio-analyzers/webhook.go) reports nothing.
The ephemeral-container review keys on ``meshguard.io/admitted`` only: relabelling the pod
or its namespace after admission does not escape it (issue 30).
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import pytest
import yaml

from tests.charts.test_chart import CHART, K8S_VERSION, NAMESPACE, RELEASE, helm, kinds, render
from tests.support.shared import shared_file
from tests.support.webhooks import Labels, Mutator, admit_create, analyze, called_on_update

ISTIO_NAMESPACE: Final = "istio-system"
MESHGUARD: Final = "zz-meshguard"

#: Label values of the grid (None: the label is absent). ``prod`` is a revision tag,
#: ``other`` a revision no istiod serves.
INJECTION_LABELS: Final = ("enabled", "disabled", None)
REVISIONS: Final = ("default", "canary", "prod", "other", None)
POD_INJECT: Final = ("true", "false", None)
#: Namespace names: an ordinary one, one Istio spares in "auto" mode, and meshguard's
#: exclusions (its release namespace and kube-system).
NAMESPACE_NAMES: Final = ("shop", "kube-public", "kube-system", NAMESPACE)
MESHGUARD_EXCLUDED: Final = {"kube-system", NAMESPACE}

#: Istio installations: one istiod chart release each (meshguard's values: the defaults).
SCENARIOS: Final = {
    "default": ({},),
    "canary": ({"revision": "canary"},),
    "canary+tag-prod": ({"revision": "canary", "revisionTags": ["prod"]},),
    "canary+tag-default": ({"revision": "canary", "revisionTags": ["default"]},),
    "default+canary": ({}, {"revision": "canary"}),
    "canary+tags-prod-default": ({"revision": "canary", "revisionTags": ["prod", "default"]},),
    "default+enableNamespacesByDefault": (
        {"sidecarInjectorWebhook": {"enableNamespacesByDefault": True}},
    ),
}


# --- Istio's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IstioInstall:
    configurations: dict[str, dict[str, Any]]  # name -> MutatingWebhookConfiguration
    services: frozenset[tuple[str, str]]


@cache
def _istiod(values_json: str) -> tuple[tuple[str, str], ...]:
    """(kind, JSON) of the MutatingWebhookConfigurations and Services istiod's chart renders."""
    with helm.Chart.load(shared_file("istio-charts", "istio-discovery")) as chart:
        rendered = chart.render(
            json.loads(values_json), name="istiod", namespace=ISTIO_NAMESPACE, is_install=True
        )
    found = []
    for name, text in sorted(rendered.items()):
        if name.endswith(".txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj and obj.get("kind") in {"MutatingWebhookConfiguration", "Service"}:
                found.append((obj["kind"], json.dumps(obj)))
    return tuple(found)


def istio_install(scenario: str) -> IstioInstall:
    configurations: dict[str, dict[str, Any]] = {}
    services: set[tuple[str, str]] = set()
    for values in SCENARIOS[scenario]:
        for kind, text in _istiod(json.dumps(values, sort_keys=True)):
            obj = json.loads(text)
            if kind == "Service":
                services.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))
                continue
            assert obj["metadata"]["name"] not in configurations, "two istiods render one name"
            configurations[obj["metadata"]["name"]] = obj
    assert configurations, "Istio's chart rendered no MutatingWebhookConfiguration"
    return IstioInstall(configurations, frozenset(services))


def _sample_pod_labels(name: str) -> Labels:
    """The pod template's labels of one of Istio's injector samples (input or output)."""
    text = shared_file("istio-injector-samples", name).read_text()
    (document,) = [d for d in yaml.safe_load_all(text) if d]
    labels: Labels = document["spec"]["template"]["metadata"].get("labels") or {}
    return labels


@cache
def istio_added_labels() -> dict[str, Labels]:
    """What Istio's injection adds to a pod's labels, per template, from Istio's own
    samples: the sidecar template (hello.yaml) and the gateway template (gateway.yaml)."""
    added = {}
    for template, sample in (("sidecar", "hello.yaml"), ("gateway", "gateway.yaml")):
        before = _sample_pod_labels(sample)
        after = _sample_pod_labels(f"{sample}.injected")
        added[template] = {k: v for k, v in after.items() if before.get(k) != v}
    return added


def test_istio_injection_labels_every_pod_it_injects() -> None:
    """The selection rests on these: every template that adds a proxy writes them."""
    added = istio_added_labels()
    assert {"security.istio.io/tlsMode", "service.istio.io/canonical-name"} <= set(added["sidecar"])
    assert "service.istio.io/canonical-name" in added["gateway"]
    assert "security.istio.io/tlsMode" not in added["gateway"]


def injection(template: str) -> Mutator:
    """Istio's webhook: the labels its template adds (a label the pod already has is kept,
    as Istio's templates do: ``index .ObjectMeta.Labels ... | default``)."""

    def mutate(labels: Labels) -> Labels:
        return istio_added_labels()[template] | labels

    return mutate


# --- meshguard's side ---------------------------------------------------------------------------


def meshguard_configuration(values: dict[str, Any] | None = None) -> dict[str, Any]:
    (config,) = kinds(render(values), "MutatingWebhookConfiguration")
    return config


def chain(
    scenario: str, *, meshguard: dict[str, Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    config = meshguard or meshguard_configuration()
    hooks = {name: c["webhooks"] for name, c in istio_install(scenario).configurations.items()}
    return hooks | {config["metadata"]["name"]: config["webhooks"]}


def grid() -> list[tuple[Labels, Labels, str]]:
    """(namespace labels, pod labels, namespace name) for every grid case."""
    cases = []
    for name, injection_, ns_rev, inject, pod_rev in itertools.product(
        NAMESPACE_NAMES, INJECTION_LABELS, REVISIONS, POD_INJECT, REVISIONS
    ):
        namespace = {"kubernetes.io/metadata.name": name}
        namespace |= _labels({"istio-injection": injection_, "istio.io/rev": ns_rev})
        pod = {"app": "shop"} | _labels(
            {"sidecar.istio.io/inject": inject, "istio.io/rev": pod_rev}
        )
        cases.append((namespace, pod, name))
    return cases


def _labels(pairs: dict[str, str | None]) -> Labels:
    return {key: value for key, value in pairs.items() if value is not None}


def admitted(
    scenario: str, *, template: str = "sidecar", meshguard: dict[str, Any] | None = None
) -> list[tuple[Labels, Labels, str, list[str], list[str]]]:
    """Each grid case through the chain: (namespace, pod, name, Istio's calls, meshguard's)."""
    hooks = chain(scenario, meshguard=meshguard)
    mutators = {name: injection(template) for name in istio_install(scenario).configurations}
    results = []
    for namespace, pod, name in grid():
        called, _ = admit_create(hooks, namespace=namespace, pod=pod, mutators=mutators)
        by_istio = [c for c in called if c.split("/")[0] in mutators]
        by_meshguard = [c for c in called if c.split("/")[0] not in mutators]
        results.append((namespace, pod, name, by_istio, by_meshguard))
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("template", ["sidecar", "gateway"])
def test_meshguard_sees_every_pod_istio_injects_and_only_those(
    scenario: str, template: str
) -> None:
    injected = seen = 0
    for namespace, pod, name, by_istio, by_meshguard in admitted(scenario, template=template):
        where = f"namespace {namespace}, pod {pod}: Istio {by_istio}, meshguard {by_meshguard}"
        assert len(by_istio) <= 1, where  # Istio's own selections are disjoint
        # called once: the entries are disjoint and nothing changes the pod after meshguard
        assert len(by_meshguard) <= 1, where
        if name in MESHGUARD_EXCLUDED:
            assert not by_meshguard, where
            continue
        assert bool(by_meshguard) == bool(by_istio), where
        injected += bool(by_istio)
        seen += bool(by_meshguard)
    assert injected == seen > 0


def test_the_grid_exercises_every_revision_and_tag() -> None:
    """Not vacuous: pods of the canary revision, the prod and default tags, both control
    planes and "auto" namespaces are injected, and reach meshguard, with no value set."""

    def reached(scenario: str, namespace_: Labels, pod_: Labels) -> bool:
        """Some pod with exactly these Istio labels (namespace, pod) reaches meshguard."""
        return any(
            by_meshguard
            for namespace, pod, _, _, by_meshguard in admitted(scenario)
            if {k: v for k, v in namespace.items() if k != "kubernetes.io/metadata.name"}
            == namespace_
            and {k: v for k, v in pod.items() if k != "app"} == pod_
        )

    rev = "istio.io/rev"
    assert reached("canary", {rev: "canary"}, {})
    assert reached("canary", {}, {rev: "canary"})
    assert reached("canary+tag-prod", {rev: "prod"}, {})
    assert reached("canary+tag-default", {"istio-injection": "enabled"}, {})
    assert reached("default+canary", {rev: "canary"}, {})
    assert not reached("canary+tag-prod", {rev: "other"}, {})  # no istiod serves it
    assert not reached("canary", {"istio-injection": "enabled"}, {})  # no default revision
    counts = {s: sum(bool(r[4]) for r in admitted(s)) for s in SCENARIOS}
    assert counts["default+enableNamespacesByDefault"] > counts["default"] > 0


def test_meshguard_sorted_before_istio_would_see_nothing() -> None:
    """Why the configuration sorts after Istio's: first in the chain, meshguard's selectors
    see the pod before injection, and a reinvocation never calls it for the first time."""
    first = meshguard_configuration()
    first["metadata"]["name"] = "00-meshguard"
    results = admitted("default", meshguard=first)
    assert any(r[3] for r in results)
    assert not any(r[4] for r in results)


def test_a_name_that_sorts_before_istio_is_refused() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(Exception, match="sorts before Istio"):
        chart.render(
            {"webhook": {"configurationName": "00-meshguard"}},
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=True,
        )


def test_the_opt_out_label_keeps_meshguard_away() -> None:
    hooks = chain("default")
    mutators = {name: injection("sidecar") for name in istio_install("default").configurations}
    for namespace, pod, _ in grid():
        opted_out = namespace | {"meshguard.io/inject": "disabled"}
        called, _ = admit_create(hooks, namespace=opted_out, pod=pod, mutators=mutators)
        assert not [c for c in called if c.startswith(MESHGUARD)], (namespace, pod)


def test_no_selector_names_an_istio_revision() -> None:
    text = json.dumps(meshguard_configuration()["webhooks"])
    assert "istio.io/rev" not in text and "istio-injection" not in text


def test_configuration_is_valid_and_sorts_after_istios() -> None:
    config = meshguard_configuration()
    kubernetes_validate.validate(config, K8S_VERSION, strict=True)
    for scenario in SCENARIOS:
        for name in istio_install(scenario).configurations:
            assert config["metadata"]["name"] > name
    assert [h["reinvocationPolicy"] for h in config["webhooks"]] == ["IfNeeded"] * 9


# --- istioctl analyze -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_istioctl_analyze_reports_nothing_with_meshguard_installed(scenario: str) -> None:
    istio = istio_install(scenario)
    meshguard = meshguard_configuration()
    services = set(istio.services) | {
        (NAMESPACE, s["metadata"]["name"]) for s in kinds(render(), "Service")
    }
    configurations = [*istio.configurations.values(), meshguard]
    assert analyze(configurations, services=services) == []


def test_the_analyzer_reimplementation_finds_an_overlap() -> None:
    """Not vacuous: a second copy of Istio's default injector is reported, both entries of
    each overlapping pair, as IST0139 does; so is a missing control plane Service."""
    istio = istio_install("default")
    original = istio.configurations["istio-sidecar-injector"]
    copy_ = json.loads(json.dumps(original))
    copy_["metadata"]["name"] = "istio-sidecar-injector-copy"
    messages = analyze([original, copy_], services=istio.services)
    assert {m.webhook.split("/")[0] for m in messages} == {
        "istio-sidecar-injector",
        "istio-sidecar-injector-copy",
    }
    assert all("overlaps with others" in m.text for m in messages)
    missing = analyze([original], services=set())
    assert missing and all("does not exist" in m.text for m in missing)


# --- issue 30: what is added to an admitted pod is reviewed, whatever its labels now ---------

ADMITTED: Final = {
    "app": "shop",
    "security.istio.io/tlsMode": "istio",
    "service.istio.io/canonical-name": "shop",
    "meshguard.io/admitted": "true",
}
RELABELLINGS: Final = {
    "inject=false": ADMITTED | {"sidecar.istio.io/inject": "false"},
    "rev changed": ADMITTED | {"istio.io/rev": "other"},
    "rev removed": {k: v for k, v in ADMITTED.items() if k != "istio.io/rev"},
    "istio labels removed": {"app": "shop", "meshguard.io/admitted": "true"},
    "unchanged": ADMITTED,
}


@pytest.mark.parametrize("relabelled", RELABELLINGS.values(), ids=RELABELLINGS.keys())
@pytest.mark.parametrize(
    "namespace",
    [
        {"kubernetes.io/metadata.name": "shop", "istio.io/rev": "canary"},
        {"kubernetes.io/metadata.name": "shop"},
        {"kubernetes.io/metadata.name": "shop", "meshguard.io/inject": "disabled"},
    ],
    ids=["rev-namespace", "unlabeled", "opted-out-after"],
)
def test_kubectl_debug_on_an_admitted_pod_is_reviewed_after_any_relabelling(
    relabelled: Labels, namespace: Labels
) -> None:
    """``kubectl label pod P sidecar.istio.io/inject=false`` (and the others) happened
    before; the ephemeralcontainers UPDATE carries the pod's labels as old and new object
    (the subresource cannot change them) and meshguard is called on it."""
    hooks = chain("canary")
    called = called_on_update(
        hooks,
        namespace=namespace,
        old=relabelled,
        new=relabelled,
        resource="pods/ephemeralcontainers",
    )
    assert called == [f"{MESHGUARD}/admitted.meshguard.io"]


def test_the_review_keys_on_the_admitted_label_only() -> None:
    hooks = chain("default")
    plain = {"app": "shop", "security.istio.io/tlsMode": "istio"}  # injected, not admitted
    namespace = {"kubernetes.io/metadata.name": "shop", "istio-injection": "enabled"}
    assert not called_on_update(
        hooks, namespace=namespace, old=plain, new=plain, resource="pods/ephemeralcontainers"
    )
    # a pod UPDATE that removes the label (the ValidatingAdmissionPolicy refuses it) would
    # still be matched on the old object
    config = meshguard_configuration()
    (admitted_hook,) = [h for h in config["webhooks"] if h["name"] == "admitted.meshguard.io"]
    admitted_hook["rules"][0]["resources"] = ["pods"]
    assert called_on_update(
        {MESHGUARD: [admitted_hook]},
        namespace=namespace,
        old=ADMITTED,
        new=plain,
        resource="pods",
    )


# --- the authz server's own injection (issue 24 item 4) ------------------------------------


@pytest.mark.parametrize(
    ("scenario", "values"),
    [
        ("default", {}),
        ("canary+tag-default", {}),
        ("canary", {"authz": {"istioRevision": "canary"}}),
        ("canary+tag-prod", {"authz": {"istioRevision": "prod"}}),
        ("default+canary", {"authz": {"istioRevision": "canary"}}),
    ],
)
def test_istio_injects_the_authz_server_for_its_certificate(
    scenario: str, values: dict[str, Any]
) -> None:
    """Exactly one of Istio's injectors takes the authz pod (in meshguard's unlabeled
    namespace), on revision-only installs too once authz.istioRevision names one."""
    (deployment,) = [
        d for d in kinds(render(values), "Deployment") if d["metadata"]["name"] == "meshguard-authz"
    ]
    pod = deployment["spec"]["template"]["metadata"]["labels"]
    hooks = {n: c["webhooks"] for n, c in istio_install(scenario).configurations.items()}
    mutators = {name: injection("sidecar") for name in hooks}
    namespace = {"kubernetes.io/metadata.name": NAMESPACE}
    called, _ = admit_create(hooks, namespace=namespace, pod=pod, mutators=mutators)
    assert len(called) == 1, called


def test_a_revision_only_istio_needs_the_authz_revision() -> None:
    """What the chart refuses where it can read Istio's webhooks (lookup): the default
    labels reach no injector of a revision-only Istio, so no certificate would come."""
    (deployment,) = [
        d for d in kinds(render(), "Deployment") if d["metadata"]["name"] == "meshguard-authz"
    ]
    pod = deployment["spec"]["template"]["metadata"]["labels"]
    hooks = {n: c["webhooks"] for n, c in istio_install("canary").configurations.items()}
    namespace = {"kubernetes.io/metadata.name": NAMESPACE}
    assert admit_create(hooks, namespace=namespace, pod=pod, mutators={})[0] == []


# --- what the chart refuses where it can read the cluster (lookup) --------------------------


def probe(tmp_path: Path, **objects: list[dict[str, Any]]) -> dict[str, str]:
    """The chart's refusal helpers on given cluster objects: ``lookup`` answers nothing
    offline, so a copy of the chart renders the helpers on the objects passed as values."""
    chart = tmp_path / "meshguard"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    (chart / "templates" / "zz-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n"
        '  authz: {{ include "meshguard.authz.noDefaultRevision" (dict "webhooks"'
        " .Values.probe.webhooks) | quote }}\n"
        '  cni: {{ include "meshguard.cni.istioCniWithoutAgent" (dict "daemonSets"'
        " .Values.probe.daemonSets) | quote }}\n"
    )
    values = {"probe": {"webhooks": objects.get("webhooks", []),
                        "daemonSets": objects.get("daemonSets", [])}}  # fmt: skip
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    data: dict[str, str] = yaml.safe_load(rendered["meshguard/templates/zz-probe.yaml"])["data"]
    return data


@pytest.mark.parametrize(
    ("scenario", "refused"),
    [
        ("default", False),
        ("canary+tag-default", False),
        ("default+canary", False),
        ("canary", True),
        ("canary+tag-prod", True),
    ],
)
def test_a_revision_only_istio_is_refused_without_authz_revision(
    tmp_path: Path, scenario: str, refused: bool
) -> None:
    webhooks = list(istio_install(scenario).configurations.values())
    problem = probe(tmp_path, webhooks=webhooks)["authz"]
    assert bool(problem) is refused, problem
    if refused:
        assert "set authz.istioRevision to one of them" in problem
        assert "canary" in problem
    assert probe(tmp_path / "none")["authz"] == ""  # nothing readable: nothing refused


def test_istio_cni_without_the_node_agent_is_refused(tmp_path: Path) -> None:
    with helm.Chart.load(shared_file("istio-charts", "istio-cni")) as chart:
        rendered = chart.render({}, name="istio-cni", namespace="istio-system", is_install=True)
    daemon_sets = [
        obj
        for name, text in rendered.items()
        if not name.endswith(".txt")
        for obj in yaml.safe_load_all(text)
        if obj and obj.get("kind") == "DaemonSet"
    ]
    assert daemon_sets, "Istio's CNI chart rendered no DaemonSet"
    problem = probe(tmp_path, daemonSets=daemon_sets)["cni"]
    assert "Istio runs in CNI mode here (DaemonSet istio-system/istio-cni-node)" in problem
    assert "set cni.enabled=true" in problem
    other = [{"metadata": {"name": "kube-proxy", "namespace": "kube-system"}}]
    assert probe(tmp_path / "other", daemonSets=other)["cni"] == ""
