"""The authz server under load, shared by ``tests/load`` and the benchmarks.

Kinds of Check for the injected example pod (four the policy allows, six it denies, each
knowing its answer), the one driver of concurrent Checks (:func:`call_concurrently`, also
under ``l7_path.py``'s and the workers' clients) and running the kinds over one channel, and
the example pod in a network namespace with the real Envoy and ``meshguard serve-authz``
(uid 1337) that the fault scenarios kill and restart under load from :class:`LoadClient`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from meshguard import yaml_io
from meshguard.authz.istio_config import envoy_config_text
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.rules.ruleset import Family
from meshguard.sandbox.envoy import authz_command, envoy_command, wait_listening
from meshguard.sandbox.istio import CaptureConfig, capture_payload
from meshguard.sandbox.netns import NetworkNamespace, serve_http_command
from tests.support.keys import trusted_keys_file
from tests.support.pods import injected_example, status_of
from tests.support.processes import HOST

T = TypeVar("T")
R = TypeVar("R")
POD_KEY = "demo/shop"
PROXY, APP = 1337, 1000
AUTHZ_PORT, LISTENER_PORT, ENVOY_ADMIN_PORT, AGENT_PORT = LOCAL_AUTHZ_PORT, 15007, 15000, 15020


# --- Checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    allowed: bool
    request: external_auth_pb2.CheckRequest
    reason: str = ""

    @property
    def key(self) -> tuple[Any, ...]:
        http = self.request.attributes.request.http
        return (
            http.headers.get("x-meshguard-pod"),
            self.request.attributes.source.address.socket_address.address,
            self.request.attributes.destination.address.socket_address.port_value,
            http.method,
            http.path,
        )

    def problem(self, response: external_auth_pb2.CheckResponse) -> str | None:
        if self.allowed:
            if response.status.code != 0:
                return f"{self.name}: denied ({response.status.message})"
            if list(response.ok_response.headers_to_remove) != ["x-meshguard-pod"]:
                return f"{self.name}: the pod header is not removed"
            return None
        if response.status.code != 7:
            return f"{self.name}: allowed"
        if response.denied_response.status.code != 403:
            return f"{self.name}: denied with {response.denied_response.status.code}"
        if not response.status.message.startswith(self.reason):
            return f"{self.name}: reason {response.status.message!r}"
        return None


def check_request(
    source: str, *, method: str = "POST", path: str = "/quitquitquit", port: int = AGENT_PORT,
    pod: str = POD_KEY,
) -> external_auth_pb2.CheckRequest:  # fmt: skip
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = source
    request.attributes.source.address.socket_address.port_value = 40000
    request.attributes.destination.address.socket_address.address = HOST
    request.attributes.destination.address.socket_address.port_value = port
    http = request.attributes.request.http
    http.method, http.path = method, path
    http.headers.update({"x-meshguard-pod": pod, ":authority": f"{HOST}:{port}"})
    return request


def check_kinds(pod: dict[str, Any]) -> list[Kind]:
    sources = status_of(pod).listener.sources
    app4, app6 = sources["app"]
    cache = sources["cache"][0]
    return [
        Kind("app POST /quitquitquit", True, check_request(app4)),
        Kind("app POST /quitquitquit (IPv6)", True, check_request(app6)),
        Kind("app POST /quitquitquit?now", True, check_request(app4, path="/quitquitquit?now")),
        Kind("app POST /quitquitquit again", True, check_request(app4)),
        Kind("app GET /quitquitquit", False, check_request(app4, method="GET"),
             "no rule allows app -> proxy:15020 GET /quitquitquit"),
        # cache has no rule of its own to the proxy: only Istio's patterns (POST /quitquitquit)
        Kind("cache POST /debug/pprof", False, check_request(cache, path="/debug/pprof"),
             "no rule allows cache -> proxy:15020 POST /debug/pprof"),
        Kind("app POST /quitquitquit/now", False, check_request(app4, path="/quitquitquit/now"),
             "no rule allows app -> proxy:15020 POST /quitquitquit/now"),
        Kind("app dot segments", False, check_request(app4, path="/x/../quitquitquit"),
             "path '/x/../quitquitquit' is not normalized"),
        Kind("unknown pod", False, check_request(app4, pod="demo/other"),
             "unknown pod 'demo/other'"),
        Kind("unknown source", False, check_request("127.0.0.1"),
             "unknown source address '127.0.0.1'"),
    ]  # fmt: skip


@dataclass
class CheckRun:
    sent: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.sent.values())

    def add(self, other: CheckRun) -> None:
        self.sent += other.sent
        self.errors += other.errors
        self.wrong += other.wrong
        self.latencies += other.latencies
        self.elapsed += other.elapsed


async def call_concurrently(
    items: Iterator[T], send: Callable[[int, T], Awaitable[R]],
    answered: Callable[[T, R | grpc.aio.AioRpcError, float], None], *, concurrency: int,
    more: Callable[[], bool] = lambda: True,
) -> float:  # fmt: skip
    """The one gRPC Check client of the tests and the benchmarks: ``concurrency`` workers on
    this event loop, each taking the next item while ``more()``, awaiting ``send(worker,
    item)`` (a unary call on the caller's channels) and passing the answer or the gRPC error
    and the call's seconds to ``answered``. Returns the wall seconds."""

    async def worker(index: int) -> None:
        for item in items:
            if not more():
                return
            started = time.perf_counter()
            try:
                answer: R | grpc.aio.AioRpcError = await send(index, item)
            except grpc.aio.AioRpcError as exc:
                answer = exc
            answered(item, answer, time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return time.perf_counter() - began


async def run_checks(
    stub: external_auth_pb2_grpc.AuthorizationStub, kinds: Sequence[Kind], *, first: int,
    count: int, concurrency: int, stop_at: float,
) -> CheckRun:  # fmt: skip
    run = CheckRun()

    def answered(kind: Kind, response: Any, seconds: float) -> None:
        run.sent[kind.name] += 1
        run.latencies.append(seconds)
        if isinstance(response, grpc.aio.AioRpcError):
            run.errors[response.code().name] += 1
        elif problem := kind.problem(response):
            run.wrong[problem] += 1

    run.elapsed = await call_concurrently(
        (kinds[number % len(kinds)] for number in range(first, first + count)),
        lambda _, kind: stub.Check(kind.request, timeout=10), answered,
        concurrency=concurrency, more=lambda: time.monotonic() <= stop_at,
    )  # fmt: skip
    return run


# --- the pod with Envoy in front of the authz server ----------------------------------

#: A client under the app's uid (started as root, dropping in-process after its imports):
#: WORKERS threads alternate POST and GET /quitquitquit to 127.0.0.1:15020, a new connection
#: each, until stdin closes or MAX_SECONDS pass; then one JSON list of
#: [began, ended, method, status, origin] (CLOCK_MONOTONIC, shared by every process).
LOAD_CLIENT = r"""
import encodings.idna, http.client, json, sys, threading, time
from meshguard.sandbox.probe import drop_privileges
uid, workers, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
max_seconds = float(sys.argv[3])
drop_privileges(uid=uid, gid=uid)
stop = threading.Event()
results = []

def work(first):
    mine, n = [], first
    while not stop.is_set():
        method = ("POST", "GET")[n % 2]
        n += 1
        began = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request(method, "/quitquitquit")
            response = connection.getresponse()
            body, status = response.read(), response.status
            if status == 200 and b'"pilot-agent"' in body:
                origin = "upstream"
            elif body.startswith(b"meshguard: denied"):
                origin = "meshguard"
            else:
                origin = "envoy:" + body[:80].decode(errors="replace")
        except OSError as exc:
            status, origin = 0, type(exc).__name__
        finally:
            connection.close()
        mine.append([began, time.monotonic(), method, status, origin])
    results.append(mine)

threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
for thread in threads:
    thread.start()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
stop.wait(max_seconds)
stop.set()
for thread in threads:
    thread.join()
json.dump([record for mine in results for record in mine], sys.stdout)
"""


class LoadClient:
    """:data:`LOAD_CLIENT` in the namespace; :meth:`finish` stops it and returns its records."""

    def __init__(self, ns: NetworkNamespace, *, uid: int, workers: int, max_seconds: float):
        argv = [sys.executable, "-c", LOAD_CLIENT, str(uid), str(workers), str(max_seconds),
                str(AGENT_PORT)]  # fmt: skip
        self.process = subprocess.Popen(
            ns.argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the load client did not start: {self.process.communicate()[1]}")

    def finish(self, timeout: float = 30) -> list[tuple[float, float, str, int, str]]:
        out, err = self.process.communicate(timeout=timeout)  # closes stdin: the client stops
        if self.process.returncode != 0:
            raise RuntimeError(f"the load client failed: {err[-1500:]}")
        return [tuple(record) for record in json.loads(out)]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


class FaultPod:
    """The injected example pod in a namespace, with Envoy and serve-authz (uid 1337)."""

    def __init__(self, ns: NetworkNamespace, workdir: Path) -> None:
        self.ns = ns
        self.pod = injected_example()
        self.pod_file = workdir / "pod.yaml"
        self.pod_file.write_text(yaml_io.dump(self.pod, sort_keys=True))
        ruleset_file = workdir / "ruleset"
        ruleset_file.write_text(self.pod["metadata"]["annotations"]["meshguard.io/ruleset"])
        envoy_config = workdir / "envoy.yaml"
        envoy_config.write_text(
            envoy_config_text("bootstrap", authz_host=HOST, authz_port=AUTHZ_PORT,
                              admin_port=ENVOY_ADMIN_PORT)
        )  # fmt: skip
        self.log_file = workdir / "authz.log"
        self.log_file.write_text("")
        self.authz: subprocess.Popen[str] | None = None
        capture = CaptureConfig(proxy_uids=(PROXY,), proxy_gids=(PROXY,))
        for family in Family:
            ns.run([family.restore, "--noflush"], stdin=capture_payload(capture, family))
        ns.run([sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(ruleset_file)])
        agent = serve_http_command(name="pilot-agent", uid=PROXY, gid=PROXY, ports=[AGENT_PORT])
        ns.spawn(agent, ready_line="ready")
        self.start_authz()
        metadata = self.pod["metadata"]
        identity = {"POD_NAME": metadata["name"], "POD_NAMESPACE": metadata["namespace"]}
        with (workdir / "envoy.log").open("w") as log:
            ns.spawn(envoy_command(envoy_config, uid=PROXY, gid=PROXY), env=identity, stderr=log)
        wait_listening(ns, port=LISTENER_PORT, uid=PROXY, gid=PROXY)

    def start_authz(self) -> None:
        with self.log_file.open("a") as log:
            self.authz = self.ns.spawn(
                authz_command(
                    [self.pod_file],
                    uid=PROXY,
                    gid=PROXY,
                    port=AUTHZ_PORT,
                    trusted_keys=self.trusted_keys(),
                ),
                stderr=log,
            )
        wait_listening(self.ns, port=AUTHZ_PORT, uid=PROXY, gid=PROXY)

    def trusted_keys(self) -> Path:
        """The tests' public key beside the pod file, readable by the proxy's uid."""
        path = trusted_keys_file(self.pod_file.parent)
        path.chmod(0o644)
        return path

    def kill_authz(self) -> None:
        assert self.authz is not None
        self.authz.send_signal(signal.SIGKILL)
        self.ns.stop(self.authz)
        self.authz = None
