"""Istio's sidecar capture rules, as ``istio-iptables`` (istio-init) writes them, for the sandbox.

The demo has no ``istio-init`` binary, so it writes the same ``nat`` (and, with DNS capture,
``raw``) rules itself, in REDIRECT mode: the proxy's own uids/gids exempt, loopback traffic
of other processes returned untouched, Envoy's connections to a pod address sent to the
inbound listener, outbound TCP to the configured ranges redirected to 15001, DNS to 15053.
The tests check the output line for line against Istio's recorded goldens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshguard.rules.ruleset import Family

HBONE_PORT = 15008
DNS_PORT = 53


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    proxy_uids: tuple[int, ...] = (1337,)
    proxy_gids: tuple[int, ...] = (1337,)
    outbound_port: int = 15001
    inbound_port: int = 15006
    dns_port: int = 15053
    #: Outbound destinations redirected to the proxy; ``*`` means all.
    outbound_ranges: tuple[str, ...] = ("*",)
    capture_dns: bool = True
    #: The nameservers of the pod's resolv.conf, whose DNS traffic is captured: Istio's
    #: goldens were recorded with 127.0.0.53; a pod's nameserver is the cluster DNS Service.
    nameserver4: str = "127.0.0.53/32"
    nameserver6: str = "::127.0.0.53/128"


@dataclass(frozen=True)
class _Addresses:
    localhost: str
    inbound_source: str
    dns_server: str


def _addresses(config: CaptureConfig, family: Family) -> _Addresses:
    if family is Family.IPV4:
        return _Addresses("127.0.0.1/32", "127.0.0.6/32", config.nameserver4)
    return _Addresses("::1/128", "::6/128", config.nameserver6)


def capture_payload(config: CaptureConfig, family: Family) -> str:
    """The iptables-restore payload(s) istio-init applies for this family."""
    addresses = _addresses(config, family)
    blocks = [_nat(config, addresses)]
    if config.capture_dns:
        blocks.append(_raw(config, addresses))
    return "".join("\n".join([*block, "COMMIT"]) + "\n" for block in blocks)


def _nat(config: CaptureConfig, addresses: _Addresses) -> list[str]:
    chains = ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"]
    if config.capture_dns:
        chains.append("ISTIO_OUTPUT_DNS")
    lines = ["*nat", *(f"-N {chain}" for chain in chains)]
    lines += [
        f"-A ISTIO_INBOUND -p tcp --dport {HBONE_PORT} -j RETURN",
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {config.outbound_port}",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {config.inbound_port}",
        "-A OUTPUT -j ISTIO_OUTPUT",
        f"-A ISTIO_OUTPUT -o lo -s {addresses.inbound_source} -j RETURN",
    ]
    lines += _owner_rules("uid", config.proxy_uids, config, addresses)
    lines += _owner_rules("gid", config.proxy_gids, config, addresses)
    if config.capture_dns:
        lines += [
            "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
            f"-A ISTIO_OUTPUT_DNS -p tcp --dport {DNS_PORT} -d {addresses.dns_server}"
            f" -j REDIRECT --to-ports {config.dns_port}",
            f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -d {addresses.dns_server}"
            f" -j REDIRECT --to-port {config.dns_port}",
        ]
    lines.append(f"-A ISTIO_OUTPUT -d {addresses.localhost} -j RETURN")
    lines += _outbound(config.outbound_ranges)
    return lines


def _owner_rules(
    kind: str, ids: Sequence[int], config: CaptureConfig, addresses: _Addresses
) -> list[str]:
    """Per proxy uid/gid: Envoy to a pod address is inbound; others' loopback is left alone."""
    lines = []
    for owner in ids:
        match = f"-m owner --{kind}-owner {owner}"
        not_match = f"-m owner ! --{kind}-owner {owner}"
        if config.capture_dns and kind == "uid":
            ports = f"-m multiport ! --dports {DNS_PORT},{HBONE_PORT}"
        else:
            ports = f"! --dport {HBONE_PORT}"
        keep_dns = f"-p tcp ! --dport {DNS_PORT} " if config.capture_dns else ""
        lines += [
            f"-A ISTIO_OUTPUT -o lo ! -d {addresses.localhost} -p tcp {ports} {match}"
            " -j ISTIO_IN_REDIRECT",
            f"-A ISTIO_OUTPUT -o lo {keep_dns}{not_match} -j RETURN",
            f"-A ISTIO_OUTPUT {match} -j RETURN",
        ]
    return lines


def _outbound(ranges: Sequence[str]) -> list[str]:
    if "*" in ranges:
        return ["-A ISTIO_OUTPUT -j ISTIO_REDIRECT"]
    return [f"-A ISTIO_OUTPUT -d {cidr} -j ISTIO_REDIRECT" for cidr in ranges]


def _raw(config: CaptureConfig, addresses: _Addresses) -> list[str]:
    """Separate conntrack zones for DNS to and from the proxy (DNS over UDP is captured)."""
    lines = ["*raw", "-N ISTIO_OUTPUT_DNS", "-N ISTIO_INBOUND", "-A OUTPUT -j ISTIO_OUTPUT_DNS"]
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for owner in ids:
            match = f"-m owner --{kind}-owner {owner}"
            lines += [
                f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} {match} -j CT --zone 1",
                f"-A ISTIO_OUTPUT_DNS -p udp --sport {config.dns_port} {match} -j CT --zone 2",
            ]
    lines += [
        "-A PREROUTING -j ISTIO_INBOUND",
        f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -d {addresses.dns_server} -j CT --zone 2",
        f"-A ISTIO_INBOUND -p udp --sport {DNS_PORT} -s {addresses.dns_server} -j CT --zone 1",
    ]
    return lines


