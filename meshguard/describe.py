"""A pod's loopback policy for a person and as data: who may talk to whom, what is enforced.

Pure: a pod (metadata and spec) in, a :class:`PodDescription` out, its text by
:func:`text_lines`. Used by ``meshguard describe`` (files, or the live cluster through
kubeconfig). What is described is what is *enforced*: the policy and mode the webhook admitted
(its verified record in ``meshguard.io/status``), not the live ``policy``/``mode``
annotations, which are only compared with it — an edit after admission is flagged as
tampering (:attr:`PodDescription.tampered`), never shown as the pod's mode. ``protection``
tells, for an admitted pod, whether Istio injected its sidecar without meshguard (the pods an
operator must find: ``--fail-on-unprotected``).

The data model is the documented schema of ``describe -o json|yaml`` (docs/describe-schema.md):
camelCase keys, every field but the pod's reference optional, new fields added, none renamed.
This module reads a pod into its description; the model is :mod:`meshguard.describe_schema`,
the words :mod:`meshguard.describe_text`, the protection verdict
:mod:`meshguard.describe_protection` (all re-exported here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshguard import annotation_keys
from meshguard.admitted import Admitted, TamperedError, drift, read_admitted
from meshguard.describe_protection import Verdict, namespace_opted_out, protection
from meshguard.describe_schema import (
    API_VERSION,
    KIND,
    AdmittedData,
    AdmittedState,
    ContainerData,
    EngineData,
    EngineDocument,
    HttpData,
    PodDescription,
    PodRef,
    PortData,
    Protection,
    ProxyData,
    RuleData,
    StatusData,
    StatusState,
)
from meshguard.describe_text import text_lines
from meshguard.errors import MalformedInputError, RefusedError
from meshguard.init_container import MESHGUARD_INIT, MESHGUARD_VALIDATION
from meshguard.l7 import L7Engine
from meshguard.pod import PodView, read_pod
from meshguard.policy import (
    Mode,
    Policy,
    Rule,
    parse_mode,
    parse_policy,
)
from meshguard.rbac import rbac_digest
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_ruleset, hairpin_ports
from meshguard.rules.ruleset import Ruleset
from meshguard.status import MalformedStatusError, PodStatus, read_status

__all__ = [
    "API_VERSION",
    "KIND",
    "AdmittedData",
    "AdmittedState",
    "ContainerData",
    "EngineData",
    "EngineDocument",
    "HttpData",
    "PodDescription",
    "PodRef",
    "PortData",
    "Protection",
    "ProxyData",
    "RuleData",
    "StatusData",
    "StatusState",
    "Verdict",
    "describe",
    "describe_pod",
    "namespace_opted_out",
    "protection",
    "text_lines",
]


def describe_pod(
    *,
    ref: PodRef,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    verdict: Verdict,
    settings: CompilerSettings,
) -> PodDescription:
    """The enforced policy of one pod (or template) as data, or why it cannot be read."""
    annotations = _annotations(metadata)
    status, admitted = _admitted(annotations)
    base = PodDescription(
        pod=ref,
        protection=verdict.protection,
        verdict=verdict.line or None,
        status=status,
        admitted=admitted.data,
    )
    try:
        pod = read_pod(metadata=dict(metadata), spec=dict(spec))
        if admitted.record is not None:  # what the authz server enforces
            policy, mode = admitted.record.policy, admitted.record.mode
        else:
            policy = parse_policy(pod.annotations.get(annotation_keys.POLICY))
            mode = parse_mode(pod.annotations.get(annotation_keys.MODE))
    except (RefusedError, MalformedInputError) as exc:
        return base.model_copy(update={"error": str(exc)})
    native = uses_native_nftables(pod, spec)
    compile_error = None
    compiled = None
    try:
        compiled = compile_ruleset(
            pod, policy, mode=mode, settings=settings, native_nftables=native
        )
    except RefusedError as exc:
        compile_error = str(exc)
    details = _details(
        pod, policy, mode=mode, compiled=compiled, settings=settings, native_nftables=native
    )
    return details.model_copy(
        update={
            "pod": ref,
            "protection": verdict.protection,
            "verdict": verdict.line or None,
            "compile_error": compile_error,
        }
    )


def describe(
    pod: PodView,
    policy: Policy,
    *,
    mode: Mode,
    compiled: Ruleset | None,
    settings: CompilerSettings,
    native_nftables: bool = False,
) -> list[str]:
    """The pod in words, for this policy and mode. ``native_nftables``: the pod's istio-init
    (or istio-validation) runs Istio's native nftables mode, read from its spec as admission
    reads it."""
    details = _details(
        pod,
        policy,
        mode=mode,
        compiled=compiled,
        settings=settings,
        native_nftables=native_nftables,
    )
    return text_lines(details)


def _details(
    pod: PodView,
    policy: Policy,
    *,
    mode: Mode,
    compiled: Ruleset | None,
    settings: CompilerSettings,
    native_nftables: bool,
) -> PodDescription:
    status, admitted = _admitted(pod.annotations)
    if status is not None and status.state is not StatusState.MALFORMED and compiled is not None:
        state = StatusState.CURRENT if status.ruleset == compiled.digest else StatusState.STALE
        status = status.model_copy(update={"state": state})
    if admitted.record is not None:
        mode = admitted.record.mode
    proxy = pod.proxy_identity
    return PodDescription(
        pod=PodRef(kind="Pod", name=""),
        protection=Protection.NO_SIDECAR,
        mode=mode,
        proxy=ProxyData(uid=proxy.uid, gid=proxy.gid),
        containers=tuple(
            ContainerData(
                name=c.name,
                uid=c.uid,
                role=c.role.value,
                ports=tuple(PortData(port=p.port, protocol=p.protocol) for p in c.ports),
            )
            for c in pod.workload
        ),
        rules=tuple(_rule_data(rule, index) for index, rule in enumerate(policy.rules)),
        default_action=policy.default_action,
        protected_proxy_ports=tuple(settings.protected_proxy_ports),
        hairpin_ports=tuple(hairpin_ports(policy)),
        installer=_installer(pod),
        netfilter="nftables" if native_nftables else "iptables",
        status=status,
        admitted=admitted.data,
        posture_changes=_posture_changes(pod.annotations),
        engine=_engine(pod.annotations, admitted.record),
    )


def _engine(annotations: Mapping[str, str], record: Admitted | None) -> EngineData | None:
    """The L7 engine the admitted record names, and for the native one whether the pod
    carries the admitted RBAC document and which rules it compiles."""
    if record is None or record.l7_engine is None:
        return None
    if record.l7_engine != L7Engine.NATIVE.value:
        return EngineData(name=record.l7_engine)
    text = annotations.get(annotation_keys.L7_RBAC)
    if text is None or rbac_digest(text) != record.rbac_digest:
        return EngineData(name=record.l7_engine, document=EngineDocument.CHANGED)
    try:
        (resource,) = json.loads(text)["resources"]
        ids = tuple(sorted(resource["typed_config"]["rules"]["policies"]))
    except (ValueError, KeyError, TypeError):
        ids = ()
    return EngineData(
        name=record.l7_engine,
        document=EngineDocument.ADMITTED,
        digest=record.rbac_digest,
        rules=ids,
    )


def _rule_data(rule: Rule, index: int) -> RuleData:
    http = None
    if rule.http is not None:
        http = HttpData(
            methods=rule.http.methods, paths=rule.http.paths, headers=dict(rule.http.headers)
        )
    return RuleData(
        index=index,
        sources=rule.sources,
        to=rule.to,
        ports=tuple(rule.ports),
        protocol=rule.protocol.value,
        http=http,
    )


def _installer(pod: PodView) -> str | None:
    steps = {c.name for c in pod.mesh_init}
    if MESHGUARD_VALIDATION in steps:
        return MESHGUARD_VALIDATION
    if MESHGUARD_INIT in steps:
        return MESHGUARD_INIT
    return None


def _annotations(metadata: Mapping[str, Any]) -> Mapping[str, str]:
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        return {}
    return {str(k): str(v) for k, v in annotations.items()}


def _posture_changes(annotations: Mapping[str, str]) -> tuple[str, ...]:
    try:
        status = read_status(annotations.get(annotation_keys.STATUS))
    except MalformedStatusError:
        return ()
    return () if status is None else status.changes


@dataclass(frozen=True)
class _Admission:
    data: AdmittedData
    #: The verified record; None when there is none or it does not verify.
    record: Admitted | None = None


def _admitted(annotations: Mapping[str, str]) -> tuple[StatusData, _Admission]:
    """The recorded status and what was admitted, compared with the live annotations."""
    try:
        status: PodStatus | None = read_status(annotations.get(annotation_keys.STATUS))
    except MalformedStatusError as exc:
        error = str(exc)
        return StatusData(state=StatusState.MALFORMED, error=error), _Admission(
            AdmittedData(state=AdmittedState.UNVERIFIABLE, error=error)
        )
    if status is None:
        return StatusData(state=StatusState.NOT_INJECTED), _Admission(
            AdmittedData(state=AdmittedState.NOT_ADMITTED)
        )
    recorded = StatusData(state=StatusState.RECORDED, ruleset=status.ruleset)
    try:
        record = read_admitted(status)
    except TamperedError as exc:
        return recorded, _Admission(AdmittedData(state=AdmittedState.UNVERIFIABLE, error=str(exc)))
    if record is None:
        return recorded, _Admission(AdmittedData(state=AdmittedState.NO_RECORD))
    changes = drift(record, annotations)
    state = AdmittedState.CHANGED if changes else AdmittedState.AS_ADMITTED
    data = AdmittedData(state=state, digest=record.digest, mode=record.mode, drift=changes)
    return recorded, _Admission(data, record)
