"""Pods built from Istio's real injector outputs in ../shared/istio-injector-samples."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


ISTIO_STATUS = "sidecar.istio.io/status"
#: Workload securityContext that passes every posture check (uid/gid to be added).
SAFE_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def istio_pod(*, cni: bool = False, native: bool = True) -> dict[str, Any]:
    """A minimal pod laid out as Istio's injector lays it out (see ../shared's samples), with
    its ``sidecar.istio.io/status``: istio-init (istio-validation in CNI mode) first, the
    proxy as a native sidecar right after it (or as a regular container), and ``app``."""
    step = "istio-validation" if cni else "istio-init"
    step_context = (
        {**SAFE_CONTEXT, "runAsUser": 1337, "runAsGroup": 1337}
        if cni
        else {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "runAsUser": 0,
            "runAsGroup": 0,
        }
    )
    proxy: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": "registry.istio.io/testing/proxyv2:latest",
        "securityContext": {**SAFE_CONTEXT, "runAsUser": 1337, "runAsGroup": 1337},
    }
    init: list[dict[str, Any]] = [
        {"name": step, "image": "registry.istio.io/testing/proxyv2:latest",
         "securityContext": step_context}
    ]  # fmt: skip
    containers: list[dict[str, Any]] = [
        {
            "name": "app",
            "image": "example.com/app:1.0",
            "ports": [{"containerPort": 8080}],
            "securityContext": {**SAFE_CONTEXT, "runAsUser": 1000, "runAsGroup": 1000},
        }
    ]
    if native:
        init.append({**proxy, "restartPolicy": "Always"})
    else:
        containers.append(proxy)
    status = {
        "initContainers": [step, PROXY_CONTAINER] if native else [step],
        "containers": None if native else [PROXY_CONTAINER],
        "volumes": [],
        "imagePullSecrets": None,
        "revision": "default",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "shop", "namespace": "demo", "annotations": {
            ISTIO_STATUS: json.dumps(status, separators=(",", ":"))}},
        "spec": {"initContainers": init, "containers": containers},
    }  # fmt: skip


def as_cni_mode(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as Istio injects it in CNI mode: its istio-init becomes istio-validation
    (``--run-validation --skip-rule-apply``, non-root, no capability), in the spec and in
    ``sidecar.istio.io/status``."""
    cni = copy.deepcopy(pod)
    step = next(c for c in cni["spec"]["initContainers"] if c["name"] == "istio-init")
    step["name"] = "istio-validation"
    step["args"] = [*step.get("args", []), "--run-validation", "--skip-rule-apply"]
    step["securityContext"] = {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True,
                               "allowPrivilegeEscalation": False,
                               "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    annotations = cni["metadata"]["annotations"]
    status = json.loads(annotations[ISTIO_STATUS])
    status["initContainers"] = [
        "istio-validation" if name == "istio-init" else name
        for name in status.get("initContainers") or []
    ]
    annotations[ISTIO_STATUS] = json.dumps(status)
    return cni


# --- pods Istio gives no init step ---------------------------------------------------------

ISTIO_INIT_STEPS = ("istio-init", "istio-validation")
Pod = tuple[dict[str, Any], dict[str, Any]]  # (metadata, spec)


def sample_pod(name: str) -> Pod:
    """(metadata, spec) of the first pod template of an Istio injector sample (a copy),
    hostPath volumes left out (Pod Security baseline forbids them; meshguard refuses them);
    skips the test when ../shared is absent."""
    if not INJECTOR_SAMPLES.exists():
        pytest.skip("../shared/istio-injector-samples is absent")
    (template, *_) = load_templates(name)
    spec = copy.deepcopy(template.spec)
    spec["volumes"] = [v for v in spec.get("volumes") or [] if "hostPath" not in v]
    return copy.deepcopy(template.metadata), spec


def drop_istio_init_step(metadata: dict[str, Any], spec: dict[str, Any], *, why: str) -> None:
    """In place: the pod as an injection without an init step renders it, no istio-init (nor
    istio-validation) in the spec or in Istio's status; ``why``, ``key=value``, is the
    annotation that chose it."""
    spec["initContainers"] = [
        c for c in spec.get("initContainers") or [] if c["name"] not in ISTIO_INIT_STEPS
    ]
    annotations = metadata["annotations"]
    status = json.loads(annotations[ISTIO_STATUS])
    listed = [n for n in status.get("initContainers") or [] if n not in ISTIO_INIT_STEPS]
    status["initContainers"] = listed or None
    annotations[ISTIO_STATUS] = json.dumps(status, separators=(",", ":"))
    key, _, value = why.partition("=")
    annotations[key] = value


def interception_none() -> Pod:
    """``sidecar.istio.io/interceptionMode: NONE`` (native sidecar: the proxy stays an init
    container, istio-init is left out)."""
    metadata, spec = sample_pod("hello.yaml.injected")
    drop_istio_init_step(metadata, spec, why="sidecar.istio.io/interceptionMode=NONE")
    return metadata, spec


def grpc_agent() -> Pod:
    """Istio's grpc-agent template: the agent as a regular container, no init container,
    and no securityContext on it (the image's user)."""
    metadata, spec = sample_pod("hello-multi.yaml.injected")
    drop_istio_init_step(metadata, spec, why="inject.istio.io/templates=grpc-agent")
    (proxy,) = [c for c in spec["initContainers"] if c["name"] == PROXY_CONTAINER]
    spec["initContainers"] = [c for c in spec["initContainers"] if c is not proxy]
    proxy.pop("restartPolicy")
    proxy.pop("securityContext", None)
    spec["containers"].insert(0, proxy)
    annotations = metadata["annotations"]
    status = json.loads(annotations[ISTIO_STATUS])
    status.update(initContainers=None, containers=[PROXY_CONTAINER])
    annotations[ISTIO_STATUS] = json.dumps(status, separators=(",", ":"))
    return metadata, spec


#: The shapes of Istio's injection without an init step, built from its real samples.
NO_INIT_STEP_SHAPES: dict[str, Callable[[], Pod]] = {
    "interceptionMode-NONE": interception_none,
    "grpc-agent": grpc_agent,
}
