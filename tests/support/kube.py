"""Kubernetes and Istio semantics the chart tests evaluate: label selectors, CRD schemas."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import yaml

from tests.support.shared import shared_file


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics: matchLabels AND every matchExpression; an empty or
    absent selector matches everything. Malformed expressions fail the test, as the API
    server would refuse them."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator in {"In", "NotIn"}:
            assert values, f"{key} {operator} needs values"
            matched = (key in labels and labels[key] in values) is (operator == "In")
        elif operator in {"Exists", "DoesNotExist"}:
            assert not values, f"{key} {operator} takes no values"
            matched = (key in labels) is (operator == "Exists")
        else:
            pytest.fail(f"unknown selector operator {operator}")
        if not matched:
            return False
    return True


@cache
def istio_crd_schema(kind: str, version: str) -> dict[str, Any]:
    text = shared_file("istio-crds", "crd-all.gen.yaml").read_text()
    for document in yaml.safe_load_all(text):
        if document and document["spec"]["names"]["kind"] == kind:
            for entry in document["spec"]["versions"]:
                if entry["name"] == version:
                    schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
                    return schema
    raise AssertionError(f"Istio's CRDs have no {kind} {version}")
