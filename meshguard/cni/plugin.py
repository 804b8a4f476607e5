"""meshguard's chained CNI plugin: ADD installs the pod's admitted ruleset in its namespace.

Chained after istio-cni (whose capture rules are in place by then). Per command:

- ADD: read the pod (``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` of ``CNI_ARGS``) from the API
  server; a pod meshguard did not inject (no ``meshguard.io/ruleset``, no
  ``meshguard.io/status``, no ``meshguard.io/attestation``) passes through untouched;
  otherwise verify the webhook's signature (:mod:`meshguard.attestation`: signed with one
  of the ``trustedKeys``, for this pod's namespace, service account and container uids,
  over the exact ruleset and status), then read and check its ruleset (digest, and the
  digest recorded in the status), enter ``CNI_NETNS`` and install it with
  meshguard-init's own code under the namespace's install lock (plan, one restore per family,
  verify, roll back on failure). Output: ``prevResult`` unchanged. Any failure — the API
  answers 403/404, times out or sends garbage, the ruleset is missing or altered, the install
  fails — is an error object on stdout and exit 1: the runtime does not start the pod, and
  ``msg`` shows in its events.
- CHECK: the same reading, then verify (no repair) that the namespace holds exactly the
  admitted rules, in the backend ADD installed into; what differs is the error's ``msg``.
- DEL: remove meshguard's chains and hooks from the namespace, in every backend (no API
  call: the pod may be gone); a missing namespace, or one without meshguard's rules, is
  success.
- VERSION: the supported spec versions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from meshguard import annotation_keys, logs
from meshguard.attestation import AttestationError, KeyFileError, TrustedKeys, verify_pod
from meshguard.cni.kube import Connections, api_access, get_pod
from meshguard.cni.netns import NamespaceGone, entered, thread_has_ipv6
from meshguard.cni.protocol import (
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    Command,
    Invocation,
    NetConf,
    read_command,
    read_invocation,
    read_netconf,
    version_document,
)
from meshguard.cni.rules import drift, remove_everywhere
from meshguard.errors import MeshguardError
from meshguard.process import CommandRunner
from meshguard.rules.backend import detect_backend
from meshguard.rules.install import DEFAULT_LOCK_TIMEOUT_SECONDS, install, install_lock
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.status import MalformedStatusError, read_status

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Host:
    """Where the plugin runs: ``python -m meshguard.cni`` (the defaults: a process per call,
    a connection per GET, iptables' own lock file) or the node agent (a thread per call, its
    connections kept, iptables' lock held per namespace: the agent's lock file is its own,
    shared with no other program, so across namespaces it would only queue the installs of
    different pods behind each other; the namespace's install lock still serializes
    meshguard's installers of one namespace, and the tools run get a private lock file)."""

    connections: Connections | None = None
    xtables_lock_per_namespace: bool = False


PROCESS: Final = Host()


def main(*, environ: Mapping[str, str], stdin: TextIO, stdout: TextIO, host: Host = PROCESS) -> int:
    """Run one CNI command; the exit status (0, or 1 with the error object on stdout).

    The one code path of both hosts (:class:`Host`)."""
    cni_version = SPEC_VERSION
    try:
        command = read_command(environ)
        text = stdin.read()
        if command is Command.VERSION:
            cni_version = _requested_version(text)
            _write(stdout, version_document(cni_version))
            return 0
        conf = read_netconf(text)
        cni_version = conf.cni_version
        invocation = read_invocation(command, environ)
        result = _run(command, conf, invocation, environ, host)
    except CniError as exc:
        log.error(
            "meshguard-cni failed",
            extra={"fields": {"event": "cni-error", "code": int(exc.code), "reason": exc.msg}},
        )
        _write(stdout, exc.document(cni_version))
        return 1
    if result is not None:
        _write(stdout, result)
    return 0


def _run(
    command: Command,
    conf: NetConf,
    invocation: Invocation,
    environ: Mapping[str, str],
    host: Host = PROCESS,
) -> dict[str, Any] | None:
    if command is Command.DEL:
        remove(invocation, host=host)
        return None
    if conf.prev_result is None and command is Command.ADD:
        raise CniError(
            Code.INVALID_CONFIG,
            "meshguard-cni must be chained after the pod's network plugin (no prevResult)",
        )
    ruleset = admitted_ruleset(conf, invocation, environ, connections=host.connections)
    if ruleset is not None:
        if command is Command.ADD:
            add(ruleset, conf=conf, invocation=invocation, host=host)
        else:
            check(ruleset, conf=conf, invocation=invocation, host=host)
    if command is Command.CHECK:
        return None
    return {**(conf.prev_result or {}), "cniVersion": conf.cni_version}


def admitted_ruleset(
    conf: NetConf,
    invocation: Invocation,
    environ: Mapping[str, str],
    *,
    connections: Connections | None = None,
) -> Ruleset | None:
    """The pod's ruleset; None when meshguard did not inject the pod (nothing to do)."""
    pod_ref = invocation.pod
    if pod_ref is None:
        _log_event("not a Kubernetes pod (no K8S_POD_NAME in CNI_ARGS): passed through",
                   event="pass-through", container=invocation.container_id)  # fmt: skip
        return None
    namespace, name = pod_ref
    if namespace in conf.kubernetes.exclude_namespaces:
        return None
    access = api_access(conf.kubernetes, environ)
    pod = get_pod(access, namespace=namespace, name=name, connections=connections)
    metadata = pod["metadata"]
    where = f"pod {namespace}/{name}"
    if invocation.pod_uid and metadata.get("uid") != invocation.pod_uid:
        raise CniError(
            Code.TRY_AGAIN_LATER,
            f"{where}: the API server has uid {metadata.get('uid')}, the runtime"
            f" {invocation.pod_uid} (the pod was recreated)",
        )
    annotations = metadata.get("annotations") or {}
    text, status = annotations.get(annotation_keys.RULESET), annotations.get(annotation_keys.STATUS)
    if text is None and status is None and annotation_keys.ATTESTATION not in annotations:
        _log_event(f"{where} is not injected by meshguard: passed through",
                   event="pass-through", pod=f"{namespace}/{name}")  # fmt: skip
        return None
    # Before anything of the ruleset is read: only what meshguard's webhook signed for this
    # very pod is installed (a digest anyone can compute proves nothing).
    _verify_attestation(conf, pod, where=where)
    if not isinstance(text, str) or not text.strip():
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"{where} is injected by meshguard ({annotation_keys.STATUS}) but has no"
            f" {annotation_keys.RULESET} annotation: not started",
        )
    try:
        ruleset = Ruleset.from_json(text)
    except MeshguardError as exc:
        raise CniError(
            Code.RULESET_UNAVAILABLE, f"{where}: {annotation_keys.RULESET}: {exc}: not started"
        ) from None
    recorded = _recorded_digest(status)
    if status is not None and recorded != ruleset.digest:
        raise CniError(
            Code.RULESET_UNAVAILABLE,
            f"{where}: {annotation_keys.RULESET} hashes to {ruleset.digest}, but"
            f" {annotation_keys.STATUS} records {recorded}: the annotations were altered after"
            " admission; not started",
        )
    return ruleset


