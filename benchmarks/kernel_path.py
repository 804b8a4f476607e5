"""Benchmark meshguard's kernel path: loopback TCP with and without its rules, and install cost.

Run as root: ``python -m benchmarks.kernel_path [--quick] [--json FILE] [--cpu N | --no-pin]``.

1. Traffic. A synthetic Istio-injected pod of 16 containers (``c00``..``c15``, uid 2000+i,
   port 8000+i, plus ``istio-proxy`` as uid 1337) whose ``meshguard.io/policy`` lets each
   container reach the next one's port (``c15`` reaches ``c00``). In a fresh network
   namespace per trial, a server running as ``c00``'s uid listens on 127.0.0.1:8000 and a
   client running as ``c15``'s uid — the highest uid, the longest walk through the uid
   dispatch for NEW packets — measures

   - request/response: round trips per second of a small ping-pong on one TCP connection;
   - connect: sequential connect + close per second (the server accepts and closes).

   Configurations, in rounds that alternate their order (ABCD, DCBA, ...):
   ``baseline`` (no netfilter rules at all), ``meshguard`` (rules installed by the real
   ``python -m meshguard init --ruleset-file FILE``, as in production), ``istio`` (Istio's
   IPv4 nat capture in iptables-nft, as istio-init writes it: ``meshguard.sandbox.istio``,
   checked against Istio's goldens; it turns conntrack on as in any Istio pod),
   ``istio+meshguard`` (meshguard-init detects iptables-nft: the uid-range tree),
   ``istio+meshguard-flat`` (one dispatch rule per uid), ``istio-nft`` (Istio's native
   nftables capture, ``table inet istio-proxy-nat``) and ``istio-nft+meshguard`` (the pod
   admitted with ``--native-nftables``: ``table inet meshguard``, uid dispatch through one
   verdict map). ``--configs`` runs a subset. The medians give the ratios: meshguard /
   baseline, istio+meshguard / istio (meshguard's own cost in an Istio pod, iptables) and
   istio-nft+meshguard / istio-nft (the same in native nftables) — both backends in the
   same run. Keep-alive is the request/response rate on one connection, connection per
   request the connect rate. After each meshguard trial a connection from a uid of no
   container must be refused, and (iptables) the packet counter of the client's source
   chain confirms every connection went through the uid dispatch, (nftables) the verdict
   map holds the client's uid. Client and server are pinned to one CPU by default:
   unpinned, cross-CPU wake-ups on a small VM make trials differ by 2-4x.

2. Install cost for pods of 2, 8 and 32 containers: ``compile_pod`` (pure Python),
   ``meshguard init`` as a subprocess (wall time, includes ``ip netns exec`` and Python
   start-up) and the in-process :func:`meshguard.rules.install.install`.

The load generator is this file too (hidden ``_server`` / ``_client`` subcommands), run
inside the namespace; it drops to the container's uid as ``meshguard.sandbox.probe`` does.
Only 127.0.0.1 inside namespaces this script creates is used; the namespaces and their
processes are removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import meshguard
from benchmarks.common import (
    Machine,
    machine,
    machine_line,
    module_argv,
    process_cpu,
    script_parser,
    write_json,
)
from meshguard.pod import read_pod
from meshguard.process import run_command
from meshguard.rules.backend import NATIVE_NFTABLES_FLAG
from meshguard.rules.compiler import CompilerSettings, compile_pod, source_chain
from meshguard.rules.install import install
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.istio import CaptureConfig, capture_nft, capture_payload
from meshguard.sandbox.netns import NetworkNamespace
from meshguard.sandbox.probe import drop_privileges

HOST = "127.0.0.1"
MESHGUARD_PACKAGE = Path(meshguard.__file__).parent
TRAFFIC_POD_SIZE = 16
INSTALL_POD_SIZES = (2, 8, 32)
BASE_UID = 2000
BASE_PORT = 8000
PROXY_UID = 1337
GOAL = 0.95
MESSAGE = b"x" * 32
RR_WARMUP = 500
CONNECT_WARMUP = 100
SOCKET_TIMEOUT_SECONDS = 5.0
SERVER_LIFETIME_SECONDS = 120
CHECK_EVERY = 64


@dataclass(frozen=True)
class Profile:
    """How long and how often to measure."""

    name: str
    trials: int  # per configuration
    rr_count: int
    rr_seconds: float
    connect_count: int
    connect_seconds: float
    compile_reps: int
    install_reps: int


FULL = Profile(
    name="full",
    trials=5,
    rr_count=200_000,
    rr_seconds=1.5,
    connect_count=30_000,
    connect_seconds=1.5,
    compile_reps=50,
    install_reps=5,
)
QUICK = Profile(
    name="quick",
    trials=2,
    rr_count=50_000,
    rr_seconds=0.5,
    connect_count=10_000,
    connect_seconds=0.5,
    compile_reps=10,
    install_reps=1,
)
WARMUP = Profile(
    name="warmup",
    trials=1,
    rr_count=2_000,
    rr_seconds=0.2,
    connect_count=200,
    connect_seconds=0.2,
    compile_reps=1,
    install_reps=1,
)


# --- the synthetic pod --------------------------------------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


def container_name(index: int) -> str:
    return f"c{index:02d}"


def synthetic_pod(n: int, *, native_nftables: bool = False) -> dict[str, Any]:
    """An Istio-injected pod of ``n`` containers; each may reach the next one's port.

    Container ``cNN`` runs as uid/gid 2000+NN and declares port 8000+NN; the policy allows
    ``c[i] -> c[i+1]`` on ``8000+i+1``, and the last container reaches ``c00`` on 8000.
    ``native_nftables``: Istio runs its native nftables mode (istio-init's flag).
    """
    if n < 2:
        raise ValueError("a synthetic pod needs at least 2 containers")
    rules = [
        {"from": container_name(i), "to": container_name((i + 1) % n), "ports": [_port(i + 1, n)]}
        for i in range(n)
    ]
    containers: list[dict[str, Any]] = [
        {
            "name": container_name(i),
            "image": f"example.com/bench/{container_name(i)}:1.0",
            "ports": [{"containerPort": BASE_PORT + i, "name": f"port-{i}"}],
            "securityContext": {"runAsUser": BASE_UID + i, "runAsGroup": BASE_UID + i},
        }
        for i in range(n)
    ]
    containers.append(
        {
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.28.0",
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom"}],
            "securityContext": {"runAsUser": PROXY_UID, "runAsGroup": PROXY_UID},
        }
    )
    status = {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "volumes": []}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"bench-{n}",
            "namespace": "bench",
            "annotations": {
                "meshguard.io/mode": "enforce",
                "meshguard.io/policy": json.dumps({"defaultAction": "deny", "rules": rules}),
                "sidecar.istio.io/status": json.dumps(status),
            },
        },
        "spec": {
            "initContainers": [
                {
                    "name": "istio-init",
                    "image": "docker.io/istio/proxyv2:1.28.0",
                    "args": [
                        "istio-iptables",
                        *([NATIVE_NFTABLES_FLAG] if native_nftables else []),
                    ],
                    "securityContext": {"runAsUser": 0, "runAsGroup": 0},
                }
            ],
            "containers": containers,
        },
    }


def _port(index: int, n: int) -> int:
    return BASE_PORT + index % n


def compile_synthetic(n: int, *, flat: bool = False, native_nftables: bool = False) -> Ruleset:
    pod = synthetic_pod(n, native_nftables=native_nftables)
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    settings = CompilerSettings(dispatch_fanout=max(n, 2)) if flat else CompilerSettings()
    return compile_pod(view, settings=settings, native_nftables=native_nftables)


def rule_count(ruleset: Ruleset) -> int:
    return sum(len(t.rules) for family in (ruleset.ipv4, ruleset.ipv6) for t in family.tables)


# --- load generator (runs inside the namespace, as a container's uid) ---------------------


def serve(port: int) -> None:
    """Echo on the first connection until EOF, then accept and close every connection."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(4096)
    print("ready", flush=True)
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(4096):
            conn.sendall(data)
    while True:
        conn, _ = listener.accept()
        conn.close()


def ping(sock: socket.socket) -> None:
    sock.sendall(MESSAGE)
    received = 0
    while received < len(MESSAGE):
        chunk = sock.recv(len(MESSAGE) - received)
        if not chunk:
            raise ConnectionError("server closed the request/response connection")
        received += len(chunk)


def connect_once(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT_SECONDS)
        sock.connect((HOST, port))
        if sock.recv(1):  # wait for the server's close: one full connection per iteration
            raise ConnectionError("server sent data on a connect-rate connection")


def timed_loop(step: Callable[[], None], *, count: int, seconds: float) -> tuple[int, float]:
    """Run ``step`` up to ``count`` times or about ``seconds``; (iterations, elapsed)."""
    started = time.perf_counter()
    deadline = started + seconds
    done = 0
    while done < count:
        step()
        done += 1
        if done % CHECK_EVERY == 0 and time.perf_counter() >= deadline:
            break
    return done, time.perf_counter() - started


def measure_rr(port: int, *, count: int, seconds: float) -> tuple[int, float]:
    # Not socket.create_connection: after dropping root, this uid may not read the stdlib's
    # files, and getaddrinfo would lazily import the idna codec.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT_SECONDS)
        sock.connect((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(RR_WARMUP):
            ping(sock)
        return timed_loop(lambda: ping(sock), count=count, seconds=seconds)


def measure_connect(port: int, *, count: int, seconds: float) -> tuple[int, float]:
    for _ in range(CONNECT_WARMUP):
        connect_once(port)
    return timed_loop(lambda: connect_once(port), count=count, seconds=seconds)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(server_pid: int) -> float:
    """CPU seconds client and server have used: the work of the loopback path (the output
    hooks, meshguard's among them, run in the sender's context), whatever else the machine
    runs meanwhile."""
    return own_cpu() + (process_cpu(server_pid) if server_pid else 0.0)


def client(args: argparse.Namespace) -> dict[str, Any]:
    cpu = cpu_of(args.server_pid)
    rr, rr_elapsed = measure_rr(args.port, count=args.rr_count, seconds=args.rr_seconds)
    rr_cpu, cpu = cpu_of(args.server_pid) - cpu, cpu_of(args.server_pid)
    conn, conn_elapsed = measure_connect(
        args.port, count=args.connect_count, seconds=args.connect_seconds
    )
    conn_cpu = cpu_of(args.server_pid) - cpu
    return {
        "rr_per_second": rr / rr_elapsed,
        "round_trips": rr,
        "connect_per_second": conn / conn_elapsed,
        "connections": conn,
        "connections_total": 1 + CONNECT_WARMUP + conn,
        # Warm-up included in the CPU of each phase, and in its count.
        "rr_per_cpu_second": (rr + RR_WARMUP) / rr_cpu if rr_cpu > 0 else float("nan"),
        "connect_per_cpu_second": (
            (conn + CONNECT_WARMUP) / conn_cpu if conn_cpu > 0 else float("nan")
        ),
    }


def helper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kernel_path.py _server|_client")
    parser.add_argument("role", choices=["_server", "_client", "_refused"])
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rr-count", type=int, default=0)
    parser.add_argument("--rr-seconds", type=float, default=0.0)
    parser.add_argument("--connect-count", type=int, default=0)
    parser.add_argument("--connect-seconds", type=float, default=0.0)
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    parser.add_argument("--server-pid", type=int, default=0, help="(client) the server's pid")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    drop_privileges(uid=args.uid, gid=args.uid)
    if args.role == "_server":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.alarm(SERVER_LIFETIME_SECONDS)  # never outlive the benchmark
        serve(args.port)
        return 0
    if args.role == "_refused":
        json.dump({"refused": refused(args.port)}, sys.stdout)
        return 0
    json.dump(client(args), sys.stdout)
    return 0


def refused(port: int) -> bool:
    """Whether a connection to ``port`` is refused (meshguard's reset) as this uid."""
    try:
        connect_once(port)
    except ConnectionRefusedError:
        return True
    return False


def helper_argv(role: str, *extra: str) -> list[str]:
    return module_argv("benchmarks.kernel_path", role, *extra)


# --- traffic trials -----------------------------------------------------------------------

#: Istio's sidecar capture for the trials (REDIRECT mode, all outbound TCP to 15001, no DNS
#: capture), IPv4, as istio-init writes it in iptables or in native nftables. Loopback
#: traffic between containers RETURNs in Istio's output chain, but the nat table turns
#: conntrack on in the namespace — which meshguard's rules also need, so on a real Istio pod
#: meshguard does not pay for it.
ISTIO_CAPTURE = CaptureConfig(outbound_ranges=("*",), capture_dns=False)


@dataclass(frozen=True)
class Config:
    """What a trial's namespace holds besides lo: Istio's nat rules, meshguard's rules."""

    name: str
    istio: bool
    meshguard: bool
    flat: bool = False  # meshguard's rules with one dispatch rule per uid (no uid ranges)
    nftables: bool = False  # Istio's native nftables mode (meshguard's table follows it)


BASELINE = Config(name="baseline", istio=False, meshguard=False)
MESHGUARD = Config(name="meshguard", istio=False, meshguard=True)
ISTIO = Config(name="istio", istio=True, meshguard=False)
ISTIO_MESHGUARD = Config(name="istio+meshguard", istio=True, meshguard=True)
ISTIO_MESHGUARD_FLAT = Config(name="istio+meshguard-flat", istio=True, meshguard=True, flat=True)
ISTIO_NFT = Config(name="istio-nft", istio=True, meshguard=False, nftables=True)
ISTIO_NFT_MESHGUARD = Config(name="istio-nft+meshguard", istio=True, meshguard=True, nftables=True)
ALL_CONFIGS = (
    BASELINE, MESHGUARD, ISTIO, ISTIO_MESHGUARD, ISTIO_MESHGUARD_FLAT, ISTIO_NFT,
    ISTIO_NFT_MESHGUARD,
)  # fmt: skip
#: (without, with) pairs whose ratio is reported; the first is the headline figure, then
#: meshguard's cost in an Istio pod per backend, last what the uid-range dispatch gains
#: over the flat layout.
ALL_PAIRS = (
    (BASELINE, MESHGUARD),
    (ISTIO, ISTIO_MESHGUARD),
    (ISTIO_NFT, ISTIO_NFT_MESHGUARD),
    (ISTIO_MESHGUARD_FLAT, ISTIO_MESHGUARD),
)
#: Issue 14's goal for istio+meshguard / istio, connect rate at 64 containers, best backend.
ISTIO_GOAL = 0.97


def pairs_of(configs: Sequence[Config]) -> list[tuple[Config, Config]]:
    """The ratios a run of ``configs`` can report (both sides measured)."""
    return [(a, b) for a, b in ALL_PAIRS if a in configs and b in configs]


def parse_configs(text: str) -> tuple[Config, ...]:
    """``--configs a,b,...`` (names of :data:`ALL_CONFIGS`), in the canonical order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    known = {config.name for config in ALL_CONFIGS}
    unknown = sorted(names - known)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configurations {unknown or text!r}; known: {', '.join(sorted(known))}"
        )
    return tuple(config for config in ALL_CONFIGS if config.name in names)


METRICS = (
    ("rr_per_second", "request/response (rt/s)"),
    ("connect_per_second", "connect+close (conn/s)"),
    # Per CPU second of client + server: less sensitive to what else the machine runs.
    ("rr_per_cpu_second", "request/response per CPU second"),
    ("connect_per_cpu_second", "connect+close per CPU second"),
)


@dataclass(frozen=True)
class Trial:
    config: str
    rr_per_second: float
    connect_per_second: float
    connections_total: int
    rr_per_cpu_second: float
    connect_per_cpu_second: float
    dispatched: int | None  # NEW packets RETURNed by the client's source chain (meshguard)


def meshguard_init(
    ns: NetworkNamespace, ruleset_file: Path, *, python: str = sys.executable
) -> float:
    started = time.perf_counter()
    ns.run([python, "-m", "meshguard", "init", "--ruleset-file", str(ruleset_file)])
    return time.perf_counter() - started


def installed_python(directory: Path) -> str:
    """A virtualenv holding meshguard as the image has it: a plain (not editable) copy of
    the package, byte-compiled as ``pip install`` does. meshguard-init needs only the
    standard library, so no dependencies are installed. Returns its interpreter."""
    venv = directory / "installed"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    package = Path(site) / "meshguard"
    shutil.copytree(MESHGUARD_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [str(python), "-m", "compileall", "-q", str(package)], check=True, capture_output=True
    )
    return str(python)


def load_istio(ns: NetworkNamespace, *, nftables: bool) -> None:
    """Istio's capture, as istio-init writes it (before meshguard-init)."""
    if nftables:
        ns.run(["nft", "-f", "-"], stdin=capture_nft(ISTIO_CAPTURE, ipv6=False))
    else:
        ns.run(
            ["iptables-nft-restore", "--noflush", "--wait"],
            stdin=capture_payload(ISTIO_CAPTURE, Family.IPV4),
        )


def vmap_holds(ns: NetworkNamespace, uid: int) -> bool:
    """Whether meshguard's nftables verdict map sends ``uid`` to its source chain."""
    listing = ns.run(["nft", "list", "table", "inet", "meshguard"])
    return f"{uid} : goto {source_chain(uid)}" in listing


def dispatched_packets(ns: NetworkNamespace, uid: int, port: int) -> int:
    """Packets the client's source chain let through to ``port`` (its NEW packets)."""
    listing = ns.run(["iptables", "-w", "-t", "filter", "-L", source_chain(uid), "-v", "-x", "-n"])
    return sum(
        int(line.split()[0])
        for line in listing.splitlines()[2:]
        if f"dpt:{port}" in line.split() and "RETURN" in line.split()
    )


def run_trial(
    config: Config, profile: Profile, rulesets: Mapping[tuple[bool, bool], Path], cpu: int | None
) -> Trial:
    client_uid = BASE_UID + TRAFFIC_POD_SIZE - 1
    server_uid, port = BASE_UID, BASE_PORT
    pin = ["--cpu", str(cpu)] if cpu is not None else []
    with NetworkNamespace() as ns:
        if config.istio:  # istio-init runs first, meshguard-init right after it
            load_istio(ns, nftables=config.nftables)
        if config.meshguard:
            meshguard_init(ns, rulesets[(config.flat, config.nftables)])
        server = ns.spawn(
            helper_argv("_server", "--uid", str(server_uid), "--port", str(port), *pin),
            ready_line="ready",
        )
        output = ns.run(
            helper_argv(
                "_client", "--uid", str(client_uid), "--port", str(port), *pin,
                "--server-pid", str(server.pid),
                "--rr-count", str(profile.rr_count), "--rr-seconds", str(profile.rr_seconds),
                "--connect-count", str(profile.connect_count),
                "--connect-seconds", str(profile.connect_seconds),
            )
        )  # fmt: skip
        result = json.loads(output)
        dispatched = None
        if config.meshguard:
            check_enforced(ns, port=port, pin=pin)
            if config.nftables:
                if not vmap_holds(ns, client_uid):
                    raise RuntimeError(f"uid {client_uid} not in meshguard's verdict map")
            else:
                dispatched = dispatched_packets(ns, client_uid, port)
    return Trial(
        config=config.name,
        rr_per_second=result["rr_per_second"],
        connect_per_second=result["connect_per_second"],
        connections_total=result["connections_total"],
        rr_per_cpu_second=result["rr_per_cpu_second"],
        connect_per_cpu_second=result["connect_per_cpu_second"],
        dispatched=dispatched,
    )


#: A uid of no container: meshguard's default denies it everything.
STRANGER_UID = BASE_UID - 1


def check_enforced(ns: NetworkNamespace, *, port: int, pin: Sequence[str]) -> None:
    """The rules are in force: a uid of no container is refused at ``port``."""
    output = ns.run(helper_argv("_refused", "--uid", str(STRANGER_UID), "--port", str(port), *pin))
    if not json.loads(output)["refused"]:
        raise RuntimeError(
            f"uid {STRANGER_UID} reached port {port}: meshguard's rules not in force"
        )


def run_traffic(
    profile: Profile, workdir: Path, cpu: int | None, configs: Sequence[Config]
) -> list[Trial]:
    """Trials in rounds, each round in the reverse order of the previous (ABCD DCBA ...)."""
    rulesets = {}
    for flat in (False, True):
        for native in (False, True):
            name = f"ruleset-{TRAFFIC_POD_SIZE}{'-flat' if flat else ''}{'-nft' if native else ''}"
            rulesets[(flat, native)] = workdir / f"{name}.json"
            ruleset = compile_synthetic(TRAFFIC_POD_SIZE, flat=flat, native_nftables=native)
            rulesets[(flat, native)].write_text(ruleset.to_json(), encoding="utf-8")
    run_trial(BASELINE, WARMUP, rulesets, cpu)  # not counted: page cache, first netns
    trials = []
    for index in range(profile.trials):
        for config in configs if index % 2 == 0 else tuple(reversed(configs)):
            trial = run_trial(config, profile, rulesets, cpu)
            print(
                f"  round {index + 1}/{profile.trials} {config.name:20}"
                f" rr {trial.rr_per_second:9,.0f}/s  connect {trial.connect_per_second:7,.0f}/s",
                file=sys.stderr,
                flush=True,
            )
            trials.append(trial)
    return trials


def values_of(trials: Sequence[Trial], config: Config, metric: str) -> list[float]:
    return [getattr(t, metric) for t in trials if t.config == config.name]


def traffic_summary(trials: Sequence[Trial], configs: Sequence[Config]) -> dict[str, Any]:
    medians = {
        config.name: {
            metric: statistics.median(values_of(trials, config, metric)) for metric, _ in METRICS
        }
        for config in configs
    }
    ratios = {
        f"{with_.name} / {without.name}": {
            metric: medians[with_.name][metric] / medians[without.name][metric]
            for metric, _ in METRICS
        }
        for without, with_ in pairs_of(configs)
    }
    paired = {
        f"{with_.name} / {without.name}": {
            metric: statistics.median(
                w / o
                for w, o in zip(
                    values_of(trials, with_, metric),
                    values_of(trials, without, metric),
                    strict=True,
                )
            )
            for metric, _ in METRICS
        }
        for without, with_ in pairs_of(configs)
    }
    guarded = [t for t in trials if t.dispatched is not None]
    return {
        "medians": medians,
        "ratios": ratios,
        # The median of each round's ratio: the two trials of a round ran back to back, under
        # about the same load from anything else on the machine.
        "paired_ratios": paired,
        "goal": GOAL,
        "istio_goal": ISTIO_GOAL,
        "configs": [config.name for config in configs],
        "trials": {
            config.name: {metric: values_of(trials, config, metric) for metric, _ in METRICS}
            for config in configs
        },
        "dispatch_check": {
            "connections": sum(t.connections_total for t in guarded),
            "returned_by_source_chain": sum(t.dispatched or 0 for t in guarded),
        },
    }


# --- compile and install cost -------------------------------------------------------------


@dataclass(frozen=True)
class InstallCost:
    containers: int
    rules: int
    compile_ms: float
    init_subprocess_ms: float
    install_in_process_ms: float


def namespaced(ns: NetworkNamespace) -> Callable[..., str]:
    def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
        return run_command(ns.argv(argv), stdin=stdin)

    return run


def time_compile(n: int, reps: int) -> float:
    pod = synthetic_pod(n)
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
        compile_pod(view, settings=CompilerSettings())
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def time_in_process_install(ruleset: Ruleset) -> float:
    with NetworkNamespace() as ns:
        started = time.perf_counter()
        install(ruleset, run=namespaced(ns))
        return time.perf_counter() - started


def time_init(ruleset_file: Path, *, python: str = sys.executable) -> float:
    with NetworkNamespace() as ns:
        return meshguard_init(ns, ruleset_file, python=python)


def measure_install(n: int, profile: Profile, workdir: Path, *, python: str) -> InstallCost:
    ruleset = compile_synthetic(n)
    ruleset_file = workdir / f"ruleset-{n}.json"
    ruleset_file.write_text(ruleset.to_json(), encoding="utf-8")
    init = [time_init(ruleset_file, python=python) for _ in range(profile.install_reps)]
    in_process = [time_in_process_install(ruleset) for _ in range(profile.install_reps)]
    return InstallCost(
        containers=n,
        rules=rule_count(ruleset),
        compile_ms=time_compile(n, profile.compile_reps) * 1000,
        init_subprocess_ms=statistics.median(init) * 1000,
        install_in_process_ms=statistics.median(in_process) * 1000,
    )


#: What ``meshguard init`` imports before it reads the ruleset.
INIT_IMPORTS = "import meshguard.cli, meshguard.cli.init"
#: The standard-library modules among them: what any Python init would pay.
INIT_STDLIB_IMPORTS = (
    "import argparse, concurrent.futures, dataclasses, enum, hashlib, json, logging, pathlib,"
    " shlex, subprocess, typing"
)


def startup_ms(reps: int, *, python: str = sys.executable) -> dict[str, float]:
    """What ``meshguard init`` pays before installing anything: interpreter and imports."""
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import <the standard library modules init uses>'": [
            python,
            "-c",
            INIT_STDLIB_IMPORTS,
        ],
        f"python -c '{INIT_IMPORTS}'": [python, "-c", INIT_IMPORTS],
    }
    with NetworkNamespace() as ns:
        return {label: median_seconds(ns, argv, reps) * 1000 for label, argv in commands.items()}


def median_seconds(ns: NetworkNamespace, argv: Sequence[str], reps: int) -> float:
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        ns.run(argv)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# --- report -------------------------------------------------------------------------------


def format_traffic(summary: dict[str, Any], profile: Profile, cpu: int | None) -> str:
    last = TRAFFIC_POD_SIZE - 1
    pinning = f"client and server pinned to CPU {cpu}" if cpu is not None else "not pinned"
    lines = [
        f"Loopback TCP in a pod of {TRAFFIC_POD_SIZE} containers + istio-proxy:"
        f" client {container_name(last)} (uid {BASE_UID + last}, the longest walk"
        f" through the uid dispatch of {TRAFFIC_POD_SIZE}) -> server {container_name(0)}"
        f" (uid {BASE_UID}) on {HOST}:{BASE_PORT}",
        f"median of {profile.trials} trials per configuration, alternating, fresh namespace"
        f" per trial, {pinning} ({profile.name} profile)",
        "",
        f"{'configuration':<26}{'rr (rt/s)':>14}{'connect (conn/s)':>18}"
        f"{'rr /cpu-s':>12}{'connect /cpu-s':>16}",
    ]
    configs = [c for c in ALL_CONFIGS if c.name in summary["medians"]]
    for config in configs:
        medians = summary["medians"][config.name]
        lines.append(
            f"{config.name:<26}{medians['rr_per_second']:>14,.0f}"
            f"{medians['connect_per_second']:>18,.0f}"
            f"{medians['rr_per_cpu_second']:>12,.0f}{medians['connect_per_cpu_second']:>16,.0f}"
        )
    lines += [
        "",
        f"{'ratio (with / without)':<40}{'rr':>10}{'connect':>10}   goal >= {GOAL}"
        f" ({ISTIO_GOAL} on connect for istio pairs)",
    ]
    flat_pair = f"{ISTIO_MESHGUARD.name} / {ISTIO_MESHGUARD_FLAT.name}"
    istio_pairs = {f"{b.name} / {a.name}" for a, b in ALL_PAIRS[1:3]}
    for pair, ratios in summary["ratios"].items():
        verdicts = ", ".join("met" if r >= GOAL else "NOT met" for r in ratios.values())
        if pair in istio_pairs:
            met = ratios["connect_per_second"] >= ISTIO_GOAL
            verdicts = f"connect {'met' if met else 'NOT met'} (>= {ISTIO_GOAL})"
        if pair == flat_pair:
            verdicts = "(no goal: uid-range dispatch vs one rule per uid)"
        lines.append(
            f"{pair:<40}{ratios['rr_per_second']:>10.3f}{ratios['connect_per_second']:>10.3f}"
            f"   {verdicts}"
        )
    lines += [
        "",
        "median of the per-round ratios (rr, connect; per CPU second: rr, connect):",
    ]
    for pair, ratios in summary["paired_ratios"].items():
        lines.append(
            f"  {pair:<38}{ratios['rr_per_second']:>8.3f}{ratios['connect_per_second']:>8.3f}"
            f"   {ratios['rr_per_cpu_second']:>8.3f}{ratios['connect_per_cpu_second']:>8.3f}"
        )
    lines += ["", "per trial:"]
    for config in configs:
        for metric, label in (
            ("rr_per_second", "rr"),
            ("connect_per_second", "connect"),
            ("connect_per_cpu_second", "conn/cpu"),
        ):
            values = ", ".join(f"{v:,.0f}" for v in summary["trials"][config.name][metric])
            lines.append(f"  {config.name:<20} {label:<8} {values}")
    check = summary["dispatch_check"]
    lines.append(
        f"dispatch check: {source_chain(BASE_UID + last)} RETURNed"
        f" {check['returned_by_source_chain']:,} NEW packets for"
        f" {check['connections']:,} connections opened in the meshguard trials"
    )
    lines.append(
        "nftables trials: the verdict map held the client's uid, and a uid of no container"
        " was refused after every meshguard trial (iptables trials too)"
    )
    lines.append(
        "note: 'baseline' has no netfilter rules at all, so meshguard / baseline includes"
        " turning conntrack on; an Istio pod already has it on (its nat capture rules)."
    )
    return "\n".join(lines)


def format_install(
    costs: Sequence[InstallCost], startup: dict[str, float], profile: Profile
) -> str:
    lines = [
        f"Compile and install (median; compile x{profile.compile_reps},"
        f" install x{profile.install_reps}, fresh namespace per install, IPv4 + IPv6)",
        "",
        f"{'containers':>10}{'rules':>8}{'compile ms':>12}{'init subprocess ms':>20}"
        f"{'install() ms':>14}",
    ]
    lines.extend(
        f"{c.containers:>10}{c.rules:>8}{c.compile_ms:>12.2f}{c.init_subprocess_ms:>20.1f}"
        f"{c.install_in_process_ms:>14.1f}"
        for c in costs
    )
    lines.append("part of the init subprocess time (ip netns exec NS ...):")
    lines.extend(f"  {label:<34} {ms:6.1f} ms" for label, ms in startup.items())
    return "\n".join(lines)


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    profile: dict[str, Any]
    cpu: int | None  # the CPU client and server were pinned to
    containers: int
    machine: Machine
    traffic: dict[str, Any]  # traffic_summary
    trials: list[dict[str, Any]]  # Trial
    install: list[dict[str, Any]]  # InstallCost
    init_startup_ms: dict[str, float]
    seconds: float


def main_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "benchmarks.kernel_path",
        description="Loopback TCP with and without meshguard's rules, and install cost (root).",
        quick="about 20 s",
    )
    parser.add_argument(
        "--containers",
        type=int,
        default=TRAFFIC_POD_SIZE,
        metavar="N",
        help=f"containers in the traffic pod, >= 2 (default: {TRAFFIC_POD_SIZE})",
    )
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=ALL_CONFIGS,
        metavar="A,B,...",
        help="the configurations to measure (default: all: "
        + ", ".join(c.name for c in ALL_CONFIGS)
        + ")",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="measure traffic only (no install cost)"
    )
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument(
        "--cpu", type=int, help="CPU to pin client and server to (default: the first allowed)"
    )
    pin.add_argument("--no-pin", action="store_true", help="let the scheduler place them")
    return parser


