"""The sandbox's Istio capture rules equal what istio-iptables writes (Istio's goldens)."""

from __future__ import annotations

import pytest

from meshguard.rules.ruleset import Family
from meshguard.sandbox.istio import CaptureConfig, capture_payload
from tests.support.shared import golden_payloads

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
