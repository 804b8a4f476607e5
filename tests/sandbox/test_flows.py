"""The demo's flow plan: what the example pod's policy says about each flow (no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import meshguard
from meshguard.pod import read_pod
from meshguard.policy import parse_policy
from meshguard.rules.ruleset import Family
from meshguard.sandbox import demo
from meshguard.sandbox.flows import audit_flows, plan

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def example_plan(policy: str | None = None):
    pod = yaml.safe_load(EXAMPLE.read_text())
    text = policy if policy is not None else pod["metadata"]["annotations"]["meshguard.io/policy"]
    return plan(read_pod(metadata=pod["metadata"], spec=pod["spec"]), parse_policy(text))


def expected(flows, source: str, to: str, port: int, kind: str = "l4") -> set[str]:
    return {
        f.expected for f in flows if (f.kind, f.source, f.to, f.port) == (kind, source, to, port)
    }


@pytest.mark.parametrize(
    ("source", "to", "port", "outcome"),
    [
        ("app", "app", 8080, "allow"),  # own port
        ("app", "cache", 6379, "allow"),  # rules[1]
        ("log-shipper", "app", 9090, "allow"),  # rules[0]
        ("app", "log-shipper", 5140, "allow"),  # rules[2], udp
        ("cache", "app", 8080, "deny"),
        ("log-shipper", "cache", 6379, "deny"),
        ("app", "proxy", 15000, "deny"),  # Envoy's admin API
        ("cache", "proxy", 15090, "deny"),  # Envoy's statistics
        ("proxy", "app", 8080, "allow"),
        ("other-uid", "app", 8080, "deny"),
        ("proxy-gid-only", "cache", 6379, "deny"),
    ],
)
def test_l4_expectations_follow_the_policy(source, to, port, outcome):
    assert expected(example_plan().flows, source, to, port) == {outcome}


def test_l7_covered_ports_are_tried_as_requests_not_connections():
    flows = example_plan().flows
    assert expected(flows, "app", "proxy", 15020) == set()
    l7 = [f for f in flows if f.kind == "l7"]
    assert {(f.method, f.path, f.expected) for f in l7} == {
        ("POST", "/quitquitquit", "allow"),
        ("GET", "/healthz/ready", "allow"),  # Istio's patterns: every container
        ("PATCH", "/meshguard-demo-denied", "deny"),
    }
    assert expected(flows, "cache", "proxy", 15021, kind="l7") == {"allow", "deny"}
    assert {f.family for f in l7} == set(Family)


def test_envoy_admin_is_not_tried_over_ipv6_where_nothing_listens():
    flows = example_plan().flows
    assert {f.family for f in flows if f.port == 15000} == {Family.IPV4}


def test_default_allow_still_protects_the_proxy():
    flows = example_plan("defaultAction: allow").flows
    assert expected(flows, "cache", "app", 8080) == {"allow"}
    assert expected(flows, "cache", "proxy", 15000) == {"deny"}


def test_mesh_flows_land_on_the_proxys_capture_ports():
    mesh = [f for f in example_plan().flows if f.kind == "mesh"]
    assert {(f.to, f.lands_on) for f in mesh} == {("outbound", 15001), ("dns", 15053)}
    assert "proxy-gid-only" not in {f.source for f in mesh}


def test_audit_mode_turns_one_denied_l4_and_one_denied_l7_flow_into_allowed():
    chosen = audit_flows(example_plan())
    assert [(f.kind, f.expected) for f in chosen] == [("audit", "allow"), ("audit", "allow")]
    assert {f.protocol for f in chosen} == {"tcp", "http"}


def test_demo_without_root_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.root_problem() == (
        "meshguard demo needs root (network namespaces, iptables, processes under other uids)"
    )
