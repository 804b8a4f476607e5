"""The Envoy loopback listener: configuration as data, for standalone Envoy and for Istio.

The kernel REDIRECTs a container's L7-covered flows to port 15007 and rewrites their source
to the container's own address (127.0.100.N / fd6d:6775::N). The listener, one per family
(127.0.0.1:15007, [::1]:15007):

1. recovers the original destination (``original_dst`` listener filter), so
   ``%DOWNSTREAM_LOCAL_PORT%`` is the port the container dialed;
2. stamps the pod's identity (``x-meshguard-pod: namespace/name`` from the proxy's
   ``POD_NAMESPACE``/``POD_NAME`` environment), overwriting whatever the client sent;
3. asks meshguard's ext_authz server (``failure_mode_allow: false``: no answer, no request).
   A policy denial is the server's 403; no decision at all (the ext_authz cluster is
   misnamed or has no endpoint, the call timed out) is a 503, counted in
   ``http.<listener>.ext_authz.error`` and logged on the proxy's stdout as a JSON line
   ``{"meshguard": "ext_authz_error", "authz_cluster": ...}``, so a wrong location shows
   as what it is rather than as a storm of 403s;
4. forwards what is allowed to 127.0.0.1 or [::1] on the original port — never to the
   original address, which may be the pod IP (Istio would send Envoy's own connection to the
   pod IP to its inbound listener) — and strips meshguard's headers on the way upstream.

One static configuration serves every pod: the source container is in the source address,
the pod in the stamped header. The same listener dicts feed the standalone bootstrap in
``envoy/`` and the EnvoyFilter in ``istio/`` (:mod:`meshguard.authz.istio_config`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshguard.authz.contract import POD_HEADER
from meshguard.authz.decision import DECISION_HEADERS
from meshguard.l7 import RBAC_DIR, RBAC_FILE, DecisionLog, L7Engine
from meshguard.rbac import (
    AUDIT_PREFIX,
    POD_FILTER_NAME,
    RBAC_TYPE,
    RE2_PROGRAM_SIZE,
    RE2_RUNTIME_KEY,
    SOURCE_PREFIX,
    ambiguity_rbac,
    default_config,
)

HCM: Final = "filters.network.http_connection_manager.v3.HttpConnectionManager"
ORIGINAL_DST_HEADER: Final = "x-envoy-original-dst-host"
UPSTREAM_CLUSTER: Final = "meshguard_loopback_upstream"
AUTHZ_CLUSTER: Final = "meshguard_authz"
VIRTUAL_HOST: Final = "meshguard_loopback"
#: What the listener answers when the authz server gives no decision (the ext_authz cluster
#: does not exist, has no endpoint, or the call timed out): 503, never a policy's 403.
AUTHZ_ERROR_STATUS: Final = 503
#: The access log line (proxy's stdout) for each such request carries this "meshguard" field.
AUTHZ_ERROR_EVENT: Final = "ext_authz_error"
#: The runtime key of the native engine's denial status (403) in its filters.
DENY_STATUS_KEY: Final = "meshguard.deny"
#: Envoy's RBAC HTTP filter: the native engine's filters, the namespace of their metadata.
RBAC_FILTER: Final = "envoy.filters.http.rbac"


Engine = L7Engine
#: Every L7 decision of the native engine is one JSON line on the proxy's stdout with this
#: "meshguard" field.
DECISION_EVENT: Final = "l7_decision"


@dataclass(frozen=True, kw_only=True)
class ListenerSettings:
    port: int = 15007
    engine: Engine = Engine.EXT_AUTHZ
    #: The native engine's pod RBAC document (read once, at startup).
    rbac_path: str = f"{RBAC_DIR}/{RBAC_FILE}"
    #: The native engine's decision lines: every decision, or denials and would-be denials.
    decision_log: DecisionLog = DecisionLog.ALL
    #: The ext_authz gRPC cluster: a static one in standalone Envoy, Istio's service cluster
    #: (outbound|9191||meshguard-authz.meshguard-system.svc.cluster.local) in a sidecar.
    authz_cluster: str = AUTHZ_CLUSTER
    authz_timeout: str = "0.5s"
    request_timeout: str = "30s"
    #: Request headers the CheckRequest carries besides the pod's name (ext_authz
    #: ``allowed_headers``): only those a policy's ``http.headers`` can match; every other
    #: header (Authorization, Cookie, ...) and the body never leave the pod's Envoy.
    forward_headers: tuple[str, ...] = ()
    #: The Istio object that puts the listener in a sidecar, as Istio's config path
    #: (:func:`istio_config_path`): the route carries it as Istio's own routes and clusters
    #: do (``filter_metadata.istio.config``), so ``istioctl proxy-config route`` names it.
    istio_config: str | None = None


@dataclass(frozen=True, kw_only=True)
class AuthzTls:
    """mTLS from a standalone Envoy to the authz server: the pod's workload certificate and
    key, the mesh CA, and the SPIFFE ID the server's certificate must carry."""

    cert: str
    key: str
    ca: str
    server_spiffe_id: str


