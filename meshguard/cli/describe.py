"""``meshguard describe``: who may talk to whom in each pod of a manifest, for a person."""

from __future__ import annotations

import argparse
import sys

from meshguard import names
from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.describe import describe
from meshguard.errors import MalformedInputError, RefusedError
from meshguard.manifests import pod_templates, read_source
from meshguard.pod import read_pod
from meshguard.policy import parse_mode, parse_policy
from meshguard.rules.compiler import CompilerSettings, compile_ruleset


def run(args: argparse.Namespace) -> int:
    try:
        templates = list(pod_templates(read_source(args.filename)))
    except MalformedInputError as exc:
        return fail(f"{args.filename}: {exc}", EXIT_USAGE)
    settings = CompilerSettings()
    failed = False
    for template in templates:
        print(f"{template.label}:")
        try:
            pod = read_pod(metadata=template.metadata, spec=template.spec)
            policy = parse_policy(pod.annotations.get(names.POLICY))
            mode = parse_mode(pod.annotations.get(names.MODE))
        except (RefusedError, MalformedInputError) as exc:
            print(f"  error: {exc}")
            failed = True
            continue
        try:
            compiled = compile_ruleset(pod, policy, mode=mode, settings=settings)
        except RefusedError as exc:
            compiled = None
            print(f"  cannot be enforced as written: {exc}")
        for line in describe(pod, policy, mode=mode, compiled=compiled, settings=settings):
            print(f"  {line}")
    sys.stdout.flush()
    return EXIT_FAILED if failed else EXIT_OK
