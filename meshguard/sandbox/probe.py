"""Stand-ins for a pod's containers: echo servers and connection probes under a given uid.

Run inside a network namespace (``ip netns exec NS python -m meshguard.sandbox.probe ...``),
as root; each process drops to the container's uid/gid before touching the network, so the
kernel's owner match sees exactly what it would see in a pod.

- ``serve``: listen on TCP and UDP ports, dual-stack (one ``::`` socket per port also takes
  IPv4 and IPv4-mapped traffic), and answer every connection or datagram with one JSON line
  naming the server, the local port it landed on and the peer address. Prints ``ready``
  once bound.
- ``serve-http``: HTTP/1.1 servers on the given TCP ports answering every request with a
  JSON line (server, port, method, path, peer): the upstreams of L7 flows. ``--forbid``
  (comma-separated path prefixes) makes them answer a request whose path starts with one of
  them 403, with the same JSON line: an app's own denial, for a rule that let it through.
- ``probe``: read a JSON list of targets on stdin, try each, print a JSON list of outcomes:
  ``allow`` (the server answered; its reply says where the flow landed), ``deny`` (refused
  or reset: the kernel rejected it), ``timeout`` or ``error``; a datagram sent without
  waiting for an answer (``send_only``: broadcast, multicast) is ``sent`` or ``deny``.
- ``record``: listen on TCP and UDP ports (IPv4 and IPv6 wildcard sockets) for some seconds,
  then print a JSON list of everything received: what a squatter or a broadcast listener
  would see, whether or not it could answer.
"""

from __future__ import annotations

import argparse
import contextlib
import encodings.idna  # noqa: F401 - http.client loads it lazily, unreadable after the drop
import errno
import http.client
import http.server
import json
import os
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal, TypedDict, cast

PROBE_TIMEOUT_SECONDS = 2.0


FlowProtocol = Literal["tcp", "udp", "http"]


class ProbeTarget(TypedDict, total=False):
    """One flow or escape attempt, as ``probe`` reads them (a JSON list on stdin)."""

    host: str
    port: int
    protocol: FlowProtocol
    timeout: float
    #: http: the request
    method: str
    path: str
    headers: dict[str, str]
    #: tcp: bytes to send first (e.g. a request to an HTTP server)
    send: str
    #: udp: send one datagram carrying ``mark`` without waiting (broadcast, multicast)
    send_only: bool
    mark: str
    device: str
    #: bind the source first (a port another container's closed socket just used)
    source: str
    source_port: int
    #: an escape attempt instead of a flow (see :func:`attempt`)
    attack: Literal["raw-socket", "setuid", "iptables", "nft"]
    uid: int
    tool: str
    args: list[str]


Result = Literal["allow", "deny", "timeout", "error", "sent"]


class ProbeOutcome(TypedDict, total=False):
    """What ``probe`` prints for a target: the result, and where an allowed flow landed
    (the echo server's reply) or why it did not."""

    result: Result
    #: the echo server's reply: its name, the port the flow landed on, the peer it saw
    server: str
    port: int
    peer: str
    #: http: what the upstream received, the status, the seconds it took
    method: str
    path: str
    meshguard_headers: list[str]
    status: int
    body: str
    elapsed: float
    #: deny: ECONNREFUSED, ECONNRESET, EPERM or EOF; error: the reason
    errno: str
    detail: str
    #: an answer that is not a JSON object
    raw_bytes: int


class Received(TypedDict):
    """What ``record`` saw arrive: a connection (empty data) or a datagram."""

    protocol: Literal["tcp", "udp"]
    port: int
    peer: str
    data: str


#: How a rejected flow shows: refused/reset (TCP, ICMP port unreachable), or EPERM when
#: netfilter drops a datagram in OUTPUT before it leaves the sending socket.
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EPERM}


