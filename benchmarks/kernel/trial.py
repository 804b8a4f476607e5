"""One traffic trial in a fresh namespace per configuration, rounds in alternating order,
medians."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import alternating
from benchmarks.kernel.configs import BASELINE, ISTIO_CAPTURE, ISTIO_GOAL, Config, pairs_of
from benchmarks.kernel.pod import (
    BASE_PORT,
    BASE_UID,
    GOAL,
    MESHGUARD_PACKAGE,
    TRAFFIC_POD_SIZE,
    WARMUP,
    Profile,
    compile_synthetic,
)
from benchmarks.kernel.traffic import helper_argv
from meshguard.rules.compiler import source_chain
from meshguard.rules.ruleset import Family
from meshguard.sandbox.istio import capture_nft, capture_payload
from meshguard.sandbox.netns import NetworkNamespace

METRICS = (
    ("rr_per_second", "request/response (rt/s)"),
    ("connect_per_second", "connect+close (conn/s)"),
    # Per CPU second of client + server: less sensitive to what else the machine runs.
    ("rr_per_cpu_second", "request/response per CPU second"),
    ("connect_per_cpu_second", "connect+close per CPU second"),
    # --denials (NaN without): refused connections; per CPU second of the client, then with
    # the NFLOG listener's.
    ("denied_per_second", "refused (conn/s)"),
    ("denied_per_cpu_second", "refused per CPU second"),
    ("denied_per_node_cpu_second", "refused per CPU second with the listener's"),
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
    denied_per_second: float | None  # --denials (None: not measured)
    denied_per_cpu_second: float | None
    denied_per_node_cpu_second: float | None
    denied: int | None  # refused attempts, warm-up included
    logged: int | None  # denials the NFLOG listener read (None: no listener)


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
    config: Config,
    profile: Profile,
    rulesets: Mapping[tuple[bool, bool, tuple[tuple[str, Any], ...]], Path],
    cpu: int | None,
    *,
    containers: int,
    denials: bool = False,
) -> Trial:
    client_uid = BASE_UID + containers - 1
    server_uid, port = BASE_UID, BASE_PORT
    pin = ["--cpu", str(cpu)] if cpu is not None else []
    denied = ["--denied-port", str(port + 1)] if denials and config.meshguard else []
    with NetworkNamespace() as ns:
        if config.istio:  # istio-init runs first, meshguard-init right after it
            load_istio(ns, nftables=config.nftables)
        if config.meshguard:
            meshguard_init(ns, rulesets[config.ruleset_key])
        server = ns.spawn(
            helper_argv("_server", "--uid", str(server_uid), "--port", str(port), *pin),
            ready_line="ready",
        )
        if denied:  # c01's port, denied the client: a refusal is the rules', not a closed port's
            ns.spawn(helper_argv("_server", "--uid", str(server_uid + 1), "--port", str(port + 1)),
                     ready_line="ready")  # fmt: skip
        listener = None
        if denied and config.listener:  # drains the denial log as the node agent does
            listener = ns.spawn(helper_argv("_nflog"), ready_line="ready")
            denied += ["--listener-pid", str(listener.pid)]
        output = ns.run(
            helper_argv(
                "_client", "--uid", str(client_uid), "--port", str(port), *pin,
                "--server-pid", str(server.pid),
                "--rr-count", str(profile.rr_count), "--rr-seconds", str(profile.rr_seconds),
                "--connect-count", str(profile.connect_count),
                "--connect-seconds", str(profile.connect_seconds), *denied,
            )
        )  # fmt: skip
        result = json.loads(output)
        logged = None
        if listener is not None and listener.stdout is not None:
            listener.terminate()  # it reads what is left, then says how many it read
            logged = int(listener.stdout.readline())
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
        denied_per_second=result.get("denied_per_second"),
        denied_per_cpu_second=result.get("denied_per_cpu_second"),
        denied_per_node_cpu_second=result.get("denied_per_node_cpu_second"),
        denied=result.get("denied"),
        logged=logged,
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
    profile: Profile,
    workdir: Path,
    cpu: int | None,
    configs: Sequence[Config],
    *,
    containers: int = TRAFFIC_POD_SIZE,
    denials: bool = False,
) -> list[Trial]:
    """Trials in rounds, each round in the reverse order of the previous (ABCD DCBA ...)."""
    rulesets = {}
    for index, config in enumerate(c for c in configs if c.meshguard):
        if config.ruleset_key not in rulesets:
            path = workdir / f"ruleset-{containers}-{index}.json"
            ruleset = compile_synthetic(
                containers, flat=config.flat, native_nftables=config.nftables,
                compiler=dict(config.compiler),
            )  # fmt: skip
            path.write_text(ruleset.to_json(), encoding="utf-8")
            rulesets[config.ruleset_key] = path
    # not counted: page cache, first netns
    run_trial(BASELINE, WARMUP, rulesets, cpu, containers=containers)
    trials = []
    for index in range(profile.trials):
        for config in alternating(configs, index):
            trial = run_trial(
                config, profile, rulesets, cpu, containers=containers, denials=denials
            )
            print(
                f"  round {index + 1}/{profile.trials} {config.name:20}"
                f" rr {trial.rr_per_second:9,.0f}/s  connect {trial.connect_per_second:7,.0f}/s"
                + (f"  refused {trial.denied_per_second:7,.0f}/s" if trial.denied else ""),
                file=sys.stderr,
                flush=True,
            )
            trials.append(trial)
    return trials


def values_of(trials: Sequence[Trial], config: Config, metric: str) -> list[float]:
    values = [getattr(t, metric) for t in trials if t.config == config.name]
    return [math.nan if value is None else value for value in values]


def traffic_summary(trials: Sequence[Trial], configs: Sequence[Config]) -> dict[str, Any]:
    # The denial path's only when measured (--denials): no NaN columns otherwise.
    measured = any(t.denied is not None for t in trials)
    metrics = [m for m, _ in METRICS if measured or not m.startswith("denied")]
    medians = {
        config.name: {
            metric: statistics.median(values_of(trials, config, metric)) for metric in metrics
        }
        for config in configs
    }
    ratios = {
        f"{with_.name} / {without.name}": {
            metric: medians[with_.name][metric] / medians[without.name][metric]
            for metric in metrics
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
            for metric in metrics
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
            config.name: {metric: values_of(trials, config, metric) for metric in metrics}
            for config in configs
        },
        "logged": {  # --denials: (logged, refused) per trial
            config.name: [(t.logged, t.denied) for t in trials if t.config == config.name]
            for config in configs
            if measured
        },
        "dispatch_check": {
            "connections": sum(t.connections_total for t in guarded),
            "returned_by_source_chain": sum(t.dispatched or 0 for t in guarded),
        },
    }
