"""The zero-trust decision for one L7 request on the loopback listener. Pure.

Input: which pod (from the Envoy that asks), which source container (from the source
address meshguard's SNAT gave the flow), the original destination port, and the HTTP method,
path and headers. Output: allow or deny, with the rule that allowed it or the reason it was
denied. Default deny: a request no rule allows is denied, and so is anything that cannot be
attributed (unknown pod, unknown source, no HTTP attributes), and so is a path that some
common backend could resolve differently from the path the rules matched (dot segments
hidden in path parameters or encodings, backslashes, Windows' trailing dots: see
``path_ambiguity``), and so is a request whose method or headers the backend could read
differently from the decision: a method-override signal (``X-HTTP-Method-Override``,
``X-Method-Override``, ``X-HTTP-Method``, a ``_method`` query parameter: see
``method_ambiguity``) or a header name with ``_`` (CGI and WSGI fold ``_`` and ``-``
together). Methods are case-sensitive (RFC 9110 section 9.1): ``gEt`` is not ``GET``. A body
may carry ``_method`` too and the decision does not see it, so a request whose body a
framework reads as a form (see ``form_body``) matches only rules that name no methods.
In audit mode a would-be denial is allowed and flagged, so it can be logged; ambiguity is
denied in every mode.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.admitted import TamperedError, drift, read_admitted
from meshguard.l7 import (
    FORM_MEDIA_TYPES,
    METHOD_OVERRIDE_HEADERS,
    METHOD_PARAMETER,
    OVERRIDABLE_METHOD,
)
from meshguard.mesh import ISTIO_RESERVED_PORTS
from meshguard.policy import (
    ANY_CONTAINER,
    Action,
    HttpMatch,
    Mode,
    Policy,
    Rule,
    parse_mode,
    parse_policy,
)
from meshguard.status import PodStatus, read_status

MAX_PATH_CHARS = 8192


@dataclass(frozen=True)
class PodPolicy:
    """What the authz server knows of one pod: its policy and who is behind which address."""

    key: str  # namespace/name
    policy: Policy
    mode: Mode
    sources: Mapping[str, str]  # source address on the loopback listener -> container
    ports: Mapping[int, str] = field(default_factory=dict)  # declared port -> container
    #: Built from the webhook's digest-verified record of what it admitted (not from the
    #: live annotations): the only kind the authz server's stores serve.
    admitted: bool = False
    #: How the live ``policy``/``mode`` annotations differ from what was admitted (ignored).
    drift: tuple[str, ...] = ()
    #: Why every request to this pod is denied (its admitted record does not verify), or "".
    refused: str = ""
    #: The pod's ServiceAccount (spec.serviceAccountName, immutable): with the namespace in
    #: :attr:`key`, the workload identity a caller must present to ask about this pod.
    service_account: str = "default"

    @property
    def namespace(self) -> str:
        return self.key.split("/", 1)[0]

    @functools.cached_property
    def header_names(self) -> tuple[str, ...]:
        """The request headers this pod's rules read, and those that make a request
        ambiguous (method overrides, a form body: :data:`DECISION_HEADERS`): with the
        request's pod, source, port, method and path (and whether a header name has ``_``),
        all that a decision about this pod depends on."""
        names = {name for rule in self.policy.rules if rule.http for name in rule.http.headers}
        return tuple(sorted(names | set(DECISION_HEADERS)))

    @classmethod
    def from_pod(
        cls, *, key: str, annotations: Mapping[str, str], ports: Mapping[int, str]
    ) -> PodPolicy:
        """From a pod's annotations as the webhook left them.

        When the status holds the webhook's admitted record (key ``admitted``), the policy
        and mode come from that record only, once its digest verifies; live ``policy`` and
        ``mode`` annotations that differ are reported in :attr:`drift` and otherwise ignored.
        A record that does not verify gives a :attr:`refused` pod: every request denied.
        Annotations whose status has no record (a pod admitted before records existed, or
        annotations written by hand) are taken as given, with :attr:`admitted` false: the
        stores refuse such pods (:func:`~meshguard.authz.store.policy_of`).
        """
        text = annotations.get(annotation_keys.STATUS)
        status = (read_status(text) if text else None) or PodStatus()
        sources = status.source_containers()
        try:
            record = read_admitted(status)
        except TamperedError as exc:
            return cls.refusing(key=key, reason=str(exc), sources=sources, ports=ports)
        if record is None:
            return cls(
                key=key,
                policy=parse_policy(annotations.get(annotation_keys.POLICY)),
                mode=parse_mode(annotations.get(annotation_keys.MODE)),
                sources=sources,
                ports=dict(ports),
            )
        return cls(
            key=key,
            policy=record.policy,
            mode=record.mode,
            sources=sources,
            ports=dict(ports),
            admitted=True,
            drift=drift(record, annotations),
        )

    @classmethod
    def refusing(
        cls,
        *,
        key: str,
        reason: str,
        sources: Mapping[str, str] | None = None,
        ports: Mapping[int, str] | None = None,
        service_account: str = "default",
    ) -> PodPolicy:
        """A pod whose every request is denied, with ``reason`` (and deny-all, enforced)."""
        return cls(
            key=key,
            policy=Policy(),  # default: deny
            mode=Mode.ENFORCE,
            service_account=service_account,
            sources=dict(sources or {}),
            ports=dict(ports or {}),
            refused=reason,
        )


#: The headers every decision reads besides a policy's own (the listener forwards them):
#: those that tell that the backend might act on another method than the request's.
DECISION_HEADERS: Final = (
    *METHOD_OVERRIDE_HEADERS, "content-type", "content-length", "transfer-encoding",
)  # fmt: skip


@dataclass(frozen=True)
class Request:
    pod: str | None
    source_address: str | None
    port: int | None
    method: str | None
    path: str | None
    headers: Mapping[str, str]


class Reason(StrEnum):
    """The fixed set of decision kinds: the ``reason`` label of the decision metric and the
    ``kind`` field of the decision log (the message beside it says the details)."""

    ALLOWED_BY_RULE = "allowed_by_rule"
    ALLOWED_BY_DEFAULT = "allowed_by_default"
    AUDIT = "audit"  # a would-be denial allowed because the pod is in audit mode
    NO_RULE = "no_rule"
    UNKNOWN_POD = "unknown_pod"
    POD_REFUSED = "pod_refused"
    UNKNOWN_SOURCE = "unknown_source"
    NO_PORT = "no_port"
    NO_HTTP = "no_http"
    PATH_TOO_LONG = "path_too_long"
    AMBIGUOUS_PATH = "ambiguous_path"
    AMBIGUOUS_METHOD = "ambiguous_method"  # a method-override signal
    AMBIGUOUS_HEADER = "ambiguous_header"  # a header name with "_"
    HEADERS_TOO_LARGE = "headers_too_large"
    NO_IDENTITY = "no_identity"  # the caller presented no (usable) workload identity
    IDENTITY_MISMATCH = "identity_mismatch"  # the caller's identity is not the pod's
    NOT_SYNCED = "not_synced"  # the pod cache has not completed its first list yet
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: int | None = None
    source: str | None = None
    destination: str | None = None
    audited: bool = False  # allowed only because the pod is in audit mode
    kind: Reason = Reason.INTERNAL_ERROR

    def log_fields(self) -> dict[str, Any]:
        return {
            "result": "allow" if self.allowed else "deny",
            "audit": self.audited,
            "rule": self.rule,
            "reason": self.reason,
            "kind": self.kind.value,
            "source": self.source,
            "destination": self.destination,
        }


def decide(request: Request, pod: PodPolicy | None) -> Decision:
    """Allow only what a rule of the pod's policy allows; deny anything unattributable."""
    if pod is None:
        return Decision(
            False,
            f"unknown pod {request.pod!r}: no meshguard policy known for it",
            kind=Reason.UNKNOWN_POD,
        )
    if pod.refused:
        return Decision(False, f"pod {pod.key!r} refused: {pod.refused}", kind=Reason.POD_REFUSED)
    verdict = _evaluate(request, pod)
    if not verdict.allowed and pod.mode is Mode.AUDIT and verdict.kind not in AMBIGUITY:
        return Decision(
            True, f"audit: would deny: {verdict.reason}", verdict.rule, verdict.source,
            verdict.destination, audited=True, kind=Reason.AUDIT,
        )  # fmt: skip
    return verdict


