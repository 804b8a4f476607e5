"""Pods built from Istio's real injector outputs in ../shared/istio-injector-samples."""

from __future__ import annotations

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
