"""meshguard-init: install a compiled ruleset into the pod's network namespace, fail closed.

Per family: read the current tables (``iptables-save``), plan one ``iptables-restore
--noflush`` payload that makes meshguard's chains exactly the ruleset's — (re)declaring them
flushes stale content, hooks are inserted at position 1 unless already there, chains and
hooks of an earlier ruleset that this one lacks are removed — apply it in one transaction,
then read the tables back and verify every chain, rule count and hook. iptables-restore
commits table by table, so when any table fails (or verification does) the tables already
committed are rolled back to meshguard's previous state. Istio's chains are never touched.
Any failure raises :class:`~meshguard.errors.MeshguardFailure`: the init container exits
non-zero and the pod does not start unprotected. Running it again on the
same namespace (a container restart) converges to the same state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from meshguard.errors import MeshguardFailure
from meshguard.rules.iptables import (
    CommandRunner,
    SavedState,
    SavedTable,
    jump_target,
    parse_save,
)
from meshguard.rules.ruleset import (
    CHAIN_PREFIX,
    Family,
    FamilyRuleset,
    Hook,
    Ruleset,
    Table,
    render,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstallResult:
    family: Family
    installed: bool  # False when the family is unavailable in this namespace
    payload: str
    seconds: float


def plan_payload(desired: FamilyRuleset, current: SavedState) -> str:
    """The restore payload that turns ``current`` into ``desired`` for meshguard's chains."""
    wanted = {table.name: table for table in desired.tables}
    names = list(wanted) + sorted(
        name
        for name, table in current.tables.items()
        if name not in wanted and _own_chains(table.chains)
    )
    tables: list[Table] = []
    hook_lines: dict[str, list[str]] = {}
    final_lines: dict[str, list[str]] = {}
    for name in names:
        target = wanted.get(name, Table(name=name, chains=(), hooks=(), rules=()))
        stale = [c for c in _own_chains(current.table(name).chains) if c not in target.chains]
        # Declaring a stale chain flushes it, so the -X at the end finds it empty.
        tables.append(
            Table(
                name=name,
                chains=(*target.chains, *stale),
                hooks=target.hooks,
                rules=target.rules,
            )
        )
        hook_lines[name] = _hook_changes(target, current.table(name))
        final_lines[name] = [f"-X {chain}" for chain in stale]
    return render(tables, hook_lines=hook_lines, final_lines=final_lines)


def verify(desired: FamilyRuleset, current: SavedState) -> list[str]:
    """Problems between what is installed and the ruleset; empty means verified."""
    problems: list[str] = []
    wanted = {table.name: table for table in desired.tables}
    for table in desired.tables:
        saved = current.table(table.name)
        for chain in table.chains:
            if chain not in saved.chains:
                problems.append(f"{table.name}: chain {chain} missing")
            elif len(saved.rules_of(chain)) != len(table.rules_of(chain)):
                problems.append(
                    f"{table.name}: chain {chain} has {len(saved.rules_of(chain))} rules,"
                    f" expected {len(table.rules_of(chain))}"
                )
        for hook in table.hooks:
            rules = saved.rules_of(hook.chain)
            if not rules or rules[0] != hook.spec:
                problems.append(f"{table.name}: {hook.chain} does not start with '{hook.spec}'")
            elif rules.count(hook.spec) != 1:
                problems.append(f"{table.name}: {hook.chain} jumps to {hook.target} more than once")
    for name, saved in current.tables.items():
        expected = wanted[name].chains if name in wanted else ()
        extra = [c for c in _own_chains(saved.chains) if c not in expected]
        if extra:
            problems.append(f"{name}: stale meshguard chains {', '.join(extra)}")
    return problems


def install(
    ruleset: Ruleset,
    *,
    run: CommandRunner,
    families: Iterable[Family] = tuple(Family),
    ipv6_available: bool | None = None,
) -> list[InstallResult]:
    """Install every family of the ruleset; raise :class:`MeshguardFailure` on any problem.

    The families are independent (separate tools, separate tables): they are installed
    side by side, which halves meshguard-init's time; each rolls back on its own failure.
    """
    if ipv6_available is None:
        ipv6_available = Path("/proc/net/if_inet6").exists()
    wanted = list(families)
    with ThreadPoolExecutor(max_workers=len(wanted) or 1) as pool:
        futures = [
            pool.submit(_install_or_skip, ruleset, family, run=run, ipv6_available=ipv6_available)
            for family in wanted
        ]
    # Logged in family order, whichever finished first; a family installed next to one that
    # failed is still logged before the failure is raised.
    failures = [error for f in futures if (error := f.exception()) is not None]
    results = [f.result() for f in futures if f.exception() is None]
    for result in results:
        if result.installed:
            _log_installed(ruleset, result)
    if failures:
        raise failures[0]
    return results


