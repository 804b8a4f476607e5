"""The pod network built as a runtime builds it, with meshguard chained by its own installer.

A node network namespace; ``meshguard cni install``'s logic chains meshguard-cni after
istio-cni in a conflist whose first plugin is Debian's real ``bridge`` (addresses from the
real ``host-local``); a runtime (:mod:`tests.support.cni_runtime`) runs the real
``loopback`` plugin, then the list per the CNI spec — bridge, istio-cni (Istio's golden
capture rules into the pod, as istio-cni's ``istio-iptables`` writes them), meshguard-cni
with the ``prevResult`` of both — against a scripted API server over real TLS that the
plugin reaches with the kubeconfig the installer wrote. Then the enforcement matrix, in the
namespace the plugins built, on each netfilter backend; CHECK, DEL; an API server that does
not answer in time fails the ADD.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshguard.cni.node import ApiCredentials, InstallSettings, NodeLayout, install_once, uninstall
from meshguard.errors import MeshguardFailure
from meshguard.inject.init_step import WithoutIstioInit
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.apiserver import ApiServer, scripted_api
from tests.support.cni_runtime import (
    SYSTEM_PLUGINS,
    CniFailure,
    CniRuntime,
    Pod,
    bridge_plugin,
    istio_cni_standin,
)
from tests.support.keys import SIGNER, trusted_keys_file
from tests.support.matrix import APP, CACHE, LOGS, PROXY, SERVERS, STRANGERS, check_matrix
from tests.support.matrix import example_pod as matrix_pod
from tests.support.netfilter import NETFILTERS, Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox
from tests.support.samples import as_cni_mode, drop_istio_init_step
from tests.support.shared import golden_payloads

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not (SYSTEM_PLUGINS / "bridge").exists(),
        reason="Debian's containernetworking-plugins (/usr/lib/cni) is not installed",
    ),
]
POD_UID = "6f1e0c1d-0000-4000-8000-000000000001"


class RuntimeNamespace(NetworkNamespace):
    """What a runtime creates before it calls CNI: an empty network namespace (no lo up, no
    interface; the plugins build the rest)."""

    def _setup_commands(self) -> list[list[str]]:
        return []

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"


@dataclass(frozen=True)
class Node:
    ns: RuntimeNamespace
    api: ApiServer

    @property
    def credentials(self) -> ApiCredentials:
        return ApiCredentials(server=self.api.url, token="node-token", ca_pem=self.api.ca_pem)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """The node's network namespace, the API server reachable in it at 127.0.0.1."""
    with RuntimeNamespace(name=f"mgnode-{uuid.uuid4().hex[:8]}") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        with scripted_api(tmp_path, netns_path=ns.path) as api:
            yield Node(ns=ns, api=api)


# --- the pod, the node's CNI configuration, the runtime ----------------------------------


def cni_mode_pod(netfilter: Netfilter) -> dict[str, Any]:
    """The matrix's example pod as Istio injects it in CNI mode (istio-validation instead of
    istio-init), then admitted by meshguard (meshguard-validation, the ruleset annotations)."""
    pod = as_cni_mode(pod_for(matrix_pod(), netfilter))
    pod["metadata"].update(uid=POD_UID, namespace="demo", name="shop")
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert "meshguard-validation" in names and "meshguard-init" not in names
    return pod


def no_init_step_pod() -> dict[str, Any]:
    """The matrix's example pod with Istio's ``sidecar.istio.io/interceptionMode: NONE`` (no
    istio-init, no capture), admitted under ``withoutIstioInit: node``."""
    pod = matrix_pod()
    pod["metadata"].update(uid=POD_UID, namespace="demo", name="shop")
    drop_istio_init_step(pod["metadata"], pod["spec"], why="sidecar.istio.io/interceptionMode=NONE")
    settings = InjectSettings(
        request_template=False, signer=SIGNER, without_istio_init=WithoutIstioInit.NODE
    )
    inject_pod(pod["metadata"], pod["spec"], settings=settings)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshguard-validation"]
    return pod


def capture_commands(netfilter: Netfilter) -> list[tuple[list[str], str]]:
    """What istio-cni runs in the pod: the matrix's Istio capture, in ``netfilter``."""
    if netfilter is Netfilter.NFTABLES:
        return [(["nft", "-f", "-"], matrix_capture_nft())]
    v4, _ = golden_payloads("ipnets.golden")
    _, v6 = golden_payloads("ipv6-outbound-ports.golden")
    return [([netfilter.restore(Family.IPV4), "--noflush"], p) for p in v4] + [
        ([netfilter.restore(Family.IPV6), "--noflush"], p) for p in v6
    ]


