"""Pods built from Istio's real injector outputs in ../shared/istio-injector-samples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from meshguard.manifests import PodTemplate, pod_templates, read_documents
from meshguard.pod import MESH_INIT_CONTAINERS, PROXY_CONTAINER
from tests.support.shared import INJECTOR_SAMPLES


def injected_sample_names() -> list[str]:
    """Every golden injector output (empty when ../shared is absent: tests then skip)."""
    if not INJECTOR_SAMPLES.exists():
        return []
    return sorted(p.name for p in INJECTOR_SAMPLES.glob("*.injected"))


def load_templates(name: str) -> list[PodTemplate]:
    return list(pod_templates(read_documents(Path(INJECTOR_SAMPLES / name))))


def give_distinct_uids(template: PodTemplate, *, first_uid: int = 2000) -> None:
    """Set a distinct runAsUser on every workload container (what `fix` mode will do)."""
    uid = first_uid
    for field in ("initContainers", "containers"):
        for container in template.spec.get(field) or []:
            if container["name"] in MESH_INIT_CONTAINERS or container["name"] == PROXY_CONTAINER:
                continue
            context: dict[str, Any] = container.setdefault("securityContext", {})
            context["runAsUser"] = uid
            uid += 1


def workload_names(template: PodTemplate) -> list[str]:
    return [
        c["name"]
        for field in ("initContainers", "containers")
        for c in template.spec.get(field) or []
        if c["name"] not in MESH_INIT_CONTAINERS and c["name"] != PROXY_CONTAINER
    ]


def pod_of_uids(pod: dict[str, Any], uids: list[int], *, first_port: int = 7000) -> dict[str, Any]:
    """``pod`` with its workload replaced by one container per uid, ``cNN`` serving port
    ``first_port + NN``; the policy denies everything but each container's own port."""
    result = copy.deepcopy(pod)
    proxy = [c for c in result["spec"]["containers"] if c["name"] == PROXY_CONTAINER]
    result["spec"]["containers"] = [
        {
            "name": f"c{index:02d}",
            "image": f"example.com/c{index:02d}:1.0",
            "ports": [{"containerPort": first_port + index}],
            "securityContext": {"runAsUser": uid, "runAsGroup": uid},
        }
        for index, uid in enumerate(uids)
    ] + proxy
    result["spec"]["initContainers"] = [
        c for c in result["spec"].get("initContainers") or [] if c["name"] in MESH_INIT_CONTAINERS
    ]
    result["metadata"]["annotations"]["meshguard.io/policy"] = '{"defaultAction": "deny"}'
    return result