def drop_privileges(*, uid: int, gid: int, groups: Sequence[int] = ()) -> None:
    """Become uid/gid with exactly ``groups`` as supplementary groups (needs root; a no-op
    for a process that already is that identity, e.g. root without CAP_SETUID)."""
    if (os.getresuid(), os.getresgid(), sorted(os.getgroups())) == (
        (uid,) * 3, (gid,) * 3, sorted(groups),
    ):  # fmt: skip
        return
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def serve(*, name: str, tcp: Sequence[int], udp: Sequence[int]) -> None:
    selector = selectors.DefaultSelector()
    for port in tcp:
        listener = _dual_stack(socket.SOCK_STREAM, port)
        listener.listen(128)
        selector.register(listener, selectors.EVENT_READ, ("tcp", port))
    for port in udp:
        selector.register(_dual_stack(socket.SOCK_DGRAM, port), selectors.EVENT_READ, ("udp", port))
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            protocol, port = key.data
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if protocol == "tcp":
                _answer_tcp(sock, name=name, port=port)
            else:
                _answer_udp(sock, name=name, port=port)


def _dual_stack(kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if kind == socket.SOCK_DGRAM:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind(("::", port))
    sock.setblocking(False)
    return sock


def _reply(*, name: str, port: int, peer: str) -> bytes:
    return (json.dumps({"server": name, "port": port, "peer": _plain(peer)}) + "\n").encode()


def _answer_tcp(listener: socket.socket, *, name: str, port: int) -> None:
    try:
        conn, peer = listener.accept()
    except BlockingIOError:
        return
    with conn, contextlib.suppress(OSError):
        conn.setblocking(True)
        conn.settimeout(1.0)
        conn.sendall(_reply(name=name, port=port, peer=peer[0]))


def _answer_udp(sock: socket.socket, *, name: str, port: int) -> None:
    # Reply from the address the datagram was sent to (IPV6_PKTINFO, which Linux also fills
    # for IPv4 on a dual-stack socket): a reply from another local address would not match
    # the client's connected socket, nor its conntrack entry.
    with contextlib.suppress(BlockingIOError, OSError):
        _, ancillary, _, peer = sock.recvmsg(2048, socket.CMSG_SPACE(20))
        info = [
            (level, kind, data)
            for level, kind, data in ancillary
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
        ]
        sock.sendmsg([_reply(name=name, port=port, peer=peer[0])], info, 0, peer)


def _plain(address: str) -> str:
    return address.removeprefix("::ffff:") if address.startswith("::ffff:") else address


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with where it landed: server, port, method, path, peer; 200,
    or 403 when the path starts with one of ``forbidden_``."""

    server_name_: str = ""
    forbidden_: tuple[str, ...] = ()
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))
        body = json.dumps(
            {
                "server": self.server_name_,
                "port": self.connection.getsockname()[1],
                "method": self.command,
                "path": self.path,
                "peer": _plain(self.client_address[0]),
                "meshguard_headers": sorted(
                    h for h in self.headers if h.lower().startswith("x-meshguard")
                ),
            }
        ).encode()
        self.send_response(403 if self.path.startswith(self.forbidden_) else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the probes report the outcome."""


class _DualStackHTTPServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        # TCPServer's bind only: HTTPServer's would call socket.getfqdn (a lazy import).
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


def serve_http(*, name: str, ports: Sequence[int], forbid: Sequence[str] = ()) -> None:
    """HTTP/1.1 echo servers on each port (dual-stack), one thread each; a path starting
    with one of ``forbid`` is answered 403."""
    attributes = {"server_name_": name, "forbidden_": tuple(forbid)}
    handler = type("Handler", (_EchoHandler,), attributes)
    servers = [_DualStackHTTPServer(("::", port), handler) for port in ports]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    threading.Event().wait()


def probe_http(target: ProbeTarget) -> ProbeOutcome:
    """One HTTP request: allow (the upstream answered), deny (403 from meshguard), or else;
    with the seconds it took."""
    started = time.monotonic()
    result = _http_request(target)
    return {**result, "elapsed": round(time.monotonic() - started, 4)}


def _http_request(target: ProbeTarget) -> ProbeOutcome:
    host, port = str(target["host"]), int(target["port"])
    connection = http.client.HTTPConnection(
        host, port, timeout=target.get("timeout", PROBE_TIMEOUT_SECONDS)
    )
    try:
        connection.request(
            target.get("method", "GET"),
            target.get("path", "/"),
            headers=target.get("headers") or {},
        )
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    except OSError as exc:
        return _failure(exc)
    finally:
        connection.close()
    if response.status == 200:
        landed = _echo_reply(body)
        if landed is None:
            return {"result": "allow", "status": 200, "body": body[:300]}
        return {**landed, "status": 200}
    result: Result = "deny" if response.status == 403 else "error"
    return {"result": result, "status": response.status, "body": body[:300]}


def attempt(target: ProbeTarget) -> ProbeOutcome:
    """An escape attempt other than a connection: ``deny`` when the kernel refuses it.

    - ``raw-socket``: open a raw IP socket (needs CAP_NET_RAW);
    - ``setuid``: switch to ``uid`` (e.g. the proxy's; needs CAP_SETUID), in a child process
      so the prober keeps its own identity;
    - ``iptables``: run ``iptables`` (or ``tool``: ``iptables-legacy``, ...) with ``args``
      (e.g. flush meshguard's chain; needs CAP_NET_ADMIN);
    - ``nft``: run ``nft`` with ``args`` (e.g. delete meshguard's table; CAP_NET_ADMIN).
    """
    kind = target["attack"]
    if kind == "raw-socket":
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).close()
        except PermissionError:
            return {"result": "deny"}
        return {"result": "allow"}
    if kind == "setuid":
        return _in_child(lambda: os.setresuid(*(int(target["uid"]),) * 3))
    if kind == "iptables":
        return _tool([str(target.get("tool", "iptables")), "-w", *target["args"]])
    if kind == "nft":
        return _tool(["nft", *target["args"]])
    return {"result": "error", "detail": f"unknown attack {kind!r}"}


