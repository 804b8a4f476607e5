"""Every transport, and nothing from before the rules (issue 23, items 3 and 4).

Real kernel, Istio's real capture rules in each backend (iptables-nft, iptables-legacy,
native nftables), meshguard's rules installed by the real ``meshguard init``, the sockets
of each container opened under its uid (``tests/support/transports.py``).

- every protocol the kernel delivers locally is governed, not TCP and UDP alone: UDP-Lite
  (no capability needed) and raw IP protocols (253, SCTP's and DCCP's packets as a raw
  socket sends them), to broadcast, multicast, loopback and the pod's own addresses, both
  families, from a container's uid and from a uid of no container; ICMP echo between
  containers is denied too;
- a TCP connection opened between two uids before the rules carries nothing after them, in
  either direction; a UDP conntrack entry seeded before the rules is no permission for its
  "reply" direction.

The broadcast and multicast variants of the first class, and both of the second, passed on
the rules before the fix.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from meshguard.sandbox.netns import NetworkNamespace
from tests.rules.test_bypasses import (
    APP,
    BROADCASTS,
    CACHE,
    ISTIO,
    LOGS,
    STRANGER,
    example_pod,
    istio_sandbox,
)
from tests.support import transports
from tests.support.netfilter import Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox, compile_for

pytestmark = pytest.mark.root

HELPER = Path(transports.__file__)
PROXY = (1337, 1337)
#: The pod's own addresses and loopback: delivered through lo.
LOCALS = ["127.0.0.1", "::1", "10.1.2.3", "fd00:10::3"]
TARGETS = [*BROADCASTS, *LOCALS]
#: Raw IP protocols: 253 ("for experimentation and testing", RFC 3692), and SCTP (132) and
#: DCCP (33) as a raw socket sends them — what the rules see of an SCTP or DCCP socket's
#: packets (this kernel has neither; a raw socket sends their packets all the same).
RAW_PROTOCOLS = {"raw-253": 253, "raw-sctp": 132, "raw-dccp": 33}
SENDERS = {
    "app": (APP.uid, APP.gid),
    "cache": (CACHE.uid, CACHE.gid),
    "stranger": STRANGER,
}


def _argv(command: str, *, uid: int, gid: int, protocol: str, port: int = 0) -> list[str]:
    return [
        sys.executable, str(HELPER), command, "--uid", str(uid), "--gid", str(gid),
        "--protocol", protocol, "--port", str(port),
    ]  # fmt: skip


@contextlib.contextmanager
def recording(
    box: PodSandbox, *, protocol: str, port: int, uid: int, gid: int
) -> Iterator[list[dict[str, str]]]:
    """What a process of uid/gid receives on its sockets of ``protocol`` while the block
    runs (filled in when it ends)."""
    received: list[dict[str, str]] = []
    process = box.ns.spawn(
        [*_argv("record", uid=uid, gid=gid, protocol=protocol, port=port), "--seconds", "3"],
        ready_line="ready",
    )
    yield received
    process.wait(timeout=15)
    assert process.stdout is not None
    received.extend(json.loads(process.stdout.read()))


def send(
    box: PodSandbox,
    *,
    protocol: str,
    uid: int,
    gid: int,
    name: str,
    hosts: Sequence[str],
    port: int = 0,
) -> list[str]:
    targets = [{"host": host, "port": port, "mark": f"{name}->{host}"} for host in hosts]
    out = box.ns.run(
        _argv("send", uid=uid, gid=gid, protocol=protocol, port=port), stdin=json.dumps(targets)
    )
    return [outcome["result"] for outcome in json.loads(out)]


@pytest.fixture
def box(tmp_path: Path, netfilter: Netfilter) -> Iterator[PodSandbox]:
    with istio_sandbox(example_pod(), tmp_path, netfilter) as sandbox:
        yield sandbox


# --- every protocol the kernel delivers locally --------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "port"),
    [("udplite", LOGS.udp[0]), *(("raw", number) for number in RAW_PROTOCOLS.values())],
    ids=["udplite", *RAW_PROTOCOLS],
)
def test_no_container_reaches_another_over_a_transport_the_policy_does_not_open(
    box: PodSandbox, protocol: str, port: int
):
    # log-shipper listens for UDP-Lite on 5140 (the policy opens 5140 to app for UDP, not
    # UDP-Lite), or for a raw IP protocol (no policy opens one). Neither app, nor cache,
    # nor a uid of no container reaches it, whatever the address; the proxy (the control:
    # the test sees what arrives) does.
    with recording(box, protocol=protocol, port=port, uid=LOGS.uid, gid=LOGS.gid) as received:
        sent = {
            name: send(box, protocol=protocol, uid=uid, gid=gid, name=name, hosts=TARGETS,
                       port=port)
            for name, (uid, gid) in {**SENDERS, "proxy": PROXY}.items()
        }  # fmt: skip
    marks = {r["data"] for r in received}
    assert {f"proxy->{host}" for host in TARGETS} <= marks, received
    assert sent["proxy"] == ["sent"] * len(TARGETS)
    leaked = sorted(m for m in marks if not m.startswith("proxy->"))
    assert not leaked, f"{protocol} the policy does not open was delivered: {leaked}"
    for name in SENDERS:
        outcomes = dict(zip(TARGETS, sent[name], strict=True))
        assert sent[name] == ["deny"] * len(TARGETS), (name, outcomes)


def test_icmp_echo_between_containers_is_denied(box: PodSandbox):
    # Pods let every group open ping sockets (containerd, CRI-O set the sysctl). An echo is a
    # locally delivered flow no rule opens: denied like any other; the proxy's passes.
    box.ns.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])
    for name, (uid, gid) in SENDERS.items():
        results = send(box, protocol="ping", uid=uid, gid=gid, name=name, hosts=LOCALS)
        # refused (IPv4: EPERM) or unanswered (IPv6 reports no error): no echo came back
        unanswered = [result in {"deny", "timeout"} for result in results]
        assert all(unanswered), (name, dict(zip(LOCALS, results, strict=True)))
    proxy = send(box, protocol="ping", uid=PROXY[0], gid=PROXY[1], name="proxy", hosts=LOCALS)
    assert proxy == ["allow"] * len(LOCALS)


# --- nothing made before the rules survives them --------------------------------------------


@contextlib.contextmanager
def before_meshguard(tmp_path: Path, netfilter: Netfilter) -> Iterator[PodSandbox]:
    """The pod with Istio's capture in place (its conntrack running) but meshguard's rules
    not yet: where user init containers and native sidecars run in Istio's classic mode.
    ``box.meshguard_init()`` installs them."""
    ruleset = compile_for(pod_for(example_pod(), netfilter))
    ruleset_file = tmp_path / "ruleset"
    ruleset_file.write_text(ruleset.to_json())
    with NetworkNamespace() as ns:
        box = PodSandbox(ns=ns, ruleset=ruleset, ruleset_file=ruleset_file, netfilter=netfilter)
        if netfilter is Netfilter.NFTABLES:
            box.load_istio_nft(matrix_capture_nft())
        else:
            for family, golden in ISTIO.items():
                box.load_istio(golden, families=[family])
        yield box


def _held(box: PodSandbox, *, flow: str, host: str, port: int, client, server) -> Any:
    process = box.ns.spawn(
        [sys.executable, str(HELPER), "held", "--flow", flow, "--host", host,
         "--port", str(port), "--client", "{}:{}".format(*client),
         "--server", "{}:{}".format(*server)],
        ready_line="ready",
    )  # fmt: skip
    return process


def _outcome(process: Any) -> dict[str, bool]:
    process.send_signal(signal.SIGUSR1)
    process.wait(timeout=20)
    result: dict[str, bool] = json.loads(process.stdout.read())
    return result


HOSTS = ["127.0.0.1", "::1", "10.1.2.3", "fd00:10::3"]


@pytest.mark.parametrize("host", HOSTS)
def test_a_tcp_connection_from_before_the_rules_carries_nothing_after_them(
    tmp_path: Path, netfilter: Netfilter, host: str
):
    # cache may not reach app on 7070; a user init container of cache's uid (or a native
    # sidecar) connects before meshguard-init, and keeps the connection afterwards.
    with before_meshguard(tmp_path, netfilter) as box:
        process = _held(box, flow="tcp", host=host, port=7070,
                        client=(CACHE.uid, CACHE.gid), server=(APP.uid, APP.gid))  # fmt: skip
        box.meshguard_init()
        outcome = _outcome(process)
    assert outcome == {"client_to_server": False, "server_to_client": False}, outcome


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("seeder", ["cache", "stranger"])
def test_a_udp_entry_seeded_before_the_rules_is_no_permission_for_its_replies(
    tmp_path: Path, netfilter: Netfilter, host: str, seeder: str
):
    # Before meshguard-init, a process of cache's uid (or of no container's) sends from its
    # port 7777 to app's port 5353: the entry's "reply" direction is app -> 7777, which the
    # policy denies. After the rules, app's datagram to 7777 must not arrive.
    with before_meshguard(tmp_path, netfilter) as box:
        process = _held(box, flow="udp", host=host, port=5353,
                        client=SENDERS[seeder], server=(APP.uid, APP.gid))  # fmt: skip
        box.meshguard_init()
        outcome = _outcome(process)
    assert outcome == {"server_to_client": False}, outcome


def test_flows_opened_after_the_rules_keep_working_both_ways(tmp_path: Path, netfilter: Netfilter):
    # The control: app -> cache:6379 is allowed; opened after the rules, its data passes in
    # both directions (the reply direction of an accepted flow), over TCP and UDP alike.
    with before_meshguard(tmp_path, netfilter) as box:
        box.meshguard_init()
        tcp = _held(box, flow="tcp", host="10.1.2.3", port=6379,
                    client=(APP.uid, APP.gid), server=(CACHE.uid, CACHE.gid))  # fmt: skip
        assert _outcome(tcp) == {"client_to_server": True, "server_to_client": True}
        udp = _held(box, flow="udp", host="::1", port=5140,
                    client=(APP.uid, APP.gid), server=(LOGS.uid, LOGS.gid))  # fmt: skip
        assert _outcome(udp) == {"server_to_client": True}
