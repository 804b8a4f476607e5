"""``meshguard describe`` and ``meshguard unprotected`` (also ``kubectl meshguard ...``): who
may talk to whom in each pod, and which pods Istio injected without meshguard — over
manifests (``-f``, any number, directories; ``kubectl get pods -A -o yaml`` of any size) or
over the live cluster that kubeconfig points at.

Everything is streamed: a pod is read, judged, printed and dropped; memory holds one pod (one
LIST page from a cluster), the names of the unprotected pods for the summary, and — reading
files only — the unprotected pods whose namespace has not been seen yet (a Namespace later in
the input may opt them out; they are printed at the end).

Exit status (docs/describe-schema.md): 0 nothing found; 1 a pod's policy cannot be read, or
the cluster cannot be read (as kubectl); 2 bad usage or unreadable input; 3 with
``--fail-on-unprotected``, a pod has Istio's sidecar and no meshguard; 4 a pod's meshguard
annotations were changed after admission (tampered). When several apply, the highest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from meshguard import yaml_io
from meshguard.cli import EXIT_FAILED, EXIT_OK
from meshguard.cli.found import Found, NamespaceSeen
from meshguard.describe import (
    PodDescription,
    PodRef,
    Protection,
    Verdict,
    describe_pod,
    namespace_opted_out,
    protection,
    text_lines,
)
from meshguard.errors import UsageError
from meshguard.inject.transform import OPT_OUT_EXEMPTION
from meshguard.manifests import PodTemplate, stream_objects
from meshguard.recent_denials import RecentDenials
from meshguard.rules.compiler import CompilerSettings

#: Exit status of ``--fail-on-unprotected`` when a pod has Istio's sidecar and no meshguard
#: (distinct from 1, a pod whose policy cannot be read).
EXIT_UNPROTECTED: Final = 3
#: Exit status when a pod's meshguard annotations were edited after admission.
EXIT_TAMPERED: Final = 4
#: Flags that read the cluster (meaningless with -f).
CLUSTER_FLAGS: Final = (
    "namespace",
    "all_namespaces",
    "selector",
    "kubeconfig",
    "context",
    "recent_denials",
    "meshguard_namespace",
)


def run(args: argparse.Namespace) -> int:
    """``describe``: every pod in full (or only the unprotected, ``--only-unprotected``)."""
    return _audit(args, only_unprotected=args.only_unprotected)


def run_unprotected(args: argparse.Namespace) -> int:
    """``unprotected``: the pods with Istio's sidecar and no meshguard, one line each."""
    return _audit(args, only_unprotected=True)


def _audit(args: argparse.Namespace, *, only_unprotected: bool) -> int:
    opt_out = _label(args.opt_out_label)
    refuse_pod_opt_out = getattr(args, "pod_opt_out", "allow") == "refuse"
    if getattr(args, "meshguard_namespace", None) and not getattr(args, "recent_denials", False):
        raise UsageError("--meshguard-namespace names where --recent-denials reads: give both")
    if args.filename:
        _refuse_cluster_flags(args)
        found: Iterator[Found] = _from_files(args.filename, args.recursive, opt_out)
        complete = False
    else:
        from meshguard.cli.cluster import pods_of_cluster  # noqa: PLC0415 - the client is heavy

        found = pods_of_cluster(args, opt_out, exemptions=refuse_pod_opt_out)
        complete = True
    recent = None
    if getattr(args, "recent_denials", False):
        from meshguard.cli.recent_denials import reader  # noqa: PLC0415 - the client is heavy

        recent = reader(args)
    audit = _Audit(
        opt_out=opt_out,
        printer=_Printer(output=args.output, only_unprotected=only_unprotected),
        namespaces_complete=complete,
        refuse_pod_opt_out=refuse_pod_opt_out,
        recent_denials=recent,
    )
    for item in found:
        audit.take(item)
    audit.finish()
    summary = audit.summary()
    show = audit.unprotected or only_unprotected or args.fail_on_unprotected
    if summary and show:
        print(summary, file=sys.stdout if args.output == "text" else sys.stderr)
    return audit.status(fail_on_unprotected=args.fail_on_unprotected)


