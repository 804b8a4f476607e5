"""A test mesh CA issuing SPIFFE workload certificates (like istiod's CA), with cryptography."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.tls import CertificateAuthority


@dataclass(frozen=True)
class Workload:
    cert: Path
    key: Path
    ca: Path
    spiffe_id: str


def spiffe_id(namespace: str, account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


AUTHZ_DNS = "meshguard-authz.meshguard-system.svc"


def issue_workload(
    ca: CertificateAuthority, directory: Path, name: str, *uris: str, dns: str | None = None
) -> Workload:
    """A workload certificate with ``uris`` as URI SANs (Istio: exactly one SPIFFE ID), no
    subject, as Istio's CA issues them; files readable by other uids (the proxy's). ``dns``
    adds a DNS name (for Python gRPC clients, which verify host names; Envoy checks the
    SPIFFE ID)."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    if dns:
        names.append(x509.DNSName(dns))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(names),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file, ca_file = (directory / f"{name}.{ext}" for ext in ("crt", "key", "ca"))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca.write_ca(ca_file)
    for path in (cert_file, key_file, ca_file):
        path.chmod(0o644)
    return Workload(cert=cert_file, key=key_file, ca=ca_file, spiffe_id=uris[0] if uris else "")
