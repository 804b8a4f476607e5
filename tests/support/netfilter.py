"""The three netfilter backends a pod's Istio capture can be in, for parametrized tests.

``iptables-nft`` and ``iptables-legacy`` load Istio's iptables goldens with that variant's
own ``*-restore``; ``nftables`` loads Istio's native nftables goldens (``nft -f``) from
``../shared/istio-nftables-golden``. meshguard-init is never told which: it must detect it.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping, Sequence
from typing import Any

from meshguard.rules.backend import Backend
from meshguard.rules.ruleset import Family
from tests.support.shared import shared_file


class Netfilter(enum.StrEnum):
    IPTABLES_NFT = "iptables-nft"
    IPTABLES_LEGACY = "iptables-legacy"
    NFTABLES = "nftables"

    @property
    def backend(self) -> Backend:
        return Backend(self.value)

    def restore(self, family: Family) -> str:
        return self.backend.restore(family)

    def save(self, family: Family) -> str:
        return self.backend.save(family)


NETFILTERS = tuple(Netfilter)


def nft_golden(name: str, *, extra: Sequence[tuple[str, str]] = ()) -> str:
    """Istio's native nftables capture ``name``, plus the rules of other goldens that contain
    a given text (``(golden, text)``), appended in order: e.g. the IPv4 outbound range of one
    configuration added to the IPv6 ports of another, as the iptables tests combine them."""
    text = shared_file("istio-nftables-golden", name).read_text()
    for golden, needle in extra:
        lines = shared_file("istio-nftables-golden", golden).read_text().splitlines()
        added = [line for line in lines if needle in line and line.startswith("add rule ")]
        assert added, f"no rule with {needle!r} in {golden}"
        text += "\n".join(added) + "\n"
    return text


#: The capture of the enforcement matrix in native nftables: the IPv6 outbound ports
#: 31000/32000 (``ipv6-outbound-ports``) and the IPv4 outbound range 10.0.0.0/8
#: (``ipnets-with-kube-virt-interfaces``), as the iptables tests load ``ipnets`` (IPv4) and
#: ``ipv6-outbound-ports`` (IPv6).
def matrix_capture_nft() -> str:
    return nft_golden(
        "ipv6-outbound-ports.golden",
        extra=[("ipnets-with-kube-virt-interfaces.golden", "istio-output ip daddr 10.0.0.0/8")],
    )


def native_nftables_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as Istio injects it with ``values.global.nativeNftables``: its istio-init runs
    ``--native-nftables`` (admission reads that from the spec and records it)."""
    native: dict[str, Any] = copy.deepcopy(dict(pod))
    init = next(c for c in native["spec"]["initContainers"] if c["name"] == "istio-init")
    init["args"] = [*init.get("args", []), "--native-nftables"]
    return native


def pod_for(pod: Mapping[str, Any], netfilter: Netfilter) -> dict[str, Any]:
    """The pod as Istio injects it for ``netfilter``: native nftables or iptables."""
    if netfilter is Netfilter.NFTABLES:
        return native_nftables_pod(pod)
    return copy.deepcopy(dict(pod))
