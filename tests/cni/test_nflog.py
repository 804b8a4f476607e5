"""Reading NFLOG in a pod's network namespace (meshguard/cni/nflog.py): the parser on
hand-built messages, and the real kernel — a rule written here (meshguard's rules do not log
to NFLOG yet) logs a packet of a process under its own uid, in each backend, and the reader
bound in that namespace gets its prefix, uid, gid, protocol, addresses and port; a second
namespace's packets do not reach it."""

from __future__ import annotations

import socket
import struct
import subprocess

import pytest

from meshguard.cni.nflog import (
    NFNL_SUBSYS_ULOG,
    NFULA_GID,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_UID,
    NFULNL_MSG_PACKET,
    Logged,
    open_group,
    parse,
)
from meshguard.errors import MalformedInputError, MeshguardFailure
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.netfilter import NETFILTERS, Netfilter

GROUP = 7
UID = 4321
PORT = 9999
PREFIX = "meshguard: deny"


def packet_message(*, attributes: list[tuple[int, bytes]], family: int = socket.AF_INET) -> bytes:
    body = struct.pack("!BBH", family, 0, GROUP)
    for kind, value in attributes:
        attribute = struct.pack("=HH", 4 + len(value), kind) + value
        body += attribute + b"\0" * (-len(attribute) % 4)
    header = struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET,
                         0, 0, 0)  # fmt: skip
    return header + body


def ipv4_udp(*, dport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 0, 0, 64, 17, 0,
                     socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.2"))  # fmt: skip
    return ip + struct.pack("!HHHH", 40000, dport, 9, 0)


def test_a_logged_packet_parses_into_who_sent_what_where():
    message = packet_message(attributes=[
        (NFULA_PREFIX, PREFIX.encode() + b"\0"), (NFULA_UID, struct.pack("!I", UID)),
        (NFULA_GID, struct.pack("!I", 1000)), (NFULA_PAYLOAD, ipv4_udp(dport=PORT)),
    ])  # fmt: skip
    assert parse(message + message) == [
        Logged(group=GROUP, prefix=PREFIX, uid=UID, gid=1000, family="ipv4", protocol="udp",
               source="127.0.0.1", destination="127.0.0.2", dport=PORT),
    ] * 2  # fmt: skip


def test_a_packet_of_no_local_socket_has_no_uid():
    message = packet_message(attributes=[(NFULA_PAYLOAD, ipv4_udp(dport=53))])
    (logged,) = parse(message)
    assert (logged.uid, logged.gid, logged.prefix, logged.dport) == (None, None, "", 53)


@pytest.mark.parametrize(
    ("data", "problem"),
    [(packet_message(attributes=[(NFULA_PAYLOAD, ipv4_udp(dport=1))])[:-4], "cut off"),
     (packet_message(attributes=[(NFULA_PAYLOAD, b"\x45")]), "1 bytes copied"),
     (struct.pack("=IHHII", 12, 0, 0, 0, 0), "12 bytes")],
)  # fmt: skip
def test_a_malformed_message_is_refused(data, problem):
    with pytest.raises(MalformedInputError, match=problem):
        parse(data)


# --- the real kernel ------------------------------------------------------------------------


class Namespace(NetworkNamespace):
    def _setup_commands(self) -> list[list[str]]:
        return [["ip", "link", "set", "lo", "up"]]

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def log_rules(self, netfilter: Netfilter) -> None:
        """A rule that logs UDP to PORT from UID to NFLOG GROUP, in ``netfilter``."""
        if netfilter is Netfilter.NFTABLES:
            self.run(["nft", "-f", "-"], stdin=(
                "table inet t {\n chain out {\n  type filter hook output priority 0;\n"
                f"  meta skuid {UID} udp dport {PORT} log group {GROUP} prefix \"{PREFIX}\"\n"
                " }\n}\n"))  # fmt: skip
            return
        for tool in (netfilter.value, netfilter.value.replace("iptables", "ip6tables")):
            self.run([tool, "-A", "OUTPUT", "-p", "udp", "--dport", str(PORT), "-m", "owner",
                      "--uid-owner", str(UID), "-j", "NFLOG", "--nflog-group", str(GROUP),
                      "--nflog-prefix", PREFIX])  # fmt: skip

    def send_as(self, uid: int, address: str) -> None:
        subprocess.run(self.argv(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                  "--clear-groups", "bash", "-c",
                                  f"echo denied > /dev/udp/{address}/{PORT}"]),
                       check=False, capture_output=True, timeout=30)  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_the_reader_gets_the_namespaces_logged_packets_with_their_uid(netfilter):
    with Namespace() as ns, Namespace() as other:
        ns.log_rules(netfilter)
        other.log_rules(netfilter)
        with open_group(ns.path, group=GROUP) as group:
            ns.send_as(UID, "127.0.0.1")
            ns.send_as(UID, "::1")
            ns.send_as(UID + 1, "127.0.0.1")  # not logged: another uid
            other.send_as(UID, "127.0.0.1")  # logged in the other namespace only
            logged: list[Logged] = []
            for _ in range(20):  # bounded: the kernel sends each at once (threshold 1)
                logged += group.read(timeout=0.5)
                if len(logged) >= 2:
                    break
            logged += group.read(timeout=0.2)
    assert sorted(logged, key=lambda p: p.family) == [
        Logged(group=GROUP, prefix=PREFIX, uid=UID, gid=UID, family="ipv4", protocol="udp",
               source="127.0.0.1", destination="127.0.0.1", dport=PORT),
        Logged(group=GROUP, prefix=PREFIX, uid=UID, gid=UID, family="ipv6", protocol="udp",
               source="::1", destination="::1", dport=PORT),
    ]  # fmt: skip


@pytest.mark.root
def test_a_namespace_that_does_not_exist_is_named():
    with (
        pytest.raises(
            MeshguardFailure, match="cannot listen to NFLOG group 7 in /var/run/netns/mg-no"
        ),
        open_group("/var/run/netns/mg-no", group=GROUP),
    ):
        pass
