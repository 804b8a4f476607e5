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
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import L7_POLICY, ROOT, module_argv
from benchmarks.harness import alternating, system_cpu, tree_cpu_seconds
from meshguard import yaml_io
from tests.support.pods import injected_example, status_of
from tests.support.processes import (
    HOST,
    free_port,
    serve_authz_argv,
    stop_process,
    wait_grpc_serving,
)

CHANNELS_PER_CLIENT = 4
WARMUP_SECONDS = 0.5


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


# --- client process -----------------------------------------------------------------------


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    """``concurrency`` Checks in flight over CHANNELS_PER_CLIENT channels; counted after the
    warm-up for ``seconds``."""
    import grpc.aio  # noqa: PLC0415 - only the client processes need it
    from envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: PLC0415

    from tests.support.load import call_concurrently, check_request  # noqa: PLC0415

    fields = json.loads(args.request)
    request = check_request(fields["source"], method=fields["method"], path=fields["path"],
                            port=fields["port"], pod=fields["pod"])  # fmt: skip
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(f"{HOST}:{args.port}", options=options)
                for _ in range(CHANNELS_PER_CLIENT)]  # fmt: skip
    stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
    counts = {"ok": 0, "denied": 0, "errors": 0}
    state = {"counting": False, "stop": False}

    def answered(_: None, answer: Any, seconds: float) -> None:
        if isinstance(answer, grpc.aio.AioRpcError):
            counts["errors"] += state["counting"]
        else:
            counts["ok" if answer.status.code == 0 else "denied"] += state["counting"]

    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 10)
    # worker i always on channel i % CHANNELS_PER_CLIENT; counted in the window only
    load = asyncio.create_task(
        call_concurrently(itertools.repeat(None),
                          lambda index, _: stubs[index % len(stubs)].Check(request, timeout=5),
                          answered, concurrency=args.concurrency, more=lambda: not state["stop"])
    )  # fmt: skip
    await asyncio.sleep(WARMUP_SECONDS)
    state["counting"], started = True, time.perf_counter()
    await asyncio.sleep(args.seconds)
    state["counting"], elapsed = False, time.perf_counter() - started
    state["stop"] = True
    await load
    for channel in channels:
        await channel.close()
    return {**counts, "seconds": elapsed}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.suite.workers _client")
    parser.add_argument("role", choices=["_client"])
    for option in ("--port", "--concurrency"):
        parser.add_argument(option, type=int, required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    print(json.dumps(asyncio.run(_client(parser.parse_args(argv)))), flush=True)
    return 0


# --- orchestration ------------------------------------------------------------------------


def measure(
    workers: int, pod_file: Path, fields: dict[str, Any], *, clients: int, concurrency: int,
    seconds: float, log: Path,
) -> WorkersRow:  # fmt: skip
    port = free_port()
    argv = [*serve_authz_argv(pod_file, port), "--host", HOST, "--workers", str(workers)]
    client_argv = module_argv("benchmarks.suite.workers", "_client", "--port", str(port),
                              "--request", json.dumps(fields), "--concurrency", str(concurrency),
                              "--seconds", str(seconds))  # fmt: skip
    with log.open("wb") as sink:
        server = subprocess.Popen(argv, stdout=sink, stderr=sink, cwd=ROOT)
        try:
            wait_grpc_serving(f"{HOST}:{port}", server, log)
            time.sleep(1.0 if workers > 1 else 0.3)  # every worker bound and serving
            procs = [subprocess.Popen(client_argv, stdout=subprocess.PIPE) for _ in range(clients)]
            time.sleep(WARMUP_SECONDS + 0.3)  # into the measured window
            busy_before, server_before = system_cpu()["busy"], tree_cpu_seconds(server.pid)
            window_started = time.perf_counter()
            outputs = [p.communicate(timeout=seconds + 60)[0] for p in procs]
            window_cpu = time.perf_counter() - window_started
            server_cores = (tree_cpu_seconds(server.pid) - server_before) / window_cpu
            busy = (system_cpu()["busy"] - busy_before) / window_cpu / (os.cpu_count() or 1)
        finally:
            stop_process(server)
    results = [json.loads(o.decode().strip().splitlines()[-1]) for o in outputs]
    window = max(r["seconds"] for r in results)
    ok, denied = (sum(r[key] for r in results) for key in ("ok", "denied"))
    return {
        "workers": workers, "clients": clients, "concurrency_per_client": concurrency,
        "channels_per_client": CHANNELS_PER_CLIENT, "seconds": window, "ok": ok,
        "denied": denied, "errors": sum(r["errors"] for r in results),
        "checks_per_second": (ok + denied) / window, "machine_busy_share": busy,
        "server_cores": server_cores,
    }  # fmt: skip


def run(*, quick: bool, log_dir: Path) -> Workers:
    pod = injected_example(policy=L7_POLICY, mode="enforce")
    fields = request_fields(pod)
    rows: dict[int, list[WorkersRow]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="meshguard-workers-") as tmp:
        pod_file = Path(tmp) / "pod.yaml"
        pod_file.write_text(yaml_io.dump(pod, sort_keys=True), encoding="utf-8")
        for index in range(1 if quick else 2):
            for workers in alternating((1, 2), index):
                row = measure(workers, pod_file, fields, clients=3, concurrency=16,
                              seconds=2.0 if quick else 5.0,
                              log=log_dir / f"serve-authz-workers{workers}.log")  # fmt: skip
                print(
                    f"[workers] {workers} worker(s): {row['checks_per_second']:,.0f} checks/s,"
                    f" server {row['server_cores']:.2f} cores",
                    file=sys.stderr,
                    flush=True,
                )
                rows[workers].append(row)
    median = {w: sorted(x["checks_per_second"] for x in r)[len(r) // 2] for w, r in rows.items()}
    return {
        "request": fields,
        "rows": {str(w): r for w, r in rows.items()},
        "checks_per_second": {str(w): median[w] for w in rows},
        "speedup_2_over_1": median[2] / median[1],
        "best": {str(w): max(r, key=lambda x: x["checks_per_second"]) for w, r in rows.items()},
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    raise SystemExit(client_main(sys.argv[1:]))
