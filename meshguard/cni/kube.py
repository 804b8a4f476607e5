"""Reading one pod from the API server: HTTPS, the service account's bearer token, bounded.

Through :mod:`meshguard.kube_api` (stdlib only): the plugin runs at every pod start and
imports little. Any failure — unreachable, TLS, 401/403/404, a timeout, a body that is not a
pod — raises :class:`~meshguard.cni.protocol.CniError` with what went wrong, so the caller
fails closed.

The one-process plugin opens one connection for its one GET. The node agent, answering every
call of the node in-process, keeps its connections: :class:`KeptAlive` reuses an idle
connection (TLS handshake once, not per pod), drops one the server closed, and retries a GET
once on a fresh connection when a reused one fails, all within the GET's timeout. The pod
is read fresh at every ADD and CHECK, never from a cache: the sandbox is created right after
the pod is scheduled, and an older view of the pod could lack its admitted ruleset.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import select
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from meshguard import kube_api
from meshguard.cni.protocol import CniError, Code, KubernetesConfig
from meshguard.kube_api import SERVICE_ACCOUNT_DIR, ApiAccess

MAX_POD_BYTES: Final = 4 * 1024 * 1024
#: Idle connections kept per API server (each call holds one while its GET runs).
MAX_IDLE_CONNECTIONS: Final = 8


class Connections(Protocol):
    """Where a GET runs: :class:`KeptAlive` (the node agent), or a connection of its own."""

    def get(self, access: ApiAccess, path: str, *, what: str, limit: int) -> bytes: ...


def api_access(config: KubernetesConfig, environ: Mapping[str, str]) -> ApiAccess:
    """The API server, token and CA from the plugin's configuration, else in-cluster."""
    if config.kubeconfig is not None:
        return read_kubeconfig(Path(config.kubeconfig), timeout=config.timeout_seconds)
    server = config.server if config.server is not None else kube_api.in_cluster_server(environ)
    if server is None:
        raise CniError(
            Code.INVALID_CONFIG,
            "no API server: set kubernetes.server in meshguard-cni's configuration"
            " (or run in a pod with KUBERNETES_SERVICE_HOST/PORT)",
        )
    if not server.startswith("https://"):
        raise CniError(Code.INVALID_CONFIG, f"kubernetes.server {server!r}: expected https://")
    try:
        token = kube_api.read_token(Path(config.token_file or SERVICE_ACCOUNT_DIR / "token"))
    except kube_api.ApiError as exc:
        raise CniError(Code.IO_FAILURE, str(exc)) from None
    ca_file = config.ca_file or str(SERVICE_ACCOUNT_DIR / "ca.crt")
    return ApiAccess(server=server, token=token, ca_file=ca_file, timeout=config.timeout_seconds)


