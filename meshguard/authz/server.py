"""The Envoy ext_authz gRPC server (grpc.aio): ``envoy.service.auth.v3.Authorization/Check``.

Translates a CheckRequest into a :class:`~meshguard.authz.decision.Request`, asks
:func:`~meshguard.authz.decision.decide`, answers OK or PERMISSION_DENIED with a 403 whose
body names the reason, and logs one JSON line per decision. Nothing a client sends can
raise out of ``Check``: malformed or partial requests are denied with a reason. Serves the
standard gRPC health service beside it, and Prometheus metrics on their own HTTP port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from meshguard.authz.contract import POD_HEADER, SERVICE_NAME
from meshguard.authz.decision import Decision, Request, decide
from meshguard.authz.store import PolicyStore

log = logging.getLogger(__name__)
decisions_log = logging.getLogger("meshguard.authz.decisions")

MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class AuthzSettings:
    host: str = "127.0.0.1"
    port: int = 9191
    metrics_port: int | None = 9192
    grace_seconds: float = 2.0


class AuthzMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "meshguard_authz_decisions", "Check decisions, by result and reason kind",
            ["result", "reason"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "meshguard_authz_check_seconds", "Time to decide a Check",
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
        )  # fmt: skip


def request_of(check: external_auth_pb2.CheckRequest) -> Request:
    """The decision input; absent fields stay None (and are denied by the decision)."""
    attributes = check.attributes
    http = attributes.request.http
    headers: Mapping[str, str] = dict(http.headers)
    source = attributes.source.address.socket_address
    destination = attributes.destination.address.socket_address
    return Request(
        pod=headers.get(POD_HEADER) or None,
        source_address=source.address or None,
        port=destination.port_value or None,
        method=http.method or None,
        path=http.path or None,
        headers=headers,
    )


def response_of(decision: Decision) -> external_auth_pb2.CheckResponse:
    if decision.allowed:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(headers_to_remove=[POD_HEADER]),
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=decision.reason),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            body=f"meshguard: denied: {decision.reason}\n",
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="text/plain")
                )
            ],
        ),
    )


def check(request: Request, store: PolicyStore, *, header_bytes: int) -> Decision:
    if header_bytes > MAX_HEADER_BYTES:
        return Decision(False, f"request headers larger than {MAX_HEADER_BYTES} bytes")
    return decide(request, store.get(request.pod) if request.pod else None)


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, *, store: PolicyStore, metrics: AuthzMetrics) -> None:
        self._store = store
        self._metrics = metrics

    async def Check(
        self, check_request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        request = Request(None, None, None, None, None, {})
        try:
            request = request_of(check_request)
            header_bytes = sum(len(k) + len(v) for k, v in request.headers.items())
            decision = check(request, self._store, header_bytes=header_bytes)
        except Exception as exc:  # deny, never let an error escape or a request through
            log.exception("check failed", extra={"fields": {"event": "check-error"}})
            decision = Decision(False, f"meshguard failed: internal error ({type(exc).__name__})")
        elapsed = time.perf_counter() - started
        self._record(request, decision, elapsed)
        return response_of(decision)

    def _record(self, request: Request, decision: Decision, elapsed: float) -> None:
        result = "allow" if decision.allowed else "deny"
        kind = "audit" if decision.audited else decision.reason.split(" ", 1)[0].rstrip(":")
        self._metrics.decisions.labels(result=result, reason=kind).inc()
        self._metrics.latency.observe(elapsed)
        decisions_log.info(
            "decision",
            extra={
                "fields": {
                    "event": "decision",
                    "pod": request.pod,
                    "request": {
                        "method": request.method,
                        "path": request.path,
                        "port": request.port,
                        "source_address": request.source_address,
                    },
                    **decision.log_fields(),
                    "us": round(elapsed * 1e6),
                }
            },
        )


async def serve_authz(settings: AuthzSettings, *, store: PolicyStore, stop: asyncio.Event) -> None:
    """Serve Check and health until ``stop`` is set."""
    metrics = AuthzMetrics()
    # SO_REUSEPORT (gRPC's default on Linux, set explicitly): worker processes share the port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(store=store, metrics=metrics), server
    )
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    address = f"{settings.host}:{settings.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_service.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("authz serving", extra={"fields": {"event": "serving", "address": address}})
    try:
        await stop.wait()
    finally:
        await health_service.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
