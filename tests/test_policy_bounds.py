"""The work a policy costs is bounded, not only its text (issue: a 9.5 KB policy of YAML
aliases cost the webhook 6.4 s and 679 MiB; 200 containers and one rule of 10,000 ports,
1.9 s and 304 MiB).

Properties (hypothesis) of :func:`meshguard.policy.parse_policy` and the compiler: whatever
the text, a policy within every limit or a :class:`~meshguard.errors.PolicyError` — a
:class:`~meshguard.errors.LimitError` naming the limit and the field when a limit is what
is exceeded — never another exception; no anchor or alias is ever expanded; what compiles
holds at most ``MAX_EXPANSION`` grants and ``MAX_RULESET_BYTES`` of ruleset. The authz
server applies the same limits to the admitted record it reads back, and never parses the
policy of a pod that holds no admitted record. Time and memory are measured in
``benchmarks/admission_bounds.py``, not here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard import annotation_keys, policy
from meshguard.admitted import Admitted, TamperedError
from meshguard.attestation import subject_of
from meshguard.authz import decision
from meshguard.authz.store import policy_of
from meshguard.errors import LimitError, PolicyError
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.policy import (
    MAX_HTTP_ENTRIES,
    MAX_PORTS,
    MAX_PORTS_PER_RULE,
    MAX_RULES,
    MAX_SOURCES_PER_RULE,
    Mode,
    Policy,
    parse_policy,
)
from meshguard.rules.compiler import MAX_EXPANSION, MAX_RULESET_BYTES
from tests.support.keys import SIGNER, TRUSTED
from tests.support.pods import injected_example, wide_example

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def within_limits(parsed: Policy) -> bool:
    return (
        len(parsed.rules) <= MAX_RULES
        and sum(len(r.ports) for r in parsed.rules) <= MAX_PORTS
        and all(len(r.ports) <= MAX_PORTS_PER_RULE for r in parsed.rules)
        and all(len(r.sources) <= MAX_SOURCES_PER_RULE for r in parsed.rules)
        and all(
            r.http is None
            or max(len(r.http.methods), len(r.http.paths), len(r.http.headers)) <= MAX_HTTP_ENTRIES
            for r in parsed.rules
        )
    )


_YAMLISH = st.text(alphabet="&*<: -[]{},\n\"'rulesfomtp0123456789abc!|>#%@`", max_size=400)


@FAST
@given(_YAMLISH)
def test_any_text_gives_a_bounded_policy_or_a_policy_error(text: str):
    try:
        parsed = parse_policy(text)
    except PolicyError as exc:
        assert str(exc).startswith(annotation_keys.POLICY)
        return
    assert within_limits(parsed)


def rule_document(*, ports: int, sources: int = 1, paths: int = 0) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "from": [f"s{i}" for i in range(sources)],
        "to": "app",
        "ports": list(range(1, ports + 1)),
    }
    if paths:
        rule["http"] = {"paths": [f"/p{i}" for i in range(paths)]}
    return rule


@FAST
@given(
    rules=st.integers(0, 2 * MAX_RULES),
    ports=st.integers(1, 2 * MAX_PORTS_PER_RULE),
    sources=st.integers(1, 2 * MAX_SOURCES_PER_RULE),
    paths=st.integers(0, 2 * MAX_HTTP_ENTRIES),
    as_yaml=st.booleans(),
)
def test_counts_past_a_limit_are_refused_naming_the_limit_and_the_field(
    rules: int, ports: int, sources: int, paths: int, as_yaml: bool
):
    document = {"rules": [rule_document(ports=ports, sources=sources, paths=paths)] * rules}
    text = json.dumps(document, indent=None if not as_yaml else 1)
    if len(text.encode()) > policy.MAX_POLICY_BYTES:
        with pytest.raises(LimitError, match="at most 64 KiB"):
            parse_policy(text)
        return
    over = {
        "rules": rules > MAX_RULES,
        ".ports": rules and ports > MAX_PORTS_PER_RULE,
        "rules[*].ports": rules <= MAX_RULES and ports * rules > MAX_PORTS,
        ".from": rules and sources > MAX_SOURCES_PER_RULE,
        ".http.paths": rules and paths > MAX_HTTP_ENTRIES,
    }
    if not any(over.values()):
        assert within_limits(parse_policy(text))
        return
    with pytest.raises(LimitError) as caught:
        parse_policy(text)
    message = str(caught.value)
    assert "meshguard's limit" in message
    for field, exceeded in over.items():
        if exceeded:
            assert field in message, (field, message)


_KEY = st.sampled_from(["defaultAction", "rules", "from", "to", "ports", "x"])


@FAST
@given(
    anchor=st.text(alphabet="abcxyz019", min_size=1, max_size=6),
    copies=st.integers(1, 2000),
    merge=st.booleans(),
)
def test_anchors_and_aliases_are_refused_before_anything_is_expanded(
    anchor: str, copies: int, merge: bool
):
    base = f"- &{anchor} {{from: a, to: b, ports: [{', '.join(map(str, range(1, 200)))}]}}\n"
    alias = f"- {{<<: *{anchor}}}\n" if merge else f"- *{anchor}\n"
    text = "rules:\n" + base + alias * min(copies, 60_000 // len(alias))
    with pytest.raises(LimitError, match="anchor or alias at line 2") as caught:
        parse_policy(text)
    assert "write each value out" in str(caught.value)


def test_the_reported_alias_bomb_is_refused():
    ports = ", ".join(map(str, range(1, 1001)))
    text = f"x: &r {{from: a, to: b, ports: [{ports}]}}\nrules: [" + ", ".join(["*r"] * 1500) + "]"
    assert len(text) < 16 * 1024
    with pytest.raises(LimitError, match="anchor or alias"):
        parse_policy(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"rules": [{"from": "a", "to": "b", "ports": [' + "1" * 5000 + "]}]}", "4300 digits"),
        ("rules: [{from: a, to: b, ports: [" + "9" * 5000 + "]}]", "4300 digits"),
        ('{"rules": ' + "[" * 50_000, "nested too deeply"),
        ("rules: " + "[" * 20_000, "nesting depth"),
    ],
    ids=["json-huge-int", "yaml-huge-int", "json-deep", "yaml-deep"],
)
def test_texts_that_would_crash_a_reader_get_a_policy_error(text: str, reason: str):
    with pytest.raises(PolicyError, match=reason):
        parse_policy(text)


# --- what the policy expands to in a pod --------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    containers=st.integers(0, 40),
    ports=st.integers(1, MAX_PORTS_PER_RULE),
    protocol=st.sampled_from(["tcp", "udp", "any"]),
)
def test_what_compiles_stays_within_the_expansion_and_size_limits(
    containers: int, ports: int, protocol: str
):
    text = json.dumps(
        {
            "rules": [
                {"from": "*", "to": "app", "ports": list(range(30000, 30000 + ports)),
                 "protocol": protocol}
            ]
        }
    )  # fmt: skip
    pod = wide_example(containers, policy=text)
    try:
        inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    except LimitError as exc:
        assert f"at most {MAX_EXPANSION} grants" in str(exc) or "compiled ruleset" in str(exc)
        return
    ruleset = pod["metadata"]["annotations"][annotation_keys.RULESET]
    assert len(ruleset) <= MAX_RULESET_BYTES


def test_the_reported_wide_pod_is_refused_by_its_expansion():
    """200 containers and one rule from '*': refused for the grants it would make, even when
    each list is within its own limit."""
    text = json.dumps({"rules": [{"from": "*", "to": "app", "ports": list(range(1000, 1256))}]})
    pod = wide_example(200, policy=text)
    with pytest.raises(LimitError, match=r"got '5\d{4} grants'.*at most 4096 grants"):
        inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))


# --- the authz server's reading -----------------------------------------------------------


def test_an_admitted_record_beyond_the_limits_is_refused_not_built():
    # beyond the author's limit and the room left for Istio's two patterns (meshguard's own)
    big = {"rules": [rule_document(ports=1)] * (MAX_RULES + 3)}
    record = {**Admitted(policy=Policy(), mode=Mode.ENFORCE).to_document(), "policy": big}
    with pytest.raises(TamperedError, match="at most 128 rules"):
        Admitted.from_document(record)


def test_the_authz_store_never_parses_the_policy_of_a_pod_without_an_admitted_record(
    monkeypatch: pytest.MonkeyPatch,
):
    pod = injected_example()
    status = json.loads(pod["metadata"]["annotations"][annotation_keys.STATUS])
    del status["admitted"]
    pod["metadata"]["annotations"][annotation_keys.STATUS] = json.dumps(status)
    pod["metadata"]["annotations"][annotation_keys.POLICY] = "rules: [" + "*r, " * 3000 + "]"

    def parse(text: str | None) -> Policy:
        raise AssertionError(f"parsed an unadmitted pod's policy: {text!r:.40}")

    monkeypatch.setattr(decision, "parse_policy", parse)
    # signed as the webhook signs (the record was never in it): the store's own rule refuses it
    metadata = pod["metadata"]
    annotations = metadata["annotations"]
    annotations[annotation_keys.ATTESTATION] = SIGNER.attest(
        subject=subject_of(metadata=metadata, spec=pod["spec"]),
        annotations={k: v for k, v in annotations.items() if k != annotation_keys.ATTESTATION},
    )
    got = policy_of(pod, trusted=TRUSTED)
    assert got.refused and "no admitted policy record" in got.refused


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"from": "a" * 2000, "to": "b", "ports": [1]}, "rules[0].from"),
        ({"from": "a", "to": "b", "ports": [1], "http": {"paths": ["/" + "p" * 2000]}},
         "rules[0].http.paths"),
        ({"from": "a", "to": "b", "ports": [1],
          "http": {"headers": {**{f"h{i}": "v" for i in range(40)}, "last": "v" * 2000}}},
         "rules[0].http.headers"),
    ],
    ids=["name", "path", "header-value"],
)  # fmt: skip
def test_long_strings_are_refused_naming_the_field(rule: dict[str, Any], field: str):
    with pytest.raises(
        LimitError, match=rf"{re.escape(field)}: got '200[01] characters'.*at most 1024 characters"
    ):
        parse_policy(json.dumps({"rules": [rule]}))
