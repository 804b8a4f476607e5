"""The meshguard policy: pydantic models of the pod annotations and their parsing.

A pod says who may talk to whom over loopback in ``meshguard.io/policy`` (YAML or JSON),
whether violations are enforced or only logged in ``meshguard.io/mode``, and may opt out
with ``meshguard.io/inject: "false"``. Parsing is pure: text in, frozen model or
:class:`~meshguard.errors.PolicyError` out. Every problem names the annotation, the field
path, the bad value and what is expected.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from meshguard import annotation_keys, yaml_io
from meshguard.errors import MISSING, LimitError, PolicyError, Problem

PROXY: Literal["proxy"] = "proxy"
ANY_CONTAINER = "*"
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
MAX_POLICY_BYTES = 64 * 1024

# The work a policy costs is bounded, not only its text: the text is parsed without YAML
# anchors or aliases (a small text would otherwise stand for a huge document), and these
# limits bound what the parsed document may hold. The webhook also bounds what the policy
# expands to in a given pod (rules x ports x source containers, see
# meshguard.rules.compiler.MAX_EXPANSION) and the compiled ruleset's size.
#: Rules in one policy.
MAX_RULES: Final = 128
#: Ports listed by one rule.
MAX_PORTS_PER_RULE: Final = 256
#: Ports listed by all the rules together.
MAX_PORTS: Final = 1024
#: Containers named in one rule's ``from``.
MAX_SOURCES_PER_RULE: Final = 64
#: Entries of one rule's ``http.methods``, ``http.paths`` and ``http.headers``.
MAX_HTTP_ENTRIES: Final = 64
#: Characters of one name, path, header name or value.
MAX_STRING_CHARS: Final = 1024

Port = Annotated[int, Field(strict=True, ge=1, le=65535)]


class Mode(enum.StrEnum):
    """What the kernel rules and the authz server do with a flow the policy does not allow."""

    ENFORCE = "enforce"
    AUDIT = "audit"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ANY = "any"


class Action(enum.StrEnum):
    DENY = "deny"
    ALLOW = "allow"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class HttpMatch(_Frozen):
    """L7 conditions, checked by the ext_authz server. Empty lists match anything."""

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    headers: Mapping[str, str] = Field(default_factory=dict)

    @field_validator("methods", mode="before")
    @classmethod
    def _upper_methods(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(m.upper() if isinstance(m, str) else m for m in value)
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for method in value:
            if method not in HTTP_METHODS:
                raise ValueError(f"unknown HTTP method {method!r}")
        return value

    @field_validator("paths")
    @classmethod
    def _absolute_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/") or "*" in path[:-1]:
                raise ValueError(f"bad path {path!r}")
        return value

    @field_validator("headers")
    @classmethod
    def _lowercase_header_names(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        return {name.lower(): text for name, text in value.items()}


class Rule(_Frozen):
    """One allowed loopback flow: from some containers to ports of one container."""

    sources: tuple[str, ...] = Field(alias="from")
    to: str
    ports: tuple[Port, ...]
    protocol: Protocol = Protocol.TCP
    http: HttpMatch | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_any_case(cls, value: object) -> object:
        return _lower(value)

    @field_validator("sources", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("sources")
    @classmethod
    def _sane_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("empty list")
        if PROXY in value:
            raise ValueError("'proxy' is never restricted, so it cannot be a source")
        if ANY_CONTAINER in value and len(value) > 1:
            raise ValueError("'*' already means every container")
        return value

    @field_validator("ports")
    @classmethod
    def _some_ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("empty list")
        return tuple(sorted(set(value)))

    @field_validator("to")
    @classmethod
    def _single_destination(cls, value: str) -> str:
        if value == ANY_CONTAINER:
            raise ValueError("'*' is not a destination")
        return value

    @model_validator(mode="after")
    def _http_is_tcp(self) -> Rule:
        if self.http is not None and self.protocol is not Protocol.TCP:
            raise ValueError("an http rule must use protocol tcp")
        return self

    @property
    def protocols(self) -> tuple[Protocol, ...]:
        """The concrete protocols (``any`` expands to tcp and udp)."""
        if self.protocol is Protocol.ANY:
            return (Protocol.TCP, Protocol.UDP)
        return (self.protocol,)


class Policy(_Frozen):
    """The content of ``meshguard.io/policy``."""

    default_action: Action = Field(default=Action.DENY, alias="defaultAction")
    rules: tuple[Rule, ...] = ()
    #: Allow Istio's documented app<->sidecar patterns (:data:`ISTIO_PATTERNS`) to every
    #: container; ``istioPatterns: false`` closes them.
    istio_patterns: bool = Field(default=True, alias="istioPatterns", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: object) -> object:
        # Every way in (the annotation, the admitted record the authz server reads back)
        # meets the same limits before any rule is built.
        # A record holds Istio's patterns beside the author's rules (with_istio_patterns):
        # they are meshguard's, not counted against the author's limits.
        problems = limit_problems(value, headroom=_PATTERN_HEADROOM)
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        return value

    @field_validator("default_action", mode="before")
    @classmethod
    def _action_any_case(cls, value: object) -> object:
        return _lower(value)


#: Istio's documented app<->sidecar patterns, allowed by default (``istioPatterns``): an app
#: waiting for its proxy to be ready (``GET localhost:15021/healthz/ready``) and a Job
#: stopping its proxy when done (``POST localhost:15020/quitquitquit``). Only those requests:
#: the rest of 15020 (pilot-agent's /debug) and 15021 stays closed.
ISTIO_PATTERNS: Final = (
    Rule.model_validate(
        {"from": ANY_CONTAINER, "to": PROXY, "ports": [15021],
         "http": {"methods": ["GET"], "paths": ["/healthz/ready"]}}
    ),
    Rule.model_validate(
        {"from": ANY_CONTAINER, "to": PROXY, "ports": [15020],
         "http": {"methods": ["POST"], "paths": ["/quitquitquit"]}}
    ),
)  # fmt: skip


def with_istio_patterns(policy: Policy) -> Policy:
    """The policy with :data:`ISTIO_PATTERNS` among its rules, unless it closes them (or
    already has them: applying it twice equals applying it once)."""
    if not policy.istio_patterns:
        return policy
    missing = tuple(rule for rule in ISTIO_PATTERNS if rule not in policy.rules)
    return policy.model_copy(update={"rules": policy.rules + missing}) if missing else policy


def _lower(value: object) -> object:
    """Keywords (``tcp``, ``deny``, ``enforce``) are case-insensitive, as Kubernetes writes
    ``protocol: TCP``; names (containers, headers' values, paths) are not."""
    return value.strip().lower() if isinstance(value, str) else value


#: What each field expects, in words, for error messages (keyed by field alias).
_EXPECTED = {
    "defaultAction": "'deny' or 'allow'",
    "istioPatterns": "true or false (Istio's app<->sidecar patterns, allowed by default)",
    "rules": "a list of rules (from, to, ports, protocol, http)",
    "from": "a container name, a list of container names, or '*'",
    "to": "one container name, or 'proxy'",
    "ports": "a non-empty list of port numbers (integers 1-65535)",
    "protocol": "'tcp', 'udp' or 'any'",
    "http": "a mapping with methods, paths, headers",
    "methods": f"a list of HTTP methods ({', '.join(sorted(HTTP_METHODS))})",
    "paths": "a list of paths starting with '/' (exact, or a prefix ending in '*')",
    "headers": "a mapping of header name to exact value",
}
#: What one item of a list field expects.
_EXPECTED_ITEM = {
    "rules": "a rule (from, to, ports, protocol, http)",
    "from": "a container name",
    "ports": "a port number (integer 1-65535)",
    "methods": "an HTTP method",
    "paths": "a path starting with '/' (exact, or a prefix ending in '*')",
}
_FIELDS_OF = {
    (): ("defaultAction", "rules", "istioPatterns"),
    ("rules",): ("from", "to", "ports", "protocol", "http"),
    ("rules", "http"): ("methods", "paths", "headers"),
}


#: Rules and ports :data:`ISTIO_PATTERNS` add to a policy after its limits were checked.
_PATTERN_HEADROOM: Final = 2


def limit_problems(document: object, *, headroom: int = 0) -> list[Problem]:
    """What in a parsed policy document exceeds meshguard's limits (:data:`MAX_RULES`,
    :data:`MAX_PORTS_PER_RULE`, :data:`MAX_PORTS`, :data:`MAX_SOURCES_PER_RULE`,
    :data:`MAX_HTTP_ENTRIES`, :data:`MAX_STRING_CHARS`); cheap: it counts, builds nothing.
    Shapes it does not expect are left to the models' own errors."""
    if not isinstance(document, Mapping):
        return []
    rules = document.get("rules")
    if not isinstance(rules, list | tuple):
        return []
    if len(rules) > MAX_RULES + headroom:
        return [_over("rules", f"{len(rules)} rules", MAX_RULES, "rules per policy")]
    problems: list[Problem] = []
    total = 0
    for index, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            continue
        problems.extend(_rule_limit_problems(index, rule))
        ports = rule.get("ports")
        total += len(ports) if isinstance(ports, list | tuple) else 0
    if total > MAX_PORTS + headroom:
        problems.append(_over("rules[*].ports", f"{total} ports", MAX_PORTS, "ports per policy"))
    return problems


def _rule_limit_problems(index: int, rule: Mapping[str, Any]) -> list[Problem]:
    where = f"rules[{index}]"
    counted: list[tuple[str, object, int, str]] = [
        ("ports", rule.get("ports"), MAX_PORTS_PER_RULE, "ports per rule"),
        ("from", rule.get("from"), MAX_SOURCES_PER_RULE, "containers per rule's from"),
    ]
    http = rule.get("http")
    if isinstance(http, Mapping):
        for name in ("methods", "paths", "headers"):
            counted.append((f"http.{name}", http.get(name), MAX_HTTP_ENTRIES, f"http {name}"))
    problems = [
        _over(f"{where}.{field}", f"{len(value)} entries", limit, what)
        for field, value, limit, what in counted
        if isinstance(value, list | tuple | Mapping) and len(value) > limit
    ]
    for field, text in _strings_of(rule):
        if len(text) > MAX_STRING_CHARS:
            value = f"{len(text)} characters"
            problems.append(_over(f"{where}.{field}", value, MAX_STRING_CHARS, "characters"))
    return problems


def _strings_of(rule: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """The rule's names and texts (one pass over what the parser already built)."""
    for field in ("from", "to"):
        value = rule.get(field)
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, str):
                yield field, item
    http = rule.get("http")
    if not isinstance(http, Mapping):
        return
    for field in ("methods", "paths", "headers"):
        value = http.get(field)
        items = (
            [*value.keys(), *value.values()]
            if isinstance(value, Mapping)
            else value
            if isinstance(value, list | tuple)
            else ()
        )
        for item in items:
            if isinstance(item, str):
                yield f"http.{field}", item


def _over(path: str, value: str, limit: int, what: str) -> Problem:
    return Problem(path=path, value=value, expected=f"at most {limit} {what} (meshguard's limit)")


def parse_policy(text: str | None) -> Policy:
    """Parse ``meshguard.io/policy``; no annotation means the default: deny everything but
    Istio's app<->sidecar patterns (:data:`ISTIO_PATTERNS`), which every policy allows
    unless it says ``istioPatterns: false``.

    :class:`~meshguard.errors.LimitError` when it exceeds a limit (its text's size, a YAML
    anchor or alias, the counts of :func:`limit_problems`), :class:`PolicyError` when it is
    wrong otherwise."""
    return with_istio_patterns(_parse_policy(text))


def _parse_policy(text: str | None) -> Policy:
    if text is None:
        return Policy()
    size = len(text.encode())
    if size > MAX_POLICY_BYTES:
        raise _limit(
            Problem(path="", value=f"{size} bytes", expected="at most 64 KiB (meshguard's limit)")
        )
    try:
        document = _load(text)
    except yaml_io.AliasError as exc:
        raise _limit(
            Problem(
                path="",
                value=f"an anchor or alias at line {exc.line}, column {exc.column}",
                expected="YAML without anchors (&name) and aliases (*name, <<: *name),"
                " refused by meshguard's limit (a few bytes could stand for an unbounded"
                " policy): write each value out",
            )
        ) from None
    except yaml_io.YAMLError as exc:
        raise _error(
            Problem(path="", value=text, expected=f"valid YAML or JSON ({_yaml_reason(exc)})")
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _error(
            Problem(path="", value=text, expected=f"valid YAML or JSON ({reason})")
        ) from None
    if document is None:
        return Policy()
    if not isinstance(document, dict):
        raise _error(Problem(path="", value=document, expected="a mapping (defaultAction, rules)"))
    problems = limit_problems(document)
    if problems:
        raise _limit(*problems)
    try:
        return Policy.model_validate(document)
    except ValidationError as exc:
        raise _error(*(_problem(err) for err in exc.errors())) from None


def parse_mode(text: str | None) -> Mode:
    """Parse ``meshguard.io/mode``; absent means enforce."""
    if text is None:
        return Mode.ENFORCE
    try:
        return Mode(text.strip().lower())
    except ValueError:
        raise PolicyError(
            annotation=annotation_keys.MODE,
            problems=[Problem(path="", value=text, expected="'enforce' or 'audit'")],
        ) from None


def parse_opt_out(text: str | None) -> bool:
    """True when ``meshguard.io/inject`` opts the pod out."""
    if text is None:
        return False
    value = text.strip().lower()
    if value not in {"true", "false"}:
        raise PolicyError(
            annotation=annotation_keys.INJECT,
            problems=[Problem(path="", value=text, expected="'true' or 'false'")],
        )
    return value == "false"


def check_names(policy: Policy, *, containers: Collection[str]) -> None:
    """Refuse rules that name containers the pod does not have."""
    known = ", ".join(sorted(containers)) or "none"
    problems: list[Problem] = []
    for index, rule in enumerate(policy.rules):
        for position, name in enumerate(rule.sources):
            if name != ANY_CONTAINER and name not in containers:
                path = f"rules[{index}].from" + (f"[{position}]" if len(rule.sources) > 1 else "")
                expected = f"a container of this pod ({known}) or '*'"
                problems.append(Problem(path=path, value=name, expected=expected))
        if rule.to != PROXY and rule.to not in containers:
            expected = f"a container of this pod ({known}) or 'proxy'"
            problems.append(Problem(path=f"rules[{index}].to", value=rule.to, expected=expected))
    if problems:
        raise _error(*problems)


#: What a container can do with each of the proxy's control ports, for warnings.
_CONTROL_PORT_POWERS: Final[Mapping[int, str]] = {
    15000: "Envoy's admin API: /config_dump (the proxy's whole configuration),"
    " /quitquitquit, /logging, /drain_listeners",
    15004: "pilot-agent's debug endpoint (the proxy's xDS state)",
    15020: "pilot-agent's server: /quitquitquit (stops the proxy), /debug, merged metrics",
    15021: "the proxy's health check",
    15090: "Envoy's Prometheus statistics",
}


def control_port_warnings(policy: Policy) -> tuple[str, ...]:
    """Warnings for rules that open a proxy control port whole (no ``http`` restriction).

    Allowed — a Job stopping its sidecar needs 15020 — but worth a second look: the port
    gives the source container power over the proxy, not just a service."""
    warnings: list[str] = []
    for index, rule in enumerate(policy.rules):
        if rule.to != PROXY or rule.http is not None:
            continue
        for port in rule.ports:
            power = _CONTROL_PORT_POWERS.get(port)
            if power is None:
                continue
            warnings.append(
                f"rules[{index}]: opens the proxy's port {port} to {', '.join(rule.sources)}"
                f" — {power}; add http: {{paths: [...]}} to allow only what is needed"
            )
    return tuple(warnings)


def _error(*problems: Problem) -> PolicyError:
    return PolicyError(annotation=annotation_keys.POLICY, problems=problems)


def _limit(*problems: Problem) -> LimitError:
    return LimitError(annotation=annotation_keys.POLICY, problems=problems)


def _problem(err: Mapping[str, Any]) -> Problem:
    loc: Sequence[str | int] = err["loc"]
    path = _format_path(loc)
    names = [part for part in loc if isinstance(part, str)]
    if err["type"] == "extra_forbidden":
        parent = tuple(names[:-1])
        known = ", ".join(_FIELDS_OF.get(parent, ()))
        return Problem(path=path, value=names[-1], expected=f"one of the known fields ({known})")
    if err["type"] == "missing":
        return Problem(path=path, value=MISSING, expected=_EXPECTED.get(names[-1], err["msg"]))
    detail = str(err.get("ctx", {}).get("error", "")) or err["msg"]
    table = _EXPECTED_ITEM if loc and isinstance(loc[-1], int) else _EXPECTED
    expected = table.get(names[-1], "") if names else ""
    expected = f"{expected} ({detail})" if expected else detail
    return Problem(path=path or "(policy)", value=err.get("input"), expected=expected)


def _format_path(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"function-after", "function-before"} or part.startswith("function-"):
            continue
        else:
            text += f".{part}" if text else part
    return text


def _load(text: str) -> object:
    """JSON is the common case (and a YAML subset): parse it directly, YAML otherwise."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass  # not JSON after all (e.g. a YAML flow mapping): let YAML say what is wrong
    return yaml_io.load_without_aliases(text)


def _yaml_reason(exc: yaml_io.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)