#: The kinds of denial that hold in every mode: the backend could act on another request than
#: the one judged, so neither audit mode nor ``defaultAction: allow`` lets them pass.
AMBIGUITY: Final = frozenset(
    {Reason.AMBIGUOUS_PATH, Reason.AMBIGUOUS_METHOD, Reason.AMBIGUOUS_HEADER}
)


def _evaluate(request: Request, pod: PodPolicy) -> Decision:
    source = pod.sources.get(request.source_address or "")
    destination = _destination(pod, request.port) if request.port else None
    problem = _unattributable(request, source)
    if problem:
        kind, message = problem
        return Decision(False, message, source=source, destination=destination, kind=kind)
    for index, rule in enumerate(pod.policy.rules):
        if _covers(rule, source or "", request.port or 0) and _matches(rule.http, request):
            return Decision(
                True, f"allowed by rules[{index}]", index, source, destination,
                kind=Reason.ALLOWED_BY_RULE,
            )  # fmt: skip
    if pod.policy.default_action is Action.ALLOW:
        return Decision(
            True, "allowed by defaultAction: allow", None, source, destination,
            kind=Reason.ALLOWED_BY_DEFAULT,
        )  # fmt: skip
    what = f"{request.method} {_path_only(request.path or '')}"
    reason = f"no rule allows {source} -> {destination} {what}"
    return Decision(False, reason, None, source, destination, kind=Reason.NO_RULE)


