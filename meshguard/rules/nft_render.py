"""The native nftables backend: the compiled ruleset as one ``table inet meshguard``.

Used when the pod's Istio runs native nftables (``table inet istio-proxy-nat``). It is a
*renderer*, not a second policy engine: every rule comes from the ruleset the compiler
produced (:mod:`meshguard.rules.compiler`, the same decisions the iptables backends
install), translated match by match from the compiler's own small vocabulary — anything
outside it is refused, never guessed. Two things change shape, not meaning:

- the uid dispatch: the compiler's tree of uid-range chains (``MESHGUARD_UIDS*``, a
  decision tree whose every level ends in the default deny) becomes one verdict map,
  ``meta skuid vmap { uid : goto MESHGUARD_SRC_<uid>, ... }``, followed by the same
  default: a new packet pays one hashed owner lookup, whatever the number of containers;
- ``-j ACCEPT`` in ``nat`` (leave a pod-local flow un-NATed so Istio never captures it):
  in nftables an ``accept`` ends only meshguard's own nat chain, and the kernel then runs
  Istio's nat chain (``istio-proxy-nat``, priority -100) on the same packet. meshguard's
  nat chain (priority -110, before Istio's) instead binds the flow to its own destination
  (``dnat ip to ip daddr``): the NAT of the connection is then decided, Istio's chain is
  not consulted, and the destination is unchanged (conntrack records no DNAT for it).

The rules of the default's chain (``MESHGUARD_DENY``) carry a ``counter``, as every
iptables rule has one: ``nft list chain inet meshguard MESHGUARD_DENY`` shows how many
packets were denied (in audit mode: would have been). No other rule counts: a counter on
the per-packet path costs.

IPv4 and IPv6 share the table: a rule the two families spell alike is written once, the
others carry ``meta nfproto ipv4``/``ipv6``, so each family's packets walk exactly the
rules its iptables payload has, in the same order. Base chains, one per hook the
compiler uses: ``filter_output`` (filter, priority 0, as iptables' filter), ``nat_output``
(nat, priority -110: before Istio's nat output at -100, so the L7 redirect wins) and
``nat_postrouting`` (nat, srcnat) — only when the pod has L7 rules, whose redirected flows
it source-NATs: a hook is called for every packet of the pod, so none is registered idle.

The table's text is installed, read back and verified by :mod:`meshguard.rules.nftables`;
each rule is translated by :mod:`meshguard.rules.nft_translate`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from meshguard.rules.nft_translate import UnsupportedRule, translate
from meshguard.rules.ruleset import Family, Ruleset, Table, require_valid

TABLE_FAMILY: Final = "inet"
TABLE_NAME: Final = "meshguard"
DENY_CHAIN: Final = "MESHGUARD_DENY"
SOURCE_PREFIX: Final = "MESHGUARD_SRC_"
DISPATCH_PREFIX: Final = "MESHGUARD_UIDS"
ISTIO_NAT_OUTPUT_PRIORITY: Final = -100


@dataclass(frozen=True)
class BaseChain:
    """Where a built-in iptables chain's hooks go: a base chain of meshguard's table."""

    name: str
    type: str
    hook: str
    priority: int


#: (iptables table, built-in chain) -> meshguard's base chain for its hooks.
BASE_CHAINS: Final[Mapping[tuple[str, str], BaseChain]] = {
    ("filter", "OUTPUT"): BaseChain("filter_output", "filter", "output", 0),
    # Before Istio's nat output (-100): a flow meshguard redirects or binds is never
    # captured by Istio's chain.
    ("nat", "OUTPUT"): BaseChain("nat_output", "nat", "output", ISTIO_NAT_OUTPUT_PRIORITY - 10),
    ("nat", "POSTROUTING"): BaseChain("nat_postrouting", "nat", "postrouting", 100),
}

_NFPROTO: Final = {Family.IPV4: "ipv4", Family.IPV6: "ipv6"}
_ADDRESS: Final = {Family.IPV4: "ip", Family.IPV6: "ip6"}


# --- rendering ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    name: str
    base: BaseChain | None
    rules: tuple[str, ...]


@dataclass(frozen=True)
class NftTable:
    chains: tuple[Chain, ...]
    #: uid -> source chain of the verdict map (the same in every family).
    dispatch: Mapping[int, str]

    def text(self) -> str:
        lines = [f"table {TABLE_FAMILY} {TABLE_NAME} {{"]
        for chain in self.chains:
            lines.append(f"\tchain {chain.name} {{")
            if chain.base is not None:
                b = chain.base
                lines.append(
                    f"\t\ttype {b.type} hook {b.hook} priority {b.priority}; policy accept;"
                )
            lines.extend(f"\t\t{rule}" for rule in chain.rules)
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"


def build(ruleset: Ruleset, *, families: Iterable[Family] = tuple(Family)) -> NftTable:
    """The table for ``families`` (both, normally): the ruleset's rules, translated."""
    require_valid(ruleset)  # no value reaches the nft text unless it is of its type
    per_family = {family: _family_chains(ruleset, family) for family in families}
    names: list[str] = []
    for chains in per_family.values():
        names += [name for name in chains if name not in names]
    dispatches = {family: _dispatch_of(ruleset, family) for family in per_family}
    maps = {tuple(sorted(d.items())) for d in dispatches.values()}
    if len(maps) > 1:
        raise UnsupportedRule("the uid dispatch differs between the families")
    built: list[Chain] = []
    for name in _ordered(names):
        base = next((b for b in BASE_CHAINS.values() if b.name == name), None)
        rules = _merge({family: chains.get(name, []) for family, chains in per_family.items()})
        built.append(Chain(name=name, base=base, rules=tuple(rules)))
    dispatch = dict(next(iter(maps))) if maps else {}
    table_chains = _without_idle_hooks(_hoist_early_returns(tuple(built)))
    return NftTable(chains=table_chains, dispatch=dispatch)


