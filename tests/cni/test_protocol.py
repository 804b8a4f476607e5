"""meshguard-cni per the CNI spec, without a network namespace: VERSION, bad input, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PLUGIN = [sys.executable, "-m", "meshguard.cni"]


def run_plugin(env: dict[str, str], stdin: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(PLUGIN, input=stdin, capture_output=True, text=True, env=env,
                          timeout=60, check=False)  # fmt: skip
    return done.returncode, json.loads(done.stdout)


def test_version_lists_the_supported_versions():
    code, out = run_plugin({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert code == 0
    assert out == {"cniVersion": "1.0.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "stdin", "code", "msg"),
    [
        ({"CNI_COMMAND": "FOO"}, "{}", 4, "CNI_COMMAND is 'FOO'"),
        ({"CNI_COMMAND": "ADD"}, "not json", 6, "not JSON"),
        ({"CNI_COMMAND": "ADD"}, '{"cniVersion": "9.9.9", "name": "k8s", "type": "meshguard-cni"}',
         1, "cniVersion 9.9.9"),
        ({"CNI_COMMAND": "ADD"}, '{"cniVersion": "1.0.0", "name": "k8s", "type": "meshguard-cni",'
         ' "prevResult": {}}', 4, "CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS not set"),
        ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0",
          "CNI_NETNS": "/var/run/netns/x"},
         '{"cniVersion": "1.0.0", "name": "k8s", "type": "meshguard-cni"}', 7, "no prevResult"),
    ],
)  # fmt: skip
def test_bad_input_is_a_spec_error_object_and_exit_1(env, stdin, code, msg):
    status, out = run_plugin(env, stdin)
    assert status == 1
    assert out["code"] == code and msg in str(out["msg"])
    assert set(out) == {"cniVersion", "code", "msg", "details"}


def test_a_pod_that_is_not_kubernetes_passes_through_with_prev_result_unchanged():
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    conf = {"cniVersion": "1.0.0", "name": "k8s", "type": "meshguard-cni", "prevResult": prev}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/none", "CNI_ARGS": "IgnoreUnknown=1"}  # fmt: skip
    status, out = run_plugin(env, json.dumps(conf))
    assert status == 0 and out == prev


def test_an_unreachable_api_server_fails_the_add_closed(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    conf = {"cniVersion": "1.0.0", "name": "k8s", "type": "meshguard-cni", "prevResult": {},
            "kubernetes": {"server": "https://127.0.0.1:1", "tokenFile": str(token),
                           "caFile": "/etc/ssl/certs/ca-certificates.crt",
                           "timeoutSeconds": 2}}  # fmt: skip
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/none",
           "CNI_ARGS": "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=shop"}  # fmt: skip
    status, out = run_plugin(env, json.dumps(conf))
    assert status == 1 and out["code"] == 100
    assert "cannot read pod demo/shop from the API server" in str(out["msg"])
