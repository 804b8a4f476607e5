"""What CHECK and DEL do to a pod's rules, in whichever netfilter backend they are.

CHECK reads the backend ADD installed into (detected the same way: the one Istio's capture
is in) and compares with the admitted ruleset, without repairing. DEL has no ruleset (it
makes no API call: the pod may be gone) and does not trust detection either (Istio's
capture may already be gone): it removes meshguard's chains and hooks from both iptables
variants and meshguard's nftables table, wherever they are. Both run under the namespace's
install lock, in the pod's namespace, with the runner the lock yields.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from meshguard.errors import MeshguardFailure
from meshguard.process import CommandRunner
from meshguard.rules import nftables
from meshguard.rules.backend import Backend
from meshguard.rules.install import plan_payload, verify
from meshguard.rules.iptables import parse_save
from meshguard.rules.ruleset import Family, FamilyRuleset, Ruleset

IPTABLES_VARIANTS = (Backend.IPTABLES_NFT, Backend.IPTABLES_LEGACY)


def drift(
    ruleset: Ruleset, *, run: CommandRunner, backend: Backend, families: Sequence[Family]
) -> list[str]:
    """How the namespace's rules differ from the ruleset in ``backend`` (empty: in place)."""
    if backend is Backend.NFTABLES:
        if nftables.current_table(run) is None:
            return [f"nftables: table {nftables.TABLE_FAMILY} {nftables.TABLE_NAME} is missing"]
        listing = run(["nft", "-j", "list", "table", nftables.TABLE_FAMILY, nftables.TABLE_NAME])
        table = nftables.build(ruleset, families=families)
        return [f"nftables: {p}" for p in nftables.verify(table, nftables.parse_listing(listing))]
    problems: list[str] = []
    for family in families:
        current = parse_save(run([backend.save(family)]))
        problems += [f"{family.value}: {p}" for p in verify(ruleset.family(family), current)]
    return problems


def remove_everywhere(*, run: CommandRunner, families: Sequence[Family]) -> list[str]:
    """meshguard's rules out of every backend whose tools exist; where they were removed."""
    removed: list[str] = []
    for backend in IPTABLES_VARIANTS:
        for family in families:
            if shutil.which(backend.save(family)) is None:
                continue
            if _remove_iptables(run=run, backend=backend, family=family):
                removed.append(f"{backend.value} {family.value}")
    if shutil.which("nft") is not None and nftables.current_table(run) is not None:
        run(["nft", "-f", "-"], stdin=nftables.transaction(None))
        if nftables.current_table(run) is not None:
            raise MeshguardFailure(
                f"table {nftables.TABLE_FAMILY} {nftables.TABLE_NAME} is still there"
            )
        removed.append("nftables")
    return removed


def _remove_iptables(*, run: CommandRunner, backend: Backend, family: Family) -> bool:
    empty = FamilyRuleset(family=family, tables=())
    current = parse_save(run([backend.save(family)]))
    if not verify(empty, current):
        return False
    run([backend.restore(family), "--noflush", "--wait"], stdin=plan_payload(empty, current))
    left = verify(empty, parse_save(run([backend.save(family)])))
    if left:
        raise MeshguardFailure(f"{backend.value} {family.value}: {'; '.join(left)}")
    return True
