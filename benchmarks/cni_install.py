"""Istio CNI mode: the node-side install time of meshguard-cni, at 2 and 64 containers.

Run as root from the checkout: ``python -m benchmarks.cni_install [--quick] [--json FILE]
[--markdown]``.

What a node does when an injected pod starts: the runtime executes ``meshguard-cni`` ADD
(here ``python -m meshguard.cni``, as the shim would run it) with the conflist entry the
installer writes (``kubernetes.kubeconfig``) and a ``prevResult``. The plugin GETs the pod
from a scripted API server over real TLS (the pod is ``kernel_path.py``'s synthetic pod of
N containers, in Istio CNI mode, admitted by meshguard's real ``inject_pod``), checks its
ruleset, enters the pod's network namespace, detects the backend and installs and verifies
the rules. Each run gets a fresh network namespace holding Istio's capture (the
``ipnets`` golden, iptables-nft), loaded before the clock starts; the wall time is the
plugin process's, from exec to exit, and its CPU time (with the iptables tools it runs).

``shim -> agent``: the same ADD through the node's real path — the static shim
(``cni-shim/meshguard-cni.c``, built with ``gcc -static``) sends it with the namespace's
descriptor to the agent's socket (served in this process), which runs the same plugin.

Baselines in the same run, the configurations alternating:

- ``meshguard init --ruleset-file F`` with the same ruleset (the init-container path: the
  same install code, no API call, no CNI protocol): ``cni add / init`` is what the node
  path adds;
- a pass-through ADD: the same plugin for the same pod without meshguard's annotations
  (process start, configuration, the API GET; nothing installed): what every pod on the node
  pays, injected or not.

Median of N runs per configuration after one warm-up. The machine is small and shared:
figures vary between runs.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import (
    ROOT,
    Machine,
    machine,
    machine_line,
    markdown_table,
    median_of,
    script_parser,
    write_json,
)
from benchmarks.kernel_path import synthetic_pod
from meshguard.cni.agent import AgentSettings, serving
from meshguard.cni.install import kubeconfig, plugin_entry, render
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.apiserver import ApiServer, scripted_api
from tests.support.keys import SIGNER
from tests.support.samples import as_cni_mode
from tests.support.shared import golden_payloads

SIZES = (2, 64)
CONFIGS = ("cni-add", "shim-add", "init", "pass-through")
SHIM_SOURCE = ROOT / "cni-shim" / "meshguard-cni.c"


class Row(TypedDict):
    containers: int
    rules: int
    ms: dict[str, float]  # median wall time per configuration
    cpu_ms: dict[str, float]  # median CPU time (user + system) of the process per configuration
    runs: dict[str, list[float]]
    cpu_runs: dict[str, list[float]]


class Timed(TypedDict):
    wall: float
    cpu: float


def timed(argv: list[str], **kwargs: Any) -> Timed:
    """Wall time and CPU time (user + system, the child and its own children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120, **kwargs)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[-1]} failed: {done.stdout} {done.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu}


class Document(TypedDict):
    machine: Machine
    seconds: float
    reps: int
    shim_bytes: int  # the static shim on the node's disk
    rows: list[Row]


def admitted_pod(n: int) -> dict[str, Any]:
    pod = as_cni_mode(synthetic_pod(n))
    pod["metadata"]["uid"] = f"bench-uid-{n}"
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def uninjected(pod: dict[str, Any]) -> dict[str, Any]:
    plain = copy.deepcopy(pod)
    plain["metadata"]["name"] += "-plain"
    annotations = plain["metadata"]["annotations"]
    for key in [k for k in annotations if k.startswith("meshguard.io/")]:
        del annotations[key]
    return plain


class PodNamespace(NetworkNamespace):
    """A fresh namespace with lo up and Istio's capture, as istio-cni leaves it."""

    def _setup_commands(self) -> list[list[str]]:
        return [["ip", "link", "set", "lo", "up"]]

    def load_istio(self) -> None:
        v4, v6 = golden_payloads("ipnets.golden")
        for family, payloads in ((Family.IPV4, v4), (Family.IPV6, v6)):
            for payload in payloads:
                self.run([f"{'ip6' if family is Family.IPV6 else 'ip'}tables-nft-restore",
                          "--noflush"], stdin=payload)  # fmt: skip


