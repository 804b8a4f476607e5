"""The admitted L7 policy: what the webhook admitted, recorded so that it is what is enforced.

The kernel rules of a pod are fixed when meshguard-init installs them; its L7 decisions are
made by the authz server for as long as the pod runs. So that an edit of the pod's
``meshguard.io/policy`` or ``meshguard.io/mode`` after admission (``kubectl annotate
--overwrite``) opens nothing, the webhook records the policy and mode it admitted, normalized
and with their digest, in its status annotation (``meshguard.io/status``, key ``admitted``).
The authz server builds a pod's policy from this record only, once its digest verifies; the
live annotations are only compared with it, to report that they were changed. A record that
does not verify is refused (every request to the pod is denied). The chart's
ValidatingAdmissionPolicy refuses such edits in the first place; to change a running pod's
policy, delete the pod.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from meshguard import annotation_keys
from meshguard.errors import MalformedInputError, MeshguardError
from meshguard.policy import Mode, Policy, parse_mode, parse_policy, with_istio_patterns
from meshguard.status import PodStatus

#: The key of the record in ``meshguard.io/status``.
STATUS_KEY: Final = "admitted"
#: How the record is named in messages.
RECORD: Final = f"{annotation_keys.STATUS} {STATUS_KEY!r}"
FORMAT_VERSION: Final = 1


class TamperedError(MalformedInputError):
    """The admitted record does not verify (altered, truncated, of another version): whoever
    edited the pod's meshguard annotations after admission is at fault."""


@dataclass(frozen=True, kw_only=True)
class Admitted:
    """The policy and mode the webhook admitted for one pod."""

    policy: Policy
    mode: Mode
    #: The L7 engine chosen at admission and, for the native one, the digest of the pod's
    #: RBAC document (``meshguard.io/l7-rbac``): covered by the record's digest (and
    #: whatever signs the record), so the document cannot be swapped unnoticed.
    l7_engine: str | None = None
    rbac_digest: str | None = None

    @functools.cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` over the normalized content: same policy, same digest."""
        content = json.dumps(self._content(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(content.encode()).hexdigest()

    def to_document(self) -> dict[str, Any]:
        """The record as it goes in the status: content and digest."""
        return {**self._content(), "digest": self.digest}

    def _content(self) -> dict[str, Any]:
        content: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "mode": self.mode.value,
            "policy": self.policy.model_dump(mode="json", by_alias=True),
        }
        if self.l7_engine is not None:  # absent from records of before the engines
            content["l7"] = {"engine": self.l7_engine, "rbac": self.rbac_digest}
        return content

    @classmethod
    def from_document(cls, document: object) -> Admitted:
        """Read a record back; anything off (edited, truncated, wrong version) is refused."""
        if not isinstance(document, dict):
            raise TamperedError(f"{RECORD}: not a JSON object")
        if document.get("version") != FORMAT_VERSION:
            raise TamperedError(
                f"{RECORD}: version {document.get('version')!r},"
                f" this meshguard reads {FORMAT_VERSION}"
            )
        try:
            l7 = _l7_fields(document.get("l7"))
            admitted = cls(
                policy=Policy.model_validate(document["policy"]),
                mode=Mode(document["mode"]),
                l7_engine=l7.get("engine"),
                rbac_digest=l7.get("rbac"),
            )
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise TamperedError(f"{RECORD}: unexpected content ({exc})") from None
        if admitted.digest != document.get("digest"):
            raise TamperedError(
                f"{RECORD}: digest mismatch (the record says {document.get('digest')!r},"
                f" its content hashes to {admitted.digest}): it was edited after admission"
            )
        return admitted


def _l7_fields(value: object) -> dict[str, str | None]:
    """The record's ``l7`` entry (engine, RBAC document digest), absent in records of before
    the engines; anything but a mapping of strings (or null) is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, str | None) for v in (value.get("engine"), value.get("rbac"))
    ):
        raise TamperedError(f"{RECORD}: l7 is not an engine and a digest")
    return {"engine": value.get("engine"), "rbac": value.get("rbac")}


def read_admitted(status: PodStatus) -> Admitted | None:
    """The admitted record of a pod's status; None when the status has none (a pod admitted
    before records existed); :class:`TamperedError` when it does not verify."""
    if status.admitted is None:
        return None
    try:
        canonical = json.dumps(status.admitted, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        raise TamperedError(f"{RECORD}: not JSON data") from None
    return _verified(canonical)


@functools.lru_cache(maxsize=1024)
def _verified(canonical: str) -> Admitted:
    """One verified record per distinct content: the pods of a Deployment share one policy
    object, and a relist of thousands of pods verifies each distinct record once (a record
    that does not verify raises, and is not cached)."""
    return Admitted.from_document(json.loads(canonical))


def drift(admitted: Admitted, annotations: Mapping[str, str]) -> tuple[str, ...]:
    """How the live ``policy`` and ``mode`` annotations differ from what was admitted."""
    found: list[str] = []
    live_policy = annotations.get(annotation_keys.POLICY)
    # A record admitted before the Istio patterns were default rules lacks them: not a drift
    if _live_policy(live_policy) not in (admitted.policy, with_istio_patterns(admitted.policy)):
        found.append(f"{annotation_keys.POLICY} differs from the policy admitted")
    live_mode = annotations.get(annotation_keys.MODE)
    try:
        mode_changed = parse_mode(live_mode) is not admitted.mode
    except MeshguardError:
        mode_changed = True
    if mode_changed:
        found.append(
            f"{annotation_keys.MODE} is {live_mode!r}, admitted {admitted.mode.value!r}"
            if live_mode is not None
            else f"{annotation_keys.MODE} was removed, admitted {admitted.mode.value!r}"
        )
    return tuple(found)


@functools.lru_cache(maxsize=1024)
def _live_policy(text: str | None) -> Policy | None:
    """A live ``policy`` annotation parsed (the models are frozen: shared safely); None if it
    does not parse (which differs from any admitted policy)."""
    try:
        return parse_policy(text)
    except MeshguardError:
        return None
