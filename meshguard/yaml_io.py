"""YAML in and out through libyaml when PyYAML has it (CSafeLoader/CSafeDumper), the pure
Python safe classes otherwise: ~8x faster on large manifests, same documents.

Only the *safe* loader is ever used: manifests and annotations are untrusted input. All of
meshguard's YAML goes through this module: nothing else imports PyYAML.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final, TextIO

import yaml
from yaml import YAMLError  # what load() raises, for callers to catch

__all__ = [
    "AliasError",
    "SafeDumper",
    "SafeLoader",
    "YAMLError",
    "dump",
    "dump_all",
    "dump_literal",
    "load",
    "load_all",
    "load_without_aliases",
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


def dump_all(documents: Iterable[Any], stream: TextIO) -> None:
    """Write documents as a YAML stream, keys in their order, block style."""
    yaml.dump_all(documents, stream, Dumper=SafeDumper, sort_keys=False, default_flow_style=False)


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
