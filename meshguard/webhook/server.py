"""The admission webhook's HTTPS server (aiohttp): routes, TLS with reload, metrics.

``POST /inject`` takes an AdmissionReview v1 (at most ``max_body_bytes``; ``/inject/audit``,
``/inject/enforce``: the namespace's mode, which the webhook configuration's per-mode entries
send from the namespace's ``meshguard.io/mode`` label; ``/inject/other``: a label with another
value), ``/healthz`` says
the process lives, ``/readyz`` that it serves with a loaded certificate, ``/metrics`` exposes
Prometheus counters and a latency histogram.

:func:`create_app` returns the whole server but its socket: routes, metrics, the certificate
pair (loaded, or an error) and, in aiohttp's ``cleanup_ctx``, what runs beside the requests —
the watcher that re-reads the pair when its files change (cert-manager rotates them in
place), the readiness flag and the admission workers. An admission is answered in a
worker thread (at most ``admission_workers`` at once, at most ``max_pending_admissions``
admitted or waiting, the rest answered 429), never on the event loop: ``/healthz``,
``/readyz`` and the reading of other requests go on while a pod is judged; the policy's
limits (:mod:`meshguard.policy`, :data:`meshguard.rules.compiler.MAX_EXPANSION`) bound
what one admission costs. Tests drive it in-process; :func:`run_webhook` puts it on a
TLS socket. Each reload builds a fresh :class:`ssl.SSLContext` from the new pair and swaps
it in for new handshakes (an SNI callback on the listening context), so a rotated key type
(RSA to ECDSA) leaves nothing of the old pair behind. A pair that does not load — half
written, unreadable, or a certificate and key that do not belong together — is refused and
logged, and the previous pair keeps being served. On stop (SIGTERM) it drains: not ready, no
new connections, requests in flight finish, then it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshguard.errors import MeshguardFailure
from meshguard.inject.transform import InjectSettings
from meshguard.webhook.review import handle

log = logging.getLogger(__name__)

#: OpenSSL's reasons when a private key does not belong to the certificate: another key of
#: the same type, or a key of another type (it finds no certificate of its type).
_KEY_MISMATCH: Final = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"})


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    cert_file: Path
    key_file: Path
    host: str = "0.0.0.0"  # noqa: S104 - a webhook serves the API server, off-host
    port: int = 9443
    max_body_bytes: int = 3 * 1024 * 1024
    reload_interval: float = 5.0
    #: On stop: at most this long for requests in flight (an admission lasts at most 30 s).
    drain_timeout: float = 30.0
    inject: InjectSettings = field(default_factory=InjectSettings)
    #: Admissions judged at once (threads beside the event loop).
    admission_workers: int = 2
    #: Admissions being judged or waiting for a worker; past it a request is answered 429
    #: before its body is read (the API server then applies the webhook's failurePolicy).
    max_pending_admissions: int = 16

    def __post_init__(self) -> None:
        if self.admission_workers < 1 or self.max_pending_admissions < self.admission_workers:
            raise ValueError(
                "admission_workers must be at least 1 and max_pending_admissions at least"
                f" admission_workers, got {self.admission_workers} and"
                f" {self.max_pending_admissions}"
            )


class CertificateError(MeshguardFailure):
    """The webhook's certificate pair cannot be served."""


_Stamp = tuple[tuple[int, int, int], ...]


