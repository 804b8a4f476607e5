"""The two L7 engines decide alike, through the real Envoy on the real kernel path.

One generated corpus (sources x ports x methods x paths x headers, with every ambiguity
class: paths, method overrides, underscore header names, method case, form bodies, a
spoofed X-Forwarded-For) is sent by the containers' uids through Istio's capture and
meshguard's REDIRECT + SNAT to the loopback listener of the real Envoy, once with the native
engine (the pod's RBAC document, ECDS from its file) and once with the ext_authz engine
(``meshguard serve-authz``), in enforce and audit mode, on each netfilter backend. Every
request must get the same allow/deny from both. The native engine's decisions are also
visible: one JSON line per request naming the source container and the rule, and a 403 body
naming the reason.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard.l7 import DecisionLog, L7Engine
from meshguard.rbac import AMBIGUOUS_METHOD, AMBIGUOUS_PATH, NO_POLICY
from tests.authz.test_envoy_e2e import (
    APP,
    CACHE,
    H2C_PORT,
    LOGS,
    RAW_TARGETS,
    L7Pod,
    l7_sandbox,
)
from tests.support.netfilter import Netfilter

pytestmark = pytest.mark.root

POLICY = """
rules:
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: cache
    to: app
    ports: [8080]
    http: {methods: [GET, HEAD], paths: ["/api/*", "/public/*", "/health"]}
  - from: "*"
    to: app
    ports: [8080]
    http: {methods: [PUT, POST], paths: ["/items/*"], headers: {x-token: abc}}
  - from: log-shipper
    to: app
    ports: [9090]
