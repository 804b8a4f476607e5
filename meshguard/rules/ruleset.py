"""The compiled ruleset: what meshguard-init installs, as data and as text.

A :class:`Ruleset` holds, per address family, the tables meshguard owns: its chains, the
hooks that jump to them from the built-in chains, and their rules, in the exact order and
spelling handed to ``iptables-restore``. It renders to the restore payload that
``meshguard rules`` prints, serialises to the JSON document the webhook writes on the pod
(``meshguard.io/ruleset``) and meshguard-init reads back, and has a stable digest.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Required, TypedDict, TypeVar

from meshguard.errors import MalformedInputError

_T = TypeVar("_T")
CHAIN_PREFIX: Final = "MESHGUARD_"
FORMAT_VERSION: Final = 1
MAX_ARTIFACT_BYTES: Final = 1024 * 1024
#: The document's key (present only when true) recording Istio's native nftables mode.
NATIVE_NFTABLES_KEY: Final = "istioNativeNftables"


class HookDocument(TypedDict):
    chain: str
    spec: str


class TableDocument(TypedDict):
    name: str
    chains: list[str]
    hooks: list[HookDocument]
    rules: list[list[str]]  # [chain, rule spec]


class FamilyDocument(TypedDict):
    localRoutes: list[str]
    tables: list[TableDocument]


class SourceDocument(TypedDict):
    container: str
    uid: int
    ipv4: str
    ipv6: str


class RulesetDocument(TypedDict, total=False):
    """``meshguard.io/ruleset``, the document the webhook writes and meshguard-init reads
    (:meth:`Ruleset.to_json`, :meth:`Ruleset.from_json`, which checks every field)."""

    version: Required[int]
    digest: Required[str]
    listenerPort: Required[int]
    sources: Required[list[SourceDocument]]
    ipv4: Required[FamilyDocument]
    ipv6: Required[FamilyDocument]
    istioNativeNftables: bool  # present only when true (NATIVE_NFTABLES_KEY)


class Family(enum.StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def restore(self) -> str:
        return "iptables-restore" if self is Family.IPV4 else "ip6tables-restore"

    @property
    def save(self) -> str:
        return "iptables-save" if self is Family.IPV4 else "ip6tables-save"


@dataclass(frozen=True)
class Hook:
    """A jump from a built-in chain into one of meshguard's; a chain's hooks come first in it."""

    chain: str
    spec: str

    @property
    def target(self) -> str:
        return self.spec.rsplit("-j ", 1)[-1].split()[0]


@dataclass(frozen=True)
class Table:
    name: str
    chains: tuple[str, ...]
    hooks: tuple[Hook, ...]
    rules: tuple[tuple[str, str], ...]  # (chain, rule spec) in order

    def rules_of(self, chain: str) -> list[str]:
        return [spec for owner, spec in self.rules if owner == chain]


@dataclass(frozen=True)
class FamilyRuleset:
    family: Family
    tables: tuple[Table, ...]
    #: Prefixes that must be local routes on ``lo`` before the rules work (IPv6 source
    #: addresses of the loopback listener; IPv4's 127.0.0.0/8 is local already).
    local_routes: tuple[str, ...] = ()

    def payload(self) -> str:
        """The iptables-restore payload for a fresh network namespace."""
        return render(self.tables, hook_lines={t.name: _insert_lines(t.hooks) for t in self.tables})


@dataclass(frozen=True)
class SourceIdentity:
    """How a source container is known on the loopback listener."""

    container: str
    uid: int
    address4: str
    address6: str


@dataclass(frozen=True)
class Ruleset:
    ipv4: FamilyRuleset
    ipv6: FamilyRuleset
    sources: tuple[SourceIdentity, ...] = ()
    listener_port: int = 0
    #: The pod's istio-init runs Istio's native nftables mode (``--native-nftables``):
    #: meshguard-init installs into ``table inet meshguard`` beside Istio's tables.
    native_nftables: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def family(self, family: Family) -> FamilyRuleset:
        return self.ipv4 if family is Family.IPV4 else self.ipv6

    @functools.cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` over both payloads and the routes: same input, same digest."""
        hasher = hashlib.sha256()
        for part in (self.ipv4, self.ipv6):
            hasher.update(part.payload().encode())
            hasher.update(b"\0" + "\n".join(part.local_routes).encode() + b"\0")
        if self.native_nftables:  # absent otherwise: earlier digests stay valid
            hasher.update(NATIVE_NFTABLES_KEY.encode() + b"\0")
        return "sha256:" + hasher.hexdigest()

    def to_json(self) -> str:
        """The document meshguard-init reads (compact, keys sorted: deterministic)."""
        return self._json

    @functools.cached_property
    def _json(self) -> str:
        document: RulesetDocument = {
            "version": FORMAT_VERSION,
            "digest": self.digest,
            "listenerPort": self.listener_port,
            "sources": [
                {"container": s.container, "uid": s.uid, "ipv4": s.address4, "ipv6": s.address6}
                for s in self.sources
            ],
            "ipv4": _family_document(self.ipv4),
            "ipv6": _family_document(self.ipv6),
        }
        if self.native_nftables:
            document[NATIVE_NFTABLES_KEY] = True
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Ruleset:
        """Read the document back; anything off (truncated, edited, wrong version) is refused."""
        if len(text.encode()) > MAX_ARTIFACT_BYTES:
            raise MalformedInputError("ruleset: larger than 1 MiB")
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MalformedInputError(f"ruleset: not valid JSON ({exc})") from None
        try:
            ruleset = _ruleset_from(document)
            check_ruleset(ruleset)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedInputError(f"ruleset: unexpected content ({exc})") from None
        if ruleset.digest != document["digest"]:
            raise MalformedInputError(
                f"ruleset: digest mismatch (document says {document['digest']},"
                f" content hashes to {ruleset.digest}): the ruleset was altered or truncated"
            )
        return ruleset


