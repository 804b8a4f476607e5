"""The admission webhook's HTTPS server (aiohttp): routes, TLS with reload, metrics.

``POST /inject`` takes an AdmissionReview v1 (at most ``max_body_bytes``), ``/healthz`` says
the process lives, ``/readyz`` that it serves with a loaded certificate, ``/metrics`` exposes
Prometheus counters and a latency histogram. The certificate and key are re-read when their
files change (cert-manager rotates them in place); a half-written pair is ignored until it
loads, and the previous certificate keeps being served meanwhile. On stop (SIGTERM) it
drains: not ready, no new connections, requests in flight finish, then it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshguard.inject.transform import InjectSettings
from meshguard.webhook.review import handle

log = logging.getLogger(__name__)


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


class CertificateReloader:
    """An SSL context whose certificate follows the files on disk."""

    def __init__(self, *, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._current_stamp()
        self.context.load_cert_chain(cert_file, key_file)
        self.loaded_at = time.time()

    def _current_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self.cert_file, self.key_file):
            info = os.stat(path)
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Load the pair again if either file changed; True when a new pair was loaded."""
        try:
            stamp = self._current_stamp()
        except OSError as exc:
            log.error("certificate files unreadable: %s", exc, extra={"fields": {"event": "tls"}})
            return False
        if stamp == self._stamp:
            return False
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "new certificate not loaded yet, serving the previous one: %s",
                exc,
                extra={"fields": {"event": "tls-reload-failed"}},
            )
            return False
        self._stamp = stamp
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


APP_SETTINGS = web.AppKey("settings", WebhookSettings)
APP_METRICS = web.AppKey("metrics", _Metrics)
APP_READY = web.AppKey("ready", dict)


def create_app(settings: WebhookSettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_in_flight])
    app[APP_SETTINGS] = settings
    app[APP_METRICS] = _Metrics.create()
    app[APP_READY] = {"ready": False, "in_flight": 0}
    app.router.add_post("/inject", _inject)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


@web.middleware
async def _in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[APP_READY]
    state["in_flight"] += 1
    try:
        return await handler(request)
    finally:
        state["in_flight"] -= 1


async def _inject(request: web.Request) -> web.Response:
    metrics = request.app[APP_METRICS]
    settings = request.app[APP_SETTINGS]
    started = time.perf_counter()
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.bad_requests.inc()
        limit = settings.max_body_bytes
        return _json(413, {"error": f"AdmissionReview larger than {limit} bytes"})
    status, answer, decision = handle(body, settings=settings.inject)
    if decision is None:
        metrics.bad_requests.inc()
    else:
        metrics.admissions.labels(result=decision.result).inc()
        metrics.latency.observe(time.perf_counter() - started)
    return _json(status, answer)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[APP_READY]["ready"]:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="starting\n")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[APP_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(status: int, document: object) -> web.Response:
    return web.Response(status=status, text=json.dumps(document), content_type="application/json")


async def run_webhook(settings: WebhookSettings, *, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    reloader = CertificateReloader(cert_file=settings.cert_file, key_file=settings.key_file)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=reloader.context)
    await site.start()
    watcher = asyncio.create_task(reloader.watch(settings.reload_interval))
    app[APP_READY]["ready"] = True
    log.info(
        "webhook serving",
        extra={"fields": {"event": "serving", "host": settings.host, "port": settings.port}},
    )
    try:
        await stop.wait()
    finally:
        app[APP_READY]["ready"] = False
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        # Drain: no new connections, then let requests in flight finish (aiohttp's own
        # shutdown drops the rest of a request body that is still arriving), then close.
        await site.stop()
        deadline = time.monotonic() + settings.drain_timeout
        while app[APP_READY]["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await runner.cleanup()
