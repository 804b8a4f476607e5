"""The bypass classes an attack review found, each tried as an attacker in a pod would.

Real kernel, Istio's real capture rules (where marked, in each backend: iptables-nft,
iptables-legacy and Istio's native nftables), meshguard's rules installed by the real
``meshguard init``, one process per container under its uid. Every test here failed on the
rules before the fix (the attacker's flow got through); each tries several variants of its
class: addresses, families, ports, senders.

- locally delivered datagrams that never pass ``lo``: broadcast and multicast (README threat 5);
- a UDP conntrack entry of an allowed container reused by another uid (README threat 6);
- squatting the proxy's ports before Envoy binds them, over lo and eth0 (README threat 7);
- Istio's capture turning a flow between containers into one of the proxy (a relay), and
  the proxy dialing the pod itself (a hairpin) on behalf of an unknown container (README threat 7);
- the proxy's ports under ``defaultAction: allow`` (README: never reached directly).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.rules.ruleset import Family
from meshguard.sandbox.netns import (
    NetworkNamespace,
    PodAddresses,
    probe_command,
    record_command,
    serve_command,
)
from tests.support.netfilter import Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox, Server, client_namespace, compile_for, pod_sandbox
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
APP = Server("app", 1000, 1000, tcp=(8080, 9090))
LOGS = Server("log-shipper", 1001, 1001, udp=(5140,))
CACHE = Server("cache", 1002, 1002, tcp=(6379,))
STRANGER = (4242, 4242)  # a uid of no container
ISTIO = {Family.IPV4: "ipnets.golden", Family.IPV6: "ipv6-outbound-ports.golden"}


def example_pod(*, policy: dict[str, Any] | None = None, proxy: tuple[int, int] | None = None):
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(policy)
    if proxy is not None:
        istio_proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")
        istio_proxy["securityContext"].update(runAsUser=proxy[0], runAsGroup=proxy[1])
    return pod


@contextlib.contextmanager
def istio_sandbox(
    pod: dict[str, Any], tmp_path: Path, netfilter: Netfilter
) -> Iterator[PodSandbox]:
    """The pod as Istio injects it for ``netfilter``, Istio's capture of the enforcement
    matrix in that backend (:data:`ISTIO`, or its native nftables equivalent), meshguard's
    rules by the real meshguard-init."""
    nft = matrix_capture_nft() if netfilter is Netfilter.NFTABLES else None
    ruleset = compile_for(pod_for(pod, netfilter))
    with pod_sandbox(ruleset, tmp_path, istio=ISTIO, netfilter=netfilter, istio_nft=nft) as sandbox:
        yield sandbox


@contextlib.contextmanager
def recording(box: PodSandbox, *, uid: int, gid: int, udp=(), tcp=(), seconds: float = 2.5):
    """A process of uid/gid listening on the ports; yields the list it received, filled in
    when the block ends (the recorder stops by itself after ``seconds``)."""
    received: list[dict[str, Any]] = []
    process = box.ns.spawn(
        record_command(uid=uid, gid=gid, udp=udp, tcp=tcp, seconds=seconds), ready_line="ready"
    )
    yield received
    process.wait(timeout=seconds + 10)
    assert process.stdout is not None
    received.extend(json.loads(process.stdout.read()))


# --- 1. broadcast and multicast: delivered locally without passing lo ----------------------

BROADCASTS = [
    "10.1.2.255",  # the pod subnet's broadcast
    "255.255.255.255",  # limited broadcast
    "224.0.0.1",  # all-hosts multicast
    "ff02::1%eth0",  # IPv6 all-nodes, link scope
]


@pytest.fixture
def box(tmp_path: Path, netfilter: Netfilter) -> Iterator[PodSandbox]:
    with istio_sandbox(example_pod(), tmp_path, netfilter) as sandbox:
        yield sandbox


def _broadcast_targets(sender: str) -> list[dict[str, Any]]:
    return [
        {"host": host, "port": LOGS.udp[0], "protocol": "udp", "send_only": True,
         "mark": f"{sender}->{host}"}
        for host in BROADCASTS
    ]  # fmt: skip


def test_broadcast_and_multicast_reach_only_who_the_policy_allows(box: PodSandbox):
    # log-shipper listens on 5140/udp (wildcard, both families); app may send to it, cache
    # and a uid of no container may not.
    with recording(box, uid=LOGS.uid, gid=LOGS.gid, udp=LOGS.udp) as received:
        sent = {}
        for name, (uid, gid) in {
            "app": (APP.uid, APP.gid),
            "cache": (CACHE.uid, CACHE.gid),
            "stranger": STRANGER,
        }.items():
            sent[name] = box.probe(uid=uid, gid=gid, targets=_broadcast_targets(name))
    marks = {r["data"] for r in received}
    # The allowed sender's datagrams arrive over every kind of address: the test can see.
    assert {f"app->{host}" for host in BROADCASTS} <= marks, received
    assert [r["result"] for r in sent["app"]] == ["sent"] * len(BROADCASTS)
    leaked = sorted(m for m in marks if not m.startswith("app->"))
    assert not leaked, f"datagrams the policy denies were delivered: {leaked}"
    for name in ("cache", "stranger"):
        assert [r["result"] for r in sent[name]] == ["deny"] * len(BROADCASTS), sent[name]


# --- 2. UDP conntrack entries are no permission ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "source", "source_port"),
    [("127.0.0.1", "127.0.0.1", 40002), ("::1", "::1", 40003), ("10.1.2.3", "10.1.2.3", 40004),
     ("fd00:10::3", "fd00:10::3", 40005)],
)  # fmt: skip
def test_a_udp_flow_of_an_allowed_container_carries_no_other_uids_datagrams(
    box: PodSandbox, host: str, source: str, source_port: int
):
    box.serve(LOGS)
    flow = {"host": host, "port": 5140, "protocol": "udp", "source": source,
            "source_port": source_port}  # fmt: skip
    # app may send to log-shipper, and gets its answer (the reply passes as REPLY).
    (app,) = box.probe(uid=APP.uid, gid=APP.gid, targets=[flow])
    assert (app["result"], app.get("server")) == ("allow", "log-shipper"), app
    # Within the conntrack timeout, cache and a stranger bind the same source port and
    # send on the same 4-tuple: the entry is ESTABLISHED, but they are not app.
    for uid, gid in ((CACHE.uid, CACHE.gid), STRANGER):
        (other,) = box.probe(uid=uid, gid=gid, targets=[flow])
        assert other["result"] == "deny", (uid, other)
    # app still may, on the same entry.
    (again,) = box.probe(uid=APP.uid, gid=APP.gid, targets=[flow])
    assert again["result"] == "allow", again


# --- 3. squatting the proxy's ports before Envoy binds them ---------------------------------

PROXY_TCP = (15001, 15006, 15007, 15020, 15021, 15090)


def test_a_squatter_on_the_proxys_ports_gets_no_captured_connection(box: PodSandbox):
    # Envoy is not up (pod start, or a restart); cache listens on its ports first.
    box.serve(Server("squatter", CACHE.uid, CACHE.gid, tcp=PROXY_TCP))
    captured = [
        {"host": "10.0.0.5", "port": 80, "timeout": 1.0},  # outbound capture -> 15001
        {"host": "10.200.0.9", "port": 443, "timeout": 1.0},
        {"host": "2001:db8::5", "port": 32000, "timeout": 1.0},  # IPv6 capture -> 15001
    ]
    for uid, gid in ((APP.uid, APP.gid), (LOGS.uid, LOGS.gid)):
        results = box.probe(uid=uid, gid=gid, targets=captured)
        # The SYN reaches the squatter's socket, its SYN-ACK never leaves: no connection.
        assert {r["result"] for r in results} <= {"deny", "timeout"}, results
    # The squatter can neither answer from them directly over loopback (app's 15020 is
    # redirected to the listener port, where the squatter's answer is dropped too).
    direct = [{"host": "127.0.0.1", "port": port, "timeout": 1.0} for port in PROXY_TCP]
    results = box.probe(uid=APP.uid, gid=APP.gid, targets=direct)
    assert {r["result"] for r in results} <= {"deny", "timeout"}, results


def test_only_the_proxy_answers_from_the_proxys_ports(box: PodSandbox):
    # The same capture with the real proxy uid listening: the outbound flow works.
    box.serve(Server("proxy", 1337, 1337, tcp=(15001,)))
    results = box.probe(uid=APP.uid, gid=APP.gid, targets=[{"host": "10.0.0.5", "port": 80}])
    assert (results[0]["result"], results[0].get("server")) == ("allow", "proxy")


def test_a_squatter_on_the_dns_proxy_port_cannot_answer_captured_queries(tmp_path: Path):
    # Istio's DNS capture (proxy uid 3, gid 1), with the cluster DNS as the nameserver.
    pod = example_pod(proxy=(3, 1))
    with pod_sandbox(compile_for(pod), tmp_path, istio={}) as sandbox:
        _load_golden(sandbox, "dns-uid-gid.golden", {"127.0.0.53/32": "10.96.0.10/32"})
        sandbox.serve(Server("squatter", CACHE.uid, CACHE.gid, tcp=(15053,), udp=(15053,)))
        queries = [
            {"host": "10.96.0.10", "port": 53, "protocol": "udp", "timeout": 1.0},
            {"host": "10.96.0.10", "port": 53, "protocol": "tcp", "timeout": 1.0},
        ]
        results = sandbox.probe(uid=APP.uid, gid=APP.gid, targets=queries)
        assert all(r.get("server") != "squatter" for r in results), results


def test_a_squatter_on_the_inbound_port_cannot_answer_through_eth0(tmp_path: Path):
    # Istio's inbound capture sends every TCP connection arriving on eth0 to 15006; a client
    # in another namespace (another pod, across the veth) connects to the pod IP.
    ruleset = compile_for(example_pod())
    istio = {Family.IPV4: "inbound-ports-wildcard.golden"}
    with pod_sandbox(ruleset, tmp_path, istio=istio) as box, client_namespace(box) as client:
        squatter = box.ns.spawn(
            serve_command(name="squatter", uid=CACHE.uid, gid=CACHE.gid, tcp=(15006,), udp=()),
            ready_line="ready",
        )
        targets = [{"host": "10.1.2.3", "port": port, "timeout": 1.0} for port in (8080, 80)]
        results = json.loads(client.run(probe_command(uid=0, gid=0), stdin=json.dumps(targets)))
        assert all(r.get("server") != "squatter" for r in results), results
        assert {r["result"] for r in results} <= {"deny", "timeout"}, results
        # ... while the proxy itself answers inbound as before.
        box.ns.stop(squatter)
        box.serve(Server("proxy", 1337, 1337, tcp=(15006,)))
        results = json.loads(client.run(probe_command(uid=0, gid=0), stdin=json.dumps(targets)))
        assert [(r["result"], r.get("server"), r.get("port")) for r in results] == [
            ("allow", "proxy", 15006), ("allow", "proxy", 15006),
        ]  # fmt: skip


# --- 4. relays and hairpins through the proxy -----------------------------------------------


def _load_golden(box: PodSandbox, golden: str, replace: dict[str, str] | None = None) -> None:
    """Istio's rules (IPv4) loaded after meshguard's, then meshguard-init run again (as when
    istio-init runs first in a pod: meshguard's hooks come first)."""
    v4, _ = golden_payloads(golden)
    for original in v4:
        payload = original
        for old, new in (replace or {}).items():
            payload = payload.replace(old, new)
        box.ns.run(["iptables-restore", "--noflush"], stdin=payload)
    box.meshguard_init()


def test_istio_never_captures_a_flow_between_containers(tmp_path: Path):
    # Istio configured with 127.1.2.3/32 as an outbound range: every TCP flow there would go
    # to Envoy's outbound listener, which re-dials it as the proxy's uid.
    pod = example_pod(proxy=(3, 1))
    with pod_sandbox(compile_for(pod), tmp_path, istio={}) as box:
        _load_golden(box, "loopback-outbound-iprange.golden")
        box.serve(Server("proxy", 3, 1, tcp=(15001,)))
        box.serve(APP)
        box.serve(CACHE)
        flows = [
            {"host": "127.1.2.3", "port": 6379},  # app -> cache: the policy allows it
            {"host": "127.1.2.3", "port": 9999},  # nothing there
        ]
        app = box.probe(uid=APP.uid, gid=APP.gid, targets=flows)
        assert [(r["result"], r.get("server")) for r in app] == [
            ("allow", "cache"), ("deny", None),
        ]  # fmt: skip
        cache = box.probe(uid=CACHE.uid, gid=CACHE.gid,
                          targets=[{"host": "127.1.2.3", "port": 8080}])  # fmt: skip
        assert cache[0]["result"] == "deny", cache


def test_tcp_to_a_pod_address_on_port_53_is_not_handed_to_the_proxy(tmp_path: Path):
    # Istio with DNS capture and an outbound range that holds the pod IP (9.9.0.0/16): TCP to
    # <pod IP>:53 is not a nameserver, so Istio redirects it to Envoy (15001), which would
    # re-dial whatever listens on :53 in the pod as uid 1337.
    pod = example_pod(proxy=(3, 1))
    ruleset = compile_for(pod)
    ruleset_file = tmp_path / "ruleset"
    ruleset_file.write_text(ruleset.to_json())
    with NetworkNamespace(addresses=PodAddresses(ipv4="9.9.1.3", ipv6="fd00:9::3")) as ns:
        box = PodSandbox(ns=ns, ruleset=ruleset, ruleset_file=ruleset_file)
        box.meshguard_init()
        _load_golden(box, "ip-range.golden")
        box.serve(Server("proxy", 3, 1, tcp=(15001, 15053), udp=(15053,)))
        box.serve(Server("dns-in-cache", CACHE.uid, CACHE.gid, tcp=(53,)))
        for uid, gid in ((APP.uid, APP.gid), (LOGS.uid, LOGS.gid), STRANGER):
            results = box.probe(
                uid=uid, gid=gid,
                targets=[{"host": "9.9.1.3", "port": 53}, {"host": "127.0.0.2", "port": 53}],
            )  # fmt: skip
            assert [r["result"] for r in results] == ["deny", "deny"], (uid, results)
        # The outbound capture of a remote address in the range still goes to Envoy.
        (remote,) = box.probe(uid=APP.uid, gid=APP.gid, targets=[{"host": "9.9.7.7", "port": 53}])
        assert (remote["result"], remote.get("port")) == ("allow", 15001), remote


@pytest.mark.parametrize(
    ("host", "port", "opened"),
    [("10.1.2.3", 8080, True), ("fd00:10::3", 9090, True), ("127.0.0.2", 8080, True),
     ("10.1.2.3", 6379, False), ("fd00:10::3", 6379, False), ("127.0.0.2", 5140, False)],
)  # fmt: skip
def test_the_proxy_dialing_the_pod_itself_passes_only_to_ports_open_to_every_container(
    tmp_path: Path, host: str, port: int, opened: bool, netfilter: Netfilter
):
    # A container calling its own pod's Service is captured to Envoy, which dials the pod
    # IP; Istio sends that to the inbound listener (15006), which delivers to any port.
    policy = {"rules": [{"from": "*", "to": "app", "ports": [8080, 9090]}]}
    with istio_sandbox(example_pod(policy=policy), tmp_path, netfilter) as box:
        box.serve(Server("proxy", 1337, 1337, tcp=(15006,)))
        (result,) = box.probe(uid=1337, gid=1337, targets=[{"host": host, "port": port}])
    if opened:
        assert (result["result"], result.get("port")) == ("allow", 15006), result
    else:
        assert result["result"] == "deny", result


# --- 9. the proxy's ports under defaultAction: allow ----------------------------------------


def test_default_allow_never_opens_the_proxys_ports(tmp_path: Path, netfilter: Netfilter):
    # Istio's patterns closed: they would send 15020/15021 to the L7 listener (15007)
    pod = example_pod(policy={"defaultAction": "allow", "istioPatterns": False})
    with istio_sandbox(pod, tmp_path, netfilter) as box:
        ports = (15000, 15001, 15004, 15006, 15007, 15008, 15009, 15020, 15021, 15053, 15090)
        box.serve(Server("proxy", 1337, 1337, tcp=ports, udp=(15053,)))
        box.serve(CACHE)
        targets = [
            *({"host": host, "port": p} for host in ("127.0.0.1", "::1") for p in ports),
            {"host": "127.0.0.1", "port": 15053, "protocol": "udp"},
            {"host": "::1", "port": 15053, "protocol": "udp"},
        ]
        results = box.probe(uid=APP.uid, gid=APP.gid, targets=targets)
        opened = [(t, r) for t, r in zip(targets, results, strict=True) if r["result"] != "deny"]
        assert not opened, opened
        # ... while everything else between containers is allowed in this mode.
        (cache,) = box.probe(uid=APP.uid, gid=APP.gid, targets=[{"host": "::1", "port": 6379}])
        assert (cache["result"], cache.get("server")) == ("allow", "cache")
