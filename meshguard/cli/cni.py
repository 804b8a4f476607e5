"""``meshguard cni ...``: the node-side (Istio CNI mode) commands; ``validate`` runs in the pod."""

from __future__ import annotations

import argparse

from meshguard.cli import EXIT_FAILED, EXIT_OK, fail
from meshguard.cni.validate import validate
from meshguard.errors import MeshguardError


def run_validate(args: argparse.Namespace) -> int:
    try:
        problems = validate(mode=args.mode)
    except MeshguardError as exc:
        return fail(f"meshguard-validation: {exc}", EXIT_FAILED)
    if problems:
        return fail(f"meshguard-validation: {'; '.join(problems)}", EXIT_FAILED)
    return EXIT_OK
