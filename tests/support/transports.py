"""Senders and receivers of the transports beyond TCP and UDP, run inside a pod's namespace.

``python transports.py record|send --uid U --gid G --protocol udplite|raw|ping ...`` runs as
root, opens its sockets with the container's uid as the file system uid (so netfilter's
owner match, which reads the credentials a socket was opened with, sees the container; a
raw socket also needs the CAP_NET_RAW root still has at that moment), then drops to uid/gid
for good before it sends or receives anything:

- ``record``: UDP-Lite (IPv4 and IPv6 wildcard sockets on ``--port``) or raw IP protocol
  ``--port`` sockets; prints ``ready``, then after ``--seconds`` a JSON list of what arrived
  (``{"data", "peer"}``);
- ``send``: reads a JSON list of ``{"host", "mark"}`` (``port`` for UDP-Lite) on stdin and
  sends each one datagram carrying its mark; prints a JSON list of outcomes: ``sent``,
  ``deny`` (netfilter refused it: EPERM, or the ICMP error of a REJECT) or ``error``.
  ``ping`` sends ICMP echo requests through a ping socket and waits for the echo reply:
  ``allow`` when one came back.
- ``held``: flows made *before* meshguard's rules, as a user init container or a native
  sidecar can make them: a TCP connection from ``--client`` to ``--server`` (``--flow tcp``),
  or a UDP conntrack entry that ``--client`` seeds by sending to the server's port
  (``--flow udp``). One process holds the sockets of both uids (each opened, or accepted,
  under that uid); it prints ``ready``, waits for SIGUSR1 (the rules are in place), then
  sends once in each direction and prints whether each arrived:
  ``{"client_to_server": bool, "server_to_client": bool}`` (UDP: the server's "reply" to
  the seeding client only).

A script, not a module of the test package: it runs under ``ip netns exec`` with only the
installed ``meshguard`` importable.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import selectors
import signal
import socket
import sys
import time
from typing import Any

from meshguard.sandbox.probe import drop_privileges

IPPROTO_UDPLITE = 136
_DENIED = {errno.EPERM, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _as_owner(uid: int, gid: int) -> None:
    """Make the next sockets the container's (file system uid/gid), keeping root's caps."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setfsgid(gid)
    libc.setfsuid(uid)


