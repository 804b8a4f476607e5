"""meshguard's rules report their denials to NFLOG (issue 26 item 2), in all three backends.

The example pod's rules, installed by the real ``meshguard init`` beside Istio's real
capture, in a network namespace; echo servers under the containers' uids; meshguard's own
NFLOG reader (:mod:`meshguard.cni.nflog`) bound to the rules' group in that namespace. A
connection the policy denies is reported with the deny prefix, the sender's uid, the port
and protocol, and is still refused; an allowed one is not reported; in audit mode the
would-be denial is reported with the audit prefix and the connection goes through; a flood
of denials is reported at most at the rules' rate (the ``limit`` before NFLOG). Without the
group (``CompilerSettings(denial_log_group=None)``) no NFLOG rule exists.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshguard.cni.nflog import Group, Logged, open_group
from meshguard.pod import read_pod
from meshguard.rules.compiler import compile_pod
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.rules.settings import (
    AUDIT_PREFIX,
    DENIAL_LOG_BURST,
    DENIAL_LOG_GROUP,
    DENY_PREFIX,
    CompilerSettings,
)
from tests.support.matrix import APP, CACHE, LOGS, SERVERS, example_pod
from tests.support.netfilter import NETFILTERS, Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox, pod_sandbox

pytestmark = pytest.mark.root

#: A port of app's that cache may not reach (the example policy opens 8080/9090 to others).
DENIED = {"host": "127.0.0.1", "port": 8080, "protocol": "tcp", "timeout": 1.0}
RATE_PER_SECOND = 10


def ruleset_for(netfilter: Netfilter, *, mode: str, settings: CompilerSettings) -> Ruleset:
    pod: dict[str, Any] = pod_for(example_pod(), netfilter)
    pod["metadata"]["annotations"]["meshguard.io/mode"] = mode
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    return compile_pod(view, settings=settings, native_nftables=netfilter is Netfilter.NFTABLES)


@pytest.fixture
def box_factory(tmp_path: Path) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:

        def make(
            netfilter: Netfilter, *, mode: str = "enforce", settings: CompilerSettings | None = None
        ) -> PodSandbox:
            istio = {Family.IPV4: "ipnets.golden", Family.IPV6: "ipv6-outbound-ports.golden"}
            nft = matrix_capture_nft() if netfilter is Netfilter.NFTABLES else None
            ruleset = ruleset_for(netfilter, mode=mode, settings=settings or CompilerSettings())
            box = stack.enter_context(
                pod_sandbox(ruleset, tmp_path, istio=istio, netfilter=netfilter, istio_nft=nft)
            )
            for server in SERVERS:
                box.serve(server)
            return box

        yield make


def listen(box: PodSandbox) -> Any:
    return open_group(f"/var/run/netns/{box.ns.name}", group=DENIAL_LOG_GROUP)


def drain(group: Group, *, until: int = 1) -> list[Logged]:
    """What the group got: waits (bounded) for ``until`` packets, then takes what is left."""
    logged: list[Logged] = []
    for _ in range(10):
        logged += group.read(timeout=0.3)
        if len(logged) >= until:
            break
    return logged + group.read(timeout=0.3)


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_a_denied_connection_is_reported_with_its_uid_and_port_and_still_refused(
    box_factory: Any, netfilter: Netfilter
) -> None:
    box = box_factory(netfilter)
    with listen(box) as group:
        results = box.probe(uid=CACHE.uid, gid=CACHE.gid, targets=[DENIED])
        logged = drain(group)
    assert [r["result"] for r in results] == ["deny"]
    assert logged, "no NFLOG message for a denied connection"
    assert {(p.prefix, p.uid, p.dport, p.protocol, p.family) for p in logged} == {
        (DENY_PREFIX, CACHE.uid, 8080, "tcp", "ipv4")
    }


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_allowed_traffic_is_not_reported(box_factory: Any, netfilter: Netfilter) -> None:
    box = box_factory(netfilter)
    allowed = [
        {"host": "127.0.0.1", "port": 9090, "protocol": "tcp", "timeout": 1.0},
        {"host": "::1", "port": 9090, "protocol": "tcp", "timeout": 1.0},
    ]
    with listen(box) as group:
        results = box.probe(uid=LOGS.uid, gid=LOGS.gid, targets=allowed)
        own = box.probe(
            uid=APP.uid,
            gid=APP.gid,
            targets=[{"host": "127.0.0.1", "port": 5140, "protocol": "udp", "timeout": 1.0}],
        )
        logged = group.read(timeout=0.5)
    assert [r["result"] for r in results + own] == ["allow"] * 3
    assert logged == []


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_audit_mode_reports_the_would_be_denial_and_lets_it_through(
    box_factory: Any, netfilter: Netfilter
) -> None:
    box = box_factory(netfilter, mode="audit")
    with listen(box) as group:
        results = box.probe(uid=CACHE.uid, gid=CACHE.gid, targets=[DENIED])
        logged = drain(group)
    assert [r["result"] for r in results] == ["allow"]
    assert logged
    assert {(p.prefix, p.uid, p.dport) for p in logged} == {(AUDIT_PREFIX, CACHE.uid, 8080)}


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_a_flood_of_denials_is_reported_at_most_at_the_rules_rate(
    box_factory: Any, netfilter: Netfilter
) -> None:
    box = box_factory(netfilter)
    flood = [{**DENIED, "protocol": "udp", "timeout": 0.2}] * 200
    with listen(box) as group:
        started = time.monotonic()
        results = box.probe(uid=CACHE.uid, gid=CACHE.gid, targets=flood)
        elapsed = time.monotonic() - started
        logged = drain(group, until=DENIAL_LOG_BURST)
    assert [r["result"] for r in results] == ["deny"] * len(flood)
    # A token bucket: the burst, then the rate over the time the flood took (and one token
    # that may have been refilling when it started).
    bound = DENIAL_LOG_BURST + math.ceil(RATE_PER_SECOND * elapsed) + 1
    assert DENIAL_LOG_BURST <= len(logged) <= bound < len(flood), (len(logged), elapsed)
    assert {p.prefix for p in logged} == {DENY_PREFIX}


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_without_the_group_no_rule_reports(box_factory: Any, netfilter: Netfilter) -> None:
    """The kernel-path baseline: ``denial_log_group=None`` compiles the rules without NFLOG;
    the denial is the same."""
    box = box_factory(netfilter, settings=replace(CompilerSettings(), denial_log_group=None))
    with listen(box) as group:
        results = box.probe(uid=CACHE.uid, gid=CACHE.gid, targets=[DENIED])
        logged = group.read(timeout=0.5)
    assert [r["result"] for r in results] == ["deny"]
    assert logged == []
