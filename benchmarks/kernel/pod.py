"""The kernel benchmark's synthetic Istio-injected pod of N containers and its profiles."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meshguard
from meshguard.pod import read_pod
from meshguard.rules.backend import NATIVE_NFTABLES_FLAG
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.ruleset import Ruleset

HOST = "127.0.0.1"
MESHGUARD_PACKAGE = Path(meshguard.__file__).parent
TRAFFIC_POD_SIZE = 16
BASE_UID = 2000
BASE_PORT = 8000
PROXY_UID = 1337
GOAL = 0.95
MESSAGE = b"x" * 32
RR_WARMUP = 500
CONNECT_WARMUP = 100
SOCKET_TIMEOUT_SECONDS = 5.0
SERVER_LIFETIME_SECONDS = 120
CHECK_EVERY = 64


@dataclass(frozen=True)
class Profile:
    """How long and how often to measure."""

    name: str
    trials: int  # per configuration
    rr_count: int
    rr_seconds: float
    connect_count: int
    connect_seconds: float


FULL = Profile(
    name="full",
    trials=5,
    rr_count=200_000,
    rr_seconds=1.5,
    connect_count=30_000,
    connect_seconds=1.5,
)
QUICK = Profile(
    name="quick",
    trials=2,
    rr_count=50_000,
    rr_seconds=0.5,
    connect_count=10_000,
    connect_seconds=0.5,
)
WARMUP = Profile(
    name="warmup",
    trials=1,
    rr_count=2_000,
    rr_seconds=0.2,
    connect_count=200,
    connect_seconds=0.2,
)


def is_root() -> bool:
    return os.geteuid() == 0


def container_name(index: int) -> str:
    return f"c{index:02d}"


def synthetic_pod(n: int, *, native_nftables: bool = False) -> dict[str, Any]:
    """An Istio-injected pod of ``n`` containers; each may reach the next one's port.

    Container ``cNN`` runs as uid/gid 2000+NN and declares port 8000+NN; the policy allows
    ``c[i] -> c[i+1]`` on ``8000+i+1``, and the last container reaches ``c00`` on 8000.
    ``native_nftables``: Istio runs its native nftables mode (istio-init's flag).
    """
    if n < 2:
        raise ValueError("a synthetic pod needs at least 2 containers")
    rules = [
        {"from": container_name(i), "to": container_name((i + 1) % n), "ports": [_port(i + 1, n)]}
        for i in range(n)
    ]
    containers: list[dict[str, Any]] = [
        {
            "name": container_name(i),
            "image": f"example.com/bench/{container_name(i)}:1.0",
            "ports": [{"containerPort": BASE_PORT + i, "name": f"port-{i}"}],
            "securityContext": {"runAsUser": BASE_UID + i, "runAsGroup": BASE_UID + i},
        }
        for i in range(n)
    ]
    containers.append(
        {
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.28.0",
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom"}],
            "securityContext": {"runAsUser": PROXY_UID, "runAsGroup": PROXY_UID},
        }
    )
    status = {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "volumes": []}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"bench-{n}",
            "namespace": "bench",
            "annotations": {
                "meshguard.io/mode": "enforce",
                "meshguard.io/policy": json.dumps({"defaultAction": "deny", "rules": rules}),
                "sidecar.istio.io/status": json.dumps(status),
            },
        },
        "spec": {
            "initContainers": [
                {
                    "name": "istio-init",
                    "image": "docker.io/istio/proxyv2:1.28.0",
                    "args": [
                        "istio-iptables",
                        *([NATIVE_NFTABLES_FLAG] if native_nftables else []),
                    ],
                    "securityContext": {"runAsUser": 0, "runAsGroup": 0},
                }
            ],
            "containers": containers,
        },
    }


def _port(index: int, n: int) -> int:
    return BASE_PORT + index % n


def compile_synthetic(
    n: int,
    *,
    flat: bool = False,
    native_nftables: bool = False,
    compiler: Mapping[str, Any] | None = None,
) -> Ruleset:
    pod = synthetic_pod(n, native_nftables=native_nftables)
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    fields = dict(compiler or {}) | ({"dispatch_fanout": max(n, 2)} if flat else {})
    return compile_pod(view, settings=CompilerSettings(**fields), native_nftables=native_nftables)


def rule_count(ruleset: Ruleset) -> int:
    return sum(len(t.rules) for family in (ruleset.ipv4, ruleset.ipv6) for t in family.tables)
