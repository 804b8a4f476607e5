"""meshguard.yaml_io.stream: the same documents as PyYAML's safe loader, a List item at a
time; UTF-8 strictly, with the offset of the first bad byte."""

from __future__ import annotations

import io
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard import yaml_io

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
documents = st.one_of(
    values,
    st.fixed_dictionaries({"kind": st.just("List"), "items": st.lists(values, max_size=5)}),
)


def rebuilt(text: bytes) -> list[Any]:
    """The documents again, from the parts ``stream`` gives out."""
    found: list[Any] = []
    items: list[Any] = []
    for part in yaml_io.stream(io.BytesIO(text)):
        if part.item is not None:
            assert part.item == len(items)
            items.append(part.value)
            continue
        if part.streamed_items:
            assert part.value["items"] == []
            part.value["items"] = items
        found.append(part.value)
        items = []
    return found


@settings(max_examples=150, deadline=None)
@given(st.lists(documents, min_size=1, max_size=3), st.booleans())
def test_stream_gives_the_safe_loaders_documents(docs: list[Any], flow: bool):
    text = yaml.safe_dump_all(docs, default_flow_style=flow).encode()
    assert rebuilt(text) == list(yaml.safe_load_all(text))


@pytest.mark.parametrize(
    "text",
    [
        b"base: &b {x: 1}\nitems:\n- *b\n- {<<: *b, y: 2}\nkind: List\n",
        b"items: !!seq [1, 2]\n",
        b"items: &all [1]\nagain: *all\n",
        b"--- !!map\nitems: [a]\n...\n---\n- 1\n",
        b"\xef\xbb\xbfitems: [1]\n",  # a UTF-8 BOM
        b"",
    ],
)
def test_anchors_tags_and_markers_read_as_the_safe_loader_reads_them(text: bytes):
    assert rebuilt(text) == list(yaml.safe_load_all(text))


def test_an_item_of_a_huge_list_is_given_out_before_the_list_ends():
    """The input stops (raises) after two items: the first was given out already."""

    class Chunks(io.RawIOBase):
        def __init__(self) -> None:
            self.chunks = [b"items:\n", b"- {kind: Pod, n: 1}\n", b"- {kind: Pod, n: 2}\n"]

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            if not self.chunks:
                raise OSError("the rest never comes")
            return self.chunks.pop(0)

    received = []
    with pytest.raises(OSError, match="the rest never comes"):
        for part in yaml_io.stream(Chunks()):  # type: ignore[arg-type]
            received.append(part.value)
    assert received[0] == {"kind": "Pod", "n": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"\xff\xfe{}", "not UTF-8 text (byte 0xff at offset 0)"),
        (b"a: b\nc: \xe9x", "not UTF-8 text (byte 0xe9 at offset 8)"),
        (b"a: \xe2\x82", "not UTF-8 text (byte 0xe2 at offset 3)"),  # truncated at the end
    ],
)
def test_bytes_that_are_not_utf8_are_named(text: bytes, message: str):
    with pytest.raises(yaml_io.NotUtf8Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(yaml_io.stream(io.BytesIO(text)))
