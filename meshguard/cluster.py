"""The live cluster as ``kubectl`` reaches it, for the operator's commands
(``meshguard describe``/``unprotected``, the ``kubectl meshguard`` plugin).

Configuration is the official ``kubernetes`` client's, never a copy of it: ``--kubeconfig``,
else ``$KUBECONFIG`` (a ``:``-separated list, merged) or ``~/.kube/config``, ``--context``,
the context's namespace, client certificates, tokens and exec credential plugins (EKS, GKE,
AKS); with no kubeconfig file, in a pod, the pod's service account (in-cluster config), as
kubectl falls back to it.

Lists are paginated as kubectl's ``--chunk-size`` (``limit``/``continue``) and each page is
read as JSON and given out object by object (the client's models are not built: 10,000 pods
as models take seconds and hundreds of MB): memory holds one page.

The in-cluster components (the authz server's pod cache, the CNI plugin and its node agent)
keep :mod:`meshguard.kube_api`, the small stdlib client: see docs/operator.md, "Which
Kubernetes client each component uses".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader
from urllib3.exceptions import HTTPError

from meshguard.errors import MeshguardFailure
from meshguard.kube_api import SERVICE_ACCOUNT_DIR

#: Objects per LIST page: kubectl's --chunk-size default.
CHUNK_SIZE: Final = 500
#: Seconds to wait for the server to connect and to answer a page.
REQUEST_TIMEOUT: Final = (10.0, 60.0)
DEFAULT_NAMESPACE: Final = "default"


class ClusterError(MeshguardFailure):
    """The cluster cannot be reached, refused the request, or no configuration reaches it.
    The message is kubectl's for the same failure."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: The HTTP status the API server answered; None when it did not answer.
        self.status = status


@dataclass(frozen=True)
class Cluster:
    """A connection to the API server, and the namespace the configuration defaults to."""

    api: client.CoreV1Api
    namespace: str


