"""L7 as the backend reads it (issue 23.5): the method and headers a rule names are the ones
the backend acts on. Method-override signals and header names with ``_`` are ambiguous and
denied in every mode; methods are case-sensitive; a body a framework reads as a form (where
``_method`` hides) matches only rules that name no methods. Ambiguous paths are denied in
audit mode too (it used to allow them, flagged)."""

from __future__ import annotations

import json

import pytest

from meshguard.authz.cache import DecisionCache
from meshguard.authz.decision import PodPolicy, Reason, Request, decide, form_body

POLICY = """
rules:
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: cache
    to: app
    ports: [8080]
    http: {methods: [GET], paths: ["/api/*"], headers: {x-token: abc}}
  - from: cache
    to: app
    ports: [8081]
    http: {paths: ["/forms/*"]}
"""
STATUS = json.dumps(
    {"listener": {"sources": {"app": ["127.0.100.1", "fd6d:6775::1"],
                              "cache": ["127.0.100.2", "fd6d:6775::2"]}}}
)  # fmt: skip
APP, CACHE = "127.0.100.1", "127.0.100.2"


def pod(mode: str = "enforce", policy: str = POLICY) -> PodPolicy:
    return PodPolicy.from_pod(
        key="shop/web-1",
        annotations={
            "meshguard.io/policy": policy,
            "meshguard.io/mode": mode,
            "meshguard.io/status": STATUS,
        },
        ports={8080: "app", 8081: "app"},
    )


def get_api(path: str = "/api/items", **headers: str) -> Request:
    return Request("shop/web-1", CACHE, 8080, "GET", path, {"x-token": "abc", **headers})


def post_quit(path: str = "/quitquitquit", **headers: str) -> Request:
    return Request(
        "shop/web-1", APP, 15020, "POST", path, {"content-type": "application/json", **headers}
    )


MODES = pytest.mark.parametrize("mode", ["enforce", "audit"])


def test_the_baseline_requests_are_allowed():
    assert decide(get_api(), pod()).allowed
    assert decide(post_quit(), pod()).allowed


@MODES
@pytest.mark.parametrize("header", ["x-http-method-override", "x-method-override", "x-http-method"])
@pytest.mark.parametrize("value", ["DELETE", "GET", ""])
def test_method_override_headers_are_denied_in_every_mode(mode: str, header: str, value: str):
    for request in (get_api(**{header: value}), post_quit(**{header: value})):
        decision = decide(request, pod(mode))
        assert (decision.allowed, decision.kind) == (False, Reason.AMBIGUOUS_METHOD)
        assert f"method-override header {header!r}" in decision.reason


@MODES
@pytest.mark.parametrize(
    "query",
    ["_method=DELETE", "a=1&_method=DELETE", "a=1;_method=put", "_METHOD=DELETE",
     "%5Fmethod=DELETE", "%5fMeThOd=DELETE", "_%6Dethod=DELETE", "_method", "x=&_method="],
)  # fmt: skip
def test_a_method_parameter_in_the_query_is_denied_in_every_mode(mode: str, query: str):
    for request in (get_api(f"/api/items?{query}"), post_quit(f"/quitquitquit?{query}")):
        decision = decide(request, pod(mode))
        assert (decision.allowed, decision.kind) == (False, Reason.AMBIGUOUS_METHOD), query


@pytest.mark.parametrize("query", ["method=DELETE", "x_method=1", "a=_method", "_methods=1"])
def test_other_parameters_are_not_method_overrides(query: str):
    assert decide(get_api(f"/api/items?{query}"), pod()).allowed


