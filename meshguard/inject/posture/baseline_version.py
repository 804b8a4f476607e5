"""Which Pod Security Standards version the baseline floor follows: ``latest`` or ``v1.N``,
read the way Pod Security Admission reads ``pod-security.kubernetes.io/enforce-version``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from meshguard.errors import MalformedInputError

#: The newest Kubernetes minor version whose baseline this meshguard implements.
LATEST_MINOR: Final = 37
_VERSION = re.compile(r"v1\.(0|[1-9][0-9]*)")


class BadBaselineVersionError(MalformedInputError):
    """A baseline version that is neither ``latest`` nor ``v1.N``."""


@dataclass(frozen=True, kw_only=True)
class BaselineVersion:
    """A Kubernetes 1.x minor version; ``latest`` is the newest this meshguard knows."""

    minor: int
    latest: bool = False

    def at_least(self, minor: int) -> bool:
        """Whether the rules introduced in v1.``minor`` apply (a version newer than
        meshguard knows gets every rule it knows, as Pod Security Admission does)."""
        return self.latest or self.minor >= minor

    def __str__(self) -> str:
        return f"latest (v1.{LATEST_MINOR})" if self.latest else f"v1.{self.minor}"


LATEST: Final = BaselineVersion(minor=LATEST_MINOR, latest=True)


def parse_baseline_version(text: str) -> BaselineVersion:
    """``latest`` or ``v1.N`` (as Pod Security Admission's ``enforce-version``)."""
    value = text.strip()
    if value == "latest":
        return LATEST
    if not _VERSION.fullmatch(value):
        raise BadBaselineVersionError(
            f"baseline version {text!r}: expected 'latest' or 'v1.N' (e.g. v1.{LATEST_MINOR})"
        )
    return BaselineVersion(minor=int(value.removeprefix("v1.")))
