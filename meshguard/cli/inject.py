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
from meshguard.errors import MeshguardError
from meshguard.init_container import InitContainerSettings
from meshguard.inject.istio import istio_template as template_text
from meshguard.inject.posture import PostureAction, PostureSettings
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import pod_templates, read_source


def injection_settings(args: argparse.Namespace, *, request_template: bool) -> InjectSettings:
    """The settings of ``--posture-action``, ``--image`` and ``--signing-key``."""
    key: Path | None = getattr(args, "signing_key", None)
    signer = load_signer(key) if key is not None else None
    return InjectSettings(
        posture=PostureSettings(default_action=PostureAction(args.posture_action)),
        init=InitContainerSettings(image=args.image),
        request_template=request_template,
        signer=signer,
    )


def run(args: argparse.Namespace) -> int:
    documents = read_source(args.filename)
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
