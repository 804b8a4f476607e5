"""The loopback listener as Istio and Helm objects, and the text ``meshguard envoy-config`` prints.

Where the authz service runs (:class:`IstioSettings`, validated once for every generated
object), the EnvoyFilter that adds :mod:`meshguard.authz.envoy_config`'s listener dicts to
the sidecars of meshguard's pods, the chart's template of it, and the YAML of both formats
(``bootstrap``: standalone Envoy; ``envoyfilter``: Istio).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshguard import annotation_keys, yaml_io
from meshguard.authz.envoy_config import (
    ListenerSettings,
    bootstrap,
    istio_config_path,
    loopback_listeners,
    upstream_cluster,
)
from meshguard.errors import MalformedInputError
from meshguard.l7 import DecisionLog, L7Engine
from meshguard.mesh import LOCAL_AUTHZ_PORT

ENVOY_FILTER_NAME: Final = "meshguard-loopback-listener"


# --- where the authz service runs: one location, validated, for every generated object -----

#: Kubernetes names: a namespace is a DNS-1123 label, a Service name a DNS-1035 label.
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_RULE: Final = (
    "lowercase letters, digits and '-', starting and ending with a letter or digit,"
    " at most 63 characters"
)


class LocationError(MalformedInputError):
    """The authz service's location is not one Istio can name: each problem is a field of
    :class:`IstioSettings` and what is wrong with its value."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{field} {message}" for field, message in self.problems))


@dataclass(frozen=True, kw_only=True)
class IstioSettings:
    """Where the authz service runs in the cluster (the Helm chart's defaults).

    Every Istio object meshguard generates derives from these five values: the EnvoyFilter's
    namespace, the ext_authz cluster name (``outbound|PORT||SERVICE.NAMESPACE.svc.DOMAIN``,
    the name Istio gives the Service's cluster in every sidecar) and the DestinationRule's
    host. A value Istio cannot have produced is refused here, because a cluster name that
    names no cluster still loads in Envoy and only fails at request time.
    """

    service: str = "meshguard-authz"
    namespace: str = "meshguard-system"
    port: int = 9191
    root_namespace: str = "istio-system"
    cluster_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        problems = [
            *_label_problems("service", self.service, _DNS1035_LABEL, "DNS-1035 label"),
            *_label_problems("namespace", self.namespace, _DNS1123_LABEL, "DNS-1123 label"),
            *_label_problems(
                "root_namespace", self.root_namespace, _DNS1123_LABEL, "DNS-1123 label"
            ),
            *_domain_problems(self.cluster_domain),
        ]
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            problems.append(("port", f"{self.port!r} is not an integer"))
        elif not 1 <= self.port <= 65535:
            problems.append(("port", f"{self.port} is out of range: expected 1-65535"))
        if problems:
            raise LocationError(problems)

    @classmethod
    def from_host(
        cls,
        host: str,
        *,
        port: int = 9191,
        root_namespace: str = "istio-system",
        cluster_domain: str = "cluster.local",
    ) -> IstioSettings:
        """The location named by the Service's host: ``SERVICE.NAMESPACE``,
        ``SERVICE.NAMESPACE.svc`` or ``SERVICE.NAMESPACE.svc.DOMAIN`` (``cluster_domain``
        when the host has none)."""
        parts = host.rstrip(".").split(".")
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
            domain = cluster_domain
        elif len(parts) >= 4 and parts[2] == "svc":
            domain = ".".join(parts[3:])
        else:
            raise LocationError(
                [
                    (
                        "host",
                        f"{host!r} is not a Kubernetes Service's name: expected"
                        " SERVICE.NAMESPACE.svc.DOMAIN (Istio names the Service's cluster"
                        " outbound|PORT||SERVICE.NAMESPACE.svc.DOMAIN)",
                    )
                ]
            )
        return cls(
            service=parts[0],
            namespace=parts[1],
            port=port,
            root_namespace=root_namespace,
            cluster_domain=domain,
        )

    @property
    def host(self) -> str:
        return f"{self.service}.{self.namespace}.svc.{self.cluster_domain}"

    @property
    def cluster(self) -> str:
        """The name Istio gives the service's outbound cluster in every sidecar."""
        return f"outbound|{self.port}||{self.host}"


def _label_problems(
    field: str, value: str, pattern: re.Pattern[str], kind: str
) -> list[tuple[str, str]]:
    if isinstance(value, str) and len(value) <= 63 and pattern.fullmatch(value):
        return []
    rule = _LABEL_RULE
    if pattern is _DNS1035_LABEL:
        rule = rule.replace("starting and", "starting with a letter and")
    return [(field, f"{value!r} is not a {kind}: {rule}")]