def server_context(*, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A new server-side context holding exactly this pair (TLS 1.2 or later)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        if exc.reason in _KEY_MISMATCH:
            raise CertificateError(
                f"the key {key_file} does not belong to the certificate {cert_file}"
            ) from exc
        raise CertificateError(f"{cert_file} / {key_file} do not load: {exc}") from exc
    except OSError as exc:
        raise CertificateError(f"certificate pair unreadable: {exc}") from exc
    return context


class CertificateReloader:
    """The server's certificate pair, following its files on disk.

    ``listener`` is the context the socket serves with; its SNI callback, which OpenSSL calls
    on every ClientHello (with or without a server name), hands the handshake to the context
    of the current pair. Each reload builds that context anew and swaps it in: handshakes
    already done keep theirs, new ones get only the new pair.
    """

    def __init__(self, *, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._stamp = self._current_stamp()
        self._current = server_context(cert_file=cert_file, key_file=key_file)
        self._refused: _Stamp | None = None
        self.loaded_at = time.time()
        self.listener = server_context(cert_file=cert_file, key_file=key_file)
        self.listener.sni_callback = self._select

    @property
    def context(self) -> ssl.SSLContext:
        """The context of the pair new handshakes get."""
        return self._current

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        connection.context = self._current

    def _current_stamp(self) -> _Stamp:
        stamps = []
        for path in (self.cert_file, self.key_file):
            try:
                info = os.stat(path)
            except OSError as exc:
                raise CertificateError(f"certificate pair unreadable: {exc}") from exc
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Load the pair again if either file changed; True when a new pair was loaded.

        A pair that does not load is logged once (until the files change again) and the
        previous pair stays."""
        try:
            stamp = self._current_stamp()
        except CertificateError as exc:
            log.error("%s", exc, extra={"fields": {"event": "tls"}})
            return False
        if stamp in (self._stamp, self._refused):
            return False
        try:
            context = server_context(cert_file=self.cert_file, key_file=self.key_file)
        except CertificateError as exc:
            self._refused = stamp
            log.warning(
                "new certificate pair refused, serving the previous one: %s",
                exc,
                extra={"fields": {"event": "tls-reload-failed"}},
            )
            return False
        self._current, self._stamp, self._refused = context, stamp, None
        self.loaded_at = time.time()
        log.info("certificate reloaded", extra={"fields": {"event": "tls-reloaded"}})
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


@dataclass
class _Metrics:
    registry: CollectorRegistry
    admissions: Counter
    latency: Histogram
    bad_requests: Counter

    @classmethod
    def create(cls) -> _Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            admissions=Counter(
                "meshguard_admissions", "Admission reviews answered, by result",
                ["result"], registry=registry,
            ),
            latency=Histogram(
                "meshguard_admission_seconds", "Time to answer an admission review",
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            ),
            bad_requests=Counter(
                "meshguard_admission_bad_requests", "Requests refused as malformed (HTTP 4xx)",
                registry=registry,
            ),
        )  # fmt: skip


@dataclass
class ServingState:
    """Whether /readyz says ready, and the requests being answered (for the drain)."""

    ready: bool = False
    in_flight: int = 0
    #: Admissions being judged or waiting for a worker.
    pending_admissions: int = 0


APP_SETTINGS = web.AppKey("settings", WebhookSettings)
APP_METRICS = web.AppKey("metrics", _Metrics)
APP_STATE = web.AppKey("state", ServingState)
APP_TLS = web.AppKey("tls", CertificateReloader)
APP_WORKERS = web.AppKey("workers", ThreadPoolExecutor)


def create_app(settings: WebhookSettings) -> web.Application:
    """The webhook: routes, metrics, its certificate pair (loaded here: a pair that does not
    load is a :class:`CertificateError`) and, while the app runs, the certificate watcher and
    readiness. Serve it with ``app[APP_TLS].listener`` as the SSL context."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_in_flight])
    app[APP_SETTINGS] = settings
    app[APP_METRICS] = _Metrics.create()
    app[APP_STATE] = ServingState()
    app[APP_TLS] = CertificateReloader(cert_file=settings.cert_file, key_file=settings.key_file)
    app.cleanup_ctx.append(_watch_certificate)
    app.cleanup_ctx.append(_admission_workers)
    app.cleanup_ctx.append(_readiness)
    app.router.add_post("/inject", _inject)
    app.router.add_post("/inject/{mode}", _inject)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _watch_certificate(app: web.Application) -> AsyncIterator[None]:
    watcher = asyncio.create_task(app[APP_TLS].watch(app[APP_SETTINGS].reload_interval))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def _admission_workers(app: web.Application) -> AsyncIterator[None]:
    workers = app[APP_SETTINGS].admission_workers
    app[APP_WORKERS] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="admission")
    yield
    app[APP_WORKERS].shutdown(wait=True, cancel_futures=False)


async def _readiness(app: web.Application) -> AsyncIterator[None]:
    app[APP_STATE].ready = True
    yield
    app[APP_STATE].ready = False


@web.middleware
async def _in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[APP_STATE]
    state.in_flight += 1
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1


async def _inject(request: web.Request) -> web.Response:
    metrics = request.app[APP_METRICS]
    settings = request.app[APP_SETTINGS]
    state = request.app[APP_STATE]
    started = time.perf_counter()
    if state.pending_admissions >= settings.max_pending_admissions:
        metrics.bad_requests.inc()
        log.warning(
            "admission refused: too many pending",
            extra={"fields": {"event": "admission-overload", "pending": state.pending_admissions}},
        )
        return _json(
            429,
            {"error": f"{state.pending_admissions} admissions pending, the limit is"
             f" {settings.max_pending_admissions}: retry"},
        )  # fmt: skip
    state.pending_admissions += 1
    try:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.bad_requests.inc()
            limit = settings.max_body_bytes
            return _json(413, {"error": f"AdmissionReview larger than {limit} bytes"})
        # /inject/<mode>: the namespace's mode, one path per namespace selection of the
        # webhook configuration (a service path takes DNS-1123 segments only: no query)
        namespace_mode = request.match_info.get("mode")
        loop = asyncio.get_running_loop()
        status, answer, decision = await loop.run_in_executor(
            request.app[APP_WORKERS],
            functools.partial(
                handle, body, settings=settings.inject, namespace_mode=namespace_mode
            ),
        )
    finally:
        state.pending_admissions -= 1
    if decision is None:
        metrics.bad_requests.inc()
    else:
        metrics.admissions.labels(result=decision.result).inc()
        metrics.latency.observe(time.perf_counter() - started)
    return _json(status, answer)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[APP_STATE].ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="starting\n")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[APP_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(status: int, document: object) -> web.Response:
    return web.Response(status=status, text=json.dumps(document), content_type="application/json")


async def run_webhook(settings: WebhookSettings, *, stop: asyncio.Event) -> None:
    """Serve :func:`create_app` over TLS until ``stop`` is set, then drain."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=app[APP_TLS].listener)
        await site.start()
        log.info(
            "webhook serving",
            extra={"fields": {"event": "serving", "host": settings.host, "port": settings.port}},
        )
        await stop.wait()
        await _drain(app, site, timeout=settings.drain_timeout)
    finally:
        await runner.cleanup()


async def _drain(app: web.Application, site: web.BaseSite, *, timeout: float) -> None:
    """Not ready, no new connections, then let requests in flight finish (aiohttp's own
    shutdown drops the rest of a request body that is still arriving)."""
    state = app[APP_STATE]
    state.ready = False
    await site.stop()
    deadline = time.monotonic() + timeout
    while state.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
