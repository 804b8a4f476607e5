"""The pod LIST and WATCH of the authz server's cache, over the Kubernetes API (HTTPS).

Stdlib HTTP (``http.client``, ``ssl``): the pods arrive as JSON and are read as plain dicts,
a page at a time, never as client-library models (10,000 pods would cost seconds and
hundreds of MB). What it asks the API server, as client-go's reflector does:

- ``GET /api/v1/pods?labelSelector=meshguard.io/admitted=true&limit=100[&continue=...]``:
  only the pods meshguard admitted (selected by the API server), in pages; the list's
  ``resourceVersion`` is where the watch starts. An expired ``continue`` token (410) starts
  the list again.
- ``GET /api/v1/pods?watch=1&labelSelector=...&resourceVersion=RV&allowWatchBookmarks=true
  &timeoutSeconds=N``: events after RV, bookmarks that advance RV on a quiet cluster.
- 410 Gone (as the HTTP status, or as an ERROR event): :class:`ResourceExpired`, the caller
  lists again. Any other failure is an :class:`ApiError` naming what the server said.

The bearer token is read from its file for every request (Kubernetes rotates bound service
account tokens in place). Outside a cluster the kubeconfig is read with the ``kubernetes``
package's loader (server, CA, token or client certificate).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.errors import MeshguardFailure

SERVICE_ACCOUNT_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ADMITTED_SELECTOR: Final = (
    f"{annotation_keys.ADMITTED_LABEL}={annotation_keys.ADMITTED_LABEL_VALUE}"
)
#: Pods per LIST page: a page (1.2 MB at 100 injected pods) is parsed at once, holding the
#: GIL; at 500 a relist of 10,000 pods paused single Checks for up to ~0.1 s, at 100 for 15 ms
#: (p99.9, benchmarks/authz_store.py), for about 20% more time to list.
PAGE_SIZE: Final = 100
#: Seconds to wait for an answer to a LIST page (a WATCH waits its timeoutSeconds more).
REQUEST_TIMEOUT: Final = 30.0
MAX_LINE_BYTES: Final = 16 * 1024 * 1024


class ApiError(MeshguardFailure):
    """The API server could not be reached, refused the request, or answered garbage."""


class ResourceExpired(ApiError):
    """410 Gone: the resourceVersion (or continue token) is older than the server keeps."""


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK, and its object."""

    kind: str
    pod: Mapping[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.pod.get("metadata") or {}).get("resourceVersion") or "")


@dataclass(frozen=True)
class PodPage:
    pods: list[Mapping[str, Any]]
    #: The list's resourceVersion (the same on every page of one list).
    resource_version: str


@dataclass(frozen=True, kw_only=True)
class ApiServer:
    """Where the API server is and how to authenticate to it."""

    host: str
    port: int
    ca_file: str | None
    token_file: Path | None = None
    token: str | None = None  # a kubeconfig's static token
    cert_file: str | None = None  # a kubeconfig's client certificate
    key_file: str | None = None
    #: Only the pods of this node (``spec.nodeName=NODE``), or all nodes' when None.
    node_name: str | None = None
    labels: str = ADMITTED_SELECTOR
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def tls(self) -> ssl.SSLContext:
        if self.context is not None:
            return self.context
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ApiError(f"cannot load the API server's TLS files: {exc}") from None
        return context

    def bearer(self) -> str | None:
        if self.token_file is None:
            return self.token
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiError(f"cannot read the API token {self.token_file}: {exc}") from None
        if not token:
            raise ApiError(f"the API token {self.token_file} is empty")
        return token


