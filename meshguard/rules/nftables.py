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

Installing is one ``nft -f`` transaction — ``add table``, ``delete table``, the new table —
so the table is replaced whole or not at all, and Istio's tables are never named. It is then
read back (``nft -j list table inet meshguard``) and verified: chains, hooks, priorities,
rule counts and the uids of the map. On a failed verification the table found before is
restored, in one transaction as well, and verified.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard.errors import MeshguardFailure
from meshguard.process import CommandRunner
from meshguard.rules.install_result import InstallResult
from meshguard.rules.ruleset import CHAIN_PREFIX, Family, Ruleset, Table, require_valid

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

log = logging.getLogger(__name__)


class UnsupportedRule(MeshguardFailure):
    """A compiled rule outside the vocabulary this renderer translates."""


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


# --- translating one compiled rule --------------------------------------------------------


_STATES: Final = {"ESTABLISHED": "established", "RELATED": "related", "NEW": "new"}
_ADDRTYPES: Final = {"LOCAL": "local", "BROADCAST": "broadcast", "MULTICAST": "multicast"}
_REJECTS: Final = {
    "tcp-reset": "reject with tcp reset",
    "icmp-port-unreachable": "reject with icmpx port-unreachable",
    "icmp6-port-unreachable": "reject with icmpx port-unreachable",
}


class _Words:
    def __init__(self, spec: str) -> None:
        try:
            self.words = shlex.split(spec)
        except ValueError as exc:
            raise UnsupportedRule(f"cannot read rule {spec!r}: {exc}") from None
        self.position = 0
        self.spec = spec

    def next(self) -> str | None:
        if self.position >= len(self.words):
            return None
        word = self.words[self.position]
        self.position += 1
        return word

    def value(self, flag: str) -> str:
        word = self.next()
        if word is None:
            raise UnsupportedRule(f"{flag} without a value in {self.spec!r}")
        return word

    def peek(self) -> str | None:
        return self.words[self.position] if self.position < len(self.words) else None


@dataclass
class _Rule:
    """One rule being translated: the matches so far, the verdict once read."""

    words: _Words
    family: Family
    table: str
    protocol: str | None = None
    negate: bool = False
    matches: list[str] = field(default_factory=list)
    comment: str = ""
    verdict: str | None = None

    @property
    def spec(self) -> str:
        return self.words.spec

    @property
    def op(self) -> str:
        return "!= " if self.negate else ""


def translate(spec: str, *, family: Family, table: str, counted: bool = False) -> str:
    """One compiled iptables rule as an nftables rule (same matches, same verdict).

    ``counted``: with a ``counter`` before the verdict. iptables counts every rule; nftables
    only where asked, and the default's chain is where an operator reads how many flows were
    (or, in audit mode, would have been) denied.
    """
    rule = _Rule(words=_Words(spec), family=family, table=table)
    while (word := rule.words.next()) is not None:
        if word == "!":
            rule.negate = True
            continue
        handler = _HANDLERS.get(word)
        if handler is None:
            raise UnsupportedRule(f"{word!r} in {spec!r}")
        handler(rule, word)
        rule.negate = False
    if rule.verdict is None:
        raise UnsupportedRule(f"no verdict in {spec!r}")
    counter = ["counter"] if counted else []
    return " ".join([*rule.matches, *counter, rule.verdict]) + rule.comment


_MODULES: Final = frozenset(
    {"tcp", "udp", "multiport", "conntrack", "connlabel", "owner", "addrtype", "comment", "limit"}
)


def _protocol(rule: _Rule, word: str) -> None:
    rule.protocol = rule.words.value(word)
    if rule.protocol not in {"tcp", "udp"} or rule.negate:
        raise UnsupportedRule(f"protocol {rule.protocol!r} in {rule.spec!r}")
    rule.matches.append(f"meta l4proto {rule.protocol}")


def _module(rule: _Rule, word: str) -> None:
    module = rule.words.value(word)
    if module not in _MODULES:
        raise UnsupportedRule(f"match module {module!r} in {rule.spec!r}")


def _ports(rule: _Rule, word: str) -> None:
    ports = rule.words.value(word).replace(":", "-").split(",")
    if rule.protocol is None:
        raise UnsupportedRule(f"{word} without -p in {rule.spec!r}")
    field_name = "dport" if word.startswith("--d") else "sport"
    value = ports[0] if len(ports) == 1 else "{ " + ", ".join(ports) + " }"
    rule.matches.append(f"{rule.protocol} {field_name} {rule.op}{value}")


def _tcp_flags(rule: _Rule, word: str) -> None:
    mask, flags = rule.words.value(word).lower(), rule.words.value(word).lower()
    if mask != flags:
        raise UnsupportedRule(f"--tcp-flags {mask} {flags} in {rule.spec!r}")
    rule.matches.append(f"tcp flags & {flags} {'!=' if rule.negate else '=='} {flags}")


def _ctstate(rule: _Rule, word: str) -> None:
    value = rule.words.value(word)
    states = value.split(",")
    if rule.negate:
        raise UnsupportedRule(f"! --ctstate in {rule.spec!r}")
    if states == ["DNAT"]:
        rule.matches.append("ct status dnat")
    elif all(state in _STATES for state in states):
        rule.matches.append("ct state " + ",".join(_STATES[s] for s in states))
    else:
        raise UnsupportedRule(f"--ctstate {value} in {rule.spec!r}")