"""
UIDS = (APP, CACHE, LOGS)
PORTS = (8080, 15020, 9090)
METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "gEt")
PATHS = (
    "/quitquitquit", "/quitquitquit?now=1", "/quitquitquit;x", "/api/items", "/api;v=2/items",
    "/api/items;v=2", "/public/ok", "/health", "/health/x", "/healthz", "/admin",
    "/items/1", "/items", "/public/%2e%2e;/private", "/public/..;/private", "/public/private.",
    "/public/%252e", "/public/caf%c3%a9", "/public/%ef%bc%8e", "/public/%c0%ae",
    "/public/a%20/b", "//api/x", "/api/x?_method=DELETE", "/api/x?a=1&%5Fmethod=put",
    "/api/x?q=%2e%2e", "/items/1?_METHOD=DELETE", "/public/%e2%80%ae", "/api/%41",
)  # fmt: skip
HEADERS: tuple[dict[str, str], ...] = (
    {},
    {"x-token": "abc"},
    {"x-token": "zzz"},
    {"x-token": "abc", "x-http-method-override": "DELETE"},
    {"x-method-override": "GET"},
    {"x-token": "abc", "x_token": "zzz"},
    {"x-token": "abc", "content-type": "application/x-www-form-urlencoded"},
    {"x-token": "abc", "content-type": "Multipart/Form-Data; boundary=x"},
    {"x-token": "abc", "content-type": "application/json"},
    {"x-forwarded-for": "127.0.100.2"},
)
SAMPLE = 300


def corpus() -> list[tuple[int, int, str, str, dict[str, str]]]:
    """A bounded, deterministic sample of the product, plus every red-team path of the e2e
    suite that an HTTP client can send, from the source a rule allows."""
    product = list(itertools.product(UIDS, PORTS, METHODS, PATHS, range(len(HEADERS))))
    picked = random.Random(25).sample(product, SAMPLE)
    requests = [(uid, port, method, path, HEADERS[h]) for uid, port, method, path, h in picked]
    sendable = [t for t in RAW_TARGETS if t.startswith("/") and " " not in t and "#" not in t]
    requests += [(CACHE, 8080, "GET", target, {}) for target in sendable]
    return requests


def outcome(result: dict[str, Any]) -> str:
    """allow (past the engine: the upstream answered 200, or 501 for a method the echo
    server does not implement, or Envoy's 502 when the upstream broke the exchange), deny
    (403 from either engine, 400 from Envoy's own checks before either engine), or what
    else happened (a 503 would be ext_authz giving no decision)."""
    if result.get("status") in {200, 501, 502}:
        return "allow"
    if result.get("status") in {400, 403} or result.get("result") == "deny":
        return "deny"
    return f"{result.get('result')}:{result.get('status')}"


def run(pod: L7Pod, requests: list[tuple[int, int, str, str, dict[str, str]]]) -> list[str]:
    outcomes: dict[int, str] = {}
    for uid in UIDS:
        mine = [(i, r) for i, r in enumerate(requests) if r[0] == uid]
        targets = [
            {"protocol": "http", "host": "127.0.0.1", "port": port, "method": method,
             "path": path, "headers": headers}
            for _, (_, port, method, path, headers) in mine
        ]  # fmt: skip
        results = pod.box.probe(uid=uid, gid=uid, targets=targets)
        outcomes.update((i, outcome(r)) for (i, _), r in zip(mine, results, strict=True))
    return [outcomes[i] for i in range(len(requests))]


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_both_engines_give_the_same_decision_on_every_request(
    mode: str, netfilter: Netfilter, tmp_path: Path, shared_dir: Path
):
    requests = corpus()
    decided: dict[L7Engine, list[str]] = {}
    for engine in (L7Engine.NATIVE, L7Engine.EXT_AUTHZ):
        work = tmp_path / engine.value
        work.mkdir()
        with l7_sandbox(
            mode=mode, netfilter=netfilter, shared=shared_dir, tmp_path=work, engine=engine,
            policy=POLICY,
        ) as pod:  # fmt: skip
            decided[engine] = run(pod, requests)
    native, ext_authz = decided[L7Engine.NATIVE], decided[L7Engine.EXT_AUTHZ]
    differ = [
        (request, a, b) for request, a, b in zip(requests, native, ext_authz, strict=True) if a != b
    ]
    assert not differ, differ[:20]
    # the corpus exercises both answers (and the ambiguity classes deny in audit mode too)
    assert {"allow", "deny"} <= set(native), set(native)
    assert not any(o.startswith(("error", "timeout")) for o in native), set(native)


@pytest.fixture
def native_pod(tmp_path: Path, shared_dir: Path) -> Iterator[L7Pod]:
    with l7_sandbox(
        mode="enforce", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=L7Engine.NATIVE, policy=POLICY,
    ) as pod:  # fmt: skip
        yield pod


def lines_after(pod: L7Pod, count: int) -> list[dict[str, Any]]:
    """The native decision lines, once ``count`` are written (Envoy flushes its access log
    every 100 ms in the sandbox)."""
    deadline = time.monotonic() + 10
    while len(pod.native_lines()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return pod.native_lines()


def test_native_decisions_are_json_lines_naming_container_rule_and_reason(native_pod: L7Pod):
    allowed = native_pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/x")
    denied = native_pod.http(CACHE, host="127.0.0.1", port=8080, method="DELETE", path="/api/x")
    hidden = native_pod.http(
        CACHE, host="127.0.0.1", port=8080, method="GET", path="/public/%2e%2e;/private"
    )
    assert (allowed["status"], denied["status"], hidden["status"]) == (200, 403, 403)
    assert denied["body"] == "meshguard: denied: rbac_access_denied_matched_policy[none]\n"
    assert hidden["body"] == (
        f"meshguard: denied: rbac_access_denied_matched_policy[{AMBIGUOUS_PATH}]\n"
    )
    first, second, third = lines_after(native_pod, 3)
    assert {k: first[k] for k in ("pod", "source", "port", "method", "path", "code", "rule")} == {
        "pod": "demo/shop", "source": "cache", "port": 8080, "method": "GET",
        "path": "/api/x", "code": 200, "rule": "rules[001]/cache",
    }  # fmt: skip
    assert (second["source"], second["code"], second["rule"]) == ("cache", 403, None)
    assert second["details"] == "rbac_access_denied_matched_policy[none]"
    assert third["details"] == f"rbac_access_denied_matched_policy[{AMBIGUOUS_PATH}]"
    assert first["source_address"].startswith("127.0.100.")
    # IPv6 and the pod's own addresses take the same path (fd6d:6775::N sources)
    for host in ("::1", "10.1.2.3", "fd00:10::3"):
        got = native_pod.http(CACHE, host=host, port=8080, method="GET", path="/api/x")
        assert (got["status"], got.get("server")) == (200, "app"), (host, got)
        denied = native_pod.http(CACHE, host=host, port=8080, method="PUT", path="/api/x")
        assert denied["status"] == 403, (host, denied)


def test_native_audit_lines_flag_would_be_denials(tmp_path: Path, shared_dir: Path):
    with l7_sandbox(
        mode="audit", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=L7Engine.NATIVE, policy=POLICY,
    ) as pod:  # fmt: skip
        allowed = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/x")
        would_deny = pod.http(CACHE, host="127.0.0.1", port=8080, method="PUT", path="/api/x")
        ambiguous = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET",
                             path="/api/x?_method=DELETE")  # fmt: skip
        first, second, third = lines_after(pod, 3)
    assert (allowed["status"], would_deny["status"], ambiguous["status"]) == (200, 200, 403)
    assert (first["audit"], first["audit_rule"], first["source"]) == (
        "allowed", "rules[001]/cache", "cache",
    )  # fmt: skip
    assert (second["audit"], second["audit_rule"], second["code"]) == ("allowed", None, 200)
    assert third["details"] == f"rbac_access_denied_matched_policy[{AMBIGUOUS_METHOD}]"


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_a_denied_decision_log_writes_denials_and_would_be_denials_only(
    mode: str, tmp_path: Path, shared_dir: Path
):
    """``--decision-log denied``: no line for an allowed request (nor, in audit mode, for
    one a rule would allow); a line for every denial, ambiguity included, and for every
    would-be denial."""
    with l7_sandbox(
        mode=mode, netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=L7Engine.NATIVE, policy=POLICY, decision_log=DecisionLog.DENIED,
    ) as pod:  # fmt: skip
        allowed = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/x")
        denied = pod.http(CACHE, host="127.0.0.1", port=8080, method="PUT", path="/api/x")
        pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/y")
        ambiguous = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET",
                             path="/public/%2e%2e;/private")  # fmt: skip
        # the last request is allowed: once the lines of the two before it are written, a
        # line of the allowed ones would be there too (one log, written in order)
        pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/z")
        lines = lines_after(pod, 2)
        time.sleep(0.5)
        lines = pod.native_lines()
    assert allowed["status"] == 200
    assert denied["status"] == (403 if mode == "enforce" else 200)
    assert ambiguous["status"] == 403
    assert [(line["method"], line["path"]) for line in lines] == [
        ("PUT", "/api/x"), ("GET", "/public/..;/private"),  # as Envoy normalized it
    ], lines  # fmt: skip
    first, second = lines
    assert (first["source"], first["rule"]) == ("cache", None)
    if mode == "audit":
        assert (first["code"], first["audit"], first["audit_rule"]) == (200, "allowed", None)
    else:
        assert first["details"] == "rbac_access_denied_matched_policy[none]"
    assert second["details"] == f"rbac_access_denied_matched_policy[{AMBIGUOUS_PATH}]"


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_a_denied_decision_log_leaves_an_upstreams_own_403_to_its_mode(
    mode: str, tmp_path: Path, shared_dir: Path
):
    """``--decision-log denied`` and an app that answers 403 itself: in enforce mode the
    403 of a request a rule let through carries that rule, so it gets no line, while a
    policy denial beside it still gets one; in audit mode likewise for the rule that would
    have let it through, while a would-be denial the app answered 403 gets its line,
    ``details`` ``via_upstream``. The client gets the app's 403 as the app wrote it."""
    with l7_sandbox(
        mode=mode, netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=L7Engine.NATIVE, policy=POLICY, decision_log=DecisionLog.DENIED,
        app_forbids=("/api/forbidden", "/items/forbidden"),
    ) as pod:  # fmt: skip
        by_path = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET",
                           path="/api/forbidden")  # fmt: skip
        by_header = pod.http(CACHE, host="127.0.0.1", port=8080, method="PUT",
                             path="/items/forbidden/1", headers={"x-token": "abc"})  # fmt: skip
        no_rule = pod.http(CACHE, host="127.0.0.1", port=8080, method="PUT",
                           path="/api/forbidden")  # fmt: skip
        ambiguous = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET",
                             path="/api/forbidden?_method=DELETE")  # fmt: skip
        # allowed and answered 200: once the lines before it are written, a line of the
        # allowed 403s would be there too (one log, written in order)
        pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/z")
        lines_after(pod, 2)
        time.sleep(0.5)
        lines = pod.native_lines()
    # the app's own 403 reaches the client as the app wrote it (no local reply body)
    for got, method, path in [
        (by_path, "GET", "/api/forbidden"), (by_header, "PUT", "/items/forbidden/1"),
    ]:  # fmt: skip
        assert got["status"] == 403, got
        assert {k: json.loads(got["body"])[k] for k in ("server", "method", "path")} == {
            "server": "app", "method": method, "path": path,
        }, got  # fmt: skip
    assert ambiguous["status"] == 403
    assert ambiguous["body"] == (
        f"meshguard: denied: rbac_access_denied_matched_policy[{AMBIGUOUS_METHOD}]\n"
    )
    fields = ("method", "path", "code", "rule", "details")
    if mode == "enforce":
        assert no_rule["body"] == "meshguard: denied: rbac_access_denied_matched_policy[none]\n"
        assert [{k: line[k] for k in fields} for line in lines] == [
            {"method": "PUT", "path": "/api/forbidden", "code": 403, "rule": None,
             "details": "rbac_access_denied_matched_policy[none]"},
            {"method": "GET", "path": "/api/forbidden?_method=DELETE", "code": 403,
             "rule": None,
             "details": f"rbac_access_denied_matched_policy[{AMBIGUOUS_METHOD}]"},
        ], lines  # fmt: skip
        return
    assert (no_rule["status"], json.loads(no_rule["body"])["server"]) == (403, "app")
    fields += ("audit", "audit_rule")
    assert [{k: line[k] for k in fields} for line in lines] == [
        {"method": "PUT", "path": "/api/forbidden", "code": 403, "rule": None,
         "details": "via_upstream", "audit": "allowed", "audit_rule": None},
        {"method": "GET", "path": "/api/forbidden?_method=DELETE", "code": 403, "rule": None,
         "details": f"rbac_access_denied_matched_policy[{AMBIGUOUS_METHOD}]",
         "audit": None, "audit_rule": None},  # denied before the pod's rules ran
    ], lines  # fmt: skip


