"""Which flows the demo tries in a pod, and what the policy says each should do. Pure.

The expectations are worked out here from the policy's plain meaning — own ports, rules,
default action, protected proxy ports, L7 rules — independently of the rule compiler and of
the authz server, so that the demo checks them rather than repeats them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from meshguard.pod import Container, PodView
from meshguard.policy import ANY_CONTAINER, PROXY, Action, Policy, Protocol, Rule
from meshguard.rules.ruleset import Family
from meshguard.sandbox.probe import FlowProtocol, ProbeTarget

PROXY_CONTROL_PORTS: Final = (15000, 15004, 15020, 15021, 15090)
ENVOY_ADMIN_PORT: Final = 15000
#: The pod's nameserver (resolv.conf), whose DNS Istio captures: the cluster DNS Service.
CLUSTER_DNS: Final = "10.96.0.10"
CLUSTER_DNS6: Final = "fd00:10:96::a"
#: Identities no container has: another uid, and the proxy's gid without its uid.
NO_CONTAINER: Final = "other-uid"
PROXY_GID_ONLY: Final = "proxy-gid-only"
LOCALHOST: Final = {Family.IPV4: "127.0.0.1", Family.IPV6: "::1"}
HTTP_HELLO: Final = "GET / HTTP/1.0\r\n\r\n"


@dataclass(frozen=True)
class Identity:
    """A process in the pod: a container's, the proxy's, or one that should not be there."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    container: bool = True


@dataclass(frozen=True)
class Flow:
    kind: str  # "l4", "l7", "mesh", "audit", "broadcast"
    source: str
    to: str
    port: int
    protocol: FlowProtocol
    family: Family
    expected: str  # allow, deny
    host: str
    method: str | None = None
    path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    lands_on: int | None = None  # where an allowed flow must arrive, when not ``port``
    http_server: bool = False  # the destination speaks HTTP: send a request to get an answer

    def target(self) -> ProbeTarget:
        """What the probe process needs to try this flow."""
        target: ProbeTarget = {"host": self.host, "port": self.port, "protocol": self.protocol}
        if self.protocol == "http":
            target.update(
                {
                    "method": self.method or "GET",
                    "path": self.path or "/",
                    "headers": dict(self.headers),
                }
            )
        elif self.kind == "broadcast":
            target["send_only"] = True  # looped back to every socket on the port: no answer
        elif self.http_server:
            target["send"] = HTTP_HELLO
        return target

    def report(self, observed: str) -> dict[str, Any]:
        document: dict[str, Any] = {
            "kind": self.kind, "from": self.source, "to": self.to, "port": self.port,
            "protocol": self.protocol, "family": self.family.value,
            "expected": self.expected, "observed": observed,
        }  # fmt: skip
        if self.protocol == "http":
            document.update(method=self.method, path=self.path)
        return document


@dataclass(frozen=True)
class DemoPlan:
    identities: tuple[Identity, ...]
    flows: tuple[Flow, ...]
    #: container -> ports served over HTTP (L7 upstreams), and plain TCP / UDP ports.
    http_ports: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tcp_ports: dict[str, tuple[int, ...]] = field(default_factory=dict)
    udp_ports: dict[str, tuple[int, ...]] = field(default_factory=dict)


def plan(pod: PodView, policy: Policy) -> DemoPlan:
    containers = [c for c in pod.workload if c.runs_alongside and c.uid is not None]
    proxy = pod.proxy_identity
    identities = (
        *(
            Identity(c.name, c.uid or 0, c.gid if c.gid is not None else c.uid or 0)
            for c in containers
        ),
        Identity(PROXY, proxy.uid, proxy.gid, container=False),
        Identity(NO_CONTAINER, 4242, 4242, container=False),
        Identity(PROXY_GID_ONLY, 4243, proxy.gid, container=False),
    )
    http_ports = _http_ports(containers, policy)
    flows = [
        *_l4_flows(identities, containers, policy, http_ports),
        *_l7_flows(containers, policy, http_ports),
        *_mesh_flows(identities, containers),
        *_broadcast_flows(identities, containers, policy),
    ]
    return DemoPlan(
        identities=identities,
        flows=tuple(flows),
        http_ports=http_ports,
        tcp_ports={
            c.name: _declared(c, "tcp", exclude=http_ports.get(c.name, ())) for c in containers
        },
        udp_ports={c.name: _declared(c, "udp") for c in containers},
    )


