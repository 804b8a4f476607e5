"""meshguard-cni run per the CNI spec against a real network namespace and a scripted API
server over real TLS: ADD installs, meshguard-validation (non-root) passes only with the
rules, CHECK reports a removed rule, DEL cleans up (also when the namespace is gone), an
unreadable pod is not started."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

from meshguard.inject.transform import InjectSettings, inject_pod
from tests.support.keys import SIGNER
from tests.support.samples import istio_pod
from tests.support.tls import CertificateAuthority

pytestmark = pytest.mark.root
PLUGIN = [sys.executable, "-m", "meshguard.cni"]


class _Api(http.server.BaseHTTPRequestHandler):
    pods: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.pods.get(self.path, (404, b'{"kind":"Status","message":"not found"}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = CertificateAuthority.create()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.issue(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text("token")
    yield {"server": f"https://127.0.0.1:{server.server_address[1]}", "tokenFile": str(token),
           "caFile": str(ca.write_ca(tmp_path / "ca.crt")), "timeoutSeconds": 2}  # fmt: skip
    server.shutdown()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mgcni-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def injected_pod() -> dict[str, Any]:
    pod = istio_pod(cni=True)
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    pod["metadata"]["uid"] = "uid-1"
    return pod


def plugin(
    command: str, netns: str, api: dict[str, Any], *, trusted: str | None = None
) -> tuple[int, dict[str, Any] | None]:
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshguard-cni",
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []},
            "kubernetes": api, "trustedKeys": trusted or SIGNER.public_pem()}  # fmt: skip
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
           "CNI_NETNS": f"/var/run/netns/{netns}",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=shop;"
                       "K8S_POD_UID=uid-1"}  # fmt: skip
    done = subprocess.run(PLUGIN, input=json.dumps(conf), capture_output=True, text=True,
                          env=env, timeout=120, check=False)  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None


#: meshguard cni validate as a given uid (imports first, then drops: any checkout location).
VALIDATE_AS = Path(__file__).resolve().parents[1] / "support" / "validate_as.py"


def validation(netns: str, uid: int) -> int:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(VALIDATE_AS), str(uid)],
        capture_output=True, timeout=60, check=False, cwd="/",
    ).returncode  # fmt: skip


def serve(pod: dict[str, Any] | None, status: int = 200, body: bytes | None = None) -> None:
    _Api.pods = {"/api/v1/namespaces/demo/pods/shop": (status, body or json.dumps(pod).encode())}


def test_add_installs_validation_passes_check_detects_removal_del_cleans(netns, api):
    pod = injected_pod()
    serve(pod)
    uid = next(c for c in pod["spec"]["initContainers"] if c["name"] == "meshguard-validation")[
        "securityContext"]["runAsUser"]  # fmt: skip
    assert validation(netns, uid) == 1  # no rules yet: the app would never start
    code, out = plugin("ADD", netns, api)
    assert code == 0, out
    assert out == {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    assert validation(netns, uid) == 0
    assert plugin("CHECK", netns, api) == (0, None)
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-D", "OUTPUT", "1"], check=True)
    code, out = plugin("CHECK", netns, api)
    assert code == 1 and out is not None and out["code"] == 102
    assert "OUTPUT does not start with" in out["msg"]
    assert plugin("DEL", netns, api) == (0, None)
    assert plugin("DEL", netns, api) == (0, None)  # idempotent
    saved = subprocess.run(["ip", "netns", "exec", netns, "iptables-save"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "MESHGUARD" not in saved
    assert validation(netns, uid) == 1


def test_del_when_the_namespace_is_gone_succeeds(api):
    assert plugin("DEL", "mgcni-gone-" + uuid.uuid4().hex[:6], api) == (0, None)


@pytest.mark.parametrize(
    ("status", "body", "msg"),
    [(403, b'{"kind":"Status","message":"forbidden"}', "HTTP 403"),
     (404, None, "HTTP 404"), (200, b"garbage", "not a Pod object")],
)  # fmt: skip
def test_an_injected_pod_whose_ruleset_cannot_be_read_is_not_started(netns, api, status, body, msg):
    serve(None, status, body)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and out["code"] == 100 and msg in out["msg"]


def test_an_altered_ruleset_annotation_is_not_installed(netns, api):
    pod = injected_pod()
    pod["metadata"]["annotations"]["meshguard.io/ruleset"] = "{}"
    serve(pod)
    code, out = plugin("ADD", netns, api)
    assert code == 1 and out is not None and "meshguard.io/ruleset" in out["msg"]


def test_a_pod_meshguard_did_not_inject_passes_through(netns, api):
    pod = istio_pod(cni=True)
    pod["metadata"]["uid"] = "uid-1"
    serve(pod)
    code, out = plugin("ADD", netns, api)
    assert code == 0 and out is not None and out["interfaces"] == [{"name": "eth0"}]
    saved = subprocess.run(["ip", "netns", "exec", netns, "iptables-save"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "MESHGUARD" not in saved


def test_concurrent_adds_for_one_pod_serialize_and_leave_the_rules_verified(netns, api):
    serve(injected_pod())
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda _: plugin("ADD", netns, api), range(2)))
        assert [code for code, _ in results] == [0, 0], results
        assert plugin("CHECK", netns, api) == (0, None)
