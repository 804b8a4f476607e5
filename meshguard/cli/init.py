"""``meshguard init``: the meshguard-init entry point. Imports only what installing needs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from meshguard import names
from meshguard.cli import DEFAULT_RULESET_FILE, EXIT_FAILED, EXIT_OK, RULESET_ENV, fail
from meshguard.errors import MeshguardError, MeshguardFailure
from meshguard.rules.install import install, plan_payload
from meshguard.rules.iptables import parse_save, run_command
from meshguard.rules.ruleset import Family, Ruleset


def run(args: argparse.Namespace) -> int:
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
        return fail(f"meshguard init: {exc}", EXIT_FAILED)
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
