"""A logged packet attributed to its pod (meshguard/cni/denials.py): source container from
the uid and the admitted status, destination from the declared ports, the proxy's range or
meshguard's listener, the verdict from the rule's prefix; one JSON line per denial; the
counters' exposition, their bound and a pod's series forgotten with it."""

from __future__ import annotations

import json

import pytest

from meshguard.cni.denials import (
    AUDIT_PREFIX,
    DENY_PREFIX,
    DenialCounters,
    PodView,
    attribute,
)
from meshguard.cni.nflog import Logged
from meshguard.status import ListenerStatus, PodStatus, ProxyStatus

STATUS = PodStatus(
    containers={"app": 1000, "cache": 1001, "logs": 1002},
    proxy=ProxyStatus(uid=1337, gid=1337),
    listener=ListenerStatus(port=15081),
)
POD = PodView(namespace="demo", name="shop", status=STATUS, ports={8080: "app", 6379: "cache"})


def logged(*, uid: int | None, dport: int | None, prefix: str = DENY_PREFIX) -> Logged:
    return Logged(group=7, prefix=prefix, uid=uid, gid=uid, family="ipv4", protocol="tcp",
                  source="127.0.0.1", destination="127.0.0.1", dport=dport)  # fmt: skip


@pytest.mark.parametrize(
    ("uid", "dport", "source", "destination"),
    [(1002, 6379, "logs", "cache"), (1000, 15000, "app", "istio-proxy"),
     (1337, 8080, "istio-proxy", "app"), (1001, 15081, "cache", "meshguard-listener"),
     (4242, 9999, "uid 4242", "port 9999"), (None, None, "unknown", "unknown")],
)  # fmt: skip
def test_a_denial_names_its_source_and_destination(uid, dport, source, destination):
    denial = attribute(logged(uid=uid, dport=dport), POD)
    assert denial is not None
    assert (denial.source, denial.destination, denial.verdict) == (source, destination, "denied")


def test_the_verdict_comes_from_the_prefix_and_other_prefixes_are_not_meshguards():
    audit = attribute(logged(uid=1000, dport=6379, prefix=AUDIT_PREFIX), POD)
    assert audit is not None and audit.verdict == "would-deny"
    assert attribute(logged(uid=1000, dport=6379, prefix="someone else"), POD) is None


def test_containers_sharing_a_uid_are_all_named():
    shared = PodView(namespace="demo", name="shop", ports={},
                     status=PodStatus(containers={"b": 5, "a": 5}))  # fmt: skip
    denial = attribute(logged(uid=5, dport=1), shared)
    assert denial is not None and denial.source == "a+b"


def test_one_json_line_per_denial():
    denial = attribute(logged(uid=1002, dport=6379), POD)
    assert denial is not None
    line = denial.json_line()
    assert "\n" not in line
    assert json.loads(line) == {
        "event": "loopback-denial", "namespace": "demo", "pod": "shop", "source": "logs",
        "destination": "cache", "port": 6379, "protocol": "tcp", "family": "ipv4",
        "verdict": "denied", "uid": 1002,
    }  # fmt: skip


def test_counters_are_exposed_bounded_and_forgotten_with_their_pod():
    counters = DenialCounters(max_series=2)
    for uid, dport in ((1002, 6379), (1002, 6379), (1000, 6379), (1001, 8080)):
        denial = attribute(logged(uid=uid, dport=dport), POD)
        assert denial is not None
        counters.add(denial)
    text = counters.exposition()
    assert "# TYPE meshguard_loopback_denials_total counter" in text
    assert ('meshguard_loopback_denials_total{namespace="demo",pod="shop",source="logs",'
            'destination="cache",verdict="denied"} 2') in text  # fmt: skip
    # the third series is past the bound: counted as overflow
    assert ('meshguard_loopback_denials_total{namespace="overflow",pod="overflow",'
            'source="overflow",destination="overflow",verdict="overflow"} 1') in text  # fmt: skip
    counters.forget(namespace="demo", pod="shop")
    assert 'pod="shop"' not in counters.exposition()


def test_label_values_are_escaped():
    odd = PodView(namespace="demo", name='we"ird\\pod', status=STATUS, ports={})
    counters = DenialCounters()
    denial = attribute(logged(uid=1000, dport=1), odd)
    assert denial is not None
    counters.add(denial)
    assert 'pod="we\\"ird\\\\pod"' in counters.exposition()
