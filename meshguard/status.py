"""The ``meshguard.io/status`` annotation: one model, one writer, one reader.

The webhook (and ``meshguard inject``) writes it once per admission: the meshguard version,
the digest of the ruleset it compiled, the mode, the proxy's identity, the workload
containers' uids, the loopback listener and the source address of every container whose
flows it redirects there, the admitted policy record (``admitted``, verified by
:mod:`meshguard.admitted`) and what posture fixes changed (``changes``). The authz server,
``meshguard describe``, the CNI plugin and the demo read it back through :func:`read_status`.

Every field but the writer's own is optional on reading: a status written by hand or by an
older meshguard still reads, and keys a newer one adds are ignored. A status that is not a
JSON object of this shape is a :class:`MalformedStatusError`: whoever edited the annotation
is at fault.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshguard import annotation_keys
from meshguard.errors import MalformedInputError


class MalformedStatusError(MalformedInputError):
    """``meshguard.io/status`` is not JSON, or not the shape meshguard writes."""


class ProxyStatus(BaseModel):
    """The proxy's uid and gid, as the rules exempt them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    uid: int
    gid: int


class ListenerStatus(BaseModel):
    """The loopback listener's port and, per container, its redirected flows' sources."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    port: int | None = None
    #: container -> [IPv4 address, IPv6 address] its L7-covered flows come from.
    sources: dict[str, tuple[str, ...]] = Field(default_factory=dict)


class PodStatus(BaseModel):
    """What meshguard installed in a pod, as ``meshguard.io/status`` records it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: str | None = None
    #: The digest of the ruleset installed (``sha256:...``), as in ``meshguard.io/ruleset``.
    ruleset: str | None = None
    mode: str | None = None
    proxy: ProxyStatus | None = None
    containers: dict[str, int] = Field(default_factory=dict)
    listener: ListenerStatus = Field(default_factory=ListenerStatus)
    #: The admitted policy record, any JSON value: :mod:`meshguard.admitted` verifies it.
    admitted: Any = None
    #: What the posture fixes changed at admission, kept across reinvocations.
    changes: tuple[str, ...] = ()
    #: The posture findings reported and left as they were (posture action ``report``,
    #: audit mode's default): what enforcing would refuse or fix.
    findings: tuple[str, ...] = ()

    def source_containers(self) -> dict[str, str]:
        """Source address -> the container whose redirected flows come from it."""
        return {
            address: container
            for container, addresses in self.listener.sources.items()
            for address in addresses
        }

    def to_annotation(self) -> str:
        """The annotation's value: compact JSON, keys sorted; ``admitted``, ``changes`` and
        ``findings`` only when there are some."""
        document = self.model_dump(mode="json", exclude_none=True)
        if not self.changes:
            del document["changes"]
        if not self.findings:
            del document["findings"]
        return json.dumps(document, sort_keys=True, separators=(",", ":"))


def read_status(text: str | None) -> PodStatus | None:
    """The status in a pod's annotation value; None when there is none (not injected);
    :class:`MalformedStatusError` when it is not JSON or not of this shape."""
    if text is None:
        return None
    try:
        return PodStatus.model_validate_json(text)
    except ValidationError as exc:
        raise MalformedStatusError(f"{annotation_keys.STATUS}: {_reason(exc)}") from None


def _reason(exc: ValidationError) -> str:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return f"not JSON ({error['msg']})"
    if error["type"] == "model_type":
        return "not a JSON object"
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}"