def audit_flows(plan_: DemoPlan) -> list[Flow]:
    """In audit mode, the first denied L4 flow and the first denied L7 request pass."""
    chosen = []
    for kind in ("l4", "l7"):
        denied = next(
            (f for f in plan_.flows if f.kind == kind and f.expected == "deny"
             and f.family is Family.IPV4 and f.source != PROXY_GID_ONLY), None,
        )  # fmt: skip
        if denied is not None:
            chosen.append(replace(denied, kind="audit", expected="allow"))
    return chosen


def _http_ports(containers: Sequence[Container], policy: Policy) -> dict[str, tuple[int, ...]]:
    """Ports an http rule points at are served over HTTP (and the proxy's control ports)."""
    ports: dict[str, set[int]] = {PROXY: set(PROXY_CONTROL_PORTS)}
    for rule in policy.rules:
        if rule.http is not None:
            ports.setdefault(rule.to, set()).update(rule.ports)
    ports[PROXY].discard(ENVOY_ADMIN_PORT)  # the real Envoy's admin API answers there
    names = {c.name for c in containers} | {PROXY}
    return {name: tuple(sorted(p)) for name, p in ports.items() if name in names}


def _declared(
    container: Container, protocol: FlowProtocol, *, exclude: Sequence[int] = ()
) -> tuple[int, ...]:
    return tuple(sorted({p.port for p in container.ports if p.protocol == protocol} - set(exclude)))


def _destinations(
    containers: Sequence[Container], http_ports: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, int, FlowProtocol, bool]]:
    """(container, port, protocol, speaks HTTP) for every port a flow can be tried on."""
    for container in containers:
        served = set(http_ports.get(container.name, ()))
        for port in sorted({*(p.port for p in container.ports if p.protocol == "tcp"), *served}):
            yield container.name, port, "tcp", port in served
        for port in _declared(container, "udp"):
            yield container.name, port, "udp", False
    for port in PROXY_CONTROL_PORTS:
        yield PROXY, port, "tcp", True


def _l4_flows(
    identities: Sequence[Identity],
    containers: Sequence[Container],
    policy: Policy,
    http_ports: dict[str, tuple[int, ...]],
) -> Iterator[Flow]:
    own = {c.name: {(p.protocol, p.port) for p in c.ports} for c in containers}
    for identity in identities:
        for to, port, protocol, speaks_http in _destinations(containers, http_ports):
            if identity.container and _l7_covered(policy, identity.name, port):
                continue  # redirected to the loopback listener: tried as L7 requests
            expected = _l4_expected(
                identity, to=to, port=port, protocol=protocol, policy=policy, own=own
            )
            for family in Family:
                if port == ENVOY_ADMIN_PORT and family is Family.IPV6:
                    continue  # Envoy's admin API listens on 127.0.0.1 only, as in Istio
                yield Flow(
                    "l4", identity.name, to, port, protocol, family, expected,
                    LOCALHOST[family], http_server=speaks_http,
                )  # fmt: skip


#: Addresses the kernel delivers back to every local socket bound to the port, through eth0.
BROADCASTS: Final = {Family.IPV4: "255.255.255.255", Family.IPV6: "ff02::1%eth0"}


