"""The webhook's signature over what it admitted: ``meshguard.io/attestation``.

Every consumer of a pod's meshguard annotations (the CNI node plugin, which installs the
ruleset as root on the node; the authz server, which enforces the admitted policy record;
meshguard-init, for consistency) first checks that meshguard's webhook admitted them. A
digest proves nothing — anyone can compute one — so the webhook signs, with an Ed25519 key
only it holds, a canonical claim over:

- ``annotations``: the sha256 of the exact text of every annotation consumers act on
  (:data:`COVERED`: ``meshguard.io/ruleset`` and ``meshguard.io/status``; the status holds
  the admitted policy record and every digest a later record adds, so they are covered too);
- ``subject``: what the pod cannot choose freely once admitted, so that one pod's signed
  annotations copied onto another pod do not verify there: its namespace, its service
  account, and the uid (and the proxy's uid/gid) of every container the rules govern.

Consumers verify with public keys only (:class:`TrustedKeys`, a set: keys rotate with
overlap), against the subject they compute from the pod object they read themselves.
Anything off — no attestation, an unknown key id, a bad signature, another subject, an
annotation whose text is not the one signed — is an :class:`AttestationError`; the
consumer refuses the pod (fail closed). Pure: no I/O besides reading key files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshguard import annotation_keys
from meshguard.errors import MalformedInputError, UsageError

FORMAT_VERSION: Final = 1
#: The annotations whose exact text the attestation covers (those consumers act on).
COVERED: Final = (annotation_keys.RULESET, annotation_keys.STATUS)
#: Prepended to the signed bytes: a signature over anything else never verifies as this.
DOMAIN: Final = b"meshguard.io/attestation v1\n"
MAX_ATTESTATION_BYTES: Final = 16 * 1024
MAX_KEY_FILE_BYTES: Final = 256 * 1024
#: A public key, or a certificate carrying one (the chart's generated key is published as a
#: self-signed certificate: Helm can make one from a key, not a bare public key).
_PEM_PUBLIC = re.compile(r"-----BEGIN (PUBLIC KEY|CERTIFICATE)-----.+?-----END \1-----", re.DOTALL)


class AttestationError(MalformedInputError):
    """A pod's meshguard annotations are not what meshguard's webhook signed for this pod:
    whoever wrote them (bypassing or editing after the webhook) is at fault."""


class KeyFileError(UsageError):
    """A key file is unreadable or not an Ed25519 key: whoever configured it fixes it."""


@dataclass(frozen=True, kw_only=True)
class Subject:
    """What the signature binds a pod's annotations to."""

    namespace: str
    service_account: str
    #: container -> uid, for every container the rules govern (None: no uid stated).
    containers: Mapping[str, int | None]
    proxy: tuple[int, int]

    def document(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "containers": dict(sorted(self.containers.items())),
            "proxy": list(self.proxy),
        }


def subject_of(
    *, metadata: Mapping[str, Any], spec: Mapping[str, Any], namespace: str | None = None
) -> Subject:
    """The subject of a pod, as the webhook signs it and every consumer recomputes it.

    ``namespace``: the admission request's (a pod being created may not state its own).
    The service account is the one the API server's ServiceAccount admission set (it runs
    before mutating webhooks), ``default`` when absent (pods outside a cluster).
    """
    from meshguard.pod import read_pod  # noqa: PLC0415 - meshguard-init never needs it

    view = read_pod(metadata=metadata, spec=spec)
    identity = view.proxy_identity
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return Subject(
        namespace=str(namespace or view.namespace or "default"),
        service_account=str(account),
        containers={c.name: c.uid for c in view.workload},
        proxy=(identity.uid, identity.gid),
    )


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the start of its raw bytes' sha256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _claims(subject: Subject, annotations: Mapping[str, str]) -> dict[str, Any]:
    return {
        "subject": subject.document(),
        "annotations": {
            key: text_digest(annotations[key]) for key in COVERED if key in annotations
        },
    }


@dataclass(frozen=True)
class Signer:
    """The webhook's private key (only the webhook holds it)."""

    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def attest(self, *, subject: Subject, annotations: Mapping[str, str]) -> str:
        """The ``meshguard.io/attestation`` value over ``annotations`` (the covered ones)."""
        claims = _claims(subject, annotations)
        signature = self.private.sign(DOMAIN + _canonical(claims))
        envelope = {
            "version": FORMAT_VERSION,
            "keyId": self.key_id,
            "claims": claims,
            "signature": base64.b64encode(signature).decode(),
        }
        return _canonical(envelope).decode()


def generate() -> Signer:
    """A new signing key (``meshguard keys generate``, the sandbox, the demo)."""
    return Signer(Ed25519PrivateKey.generate())


