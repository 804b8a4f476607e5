"""Each change is made through its JSONPatch operations: the operations, applied with the
``jsonpatch`` library to the pod as it came, give exactly the pod the changes made — whatever
the pod (paths absent, lists empty, null mappings, mappings a YAML anchor shares) — and that
pod is what the changes mean (a plain model of them, made on a copy)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.inject.changes import (
    Append,
    ByName,
    Change,
    InsertAfter,
    Path,
    PostureFixes,
    RemoveItem,
    RemoveKey,
    ReplaceNamed,
    SetKey,
    apply_changes,
)
from meshguard.inject.posture import Check, Finding, Fix, Outcome, final_fixes

ABSENT = object()
NAMES = st.sampled_from(["a", "b", "istio-proxy", "m", "x/y"])
SCALARS = st.none() | st.booleans() | st.integers(0, 2) | st.sampled_from([1.0, "1", "s"])
ENTRY = st.fixed_dictionaries({"name": NAMES}, optional={"v": SCALARS}) | st.integers(0, 1)
LIST = st.just(ABSENT) | st.none() | st.lists(ENTRY, max_size=4)
MAPPING = st.just(ABSENT) | st.none() | st.dictionaries(st.sampled_from(["k", "a/b", "q"]), SCALARS)
CONTEXT = st.just(ABSENT) | st.fixed_dictionaries({}, optional={"runAsUser": st.integers(1, 3)})
CONTAINER = st.fixed_dictionaries(
    {"name": NAMES, "volumeMounts": LIST, "securityContext": CONTEXT, "env": MAPPING}
)
POD = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries({"annotations": MAPPING, "labels": MAPPING}),
        "spec": st.fixed_dictionaries(
            {
                "containers": st.lists(CONTAINER, max_size=3),
                "initContainers": st.just(ABSENT) | st.lists(CONTAINER, max_size=3),
                "volumes": LIST,
                "imagePullSecrets": LIST,
                "securityContext": CONTEXT,
            }
        ),
    }
)
PATHS: st.SearchStrategy[Path] = st.sampled_from(
    [
        ("metadata", "annotations"),
        ("metadata", "labels"),
        ("spec",),
        ("spec", "nodeSelector"),
        ("spec", "affinity", "podAffinity"),
        ("spec", "containers", ByName("istio-proxy")),
        ("spec", "initContainers", ByName("a")),
        ("spec", "containers", 0),
        ("spec", "containers", 0, "env"),
        ("spec", "missing", ByName("a"), "deeper"),
    ]
)
KEYS = st.sampled_from(["k", "meshguard.io/x", "a~b", "q"])
LIST_KEYS = st.sampled_from(["volumes", "volumeMounts", "initContainers", "missing", "env"])
ITEM = st.builds(lambda name, v: {"name": name, "v": v}, NAMES, SCALARS)
CHANGES = st.lists(
    st.one_of(
        st.builds(SetKey, at=PATHS, key=KEYS, value=SCALARS | ITEM, keep=st.booleans()),
        st.builds(RemoveKey, at=PATHS, key=KEYS | LIST_KEYS),
        st.builds(RemoveItem, at=PATHS, key=LIST_KEYS, index=st.integers(-1, 4)),
        st.builds(ReplaceNamed, at=PATHS, key=LIST_KEYS, name=NAMES, item=st.none() | ITEM),
        st.builds(
            InsertAfter,
            at=PATHS,
            key=LIST_KEYS,
            item=ITEM,
            after=st.none() | NAMES,
            replacing=st.frozensets(NAMES, max_size=2),
        ),
        st.builds(Append, at=PATHS, key=LIST_KEYS, items=st.tuples(ITEM) | st.tuples(ITEM, ITEM)),
    ),
    max_size=8,
)


def built(value: Any) -> Any:
    """The drawn pod without the keys drawn as absent."""
    if isinstance(value, dict):
        return {k: built(v) for k, v in value.items() if v is not ABSENT}
    if isinstance(value, list):
        return [built(v) for v in value]
    return value


def share(pod: dict[str, Any], outside: dict[str, Any], draw: st.DrawFn) -> None:
    """Alias parts of the pod as a YAML anchor does: within the pod, and with ``outside``
    (a Deployment's selector, say), which no change may reach."""
    labels = pod["metadata"].get("labels")
    if isinstance(labels, dict) and draw(st.booleans()):
        outside["selector"] = labels
    containers = pod["spec"]["containers"]
    if len(containers) >= 2 and draw(st.booleans()):
        for key in ("securityContext", "volumeMounts", "env"):
            if key in containers[0]:
                containers[1][key] = containers[0][key]
    if containers and draw(st.booleans()):  # one mapping at two places of the pod
        pod["spec"].setdefault("initContainers", []).append(containers[0])
    volumes = pod["spec"].get("volumes")
    if isinstance(volumes, list) and draw(st.booleans()):
        outside["volumes"] = volumes


def fixes(pod: dict[str, Any], draw: st.DrawFn) -> PostureFixes:
    """Posture fixes of the pod's containers (and of the pod), as a review decides them."""
    targets = [None, *(("containers", i) for i in range(len(pod["spec"]["containers"])))]
    chosen = draw(st.lists(st.sampled_from(targets), max_size=4))
    return PostureFixes(
        findings=tuple(
            Finding(
                Check.PRIVILEGED, "x", "securityContext.privileged", "p", "r", Outcome.FIXED,
                fix=Fix(target=target, security_context={"runAsUser": draw(st.integers(1, 3))}),
            )
            for target in chosen
        )
    )  # fmt: skip


def model(changes: list[Change], root: dict[str, Any]) -> None:
    """What the changes mean, made plainly on an unshared copy of the pod."""
    for change in changes:
        if isinstance(change, PostureFixes):
            for fix in final_fixes(change.findings):
                spec = root["spec"]
                owner = spec if fix.target is None else spec[fix.target[0]][fix.target[1]]
                owner["securityContext"] = dict(fix.security_context)
            continue
        for node in model_nodes(root, change.at, create=isinstance(change, SetKey)):
            model_change(change, node)


def model_nodes(root: dict[str, Any], path: Path, *, create: bool) -> list[dict[str, Any]]:
    nodes: list[Any] = [root]
    for position, segment in enumerate(path):
        rest_are_keys = all(isinstance(s, str) for s in path[position + 1 :])
        found: list[Any] = []
        for node in nodes:
            if isinstance(segment, str) and isinstance(node, dict):
                if node.get(segment) is None and create and rest_are_keys:
                    node[segment] = {}
                found.append(node.get(segment))
            elif isinstance(segment, int) and isinstance(node, list) and segment < len(node):
                found.append(node[segment])
            elif isinstance(segment, ByName) and isinstance(node, list):
                found += [e for e in node if isinstance(e, dict) and e.get("name") == segment.name]
        nodes = found
    return [n for n in nodes if isinstance(n, dict)]


def model_change(change: Change, node: dict[str, Any]) -> None:
    value = node.get(getattr(change, "key", ""))
    entries = list(value) if isinstance(value, list) else []
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if isinstance(change, SetKey):
        if not (change.keep and change.key in node):
            node[change.key] = copy.deepcopy(change.value)
    elif isinstance(change, RemoveKey):
        node.pop(change.key, None)
    elif isinstance(change, RemoveItem):
        node[change.key] = [e for i, e in enumerate(entries) if i != change.index]
    elif isinstance(change, ReplaceNamed):
        kept = [e for e, n in zip(entries, names, strict=True) if n != change.name]
        if change.item is not None:
            if change.name in names:  # in the first one's place
                kept.insert(names.index(change.name), dict(change.item))
            else:
                kept.append(dict(change.item))
        if change.item is not None or change.key in node:
            node[change.key] = kept
    elif isinstance(change, InsertAfter):
        kept = [e for e, n in zip(entries, names, strict=True) if n not in change.replacing]
        kept_names = [n for n in names if n not in change.replacing]
        at = kept_names.index(change.after) + 1 if change.after in kept_names else 0
        kept.insert(at, dict(change.item))
        node[change.key] = kept
    elif isinstance(change, Append):
        if isinstance(value, list):
            node[change.key] = [*value, *map(dict, change.items)]
        elif change.items or change.key in node:
            node[change.key] = [dict(item) for item in change.items]


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@settings(max_examples=600, deadline=None)
@given(drawn=POD, changes=CHANGES, data=st.data())
def test_the_operations_applied_by_jsonpatch_give_the_pod_the_changes_made(
    drawn: dict[str, Any], changes: list[Change], data: st.DataObject
) -> None:
    pod = built(drawn)
    outside: dict[str, Any] = {}
    share(pod, outside, data.draw)
    sent = json.loads(json.dumps(pod))  # what the API server sends: no aliasing
    outside_before = as_json(outside)
    plan: list[Change] = [fixes(pod, data.draw), *changes]
    operations = apply_changes(plan, metadata=pod["metadata"], spec=pod["spec"])
    patched = jsonpatch.apply_patch(sent, list(operations))
    assert as_json(patched) == as_json(pod)
    model(plan, sent)
    assert as_json(sent) == as_json(pod)
    assert as_json(outside) == outside_before  # nothing edited through an anchor
    assert all(op["path"].count("/") >= 2 for op in operations)  # never /metadata, /spec whole


def test_each_change_gives_the_small_operations_a_reviewer_expects() -> None:
    metadata: dict[str, Any] = {"annotations": None}
    spec: dict[str, Any] = {
        "initContainers": [{"name": "istio-init"}, {"name": "meshguard-init", "v": 0}],
        "containers": [{"name": "app"}],
        "volumes": [{"name": "v"}, {"name": "meshguard-ruleset", "v": 0}, {"name": "w"}],
    }
    operations = apply_changes(
        (
            SetKey(at=("metadata", "annotations"), key="k", value="v"),  # null: replaced
            SetKey(at=("metadata", "labels"), key="l", value="1"),  # absent: made holding it
            SetKey(at=("spec", "affinity", "podAffinity"), key="x", value=1),
            InsertAfter(
                at=("spec",), key="initContainers", item={"name": "meshguard-init", "v": 1},
                after="istio-init", replacing=frozenset({"meshguard-init"}),
            ),
            ReplaceNamed(at=("spec",), key="volumes", name="meshguard-ruleset",
                         item={"name": "meshguard-ruleset", "v": 1}),
            ReplaceNamed(at=("spec",), key="volumes", name="new", item={"name": "new"}),
            RemoveItem(at=("spec",), key="volumes", index=0),
            Append(at=("spec",), key="imagePullSecrets", items=({"name": "s"},)),
            RemoveKey(at=("metadata", "annotations"), key="k"),
        ),
        metadata=metadata,
        spec=spec,
    )  # fmt: skip
    assert list(operations) == [
        {"op": "replace", "path": "/metadata/annotations", "value": {"k": "v"}},
        {"op": "add", "path": "/metadata/labels", "value": {"l": "1"}},
        {"op": "add", "path": "/spec/affinity", "value": {"podAffinity": {"x": 1}}},
        {"op": "replace", "path": "/spec/initContainers/1",
         "value": {"name": "meshguard-init", "v": 1}},
        {"op": "replace", "path": "/spec/volumes/1",
         "value": {"name": "meshguard-ruleset", "v": 1}},
        {"op": "add", "path": "/spec/volumes/3", "value": {"name": "new"}},
        {"op": "remove", "path": "/spec/volumes/0"},
        {"op": "add", "path": "/spec/imagePullSecrets", "value": [{"name": "s"}]},
        {"op": "remove", "path": "/metadata/annotations/k"},
    ]  # fmt: skip


def test_a_change_that_leaves_its_place_as_it_is_gives_no_operation() -> None:
    metadata: dict[str, Any] = {"annotations": {"k": "v", "b": True}}
    spec: dict[str, Any] = {
        "initContainers": [{"name": "istio-init"}, {"name": "meshguard-init"}],
        "volumes": [{"name": "meshguard-ruleset"}],
    }
    before = copy.deepcopy((metadata, spec))
    assert apply_changes(
        (
            SetKey(at=("metadata", "annotations"), key="k", value="v"),
            SetKey(at=("metadata", "annotations"), key="k", value="w", keep=True),
            RemoveKey(at=("metadata", "labels"), key="absent"),
            InsertAfter(
                at=("spec",), key="initContainers", item={"name": "meshguard-init"},
                after="istio-init", replacing=frozenset({"meshguard-init"}),
            ),
            ReplaceNamed(at=("spec",), key="volumes", name="meshguard-ruleset",
                         item={"name": "meshguard-ruleset"}),
            ReplaceNamed(at=("spec",), key="absent", name="x"),
        ),
        metadata=metadata,
        spec=spec,
    ) == ()  # fmt: skip
    assert (metadata, spec) == before
    # equal as Python values, not as JSON: true is not 1
    (op,) = apply_changes(
        (SetKey(at=("metadata", "annotations"), key="b", value=1),), metadata=metadata, spec=spec
    )
    assert op == {"op": "replace", "path": "/metadata/annotations/b", "value": 1}


def test_a_misplaced_earlier_copy_is_removed_and_the_new_one_added_in_place() -> None:
    spec: dict[str, Any] = {
        "initContainers": [{"name": "meshguard-init"}, {"name": "istio-init"}, {"name": "x"}]
    }
    operations = apply_changes(
        (
            InsertAfter(
                at=("spec",), key="initContainers", item={"name": "meshguard-init"},
                after="istio-init", replacing=frozenset({"meshguard-init"}),
            ),
        ),
        metadata={},
        spec=spec,
    )  # fmt: skip
    assert list(operations) == [
        {"op": "remove", "path": "/spec/initContainers/0"},
        {"op": "add", "path": "/spec/initContainers/1", "value": {"name": "meshguard-init"}},
    ]
    assert [c["name"] for c in spec["initContainers"]] == ["istio-init", "meshguard-init", "x"]


FEW = st.sampled_from(["a", "b", "c"])
SHORT_LIST = st.lists(st.fixed_dictionaries({"name": FEW, "v": st.integers(0, 1)}), max_size=5)
LIST_CHANGE = st.one_of(
    st.builds(RemoveItem, at=st.just(("spec",)), key=st.just("l"), index=st.integers(-1, 5)),
    st.builds(
        ReplaceNamed,
        at=st.just(("spec",)),
        key=st.just("l"),
        name=FEW,
        item=st.none() | st.builds(lambda n: {"name": n, "v": 2}, FEW),
    ),
    st.builds(
        InsertAfter,
        at=st.just(("spec",)),
        key=st.just("l"),
        item=st.builds(lambda n: {"name": n, "v": 2}, FEW),
        after=st.none() | FEW,
        replacing=st.frozensets(FEW, max_size=2),
    ),
)


@settings(max_examples=1000, deadline=None)
@given(entries=SHORT_LIST, changes=st.lists(LIST_CHANGE, min_size=1, max_size=3))
def test_list_changes_give_the_list_they_mean_with_valid_indexes(
    entries: list[dict[str, Any]], changes: list[Change]
) -> None:
    """Removals, replacements and insertions in one list, several named alike: each index
    is the one valid at its moment."""
    spec: dict[str, Any] = {"l": entries}
    sent = copy.deepcopy({"metadata": {}, "spec": spec})
    operations = apply_changes(changes, metadata={}, spec=spec)
    assert jsonpatch.apply_patch(sent, list(operations))["spec"] == spec
    model(changes, sent)
    assert sent["spec"] == spec
