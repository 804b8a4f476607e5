"""The webhook served for real: ``meshguard serve-webhook`` over HTTPS with a generated cert."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography import x509

from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import pod_templates
from tests.support.keys import SIGNER, signing_key_file
from tests.support.pods import admission_review
from tests.support.shared import shared_file
from tests.support.tls import CertificateAuthority

HOST = "127.0.0.1"


@dataclass
class Served:
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca: CertificateAuthority
    process: subprocess.Popen[str]

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            HOST, self.port, context=self.context(), timeout=10
        )
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def served_serial(self) -> int:
        with (
            socket.create_connection((HOST, self.port), timeout=5) as raw,
            self.context().wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    ca = CertificateAuthority.create()
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.issue(cert_file, key_file)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "meshguard", "serve-webhook", "--cert", str(cert_file),
         "--key", str(key_file), "--host", HOST, "--port", str(port), "--reload-interval", "0.2",
         "--signing-key", str(signing_key_file(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = Served(port, ca_file, cert_file, key_file, ca, process)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.terminate()
        process.communicate(timeout=10)


def _wait_ready(server: Served) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"webhook exited: {server.process.communicate()[1]}")
        try:
            if server.request("GET", "/readyz")[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("webhook not ready within 20s")


def injected_pod() -> dict[str, Any]:
    documents = list(
        yaml.safe_load_all(shared_file("istio-injector-samples", "hello.yaml.injected").read_text())
    )
    (template,) = pod_templates([d for d in documents if d])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template.metadata, "spec": template.spec}


def test_health_readiness_and_metrics(served: Served):
    assert served.request("GET", "/healthz") == (200, b"ok\n")
    assert served.request("GET", "/readyz") == (200, b"ready\n")
    status, body = served.request("GET", "/metrics")
    assert status == 200
    assert b"meshguard_admission_seconds" in body


def test_a_real_admission_over_https_patches_like_meshguard_inject(served: Served):
    pod = injected_pod()
    status, body = served.request("POST", "/inject", admission_review(pod, "abc-123"))
    assert status == 200
    response = json.loads(body)["response"]
    assert response["uid"] == "abc-123"
    assert response["allowed"] is True
    patched = jsonpatch.apply_patch(
        copy.deepcopy(pod), json.loads(base64.b64decode(response["patch"]))
    )
    expected = copy.deepcopy(pod)
    inject_pod(
        expected["metadata"],
        expected["spec"],
        settings=InjectSettings(request_template=False, signer=SIGNER),
    )
    assert patched == expected
    assert any("assigned runAsUser" in w for w in response["warnings"])
    metrics = served.request("GET", "/metrics")[1].decode()
    assert 'meshguard_admissions_total{result="injected"} 1.0' in metrics


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "body is not JSON"),
        (json.dumps({"kind": "Pod"}).encode(), 400, "expected kind AdmissionReview"),
        (b"x" * (5 * 1024 * 1024), 413, "AdmissionReview larger than"),
    ],
    ids=["not-json", "not-a-review", "5MB"],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(
    served: Served, body: bytes, status: int, message: str
):
    got_status, got_body = served.request("POST", "/inject", body)
    assert got_status == status
    assert message in json.loads(got_body)["error"]
    assert b"Traceback" not in got_body
    assert served.request("GET", "/healthz")[0] == 200


def test_a_rotated_certificate_is_served_without_restart(served: Served):
    first = served.served_serial()
    # cert-manager style: the new pair replaces the files in place.
    new_serial = served.ca.issue(served.cert_file, served.key_file)
    deadline = time.monotonic() + 10
    while served.served_serial() != new_serial and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.served_serial() == new_serial != first
    assert served.process.poll() is None


def test_a_half_written_certificate_keeps_the_previous_one(served: Served):
    before = served.served_serial()
    served.cert_file.write_text("-----BEGIN CERTIFICATE-----\ntruncated")
    time.sleep(0.6)  # three reload intervals
    assert served.served_serial() == before
    assert served.request("GET", "/healthz")[0] == 200


def test_missing_certificate_exits_with_a_clear_line(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "serve-webhook", "--cert", str(tmp_path / "nope.crt"),
         "--key", str(tmp_path / "nope.key"), "--port", str(free_port()),
         "--signing-key", str(signing_key_file(tmp_path))],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("meshguard serve-webhook: ")
    assert "Traceback" not in done.stderr


def test_over_https_a_relabelled_admitted_pod_gets_no_proxy_uid_debug_container(
    served: Served,
):
    """Issue 30: the pod was admitted, then relabelled sidecar.istio.io/inject=false; the
    chart still sends kubectl debug's UPDATE (admitted.meshguard.io keys on
    meshguard.io/admitted) and the server refuses a container running as the proxy."""
    pod = injected_pod()
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    pod["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    new = copy.deepcopy(pod)
    new["spec"]["ephemeralContainers"] = [
        {"name": "debugger", "image": "busybox",
         "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True}}
    ]  # fmt: skip
    document = json.loads(admission_review(new, "dbg-1"))
    document["request"] |= {"operation": "UPDATE", "subResource": "ephemeralcontainers",
                            "oldObject": pod}  # fmt: skip
    status, body = served.request("POST", "/inject", json.dumps(document).encode())
    assert status == 200
    response = json.loads(body)["response"]
    assert response["allowed"] is False
    assert "proxy's uid 1337" in response["status"]["message"]


def test_over_https_an_istio_gateway_is_left_alone_with_the_reason(served: Served):
    documents = yaml.safe_load_all(
        shared_file("istio-injector-samples", "gateway.yaml.injected").read_text()
    )
    (template,) = pod_templates([d for d in documents if d])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.metadata, "spec": template.spec}
    status, body = served.request("POST", "/inject", admission_review(pod, "gw-1"))
    assert status == 200
    response = json.loads(body)["response"]
    assert response["allowed"] is True
    assert "patch" not in response  # nothing added: no root NET_ADMIN init container
    assert any("Istio gateway pod (injection template gateway)" in w for w in response["warnings"])