def _verify_attestation(conf: NetConf, pod: Mapping[str, Any], *, where: str) -> None:
    if not conf.trusted_keys:
        raise CniError(
            Code.INVALID_CONFIG,
            f"{where} is injected by meshguard, but meshguard-cni's configuration has no"
            " trustedKeys (the webhook's public keys: meshguard cni install --trusted-keys):"
            " not started",
        )
    try:
        trusted = TrustedKeys.from_pem(conf.trusted_keys, origin="trustedKeys")
    except KeyFileError as exc:
        raise CniError(Code.INVALID_CONFIG, f"{exc}: {where} not started") from None
    spec = pod.get("spec")
    try:
        verify_pod(trusted, metadata=pod["metadata"], spec=spec if isinstance(spec, dict) else {},
                   where=where)  # fmt: skip
    except AttestationError as exc:
        raise CniError(Code.NOT_ATTESTED, f"{exc}: not started") from None


def add(ruleset: Ruleset, *, conf: NetConf, invocation: Invocation, host: Host = PROCESS) -> None:
    try:
        with _entered(invocation), _lock(conf.lock_timeout_seconds, host) as locked:
            # The backend Istio's capture is in, detected as meshguard-init detects it.
            backend = detect_backend(
                locked, environ=os.environ, native_nftables=ruleset.native_nftables
            )
            install(ruleset, run=locked, backend=backend, ipv6_available=thread_has_ipv6())
    except MeshguardError as exc:
        raise CniError(Code.INSTALL_FAILED, f"meshguard rules not installed: {exc}") from None