def _domain_problems(value: str) -> list[tuple[str, str]]:
    labels = value.split(".") if isinstance(value, str) else []
    if (
        labels
        and len(value) <= 253
        and all(len(label) <= 63 and _DNS1123_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    ):
        return []
    return [
        (
            "cluster_domain",
            f"{value!r} is not a DNS domain: dot-separated DNS-1123 labels such as"
            " cluster.local, no trailing dot (it must equal Istio's"
            " values.global.proxy.clusterDomain)",
        )
    ]


def envoy_filter(
    istio: IstioSettings,
    settings: ListenerSettings | None = None,
    *,
    engine: L7Engine = L7Engine.EXT_AUTHZ,
) -> dict[str, Any]:
    """The EnvoyFilter adding the loopback listeners and their upstream cluster to the
    sidecars of the pods meshguard gave ``engine`` (label ``meshguard.io/l7-engine``; it
    lives in Istio's root namespace, so one object serves all of them). The native listener
    must never reach a pod without its RBAC file: Envoy would refuse the listener."""
    name = envoy_filter_name(engine)
    managed_by = istio_config_path(namespace=istio.root_namespace, name=name)
    listener_settings = dataclasses.replace(
        settings or ListenerSettings(authz_cluster=istio.cluster, engine=engine),
        istio_config=managed_by,
    )
    patches = [
        {
            "applyTo": "LISTENER",
            "match": {"context": "SIDECAR_OUTBOUND"},
            "patch": {"operation": "ADD", "value": listener},
        }
        for listener in loopback_listeners(listener_settings)
    ]
    patches.append(
        {
            "applyTo": "CLUSTER",
            "match": {"context": "SIDECAR_OUTBOUND"},
            "patch": {"operation": "ADD", "value": upstream_cluster(istio_config=managed_by)},
        }
    )
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": name, "namespace": istio.root_namespace},
        "spec": {
            "workloadSelector": {"labels": {annotation_keys.L7_ENGINE: engine.value}},
            "configPatches": patches,
        },
    }


def envoy_filter_name(engine: L7Engine) -> str:
    return ENVOY_FILTER_NAME if engine is L7Engine.EXT_AUTHZ else f"{ENVOY_FILTER_NAME}-native"


#: Stand-ins the Helm template replaces with expressions of the chart's values.
#: (a DNS label: the EnvoyFilter's config path in its routes and cluster is built from it)
_HELM_NAMESPACE: Final = "meshguard-helm-root-namespace"
_HELM_CLUSTER: Final = "MESHGUARD_HELM_AUTHZ_CLUSTER"
_HELM_LABELS: Final = "MESHGUARD_HELM_LABELS"
_HELM_FORWARD: Final = "meshguard_helm_forward_headers"
#: A ``filter:`` key and the lines indented under it.
_HELM_FILTER_BLOCK: Final = re.compile(
    r"^(?P<indent> +)filter:\n(?P<block>(?:(?P=indent) +\S.*\n)+)", re.M
)
_HELM_FORWARD_LINES: Final = re.compile(
    rf"(?P<indent> *)- exact: {_HELM_FORWARD}\n *ignore_case: true\n"
)


def envoy_filter_helm_template() -> str:
    """``charts/meshguard/templates/istio-envoyfilter.yaml``: :func:`envoy_filter` for each
    engine, with the root namespace and the ext_authz cluster taken from the chart's values
    (one definition for the CLI, ``istio/`` and the chart; a test keeps the committed
    template equal)."""
    bodies = []
    for engine in (L7Engine.EXT_AUTHZ, L7Engine.NATIVE):
        # the native listener as with decisionLog=denied: its access-log filter, kept only
        # under that value (_helm_decision_log)
        document = envoy_filter(
            IstioSettings(root_namespace=_HELM_NAMESPACE),
            ListenerSettings(
                authz_cluster=_HELM_CLUSTER, forward_headers=(_HELM_FORWARD,), engine=engine,
                decision_log=DecisionLog.DENIED if engine is L7Engine.NATIVE else DecisionLog.ALL,
            ),
            engine=engine,
        )  # fmt: skip
        document["metadata"] = {
            "name": envoy_filter_name(engine),
            "namespace": _HELM_NAMESPACE,
            "labels": _HELM_LABELS,
        }
        bodies.append(_helm_body(yaml_io.dump(document)))
    return (
        "{{- /* Generated by meshguard.authz.istio_config.envoy_filter_helm_template(): do not"
        " edit.\n"
        "The loopback listener for the sidecars of meshguard's pods, in Istio's root namespace:"
        " one\nEnvoyFilter per L7 engine, each selecting the pods labelled"
        " meshguard.io/l7-engine with it\n(the same objects as `meshguard envoy-config --format"
        " envoyfilter [--engine native]`). */}}\n"
        "{{- if .Values.istio.envoyFilter.enabled }}\n"
        '{{- $host := printf "%s.%s.svc.%s" .Values.authz.service.name .Release.Namespace'
        " .Values.istio.clusterDomain }}\n"
        '{{- $cluster := printf "outbound|%d||%s" (int .Values.authz.service.port) $host }}\n'
        + "---\n".join(bodies)
        + "{{- end }}\n"
    )


