"""The admission JSONPatch: applied to the pod as sent, it gives meshguard's pod exactly."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.webhook.patch import pod_patch

KEYS = st.sampled_from(["a", "b", "c", "x/y", "m~n", "", "0"])
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([1.0, 0.5, "1", "s"])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)
DOCUMENTS = st.dictionaries(KEYS, JSON, max_size=5)


def applied(before: dict[str, Any], ops: list[dict[str, Any]]) -> Any:
    return jsonpatch.JsonPatch(ops).apply(copy.deepcopy(before))


@settings(max_examples=400, deadline=None)
@given(before=DOCUMENTS, after=DOCUMENTS)
def test_the_patch_turns_any_document_into_any_other(before, after):
    result = applied(before, pod_patch(before, after))
    assert json.dumps(result, sort_keys=True) == json.dumps(after, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(JSON, max_size=6),
    run=st.lists(JSON, min_size=1, max_size=3),
    data=st.data(),
)
def test_items_inserted_or_removed_in_one_run_are_added_or_removed_in_place(items, run, data):
    index = data.draw(st.integers(0, len(items)))
    longer = {"spec": {"l": items[:index] + run + items[index:]}}
    shorter = {"spec": {"l": items}}
    for before, after in ((shorter, longer), (longer, shorter)):
        ops = pod_patch(before, after)
        assert len(ops) <= len(run)
        result = applied(before, ops)
        assert json.dumps(result, sort_keys=True) == json.dumps(after, sort_keys=True)


def test_equal_subtrees_give_no_operation_and_lists_give_small_ones():
    before = {"metadata": {"annotations": {"a": "1"}}, "spec": {"initContainers": [{"n": 1}]}}
    after = copy.deepcopy(before)
    after["metadata"]["annotations"]["meshguard.io/status"] = "{}"
    after["spec"]["initContainers"].append({"n": 2})
    assert pod_patch(before, after) == [
        {"op": "add", "path": "/metadata/annotations/meshguard.io~1status", "value": "{}"},
        {"op": "add", "path": "/spec/initContainers/1", "value": {"n": 2}},
    ]
    assert pod_patch(before, copy.deepcopy(before)) == []


def test_a_boolean_that_became_an_equal_number_is_patched():
    assert pod_patch({"a": {"b": True}}, {"a": {"b": 1}}) == [
        {"op": "replace", "path": "/a/b", "value": 1}
    ]
