"""The pieces every ``meshguard`` subcommand's declaration shares: the help formatter, the
subcommand constructor, flag value types, and flags more than one command takes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Final, TypeAlias

from meshguard.init_container import DEFAULT_INIT_IMAGE

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: meshguard.inject.posture.PostureAction's values (not imported: `meshguard init` stays light).
POSTURE_ACTIONS: Final = ("fix", "deny", "report")
#: meshguard.policy.Mode's values.
MODES: Final = ("enforce", "audit")
#: meshguard.inject.init_step.WithoutIstioInit's values.
WITHOUT_ISTIO_INIT: Final = ("skip", "node", "privileged")


class HelpFormatter(argparse.HelpFormatter):
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


def command(commands: Subcommands, name: str, **kwargs: object) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        formatter_class=HelpFormatter,
        **kwargs,  # type: ignore[arg-type]
    )
    return parser


def add_trusted_keys_flag(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument(
        "--trusted-keys",
        type=Path,
        metavar="FILE|DIR",
        help="the public keys meshguard's webhook signs with (PEM file, or a directory of"
        f" them: a mounted ConfigMap); {what}",
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
        "--without-istio-init",
        choices=WITHOUT_ISTIO_INIT,
        default="skip",
        help="pods with containers besides the proxy to which Istio gave no init step"
        " (grpc-agent template, sidecar.istio.io/interceptionMode: NONE): skip: leave them"
        " alone and say why (refused under --opt-out refuse), as they hold no privilege"
        " (default); node: meshguard-validation, the rules installed from the node by"
        " meshguard's CNI plugin; privileged: a root meshguard-init with NET_ADMIN and NET_RAW",
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
        type=secret_name,
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


def secret_name(text: str) -> str:
    """A Secret's name (a DNS subdomain), for argparse."""
    if len(text) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Secret name (lowercase letters, digits, '-' and '.')"
        )
    return text


def seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 30), got {text!r}")
    return seconds


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port (1-65535), got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value
