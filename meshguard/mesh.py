"""Facts about Istio's sidecar that every layer of meshguard relies on.

The compiler turns them into kernel rules, the authz decision names the proxy's ports with
them, and the sandbox reproduces them; they live here so that none of those layers imports
another for a constant.
"""

from __future__ import annotations

from typing import Final

#: The ports Istio reserves for its sidecar: no workload container may declare, reach or
#: send from them, except the control ports a rule names.
PROXY_PORT_RANGE: Final = (15000, 15090)
ISTIO_RESERVED_PORTS: Final = frozenset(range(PROXY_PORT_RANGE[0], PROXY_PORT_RANGE[1] + 1))
#: The proxy's ports that a rule may open to a container (``to: proxy``).
CONTROL_PORTS: Final = (15000, 15004, 15020, 15021, 15090)
OUTBOUND_CAPTURE_PORT: Final = 15001
INBOUND_CAPTURE_PORT: Final = 15006
DNS_CAPTURE_PORT: Final = 15053
#: Where meshguard's authz server listens when it shares the pod's network namespace
#: (standalone Envoy, the sandbox): inside the proxy's range, where the kernel rules let only
#: the proxy's uid answer, so no container can bind it first and answer every Check (Istio
#: uses none of 15030).
LOCAL_AUTHZ_PORT: Final = 15030


def is_protected_port(port: int) -> bool:
    """Whether only the proxy's uid may serve from ``port`` in a meshguard pod."""
    return PROXY_PORT_RANGE[0] <= port <= PROXY_PORT_RANGE[1]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or name (shared by every container of a pod)."""
    return host == "localhost" or host.startswith("127.") or host in {"::1", "[::1]"}


def unprotected_authz_port(port: int) -> str:
    """Why a plaintext authz server on loopback must not use ``port``."""
    low, high = PROXY_PORT_RANGE
    return (
        f"port {port} on a loopback address is outside the proxy's protected range"
        f" ({low}-{high}): any container that binds it first would answer every Check and"
        f" bypass every L7 rule; use a port in that range (default {LOCAL_AUTHZ_PORT}) served"
        " by the proxy's uid, or mutual TLS"
    )