def _sockets(protocol: str, port: int) -> list[socket.socket]:
    found = []
    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        if protocol == "udplite":
            sock = socket.socket(family, socket.SOCK_DGRAM, IPPROTO_UDPLITE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((wildcard, port))
        else:
            sock = socket.socket(family, socket.SOCK_RAW, port)
        sock.setblocking(False)
        found.append(sock)
    return found


def _payload(sock: socket.socket, data: bytes) -> bytes:
    """A raw IPv4 socket receives the IP header too; the mark follows it."""
    if sock.family == socket.AF_INET and sock.type == socket.SOCK_RAW:
        return data[(data[0] & 0x0F) * 4 :]
    return data


def record(*, sockets: list[socket.socket], seconds: float) -> list[dict[str, str]]:
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    received = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(timeout=left):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            with contextlib.suppress(BlockingIOError, OSError):
                data, peer = sock.recvfrom(2048)
                text = _payload(sock, data).decode(errors="replace")
                received.append({"data": text, "peer": str(peer[0])})
    return received


def _open_sender(protocol: str, family: int, port: int) -> socket.socket:
    if protocol == "udplite":
        return socket.socket(family, socket.SOCK_DGRAM, IPPROTO_UDPLITE)
    if protocol == "ping":
        icmp = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        return socket.socket(family, socket.SOCK_DGRAM, icmp)
    return socket.socket(family, socket.SOCK_RAW, port)


def send(*, protocol: str, port: int, targets: list[dict[str, Any]], uid: int, gid: int) -> Any:
    """Open one socket per target as the container, drop to it, then send each."""
    opened = []
    for target in targets:
        family = socket.AF_INET6 if ":" in target["host"] else socket.AF_INET
        sock = _open_sender(protocol, family, port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        opened.append(sock)
    drop_privileges(uid=uid, gid=gid)
    return [_send_one(sock, protocol, target) for sock, target in zip(opened, targets, strict=True)]


def _send_one(sock: socket.socket, protocol: str, target: dict[str, Any]) -> dict[str, str]:
    with sock:
        sock.settimeout(1.0)
        destination_port = int(target.get("port", 0)) if protocol == "udplite" else 0
        # resolved as a datagram address: only the address (and an IPv6 scope) matters
        address = socket.getaddrinfo(
            target["host"], destination_port, sock.family, socket.SOCK_DGRAM
        )[0][4]
        mark = str(target["mark"]).encode()
        if protocol == "ping":
            # type 8 (128 for IPv6), code 0, checksum and id filled in by the kernel
            echo = bytes([8 if sock.family == socket.AF_INET else 128, 0, 0, 0, 0, 0, 0, 1])
            mark = echo + mark
        try:
            sock.sendto(mark, address)
            if protocol != "ping":
                return {"result": "sent"}
            sock.recvfrom(2048)
        except TimeoutError:
            return {"result": "timeout"}
        except OSError as exc:
            if exc.errno in _DENIED:
                return {"result": "deny", "errno": errno.errorcode.get(exc.errno or 0, "")}
            return {"result": "error", "detail": str(exc)}
        return {"result": "allow"}


def held(*, flow: str, host: str, port: int, client: tuple[int, int], server: tuple[int, int]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if flow == "tcp" else socket.SOCK_DGRAM
    _as_owner(*server)
    listener = socket.socket(family, kind)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    _as_owner(*client)
    peer = socket.socket(family, kind)
    peer.bind((host, 0))
    if flow == "tcp":
        listener.listen(1)
        peer.connect((host, port))
        _as_owner(*server)
        accepted, _ = listener.accept()  # the accepted socket is opened under this uid
    else:
        peer.sendto(b"seed", (host, port))  # the entry: client -> server's port
        listener.recvfrom(64)
        accepted = listener
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print("ready", flush=True)
    if signal.sigtimedwait({signal.SIGUSR1}, 60) is None:
        return {"error": "no signal within 60 seconds"}
    outcome = {}
    if flow == "tcp":
        outcome["client_to_server"] = _arrives(peer, accepted, b"client->server")
    client_address = peer.getsockname()
    outcome["server_to_client"] = _arrives(accepted, peer, b"server->client", to=client_address)
    return outcome


def _arrives(
    sender: socket.socket, receiver: socket.socket, data: bytes, *, to: Any = None
) -> bool:
    """Whether ``data`` sent on ``sender`` arrives on ``receiver`` (within a second)."""
    receiver.settimeout(1.0)
    try:
        if to is not None and sender.type == socket.SOCK_DGRAM:
            sender.sendto(data, to[:2])
        else:
            sender.send(data)
        return receiver.recv(64) == data
    except OSError:  # refused, reset (the rules' REJECT), or nothing within the second
        return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["record", "send", "held"])
    parser.add_argument("--uid", type=int, default=0)
    parser.add_argument("--gid", type=int, default=0)
    parser.add_argument("--protocol", choices=["udplite", "raw", "ping"], default="udplite")
    parser.add_argument("--flow", choices=["tcp", "udp"], default="tcp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--client", default="0:0", help="uid:gid")
    parser.add_argument("--server", default="0:0", help="uid:gid")
    parser.add_argument("--port", type=int, default=0, help="UDP-Lite port, or IP protocol")
    parser.add_argument("--seconds", type=float, default=2.5)
    args = parser.parse_args()
    if args.command == "held":
        client, server = (tuple(map(int, v.split(":"))) for v in (args.client, args.server))
        outcome = held(flow=args.flow, host=args.host, port=args.port, client=client, server=server)  # type: ignore[arg-type]
        json.dump(outcome, sys.stdout)
        return 0
    _as_owner(args.uid, args.gid)
    if args.command == "record":
        sockets = _sockets(args.protocol, args.port)  # opened as the container
        drop_privileges(uid=args.uid, gid=args.gid)
        json.dump(record(sockets=sockets, seconds=args.seconds), sys.stdout)
        return 0
    targets = json.load(sys.stdin)
    json.dump(
        send(protocol=args.protocol, port=args.port, targets=targets, uid=args.uid, gid=args.gid),
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
