"""The webhook app in-process: ``create_app()`` served by aiohttp's test server over real TLS,
with real TLS clients (Python's ssl module, ``openssl s_client``).

The certificate pair: a rotation to another key type leaves nothing of the old pair (a
client that accepts only the old key type no longer gets the old certificate), a pair whose
key does not belong to its certificate is refused, logged, and the previous pair keeps being
served. The lifecycle (certificate watcher, readiness) runs in the app's ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshguard.webhook.server import (
    APP_STATE,
    APP_TLS,
    CertificateError,
    WebhookSettings,
    create_app,
    run_webhook,
)
from tests.support.pods import admission_review
from tests.support.tls import CertificateAuthority
from tests.webhook.test_server import free_port, injected_pod

HOST = "127.0.0.1"
#: TLS 1.3 signature algorithms a client may offer (openssl s_client -sigalgs).
ECDSA_ONLY = "ecdsa_secp256r1_sha256"
RSA_PSS_ONLY = "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512"


@dataclass
class Pair:
    ca: CertificateAuthority
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self, key_type: str) -> int:
        return self.ca.issue(self.cert_file, self.key_file, key_type=key_type)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    ca = CertificateAuthority.create()
    found = Pair(ca, ca.write_ca(tmp_path / "ca.pem"), tmp_path / "tls.crt", tmp_path / "tls.key")
    found.issue("rsa")
    return found


def settings(pair: Pair, *, reload_interval: float = 5.0) -> WebhookSettings:
    return WebhookSettings(
        cert_file=pair.cert_file, key_file=pair.key_file, host=HOST, reload_interval=reload_interval
    )


@asynccontextmanager
async def serving(app: aiohttp.web.Application) -> AsyncIterator[TestServer]:
    """The app on 127.0.0.1:<free port> with its own listening context (real TLS)."""
    server = TestServer(app, host=HOST, port=0)
    await server.start_server(ssl=app[APP_TLS].listener)
    assert server.scheme == "https"
    try:
        yield server
    finally:
        await server.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


# --- real TLS clients ---------------------------------------------------------------------


def python_client(port: int, context: ssl.SSLContext) -> x509.Certificate:
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def served_by_python(port: int, context: ssl.SSLContext) -> x509.Certificate:
    return await asyncio.to_thread(python_client, port, context)


async def served_by_openssl(port: int, ca_file: Path, sigalgs: str) -> x509.Certificate | str:
    """``openssl s_client`` in TLS 1.3 offering only ``sigalgs``: the certificate served, or
    openssl's output when the handshake failed."""
    process = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{HOST}:{port}", "-tls1_3", "-sigalgs", sigalgs,
        "-CAfile", str(ca_file), "-verify_return_error",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=20)
    text = output.decode(errors="replace")
    found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    if process.returncode != 0 or found is None:
        return text
    return x509.load_pem_x509_certificate(found.group().encode())


def tls12_rsa_only(pair: Pair) -> ssl.SSLContext:
    """A TLS 1.2 client whose only cipher suite needs an RSA certificate."""
    context = pair.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    return context


# --- the app, in-process ------------------------------------------------------------------


def test_create_app_is_the_whole_webhook_served_in_process(pair: Pair):
    async def scenario() -> None:
        app = create_app(settings(pair))
        assert app[APP_STATE].ready is False  # not before it runs
        async with serving(app) as server, TestClient(server) as client:
            tls = pair.client_context()
            for path, body in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
                response = await client.get(path, ssl=tls)
                assert (response.status, await response.text()) == (200, body)
            response = await client.post(
                "/inject", data=admission_review(injected_pod(), "u-1"), ssl=tls
            )
            assert response.status == 200
            answer = (await response.json())["response"]
            assert answer["uid"] == "u-1" and answer["allowed"] is True
            assert json.loads(base64.b64decode(answer["patch"]))
            response = await client.post("/inject", data=b"{", ssl=tls)
            assert response.status == 400
            assert "body is not JSON" in (await response.json())["error"]
            metrics = await (await client.get("/metrics", ssl=tls)).text()
            assert 'meshguard_admissions_total{result="injected"} 1.0' in metrics
            assert "meshguard_admission_bad_requests_total 1.0" in metrics
        assert app[APP_STATE].ready is False  # cleanup_ctx ran on the way out

    run(scenario)


def test_the_certificate_watcher_lives_with_the_app(pair: Pair):
    """The watcher runs in cleanup_ctx: it picks up a rotation while the app runs, and is
    gone once the app is cleaned up."""

    async def scenario() -> None:
        app = create_app(settings(pair, reload_interval=0.05))
        reloader = app[APP_TLS]
        async with serving(app) as server:
            first = (await served_by_python(server.port or 0, pair.client_context())).serial_number
            rotated = pair.issue("ec")
            for _ in range(100):
                served = await served_by_python(server.port or 0, pair.client_context())
                if served.serial_number == rotated:
                    break
                await asyncio.sleep(0.05)
            assert served.serial_number == rotated != first
        after_cleanup = reloader.context
        pair.issue("ec")
        await asyncio.sleep(0.3)  # six intervals: nothing watches any more
        assert reloader.context is after_cleanup

    run(scenario)