def _without_idle_hooks(chains: tuple[Chain, ...]) -> tuple[Chain, ...]:
    """Leave out a base chain whose every rule jumps to an empty chain (the SNAT chain of a
    pod without L7 rules): it decides nothing, and a hook registered for it would still be
    called for every packet of the pod. The empty chain stays (it is the compiler's)."""
    empty = {chain.name for chain in chains if chain.base is None and not chain.rules}
    return tuple(
        chain
        for chain in chains
        if chain.base is None
        or not chain.rules
        or not all(_jump_target(rule) in empty for rule in chain.rules)
    )


def _jump_target(rule: str) -> str | None:
    match = re.fullmatch(r"(?:.* )?jump (\S+)", rule)
    return match.group(1) if match else None


def _hoist_early_returns(chains: tuple[Chain, ...]) -> tuple[Chain, ...]:
    """Move the leading ``return`` rules of a chain that only a base chain's last rule jumps
    to into that base chain, before the jump: every packet of the pod passes the filter
    output hook, and most leave at the first rule (a TCP segment of an accepted connection),
    so this saves each of them a jump. The same verdicts: a ``return`` at the end of that
    jump ends the base chain (its policy, accept) exactly as a ``return`` in the base chain
    does."""
    by_name = {chain.name: chain for chain in chains}
    moved: dict[str, Chain] = {}
    for base in chains:
        if base.base is None or not base.rules:
            continue
        jump, _, target = base.rules[-1].partition(" ")
        callee = by_name.get(target)
        if jump != "jump" or callee is None or _references(chains, target) != 1:
            continue
        leading = 0
        while leading < len(callee.rules) and callee.rules[leading].endswith(" return"):
            leading += 1
        if leading == 0:
            continue
        moved[base.name] = Chain(
            name=base.name,
            base=base.base,
            rules=(*base.rules[:-1], *callee.rules[:leading], base.rules[-1]),
        )
        moved[callee.name] = Chain(name=callee.name, base=None, rules=callee.rules[leading:])
    return tuple(moved.get(chain.name, chain) for chain in chains)


def _references(chains: Iterable[Chain], name: str) -> int:
    """How many rules jump or go to ``name`` (verdict maps included)."""
    pattern = re.compile(rf"\b(?:jump|goto) {re.escape(name)}\b")
    return sum(len(pattern.findall(rule)) for chain in chains for rule in chain.rules)


def render(ruleset: Ruleset, *, families: Iterable[Family] = tuple(Family)) -> str:
    """The ``nft -f`` transaction that replaces meshguard's table with the ruleset's."""
    return transaction(build(ruleset, families=families).text())


def transaction(table_text: str | None) -> str:
    """Replace meshguard's table (or remove it, for ``None``) in one atomic ``nft -f``."""
    head = [
        f"add table {TABLE_FAMILY} {TABLE_NAME}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
    ]
    return "\n".join(head) + "\n" + (table_text or "")


def _ordered(names: list[str]) -> list[str]:
    """Base chains first (hook order), then meshguard's chains in the compiler's order."""
    bases = [b.name for b in BASE_CHAINS.values() if b.name in names]
    return bases + [n for n in names if n not in bases]


