"""One compiled iptables rule as an nftables rule: the same matches, the same verdict.

The native nftables backend (:mod:`meshguard.rules.nft_render`) renders the compiler's
rules; this is its dictionary, word by word, of the compiler's own small vocabulary of
iptables matches and targets. Anything outside it is refused (:class:`UnsupportedRule`),
never guessed.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from meshguard.errors import MeshguardFailure
from meshguard.rules.ruleset import CHAIN_PREFIX, Family

ADDRESS: Final = {Family.IPV4: "ip", Family.IPV6: "ip6"}


class UnsupportedRule(MeshguardFailure):
    """A compiled rule outside the vocabulary this renderer translates."""


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
    rule.matches.append(f"{ADDRESS[rule.family]} daddr {rule.op}{rule.words.value(word)}")


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


def _limit_burst(rule: _Rule, word: str) -> None:
    burst = rule.words.value(word)
    if not burst.isdigit() or not rule.matches or not rule.matches[-1].startswith("limit rate "):
        raise UnsupportedRule(f"--limit-burst {burst} not right after --limit in {rule.spec!r}")
    rule.matches[-1] += f" burst {burst} packets"


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
    "--limit-burst": _limit_burst,
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
    address = ADDRESS[rule.family]
    simple = {
        "RETURN": "return",
        # Bind the flow to its own destination: Istio's nat chain never sees it.
        "ACCEPT": f"dnat {address} to {address} daddr" if rule.table == "nat" else None,
        "REJECT": _REJECTS.get(options.get("--reject-with", "icmp-port-unreachable")),
        "LOG": f"log prefix {json.dumps(options.get('--log-prefix', ''))}"
        + (" flags skuid" if "--log-uid" in options else ""),
        # Non-terminal, as the NFLOG target: the packet goes on to the next rule.
        "NFLOG": f"log prefix {json.dumps(options.get('--nflog-prefix', ''))}"
        f" group {options['--nflog-group']}"
        if "--nflog-group" in options
        else None,
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
