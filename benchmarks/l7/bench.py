"""The L7 benchmark's measurements: the pod's namespace set up, the smoke check, the wrk
and direct gRPC trials in alternating rounds (each round on its own instance of every
configuration's Envoy)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from benchmarks.harness import SYSTEM_FIELDS, CpuMeter, schedule
from benchmarks.l7.envoys import (
    APP_UID,
    AUTHZ_PLAIN_PORT,
    AUTHZ_PORT,
    CONCURRENCY,
    CONFIGS,
    ECHO_PLAIN_PORT,
    ECHO_PORT,
    ENVOYS,
    GRPC_SERVERS,
    ISTIO_NAT,
    LISTENER_PORT,
    PROXY_UID,
    UPSTREAM_PORT,
    WRK_SCRIPT,
    HttpConfig,
    MeshCertificates,
    app_source_address,
    envoy_configs,
    write_mesh_certificates,
)
from benchmarks.l7.servers import helper_argv
from meshguard import yaml_io
from meshguard.sandbox.envoy import as_user, authz_command, envoy_command, wait_listening
from meshguard.sandbox.netns import NetworkNamespace, probe_command
from tests.support.keys import trusted_keys_file
from tests.support.latency import percentile
from tests.support.processes import HOST


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int
    http_seconds: int  # per wrk trial (wrk takes whole seconds)
    grpc_seconds: float  # per direct gRPC trial
    grpc_warmup: float
    warmup_seconds: int  # wrk warm-up per configuration, not counted (0: none)
    profile_seconds: int  # py-spy sampling of the authz server (whole seconds)


FULL = Profile("full", rounds=4, http_seconds=3, grpc_seconds=2.5, grpc_warmup=0.3,
               warmup_seconds=1, profile_seconds=4)  # fmt: skip
QUICK = Profile("quick", rounds=2, http_seconds=1, grpc_seconds=0.6, grpc_warmup=0.15,
                warmup_seconds=0, profile_seconds=1)  # fmt: skip


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
    instance: int = 0  # which of the configuration's Envoy processes served it
    cpu: dict[str, float] = field(default_factory=dict)  # config.envoy: that process

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
        self, config: HttpConfig, instance: int, concurrency: int, seconds: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """wrk against Envoy ``instance`` of ``config``; its CPU under ``config.envoy``."""
        url = f"http://{HOST}:{config.listener_port(instance)}/quitquitquit"
        argv = as_user(
            [self.wrk_path, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "2s",
             "-s", str(self.workdir / "post.lua"), url],
            uid=APP_UID, gid=APP_UID,
        )  # fmt: skip
        before = self.meter.snapshot()
        output = self.ns.run(argv)
        cpu = config.served(CpuMeter.delta(before, self.meter.snapshot()), instance)
        (line,) = [line for line in output.splitlines() if line.startswith("WRK ")]
        return json.loads(line[4:]), cpu

    def http_trial(
        self, config: HttpConfig, concurrency: int, seconds: int, round_: int
    ) -> HttpTrial:
        instance = config.instance_of(round_)
        result, cpu = self.wrk(config, instance, concurrency, seconds)
        errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
        elapsed = result["duration_us"] / 1e6
        return HttpTrial(
            config=config.key, concurrency=concurrency, round=round_,
            requests=result["requests"], errors=errors, seconds=elapsed,
            per_second=result["requests"] / elapsed, p50_us=result["p50_us"],
            p99_us=result["p99_us"], mean_us=result["mean_us"], instance=instance, cpu=cpu,
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
    over mTLS and plaintext) and every configuration's Envoys."""
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
    # The benchmark's own exemption: the app may dial every Envoy but (c)'s directly (one
    # rule per instance: multiport takes at most 15 ports).
    for instance in range(max(c.instances for c in CONFIGS)):
        direct = ",".join(str(c.listener_port(i)) for c, i in ENVOYS if i == instance
                          and c.port != UPSTREAM_PORT)  # fmt: skip
        ns.run(["iptables", "-w", "-I", "OUTPUT", "1", "-o", "lo", "-p", "tcp", "-m", "owner",
                "--uid-owner", str(APP_UID), "-m", "multiport", "--dports", direct,
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
    ports = (AUTHZ_PORT, AUTHZ_PLAIN_PORT, LISTENER_PORT,
             *(c.listener_port(i) for c, i in ENVOYS if c.port != UPSTREAM_PORT))  # fmt: skip
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
    """Every Envoy process forwards POST /quitquitquit; those with authorization refuse GET,
    the others do not (``get_status``). Raises if not."""
    targets = [
        {"host": HOST, "port": c.listener_port(i), "method": method, "path": "/quitquitquit"}
        for c, i in ENVOYS
        for method in ("POST", "GET")
    ]
    results = http_probe(bench, APP_UID, targets)
    lines, problems = [], []
    for (config, instance), (post, get) in zip(
        ENVOYS, zip(results[::2], results[1::2], strict=True), strict=True
    ):
        body = str(get.get("body", get.get("server", ""))).strip()
        label = f"{config.label} @{instance}"
        lines.append(
            f"  {label:<26} POST {post.get('status')} ({post.get('server')}),"
            f" GET {get.get('status')} {body[:70]!r}"
        )
        if post.get("status") != 200 or post.get("server") != "pilot-agent":
            problems.append(f"{label}: POST {post}")
        if get.get("status") != config.get_status:
            problems.append(f"{label}: GET {get}")
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
    """ext_authz / RBAC counters and authz connections by configuration: the sums over its
    Envoy processes' admin ports."""
    path = (
        "/stats?format=json&filter="
        + "%5C.(ext_authz|rbac)%5C.|meshguard_authz%5C.upstream_cx_total"
    )
    targets = [{"host": HOST, "port": c.admin(i), "method": "GET", "path": path} for c, i in ENVOYS]
    results = http_probe(bench, PROXY_UID, targets)
    wanted = ("rbac.allowed", "rbac.denied", "ext_authz.ok", "ext_authz.denied",
              "ext_authz.error", "upstream_cx_total")  # fmt: skip
    totals: dict[str, Counter[str]] = {c.key: Counter() for c in CONFIGS}
    for (config, _), result in zip(ENVOYS, results, strict=True):
        totals[config.key].update(
            {
                s["name"]: s["value"]
                for s in result.get("stats", [])
                if s.get("value")
                and s["name"].endswith(wanted)
                and s["name"].startswith(("http.", "cluster.meshguard_authz."))
            }
        )
    return {key: dict(counts) for key, counts in totals.items()}


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


def run_http(bench: Bench, profile: Profile) -> list[HttpTrial]:
    for config, instance in ENVOYS if profile.warmup_seconds else ():  # not counted
        bench.wrk(config, instance, 8, profile.warmup_seconds)  # pools, caches
    trials = []
    for index, concurrency, config in schedule(profile.rounds, CONCURRENCY, CONFIGS):
        trial = bench.http_trial(config, concurrency, profile.http_seconds, index)
        trials.append(trial)
        print(
            f"  round {index + 1}/{profile.rounds} {config.label:<24} @{trial.instance}"
            f" c={concurrency:<3}"
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
    jobs = [
        grpc_job(server, concurrency, profile.grpc_seconds, index)
        for index, concurrency, server in schedule(profile.rounds, CONCURRENCY, list(GRPC_SERVERS))
    ]
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
