"""The admission benchmark's synthetic hardened Istio pod of N containers, its profiles, and
the check of an answer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.support.admissions import answer_problem

POD_CONTAINERS = 10
CONCURRENCIES = (1, 32)
GOAL_RATIO = 0.5
BASE_UID = 2000
BASE_PORT = 8000
PROXY_UID = 1337
ISTIO_IMAGE = "docker.io/istio/proxyv2:1.28.0"
REVIEW_UID = "3f6c1a52-bench-webhook"
REQUEST_TIMEOUT = 10.0
READY_TIMEOUT = 20.0
BASELINE_LIFETIME_SECONDS = 600  # the baseline server never outlives the benchmark
SERVERS = ("baseline", "meshguard")


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int  # per server and concurrency, alternating which server goes first
    requests: int  # measured requests per round
    warmup: int  # per round, same session, not measured
    phase_seconds: float  # a round stops early past this (then fewer requests are reported)
    handle_iterations: int  # per repeat of an in-process measurement
    handle_repeats: int


FULL = Profile("full", rounds=2, requests=2000, warmup=200, phase_seconds=30.0,
               handle_iterations=300, handle_repeats=5)  # fmt: skip
QUICK = Profile("quick", rounds=2, requests=500, warmup=64, phase_seconds=8.0,
                handle_iterations=60, handle_repeats=3)  # fmt: skip


def container_name(i: int) -> str:
    return f"c{i}"


def _hardened(uid: int) -> dict[str, Any]:
    return {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}  # fmt: skip


def synthetic_pod(n: int = POD_CONTAINERS) -> dict[str, Any]:
    """An Istio-injected pod of ``n`` containers: ``n - 1`` workloads plus ``istio-proxy``.

    Workload ``c<i>`` runs as uid/gid 2000+i and declares port 8000+i; ``istio-proxy`` runs as
    1337:1337 and ``istio-init`` is the init container, as Istio's injector leaves them. Every
    container is hardened (non-root, no privilege escalation, all capabilities dropped), so
    meshguard has no posture fix to make. The policy has a few rules: ``c0 -> c1``, ``c1``
    and ``c2`` to ``c3`` over HTTP (GET/POST on ``/api/*``), the other containers to the
    last one over tcp and udp, and anyone to ``c0``.
    """
    workloads = n - 1
    if workloads < 4:
        raise ValueError("a synthetic pod needs at least 5 containers (4 workloads + proxy)")
    last = workloads - 1
    rules: list[dict[str, Any]] = [
        {"from": container_name(0), "to": container_name(1), "ports": [BASE_PORT + 1]},
        {"from": [container_name(1), container_name(2)], "to": container_name(3),
         "ports": [BASE_PORT + 3], "http": {"methods": ["GET", "POST"], "paths": ["/api/*"]}},
        {"from": [container_name(i) for i in range(4, last)] or [container_name(0)],
         "to": container_name(last), "ports": [BASE_PORT + last], "protocol": "any"},
        {"from": "*", "to": container_name(0), "ports": [BASE_PORT]},
    ]  # fmt: skip
    containers: list[dict[str, Any]] = [
        {
            "name": container_name(i),
            "image": f"example.com/bench/{container_name(i)}:1.0",
            "ports": [{"containerPort": BASE_PORT + i, "name": f"port-{i}", "protocol": "TCP"}],
            "securityContext": _hardened(BASE_UID + i),
        }
        for i in range(workloads)
    ]
    containers.append(
        {"name": "istio-proxy", "image": ISTIO_IMAGE,
         "args": ["proxy", "sidecar", "--domain", "bench.svc.cluster.local"],
         "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
         "securityContext": {**_hardened(PROXY_UID), "privileged": False,
                             "readOnlyRootFilesystem": True}}
    )  # fmt: skip
    status = {"initContainers": ["istio-init"], "containers": ["istio-proxy"],
              "volumes": ["istio-envoy"]}  # fmt: skip
    istio_init = {
        "name": "istio-init", "image": ISTIO_IMAGE,
        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337"],
        "securityContext": {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
                            "allowPrivilegeEscalation": False, "privileged": False,
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"bench-{n}",
            "namespace": "bench",
            "labels": {"app": "bench"},
            "annotations": {
                "meshguard.io/policy": json.dumps({"defaultAction": "deny", "rules": rules}),
                "sidecar.istio.io/status": json.dumps(status),
            },
        },
        "spec": {
            "initContainers": [istio_init],
            "containers": containers,
            "volumes": [{"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}],
        },
    }


def answer_error(status: int, payload: bytes, uid: str) -> str | None:
    """Why an answer is not a successful injection, or None."""
    if status != 200:
        return f"HTTP {status}"
    try:
        response = json.loads(payload)["response"]
    except (ValueError, KeyError, TypeError):
        return "answer is not an AdmissionReview"
    return answer_problem(response, uid)