def _refuse_cluster_flags(args: argparse.Namespace) -> None:
    given = [name for name in CLUSTER_FLAGS if getattr(args, name, None)]
    if given or getattr(args, "resources", None):
        what = ", ".join("--" + name.replace("_", "-") for name in given) or "a pod's name"
        raise UsageError(f"-f reads manifests, not the cluster: {what} cannot be combined with it")


def _is_exempt(labels: Mapping[str, object]) -> bool:
    """The namespace may opt its pods out where pod opt-out is refused."""
    key, value = OPT_OUT_EXEMPTION
    return labels.get(key) == value


def _from_files(filenames: list[str], recursive: bool, opt_out: tuple[str, str]) -> Iterator[Found]:
    key, value = opt_out
    for source in stream_objects(filenames, recursive=recursive):
        for obj in source.flattened():
            if obj.kind == "Namespace":
                metadata = obj.obj.get("metadata")
                metadata = metadata if isinstance(metadata, Mapping) else {}
                labels = metadata.get("labels")
                labels = labels if isinstance(labels, Mapping) else {}
                yield NamespaceSeen(
                    str(metadata.get("name")),
                    opted_out=labels.get(key) == value,
                    exempt=_is_exempt(labels),
                )
            else:
                yield from obj.pod_templates()


@dataclass(frozen=True)
class _Held:
    """An unprotected pod whose namespace was not seen yet (reading files): its
    description, not the pod."""

    label: str
    namespace: str | None
    description: PodDescription
    #: The pod opted itself out and ``--pod-opt-out refuse`` made it unprotected: its own
    #: verdict, restored if its namespace turns out to be exempt.
    opted_out: Verdict | None = None


