"""The node-side executable: the static shim (``cni-shim/meshguard-cni.c``, compiled with
``gcc -static``) that the agent installs, forwarding each CNI call to the agent — the real
``meshguard cni install --agent-socket`` process, running in the node's network namespace
as the DaemonSet runs it — which runs the plugin with the pod's namespace received as a
file descriptor. The runtime builds the pod network with Debian's plugins as in
test_chain_netns; no Python runs as the runtime's child."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard.cni.agent import Request, agent_view, parse_request
from meshguard.cni.node import InstallSettings, NodeLayout
from meshguard.errors import MalformedInputError
from meshguard.rules.ruleset import Ruleset
from tests.cni.test_chain_netns import (  # noqa: F401 - the node fixture
    POD_UID,
    Chain,
    Node,
    RuntimeNamespace,
    capture_commands,
    cni_mode_pod,
    node,
)
from tests.support.cni_runtime import (
    SYSTEM_PLUGINS,
    CniFailure,
    CniRuntime,
    Pod,
    bridge_plugin,
    istio_cni_standin,
)
from tests.support.keys import trusted_keys_file
from tests.support.matrix import APP, SERVERS, STRANGERS, check_matrix
from tests.support.netfilter import Netfilter
from tests.support.podns import PodSandbox

ROOT = Path(__file__).resolve().parents[2]
SHIM_SOURCE = ROOT / "cni-shim" / "meshguard-cni.c"


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the shim cannot be built")
    binary = tmp_path_factory.mktemp("shim") / "meshguard-cni"
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
                    str(SHIM_SOURCE)], check=True, capture_output=True)  # fmt: skip
    return binary


# --- the request format (pure) -------------------------------------------------------------


def test_a_request_parses_into_variables_and_stdin():
    body = b"CNI_COMMAND=ADD\0CNI_ARGS=a=b;c=d\0\0" + (5).to_bytes(4, "big") + b"hello"
    assert parse_request(body) == Request(
        variables={"CNI_COMMAND": "ADD", "CNI_ARGS": "a=b;c=d"}, stdin=b"hello"
    )
    assert parse_request(b"\0" + (0).to_bytes(4, "big")) == Request(variables={}, stdin=b"")


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"LD_PRELOAD=/x\0\0" + bytes(4), "unexpected variable 'LD_PRELOAD'"),
     (b"CNI_COMMAND=ADD\0", "not terminated"),
     (b"\0" + (9).to_bytes(4, "big") + b"short", "5 bytes, 9 announced"),
     (b"\0\0", "truncated")],
)  # fmt: skip
def test_a_malformed_request_is_refused(body, message):
    with pytest.raises(MalformedInputError, match=message):
        parse_request(body)


def test_the_kubeconfig_path_is_mapped_to_the_agents_mount():
    kubeconfig = "/etc/cni/net.d/ZZZ-meshguard-cni-kubeconfig"
    conf = json.dumps({"type": "meshguard-cni", "kubernetes": {"kubeconfig": kubeconfig}})
    mapped = json.loads(agent_view(conf.encode(), host_conf_dir=Path("/etc/cni/net.d"),
                                   conf_dir=Path("/host/etc/cni/net.d")))  # fmt: skip
    assert mapped["kubernetes"]["kubeconfig"] == "/host/etc/cni/net.d/ZZZ-meshguard-cni-kubeconfig"
    elsewhere = b'{"kubernetes": {"kubeconfig": "/root/.kube/config"}}'
    assert agent_view(elsewhere, host_conf_dir=Path("/etc/cni/net.d"), conf_dir=Path("/h")) == (
        elsewhere
    )
    assert agent_view(b"not json", host_conf_dir=Path("/e"), conf_dir=Path("/h")) == b"not json"


# --- the shim, the agent, the runtime --------------------------------------------------------


@pytest.fixture
def shim_chain(
    node: Node,  # noqa: F811 - the imported fixture
    shim: Path,
    tmp_path: Path,
) -> Iterator[dict[str, Any]]:
    if not (SYSTEM_PLUGINS / "bridge").exists():
        pytest.skip("Debian's containernetworking-plugins (/usr/lib/cni) is not installed")
    socket_dir = Path(tempfile.mkdtemp(prefix="mgsock-"))  # unix socket paths are short
    socket_path = socket_dir / "cni.sock"
    pod = cni_mode_pod(Netfilter.IPTABLES_NFT)
    node.api.script.serve(pod)
    conf_dir, bin_dir, account = tmp_path / "net.d", tmp_path / "bin", tmp_path / "sa"
    for directory in (conf_dir, bin_dir, account):
        directory.mkdir()
    (account / "token").write_text("node-token")
    (account / "ca.crt").write_text(node.api.ca_pem)
    istio = {"type": "istio-cni", "capture": capture_commands(Netfilter.IPTABLES_NFT)}
    bridge = bridge_plugin(bridge="mgbr0", data_dir=tmp_path / "ipam")
    network = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [bridge, istio]}
    (conf_dir / "10-k8s-pod-network.conflist").write_text(json.dumps(network))
    istio_cni_standin(bin_dir, python=sys.executable)
    port = node.api.url.rsplit(":", 1)[1]
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    agent = subprocess.Popen(
        node.ns.argv([sys.executable, "-m", "meshguard", "cni", "install",
                      f"--cni-conf-dir={conf_dir}", f"--cni-bin-dir={bin_dir}",
                      f"--host-cni-conf-dir={conf_dir}", f"--plugin-binary={shim}",
                      f"--service-account-dir={account}", f"--agent-socket={socket_path}",
                      f"--ready-file={tmp_path / 'ready'}", "--interval=0.2",
                      f"--trusted-keys={trusted_keys_file(tmp_path)}"]),
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ((tmp_path / "ready").exists() and socket_path.exists()):
        assert agent.poll() is None and time.monotonic() < deadline, agent.stderr
        time.sleep(0.05)
    pod_ns = RuntimeNamespace(name=f"mgpod-{uuid.uuid4().hex[:8]}")
    pod_ns.__enter__()
    runtime = CniRuntime(node=node.ns.name, cni_path=(bin_dir, SYSTEM_PLUGINS),
                         environ={"MESHGUARD_CNI_SOCKET": str(socket_path)})  # fmt: skip
    sandbox_pod = Pod(container_id=uuid.uuid4().hex, netns=pod_ns.path, namespace="demo",
                      name="shop", uid=POD_UID)  # fmt: skip
    ruleset = Ruleset.from_json(pod["metadata"]["annotations"]["meshguard.io/ruleset"])
    box = PodSandbox(ns=pod_ns, ruleset=ruleset, ruleset_file=tmp_path / "unused")
    layout = NodeLayout(conf_dir=conf_dir, bin_dir=bin_dir)
    chain = Chain(runtime=runtime, layout=layout, settings=InstallSettings(plugin_source=shim),
                  pod_ns=pod_ns, pod=sandbox_pod, box=box, netfilter=Netfilter.IPTABLES_NFT,
                  ipam_dir=tmp_path / "ipam")  # fmt: skip
    try:
        yield {"chain": chain, "agent": agent, "socket": socket_path}
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
        pod_ns.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.mark.root
def test_the_shim_runs_the_plugin_in_the_agent_and_the_matrix_holds(shim_chain):
    chain: Chain = shim_chain["chain"]
    conflist = chain.conflist()
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "istio-cni", "meshguard-cni"]
    assert (chain.layout.bin_dir / "meshguard-cni").read_bytes()[:4] == b"\x7fELF"
    result = chain.add()
    assert {ip["address"] for ip in result["ips"]} == {"10.1.2.3/24", "fd00:10::3/64"}
    for server in SERVERS:
        chain.box.serve(server)
    check_matrix(chain.box, APP.name, APP.uid, APP.gid)
    uid, gid, groups = STRANGERS["stranger-uid"]
    check_matrix(chain.box, "stranger-uid", uid, gid, groups)
    chain.runtime.check(conflist, chain.pod, result)
    chain.pod_ns.run(["iptables-nft", "-D", "OUTPUT", "1"])
    with pytest.raises(CniFailure) as failed:
        chain.runtime.check(conflist, chain.pod, result)
    assert failed.value.error["code"] == 102
    chain.runtime.delete(conflist, chain.pod, result)
    assert chain.own_rules() == ""


@pytest.mark.root
def test_without_the_agent_the_shim_fails_add_closed_and_lets_del_pass(shim_chain):
    chain: Chain = shim_chain["chain"]
    agent: subprocess.Popen[str] = shim_chain["agent"]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    # the agent removed its entry on the way out: a pod started now gets no meshguard rules
    # from the node, and its meshguard-validation keeps its app from starting
    assert "meshguard-cni" not in [p["type"] for p in chain.conflist()["plugins"]]
    entry = {"type": "meshguard-cni", "name": "k8s-pod-network", "cniVersion": "1.0.0",
             "prevResult": {"cniVersion": "1.0.0"}}  # fmt: skip
    shim_path = chain.layout.bin_dir / "meshguard-cni"
    assert not shim_path.exists()  # uninstalled too; run the built one as a leftover would be
    runtime = CniRuntime(node=chain.runtime.node, cni_path=(shim_chain_binary(shim_chain),),
                         environ=chain.runtime.environ)  # fmt: skip
    with pytest.raises(CniFailure) as failed:
        runtime.invoke("ADD", entry, chain.pod)
    assert failed.value.error["code"] == 5
    assert f"cannot reach the node agent at {shim_chain['socket']}" in failed.value.error["msg"]
    assert runtime.invoke("DEL", entry, chain.pod) is None  # a pod stays deletable


def shim_chain_binary(shim_chain: dict[str, Any]) -> Path:
    chain: Chain = shim_chain["chain"]
    return chain.settings.plugin_source.parent
