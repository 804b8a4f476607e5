"""The declarations of the Istio CNI mode's commands: ``meshguard cni``, the node agent's
and its repairer's flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshguard.cli.argtypes import positive_int
from meshguard.cli.flags import (
    HelpFormatter,
    Subcommands,
    add_trusted_keys_flag,
    port_number,
    positive_seconds,
    seconds,
)
from meshguard.kube_api import SERVICE_ACCOUNT_DIR


def add_cni(commands: Subcommands) -> None:
    cni = commands.add_parser("cni", help="Istio CNI mode: node-side install, in-pod check")
    sub = cni.add_subparsers(title="cni commands", metavar="COMMAND")
    validate = sub.add_parser(
        "validate", help="meshguard-validation: exit 1 unless meshguard's rules are in place"
    )
    validate.add_argument("--mode", choices=["enforce", "audit"], default="enforce")
    validate.set_defaults(handler="meshguard.cli.cni:run_validate")
    node = sub.add_parser(
        "install",
        formatter_class=HelpFormatter,
        help="node agent (the chart's DaemonSet): chain meshguard-cni after istio-cni and keep"
        " it there",
        description="Place the meshguard-cni executable in the node's CNI bin dir and a"
        " kubeconfig for it in the CNI conf dir (atomically), chain meshguard-cni's entry"
        " right after istio-cni in the node's primary CNI configuration (a .conf becomes a"
        " .conflist, others' entries are kept), then check and repair every --interval"
        " seconds; on SIGTERM remove the entry, then the files. Runs in a pod (the API server"
        " and token the plugin uses are the pod's own).",
    )
    add_node_dirs(node)
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
        type=positive_seconds,
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
        type=port_number,
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
        "--repair-interval", type=seconds, default=10.0, help="seconds between repair passes"
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
        formatter_class=HelpFormatter,
        help="node agent without CNI mode: the loopback denials of every meshguard pod on"
        " the node (init-container mode too), as JSON lines, metrics and optional Events",
        description="List the node's pods, find each one's network namespace through /proc"
        " (--proc: the host's, hostPath-mounted), verify its admitted record, and read the"
        " denials its rules report to NFLOG (docs/cni.md).",
    )
    denials.add_argument("--node-name", help="this node (default: $NODE_NAME)")
    denials.add_argument("--proc", type=Path, default=Path("/proc"), help="the host's /proc")
    denials.add_argument(
        "--metrics-port", type=port_number, default=9102, help="/metrics, /denials"
    )
    denials.add_argument(
        "--interval", type=positive_seconds, default=10.0, help="seconds between syncs"
    )
    denials.add_argument("--events", action="store_true", help="record Kubernetes Events")
    denials.add_argument(
        "--service-account-dir", type=Path, default=SERVICE_ACCOUNT_DIR, help="token, ca.crt"
    )
    add_trusted_keys_flag(denials, what="required: only verified pods are attributed")
    denials.set_defaults(handler="meshguard.cli.cni:run_denials")
    remove = sub.add_parser(
        "uninstall",
        formatter_class=HelpFormatter,
        help="remove meshguard-cni's entry, executable and kubeconfig from the node",
    )
    add_node_dirs(remove)
    remove.set_defaults(handler="meshguard.cli.cni:run_uninstall")


def add_node_dirs(parser: argparse.ArgumentParser) -> None:
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