def istio_config_path(*, namespace: str, name: str) -> str:
    """The path Istio writes into ``filter_metadata.istio.config`` for the objects a config
    made (``/apis/GROUP/VERSION/namespaces/NS/KIND/NAME``), here for an EnvoyFilter;
    istioctl shows it as ``NAME.NS``."""
    return f"/apis/networking.istio.io/v1alpha3/namespaces/{namespace}/envoy-filter/{name}"


def _managed_by(istio_config: str | None) -> dict[str, Any]:
    if istio_config is None:
        return {}
    return {"metadata": {"filter_metadata": {"istio": {"config": istio_config}}}}


def loopback_listeners(settings: ListenerSettings) -> list[dict[str, Any]]:
    return [
        _listener("meshguard_loopback_ipv4", "127.0.0.1", "127.0.0.1", settings),
        _listener("meshguard_loopback_ipv6", "::1", "[::1]", settings),
    ]


def upstream_cluster(*, istio_config: str | None = None) -> dict[str, Any]:
    """ORIGINAL_DST, steered by the header the route sets: always loopback, original port."""
    return {
        "name": UPSTREAM_CLUSTER,
        **_managed_by(istio_config),
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


def authz_cluster(*, host: str, port: int, tls: AuthzTls | None = None) -> dict[str, Any]:
    """The ext_authz server as an HTTP/2 cluster (standalone Envoy): STATIC for an IP
    address, STRICT_DNS for a host name; over mTLS when ``tls`` is given."""
    try:
        ipaddress.ip_address(host)
        discovery = "STATIC"
    except ValueError:
        discovery = "STRICT_DNS"
    cluster = {
        "name": AUTHZ_CLUSTER,
        "type": discovery,
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
    if tls is not None:
        cluster["transport_socket"] = _upstream_mtls(tls)
    return cluster


def _upstream_mtls(tls: AuthzTls) -> dict[str, Any]:
    """Present the workload certificate; accept only the authz server's SPIFFE ID."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _type("transport_sockets.tls.v3.UpstreamTlsContext"),
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": tls.cert},
                        "private_key": {"filename": tls.key},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": tls.ca},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": tls.server_spiffe_id}}
                    ],
                },
            },
        },
    }


def bootstrap(
    settings: ListenerSettings,
    *,
    authz_host: str,
    authz_port: int,
    admin_port: int,
    authz_tls: AuthzTls | None = None,
) -> dict[str, Any]:
    """A standalone Envoy bootstrap: the loopback listeners and their two clusters."""
    clusters = [upstream_cluster()]
    if settings.engine is Engine.EXT_AUTHZ:
        clusters.append(authz_cluster(host=authz_host, port=authz_port, tls=authz_tls))
    return {
        "node": {"id": "meshguard-loopback", "cluster": "meshguard"},
        "admin": {"address": _socket("127.0.0.1", admin_port)},
        # The ambiguity regexes need a larger RE2 program than Envoy's default (100) allows;
        # Istio's own bootstrap sets the same.
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {RE2_RUNTIME_KEY: RE2_PROGRAM_SIZE}}]
        },
        "static_resources": {"listeners": loopback_listeners(settings), "clusters": clusters},
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
        "filter_chains": [
            {
                "name": name,
                "filters": [_http_connection_manager(name, upstream_host, settings)],
            }
        ],
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
            # CGI/WSGI backends read x_token as x-token: such a name is refused (400) before
            # any authorization, in HTTP/1 and HTTP/2 alike
            "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
            "access_log": _access_logs(settings),
            **_local_reply(settings),
            "http_filters": [
                *_decision_filters(settings),
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
                        "name": VIRTUAL_HOST,
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                **_managed_by(settings.istio_config),
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


def _decision_filters(settings: ListenerSettings) -> list[dict[str, Any]]:
    if settings.engine is Engine.EXT_AUTHZ:
        return [_stamp_pod_identity(), _ext_authz(settings)]
    return [
        {
            "name": RBAC_FILTER,
            "typed_config": {**ambiguity_rbac(), "rules_stat_prefix": "meshguard_ambiguity_"},
        },
        {
            "name": POD_FILTER_NAME,
            "config_discovery": {
                "config_source": {
                    "path_config_source": {"path": settings.rbac_path},
                    "resource_api_version": "V3",
                },
                "default_config": default_config(),
                "type_urls": [RBAC_TYPE],
            },
        },
    ]


def _access_logs(settings: ListenerSettings) -> list[dict[str, Any]]:
    if settings.engine is Engine.EXT_AUTHZ:
        return [_authz_error_log(settings)]
    line = _decision_log()
    if settings.decision_log is DecisionLog.DENIED:
        return [{**line, "filter": denied_filter()}]
    return [line]


def denied_filter() -> dict[str, Any]:
    """The decision lines of ``DecisionLog.DENIED``: a 403 no rule allowed (the ambiguity
    filter's, the pod policy's, the default config's), and in audit mode a request no rule
    would allow (the audit rules' result is set, their rule id is not). An upstream's own 403
    to a request a rule allowed carries that rule's id (the enforced one, or in audit mode
    the one that would have allowed it) and gets no line: the app's answer, not a denial."""
    denied = [
        _status_is(403, runtime_key=DENY_STATUS_KEY),
        _no_rule_id(""),
        _no_rule_id(AUDIT_PREFIX),
    ]
    would_be_denied = [
        _rbac_metadata(
            f"{AUDIT_PREFIX}enforced_engine_result", {"present_match": True}, if_missing=False
        ),
        _no_rule_id(AUDIT_PREFIX),
    ]
    return {
        "or_filter": {
            "filters": [
                {"and_filter": {"filters": denied}},
                {"and_filter": {"filters": would_be_denied}},
            ]
        }
    }


def _status_is(code: int, *, runtime_key: str) -> dict[str, Any]:
    """An access-log (or local reply) filter: the response code is ``code``."""
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": code, "runtime_key": runtime_key},
            }
        }
    }


