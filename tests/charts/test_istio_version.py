"""The chart refuses an Istio too old for the install's L7 engine, where it can read Istio's
MutatingWebhookConfigurations (lookup): the version is the label Istio's real istiod chart
puts on them (rendered here with helm-python-sdk from ../shared)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.test_chart import CHART, NAMESPACE, RELEASE, helm
from tests.charts.test_selection import istio_install


def istio_webhooks(scenario: str, version: str) -> list[dict[str, Any]]:
    """Istio's rendered injectors for ``scenario``, as a release ``version`` labels them."""
    hooks = []
    for configuration in istio_install(scenario).configurations.values():
        hook = copy.deepcopy(configuration)
        labels = hook["metadata"]["labels"]
        assert labels["app.kubernetes.io/version"] == "1.0.0"  # Istio's unreleased chart
        labels["app.kubernetes.io/version"] = version
        hooks.append(hook)
    return hooks


def too_old(tmp_path: Path, webhooks: list[dict[str, Any]], engine: str) -> str:
    """``meshguard.istio.tooOld`` on these objects (``lookup`` answers nothing offline, so a
    copy of the chart renders the helper on values)."""
    chart = tmp_path / "meshguard"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    (chart / "templates" / "zz-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n"
        '  old: {{ include "meshguard.istio.tooOld" (dict "webhooks" .Values.probe.webhooks'
        ' "engine" .Values.probe.engine) | quote }}\n'
    )
    values = {"probe": {"webhooks": webhooks, "engine": engine}}
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    text: str = yaml.safe_load(rendered["meshguard/templates/zz-probe.yaml"])["data"]["old"]
    return text


@pytest.mark.parametrize(
    ("version", "engine", "refused"),
    [
        ("1.22.6", "native", True),
        ("1.23.0", "native", False),
        ("1.28.2", "native", False),
        ("1.17.8", "ext-authz", True),
        ("1.18.0", "ext-authz", False),
        ("1.22.0", "ext-authz", False),
        ("1.0.0", "native", False),  # Istio's charts from source: not a release
        ("", "native", False),  # no label: nothing to judge
        ("0.9.1", "native", True),
        ("2.0.0", "native", False),
        ("1.22-dev", "native", True),
    ],
)
def test_an_istio_older_than_the_engine_s_minimum_is_named(
    tmp_path: Path, version: str, engine: str, refused: bool
):
    found = too_old(tmp_path, istio_webhooks("default", version), engine)
    assert bool(found) is refused, found
    if refused:
        assert "istio-sidecar-injector (revision default: Istio " in found
        assert "docs/envoy-versions.md" in found
        assert ("webhook.l7Engine=ext-authz" in found) is (engine == "native")


def test_every_revision_is_judged(tmp_path: Path):
    """A canary upgrade: the old revision is named, the new one is not."""
    hooks = istio_webhooks("default+canary", "1.28.0")
    (old,) = [h for h in hooks if h["metadata"]["labels"]["istio.io/rev"] == "default"]
    old["metadata"]["labels"]["app.kubernetes.io/version"] = "1.21.3"
    found = too_old(tmp_path, hooks, "native")
    assert "revision default: Istio 1.21.3" in found
    assert "canary" not in found


def test_the_chart_renders_without_a_cluster(tmp_path: Path):
    """helm template: lookup finds nothing, the check passes (as the other lookups do)."""
    with helm.Chart.load(CHART) as loaded:
        rendered = loaded.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert rendered
