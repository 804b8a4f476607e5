"""The Check channel over real mutual TLS (gRPC, a test mesh CA issuing SPIFFE certificates):
a caller may only ask about the pods of its own identity; any other identity, none, or a
certificate the mesh CA did not issue gets no allow."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from meshguard.authz.decision import PodPolicy
from meshguard.authz.identity import (
    ISTIO_STATUS_ENV,
    TlsFiles,
    WorkloadCertificateMissingError,
    WorkloadIdentity,
    certificate_cause,
    injected_from_env,
    parse_spiffe_id,
    peer_identity,
)
from meshguard.authz.server import AuthzSettings, serve_authz
from meshguard.authz.store import StaticStore
from meshguard.errors import MalformedInputError
from tests.authz.spiffe import AUTHZ_DNS, Workload, issue_workload, spiffe_id
from tests.authz.test_server import POLICY, STATUS, check_request, free_port
from tests.support.keys import trusted_keys_file
from tests.support.tls import CertificateAuthority

POD = "demo/shop"


def shop_store() -> StaticStore:
    annotations = {"meshguard.io/policy": POLICY, "meshguard.io/status": STATUS}
    policy = PodPolicy.from_pod(key=POD, annotations=annotations, ports={})
    return StaticStore([policy])  # service account "default", namespace "demo"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Workload]:
    directory = tmp_path_factory.mktemp("mesh")
    ca, rogue = CertificateAuthority.create(), CertificateAuthority.create()
    server = spiffe_id("meshguard-system", "meshguard-authz")
    return {
        "server": issue_workload(ca, directory, "server", server, dns=AUTHZ_DNS),
        "shop": issue_workload(ca, directory, "shop", spiffe_id("demo", "default")),
        "other-ns": issue_workload(ca, directory, "other-ns", spiffe_id("attacker", "default")),
        "other-sa": issue_workload(ca, directory, "other-sa", spiffe_id("demo", "batch")),
        "other-td": issue_workload(
            ca, directory, "other-td", spiffe_id("demo", "default", "evil.example")
        ),
        "two-ids": issue_workload(
            ca, directory, "two-ids", spiffe_id("attacker", "x"), spiffe_id("demo", "default")
        ),
        "no-spiffe": issue_workload(ca, directory, "no-spiffe", "https://demo.example/shop"),
        "rogue-ca": issue_workload(rogue, directory, "rogue", spiffe_id("demo", "default")),
    }


def ask(mesh: dict[str, Workload], client: str | None, *, pod: str = POD) -> Any:
    """One Check over mTLS as ``client`` (None: no client certificate); the response, or the
    gRPC status code when the channel could not be established."""
    (answer,) = ask_in_turn(mesh, [client], pod=pod)
    return answer


def ask_in_turn(mesh: dict[str, Workload], clients: list[str | None], *, pod: str = POD) -> Any:
    """The same Check asked of one server by each client in turn, each on its own channel."""
    server = mesh["server"]

    async def one(port: int, client: str | None) -> Any:
        identity = mesh[client] if client else None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server.ca.read_bytes(),
            private_key=identity.key.read_bytes() if identity else None,
            certificate_chain=identity.cert.read_bytes() if identity else None,
        )
        options = [("grpc.ssl_target_name_override", AUTHZ_DNS)]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            try:
                return await stub.Check(check_request(pod=pod), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    async def main() -> list[Any]:
        port = free_port()
        stop = asyncio.Event()
        settings = AuthzSettings(
            port=port, metrics_port=None, grace_seconds=0.1,
            tls=TlsFiles(cert=server.cert, key=server.key, ca=server.ca),
        )  # fmt: skip
        task = asyncio.create_task(serve_authz(settings, store=shop_store(), stop=stop))
        try:
            await asyncio.sleep(0.2)
            return [await one(port, client) for client in clients]
        finally:
            stop.set()
            await task

    return asyncio.run(main())


def test_the_pods_own_identity_is_allowed(mesh: dict[str, Workload]):
    response = ask(mesh, "shop")
    assert response.status.code == 0


def test_each_channel_is_judged_by_its_own_identity_on_one_server(
    mesh: dict[str, Workload],
):
    """The server remembers decisions and callers: the pod's own identity, then another's,
    then no certificate of the mesh, then the pod's again, on one server."""
    answers = ask_in_turn(mesh, ["shop", "other-ns", "two-ids", "rogue-ca", "shop", "other-sa"])
    codes = [a if isinstance(a, grpc.StatusCode) else a.status.code for a in answers]
    assert codes == [0, 7, 7, grpc.StatusCode.UNAVAILABLE, 0, 7]
    assert "attacker" in answers[1].status.message
    assert "no caller identity" in answers[2].status.message
    assert "ns/demo/sa/batch" in answers[5].status.message


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("other-ns", "caller spiffe://cluster.local/ns/attacker/sa/default asks about a pod of"
                     " ns/demo/sa/default: a workload may only ask about its own pods"),
        ("other-sa", "caller spiffe://cluster.local/ns/demo/sa/batch asks about a pod of"
                     " ns/demo/sa/default: a workload may only ask about its own pods"),
        ("other-td", "caller spiffe://evil.example/ns/demo/sa/default is not of trust domain"
                     " 'cluster.local'"),
        ("two-ids", "no caller identity: the client certificate holds 2 SPIFFE IDs, expected"
                    " exactly one"),
        ("no-spiffe", "no caller identity: the client certificate holds 0 SPIFFE IDs, expected"
                      " exactly one"),
    ],
)  # fmt: skip
def test_a_forged_or_missing_identity_is_denied(
    mesh: dict[str, Workload], client: str, reason: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    response = ask(mesh, client)
    assert response.status.code == 7  # PERMISSION_DENIED
    assert response.status.message == reason
    (warning,) = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "identity-denied"
    ]
    assert warning.fields["pod"] == POD
    assert warning.fields["kind"] in {"identity_mismatch", "no_identity"}
    (decision,) = [r for r in caplog.records if r.name == "meshguard.authz.decisions"]
    assert decision.fields["result"] == "deny"
    json.dumps(decision.fields)  # one JSON line


