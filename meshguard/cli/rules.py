"""``meshguard rules``: the exact payloads meshguard-init applies, for pods in a manifest.

Plain ``istioctl kube-inject`` output is a normal input: its containers usually have no
``runAsUser``, which meshguard needs to tell them apart. For those pods the command shows the
rules of the pod as meshguard admits it (``meshguard inject``, the webhook: each such
container gets a uid of its own) and says so on stderr, per pod. Pods the webhook leaves
alone are skipped with the reason (Istio's gateways among them); a pod Istio gave no init step
shows the rules an install with ``withoutIstioInit`` node or privileged applies, and says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

from meshguard import yaml_io
from meshguard.cli import EXIT_FAILED, EXIT_OK, worst_status
from meshguard.cli.templates import each_template
from meshguard.errors import MeshguardError
from meshguard.inject.init_step import WithoutIstioInit
from meshguard.inject.left_alone import gateway_reason, no_init_step_reason, skip_reason
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import PodTemplate, pod_templates, read_sources
from meshguard.pod import read_pod
from meshguard.rules import nftables
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.ruleset import Family, Ruleset


def run(args: argparse.Namespace) -> int:
    templates = list(pod_templates(read_sources(args.filename, recursive=args.recursive)))
    settings = CompilerSettings()
    errors: list[MeshguardError] = []
    compiled = 0
    for template, ruleset in each_template(
        templates, lambda t: _compile_template(t, settings=settings), errors=errors
    ):
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
    if errors:
        return worst_status(errors)
    if not compiled:
        print(
            f"{', '.join(args.filename)}: no Istio-injected pod template found that meshguard"
            " installs rules in (the notes above say why; run plain manifests through"
            " `istioctl kube-inject -f` first)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _compile_template(template: PodTemplate, *, settings: CompilerSettings) -> Ruleset | None:
    pod = read_pod(metadata=template.metadata, spec=template.spec)
    skip = skip_reason(template.metadata) or gateway_reason(pod)
    if not skip and pod.proxy is None:
        skip = "no istio-proxy container (not injected by Istio)"
    if skip:
        print(f"note: {template.label}: skipped, {skip}", file=sys.stderr)
        return None
    unprivileged = no_init_step_reason(pod)
    if unprivileged:
        print(
            f"note: {template.label}: {unprivileged}; below, the rules an install with"
            " withoutIstioInit node or privileged applies",
            file=sys.stderr,
        )
    missing = [c.name for c in pod.workload if c.uid is None]
    if missing:
        return _as_admitted(template, missing, settings=settings)
    return compile_pod(
        pod, settings=settings, native_nftables=uses_native_nftables(pod, template.spec)
    )


def _backend(args: argparse.Namespace, ruleset: Ruleset) -> str:
    """``--backend``, else the pod's own: nftables when its Istio runs native nftables."""
    chosen: str | None = getattr(args, "backend", None)
    if chosen:
        return chosen
    return "nftables" if ruleset.native_nftables else "iptables"


def _as_admitted(
    template: PodTemplate, missing: list[str], *, settings: CompilerSettings
) -> Ruleset | None:
    """The rules of the pod once meshguard admits it (uids assigned), on a copy."""
    metadata: dict[str, Any] = copy.deepcopy(template.metadata)
    spec: dict[str, Any] = copy.deepcopy(template.spec)
    # the ruleset is the same whoever installs it: node stands for node and privileged
    admission = InjectSettings(
        compiler=settings, request_template=False, without_istio_init=WithoutIstioInit.NODE
    )
    result = inject_pod(metadata, spec, settings=admission)
    if result.ruleset is None:
        print(f"note: {template.label}: skipped, {result.reason}", file=sys.stderr)
        return None
    print(
        f"note: {template.label}: container(s) {', '.join(missing)} have no runAsUser;"
        " these are the rules of the pod as meshguard admits it (`meshguard inject`, the"
        " webhook), which assigns each a uid of its own",
        file=sys.stderr,
    )
    return result.ruleset


def _print_ruleset(
    template: PodTemplate, ruleset: Ruleset, *, family: str | None, output: str, backend: str
) -> None:
    if output in ("json", "yaml"):
        document = _document(ruleset, family=family)
        if output == "json" and not family:
            print(ruleset.to_json())  # byte for byte what the webhook records
        elif output == "json":
            print(json.dumps(document, sort_keys=True, separators=(",", ":")))
        else:
            yaml_io.dump_all([document], sys.stdout)
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


def _document(ruleset: Ruleset, *, family: str | None) -> dict[str, Any]:
    """The ruleset document meshguard-init reads; with ``family``, only that family's part
    (and ``family`` says which), which meshguard-init refuses (the digest covers both)."""
    document: dict[str, Any] = json.loads(ruleset.to_json())
    if family:
        for fam in Family:
            if fam.value != family:
                document.pop(fam.value, None)
        document["family"] = family
    return document