def _no_rule_id(prefix: str) -> dict[str, Any]:
    """True when the pod filter's rules (under ``prefix``) matched no rule: a rule id is
    never empty, so an id present does not match and its absence does."""
    return _rbac_metadata(
        f"{prefix}enforced_effective_policy_id", {"string_match": {"exact": ""}}, if_missing=True
    )


def _rbac_metadata(key: str, value: dict[str, Any], *, if_missing: bool) -> dict[str, Any]:
    """An access-log filter on the RBAC filters' dynamic metadata ``key`` (matching
    ``value``; ``if_missing``: the result where the key is not set)."""
    return {
        "metadata_filter": {
            "matcher": {"filter": RBAC_FILTER, "path": [{"key": key}], "value": value},
            "match_if_key_not_found": if_missing,
        }
    }


def _decision_log() -> dict[str, Any]:
    """One JSON line on stdout per request of the native engine: its decision. ``source``
    is the source container (the shadow rules name it), ``rule`` the policy that allowed it
    (``rules[007]/cache``), ``details`` why Envoy answered
    (``rbac_access_denied_matched_policy[...]`` for a denial); in audit mode ``audit`` is
    set and ``audit_rule`` is the rule that would have allowed it (null: it would be
    denied)."""
    rbac = RBAC_FILTER
    source_id = f"{SOURCE_PREFIX}shadow_effective_policy_id"  # keys carry the stat prefix
    audit_id = f"{AUDIT_PREFIX}enforced_effective_policy_id"
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
            ".StdoutAccessLog",
            "log_format": {
                "json_format": {
                    "meshguard": DECISION_EVENT,
                    "engine": Engine.NATIVE.value,
                    "pod": "%ENVIRONMENT(POD_NAMESPACE)%/%ENVIRONMENT(POD_NAME)%",
                    "source": f"%DYNAMIC_METADATA({rbac}:{source_id})%",
                    "source_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                    "port": "%DOWNSTREAM_LOCAL_PORT%",
                    "method": "%REQ(:METHOD)%",
                    "path": "%REQ(:PATH)%",
                    "code": "%RESPONSE_CODE%",
                    "details": "%RESPONSE_CODE_DETAILS%",
                    "rule": f"%DYNAMIC_METADATA({rbac}:enforced_effective_policy_id)%",
                    # audit mode only: "allowed" (LOG always is), and the rule that would
                    # have allowed the request (null: none would, it would be denied)
                    "audit": f"%DYNAMIC_METADATA({rbac}:{AUDIT_PREFIX}enforced_engine_result)%",
                    "audit_rule": f"%DYNAMIC_METADATA({rbac}:{audit_id})%",
                    "time": "%START_TIME%",
                }
            },
        },
    }