@dataclass
class Chain:
    runtime: CniRuntime
    layout: NodeLayout
    settings: InstallSettings
    pod_ns: RuntimeNamespace
    pod: Pod
    box: PodSandbox
    netfilter: Netfilter
    ipam_dir: Path

    def conflist(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            (self.layout.conf_dir / "10-k8s-pod-network.conflist").read_text()
        )
        return document

    def add(self) -> dict[str, Any]:
        loopback = {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}
        self.runtime.invoke("ADD", loopback, self.pod)
        return self.runtime.add(self.conflist(), self.pod)

    def own_rules(self) -> str:
        """meshguard's rules in the pod, in any backend."""
        found = []
        for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save",
                     "ip6tables-legacy-save"):  # fmt: skip
            found += [line for line in self.pod_ns.run([tool]).splitlines() if "MESHGUARD" in line]
        tables = self.pod_ns.run(["nft", "list", "tables"])
        found += [line for line in tables.splitlines() if line.strip() == "table inet meshguard"]
        return "\n".join(found)


@pytest.fixture
def make_chain(node: Node, tmp_path: Path) -> Iterator[Any]:
    made: list[Chain] = []

    def make(netfilter: Netfilter, *, timeout: float = 5.0, no_init_step: bool = False) -> Chain:
        pod = no_init_step_pod() if no_init_step else cni_mode_pod(netfilter)
        node.api.script.serve(pod)
        conf_dir = tmp_path / "net.d"  # the node's /etc/cni/net.d
        layout = NodeLayout(conf_dir=conf_dir, bin_dir=tmp_path / "bin", host_conf_dir=conf_dir)
        for directory in (layout.conf_dir, layout.bin_dir, tmp_path / "image"):
            directory.mkdir(exist_ok=True)
        # the network plugin's and istio-cni's configuration, as the node has it
        # (istio-cni captures nothing in a pod Istio gave no init step)
        capture = [] if no_init_step else capture_commands(netfilter)
        istio = {"type": "istio-cni", "capture": capture}
        bridge = bridge_plugin(bridge="mgbr0", data_dir=tmp_path / "ipam")
        network = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [bridge, istio]}
        (layout.conf_dir / "10-k8s-pod-network.conflist").write_text(json.dumps(network))
        istio_cni_standin(layout.bin_dir, python=sys.executable)
        # what the image ships as the node-side executable; here the plugin module itself
        shim = tmp_path / "image" / "meshguard-cni"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m meshguard.cni\n")
        shim.chmod(0o755)
        settings = InstallSettings(
            plugin_source=shim, timeout_seconds=timeout, trusted_keys=trusted_keys_file(tmp_path)
        )
        install_once(layout, settings, node.credentials)
        pod_ns = RuntimeNamespace(name=f"mgpod-{uuid.uuid4().hex[:8]}")
        pod_ns.__enter__()
        runtime = CniRuntime(node=node.ns.name, cni_path=(layout.bin_dir, SYSTEM_PLUGINS))
        sandbox_pod = Pod(container_id=uuid.uuid4().hex, netns=pod_ns.path, namespace="demo",
                          name="shop", uid=POD_UID)  # fmt: skip
        ruleset = Ruleset.from_json(pod["metadata"]["annotations"]["meshguard.io/ruleset"])
        box = PodSandbox(ns=pod_ns, ruleset=ruleset, ruleset_file=tmp_path / "unused",
                         netfilter=netfilter)  # fmt: skip
        chain = Chain(runtime=runtime, layout=layout, settings=settings, pod_ns=pod_ns,
                      pod=sandbox_pod, box=box, netfilter=netfilter,
                      ipam_dir=tmp_path / "ipam")  # fmt: skip
        made.append(chain)
        return chain

    yield make
    for chain in made:
        chain.pod_ns.close()


def addresses(chain: Chain) -> set[str]:
    shown = json.loads(chain.pod_ns.run(["ip", "-j", "addr", "show", "dev", "eth0"]))
    return {f"{a['local']}/{a['prefixlen']}" for a in shown[0]["addr_info"]
            if a.get("scope") == "global"}  # fmt: skip


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_the_attack_matrix_holds_on_the_pod_network_the_runtime_built(make_chain, netfilter):
    chain = make_chain(netfilter)
    conflist = chain.conflist()
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "istio-cni", "meshguard-cni"]
    result = chain.add()
    # meshguard-cni passed the bridge's result on: the pod's addresses, as host-local gave them
    assert {ip["address"] for ip in result["ips"]} == {"10.1.2.3/24", "fd00:10::3/64"}
    assert any(i.get("sandbox") == chain.pod.netns for i in result["interfaces"])
    assert addresses(chain) == {"10.1.2.3/24", "fd00:10::3/64"}
    for server in SERVERS:
        chain.box.serve(server)
    for server in (APP, LOGS, CACHE, PROXY):
        check_matrix(chain.box, server.name, server.uid, server.gid)
    for name, (uid, gid, groups) in STRANGERS.items():
        check_matrix(chain.box, name, uid, gid, groups)
    # Istio's outbound capture works as before, for a container and a stranger alike
    for uid in (APP.uid, 4242):
        (got,) = chain.box.probe(uid=uid, gid=uid, targets=[{"host": "10.0.0.5", "port": 80}])
        assert (got["result"], got.get("server"), got.get("port")) == ("allow", "proxy", 15001)


