"""The declarations of the servers' commands (the webhook, the authz server) and of the
configurations meshguard writes for others (Envoy's, Istio's)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshguard.authz.kube import PAGE_SIZE
from meshguard.cli.argtypes import positive_int
from meshguard.cli.flags import (
    Subcommands,
    add_injection_flags,
    add_trusted_keys_flag,
    command,
)
from meshguard.init_container import DEFAULT_INIT_IMAGE
from meshguard.mesh import LOCAL_AUTHZ_PORT


def add_servers(commands: Subcommands) -> None:
    webhook = command(
        commands,
        "serve-webhook",
        help="serve the admission webhook (HTTPS, AdmissionReview v1 on POST /inject)",
        description="Serve the mutating admission webhook over HTTPS: POST /inject takes an"
        " AdmissionReview v1 and answers with a JSONPatch (the same transformation as"
        " `meshguard inject`) and a warning per fix, or refuses the pod with the reason;"
        " /healthz, /readyz, /metrics (Prometheus). The certificate and key are reloaded when"
        " their files change.",
    )
    webhook.add_argument("--cert", type=Path, required=True, help="TLS certificate (PEM)")
    webhook.add_argument("--key", type=Path, required=True, help="TLS private key (PEM)")
    webhook.add_argument("--host", default="0.0.0.0", help="address to listen on")  # noqa: S104
    webhook.add_argument("--port", type=int, default=9443, help="HTTPS port")
    webhook.add_argument(
        "--reload-interval",
        type=float,
        default=5.0,
        help="seconds between checks of the certificate files for a rotation",
    )
    webhook.add_argument(
        "--admission-workers",
        type=positive_int,
        default=2,
        help="admissions judged at once, in threads beside the event loop",
    )
    webhook.add_argument(
        "--max-pending-admissions",
        type=positive_int,
        default=16,
        help="admissions judged or waiting; past it a request is answered 429 before its body"
        " is read (at least --admission-workers)",
    )
    webhook.add_argument(
        "--no-template",
        action="store_true",
        help="do not ask Istio for the meshguard template (the chart's default): the webhook"
        " inserts meshguard-init itself into the pod Istio injected, and istiod needs no"
        " template. Without this flag every istiod revision must have the template, or Istio"
        ' refuses each pod: requested template "meshguard" not found',
    )
    webhook.add_argument(
        "--opt-out",
        choices=["allow", "refuse"],
        default="allow",
        help='pod-level opt-out (meshguard.io/inject or sidecar.istio.io/inject "false") of a'
        " pod Istio injects: allow, or refuse unless the pod's namespace is labelled"
        " meshguard.io/opt-out=allowed (read from the API server: needs get on namespaces)",
    )
    add_injection_flags(webhook)
    webhook.set_defaults(handler="meshguard.cli.serve:webhook", extra="server")

    authz = command(
        commands,
        "serve-authz",
        help="serve the Envoy ext_authz gRPC server for L7 checks on loopback",
        description="Serve envoy.service.auth.v3.Authorization/Check (grpc.aio) and the gRPC"
        " health service: each request on a pod's loopback listener is allowed or denied by the"
        " pod's meshguard policy (default deny; audit mode logs would-be denials and allows),"
        " one JSON log line per decision, Prometheus metrics on --metrics-port. Policies come"
        " from the Kubernetes API (--kubernetes: a watch cache of the pods) or from pod files"
        " written by `meshguard inject` (--pods, standalone mode).",
    )
    policies = authz.add_mutually_exclusive_group(required=True)
    policies.add_argument("--pods", type=Path, nargs="+", metavar="FILE", help="pod manifests")
    policies.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch the pods meshguard admitted (label meshguard.io/admitted=true) in the"
        " cluster; with --workers, this process runs the only watch and feeds the workers",
    )
    policies.add_argument(  # a worker's: the pipe its parent's watch feeds (internal)
        "--policy-feed", type=int, metavar="FD", help=argparse.SUPPRESS
    )
    authz.add_argument(  # a worker's: the process that started it (internal)
        "--parent-pid", type=int, metavar="PID", help=argparse.SUPPRESS
    )
    authz.add_argument("--host", default="127.0.0.1", help="address to listen on")
    authz.add_argument(
        "--port",
        type=int,
        default=LOCAL_AUTHZ_PORT,
        help=f"gRPC port (default {LOCAL_AUTHZ_PORT}: in the proxy's protected range, as it must"
        " be on a loopback address without --tls-*; the chart's Service uses 9191)",
    )
    authz.add_argument(
        "--metrics-port", type=int, default=9192, help="Prometheus metrics port (0: none)"
    )
    authz.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), e.g. one per core; worker i"
        " serves its metrics on --metrics-port + i",
    )
    authz.add_argument(
        "--list-page-size",
        type=int,
        default=PAGE_SIZE,
        metavar="N",
        help="--kubernetes: pods per LIST page (each page is parsed at once, holding the"
        " interpreter: smaller pages, shorter pauses of the Checks while the cache lists)",
    )
    add_trusted_keys_flag(
        authz,
        what="required: a pod's admitted policy is served only if its attestation verifies",
    )
    tls = authz.add_argument_group(
        "mutual TLS (the Check channel; required with --kubernetes unless --insecure-plaintext)"
    )
    tls.add_argument("--tls-cert", type=Path, help="certificate chain (Istio: cert-chain.pem)")
    tls.add_argument("--tls-key", type=Path, help="private key (Istio: key.pem)")
    tls.add_argument("--tls-ca", type=Path, help="CA of client certificates (root-cert.pem)")
    tls.add_argument(
        "--trust-domain", default="cluster.local", help="the mesh's trust domain (SPIFFE)"
    )
    tls.add_argument(
        "--tls-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the three files (Istio's agent writes them after the start;"
        " the wait logs which files and why, then fails with the cause)",
    )
    tls.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="serve --kubernetes without TLS and without checking callers' identities",
    )
    authz.set_defaults(handler="meshguard.cli.serve:authz", extra="server")


def add_configs(commands: Subcommands) -> None:
    envoy = command(
        commands,
        "envoy-config",
        help="print the Envoy loopback listener configuration (standalone or for Istio)",
        description="Print the loopback listener that receives the flows meshguard's rules"
        " redirect: as a standalone Envoy bootstrap (bootstrap), or as the Istio EnvoyFilter"
        " that adds it to every sidecar (envoyfilter), calling the authz Service's cluster"
        " outbound|PORT||SERVICE.NAMESPACE.svc.DOMAIN. The location must be the chart's"
        " (helm values authz.service.name/port, the release namespace, istio.rootNamespace,"
        " istio.clusterDomain); the chart renders the same EnvoyFilter with"
        " istio.envoyFilter.enabled=true.",
    )
    envoy.add_argument("--format", choices=["bootstrap", "envoyfilter"], default="bootstrap")
    envoy.add_argument(
        "--engine",
        choices=["ext-authz", "native"],
        default="ext-authz",
        help="the L7 engine of the listener: ext-authz (asks serve-authz) or native (the pod's"
        " Envoy RBAC document from /etc/meshguard/l7/rbac.json); an envoyfilter selects the"
        " pods labelled meshguard.io/l7-engine with that engine",
    )
    envoy.add_argument(
        "--decision-log",
        choices=["all", "denied"],
        default="all",
        help="the native engine's JSON decision lines on the proxy's stdout: all (every"
        " request) or denied (denials and audit mode's would-be denials; allowed requests"
        " only counted in the RBAC stats); needs --engine native",
    )
    location = envoy.add_argument_group(
        "authz server location",
        "bootstrap: --authz-host (an IP address or DNS name, default 127.0.0.1) and --port;"
        " envoyfilter: the Service (--namespace, --service, --port, --cluster-domain, or all"
        " but the port as --authz-host SERVICE.NAMESPACE.svc.DOMAIN) and --istio-namespace."
        " Defaults: the chart's.",
    )
    location.add_argument(
        "--authz-host",
        help="bootstrap: the authz server's address; envoyfilter: the authz Service's host"
        " SERVICE.NAMESPACE[.svc[.DOMAIN]]",
    )
    location.add_argument(
        "--port",
        "--authz-port",
        dest="port",
        type=int,
        help=f"authz gRPC port (default: bootstrap {LOCAL_AUTHZ_PORT}, envoyfilter 9191)",
    )
    location.add_argument(
        "--namespace", help="namespace of the meshguard release (default meshguard-system)"
    )
    location.add_argument("--service", help="name of the authz Service (default meshguard-authz)")
    location.add_argument(
        "--istio-namespace",
        help="Istio's root namespace, where the EnvoyFilter lives (default istio-system)",
    )
    location.add_argument(
        "--cluster-domain",
        help="the cluster's DNS domain, as Istio's values.global.proxy.clusterDomain"
        " (default cluster.local)",
    )
    envoy.add_argument("--admin-port", type=int, help="Envoy admin port (bootstrap; 15000)")
    envoy.set_defaults(handler="meshguard.cli.envoy_config:envoy_config", extra="cli")

    template = command(
        commands,
        "istio-template",
        help="print the Istio injection template 'meshguard' (values overlay for istiod)",
        description="Print the `meshguard` injection template for Istio's"
        " sidecarInjectorWebhook.templates, as an IstioOperator overlay (istioctl install -f) or"
        " as istiod Helm values. Pods then ask for it with inject.istio.io/templates:"
        " sidecar,meshguard (the webhook adds it).",
    )
    template.add_argument("--format", choices=["iop", "helm"], default="iop")
    template.add_argument(
        "--image", default=DEFAULT_INIT_IMAGE, help="image of meshguard-init (the slim init image)"
    )
    template.set_defaults(handler="meshguard.cli.inject:istio_template", extra="cli")
