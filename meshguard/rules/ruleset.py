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
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Required, TypedDict

from meshguard.errors import MalformedInputError

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
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedInputError(f"ruleset: unexpected content ({exc!r})") from None
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
                container=str(s["container"]),
                uid=int(s["uid"]),
                address4=str(s["ipv4"]),
                address6=str(s["ipv6"]),
            )
            for s in document["sources"]
        ),
        listener_port=int(document["listenerPort"]),
        native_nftables=_flag(document.get(NATIVE_NFTABLES_KEY, False)),
    )


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{NATIVE_NFTABLES_KEY} must be true or false, got {value!r}")
    return value


def _family_from(family: Family, document: Mapping[str, Any]) -> FamilyRuleset:
    tables = []
    for raw in document["tables"]:
        chains = tuple(str(c) for c in raw["chains"])
        for chain in chains:
            _check_own_chain(chain)
        hooks = tuple(Hook(chain=str(h["chain"]), spec=str(h["spec"])) for h in raw["hooks"])
        rules = tuple((str(chain), str(spec)) for chain, spec in raw["rules"])
        for chain, _ in rules:
            _check_own_chain(chain)
        for text in [h.spec for h in hooks] + [spec for _, spec in rules]:
            if "\n" in text:
                raise ValueError("a rule spans lines")
        tables.append(Table(name=str(raw["name"]), chains=chains, hooks=hooks, rules=rules))
    routes = tuple(str(r) for r in document["localRoutes"])
    return FamilyRuleset(family=family, tables=tuple(tables), local_routes=routes)


def _check_own_chain(chain: str) -> None:
    if not chain.startswith(CHAIN_PREFIX):
        raise ValueError(f"chain {chain!r} is not meshguard's")
