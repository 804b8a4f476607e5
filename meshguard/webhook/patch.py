"""A JSONPatch between two pods, by comparing them.

The webhook no longer diffs: its patch is the operations the admission's changes were made
with (:mod:`meshguard.inject.changes`). This stays for the admission benchmark
(``benchmarks/admission/inprocess.py``), which measures it against ``jsonpatch.make_patch``.

``jsonpatch.make_patch`` on the whole pod canonicalises every list it meets to compare
them, which was the largest single cost of an admission (about 1.2 ms of 3 for a
10-container pod). Most of a pod is unchanged, and Python's ``==`` tells that at C speed:
this walks the mappings and lists, skips equal subtrees, and emits the small operations
a reviewer expects (``add /spec/initContainers/1``); lists changed in a way it does not
recognise go to jsonpatch's own list diff. Applying the result to ``before`` gives
``after`` exactly (tested with jsonpatch on random documents).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import jsonpatch

Operation = dict[str, Any]


def pod_patch(before: Mapping[str, object], after: Mapping[str, object]) -> list[Operation]:
    """JSONPatch operations that turn ``before`` into ``after``."""
    return _diff(before, after, "")


def _diff(before: object, after: object, path: str) -> list[Operation]:
    if _same(before, after):
        return []
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        return _diff_mappings(before, after, path)
    if isinstance(before, list) and isinstance(after, list):
        return _diff_lists(before, after, path)
    return [{"op": "replace", "path": path, "value": copy.deepcopy(after)}]


def _diff_mappings(
    before: Mapping[str, Any], after: Mapping[str, Any], path: str
) -> list[Operation]:
    ops: list[Operation] = []
    for key in before:
        if key not in after:
            ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
    for key, value in after.items():
        child = f"{path}/{_escape(key)}"
        if key in before:
            ops += _diff(before[key], value, child)
        else:
            ops.append({"op": "add", "path": child, "value": copy.deepcopy(value)})
    return ops


def _diff_lists(before: list[object], after: list[object], path: str) -> list[Operation]:
    """Items changed in place, or items inserted or removed in one run (meshguard-init
    after istio-init, a volume appended); anything else is jsonpatch's general list diff."""
    if len(before) == len(after):
        return [
            op
            for index, (old, new) in enumerate(zip(before, after, strict=True))
            for op in _diff(old, new, f"{path}/{index}")
        ]
    shorter = min(len(before), len(after))
    head = 0
    while head < shorter and _same(before[head], after[head]):
        head += 1
    tail = 0
    while tail < shorter - head and _same(before[-1 - tail], after[-1 - tail]):
        tail += 1
    if head + tail == len(before):
        inserted = after[head : len(after) - tail]
        return [
            {"op": "add", "path": f"{path}/{head + offset}", "value": copy.deepcopy(value)}
            for offset, value in enumerate(inserted)
        ]
    if head + tail == len(after):
        return [{"op": "remove", "path": f"{path}/{head}"} for _ in range(len(before) - shorter)]
    return [_under(path, op) for op in jsonpatch.make_patch(before, after).patch]


def _same(before: object, after: object) -> bool:
    """Equal as JSON. ``==`` alone takes ``true`` for ``1`` and ``1`` for ``1.0``; the
    serialisations tell them apart, and are only compared when ``==`` already holds."""
    return bool(before == after) and json.dumps(before) == json.dumps(after)


def _under(prefix: str, op: Operation) -> Operation:
    """A list diff's operation, re-rooted at the list's own path."""
    moved = dict(op, path=prefix + op["path"])
    if "from" in moved:
        moved["from"] = prefix + moved["from"]
    return moved


def _escape(key: str) -> str:
    """A mapping key as a JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
