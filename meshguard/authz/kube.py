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
  lists again. Any other failure is a :class:`~meshguard.kube_api.ApiError` naming what the
  server said.

The requests, TLS and the Status messages are :mod:`meshguard.kube_api`'s; the bearer token
is read from its file for every request (Kubernetes rotates bound service account tokens in
place). Outside a cluster the kubeconfig is read with the ``kubernetes``
package's loader (server, CA, token or client certificate).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshguard import annotation_keys, kube_api
from meshguard.kube_api import SERVICE_ACCOUNT_DIR, ApiAccess, ApiError

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
#: A LIST page larger than this is refused (100 injected pods are about 1.2 MB).
MAX_PAGE_BYTES: Final = 256 * 1024 * 1024


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


def in_cluster(environ: Mapping[str, str]) -> ApiAccess | None:
    """The API server of the pod's cluster (its service account), or None outside one."""
    server = kube_api.in_cluster_server(environ)
    if server is None:
        return None
    return ApiAccess(
        server=server,
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        token_file=SERVICE_ACCOUNT_DIR / "token",
        timeout=REQUEST_TIMEOUT,
    )


def from_kubeconfig() -> ApiAccess:
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
    return ApiAccess(
        server=configuration.host,
        ca_file=configuration.ssl_ca_cert,
        token=authorization.removeprefix("Bearer ") or None,
        cert_file=configuration.cert_file,
        key_file=configuration.key_file,
        timeout=REQUEST_TIMEOUT,
    )


def api_access() -> ApiAccess:
    """In-cluster when run in a pod, else the kubeconfig."""
    return in_cluster(os.environ) or from_kubeconfig()


class HttpPodSource:
    """:class:`~meshguard.authz.store.PodSource` over the API server's HTTP interface: the
    pods with ``labels`` (meshguard's admitted ones), of ``node_name`` only (the field
    selector ``spec.nodeName``) or of every node when None."""

    def __init__(
        self,
        access: ApiAccess,
        *,
        node_name: str | None = None,
        labels: str = ADMITTED_SELECTOR,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._access = access
        self._page_size = page_size
        self._selectors = {"labelSelector": labels}
        if node_name:
            self._selectors["fieldSelector"] = f"spec.nodeName={node_name}"
        self._context = access.tls()

    def list(self) -> Iterator[PodPage]:
        """The admitted pods, page by page, over one kept-alive connection (410 on a
        continue token: :class:`ResourceExpired`)."""
        token = ""
        # Reopened by http.client if the server closed it after a page.
        connection = kube_api.connect(self._access, context=self._context, timeout=REQUEST_TIMEOUT)
        try:
            while True:
                query = {**self._selectors, "limit": str(self._page_size)}
                if token:
                    query["continue"] = token
                response = self._send(connection, query, what="pod LIST")
                body = kube_api.read_body(connection, response, what="pod LIST",
                                          limit=MAX_PAGE_BYTES)  # fmt: skip
                document = kube_api.json_object(body)
                if document is None:
                    raise ApiError("the API server's answer to a pod LIST is not a JSON object")
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
            connection.close()

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        """Events after ``resource_version`` until the server ends the watch."""
        query = {
            "watch": "1",
            **self._selectors,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        connection = kube_api.connect(
            self._access, context=self._context, timeout=timeout_seconds + REQUEST_TIMEOUT
        )
        try:
            response = self._send(connection, query, what="pod WATCH")
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

    def _send(
        self, connection: http.client.HTTPSConnection, query: Mapping[str, str], *, what: str
    ) -> http.client.HTTPResponse:
        path = "/api/v1/pods?" + urllib.parse.urlencode(query)
        try:
            return kube_api.send(connection, self._access, "GET", path, what=what)
        except ApiError as exc:
            if exc.status == http.HTTPStatus.GONE:
                raise ResourceExpired(str(exc), cause=exc.cause, status=exc.status) from None
            raise


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
