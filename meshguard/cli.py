"""The ``meshguard`` command line.

Each subcommand is a thin shell around the library: parse flags, read input, call the pure
logic, print. Exit status: 0 success, 1 refused or failed (the message says why), 2 bad
usage or unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO

import yaml

from meshguard import __version__, logs, names
from meshguard.authz.listener import envoy_config_text
from meshguard.authz.server import AuthzSettings, serve_authz
from meshguard.authz.store import KubernetesPodSource, KubernetesStore, PolicyStore, StaticStore
from meshguard.errors import MalformedInputError, MeshguardError, MeshguardFailure, RefusedError
from meshguard.inject.container import DEFAULT_IMAGE, InitContainerSettings
from meshguard.inject.istio import istio_template
from meshguard.inject.posture import Action as PostureAction
from meshguard.inject.posture import PostureSettings
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import PodTemplate, pod_templates, read_documents
from meshguard.pod import read_pod
from meshguard.policy import parse_opt_out
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.install import install, plan_payload
from meshguard.rules.iptables import parse_save, run_command
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.webhook.server import WebhookSettings, run_webhook

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
DEFAULT_RULESET_FILE: Final = "/etc/meshguard/ruleset"
RULESET_ENV: Final = "MESHGUARD_RULESET"
AMBIENT_ANNOTATION: Final = "ambient.istio.io/redirection"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure(stream=sys.stderr, level=getattr(logging, args.log_level.upper()))
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshguard",
        description="Intra-pod isolation for Istio sidecars: per-uid loopback rules (iptables"
        " owner match) and zero-trust L7 checks for loopback traffic.",
    )
    parser.add_argument("--version", action="version", version=f"meshguard {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    rules = commands.add_parser(
        "rules",
        help="print the iptables-restore payloads meshguard-init would apply for a pod",
        description="Compile the meshguard ruleset of every Istio-injected pod template in a"
        " manifest (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob, List, ...) and print"
        " the exact iptables-restore payload(s) meshguard-init applies.",
    )
    rules.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    rules.add_argument("--family", choices=[f.value for f in Family], help="only this family")
    rules.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default="text",
        help="text: restore payloads; json: the ruleset document meshguard-init reads",
    )
    rules.set_defaults(handler=_cmd_rules)

    init = commands.add_parser(
        "init",
        help="meshguard-init: install a compiled ruleset in this network namespace",
        description="Install the compiled ruleset with one iptables-restore --noflush per"
        " family, verify it with iptables-save, and exit non-zero with a one-line reason on any"
        " failure so the pod never runs unprotected. Safe to run again (container restart)."
        f" The ruleset comes from --ruleset-file, or the ${RULESET_ENV} environment variable,"
        f" or {DEFAULT_RULESET_FILE} (the downward-API file of the {names.RULESET} annotation).",
    )
    source = init.add_mutually_exclusive_group()
    source.add_argument("--ruleset-file", type=Path, help="path of the ruleset document")
    source.add_argument("--ruleset-env", metavar="VAR", help="environment variable holding it")
    init.add_argument("--family", choices=[f.value for f in Family], help="only this family")
    init.add_argument(
        "--dry-run",
        action="store_true",
        help="print the payload that would be applied to the current tables; change nothing",
    )
    init.set_defaults(handler=_cmd_init)

    inject = commands.add_parser(
        "inject",
        help="add meshguard to Istio-injected workloads (like istioctl kube-inject)",
        description="Read workloads already injected by Istio (pipe `istioctl kube-inject -f"
        " app.yaml` into `meshguard inject -f -`), check each pod template's posture, compile"
        " its ruleset, record it on the pod and insert meshguard-init after istio-init. Prints"
        " the documents in their order with every other field kept. Pod templates without"
        " istio-proxy, opted-out and ambient pods pass through unchanged (a note on stderr).",
    )
    inject.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    _add_injection_flags(inject)
    inject.set_defaults(handler=_cmd_inject)

    webhook = commands.add_parser(
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
    webhook.add_argument("--port", type=int, default=9443)
    webhook.add_argument(
        "--reload-interval",
        type=float,
        default=5.0,
        help="seconds between checks of the certificate files for a rotation",
    )
    webhook.add_argument(
        "--no-template",
        action="store_true",
        help="do not ask Istio for the meshguard template (istiod runs without it); the"
        " webhook then inserts meshguard-init itself when it is reinvoked after Istio",
    )
    _add_injection_flags(webhook)
    webhook.set_defaults(handler=_cmd_serve_webhook)

    authz = commands.add_parser(
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
    policies.add_argument("--kubernetes", action="store_true", help="watch pods in the cluster")
    authz.add_argument("--host", default="127.0.0.1", help="address to listen on")
    authz.add_argument("--port", type=int, default=9191)
    authz.add_argument(
        "--metrics-port", type=int, default=9192, help="Prometheus metrics port (0: none)"
    )
    authz.set_defaults(handler=_cmd_serve_authz)

    envoy = commands.add_parser(
        "envoy-config",
        help="print the Envoy loopback listener configuration (standalone or for Istio)",
        description="Print the loopback listener that receives the flows meshguard's rules"
        " redirect: as a standalone Envoy bootstrap (bootstrap), as the Istio EnvoyFilter that"
        " adds it to every sidecar (envoyfilter), or as the IstioOperator overlay with the"
        " meshConfig extensionProviders entry for the authz service (mesh-config).",
    )
    envoy.add_argument(
        "--format", choices=["bootstrap", "envoyfilter", "mesh-config"], default="bootstrap"
    )
    envoy.add_argument("--authz-host", default="127.0.0.1", help="authz server (bootstrap)")
    envoy.add_argument("--authz-port", type=int, default=9191, help="authz server port")
    envoy.add_argument("--admin-port", type=int, default=15000, help="Envoy admin (bootstrap)")
    envoy.set_defaults(handler=_cmd_envoy_config)

    template = commands.add_parser(
        "istio-template",
        help="print the Istio injection template 'meshguard' (values overlay for istiod)",
        description="Print the `meshguard` injection template for Istio's"
        " sidecarInjectorWebhook.templates, as an IstioOperator overlay (istioctl install -f) or"
        " as istiod Helm values. Pods then ask for it with inject.istio.io/templates:"
        " sidecar,meshguard (the webhook adds it).",
    )
    template.add_argument("--format", choices=["iop", "helm"], default="iop")
    template.add_argument("--image", default=DEFAULT_IMAGE, help="meshguard image")
    template.set_defaults(handler=_cmd_istio_template)
    return parser


def _add_injection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--posture-action",
        choices=[a.value for a in PostureAction],
        default=PostureAction.FIX.value,
        help="fix: patch what can be patched and warn (default); deny: refuse instead",
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image of meshguard-init")


def injection_settings(args: argparse.Namespace, *, request_template: bool) -> InjectSettings:
    return InjectSettings(
        posture=PostureSettings(default_action=PostureAction(args.posture_action)),
        init=InitContainerSettings(image=args.image),
        request_template=request_template,
    )


# --- meshguard rules ----------------------------------------------------------------------


def _cmd_rules(args: argparse.Namespace) -> int:
    try:
        documents = _read_manifest(args.filename)
        templates = list(pod_templates(documents))
    except MalformedInputError as exc:
        return _fail(f"{args.filename}: {exc}", EXIT_USAGE)
    settings = CompilerSettings()
    failed = compiled = 0
    for template in templates:
        try:
            ruleset = _compile_template(template, settings=settings)
        except RefusedError as exc:
            print(f"error: {template.label}: {exc}", file=sys.stderr)
            failed += 1
            continue
        except MalformedInputError as exc:
            print(f"error: {template.label}: malformed pod spec: {exc}", file=sys.stderr)
            failed += 1
            continue
        if ruleset is None:
            continue
        compiled += 1
        for warning in ruleset.warnings:
            print(f"warning: {template.label}: {warning}", file=sys.stderr)
        _print_ruleset(template, ruleset, family=args.family, output=args.output)
    if failed:
        return EXIT_FAILED
    if not compiled:
        return _fail(
            f"{args.filename}: no Istio-injected pod template found (run it through"
            " `istioctl kube-inject -f` first)",
            EXIT_FAILED,
        )
    return EXIT_OK


def _compile_template(template: PodTemplate, *, settings: CompilerSettings) -> Ruleset | None:
    pod = read_pod(metadata=template.metadata, spec=template.spec)
    skip = _skip_reason(pod.annotations, has_proxy=pod.proxy is not None)
    if skip:
        print(f"note: {template.label}: skipped, {skip}", file=sys.stderr)
        return None
    return compile_pod(pod, settings=settings)


def _skip_reason(annotations: Mapping[str, str], *, has_proxy: bool) -> str | None:
    if parse_opt_out(annotations.get(names.INJECT)):
        return f"opted out ({names.INJECT}: false)"
    if annotations.get(AMBIENT_ANNOTATION) == "enabled":
        return "ambient-mode pod (no sidecar): meshguard does not apply"
    if not has_proxy:
        return "no istio-proxy container (not injected by Istio)"
    return None


def _print_ruleset(
    template: PodTemplate, ruleset: Ruleset, *, family: str | None, output: str
) -> None:
    if output == "json":
        print(ruleset.to_json())
        return
    print(f"# meshguard ruleset for {template.label} ({ruleset.digest})")
    for fam in Family:
        if family and fam.value != family:
            continue
        print(f"# {fam.value}: {fam.restore} --noflush")
        sys.stdout.write(ruleset.family(fam).payload())
        for route in ruleset.family(fam).local_routes:
            print(f"# and first: ip -6 route replace local {route} dev lo")


def _read_manifest(filename: str) -> list[object]:
    if filename == "-":
        return read_documents(sys.stdin)
    return read_documents(Path(filename))


# --- meshguard inject ---------------------------------------------------------------------


def _cmd_inject(args: argparse.Namespace) -> int:
    try:
        documents = _read_manifest(args.filename)
        templates = list(pod_templates(documents))
    except MalformedInputError as exc:
        return _fail(f"{args.filename}: {exc}", EXIT_USAGE)
    settings = injection_settings(args, request_template=False)
    failed = False
    for template in templates:
        try:
            result = inject_pod(template.metadata, template.spec, settings=settings)
        except RefusedError as exc:
            print(f"error: {template.label}: {exc}", file=sys.stderr)
            failed = True
            continue
        except MalformedInputError as exc:
            print(f"error: {template.label}: malformed pod spec: {exc}", file=sys.stderr)
            failed = True
            continue
        if result.outcome is Outcome.SKIPPED:
            print(f"note: {template.label}: unchanged, {result.reason}", file=sys.stderr)
        for warning in result.warnings:
            print(f"warning: {template.label}: {warning}", file=sys.stderr)
    if failed:
        return _fail("meshguard inject: nothing written, fix the errors above", EXIT_FAILED)
    yaml.safe_dump_all(documents, sys.stdout, sort_keys=False, default_flow_style=False)
    return EXIT_OK


def _cmd_serve_webhook(args: argparse.Namespace) -> int:
    settings = WebhookSettings(
        cert_file=args.cert,
        key_file=args.key,
        host=args.host,
        port=args.port,
        reload_interval=args.reload_interval,
        inject=injection_settings(args, request_template=not args.no_template),
    )
    try:
        asyncio.run(_serve_until_signal(settings))
    except (OSError, ssl.SSLError) as exc:
        return _fail(f"meshguard serve-webhook: {exc}", EXIT_FAILED)
    return EXIT_OK


async def _serve_until_signal(settings: WebhookSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run_webhook(settings, stop=stop)


def _cmd_serve_authz(args: argparse.Namespace) -> int:
    settings = AuthzSettings(host=args.host, port=args.port, metrics_port=args.metrics_port or None)
    watcher: KubernetesStore | None = None
    try:
        if args.kubernetes:
            watcher = KubernetesStore(KubernetesPodSource())
            watcher.start()
            store: PolicyStore = watcher
        else:
            store = StaticStore.from_files(args.pods)
        asyncio.run(_serve_authz_until_signal(settings, store))
    except MeshguardError as exc:
        return _fail(f"meshguard serve-authz: {exc}", EXIT_USAGE)
    except OSError as exc:
        return _fail(f"meshguard serve-authz: {exc}", EXIT_FAILED)
    finally:
        if watcher is not None:
            watcher.stop()
    return EXIT_OK


async def _serve_authz_until_signal(settings: AuthzSettings, store: PolicyStore) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve_authz(settings, store=store, stop=stop)


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    text = envoy_config_text(
        args.format, authz_host=args.authz_host, authz_port=args.authz_port,
        admin_port=args.admin_port,
    )  # fmt: skip
    sys.stdout.write(text)
    return EXIT_OK


def _cmd_istio_template(args: argparse.Namespace) -> int:
    sys.stdout.write(istio_template(InitContainerSettings(image=args.image), fmt=args.format))
    return EXIT_OK


# --- meshguard init -----------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        ruleset = Ruleset.from_json(_ruleset_text(args, os.environ))
        families = [Family(args.family)] if args.family else list(Family)
        if args.dry_run:
            for family in families:
                current = parse_save(run_command([family.save]))
                print(f"# {family.value}: {family.restore} --noflush")
                sys.stdout.write(plan_payload(ruleset.family(family), current))
            return EXIT_OK
        install(ruleset, run=run_command, families=families)
    except MeshguardError as exc:
        return _fail(f"meshguard init: {exc}", EXIT_FAILED)
    return EXIT_OK


def _ruleset_text(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.ruleset_env:
        if args.ruleset_env not in environ:
            raise MeshguardFailure(f"environment variable {args.ruleset_env} is not set")
        text, origin = environ[args.ruleset_env], f"${args.ruleset_env}"
    elif args.ruleset_file is None and RULESET_ENV in environ:
        text, origin = environ[RULESET_ENV], f"${RULESET_ENV}"
    else:
        path = args.ruleset_file or Path(DEFAULT_RULESET_FILE)
        try:
            text, origin = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise MeshguardFailure(f"cannot read ruleset {path}: {exc}") from None
    if not text.strip():
        raise MeshguardFailure(
            f"ruleset {origin} is empty: the {names.RULESET} annotation is missing (was the pod"
            " admitted by the meshguard webhook?)"
        )
    return text


def _fail(message: str, code: int, stream: TextIO | None = None) -> int:
    print(message, file=stream or sys.stderr)
    return code
