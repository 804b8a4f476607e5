"""Who is asking: the caller's mesh workload identity on the Check channel, and the TLS
credentials of the server that learns it.

The Check channel is mutual TLS with the mesh's workload certificates: the authz server
terminates it itself (:func:`server_credentials`, files that Istio's agent writes and
rotates; re-read when they change) and requires a client certificate from the mesh's CA.
The caller's identity is the SPIFFE ID of that certificate,
``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``, read from gRPC's
authentication context (never from anything the caller writes into the request).
:func:`identity_problem` says why a caller may not ask about a pod: a caller may only ask
about pods of its own namespace and ServiceAccount (the identity Istio gives that pod).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from meshguard.errors import MalformedInputError, MeshguardFailure

log = logging.getLogger(__name__)

#: A Kubernetes namespace or ServiceAccount name (DNS label / subdomain) inside a SPIFFE ID.
_NAME: Final = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
_SPIFFE: Final = re.compile(rf"spiffe://(?P<td>{_NAME})/ns/(?P<ns>{_NAME})/sa/(?P<sa>{_NAME})")
#: gRPC core's authentication property listing the peer certificate's URI SANs.
URI_PROPERTY: Final = "peer_uri"
#: gRPC core's authentication property naming the channel's security ("ssl"; none: plaintext).
SECURITY_PROPERTY: Final = "transport_security_type"


@dataclass(frozen=True, kw_only=True)
class WorkloadIdentity:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def parse_spiffe_id(uri: str) -> WorkloadIdentity:
    """An Istio workload SPIFFE ID -> its parts; :class:`MalformedInputError` otherwise."""
    match = _SPIFFE.fullmatch(uri)
    if match is None:
        raise MalformedInputError(
            f"{uri[:200]!r} is not a workload SPIFFE ID (spiffe://TRUST-DOMAIN/ns/NS/sa/SA)"
        )
    return WorkloadIdentity(
        trust_domain=match["td"], namespace=match["ns"], service_account=match["sa"]
    )


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> WorkloadIdentity:
    """The caller's identity from a gRPC authentication context; :class:`MalformedInputError`
    when there is none (plaintext, no client certificate) or it is not exactly one SPIFFE ID."""
    uris = [value.decode("utf-8", "replace") for value in auth_context.get(URI_PROPERTY, ())]
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    if not auth_context.get(SECURITY_PROPERTY):
        raise MalformedInputError("no TLS: the caller presented no workload certificate")
    if len(spiffe) != 1:
        raise MalformedInputError(
            f"the client certificate holds {len(spiffe)} SPIFFE IDs, expected exactly one"
        )
    return parse_spiffe_id(spiffe[0])


def identity_problem(
    identity: WorkloadIdentity, *, trust_domain: str, namespace: str, service_account: str
) -> str | None:
    """Why ``identity`` may not ask about a pod of ``namespace``/``service_account``, if not."""
    if identity.trust_domain != trust_domain:
        return f"caller {identity.spiffe_id} is not of trust domain {trust_domain!r}"
    if identity.namespace != namespace or identity.service_account != service_account:
        return (
            f"caller {identity.spiffe_id} asks about a pod of ns/{namespace}/sa/"
            f"{service_account}: a workload may only ask about its own pods"
        )
    return None


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The server's certificate chain and key, and the CA bundle client certificates must
    chain to (Istio's agent writes cert-chain.pem, key.pem and root-cert.pem)."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as exc:
            raise MalformedInputError(f"cannot read the authz TLS files: {exc}") from None

    def missing(self) -> list[Path]:
        return [path for path in (self.cert, self.key, self.ca) if not path.exists()]

    def wait(
        self,
        *,
        timeout: float,
        poll: float = 0.5,
        injected: bool | None = None,
        log_every: float = 15.0,
    ) -> None:
        """Until the three files exist (Istio's agent writes them once the pod's certificate
        is issued, after the server started). Logs which files it waits for and why, at
        once and every ``log_every`` seconds; :class:`WorkloadCertificateMissingError`
        after ``timeout``. ``injected``: whether Istio injected this pod (its
        ``sidecar.istio.io/status`` annotation), None if not known."""
        cause = certificate_cause(injected)
        deadline = time.monotonic() + timeout
        next_log = time.monotonic()
        while missing := self.missing():
            now = time.monotonic()
            paths = [str(p) for p in missing]
            if now > deadline:
                raise WorkloadCertificateMissingError(
                    f"the workload certificate files are missing after {timeout:.0f}s:"
                    f" {', '.join(paths)}. {cause}"
                )
            if now >= next_log:
                log.warning(
                    "waiting for the workload certificate files %s: %s",
                    ", ".join(paths),
                    cause,
                    extra={"fields": {"event": "tls-wait", "missing": paths, "cause": cause,
                                      "injected": injected, "timeout_s": timeout}},
                )  # fmt: skip
                next_log = now + log_every
            time.sleep(poll)

    def stamp(self) -> tuple[float, ...]:
        stamps = []
        for path in (self.cert, self.key, self.ca):
            try:
                stamps.append(os.stat(path).st_mtime)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)


class WorkloadCertificateMissingError(MeshguardFailure):
    """The authz server's workload certificate never arrived: the install is at fault (the
    pod was not injected by Istio, or istiod issued no certificate)."""


#: Where the chart tells serve-authz whether Istio injected its pod: the pod's
#: ``sidecar.istio.io/status`` annotation through the downward API (empty: not injected).
ISTIO_STATUS_ENV: Final = "MESHGUARD_ISTIO_STATUS"


def injected_from_env(environ: Mapping[str, str]) -> bool | None:
    """Whether Istio injected this pod, from :data:`ISTIO_STATUS_ENV` (None: not set)."""
    if ISTIO_STATUS_ENV not in environ:
        return None
    return bool(environ[ISTIO_STATUS_ENV].strip())


def certificate_cause(injected: bool | None) -> str:
    """Why the files may be missing, and what to do, as far as this pod can tell."""
    writer = (
        "Istio's agent in this pod's istio-proxy container writes them (proxy.istio.io/config"
        " OUTPUT_CERTS) once istiod has signed the pod's certificate"
    )
    not_injected = (
        "no Istio webhook selected it (with revisions only, no default revision, the pod"
        " label sidecar.istio.io/inject=true selects nothing): set the chart's"
        " authz.istioRevision to a revision or tag Istio serves (pod label istio.io/rev)"
    )
    if injected is False:
        return (
            "this pod was not injected by Istio (no sidecar.istio.io/status annotation), so no"
            f" istio-proxy writes them: {not_injected}"
        )
    if injected is True:
        return (
            f"{writer}: the pod was injected, so check `kubectl logs <this pod> -c istio-proxy`"
            " for the certificate request"
        )
    return f"{writer}; if the pod has no istio-proxy container, {not_injected}"


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """mTLS credentials requiring a client certificate, re-read when the files change
    (Istio rotates workload certificates every 24 h by default)."""
    cert, key, ca = files.read()
    loaded = [files.stamp()]

    def configuration(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        stamp = files.stamp()
        if stamp == loaded[0]:
            return None
        try:
            fresh = files.read()
        except MalformedInputError as exc:  # half-written rotation: keep the old ones
            log.warning("%s", exc, extra={"fields": {"event": "tls-reload-failed"}})
            return None
        loaded[0] = stamp
        log.info("authz TLS files reloaded", extra={"fields": {"event": "tls-reloaded"}})
        return configuration(*fresh)

    fetcher: Callable[[], grpc.ServerCertificateConfiguration | None] = fetch
    return grpc.dynamic_ssl_server_credentials(
        configuration(cert, key, ca), fetcher, require_client_authentication=True
    )
