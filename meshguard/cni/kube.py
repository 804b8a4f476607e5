"""Reading one pod from the API server: HTTPS, the service account's bearer token, bounded.

Stdlib only (``urllib``, ``ssl``): the plugin runs at every pod start and imports little. Any
failure — unreachable, TLS, 401/403/404, a timeout, a body that is not a pod — raises
:class:`~meshguard.cni.protocol.CniError` with what went wrong, so the caller fails closed.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from meshguard.cni.protocol import CniError, Code, KubernetesConfig

SERVICE_ACCOUNT_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_POD_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ApiAccess:
    server: str  # https://host:port
    token: str
    ca_file: str | None
    timeout: float
    ca_pem: str | None = None  # the CA inline (a kubeconfig's certificate-authority-data)


def api_access(config: KubernetesConfig, environ: Mapping[str, str]) -> ApiAccess:
    """The API server, token and CA from the plugin's configuration, else in-cluster."""
    if config.kubeconfig is not None:
        return read_kubeconfig(Path(config.kubeconfig), timeout=config.timeout_seconds)
    server = config.server
    if server is None:
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise CniError(
                Code.INVALID_CONFIG,
                "no API server: set kubernetes.server in meshguard-cni's configuration"
                " (or run in a pod with KUBERNETES_SERVICE_HOST/PORT)",
            )
        server = f"https://{f'[{host}]' if ':' in host else host}:{port}"
    if not server.startswith("https://"):
        raise CniError(Code.INVALID_CONFIG, f"kubernetes.server {server!r}: expected https://")
    token_path = Path(config.token_file or SERVICE_ACCOUNT_DIR / "token")
    try:
        token = token_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CniError(Code.IO_FAILURE, f"cannot read the API token {token_path}: {exc}") from None
    if not token:
        raise CniError(Code.IO_FAILURE, f"the API token {token_path} is empty")
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


def get_pod(access: ApiAccess, *, namespace: str, name: str) -> dict[str, Any]:
    """GET /api/v1/namespaces/NS/pods/NAME; the pod object, or :class:`CniError`."""
    path = (
        f"/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
        f"/pods/{urllib.parse.quote(name, safe='')}"
    )
    request = urllib.request.Request(  # noqa: S310 - https only, checked in api_access
        access.server + path,
        headers={"Authorization": f"Bearer {access.token}", "Accept": "application/json"},
    )
    where = f"pod {namespace}/{name}"
    try:
        context = ssl.create_default_context(cafile=access.ca_file, cadata=access.ca_pem)
    except (OSError, ssl.SSLError, ValueError) as exc:
        where_ca = access.ca_file or "(the kubeconfig's certificate-authority-data)"
        raise CniError(Code.IO_FAILURE, f"cannot load the API CA {where_ca}: {exc}") from None
    try:
        with urllib.request.urlopen(request, timeout=access.timeout, context=context) as response:  # noqa: S310
            body = response.read(MAX_POD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        reason = _status_message(exc)
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"cannot read {where} from the API server: HTTP {exc.code} {reason}".rstrip(),
            details=access.server + path,
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(exc.reason if isinstance(exc, urllib.error.URLError) else exc)
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"cannot read {where} from the API server {access.server}: {reason}",
            details=access.server + path,
        ) from None
    if len(body) > MAX_POD_BYTES:
        raise CniError(Code.RULESET_UNAVAILABLE, f"{where}: the API answer exceeds 4 MiB")
    try:
        pod = json.loads(body)
    except ValueError:
        pod = None
    if (
        not isinstance(pod, dict)
        or pod.get("kind") != "Pod"
        or not isinstance(pod.get("metadata"), dict)
    ):
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"cannot read {where}: the API server's answer is not a Pod object",
            details=body[:200].decode("utf-8", "replace"),
        )
    return pod


def _status_message(error: urllib.error.HTTPError) -> str:
    """The ``message`` of a Kubernetes Status body, if the answer carries one."""
    try:
        document = json.loads(error.read(64 * 1024) or b"null")
    except (ValueError, OSError):
        return str(error.reason or "")
    message = document.get("message") if isinstance(document, dict) else None
    return f"({message})" if isinstance(message, str) else str(error.reason or "")
