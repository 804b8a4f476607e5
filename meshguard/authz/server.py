"""The Envoy ext_authz gRPC server (grpc.aio): ``envoy.service.auth.v3.Authorization/Check``.

Translates a CheckRequest into a :class:`~meshguard.authz.decision.Request`, asks
:func:`~meshguard.authz.decision.decide`, answers OK or PERMISSION_DENIED with a 403 whose
body names the reason, and logs one JSON line per decision. Nothing a client sends can
raise out of ``Check``: malformed or partial requests are denied with a reason.

With TLS files (:class:`~meshguard.authz.identity.TlsFiles`) the channel is mutual TLS and
every Check is bound to the caller's workload identity: a caller may only ask about pods of
its own namespace and ServiceAccount; no identity, or another one, is denied (fail closed).
The standard gRPC health service reports NOT_SERVING until the policy store has synced (so
no replica answers "unknown pod" for a pod it has not listed yet); Prometheus metrics on
their own HTTP port: decisions by a fixed set of reasons (:class:`Reason`), Check latency up
to Envoy's timeout, the store's size, sync age and watch restarts, process and build info.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from meshguard.authz.cache import DecisionCache
from meshguard.authz.contract import POD_HEADER, SERVICE_NAME
from meshguard.authz.decision import Decision, Reason, Request, decide
from meshguard.authz.identity import (
    SECURITY_PROPERTY,
    URI_PROPERTY,
    TlsFiles,
    WorkloadIdentity,
    identity_problem,
    peer_identity,
    server_credentials,
)
from meshguard.authz.metrics import AuthzMetrics
from meshguard.authz.store import PolicyStore
from meshguard.errors import MeshguardError
from meshguard.logs import InfoLines, Members, members
from meshguard.mesh import (
    LOCAL_AUTHZ_PORT,
    is_loopback,
    is_protected_port,
    unprotected_authz_port,
)

log = logging.getLogger(__name__)
decisions_log = logging.getLogger("meshguard.authz.decisions")

MAX_HEADER_BYTES = 64 * 1024
READY_POLL_SECONDS = 0.1
#: Distinct answers (CheckResponses, decision lines) and callers kept for reuse.
ANSWERS_KEPT = 1024
CALLERS_KEPT = 256
#: Decision lines of requests with longer paths are encoded each time, not remembered.
MAX_REMEMBERED_PATH = 1024


@dataclass(frozen=True, kw_only=True)
class AuthzSettings:
    host: str = "127.0.0.1"
    port: int = LOCAL_AUTHZ_PORT  # beside the proxy, in its protected range
    metrics_port: int | None = 9192
    grace_seconds: float = 2.0
    #: mTLS files; None serves plaintext without caller identities (standalone, sandbox).
    tls: TlsFiles | None = None
    #: The mesh's trust domain: callers' SPIFFE IDs must be of it.
    trust_domain: str = "cluster.local"


#: The request of a Check that failed before its translation (for the log line).
NO_REQUEST = Request(None, None, None, None, None, {})


def request_of(check: external_auth_pb2.CheckRequest) -> Request:
    """The decision input; absent fields stay None (and are denied by the decision). The
    headers are the CheckRequest's own map (read in place, not copied)."""
    attributes = check.attributes
    http = attributes.request.http
    headers: Mapping[str, str] = http.headers
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


