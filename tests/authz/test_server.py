"""The ext_authz server over a real gRPC channel: answers, partial requests, health, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshguard.authz.decision import PodPolicy, Reason
from meshguard.authz.server import AuthzSettings, serve_authz
from meshguard.authz.store import StaticStore, StoreStats
from meshguard.inject.transform import InjectSettings, inject_pod
from tests.authz.test_store import EXAMPLE
from tests.support.keys import SIGNER, trusted_keys_file
from tests.support.processes import children, listeners, wait_for

STATUS = json.dumps({"listener": {"sources": {"app": ["127.0.100.1", "fd6d:6775::1"]}}})
POLICY = "rules: [{from: app, to: proxy, ports: [15020], http: {methods: [POST], paths: [/quit]}}]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def store(mode: str = "enforce") -> StaticStore:
    annotations = {
        "meshguard.io/policy": POLICY,
        "meshguard.io/status": STATUS,
        "meshguard.io/mode": mode,
    }
    return StaticStore([PodPolicy.from_pod(key="shop/web-1", annotations=annotations, ports={})])


def check_request(
    *,
    method: str = "POST",
    path: str = "/quit",
    source: str = "127.0.100.1",
    port: int = 15020,
    pod: str | None = "shop/web-1",
    extra: dict[str, str] | None = None,
):
    headers = {**({"x-meshguard-pod": pod} if pod else {}), **(extra or {})}
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = source
    request.attributes.source.address.socket_address.port_value = 40000
    request.attributes.destination.address.socket_address.address = "127.0.0.1"
    request.attributes.destination.address.socket_address.port_value = port
    request.attributes.request.http.method = method
    request.attributes.request.http.path = path
    request.attributes.request.http.headers.update(headers)
    return request


def run_with_server(body: Callable[[str, int], Awaitable[Any]], *, mode: str = "enforce") -> Any:
    async def main() -> Any:
        port, metrics_port = free_port(), free_port()
        stop = asyncio.Event()
        settings = AuthzSettings(port=port, metrics_port=metrics_port, grace_seconds=0.1)
        server = asyncio.create_task(serve_authz(settings, store=store(mode), stop=stop))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 10)
                return await body(f"127.0.0.1:{port}", metrics_port)
        finally:
            stop.set()
            await server

    return asyncio.run(main())


async def checks(address: str, requests: list[Any]) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return [await stub.Check(r, timeout=5) for r in requests]


def test_allow_and_deny_with_a_403_that_names_the_reason(caplog):
    caplog.set_level(logging.INFO, logger="meshguard.authz.decisions")

    async def body(address: str, _: int) -> list[Any]:
        return await checks(address, [check_request(), check_request(method="GET")])

    allowed, denied = run_with_server(body)
    assert allowed.status.code == 0
    assert list(allowed.ok_response.headers_to_remove) == ["x-meshguard-pod"]
    assert denied.status.code == 7  # PERMISSION_DENIED
    assert denied.denied_response.status.code == 403
    assert (
        denied.denied_response.body
        == "meshguard: denied: no rule allows app -> proxy:15020 GET /quit\n"
    )
    lines = [r for r in caplog.records if r.name == "meshguard.authz.decisions"]
    assert [r.fields["result"] for r in lines] == ["allow", "deny"]
    assert lines[0].fields["pod"] == "shop/web-1"
    assert lines[0].fields["rule"] == 0
    assert lines[1].fields["request"] == {"method": "GET", "path": "/quit", "port": 15020,
                                           "source_address": "127.0.100.1"}  # fmt: skip


def test_partial_and_hostile_requests_are_denied_with_a_reason():
    async def body(address: str, _: int) -> list[Any]:
        return await checks(
            address,
            [
                external_auth_pb2.CheckRequest(),  # nothing at all
                check_request(pod=None),
                check_request(pod="other/pod"),
                check_request(source="127.0.0.1"),
                check_request(extra={"x-big": "a" * 70_000}),
            ],
        )

    responses = run_with_server(body)
    reasons = [r.status.message for r in responses]
    assert all(r.status.code == 7 for r in responses)
    assert reasons[0].startswith("unknown pod None")
    assert reasons[1].startswith("unknown pod None")
    assert reasons[2].startswith("unknown pod 'other/pod'")
    assert reasons[3] == "unknown source address '127.0.0.1'"
    assert reasons[4] == "request headers and attributes larger than 65536 bytes"


def test_audit_mode_allows_would_be_denials():
    async def body(address: str, _: int) -> list[Any]:
        return await checks(address, [check_request(method="DELETE")])

    (response,) = run_with_server(body, mode="audit")
    assert response.status.code == 0


def test_health_service_and_metrics():
    async def body(address: str, metrics_port: int) -> tuple[Any, Any, str]:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            named = await health.Check(
                health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
                timeout=5,
            )
        await checks(address, [check_request(), check_request(method="GET")])
        text = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
        return overall, named, text

    overall, named, metrics = run_with_server(body)
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert named.status == health_pb2.HealthCheckResponse.SERVING
    assert 'meshguard_authz_decisions_total{reason="allowed_by_rule",result="allow"} 1.0' in metrics
    assert 'meshguard_authz_decisions_total{reason="no_rule",result="deny"} 1.0' in metrics
    # the reason label is a fixed set, every series present from the start
    reasons = set(re.findall(r'meshguard_authz_decisions_total\{reason="([a-z_]+)"', metrics))
    assert reasons == {reason.value for reason in Reason}
    # latency buckets up to Envoy's ext_authz timeout (0.5 s) and beyond
    assert 'meshguard_authz_check_seconds_bucket{le="0.5"} 2.0' in metrics
    assert 'meshguard_authz_check_seconds_bucket{le="1.0"}' in metrics
    assert "process_resident_memory_bytes" in metrics
    assert "process_cpu_seconds_total" in metrics
    assert f'meshguard_authz_build_info{{python="{platform.python_version()}",' in metrics
    assert "meshguard_authz_cache_pods 1.0" in metrics
    assert "meshguard_authz_synced 1.0" in metrics
    assert "meshguard_authz_watch_restarts_total 0.0" in metrics
    assert re.search(r"meshguard_authz_sync_age_seconds \d", metrics)


class UnsyncedStore:
    """A store that has not completed its first list until ``synced`` is set."""

    def __init__(self) -> None:
        self.inner = store()
        self.synced = False

    def get(self, key: str) -> PodPolicy | None:
        return self.inner.get(key)

    def is_synced(self) -> bool:
        return self.synced

    def stats(self) -> StoreStats:
        return StoreStats(pods=0, synced_at=None)


def test_not_serving_and_no_decision_until_the_store_has_synced():
    """The issue's rollout bug: a replica answered SERVING before its first list and denied
    allowed requests "unknown pod"; now health says NOT_SERVING and a Check gets
    not_synced (still a denial, fail closed) until the store has synced."""
    unsynced = UnsyncedStore()

    async def main() -> tuple[list[int], str, list[int], int]:
        port = free_port()
        stop = asyncio.Event()
        settings = AuthzSettings(port=port, metrics_port=None, grace_seconds=0.1)
        server = asyncio.create_task(serve_authz(settings, store=unsynced, stop=stop))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 10)
                health = health_pb2_grpc.HealthStub(channel)
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                before = [
                    (await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status
                    for s in ("", "envoy.service.auth.v3.Authorization")
                ]
                early = await stub.Check(check_request(), timeout=5)
                unsynced.synced = True
                after: list[int] = []
                for _ in range(50):
                    status = (
                        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    ).status
                    after = [status]
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.05)
                late = await stub.Check(check_request(), timeout=5)
                return before, early.status.message, after, late.status.code
        finally:
            stop.set()
            await server

    before, early, after, late = asyncio.run(main())
    assert before == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert early == "the pod cache has not synced yet: no decision"
    assert after == [health_pb2.HealthCheckResponse.SERVING]
    assert late == 0


def serve_workers(tmp_path: Path, *, workers: int) -> tuple[subprocess.Popen[str], int]:
    """serve-authz --workers on the injected example pod's file: the parent and its port."""
    pod = yaml.safe_load(EXAMPLE.read_text())
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(pod))
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-m", "meshguard", "serve-authz", "--pods", str(pod_file),
         "--port", str(port), "--metrics-port", "0", "--workers", str(workers),
         "--trusted-keys", str(trusted_keys_file(tmp_path))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return parent, port


