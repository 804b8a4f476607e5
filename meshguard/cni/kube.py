"""Reading one pod from the API server: HTTPS, the service account's bearer token, bounded.

Through :mod:`meshguard.kube_api` (stdlib only): the plugin runs at every pod start and
imports little. Any failure — unreachable, TLS, 401/403/404, a timeout, a body that is not a
pod — raises :class:`~meshguard.cni.protocol.CniError` with what went wrong, so the caller
fails closed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from meshguard import kube_api
from meshguard.cni.protocol import CniError, Code, KubernetesConfig
from meshguard.kube_api import SERVICE_ACCOUNT_DIR, ApiAccess

MAX_POD_BYTES: Final = 4 * 1024 * 1024


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


def get_pod(access: ApiAccess, *, namespace: str, name: str) -> dict[str, Any]:
    """GET /api/v1/namespaces/NS/pods/NAME; the pod object, or :class:`CniError`."""
    path = (
        f"/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
        f"/pods/{urllib.parse.quote(name, safe='')}"
    )
    where = f"pod {namespace}/{name}"
    try:
        context = access.tls()
    except kube_api.ApiError as exc:
        raise CniError(Code.IO_FAILURE, f"cannot load the API CA {exc.cause}") from None
    try:
        body = kube_api.request(
            dataclasses.replace(access, context=context), "GET", path, what=where,
            limit=MAX_POD_BYTES,
        )  # fmt: skip
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