def read_kubeconfig(path: Path, *, timeout: float) -> ApiAccess:
    """Server, bearer token and inline CA of the kubeconfig's current context (the JSON form
    ``meshguard cni install`` writes; any clusters/users layout kubectl reads)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CniError(Code.IO_FAILURE, f"cannot read the kubeconfig {path}: {exc}") from None
    try:
        contexts = {c["name"]: c["context"] for c in document["contexts"]}
        context = contexts[document["current-context"]]
        cluster = {c["name"]: c["cluster"] for c in document["clusters"]}[context["cluster"]]
        user = {u["name"]: u["user"] for u in document["users"]}[context["user"]]
        server, token = cluster["server"], user["token"]
        ca_pem = base64.b64decode(cluster["certificate-authority-data"], validate=True).decode()
    except (KeyError, TypeError, ValueError) as exc:
        raise CniError(
            Code.INVALID_CONFIG,
            f"kubeconfig {path}: expected the current context's cluster server and"
            f" certificate-authority-data and its user's token ({type(exc).__name__}: {exc})",
        ) from None
    if not isinstance(server, str) or not server.startswith("https://"):
        raise CniError(
            Code.INVALID_CONFIG, f"kubeconfig {path}: server {server!r}: expected https://"
        )
    if not isinstance(token, str) or not token:
        raise CniError(Code.INVALID_CONFIG, f"kubeconfig {path}: the user's token is empty")
    return ApiAccess(server=server, token=token, ca_file=None, ca_pem=ca_pem, timeout=timeout)


def get_pod(
    access: ApiAccess, *, namespace: str, name: str, connections: Connections | None = None
) -> dict[str, Any]:
    """GET /api/v1/namespaces/NS/pods/NAME; the pod object, or :class:`CniError`."""
    path = (
        f"/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
        f"/pods/{urllib.parse.quote(name, safe='')}"
    )
    where = f"pod {namespace}/{name}"
    try:
        context = access.tls() if connections is None else None
    except kube_api.ApiError as exc:
        raise CniError(Code.IO_FAILURE, f"cannot load the API CA {exc.cause}") from None
    try:
        if connections is None:
            body = kube_api.request(
                dataclasses.replace(access, context=context), "GET", path, what=where,
                limit=MAX_POD_BYTES,
            )  # fmt: skip
        else:
            body = connections.get(access, path, what=where, limit=MAX_POD_BYTES)
    except CaUnavailable as exc:
        raise CniError(Code.IO_FAILURE, f"cannot load the API CA {exc.cause}") from None
    except kube_api.ApiError as exc:
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"cannot read {where} from the API server {access.server}: {exc.cause}",
            details=access.server + path,
        ) from None
    pod = kube_api.json_object(body)
    if pod is None or pod.get("kind") != "Pod" or not isinstance(pod.get("metadata"), dict):
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"cannot read {where}: the API server's answer is not a Pod object",
            details=body[:200].decode("utf-8", "replace"),
        )
    return pod


class CaUnavailable(kube_api.ApiError):
    """The API server's CA (or the client certificate) cannot be loaded."""


_Key = tuple[str, str | None, str | None, str | None, str | None]


class KeptAlive:
    """Idle connections to API servers, reused across GETs; safe for concurrent callers
    (each GET takes a connection of its own). TLS contexts are built once per CA."""

    def __init__(self, *, max_idle: int = MAX_IDLE_CONNECTIONS) -> None:
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[http.client.HTTPSConnection]] = {}
        self._contexts: dict[_Key, ssl.SSLContext] = {}

    def get(self, access: ApiAccess, path: str, *, what: str, limit: int) -> bytes:
        """The 2xx answer's body, read within ``access.timeout`` in all; :class:`ApiError`."""
        key: _Key = (access.server, access.ca_file, access.ca_pem, access.cert_file,
                     access.key_file)  # fmt: skip
        context = self._context(key, access)
        deadline = time.monotonic() + access.timeout
        while True:
            connection, reused = self._take(key, access, context)
            left = deadline - time.monotonic()
            connection.timeout = left
            if connection.sock is not None:
                connection.sock.settimeout(left)
            try:
                response = kube_api.send(connection, access, "GET", path, what=what)
                body = kube_api.read_body(connection, response, what=what, limit=limit)
            except kube_api.ApiError as exc:
                # A kept connection the server closed between our check and the request:
                # once more on a new one, in what is left of the timeout.
                if reused and exc.status is None and deadline - time.monotonic() > 0:
                    continue
                raise
            self._give_back(key, connection)
            return body

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _context(self, key: _Key, access: ApiAccess) -> ssl.SSLContext:
        with self._lock:
            context = self._contexts.get(key)
        if context is not None:
            return context
        try:
            context = access.tls()
        except kube_api.ApiError as exc:
            raise CaUnavailable(str(exc), cause=exc.cause) from None
        with self._lock:
            if len(self._contexts) >= self._max_idle:  # CAs rotated many times: start over
                self._contexts.clear()
            self._contexts[key] = context
        return context

    def _take(
        self, key: _Key, access: ApiAccess, context: ssl.SSLContext
    ) -> tuple[http.client.HTTPSConnection, bool]:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                connection = idle.pop() if idle else None
            if connection is None:
                return kube_api.connect(access, context=context), False
            if _still_open(connection):
                return connection, True
            connection.close()

    def _give_back(self, key: _Key, connection: http.client.HTTPSConnection) -> None:
        if connection.sock is None:  # the server said it closes: read_body closed it
            return
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(connection)
                return
        connection.close()


def _still_open(connection: http.client.HTTPSConnection) -> bool:
    """An idle connection the server has not closed: nothing to read on it (a readable idle
    socket is at EOF, or holds bytes nobody asked for)."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