@dataclass
class _Audit:
    """The verdicts so far, printed as they come; the counts for the summary and status."""

    opt_out: tuple[str, str]
    printer: _Printer
    #: Every opted-out namespace is known before the first pod (read from the cluster).
    namespaces_complete: bool
    #: ``--pod-opt-out refuse``: a pod's own opt-out counts only in exempt namespaces.
    refuse_pod_opt_out: bool = False
    settings: CompilerSettings = field(default_factory=CompilerSettings)
    #: ``--recent-denials``: the described pod's recent denials (reading the cluster only).
    recent_denials: Callable[[PodTemplate], RecentDenials] | None = None
    opted_out_namespaces: set[str] = field(default_factory=set)
    exempt_namespaces: set[str] = field(default_factory=set)
    seen_namespaces: set[str] = field(default_factory=set)
    held: list[_Held] = field(default_factory=list)
    unprotected: list[str] = field(default_factory=list)
    in_mesh: int = 0
    opted_out: int = 0
    errors: int = 0
    tampered: int = 0

    def take(self, item: Found) -> None:
        if isinstance(item, NamespaceSeen):
            self.seen_namespaces.add(item.name)
            if item.opted_out:
                self.opted_out_namespaces.add(item.name)
            if item.exempt:
                self.exempt_namespaces.add(item.name)
            return
        own = self._verdict(item)
        verdict = self._refused_opt_out(item, own)
        if self.printer.only_unprotected and verdict.protection is not Protection.UNPROTECTED:
            self._count(item.label, verdict.protection)  # not printed: not described
            return
        description = self._describe(item, verdict)
        if (
            verdict.protection is Protection.UNPROTECTED
            and not self.namespaces_complete
            and item.namespace not in self.seen_namespaces
        ):
            refused = own if own is not verdict else None
            self.held.append(_Held(item.label, item.namespace, description, refused))
            return
        self._emit(item.label, description)

    def finish(self) -> None:
        """The held pods, with the Namespaces the whole input brought."""
        key, value = self.opt_out
        for held in self.held:
            description = held.description
            if held.namespace in self.opted_out_namespaces:
                verdict = namespace_opted_out(
                    f"namespace {held.namespace} is labeled {key}={value}"
                )
                description = description.model_copy(
                    update={"protection": verdict.protection, "verdict": verdict.line}
                )
            elif held.opted_out is not None and held.namespace in self.exempt_namespaces:
                description = description.model_copy(
                    update={"protection": held.opted_out.protection, "verdict": held.opted_out.line}
                )
            if self.printer.only_unprotected and description.protection is Protection.OPTED_OUT:
                self._count(held.label, description.protection)
            else:
                self._emit(held.label, description)
        self.held.clear()

    def _verdict(self, template: PodTemplate) -> Verdict:
        """Only admitted pods are judged: a workload's template says nothing about its pods
        (the webhook injects them at admission)."""
        if template.kind != "Pod":
            return Verdict(Protection.NO_SIDECAR, "")
        key, value = self.opt_out
        reason = ""
        if template.namespace in self.opted_out_namespaces:
            reason = f"namespace {template.namespace} is labeled {key}={value}"
        return protection(template.metadata, template.spec, namespace_opt_out=reason)

    def _refused_opt_out(self, template: PodTemplate, verdict: Verdict) -> Verdict:
        """``--pod-opt-out refuse`` (as the webhook's ``--opt-out refuse``): a pod that opted
        itself out is unprotected unless its namespace is labelled meshguard.io/opt-out=allowed
        (only pod-level opt-outs: a namespace's opt-out label is the admins' own)."""
        if not self.refuse_pod_opt_out or verdict.protection is not Protection.OPTED_OUT:
            return verdict
        if template.namespace in self.exempt_namespaces or "namespace" in verdict.line:
            return verdict
        key, value = OPT_OUT_EXEMPTION
        return Verdict(
            Protection.UNPROTECTED,
            f"UNPROTECTED: {verdict.line.split(':', 1)[0]}, where pod opt-out is refused (its"
            f" namespace is not labelled {key}={value}): Istio's sidecar, no loopback isolation",
        )

    def _describe(self, template: PodTemplate, verdict: Verdict) -> PodDescription:
        ref = PodRef(kind=template.kind, namespace=template.namespace, name=template.name)
        description = describe_pod(
            ref=ref,
            metadata=template.metadata,
            spec=template.spec,
            verdict=verdict,
            settings=self.settings,
        )
        if self.recent_denials is None or verdict.protection is not Protection.PROTECTED:
            return description
        return description.model_copy(update={"recent_denials": self.recent_denials(template)})

    def _count(self, label: str, protection: Protection) -> None:
        if protection is not Protection.NO_SIDECAR:
            self.in_mesh += 1
        if protection is Protection.OPTED_OUT:
            self.opted_out += 1
        if protection is Protection.UNPROTECTED:
            self.unprotected.append(label)

    def _emit(self, label: str, description: PodDescription) -> None:
        self._count(label, description.protection)
        self.errors += description.error is not None
        self.tampered += description.tampered
        self.printer.print(label, description)

    def summary(self) -> str:
        note = f", {self.opted_out} opted out" if self.opted_out else ""
        if self.unprotected:
            return (
                f"UNPROTECTED: {len(self.unprotected)} of {self.in_mesh} pod(s) with Istio's"
                f" sidecar have no meshguard{note}: {', '.join(self.unprotected)}"
            )
        if self.in_mesh:
            return f"every pod with Istio's sidecar has meshguard ({self.in_mesh} pod(s){note})"
        return "no pod with Istio's sidecar in the input"

    def status(self, *, fail_on_unprotected: bool) -> int:
        if self.tampered:
            return EXIT_TAMPERED
        if self.unprotected and fail_on_unprotected:
            return EXIT_UNPROTECTED
        return EXIT_FAILED if self.errors else EXIT_OK


@dataclass
class _Printer:
    """One pod at a time: text, JSON Lines (one document per line), or a YAML stream."""

    output: str
    only_unprotected: bool
    documents: int = 0

    def print(self, label: str, description: PodDescription) -> None:
        if self.output == "json":
            print(json.dumps(description.as_data(), separators=(",", ":")))
        elif self.output == "yaml":
            if self.documents:
                print("---")
            yaml_io.dump_all([description.as_data()], sys.stdout, allow_unicode=True)
        elif self.only_unprotected:
            print(f"{label}: {description.verdict or ''}")
        else:
            print(f"{label}:")
            if description.verdict:
                print(f"  {description.verdict}")
            for line in text_lines(description):
                print(f"  {line}")
        self.documents += 1


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--opt-out-label: expected KEY=VALUE, got {text!r}")
    return key, value
