"""meshguard-init: install a compiled ruleset into the pod's network namespace, fail closed.

Installers of one network namespace are serialized by :func:`install_lock`: the namespace's
own lock (an abstract unix socket, ``@meshguard/install.lock``, shared by every process in
the namespace whatever its container or mount namespace, freed when its holder dies) and
iptables' lock (``/run/xtables.lock`` or ``$XTABLES_LOCKFILE``, what ``iptables -w`` and
iptables-legacy take).
Everything below runs under it, so what an installer reads is what it changes, and what it
verified is in place when it lets go.

Per family: read the current tables (``iptables-save``), plan one ``iptables-restore
--noflush`` payload that makes meshguard's chains exactly the ruleset's — (re)declaring them
flushes stale content, the hooks of each built-in chain are made its first rules in the
ruleset's order, chains and hooks of an earlier ruleset that this one lacks are removed —
apply it in one transaction, then read the tables back and verify every chain, rule count
and hook. iptables-restore commits table by table, so when any table of any family fails
(or verification does) every family already changed is rolled back to the state read at the
start, and that is verified too. Istio's chains are never touched. Any failure raises
:class:`~meshguard.errors.MeshguardFailure`: the init container exits non-zero and the pod
does not start unprotected. Running it again on the same namespace (a container restart)
converges to the same state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from meshguard.errors import MeshguardFailure
from meshguard.process import CommandRunner
from meshguard.rules.backend import Backend
from meshguard.rules.install_result import InstallResult
from meshguard.rules.iptables import (
    Deadline,
    EnvRunner,
    SavedState,
    SavedTable,
    abstract_socket_lock,
    jump_target,
    parse_save,
    xtables_lock,
    xtables_lock_path,
)
from meshguard.rules.ruleset import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    Family,
    FamilyRuleset,
    Hook,
    Ruleset,
    Table,
    render,
    require_valid,
)

#: The abstract unix socket that serializes meshguard's installers of a network namespace.
INSTALL_LOCK_NAME: Final = "meshguard/install.lock"
DEFAULT_LOCK_TIMEOUT_SECONDS: Final = 30.0

log = logging.getLogger(__name__)


@contextlib.contextmanager
def install_lock(
    *, timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS, xtables: Path | None = None
) -> Iterator[CommandRunner]:
    """Hold the install lock of the calling thread's network namespace; yields the runner
    to start iptables tools with while it is held.

    A process that enters the pod's namespace (``setns``, a node-side CNI plugin) must do so
    before calling this: the lock belongs to the namespace the socket is created in. Waits up
    to ``timeout`` seconds for both locks, then raises :class:`MeshguardFailure`.
    """
    deadline = Deadline.after(timeout)
    started = time.monotonic()
    with (
        abstract_socket_lock(INSTALL_LOCK_NAME, deadline=deadline),
        xtables_lock(xtables or xtables_lock_path(), deadline=deadline) as iptables_lock,
    ):
        acquired = time.monotonic_ns()
        log.debug(
            "install lock acquired",
            extra={
                "fields": {
                    "event": "lock-acquired",
                    "waited_ms": round((time.monotonic() - started) * 1000, 1),
                    "xtables_lock": iptables_lock.held,
                    "monotonic_ns": acquired,
                }
            },
        )
        try:
            yield EnvRunner(env=iptables_lock.env)
        finally:
            # Logged before the locks go: the next holder's "acquired" always comes later.
            released = time.monotonic_ns()
            log.debug(
                "install lock released",
                extra={
                    "fields": {
                        "event": "lock-released",
                        "held_ms": round((released - acquired) / 1e6, 1),
                        "monotonic_ns": released,
                    }
                },
            )


def plan_payload(desired: FamilyRuleset, current: SavedState) -> str:
    """The restore payload that turns ``current`` into ``desired`` for meshguard's chains."""
    wanted = {table.name: table for table in desired.tables}
    names = list(wanted) + sorted(
        name
        for name, table in current.tables.items()
        if name not in wanted and (_own_chains(table.chains) or _own_jumps(table))
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
    for name in sorted(set(wanted) | set(current.tables)):
        table = wanted.get(name, Table(name=name, chains=(), hooks=(), rules=()))
        saved = current.table(name)
        hooks = _hooks_by_chain(table)
        for chain in sorted(set(hooks) | saved.builtins):
            problems += _hook_problems(name, chain, hooks.get(chain, []), saved.rules_of(chain))
        extra = [c for c in _own_chains(saved.chains) if c not in table.chains]
        if extra:
            problems.append(f"{name}: stale meshguard chains {', '.join(extra)}")
    return problems


def install(
    ruleset: Ruleset,
    *,
    run: CommandRunner,
    families: Iterable[Family] = tuple(Family),
    ipv6_available: bool | None = None,
    backend: Backend = Backend.IPTABLES,
) -> list[InstallResult]:
    """Install every family of the ruleset; raise :class:`MeshguardFailure` on any problem.

    ``backend`` is where: an iptables variant (its own ``*-save``/``*-restore`` tools, for
    reading, applying, verifying and rolling back alike) or native nftables (one
    ``table inet meshguard`` for both families, :mod:`meshguard.rules.nftables`). Choose it
    with :func:`meshguard.rules.backend.detect_backend`: the backend Istio's capture is in.

    Call it under :func:`install_lock` with the runner that yields: another installer of the
    namespace between the read and the verification would make both wrong. The families
    are independent (separate tools, separate tables): they are installed side by side,
    which halves meshguard-init's time. When any family fails, every family this call
    changed is rolled back, so a failure leaves the namespace as it was found.
    """
    require_valid(ruleset)  # no value reaches a restore payload unless it is of its type
    if ipv6_available is None:
        ipv6_available = Path("/proc/net/if_inet6").exists()
    wanted = list(families)
    if backend is Backend.NFTABLES:
        from meshguard.rules import nftables  # noqa: PLC0415 - only the nft backend needs it

        return nftables.install(
            ruleset, run=run, families=wanted, ipv6_available=bool(ipv6_available)
        )
    with ThreadPoolExecutor(max_workers=len(wanted) or 1) as pool:
        attempts = list(
            pool.map(
                lambda family: _attempt(
                    ruleset,
                    family,
                    run=run,
                    ipv6_available=bool(ipv6_available),
                    backend=backend,
                ),
                wanted,
            )
        )
    failures = [a.error for a in attempts if a.error is not None]
    if failures:
        _roll_back(attempts, run=run, failure=failures[0], backend=backend)
        raise failures[0]
    results = [a.result for a in attempts if a.result is not None]
    for result in results:
        if result.installed:
            _log_installed(ruleset, result, backend=backend)
    return results


def snapshot(state: SavedState, *, family: Family) -> FamilyRuleset:
    """meshguard's chains, rules and hooks as they are in ``state`` (to return to it)."""
    tables = []
    for name, saved in sorted(state.tables.items()):
        chains = tuple(_own_chains(saved.chains))
        hooks = tuple(
            Hook(chain=chain, spec=spec)
            for chain in sorted(saved.builtins)
            for spec in saved.rules_of(chain)
            if _is_own_jump(spec)
        )
        rules = tuple((chain, spec) for chain in chains for spec in saved.rules_of(chain))
        if chains or hooks:
            tables.append(Table(name=name, chains=chains, hooks=hooks, rules=rules))
    return FamilyRuleset(family=family, tables=tuple(tables))


@dataclass(frozen=True, kw_only=True)
class _Attempt:
    """One family's install: what was read first, and how it ended."""

    family: Family
    before: SavedState | None  # None: nothing was read, so nothing was changed
    changed: bool  # a restore ran (whether or not it succeeded)
    result: InstallResult | None = None
    error: MeshguardFailure | None = None


def _attempt(
    ruleset: Ruleset,
    family: Family,
    *,
    run: CommandRunner,
    ipv6_available: bool,
    backend: Backend,
) -> _Attempt:
    if family is Family.IPV6 and not ipv6_available:
        log.warning(
            "IPv6 is disabled in this network namespace: no IPv6 loopback traffic is"
            " possible, IPv6 rules skipped",
            extra={"fields": {"event": "skipped", "family": family.value}},
        )
        skipped = InstallResult(family=family, installed=False, payload="", seconds=0)
        return _Attempt(family=family, before=None, changed=False, result=skipped)
    started = time.perf_counter()
    desired = ruleset.family(family)
    before: SavedState | None = None
    changed = False
    try:
        for prefix in desired.local_routes:
            run(["ip", "-6", "route", "replace", "local", prefix, "dev", "lo"])
        before = parse_save(run([backend.save(family)]))
        payload = plan_payload(desired, before)
        changed = True
        run([backend.restore(family), "--noflush", "--wait"], stdin=payload)
        after = parse_save(run([backend.save(family)]))
        problems = verify(desired, after) + foreign_changes(before, after)
        if problems:
            raise MeshguardFailure(f"{family.value} rules not as compiled: {'; '.join(problems)}")
    except (MeshguardFailure, OSError) as exc:
        error = exc if isinstance(exc, MeshguardFailure) else MeshguardFailure(str(exc))
        return _Attempt(family=family, before=before, changed=changed, error=error)
    seconds = time.perf_counter() - started
    result = InstallResult(family=family, installed=True, payload=payload, seconds=seconds)
    return _Attempt(family=family, before=before, changed=changed, result=result)


def foreign_changes(before: SavedState, after: SavedState) -> list[str]:
    """What an install changed outside meshguard's chains and hooks, in every table of the
    family (each a problem): it may touch nothing else."""
    was, now = _foreign(before), _foreign(after)
    return [
        f"{table} {chain}: changed outside meshguard's rules"
        for table, chain in sorted(set(was) | set(now))
        # a table meshguard's restore creates brings its empty built-in chains
        if was.get((table, chain), _ABSENT if chain not in BUILTIN_CHAINS else [])
        != now.get((table, chain), _ABSENT if chain not in BUILTIN_CHAINS else [])
    ]


_ABSENT: Final[list[str]] = ["(no such chain)"]


def _foreign(state: SavedState) -> dict[tuple[str, str], list[str]]:
    return {
        (name, chain): [spec for spec in saved.rules_of(chain) if not _is_own_jump(spec)]
        for name, saved in state.tables.items()
        for chain in saved.chains
        if not chain.startswith(CHAIN_PREFIX)
    }


def _roll_back(
    attempts: list[_Attempt], *, run: CommandRunner, failure: MeshguardFailure, backend: Backend
) -> None:
    """Return every family this install changed to the state it read first, verified.

    iptables-restore commits table by table, so even the family that failed may be half
    changed; a family that succeeded next to one that failed is undone too.
    """
    problems: list[str] = []
    for attempt in attempts:
        if not attempt.changed or attempt.before is None:
            continue
        family = attempt.family
        previous = snapshot(attempt.before, family=family)
        try:
            run(
                [backend.restore(family), "--noflush", "--wait"],
                stdin=plan_payload(previous, parse_save(run([backend.save(family)]))),
            )
            left = verify(previous, parse_save(run([backend.save(family)])))
            if left:
                raise MeshguardFailure(f"{family.value} not as before: {'; '.join(left)}")
        except (MeshguardFailure, OSError) as exc:
            problems.append(str(exc))
            continue
        log.warning(
            "install failed, meshguard rules rolled back to their previous state",
            extra={
                "fields": {
                    "event": "rolled-back",
                    "family": family.value,
                    "backend": backend.value,
                    "reason": str(failure),
                }
            },
        )
    if problems:
        raise MeshguardFailure(f"{failure}; rolling back also failed: {'; '.join(problems)}")


def _log_installed(ruleset: Ruleset, result: InstallResult, *, backend: Backend) -> None:
    tables = ruleset.family(result.family).tables
    log.info(
        "ruleset installed",
        extra={
            "fields": {
                "event": "installed",
                "family": result.family.value,
                "backend": backend.value,
                "digest": ruleset.digest,
                "chains": sum(len(t.chains) for t in tables),
                "rules": sum(len(t.rules) for t in tables),
                "ms": round(result.seconds * 1000, 1),
            }
        },
    )


def _hooks_by_chain(table: Table) -> dict[str, list[str]]:
    """The specs of the hooks of each built-in chain, in the ruleset's order."""
    hooks: dict[str, list[str]] = {}
    for hook in table.hooks:
        hooks.setdefault(hook.chain, []).append(hook.spec)
    return hooks


def _hook_problems(table: str, chain: str, wanted: list[str], rules: list[str]) -> list[str]:
    """A built-in chain must start with its hooks, in order, and jump nowhere else of ours."""
    if rules[: len(wanted)] != wanted:
        expected = ", ".join(f"'{spec}'" for spec in wanted)
        return [f"{table}: {chain} does not start with {expected}"]
    problems = []
    for spec in [s for s in rules[len(wanted) :] if _is_own_jump(s)]:
        if spec in wanted:
            problems.append(f"{table}: {chain} jumps to {jump_target(spec)} more than once")
        else:
            problems.append(f"{table}: {chain} has an unexpected jump '{spec}'")
    return list(dict.fromkeys(problems))


def _hook_changes(target: Table, saved: SavedTable) -> list[str]:
    """Per built-in chain whose first rules are not exactly its hooks (or that jumps into
    meshguard elsewhere): delete every jump into meshguard, then insert the hooks at the
    top in order. Deletes of all chains come first, so the insert positions hold."""
    deletes: list[str] = []
    inserts: list[str] = []
    hooks = _hooks_by_chain(target)
    for chain in sorted(set(hooks) | saved.builtins):
        wanted = hooks.get(chain, [])
        rules = saved.rules_of(chain)
        own = [spec for spec in rules if _is_own_jump(spec)]
        if rules[: len(wanted)] == wanted and len(own) == len(wanted):
            continue
        deletes += [f"-D {chain} {spec}" for spec in own]
        inserts += [f"-I {chain} {position} {spec}" for position, spec in enumerate(wanted, 1)]
    return deletes + inserts


def _is_own_jump(spec: str) -> bool:
    return (jump_target(spec) or "").startswith(CHAIN_PREFIX)


def _own_jumps(table: SavedTable) -> bool:
    return any(_is_own_jump(s) for chain in table.builtins for s in table.rules_of(chain))


def _own_chains(chains: Iterable[str]) -> list[str]:
    return [c for c in chains if c.startswith(CHAIN_PREFIX)]