def test_workers_share_the_port_and_stop_with_their_parent(tmp_path):
    parent, port = serve_workers(tmp_path, workers=2)
    try:
        deadline = time.monotonic() + 30
        while listeners(port) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listeners(port) == 2
        answers = asyncio.run(
            checks(f"127.0.0.1:{port}", [check_request(pod="demo/shop", path="/quitquitquit")] * 20)
        )
        assert {a.status.code for a in answers} == {0}
    finally:
        parent.terminate()
        parent.wait(timeout=20)
    deadline = time.monotonic() + 10
    while listeners(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listeners(port) == 0


def test_a_killed_worker_is_started_again_and_every_worker_dies_with_a_killed_parent(tmp_path):
    parent, port = serve_workers(tmp_path, workers=3)
    try:
        wait_for(lambda: listeners(port) == 3, what="three processes to listen", timeout=30)
        first = children(parent.pid)
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: len(set(children(parent.pid)) - set(first)) == 1,
                 what="the worker to be started again", timeout=30)  # fmt: skip
        wait_for(lambda: listeners(port) == 3, what="it to listen", timeout=30)
        workers = children(parent.pid)
        answers = asyncio.run(
            checks(f"127.0.0.1:{port}", [check_request(pod="demo/shop", path="/quitquitquit")] * 20)
        )
        assert {a.status.code for a in answers} == {0}
    finally:
        parent.kill()  # no chance to stop them: each worker ends on its own
        _, stderr = parent.communicate(timeout=20)
    assert '"event": "worker-exited"' in stderr
    wait_for(lambda: listeners(port) == 0, what="every worker to end", timeout=15)
    for pid in workers:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists()
                 or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                 what=f"worker {pid} to end", timeout=15)  # fmt: skip
