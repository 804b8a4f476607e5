"""docs/envoy-versions.md names every Envoy field, typed config, enum value, access-log
operator and runtime key the loopback listeners use, with the release it appeared in: a
field added to the generated configuration without its row fails here, and the stated
minimums (docs and chart) are the newest release the table needs per engine."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from meshguard.authz.envoy_config import ListenerSettings
from meshguard.authz.istio_config import IstioSettings, envoy_filter
from meshguard.l7 import DecisionLog, L7Engine
from meshguard.policy import Mode, parse_policy
from meshguard.rbac import AUDIT_PREFIX, RE2_RUNTIME_KEY, SOURCE_PREFIX, compile_rbac

PROJECT = Path(__file__).resolve().parents[2]
DOC = PROJECT / "docs" / "envoy-versions.md"
HELPERS = PROJECT / "charts" / "meshguard" / "templates" / "_helpers.tpl"
NOTES = PROJECT / "charts" / "meshguard" / "templates" / "NOTES.txt"

#: Every rule shape the compiler knows: methods, prefix and exact paths, headers, a port
#: rule, "*" sources, defaultAction allow.
POLICY = parse_policy(
    """
defaultAction: allow
rules:
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: "*"
    to: app
    ports: [8080, 8081]
    http: {methods: [GET], paths: ["/api/*"], headers: {x-token: abc}}
  - from: cache
    to: app
    ports: [9090]
"""
)
SOURCES = {"app": ("127.0.100.1", "fd6d:6775::1"), "cache": ("127.0.100.2", "fd6d:6775::2")}
#: Keys whose children are names meshguard chose (policy names, log fields), not fields.
NAMED: Final = frozenset({"policies", "json_format"})
#: Keys whose string values are data (a header's value, a regex, a name), never enums.
DATA: Final = frozenset({"exact", "regex", "name", "inline_string", "key", "prefix"})
#: Keys whose whole value is opaque data to Envoy (metadata by filter name: Istio's own
#: ``istio.config`` naming the EnvoyFilter), never configuration it must understand.
OPAQUE: Final = frozenset({"filter_metadata"})
OPERATOR: Final = re.compile(r"%([A-Z_]+)(?:\(([^)%]*)\))?%")
ENUM: Final = re.compile(r"[A-Z][A-Z0-9_]+")


def _features(node: Any, key: str | None = None) -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _field(name, value)
    elif isinstance(node, list):
        for item in node:
            yield from _features(item, key)
    elif isinstance(node, str):
        if key not in DATA and ENUM.fullmatch(node):
            yield f"{key}: {node}"
        yield from _operators(node)


def _field(name: str, value: Any) -> Iterator[str]:
    if name == "@type":
        yield "@type " + value.removeprefix("type.googleapis.com/")
        return
    yield name
    if name in OPAQUE:
        return
    if name in NAMED:
        for inner in value.values():
            yield from _features(inner, name)
    elif name == "typed_extension_protocol_options":
        for extension, inner in value.items():
            yield "@type " + extension
            yield from _features(inner)
    else:
        yield from _features(value, name)


def _operators(text: str) -> Iterator[str]:
    for operator, argument in OPERATOR.findall(text):
        if operator == "DYNAMIC_METADATA" and ":" in argument:
            namespace, key = argument.split(":", 1)
            for prefix in (SOURCE_PREFIX, AUDIT_PREFIX):  # the key as Envoy documents it
                key = key.removeprefix(prefix)
            yield f"%DYNAMIC_METADATA({namespace}:{key})%"
        else:
            yield f"%{operator}()%" if argument else f"%{operator}%"


def used(engine: L7Engine) -> set[str]:
    """What one engine's sidecar objects use: its EnvoyFilter's listeners and cluster (the
    native one with each decision log), and for the native engine the pod's document in both
    modes and the RE2 runtime key."""
    logs = list(DecisionLog) if engine is L7Engine.NATIVE else [DecisionLog.ALL]
    settings = [ListenerSettings(engine=engine, decision_log=log) for log in logs]
    documents: list[Any] = [
        patch["patch"]["value"]
        for listener in settings
        for patch in envoy_filter(IstioSettings(), listener, engine=engine)["spec"]["configPatches"]
    ]
    found: set[str] = set()
    if engine is L7Engine.NATIVE:
        documents += [compile_rbac(policy=POLICY, mode=m, sources=SOURCES) for m in Mode]
        found.add(f"runtime {RE2_RUNTIME_KEY}")
    return found | {feature for document in documents for feature in _features(document)}


def table() -> list[tuple[tuple[int, int], set[str], set[str]]]:
    """The doc's rows: (Envoy version, names, engines using them)."""
    section = DOC.read_text().split("## Every field", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"(≤ )?1\.\d+", cells[0]):
            continue
        major, minor = cells[0].removeprefix("≤ ").split(".")
        # a parenthesis after a name explains it: its backticks are not names
        listed = re.sub(r" \((?:[^()`]|`[^`]*`)*\)", "", cells[1])
        names = set(re.findall(r"`([^`]+)`", listed))
        engines = {"native", "ext-authz"} if cells[2] == "both" else {cells[2]}
        rows.append(((int(major), int(minor)), names, engines))
    return rows


