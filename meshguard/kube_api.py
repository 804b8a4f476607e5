"""The Kubernetes API server over HTTPS, as every meshguard component talks to it.

What the CNI plugin (one GET per pod start), the node agent's repairer (LIST and DELETE) and
the authz server's pod cache (paginated LIST and a streaming WATCH on kept-alive
connections) share:

- :class:`ApiAccess`: where the server is (an ``https://`` URL, any path prefix kept), the
  bearer token (a static one, or a file read at each request: Kubernetes rotates bound
  service-account tokens in place), the CA and client certificate, the timeout;
- :func:`in_cluster_server` and :func:`read_token`: a pod's own API server and token;
- :func:`connect`, :func:`send`, :func:`read_body`, and :func:`request` (the three in one,
  for a single call), with :func:`json_object` to read the answer;
- :class:`ApiError`, naming the request and what went wrong: the server unreachable (TLS,
  timeout), its HTTP status with the message of the Kubernetes ``Status`` it answered, an
  answer too large. The caller checks the answer's kind and maps the error to its own.

Stdlib only (``http.client``, ``ssl``, ``json``): the CNI plugin imports this module at
every pod start, so it loads nothing heavy (no ``urllib.request``, no ``asyncio``).
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meshguard.errors import MeshguardFailure

SERVICE_ACCOUNT_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Bytes of an error answer read for its Status message.
MAX_STATUS_BYTES: Final = 64 * 1024


class ApiError(MeshguardFailure):
    """The API server could not be reached, refused the request, or answered garbage."""

    def __init__(self, message: str, *, cause: str = "", status: int | None = None) -> None:
        super().__init__(message)
        #: What went wrong, without the request's name (for a caller's own message).
        self.cause = cause or message
        #: The HTTP status the server answered with; None when it did not answer.
        self.status = status


@dataclass(frozen=True, kw_only=True)
class ApiAccess:
    """Where the API server is, how to trust it and how to authenticate to it."""

    server: str  # https://host:port[/prefix]
    token: str | None = None
    token_file: Path | None = None  # read at each request (rotated in place); wins over token
    ca_file: str | None = None
    ca_pem: str | None = None  # the CA inline (a kubeconfig's certificate-authority-data)
    cert_file: str | None = None  # a client certificate (a kubeconfig's)
    key_file: str | None = None
    timeout: float = 30.0
    #: A TLS context to use instead of one built from the files above.
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def tls(self) -> ssl.SSLContext:
        """The TLS context that trusts the CA (and presents the client certificate)."""
        if self.context is not None:
            return self.context
        try:
            context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_pem)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            where = ", ".join(name for name in (self.ca_file, self.cert_file) if name) or (
                "the inline certificate-authority-data" if self.ca_pem else "the system CAs"
            )
            raise ApiError(
                f"cannot load the API server's CA or client certificate ({where}): {exc}",
                cause=f"{where}: {exc}",
            ) from None
        return context

    def bearer(self) -> str | None:
        """The token to send (read from its file now, when there is one)."""
        return self.token if self.token_file is None else read_token(self.token_file)


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """``https://host:port`` of the pod's own cluster (``KUBERNETES_SERVICE_HOST``/``_PORT``),
    or None outside one."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://{f'[{host}]' if ':' in host else host}:{port}"


def read_token(path: Path) -> str:
    """A bearer token from its file; :class:`ApiError` when unreadable or empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiError(f"cannot read the API token {path}: {exc}") from None
    if not token:
        raise ApiError(f"the API token {path} is empty")
    return token


def connect(
    access: ApiAccess, *, context: ssl.SSLContext, timeout: float | None = None
) -> http.client.HTTPSConnection:
    """A connection to the server (opened by the first :func:`send`); reusable for more
    requests while the server keeps it open."""
    url = _url(access)
    return http.client.HTTPSConnection(
        url.hostname or "",
        url.port or 443,
        timeout=access.timeout if timeout is None else timeout,
        context=context,
    )


def send(
    connection: http.client.HTTPSConnection,
    access: ApiAccess,
    method: str,
    path: str,
    *,
    what: str,
    body: Mapping[str, Any] | None = None,
) -> http.client.HTTPResponse:
    """Send one request (``path`` below the server's prefix); its 2xx response, headers read.

    Anything else raises :class:`ApiError` named ``what``, and closes the connection."""
    headers = {"Accept": "application/json", "User-Agent": "meshguard"}
    token = access.bearer()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, _url(access).path.rstrip("/") + path, data, headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise ApiError(
            f"{what}: cannot reach the API server {access.server}: {_reason(exc)}",
            cause=_reason(exc),
        ) from None
    if not 200 <= response.status < 300:
        message = f"HTTP {response.status} {status_message(response)}".rstrip()
        connection.close()
        raise ApiError(f"{what}: {message}", cause=message, status=response.status)
    return response


def read_body(
    connection: http.client.HTTPSConnection,
    response: http.client.HTTPResponse,
    *,
    what: str,
    limit: int,
) -> bytes:
    """The whole answer, at most ``limit`` bytes; the connection is closed unless it can
    carry the next request (check ``connection.sock``)."""
    try:
        body = response.read(limit + 1)
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise ApiError(
            f"{what}: the answer broke off: {_reason(exc)}", cause=_reason(exc)
        ) from None
    if len(body) > limit:
        connection.close()
        cause = f"the API answer exceeds {_size(limit)}"
        raise ApiError(f"{what}: {cause}", cause=cause)
    if response.will_close:
        connection.close()
    return body


def request(
    access: ApiAccess,
    method: str,
    path: str,
    *,
    what: str,
    limit: int,
    body: Mapping[str, Any] | None = None,
) -> bytes:
    """One request on its own connection: the 2xx answer's body, or :class:`ApiError`."""
    connection = connect(access, context=access.tls())
    try:
        response = send(connection, access, method, path, what=what, body=body)
        return read_body(connection, response, what=what, limit=limit)
    finally:
        connection.close()


def json_object(body: bytes) -> dict[str, Any] | None:
    """The answer as a JSON object; None when it is not JSON or not an object."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def status_message(response: http.client.HTTPResponse) -> str:
    """``(message)`` of the Kubernetes Status an error answer carries, else the HTTP reason."""
    try:
        document = json_object(response.read(MAX_STATUS_BYTES))
    except (OSError, http.client.HTTPException):
        document = None
    message = document.get("message") if document is not None else None
    return f"({message})" if isinstance(message, str) else str(response.reason or "")


def _url(access: ApiAccess) -> urllib.parse.SplitResult:
    try:
        url = urllib.parse.urlsplit(access.server)
        valid = url.scheme == "https" and bool(url.hostname) and (url.port or 443) > 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ApiError(f"API server {access.server!r}: expected https://host[:port]")
    return url


def _size(limit: int) -> str:
    mib, rest = divmod(limit, 1024 * 1024)
    return f"{mib} MiB" if mib and not rest else f"{limit} bytes"


def _reason(exc: Exception) -> str:
    """What a connection error says (a TLS error's reason, a timeout's "timed out")."""
    return str(exc) or type(exc).__name__