def _tool(argv: list[str]) -> ProbeOutcome:
    """Run a netfilter tool: allow if it changed the rules (exit 0), deny if refused."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    outcome: Result = "allow" if done.returncode == 0 else "deny"
    return {"result": outcome, "detail": done.stderr.strip()[:200]}


def _in_child(action: Callable[[], object]) -> ProbeOutcome:
    """Run ``action`` in a forked child: allow if it succeeded, deny if refused (EPERM)."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
        except PermissionError:
            os._exit(1)
        except BaseException:  # report, whatever it is
            os._exit(2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    results: dict[int, Result] = {0: "allow", 1: "deny"}
    return {"result": results.get(os.waitstatus_to_exitcode(status), "error")}


def probe(target: ProbeTarget) -> ProbeOutcome:
    """Try one flow; the outcome and, when it got through, where it landed."""
    if "attack" in target:
        return attempt(target)
    host, port = str(target["host"]), int(target["port"])
    protocol = target.get("protocol", "tcp")
    if protocol == "http":
        return probe_http(target)
    if target.get("send_only"):
        return send_datagram(target)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(family, kind) as sock:
            sock.settimeout(target.get("timeout", PROBE_TIMEOUT_SECONDS))
            _bind_source(sock, target, family)
            sock.connect((host, port))
            if protocol == "udp":
                sock.send(b"ping\n")
            elif target.get("send"):
                sock.sendall(str(target["send"]).encode())  # e.g. a request to an HTTP server
            data = sock.recv(4096)
    except OSError as exc:
        return _failure(exc)
    return _landing(data)


def send_datagram(target: ProbeTarget) -> ProbeOutcome:
    """One UDP datagram carrying ``target["mark"]``, sent without waiting for an answer (to a
    broadcast or multicast address, or where the answer cannot come back): ``sent`` or
    ``deny`` (netfilter dropped it in OUTPUT: EPERM)."""
    host, port = str(target["host"]), int(target["port"])
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if target.get("device"):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_BINDTODEVICE, str(target["device"]).encode()
                )
            _bind_source(sock, target, family)
            sock.sendto(str(target.get("mark", "ping")).encode(), address)
    except OSError as exc:
        return _failure(exc)
    return {"result": "sent"}


def _bind_source(sock: socket.socket, target: ProbeTarget, family: int) -> None:
    """Bind the source address and/or port a target asks for (e.g. a port another
    container's closed socket just used)."""
    source, source_port = target.get("source"), int(target.get("source_port") or 0)
    if source or source_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104 - a probe
        sock.bind((str(source or wildcard), source_port))