@pytest.mark.parametrize("method", ["get", "gEt", "Get", "GET "])
def test_methods_are_case_sensitive(method: str):
    request = Request("shop/web-1", CACHE, 8080, method, "/api/items", {"x-token": "abc"})
    decision = decide(request, pod())
    assert (decision.allowed, decision.kind) == (False, Reason.NO_RULE)


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded; charset=utf-8",
     "multipart/form-data; boundary=x", "text/plain, multipart/form-data", None],
)  # fmt: skip
def test_a_form_body_matches_only_rules_that_name_no_methods(content_type: str | None):
    """The backend reads ``_method`` from a form body (Rack, Laravel, Symfony), which no
    engine sees: a POST rule must not let such a body become a DELETE; a rule that names no
    methods allows every method anyway."""
    headers = {"content-length": "14"}
    if content_type is not None:
        headers["content-type"] = content_type
    post = Request("shop/web-1", APP, 15020, "POST", "/quitquitquit", headers)
    decision = decide(post, pod())
    assert (decision.allowed, decision.kind) == (False, Reason.NO_RULE)
    anything = Request("shop/web-1", CACHE, 8081, "POST", "/forms/a", headers)
    assert decide(anything, pod()).allowed


def test_form_body_reads_only_form_media_types():
    assert not form_body("POST", {"content-type": "application/json"})
    assert not form_body("GET", {})
    assert form_body("POST", {"content-length": "14"})
    assert form_body("POST", {"transfer-encoding": "chunked"})
    assert not form_body("POST", {})  # no body: nothing to read _method from
    assert not form_body("POST", {"content-length": "0"})
    assert form_body("PUT", {"content-type": "multipart/form-data"})


@MODES
@pytest.mark.parametrize("name", ["x_token", "x__token", "_", "content_type"])
def test_header_names_with_underscores_are_denied_in_every_mode(mode: str, name: str):
    """``x_token: zzz`` beside ``x-token: abc``: a CGI/WSGI backend reads HTTP_X_TOKEN as
    both, joined."""
    decision = decide(get_api(**{name: "zzz"}), pod(mode))
    assert (decision.allowed, decision.kind) == (False, Reason.AMBIGUOUS_HEADER)


@pytest.mark.parametrize(
    "path", ["/api/..;/admin", "/api/%2e%2e/admin", "/api/a%5c..%5cadmin", "/api//x"]
)
def test_ambiguous_paths_are_denied_in_audit_mode(path: str):
    """Audit mode allowed these, flagged (kind=audit): the backend then served another path
    than the one judged, and the README says they are denied in every mode."""
    decision = decide(get_api(path), pod("audit"))
    assert (decision.allowed, decision.audited, decision.kind) == (
        False, False, Reason.AMBIGUOUS_PATH,
    )  # fmt: skip


def test_audit_mode_still_allows_and_flags_a_plain_denial():
    decision = decide(get_api("/admin"), pod("audit"))
    assert (decision.allowed, decision.audited, decision.kind) == (True, True, Reason.AUDIT)


@pytest.mark.parametrize(
    "extra",
    [{"x-http-method-override": "DELETE"}, {"x_token": "zzz"},
     {"content-type": "application/x-www-form-urlencoded", "content-length": "9"}],
)  # fmt: skip
def test_the_decision_cache_tells_an_ambiguous_request_from_a_plain_one(extra: dict[str, str]):
    """The authz server's cache keyed only the policy's headers: a request with an override
    header (or a form body, or an underscore name) got the cached answer of the same request
    without it."""
    the_pod = pod()
    cache: DecisionCache[bool] = DecisionCache()
    plain = Request("shop/web-1", APP, 15020, "POST", "/quitquitquit", {})
    assert cache.get(plain, the_pod, lambda: decide(plain, the_pod).allowed)
    ambiguous = Request("shop/web-1", APP, 15020, "POST", "/quitquitquit", extra)
    assert not cache.get(ambiguous, the_pod, lambda: decide(ambiguous, the_pod).allowed)


def test_ambiguity_is_denied_in_audit_mode_whoever_sends_it():
    """Ambiguity comes before attribution: a request from an unknown source (allowed,
    flagged, in audit mode) with an ambiguous path is denied, as the native engine's static
    filter denies it before any rule."""
    unknown = Request("shop/web-1", "127.0.100.9", 8080, "GET", "/api/..;/admin", {})
    decision = decide(unknown, pod("audit"))
    assert (decision.allowed, decision.kind) == (False, Reason.AMBIGUOUS_PATH)
    plain = Request("shop/web-1", "127.0.100.9", 8080, "GET", "/api/x", {})
    assert decide(plain, pod("audit")).kind is Reason.AUDIT
