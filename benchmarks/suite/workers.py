"""``meshguard serve-authz --workers N``: Check calls per second with 1 and 2 workers.

The server runs as in standalone mode (``--pods FILE``) on the example pod injected by
``inject_pod`` with the L7 benchmark's policy. Several client processes (each with a few
gRPC channels, i.e. separate HTTP/2 connections, so SO_REUSEPORT spreads them over the
workers) send the same allowed CheckRequest with a fixed number of calls in flight, for a
fixed time after a warm-up. Checks/s is the sum over clients; the machine's busy share over
the window (``/proc/stat``) shows whether the CPUs were saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import L7_POLICY, ROOT
from benchmarks.harness import tree_cpu_seconds
from meshguard import yaml_io
from tests.support.keys import trusted_keys_file
from tests.support.pods import injected_example, status_of
from tests.support.processes import HOST, free_port, stop_process

CHANNELS_PER_CLIENT = 4


class WorkersRow(TypedDict):
    """One measurement of ``serve-authz --workers N``."""

    workers: int
    clients: int
    concurrency_per_client: int
    channels_per_client: int
    seconds: float
    ok: int
    denied: int
    errors: int
    checks_per_second: float
    machine_busy_share: float
    server_cores: float


class Workers(TypedDict):
    """What :func:`run` measures (``authz_workers`` in results.json); keys are worker counts."""

    request: dict[str, Any]
    rows: dict[str, list[WorkersRow]]
    checks_per_second: dict[str, float]
    speedup_2_over_1: float
    best: dict[str, WorkersRow]
    cpus: int | None


def request_fields(pod: dict[str, Any]) -> dict[str, Any]:
    source = next(a for a in status_of(pod).listener.sources["app"] if ":" not in a)
    key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
    return {"source": source, "pod": key, "port": 15020, "method": "POST", "path": "/quitquitquit"}


def cpu_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# --- client process -----------------------------------------------------------------------


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    import grpc.aio  # noqa: PLC0415 - only the client processes need it
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc  # noqa: PLC0415

    fields = json.loads(args.request)
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = fields["source"]
    request.attributes.source.address.socket_address.port_value = 40000
    request.attributes.destination.address.socket_address.address = HOST
    request.attributes.destination.address.socket_address.port_value = fields["port"]
    request.attributes.request.http.method = fields["method"]
    request.attributes.request.http.path = fields["path"]
    request.attributes.request.http.headers["x-meshguard-pod"] = fields["pod"]
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"{HOST}:{args.port}", options=options)
        for _ in range(CHANNELS_PER_CLIENT)
    ]
    stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
    counts = {"ok": 0, "denied": 0, "errors": 0}
    counting = False
    stop = False

    async def worker(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while not stop:
            try:
                answer = await stub.Check(request, timeout=5)
            except grpc.aio.AioRpcError:
                if counting:
                    counts["errors"] += 1
                continue
            if counting:
                counts["ok" if answer.status.code == 0 else "denied"] += 1

    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 10)
    tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    counting = True
    started = time.perf_counter()
    await asyncio.sleep(args.seconds)
    counting = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {**counts, "seconds": elapsed}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.suite.workers _client")
    parser.add_argument("role", choices=["_client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_client(args))), flush=True)
    return 0


# --- orchestration ------------------------------------------------------------------------


def wait_serving(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve-authz exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("serve-authz did not listen in time")


def measure(
    workers: int,
    pod_file: Path,
    fields: dict[str, Any],
    *,
    clients: int,
    concurrency: int,
    seconds: float,
    log: Path,
) -> WorkersRow:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "meshguard",
        "serve-authz",
        "--pods",
        str(pod_file),
        "--host",
        HOST,
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--workers",
        str(workers),
        "--trusted-keys",
        str(trusted_keys_file(pod_file.parent)),
    ]
    with log.open("wb") as sink:
        server = subprocess.Popen(argv, stdout=sink, stderr=sink, cwd=ROOT)
        try:
            wait_serving(port, server)
            time.sleep(1.0 if workers > 1 else 0.3)  # every worker bound and serving
            client_argv = [
                sys.executable,
                "-m",
                "benchmarks.suite.workers",
                "_client",
                "--port",
                str(port),
                "--request",
                json.dumps(fields),
                "--concurrency",
                str(concurrency),
                "--seconds",
                str(seconds),
            ]
            procs = [
                subprocess.Popen(client_argv, stdout=subprocess.PIPE, cwd=ROOT)
                for _ in range(clients)
            ]
            time.sleep(0.5 + 0.3)  # into the measured window (warm-up 0.5 s)
            before = cpu_busy()
            server_before, window_started = tree_cpu_seconds(server.pid), time.perf_counter()
            outputs = [p.communicate(timeout=seconds + 60)[0] for p in procs]
            after = cpu_busy()
            server_cores = (tree_cpu_seconds(server.pid) - server_before) / (
                time.perf_counter() - window_started
            )
        finally:
            stop_process(server)
    results = [json.loads(o.decode().strip().splitlines()[-1]) for o in outputs]
    window = max(r["seconds"] for r in results)
    busy = (after[0] - before[0]) / max(1, after[1] - before[1])
    ok = sum(r["ok"] for r in results)
    return {
        "workers": workers,
        "clients": clients,
        "concurrency_per_client": concurrency,
        "channels_per_client": CHANNELS_PER_CLIENT,
        "seconds": window,
        "ok": ok,
        "denied": sum(r["denied"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "checks_per_second": (ok + sum(r["denied"] for r in results)) / window,
        "machine_busy_share": busy,
        "server_cores": server_cores,
    }


def run(*, quick: bool, log_dir: Path) -> Workers:
    pod = injected_example(policy=L7_POLICY, mode="enforce")
    fields = request_fields(pod)
    seconds = 2.0 if quick else 5.0
    rounds = 1 if quick else 2
    rows: dict[int, list[WorkersRow]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="meshguard-workers-") as tmp:
        pod_file = Path(tmp) / "pod.yaml"
        pod_file.write_text(yaml_io.dump(pod, sort_keys=True), encoding="utf-8")
        for index in range(rounds):
            for workers in (1, 2) if index % 2 == 0 else (2, 1):
                row = measure(
                    workers,
                    pod_file,
                    fields,
                    clients=3,
                    concurrency=16,
                    seconds=seconds,
                    log=log_dir / f"serve-authz-workers{workers}.log",
                )
                print(
                    f"[workers] {workers} worker(s): {row['checks_per_second']:,.0f} checks/s"
                    f" (machine busy {row['machine_busy_share']:.0%},"
                    f" server {row['server_cores']:.2f} cores)",
                    file=sys.stderr,
                    flush=True,
                )
                rows[workers].append(row)
    best = {w: max(r, key=lambda x: x["checks_per_second"]) for w, r in rows.items()}
    median = {w: sorted(x["checks_per_second"] for x in r)[len(r) // 2] for w, r in rows.items()}
    return {
        "request": fields,
        "rows": {str(w): r for w, r in rows.items()},
        "checks_per_second": {str(w): median[w] for w in rows},
        "speedup_2_over_1": median[2] / median[1],
        "best": {str(w): b for w, b in best.items()},
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    raise SystemExit(client_main(sys.argv[1:]))
