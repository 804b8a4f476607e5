"""``serve-authz --kubernetes`` at scale: time to ready, memory and API load at 10,000 admitted
pods, and Check latency while the pod cache lists again (410 Gone) under steady churn.

What it measures and how: ``benchmarks/README.md``, section ``authz_store.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import (
    Machine,
    machine,
    machine_line,
    markdown_table,
    process_cpu,
    script_parser,
    write_json,
)
from benchmarks.harness import process_tree
from meshguard.authz.kube import PAGE_SIZE
from tests.support.apiserver import Churn as ApiChurn
from tests.support.apiserver import ScriptedApiServer
from tests.support.keys import trusted_keys_file
from tests.support.latency import LatencyMs, latency_ms
from tests.support.pods import injected_example
from tests.support.processes import HOST, free_port, start_logged, stop_process

MODULE = "benchmarks.authz_store"
CONFIGS = {
    "1 process": (1, 1),  # (--workers, processes)
    "--workers 2 (one watch)": (2, 1),
    "2 processes (a watch each)": (1, 2),
}
READY_TIMEOUT = 180.0


class StartRow(TypedDict):
    config: str
    pods: int
    ready_s: float
    cpu_s: float
    rss_mib: float
    hwm_mib: float
    list_requests: int
    list_mib: float
    watches: int


class Window(TypedDict):
    name: str
    seconds: float
    checks: int
    latency: LatencyMs


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    pods: int
    rounds: list[StartRow]
    starts: list[StartRow]
    relists: list[Window]
    marks: dict[str, float]
    machine: Machine
    seconds: float


def admitted_pods(count: int, template: str) -> Iterator[dict[str, Any]]:
    for index in range(count):
        pod: dict[str, Any] = json.loads(template)
        pod["metadata"]["name"] = f"p{index}"
        pod["metadata"]["uid"] = f"uid-p{index}"
        yield pod


def template() -> str:
    pod = injected_example()
    pod["metadata"]["namespace"] = "demo"
    return json.dumps(pod)


def serve_argv(
    kubeconfig: Path, *, port: int, metrics: int, workers: int, page_size: int = PAGE_SIZE
) -> list[str]:
    """serve-authz against the API server of ``kubeconfig`` (through the environment the
    servers inherit: in a cluster it would be the service account's)."""
    os.environ["KUBECONFIG"] = str(kubeconfig)
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        os.environ.pop(name, None)
    return [sys.executable, "-m", "meshguard", "--log-level", "warning", "serve-authz",
            "--kubernetes", "--insecure-plaintext", "--host", HOST, "--port", str(port),
            "--metrics-port", str(metrics), "--workers", str(workers),
            "--list-page-size", str(page_size),
            "--trusted-keys", str(trusted_keys_file(kubeconfig.parent))]  # fmt: skip


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def wait_metric(
    ports: Sequence[int], name: str, at_least: float, *, timeout: float,
    servers: Sequence[subprocess.Popen[bytes]] = (),
) -> float:  # fmt: skip
    """Until ``name`` >= ``at_least`` on every port; the monotonic time it happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(server.poll() is not None for server in servers):
            raise RuntimeError(f"serve-authz exited (waiting for {name})")
        if all((metric(port, name) or 0) >= at_least for port in ports):
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"{name} not >= {at_least} on {ports} within {timeout:.0f} s")


def measure_start(
    api: ScriptedApiServer, kubeconfig: Path, *, config: str, pods: int, workdir: Path
) -> StartRow:
    workers, processes = CONFIGS.get(config, (1, 1))
    api.requests.clear()
    api.list_bytes = 0
    port = free_port()
    metrics = [free_port() for _ in range(processes)]
    started = time.monotonic()
    servers = []
    for index, metrics_port in enumerate(metrics):
        argv = serve_argv(kubeconfig, port=port, metrics=metrics_port, workers=workers)
        servers.append(start_logged(argv, workdir / f"serve-{index}.log"))
    ports = [m + i for m in metrics for i in range(workers)]
    try:
        ready = wait_metric(
            ports, "meshguard_authz_synced", 1, timeout=READY_TIMEOUT, servers=servers
        )
        cpu = sum(process_cpu(pid) for server in servers for pid in process_tree(server.pid))
        time.sleep(1.0)  # settle: the view swapped in, garbage collected
        pids = [pid for server in servers for pid in process_tree(server.pid)]
        rss = sum(status_kib(pid, "VmRSS") for pid in pids)
        hwm = sum(status_kib(pid, "VmHWM") for pid in pids)
    finally:
        for server in servers:
            stop_process(server)
    return {
        "config": config, "pods": pods, "ready_s": ready - started, "cpu_s": cpu,
        "rss_mib": rss / 1024, "hwm_mib": hwm / 1024, "list_requests": len(api.lists()),
        "list_mib": api.list_bytes / 2**20, "watches": len(api.watches()),
    }  # fmt: skip


class Churn(ApiChurn):
    """About ``rate`` changes a second: a pod deleted, one created, one modified."""

    def __init__(self, api: ScriptedApiServer, template: str, *, pods: int, rate: float) -> None:
        super().__init__(api, interval=3 / rate)
        self._template, self._pods = template, pods

    def round(self, index: int) -> None:
        pod: dict[str, Any] = json.loads(self._template)
        pod["metadata"]["name"] = f"new{index}"
        self.api.put(pod)
        with contextlib.suppress(KeyError):  # deleted before (the cold relist puts it back)
            self.api.delete(f"demo/p{index}")
        modified: dict[str, Any] = json.loads(self._template)
        modified["metadata"]["name"] = f"p{self._pods - 1 - index}"
        modified["status"] = {"phase": "Running", "round": index}
        self.api.put(modified)


def measure_relists(
    api: ScriptedApiServer, kubeconfig: Path, *, pods: int, template: str, quick: bool,
    workdir: Path, page_size: int,
) -> tuple[list[Window], dict[str, float]]:  # fmt: skip
    port, metrics = free_port(), free_port()
    argv = serve_argv(kubeconfig, port=port, metrics=metrics, workers=1, page_size=page_size)
    server = start_logged(argv, workdir / "serve-relist.log")
    steady = 4.0 if quick else 8.0
    marks: dict[str, float] = {}
    try:
        wait_metric([metrics], "meshguard_authz_synced", 1, timeout=READY_TIMEOUT, servers=[server])
        out = workdir / f"client-{page_size}-{time.monotonic_ns()}.json"
        client = start_logged(
            [sys.executable, "-m", MODULE, "_client", str(port), str(out)],
            out.with_suffix(".log"),
        )
        with Churn(api, template, pods=pods, rate=60):
            time.sleep(steady)  # the client connects and runs steady
            marks["warm_start"] = time.time()
            api.script.down = True  # the watch breaks and cannot resume (503, backoff) ...
            api.end_watches()
            time.sleep(0.3)  # ... while the churn goes on
            api.compact()  # ... and the log is compacted: the resumed watch gets 410
            api.script.down = False
            wait_metric([metrics], "meshguard_authz_relists_total", 2, timeout=READY_TIMEOUT)
            marks["warm_end"] = time.time()
            time.sleep(steady)
            marks["cold_start"] = time.time()
            api.script.down = True  # the watch cannot resume while every pod changes
            api.end_watches()
            for pod in admitted_pods(pods, template):
                api.put(pod)
            api.compact()
            api.script.down = False
            wait_metric([metrics], "meshguard_authz_relists_total", 3, timeout=READY_TIMEOUT)
            marks["cold_end"] = time.time()
            time.sleep(steady / 2)
        out.with_suffix(".stop").touch()
        client.wait(timeout=60)
        samples = json.loads(out.read_text())
    finally:
        stop_process(server)
    return windows(samples, marks, page_size=page_size), marks


def windows(samples: list[list[float]], marks: dict[str, float], *, page_size: int) -> list[Window]:
    """Latencies by window: steady (churn only), the warm relist, the cold relist."""
    spans = {
        "steady (churn)": (samples[0][0] if samples else 0.0, marks["warm_start"]),
        "relist, pods unchanged": (marks["warm_start"], marks["warm_end"]),
        "relist, every pod changed": (marks["cold_start"], marks["cold_end"]),
    }
    found: list[Window] = []
    for name, (start, end) in spans.items():
        inside = [latency for at, latency in samples if start <= at <= end]
        found.append(
            {"name": f"{name}, pages of {page_size}", "seconds": end - start,
             "checks": len(inside), "latency": latency_ms(inside)}
        )  # fmt: skip
    return found


def client_main(argv: Sequence[str]) -> int:
    """``_client PORT OUT``: Checks at c=1 until OUT.stop exists; [[time, seconds], ...]."""
    import grpc  # noqa: PLC0415 - the helper only
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc  # noqa: PLC0415

    port, out = int(argv[0]), Path(argv[1])
    request = external_auth_pb2.CheckRequest()
    source = request.attributes.source.address.socket_address
    source.address, source.port_value = "127.0.100.1", 40000
    request.attributes.destination.address.socket_address.port_value = 15020
    request.attributes.request.http.method = "POST"
    request.attributes.request.http.path = "/quitquitquit"
    request.attributes.request.http.headers["x-meshguard-pod"] = "demo/p5000"

    async def run() -> list[list[float]]:
        samples: list[list[float]] = []
        stop = out.with_suffix(".stop")
        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            while not stop.exists():
                for _ in range(50):
                    began = time.perf_counter()
                    await stub.Check(request, timeout=5)
                    samples.append([time.time(), time.perf_counter() - began])
        return samples

    out.write_text(json.dumps(asyncio.run(run())))
    return 0


def median_rows(rows: list[StartRow]) -> list[StartRow]:
    merged: list[StartRow] = []
    for config, pods in dict.fromkeys((row["config"], row["pods"]) for row in rows):
        group = [row for row in rows if (row["config"], row["pods"]) == (config, pods)]

        def median(key: str, group: list[StartRow] = group) -> float:
            return statistics.median(float(row[key]) for row in group)  # type: ignore[literal-required]

        merged.append(
            {**group[0], "ready_s": median("ready_s"), "cpu_s": median("cpu_s"),
             "rss_mib": median("rss_mib"), "hwm_mib": median("hwm_mib"),
             "list_mib": median("list_mib")}
        )  # fmt: skip
    return merged


START_HEADER = ["configuration", "pods", "time to ready (s)", "CPU to ready (s)", "RSS (MiB)",
                "peak RSS (MiB)", "LIST requests", "LIST MiB", "watches"]  # fmt: skip


def report(starts: list[StartRow], relists: list[Window], pods: int) -> str:
    start_rows = [
        [row["config"], f"{row['pods']:,}", f"{row['ready_s']:.2f}", f"{row['cpu_s']:.2f}",
         f"{row['rss_mib']:.0f}", f"{row['hwm_mib']:.0f}", row["list_requests"],
         f"{row['list_mib']:.0f}", row["watches"]]
        for row in starts
    ]  # fmt: skip
    window_rows = [
        [window["name"], f"{window['seconds']:.2f}", window["checks"],
         f"{window['latency']['p50']:.2f}", f"{window['latency']['p99']:.2f}",
         f"{window['latency']['p999']:.1f}", f"{window['latency']['max']:.1f}"]
        for window in relists
    ]  # fmt: skip
    lines = [
        f"Start at {pods:,} admitted pods (median of the rounds):",
        "",
        *markdown_table(START_HEADER, start_rows),
        "",
        "Check latency at c=1 (one channel), steady churn throughout:",
        "",
        *markdown_table(
            ["window", "seconds", "checks", "p50 ms", "p99 ms", "p99.9 ms", "max ms"], window_rows
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    parser = script_parser(MODULE, description=__doc__ or "", quick="about 2 minutes")
    parser.add_argument("--pods", type=int, default=10_000, help="admitted pods (10,000)")
    parser.add_argument(
        "--page-sizes", default="500,100", help="LIST page sizes of the relist phases (500,100)"
    )
    parser.add_argument("--relist-only", action="store_true", help="skip the start measurements")
    args = parser.parse_args(argv)
    begun = time.monotonic()
    rounds = 1 if args.quick else 2
    shape = template()
    rows: list[StartRow] = []
    with tempfile.TemporaryDirectory(prefix="meshguard-authz-store-") as tmp:
        workdir = Path(tmp)
        (workdir / "empty").mkdir()
        with ScriptedApiServer(workdir) as api, ScriptedApiServer(workdir / "empty") as empty:
            api.put_many(admitted_pods(args.pods, shape))
            kubeconfig = api.kubeconfig(workdir / "kubeconfig")
            floor_config = empty.kubeconfig(workdir / "kubeconfig-empty")
            for _ in range(0 if args.relist_only else rounds):
                rows.append(
                    measure_start(empty, floor_config, config="1 process", pods=0, workdir=workdir)
                )
                rows += [measure_start(api, kubeconfig, config=config, pods=args.pods,
                                       workdir=workdir) for config in CONFIGS]  # fmt: skip
            relists: list[Window] = []
            marks: dict[str, float] = {}
            for size in (int(size) for size in args.page_sizes.split(",")):
                found, when = measure_relists(
                    api, kubeconfig, pods=args.pods, template=shape, quick=args.quick,
                    workdir=workdir, page_size=size,
                )  # fmt: skip
                relists += found
                marks.update({f"{key}@{size}": value for key, value in when.items()})
    starts = median_rows(rows)
    where = machine()
    seconds = time.monotonic() - begun
    print(report(starts, relists, args.pods))
    print()
    print(machine_line(where, seconds))
    if args.json:
        document: Document = {
            "pods": args.pods, "rounds": rows, "starts": starts, "relists": relists,
            "marks": marks, "machine": where, "seconds": seconds,
        }  # fmt: skip
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
