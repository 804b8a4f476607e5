"""``meshguard inject`` (offline injection) and ``meshguard istio-template``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshguard import yaml_io
from meshguard.attestation import load_signer
from meshguard.cli import EXIT_OK, fail, worst_status
from meshguard.cli.templates import each_template
from meshguard.errors import MeshguardError, UsageError
from meshguard.init_container import InitContainerSettings
from meshguard.inject.init_step import WithoutIstioInit
from meshguard.inject.istio import istio_template as template_text
from meshguard.inject.posture import (
    BadBaselineVersionError,
    PostureAction,
    PostureSettings,
    parse_baseline_version,
)
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.l7 import L7Engine
from meshguard.manifests import pod_templates, read_sources
from meshguard.policy import Mode


def injection_settings(args: argparse.Namespace, *, request_template: bool) -> InjectSettings:
    """The injection settings of the flags (``--signing-key`` among them); :class:`UsageError`
    for a bad baseline version."""
    try:
        baseline = parse_baseline_version(args.baseline_version)
    except BadBaselineVersionError as exc:
        raise UsageError(f"--baseline-version: {exc}") from None
    key: Path | None = getattr(args, "signing_key", None)
    signer = load_signer(key) if key is not None else None
    return InjectSettings(
        posture=PostureSettings(
            default_action=PostureAction(args.posture_action),
            audit_action=PostureAction(args.audit_posture_action),
            baseline=baseline,
        ),
        init=InitContainerSettings(
            image=args.image, pull_secrets=tuple(dict.fromkeys(args.image_pull_secret))
        ),
        request_template=request_template,
        default_mode=Mode(args.default_mode),
        l7_engine=L7Engine(getattr(args, "l7_engine", None) or L7Engine.NATIVE.value),
        signer=signer,
        without_istio_init=WithoutIstioInit(args.without_istio_init),
    )


def run(args: argparse.Namespace) -> int:
    documents = read_sources(args.filename, recursive=args.recursive)
    templates = list(pod_templates(documents))
    settings = injection_settings(args, request_template=False)
    if settings.signer is None:
        print(
            "note: no --signing-key: the pods carry no meshguard.io/attestation, and the CNI"
            " plugin and the authz server refuse them",
            file=sys.stderr,
        )
    errors: list[MeshguardError] = []
    for template, result in each_template(
        templates,
        lambda t: inject_pod(t.metadata, t.spec, settings=settings),
        errors=errors,
    ):
        if result.outcome is Outcome.SKIPPED:
            print(f"note: {template.label}: unchanged, {result.reason}", file=sys.stderr)
        for warning in result.warnings:
            print(f"warning: {template.label}: {warning}", file=sys.stderr)
    if errors:
        return fail("meshguard inject: nothing written, fix the errors above", worst_status(errors))
    if args.output == "json":
        for document in documents:
            print(json.dumps(document, separators=(",", ":")))
    else:
        yaml_io.dump_all(documents, sys.stdout)
    return EXIT_OK


def istio_template(args: argparse.Namespace) -> int:
    sys.stdout.write(template_text(InitContainerSettings(image=args.image), fmt=args.format))
    return EXIT_OK
