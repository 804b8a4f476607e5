"""Parsing of the meshguard annotations: good shapes, and errors that say what is wrong."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.errors import PolicyError
from meshguard.policy import (
    ISTIO_PATTERNS,
    Action,
    Mode,
    Policy,
    Protocol,
    check_names,
    control_port_warnings,
    parse_mode,
    parse_opt_out,
    parse_policy,
    with_istio_patterns,
)

DESIGN_EXAMPLE = """
defaultAction: deny
rules:
  - from: log-shipper          # container name(s) or "*"
    to: app                    # container name, or "proxy"
    ports: [9090]
  - from: app
    to: cache
    ports: [6379]
  - from: app                  # a Job stopping its sidecar: L7 rule -> ext_authz
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
"""


def test_design_example_parses():
    policy = parse_policy(DESIGN_EXAMPLE)
    assert policy.default_action is Action.DENY
    assert [(r.sources, r.to, r.ports) for r in policy.rules] == [
        (("log-shipper",), "app", (9090,)),
        (("app",), "cache", (6379,)),
        (("app",), "proxy", (15020,)),
        *((r.sources, r.to, r.ports) for r in ISTIO_PATTERNS),
    ]
    assert policy.rules[2].http is not None
    assert policy.rules[2].http.methods == ("POST",)
    assert policy.rules[2].http.paths == ("/quitquitquit",)


def test_json_is_accepted_and_equals_yaml():
    as_json = json.dumps(yaml.safe_load(DESIGN_EXAMPLE))
    assert parse_policy(as_json) == parse_policy(DESIGN_EXAMPLE)


def test_absent_or_empty_policy_is_default_deny_with_only_istio_s_patterns():
    for text in (None, "", "   \n"):
        policy = parse_policy(text)
        assert policy.default_action is Action.DENY
        assert policy.rules == ISTIO_PATTERNS


def test_istio_s_documented_patterns_are_allowed_by_default_and_only_those_requests():
    ready, quit_ = parse_policy(None).rules
    assert (ready.sources, ready.to, ready.ports) == (("*",), "proxy", (15021,))
    assert ready.http is not None
    assert (ready.http.methods, ready.http.paths) == (("GET",), ("/healthz/ready",))
    assert (quit_.sources, quit_.to, quit_.ports) == (("*",), "proxy", (15020,))
    assert quit_.http is not None
    assert (quit_.http.methods, quit_.http.paths) == (("POST",), ("/quitquitquit",))


def test_istio_patterns_false_closes_them_and_a_bad_value_is_refused():
    assert parse_policy("istioPatterns: false").rules == ()
    with pytest.raises(PolicyError, match="istioPatterns: got 'no', expected true or false"):
        parse_policy("istioPatterns: 'no'")


def test_istio_patterns_are_added_once_whatever_the_parse_count():
    policy = parse_policy(None)
    again = Policy.model_validate(policy.model_dump(mode="json", by_alias=True))
    assert with_istio_patterns(again) == policy


def test_lists_wildcards_protocols_and_method_case():
    policy = parse_policy(
        "rules: [{from: [a, b], to: c, ports: [2, 1, 2], protocol: any},"
        " {from: '*', to: c, ports: [3], protocol: udp},"
        " {from: a, to: proxy, ports: [15000], http: {methods: [get], paths: ['/stats*'],"
        "  headers: {X-Token: abc}}}]"
    )
    first, second, third, *patterns = policy.rules
    assert tuple(patterns) == ISTIO_PATTERNS
    assert first.sources == ("a", "b")
    assert first.ports == (1, 2)
    assert first.protocols == (Protocol.TCP, Protocol.UDP)
    assert second.sources == ("*",)
    assert second.protocols == (Protocol.UDP,)
    assert third.http is not None
    assert third.http.methods == ("GET",)
    assert dict(third.http.headers) == {"x-token": "abc"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rules: [{from: a, to: b, ports: [70000]}]",
            "meshguard.io/policy: rules[0].ports[0]: got 70000, expected a port number"
            " (integer 1-65535)",
        ),
        ("rules: [{from: a, to: b, ports: [0]}]", "rules[0].ports[0]: got 0"),
        ("rules: [{from: a, to: b, ports: ['80']}]", "rules[0].ports[0]: got '80'"),
        ("rules: [{from: a, to: b, ports: [true]}]", "rules[0].ports[0]: got True"),
        ("rules: [{from: a, to: b, ports: []}]", "rules[0].ports: got [], expected a non-empty"),
        ("rules: [{to: b, ports: [1]}]", "rules[0].from: got nothing, expected a container name"),
        (
            "rules: [{from: a, to: b, ports: [1], prot: tcp}]",
            "rules[0].prot: got 'prot', expected one of the known fields (from, to, ports,"
            " protocol, http)",
        ),
        ("defaultAction: maybe", "defaultAction: got 'maybe', expected 'deny' or 'allow'"),
        ("rules: [{from: a, to: b, ports: [1], protocol: icmp}]", "rules[0].protocol: got 'icmp'"),
        ("rules: [{from: proxy, to: b, ports: [1]}]", "'proxy' is never restricted"),
        ("rules: [{from: ['*', a], to: b, ports: [1]}]", "'*' already means every container"),
        ("rules: [{from: a, to: '*', ports: [1]}]", "rules[0].to: got '*'"),
        ("rules: [{from: a, to: b, ports: [1], protocol: udp, http: {}}]", "must use protocol tcp"),
        ("rules: [{from: a, to: b, ports: [1], http: {methods: [FETCH]}}]", "'FETCH'"),
        ("rules: [{from: a, to: b, ports: [1], http: {paths: [nope]}}]", "bad path 'nope'"),
        ("rules: [{from: a, to: b, ports: [1], http: {paths: ['/a*b']}}]", "bad path '/a*b'"),
        ("[1, 2]", "got [1, 2], expected a mapping (defaultAction, rules)"),
        ("{rules: [", "expected valid YAML or JSON"),
        ("rules: 5", "rules: got 5"),
    ],
)
def test_bad_policies_name_annotation_field_value_and_expectation(text: str, expected: str):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    message = str(caught.value)
    assert message.startswith("meshguard.io/policy: ")
    assert expected in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(PolicyError) as caught:
        parse_policy("rules: [{from: a, to: b, ports: [0]}, {from: a, to: b, ports: [99999]}]")
    assert [p.path for p in caught.value.problems] == ["rules[0].ports[0]", "rules[1].ports[0]"]


def test_oversized_policy_is_refused():
    with pytest.raises(PolicyError, match="at most 64 KiB"):
        parse_policy("rules: []\n" + "#" * 70_000)


def test_unknown_container_names_are_errors_listing_the_pods_containers():
    policy = parse_policy("rules: [{from: [app, ghost], to: cach, ports: [1]}]")
    with pytest.raises(PolicyError) as caught:
        check_names(policy, containers=["app", "cache"])
    message = str(caught.value)
    assert (
        "rules[0].from[1]: got 'ghost', expected a container of this pod (app, cache) or '*'"
        in (message)
    )
    assert "rules[0].to: got 'cach', expected a container of this pod (app, cache) or 'proxy'" in (
        message
    )


def test_known_names_and_proxy_pass():
    check_names(parse_policy(DESIGN_EXAMPLE), containers=["app", "cache", "log-shipper"])


def test_mode_and_opt_out_annotations():
    assert parse_mode(None) is Mode.ENFORCE
    assert parse_mode("Audit") is Mode.AUDIT
    with pytest.raises(PolicyError, match=r"meshguard\.io/mode: got 'log', expected 'enforce' or"):
        parse_mode("log")
    assert parse_opt_out(None) is False
    assert parse_opt_out("false") is True
    assert parse_opt_out("true") is False
    with pytest.raises(PolicyError, match=r"meshguard\.io/inject: got 'no'"):
        parse_opt_out("no")


# --- property-based: whatever the text, a policy or a PolicyError, never anything else ------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 70_000), st.text(max_size=12), st.floats()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_rule_like = st.fixed_dictionaries(
    {},
    optional={
        "from": st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3), _values),
        "to": st.one_of(st.text(max_size=8), _values),
        "ports": st.one_of(st.lists(st.integers(-5, 70_000), max_size=4), _values),
        "protocol": st.one_of(st.sampled_from(["tcp", "udp", "any", "sctp"]), _values),
        "http": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "methods": st.lists(st.sampled_from(["GET", "post", "BREW", 3]), max_size=3),
                    "paths": st.lists(st.sampled_from(["/", "/a*", "x", "/a*b", ""]), max_size=3),
                },
            ),
            _values,
        ),
        "extra": _values,
    },
)
_policy_like = st.fixed_dictionaries(
    {},
    optional={
        "defaultAction": st.one_of(st.sampled_from(["deny", "allow", "DENY"]), _values),
        "rules": st.one_of(st.lists(_rule_like, max_size=4), _values),
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), _policy_like.map(json.dumps), _values.map(json.dumps)))
def test_any_text_gives_a_policy_or_a_policy_error(text: str):
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        assert str(exc).startswith("meshguard.io/policy: ")
        assert exc.problems
        for problem in exc.problems:
            assert problem.expected
    else:
        for rule in policy.rules:
            assert rule.ports
            assert all(1 <= port <= 65535 for port in rule.ports)
            assert rule.sources


@pytest.mark.parametrize(
    ("protocol", "action", "mode"),
    [("TCP", "ALLOW", "AUDIT"), ("Tcp", "Allow", "Audit"), (" tcp ", "allow", " audit ")],
)
def test_keywords_are_case_insensitive_like_the_mode(protocol: str, action: str, mode: str):
    policy = parse_policy(
        f"defaultAction: '{action}'\n"
        f"rules: [{{from: a, to: b, ports: [1], protocol: '{protocol}'}}]"
    )
    assert policy.rules[0].protocol is Protocol.TCP
    assert policy.default_action.value == "allow"
    assert parse_mode(mode).value == "audit"


def test_a_misspelled_keyword_is_still_refused():
    with pytest.raises(PolicyError, match=r"rules\[0\]\.protocol"):
        parse_policy("rules: [{from: a, to: b, ports: [1], protocol: tcpp}]")


def test_control_port_warnings_name_each_whole_control_port():
    policy = parse_policy(
        "rules: [{from: app, to: proxy, ports: [15000, 15021]},"
        " {from: app, to: proxy, ports: [15020], http: {paths: [/quitquitquit]}},"
        " {from: app, to: cache, ports: [6379]}]"
    )
    warnings = control_port_warnings(policy)
    assert len(warnings) == 2
    assert warnings[0].startswith("rules[0]: opens the proxy's port 15000 to app — Envoy's admin")
    assert "15021" in warnings[1]
