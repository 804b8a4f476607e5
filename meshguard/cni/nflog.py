"""Reading the kernel's NFLOG messages of one network namespace: who was denied what.

The start of issue 26 item 2 (denials visible per pod): a rule's ``NFLOG`` target (iptables)
or ``log group N`` statement (nftables) hands the packet to ``nfnetlink_log``, which sends
it to the netlink socket bound to that group *in the packet's network namespace* — no node
sysctl, unlike ``LOG`` (``net.netfilter.nf_log_all_netns``). :func:`open_group` binds such
a socket in a pod's namespace (from a thread that enters it for that moment only: a socket
stays in the namespace it was created in); :func:`parse` turns what it receives into
:class:`Logged` packets: the rule's prefix, the sending socket's uid and gid (the kernel adds
them for a packet of a local socket), the protocol, addresses and destination port.

Wire format (``linux/netfilter/nfnetlink_log.h``): netlink messages of type
``NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET``, each an ``nfgenmsg`` (family, version, group)
then attributes (2-byte length, 2-byte type, padded to 4). Pure parsing here, no policy:
which rules log, and what a logged packet means for a pod, are decided elsewhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from meshguard.cni.netns import entered
from meshguard.errors import MalformedInputError, MeshguardFailure

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = 0
NFULNL_MSG_CONFIG: Final = 1
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLMSG_ERROR: Final = 0x2
NLMSG_DONE: Final = 0x3
# config attributes and commands
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_QTHRESH: Final = 5
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_COPY_PACKET: Final = 2
# packet attributes
NFULA_PACKET_HDR: Final = 1
NFULA_PAYLOAD: Final = 9
NFULA_PREFIX: Final = 10
NFULA_UID: Final = 11
NFULA_GID: Final = 14
#: Bytes of each packet copied: the IPv6 header (40) and the transport ports, no data.
COPY_RANGE: Final = 64
_NLA_TYPE_MASK: Final = 0x3FFF
_PROTOCOLS: Final = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}


@dataclass(frozen=True, kw_only=True)
class Logged:
    """One packet a rule sent to NFLOG."""

    group: int
    prefix: str
    uid: int | None  # the sending socket's (None: not a local socket's packet)
    gid: int | None
    family: str  # "ipv4" or "ipv6"
    protocol: str  # "tcp", "udp", ... or the number
    source: str
    destination: str
    dport: int | None  # tcp, udp and sctp


def parse(data: bytes) -> list[Logged]:
    """The packets in what one ``recv`` returned (netlink messages, back to back)."""
    logged: list[Logged] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            raise MalformedInputError(f"NFLOG: a netlink message of {length} bytes is cut off")
        if kind == (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET):
            logged.append(_packet(data[offset + 16 : offset + length]))
        offset += _align(length)
    return logged


def _packet(body: bytes) -> Logged:
    if len(body) < 4:
        raise MalformedInputError("NFLOG: a packet message without its nfgenmsg")
    family, _version, group = struct.unpack_from("!BBH", body, 0)
    attributes = _attributes(body[4:])
    uid, gid = attributes.get(NFULA_UID), attributes.get(NFULA_GID)
    prefix = attributes.get(NFULA_PREFIX, b"").split(b"\0", 1)[0]
    header = _network_header(attributes.get(NFULA_PAYLOAD, b""), family=family)
    return Logged(
        group=group,
        prefix=prefix.decode("utf-8", "replace"),
        uid=struct.unpack("!I", uid)[0] if uid is not None and len(uid) == 4 else None,
        gid=struct.unpack("!I", gid)[0] if gid is not None and len(gid) == 4 else None,
        family=header.family,
        protocol=header.protocol,
        source=header.source,
        destination=header.destination,
        dport=header.dport,
    )


@dataclass(frozen=True, kw_only=True)
class _Header:
    family: str
    protocol: str
    source: str
    destination: str
    dport: int | None


def _attributes(data: bytes) -> dict[int, bytes]:
    attributes: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise MalformedInputError(f"NFLOG: an attribute of {length} bytes is cut off")
        attributes[kind & _NLA_TYPE_MASK] = data[offset + 4 : offset + length]
        offset += _align(length)
    return attributes


def _network_header(payload: bytes, *, family: int) -> _Header:
    """Family, protocol, addresses and destination port of the copied packet's start."""
    if family == socket.AF_INET and len(payload) >= 20:
        header_length = (payload[0] & 0x0F) * 4
        number = payload[9]
        source, destination = payload[12:16], payload[16:20]
        transport = payload[header_length:]
    elif family == socket.AF_INET6 and len(payload) >= 40:
        number = payload[6]  # the next header (extension headers are not followed)
        source, destination = payload[8:24], payload[24:40]
        transport = payload[40:]
    else:
        raise MalformedInputError(
            f"NFLOG: a packet of family {family} with {len(payload)} bytes copied"
        )
    has_ports = number in (6, 17, 132) and len(transport) >= 4
    return _Header(
        family="ipv4" if family == socket.AF_INET else "ipv6",
        protocol=_PROTOCOLS.get(number, str(number)),
        source=str(ipaddress.ip_address(source)),
        destination=str(ipaddress.ip_address(destination)),
        dport=struct.unpack_from("!H", transport, 2)[0] if has_ports else None,
    )