def _helm_body(body: str) -> str:
    body = body.replace(_HELM_NAMESPACE, "{{ .Values.istio.rootNamespace }}")
    body = body.replace(
        f"labels: {_HELM_LABELS}",
        'labels:\n    {{- include "meshguard.labels" (dict "root" $ "component" "authz")'
        " | nindent 4 }}",
    )
    body = body.replace(_HELM_CLUSTER, "{{ $cluster | quote }}")
    body = _helm_decision_log(body)
    return _HELM_FORWARD_LINES.sub(
        lambda m: (
            "{{- range .Values.authz.forwardHeaders }}\n"
            f"{m['indent']}- exact: {{{{ lower . | quote }}}}\n"
            f"{m['indent']}  ignore_case: true\n"
            "{{- end }}\n"
        ),
        body,
    )


def _helm_decision_log(body: str) -> str:
    """The native decision lines' access-log filter under ``istio.envoyFilter.decisionLog:
    denied`` only (every decision logged otherwise)."""

    def wrap(found: re.Match[str]) -> str:
        if not found["block"].lstrip().startswith("or_filter:"):
            return found[0]  # another filter: ext_authz's error line's, the local reply's
        return (
            '{{- if eq .Values.istio.envoyFilter.decisionLog "denied" }}\n'
            f"{found[0]}{{{{- end }}}}\n"
        )

    return _HELM_FILTER_BLOCK.sub(wrap, body)


def envoy_config_text(
    fmt: str,
    *,
    authz_host: str = "127.0.0.1",
    authz_port: int | None = None,
    admin_port: int = 15000,
    istio: IstioSettings | None = None,
    engine: L7Engine = L7Engine.EXT_AUTHZ,
    decision_log: DecisionLog = DecisionLog.ALL,
) -> str:
    """The YAML ``meshguard envoy-config`` prints (and ``envoy/``, ``istio/`` hold):
    ``bootstrap`` (standalone Envoy calling the authz server at authz_host:authz_port, by
    default 127.0.0.1:15030, in the proxy's protected range) or
    ``envoyfilter`` (for the authz service at ``istio``, default: the chart's defaults)."""
    if fmt == "bootstrap":
        command = "meshguard envoy-config --format bootstrap" + _engine_flag(engine, decision_log)
        document = bootstrap(
            ListenerSettings(engine=engine, decision_log=decision_log),
            authz_host=authz_host,
            authz_port=LOCAL_AUTHZ_PORT if authz_port is None else authz_port,
            admin_port=admin_port,
        )
    elif fmt == "envoyfilter":
        location = istio or IstioSettings(port=authz_port or IstioSettings().port)
        command = " ".join(["meshguard envoy-config --format envoyfilter", *_flags(location)])
        command += _engine_flag(engine, decision_log)
        settings = ListenerSettings(
            authz_cluster=location.cluster, engine=engine, decision_log=decision_log
        )
        document = envoy_filter(location, settings, engine=engine)
    else:
        raise ValueError(f"unknown envoy-config format {fmt!r}")
    header = f"# Generated by `{command}`; see envoy/README.md.\n"
    return header + yaml_io.dump(document)


def _engine_flag(engine: L7Engine, decision_log: DecisionLog = DecisionLog.ALL) -> str:
    flag = "" if engine is L7Engine.EXT_AUTHZ else f" --engine {engine.value}"
    return flag if decision_log is DecisionLog.ALL else f"{flag} --decision-log {decision_log}"


def _flags(istio: IstioSettings) -> list[str]:
    """The envoy-config flags that reproduce a non-default location."""
    default = IstioSettings()
    flags = {
        "--namespace": (istio.namespace, default.namespace),
        "--service": (istio.service, default.service),
        "--port": (istio.port, default.port),
        "--istio-namespace": (istio.root_namespace, default.root_namespace),
        "--cluster-domain": (istio.cluster_domain, default.cluster_domain),
    }
    return [f"{flag} {value}" for flag, (value, usual) in flags.items() if value != usual]
