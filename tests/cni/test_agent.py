"""The node agent answering the shim's calls in-process: the real static shim (built with
``gcc -static``) sends each call, with the pod's namespace as a descriptor, to the agent's
socket (:func:`meshguard.cni.agent.serving`, in this process); the agent runs the plugin's
code in a thread of its own per call, reads the pod from a scripted API server over real TLS
on a kept-alive connection, and installs into real network namespaces holding Istio's
capture (iptables-nft). The full chain with Debian's CNI plugins and the agent process
(``meshguard cni install --agent-socket``) is in test_shim."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshguard.attestation import Signer, generate
from meshguard.cni.agent import AgentSettings, serving
from meshguard.cni.install import kubeconfig, plugin_entry, render
from meshguard.cni.nflog import bind_group
from meshguard.cni.watch import NFLOG_GROUP
from meshguard.errors import MeshguardFailure
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.rules.ruleset import Family
from meshguard.sandbox.netns import NetworkNamespace
from tests.cni.test_shim import shim  # noqa: F401 - the fixture
from tests.support.apiserver import ApiServer, scripted_api
from tests.support.keys import SIGNER
from tests.support.matrix import example_pod as matrix_pod
from tests.support.netfilter import Netfilter, pod_for
from tests.support.samples import as_cni_mode, pod_of_uids
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root


class PodNamespace(NetworkNamespace):
    """A pod's namespace as istio-cni leaves it: lo up, Istio's capture (iptables-nft)."""

    def _setup_commands(self) -> list[list[str]]:
        return [["ip", "link", "set", "lo", "up"]]

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def load_istio(self) -> None:
        v4, v6 = golden_payloads("ipnets.golden")
        for family, payloads in ((Family.IPV4, v4), (Family.IPV6, v6)):
            for payload in payloads:
                self.run([Netfilter.IPTABLES_NFT.restore(family), "--noflush"], stdin=payload)

    def own_rules(self) -> str:
        return "".join(
            line + "\n"
            for line in self.run(["iptables-nft-save"]).splitlines()
            if "MESHGUARD" in line
        )


def admitted_pod(name: str, *, workloads: int, signer: Signer | None = SIGNER) -> dict[str, Any]:
    """A pod in CNI mode with ``workloads`` containers of their own uids, admitted (and
    signed by ``signer``: the webhook's key) by meshguard (so each size has a ruleset of its
    own)."""
    base = as_cni_mode(pod_for(matrix_pod(), Netfilter.IPTABLES_NFT))
    pod = pod_of_uids(base, [3000 + i for i in range(workloads)])
    pod["metadata"].update(namespace="demo", name=name, uid=f"uid-{name}")
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=signer)
    )
    return pod


def plain_pod(name: str) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"namespace": "demo", "name": name, "uid": f"uid-{name}"}}  # fmt: skip


@dataclass(frozen=True)
class Agent:
    shim: Path
    socket: Path
    conf: dict[str, Any]
    api: ApiServer

    def call(self, command: str, pod: dict[str, Any], netns: str) -> tuple[int, dict[str, Any]]:
        """One CNI call as the runtime makes it: exec the shim; (exit status, its JSON)."""
        metadata = pod["metadata"]
        cni_args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={metadata['namespace']};"
                    f"K8S_POD_NAME={metadata['name']};K8S_POD_UID={metadata['uid']}")  # fmt: skip
        sandbox = f"sandbox-{netns.rsplit('/', 1)[-1]}"  # one per namespace, as a runtime's
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
               "CNI_CONTAINERID": sandbox, "CNI_IFNAME": "eth0", "CNI_NETNS": netns,
               "CNI_ARGS": cni_args, "MESHGUARD_CNI_SOCKET": str(self.socket)}  # fmt: skip
        done = subprocess.run([str(self.shim)], input=json.dumps(self.conf), env=env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.fixture
def start_agent(shim: Path) -> Iterator[Any]:  # noqa: F811 - the imported fixture
    directory = Path(tempfile.mkdtemp(prefix="mgag-"))  # unix socket paths are short
    stack: list[Any] = []

    def start(**settings: Any) -> Agent:
        api_cm = scripted_api(directory)
        api = api_cm.__enter__()
        stack.append(api_cm)
        config = directory / "ZZZ-meshguard-cni-kubeconfig"
        config.write_bytes(render(kubeconfig(server=api.url, token="t", ca_pem=api.ca_pem)))
        prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                "ips": [{"address": "10.1.2.3/24"}]}  # fmt: skip
        entry = plugin_entry(kubeconfig=str(config), timeout_seconds=5,
                             trusted_keys=SIGNER.public_pem())  # fmt: skip
        conf = {**entry, "name": "k8s", "cniVersion": "1.0.0", "prevResult": prev}
        socket_path = directory / "cni.sock"
        agent_cm = serving(AgentSettings(socket_path=socket_path, conf_dir=directory,
                                         host_conf_dir=directory, **settings))  # fmt: skip
        agent_cm.__enter__()
        stack.append(agent_cm)
        return Agent(shim=shim, socket=socket_path, conf=conf, api=api)

    try:
        yield start
    finally:
        for context in reversed(stack):
            context.__exit__(None, None, None)
        shutil.rmtree(directory, ignore_errors=True)


def own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def calls_running() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "cni-call")


def wait_for_calls_to_end() -> None:
    deadline = time.monotonic() + 60
    while calls_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not calls_running()


def test_add_check_del_run_in_the_agent_on_one_kept_alive_connection(start_agent):
    agent: Agent = start_agent()
    pod, plain = admitted_pod("shop", workloads=2), plain_pod("plain")
    agent.api.script.serve(pod)
    agent.api.script.serve(plain)
    before = own_netns()
    with PodNamespace() as ns:
        ns.load_istio()
        status, answer = agent.call("ADD", pod, ns.path)
        assert status == 0, answer
        assert answer["ips"] == [{"address": "10.1.2.3/24"}]  # prevResult, unchanged
        installed = ns.own_rules()
        assert "-A OUTPUT -j MESHGUARD" in installed
        assert agent.call("CHECK", pod, ns.path) == (0, {})
        ns.run(["iptables-nft", "-D", "OUTPUT", "1"])
        status, answer = agent.call("CHECK", pod, ns.path)
        assert (status, answer["code"]) == (1, 102), answer
        assert agent.call("ADD", pod, ns.path)[0] == 0  # repaired
        assert ns.own_rules() == installed
        assert agent.call("DEL", pod, ns.path) == (0, {})
        assert ns.own_rules() == ""
    with PodNamespace() as ns:
        status, answer = agent.call("ADD", plain, ns.path)  # not injected: passed through
        assert status == 0 and answer["ips"] == [{"address": "10.1.2.3/24"}]
        assert ns.own_rules() == ""
    # the agent's own threads stayed in its namespace: only each call's thread moved
    assert own_netns() == before
    # every GET, ADD and CHECK alike, on one connection: no process, no handshake per call
    assert len(agent.api.script.requests) == 5
    assert len(set(agent.api.script.clients)) == 1


@pytest.mark.parametrize(
    ("signer", "reason"), [(None, "unsigned"), (generate(), "not trusted")],
    ids=["unsigned", "untrusted-key"],
)  # fmt: skip
def test_the_agent_installs_only_what_a_trusted_key_signed(start_agent, signer, reason):
    """The in-process path verifies the attestation as the one-process plugin does."""
    agent: Agent = start_agent()
    forged, signed = (
        admitted_pod("forged", workloads=1, signer=signer),
        admitted_pod("signed", workloads=1),
    )
    agent.api.script.serve(forged)
    agent.api.script.serve(signed)
    with PodNamespace() as ns:
        ns.load_istio()
        status, answer = agent.call("ADD", forged, ns.path)
        assert (status, answer["code"]) == (1, 103), answer
        assert "pod demo/forged" in answer["msg"] and reason in answer["msg"]
        assert ns.own_rules() == ""
        assert agent.call("ADD", signed, ns.path)[0] == 0
        assert ns.own_rules() != ""


def test_calls_for_different_pods_run_in_parallel_each_in_its_own_namespace(start_agent):
    agent: Agent = start_agent(max_calls=4)
    pods = [admitted_pod(f"pod-{n}", workloads=n) for n in (1, 2, 3, 4)]
    for pod in pods:
        agent.api.script.serve(pod)
    # Each GET waits until all four are in flight: calls run one after the other would
    # break the gate, and their GETs would be answered 503.
    agent.api.script.gate = threading.Barrier(len(pods), timeout=30)
    with (PodNamespace() as a, PodNamespace() as b, PodNamespace() as c,
          PodNamespace() as d):  # fmt: skip
        namespaces = [a, b, c, d]
        for ns in namespaces:
            ns.load_istio()
        with ThreadPoolExecutor(max_workers=len(pods)) as pool:
            answers = list(pool.map(lambda p, ns: agent.call("ADD", p, ns.path), pods, namespaces))
        assert [status for status, _ in answers] == [0] * len(pods), answers
        agent.api.script.gate = None
        # each namespace holds exactly its own pod's rules (CHECK compares with the ruleset)
        for pod, ns in zip(pods, namespaces, strict=True):
            assert agent.call("CHECK", pod, ns.path) == (0, {}), ns.own_rules()
        sizes = {len(ns.own_rules().splitlines()) for ns in namespaces}
        assert len(sizes) == len(pods)  # four different rulesets, none installed twice


def test_a_hanging_api_server_fails_the_call_in_time_and_nothing_is_installed(start_agent):
    agent: Agent = start_agent(call_timeout=0.5, max_calls=1)
    pod = admitted_pod("slow", workloads=1)
    agent.api.script.serve(pod)
    agent.api.script.delay = 2.0  # answers, but after the agent gave up on the call
    with PodNamespace() as ns, PodNamespace() as other:
        ns.load_istio()
        status, answer = agent.call("ADD", pod, ns.path)
        assert (status, answer["code"]) == (1, 5), answer
        assert "did not finish in 0.5 s" in answer["msg"]
        # the one slot is still held by the hanging call: the next call waits, then is told
        # to try again, without its GET ever being sent
        status, answer = agent.call("ADD", pod, other.path)
        assert (status, answer["code"]) == (1, 11), answer
        assert "all 1 call slots were busy" in answer["msg"]
        wait_for_calls_to_end()
        assert len(agent.api.script.requests) == 1
        # the GET returned after the runtime had its error: nothing was installed
        assert ns.own_rules() == ""
        agent.api.script.delay = 0
        assert agent.call("ADD", pod, ns.path)[0] == 0  # the agent serves on
        assert ns.own_rules() != ""


def test_an_idle_connection_the_server_closed_is_replaced(start_agent):
    agent: Agent = start_agent()
    pod = plain_pod("plain")
    agent.api.script.serve(pod)
    agent.api.script.drop_connections = True
    with PodNamespace() as ns:
        for _ in range(3):
            assert agent.call("ADD", pod, ns.path)[0] == 0
    assert len(agent.api.script.requests) == 3
    assert len(set(agent.api.script.clients)) == 3  # a new connection each time


def test_a_del_whose_namespace_is_gone_succeeds_without_entering_anything(start_agent):
    agent: Agent = start_agent()
    before = own_netns()
    status, answer = agent.call("DEL", plain_pod("gone"), "/var/run/netns/mg-no-such-ns")
    assert (status, answer) == (0, {})
    assert own_netns() == before
    status, answer = agent.call("ADD", plain_pod("gone"), "/var/run/netns/mg-no-such-ns")
    assert status == 1 and "cannot open /var/run/netns/mg-no-such-ns" in answer["msg"]


def test_a_stopping_agent_answers_the_calls_in_progress_first(shim: Path, tmp_path: Path):  # noqa: F811
    directory = Path(tempfile.mkdtemp(prefix="mgag-"))
    try:
        with scripted_api(tmp_path) as api, PodNamespace() as ns:
            ns.load_istio()
            pod = admitted_pod("shop", workloads=1)
            api.script.serve(pod)
            api.script.delay = 1.0
            config = directory / "kubeconfig"
            config.write_bytes(render(kubeconfig(server=api.url, token="t", ca_pem=api.ca_pem)))
            entry = plugin_entry(kubeconfig=str(config), trusted_keys=SIGNER.public_pem())
            conf = {**entry, "name": "k8s", "cniVersion": "1.0.0",
                    "prevResult": {"cniVersion": "1.0.0"}}  # fmt: skip
            agent = Agent(shim=shim, socket=directory / "cni.sock", conf=conf, api=api)
            settings = AgentSettings(socket_path=agent.socket, conf_dir=directory,
                                     host_conf_dir=directory)  # fmt: skip
            with ThreadPoolExecutor(max_workers=1) as pool:
                with serving(settings):
                    in_progress = pool.submit(agent.call, "ADD", pod, ns.path)
                    deadline = time.monotonic() + 60
                    while not api.script.clients and time.monotonic() < deadline:
                        time.sleep(0.01)  # until the call's GET reached the API server
                # stopped: the call in progress had finished before serving() returned (its
                # GET was still held then), and its answer went out
                assert ns.own_rules() != ""
                assert in_progress.result(timeout=60)[0] == 0
                status, answer = agent.call("ADD", pod, ns.path)  # no agent now: fail closed
                assert status == 1 and "cannot reach the node agent" in answer["msg"]
                assert agent.call("DEL", pod, ns.path) == (0, {})
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_shims_beyond_the_bound_are_told_to_try_again_at_once(start_agent):
    agent: Agent = start_agent(max_calls=1, call_timeout=30)  # 4 connections at most
    pod = plain_pod("plain")
    agent.api.script.serve(pod)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for connection in idle:
            connection.connect(str(agent.socket))  # connected, sending nothing
        with PodNamespace() as ns:
            status, answer = agent.call("ADD", pod, ns.path)
            assert (status, answer["code"]) == (1, 11), answer
            assert "4 calls waiting" in answer["msg"]
            assert agent.api.script.requests == []
            for connection in idle:
                connection.close()
            deadline = time.monotonic() + 60
            while (status := agent.call("ADD", pod, ns.path)[0]) and time.monotonic() < deadline:
                time.sleep(0.05)  # until the agent has seen the idle connections close
            assert status == 0
    finally:
        for connection in idle:
            connection.close()


def test_the_agent_watches_an_injected_pods_denials_until_its_del(start_agent, caplog):
    port = free_port()
    agent: Agent = start_agent(watch_denials=True, metrics_port=port)
    pod, plain = admitted_pod("shop", workloads=2), plain_pod("plain")  # c00: uid 3000, c01: 7001
    agent.api.script.serve(pod)
    agent.api.script.serve(plain)
    caplog.set_level(logging.INFO, logger="meshguard.cni.watch")
    with PodNamespace() as ns, PodNamespace() as other:
        ns.load_istio()
        assert agent.call("ADD", pod, ns.path)[0] == 0
        assert agent.call("ADD", plain, other.path)[0] == 0
        wait_for_calls_to_end()
        # the agent holds the pod's group (a second listener is refused), not the plain one's
        with pytest.raises(MeshguardFailure, match="Operation not permitted"):
            bind_group(ns.path, group=NFLOG_GROUP).close()
        bind_group(other.path, group=NFLOG_GROUP).close()
        # meshguard's own rules (installed by the ADD) report the denial to NFLOG
        subprocess.run(ns.argv(["setpriv", "--reuid=3000", "--regid=3000", "--clear-groups",
                                "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7001"]),
                       check=False, capture_output=True, timeout=30)  # fmt: skip
        deadline = time.monotonic() + 30
        while not denials(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        (denial, *_) = denials(caplog)
        assert {k: denial[k] for k in ("namespace", "pod", "source", "destination", "port",
                                       "protocol", "verdict", "uid")} == {
            "namespace": "demo", "pod": "shop", "source": "c00", "destination": "c01",
            "port": 7001, "protocol": "tcp", "verdict": "denied", "uid": 3000,
        }  # fmt: skip
        metrics = scrape(port)
        assert ('meshguard_loopback_denials_total{namespace="demo",pod="shop",source="c00",'
                'destination="c01",verdict="denied"} 1') in metrics  # fmt: skip
        assert agent.call("DEL", pod, ns.path) == (0, {})
        wait_for_calls_to_end()
        assert 'pod="shop"' not in scrape(port)
        released = False
        for _ in range(100):  # bounded: the watch's reader closes the socket within 0.5 s
            try:
                bind_group(ns.path, group=NFLOG_GROUP).close()
            except MeshguardFailure:
                time.sleep(0.05)
            else:
                released = True
                break
        assert released  # the DEL ended the watch


def denials(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.fields  # type: ignore[attr-defined]
        for record in caplog.records
        if getattr(record, "fields", {}).get("event") == "loopback-denial"
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())
