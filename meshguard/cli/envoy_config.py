"""``meshguard envoy-config``: the configuration of the Envoy listener that calls the authz
server (a bootstrap for a standalone Envoy, or Istio's EnvoyFilter). It loads none of the
servers' libraries."""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys

from meshguard.authz.istio_config import IstioSettings, LocationError, envoy_config_text
from meshguard.cli import EXIT_OK, EXIT_USAGE, fail
from meshguard.l7 import DecisionLog, L7Engine
from meshguard.mesh import LOCAL_AUTHZ_PORT, is_loopback, is_protected_port, unprotected_authz_port

_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")


def envoy_config(args: argparse.Namespace) -> int:
    """Print the loopback listener for the authz server's location; a location Istio could
    not have named (or a flag the format does not use) is refused, exit 2."""
    try:
        text = _envoy_config_text(args)
    except LocationError as exc:
        flags = {
            "service": "--service", "namespace": "--namespace", "port": "--port",
            "root_namespace": "--istio-namespace", "cluster_domain": "--cluster-domain",
            "host": "--authz-host", "admin_port": "--admin-port",
        }  # fmt: skip
        reasons = "; ".join(f"{flags.get(field, field)} {why}" for field, why in exc.problems)
        return fail(f"meshguard envoy-config: {reasons}", EXIT_USAGE)
    sys.stdout.write(text)
    return EXIT_OK


def _envoy_config_text(args: argparse.Namespace) -> str:
    if args.format == "bootstrap":
        port = LOCAL_AUTHZ_PORT if args.port is None else args.port
        unused = [
            flag
            for flag, value in (
                ("--namespace", args.namespace), ("--service", args.service),
                ("--istio-namespace", args.istio_namespace),
                ("--cluster-domain", args.cluster_domain),
            )
            if value is not None
        ]  # fmt: skip
        if unused:
            raise LocationError(
                [(flag, "applies to --format envoyfilter only (a bootstrap calls --authz-host)")
                 for flag in unused]
            )  # fmt: skip
        IstioSettings(port=port)  # the port's range
        admin = 15000 if args.admin_port is None else args.admin_port
        if not 1 <= admin <= 65535:
            raise LocationError([("admin_port", f"{admin} is out of range: expected 1-65535")])
        host = args.authz_host or "127.0.0.1"
        _check_bootstrap_host(host)
        if is_loopback(host) and not is_protected_port(port):
            raise LocationError([("port", unprotected_authz_port(port))])
        return envoy_config_text(
            "bootstrap", authz_host=host, authz_port=port, admin_port=admin,
            engine=_engine(args), decision_log=_decision_log(args),
        )  # fmt: skip
    if args.admin_port is not None:
        raise LocationError([("admin_port", "applies to --format bootstrap only")])
    port = IstioSettings().port if args.port is None else args.port
    return envoy_config_text(
        "envoyfilter", istio=_istio_location(args, port=port), engine=_engine(args),
        decision_log=_decision_log(args),
    )  # fmt: skip


def _engine(args: argparse.Namespace) -> L7Engine:
    return L7Engine(getattr(args, "engine", None) or L7Engine.EXT_AUTHZ.value)


def _decision_log(args: argparse.Namespace) -> DecisionLog:
    """Only the native engine writes decision lines (ext-authz's are the authz server's)."""
    chosen = DecisionLog(getattr(args, "decision_log", None) or DecisionLog.ALL.value)
    if chosen is not DecisionLog.ALL and _engine(args) is not L7Engine.NATIVE:
        raise LocationError(
            [("--decision-log", "applies to --engine native only (the ext-authz engine's"
              " decisions are the authz server's log)")]
        )  # fmt: skip
    return chosen


def _istio_location(args: argparse.Namespace, *, port: int) -> IstioSettings:
    """The authz Service's location from the flags; --authz-host must agree with the
    separate flags given beside it."""
    default = IstioSettings()
    root = args.istio_namespace or default.root_namespace
    if args.authz_host is None:
        return IstioSettings(
            service=args.service or default.service,
            namespace=args.namespace or default.namespace,
            port=port,
            root_namespace=root,
            cluster_domain=args.cluster_domain or default.cluster_domain,
        )
    located = IstioSettings.from_host(
        args.authz_host,
        port=port,
        root_namespace=root,
        cluster_domain=args.cluster_domain or default.cluster_domain,
    )
    conflicts = [
        (field, f"{given!r} contradicts --authz-host {args.authz_host!r}")
        for field, given, found in (
            ("service", args.service, located.service),
            ("namespace", args.namespace, located.namespace),
            ("cluster_domain", args.cluster_domain, located.cluster_domain),
        )
        if given is not None and given != found
    ]
    if conflicts:
        raise LocationError(conflicts)
    return located


def _check_bootstrap_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels) or len(host) > 253:
            raise LocationError(
                [("host", f"{host!r} is neither an IP address nor a DNS name")]
            ) from None