def header_bytes_of(check: external_auth_pb2.CheckRequest) -> int:
    """The size of the request's HTTP attributes as Envoy sent them (headers, and the path,
    host and method beside them): what :data:`MAX_HEADER_BYTES` bounds."""
    size: int = check.attributes.request.http.ByteSize()
    return size


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


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who asks: the identity the channel proved (None on a plaintext server), or why none."""

    identity: WorkloadIdentity | None = None
    problem: str | None = None


def check(
    request: Request,
    store: PolicyStore,
    *,
    header_bytes: int,
    caller: Caller | None = None,
    trust_domain: str = "cluster.local",
    cache: DecisionCache[Decision] | None = None,
) -> Decision:
    """The decision for one Check; ``caller`` None means identities are not checked. The
    sync, identity and size checks run every time; ``cache`` only spares ``decide``."""
    if not store.is_synced():
        return Decision(
            False, "the pod cache has not synced yet: no decision", kind=Reason.NOT_SYNCED
        )
    if caller is not None and caller.identity is None:
        return Decision(False, f"no caller identity: {caller.problem}", kind=Reason.NO_IDENTITY)
    if header_bytes > MAX_HEADER_BYTES:
        return Decision(
            False, f"request headers and attributes larger than {MAX_HEADER_BYTES} bytes",
            kind=Reason.HEADERS_TOO_LARGE,
        )  # fmt: skip
    pod = store.get(request.pod) if request.pod else None
    if caller is not None and caller.identity is not None:
        namespace = (request.pod or "").split("/", 1)[0]
        problem = identity_problem(
            caller.identity,
            trust_domain=trust_domain,
            namespace=namespace,
            service_account=pod.service_account if pod else caller.identity.service_account,
        )
        if problem:
            return Decision(False, problem, kind=Reason.IDENTITY_MISMATCH)
    if cache is None:
        return decide(request, pod)
    return cache.get(request, pod, lambda: decide(request, pod))


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    return caller_from(context.auth_context())


def caller_from(auth_context: Mapping[str, Sequence[bytes]]) -> Caller:
    try:
        return Caller(identity=peer_identity(auth_context))
    except MeshguardError as exc:
        return Caller(problem=str(exc))


def _caller_of_peer(security: tuple[bytes, ...], uris: tuple[bytes, ...]) -> Caller:
    """:func:`caller_from` of exactly what it reads from an authentication context."""
    return caller_from({SECURITY_PROPERTY: list(security), URI_PROPERTY: list(uris)})


class Described(NamedTuple):
    """What a decision line says but its time and duration: the same for every Check of the
    same request by the same caller decided alike, so its JSON is made once for them."""

    pod: str | None
    caller: str | None
    method: str | None
    path: str | None
    port: int | None
    source_address: str | None
    decision: Decision


def decision_members(described: Described) -> Members:
    request = {
        "method": described.method,
        "path": described.path,
        "port": described.port,
        "source_address": described.source_address,
    }
    fields = {"event": "decision", "pod": described.pod, "caller": described.caller}
    return members(fields | {"request": request} | described.decision.log_fields())


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Check: one decision, one metric sample and one JSON log line per request.

    The per-Check work is kept small (the authz server sits on every L7 request's path): the
    decisions of recent requests are cached per pod object (:class:`DecisionCache`), the
    answer protobuf per decision, the metric series per result and reason.
    """

    def __init__(
        self,
        *,
        store: PolicyStore,
        metrics: AuthzMetrics,
        identities: bool = False,
        trust_domain: str = "cluster.local",
        cache: DecisionCache[Decision] | None = None,
    ) -> None:
        self._store = store
        self._checks = metrics.checks
        self._identities = identities
        self._trust_domain = trust_domain
        self._cache = cache
        self._decisions = InfoLines(decisions_log)
        # Pure functions of frozen values, remembered: equal decisions give equal answers,
        # equal peer properties the same caller (each Check still reads its own channel's).
        self._response_of = functools.lru_cache(maxsize=ANSWERS_KEPT)(response_of)
        self._caller_of_peer = functools.lru_cache(maxsize=CALLERS_KEPT)(_caller_of_peer)
        self._decision_members = functools.lru_cache(maxsize=ANSWERS_KEPT)(decision_members)

    async def Check(
        self, check_request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        request = NO_REQUEST
        caller: Caller | None = None
        try:
            caller = self._caller(context) if self._identities else None
            request = request_of(check_request)
            decision = check(
                request, self._store, header_bytes=header_bytes_of(check_request), caller=caller,
                trust_domain=self._trust_domain, cache=self._cache,
            )  # fmt: skip
        except Exception as exc:  # deny, never let an error escape or a request through
            log.exception("check failed", extra={"fields": {"event": "check-error"}})
            decision = Decision(
                False, f"meshguard failed: internal error ({type(exc).__name__})",
                kind=Reason.INTERNAL_ERROR,
            )  # fmt: skip
        elapsed = time.perf_counter() - started
        self._record(request, decision, elapsed, caller)
        return self._response_of(decision)

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        auth = context.auth_context()
        security = tuple(auth.get(SECURITY_PROPERTY, ()))
        return self._caller_of_peer(security, tuple(auth.get(URI_PROPERTY, ())))

    def _record(
        self,
        request: Request,
        decision: Decision,
        elapsed: float,
        caller: Caller | None,
    ) -> None:
        self._checks.record(decision, elapsed)
        identity = caller.identity.spiffe_id if caller and caller.identity else None
        if self._decisions.enabled:
            described = Described(
                request.pod, identity, request.method, request.path, request.port,
                request.source_address, decision,
            )  # fmt: skip
            remembered = len(request.path or "") <= MAX_REMEMBERED_PATH
            members_of = self._decision_members if remembered else decision_members
            repeated = members_of(described)
            self._decisions.write("decision", {"us": round(elapsed * 1e6)}, repeated=repeated)
        if decision.kind in (Reason.NO_IDENTITY, Reason.IDENTITY_MISMATCH):
            log.warning(
                "Check denied on the caller's identity: %s",
                decision.reason,
                extra={
                    "fields": {
                        "event": "identity-denied",
                        "kind": decision.kind.value,
                        "pod": request.pod,
                        "caller": identity,
                    }
                },
            )


async def _serve_when_synced(
    store: PolicyStore, health_service: health.aio.HealthServicer, stop: asyncio.Event
) -> None:
    """NOT_SERVING until the store has synced, then SERVING."""
    while not store.is_synced():
        if stop.is_set():
            return
        await asyncio.sleep(READY_POLL_SECONDS)
    for service in ("", SERVICE_NAME):
        await health_service.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("pod cache synced: serving", extra={"fields": {"event": "ready"}})


async def serve_authz(settings: AuthzSettings, *, store: PolicyStore, stop: asyncio.Event) -> None:
    """Serve Check and health until ``stop`` is set."""
    cache: DecisionCache[Decision] = DecisionCache()
    metrics = AuthzMetrics(store, cache)
    # SO_REUSEPORT (gRPC's default on Linux, set explicitly): worker processes share the port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(
            store=store, metrics=metrics, identities=settings.tls is not None,
            trust_domain=settings.trust_domain, cache=cache,
        ),
        server,
    )  # fmt: skip
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    for service in ("", SERVICE_NAME):
        await health_service.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.port}"
    if settings.tls is None:
        bound = server.add_insecure_port(address)
        log.warning(
            "authz serving plaintext: callers' identities are not checked",
            extra={"fields": {"event": "plaintext"}},
        )
        if is_loopback(settings.host) and not is_protected_port(settings.port):
            log.warning(  # a test's random port is fine; a pod's is not (issue 23.6)
                unprotected_authz_port(settings.port),
                extra={"fields": {"event": "unprotected_port", "port": settings.port}},
            )
    else:
        bound = server.add_secure_port(address, server_credentials(settings.tls))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    # What startup made (modules, the policies, the certificates) lives as long as the
    # server: out of the collector's generations, it is not traversed again and again by the
    # collections that a Check's short-lived objects trigger.
    gc.collect()
    gc.freeze()
    await server.start()
    log.info(
        "authz listening",
        extra={"fields": {"event": "serving", "address": address, "mtls": bool(settings.tls)}},
    )
    ready = asyncio.create_task(_serve_when_synced(store, health_service, stop))
    try:
        await stop.wait()
    finally:
        ready.cancel()
        await health_service.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
