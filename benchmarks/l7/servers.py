"""Helpers run inside the namespace as hidden subcommands of ``l7_path``: the upstream, the
do-nothing ext_authz (echo) and the direct gRPC client."""

from __future__ import annotations

import argparse
import asyncio
import encodings.idna  # noqa: F401 - getaddrinfo loads it lazily, unreadable after the drop
import itertools
import json
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from benchmarks.common import module_argv
from benchmarks.l7.envoys import (
    CALL_TIMEOUT_SECONDS,
    CHECK_METHOD,
    HELPER_LIFETIME_SECONDS,
    ClientTls,
)
from meshguard.authz.contract import POD_HEADER
from meshguard.authz.identity import TlsFiles, server_credentials
from meshguard.sandbox.probe import drop_privileges
from tests.authz.spiffe import AUTHZ_DNS
from tests.support.latency import percentile
from tests.support.load import call_concurrently
from tests.support.processes import HOST


class _UpstreamProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1: every request (Content-Length bodies) gets one fixed 200."""

    BODY = b'{"server": "pilot-agent"}'
    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio sets it already; no Nagle delay on small replies
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    length = int(value.strip() or 0)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.transport.write(self.RESPONSE)
            if b"\r\nconnection: close" in head:
                self.transport.close()
                return


async def _serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        _UpstreamProtocol, HOST, port, backlog=1024, reuse_address=True
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _ok_response() -> external_auth_pb2.CheckResponse:
    """What meshguard answers an allowed Check (``response_of`` of an allowing authz Decision)."""
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(headers_to_remove=[POD_HEADER]),
    )


class _EchoAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Check without any decision: a fixed OK; saves the first request it gets."""

    def __init__(self, capture: Path | None) -> None:
        self._capture = capture
        self._response = _ok_response()

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        if self._capture is not None:
            self._capture.write_bytes(request.SerializeToString())
            self._capture = None
        return self._response


async def _serve_echo(
    port: int, capture: Path | None, credentials: grpc.ServerCredentials | None
) -> None:
    """As meshguard's serve_authz builds its server: the same options, and with
    ``credentials`` (meshguard's own ``server_credentials``) the same mTLS."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_EchoAuthorization(capture), server)
    address = f"{HOST}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _channel(job: dict[str, Any], tls: ClientTls | None) -> grpc.aio.Channel:
    """One channel to the job's target: mTLS with the pod's workload certificate when the
    job says so (the authz server's name checked against its certificate), else plaintext."""
    if not job["tls"]:
        return grpc.aio.insecure_channel(job["target"])
    if tls is None:
        raise RuntimeError(f"job {job['label']} needs --tls-* files")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    options = [("grpc.ssl_target_name_override", AUTHZ_DNS)]
    return grpc.aio.secure_channel(job["target"], credentials, options=options)


async def _grpc_job(
    payload: bytes, job: dict[str, Any], warmup: float, tls: ClientTls | None
) -> dict[str, Any]:
    """N concurrent unary Checks on one channel for ``seconds``; BEGIN/END lines on stdout."""
    concurrency, seconds = int(job["concurrency"]), float(job["seconds"])
    async with _channel(job, tls) as channel:
        call = channel.unary_unary(CHECK_METHOD)  # bytes in, bytes out: no client-side parse
        first = external_auth_pb2.CheckResponse.FromString(
            await call(payload, timeout=CALL_TIMEOUT_SECONDS)
        )
        latencies: list[float] = []
        counts = {"calls": 0, "errors": 0, "record": False}

        def answered(_: None, answer: object, seconds: float) -> None:
            if isinstance(answer, grpc.aio.AioRpcError):
                counts["errors"] += counts["record"]
                return
            counts["calls"] += 1
            if counts["record"]:
                latencies.append(seconds)

        async def phase(until: float) -> int:
            counts["calls"] = 0
            await call_concurrently(
                itertools.repeat(None), lambda *_: call(payload, timeout=CALL_TIMEOUT_SECONDS),
                answered, concurrency=concurrency, more=lambda: time.perf_counter() < until,
            )  # fmt: skip
            return counts["calls"]

        warm = await phase(time.perf_counter() + warmup)
        print(f"BEGIN {job['label']}", flush=True)
        cpu_started, started = time.process_time(), time.perf_counter()
        counts["record"] = True
        calls = await phase(started + seconds)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    latencies.sort()
    return {
        **job, "calls": calls, "warmup_calls": warm, "errors": counts["errors"],
        "elapsed": elapsed, "per_second": calls / elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6, "p99_us": percentile(latencies, 0.99) * 1e6,
        "client_cpu": cpu, "first_status": first.status.code,
        "first_allowed": first.HasField("ok_response"),
    }  # fmt: skip


async def _grpc_client(
    payload: bytes, jobs: Sequence[dict[str, Any]], warmup: float, tls: ClientTls | None
) -> None:
    for job in jobs:
        result = await _grpc_job(payload, job, warmup, tls)
        print("END " + json.dumps(result), flush=True)


def helper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="l7_path.py _upstream|_echo|_grpc_client")
    parser.add_argument("role", choices=["_upstream", "_echo", "_grpc_client"])
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--capture", type=Path, help="_echo: save the first CheckRequest here")
    parser.add_argument("--request", type=Path, help="_grpc_client: serialized CheckRequest")
    parser.add_argument("--jobs", default="[]", help="_grpc_client: JSON list of jobs")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--tls-cert", type=Path, help="_echo: serve mTLS; _grpc_client: present")
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-ca", type=Path)
    args = parser.parse_args(argv)
    payload = args.request.read_bytes() if args.request else b""
    tls = None
    if args.tls_cert:  # read before the drop, as the files' owner
        files = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
        tls = ClientTls(*files.read())
    signal.alarm(HELPER_LIFETIME_SECONDS)
    if args.role == "_echo" and args.tls_cert:
        credentials = server_credentials(files)  # meshguard's own: the same mTLS server
    drop_privileges(uid=args.uid, gid=args.uid)
    if args.role == "_grpc_client":
        asyncio.run(_grpc_client(payload, json.loads(args.jobs), args.warmup, tls))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.role == "_upstream":
        asyncio.run(_serve_upstream(args.port))
    else:
        asyncio.run(_serve_echo(args.port, args.capture, credentials if tls else None))
    return 0


def helper_argv(role: str, *extra: str) -> list[str]:
    return module_argv("benchmarks.l7_path", role, *extra)