def _unattributable(request: Request, source: str | None) -> tuple[Reason, str] | None:
    """Why the request cannot be judged at all, if it cannot (kind and message). Ambiguity
    comes first: it is denied in every mode, whoever sent it (as the native engine's static
    filter denies it before any rule)."""
    if request.method and request.path and len(request.path) <= MAX_PATH_CHARS:
        ambiguous = _ambiguity(request.path, request.headers)
        if ambiguous:
            return ambiguous
    return _missing(request, source)


def _missing(request: Request, source: str | None) -> tuple[Reason, str] | None:
    if source is None:
        return Reason.UNKNOWN_SOURCE, f"unknown source address {request.source_address!r}"
    if request.port is None:
        return Reason.NO_PORT, "no destination port"
    if not request.method or not request.path:
        return Reason.NO_HTTP, "no HTTP method or path"
    if len(request.path) > MAX_PATH_CHARS:
        return Reason.PATH_TOO_LONG, "path too long"
    return None


def _ambiguity(path: str, headers: Mapping[str, str]) -> tuple[Reason, str] | None:
    """Why the backend could act on another request than the one judged, if it could."""
    ambiguity = path_ambiguity(path)
    if ambiguity:
        message = f"path {path[:100]!r} is not normalized (ambiguous path: {ambiguity})"
        return Reason.AMBIGUOUS_PATH, message
    method = method_ambiguity(path, headers)
    if method:
        return Reason.AMBIGUOUS_METHOD, f"ambiguous method: {method}"
    header = next((name for name in headers if "_" in name), None)
    if header is not None:
        return Reason.AMBIGUOUS_HEADER, (
            f"ambiguous header: name {header[:100]!r} has '_', which CGI and WSGI backends"
            " read as '-'"
        )
    return None


def method_ambiguity(target: str, headers: Mapping[str, str]) -> str | None:
    """Why the backend could act on another method than the request's, if it could: a
    method-override header, or a ``_method`` parameter in the query (its name compared
    case-insensitively once percent-decoded, as PHP and Rack decode it)."""
    for name in METHOD_OVERRIDE_HEADERS:
        if name in headers:
            return f"method-override header {name!r}"
    _, question, query = target.partition("?")
    if question:
        for item in re.split("[&;]", query.split("#", 1)[0]):
            name = urllib.parse.unquote_plus(item.split("=", 1)[0], errors="replace")
            if name.lower() == METHOD_PARAMETER:
                return f"method-override query parameter {METHOD_PARAMETER!r}"
    return None


