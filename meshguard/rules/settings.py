"""What the ruleset compiler assumes about the proxy (:class:`CompilerSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from meshguard.mesh import (
    CONTROL_PORTS,
    DNS_CAPTURE_PORT,
    INBOUND_CAPTURE_PORT,
    ISTIO_RESERVED_PORTS,
    OUTBOUND_CAPTURE_PORT,
    PROXY_PORT_RANGE,
)


@dataclass(frozen=True, kw_only=True)
class CompilerSettings:
    """What the compiler assumes about the proxy; defaults match a stock Istio sidecar."""

    #: The proxy's ports that a rule may open to a container (``to: proxy``); every other
    #: port of the proxy is never reached directly (Istio's capture is the only way in).
    protected_proxy_ports: tuple[int, ...] = CONTROL_PORTS
    outbound_capture_port: int = OUTBOUND_CAPTURE_PORT
    inbound_capture_port: int = INBOUND_CAPTURE_PORT
    dns_capture_port: int = DNS_CAPTURE_PORT
    listener_port: int = 15007
    source_net4: str = "127.0.100.0/24"
    source_net6: str = "fd6d:6775::/112"
    audit_log_rate: str = "10/sec"
    #: Most rules a NEW packet walks per level of the uid dispatch (see ``_dispatch_rules``);
    #: a fanout of at least the number of uids gives the flat layout, one rule per uid.
    dispatch_fanout: int = 4

    def __post_init__(self) -> None:
        if self.dispatch_fanout < 2:
            raise ValueError(f"dispatch_fanout must be at least 2, got {self.dispatch_fanout}")

    @property
    def proxy_ports(self) -> frozenset[int]:
        """Every port that belongs to the proxy: Istio's reserved range and the listener."""
        return ISTIO_RESERVED_PORTS | {self.listener_port}

    @property
    def proxy_port_spec(self) -> str:
        """The proxy's ports as a multiport list (the range, and the listener if outside)."""
        low, high = PROXY_PORT_RANGE
        extra = "" if low <= self.listener_port <= high else f",{self.listener_port}"
        return f"{low}:{high}{extra}"
