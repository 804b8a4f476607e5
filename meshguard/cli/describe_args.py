"""The flags of ``describe`` and ``unprotected``, shared by ``meshguard`` and the kubectl plugin
(``kubectl meshguard``): kubectl's own names and meanings for what kubectl also does.

Declarations only (no import of what the commands run): ``meshguard init`` builds this
parser too, on every pod start.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Final, TypeAlias

from meshguard.cli.argtypes import namespace_name, positive_int

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Makes a subcommand's parser (meshguard.cli's, with its help formatter).
Command: TypeAlias = Callable[..., argparse.ArgumentParser]

#: kubectl's --chunk-size default.
CHUNK_SIZE: Final = 500
OPT_OUT_LABEL: Final = "meshguard.io/inject=disabled"
EXIT_CODES: Final = (
    "exit status: 0 nothing found; 1 a pod's policy cannot be read, or the cluster cannot be"
    " read; 2 bad usage or unreadable input; 3 --fail-on-unprotected and a pod has Istio's"
    " sidecar without meshguard; 4 a pod's meshguard annotations were changed after admission"
    " (tampered); the highest when several apply"
)


def add_commands(commands: Subcommands, command: Command) -> None:
    """``describe`` and ``unprotected``."""
    describe = command(
        commands,
        "describe",
        help="who may talk to whom in each pod, from the cluster or from manifests",
        description="For each pod (of the cluster kubeconfig points at, or of the manifests"
        " given with -f, e.g. `kubectl get namespaces,pods -A -o yaml`): the enforced mode and"
        " policy — the ones meshguard admitted — each container's uid and ports, the rules in"
        " words, the default, whether the recorded ruleset matches, the posture changes made"
        " at admission, and any change of meshguard's annotations after admission"
        " (TAMPERED). Pods with Istio's sidecar (sidecar.istio.io/status, istio-proxy) and no"
        " meshguard.io/status are flagged UNPROTECTED. -o json|yaml: one PodDescription per"
        " pod (docs/describe-schema.md).",
        epilog=EXIT_CODES,
    )
    describe.add_argument(
        "resources",
        nargs="*",
        metavar="pod NAME",
        help="pods to describe (pod NAME..., pod/NAME...); none: every pod of the namespace",
    )
    _add_selection(describe)
    describe.add_argument(
        "--only-unprotected",
        action="store_true",
        help="print only the unprotected pods, one line each, and a summary (as `unprotected`)",
    )
    describe.add_argument(
        "--recent-denials",
        action="store_true",
        help="from the cluster: each pod's recent loopback denials, from meshguard's node agent"
        " on its node (through the API server's pod proxy), else from the pod's events"
        " (advisory: anyone who may create events in the pod's namespace can write them)",
    )
    describe.add_argument(
        "--meshguard-namespace",
        type=namespace_name,
        metavar="NS",
        help="with --recent-denials: meshguard's release namespace, the only one whose node"
        " agents are asked (default meshguard-system, the chart's)",
    )
    describe.set_defaults(handler="meshguard.cli.describe:run", extra="cli")

    unprotected = command(
        commands,
        "unprotected",
        help="list the pods Istio injected without meshguard",
        description="Every pod with Istio's sidecar and no meshguard (the webhook did not see"
        " it: a revision or selection it does not cover, failurePolicy Ignore while it was"
        " down, a pod older than meshguard), one line each, and a summary. Pods in a"
        " namespace labeled with --opt-out-label (read from the live Namespace objects, or"
        ' from the Namespaces in -f\'s input) or annotated meshguard.io/inject: "false" are'
        " opted out, not unprotected.",
        epilog=EXIT_CODES,
    )
    unprotected.set_defaults(resources=[], only_unprotected=True)
    _add_selection(unprotected)
    unprotected.set_defaults(handler="meshguard.cli.describe:run_unprotected", extra="cli")


def _add_selection(parser: argparse.ArgumentParser) -> None:
    files = parser.add_argument_group("manifests (instead of the cluster)")
    files.add_argument(
        "-f",
        "--filename",
        action="append",
        default=[],
        help="a manifest file, a directory of .json/.yaml/.yml files, or - for stdin;"
        " repeatable, read in order (streamed: any size)",
    )
    files.add_argument(
        "-R", "--recursive", action="store_true", help="-f DIRECTORY: its subdirectories too"
    )
    cluster = parser.add_argument_group("the cluster (as kubectl reaches it)")
    cluster.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config; in a pod without"
        " one, its service account)",
    )
    cluster.add_argument("--context", help="kubeconfig context (default: its current-context)")
    cluster.add_argument(
        "-n", "--namespace", help="namespace (default: the context's, else default)"
    )
    cluster.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    cluster.add_argument(
        "-l", "--selector", help="label selector of the pods (e.g. app=shop,tier!=db)"
    )
    cluster.add_argument(
        "--chunk-size",
        type=positive_int,
        default=CHUNK_SIZE,
        metavar="N",
        help="objects per LIST page (limit/continue)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=["text", "json", "yaml"],
        default="text",
        help="text: in words; json: one PodDescription per line (JSON Lines, for jq); yaml:"
        " a stream of PodDescription documents",
    )
    parser.add_argument(
        "--fail-on-unprotected",
        action="store_true",
        help="exit 3 if a pod has Istio's sidecar and no meshguard (opted-out pods excepted)",
    )
    parser.add_argument(
        "--opt-out-label",
        default=OPT_OUT_LABEL,
        metavar="KEY=VALUE",
        help="the namespace label that opts out of meshguard (the chart's"
        " webhook.optOutLabel); Namespaces carrying it mark their pods as opted out"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--pod-opt-out",
        choices=["allow", "refuse"],
        default="allow",
        help='refuse: count pods that opted themselves out (meshguard.io/inject "false") as'
        " unprotected unless their namespace is labelled meshguard.io/opt-out=allowed (the"
        " chart's webhook.podOptOut: refuse)",
    )


def add_manifest_flags(parser: argparse.ArgumentParser) -> None:
    """``-f`` (required, repeatable, directories) and ``-R``, as kubectl takes them, for the
    commands that read manifests only (``rules``, ``inject``)."""
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="a manifest file, a directory of .json/.yaml/.yml files, or - for stdin;"
        " repeatable, read in order",
    )
    parser.add_argument(
        "-R", "--recursive", action="store_true", help="-f DIRECTORY: its subdirectories too"
    )
