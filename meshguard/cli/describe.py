"""``meshguard describe``: who may talk to whom in each pod of a manifest, for a person; and,
over ``kubectl get pods -A -o yaml``, which pods Istio injected without meshguard."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshguard import annotation_keys, yaml_io
from meshguard.cli import EXIT_FAILED, EXIT_OK
from meshguard.describe import Protection, Verdict, describe, protection
from meshguard.errors import MalformedInputError, RefusedError, UsageError
from meshguard.inject.transform import OPT_OUT_EXEMPTION
from meshguard.manifests import PodTemplate, pod_templates, read_source
from meshguard.pod import read_pod
from meshguard.policy import parse_mode, parse_policy
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_ruleset

#: Exit status of ``--fail-on-unprotected`` when a pod has Istio's sidecar and no meshguard
#: (distinct from 1, a pod whose policy cannot be read).
EXIT_UNPROTECTED: Final = 3


def run(args: argparse.Namespace) -> int:
    documents = read_source(args.filename)
    templates = list(pod_templates(documents))
    opt_out = _label(args.opt_out_label)
    opted_out_namespaces = _opted_out_namespaces(documents, opt_out)
    exempt = (
        _opted_out_namespaces(documents, OPT_OUT_EXEMPTION)
        if getattr(args, "pod_opt_out", "allow") == "refuse"
        else None
    )
    settings = CompilerSettings()
    reports = [
        _report(
            template,
            _refused_opt_out(template, _verdict(template, opted_out_namespaces, opt_out), exempt),
            settings,
        )
        for template in templates
    ]
    unprotected = [r.pod for r in reports if r.verdict.protection is Protection.UNPROTECTED]
    summary = _summary(reports, unprotected)
    if args.output == "text":
        _print_text(reports, only_unprotected=args.only_unprotected)
        if summary and (unprotected or args.only_unprotected or args.fail_on_unprotected):
            print(summary)
    else:
        _print_data(reports, output=args.output, only_unprotected=args.only_unprotected)
        if summary and (unprotected or args.fail_on_unprotected):
            print(summary, file=sys.stderr)
    if unprotected and args.fail_on_unprotected:
        return EXIT_UNPROTECTED
    return EXIT_FAILED if any(r.error for r in reports) else EXIT_OK


@dataclass(frozen=True, kw_only=True)
class PodReport:
    """What ``describe`` says about one pod template."""

    pod: str
    verdict: Verdict
    #: The policy in words (empty when it cannot be read).
    lines: tuple[str, ...]
    #: Why the policy cannot be read ("" when it can).
    error: str = ""

    def as_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "pod": self.pod,
            "protection": self.verdict.protection.value,
            "lines": list(self.lines),
        }
        if self.verdict.line:
            data["verdict"] = self.verdict.line
        if self.error:
            data["error"] = self.error
        return data


def _print_text(reports: list[PodReport], *, only_unprotected: bool) -> None:
    for report in reports:
        if only_unprotected:
            if report.verdict.protection is Protection.UNPROTECTED:
                print(f"{report.pod}: {report.verdict.line}")
            continue
        print(f"{report.pod}:")
        if report.verdict.line:
            print(f"  {report.verdict.line}")
        if report.error:
            print(f"  error: {report.error}")
        for line in report.lines:
            print(f"  {line}")


def _print_data(reports: list[PodReport], *, output: str, only_unprotected: bool) -> None:
    chosen = [
        r.as_data()
        for r in reports
        if not only_unprotected or r.verdict.protection is Protection.UNPROTECTED
    ]
    if output == "json":
        for data in chosen:
            print(json.dumps(data, separators=(",", ":")))
    else:
        yaml_io.dump_all(chosen, sys.stdout)


def _report(template: PodTemplate, verdict: Verdict, settings: CompilerSettings) -> PodReport:
    """The policy of one pod template in words, or why it cannot be read."""
    try:
        pod = read_pod(metadata=template.metadata, spec=template.spec)
        policy = parse_policy(pod.annotations.get(annotation_keys.POLICY))
        mode = parse_mode(pod.annotations.get(annotation_keys.MODE))
    except (RefusedError, MalformedInputError) as exc:
        return PodReport(pod=template.label, verdict=verdict, lines=(), error=str(exc))
    lines: list[str] = []
    native = uses_native_nftables(pod, template.spec)
    try:
        compiled = compile_ruleset(
            pod, policy, mode=mode, settings=settings, native_nftables=native
        )
    except RefusedError as exc:
        compiled = None
        lines.append(f"cannot be enforced as written: {exc}")
    lines.extend(
        describe(
            pod, policy, mode=mode, compiled=compiled, settings=settings, native_nftables=native
        )
    )
    return PodReport(pod=template.label, verdict=verdict, lines=tuple(lines))


def _verdict(
    template: PodTemplate, opted_out_namespaces: set[str], opt_out: tuple[str, str]
) -> Verdict:
    """Only admitted pods are judged: a workload's template says nothing about its pods (the
    webhook injects them at admission)."""
    if template.kind != "Pod":
        return Verdict(Protection.NO_SIDECAR, "")
    reason = ""
    if template.namespace in opted_out_namespaces:
        reason = f"namespace {template.namespace} is labeled {opt_out[0]}={opt_out[1]}"
    return protection(template.metadata, template.spec, namespace_opt_out=reason)


def _refused_opt_out(template: PodTemplate, verdict: Verdict, exempt: set[str] | None) -> Verdict:
    """``--pod-opt-out refuse`` (as the webhook's ``--opt-out refuse``): a pod that opted
    itself out is unprotected, unless its namespace is labelled meshguard.io/opt-out=allowed
    (only pod-level opt-outs: a namespace label is the admins' own)."""
    if exempt is None or verdict.protection is not Protection.OPTED_OUT:
        return verdict
    if template.namespace in exempt or "namespace" in verdict.line:
        return verdict
    key, value = OPT_OUT_EXEMPTION
    return Verdict(
        Protection.UNPROTECTED,
        f"UNPROTECTED: {verdict.line.split(':', 1)[0]}, where pod opt-out is refused (its"
        f" namespace is not labelled {key}={value}): Istio's sidecar, no loopback isolation",
    )


def _summary(reports: list[PodReport], unprotected: list[str]) -> str:
    in_mesh = [r.verdict for r in reports if r.verdict.protection is not Protection.NO_SIDECAR]
    opted = sum(v.protection is Protection.OPTED_OUT for v in in_mesh)
    note = f", {opted} opted out" if opted else ""
    if unprotected:
        return (
            f"UNPROTECTED: {len(unprotected)} of {len(in_mesh)} pod(s) with Istio's sidecar"
            f" have no meshguard{note}: {', '.join(unprotected)}"
        )
    if in_mesh:
        return f"every pod with Istio's sidecar has meshguard ({len(in_mesh)} pod(s){note})"
    return "no pod with Istio's sidecar in the input"


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--opt-out-label: expected KEY=VALUE, got {text!r}")
    return key, value


def _opted_out_namespaces(documents: list[Any], label: tuple[str, str]) -> set[str]:
    """Names of the Namespace objects in the input that carry meshguard's opt-out label
    (``kubectl get namespaces,pods -A -o yaml`` brings both)."""
    key, value = label
    found = set()
    for obj in _objects(documents):
        if obj.get("kind") != "Namespace":
            continue
        metadata = obj.get("metadata")
        if not isinstance(metadata, Mapping):
            continue
        labels = metadata.get("labels")
        if isinstance(labels, Mapping) and labels.get(key) == value:
            found.add(str(metadata.get("name")))
    return found


def _objects(documents: list[Any]) -> Iterator[Mapping[str, Any]]:
    for document in documents:
        if not isinstance(document, Mapping):
            continue
        items = document.get("items")
        if isinstance(items, list):
            yield from _objects(items)
        else:
            yield document
