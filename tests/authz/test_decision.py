"""The L7 decision: default deny, rules by source/port/method/path/headers, audit mode."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.admitted import Admitted
from meshguard.authz.decision import PodPolicy, Request, decide
from meshguard.policy import Mode, parse_policy

POLICY = """
rules:
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: [app, cache]
    to: app
    ports: [8080]
    http: {methods: [GET], paths: ["/api/*"], headers: {x-token: s3cret}}
  - from: log-shipper
    to: app
    ports: [9090]
"""
STATUS = json.dumps(
    {"listener": {"sources": {"app": ["127.0.100.1", "fd6d:6775::1"],
                              "cache": ["127.0.100.2", "fd6d:6775::2"],
                              "log-shipper": ["127.0.100.3", "fd6d:6775::3"]}}}
)  # fmt: skip


def pod(mode: str = "enforce", policy: str = POLICY) -> PodPolicy:
    return PodPolicy.from_pod(
        key="shop/web-1",
        annotations={
            "meshguard.io/policy": policy,
            "meshguard.io/mode": mode,
            "meshguard.io/status": STATUS,
        },
        ports={8080: "app", 9090: "app"},
    )


def req(
    source: str = "127.0.100.1",
    port: int = 15020,
    method: str = "POST",
    path: str = "/quitquitquit",
    headers: dict[str, str] | None = None,
) -> Request:
    return Request("shop/web-1", source, port, method, path, headers or {})


@pytest.mark.parametrize(
    ("request_", "allowed", "reason"),
    [
        (req(), True, "allowed by rules[0]"),
        (req(source="fd6d:6775::1"), True, "allowed by rules[0]"),
        (req(path="/quitquitquit?now=1"), True, "allowed by rules[0]"),
        (req(method="GET"), False, "no rule allows app -> proxy:15020 GET /quitquitquit"),
        (req(path="/quitquitquit/../logging"), False, "ambiguous path: dot segment"),
        (
            req(port=8080, method="GET", path="/api/../admin", headers={"x-token": "s3cret"}),
            False,
            "ambiguous path: dot segment",
        ),
        (
            req(port=8080, method="GET", path="/api/%2e%2e/admin", headers={"x-token": "s3cret"}),
            False,
            "ambiguous path: percent-encoded dot",
        ),
        (req(path="//quitquitquit"), False, "ambiguous path: empty segment (//)"),
        (
            req(port=8080, method="GET", path="/api/..;/admin", headers={"x-token": "s3cret"}),
            False,
            "ambiguous path: path parameter in a dot segment",
        ),
        (
            req(source="127.0.100.2", method="GET", path="/debug/config_dump"),
            False,
            "no rule allows cache -> proxy:15020",
        ),
        (req(source="127.0.0.1"), False, "unknown source address '127.0.0.1'"),
        (
            req(port=8080, method="GET", path="/api/v1", headers={"x-token": "s3cret"}),
            True,
            "rules[1]",
        ),
        (
            req(port=8080, method="GET", path="/api/v1", headers={"x-token": "nope"}),
            False,
            "no rule",
        ),
        (
            req(port=8080, method="GET", path="/apiv1", headers={"x-token": "s3cret"}),
            False,
            "no rule",
        ),
        (
            req(
                source="127.0.100.2",
                port=8080,
                method="GET",
                path="/api/",
                headers={"x-token": "s3cret"},
            ),
            True,
            "rules[1]",
        ),
        (req(source="127.0.100.3", port=9090, method="DELETE", path="/anything"), True, "rules[2]"),
        (
            Request("shop/web-1", "127.0.100.1", 15020, None, None, {}),
            False,
            "no HTTP method or path",
        ),
        (Request("shop/web-1", "127.0.100.1", None, "POST", "/", {}), False, "no destination port"),
        (req(path="/" + "a" * 9000), False, "path too long"),
    ],
)
def test_decisions(request_: Request, allowed: bool, reason: str):
    decision = decide(request_, pod())
    assert decision.allowed is allowed
    assert reason in decision.reason
    assert decision.audited is False


def test_unknown_pod_is_denied():
    decision = decide(req(), None)
    assert not decision.allowed
    assert decision.reason.startswith("unknown pod 'shop/web-1'")


def test_audit_mode_allows_and_flags_what_it_would_deny():
    decision = decide(req(method="GET"), pod(mode="audit"))
    assert decision.allowed and decision.audited
    assert decision.reason.startswith("audit: would deny: no rule allows app -> proxy:15020 GET")
    assert decide(req(), pod(mode="audit")).audited is False


def test_default_allow_allows_unmatched_known_sources_only():
    policy = pod(policy="defaultAction: allow")
    assert decide(req(method="GET"), policy).allowed
    assert not decide(req(source="127.0.0.9"), policy).allowed


@settings(max_examples=300, deadline=None)
@given(
    source=st.none()
    | st.sampled_from(["127.0.100.1", "127.0.100.3", "::1"])
    | st.text(max_size=20),
    port=st.none() | st.integers(0, 70000),
    method=st.none() | st.sampled_from(["GET", "POST", "get"]) | st.text(max_size=10),
    path=st.none() | st.text(max_size=50),
    headers=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5),
)
def test_any_request_gets_a_decision_with_a_reason(source, port, method, path, headers):
    decision = decide(Request("shop/web-1", source, port, method, path, headers), pod())
    assert decision.reason
    if decision.allowed:
        assert decision.reason.startswith("allowed by rules[")


# --- what was admitted is what is enforced -----------------------------------------------


def admitted_pod(*, admitted_mode: str, live: dict[str, str], record_edit=None) -> PodPolicy:
    """A pod whose status holds the webhook's record of POLICY in ``admitted_mode``, with
    ``live`` policy/mode annotations edited after admission."""
    record = Admitted(policy=parse_policy(POLICY), mode=Mode(admitted_mode)).to_document()
    if record_edit is not None:
        record_edit(record)
    status = {**json.loads(STATUS), "admitted": record}
    return PodPolicy.from_pod(
        key="shop/web-1",
        annotations={**live, "meshguard.io/status": json.dumps(status)},
        ports={8080: "app", 9090: "app"},
    )


@pytest.mark.parametrize(
    "live",
    [
        {"meshguard.io/policy": POLICY, "meshguard.io/mode": "audit"},
        {"meshguard.io/policy": "defaultAction: allow"},
        {"meshguard.io/policy": "rules: [{from: app, to: proxy, ports: [15020]}]"},
        {},
    ],
    ids=["mode-audit", "default-allow", "wider-rule", "removed"],
)
def test_live_annotations_never_widen_the_admitted_policy(live):
    policy = admitted_pod(admitted_mode="enforce", live=live)
    assert policy.admitted and policy.mode.value == "enforce"
    decision = decide(req(method="GET"), policy)
    assert (decision.allowed, decision.audited) == (False, False)
    assert decision.reason == "no rule allows app -> proxy:15020 GET /quitquitquit"
    assert decide(req(), policy).reason == "allowed by rules[0]"
    assert bool(policy.drift) is (live != {"meshguard.io/policy": POLICY})


def test_a_record_that_does_not_verify_denies_everything():
    policy = admitted_pod(
        admitted_mode="enforce",
        live={"meshguard.io/mode": "audit"},
        record_edit=lambda r: r.update(mode="audit"),
    )
    for request_ in (req(), req(method="GET")):
        decision = decide(request_, policy)
        assert (decision.allowed, decision.audited) == (False, False)
        assert decision.reason.startswith("pod 'shop/web-1' refused: meshguard.io/status")
        assert "digest mismatch" in decision.reason


@pytest.mark.parametrize(
    ("port", "method", "path", "allowed"),
    [
        (15021, "GET", "/healthz/ready", True),  # an app waiting for its proxy
        (15020, "POST", "/quitquitquit", True),  # a Job stopping its proxy
        (15021, "GET", "/stats/prometheus", False),
        (15020, "GET", "/quitquitquit", False),
        (15020, "GET", "/debug/config_dump", False),
        (15000, "POST", "/quitquitquit", False),  # Envoy's admin port stays closed
    ],
)
def test_istio_s_patterns_are_allowed_to_every_container_and_close_with_a_flag(
    port, method, path, allowed
):
    """cache has no rule of its own to the proxy: only Istio's documented patterns pass,
    and ``istioPatterns: false`` closes them too."""
    request_ = req(source="127.0.100.2", port=port, method=method, path=path)
    assert decide(request_, pod()).allowed is allowed
    closed = pod(policy=POLICY + "istioPatterns: false\n")
    assert decide(request_, closed).allowed is False
