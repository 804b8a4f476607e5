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