def _log_installed(ruleset: Ruleset, result: InstallResult) -> None:
    tables = ruleset.family(result.family).tables
    log.info(
        "ruleset installed",
        extra={
            "fields": {
                "event": "installed",
                "family": result.family.value,
                "digest": ruleset.digest,
                "chains": sum(len(t.chains) for t in tables),
                "rules": sum(len(t.rules) for t in tables),
                "ms": round(result.seconds * 1000, 1),
            }
        },
    )


def _install_or_skip(
    ruleset: Ruleset, family: Family, *, run: CommandRunner, ipv6_available: bool
) -> InstallResult:
    if family is Family.IPV6 and not ipv6_available:
        log.warning(
            "IPv6 is disabled in this network namespace: no IPv6 loopback traffic is"
            " possible, IPv6 rules skipped",
            extra={"fields": {"event": "skipped", "family": family.value}},
        )
        return InstallResult(family=family, installed=False, payload="", seconds=0)
    return _install_family(ruleset.family(family), run=run)


def _install_family(desired: FamilyRuleset, *, run: CommandRunner) -> InstallResult:
    started = time.perf_counter()
    family = desired.family
    for prefix in desired.local_routes:
        run(["ip", "-6", "route", "replace", "local", prefix, "dev", "lo"])
    before = parse_save(run([family.save]))
    payload = plan_payload(desired, before)
    try:
        run([family.restore, "--noflush", "--wait"], stdin=payload)
        problems = verify(desired, parse_save(run([family.save])))
        if problems:
            raise MeshguardFailure(f"{family.value} rules not as compiled: {'; '.join(problems)}")
    except MeshguardFailure as failure:
        _roll_back(before, family=family, run=run, failure=failure)
        raise
    seconds = time.perf_counter() - started
    return InstallResult(family=family, installed=True, payload=payload, seconds=seconds)


def snapshot(state: SavedState, *, family: Family) -> FamilyRuleset:
    """meshguard's chains, rules and hooks as they are in ``state`` (to return to it)."""
    tables = []
    for name, saved in sorted(state.tables.items()):
        chains = tuple(_own_chains(saved.chains))
        hooks = tuple(
            Hook(chain=chain, spec=spec)
            for chain in sorted(saved.builtins)
            for spec in saved.rules_of(chain)
            if (jump_target(spec) or "").startswith(CHAIN_PREFIX)
        )
        rules = tuple((chain, spec) for chain in chains for spec in saved.rules_of(chain))
        if chains or hooks:
            tables.append(Table(name=name, chains=chains, hooks=hooks, rules=rules))
    return FamilyRuleset(family=family, tables=tuple(tables))


def _roll_back(
    before: SavedState, *, family: Family, run: CommandRunner, failure: MeshguardFailure
) -> None:
    """iptables-restore commits table by table: undo the tables a failed payload did change."""
    previous = snapshot(before, family=family)
    try:
        run(
            [family.restore, "--noflush", "--wait"],
            stdin=plan_payload(previous, parse_save(run([family.save]))),
        )
    except MeshguardFailure as rollback:
        raise MeshguardFailure(f"{failure}; rolling back also failed: {rollback}") from None
    log.warning(
        "install failed, meshguard rules rolled back to their previous state",
        extra={"fields": {"event": "rolled-back", "family": family.value, "reason": str(failure)}},
    )


def _hook_changes(target: Table, saved: SavedTable) -> list[str]:
    """Delete misplaced or stale jumps into meshguard chains; insert missing hooks first."""
    deletes: list[str] = []
    inserts: list[str] = []
    for chain in sorted(saved.builtins):
        rules = saved.rules_of(chain)
        for spec in rules:
            target_chain = jump_target(spec)
            if target_chain is None or not target_chain.startswith(CHAIN_PREFIX):
                continue
            wanted_here = any(h.chain == chain and h.spec == spec for h in target.hooks)
            if not (wanted_here and rules[0] == spec and rules.count(spec) == 1):
                deletes.append(f"-D {chain} {spec}")
    for hook in target.hooks:
        rules = saved.rules_of(hook.chain)
        in_place = bool(rules) and rules[0] == hook.spec and rules.count(hook.spec) == 1
        if not in_place:
            inserts.append(f"-I {hook.chain} 1 {hook.spec}")
    return deletes + inserts


def _own_chains(chains: Iterable[str]) -> list[str]:
    return [c for c in chains if c.startswith(CHAIN_PREFIX)]
