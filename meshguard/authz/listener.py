"""The Envoy loopback listener: configuration as data, for standalone Envoy and for Istio.

The kernel REDIRECTs a container's L7-covered flows to port 15007 and rewrites their source
to the container's own address (127.0.100.N / fd6d:6775::N). The listener, one per family
(127.0.0.1:15007, [::1]:15007):

1. recovers the original destination (``original_dst`` listener filter), so
   ``%DOWNSTREAM_LOCAL_PORT%`` is the port the container dialed;
2. stamps the pod's identity (``x-meshguard-pod: namespace/name`` from the proxy's
   ``POD_NAMESPACE``/``POD_NAME`` environment), overwriting whatever the client sent;
3. asks meshguard's ext_authz server (``failure_mode_allow: false``: no answer, no request);
4. forwards what is allowed to 127.0.0.1 or [::1] on the original port — never to the
   original address, which may be the pod IP (Istio would send Envoy's own connection to the
   pod IP to its inbound listener) — and strips meshguard's headers on the way upstream.

One static configuration serves every pod: the source container is in the source address,
the pod in the stamped header. The same listener dicts feed the standalone bootstrap in
``envoy/`` and the EnvoyFilter in ``istio/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import yaml

from meshguard.authz.server import POD_HEADER

HCM: Final = "filters.network.http_connection_manager.v3.HttpConnectionManager"
ORIGINAL_DST_HEADER: Final = "x-envoy-original-dst-host"
UPSTREAM_CLUSTER: Final = "meshguard_loopback_upstream"
AUTHZ_CLUSTER: Final = "meshguard_authz"


@dataclass(frozen=True, kw_only=True)
class ListenerSettings:
    port: int = 15007
    #: The ext_authz gRPC cluster: a static one in standalone Envoy, Istio's service cluster
    #: (outbound|9191||meshguard-authz.meshguard-system.svc.cluster.local) in a sidecar.
    authz_cluster: str = AUTHZ_CLUSTER
    authz_timeout: str = "0.5s"
    request_timeout: str = "30s"


def loopback_listeners(settings: ListenerSettings) -> list[dict[str, Any]]:
    return [
        _listener("meshguard_loopback_ipv4", "127.0.0.1", "127.0.0.1", settings),
        _listener("meshguard_loopback_ipv6", "::1", "[::1]", settings),
    ]


def upstream_cluster() -> dict[str, Any]:
    """ORIGINAL_DST, steered by the header the route sets: always loopback, original port."""
    return {
        "name": UPSTREAM_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "original_dst_lb_config": {"use_http_header": True},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type("upstreams.http.v3.HttpProtocolOptions"),
                "use_downstream_protocol_config": {},
                "http_filters": [
                    {
                        "name": "envoy.filters.http.header_mutation",
                        "typed_config": {
                            "@type": _type("filters.http.header_mutation.v3.HeaderMutation"),
                            "mutations": {
                                "request_mutations": [
                                    {"remove": ORIGINAL_DST_HEADER},
                                    {"remove": POD_HEADER},
                                ]
                            },
                        },
                    },
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": _type("filters.http.upstream_codec.v3.UpstreamCodec")
                        },
                    },
                ],
            }
        },
    }


def authz_cluster(*, host: str, port: int) -> dict[str, Any]:
    """The ext_authz server as a static HTTP/2 cluster (standalone Envoy)."""
    return {
        "name": AUTHZ_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type("upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": AUTHZ_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}],
        },
    }


def bootstrap(
    settings: ListenerSettings, *, authz_host: str, authz_port: int, admin_port: int
) -> dict[str, Any]:
    """A standalone Envoy bootstrap: the loopback listeners and their two clusters."""
    return {
        "node": {"id": "meshguard-loopback", "cluster": "meshguard"},
        "admin": {"address": _socket("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": loopback_listeners(settings),
            "clusters": [upstream_cluster(), authz_cluster(host=authz_host, port=authz_port)],
        },
    }


def _listener(
    name: str, bind: str, upstream_host: str, settings: ListenerSettings
) -> dict[str, Any]:
    return {
        "name": name,
        "address": _socket(bind, settings.port),
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {"@type": _type("filters.listener.original_dst.v3.OriginalDst")},
            }
        ],
        "filter_chains": [{"filters": [_http_connection_manager(name, upstream_host, settings)]}],
    }


def _http_connection_manager(
    name: str, upstream_host: str, settings: ListenerSettings
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _type(HCM),
            "stat_prefix": name,
            "codec_type": "AUTO",
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            "http_protocol_options": {"accept_http_10": True},
            "http_filters": [
                _stamp_pod_identity(),
                _ext_authz(settings),
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": _type("filters.http.router.v3.Router"),
                        "suppress_envoy_headers": True,
                    },
                },
            ],
            "route_config": {
                "name": name,
                "virtual_hosts": [
                    {
                        "name": "loopback",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {
                                    "cluster": UPSTREAM_CLUSTER,
                                    "timeout": settings.request_timeout,
                                },
                                "request_headers_to_add": [
                                    {
                                        "header": {
                                            "key": ORIGINAL_DST_HEADER,
                                            "value": f"{upstream_host}:%DOWNSTREAM_LOCAL_PORT%",
                                        },
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                    }
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    }


def _stamp_pod_identity() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _type("filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": {
                "request_mutations": [
                    {
                        "append": {
                            "header": {
                                "key": POD_HEADER,
                                "value": "%ENVIRONMENT(POD_NAMESPACE)%/%ENVIRONMENT(POD_NAME)%",
                            },
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ]
            },
        },
    }


def _ext_authz(settings: ListenerSettings) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _type("filters.http.ext_authz.v3.ExtAuthz"),
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": "Forbidden"},
            "grpc_service": {
                "envoy_grpc": {"cluster_name": settings.authz_cluster},
                "timeout": settings.authz_timeout,
            },
        },
    }


def _type(name: str) -> str:
    return f"type.googleapis.com/envoy.extensions.{name}"


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


@dataclass(frozen=True, kw_only=True)
class IstioSettings:
    """Where the authz service runs in the cluster (the Helm chart's defaults)."""

    service: str = "meshguard-authz"
    namespace: str = "meshguard-system"
    port: int = 9191
    root_namespace: str = "istio-system"

    @property
    def host(self) -> str:
        return f"{self.service}.{self.namespace}.svc.cluster.local"

    @property
    def cluster(self) -> str:
        """The name Istio gives the service's outbound cluster in every sidecar."""
        return f"outbound|{self.port}||{self.host}"


def envoy_filter(istio: IstioSettings, settings: ListenerSettings | None = None) -> dict[str, Any]:
    """The EnvoyFilter adding the loopback listeners and their upstream cluster to every
    sidecar (it lives in Istio's root namespace, so one object serves all pods)."""
    listener_settings = settings or ListenerSettings(authz_cluster=istio.cluster)
    outbound = {"context": "SIDECAR_OUTBOUND"}
    patches = [
        {"applyTo": "LISTENER", "match": outbound, "patch": {"operation": "ADD", "value": listener}}
        for listener in loopback_listeners(listener_settings)
    ]
    patches.append(
        {
            "applyTo": "CLUSTER",
            "match": outbound,
            "patch": {"operation": "ADD", "value": upstream_cluster()},
        }
    )
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "meshguard-loopback-listener", "namespace": istio.root_namespace},
        "spec": {"configPatches": patches},
    }