def check(ruleset: Ruleset, *, conf: NetConf, invocation: Invocation, host: Host = PROCESS) -> None:
    try:
        with _entered(invocation), _lock(conf.lock_timeout_seconds, host) as locked:
            backend = detect_backend(
                locked, environ=os.environ, native_nftables=ruleset.native_nftables
            )
            problems = drift(ruleset, run=locked, backend=backend, families=_families())
    except MeshguardError as exc:
        raise CniError(
            Code.IO_FAILURE, f"meshguard CHECK could not read the rules: {exc}"
        ) from None
    if problems:
        raise CniError(
            Code.RULES_DRIFTED,
            f"meshguard rules are not as admitted ({ruleset.digest}, {backend.value}):"
            f" {'; '.join(problems)}",
        )


def remove(invocation: Invocation, *, host: Host = PROCESS) -> None:
    """DEL: meshguard's chains and hooks out of the namespace, in every backend; idempotent."""
    if not invocation.netns:
        return
    try:
        with entered(invocation.netns), _lock(DEFAULT_LOCK_TIMEOUT_SECONDS, host) as locked:
            removed = remove_everywhere(run=locked, families=_families())
    except NamespaceGone:
        return  # the namespace, and its rules, are gone already
    except MeshguardError as exc:
        raise CniError(Code.IO_FAILURE, f"meshguard rules not removed: {exc}") from None
    if removed:
        _log_event("meshguard rules removed", event="removed",
                   container=invocation.container_id, backends=", ".join(removed))  # fmt: skip


@contextlib.contextmanager
def _entered(invocation: Invocation) -> Iterator[None]:
    """The calling thread in the pod's namespace for the block."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(entered(invocation.netns))
        except NamespaceGone as exc:
            raise CniError(Code.UNKNOWN_CONTAINER, str(exc)) from None
        except MeshguardError as exc:
            raise CniError(Code.IO_FAILURE, str(exc)) from None
        yield


@contextlib.contextmanager
def _lock(timeout: float, host: Host) -> Iterator[CommandRunner]:
    """The install lock of the thread's namespace (see :class:`Host` for iptables' lock)."""
    if not host.xtables_lock_per_namespace:
        with install_lock(timeout=timeout) as locked:
            yield locked
        return
    private = os.memfd_create("meshguard-xtables-lock", os.MFD_CLOEXEC)
    try:
        with install_lock(timeout=timeout, xtables=Path(f"/proc/self/fd/{private}")) as locked:
            yield locked
    finally:
        os.close(private)


def _families() -> list[Family]:
    """IPv6 only where the namespace has it (as the installer decides)."""
    ipv6 = thread_has_ipv6()
    return [f for f in Family if f is Family.IPV4 or ipv6]


def _recorded_digest(text: object) -> str | None:
    """The ruleset digest ``meshguard.io/status`` records; None when it records none or does
    not read (then it does not match: the ADD fails)."""
    try:
        status = read_status(text if isinstance(text, str) else None)
    except MalformedStatusError:
        return None
    return status.ruleset if status is not None else None


def _requested_version(text: str) -> str:
    try:
        document = json.loads(text) if text.strip() else {}
    except ValueError:
        document = {}
    wanted = document.get("cniVersion") if isinstance(document, dict) else None
    return wanted if wanted in SUPPORTED_VERSIONS else SPEC_VERSION


def _log_event(message: str, **fields: str) -> None:
    log.info(message, extra={"fields": fields})


def _write(stream: TextIO, document: dict[str, Any]) -> None:
    stream.write(json.dumps(document) + "\n")
    stream.flush()


def run() -> int:
    """Entry point: ``python -m meshguard.cni`` as the runtime (or the agent) execs it."""
    logs.configure(stream=sys.stderr, level=logging.INFO)
    return main(environ=os.environ, stdin=sys.stdin, stdout=sys.stdout)
