"""Argument types the command line's parsers share (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import re

#: A Kubernetes namespace's name: a DNS-1123 label.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return number


def namespace_name(text: str) -> str:
    """A namespace's name (a DNS-1123 label: lowercase letters, digits, '-', at most 63)."""
    if not _NAMESPACE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a namespace name (a DNS-1123 label: lowercase letters, digits"
            " and '-', starting and ending with a letter or digit, at most 63 characters)"
        )
    return text
