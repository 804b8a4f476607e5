"""``meshguard init``: the meshguard-init entry point. Imports only what installing needs.

Everything it reads and changes happens under the network namespace's install lock, so two
installers at once (a restarted init container racing a node-side check) run one after the
other, and exit 0 means the rules were verified in place before the lock was let go.
``$MESHGUARD_LOCK_TIMEOUT`` (seconds, default 30) bounds the wait for the lock.
The netfilter backend is the one Istio's capture is in (:mod:`meshguard.rules.backend`),
unless ``--backend`` or ``$MESHGUARD_BACKEND`` forces one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from meshguard import annotation_keys
from meshguard.cli import DEFAULT_RULESET_FILE, EXIT_OK, RULESET_ENV, exit_status, fail
from meshguard.errors import MeshguardError, MeshguardFailure
from meshguard.init_container import ATTESTATION_FILE, TRUSTED_KEYS_ENV
from meshguard.process import CommandRunner
from meshguard.rules.backend import Backend, detect_backend, parse_backend
from meshguard.rules.install import (
    DEFAULT_LOCK_TIMEOUT_SECONDS,
    install,
    install_lock,
    plan_payload,
)
from meshguard.rules.iptables import parse_save
from meshguard.rules.ruleset import Family, Ruleset

LOCK_TIMEOUT_ENV = "MESHGUARD_LOCK_TIMEOUT"


def run(args: argparse.Namespace) -> int:
    try:
        text = _ruleset_text(args, os.environ)
        _check_attestation(args, os.environ, text)
        ruleset = Ruleset.from_json(text)
        families = [Family(args.family)] if args.family else list(Family)
        forced = _forced_backend(args)
        with install_lock(timeout=_lock_timeout(args, os.environ)) as locked:
            backend = detect_backend(
                locked,
                environ=os.environ,
                forced=forced,
                native_nftables=ruleset.native_nftables,
            )
            if args.dry_run:
                _dry_run(ruleset, families, backend=backend, run=locked)
            else:
                install(ruleset, run=locked, families=families, backend=backend)
    except MeshguardError as exc:
        return fail(f"meshguard init: {exc}", exit_status(exc))
    return EXIT_OK


def _check_attestation(args: argparse.Namespace, environ: Mapping[str, str], text: str) -> None:
    """With trusted keys (``--trusted-keys``, else ``$MESHGUARD_TRUSTED_KEYS``), the ruleset
    is installed only if the webhook's attestation covers it. A consistency check: the pod's
    author writes this container's spec and can leave the keys out; what the node trusts is
    the CNI plugin's check, and the authz server's."""
    path: Path | None = getattr(args, "trusted_keys", None)
    inline = environ.get(TRUSTED_KEYS_ENV, "").strip()
    if path is None and not inline:
        return
    from meshguard.attestation import (  # noqa: PLC0415 - only with keys: cryptography
        AttestationError,
        TrustedKeys,
    )

    trusted = (
        TrustedKeys.load(path)
        if path is not None
        else TrustedKeys.from_pem(inline, origin=f"${TRUSTED_KEYS_ENV}")
    )
    source = getattr(args, "attestation_file", None) or (
        (args.ruleset_file or Path(DEFAULT_RULESET_FILE)).parent / ATTESTATION_FILE
    )
    try:
        attestation = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AttestationError(f"cannot read the attestation {source}: {exc}") from None
    if not attestation.strip():
        raise AttestationError(
            f"{source} is empty: the ruleset is not signed by meshguard's webhook"
            f" ({annotation_keys.ATTESTATION} is missing)"
        )
    trusted.verify_text(attestation, key=annotation_keys.RULESET, text=text, where="meshguard-init")


def _forced_backend(args: argparse.Namespace) -> Backend | None:
    text: str | None = getattr(args, "backend", None)
    if text is None or text == "auto":
        return None
    return parse_backend(text, origin="--backend")


def _dry_run(
    ruleset: Ruleset, families: list[Family], *, backend: Backend, run: CommandRunner
) -> None:
    """Print what would be applied to the current tables of the chosen backend."""
    if backend is Backend.NFTABLES:
        from meshguard.rules import nftables  # noqa: PLC0415 - only the nft backend needs it

        print("# nftables: nft -f - (one transaction, both families)")
        sys.stdout.write(nftables.render(ruleset, families=families))
        return
    for family in families:
        current = parse_save(run([backend.save(family)]))
        print(f"# {family.value}: {backend.restore(family)} --noflush")
        sys.stdout.write(plan_payload(ruleset.family(family), current))


def _lock_timeout(args: argparse.Namespace, environ: Mapping[str, str]) -> float:
    # The --lock-timeout flag wins over the environment.
    flag: float | None = args.lock_timeout
    if flag is not None:
        return flag
    text = environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise MeshguardFailure(f"${LOCK_TIMEOUT_ENV} is {text!r}, expected seconds (e.g. 30)")
    return seconds


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
            f"ruleset {origin} is empty: the {annotation_keys.RULESET} annotation is missing"
            " (was the pod"
            " admitted by the meshguard webhook?)"
        )
    return text