def connect(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> Cluster:
    """The cluster kubectl would talk to with these flags."""
    configuration = client.Configuration()
    if kubeconfig is None and context is None and _in_cluster_only(environ):
        namespace = _in_cluster(configuration, environ, service_account_dir)
    else:
        namespace = _from_kubeconfig(configuration, kubeconfig, context)
    return Cluster(api=client.CoreV1Api(client.ApiClient(configuration)), namespace=namespace)


def _in_cluster_only(environ: Mapping[str, str]) -> bool:
    """No kubeconfig file, and a pod's environment: kubectl's in-cluster fallback."""
    if "KUBERNETES_SERVICE_HOST" not in environ or "KUBERNETES_SERVICE_PORT" not in environ:
        return False
    paths = environ.get("KUBECONFIG", "")
    named = [Path(p).expanduser() for p in paths.split(os.pathsep) if p]
    candidates = named or [Path("~/.kube/config").expanduser()]
    return not any(p.exists() for p in candidates)


def _in_cluster(
    configuration: client.Configuration, environ: Mapping[str, str], directory: Path
) -> str:
    loader = InClusterConfigLoader(
        token_filename=str(directory / "token"),
        cert_filename=str(directory / "ca.crt"),
        environ=environ,
    )
    try:
        loader.load_and_set(configuration)
    except config.ConfigException as exc:
        raise ClusterError(f"error: in-cluster configuration: {exc}") from None
    try:
        return (directory / "namespace").read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def _from_kubeconfig(
    configuration: client.Configuration, kubeconfig: str | None, context: str | None
) -> str:
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = (
            active
            if context is None
            else next((c for c in contexts if c.get("name") == context), None)
        )
        if chosen is None:
            raise ClusterError(f'error: context "{context}" does not exist')
        config.load_kube_config(
            config_file=kubeconfig,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except config.ConfigException as exc:
        raise ClusterError(f"error: {_no_config(exc, kubeconfig)}") from None
    except OSError as exc:  # an unreadable file, an exec plugin that cannot start
        raise ClusterError(f"error: {exc}") from None
    namespace = (chosen.get("context") or {}).get("namespace")
    return str(namespace) if namespace else DEFAULT_NAMESPACE


def _no_config(exc: config.ConfigException, kubeconfig: str | None) -> str:
    text = str(exc)
    if "Invalid kube-config file" in text and "No configuration found" in text:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        return f"no configuration has been provided: no kubeconfig at {where}, not in a cluster"
    return text


def list_objects(
    cluster: Cluster,
    *,
    resource: str,
    namespace: str | None,
    selector: str = "",
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[dict[str, Any]]:
    """Every ``pods`` or ``namespaces`` object (of ``namespace``, or of all when None), a
    page of ``chunk_size`` at a time."""
    token: str | None = None
    while True:
        page = _page(
            cluster,
            resource,
            namespace=namespace,
            selector=selector,
            chunk_size=chunk_size,
            token=token,
        )
        items = page.get("items")
        yield from (item for item in items or () if isinstance(item, dict))
        metadata = page.get("metadata")
        token = metadata.get("continue") if isinstance(metadata, dict) else None
        if not token:
            return


def _page(
    cluster: Cluster,
    resource: str,
    *,
    namespace: str | None,
    selector: str,
    chunk_size: int,
    token: str | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {"limit": chunk_size, "label_selector": selector}
    if token:
        options["_continue"] = token
    api = cluster.api
    if resource == "namespaces":
        call = lambda: api.list_namespace(**options, **_RAW)  # noqa: E731
    elif namespace is None:
        call = lambda: api.list_pod_for_all_namespaces(**options, **_RAW)  # noqa: E731
    else:
        call = lambda: api.list_namespaced_pod(namespace, **options, **_RAW)  # noqa: E731
    return _json(_called(call, resource=resource, name=None))


def get_object(cluster: Cluster, *, resource: str, namespace: str, name: str) -> dict[str, Any]:
    """One pod of a namespace, or one namespace."""
    api = cluster.api
    if resource == "namespaces":
        answer = _called(lambda: api.read_namespace(name, **_RAW), resource=resource, name=name)
    else:
        answer = _called(
            lambda: api.read_namespaced_pod(name, namespace, **_RAW), resource=resource, name=name
        )
    return _json(answer)


def proxy_get(
    cluster: Cluster,
    *,
    namespace: str,
    pod: str,
    port: int,
    path: str,
    query: Sequence[tuple[str, str]],
) -> bytes:
    """``GET`` ``path`` of ``pod``'s ``port`` through the API server's pod proxy (the
    caller's RBAC on ``pods/proxy`` decides)."""
    api = cluster.api.api_client

    def call() -> Any:  # noqa: ANN401 - the client's RESTResponse
        method, url, headers, body, post = api.param_serialize(
            "GET", "/api/v1/namespaces/{namespace}/pods/{name}/proxy/{path}",
            path_params={"namespace": namespace, "name": f"{pod}:{port}",
                         "path": path.lstrip("/")},
            query_params=list(query), auth_settings=["BearerToken"],
        )  # fmt: skip
        response = api.call_api(method, url, header_params=headers, body=body,
                                post_params=post, _request_timeout=REQUEST_TIMEOUT)  # fmt: skip
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return response

    return _called(call, resource="pods/proxy", name=pod)


def list_events(cluster: Cluster, *, namespace: str, field_selector: str) -> list[dict[str, Any]]:
    """The Events of ``namespace`` that ``field_selector`` selects (one page)."""
    body = _called(
        lambda: cluster.api.list_namespaced_event(
            namespace, field_selector=field_selector, **_RAW
        ),
        resource="events", name=None,
    )  # fmt: skip
    items = _json(body).get("items")
    return [item for item in items or () if isinstance(item, dict)]


#: The answer's body as bytes (no model built), with kubectl's patience.
_RAW: Final[Mapping[str, Any]] = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}


def _called(call: Any, *, resource: str, name: str | None) -> bytes:  # noqa: ANN401
    try:
        data: bytes = call().data
    except ApiException as exc:
        message = _server_error(exc, resource=resource, name=name)
        raise ClusterError(message, status=exc.status) from None
    except (HTTPError, OSError) as exc:
        raise ClusterError(f"Unable to connect to the server: {_cause(exc)}") from None
    return data


def _json(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ClusterError(
            f"error: the server answered something that is not JSON ({exc})"
        ) from None
    if not isinstance(document, dict):
        raise ClusterError("error: the server answered JSON that is not an object")
    return document


def _server_error(exc: ApiException, *, resource: str, name: str | None) -> str:
    """kubectl's words: ``Error from server (NotFound): pods "x" not found``."""
    status: Mapping[str, Any] = {}
    try:
        body = json.loads(exc.body or b"{}")
        status = body if isinstance(body, dict) else {}
    except (TypeError, ValueError):
        pass
    reason = str(status.get("reason") or exc.reason or exc.status)
    message = str(status.get("message") or "")
    if exc.status == 401:
        return f"error: You must be logged in to the server ({message or 'Unauthorized'})"
    if exc.status == 404 and name is not None and not message:
        message = f'{resource} "{name}" not found'
    return f"Error from server ({reason}): {message or exc.reason}"


def _cause(exc: BaseException) -> str:
    """The innermost reason of a urllib3 failure (MaxRetryError wraps the SSL or socket
    error)."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason is not None else str(exc)
