"""Installing the native nftables table: one transaction, read back, verified, restored.

The table itself is rendered by :mod:`meshguard.rules.nft_render` (names re-exported here,
where the installer's callers have always found them).

Installing is one ``nft -f`` transaction — ``add table``, ``delete table``, the new table —
so the table is replaced whole or not at all, and Istio's tables are never named. It is then
read back (``nft -j list table inet meshguard``) and verified: chains, hooks, priorities,
rule counts and the uids of the map. On a failed verification the table found before is
restored, in one transaction as well, and verified.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshguard.errors import MeshguardFailure
from meshguard.process import CommandRunner
from meshguard.rules.install_result import InstallResult
from meshguard.rules.nft_render import (
    TABLE_FAMILY,
    TABLE_NAME,
    Chain,
    NftTable,
    build,
    render,
    transaction,
)
from meshguard.rules.nft_translate import UnsupportedRule, translate
from meshguard.rules.ruleset import CHAIN_PREFIX, Family, Ruleset

__all__ = [
    "TABLE_FAMILY",
    "TABLE_NAME",
    "Chain",
    "InstalledChain",
    "NftTable",
    "UnsupportedRule",
    "build",
    "current_table",
    "foreign_changes",
    "foreign_objects",
    "install",
    "parse_listing",
    "render",
    "transaction",
    "translate",
    "verify",
]

log = logging.getLogger(__name__)


# --- reading back and verifying -----------------------------------------------------------


@dataclass(frozen=True)
class InstalledChain:
    name: str
    hook: str | None
    type: str | None
    priority: int | None
    rules: int
    vmap_uids: frozenset[int]


def parse_listing(text: str) -> dict[str, InstalledChain]:
    """meshguard's table as ``nft -j list table inet meshguard`` shows it."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeshguardFailure(f"nft -j list: not JSON ({exc})") from None
    chains: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[dict[str, Any]]] = {}
    for item in document.get("nftables", []):
        if "chain" in item:
            chains[item["chain"]["name"]] = item["chain"]
        elif "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
    return {
        name: InstalledChain(
            name=name,
            hook=chain.get("hook"),
            type=chain.get("type"),
            priority=chain.get("prio"),
            rules=len(rules.get(name, [])),
            vmap_uids=frozenset(_vmap_uids(rules.get(name, []))),
        )
        for name, chain in chains.items()
    }


def _vmap_uids(rules: Iterable[dict[str, Any]]) -> Iterator[int]:
    for rule in rules:
        for expression in rule.get("expr", []):
            vmap = expression.get("vmap") if isinstance(expression, dict) else None
            if not vmap:
                continue
            for element in vmap.get("data", {}).get("set", []):
                key = element[0] if isinstance(element, list) else None
                if isinstance(key, int):
                    yield key


def verify(table: NftTable, installed: Mapping[str, InstalledChain]) -> list[str]:
    """Problems between the table as built and as read back; empty means verified."""
    problems: list[str] = []
    wanted = {chain.name: chain for chain in table.chains}
    for name, chain in wanted.items():
        found = installed.get(name)
        if found is None:
            problems.append(f"chain {name} missing")
            continue
        if found.rules != len(chain.rules):
            problems.append(f"chain {name} has {found.rules} rules, expected {len(chain.rules)}")
        base = chain.base
        if base is not None and (found.hook, found.type, found.priority) != (
            base.hook,
            base.type,
            base.priority,
        ):
            problems.append(
                f"chain {name} is hooked {found.type}/{found.hook}/{found.priority},"
                f" expected {base.type}/{base.hook}/{base.priority}"
            )
        if base is None and found.hook is not None:
            problems.append(f"chain {name} is a base chain, expected a regular one")
    extra = sorted(set(installed) - set(wanted))
    if extra:
        problems.append(f"unexpected chains {', '.join(extra)}")
    uids = frozenset(uid for chain in installed.values() for uid in chain.vmap_uids)
    if uids != frozenset(table.dispatch):
        problems.append(f"uid map holds {sorted(uids)}, expected {sorted(table.dispatch)}")
    return problems


# --- installing ---------------------------------------------------------------------------


def current_table(run: CommandRunner) -> str | None:
    """meshguard's table as ``nft list`` prints it (re-loadable), or None when absent."""
    listing = run(["nft", "list", "tables", TABLE_FAMILY])
    wanted = ["table", TABLE_FAMILY, TABLE_NAME]
    if not any(line.split() == wanted for line in listing.splitlines()):
        return None
    return run(["nft", "-s", "list", "table", TABLE_FAMILY, TABLE_NAME])


