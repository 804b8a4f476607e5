"""Real enforcement: Istio's capture rules, then meshguard's, in a network namespace.

Each container of the example pod runs an echo server under its own uid; probes under
every uid try every port over 127.0.0.1, 127.0.0.2, the pod IP, ::1, the pod's IPv6 and
::ffff:127.0.0.1, TCP and UDP. The expected outcome of every flow is written out here by
hand (not derived from the compiler, ``tests/support/matrix.py``), including where Istio's own
capture sends a flow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard.rules.ruleset import Family
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.matrix import (
    APP,
    CACHE,
    DESTINATIONS,
    LOGS,
    OWNER,
    PROXY,
    PROXY_UID,
    SERVERS,
    SOURCE_ADDRESS,
    STRANGERS,
    check_matrix,
    example_pod,
)
from tests.support.netfilter import NETFILTERS, Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox, Server, compile_for, pod_sandbox
from tests.support.samples import pod_of_uids
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root

CLUSTER_DNS = "10.96.0.10"


@pytest.fixture(params=NETFILTERS, ids=str)
def sandbox(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PodSandbox]:
    # IPv6: the capture that redirects outbound TCP to ports 31000/32000 (any address).
    istio = {Family.IPV4: "ipnets.golden", Family.IPV6: "ipv6-outbound-ports.golden"}
    netfilter: Netfilter = request.param
    nft = matrix_capture_nft() if netfilter is Netfilter.NFTABLES else None
    with pod_sandbox(
        compile_for(pod_for(example_pod(), netfilter)),
        tmp_path,
        istio=istio,
        netfilter=netfilter,
        istio_nft=nft,
    ) as box:
        for server in SERVERS:
            box.serve(server)
        yield box


@pytest.mark.parametrize("server", [APP, LOGS, CACHE], ids=lambda s: s.name)
def test_container_reaches_exactly_what_the_policy_allows(sandbox: PodSandbox, server: Server):
    assert check_matrix(sandbox, server.name, server.uid, server.gid) == len(DESTINATIONS) * len(
        OWNER
    )


def test_proxy_uid_reaches_everything_but_hairpins(sandbox: PodSandbox):
    check_matrix(sandbox, "proxy", PROXY_UID, PROXY_UID)


@pytest.mark.parametrize("name", sorted(STRANGERS))
def test_identities_of_no_container_are_denied_everything(sandbox: PodSandbox, name: str):
    uid, gid, groups = STRANGERS[name]
    check_matrix(sandbox, name, uid, gid, groups)


def test_l7_flows_land_on_the_listener_with_the_source_containers_address(sandbox: PodSandbox):
    targets = [
        {"host": "127.0.0.1", "port": 15020},
        {"host": "10.1.2.3", "port": 15020},
        {"host": "::1", "port": 15020},
        {"host": "fd00:10::3", "port": 15020},
    ]
    results = sandbox.probe(uid=APP.uid, gid=APP.gid, targets=targets)
    v4, v6 = SOURCE_ADDRESS["app"]
    assert [(r["server"], r["port"], r["peer"]) for r in results] == [
        ("proxy", 15007, v4), ("proxy", 15007, v4), ("proxy", 15007, v6), ("proxy", 15007, v6),
    ]  # fmt: skip
    # A direct connection to the listener is not a redirected flow: refused.
    direct = sandbox.probe(uid=APP.uid, gid=APP.gid, targets=[{"host": "127.0.0.1", "port": 15007}])
    assert direct[0]["result"] == "deny"


def test_istio_outbound_capture_still_works_for_every_uid(sandbox: PodSandbox):
    targets = [{"host": "10.0.0.5", "port": 80}, {"host": "2001:db8::5", "port": 32000}]
    for uid, gid in [(APP.uid, APP.gid), (CACHE.uid, CACHE.gid), (4242, 4242)]:
        results = sandbox.probe(uid=uid, gid=gid, targets=targets)
        assert [(r["result"], r.get("server"), r.get("port")) for r in results] == [
            ("allow", "proxy", 15001), ("allow", "proxy", 15001),
        ], uid  # fmt: skip


#: Istio's own traffic: outbound capture (v4, v6), the proxy's traffic, inbound delivery.
CAPTURE_FLOWS = [
    (APP, {"host": "10.0.0.5", "port": 80}),
    (APP, {"host": "2001:db8::5", "port": 32000}),
    (CACHE, {"host": "10.0.0.5", "port": 80}),
    (PROXY, {"host": "127.0.0.1", "port": 8080}),
    (PROXY, {"host": "10.1.2.3", "port": 8080, "source": "127.0.0.6"}),  # inbound delivery
]
#: The proxy dialing the pod's own address: Istio sends it to the inbound listener (15006).
HAIRPIN_FLOWS = [
    (PROXY, {"host": "10.1.2.3", "port": 8080}),
    (PROXY, {"host": "fd00:10::3", "port": 9090}),
]


def _capture_outcomes(
    box: PodSandbox, flows: list[tuple[Server, dict[str, Any]]] = CAPTURE_FLOWS
) -> list[tuple[str, str | None, int | None]]:
    outcomes = []
    for server, target in flows:
        (got,) = box.probe(uid=server.uid, gid=server.gid, targets=[target])
        outcomes.append((got["result"], got.get("server"), got.get("port")))
    return outcomes


def test_istio_capture_behaves_exactly_as_without_meshguard(sandbox: PodSandbox, tmp_path: Path):
    with_meshguard = _capture_outcomes(sandbox)
    hairpins = _capture_outcomes(sandbox, HAIRPIN_FLOWS)
    with NetworkNamespace() as ns:
        istio_only = PodSandbox(ns=ns, ruleset=sandbox.ruleset, ruleset_file=tmp_path / "unused")
        istio_only.load_istio("ipnets.golden", families=[Family.IPV4])
        istio_only.load_istio("ipv6-outbound-ports.golden", families=[Family.IPV6])
        for server in SERVERS:
            istio_only.serve(server)
        without = _capture_outcomes(istio_only)
        hairpins_without = _capture_outcomes(istio_only, HAIRPIN_FLOWS)
    assert with_meshguard == without
    assert ("allow", "proxy", 15001) in without  # the comparison covers the outbound capture
    # The one difference: Istio alone lets the proxy dial the pod itself (to its inbound
    # listener, which delivers to any port); meshguard refuses such hairpins here.
    assert hairpins_without == [("allow", "proxy", 15006)] * 2
    assert [outcome[0] for outcome in hairpins] == ["deny", "deny"]


def test_envoy_inbound_delivery_from_127_0_0_6_reaches_the_app(sandbox: PodSandbox):
    results = sandbox.probe(
        uid=PROXY_UID, gid=PROXY_UID,
        targets=[{"host": "10.1.2.3", "port": 8080, "source": "127.0.0.6"}],
    )  # fmt: skip
    got = results[0]
    assert (got["result"], got["server"], got["port"], got["peer"]) == (
        "allow", "app", 8080, "127.0.0.6",
    )  # fmt: skip


def test_dns_capture_to_15053_works_on_top_of_istio_dns_rules(tmp_path: Path):
    # dns-uid-gid.golden is Istio's capture with DNS on, for a proxy running as uid 3 / gid 1,
    # recorded with nameserver 127.0.0.53; a pod's nameserver is the cluster DNS Service.
    pod = example_pod()
    proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")
    proxy["securityContext"].update(runAsUser=3, runAsGroup=1)
    with pod_sandbox(compile_for(pod), tmp_path, istio={}) as box:
        (v4, _) = golden_payloads("dns-uid-gid.golden")
        for payload in v4:
            box.ns.run(["iptables-restore", "--noflush"], stdin=payload.replace(
                "127.0.0.53/32", f"{CLUSTER_DNS}/32"))  # fmt: skip
        box.meshguard_init()  # again, so that its hooks come first
        box.serve(APP)
        box.serve(Server("proxy", 3, 1, tcp=(15053, 15000), udp=(15053,)))
        dns = [
            {"host": CLUSTER_DNS, "port": 53, "protocol": "udp"},
            {"host": CLUSTER_DNS, "port": 53, "protocol": "tcp"},
            {"host": "127.0.0.1", "port": 15053, "protocol": "udp"},  # direct: not a capture
            {"host": "127.0.0.1", "port": 15000, "protocol": "tcp"},  # admin port
        ]
        app = box.probe(uid=APP.uid, gid=APP.gid, targets=dns)
        assert [(r["result"], r.get("port")) for r in app] == [
            ("allow", 15053), ("allow", 15053), ("deny", None), ("deny", None),
        ]  # fmt: skip
        # uid 4 is exempt from Istio's capture in this configuration, but it is no container
        # and not the proxy: meshguard denies it on loopback.
        other = box.probe(uid=4, gid=4, targets=dns[2:])
        assert [r["result"] for r in other] == ["deny", "deny"]
        proxy_view = box.probe(uid=3, gid=1, targets=dns[2:])
        assert [r["result"] for r in proxy_view] == ["allow", "allow"]


def test_audit_mode_logs_and_lets_flows_through(tmp_path: Path):
    pod = example_pod()
    pod["metadata"]["annotations"]["meshguard.io/mode"] = "audit"
    with pod_sandbox(compile_for(pod), tmp_path, istio={Family.IPV4: "ipnets.golden"}) as box:
        box.serve(APP)
        box.serve(PROXY)
        results = box.probe(
            uid=CACHE.uid, gid=CACHE.gid,
            targets=[{"host": "127.0.0.1", "port": 8080}, {"host": "127.0.0.1", "port": 15000}],
        )  # fmt: skip
        assert [r["result"] for r in results] == ["allow", "allow"]
        counters = box.ns.run(["iptables", "-L", "MESHGUARD_DENY", "-v", "-x", "-n"])
        log_line = next(line for line in counters.splitlines() if "LOG" in line)
        assert int(log_line.split()[0]) >= 2, counters  # both would-be denials were logged


def test_meshguard_hooks_run_before_istio_output(sandbox: PodSandbox):
    if sandbox.netfilter is Netfilter.NFTABLES:
        listing = json.loads(sandbox.ns.run(["nft", "-j", "list", "chains"]))
        nat_output = {
            (c["chain"]["table"], c["chain"]["name"]): c["chain"]["prio"]
            for c in listing["nftables"]
            if "chain" in c and c["chain"].get("hook") == "output" and c["chain"]["type"] == "nat"
        }
        # meshguard's nat output (the L7 redirect, the un-NATed local flows) runs first.
        assert nat_output == {
            ("istio-proxy-nat", "output"): -100,
            ("meshguard", "nat_output"): -110,
        }
        return
    for family in Family:
        save = sandbox.save(family)
        nat = save[save.index("*nat") :]
        output_jumps = [line for line in nat.splitlines() if line.startswith("-A OUTPUT ")]
        assert output_jumps[:2] == [
            "-A OUTPUT -j MESHGUARD_REDIRECT",
            "-A OUTPUT -j ISTIO_OUTPUT",
        ], family


def test_uid_range_dispatch_in_the_kernel(tmp_path: Path):
    # 9 containers on every other uid: dispatched through uid-range chains whose ranges also
    # hold uids of no container (3001, 3009), which must still be denied.
    uids = [3000 + 2 * i for i in range(9)]
    pod = pod_of_uids(example_pod(), uids)
    ruleset = compile_for(pod)
    assert "MESHGUARD_UIDS1_3000" in ruleset.family(Family.IPV4).payload()
    with pod_sandbox(ruleset, tmp_path, istio={Family.IPV4: "ipnets.golden"}) as box:
        servers = [Server(f"c{i:02d}", uid, uid, tcp=(7000 + i,)) for i, uid in enumerate(uids)]
        for server in servers:
            box.serve(server)
        targets = [{"host": "127.0.0.1", "port": s.tcp[0]} for s in servers]
        for index, server in enumerate(servers):
            results = box.probe(uid=server.uid, gid=server.gid, targets=targets)
            assert [r["result"] for r in results] == [
                "allow" if i == index else "deny" for i in range(len(servers))
            ], server
        for stranger in (2999, 3001, 3009, 3015, 3017):
            results = box.probe(uid=stranger, gid=stranger, targets=targets)
            assert {r["result"] for r in results} == {"deny"}, stranger