# --- Istio's native nftables mode (istio-init --native-nftables) ---------------------------

NAT_TABLE = "inet istio-proxy-nat"
RAW_TABLE = "inet istio-proxy-raw"


def capture_nft(config: CaptureConfig, *, ipv6: bool = True) -> str:
    """The ``nft -f`` ruleset istio-init writes in native nftables mode: one ``inet`` table
    per Istio table (``istio-proxy-nat``, and ``istio-proxy-raw`` with DNS capture), IPv4 and
    IPv6 together (``ipv6``: the pod has IPv6, so its rules are written too)."""
    families = [Family.IPV4, Family.IPV6] if ipv6 else [Family.IPV4]
    lines = _nft_nat(config, families)
    if config.capture_dns:
        lines += _nft_raw(config, families)
    return "\n".join(lines) + "\n"


def _nft_nat(config: CaptureConfig, families: Sequence[Family]) -> list[str]:
    chains = ["istio-inbound", "istio-redirect", "istio-in-redirect", "istio-output"]
    if config.capture_dns:
        chains.append("istio-output-dns")
    head = [
        f"add table {NAT_TABLE}",
        f"flush table {NAT_TABLE}",
        f"add chain {NAT_TABLE} output {{ type nat hook output priority -100 ; }}",
        *(f"add chain {NAT_TABLE} {chain}" for chain in chains),
    ]
    rules = [
        f"istio-inbound meta l4proto tcp tcp dport {HBONE_PORT} counter return",
        f"istio-redirect meta l4proto tcp counter redirect to :{config.outbound_port}",
        f"istio-in-redirect meta l4proto tcp counter redirect to :{config.inbound_port}",
        "output counter jump istio-output",
    ]
    rules += [
        f"istio-output oifname lo {_ip(f)} saddr {_addresses(config, f).inbound_source}"
        " counter return"
        for f in families
    ]
    rules += _nft_owner_rules("skuid", config.proxy_uids, config, families)
    rules += _nft_owner_rules("skgid", config.proxy_gids, config, families)
    if config.capture_dns:
        rules.append("istio-output counter jump istio-output-dns")
        for protocol in ("tcp", "udp"):
            rules += [
                f"istio-output-dns {_ip(f)} daddr {_addresses(config, f).dns_server}"
                f" {protocol} dport {DNS_PORT} counter redirect to :{config.dns_port}"
                for f in families
            ]
    rules += [
        f"istio-output {_ip(f)} daddr {_addresses(config, f).localhost} counter return"
        for f in families
    ]
    rules += _nft_outbound(config.outbound_ranges)
    return head + [f"add rule {NAT_TABLE} {rule}" for rule in rules]


def _nft_owner_rules(
    key: str, ids: Sequence[int], config: CaptureConfig, families: Sequence[Family]
) -> list[str]:
    rules = []
    for owner in ids:
        dns_uid = config.capture_dns and key == "skuid"
        ports = f"{{ {DNS_PORT}, {HBONE_PORT} }}" if dns_uid else str(HBONE_PORT)
        rules += [
            f"istio-output oifname lo meta l4proto tcp {_ip(f)} daddr !="
            f" {_addresses(config, f).localhost} tcp dport != {ports} {key} {owner}"
            " counter jump istio-in-redirect"
            for f in families
        ]
        keep_dns = f"meta l4proto tcp tcp dport != {DNS_PORT} " if config.capture_dns else ""
        rules += [
            f"istio-output oifname lo {keep_dns}{key} != {owner} counter return",
            f"istio-output {key} {owner} counter return",
        ]
    return rules


def _nft_outbound(ranges: Sequence[str]) -> list[str]:
    if "*" in ranges:
        return ["istio-output counter jump istio-redirect"]
    return [
        f"istio-output {'ip6' if ':' in cidr else 'ip'} daddr {cidr} counter jump istio-redirect"
        for cidr in ranges
    ]


def _nft_raw(config: CaptureConfig, families: Sequence[Family]) -> list[str]:
    head = [
        f"add table {RAW_TABLE}",
        f"flush table {RAW_TABLE}",
        f"add chain {RAW_TABLE} prerouting {{ type filter hook prerouting priority -300 ; }}",
        f"add chain {RAW_TABLE} output {{ type filter hook output priority -300 ; }}",
        f"add chain {RAW_TABLE} istio-inbound",
        f"add chain {RAW_TABLE} istio-output-dns",
    ]
    rules = ["output counter jump istio-output-dns"]
    for key, ids in (("skuid", config.proxy_uids), ("skgid", config.proxy_gids)):
        for owner in ids:
            rules += [
                f"istio-output-dns udp dport {DNS_PORT} meta {key} {owner} counter ct zone set 1",
                f"istio-output-dns udp sport {config.dns_port} meta {key} {owner} counter"
                " ct zone set 2",
            ]
    rules.append("prerouting counter jump istio-inbound")
    for family in families:
        server = _addresses(config, family).dns_server
        rules += [
            f"istio-output-dns udp dport {DNS_PORT} {_ip(family)} daddr {server} counter"
            " ct zone set 2",
            f"istio-inbound udp sport {DNS_PORT} {_ip(family)} saddr {server} counter"
            " ct zone set 1",
        ]
    return head + [f"add rule {RAW_TABLE} {rule}" for rule in rules]


def _ip(family: Family) -> str:
    return "ip" if family is Family.IPV4 else "ip6"