def render(
    tables: Iterable[Table],
    *,
    hook_lines: Mapping[str, list[str]],
    final_lines: Mapping[str, list[str]] | None = None,
) -> str:
    """Render tables as one iptables-restore payload.

    ``hook_lines`` (per table) come after the chain declarations, ``final_lines`` (per table,
    e.g. ``-X`` of stale chains) just before ``COMMIT``.
    """
    lines: list[str] = []
    for table in tables:
        lines.append(f"*{table.name}")
        lines.extend(f":{chain} - [0:0]" for chain in table.chains)
        lines.extend(hook_lines.get(table.name, []))
        lines.extend(f"-A {chain} {spec}" for chain, spec in table.rules)
        lines.extend((final_lines or {}).get(table.name, []))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def _insert_lines(hooks: Iterable[Hook]) -> list[str]:
    """Hooks first in their built-in chain, in the ruleset's order (1, 2, ... per chain)."""
    position: dict[str, int] = {}
    lines = []
    for hook in hooks:
        position[hook.chain] = position.get(hook.chain, 0) + 1
        lines.append(f"-I {hook.chain} {position[hook.chain]} {hook.spec}")
    return lines


def _family_document(ruleset: FamilyRuleset) -> FamilyDocument:
    return {
        "localRoutes": list(ruleset.local_routes),
        "tables": [
            {
                "name": t.name,
                "chains": list(t.chains),
                "hooks": [{"chain": h.chain, "spec": h.spec} for h in t.hooks],
                "rules": [[chain, spec] for chain, spec in t.rules],
            }
            for t in ruleset.tables
        ],
    }


def _ruleset_from(document: Mapping[str, Any]) -> Ruleset:
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"version {document.get('version')!r}, this meshguard reads {FORMAT_VERSION}"
        )
    return Ruleset(
        ipv4=_family_from(Family.IPV4, document["ipv4"]),
        ipv6=_family_from(Family.IPV6, document["ipv6"]),
        sources=tuple(
            SourceIdentity(
                container=_typed(s["container"], str, "sources[].container"),
                uid=_typed(s["uid"], int, "sources[].uid"),
                address4=_typed(s["ipv4"], str, "sources[].ipv4"),
                address6=_typed(s["ipv6"], str, "sources[].ipv6"),
            )
            for s in _typed(document["sources"], list, "sources")
        ),
        listener_port=_typed(document["listenerPort"], int, "listenerPort"),
        native_nftables=_flag(document.get(NATIVE_NFTABLES_KEY, False)),
    )


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{NATIVE_NFTABLES_KEY} must be true or false, got {value!r}")
    return value


