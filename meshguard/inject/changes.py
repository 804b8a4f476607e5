"""The changes an admission makes to a pod, as data, and the one place they are made.

The transform decides every change first (posture fixes, the stale init step's removal,
meshguard's annotations and labels, the L7 engine's document and mount, meshguard's init
step, its volume and pull secrets), then :class:`PodEdit` makes them, in order, on the pod's
metadata and spec. A change addresses the pod by a path from its root: ``"metadata"`` or
``"spec"``, then mapping keys, list indices, or :class:`ByName` (every entry of a list with
that name). Setting a key creates the missing or null mappings on its way when the rest of
its path is keys (a null one replaced); any other change finds nothing to change there, as
in a missing list.

Each change is made through its JSONPatch operations (RFC 6902): decided on the pod as the
changes before it left it, so their indexes hold at that moment, then applied by the one
applier here. The operations of all the changes, in order, are the webhook's patch: what
the patch does and what ``meshguard inject`` prints cannot disagree. A change that would
leave its place as it is gives no operation (an admission of a pod meshguard already
admitted gives none).

The caller's ``metadata`` and ``spec`` mappings are edited in place; whatever is below them
is copied before it is written (copy on write), so a mapping or list a manifest shares
between places (YAML anchors: a template's labels and its Deployment's selector) is never
edited through another place, and the webhook edits no part of the pod the API server sent.

A change's ``note`` is what meshguard records of it in ``meshguard.io/status`` (``changes``):
what it did to the workload's own containers. meshguard's own marks carry none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from meshguard.errors import MeshguardFailure
from meshguard.inject.posture import Finding, final_fixes


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
    takes the first one's place, or is appended if there was none; a list that is not there
    is created only to hold ``item``."""

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
class Append:
    """``items`` go at the end of the list at ``at`` / ``key`` (made if it is not there)."""

    at: Path
    key: str
    items: tuple[Mapping[str, Any], ...]
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class PostureFixes:
    """The fixes of a posture review (:class:`~meshguard.inject.posture.Fix`), in order."""

    findings: tuple[Finding, ...]

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.findings if f.fixed)


Change = SetKey | RemoveKey | RemoveItem | ReplaceNamed | InsertAfter | Append | PostureFixes


def notes(changes: Iterable[Change]) -> tuple[str, ...]:
    """What the changes record in ``meshguard.io/status``, in order."""
    out: list[str] = []
    for change in changes:
        if isinstance(change, PostureFixes):
            out += change.notes
        elif change.note:
            out.append(change.note)
    return tuple(out)


#: A place in the pod: mapping keys and list indexes from its root.
Pointer = tuple[str | int, ...]
Operation = dict[str, Any]


@dataclass(frozen=True)
class Op:
    """One JSONPatch operation, its path kept as segments (the applier's, and the pointer's
    text is written from them)."""

    op: Literal["add", "replace", "remove"]
    path: Pointer
    value: object = None

    def to_json(self) -> Operation:
        pointer = "".join("/" + _escape(str(segment)) for segment in self.path)
        if self.op == "remove":
            return {"op": "remove", "path": pointer}
        return {"op": self.op, "path": pointer, "value": self.value}


_Node = dict[str, Any] | list[Any]


class PatchMismatchError(MeshguardFailure):
    """An operation does not fit the pod it was decided for: a bug in meshguard (the
    webhook refuses the pod as its own failure, fail closed)."""


