"""``meshguard keys generate``: the operator's Ed25519 keypair for the webhook's signature."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from meshguard.attestation import generate as generate_key
from meshguard.attestation import private_pem
from meshguard.cli import EXIT_FAILED, EXIT_OK, fail


def generate(args: argparse.Namespace) -> int:
    signer = generate_key()
    try:
        _write(args.private, private_pem(signer), mode=0o600)
        _write(args.public, signer.public_pem(), mode=0o644)
    except OSError as exc:
        return fail(f"meshguard keys generate: {exc}", EXIT_FAILED)
    print(f"key id {signer.key_id}: private key {args.private}, public key {args.public}")
    return EXIT_OK


def _write(path: Path, text: str, *, mode: int) -> None:
    """Created new (never over an existing key), with ``mode`` from the start."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w", encoding="ascii") as stream:
        stream.write(text)
