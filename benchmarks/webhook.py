"""Benchmark the admission webhook over real HTTPS against a bare aiohttp baseline.

Run: ``python -m benchmarks.webhook [--quick] [--json FILE]`` (about 1 minute; ``--quick``
about 20 s). Loopback only (127.0.0.1); no root needed.

What runs:

- meshguard: the real server, ``python -m meshguard serve-webhook --cert ... --key ...
  --host 127.0.0.1 --port P`` in a subprocess (as in ``tests/webhook/test_server.py``), with a
  certificate issued by a throwaway CA generated here with ``cryptography``; its JSON log goes
  to a temporary file, as it would go to a container's stderr.
- baseline: a bare aiohttp HTTPS app (this file's hidden ``_baseline`` subcommand, also a
  subprocess, same certificate, same host, same TLS settings) whose ``POST /inject`` reads the
  body and returns a fixed AdmissionReview answer precomputed with meshguard's ``handle()``
  for the same request, so both send the same bytes back.

The request is an AdmissionReview (CREATE) of :func:`synthetic_pod`: an Istio-injected pod of
10 containers (``c0``..``c8``, each with its own uid and port, plus ``istio-proxy`` as
1337:1337) and ``istio-init``, with a ``meshguard.io/policy`` of a few rules. The containers
are hardened, so meshguard injects with no posture fix: ``allowed: true`` with a JSONPatch.

One client (this process, an aiohttp ``ClientSession`` trusting the test CA, keep-alive
connections, connector ``limit`` = concurrency) sends the same number of requests to each
server at concurrency 1 and 32, after a warm-up that opens the connections. Rounds alternate
which server goes first. A non-200 answer, a transport error, or an answer that is not
``allowed: true`` with a patch for the request's uid counts as an error.

What it prints:

1. per server and concurrency: requests, errors, throughput (admissions/s), latency p50 and
   p99 (ms, one request as the client sees it: send until the whole answer is read);
2. the ratio meshguard/baseline throughput per concurrency (goal >= 0.5);
3. meshguard's own count of admissions and mean server-side time (from ``/metrics``);
4. the in-process cost of ``handle()`` alone (no HTTP) per admission for the same body,
   and of its main steps, to show where the time goes.

Both servers and the client share the machine's CPUs: on a small machine the baseline
mostly measures the client, and the ratio understates meshguard's own capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
import jsonpatch
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import Machine, machine, machine_line, module_argv, script_parser, write_json
from meshguard import logs
from meshguard.inject.posture import review_posture
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.pod import read_pod
from meshguard.policy import parse_mode, parse_policy
from meshguard.rules.compiler import compile_ruleset
from meshguard.webhook.patch import pod_patch
from meshguard.webhook.review import handle
from tests.support.keys import SIGNER
from tests.support.latency import percentile
from tests.support.pods import admission_review
from tests.support.processes import (
    HOST,
    free_port,
    https_get,
    log_tail,
    serve_webhook_argv,
    start_logged,
    stop_process,
    wait_https_ready,
)
from tests.support.tls import write_server_files

POD_CONTAINERS = 10
CONCURRENCIES = (1, 32)
GOAL_RATIO = 0.5
BASE_UID = 2000
BASE_PORT = 8000
PROXY_UID = 1337
ISTIO_IMAGE = "docker.io/istio/proxyv2:1.28.0"
REVIEW_UID = "3f6c1a52-bench-webhook"
REQUEST_TIMEOUT = 10.0
READY_TIMEOUT = 20.0
BASELINE_LIFETIME_SECONDS = 600  # the baseline server never outlives the benchmark
SERVERS = ("baseline", "meshguard")


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int  # per server and concurrency, alternating which server goes first
    requests: int  # measured requests per round
    warmup: int  # per round, same session, not measured
    phase_seconds: float  # a round stops early past this (then fewer requests are reported)
    handle_iterations: int  # per repeat of an in-process measurement
    handle_repeats: int


FULL = Profile("full", rounds=2, requests=2000, warmup=200, phase_seconds=30.0,
               handle_iterations=300, handle_repeats=5)  # fmt: skip
QUICK = Profile("quick", rounds=2, requests=500, warmup=64, phase_seconds=8.0,
                handle_iterations=60, handle_repeats=3)  # fmt: skip


# --- the pod and the request ----------------------------------------------------------------


def container_name(i: int) -> str:
    return f"c{i}"


def _hardened(uid: int) -> dict[str, Any]:
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def synthetic_pod(n: int = POD_CONTAINERS) -> dict[str, Any]:
    """An Istio-injected pod of ``n`` containers: ``n - 1`` workloads plus ``istio-proxy``.

    Workload ``c<i>`` runs as uid/gid 2000+i and declares port 8000+i; ``istio-proxy`` runs as
    1337:1337 and ``istio-init`` is the init container, as Istio's injector leaves them. Every
    container is hardened (non-root, no privilege escalation, all capabilities dropped), so
    meshguard has no posture fix to make. The policy has a few rules: ``c0 -> c1``, ``c1``
    and ``c2`` to ``c3`` over HTTP (GET/POST on ``/api/*``), the other containers to the
    last one over tcp and udp, and anyone to ``c0``.
    """
    workloads = n - 1
    if workloads < 4:
        raise ValueError("a synthetic pod needs at least 5 containers (4 workloads + proxy)")
    last = workloads - 1
    rules: list[dict[str, Any]] = [
        {"from": container_name(0), "to": container_name(1), "ports": [BASE_PORT + 1]},
        {
            "from": [container_name(1), container_name(2)],
            "to": container_name(3),
            "ports": [BASE_PORT + 3],
            "http": {"methods": ["GET", "POST"], "paths": ["/api/*"]},
        },
        {
            "from": [container_name(i) for i in range(4, last)] or [container_name(0)],
            "to": container_name(last),
            "ports": [BASE_PORT + last],
            "protocol": "any",
        },
        {"from": "*", "to": container_name(0), "ports": [BASE_PORT]},
    ]
    containers: list[dict[str, Any]] = [
        {
            "name": container_name(i),
            "image": f"example.com/bench/{container_name(i)}:1.0",
            "ports": [{"containerPort": BASE_PORT + i, "name": f"port-{i}", "protocol": "TCP"}],
            "securityContext": _hardened(BASE_UID + i),
        }
        for i in range(workloads)
    ]
    containers.append(
        {
            "name": "istio-proxy",
            "image": ISTIO_IMAGE,
            "args": ["proxy", "sidecar", "--domain", "bench.svc.cluster.local"],
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
            "securityContext": {
                **_hardened(PROXY_UID),
                "privileged": False,
                "readOnlyRootFilesystem": True,
            },
        }
    )
    status = {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": ["istio-envoy"],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"bench-{n}",
            "namespace": "bench",
            "labels": {"app": "bench"},
            "annotations": {
                "meshguard.io/policy": json.dumps({"defaultAction": "deny", "rules": rules}),
                "sidecar.istio.io/status": json.dumps(status),
            },
        },
        "spec": {
            "initContainers": [
                {
                    "name": "istio-init",
                    "image": ISTIO_IMAGE,
                    "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337"],
                    "securityContext": {
                        "runAsUser": 0,
                        "runAsGroup": 0,
                        "runAsNonRoot": False,
                        "allowPrivilegeEscalation": False,
                        "privileged": False,
                        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                    },
                }
            ],
            "containers": containers,
            "volumes": [{"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}],
        },
    }


def answer_error(status: int, payload: bytes, uid: str) -> str | None:
    """Why an answer is not a successful injection, or None."""
    if status != 200:
        return f"HTTP {status}"
    try:
        response = json.loads(payload)["response"]
    except (ValueError, KeyError, TypeError):
        return "answer is not an AdmissionReview"
    if response.get("uid") != uid:
        return "wrong uid"
    if response.get("allowed") is not True:
        return "allowed: false"
    if response.get("patchType") != "JSONPatch" or not response.get("patch"):
        return "no patch"
    return None


# --- the baseline server (hidden subcommand) ------------------------------------------------


def baseline_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="webhook.py _baseline")
    parser.add_argument("role", choices=["_baseline"])
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer", type=Path, required=True, help="the fixed JSON answer")
    args = parser.parse_args(argv)
    signal.alarm(BASELINE_LIFETIME_SECONDS)
    asyncio.run(serve_baseline(args.cert, args.key, args.host, args.port, args.answer))
    return 0


async def serve_baseline(cert: Path, key: Path, host: str, port: int, answer: Path) -> None:
    """POST /inject: read the body, return the precomputed answer; GET /readyz."""
    text = answer.read_text()

    async def inject(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=text, content_type="application/json")

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    # The same TLS settings as meshguard's CertificateReloader.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    app = web.Application(client_max_size=3 * 1024 * 1024)
    app.router.add_post("/inject", inject)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# --- the servers as subprocesses ------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"


def tls_version(port: int, ca_file: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        return tls.version() or "?"


@contextlib.contextmanager
def started(
    name: str, argv: list[str], port: int, ca_file: Path, workdir: Path
) -> Iterator[Server]:
    """A server subprocess, ready (``/readyz`` 200); always terminated on exit."""
    log_file = workdir / f"{name}.log"
    process = start_logged(argv, log_file)
    server = Server(name, port, process, log_file)
    try:
        wait_https_ready(process, name=name, port=port, ca_file=ca_file, log_file=log_file)
        yield server
    finally:
        stop_process(process)


def baseline_argv(cert: Path, key: Path, port: int, answer: Path) -> list[str]:
    return module_argv("benchmarks.webhook", "_baseline", "--cert", str(cert), "--key", str(key),
                       "--host", HOST, "--port", str(port), "--answer", str(answer))  # fmt: skip


# --- the client -----------------------------------------------------------------------------


@dataclass
class Run:
    """One measured round of one server at one concurrency."""

    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, successful or not
    elapsed: float = 0.0


async def load(
    url: str,
    body: bytes,
    ca_file: Path,
    *,
    concurrency: int,
    warmup: int,
    requests: int,
    max_seconds: float,
) -> Run:
    """Warm up, then send ``requests`` POSTs with ``concurrency`` in flight; one session."""
    context = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(run: Run) -> None:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/inject", data=body, headers=headers) as answer:
                    payload = await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, OSError) as exc:
                run.latencies.append(time.perf_counter() - started)
                run.errors[type(exc).__name__] += 1
                return
            run.latencies.append(time.perf_counter() - started)
            error = answer_error(status, payload, REVIEW_UID)
            if error:
                run.errors[error] += 1

        async def phase(count: int) -> Run:
            run = Run()
            remaining = count
            stop_at = time.monotonic() + max_seconds

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0 and time.monotonic() < stop_at:
                    remaining -= 1
                    run.requests += 1
                    await one(run)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            run.elapsed = time.perf_counter() - started
            return run

        await phase(max(warmup, concurrency))
        return await phase(requests)


@dataclass(frozen=True)
class Result:
    """One server at one concurrency, over every measured round."""

    server: str
    concurrency: int
    requests: int
    errors: int
    error_kinds: dict[str, int]
    throughput: float  # admissions/s over the measured rounds
    p50_ms: float
    p99_ms: float
    mean_ms: float
    round_throughputs: list[float]


def summarize(server: str, concurrency: int, runs: Sequence[Run]) -> Result:
    latencies = sorted(x for run in runs for x in run.latencies)
    errors: Counter[str] = Counter()
    for run in runs:
        errors.update(run.errors)
    requests = sum(run.requests for run in runs)
    elapsed = sum(run.elapsed for run in runs)
    return Result(
        server=server,
        concurrency=concurrency,
        requests=requests,
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        throughput=requests / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        mean_ms=statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        round_throughputs=[run.requests / run.elapsed if run.elapsed else 0.0 for run in runs],
    )


def run_http(profile: Profile, body: bytes, workdir: Path) -> tuple[list[Result], dict[str, Any]]:
    """Both servers at every concurrency; meshguard's own metrics at the end."""
    ca_file, cert_file, key_file = write_server_files(workdir)
    status, answer, _ = handle(body, settings=InjectSettings(signer=SIGNER))
    if status != 200 or answer_error(status, json.dumps(answer).encode(), REVIEW_UID):
        raise RuntimeError(f"the synthetic pod is not injected: {answer}")
    answer_file = workdir / "answer.json"
    answer_file.write_text(json.dumps(answer))
    runs: dict[tuple[str, int], list[Run]] = {}
    sent_to_meshguard = 0
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        port = free_port()
        servers["baseline"] = stack.enter_context(
            started("baseline", baseline_argv(cert_file, key_file, port, answer_file), port,
                    ca_file, workdir)
        )  # fmt: skip
        port = free_port()
        servers["meshguard"] = stack.enter_context(
            started(
                "meshguard", serve_webhook_argv(cert_file, key_file, port), port, ca_file, workdir
            )
        )
        for concurrency in CONCURRENCIES:
            for round_ in range(profile.rounds):
                order = SERVERS if round_ % 2 == 0 else SERVERS[::-1]
                for name in order:
                    server = servers[name]
                    run = asyncio.run(
                        load(server.url, body, ca_file, concurrency=concurrency,
                             warmup=profile.warmup, requests=profile.requests,
                             max_seconds=profile.phase_seconds)
                    )  # fmt: skip
                    if server.process.poll() is not None:
                        raise RuntimeError(
                            f"{name} died during the run:\n{log_tail(server.log_file)}"
                        )
                    runs.setdefault((name, concurrency), []).append(run)
                    if name == "meshguard":
                        sent_to_meshguard += max(profile.warmup, concurrency) + run.requests
        metrics = meshguard_metrics(servers["meshguard"].port, ca_file)
        metrics["tls"] = {name: tls_version(s.port, ca_file) for name, s in servers.items()}
    metrics["sent"] = sent_to_meshguard
    results = [
        summarize(name, concurrency, runs[(name, concurrency)])
        for concurrency in CONCURRENCIES
        for name in SERVERS
    ]
    return results, metrics


def meshguard_metrics(port: int, ca_file: Path) -> dict[str, Any]:
    """Admissions counted by meshguard, and its mean server-side time per admission."""
    status, text = https_get(port, "/metrics", ca_file)
    if status != 200:
        return {}
    found: dict[str, Any] = {"admissions": {}}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "meshguard_admissions_total":
                found["admissions"][sample.labels["result"]] = int(sample.value)
            elif sample.name == "meshguard_admission_seconds_sum":
                found["seconds_sum"] = sample.value
            elif sample.name == "meshguard_admission_seconds_count":
                found["seconds_count"] = int(sample.value)
    if found.get("seconds_count"):
        found["server_mean_ms"] = found["seconds_sum"] / found["seconds_count"] * 1000
    return found


# --- handle() in process --------------------------------------------------------------------


def per_call_ms(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one call, in ms."""
    fn()  # warm caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - started) / iterations)
    return statistics.median(samples) * 1000


def fresh_copies(pod: dict[str, Any], count: int) -> Callable[[], dict[str, Any]]:
    copies = iter([copy.deepcopy(pod) for _ in range(count)])
    return lambda: next(copies)


def measure_handle(profile: Profile, body: bytes) -> list[tuple[str, float]]:
    """Per-admission cost of handle() and of its main steps, in ms (no HTTP)."""
    iterations, repeats = profile.handle_iterations, profile.handle_repeats
    count = iterations * repeats + 1
    settings = InjectSettings(signer=SIGNER)
    pod = json.loads(body)["request"]["object"]
    annotations = pod["metadata"]["annotations"]
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    policy = parse_policy(annotations.get("meshguard.io/policy"))
    mode = parse_mode(annotations.get("meshguard.io/mode"))
    ruleset = compile_ruleset(view, policy, mode=mode, settings=settings.compiler)
    mutated = copy.deepcopy(pod)
    inject_pod(mutated["metadata"], mutated["spec"], settings=settings)
    patch = pod_patch(pod, mutated)
    _, answer, _ = handle(body, settings=settings)

    def inject_fresh() -> Callable[[], object]:
        next_pod = fresh_copies(pod, count)

        def call() -> object:
            target = next_pod()
            return inject_pod(target["metadata"], target["spec"], settings=settings)

        return call

    rows: list[tuple[str, float]] = []

    def row(label: str, fn: Callable[[], object]) -> None:
        rows.append((label, per_call_ms(fn, iterations, repeats)))

    row("handle() (meshguard log off)", lambda: handle(body, settings=settings))
    meshguard_logger = logging.getLogger("meshguard")
    saved = (meshguard_logger.handlers[:], meshguard_logger.level, meshguard_logger.propagate)
    with open(os.devnull, "w") as devnull:
        logs.configure(stream=devnull)
        try:
            row("handle() (JSON log line, as served)", lambda: handle(body, settings=settings))
        finally:
            meshguard_logger.handlers[:], meshguard_logger.level = saved[0], saved[1]
            meshguard_logger.propagate = saved[2]
    row("  json.loads(request body)", lambda: json.loads(body))
    row("  copy.deepcopy(pod)", lambda: copy.deepcopy(pod))
    row("  inject_pod()", inject_fresh())
    row("    parse_policy()", lambda: parse_policy(annotations.get("meshguard.io/policy")))
    row("    read_pod()", lambda: read_pod(metadata=pod["metadata"], spec=pod["spec"]))
    row(
        "    review_posture()",
        lambda: review_posture(pod["spec"], pod=view, settings=settings.posture),
    )
    row(
        "    compile_ruleset()",
        lambda: compile_ruleset(view, policy, mode=mode, settings=settings.compiler),
    )
    row("    ruleset.to_json()", ruleset.to_json)
    row("  pod_patch()", lambda: pod_patch(pod, mutated))
    row("  json.dumps(patch) (answer's patch)", lambda: json.dumps(patch))
    row("json.dumps(answer) (server's reply)", lambda: json.dumps(answer))
    row(
        "jsonpatch.make_patch() (what pod_patch replaced)",
        lambda: jsonpatch.make_patch(pod, mutated),
    )
    return rows


# --- report ---------------------------------------------------------------------------------


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    pod_containers: int
    request_bytes: int
    answer_bytes: int
    results: list[dict[str, Any]]  # Result
    throughput_ratio: dict[str, float]  # concurrency -> meshguard / baseline
    goal_ratio: float
    meshguard_metrics: dict[str, Any]
    handle_ms: dict[str, float]
    machine: Machine
    seconds: float


def ratios(results: Sequence[Result]) -> dict[int, float]:
    by = {(r.server, r.concurrency): r for r in results}
    found = {}
    for concurrency in CONCURRENCIES:
        base = by[("baseline", concurrency)].throughput
        found[concurrency] = by[("meshguard", concurrency)].throughput / base if base else 0.0
    return found


def format_report(
    profile: Profile,
    body: bytes,
    answer_bytes: int,
    results: Sequence[Result],
    metrics: dict[str, Any],
    handle_rows: Sequence[tuple[str, float]],
) -> str:
    tls = "/".join(sorted(set(metrics.get("tls", {}).values()))) or "TLS"
    lines = [
        f"Admission over HTTPS on {HOST} (keep-alive, {tls}, one aiohttp client), pod of"
        f" {POD_CONTAINERS} containers: request {len(body) / 1024:.1f} KiB, answer"
        f" {answer_bytes / 1024:.1f} KiB; {profile.name} profile: {profile.rounds} rounds x"
        f" {profile.requests} requests (+{profile.warmup} warm-up) per server and concurrency",
        "",
        f"{'server':<10} {'conc':>4} {'requests':>8} {'errors':>6} {'adm/s':>8}"
        f" {'p50 ms':>8} {'p99 ms':>8}   rounds adm/s",
    ]
    for r in results:
        per_round = " ".join(f"{x:.0f}" for x in r.round_throughputs)
        lines.append(
            f"{r.server:<10} {r.concurrency:>4} {r.requests:>8} {r.errors:>6}"
            f" {r.throughput:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}   {per_round}"
        )
    for r in results:
        if r.error_kinds:
            lines.append(f"  {r.server} c={r.concurrency} errors: {r.error_kinds}")
    lines.append("")
    for concurrency, ratio in ratios(results).items():
        verdict = "ok" if ratio >= GOAL_RATIO else "BELOW GOAL"
        lines.append(
            f"meshguard/baseline throughput at concurrency {concurrency:>2}: {ratio:.2f}"
            f" (goal >= {GOAL_RATIO}: {verdict})"
        )
    if metrics:
        counted = sum(metrics.get("admissions", {}).values())
        lines.append(
            f"meshguard /metrics: {counted} admissions {metrics.get('admissions')}"
            f" (client sent {metrics.get('sent')}), mean server-side time"
            f" {metrics.get('server_mean_ms', float('nan')):.2f} ms (body read + handle())"
        )
    lines += ["", "In process, no HTTP, per admission of the same body:"]
    width = max(len(label) for label, _ in handle_rows)
    lines += [f"  {label:<{width}} {ms:>8.3f} ms" for label, ms in handle_rows]
    by = {(r.server, r.concurrency): r for r in results}
    top = by[("meshguard", max(CONCURRENCIES))]
    handle_ms = handle_rows[1][1]
    if top.throughput:
        budget_ms = 1000 / top.throughput
        lines.append(
            f"  handle() as served = {handle_ms:.2f} ms of the {budget_ms:.2f} ms per admission"
            f" at concurrency {top.concurrency} (1 / throughput):"
            f" {100 * handle_ms / budget_ms:.0f}%; the rest is HTTP, TLS and the client"
        )
    return "\n".join(lines)


def main_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "benchmarks.webhook",
        description="Admission latency and throughput of meshguard serve-webhook over HTTPS,"
        " against a bare aiohttp endpoint returning a precomputed answer.",
        quick="about 20 s",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "_baseline":
        return baseline_main(argv)
    args = main_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server subprocesses are terminated (finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profile = QUICK if args.quick else FULL
    began = time.perf_counter()
    body = admission_review(synthetic_pod(POD_CONTAINERS), REVIEW_UID)
    answer_bytes = len(json.dumps(handle(body, settings=InjectSettings(signer=SIGNER))[1]).encode())
    with tempfile.TemporaryDirectory(prefix="meshguard-bench-webhook-") as tmp:
        results, metrics = run_http(profile, body, Path(tmp))
    handle_rows = measure_handle(profile, body)
    print(format_report(profile, body, answer_bytes, results, metrics, handle_rows))
    elapsed = time.perf_counter() - began
    where = machine(aiohttp=aiohttp.__version__)
    print(f"\n{machine_line(where, elapsed)}")
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "pod_containers": POD_CONTAINERS,
            "request_bytes": len(body),
            "answer_bytes": answer_bytes,
            "results": [asdict(r) for r in results],
            "throughput_ratio": {str(c): x for c, x in ratios(results).items()},
            "goal_ratio": GOAL_RATIO,
            "meshguard_metrics": metrics,
            "handle_ms": dict(handle_rows),
            "machine": where,
            "seconds": elapsed,
        }
        write_json(args.json, document)
    errors = sum(r.errors for r in results)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