def install(
    ruleset: Ruleset,
    *,
    run: CommandRunner,
    families: Sequence[Family] = tuple(Family),
    ipv6_available: bool = True,
) -> list[InstallResult]:
    """Replace meshguard's table with the ruleset's, verified; restore it on any failure."""
    started = time.perf_counter()
    wanted = [f for f in families if f is Family.IPV4 or ipv6_available]
    if Family.IPV6 in families and not ipv6_available:
        log.warning(
            "IPv6 is disabled in this network namespace: IPv6 rules skipped",
            extra={"fields": {"event": "skipped", "family": "ipv6", "backend": "nftables"}},
        )
    table = build(ruleset, families=wanted)
    payload = transaction(table.text())
    if Family.IPV6 in wanted:
        for prefix in ruleset.ipv6.local_routes:
            run(["ip", "-6", "route", "replace", "local", prefix, "dev", "lo"])
    before = current_table(run)
    others = foreign_objects(run(["nft", "-j", "list", "ruleset"]))
    try:
        run(["nft", "-f", "-"], stdin=payload)  # atomic: all of it, or nothing changed
    except MeshguardFailure as exc:
        raise MeshguardFailure(f"nftables transaction refused, nothing changed: {exc}") from None
    problems = verify(table, parse_listing(run(["nft", "-j", "list", "table", "inet", TABLE_NAME])))
    problems += foreign_changes(others, foreign_objects(run(["nft", "-j", "list", "ruleset"])))
    if problems:
        failure = MeshguardFailure(f"nftables rules not as compiled: {'; '.join(problems)}")
        _restore(before, run=run, failure=failure)
        raise failure
    seconds = time.perf_counter() - started
    log.info(
        "ruleset installed",
        extra={
            "fields": {
                "event": "installed",
                "backend": "nftables",
                "families": [f.value for f in wanted],
                "digest": ruleset.digest,
                "chains": len(table.chains),
                "rules": sum(len(c.rules) for c in table.chains),
                "uids": len(table.dispatch),
                "ms": round(seconds * 1000, 1),
            }
        },
    )
    return [
        InstallResult(family=f, installed=f in wanted, payload=payload, seconds=seconds)
        for f in families
    ]


def foreign_objects(listing: str) -> list[str]:
    """Everything of ``nft -j list ruleset`` outside meshguard's table, canonical (counters
    zeroed, handles dropped): the install must leave all of it as it was."""
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        raise MeshguardFailure("nft -j list ruleset: not the JSON nft writes") from None
    found: list[str] = []
    for item in items:
        if not isinstance(item, dict) or "metainfo" in item:
            continue
        (kind, body), *_ = item.items()
        if not isinstance(body, dict):
            continue
        owner = (body.get("family"), body.get("table") if kind != "table" else body.get("name"))
        if owner == (TABLE_FAMILY, TABLE_NAME):
            continue
        found.append(json.dumps({kind: _canonical(body)}, sort_keys=True))
    return found


def foreign_changes(before: Sequence[str], after: Sequence[str]) -> list[str]:
    """What the install changed outside meshguard's table, and any meshguard-named object
    there (a table or chain meshguard did not plan): each a problem."""
    problems = [f"outside {TABLE_FAMILY} {TABLE_NAME}: {item}" for item in after
                if item not in before]  # fmt: skip
    problems += [f"outside {TABLE_FAMILY} {TABLE_NAME}, removed: {item}" for item in before
                 if item not in after]  # fmt: skip
    problems += [f"a meshguard-named object meshguard did not plan: {item}" for item in after
                 if TABLE_NAME in item.lower() or CHAIN_PREFIX in item]  # fmt: skip
    return list(dict.fromkeys(problems))


def _canonical(value: object) -> object:
    if isinstance(value, dict):
        if set(value) == {"packets", "bytes"}:
            return {"packets": 0, "bytes": 0}
        return {k: _canonical(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _restore(before: str | None, *, run: CommandRunner, failure: MeshguardFailure) -> None:
    """Put meshguard's table back as it was (or remove it), in one transaction, checked."""
    try:
        if before is None:
            run(["nft", "-f", "-"], stdin=transaction(None))
        else:
            run(["nft", "-f", "-"], stdin=transaction(before))
        after = current_table(run)
    except MeshguardFailure as exc:
        raise MeshguardFailure(f"{failure}; rolling back also failed: {exc}") from None
    if after != before:
        raise MeshguardFailure(f"{failure}; rolling back left the table different")
    log.warning(
        "install failed, meshguard's nftables table restored to its previous state",
        extra={"fields": {"event": "rolled-back", "backend": "nftables", "reason": str(failure)}},
    )
