"""AdmissionReview in, AdmissionReview out: the webhook's decision, without any I/O.

The request body is checked strictly (a malformed request is the caller's fault: HTTP 400
with the reason); a well-formed review of a pod is answered with the same ``uid``, and
either the JSONPatch of the shared injection transform (the operations its changes were
made with: :mod:`meshguard.inject.changes`) plus one warning per fix, or ``allowed: false``
with a message that names the container, the field and the fix. Ephemeral containers added
to a running pod (``kubectl debug``: an UPDATE of the ``ephemeralcontainers`` subresource)
get the same posture checks; they are never patched, a finding refuses them. A failure
inside meshguard is answered ``allowed: false`` too (fail closed), with a message that says
it is meshguard's fault. The wire formats are typed at this boundary:
:class:`AdmissionRequest` in, :class:`AdmissionReviewAnswer` out.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Required, TypedDict, cast

from meshguard import annotation_keys
from meshguard.errors import MalformedInputError, MeshguardError, RefusedError
from meshguard.inject.fixed import is_admitted, refused_changes
from meshguard.inject.transform import (
    InjectSettings,
    Outcome,
    Result,
    inject_pod,
    review_ephemeral_containers,
)
from meshguard.policy import Mode

log = logging.getLogger(__name__)

API_VERSION: Final = "admission.k8s.io/v1"
MAX_WARNING_CHARS: Final = 256
EPHEMERAL_SUBRESOURCE: Final = "ephemeralcontainers"
#: UPDATEs checked against what must stay as admitted: the pod itself and its status (a
#: status update can carry metadata); ``resize`` changes resources only.
GUARDED_SUBRESOURCES: Final = frozenset({"", "status"})
#: The path segment (``/inject/other``) of namespaces whose mode label is no mode.
OTHER_MODE: Final = "other"


class BadReviewError(MalformedInputError):
    """The body is not a usable AdmissionReview: answered with HTTP 400."""


class AdmissionRequest(TypedDict, total=False):
    """``request`` of an AdmissionReview v1, the fields meshguard reads. :func:`parse_review`
    checks ``uid``; the others are JSON values as sent, checked where they are read."""

    uid: Required[str]
    kind: object  # {group, version, kind}: only Pods are handled
    operation: object  # CREATE; UPDATE of the ephemeralcontainers subresource
    subResource: object
    namespace: object
    object: object  # the pod
    oldObject: object  # the pod before an UPDATE


class Status(TypedDict):
    """``response.status`` of a refusal."""

    code: int
    message: str


class AdmissionResponse(TypedDict, total=False):
    """``response`` of an AdmissionReview v1."""

    uid: Required[str]
    allowed: Required[bool]
    patchType: str
    patch: str  # base64 of the JSONPatch
    warnings: list[str]
    status: Status


class AdmissionReviewAnswer(TypedDict):
    """The AdmissionReview meshguard answers with."""

    apiVersion: str
    kind: str
    response: AdmissionResponse


class BadRequestAnswer(TypedDict):
    """The body of an HTTP 400: the request was not a usable AdmissionReview."""

    error: str


@dataclass(frozen=True)
class AdmissionVerdict:
    """What happened, for logs and metrics."""

    uid: str
    result: str  # injected, template-requested, skipped, refused, failed
    pod: str
    reason: str
    warnings: int
    #: The warnings' texts (what a fix changed), logged: the API server shows them only to
    #: the client that created the pod, e.g. the ReplicaSet controller.
    texts: tuple[str, ...] = ()


def parse_review(body: bytes) -> AdmissionRequest:
    """The request part of an AdmissionReview v1, or :class:`BadReviewError`."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadReviewError(f"body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadReviewError(f"expected an AdmissionReview object, got {type(document).__name__}")
    if document.get("kind") != "AdmissionReview" or document.get("apiVersion") != API_VERSION:
        raise BadReviewError(
            f"expected kind AdmissionReview, apiVersion {API_VERSION}; got kind"
            f" {document.get('kind')!r}, apiVersion {document.get('apiVersion')!r}"
        )
    request = document.get("request")
    if not isinstance(request, dict):
        raise BadReviewError("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReviewError("AdmissionReview request has no uid")
    return cast(AdmissionRequest, request)


class _Deny(Exception):
    """Answer ``allowed: false`` with this code and message."""

    def __init__(self, code: int, message: str, *, result: str = "refused") -> None:
        super().__init__(message)
        self.code = code
        self.result = result


def respond(
    request: AdmissionRequest, *, settings: InjectSettings, namespace_mode: str | None = None
) -> tuple[AdmissionReviewAnswer, AdmissionVerdict]:
    """The AdmissionReview answering a parsed request, and the decision behind it.

    ``namespace_mode``: the mode of the pod's namespace, as the request path says it (the
    webhook configuration sends each namespace selection to its own ``/inject/<mode>``;
    ``other``: the namespace's label has another value); it replaces the cluster default
    for pods without ``meshguard.io/mode``."""
    uid = str(request["uid"])
    label = _pod_label(request)
    operation = request.get("operation", "CREATE")
    subresource = request.get("subResource") or ""
    ephemeral = operation == "UPDATE" and subresource == EPHEMERAL_SUBRESOURCE
    if operation == "UPDATE" and subresource in GUARDED_SUBRESOURCES:
        return _guard_update(request, uid=uid, label=label)
    if operation != "CREATE" and not ephemeral:
        return _allowed(uid), AdmissionVerdict(uid, "skipped", label, "not a CREATE", 0)
    try:
        settings = _with_namespace_mode(settings, namespace_mode)
        pod = _pod_of(request)
        # the transform edits these two mappings and copies whatever it writes below them:
        # the pod as sent stays as it is
        mutated = {"metadata": dict(pod.get("metadata") or {}), "spec": dict(pod["spec"])}
        if ephemeral:
            result = _transform(
                mutated, settings=settings, added=_added_ephemeral(request, pod), ephemeral=True
            )
            texts = [_short(w) for w in result.warnings]
            decision = AdmissionVerdict(
                uid, "skipped", label, result.reason, len(texts), tuple(result.warnings)
            )
            return _allowed(uid, warnings=texts), decision
        namespace = request.get("namespace")
        result = _transform(
            mutated,
            settings=settings,
            namespace=namespace if isinstance(namespace, str) and namespace else None,
        )
    except _Deny as deny:
        decision = AdmissionVerdict(uid, deny.result, label, str(deny), 0)
        return _denied(uid, deny.code, str(deny)), decision
    patch = [*_metadata_made(pod), *result.operations]
    warnings = [_short(w) for w in result.warnings]
    if result.outcome is Outcome.SKIPPED:
        warnings.append(_short(f"meshguard skipped this pod: {result.reason}"))
    response = _allowed(uid, patch=patch, warnings=warnings)
    decision = AdmissionVerdict(
        uid, result.outcome.value, label, result.reason, len(warnings), tuple(result.warnings)
    )
    return response, decision


def _guard_update(
    request: AdmissionRequest, *, uid: str, label: str
) -> tuple[AdmissionReviewAnswer, AdmissionVerdict]:
    """An UPDATE of a pod (or its status): refused when it changes what must stay as
    admitted (:mod:`meshguard.inject.fixed`), allowed otherwise."""
    old, new = request.get("oldObject"), request.get("object")
    if not isinstance(old, dict) or not isinstance(new, dict):
        metadata = new.get("metadata") if isinstance(new, dict) else None
        if isinstance(metadata, dict) and not is_admitted(metadata):
            return _allowed(uid), AdmissionVerdict(uid, "skipped", label, "not a CREATE", 0)
        message = "an UPDATE review needs the pod before and after (oldObject, object)"
        return _denied(uid, 400, message), AdmissionVerdict(uid, "refused", label, message, 0)
    changed = refused_changes(old, new)
    if not changed:
        return _allowed(uid), AdmissionVerdict(uid, "skipped", label, "update: nothing fixed", 0)
    message = (
        f"meshguard refuses this update of pod {label or '(unnamed)'}: it changes "
        + ", ".join(changed)
        + ", which stay as meshguard admitted them (what was admitted is what runs, and the"
        " pod stays in meshguard's reviews); to change them, delete the pod and create it anew"
    )
    return _denied(uid, 403, message), AdmissionVerdict(uid, "refused", label, message, 0)


def _with_namespace_mode(settings: InjectSettings, text: str | None) -> InjectSettings:
    if text is None:
        return settings
    try:
        mode = Mode(text)
    except ValueError:
        found = "neither 'audit' nor 'enforce'" if text == OTHER_MODE else repr(text)
        raise _Deny(
            403,
            f"meshguard refuses the pod: its namespace's {annotation_keys.MODE} label is"
            f" {found} (as the webhook configuration reports it), expected 'audit' or"
            " 'enforce': fix the namespace's label",
        ) from None
    return dataclasses.replace(settings, default_mode=mode)


def _pod_of(request: AdmissionRequest) -> dict[str, Any]:
    kind = request.get("kind")
    kind_name = kind.get("kind") if isinstance(kind, dict) else None
    if kind_name != "Pod":
        raise _Deny(
            400, f"meshguard only handles Pods, got kind {kind_name!r}: check the webhook's rules"
        )
    pod = request.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        raise _Deny(400, "request.object is not a pod (no spec)")
    if not isinstance(pod.get("metadata", {}), dict):
        raise _Deny(400, "request.object.metadata is not a mapping")
    return pod


def _metadata_made(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A pod sent without ``metadata`` gets the mapping the transform was given."""
    return [] if "metadata" in pod else [{"op": "add", "path": "/metadata", "value": {}}]


def _added_ephemeral(request: AdmissionRequest, pod: Mapping[str, Any]) -> set[str]:
    """The ephemeral containers this UPDATE adds (those admitted before are not re-judged)."""
    old = request.get("oldObject")
    old_spec = old.get("spec") if isinstance(old, dict) else None
    before = old_spec.get("ephemeralContainers") if isinstance(old_spec, dict) else None
    known = (
        {c.get("name") for c in before if isinstance(c, dict)}
        if isinstance(before, list)
        else set()
    )
    now = pod["spec"].get("ephemeralContainers") or []
    if not isinstance(now, list):
        raise _Deny(400, "malformed pod: spec.ephemeralContainers: expected a list")
    return {str(c.get("name")) for c in now if isinstance(c, dict)} - known


def _transform(
    pod: dict[str, Any],
    *,
    settings: InjectSettings,
    added: set[str] | None = None,
    ephemeral: bool = False,
    namespace: str | None = None,
) -> Result:
    try:
        if ephemeral:
            return review_ephemeral_containers(
                pod["metadata"], pod["spec"], settings=settings, added=added
            )
        return inject_pod(pod["metadata"], pod["spec"], settings=settings, namespace=namespace)
    except RefusedError as exc:
        raise _Deny(403, str(exc)) from None
    except MalformedInputError as exc:
        raise _Deny(400, f"malformed pod: {exc}") from None
    except MeshguardError as exc:
        raise _Deny(500, f"meshguard failed: {exc}", result="failed") from None


def handle(
    body: bytes, *, settings: InjectSettings, namespace_mode: str | None = None
) -> tuple[int, AdmissionReviewAnswer | BadRequestAnswer, AdmissionVerdict | None]:
    """HTTP status, JSON answer and decision for a request body; never raises.
    ``namespace_mode``: see :func:`respond`."""
    started = time.perf_counter()
    try:
        request = parse_review(body)
    except BadReviewError as exc:
        return 400, {"error": str(exc)}, None
    try:
        answer, decision = respond(request, settings=settings, namespace_mode=namespace_mode)
    except Exception as exc:  # a bug must not become a 500 nor let the pod through
        log.exception("admission failed", extra={"fields": {"event": "admission-error"}})
        uid = str(request["uid"])
        message = f"meshguard failed: internal error ({type(exc).__name__})"
        answer = _denied(uid, 500, message)
        decision = AdmissionVerdict(uid, "failed", _pod_label(request), message, 0)
    log.info(
        "admission",
        extra={
            "fields": {
                "event": "admission",
                "uid": decision.uid,
                "pod": decision.pod,
                "result": decision.result,
                "reason": decision.reason,
                "warnings": decision.warnings,
                "warning_texts": list(decision.texts),
                "ms": round((time.perf_counter() - started) * 1000, 2),
            }
        },
    )
    return 200, answer, decision


def _review(response: AdmissionResponse) -> AdmissionReviewAnswer:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _allowed(
    uid: str, *, patch: list[dict[str, Any]] | None = None, warnings: list[str] | None = None
) -> AdmissionReviewAnswer:
    response: AdmissionResponse = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    return _review(response)


def _denied(uid: str, code: int, message: str) -> AdmissionReviewAnswer:
    return _review({"uid": uid, "allowed": False, "status": {"code": code, "message": message}})


def _pod_label(request: AdmissionRequest) -> str:
    pod = request.get("object")
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    name = ""
    if isinstance(metadata, dict):
        name = str(metadata.get("name") or metadata.get("generateName") or "")
    namespace = request.get("namespace")
    return f"{namespace}/{name}" if namespace else name


def _short(text: str) -> str:
    return text if len(text) <= MAX_WARNING_CHARS else text[: MAX_WARNING_CHARS - 3] + "..."
