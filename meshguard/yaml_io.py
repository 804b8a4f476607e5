"""YAML in and out through libyaml when PyYAML has it (CSafeLoader/CSafeDumper), the pure
Python safe classes otherwise: ~8x faster on large manifests, same documents.

Only the *safe* loader is ever used: manifests and annotations are untrusted input. All of
meshguard's YAML goes through this module: nothing else imports PyYAML.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Protocol, TextIO, cast

import yaml
from yaml import YAMLError  # what load() raises, for callers to catch

__all__ = [
    "AliasError",
    "NotUtf8Error",
    "Part",
    "SafeDumper",
    "SafeLoader",
    "YAMLError",
    "dump",
    "dump_all",
    "dump_literal",
    "load",
    "load_all",
    "load_without_aliases",
    "stream",
]

#: libyaml's safe loader when PyYAML was built with it.
SafeLoader: Final[type[yaml.SafeLoader]] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: libyaml's safe dumper when PyYAML was built with it.
SafeDumper: Final[type[yaml.SafeDumper]] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str) -> object:
    """One YAML document (safe types only)."""
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 - a safe loader


class AliasError(YAMLError):
    """The text uses a YAML anchor or alias (``&name``, ``*name``, ``<<: *name``)."""

    def __init__(self, *, line: int, column: int) -> None:
        self.line = line
        self.column = column
        super().__init__(f"YAML anchor or alias at line {line}, column {column}")


def load_without_aliases(text: str) -> object:
    """One YAML document (safe types only) that uses no anchor nor alias, else
    :class:`AliasError`.

    An alias makes a small text stand for a large document (every ``*x`` is ``&x`` again):
    the size of the text no longer bounds the work of whoever reads the document. The
    events are scanned first (linear in the text, nothing built), then the document loaded.
    """
    for event in yaml.parse(text, Loader=SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
            raise AliasError(line=line, column=column)
    return load(text)


def load_all(text: str) -> Iterator[Any]:
    """Every document of a YAML stream (safe types only)."""
    return yaml.load_all(text, Loader=SafeLoader)


def dump_all(documents: Iterable[Any], stream: TextIO, *, allow_unicode: bool = False) -> None:
    """Write documents as a YAML stream, keys in their order, block style (non-ASCII text
    escaped unless ``allow_unicode``)."""
    yaml.dump_all(
        documents,
        stream,
        Dumper=SafeDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=allow_unicode,
    )


def dump(document: object, *, sort_keys: bool = False) -> str:
    """One document as YAML text, block style (keys in their order unless ``sort_keys``)."""
    text: str = yaml.dump(
        document, Dumper=SafeDumper, sort_keys=sort_keys, default_flow_style=False
    )
    return text


class _LiteralDumper(SafeDumper):  # type: ignore[valid-type,misc]
    """The safe dumper, with multi-line strings as literal blocks."""


def _literal(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _literal)


def dump_literal(document: object) -> str:
    """One document as YAML text, keys in their order, multi-line strings as literal blocks
    (as Istio's own overlays are written)."""
    text: str = yaml.dump(document, Dumper=_LiteralDumper, sort_keys=False)
    return text


# --- streaming -------------------------------------------------------------------------------

#: Bytes asked of the input at a time by the streaming reader.
CHUNK_BYTES: Final = 64 * 1024


class NotUtf8Error(ValueError):
    """The input is not UTF-8 text; names the first bad byte and its offset."""

    def __init__(self, byte: int, offset: int) -> None:
        super().__init__(f"not UTF-8 text (byte 0x{byte:02x} at offset {offset})")


@dataclass(frozen=True)
class Part:
    """One piece of a YAML stream read by :func:`stream`: a whole document (``item`` None),
    or one element of the ``items`` sequence of a document whose root is a mapping."""

    #: The document's index in the stream (empty documents count).
    document: int
    #: The index in ``items``; None for the document itself (its ``items`` then is ``[]``
    #: when they were given out one by one before it).
    item: int | None
    value: Any
    #: For a document (``item`` None): whether its ``items`` were given out before it.
    streamed_items: bool = False


class _Parser(Protocol):
    """What :func:`stream` uses of a PyYAML loader (its parser, resolver, constructor)."""

    def get_event(self) -> Any: ...  # noqa: ANN401 - PyYAML's events are untyped
    def peek_event(self) -> Any: ...  # noqa: ANN401
    def check_event(self, *choices: type[yaml.Event]) -> bool: ...
    def resolve(self, kind: type[yaml.Node], value: str | None, implicit: Any) -> str: ...  # noqa: ANN401
    def construct_document(self, node: yaml.Node) -> Any: ...  # noqa: ANN401
    def dispose(self) -> None: ...


def stream(source: BinaryIO) -> Iterator[Part]:
    """Every document of a YAML stream read a chunk at a time, the elements of a root
    mapping's ``items`` (``kind: List``, ``kubectl get -o yaml``) given out one by one as they
    are parsed: memory holds one element, not the whole input.

    Safe types only (the safe constructor, libyaml's parser when PyYAML has it). Raises
    :class:`YAMLError` for invalid YAML, :class:`NotUtf8Error` for bytes that are not UTF-8.
    """
    loader = cast(_Parser, SafeLoader(_Utf8Reader(source)))
    try:
        loader.get_event()  # StreamStart
        index = 0
        while not loader.check_event(yaml.StreamEndEvent):
            yield from _document(loader, index)
            index += 1
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    finally:
        loader.dispose()


def _document(loader: _Parser, index: int) -> Iterator[Part]:
    loader.get_event()  # DocumentStart
    anchors: dict[str, yaml.Node] = {}
    streamed = False
    start = loader.peek_event()
    if isinstance(start, yaml.MappingStartEvent) and start.anchor is None:
        loader.get_event()
        root: yaml.Node = yaml.MappingNode(
            _tag(loader, start, yaml.MappingNode, None), [], _mark(start.start_mark), None,
            flow_style=start.flow_style,
        )  # fmt: skip
        while not loader.check_event(yaml.MappingEndEvent):
            key = _node(loader, anchors)
            value: yaml.Node
            if _is_items(key) and _plain_sequence_next(loader):
                event = loader.get_event()
                position = 0
                while not loader.check_event(yaml.SequenceEndEvent):
                    item = _node(loader, anchors)
                    yield Part(index, position, loader.construct_document(item))
                    position += 1
                loader.get_event()
                value = yaml.SequenceNode(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, [],
                                          event.start_mark, None)  # fmt: skip
                streamed = True
            else:
                value = _node(loader, anchors)
            root.value.append((key, value))
        root.end_mark = loader.get_event().end_mark
    else:
        root = _node(loader, anchors)
    loader.get_event()  # DocumentEnd
    yield Part(index, None, loader.construct_document(root), streamed_items=streamed)


def _is_items(key: yaml.Node) -> bool:
    return (
        isinstance(key, yaml.ScalarNode)
        and key.tag == yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG
        and key.value == "items"
    )


def _plain_sequence_next(loader: _Parser) -> bool:
    """A sequence without an anchor or a tag of its own (an anchored one could be aliased)."""
    event = loader.peek_event()
    return (
        isinstance(event, yaml.SequenceStartEvent)
        and event.anchor is None
        and event.tag in (None, "!", yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG)
    )


def _tag(
    loader: _Parser,
    event: yaml.ScalarEvent | yaml.CollectionStartEvent,
    kind: type[yaml.Node],
    value: str | None,
) -> str:
    tag: str | None = event.tag
    if tag is None or tag == "!":
        return loader.resolve(kind, value, event.implicit)
    return tag


def _node(loader: _Parser, anchors: dict[str, yaml.Node]) -> yaml.Node:
    """One node and its children, from the parser's events (what PyYAML's composer does)."""
    event = loader.get_event()
    if isinstance(event, yaml.AliasEvent):
        if event.anchor not in anchors:
            raise yaml.composer.ComposerError(
                None, None, f"found undefined alias {event.anchor!r}", _mark(event.start_mark)
            )
        return anchors[event.anchor]
    node: yaml.Node
    if isinstance(event, yaml.ScalarEvent):
        node = yaml.ScalarNode(
            _tag(loader, event, yaml.ScalarNode, event.value), event.value,
            _mark(event.start_mark), _mark(event.end_mark), style=event.style,
        )  # fmt: skip
    elif isinstance(event, yaml.SequenceStartEvent):
        node = yaml.SequenceNode(
            _tag(loader, event, yaml.SequenceNode, None), [], _mark(event.start_mark), None,
            flow_style=event.flow_style,
        )  # fmt: skip
        _anchor(anchors, event, node)
        while not loader.check_event(yaml.SequenceEndEvent):
            node.value.append(_node(loader, anchors))
        node.end_mark = loader.get_event().end_mark
        return node
    else:  # MappingStartEvent
        node = yaml.MappingNode(
            _tag(loader, event, yaml.MappingNode, None), [], _mark(event.start_mark), None,
            flow_style=event.flow_style,
        )  # fmt: skip
        _anchor(anchors, event, node)
        while not loader.check_event(yaml.MappingEndEvent):
            key = _node(loader, anchors)
            node.value.append((key, _node(loader, anchors)))
        node.end_mark = loader.get_event().end_mark
        return node
    _anchor(anchors, event, node)
    return node


def _mark(mark: object) -> yaml.error.Mark | None:
    """libyaml's marks are not PyYAML's class, but serve the same messages."""
    return cast("yaml.error.Mark | None", mark)


def _anchor(anchors: dict[str, yaml.Node], event: yaml.NodeEvent, node: yaml.Node) -> None:
    if event.anchor is not None:
        anchors[event.anchor] = node


class _Utf8Reader:
    """A binary stream read as UTF-8 text a chunk at a time, strictly: the first bad byte
    ends the read with its offset (PyYAML would guess UTF-16 from a BOM, or say less)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._offset = 0  # bytes read so far

    def read(self, size: int = CHUNK_BYTES) -> str:
        data = self._source.read(max(size, 1))
        pending = len(self._decoder.getstate()[0])
        try:
            text: str = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            where = self._offset - pending + exc.start
            raise NotUtf8Error(exc.object[exc.start], where) from None
        self._offset += len(data)
        return text