@pytest.mark.parametrize(
    ("content", "decision_log"),
    [
        ("", DecisionLog.ALL),
        ("not json", DecisionLog.ALL),
        ('{"resources": []}', DecisionLog.ALL),
        (json.dumps({"resources": [{"x": 1}]}), DecisionLog.ALL),
        ("not json", DecisionLog.DENIED),  # its denials are denials: logged
    ],
)
def test_a_broken_rbac_document_fails_closed_with_a_named_reason(
    content: str, decision_log: DecisionLog, tmp_path: Path, shared_dir: Path
):
    """The file read at startup is empty, malformed or of the wrong shape: Envoy keeps the
    listener and serves the filter's default config, which denies every request naming why
    (never allows)."""
    with l7_sandbox(
        mode="enforce", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir,
        tmp_path=tmp_path, engine=L7Engine.NATIVE, policy=POLICY, rbac_text=content,
        decision_log=decision_log,
    ) as pod:  # fmt: skip
        got = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/x")
        (line,) = lines_after(pod, 1)
    assert got["status"] == 403, got
    assert got["body"] == f"meshguard: denied: rbac_access_denied_matched_policy[{NO_POLICY}]\n"
    assert line["details"] == f"rbac_access_denied_matched_policy[{NO_POLICY}]"


@pytest.mark.parametrize("engine", [L7Engine.NATIVE, L7Engine.EXT_AUTHZ], ids=str)
def test_over_h2c_method_case_overrides_and_underscore_names_do_not_pass(
    engine: L7Engine, tmp_path: Path, shared_dir: Path
):
    """Issue 23.5 over HTTP/2, where no HTTP/1 parser refuses them first: ``:method: gEt``
    against a GET rule (the backend sees gEt), an override header, ``x_token`` beside a
    header rule's name."""
    with l7_sandbox(
        mode="enforce", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=engine,
    ) as pod:  # fmt: skip

        def ask(method: str, **headers: str) -> int:
            got = pod.h2c(CACHE, host="127.0.0.1", port=H2C_PORT, method=method,
                          path="/api/items", headers=headers)  # fmt: skip
            return int(got.get("status") or 0)

        assert ask("GET") == 200
        assert ask("gEt") == 403
        assert ask("get") == 403
        assert ask("GET", **{"x-http-method-override": "DELETE"}) == 403
        assert ask("GET", x_token="zzz") in {400, 403, 0}  # refused (0: stream reset)