class PodEdit:
    """The pod being edited: changes made one after the other, through their operations.

    ``operations`` is the JSONPatch (RFC 6902) that turns the pod as given into the pod as
    edited.
    """

    def __init__(self, *, metadata: dict[str, Any], spec: dict[str, Any]) -> None:
        self._root: dict[str, Any] = {"metadata": metadata, "spec": spec}
        # what this edit may write in place: the caller's two mappings, and the copies it made
        self._owned: dict[int, object] = {id(metadata): metadata, id(spec): spec}
        self._ops: list[Op] = []

    @property
    def operations(self) -> tuple[Operation, ...]:
        return tuple(op.to_json() for op in self._ops)

    def make(self, changes: Iterable[Change]) -> None:
        """Make ``changes`` in order, each decided on the pod as the ones before left it."""
        for change in changes:
            for op in _operations(change, self._root):
                self._apply(op)
                self._ops.append(op)

    def _apply(self, op: Op) -> None:
        *parents, last = op.path
        node: _Node = self._root
        for segment in parents:
            node = self._writable(node, segment)
        if isinstance(node, dict) and isinstance(last, str):
            if op.op != "add" and last not in node:
                raise PatchMismatchError(f"{op.op} {op.path}: no such key")
            if op.op == "remove":
                del node[last]
            else:
                node[last] = _json_copy(op.value)
        elif isinstance(node, list) and isinstance(last, int):
            size = len(node) + (op.op == "add")
            if not 0 <= last < size:
                raise PatchMismatchError(f"{op.op} {op.path}: index out of range")
            if op.op == "remove":
                del node[last]
            elif op.op == "add":
                node.insert(last, _json_copy(op.value))
            else:
                node[last] = _json_copy(op.value)
        else:
            raise PatchMismatchError(f"{op.op} {op.path}: no such place")

    def _writable(self, node: _Node, segment: str | int) -> _Node:
        """``node[segment]``, copied into ``node`` first unless this edit made it."""
        child: object
        # two branches, as each narrows its own types
        if isinstance(node, dict) and isinstance(segment, str) and segment in node:  # noqa: SIM114
            child = node[segment]
        elif isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node):
            child = node[segment]
        else:
            raise PatchMismatchError(f"no {segment!r} on the way")
        if isinstance(child, dict | list) and id(child) in self._owned:
            return child
        copied: _Node
        if isinstance(child, dict):
            copied = dict(child)
        elif isinstance(child, list):
            copied = list(child)
        else:
            raise PatchMismatchError(f"{segment!r} is neither a mapping nor a list")
        if isinstance(node, dict):
            node[str(segment)] = copied
        else:
            node[int(segment)] = copied
        self._owned[id(copied)] = copied
        return copied


def apply_changes(
    changes: Sequence[Change], *, metadata: dict[str, Any], spec: dict[str, Any]
) -> tuple[Operation, ...]:
    """Make ``changes`` on the pod, in order; the JSONPatch operations that made them."""
    edit = PodEdit(metadata=metadata, spec=spec)
    edit.make(changes)
    return edit.operations


def _operations(change: Change, root: dict[str, Any]) -> list[Op]:
    """What makes ``change`` on the pod as it is now (each index valid once the operations
    before it are made)."""
    if isinstance(change, PostureFixes):
        return _fix_operations(change, root)
    if isinstance(change, SetKey):
        return _set_operations(change, root)
    ops: list[Op] = []
    for where, node in _resolve(root, change.at):
        if isinstance(node, dict):
            ops += _node_operations(change, where, node)
    return ops


def _set_operations(change: SetKey, root: dict[str, Any]) -> list[Op]:
    ops: list[Op] = []
    for where, node in _resolve(root, change.at):
        if isinstance(node, _Absent):
            # the rest of the path is keys: one mapping made for it, holding the value
            value: object = {change.key: change.value}
            for segment in reversed(node.rest):
                value = {segment: value}
            ops.append(Op("replace" if node.null else "add", where, _json_copy(value)))
        elif isinstance(node, dict):
            if change.key in node:
                if not change.keep and not _same(node[change.key], change.value):
                    ops.append(Op("replace", (*where, change.key), _json_copy(change.value)))
            else:
                ops.append(Op("add", (*where, change.key), _json_copy(change.value)))
    return ops


def _node_operations(
    change: RemoveKey | RemoveItem | ReplaceNamed | InsertAfter | Append,
    where: Pointer,
    node: dict[str, Any],
) -> list[Op]:
    if isinstance(change, RemoveKey):
        return [Op("remove", (*where, change.key))] if change.key in node else []
    place = (*where, change.key)
    entries = node.get(change.key)
    if not isinstance(entries, list):
        return _list_made(change, place, present=change.key in node)
    if isinstance(change, RemoveItem):
        in_range = 0 <= change.index < len(entries)
        return [Op("remove", (*place, change.index))] if in_range else []
    if isinstance(change, Append):
        return [
            Op("add", (*place, len(entries) + offset), _json_copy(item))
            for offset, item in enumerate(change.items)
        ]
    if isinstance(change, ReplaceNamed):
        return _replace_named(change, place, entries)
    return _insert_after(change, place, entries)


def _list_made(
    change: RemoveItem | ReplaceNamed | InsertAfter | Append, place: Pointer, *, present: bool
) -> list[Op]:
    """The list a change leaves where there was no list: a change that adds nothing makes
    one only over a value that is not a list, and a removal always does."""
    made: list[Any]
    if isinstance(change, RemoveItem):
        made = []
    elif isinstance(change, ReplaceNamed):
        made = [] if change.item is None else [_json_copy(change.item)]
    elif isinstance(change, InsertAfter):
        made = [_json_copy(change.item)]
    else:
        made = cast(list[Any], _json_copy(change.items))
    if present:
        return [Op("replace", place, made)]
    return [Op("add", place, made)] if made or isinstance(change, RemoveItem) else []