def form_body(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a framework could read the body as form parameters, where ``_method`` turns
    a POST into another method and which no engine sees: a form media type in any
    Content-Type (compared case-insensitively), or a POST with a body and no Content-Type
    (Rack parses it as a form)."""
    content_type = headers.get("content-type")
    if content_type is None:
        return method == OVERRIDABLE_METHOD and has_body(headers)
    return _FORM_CONTENT_TYPE.search(content_type) is not None


def has_body(headers: Mapping[str, str]) -> bool:
    """A declared body: a Content-Length other than 0, or a Transfer-Encoding."""
    length = headers.get("content-length")
    return (length is not None and length.strip() != "0") or "transfer-encoding" in headers


_FORM_CONTENT_TYPE: Final = re.compile(
    r"(?:^|,)\s*(?:" + "|".join(re.escape(t) for t in FORM_MEDIA_TYPES) + r")\s*(?:[;,]|$)",
    re.IGNORECASE,
)


#: Percent-encoded characters refused anywhere in the path: decoded after the rules matched
#: (by the backend, or by a second decoding pass) they would add a separator, a dot, a path
#: parameter, a query or fragment, or a further level of encoding.
_ENCODED: Final = {
    ".": "percent-encoded dot",
    "/": "percent-encoded slash",
    "\\": "percent-encoded backslash",
    ";": "percent-encoded ;",
    "?": "percent-encoded ?",
    "#": "percent-encoded #",
    "%": "double percent-encoding (%25)",
}
#: Non-ASCII characters that a backend's Unicode normalization (NFKC) or Windows' best-fit
#: mapping to a code page may turn into ASCII path syntax, beyond what NFKC shows itself.
_LOOKALIKES: Final = frozenset("\u2215\u2044\u29f5\u29f8\u29f9\u3002\uff61\u2024\u2025\u2026")
_PATH_SYNTAX: Final = frozenset("./\\;?#%")
_MALFORMED_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")


def path_ambiguity(target: str) -> str | None:
    """Why a backend could resolve this request target to another path than the one the
    rules match, if it could; None for a path every common backend reads the same way.

    Envoy's ``normalize_path`` already removed plain dot segments, decoded unreserved
    characters and merged slashes; it does not know path parameters (``..;`` reaches us from
    ``%2e%2e;``, and Tomcat, Jetty and Spring then resolve it to ``..``), nor double, ``%u``
    or overlong UTF-8 encodings, nor Windows' trailing dots. This check holds on its own,
    whatever Envoy did.
    """
    if not target.startswith("/"):
        return "not origin-form (it must start with /: no absolute URL, no *)"
    if "#" in target:
        return "fragment (#) in the request target"
    path = target.split("?", 1)[0]
    if any(not "!" <= char <= "~" for char in path):
        return "raw control, space or non-ASCII character"
    if "\\" in path:
        return "backslash, which some backends read as /"
    return (
        _escape_ambiguity(path)
        or _unicode_ambiguity(path)
        or _segment_ambiguity(path.split("/")[1:])
    )


def _escape_ambiguity(path: str) -> str | None:
    if _MALFORMED_ESCAPE.search(path):
        return "malformed percent-encoding (%u or not two hex digits)"
    for escape in _ESCAPE.finditer(path):
        byte = int(escape.group(1), 16)
        if byte < 0x20 or byte == 0x7F:
            return "percent-encoded NUL or control character"
        if chr(byte) in _ENCODED:
            return _ENCODED[chr(byte)]
    return None


def _unicode_ambiguity(path: str) -> str | None:
    try:
        decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8 in percent-encoding (overlong forms such as %c0%ae hide . and /)"
    for char in decoded:
        if char.isascii():
            continue
        if unicodedata.category(char)[0] in "CZ":
            return "percent-encoded non-ASCII control, format or space character"
        if char in _LOOKALIKES or _PATH_SYNTAX & set(unicodedata.normalize("NFKC", char)):
            return (
                "non-ASCII character that Unicode normalization or best-fit mapping turns"
                " into . / \\ ; ? # or %"
            )
    return None


def _segment_ambiguity(segments: list[str]) -> str | None:
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if not segment:
            if index < last:
                return "empty segment (//)"
            continue
        name, semicolon, _ = urllib.parse.unquote(segment).partition(";")
        if not name:
            return "path parameter on an empty segment"
        if not name.strip(". "):
            return _dots_only(name, parameter=bool(semicolon))
        if name.endswith((".", " ")):
            return "segment ending in a dot or space (Windows and IIS drop them)"
    return None


def _dots_only(name: str, *, parameter: bool) -> str:
    if parameter:
        return "path parameter in a dot segment, which Tomcat, Jetty and Spring resolve"
    if name in {".", ".."}:
        return "dot segment"
    return "segment of only dots and spaces (Windows and IIS resolve it as ..)"


def _views(path: str) -> tuple[str, ...]:
    """The path as the rules must see it: as received, and as backends that strip path
    parameters (``/a;x/b`` -> ``/a/b``: Tomcat, Jetty, Spring) resolve it."""
    if ";" not in path:
        return (path,)
    return path, "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def _covers(rule: Rule, source: str, port: int) -> bool:
    in_sources = ANY_CONTAINER in rule.sources or source in rule.sources
    return in_sources and port in rule.ports


def _matches(http: HttpMatch | None, request: Request) -> bool:
    if http is None:
        return True  # a plain port rule allows every request on that port
    method = request.method or ""  # case-sensitive, as the backend receives it
    if http.methods and (method not in http.methods or form_body(method, request.headers)):
        return False
    views = _views(_path_only(request.path or ""))
    if http.paths and not any(
        all(_path_matches(pattern, view) for view in views) for pattern in http.paths
    ):
        return False
    return all(request.headers.get(name) == value for name, value in http.headers.items())


def _path_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern


def _path_only(path: str) -> str:
    return path.split("?", 1)[0].split("#", 1)[0]


def _destination(pod: PodPolicy, port: int) -> str:
    owner = pod.ports.get(port) or ("proxy" if port in ISTIO_RESERVED_PORTS else "port")
    return f"{owner}:{port}"
