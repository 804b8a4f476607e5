"""A container runtime's CNI side, as the CNI spec (1.x) describes it, for tests.

:class:`CniRuntime` executes a network configuration list against a network namespace the
way containerd/CRI-O do: every plugin is an executable found by its ``type`` on
``CNI_PATH``, run with the ``CNI_*`` variables and its configuration on stdin — the list's
``name`` and ``cniVersion`` added, and from the second plugin on the previous plugin's result
as ``prevResult``; ADD runs the list in order and the last result is the network's; CHECK
runs it in order with the cached ADD result as ``prevResult``; DEL runs it in reverse with
the same. A plugin's non-zero exit stops the list (:class:`CniFailure`, with the spec's
error object: what the kubelet would show in the pod's events). The plugins run inside the
``node`` network namespace (the node's network: the bridge lives there).

The stand-in for istio-cni (:func:`istio_cni_standin`) does what istio-cni does to a pod on
ADD — Istio's capture rules into ``CNI_NETNS`` (the commands are given in its own
configuration entry) — and passes ``prevResult`` on.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Debian's containernetworking-plugins.
SYSTEM_PLUGINS = Path("/usr/lib/cni")

ISTIO_CNI_STANDIN = """#!{python}
import json, os, subprocess, sys
conf = json.load(sys.stdin)
if os.environ["CNI_COMMAND"] == "ADD":
    for argv, payload in conf["capture"]:
        subprocess.run(["nsenter", "--net=" + os.environ["CNI_NETNS"], *argv], input=payload,
                       text=True, check=True, capture_output=True)
if os.environ["CNI_COMMAND"] in ("ADD",):
    json.dump({{**conf["prevResult"], "cniVersion": conf["cniVersion"]}}, sys.stdout)
"""


class CniFailure(Exception):
    def __init__(self, plugin: str, status: int, error: Mapping[str, Any] | None, stderr: str):
        super().__init__(f"{plugin} exited {status}: {error} {stderr[-800:]}")
        self.plugin = plugin
        self.error = dict(error or {})
        self.stderr = stderr


@dataclass(frozen=True, kw_only=True)
class Pod:
    """The sandbox the runtime sets up: its container id, namespace path and CNI_ARGS."""

    container_id: str
    netns: str
    namespace: str
    name: str
    uid: str
    ifname: str = "eth0"

    @property
    def cni_args(self) -> str:
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={self.container_id};K8S_POD_UID={self.uid}"
        )


@dataclass(frozen=True, kw_only=True)
class CniRuntime:
    node: str  # the network namespace the plugins run in
    cni_path: Sequence[Path]
    environ: Mapping[str, str] = field(default_factory=dict)

    def add(self, conflist: Mapping[str, Any], pod: Pod) -> dict[str, Any]:
        result: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            result = self.invoke("ADD", _config(conflist, plugin, result), pod)
            assert result is not None, f"{plugin['type']}: ADD printed no result"
        assert result is not None
        return result

    def check(self, conflist: Mapping[str, Any], pod: Pod, cached: Mapping[str, Any]) -> None:
        for plugin in conflist["plugins"]:
            self.invoke("CHECK", _config(conflist, plugin, cached), pod)

    def delete(self, conflist: Mapping[str, Any], pod: Pod, cached: Mapping[str, Any]) -> None:
        for plugin in reversed(conflist["plugins"]):
            self.invoke("DEL", _config(conflist, plugin, cached), pod)

    def invoke(self, command: str, config: Mapping[str, Any], pod: Pod) -> dict[str, Any] | None:
        """One plugin, one command; its result (None when it prints nothing)."""
        executable = self.find(config["type"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            **self.environ,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.netns,
            "CNI_IFNAME": pod.ifname,
            "CNI_ARGS": pod.cni_args,
            "CNI_PATH": os.pathsep.join(str(p) for p in self.cni_path),
        }
        done = subprocess.run(
            ["ip", "netns", "exec", self.node, str(executable)], input=json.dumps(config),
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        output = json.loads(done.stdout) if done.stdout.strip() else None
        if done.returncode != 0:
            raise CniFailure(config["type"], done.returncode, output, done.stderr)
        return output

    def find(self, plugin_type: str) -> Path:
        for directory in self.cni_path:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"no CNI plugin {plugin_type!r} on {self.cni_path}")


def _config(
    conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev: Mapping[str, Any] | None
) -> dict[str, Any]:
    config = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    if prev is not None:
        config["prevResult"] = dict(prev)
    return config


def istio_cni_standin(directory: Path, *, python: str) -> Path:
    """An executable ``istio-cni`` in ``directory`` (see the module docstring)."""
    path = directory / "istio-cni"
    path.write_text(ISTIO_CNI_STANDIN.format(python=python))
    path.chmod(0o755)
    return path


def bridge_plugin(*, bridge: str, data_dir: Path) -> dict[str, Any]:
    """The pod network: a bridge on the node, one veth per pod, addresses from host-local —
    the pod gets 10.1.2.3 and fd00:10::3 (the addresses the enforcement matrix probes)."""
    return {
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "dataDir": str(data_dir),
            "ranges": [
                [{"subnet": "10.1.2.0/24", "rangeStart": "10.1.2.3", "rangeEnd": "10.1.2.3",
                  "gateway": "10.1.2.1"}],
                [{"subnet": "fd00:10::/64", "rangeStart": "fd00:10::3", "rangeEnd": "fd00:10::3",
                  "gateway": "fd00:10::1"}],
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        },
    }  # fmt: skip
