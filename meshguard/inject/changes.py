"""The changes an admission makes to a pod, as data, and the one place they are made.

The transform decides every change first (posture fixes, the stale init step's removal,
meshguard's annotations and labels, the L7 engine's document and mount, meshguard's init
step, its volume and pull secrets), then :func:`apply_changes` makes them, in order, on the
pod's metadata and spec. A change addresses the pod by a path from its root: ``"metadata"``
or ``"spec"``, then mapping keys, list indices, or :class:`ByName` (every entry of a list
with that name). Setting a key creates a missing or null mapping on its way (a null one
replaced); any other change finds nothing to change there, as in a missing list.

A change's value becomes the pod's when it is made: a plan is made once, on the pod it was
decided for.

A change's ``note`` is what meshguard records of it in ``meshguard.io/status`` (``changes``):
what it did to the workload's own containers. meshguard's own marks carry none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshguard.inject.posture import Finding, apply_fixes


@dataclass(frozen=True)
class ByName:
    """Every entry of a list whose ``name`` is this."""

    name: str


Segment = str | int | ByName
Path = tuple[Segment, ...]


@dataclass(frozen=True, kw_only=True)
class SetKey:
    """``key`` of the mapping at ``at`` becomes ``value`` (unless ``keep`` and it is set)."""

    at: Path
    key: str
    value: object
    keep: bool = False
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class RemoveKey:
    at: Path
    key: str
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class RemoveItem:
    """The ``index``-th entry of the list at ``at`` / ``key`` goes."""

    at: Path
    key: str
    index: int
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class ReplaceNamed:
    """The entries named ``name`` of the list at ``at`` / ``key`` go, and ``item`` (if any)
    is appended; a list that is not there is created only to hold ``item``."""

    at: Path
    key: str
    name: str
    item: Mapping[str, Any] | None = None
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class InsertAfter:
    """``item`` goes into the list at ``at`` / ``key``, right after the first entry named
    ``after`` (first if None), once the entries named one of ``replacing`` are gone."""

    at: Path
    key: str
    item: Mapping[str, Any]
    after: str | None
    replacing: frozenset[str]
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class PostureFixes:
    """The fixes of a posture review (:class:`~meshguard.inject.posture.Fix`), in order."""

    findings: tuple[Finding, ...]

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.findings if f.fixed)


Change = SetKey | RemoveKey | RemoveItem | ReplaceNamed | InsertAfter | PostureFixes


def notes(changes: Iterable[Change]) -> tuple[str, ...]:
    """What the changes record in ``meshguard.io/status``, in order."""
    out: list[str] = []
    for change in changes:
        if isinstance(change, PostureFixes):
            out += change.notes
        elif change.note:
            out.append(change.note)
    return tuple(out)


def apply_changes(
    changes: Sequence[Change], *, metadata: dict[str, Any], spec: dict[str, Any]
) -> None:
    """Make ``changes`` on the pod, in order."""
    root: dict[str, Any] = {"metadata": metadata, "spec": spec}
    for change in changes:
        if isinstance(change, PostureFixes):
            apply_fixes(spec, change.findings)
            continue
        for node in _resolve(root, change.at, create=isinstance(change, SetKey)):
            _apply(change, node)


def _apply(change: Change, node: dict[str, Any]) -> None:
    if isinstance(change, SetKey):
        if not (change.keep and change.key in node):
            node[change.key] = change.value
    elif isinstance(change, RemoveKey):
        node.pop(change.key, None)
    elif isinstance(change, RemoveItem):
        node[change.key] = [
            e for i, e in enumerate(_entries(node, change.key)) if i != change.index
        ]
    elif isinstance(change, ReplaceNamed):
        kept = [e for e in _entries(node, change.key) if _name(e) != change.name]
        if change.item is not None:
            kept.append(dict(change.item))
        if change.item is not None or change.key in node:
            node[change.key] = kept
    elif isinstance(change, InsertAfter):
        kept = [e for e in _entries(node, change.key) if _name(e) not in change.replacing]
        names = [_name(e) for e in kept]
        position = names.index(change.after) + 1 if change.after in names else 0
        kept.insert(position, dict(change.item))
        node[change.key] = kept


def _resolve(root: dict[str, Any], path: Path, *, create: bool) -> list[dict[str, Any]]:
    nodes: list[Any] = [root]
    for position, segment in enumerate(path):
        # a mapping is made where a mapping is wanted: before a key, or at the path's end
        makes_mapping = create and (
            position + 1 == len(path) or isinstance(path[position + 1], str)
        )
        found: list[Any] = []
        for node in nodes:
            if isinstance(segment, str) and isinstance(node, dict):
                child = node.get(segment)
                if child is None and makes_mapping:
                    child = node[segment] = {}
                found.append(child)
            elif isinstance(segment, int) and isinstance(node, list):
                found.append(node[segment])
            elif isinstance(segment, ByName) and isinstance(node, list):
                found += [e for e in node if _name(e) == segment.name]
        nodes = found
    return [n for n in nodes if isinstance(n, dict)]


def _entries(node: Mapping[str, Any], key: str) -> list[Any]:
    value = node.get(key)
    return list(value) if isinstance(value, list) else []


def _name(entry: object) -> object:
    return entry.get("name") if isinstance(entry, dict) else None
