"""Ambiguous paths: a request target that some common backend resolves to another path than
the one the rules matched is denied, with the reason.

Reference normalizers model how backends resolve a path (Tomcat/Jetty-style path parameter
stripping before decoding, Spring-style after it, Python's urlparse, IIS with double and
``%u`` decoding, overlong UTF-8, backslashes and trailing dots, NFKC); the properties:

- whenever one of them resolves a path to something else than the RFC 3986 dot-segment
  removal of the decoded path (modulo path parameters, which they may strip), decide()
  denies it;
- whenever decide() allows a path by a rule with ``paths``, every modeled backend resolves
  it to a path that rule allows.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshguard.authz.decision import PodPolicy, Request, decide, path_ambiguity
from meshguard.policy import parse_policy

POLICY = """
rules:
  - from: app
    to: app
    ports: [8080]
    http: {paths: ["/public/*", "/quitquitquit", "/api/v1/items", "/files*"]}
"""
STATUS = json.dumps({"listener": {"sources": {"app": ["127.0.100.1"]}}})
PATTERNS = parse_policy(POLICY).rules[0].http.paths


def pod(policy: str = POLICY) -> PodPolicy:
    return PodPolicy.from_pod(
        key="shop/web-1",
        annotations={"meshguard.io/policy": policy, "meshguard.io/status": STATUS},
        ports={8080: "app"},
    )


POD = pod()
ALLOW_ALL = pod("defaultAction: allow")


def decide_path(path: str, policy: PodPolicy = POD):
    return decide(Request("shop/web-1", "127.0.100.1", 8080, "GET", path, {}), policy)


# --- reference normalizers -------------------------------------------------------------


def _hex(text: str, at: int, digits: int) -> int | None:
    chunk = text[at : at + digits]
    if len(chunk) == digits and all(c in "0123456789abcdefABCDEF" for c in chunk):
        return int(chunk, 16)
    return None


def decode(text: str, *, iis: bool = False) -> str:
    """Percent-decode once. ``iis``: also ``%uXXXX``, and overlong UTF-8 read leniently
    (``%c0%ae`` -> ``.``), as old decoders did."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%" and (byte := _hex(text, i + 1, 2)) is not None:
            out.append(byte)
            i += 3
        elif (
            iis
            and text[i] == "%"
            and text[i + 1 : i + 2] in {"u", "U"}
            and (code := _hex(text, i + 2, 4)) is not None
        ):
            out += chr(code).encode("utf-8", "surrogatepass")
            i += 6
        else:
            out += text[i].encode("utf-8", "surrogatepass")
            i += 1
    return _lenient_utf8(bytes(out)) if iis else out.decode("utf-8", "replace")