def chosen_cpu(args: argparse.Namespace) -> int | None:
    if args.no_pin:
        return None
    return args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in {"_server", "_client", "_refused"}:
        return helper_main(argv)
    global TRAFFIC_POD_SIZE  # noqa: PLW0603 - read by the traffic and report functions
    args = main_parser().parse_args(argv)
    if args.containers < 2:
        print("--containers needs at least 2", file=sys.stderr)
        return 2
    TRAFFIC_POD_SIZE = args.containers
    if not is_root():
        print(
            "kernel_path.py needs root (network namespaces, iptables, setuid): run it as root",
            file=sys.stderr,
        )
        return 2
    profile = QUICK if args.quick else FULL
    cpu = chosen_cpu(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="meshguard-bench-") as tmp:
        workdir = Path(tmp)
        trials = run_traffic(profile, workdir, cpu, args.configs)
        costs: list[InstallCost] = []
        startup: dict[str, float] = {}
        if not args.no_install:
            python = installed_python(workdir)
            costs = [measure_install(n, profile, workdir, python=python) for n in INSTALL_POD_SIZES]
            startup = startup_ms(max(3, profile.install_reps), python=python)
    summary = traffic_summary(trials, args.configs)
    elapsed = time.perf_counter() - started
    print(format_traffic(summary, profile, cpu))
    if costs:
        print()
        print(format_install(costs, startup, profile))
    where = machine()
    print(f"\n{machine_line(where, elapsed)}")
    if args.json:
        document: Document = {
            "profile": asdict(profile),
            "cpu": cpu,
            "containers": TRAFFIC_POD_SIZE,
            "machine": where,
            "traffic": summary,
            "trials": [asdict(t) for t in trials],
            "install": [asdict(c) for c in costs],
            "init_startup_ms": startup,
            "seconds": elapsed,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