@pytest.mark.parametrize("chained", [True, False], ids=["meshguard-cni", "unchained"])
def test_a_pod_istio_gave_no_init_step_is_protected_from_the_node(make_chain, node, chained):
    """withoutIstioInit node: no capture, no capability in the pod; meshguard-cni installs
    the rules, and meshguard-validation (as the pod runs it) finds them, or the pod would not
    start. Unchained, the same probes show what the pod would be without them."""
    chain = make_chain(Netfilter.IPTABLES_NFT, no_init_step=True)
    if not chained:
        uninstall(chain.layout)
    chain.add()
    assert (chain.own_rules() != "") is chained
    for server in (APP, PROXY):
        chain.box.serve(server)
    flows = [{"host": "127.0.0.1", "port": 8080}, {"host": "127.0.0.1", "port": 15000}]
    stranger = chain.box.probe(uid=4242, gid=4242, targets=flows)
    app = chain.box.probe(uid=APP.uid, gid=APP.gid, targets=flows)
    refused = "deny" if chained else "allow"
    assert [got["result"] for got in stranger] == [refused, refused]
    assert [got["result"] for got in app] == ["allow", refused]  # Envoy's admin port
    pod = node.api.script.served()[0]
    (validation,) = pod["spec"]["initContainers"]
    uid = validation["securityContext"]["runAsUser"]
    # meshguard's CLI, loaded first (a checkout may be private to root), then run as the uid
    code = (
        "import os, sys, meshguard.cli, meshguard.cli.cni;"
        f" os.setgroups([]); os.setgid({uid}); os.setuid({uid});"
        f" sys.exit(meshguard.cli.main({validation['args']!r}))"
    )
    if chained:
        chain.pod_ns.run([sys.executable, "-c", code])
    else:
        with pytest.raises(MeshguardFailure, match="rules"):
            chain.pod_ns.run([sys.executable, "-c", code])


def test_without_meshguards_entry_the_matrix_fails(make_chain, node):
    """The same chain with meshguard-cni unchained: the probes see the difference (and the
    pod's meshguard-validation would keep its app from starting)."""
    chain = make_chain(Netfilter.IPTABLES_NFT)
    uninstall(chain.layout)
    assert [p["type"] for p in chain.conflist()["plugins"]] == ["bridge", "istio-cni"]
    chain.add()
    chain.box.serve(APP)
    (got,) = chain.box.probe(uid=4242, gid=4242, targets=[{"host": "127.0.0.1", "port": 8080}])
    assert got["result"] == "allow"  # a stranger reaches the app: the matrix would fail
    with pytest.raises(AssertionError, match="stranger-uid -> "):
        check_matrix(chain.box, "stranger-uid", 4242, 4242)


@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_check_reports_removed_rules_and_del_cleans_up(make_chain, netfilter):
    chain = make_chain(netfilter)
    result = chain.add()
    chain.runtime.check(chain.conflist(), chain.pod, result)  # all in place
    if netfilter is Netfilter.NFTABLES:
        chain.pod_ns.run(["nft", "delete", "table", "inet", "meshguard"])
    else:
        chain.pod_ns.run([f"iptables-{netfilter.value.split('-')[1]}", "-D", "OUTPUT", "1"])
    with pytest.raises(CniFailure) as failed:
        chain.runtime.check(chain.conflist(), chain.pod, result)
    assert failed.value.plugin == "meshguard-cni" and failed.value.error["code"] == 102
    assert "not as admitted" in failed.value.error["msg"]
    chain.runtime.delete(chain.conflist(), chain.pod, result)
    assert chain.own_rules() == ""
    assert "eth0" not in chain.pod_ns.run(["ip", "link"])  # the bridge's veth is gone
    assert not [p for p in (chain.ipam_dir / "k8s-pod-network").iterdir()
                if p.name.startswith(("10.", "fd00"))]  # fmt: skip  # addresses released
    chain.runtime.delete(chain.conflist(), chain.pod, result)  # DEL twice: still success


def test_del_cleans_up_meshguard_rules_in_each_backend(make_chain):
    """DEL has no ruleset (no API call): it finds meshguard's rules wherever they are."""
    for netfilter in NETFILTERS:
        chain = make_chain(netfilter)
        result = chain.add()
        assert chain.own_rules() != ""
        chain.runtime.invoke("DEL", {**chain.conflist()["plugins"][2], "name": "k8s-pod-network",
                                     "cniVersion": "1.0.0", "prevResult": result},
                             chain.pod)  # fmt: skip
        assert chain.own_rules() == "", netfilter
        chain.runtime.delete(chain.conflist(), chain.pod, result)
        chain.pod_ns.close()


def test_an_api_server_that_does_not_answer_in_time_fails_the_add(make_chain, node):
    chain = make_chain(Netfilter.IPTABLES_NFT, timeout=1.0)
    node.api.script.delay = 3.0
    with pytest.raises(CniFailure) as failed:
        chain.add()
    error = failed.value.error
    assert failed.value.plugin == "meshguard-cni"
    assert error["code"] == 100
    assert error["msg"].startswith(
        "cannot read pod demo/shop from the API server https://127.0.0.1:"
    )
    assert "timed out" in error["msg"]
    # the runtime tears the sandbox down: nothing of meshguard's was installed
    assert chain.own_rules() == ""