def _local_reply(settings: ListenerSettings) -> dict[str, Any]:
    """The native engine's 403 names its reason, as the authz server's does."""
    if settings.engine is Engine.EXT_AUTHZ:
        return {}
    return {
        "local_reply_config": {
            "mappers": [
                {
                    # local replies only: an upstream's own 403 is never rewritten
                    "filter": _status_is(403, runtime_key=DENY_STATUS_KEY),
                    "body_format_override": {
                        "text_format_source": {
                            "inline_string": "meshguard: denied: %RESPONSE_CODE_DETAILS%\n"
                        },
                        "content_type": "text/plain",
                    },
                }
            ]
        }
    }


def _authz_error_log(settings: ListenerSettings) -> dict[str, Any]:
    """One JSON line on stdout (the istio-proxy container's log, which Istio's stats
    inclusion list does not filter) for each request refused because ext_authz gave no
    decision: UAEX (refused by ext_authz) with the error status, which a policy's 403 never
    has."""
    return {
        "name": "envoy.access_loggers.stdout",
        "filter": {
            "and_filter": {
                "filters": [
                    {"response_flag_filter": {"flags": ["UAEX"]}},
                    _status_is(AUTHZ_ERROR_STATUS, runtime_key="meshguard.authz_error_status"),
                ]
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
            ".StdoutAccessLog",
            "log_format": {
                "json_format": {
                    "meshguard": AUTHZ_ERROR_EVENT,
                    "message": "no decision from the ext_authz cluster (missing, no endpoint"
                    " or timed out): request refused",
                    "authz_cluster": settings.authz_cluster,
                    "details": "%RESPONSE_CODE_DETAILS%",
                    "code": "%RESPONSE_CODE%",
                    "pod": f"%REQ({POD_HEADER})%",
                    "source": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                    "port": "%DOWNSTREAM_LOCAL_PORT%",
                    "time": "%START_TIME%",
                }
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
            "status_on_error": {"code": "ServiceUnavailable"},
            "grpc_service": {
                "envoy_grpc": {"cluster_name": settings.authz_cluster},
                "timeout": settings.authz_timeout,
            },
            # only the headers a policy can use travel to the authz server; no body
            "allowed_headers": {"patterns": forwarded_header_patterns(settings.forward_headers)},
        },
    }


def forwarded_header_patterns(names: Sequence[str]) -> list[dict[str, Any]]:
    wanted = dict.fromkeys(name.lower() for name in (POD_HEADER, *DECISION_HEADERS, *names))
    return [{"exact": name, "ignore_case": True} for name in wanted]


def _type(name: str) -> str:
    return f"type.googleapis.com/envoy.extensions.{name}"


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}