def extension_provider(istio: IstioSettings) -> dict[str, Any]:
    """meshConfig.extensionProviders entry naming the authz service (envoyExtAuthzGrpc)."""
    return {
        "name": "meshguard",
        "envoyExtAuthzGrpc": {
            "service": istio.host,
            "port": istio.port,
            "timeout": ListenerSettings().authz_timeout,
            "failOpen": False,
        },
    }


def envoy_config_text(fmt: str, *, authz_host: str, authz_port: int, admin_port: int) -> str:
    """The YAML ``meshguard envoy-config`` prints (and ``envoy/``, ``istio/`` hold)."""
    header = f"# Generated by `meshguard envoy-config --format {fmt}`; see envoy/README.md.\n"
    if fmt == "bootstrap":
        document = bootstrap(
            ListenerSettings(), authz_host=authz_host, authz_port=authz_port, admin_port=admin_port
        )
    elif fmt == "envoyfilter":
        document = envoy_filter(IstioSettings(port=authz_port))
    else:
        document = {
            "apiVersion": "install.istio.io/v1alpha1",
            "kind": "IstioOperator",
            "metadata": {"name": "meshguard-authz", "namespace": "istio-system"},
            "spec": {
                "meshConfig": {
                    "extensionProviders": [extension_provider(IstioSettings(port=authz_port))]
                }
            },
        }
    return header + yaml.safe_dump(document, sort_keys=False)
