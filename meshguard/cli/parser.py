"""What the ``meshguard`` command accepts: every subcommand, its flags, their types and help.

Declarations only: each subcommand names its handler (``module:function``, imported when it
runs, by :func:`meshguard.cli.handler`) and the extra it needs; running a command and mapping
its errors to the exit status is :mod:`meshguard.cli`'s. The servers' and configurations'
commands are declared in :mod:`meshguard.cli.parser_servers`, Istio CNI mode's in
:mod:`meshguard.cli.parser_cni`, what they share in :mod:`meshguard.cli.flags`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

from meshguard import __version__, annotation_keys
from meshguard.cli.describe_args import add_commands as add_describe_commands
from meshguard.cli.describe_args import add_manifest_flags
from meshguard.cli.flags import (
    HelpFormatter,
    Subcommands,
    add_injection_flags,
    add_trusted_keys_flag,
    command,
    seconds,
)
from meshguard.cli.parser_cni import add_cni
from meshguard.cli.parser_servers import add_configs, add_servers
from meshguard.rules.ruleset import Family

DEFAULT_RULESET_FILE: Final = "/etc/meshguard/ruleset"
RULESET_ENV: Final = "MESHGUARD_RULESET"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshguard",
        formatter_class=HelpFormatter,
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
    add_servers(commands)
    add_configs(commands)
    _add_completion(commands)
    add_cni(commands)
    _add_keys(commands)
    return parser


def _add_keys(commands: Subcommands) -> None:
    keys = commands.add_parser("keys", help="the webhook's signing key and its public keys")
    sub = keys.add_subparsers(title="commands", metavar="COMMAND", dest="keys_command")
    generate = sub.add_parser(
        "generate",
        formatter_class=HelpFormatter,
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


def _add_demo(commands: Subcommands) -> None:
    demo = command(
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
    rules = command(
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

    add_describe_commands(commands, command)

    init = command(
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
        type=seconds,
        metavar="SECONDS",
        help="wait at most this long for another meshguard installer of this network namespace"
        " (default: $MESHGUARD_LOCK_TIMEOUT, else 30)",
    )
    init.set_defaults(handler="meshguard.cli.init:run")


def _add_injection(commands: Subcommands) -> None:
    inject = command(
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


def _add_completion(commands: Subcommands) -> None:
    completion = command(
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