def _lenient_utf8(data: bytes) -> str:
    chars: list[str] = []
    i = 0
    while i < len(data):
        lead = data[i]
        if lead in {0xC0, 0xC1} and i + 1 < len(data) and data[i + 1] & 0xC0 == 0x80:
            chars.append(chr(((lead & 0x1F) << 6) | (data[i + 1] & 0x3F)))
            i += 2
            continue
        for width in (4, 3, 2, 1):
            try:
                chars.append(data[i : i + width].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += width
            break
        else:
            chars.append("\ufffd")
            i += 1
    return "".join(chars)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4."""
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if path.rsplit("/", maxsplit=1)[-1] in {".", ".."}:
        output.append("")
    return "/" + "/".join(output)


def strip_parameters(path: str) -> str:
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def windows_segments(path: str) -> str:
    """Trailing dots and spaces dropped; a segment of only dots and spaces read as ``..``."""
    segments = []
    for segment in path.split("/"):
        if segment and not segment.strip(". "):
            segments.append(".." if segment.count(".") > 1 else ".")
        else:
            segments.append(segment.rstrip(". ") or segment)
    return "/".join(segments)


def path_of(target: str) -> str:
    return target.split("?", 1)[0].split("#", 1)[0]


def rfc3986(target: str) -> str:
    return remove_dot_segments(decode(path_of(target)))


BACKENDS: dict[str, Callable[[str], str]] = {
    # Tomcat / Jetty: parameters stripped before decoding, backslash as / (ALLOW_BACKSLASH).
    "tomcat": lambda p: remove_dot_segments(
        merge_slashes(decode(strip_parameters(p)).replace("\\", "/"))
    ),
    # Spring's UrlPathHelper, lenient order: decode, then remove ;-content.
    "spring": lambda p: remove_dot_segments(merge_slashes(strip_parameters(decode(p)))),
    # Python's urlparse: parameters of the last segment only.
    "urlparse": lambda p: remove_dot_segments(
        decode(p.rsplit("/", 1)[0] + "/" + p.rsplit("/", 1)[1].split(";", 1)[0])
    ),
    # IIS: %u, double decoding, overlong UTF-8, backslash, trailing dots and spaces.
    "iis": lambda p: remove_dot_segments(
        windows_segments(decode(decode(p, iis=True), iis=True).replace("\\", "/"))
    ),
    # A framework that NFKC-normalizes the decoded path (fullwidth dots, one-dot leaders).
    "nfkc": lambda p: remove_dot_segments(unicodedata.normalize("NFKC", decode(p))),
    # Decoded up to a fixed point (proxies that decode again before routing).
    "decode-all": lambda p: remove_dot_segments(_decode_fully(p)),
}


def _decode_fully(path: str) -> str:
    for _ in range(4):
        decoded = decode(path)
        if decoded == path:
            break
        path = decoded
    return path


def resolutions(target: str) -> dict[str, str]:
    path = path_of(target)
    if not path.startswith("/"):
        return {"any": "not origin-form"}
    return {name: backend(path) for name, backend in BACKENDS.items()}


def matches(pattern: str, path: str) -> bool:
    return path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern


# --- strategies --------------------------------------------------------------------------

TOKENS = [
    "public", "private", "a", "x", "files", ".", "..", "...", ";", ";x", ";jsessionid=1",
    "%2e", "%2E", "%252e", "%25", "%c0%ae", "%C0%AE", "%c0%af", "%e0%80%ae", "%u002e",
    "%U002E", "%u002f", "\\", "%5c", "%5C", "%2f", "%2F", "%00", "%0a", "%20", " ", "%09",
    "%3b", "%3B", "%3f", "%23", "é", "%c3%a9", "%ef%bc%8e", "\uff0e", "\u2024", "%e2%80%a4",
    "%e2%88%95", "%e2%80%8b", "?", "?x=;..", "#", "%", "%zz", "%u", "~", "%7e", "%41", "\t",
    "\x00", "/", "//", "%ff", "..%20", ".%20",
]  # fmt: skip
SEGMENT = st.lists(st.sampled_from(TOKENS), min_size=0, max_size=4).map("".join)
TARGET = st.tuples(
    st.sampled_from(["/", "/public/", "/files", "/api/v1/", "http://app/public/", "*"]),
    st.lists(SEGMENT, min_size=0, max_size=5).map("/".join),
).map("".join)
CLEAN_SEGMENT = st.from_regex(
    r"[a-z0-9_~-]([a-z0-9._~-]{0,7}[a-z0-9_~-])?|\.[a-z0-9_~-]{1,4}", fullmatch=True
)
MATRIX = st.none() | st.from_regex(r"[a-z]{1,5}=[a-z0-9.]{0,5}", fullmatch=True)
QUERY = st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@st.composite
def clean_targets(draw: st.DrawFn) -> str:
    segments = draw(st.lists(CLEAN_SEGMENT, min_size=1, max_size=4))
    matrix = draw(MATRIX)
    if matrix is not None:
        segments[-1] = f"{segments[-1]};{matrix}"
    query = draw(QUERY)
    return "/public/" + "/".join(segments) + ("" if query is None else "?" + query.replace("#", ""))


# --- properties --------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(target=TARGET)
@example("/public/%2e%2e;/private")
@example("/public/..;/private")
@example("/public/.;/x")
@example("/public/%252e%252e/private")
@example("/public/%c0%ae%c0%ae/private")
@example("/public/%u002e%u002e/private")
@example("/public/..%20/private")
@example("/public/.../private")
@example("/public/%ef%bc%8e%ef%bc%8e/private")
def test_a_path_some_backend_resolves_differently_is_denied(target: str):
    canonical = strip_parameters(rfc3986(target)) if target.startswith("/") else None
    differing = {
        name: resolved
        for name, resolved in resolutions(target).items()
        if strip_parameters(resolved) != canonical
    }
    decision = decide_path(target)
    if differing:
        assert not decision.allowed, (target, canonical, differing)
        assert "ambiguous path: " in decision.reason
    for policy in (POD, ALLOW_ALL):  # even where every path is allowed
        if path_ambiguity(target):
            assert not decide_path(target, policy).allowed


@settings(max_examples=3000, deadline=None)
@given(target=TARGET | clean_targets())
def test_what_is_allowed_resolves_to_an_allowed_path_in_every_backend(target: str):
    decision = decide_path(target)
    if decision.allowed:
        for name, resolved in resolutions(target).items():
            assert any(matches(p, resolved) for p in PATTERNS), (target, name, resolved)


@settings(max_examples=500, deadline=None)
@given(target=clean_targets())
def test_clean_paths_matrix_parameters_and_queries_are_allowed(target: str):
    decision = decide_path(target)
    assert decision.allowed, (target, decision.reason)


# --- explicit variants -------------------------------------------------------------------

DENIED = {
    # path parameters in dot segments (what Envoy forwards for %2e%2e;)
    "/public/..;/private": "path parameter in a dot segment",
    "/public/..;x/private": "path parameter in a dot segment",
    "/public/..;jsessionid=1/private": "path parameter in a dot segment",
    "/public/.;/private": "path parameter in a dot segment",
    "/public/.;x": "path parameter in a dot segment",
    "/public/..;": "path parameter in a dot segment",
    "/public/..;/": "path parameter in a dot segment",
    "/public/...;/private": "path parameter in a dot segment",
    "/public/..%20;/private": "path parameter in a dot segment",
    "/public/;x/private": "path parameter on an empty segment",
    "/public/;/private": "path parameter on an empty segment",
    # percent-encodings
    "/public/%2e%2e;/private": "percent-encoded dot",
    "/public/%2E%2E;/private": "percent-encoded dot",
    "/public/%2e%2e/private": "percent-encoded dot",
    "/public/.%2e/private": "percent-encoded dot",
    "/public/%2e%2e;jsessionid=1/private": "percent-encoded dot",
    "/public/%252e%252e/private": "double percent-encoding (%25)",
    "/public/%25/private": "double percent-encoding (%25)",
    "/public/%c0%ae%c0%ae/private": "invalid UTF-8",
    "/public/%C0%AE%C0%AE/private": "invalid UTF-8",
    "/public/%e0%80%ae/private": "invalid UTF-8",
    "/public/%ff": "invalid UTF-8",
    "/public/%u002e%u002e/private": "malformed percent-encoding",
    "/public/%U002E%U002E/private": "malformed percent-encoding",
    "/public/%zz": "malformed percent-encoding",
    "/public/%": "malformed percent-encoding",
    "/public/%2": "malformed percent-encoding",
    "/public/..%2fprivate": "percent-encoded slash",
    "/public/%2F..": "percent-encoded slash",
    "/public/%5c../private": "percent-encoded backslash",
    "/public/..%5Cprivate": "percent-encoded backslash",
    "/public/..%3b/private": "percent-encoded ;",
    "/public/x%3f/../private": "percent-encoded ?",
    "/public/x%23/private": "percent-encoded #",
    "/public/..%00/private": "percent-encoded NUL or control character",
    "/public/x%0a": "percent-encoded NUL or control character",
    "/public/x%7f": "percent-encoded NUL or control character",
    "/public/%ef%bc%8e%ef%bc%8e/private": "Unicode normalization",
    "/public/%e2%80%a5/private": "Unicode normalization",
    "/public/%e2%88%95private": "Unicode normalization",
    "/public/%e2%80%8b": "non-ASCII control, format or space",
    "/public/%c2%a0": "non-ASCII control, format or space",
    # backslashes, raw bytes
    "/public/..\\private": "backslash",
    "/public\\..\\private": "backslash",
    "/public/\x00": "raw control, space or non-ASCII",
    "/public/.. /private": "raw control, space or non-ASCII",
    "/public/\u00e9": "raw control, space or non-ASCII",
    "/public/\uff0e\uff0e/private": "raw control, space or non-ASCII",
    "/public/x\t": "raw control, space or non-ASCII",
    # Windows / IIS trailing dots and spaces
    "/public/..%20/private": "segment of only dots and spaces",
    "/public/.%20/private": "segment of only dots and spaces",
    "/public/.../private": "segment of only dots and spaces",
    "/public/..../private": "segment of only dots and spaces",
    "/public/%20": "segment of only dots and spaces",
    "/public/x.": "segment ending in a dot or space",
    "/public/x%20": "segment ending in a dot or space",
    "/public/a../b": "segment ending in a dot or space",
    "/public/x.;y": "segment ending in a dot or space",
    # plain dot segments, //, form of the target
    "/public/../private": "dot segment",
    "/public/./x": "dot segment",
    "/public/x/..": "dot segment",
    "/public//x": "empty segment (//)",
    "//public/x": "empty segment (//)",
    "http://app/public/..;/private": "not origin-form",
    "*": "not origin-form",
    "public/x": "not origin-form",
    "/public/x#/../private": "fragment",
    "/public/x?a#b": "fragment",
}
ALLOWED = [
    "/public/ok",
    "/public/",
    "/public/a.b/c-d_e~f",
    "/public/..a/.b/a..b",
    "/public/.well-known/x",
    "/public/x;y/z",  # a matrix parameter on a non-dot segment
    "/public/items;v=2",
    "/public/index.jsp;jsessionid=ABC123",
    "/public/a?x=;..&y=../..",  # the query is not the path
    "/public/a?q=%2e%2e%2f&r=%00",
    "/public/caf%c3%a9",  # UTF-8 that no normalization turns into syntax
    "/public/%41%7e",
    "/quitquitquit",
    "/quitquitquit?now=1",
    "/api/v1/items",
    "/files",
    "/files/a/b",
]


@pytest.mark.parametrize(("target", "reason"), sorted(DENIED.items()))
def test_ambiguous_paths_are_denied_with_the_reason(target: str, reason: str):
    decision = decide_path(target)
    assert not decision.allowed
    assert "ambiguous path: " in decision.reason and reason in decision.reason, decision.reason
    assert decision.reason.startswith(f"path {target[:100]!r} is not normalized (ambiguous path")
    # A default-allow policy, or audit mode, does not make an ambiguous path unambiguous.
    assert not decide_path(target, ALLOW_ALL).allowed


@pytest.mark.parametrize("target", ALLOWED)
def test_legitimate_paths_are_allowed(target: str):
    assert path_ambiguity(target) is None
    decision = decide_path(target)
    assert decision.allowed, decision.reason


@pytest.mark.parametrize(
    "target",
    ["/quitquitquit;x", "/api/v1/items;v=2", "/api;v=2/v1/items", "/public;x/y", "/fil;es"],
)
def test_a_path_parameter_does_not_widen_what_a_rule_allows(target: str):
    """The rules must match the path both as received and with its parameters stripped
    (so an exact path never matches with a parameter, a prefix only after it)."""
    assert path_ambiguity(target) is None
    decision = decide_path(target)
    assert not decision.allowed and decision.reason.startswith("no rule allows"), decision.reason