def _family_chains(ruleset: Ruleset, family: Family) -> dict[str, list[str]]:
    """Each chain's rules for one family, translated; dispatch chains folded into the map."""
    chains: dict[str, list[str]] = {}
    for table in ruleset.family(family).tables:
        for hook in table.hooks:
            base = BASE_CHAINS.get((table.name, hook.chain))
            if base is None:
                raise UnsupportedRule(f"no nftables hook for {table.name} {hook.chain}")
            chains.setdefault(base.name, []).append(
                translate(hook.spec, family=family, table=table.name)
            )
        dispatch = _dispatch_chains(table)
        for chain in table.chains:
            if chain in dispatch:
                continue
            chains[chain] = list(_chain_rules(table, chain, family=family, dispatch=dispatch))
    return chains


def _chain_rules(table: Table, chain: str, *, family: Family, dispatch: set[str]) -> Iterator[str]:
    rules = table.rules_of(chain)
    index = 0
    while index < len(rules):
        if _is_dispatch(rules[index]):
            end = index
            while end < len(rules) and _is_dispatch(rules[end]):
                end += 1
            targets = _flatten(table, rules[index:end], dispatch=dispatch)
            entries = ", ".join(f"{uid} : goto {target}" for uid, target in sorted(targets.items()))
            yield f"meta skuid vmap {{ {entries} }}"
            index = end
            continue
        yield translate(rules[index], family=family, table=table.name, counted=chain == DENY_CHAIN)
        index += 1


_DISPATCH = re.compile(r"^-m owner --uid-owner (\d+)(?:-(\d+))? -g (MESHGUARD_\w+)$")


def _is_dispatch(spec: str) -> bool:
    match = _DISPATCH.match(spec)
    return bool(match) and match is not None and _is_dispatch_target(match.group(3))


def _is_dispatch_target(chain: str) -> bool:
    return chain.startswith((SOURCE_PREFIX, DISPATCH_PREFIX))


def _dispatch_chains(table: Table) -> set[str]:
    return {c for c in table.chains if c.startswith(DISPATCH_PREFIX)}


def _flatten(table: Table, specs: Sequence[str], *, dispatch: set[str]) -> dict[int, str]:
    """The leaves of the compiler's uid-range tree: uid -> its source chain.

    Exact only because every range chain holds nothing but further dispatch and ends in the
    default deny, like the chain that starts the tree: checked, or refused.
    """
    targets: dict[int, str] = {}
    for spec in specs:
        match = _DISPATCH.match(spec)
        if match is None:
            raise UnsupportedRule(f"not a uid dispatch rule: {spec!r}")
        low, high, target = int(match.group(1)), int(match.group(2) or match.group(1)), match[3]
        if target in dispatch:
            rules = table.rules_of(target)
            if not rules or rules[-1] != f"-j {DENY_CHAIN}":
                raise UnsupportedRule(f"uid range chain {target} does not end in the default")
            inner = _flatten(table, rules[:-1], dispatch=dispatch)
            if any(not low <= uid <= high for uid in inner):
                raise UnsupportedRule(f"uid range chain {target} leaves its range {low}-{high}")
            targets.update(inner)
        elif low == high and target == f"{SOURCE_PREFIX}{low}":
            targets[low] = target
        else:
            raise UnsupportedRule(f"uid dispatch to {target} is not a source chain: {spec!r}")
    return targets


def _dispatch_of(ruleset: Ruleset, family: Family) -> dict[int, str]:
    found: dict[int, str] = {}
    for table in ruleset.family(family).tables:
        dispatch = _dispatch_chains(table)
        for chain in table.chains:
            if chain in dispatch:
                continue
            specs = [s for s in table.rules_of(chain) if _is_dispatch(s)]
            found.update(_flatten(table, specs, dispatch=dispatch))
    return found


def _merge(rules: Mapping[Family, Sequence[str]]) -> list[str]:
    """One rule list for an ``inet`` chain: each family sees its own rules, in order.

    Rules both families spell alike are written once; the others are guarded by
    ``meta nfproto``. Between two shared rules the IPv4-only and IPv6-only rules never see
    each other's packets, so their relative order does not matter.
    """
    if len(rules) == 1:
        ((family, only),) = rules.items()
        return [f"meta nfproto {_NFPROTO[family]} {rule}" for rule in only]
    v4, v6 = list(rules.get(Family.IPV4, [])), list(rules.get(Family.IPV6, []))
    merged: list[str] = []
    matcher = difflib.SequenceMatcher(a=v4, b=v6, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            merged += v4[a0:a1]
            continue
        merged += [f"meta nfproto ipv4 {rule}" for rule in v4[a0:a1]]
        merged += [f"meta nfproto ipv6 {rule}" for rule in v6[b0:b1]]
    return merged
