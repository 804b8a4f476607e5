"""What a trial's namespace holds, one declaration per configuration, and the pairs whose
ratio is reported. Adding a configuration is a line here (and in ``ALL_CONFIGS``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshguard.sandbox.istio import CaptureConfig

#: Istio's sidecar capture for the trials (REDIRECT mode, all outbound TCP to 15001, no DNS
#: capture), IPv4, as istio-init writes it in iptables or in native nftables. Loopback
#: traffic between containers RETURNs in Istio's output chain, but the nat table turns
#: conntrack on in the namespace — which meshguard's rules also need, so on a real Istio pod
#: meshguard does not pay for it.
ISTIO_CAPTURE = CaptureConfig(outbound_ranges=("*",), capture_dns=False)


@dataclass(frozen=True)
class Config:
    """What a trial's namespace holds besides lo: Istio's nat rules, meshguard's rules."""

    name: str
    istio: bool
    meshguard: bool
    flat: bool = False  # meshguard's rules with one dispatch rule per uid (no uid ranges)
    nftables: bool = False  # Istio's native nftables mode (meshguard's table follows it)
    #: Other ``CompilerSettings`` fields of meshguard's ruleset, e.g. ``(("name", value),)``.
    compiler: tuple[tuple[str, Any], ...] = ()
    listener: bool = False  # (denial path) a process drains the denial log's NFLOG group

    @property
    def ruleset_key(self) -> tuple[bool, bool, tuple[tuple[str, Any], ...]]:
        """The configurations sharing a ruleset share this key."""
        return (self.flat, self.nftables, self.compiler)


BASELINE = Config(name="baseline", istio=False, meshguard=False)
MESHGUARD = Config(name="meshguard", istio=False, meshguard=True)
ISTIO = Config(name="istio", istio=True, meshguard=False)
ISTIO_MESHGUARD = Config(name="istio+meshguard", istio=True, meshguard=True)
ISTIO_MESHGUARD_NOLOG = Config(
    name="istio+meshguard-nolog", istio=True, meshguard=True, compiler=(("denial_log_group", None),)
)
ISTIO_MESHGUARD_FLAT = Config(name="istio+meshguard-flat", istio=True, meshguard=True, flat=True)
ISTIO_NFT = Config(name="istio-nft", istio=True, meshguard=False, nftables=True)
ISTIO_NFT_MESHGUARD = Config(name="istio-nft+meshguard", istio=True, meshguard=True, nftables=True)
ALL_CONFIGS = (
    BASELINE, MESHGUARD, ISTIO, ISTIO_MESHGUARD_NOLOG, ISTIO_MESHGUARD, ISTIO_MESHGUARD_FLAT,
    ISTIO_NFT, ISTIO_NFT_MESHGUARD,
)  # fmt: skip


def denial_configs(*, nftables: bool) -> tuple[Config, ...]:
    """The denial path (``--denials``) per backend: no NFLOG rule (the ratios' base); the
    default limit, the node agent's listener draining; every denial logged (100000/s, in
    iptables its highest, 10000/s), with and without a listener (the kernel drops it)."""
    name = ISTIO_NFT_MESHGUARD.name if nftables else ISTIO_MESHGUARD.name
    log_all = (("audit_log_rate", "100000/sec" if nftables else "10000/sec"),
               ("denial_log_burst", 10000))  # fmt: skip
    return tuple(
        Config(name=f"{name}{suffix}", istio=True, meshguard=True, nftables=nftables,
               compiler=compiler, listener=listener)
        for suffix, compiler, listener in (
            ("-nolog", ISTIO_MESHGUARD_NOLOG.compiler, False), ("+listener", (), True),
            ("-logall+listener", log_all, True), ("-logall", log_all, False),
        )
    )  # fmt: skip


DENIAL_GROUPS = (denial_configs(nftables=False), denial_configs(nftables=True))
DENIAL_CONFIGS = tuple(config for group in DENIAL_GROUPS for config in group)
#: Every configuration, in the canonical order (``--configs``).
KNOWN_CONFIGS = ALL_CONFIGS + tuple(c for c in DENIAL_CONFIGS if c not in ALL_CONFIGS)
#: (without, with) pairs whose ratio is reported; the first is the headline figure, then
#: meshguard's cost in an Istio pod per backend, what the uid-range dispatch gains over the
#: flat layout, last the denial log's NFLOG rule (the allowed path: none expected, only a
#: denied packet reaches it).
ALL_PAIRS = (
    (BASELINE, MESHGUARD),
    (ISTIO, ISTIO_MESHGUARD),
    (ISTIO_NFT, ISTIO_NFT_MESHGUARD),
    (ISTIO_MESHGUARD_FLAT, ISTIO_MESHGUARD),
    (ISTIO_MESHGUARD_NOLOG, ISTIO_MESHGUARD),
    *((base, config) for base, *others in DENIAL_GROUPS for config in others),
)
#: Issue 14's goal for istio+meshguard / istio, connect rate at 64 containers, best backend.
ISTIO_GOAL = 0.97


def pairs_of(configs: Sequence[Config]) -> list[tuple[Config, Config]]:
    """The ratios a run of ``configs`` can report (both sides measured)."""
    return [(a, b) for a, b in ALL_PAIRS if a in configs and b in configs]


def parse_configs(text: str) -> tuple[Config, ...]:
    """``--configs a,b,...`` (names of :data:`KNOWN_CONFIGS`), in the canonical order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    known = {config.name for config in KNOWN_CONFIGS}
    unknown = sorted(names - known)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configurations {unknown or text!r}; known: {', '.join(sorted(known))}"
        )
    return tuple(config for config in KNOWN_CONFIGS if config.name in names)