def _replace_named(change: ReplaceNamed, place: Pointer, entries: list[Any]) -> list[Op]:
    matches = [i for i, e in enumerate(entries) if _name(e) == change.name]
    if change.item is None:
        return [Op("remove", (*place, i)) for i in reversed(matches)]
    if not matches:
        return [Op("add", (*place, len(entries)), _json_copy(change.item))]
    first, *others = matches
    ops = [Op("remove", (*place, i)) for i in reversed(others)]
    if not _same(entries[first], change.item):
        ops.append(Op("replace", (*place, first), _json_copy(change.item)))
    return ops


def _insert_after(change: InsertAfter, place: Pointer, entries: list[Any]) -> list[Op]:
    """The replaced entries go and the item goes in after ``after``: where a replaced entry
    sat exactly there (an earlier pass's), it is replaced in place."""
    replaced = [i for i, e in enumerate(entries) if _name(e) in change.replacing]
    kept_names = [_name(e) for e in entries if _name(e) not in change.replacing]
    position = kept_names.index(change.after) + 1 if change.after in kept_names else 0
    # a replaced entry's place among the kept ones: how many kept entries come before it
    in_place = next((i for i in replaced if i - replaced.index(i) == position), None)
    ops = [Op("remove", (*place, i)) for i in reversed(replaced) if i != in_place]
    if in_place is None:
        ops.append(Op("add", (*place, position), _json_copy(change.item)))
    elif not _same(entries[in_place], change.item):
        ops.append(Op("replace", (*place, position), _json_copy(change.item)))
    return ops


def _fix_operations(change: PostureFixes, root: dict[str, Any]) -> list[Op]:
    """Each fixed target's ``securityContext`` written whole, as its last fix leaves it."""
    ops: list[Op] = []
    for fix in final_fixes(change.findings):
        owner: Pointer = ("spec",) if fix.target is None else ("spec", *fix.target)
        node: Any = root
        for segment in owner:
            node = node[segment]
        place = (*owner, "securityContext")
        context = dict(fix.security_context)
        if "securityContext" not in node:
            ops.append(Op("add", place, _json_copy(context)))
        elif not _same(node["securityContext"], context):
            ops.append(Op("replace", place, _json_copy(context)))
    return ops


@dataclass(frozen=True)
class _Absent:
    """No mapping (``null`` if ``null``) where a key of the path wants one; ``rest``: the
    path's keys after it."""

    null: bool
    rest: tuple[str, ...]


def _resolve(root: dict[str, Any], path: Path) -> list[tuple[Pointer, Any]]:
    """Every place ``path`` reaches, and what is there; a missing or null mapping where the
    rest of the path is keys is an :class:`_Absent` (setting a key makes it)."""
    found: list[tuple[Pointer, Any]] = [((), root)]
    for position, segment in enumerate(path):
        rest = path[position + 1 :]
        reached: list[tuple[Pointer, Any]] = []
        for where, node in found:
            if isinstance(node, _Absent):
                reached.append((where, node))  # the rest of its path is made with it
            elif isinstance(segment, str) and isinstance(node, dict):
                child = node.get(segment)
                if child is None and all(isinstance(s, str) for s in rest):
                    keys = tuple(str(s) for s in rest)
                    reached.append(((*where, segment), _Absent(segment in node, keys)))
                else:
                    reached.append(((*where, segment), child))
            elif isinstance(segment, int) and isinstance(node, list):
                if 0 <= segment < len(node):
                    reached.append(((*where, segment), node[segment]))
            elif isinstance(segment, ByName) and isinstance(node, list):
                reached += [
                    ((*where, i), e) for i, e in enumerate(node) if _name(e) == segment.name
                ]
        found = reached
    return found


def _same(before: object, after: object) -> bool:
    """Equal as JSON. ``==`` alone takes ``true`` for ``1`` and ``1`` for ``1.0``; the
    serialisations tell them apart, and are only compared when ``==`` already holds."""
    if type(before) is str and type(after) is str:
        return before == after
    if before != after:
        return False
    return json.dumps(_json_copy(before)) == json.dumps(_json_copy(after))


def _json_copy(value: object) -> object:
    """A fresh copy of a JSON value (mappings as dicts, sequences as lists)."""
    if isinstance(value, Mapping):
        return {str(k): _json_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_copy(v) for v in value]
    return value


def _name(entry: object) -> object:
    return entry.get("name") if isinstance(entry, dict) else None


def _escape(key: str) -> str:
    """A mapping key as a JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
