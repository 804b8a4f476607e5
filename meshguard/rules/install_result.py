"""What one install did, per address family: shared by both installers (the iptables one in
:mod:`meshguard.rules.install`, the nftables one in :mod:`meshguard.rules.nftables`), below
both so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from meshguard.rules.ruleset import Family


@dataclass(frozen=True)
class InstallResult:
    family: Family
    installed: bool  # False when the family is unavailable in this namespace
    payload: str
    seconds: float