def in_cluster(environ: Mapping[str, str]) -> ApiServer | None:
    """The API server of the pod's cluster (its service account), or None outside one."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return ApiServer(
        host=host,
        port=int(port),
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        token_file=SERVICE_ACCOUNT_DIR / "token",
    )


def from_kubeconfig() -> ApiServer:
    """The current context of the kubeconfig (``KUBECONFIG`` or ~/.kube/config)."""
    from kubernetes import client, config  # noqa: PLC0415 - only outside a cluster

    configuration = client.Configuration()
    try:
        config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise ApiError(f"no API server: not in a cluster, and no kubeconfig ({exc})") from None
    url = urllib.parse.urlsplit(configuration.host)
    if url.scheme != "https" or url.hostname is None:
        raise ApiError(f"the kubeconfig's server {configuration.host!r}: expected https://")
    keys = configuration.api_key or {}  # "BearerToken" (kubernetes >= 30) or "authorization"
    authorization = str(keys.get("BearerToken") or keys.get("authorization") or "")
    return ApiServer(
        host=url.hostname,
        port=url.port or 443,
        ca_file=configuration.ssl_ca_cert,
        token=authorization.removeprefix("Bearer ") or None,
        cert_file=configuration.cert_file,
        key_file=configuration.key_file,
    )


def api_server(*, node_name: str | None = None) -> ApiServer:
    """In-cluster when run in a pod, else the kubeconfig."""
    found = in_cluster(os.environ) or from_kubeconfig()
    return dataclasses.replace(found, node_name=node_name)


class HttpPodSource:
    """:class:`~meshguard.authz.store.PodSource` over the API server's HTTP interface."""

    def __init__(self, server: ApiServer, *, page_size: int = PAGE_SIZE) -> None:
        self._server = server
        self._page_size = page_size
        self._context = server.tls()

    def list(self) -> Iterator[PodPage]:
        """The admitted pods, page by page, over one kept-alive connection (410 on a
        continue token: :class:`ResourceExpired`)."""
        token = ""
        connection: http.client.HTTPSConnection | None = None
        try:
            while True:
                query = {"labelSelector": self._server.labels, "limit": str(self._page_size)}
                query.update(self._fields())
                if token:
                    query["continue"] = token
                connection, document = self._get_json(query, connection=connection)
                metadata = document.get("metadata") or {}
                items = document.get("items")
                if not isinstance(items, list) or document.get("kind") not in {"PodList", None}:
                    raise ApiError("the API server's answer to a pod LIST is not a PodList")
                resource_version = str(metadata.get("resourceVersion") or "")
                yield PodPage(pods=items, resource_version=resource_version)
                token = str(metadata.get("continue") or "")
                if not token:
                    return
        finally:
            if connection is not None:
                connection.close()

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        """Events after ``resource_version`` until the server ends the watch."""
        query = {
            "watch": "1",
            "labelSelector": self._server.labels,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
            **self._fields(),
        }
        connection, response = self._open(query, timeout=timeout_seconds + REQUEST_TIMEOUT)
        try:
            while True:
                line = response.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES:
                    raise ApiError("a watch event exceeds 16 MiB")
                if line.strip():
                    yield _event(line)
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"the pod watch broke: {exc}") from None
        finally:
            connection.close()

    def _fields(self) -> dict[str, str]:
        node = self._server.node_name
        return {"fieldSelector": f"spec.nodeName={node}"} if node else {}

    def _get_json(
        self, query: Mapping[str, str], *, connection: http.client.HTTPSConnection | None
    ) -> tuple[http.client.HTTPSConnection | None, dict[str, Any]]:
        """One LIST page; the connection to reuse for the next (None if the server closes)."""
        connection, response = self._open(query, timeout=REQUEST_TIMEOUT, connection=connection)
        try:
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ApiError(f"the pod LIST broke: {exc}") from None
        if response.will_close:
            connection.close()
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            connection.close()
            raise ApiError("the API server's answer to a pod LIST is not a JSON object")
        return (None if response.will_close else connection), document

    def _open(
        self,
        query: Mapping[str, str],
        *,
        timeout: float,
        connection: http.client.HTTPSConnection | None = None,
    ) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        path = "/api/v1/pods?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": "meshguard-authz"}
        token = self._server.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if connection is None:
            connection = http.client.HTTPSConnection(
                self._server.host, self._server.port, timeout=timeout, context=self._context
            )
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            where = f"{self._server.host}:{self._server.port}"
            raise ApiError(f"cannot reach the API server {where}: {exc}") from None
        if response.status != http.HTTPStatus.OK:
            message = _status_message(response)
            connection.close()
            error = ResourceExpired if response.status == http.HTTPStatus.GONE else ApiError
            raise error(f"pod {'WATCH' if 'watch' in query else 'LIST'}: HTTP {response.status}"
                        f" {message}".rstrip())  # fmt: skip
        return connection, response


def _event(line: bytes) -> WatchEvent:
    try:
        document = json.loads(line)
    except ValueError:
        raise ApiError("a watch event is not JSON") from None
    kind = document.get("type") if isinstance(document, dict) else None
    obj = document.get("object") if isinstance(document, dict) else None
    if not isinstance(obj, dict):
        raise ApiError(f"a watch event ({kind!r}) has no object")
    if kind == "ERROR":
        code, message = obj.get("code"), obj.get("message") or obj.get("reason") or ""
        error = ResourceExpired if code == http.HTTPStatus.GONE else ApiError
        raise error(f"pod WATCH: ERROR event {code} {message}".rstrip())
    if kind not in {"ADDED", "MODIFIED", "DELETED", "BOOKMARK"}:
        raise ApiError(f"a watch event of unknown type {kind!r}")
    return WatchEvent(kind, obj)


def _status_message(response: http.client.HTTPResponse) -> str:
    """The ``message`` of a Kubernetes Status body, if the answer carries one."""
    try:
        document = json.loads(response.read(64 * 1024) or b"null")
    except (ValueError, OSError, http.client.HTTPException):
        return str(response.reason or "")
    message = document.get("message") if isinstance(document, dict) else None
    return f"({message})" if isinstance(message, str) else str(response.reason or "")
