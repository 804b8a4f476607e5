"""The sandbox's Istio capture rules equal what istio-iptables writes (Istio's goldens)."""

from __future__ import annotations

import pytest

from meshguard.rules.ruleset import Family
from meshguard.sandbox.istio import CaptureConfig, capture_nft, capture_payload
from tests.support.shared import golden_payloads, shared_file

GOLDENS = {
    # ipnets.golden: the default sidecar capture, outbound 10.0.0.0/8, no DNS capture.
    "ipnets.golden": CaptureConfig(outbound_ranges=("10.0.0.0/8",), capture_dns=False),
    # dns-uid-gid.golden: DNS capture, proxy uids 3 and 4, gids 1 and 2, no outbound range.
    "dns-uid-gid.golden": CaptureConfig(proxy_uids=(3, 4), proxy_gids=(1, 2), outbound_ranges=()),
}


@pytest.mark.parametrize(
    ("golden", "family"),
    [("ipnets.golden", Family.IPV4), ("dns-uid-gid.golden", Family.IPV4),
     ("dns-uid-gid.golden", Family.IPV6)],
)  # fmt: skip
def test_capture_rules_match_istios_golden_line_for_line(golden: str, family: Family):
    v4, v6 = golden_payloads(golden)
    expected = v4 if family is Family.IPV4 else v6
    assert expected
    assert capture_payload(GOLDENS[golden], family).splitlines() == "".join(expected).splitlines()


#: Istio's native nftables goldens and the configuration behind each (Istio's run_test.go).
NFT_GOLDENS = {
    # DNS capture, proxy uids 3 and 4, gids 1 and 2, IPv6 on, no outbound range.
    "dns-uid-gid.golden": (GOLDENS["dns-uid-gid.golden"], True),
    # The same without DNS capture.
    "ipv6-dns-uid-gid.golden": (
        CaptureConfig(proxy_uids=(3, 4), proxy_gids=(1, 2), outbound_ranges=(), capture_dns=False),
        True,
    ),
    # The default proxy uid/gid, IPv4 only, nothing else.
    "empty.golden": (CaptureConfig(outbound_ranges=(), capture_dns=False), False),
}


@pytest.mark.parametrize("golden", sorted(NFT_GOLDENS))
def test_native_nftables_capture_matches_istios_golden_line_for_line(golden: str):
    config, ipv6 = NFT_GOLDENS[golden]
    expected = shared_file("istio-nftables-golden", golden).read_text().splitlines()
    assert capture_nft(config, ipv6=ipv6).splitlines() == expected
