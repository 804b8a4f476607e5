"""``meshguard rules``: the exact payloads meshguard-init applies, for pods in a manifest."""

from __future__ import annotations

import argparse
import sys

from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.errors import MalformedInputError, RefusedError
from meshguard.inject.transform import skip_reason
from meshguard.manifests import PodTemplate, pod_templates, read_source
from meshguard.pod import read_pod
from meshguard.rules import nftables
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.ruleset import Family, Ruleset


def run(args: argparse.Namespace) -> int:
    try:
        templates = list(pod_templates(read_source(args.filename)))
    except MalformedInputError as exc:
        return fail(f"{args.filename}: {exc}", EXIT_USAGE)
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
        _print_ruleset(
            template,
            ruleset,
            family=args.family,
            output=args.output,
            backend=_backend(args, ruleset),
        )
    if failed:
        return EXIT_FAILED
    if not compiled:
        return fail(
            f"{args.filename}: no Istio-injected pod template found (run it through"
            " `istioctl kube-inject -f` first)",
            EXIT_FAILED,
        )
    return EXIT_OK


def _compile_template(template: PodTemplate, *, settings: CompilerSettings) -> Ruleset | None:
    pod = read_pod(metadata=template.metadata, spec=template.spec)
    skip = skip_reason(template.metadata)
    if not skip and pod.proxy is None:
        skip = "no istio-proxy container (not injected by Istio)"
    if skip:
        print(f"note: {template.label}: skipped, {skip}", file=sys.stderr)
        return None
    return compile_pod(
        pod, settings=settings, native_nftables=uses_native_nftables(pod, template.spec)
    )


def _backend(args: argparse.Namespace, ruleset: Ruleset) -> str:
    """``--backend``, else the pod's own: nftables when its Istio runs native nftables."""
    chosen: str | None = getattr(args, "backend", None)
    if chosen:
        return chosen
    return "nftables" if ruleset.native_nftables else "iptables"


def _print_ruleset(
    template: PodTemplate, ruleset: Ruleset, *, family: str | None, output: str, backend: str
) -> None:
    if output == "json":
        print(ruleset.to_json())
        return
    print(f"# meshguard ruleset for {template.label} ({ruleset.digest})")
    if backend == "nftables":
        families = [f for f in Family if not family or f.value == family]
        print("# nftables: nft -f - (one atomic transaction; Istio's tables untouched)")
        sys.stdout.write(nftables.render(ruleset, families=families))
        for route in ruleset.ipv6.local_routes if Family.IPV6 in families else ():
            print(f"# and first: ip -6 route replace local {route} dev lo")
        return
    for fam in Family:
        if family and fam.value != family:
            continue
        print(f"# {fam.value}: {fam.restore} --noflush")
        sys.stdout.write(ruleset.family(fam).payload())
        for route in ruleset.family(fam).local_routes:
            print(f"# and first: ip -6 route replace local {route} dev lo")