def record(*, tcp: Sequence[int], udp: Sequence[int], seconds: float) -> list[Received]:
    """Everything received on the ports within ``seconds``: connections accepted (TCP) and
    datagrams (UDP), on separate IPv4 and IPv6 wildcard sockets."""
    selector = selectors.DefaultSelector()
    for port in tcp:
        for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104
            listener = _wildcard_socket(family, socket.SOCK_STREAM, wildcard, port)
            listener.listen(16)
            selector.register(listener, selectors.EVENT_READ, ("tcp", port))
    for port in udp:
        for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104
            sock = _wildcard_socket(family, socket.SOCK_DGRAM, wildcard, port)
            selector.register(sock, selectors.EVENT_READ, ("udp", port))
    print("ready", flush=True)
    received: list[Received] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(timeout=left):
            protocol, port = key.data
            sock = key.fileobj  # type: ignore[assignment]
            with contextlib.suppress(BlockingIOError, OSError):
                if protocol == "tcp":
                    conn, peer = sock.accept()
                    conn.close()
                    data = b""
                else:
                    data, peer = sock.recvfrom(2048)
                received.append(
                    {"protocol": protocol, "port": port, "peer": _plain(peer[0]),
                     "data": data.decode(errors="replace")}
                )  # fmt: skip
    return received


def _wildcard_socket(family: int, kind: int, wildcard: str, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((wildcard, port))
    sock.setblocking(False)
    return sock


def _failure(exc: OSError) -> ProbeOutcome:
    """deny when the kernel (or a REJECT rule) refused the flow; timeout; or error."""
    if isinstance(exc, TimeoutError):
        return {"result": "timeout"}
    if exc.errno in _REFUSED:
        return {"result": "deny", "errno": errno.errorcode.get(exc.errno or 0, "")}
    return {"result": "error", "detail": str(exc)}


def _landing(data: bytes) -> ProbeOutcome:
    """What an accepted flow's first reply says about where it landed."""
    if not data:
        return {"result": "deny", "errno": "EOF"}
    landed = _echo_reply(data.decode(errors="replace").partition("\n")[0])
    if landed is None:
        return {"result": "allow", "raw_bytes": len(data)}  # not one of our echo servers
    return landed


def _echo_reply(line: str) -> ProbeOutcome | None:
    """An allowed flow's outcome from the JSON object it was answered with (an echo server's
    line, or e.g. Envoy's admin API's document: its fields pass through); None if the answer
    is not a JSON object."""
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    if not isinstance(reply, dict):
        return None
    return cast(ProbeOutcome, {**reply, "result": "allow"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshguard.sandbox.probe")
    parser.add_argument("command", choices=["serve", "serve-http", "probe", "record"])
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--groups", default="", help="comma-separated supplementary gids")
    parser.add_argument("--name", default="")
    parser.add_argument("--tcp", default="", help="comma-separated ports to serve")
    parser.add_argument("--udp", default="", help="comma-separated ports to serve")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to record")
    parser.add_argument(
        "--forbid", default="", help="serve-http: comma-separated path prefixes answered 403"
    )
    args = parser.parse_args(argv)
    drop_privileges(uid=args.uid, gid=args.gid, groups=_ints(args.groups))
    if args.command in {"serve", "serve-http"}:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if args.command == "serve-http":
            forbid = [prefix for prefix in args.forbid.split(",") if prefix]
            serve_http(name=args.name, ports=_ints(args.tcp), forbid=forbid)
        else:
            serve(name=args.name, tcp=_ints(args.tcp), udp=_ints(args.udp))
        return 0
    if args.command == "record":
        received = record(tcp=_ints(args.tcp), udp=_ints(args.udp), seconds=args.seconds)
        json.dump(received, sys.stdout)
        return 0
    targets = json.load(sys.stdin)
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        print("probe: stdin must be a JSON list of target objects", file=sys.stderr)
        return 2
    json.dump([probe(target) for target in targets], sys.stdout)
    return 0


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


if __name__ == "__main__":
    raise SystemExit(main())
