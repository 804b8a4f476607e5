"""The enforcement matrix: the example pod (``meshguard/examples/pod.yaml``), one echo server
per container under its uid, and the expected outcome of every flow — every port of every
container over 127.0.0.1, 127.0.0.2, the pod IP, ::1, the pod's IPv6 and ::ffff:127.0.0.1,
TCP and UDP, from every container, the proxy and identities of no container. The expected
outcomes are written out by hand (not derived from the compiler), including where Istio's
own capture sends a flow. Used wherever a pod's rules are built: by meshguard-init
(tests/rules/test_enforcement.py) and by the CNI plugin chain (tests/cni/test_chain_netns.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import meshguard
from tests.support.podns import PodSandbox, Server

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
PROXY_UID = 1337

# Who runs as what, and what each serves (the proxy's ports stand in for Envoy/pilot-agent).
APP = Server("app", 1000, 1000, tcp=(8080, 9090))
LOGS = Server("log-shipper", 1001, 1001, udp=(5140,))
CACHE = Server("cache", 1002, 1002, tcp=(6379,))
PROXY = Server(
    "proxy", PROXY_UID, PROXY_UID,
    tcp=(15000, 15001, 15004, 15006, 15007, 15020, 15021, 15053, 15090), udp=(15053,),
)  # fmt: skip
SERVERS = (APP, LOGS, CACHE, PROXY)
OWNER = {(proto, port): s.name for s in SERVERS for proto in ("tcp", "udp")
         for port in getattr(s, proto)}  # fmt: skip

# The policy of examples/pod.yaml, as the flows it must allow (besides own ports).
ALLOWED = {
    "app": {("tcp", 8080), ("tcp", 9090), ("tcp", 6379), ("udp", 5140)},
    "log-shipper": {("udp", 5140), ("tcp", 9090)},
    "cache": {("tcp", 6379)},
}
#: app's rule to 15020, and Istio's patterns (GET :15021/healthz/ready, POST
#: :15020/quitquitquit) for every container: L7, so redirected to the loopback listener.
ISTIO_PATTERNS = {("tcp", 15020), ("tcp", 15021)}
L7_REDIRECTED = {"app": ISTIO_PATTERNS, "log-shipper": ISTIO_PATTERNS, "cache": ISTIO_PATTERNS}
SOURCE_ADDRESS = {"app": ("127.0.100.1", "fd6d:6775::1")}  # app sorts first of 3 containers

# Non-container identities: none may reach anything over loopback.
STRANGERS = {
    "stranger-uid": (4242, 4242, ()),
    "proxy-gid-only": (4243, PROXY_UID, ()),
    "proxy-supplementary-group": (4244, 4244, (PROXY_UID,)),
}

DESTINATIONS = {
    "127.0.0.1": True, "127.0.0.2": False, "10.1.2.3": False,
    "::1": True, "fd00:10::3": False, "::ffff:127.0.0.1": True,
}  # fmt: skip  # address -> is it Istio's "localhost" (exempt from the proxy's inbound capture)?


def example_pod() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return pod


def targets() -> list[dict[str, Any]]:
    return [
        {"host": host, "port": port, "protocol": proto}
        for host in DESTINATIONS
        for (proto, port) in sorted(OWNER)
    ]


def expected(source: str, target: dict[str, Any]) -> tuple[str, str | None, int | None]:
    """(result, landing server, landing port) for a flow, by the policy and Istio's rules."""
    proto, port, host = target["protocol"], target["port"], target["host"]
    if source == "proxy":
        if proto == "tcp" and not DESTINATIONS[host]:
            # Istio sends the proxy dialing a pod address to its inbound listener: a hairpin,
            # on behalf of some container; the example opens no port to every container.
            return "deny", None, None
        return "allow", OWNER[(proto, port)], port
    if (proto, port) in L7_REDIRECTED.get(source, set()):
        return "allow", "proxy", 15007
    if (proto, port) in ALLOWED.get(source, set()):
        return "allow", OWNER[(proto, port)], port
    return "deny", None, None


def check_matrix(
    box: PodSandbox, source: str, uid: int, gid: int, groups: tuple[int, ...] = ()
) -> int:
    """Every port of every container over every address, as ``source``: all as expected."""
    flows = targets()
    results = box.probe(uid=uid, gid=gid, groups=groups, targets=flows)
    wrong = []
    for target, got in zip(flows, results, strict=True):
        result, server, port = expected(source, target)
        observed = (got["result"], got.get("server"), got.get("port"))
        if observed != (result, server, port):
            wrong.append(f"{source} -> {target}: expected {(result, server, port)}, got {got}")
    assert not wrong, "\n".join(wrong)
    print(f"{source}: {len(flows)} flows, all as expected")
    return len(flows)