def test_an_identity_cannot_ask_about_another_namespaces_pod_even_if_unknown(
    mesh: dict[str, Workload],
):
    response = ask(mesh, "shop", pod="kube-system/coredns-1")
    assert response.status.code == 7
    assert "a workload may only ask about its own pods" in response.status.message


@pytest.mark.parametrize("client", [None, "rogue-ca"])
def test_no_channel_without_a_certificate_of_the_mesh_ca(
    mesh: dict[str, Workload], client: str | None
):
    assert ask(mesh, client) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://cluster.local/ns/demo/sa/",
        "spiffe://cluster.local/ns/demo/sa/default/extra",
        "spiffe://cluster.local/ns/Demo/sa/default",
        "https://cluster.local/ns/demo/sa/default",
        "spiffe://cluster.local/sa/default/ns/demo",
    ],
)
def test_malformed_spiffe_ids_are_refused(text: str):
    with pytest.raises(MalformedInputError, match="not a workload SPIFFE ID"):
        parse_spiffe_id(text)


def test_plaintext_has_no_identity():
    with pytest.raises(MalformedInputError, match="no TLS"):
        peer_identity({})
    assert peer_identity(
        {"transport_security_type": [b"ssl"], "peer_uri": [b"spiffe://td/ns/a/sa/b"]}
    ) == WorkloadIdentity(trust_domain="td", namespace="a", service_account="b")


def test_serve_authz_refuses_kubernetes_mode_without_tls(tmp_path: Path):
    from meshguard.cli import main  # noqa: PLC0415

    assert main(["serve-authz", "--kubernetes", "--port", "0"]) == 2
    assert main(["serve-authz", "--pods", str(tmp_path / "x"), "--tls-cert", "a"]) == 2


# --- waiting for the workload certificate (issue 24: revision-only Istio) -----------------


def test_the_wait_names_each_missing_file_and_the_cause_then_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = TlsFiles(cert=tmp_path / "cert-chain.pem", key=tmp_path / "key.pem",
                     ca=tmp_path / "root-cert.pem")  # fmt: skip
    with (
        caplog.at_level(logging.WARNING, logger="meshguard.authz.identity"),
        pytest.raises(WorkloadCertificateMissingError) as raised,
    ):
        files.wait(timeout=0.3, poll=0.05, injected=False)
    message = str(raised.value)
    for path in (files.cert, files.key, files.ca):
        assert str(path) in message
    assert "not injected by Istio" in message and "authz.istioRevision" in message
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "tls-wait"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["missing"] == [str(files.cert), str(files.key), str(files.ca)]
    assert "authz.istioRevision" in record.getMessage()


@pytest.mark.parametrize(
    ("environ", "injected", "said"),
    [
        ({}, None, "if the pod has no istio-proxy container"),
        ({ISTIO_STATUS_ENV: ""}, False, "not injected by Istio"),
        ({ISTIO_STATUS_ENV: '{"revision":"canary"}'}, True, "-c istio-proxy"),
    ],
)
def test_the_cause_follows_what_the_pod_knows(
    environ: dict[str, str], injected: bool | None, said: str
) -> None:
    assert injected_from_env(environ) is injected
    assert said in certificate_cause(injected)


def test_serve_authz_exits_with_the_files_and_the_cause(tmp_path: Path) -> None:
    """As the chart runs it in a pod Istio did not inject (the downward API's empty
    annotation): a clear error after the bound, not a wait forever."""
    argv = [sys.executable, "-m", "meshguard", "serve-authz", "--kubernetes", "--tls-wait=0.5",
            f"--tls-cert={tmp_path}/cert-chain.pem", f"--tls-key={tmp_path}/key.pem",
            f"--tls-ca={tmp_path}/root-cert.pem",
            f"--trusted-keys={trusted_keys_file(tmp_path)}"]  # fmt: skip
    env = {**os.environ, ISTIO_STATUS_ENV: ""}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode != 0
    assert f"{tmp_path}/cert-chain.pem" in done.stderr
    assert "not injected by Istio" in done.stderr
