"""The node agent on real files: ``meshguard cni install`` places the executable, the
kubeconfig and the conflist entry, keeps them repaired while it runs, removes them on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard.cni.install import KUBECONFIG_NAME, IstioCniMissing
from meshguard.cni.kube import read_kubeconfig
from meshguard.cni.node import ApiCredentials, InstallSettings, NodeLayout, install_once, uninstall
from meshguard.cni.protocol import PLUGIN_TYPE, CniError
from meshguard.errors import MalformedInputError
from tests.support.keys import trusted_keys_file

CALICO = {"type": "calico", "ipam": {"type": "calico-ipam"}, "log_level": "info"}
PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
ISTIO = {
    "type": "istio-cni",
    "kubernetes": {"kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig"},
}
CREDENTIALS = ApiCredentials(server="https://10.96.0.1:443", token="t0k3n", ca_pem="-----CA-----\n")


@pytest.fixture
def node(tmp_path: Path) -> NodeLayout:
    layout = NodeLayout(conf_dir=tmp_path / "net.d", bin_dir=tmp_path / "bin")
    layout.conf_dir.mkdir()
    layout.bin_dir.mkdir()
    return layout


@pytest.fixture
def settings(tmp_path: Path) -> InstallSettings:
    shim = tmp_path / "image" / "meshguard-cni"
    shim.parent.mkdir()
    shim.write_bytes(b"\x7fELF the plugin executable")
    return InstallSettings(plugin_source=shim, exclude_namespaces=("kube-system",))


def write_conf(node: NodeLayout, name: str, document: dict[str, Any], mode: int = 0o644) -> Path:
    path = node.conf_dir / name
    path.write_text(json.dumps(document))
    path.chmod(mode)
    return path


def types(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_text())["plugins"]]


def istio_conflist(*plugins: dict[str, Any]) -> dict[str, Any]:
    return {"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": list(plugins)}


def test_install_chains_after_istio_cni_with_the_files_in_place(node, settings):
    conflist = write_conf(node, "10-calico.conflist", istio_conflist(CALICO, PORTMAP, ISTIO), 0o640)
    write_conf(node, "20-other.conf", {"type": "bridge", "name": "other"})
    changed = install_once(node, settings, CREDENTIALS)
    assert set(changed) == {str(node.plugin), str(node.kubeconfig), str(conflist)}
    assert types(conflist) == ["calico", "portmap", "istio-cni", PLUGIN_TYPE]
    plugins = json.loads(conflist.read_text())["plugins"]
    assert plugins[:3] == [CALICO, PORTMAP, ISTIO]
    assert plugins[3]["kubernetes"] == {"kubeconfig": f"/etc/cni/net.d/{KUBECONFIG_NAME}",
                                        "timeoutSeconds": 5.0,
                                        "excludeNamespaces": ["kube-system"]}  # fmt: skip
    assert (conflist.stat().st_mode & 0o777) == 0o640  # the file's mode is kept
    assert node.plugin.read_bytes() == settings.plugin_source.read_bytes()
    assert node.plugin.stat().st_mode & 0o777 == 0o755
    assert node.kubeconfig.stat().st_mode & 0o777 == 0o600  # it holds a token
    assert json.loads((node.conf_dir / "20-other.conf").read_text())["type"] == "bridge"
    assert sorted(p.name for p in node.conf_dir.iterdir()) == [
        "10-calico.conflist", "20-other.conf", KUBECONFIG_NAME,
    ]  # fmt: skip  # no temporary file left behind


def test_install_is_idempotent_and_does_not_rewrite(node, settings):
    conflist = write_conf(node, "10-calico.conflist", istio_conflist(CALICO, ISTIO))
    install_once(node, settings, CREDENTIALS)
    inodes = {p: p.stat().st_ino for p in (conflist, node.plugin, node.kubeconfig)}
    assert install_once(node, settings, CREDENTIALS) == []
    assert {p: p.stat().st_ino for p in inodes} == inodes


def test_the_plugin_reads_the_kubeconfig_the_agent_wrote(node, settings):
    write_conf(node, "10-calico.conflist", istio_conflist(CALICO, ISTIO))
    install_once(node, settings, CREDENTIALS)
    access = read_kubeconfig(node.kubeconfig, timeout=3.0)
    assert (access.server, access.token, access.ca_pem) == ("https://10.96.0.1:443", "t0k3n",
                                                            "-----CA-----\n")  # fmt: skip


@pytest.mark.parametrize(
    "damage",
    [lambda d: {**d, "plugins": [p for p in d["plugins"] if p["type"] != PLUGIN_TYPE]},
     # Istio's install-cni restarting: its entry taken out and appended at the end.
     lambda d: {**d, "plugins": [p for p in d["plugins"] if p["type"] != "istio-cni"] + [ISTIO]}],
    ids=["entry-removed", "istio-re-appended"],
)  # fmt: skip
def test_install_repairs_a_removed_or_moved_entry(node, settings, damage):
    conflist = write_conf(node, "10-calico.conflist", istio_conflist(CALICO, ISTIO))
    install_once(node, settings, CREDENTIALS)
    conflist.write_text(json.dumps(damage(json.loads(conflist.read_text()))))
    assert types(conflist) != ["calico", "istio-cni", PLUGIN_TYPE]
    assert install_once(node, settings, CREDENTIALS) == [str(conflist)]
    assert types(conflist) == ["calico", "istio-cni", PLUGIN_TYPE]


def test_a_rotated_token_or_new_binary_is_rewritten(node, settings):
    write_conf(node, "10-calico.conflist", istio_conflist(CALICO, ISTIO))
    install_once(node, settings, CREDENTIALS)
    rotated = ApiCredentials(server=CREDENTIALS.server, token="new", ca_pem=CREDENTIALS.ca_pem)
    settings.plugin_source.write_bytes(b"\x7fELF v2")
    assert install_once(node, settings, rotated) == [str(node.plugin), str(node.kubeconfig)]
    assert read_kubeconfig(node.kubeconfig, timeout=1).token == "new"
    assert node.plugin.read_bytes() == b"\x7fELF v2"


def test_without_istio_cni_the_files_are_placed_but_nothing_is_chained(node, settings):
    conflist = write_conf(node, "10-calico.conflist", istio_conflist(CALICO, PORTMAP))
    before = conflist.read_bytes()
    with pytest.raises(IstioCniMissing, match="waiting for istio-cni"):
        install_once(node, settings, CREDENTIALS)
    assert conflist.read_bytes() == before
    with pytest.raises(IstioCniMissing, match="no CNI configuration"):
        install_once(NodeLayout(conf_dir=node.bin_dir, bin_dir=node.bin_dir), settings, CREDENTIALS)


def test_a_conf_file_becomes_a_conflist(node, settings):
    flannel = {"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel", "delegate": {"x": 1}}
    conf = write_conf(node, "10-flannel.conf", flannel)
    after_flannel = InstallSettings(plugin_source=settings.plugin_source, chain_after="flannel")
    install_once(node, after_flannel, CREDENTIALS)
    assert not conf.exists()
    conflist = node.conf_dir / "10-flannel.conflist"
    document = json.loads(conflist.read_text())
    assert document["name"] == "cbr0" and document["plugins"][0]["delegate"] == {"x": 1}
    assert types(conflist) == ["flannel", PLUGIN_TYPE]


def test_a_malformed_configuration_is_refused_and_left_alone(node, settings):
    broken = node.conf_dir / "10-calico.conflist"
    broken.write_text('{"plugins": ')
    with pytest.raises(MalformedInputError, match=r"10-calico\.conflist is not JSON"):
        install_once(node, settings, CREDENTIALS)
    assert broken.read_text() == '{"plugins": '


def test_uninstall_removes_the_entry_then_the_files_and_keeps_the_rest(node, settings):
    conflist = write_conf(node, "10-calico.conflist", istio_conflist(CALICO, PORTMAP, ISTIO))
    install_once(node, settings, CREDENTIALS)
    uninstall(node)
    assert types(conflist) == ["calico", "portmap", "istio-cni"]
    assert json.loads(conflist.read_text())["plugins"] == [CALICO, PORTMAP, ISTIO]
    assert not node.plugin.exists() and not node.kubeconfig.exists()
    assert uninstall(node) == []  # idempotent


def test_a_kubeconfig_without_a_token_fails_the_plugin_clearly(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({"clusters": [], "contexts": []}))
    with pytest.raises(CniError, match="expected the current context"):
        read_kubeconfig(path, timeout=1)


# --- the agent as the DaemonSet runs it ------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def agent(
    node: NodeLayout, settings: InstallSettings, tmp_path: Path
) -> Iterator[subprocess.Popen[str]]:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1")
    (account / "ca.crt").write_text("-----CA-----\n")
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    process = subprocess.Popen(
        [sys.executable, "-m", "meshguard", "cni", "install", "--cni-conf-dir", str(node.conf_dir),
         "--cni-bin-dir", str(node.bin_dir), "--plugin-binary", str(settings.plugin_source),
         "--service-account-dir", str(account), "--interval", "0.1",
         "--ready-file", str(tmp_path / "ready"),
         "--trusted-keys", str(trusted_keys_file(tmp_path))],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_the_agent_waits_for_istio_cni_repairs_rotates_and_uninstalls_on_sigterm(
    agent, node, tmp_path
):
    ready = tmp_path / "ready"
    wait_for(node.kubeconfig.exists, "the kubeconfig")
    assert not ready.exists()  # istio-cni is not chained yet: not ready
    conflist = write_conf(node, "10-calico.conflist", istio_conflist(CALICO))
    time.sleep(0.3)
    assert types(conflist) == ["calico"] and not ready.exists()
    conflist.write_text(json.dumps(istio_conflist(CALICO, ISTIO)))
    wait_for(lambda: types(conflist) == ["calico", "istio-cni", PLUGIN_TYPE], "chaining")
    wait_for(ready.exists, "readiness")
    conflist.write_text(json.dumps(istio_conflist(CALICO, ISTIO)))  # someone drops our entry
    wait_for(lambda: types(conflist) == ["calico", "istio-cni", PLUGIN_TYPE], "the repair")
    (tmp_path / "serviceaccount" / "token").write_text("token-2")
    wait_for(lambda: read_kubeconfig(node.kubeconfig, timeout=1).token == "token-2", "rotation")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    assert types(conflist) == ["calico", "istio-cni"]
    assert not node.plugin.exists() and not node.kubeconfig.exists() and not ready.exists()
    assert "waiting for istio-cni" in agent.stderr.read()