def _align(length: int) -> int:
    return (length + 3) & ~3


def config_message(*, group: int, seq: int, attributes: list[tuple[int, bytes]]) -> bytes:
    """An ``NFULNL_MSG_CONFIG`` request for ``group`` (acknowledged)."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, group)
    for kind, value in attributes:
        attribute = struct.pack("=HH", 4 + len(value), kind) + value
        body += attribute + b"\0" * (_align(len(attribute)) - len(attribute))
    header = struct.pack(
        "=IHHII",
        16 + len(body),
        NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        0,
    )
    return header + body


class Group:
    """A netlink socket bound to one NFLOG group of one network namespace."""

    def __init__(self, sock: socket.socket, *, group: int) -> None:
        self._sock = sock
        self.group = group

    def read(self, *, timeout: float) -> list[Logged]:
        """The packets logged so far, waiting up to ``timeout`` seconds for the first."""
        readable, _, _ = select.select([self._sock], [], [], timeout)
        logged: list[Logged] = []
        while readable:
            try:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            logged += parse(data)
        return logged

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def bind_group(netns: str, *, group: int) -> Group:
    """A listener of NFLOG ``group`` in the network namespace at ``netns`` (one listener per
    group and namespace: the kernel refuses a second with EPERM); the caller closes it."""
    made: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            with entered(netns):
                made.append(_bound(group))
        except (MeshguardFailure, OSError) as exc:
            made.append(exc)

    # The calling thread keeps its namespace: a short-lived one enters the pod's.
    thread = threading.Thread(target=create, name="nflog-bind")
    thread.start()
    thread.join()
    result = made[0]
    if isinstance(result, BaseException):
        raise MeshguardFailure(f"cannot listen to NFLOG group {group} in {netns}: {result}")
    return Group(result, group=group)


@contextlib.contextmanager
def open_group(netns: str, *, group: int) -> Iterator[Group]:
    """:func:`bind_group` for the block."""
    listener = bind_group(netns, group=group)
    try:
        yield listener
    finally:
        listener.close()


def _bound(group: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)  # fmt: skip
    try:
        sock.bind((0, 0))
        settings = [
            [(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND))],
            [(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET))],
            # Each packet sent at once (nftables' log statement sets no threshold of its own).
            [(NFULA_CFG_QTHRESH, struct.pack("!I", 1))],
        ]
        for seq, attributes in enumerate(settings, 1):
            sock.send(config_message(group=group, seq=seq, attributes=attributes))
            _acknowledged(sock, seq)
    except BaseException:
        sock.close()
        raise
    return sock


def _acknowledged(sock: socket.socket, seq: int) -> None:
    data = sock.recv(65536)
    if len(data) < 20:
        raise MeshguardFailure("NFLOG: no acknowledgement from the kernel")
    _length, kind, _flags, answered, _pid = struct.unpack_from("=IHHII", data, 0)
    (error,) = struct.unpack_from("=i", data, 16)
    if kind != NLMSG_ERROR or answered != seq:
        raise MeshguardFailure(f"NFLOG: unexpected answer type {kind} to request {seq}")
    if error:
        raise OSError(-error, os.strerror(-error))