def _family_from(family: Family, document: Mapping[str, Any]) -> FamilyRuleset:
    tables = []
    for raw in _typed(document["tables"], list, "tables"):
        chains = tuple(_typed(c, str, "chain") for c in _typed(raw["chains"], list, "chains"))
        hooks = tuple(
            Hook(chain=_typed(h["chain"], str, "hook chain"), spec=_typed(h["spec"], str, "hook"))
            for h in _typed(raw["hooks"], list, "hooks")
        )
        rules = tuple(
            (_typed(chain, str, "rule chain"), _typed(spec, str, "rule"))
            for chain, spec in _typed(raw["rules"], list, "rules")
        )
        tables.append(
            Table(name=_typed(raw["name"], str, "table"), chains=chains, hooks=hooks, rules=rules)
        )
    routes = tuple(_typed(r, str, "localRoutes[]") for r in document["localRoutes"])
    return FamilyRuleset(family=family, tables=tuple(tables), local_routes=routes)


def _typed(value: object, kind: type[_T], what: str) -> _T:
    """``value`` if it is a ``kind`` (no coercion: ``"1337"`` is not a uid; a bool no int)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what}: expected {kind.__name__}, got {_show(value)}")
    return value


# -- What may reach iptables-restore and nft as text --------------------------------------
# Every value of a ruleset is checked against its type before any backend renders it (and
# where the document is read): no character that could end a rule, a line, a quoted string,
# a block or a statement of either language (newline, ``;``, ``{``, ``}``, ``'``, ``\``,
# ``#``, ``$``, ``@``, ...) gets through, and numbers, addresses and names are what they say.

TABLES: Final = frozenset({"filter", "nat", "mangle", "raw"})
BUILTIN_CHAINS: Final = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
_OWN_CHAIN = re.compile(rf"{CHAIN_PREFIX}[A-Z0-9_]{{1,18}}\Z")
#: A rule as the compiler spells it: bare words, and double-quoted texts after QUOTED.
_SPEC_CHARS = re.compile(r'[A-Za-z0-9 _.:,/=+!"*\[\]>-]{1,1000}\Z')
_WORD = re.compile(r"[A-Za-z0-9_.:,/+!-]{1,100}\Z")
_TEXT = re.compile(r"[A-Za-z0-9 _.:,/=+*\[\]>-]{0,255}\Z")
QUOTED: Final = frozenset({"--comment", "--log-prefix", "--nflog-prefix"})
#: An NFLOG prefix is one of meshguard's own (``meshguard:deny``, ``meshguard:audit``): the
#: node agent attributes what it reads by it.
_NFLOG_PREFIX = re.compile(r"meshguard:[a-z]{1,16}\Z")
_TARGET = re.compile(r"[A-Z][A-Z0-9_]{0,28}\Z")
_PROTOCOL = re.compile(r"[a-z0-9]{1,16}\Z")
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_RATE = re.compile(r"[0-9]{1,9}/(sec|second|min|minute|hour|day)\Z")
_CONTAINER = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
MAX_ID: Final = 2**32 - 2


def check_ruleset(ruleset: Ruleset) -> None:
    """Raise ValueError naming the first value that is not of its type (see above)."""
    _check_int(ruleset.listener_port, 0, 65535, "listenerPort")
    for source in ruleset.sources:
        if not _CONTAINER.match(source.container):
            raise ValueError(f"sources: container name {_show(source.container)}")
        _check_int(source.uid, 0, MAX_ID, f"sources[{source.container}].uid")
        ipaddress.IPv4Address(source.address4)
        ipaddress.IPv6Address(source.address6)
    for part in (ruleset.ipv4, ruleset.ipv6):
        for route in part.local_routes:
            network = ipaddress.ip_network(route)
            if network.version != (4 if part.family is Family.IPV4 else 6):
                raise ValueError(f"{part.family.value}: local route {route} of the other family")
        for table in part.tables:
            _check_table(table)


def require_valid(ruleset: Ruleset) -> None:
    """:func:`check_ruleset` for the renderers: :class:`MalformedInputError` if off."""
    try:
        check_ruleset(ruleset)
    except ValueError as exc:
        raise MalformedInputError(f"ruleset: refused before rendering ({exc})") from None


def _check_table(table: Table) -> None:
    if table.name not in TABLES:
        raise ValueError(f"table {_show(table.name)} is not an iptables table")
    for chain in table.chains:
        _check_own_chain(chain)
    for hook in table.hooks:
        if hook.chain not in BUILTIN_CHAINS:
            raise ValueError(f"hook in {_show(hook.chain)}: not a built-in chain")
        check_spec(hook.spec)
    for chain, spec in table.rules:
        _check_own_chain(chain)
        check_spec(spec)


def _check_own_chain(chain: str) -> None:
    if not _OWN_CHAIN.match(chain):
        raise ValueError(f"chain {_show(chain)} is not meshguard's")


def check_spec(spec: str) -> None:
    """One rule spec: allowed characters, canonical quoting, every value of its type."""
    if not _SPEC_CHARS.match(spec):
        raise ValueError(f"rule {_show(spec)}: characters outside a rule's")
    words = shlex.split(spec)
    canonical = " ".join(
        f'"{word}"' if index and words[index - 1] in QUOTED else word
        for index, word in enumerate(words)
    )
    if canonical != spec:
        raise ValueError(f"rule {_show(spec)}: not in canonical form ({_show(canonical)})")
    for index, word in enumerate(words):
        flag = words[index - 1] if index else ""
        if flag == "--nflog-prefix" and not _NFLOG_PREFIX.match(word):
            raise ValueError(f"rule {_show(spec)}: {flag} {_show(word)} is not meshguard's")
        if flag in QUOTED:
            if not _TEXT.match(word):
                raise ValueError(f"rule {_show(spec)}: {flag} text {_show(word)}")
            continue
        if not _WORD.match(word):
            raise ValueError(f"rule {_show(spec)}: {_show(word)}")
        check = _VALUES.get(flag)
        if check is not None:
            check(word, f"rule {_show(spec)}: {flag}")


def _check_int(value: object, low: int, high: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what}: {_show(value)} is not an integer in {low}..{high}")


def _number(text: str, high: int, what: str) -> None:
    if not text.isdigit() or len(text) > 10 or int(text) > high:
        raise ValueError(f"{what} {_show(text)}: not a number in 0..{high}")


def _bounded(text: str, low: int, high: int, what: str) -> None:
    if not text.isdigit() or len(text) > 10 or not low <= int(text) <= high:
        raise ValueError(f"{what} {_show(text)}: not a number in {low}..{high}")


def _ids(text: str, what: str) -> None:
    for part in text.split("-", 1):
        _number(part, MAX_ID, what)


def _ports(text: str, what: str) -> None:
    for item in text.split(","):
        for part in re.split("[:-]", item, maxsplit=1):
            _number(part, 65535, what)


def _address(text: str, what: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{what} {_show(text)}: not an address") from None


def _pattern(pattern: re.Pattern[str]) -> Callable[[str, str], None]:
    def check(text: str, what: str) -> None:
        if not pattern.match(text):
            raise ValueError(f"{what} {_show(text)}")

    return check


_VALUES: Final[Mapping[str, Callable[[str, str], None]]] = {
    "--uid-owner": _ids,
    "--gid-owner": _ids,
    **dict.fromkeys(
        ("--dport", "--sport", "--dports", "--sports", "--to-ports", "--ctorigdstport"), _ports
    ),
    "-d": _address,
    "-s": _address,
    "--to-source": _address,
    "-o": _pattern(_INTERFACE),
    "-i": _pattern(_INTERFACE),
    "-p": _pattern(_PROTOCOL),
    "-j": _pattern(_TARGET),
    "-g": _pattern(_TARGET),
    "--limit": _pattern(_RATE),
    "--limit-burst": lambda text, what: _bounded(text, 1, 10000, what),
    "--nflog-group": lambda text, what: _bounded(text, 1, 65535, what),
}


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
