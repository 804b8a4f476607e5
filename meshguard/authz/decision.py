"""The zero-trust decision for one L7 request on the loopback listener. Pure.

Input: which pod (from the Envoy that asks), which source container (from the source
address meshguard's SNAT gave the flow), the original destination port, and the HTTP method,
path and headers. Output: allow or deny, with the rule that allowed it or the reason it was
denied. Default deny: a request no rule allows is denied, and so is anything that cannot be
attributed (unknown pod, unknown source, no HTTP attributes). In audit mode a would-be denial
is allowed and flagged, so it can be logged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshguard import names
from meshguard.errors import MalformedInputError
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
from meshguard.rules.compiler import ISTIO_RESERVED_PORTS

MAX_PATH_CHARS = 8192


@dataclass(frozen=True)
class PodPolicy:
    """What the authz server knows of one pod: its policy and who is behind which address."""

    key: str  # namespace/name
    policy: Policy
    mode: Mode
    sources: Mapping[str, str]  # source address on the loopback listener -> container
    ports: Mapping[int, str] = field(default_factory=dict)  # declared port -> container

    @classmethod
    def from_pod(
        cls, *, key: str, annotations: Mapping[str, str], ports: Mapping[int, str]
    ) -> PodPolicy:
        """From a pod's annotations as the webhook left them (policy, mode, status)."""
        status = _status(annotations.get(names.STATUS))
        sources = {
            address: container
            for container, addresses in status.get("listener", {}).get("sources", {}).items()
            for address in addresses
        }
        return cls(
            key=key,
            policy=parse_policy(annotations.get(names.POLICY)),
            mode=parse_mode(annotations.get(names.MODE)),
            sources=sources,
            ports=dict(ports),
        )


@dataclass(frozen=True)
class Request:
    pod: str | None
    source_address: str | None
    port: int | None
    method: str | None
    path: str | None
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: int | None = None
    source: str | None = None
    destination: str | None = None
    audited: bool = False  # allowed only because the pod is in audit mode

    def log_fields(self) -> dict[str, Any]:
        return {
            "result": "allow" if self.allowed else "deny",
            "audit": self.audited,
            "rule": self.rule,
            "reason": self.reason,
            "source": self.source,
            "destination": self.destination,
        }


def decide(request: Request, pod: PodPolicy | None) -> Decision:
    """Allow only what a rule of the pod's policy allows; deny anything unattributable."""
    if pod is None:
        return Decision(False, f"unknown pod {request.pod!r}: no meshguard policy known for it")
    verdict = _evaluate(request, pod)
    if not verdict.allowed and pod.mode is Mode.AUDIT:
        return Decision(
            True, f"audit: would deny: {verdict.reason}", verdict.rule, verdict.source,
            verdict.destination, audited=True,
        )  # fmt: skip
    return verdict


def _evaluate(request: Request, pod: PodPolicy) -> Decision:
    source = pod.sources.get(request.source_address or "")
    destination = _destination(pod, request.port) if request.port else None
    problem = _unattributable(request, source)
    if problem:
        return Decision(False, problem, source=source, destination=destination)
    for index, rule in enumerate(pod.policy.rules):
        if _covers(rule, source or "", request.port or 0) and _matches(rule.http, request):
            return Decision(True, f"allowed by rules[{index}]", index, source, destination)
    if pod.policy.default_action is Action.ALLOW:
        return Decision(True, "allowed by defaultAction: allow", None, source, destination)
    what = f"{request.method} {_path_only(request.path or '')}"
    reason = f"no rule allows {source} -> {destination} {what}"
    return Decision(False, reason, None, source, destination)


def _unattributable(request: Request, source: str | None) -> str | None:
    """Why the request cannot be judged at all, if it cannot."""
    if source is None:
        return f"unknown source address {request.source_address!r}"
    if request.port is None:
        return "no destination port"
    if not request.method or not request.path:
        return "no HTTP method or path"
    if len(request.path) > MAX_PATH_CHARS:
        return "path too long"
    if _ambiguous(_path_only(request.path)):
        return f"path {request.path[:100]!r} is not normalized (dot segments, //, encoded / or .)"
    return None


def _ambiguous(path: str) -> bool:
    """Paths an upstream could resolve differently than a prefix match would (Envoy's
    normalize_path removes these first; this holds even if it did not)."""
    lowered = path.lower()
    segments = path.split("/")[1:]
    return (
        not path.startswith("/")
        or "//" in path
        or any(s in {".", ".."} for s in segments)
        or any(code in lowered for code in ("%2e", "%2f", "%5c"))
        or "\\" in path
    )


def _covers(rule: Rule, source: str, port: int) -> bool:
    in_sources = ANY_CONTAINER in rule.sources or source in rule.sources
    return in_sources and port in rule.ports


def _matches(http: HttpMatch | None, request: Request) -> bool:
    if http is None:
        return True  # a plain port rule allows every request on that port
    method = (request.method or "").upper()
    if http.methods and method not in http.methods:
        return False
    path = _path_only(request.path or "")
    if http.paths and not any(_path_matches(pattern, path) for pattern in http.paths):
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


def _status(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        status = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedInputError(f"{names.STATUS}: not JSON ({exc})") from None
    if not isinstance(status, dict):
        raise MalformedInputError(f"{names.STATUS}: not a JSON object")
    return status
