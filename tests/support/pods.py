"""The example pod as tests and benchmarks use it: read, injected, in an AdmissionReview."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import meshguard
from meshguard import annotation_keys, yaml_io
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.status import PodStatus, read_status
from tests.support.keys import SIGNER

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def example_pod() -> dict[str, Any]:
    """``meshguard/examples/pod.yaml``, as a fresh dict each call."""
    pod = yaml_io.load(EXAMPLE.read_text())
    assert isinstance(pod, dict)
    return pod


def injected_example(*, policy: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """The example pod through ``inject_pod`` (no request template), with ``policy`` and
    ``mode`` as its meshguard.io annotations when given."""
    pod = example_pod()
    annotations = pod["metadata"]["annotations"]
    if policy is not None:
        annotations["meshguard.io/policy"] = policy
    if mode is not None:
        annotations["meshguard.io/mode"] = mode
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def status_of(pod: dict[str, Any]) -> PodStatus:
    """The ``meshguard.io/status`` of an injected pod, read as meshguard reads it."""
    status = read_status(pod["metadata"]["annotations"].get(annotation_keys.STATUS))
    assert status is not None, "the pod was not injected by meshguard"
    return status


def admission_review(pod: dict[str, Any], uid: str) -> bytes:
    """The body of an AdmissionReview (admission.k8s.io/v1) asking to CREATE ``pod``."""
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": pod["metadata"].get("namespace", "default"),
                "object": pod,
            },
        }
    ).encode()


def wide_example(containers: int, *, policy: str | None = None) -> dict[str, Any]:
    """The example pod (not injected) with ``containers`` more workloads ``c0``, ``c1``...,
    each hardened, as uid/gid 3000+i, declaring port 20000+i; ``policy`` replaces its
    ``meshguard.io/policy`` when given."""
    pod = example_pod()
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = policy
    extra = [
        {
            "name": f"c{i}",
            "image": f"example.com/shop/c{i}:1.0",
            "ports": [{"containerPort": 20000 + i, "name": f"p{i}"}],
            "securityContext": {
                "runAsUser": 3000 + i,
                "runAsGroup": 3000 + i,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        }
        for i in range(containers)
    ]
    pod["spec"]["containers"][:0] = extra
    return pod


def admission_update(
    old: dict[str, Any], new: dict[str, Any], uid: str, *, subresource: str | None = None
) -> bytes:
    """The body of an AdmissionReview (admission.k8s.io/v1) asking to UPDATE ``old`` into
    ``new`` (through ``subresource``, e.g. ``ephemeralcontainers`` or ``resize``)."""
    request: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "UPDATE",
        "namespace": new["metadata"].get("namespace", "default"),
        "object": new,
        "oldObject": old,
    }
    if subresource is not None:
        request["subResource"] = subresource
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()
