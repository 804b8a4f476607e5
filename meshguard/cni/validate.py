"""meshguard-validation: prove, without privileges, that meshguard's rules are in place.

Runs in the pod as a uid that belongs to no container, to which meshguard's rules refuse every
loopback flow. It listens on 127.0.0.1 (and ::1 when the pod has IPv6) and connects to its own
listener: without meshguard's rules the connection succeeds — the check fails and the pod's
app containers never start; with them the kernel resets it (connection refused). In audit
mode the rules log instead of refusing, so the probe cannot tell: it only reports that.
"""

from __future__ import annotations

import socket

from meshguard.errors import MeshguardFailure

PROBE_TIMEOUT_SECONDS = 3.0


def probe(address: str, family: socket.AddressFamily) -> bool:
    """True when a connection from this uid to its own listener at ``address`` is refused."""
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((address, 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(PROBE_TIMEOUT_SECONDS)
            try:
                client.connect((address, port))
            except ConnectionRefusedError:
                return True
            except OSError as exc:
                raise MeshguardFailure(f"probe to {address}:{port}: {exc}") from None
    return False


def validate(*, mode: str) -> list[str]:
    """What is wrong (empty: the rules are in place); raises on an inconclusive probe."""
    if mode == "audit":
        return []
    problems = []
    targets = [("127.0.0.1", socket.AF_INET)]
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as test:
                test.bind(("::1", 0))
            targets.append(("::1", socket.AF_INET6))
        except OSError:
            pass  # no IPv6 in the pod: no IPv6 loopback flows either
    for address, family in targets:
        if not probe(address, family):
            problems.append(
                f"a connection to {address} from a uid of no container was not refused:"
                " meshguard's rules are not installed in this pod (is meshguard-cni chained"
                " on this node?)"
            )
    return problems
