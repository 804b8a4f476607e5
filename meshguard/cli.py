"""The ``meshguard`` command line.

Each subcommand is a thin shell around the library: parse flags, read input, call the pure
logic, print. Exit status: 0 success, 1 refused or failed (the message says why), 2 bad
usage or unreadable input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO

from meshguard import __version__, logs, names
from meshguard.errors import MalformedInputError, MeshguardError, MeshguardFailure, RefusedError
from meshguard.manifests import PodTemplate, pod_templates, read_documents
from meshguard.pod import read_pod
from meshguard.policy import parse_opt_out
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.install import install, plan_payload
from meshguard.rules.iptables import parse_save, run_command
from meshguard.rules.ruleset import Family, Ruleset

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
    return parser


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