def private_pem(signer: Signer) -> str:
    return signer.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def load_signer(path: Path) -> Signer:
    """The Ed25519 private key in a PEM file (PKCS#8), or :class:`KeyFileError`."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"signing key {path}: not an unencrypted PEM private key ({exc})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path}: {type(key).__name__}, expected an Ed25519 key")
    return Signer(key)


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys an attestation may be signed with, by key id (several: rotation)."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def from_pem(cls, text: str, *, origin: str) -> TrustedKeys:
        """Every ``PUBLIC KEY`` (or ``CERTIFICATE``) block of ``text``; at least one, all
        Ed25519."""
        keys: dict[str, Ed25519PublicKey] = {}
        for match in _PEM_PUBLIC.finditer(text):
            block = match.group(0).encode()
            try:
                key = (
                    x509.load_pem_x509_certificate(block).public_key()
                    if match.group(1) == "CERTIFICATE"
                    else serialization.load_pem_public_key(block)
                )
            except (ValueError, TypeError) as exc:
                raise KeyFileError(
                    f"trusted keys {origin}: unreadable public key ({exc})"
                ) from None
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFileError(
                    f"trusted keys {origin}: {type(key).__name__}, expected Ed25519 keys"
                )
            keys[key_id(key)] = key
        if not keys:
            raise KeyFileError(f"trusted keys {origin}: no PEM public key (BEGIN PUBLIC KEY) in it")
        return cls(keys)

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        """A PEM file of public keys, or a directory of them (a mounted ConfigMap: every
        regular file not starting with ``.``)."""
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
            text = "\n".join(_read(p).decode("ascii", "replace") for p in files)
        else:
            text = _read(path).decode("ascii", "replace")
        return cls.from_pem(text, origin=str(path))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def pem(self) -> str:
        return "".join(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
            for _, key in sorted(self.keys.items())
        )

    def verify(self, *, annotations: Mapping[str, str], subject: Subject, where: str) -> None:
        """Raise :class:`AttestationError` unless ``annotations`` carry an attestation signed
        by one of these keys, for ``subject``, over the exact text of every covered
        annotation present (and no covered annotation missing)."""
        text = annotations.get(annotation_keys.ATTESTATION)
        if text is None:
            raise AttestationError(
                f"{where}: no {annotation_keys.ATTESTATION}: its meshguard annotations were not"
                " written by meshguard's webhook (unsigned)"
            )
        claims = self._verified_claims(text, where=where)
        signed_subject = claims.get("subject")
        if signed_subject != subject.document():
            raise AttestationError(
                f"{where}: {annotation_keys.ATTESTATION} was signed for another pod"
                f" ({_show(signed_subject)}), this pod is {_show(subject.document())}:"
                " annotations copied from another pod are refused"
            )
        signed = claims.get("annotations")
        if not isinstance(signed, dict):
            raise AttestationError(f"{where}: {annotation_keys.ATTESTATION}: no annotations")
        for key in COVERED:
            present = annotations.get(key)
            if present is None and key not in signed:
                continue
            if present is None or signed.get(key) != text_digest(present):
                raise AttestationError(
                    f"{where}: {key} is not the text meshguard's webhook signed"
                    f" ({'missing' if present is None else 'altered or replaced'})"
                )

    def verify_text(self, attestation: str, *, key: str, text: str, where: str) -> None:
        """meshguard-init's check (it sees its files, not the pod): ``attestation`` is signed
        by one of these keys and covers exactly ``text`` as annotation ``key``."""
        signed = self._verified_claims(attestation, where=where).get("annotations")
        if not isinstance(signed, dict) or signed.get(key) != text_digest(text):
            raise AttestationError(f"{where}: {key} is not the text meshguard's webhook signed")

    def _verified_claims(self, text: str, *, where: str) -> dict[str, Any]:
        name = annotation_keys.ATTESTATION
        if len(text.encode()) > MAX_ATTESTATION_BYTES:
            raise AttestationError(f"{where}: {name}: larger than {MAX_ATTESTATION_BYTES} bytes")
        try:
            envelope = json.loads(text)
        except ValueError:
            raise AttestationError(f"{where}: {name}: not JSON") from None
        if not isinstance(envelope, dict) or envelope.get("version") != FORMAT_VERSION:
            raise AttestationError(f"{where}: {name}: not a version {FORMAT_VERSION} attestation")
        kid, claims, signature = (envelope.get(k) for k in ("keyId", "claims", "signature"))
        if not isinstance(claims, dict) or not isinstance(signature, str):
            raise AttestationError(f"{where}: {name}: no claims or no signature")
        public = self.keys.get(kid) if isinstance(kid, str) else None
        if public is None:
            raise AttestationError(
                f"{where}: {name}: signed with key {_show(kid)}, which is not trusted"
                f" (trusted: {', '.join(self.ids)})"
            )
        if not _verified(public, str(kid), signature, _canonical(claims)):
            raise AttestationError(f"{where}: {name}: the signature does not verify with key {kid}")
        return claims


def _verified(public: Ed25519PublicKey, kid: str, signature: str, claims: bytes) -> bool:
    if (kid, signature, claims) in _VERIFIED:
        return True
    try:
        public.verify(base64.b64decode(signature, validate=True), DOMAIN + claims)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED.add((kid, signature, claims))
    return True


#: (key id, signature, canonical claims) that verified: the pods of a Deployment share one
#: attestation, so a relist of thousands of pods checks each distinct one once. Only
#: successes are kept; a key id is its key's own hash, so an entry holds for that key only.
_VERIFIED: set[tuple[str, str, bytes]] = set()
_VERIFIED_MAX: Final = 4096


def verify_pod(
    trusted: TrustedKeys,
    *,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    where: str,
) -> None:
    """Verify a pod object (as the API server has it) against its own subject."""
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise AttestationError(f"{where}: metadata.annotations is not a mapping")
    try:
        subject = subject_of(metadata=metadata, spec=spec)
    except MalformedInputError as exc:
        raise AttestationError(f"{where}: {exc}") from None
    trusted.verify(
        annotations={str(k): str(v) for k, v in annotations.items()}, subject=subject, where=where
    )


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path}: larger than {MAX_KEY_FILE_BYTES} bytes")
    return data


def _show(value: object, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