def test_rotating_rsa_to_ecdsa_leaves_nothing_of_the_rsa_pair(pair: Pair):
    async def scenario() -> None:
        app = create_app(settings(pair))
        async with serving(app) as server:
            port = server.port or 0
            old = await served_by_openssl(port, pair.ca_file, RSA_PSS_ONLY)
            assert isinstance(old, x509.Certificate)
            assert isinstance(old.public_key(), rsa.RSAPublicKey)
            new_serial = pair.issue("ec")
            assert app[APP_TLS].reload_if_changed() is True
            # a client offering only ECDSA gets the new certificate ...
            new = await served_by_openssl(port, pair.ca_file, ECDSA_ONLY)
            assert isinstance(new, x509.Certificate), new
            assert new.serial_number == new_serial
            assert isinstance(new.public_key(), ec.EllipticCurvePublicKey)
            # ... and a client offering only RSA-PSS no longer gets the old one
            refused = await served_by_openssl(port, pair.ca_file, RSA_PSS_ONLY)
            assert isinstance(refused, str), (
                f"served {refused.serial_number} (old: {old.serial_number})"
            )
            assert "no peer certificate available" in refused
            with pytest.raises(ssl.SSLError):  # no certificate for it: the handshake ends
                await served_by_python(port, tls12_rsa_only(pair))
            default = await served_by_python(port, pair.client_context())
            assert default.serial_number == new_serial

    run(scenario)


def test_a_mismatched_pair_is_refused_logged_once_and_the_old_pair_keeps_serving(
    pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    async def scenario() -> None:
        app = create_app(settings(pair))
        reloader = app[APP_TLS]
        async with serving(app) as server:
            port = server.port or 0
            before = (await served_by_python(port, pair.client_context())).serial_number
            # the certificate of a new ECDSA pair beside the key of the RSA pair in use
            other = tmp_path / "other"
            other.mkdir()
            pair.ca.issue(other / "tls.crt", other / "tls.key", key_type="ec")
            pair.cert_file.write_bytes((other / "tls.crt").read_bytes())
            with caplog.at_level(logging.WARNING, logger="meshguard.webhook.server"):
                assert reloader.reload_if_changed() is False
                assert reloader.reload_if_changed() is False  # same files: not logged again
            (refused,) = [r for r in caplog.records if "refused" in r.getMessage()]
            assert refused.levelno == logging.WARNING
            assert f"the key {pair.key_file} does not belong to the certificate" in (
                refused.getMessage()
            )
            assert not any("reloaded" in r.getMessage() for r in caplog.records)
            for context in (pair.client_context(), tls12_rsa_only(pair)):
                assert (await served_by_python(port, context)).serial_number == before
            # the matching key arrives: the new pair is served
            pair.key_file.write_bytes((other / "tls.key").read_bytes())
            assert reloader.reload_if_changed() is True
            served = await served_by_python(port, pair.client_context())
            assert (
                served.serial_number
                == x509.load_pem_x509_certificate(pair.cert_file.read_bytes()).serial_number
                != before
            )

    run(scenario)


@pytest.mark.parametrize("problem", ["other-key-type", "other-rsa-key", "missing", "garbage"])
def test_an_app_without_a_servable_pair_is_not_created(pair: Pair, tmp_path: Path, problem: str):
    if problem.startswith("other-"):  # the certificate is RSA
        key_type = "rsa" if problem == "other-rsa-key" else "ec"
        pair.ca.issue(tmp_path / "other.crt", tmp_path / "other.key", key_type=key_type)
        pair.key_file.write_bytes((tmp_path / "other.key").read_bytes())
        expected = "does not belong to the certificate"
    elif problem == "missing":
        pair.key_file.unlink()
        expected = "certificate pair unreadable"
    else:
        pair.cert_file.write_text("-----BEGIN CERTIFICATE-----\ntruncated")
        expected = "do not load"
    with pytest.raises(CertificateError, match=expected):
        create_app(settings(pair))


# --- serving and draining (run_webhook) ---------------------------------------------------


def slow_admission(port: int, context: ssl.SSLContext, body: bytes, *, sent: threading.Event,
                   proceed: threading.Event) -> tuple[int, bytes]:  # fmt: skip
    """POST /inject whose body arrives in two parts, the second once ``proceed`` is set."""
    head = (
        f"POST /inject HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with (
        socket.create_connection((HOST, port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(head + body[:10])
        sent.set()
        assert proceed.wait(20)
        tls.sendall(body[10:])
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_stop_lets_a_request_in_flight_finish_and_takes_no_new_connection(pair: Pair):
    async def scenario() -> None:
        port = free_port()
        stop = asyncio.Event()
        served = asyncio.create_task(
            run_webhook(
                WebhookSettings(
                    cert_file=pair.cert_file, key_file=pair.key_file, host=HOST, port=port
                ),
                stop=stop,
            )
        )
        for _ in range(200):
            try:
                await served_by_python(port, pair.client_context())
                break
            except OSError:
                await asyncio.sleep(0.05)
        sent, proceed = threading.Event(), threading.Event()
        body = admission_review(injected_pod(), "in-flight")
        admission = asyncio.create_task(
            asyncio.to_thread(
                slow_admission, port, pair.client_context(), body, sent=sent, proceed=proceed
            )
        )
        assert await asyncio.to_thread(sent.wait, 20)
        await asyncio.sleep(0.3)  # the handler is reading the body
        stop.set()
        await asyncio.sleep(0.3)
        with pytest.raises(OSError):  # no longer listening
            await served_by_python(port, pair.client_context())
        assert not served.done()  # draining: the admission is still in flight
        proceed.set()
        status, answer = await asyncio.wait_for(admission, 20)
        assert status == 200
        assert json.loads(answer)["response"]["uid"] == "in-flight"
        await asyncio.wait_for(served, 20)

    run(scenario)