def documented() -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for version, names, _ in table():
        for name in names:
            assert name not in found, f"{name} is in two rows of {DOC.name}"
            found[name] = version
    return found


@pytest.mark.parametrize("engine", list(L7Engine), ids=str)
def test_every_name_the_listener_uses_has_its_row(engine: L7Engine):
    missing = used(engine) - set(documented())
    assert not missing, (
        f"add these to {DOC.relative_to(PROJECT)} with the Envoy release each appeared in"
        f" (and check the minimums): {sorted(missing)}"
    )


def test_every_row_names_something_the_listener_uses_and_by_which_engine():
    both = used(L7Engine.NATIVE) | used(L7Engine.EXT_AUTHZ)
    stale = set(documented()) - both
    assert not stale, f"no longer used, remove from {DOC.name}: {sorted(stale)}"
    for _, names, engines in table():
        for name in names:
            users = {e.value for e in L7Engine if name in used(e)}
            assert users == engines, (name, users, engines)


def _minimums() -> dict[str, str]:
    """The doc's summary table: engine -> minimum Envoy."""
    found = {}
    for match in re.finditer(r"^\| (native|ext-authz)[^|]*\| \*\*(1\.\d+)\*\* \|", DOC.read_text(),
                             re.MULTILINE):  # fmt: skip
        found[match[1]] = match[2]
    return found


@pytest.mark.parametrize("engine", list(L7Engine), ids=str)
def test_the_stated_minimum_is_the_newest_release_the_engine_needs(engine: L7Engine):
    names = used(engine)
    newest = max(version for name, version in documented().items() if name in names)
    assert _minimums()[engine.value] == f"{newest[0]}.{newest[1]}"


def test_the_chart_checks_the_documented_istio_minimums():
    """The chart's version check (``meshguard.istio.tooOld``) uses the Istio minimums the
    doc states for each engine."""
    text = DOC.read_text()
    helpers = HELPERS.read_text()
    istio = {}
    for engine in L7Engine:
        (istio[engine],) = re.findall(rf"^\| {engine.value}[^|]*\|[^|]*\| \*\*(1\.\d+)\*\* \|",
                                      text, re.MULTILINE)  # fmt: skip
        assert f'"{engine.value}" "{istio[engine]}"' in helpers, (engine, istio[engine])
    # and NOTES, which states the install's
    native, ext_authz = istio[L7Engine.NATIVE], istio[L7Engine.EXT_AUTHZ]
    assert f'ternary "{native}" "{ext_authz}" (eq .Values.webhook.l7Engine "native")' in (
        NOTES.read_text()
    )