def _ctdir(rule: _Rule, word: str) -> None:
    rule.matches.append(f"ct direction {rule.words.value(word).lower()}")


def _ctorigdstport(rule: _Rule, word: str) -> None:
    l4 = f"meta l4proto {rule.protocol}" if rule.protocol else "meta l4proto { tcp, udp }"
    rule.matches.append(f"{l4} ct original proto-dst {rule.words.value(word)}")


def _label(rule: _Rule, word: str) -> None:
    """``--label N`` matches a conntrack label; ``--label N --set`` sets it (and, as a match,
    always holds): the rule's statement, in place of a verdict."""
    label = rule.words.value(word)
    if not label.isdigit() or rule.negate:
        raise UnsupportedRule(f"--label {label} in {rule.spec!r}")
    if rule.words.peek() == "--set":
        rule.words.next()
        if rule.words.peek() is not None:
            raise UnsupportedRule(f"a verdict after --set in {rule.spec!r}")
        rule.verdict = f"ct label set {label}"
    else:
        rule.matches.append(f"ct label {label}")


def _owner(rule: _Rule, word: str) -> None:
    key = "skuid" if word == "--uid-owner" else "skgid"
    rule.matches.append(f"meta {key} {rule.op}{rule.words.value(word)}")


def _oif(rule: _Rule, word: str) -> None:
    rule.matches.append(f'oifname {rule.op}"{rule.words.value(word)}"')


def _daddr(rule: _Rule, word: str) -> None:
    rule.matches.append(f"{_ADDRESS[rule.family]} daddr {rule.op}{rule.words.value(word)}")


def _dst_type(rule: _Rule, word: str) -> None:
    names = rule.words.value(word).split(",")
    if not all(name in _ADDRTYPES for name in names):
        raise UnsupportedRule(f"--dst-type {','.join(names)} in {rule.spec!r}")
    types = [_ADDRTYPES[name] for name in names]
    value = types[0] if len(types) == 1 else "{ " + ", ".join(types) + " }"
    rule.matches.append(f"fib daddr type {rule.op}{value}")


def _comment(rule: _Rule, word: str) -> None:
    rule.comment = f" comment {json.dumps(rule.words.value(word))}"


def _limit(rule: _Rule, word: str) -> None:
    rate, _, unit = rule.words.value(word).partition("/")
    if unit not in _UNITS:
        raise UnsupportedRule(f"--limit {rate}/{unit} in {rule.spec!r}")
    rule.matches.append(f"limit rate {rate}/{_UNITS[unit]}")


def _jump(rule: _Rule, word: str) -> None:
    rule.verdict = _verdict(word, rule)


_UNITS: Final = {"sec": "second", "second": "second", "min": "minute", "minute": "minute"}
_HANDLERS: Final[Mapping[str, Callable[[_Rule, str], None]]] = {
    "-p": _protocol,
    "-m": _module,
    "--dport": _ports,
    "--sport": _ports,
    "--dports": _ports,
    "--sports": _ports,
    "--tcp-flags": _tcp_flags,
    "--ctstate": _ctstate,
    "--ctdir": _ctdir,
    "--ctorigdstport": _ctorigdstport,
    "--label": _label,
    "--uid-owner": _owner,
    "--gid-owner": _owner,
    "-o": _oif,
    "-d": _daddr,
    "--dst-type": _dst_type,
    "--comment": _comment,
    "--limit": _limit,
    "-j": _jump,
    "-g": _jump,
}


def _verdict(flag: str, rule: _Rule) -> str:
    target = rule.words.value(flag)
    if target.startswith(CHAIN_PREFIX):
        return f"{'goto' if flag == '-g' else 'jump'} {target}"
    if flag == "-g":
        raise UnsupportedRule(f"goto {target} in {rule.spec!r}")
    options = _options(rule.words)
    address = _ADDRESS[rule.family]
    simple = {
        "RETURN": "return",
        # Bind the flow to its own destination: Istio's nat chain never sees it.
        "ACCEPT": f"dnat {address} to {address} daddr" if rule.table == "nat" else None,
        "REJECT": _REJECTS.get(options.get("--reject-with", "icmp-port-unreachable")),
        "LOG": f"log prefix {json.dumps(options.get('--log-prefix', ''))}"
        + (" flags skuid" if "--log-uid" in options else ""),
        "REDIRECT": f"redirect to :{options['--to-ports']}" if "--to-ports" in options else None,
        "SNAT": f"snat {address} to {options['--to-source']}" if "--to-source" in options else None,
    }
    verdict = simple.get(target)
    if verdict is None:
        raise UnsupportedRule(f"target {target} {' '.join(options)} in {rule.spec!r}")
    return verdict


def _options(words: _Words) -> dict[str, str]:
    """A target's options (``--reject-with X``, ``--log-uid``), up to the end of the rule."""
    options: dict[str, str] = {}
    while (word := words.next()) is not None:
        if not word.startswith("--"):
            raise UnsupportedRule(f"{word!r} in {words.spec!r}")
        following = words.peek()
        if following is not None and not following.startswith("--"):
            options[word] = words.value(word)
        else:
            options[word] = ""
    return options


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
