"""What the ruleset compiler assumes about the proxy (:class:`CompilerSettings`), and where
its rules report denials (the NFLOG group and prefixes the node agent reads)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from meshguard.mesh import (
    CONTROL_PORTS,
    DNS_CAPTURE_PORT,
    INBOUND_CAPTURE_PORT,
    ISTIO_RESERVED_PORTS,
    OUTBOUND_CAPTURE_PORT,
    PROXY_PORT_RANGE,
)

#: The NFLOG group the default's rules send each denial (audit: would-be denial) to. NFLOG,
#: not LOG: ``nfnetlink_log`` delivers to a listener in the packet's own network namespace
#: (the node agent binds one per pod), where LOG needs ``net.netfilter.nf_log_all_netns``.
DENIAL_LOG_GROUP: Final = 4747
#: The NFLOG prefixes: a packet the rules rejected, and one audit mode let through.
DENY_PREFIX: Final = "meshguard:deny"
AUDIT_PREFIX: Final = "meshguard:audit"
#: Denials logged per second per pod (the rules' ``limit``), and the burst above that rate.
DENIAL_LOG_RATE: Final = "10/sec"
DENIAL_LOG_BURST: Final = 20
#: iptables' own default burst (``-m limit`` without ``--limit-burst``).
_IPTABLES_DEFAULT_BURST: Final = 5
_RATE = re.compile(r"[1-9][0-9]{0,5}/(sec|second|min|minute)\Z")


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
    #: Denials (audit: would-be denials) logged per second per pod, and the burst above it.
    audit_log_rate: str = DENIAL_LOG_RATE
    denial_log_burst: int = DENIAL_LOG_BURST
    #: The NFLOG group of the denial log; None: no NFLOG rule (enforce logs nothing, audit
    #: LOGs to the kernel log as before NFLOG: the kernel-path baseline).
    denial_log_group: int | None = DENIAL_LOG_GROUP
    #: Most rules a NEW packet walks per level of the uid dispatch (see ``_dispatch_rules``);
    #: a fanout of at least the number of uids gives the flat layout, one rule per uid.
    dispatch_fanout: int = 4

    def __post_init__(self) -> None:
        if self.dispatch_fanout < 2:
            raise ValueError(f"dispatch_fanout must be at least 2, got {self.dispatch_fanout}")
        if not _RATE.match(self.audit_log_rate):
            raise ValueError(f"audit_log_rate must be N/sec or N/min, got {self.audit_log_rate!r}")
        if not 1 <= self.denial_log_burst <= 10000:
            raise ValueError(f"denial_log_burst must be 1..10000, got {self.denial_log_burst}")
        group = self.denial_log_group
        if group is not None and not 1 <= group <= 65535:
            raise ValueError(f"denial_log_group must be 1..65535 or None, got {group}")

    @property
    def denial_limit(self) -> str:
        """The ``limit`` match of the denial log, in iptables-save's own spelling (the
        default burst is not written)."""
        burst = self.denial_log_burst
        spelled = "" if burst == _IPTABLES_DEFAULT_BURST else f" --limit-burst {burst}"
        return f"-m limit --limit {self.audit_log_rate}{spelled}"

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
