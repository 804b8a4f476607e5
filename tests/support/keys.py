"""One webhook signing key for the test session, and the trusted keys that verify it."""

from __future__ import annotations

from pathlib import Path

from meshguard.attestation import Signer, TrustedKeys, generate, private_pem

SIGNER: Signer = generate()
TRUSTED: TrustedKeys = TrustedKeys.from_pem(SIGNER.public_pem(), origin="the tests' key")


def signing_key_file(directory: Path) -> Path:
    """SIGNER's private key as a PEM file in ``directory`` (for ``--signing-key``)."""
    path = directory / "signing-key.pem"
    path.write_text(private_pem(SIGNER))
    return path


def trusted_keys_file(directory: Path) -> Path:
    """SIGNER's public key as a PEM file in ``directory`` (for ``--trusted-keys``)."""
    path = directory / "trusted-keys.pem"
    path.write_text(SIGNER.public_pem())
    return path