def plugin_add(conf_file: Path, pod: dict[str, Any], ns: NetworkNamespace) -> Timed:
    metadata = pod["metadata"]
    cni_args = (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={metadata['namespace']};"
        f"K8S_POD_NAME={metadata['name']};K8S_POD_UID={metadata['uid']}"
    )
    env = {**os.environ, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bench", "CNI_IFNAME": "eth0",
           "CNI_NETNS": f"/var/run/netns/{ns.name}", "CNI_ARGS": cni_args}  # fmt: skip
    with conf_file.open() as stdin:
        return timed([sys.executable, "-m", "meshguard.cni"], stdin=stdin, env=env)


def shim_add(conf_file: Path, pod: dict[str, Any], ns: NetworkNamespace, shim: Path) -> Timed:
    """The node's path: the runtime execs the shim, which hands the call to the agent."""
    metadata = pod["metadata"]
    cni_args = (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={metadata['namespace']};"
        f"K8S_POD_NAME={metadata['name']};K8S_POD_UID={metadata['uid']}"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "ADD",
           "CNI_CONTAINERID": "bench", "CNI_IFNAME": "eth0",
           "CNI_NETNS": f"/var/run/netns/{ns.name}", "CNI_ARGS": cni_args,
           "MESHGUARD_CNI_SOCKET": str(shim.parent / "cni.sock")}  # fmt: skip
    with conf_file.open() as stdin:
        return timed([str(shim)], stdin=stdin, env=env)


def build_shim(directory: Path) -> Path:
    shim = directory / "meshguard-cni"
    subprocess.run(["gcc", "-static", "-Os", "-o", str(shim), str(SHIM_SOURCE)], check=True,
                   capture_output=True)  # fmt: skip
    return shim


def init(ruleset_file: Path, ns: NetworkNamespace) -> Timed:
    return timed(
        ns.argv([sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(ruleset_file)])
    )


def network_conf(directory: Path, api: ApiServer) -> Path:
    """The entry the installer writes, as the runtime hands it over (name, version, prev)."""
    config = directory / "ZZZ-meshguard-cni-kubeconfig"
    config.write_bytes(render(kubeconfig(server=api.url, token="t", ca_pem=api.ca_pem)))
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.1.2.3/24"}]}  # fmt: skip
    conf = {**plugin_entry(kubeconfig=str(config)), "name": "k8s-pod-network",
            "cniVersion": "1.0.0", "prevResult": prev}  # fmt: skip
    path = directory / "conf.json"
    path.write_text(json.dumps(conf))
    return path


def measure_size(
    n: int, *, reps: int, directory: Path, api: ApiServer, conf: Path, shim: Path
) -> Row:
    pod = admitted_pod(n)
    plain = uninjected(pod)
    api.script.serve(pod)
    api.script.serve(plain)
    ruleset_text = pod["metadata"]["annotations"]["meshguard.io/ruleset"]
    ruleset_file = directory / f"ruleset-{n}"
    ruleset_file.write_text(ruleset_text)
    ruleset = Ruleset.from_json(ruleset_text)
    runs: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu_runs: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rep in range(reps + 1):  # the first round is a warm-up
        for config in CONFIGS:
            with PodNamespace() as ns:
                ns.load_istio()
                if config == "init":
                    took = init(ruleset_file, ns)
                elif config == "shim-add":
                    took = shim_add(conf, pod, ns, shim)
                else:
                    took = plugin_add(conf, pod if config == "cni-add" else plain, ns)
                installs = config in ("cni-add", "shim-add")
                if installs and "MESHGUARD" not in ns.run(["iptables-nft-save"]):
                    raise RuntimeError("meshguard-cni ADD exited 0 without installing the rules")
            if rep:
                runs[config].append(took["wall"] * 1000)
                cpu_runs[config].append(took["cpu"] * 1000)
    rules = sum(len(t.rules) for f in (ruleset.ipv4, ruleset.ipv6) for t in f.tables)
    return {"containers": n, "rules": rules, "ms": {c: median_of(runs[c]) for c in CONFIGS},
            "cpu_ms": {c: median_of(cpu_runs[c]) for c in CONFIGS}, "runs": runs,
            "cpu_runs": cpu_runs}  # fmt: skip


def measure(*, quick: bool) -> Document:
    started = time.perf_counter()
    reps = 3 if quick else 9
    rows = []
    with tempfile.TemporaryDirectory(prefix="mgcni") as tmp:  # short: a unix socket lives here
        directory = Path(tmp)
        shim = build_shim(directory)
        agent = AgentSettings(socket_path=directory / "cni.sock", conf_dir=directory,
                              host_conf_dir=directory)  # fmt: skip
        with scripted_api(directory) as api, serving(agent):
            conf = network_conf(directory, api)
            for n in SIZES:
                rows.append(measure_size(n, reps=reps, directory=directory, api=api, conf=conf,
                                         shim=shim))  # fmt: skip
        shim_bytes = shim.stat().st_size
    return {"machine": machine(), "seconds": time.perf_counter() - started, "reps": reps,
            "shim_bytes": shim_bytes, "rows": rows}  # fmt: skip


