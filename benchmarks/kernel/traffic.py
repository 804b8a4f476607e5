"""The load generator: a server and a client run inside the namespace as a container's uid
(hidden subcommands of ``kernel_path``)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import (
    module_argv,
    process_cpu,
)
from benchmarks.kernel.pod import (
    CHECK_EVERY,
    CONNECT_WARMUP,
    HOST,
    MESSAGE,
    RR_WARMUP,
    SERVER_LIFETIME_SECONDS,
    SOCKET_TIMEOUT_SECONDS,
)
from meshguard.cni.nflog import open_group
from meshguard.rules.settings import DENIAL_LOG_GROUP
from meshguard.sandbox.probe import drop_privileges


def serve(port: int) -> None:
    """Echo on the first connection until EOF, then accept and close every connection."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(4096)
    print("ready", flush=True)
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(4096):
            conn.sendall(data)
    while True:
        conn, _ = listener.accept()
        conn.close()


def ping(sock: socket.socket) -> None:
    sock.sendall(MESSAGE)
    received = 0
    while received < len(MESSAGE):
        chunk = sock.recv(len(MESSAGE) - received)
        if not chunk:
            raise ConnectionError("server closed the request/response connection")
        received += len(chunk)


def connect_once(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT_SECONDS)
        sock.connect((HOST, port))
        if sock.recv(1):  # wait for the server's close: one full connection per iteration
            raise ConnectionError("server sent data on a connect-rate connection")


def timed_loop(step: Callable[[], None], *, count: int, seconds: float) -> tuple[int, float]:
    """Run ``step`` up to ``count`` times or about ``seconds``; (iterations, elapsed)."""
    started = time.perf_counter()
    deadline = started + seconds
    done = 0
    while done < count:
        step()
        done += 1
        if done % CHECK_EVERY == 0 and time.perf_counter() >= deadline:
            break
    return done, time.perf_counter() - started


def measure_rr(port: int, *, count: int, seconds: float) -> tuple[int, float]:
    # Not socket.create_connection: after dropping root, this uid may not read the stdlib's
    # files, and getaddrinfo would lazily import the idna codec.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT_SECONDS)
        sock.connect((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(RR_WARMUP):
            ping(sock)
        return timed_loop(lambda: ping(sock), count=count, seconds=seconds)


def measure_connect(port: int, *, count: int, seconds: float) -> tuple[int, float]:
    for _ in range(CONNECT_WARMUP):
        connect_once(port)
    return timed_loop(lambda: connect_once(port), count=count, seconds=seconds)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(server_pid: int) -> float:
    """CPU seconds client and server have used: the work of the loopback path (the output
    hooks, meshguard's among them, run in the sender's context), whatever else the machine
    runs meanwhile."""
    return own_cpu() + (process_cpu(server_pid) if server_pid else 0.0)


def client(args: argparse.Namespace) -> dict[str, Any]:
    cpu = cpu_of(args.server_pid)
    rr, rr_elapsed = measure_rr(args.port, count=args.rr_count, seconds=args.rr_seconds)
    rr_cpu, cpu = cpu_of(args.server_pid) - cpu, cpu_of(args.server_pid)
    conn, conn_elapsed = measure_connect(
        args.port, count=args.connect_count, seconds=args.connect_seconds
    )
    conn_cpu = cpu_of(args.server_pid) - cpu
    return measure_denials(args) | {
        "rr_per_second": rr / rr_elapsed,
        "round_trips": rr,
        "connect_per_second": conn / conn_elapsed,
        "connections": conn,
        "connections_total": 1 + CONNECT_WARMUP + conn,
        # Warm-up included in the CPU of each phase, and in its count.
        "rr_per_cpu_second": (rr + RR_WARMUP) / rr_cpu if rr_cpu > 0 else float("nan"),
        "connect_per_cpu_second": (
            (conn + CONNECT_WARMUP) / conn_cpu if conn_cpu > 0 else float("nan")
        ),
    }


def measure_denials(args: argparse.Namespace) -> dict[str, float]:
    """``--denials``: connect in a loop to a port the rules deny, each refused by their reset.
    CPU: the client's (the rules, the reset and NFLOG run in its context), then with the
    listener's; warm-up included, as in :func:`client`."""
    if not args.denied_port:
        return {}
    listener = process_cpu(args.listener_pid) if args.listener_pid else 0.0
    cpu = own_cpu()
    for _ in range(CONNECT_WARMUP):
        deny_once(args.denied_port)
    port, count, seconds = args.denied_port, args.connect_count * 10, args.connect_seconds
    done, elapsed = timed_loop(lambda: deny_once(port), count=count, seconds=seconds)
    cpu, total = own_cpu() - cpu, done + CONNECT_WARMUP
    listener = (process_cpu(args.listener_pid) if args.listener_pid else 0.0) - listener
    return {"denied_per_second": done / elapsed, "denied_per_cpu_second": total / cpu,
            "denied_per_node_cpu_second": total / (cpu + listener), "denied": total}  # fmt: skip


def deny_once(port: int) -> None:
    if not refused(port):
        raise ConnectionError(f"port {port} accepted a connection the rules deny")


def drain_denial_log() -> int:
    """As the node agent: read the denial log's NFLOG group until SIGTERM and it is empty; how
    many messages it read (``ENOBUFS``: it fell behind, the kernel dropped some)."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.alarm(SERVER_LIFETIME_SECONDS)
    logged = 0
    with open_group("/proc/self/ns/net", group=DENIAL_LOG_GROUP) as group:
        print("ready", flush=True)
        while True:
            try:
                got = len(group.read(timeout=0.2))
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                continue
            logged += got
            if stopping and not got:
                return logged


def helper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kernel_path.py _server|_client")
    parser.add_argument("role", choices=["_server", "_client", "_refused", "_nflog"])
    parser.add_argument("--uid", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--denied-port", type=int, default=0, help="(client) --denials")
    parser.add_argument("--listener-pid", type=int, default=0, help="(client) the NFLOG reader")
    parser.add_argument("--rr-count", type=int, default=0)
    parser.add_argument("--rr-seconds", type=float, default=0.0)
    parser.add_argument("--connect-count", type=int, default=0)
    parser.add_argument("--connect-seconds", type=float, default=0.0)
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    parser.add_argument("--server-pid", type=int, default=0, help="(client) the server's pid")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.role == "_nflog":  # as root: binding an NFLOG group needs CAP_NET_ADMIN
        print(drain_denial_log(), flush=True)
        return 0
    drop_privileges(uid=args.uid, gid=args.uid)
    if args.role == "_server":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.alarm(SERVER_LIFETIME_SECONDS)  # never outlive the benchmark
        serve(args.port)
        return 0
    if args.role == "_refused":
        json.dump({"refused": refused(args.port)}, sys.stdout)
        return 0
    json.dump(client(args), sys.stdout)
    return 0


def refused(port: int) -> bool:
    """Whether a connection to ``port`` is refused (meshguard's reset) as this uid."""
    try:
        connect_once(port)
    except ConnectionRefusedError:
        return True
    return False


def helper_argv(role: str, *extra: str) -> list[str]:
    return module_argv("benchmarks.kernel_path", role, *extra)