def _broadcast_flows(
    identities: Sequence[Identity], containers: Sequence[Container], policy: Policy
) -> Iterator[Flow]:
    """A datagram to a broadcast or multicast address on a container's UDP port is a flow to
    that port like any other, though it never passes lo."""
    own = {c.name: {(p.protocol, p.port) for p in c.ports} for c in containers}
    for identity in identities:
        for container in containers:
            for port in _declared(container, "udp"):
                expected = _l4_expected(
                    identity, to=container.name, port=port, protocol="udp", policy=policy, own=own
                )
                for family, host in BROADCASTS.items():
                    yield Flow("broadcast", identity.name, container.name, port, "udp", family,
                               expected, host)  # fmt: skip


def _l4_expected(
    identity: Identity,
    *,
    to: str,
    port: int,
    protocol: FlowProtocol,
    policy: Policy,
    own: dict[str, set[tuple[str, int]]],
) -> str:
    if identity.name == PROXY:
        return "allow"  # the proxy is never restricted
    if not identity.container:
        return "deny"  # no container runs as this uid
    if (protocol, port) in own.get(identity.name, set()):
        return "allow"
    for rule in policy.rules:
        covers = rule.http is None and _from(rule, identity.name) and port in rule.ports
        if covers and Protocol(protocol) in rule.protocols:
            return "allow"
    if policy.default_action is Action.ALLOW and not (to == PROXY or port in PROXY_CONTROL_PORTS):
        return "allow"
    return "deny"


def _l7_flows(
    containers: Sequence[Container], policy: Policy, http_ports: dict[str, tuple[int, ...]]
) -> Iterator[Flow]:
    plain = {
        (s, p)
        for r in policy.rules
        if r.http is None
        for s in _sources(r, containers)
        for p in r.ports
    }
    for rule in policy.rules:
        if rule.http is None:
            continue
        for source in _sources(rule, containers):
            for port in rule.ports:
                if rule.to == source or rule.to not in http_ports:
                    continue
                method = rule.http.methods[0] if rule.http.methods else "GET"
                path = _example_path(rule.http.paths)
                headers = tuple(sorted(rule.http.headers.items()))
                other = "PATCH" if method != "PATCH" else "DELETE"
                denied = "allow" if (source, port) in plain else "deny"
                for family in Family:
                    host = LOCALHOST[family]
                    yield Flow("l7", source, rule.to, port, "http", family, "allow", host,
                               method, path, headers)  # fmt: skip
                    yield Flow("l7", source, rule.to, port, "http", family, denied, host,
                               other, "/meshguard-demo-denied", headers)  # fmt: skip


def _mesh_flows(identities: Sequence[Identity], containers: Sequence[Container]) -> Iterator[Flow]:
    """Istio's own capture keeps working: outbound to 15001, DNS to 15053, inbound delivery."""
    for identity in identities:
        if identity.name in {PROXY, PROXY_GID_ONLY}:
            continue  # exempt from Istio's capture by design
        yield Flow("mesh", identity.name, "outbound", 80, "tcp", Family.IPV4, "allow",
                   "10.0.0.5", lands_on=15001)  # fmt: skip
        yield Flow("mesh", identity.name, "outbound", 80, "tcp", Family.IPV6, "allow",
                   "2001:db8::5", lands_on=15001)  # fmt: skip
        yield Flow("mesh", identity.name, "dns", 53, "udp", Family.IPV4, "allow",
                   CLUSTER_DNS, lands_on=15053)  # fmt: skip


def _sources(rule: Rule, containers: Sequence[Container]) -> list[str]:
    names = [c.name for c in containers]
    return names if ANY_CONTAINER in rule.sources else [s for s in rule.sources if s in names]


def _from(rule: Rule, source: str) -> bool:
    return ANY_CONTAINER in rule.sources or source in rule.sources


def _l7_covered(policy: Policy, source: str, port: int) -> bool:
    return any(r.http is not None and _from(r, source) and port in r.ports for r in policy.rules)


def _example_path(paths: Sequence[str]) -> str:
    if not paths:
        return "/"
    return paths[0][:-1] + "demo" if paths[0].endswith("*") else paths[0]