def markdown(data: Document | dict[str, Any]) -> list[str]:
    """The report's section (``--markdown`` prints it)."""
    lines = [
        "## Istio CNI mode: node-side install time (benchmarks/cni_install.py)",
        "",
        "Wall time of one `meshguard-cni` ADD as the runtime runs it (`python -m meshguard.cni`,"
        " the installer's conflist entry and kubeconfig, the pod read over TLS from a scripted"
        " API server, then setns + backend detection + install + verify), in a fresh network"
        " namespace holding Istio's capture (iptables-nft); `shim -> agent`: the same ADD"
        " through the node's path (the static shim sends it, with the namespace's descriptor,"
        " to the agent's socket; the agent runs the same plugin). Baselines in the same run:"
        " `meshguard init --ruleset-file` with the same ruleset (the init-container path) and"
        " a pass-through ADD (same plugin, pod without meshguard's annotations: process start"
        f" + API GET). Medians of {data['reps']} runs each, configurations alternating. The"
        " machine (2 CPUs) was shared with other sessions' builds and tests during the run:"
        " expect scatter.",
        "",
        *markdown_table(
            [
                "containers",
                "rules",
                "",
                "cni ADD",
                "shim -> agent ADD",
                "meshguard init",
                "pass-through ADD",
                "cni ADD / init",
                "ADD - pass-through",
            ],
            [
                [
                    row["containers"],
                    row["rules"],
                    label,
                    f"{ms['cni-add']:.0f}",
                    f"{ms['shim-add']:.0f}",
                    f"{ms['init']:.0f}",
                    f"{ms['pass-through']:.0f}",
                    f"{ms['cni-add'] / ms['init']:.2f}",
                    f"{ms['cni-add'] - ms['pass-through']:.0f}",
                ]
                for row in data["rows"]
                for label, ms in (("wall ms", row["ms"]), ("CPU ms", row["cpu_ms"]))
            ],
        ),
    ]
    lines += [
        "",
        "Per-run wall times (ms): "
        + "; ".join(
            f"{row['containers']} containers {c}: " + ", ".join(f"{v:.0f}" for v in row["runs"][c])
            for row in data["rows"]
            for c in CONFIGS
        ),
        "",
        "CPU time (user + system of the process and of the tools it runs) leaves out the time"
        " spent waiting for a CPU: the steadier figure on a shared machine. The pass-through"
        " ADD is the fixed cost every pod on the node pays (Python start, imports, the"
        " configuration, the TLS handshake and GET); the rest of an ADD is the install, as in"
        " meshguard init. On a node the shim forwards to the agent, which runs this same"
        " process per call (plus a unix-socket round trip); running the plugin inside the"
        " agent would save the interpreter start per pod (docs/cni.md).",
        "",
        f"On the node's disk: the static shim, {data['shim_bytes'] / 1024:.0f} KiB (`gcc -static"
        " -Os`, glibc). The agent and the plugin run from the init image (see the init image"
        " section): the same core install.",
        "",
    ]
    return lines


def main(argv: Sequence[str]) -> int:
    parser = script_parser(
        "benchmarks.cni_install",
        description="meshguard-cni ADD wall time at 2 and 64 containers against meshguard init"
        " and a pass-through ADD (root)",
        quick="about 30 s",
    )
    parser.add_argument("--markdown", action="store_true", help="print the report's section")
    args = parser.parse_args(argv)
    data = measure(quick=args.quick)
    if args.json:
        write_json(args.json, data)
    if args.markdown:
        print("\n".join(markdown(data)))
    else:
        for row in data["rows"]:
            ms = row["ms"]
            cpu = row["cpu_ms"]
            print(f"{row['containers']:>3} containers ({row['rules']} rules): wall/CPU ms"
                  f" cni ADD {ms['cni-add']:.0f}/{cpu['cni-add']:.0f}, init"
                  f" {ms['init']:.0f}/{cpu['init']:.0f}, pass-through"
                  f" {ms['pass-through']:.0f}/{cpu['pass-through']:.0f}")  # fmt: skip
    print(machine_line(data["machine"], data["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
