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
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from meshguard import annotation_keys
from meshguard.admitted import RECORD as ADMITTED_RECORD
from meshguard.admitted import Admitted, TamperedError, drift, read_admitted
from meshguard.errors import MalformedInputError, MeshguardError, RefusedError
from meshguard.init_container import MESHGUARD_INIT, MESHGUARD_VALIDATION
from meshguard.inject.transform import gateway_reason
from meshguard.l7 import L7Engine
from meshguard.pod import PROXY_CONTAINER, PodView, read_pod
from meshguard.policy import (
    ANY_CONTAINER,
    PROXY,
    Action,
    Mode,
    Policy,
    Rule,
    parse_mode,
    parse_opt_out,
    parse_policy,
)
from meshguard.rbac import rbac_digest
from meshguard.recent_denials import RecentDenials
from meshguard.recent_denials import text_lines as recent_denial_lines
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_ruleset, hairpin_ports
from meshguard.rules.ruleset import Ruleset
from meshguard.status import MalformedStatusError, PodStatus, read_status

#: ``apiVersion`` of the documents ``describe -o json|yaml`` writes.
API_VERSION: Final = "describe.meshguard.io/v1alpha1"
KIND: Final = "PodDescription"


class _Data(BaseModel):
    """Frozen, camelCase on output, unknown keys refused (a typo in a test is an error)."""

    model_config = ConfigDict(
        frozen=True, alias_generator=to_camel, populate_by_name=True, extra="forbid"
    )


class PodRef(_Data):
    kind: str
    namespace: str | None = None
    name: str


class PortData(_Data):
    port: int
    protocol: str


class ContainerData(_Data):
    name: str
    #: None: the container has no runAsUser (meshguard cannot isolate it).
    uid: int | None = None
    #: container, sidecar (native), init, ephemeral.
    role: str
    ports: tuple[PortData, ...] = ()


class HttpData(_Data):
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    headers: dict[str, str] = {}


class RuleData(_Data):
    index: int
    #: Container names; ``*`` is every container.
    sources: tuple[str, ...]
    #: A container's name, or ``proxy``.
    to: str
    ports: tuple[int, ...]
    protocol: str
    #: Checked per request by the ext_authz server; None: the whole port.
    http: HttpData | None = None


class ProxyData(_Data):
    uid: int
    gid: int


class StatusState(enum.StrEnum):
    #: The ruleset recorded at admission is the one the admitted policy compiles to.
    CURRENT = "current"
    #: It is not (the policy cannot be what was compiled).
    STALE = "stale"
    #: Recorded, not compared (the policy cannot be compiled).
    RECORDED = "recorded"
    #: No ``meshguard.io/status``: meshguard did not inject the pod.
    NOT_INJECTED = "not-injected"
    #: ``meshguard.io/status`` is not what meshguard writes.
    MALFORMED = "malformed"


class StatusData(_Data):
    state: StatusState
    #: The digest of the ruleset installed (``sha256:...``).
    ruleset: str | None = None
    error: str | None = None


class AdmittedState(enum.StrEnum):
    #: The live ``policy`` and ``mode`` are the ones admitted.
    AS_ADMITTED = "as-admitted"
    #: They were changed after admission: the admitted ones are enforced (TAMPERED).
    CHANGED = "changed"
    #: The admitted record does not verify: every L7 request to the pod is denied (TAMPERED).
    UNVERIFIABLE = "unverifiable"
    #: No record (admitted by an older meshguard): every L7 request is denied.
    NO_RECORD = "no-record"
    #: Not admitted by meshguard (no status).
    NOT_ADMITTED = "not-admitted"


class AdmittedData(_Data):
    state: AdmittedState
    digest: str | None = None
    #: The mode admitted (what is enforced).
    mode: Mode | None = None
    #: What changed after admission (state ``changed``).
    drift: tuple[str, ...] = ()
    error: str | None = None


class EngineDocument(enum.StrEnum):
    """Whether the native engine's RBAC document on the pod is the one admitted."""

    ADMITTED = "admitted"
    #: Missing, or not the admitted document: the sidecar denies every L7 request.
    CHANGED = "changed"


class EngineData(_Data):
    """The L7 engine deciding the pod's HTTP rules, from the admitted record."""

    #: ``native`` (Envoy RBAC in the sidecar) or ``ext-authz`` (meshguard serve-authz).
    name: str
    #: The native engine's document: as admitted, or changed/missing.
    document: EngineDocument | None = None
    digest: str | None = None
    #: The compiled RBAC policies' ids (``rules[NNN]/container``).
    rules: tuple[str, ...] = ()


class PodDescription(_Data):
    """What ``describe`` says about one pod (or pod template). Only ``pod`` and
    ``protection`` are always there."""

    api_version: Literal["describe.meshguard.io/v1alpha1"] = API_VERSION
    kind: Literal["PodDescription"] = KIND
    pod: PodRef
    protection: Protection
    #: One sentence on the protection ("" when there is nothing to say).
    verdict: str | None = None
    #: Why the policy cannot be read (nothing below but ``status``/``admitted`` then).
    error: str | None = None
    #: The mode enforced: the admitted one when the pod's record verifies.
    mode: Mode | None = None
    #: Why the policy cannot be enforced as written (its ruleset does not compile).
    compile_error: str | None = None
    proxy: ProxyData | None = None
    containers: tuple[ContainerData, ...] = ()
    rules: tuple[RuleData, ...] = ()
    #: ``deny``: every other loopback flow is dropped; ``allow``: allowed (not the proxy's).
    default_action: Action | None = None
    #: The proxy's control ports, open only where a rule names them.
    protected_proxy_ports: tuple[int, ...] = ()
    #: Ports reachable through the pod's own Service (hairpin); empty: refused.
    hairpin_ports: tuple[int, ...] = ()
    #: ``meshguard-init`` or ``meshguard-validation`` (Istio CNI mode); None: neither yet.
    installer: str | None = None
    #: ``nftables`` (Istio's native nftables mode) or ``iptables``.
    netfilter: str | None = None
    status: StatusData | None = None
    admitted: AdmittedData | None = None
    #: What meshguard changed in the pod at admission (posture fixes).
    posture_changes: tuple[str, ...] = ()
    #: The L7 engine that decides the pod's HTTP rules, where known.
    engine: EngineData | None = None
    #: What the kernel denied the pod lately (``--recent-denials``: meshguard.recent_denials).
    recent_denials: RecentDenials | None = None

    @property
    def tampered(self) -> bool:
        """meshguard's annotations were edited after admission."""
        return (
            self.admitted is not None
            and self.admitted.state in (AdmittedState.CHANGED, AdmittedState.UNVERIFIABLE)
        ) or (self.status is not None and self.status.state is StatusState.MALFORMED)

    def as_data(self) -> dict[str, Any]:
        """The document ``-o json|yaml`` writes (absent fields left out)."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data


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


# --- the text -------------------------------------------------------------------------------


def text_lines(d: PodDescription) -> list[str]:
    """The description in words (without the pod's name and verdict, which the caller
    prints)."""
    if d.error is not None:
        return [f"error: {d.error}", *_status_lines(d), *_admitted_lines(d)]
    lines = [f"cannot be enforced as written: {d.compile_error}"] if d.compile_error else []
    lines.append(_mode_line(d))
    if d.proxy is not None:
        lines.append(f"proxy: uid {d.proxy.uid}, gid {d.proxy.gid} — never restricted")
    lines.append("containers:")
    for container in d.containers:
        uid = "no runAsUser!" if container.uid is None else f"uid {container.uid}"
        ports = ", ".join(f"{p.port}/{p.protocol}" for p in container.ports) or "no declared ports"
        lines.append(f"  {container.name:<20} {uid:<12} {container.role:<10} {ports}")
    lines.append("may connect over loopback (besides each container to its own ports):")
    lines += [f"  {_rule_text(rule)}" for rule in d.rules] or ["  nothing"]
    default = (
        "deny every other loopback flow"
        if d.default_action is Action.DENY
        else "allow every other loopback flow, except to the proxy's ports"
    )
    protected = ", ".join(map(str, d.protected_proxy_ports))
    hairpin = (
        "only ports open to every container: " + ", ".join(map(str, d.hairpin_ports))
        if d.hairpin_ports
        else "refused (no port is open to every container)"
    )
    lines += [
        f"default: {default}",
        f"proxy control ports ({protected}): only where a rule above names them;"
        " the proxy's other ports (15000-15090) never, and only the proxy sends from them",
        "Istio's outbound (15001) and DNS (15053) capture: unchanged for every container;"
        " flows between the pod's own processes are never captured",
        f"through the pod's own Service (the proxy dialing the pod): {hairpin}",
        f"rules installed by: {_installer_text(d.installer)}",
        f"netfilter: {_backend_text(native_nftables=d.netfilter == 'nftables')}",
    ]
    lines += _status_lines(d)
    lines += _admitted_lines(d)
    lines += _engine_lines(d.engine)
    lines += recent_denial_lines(d.recent_denials)
    return lines


def _engine_lines(engine: EngineData | None) -> list[str]:
    """Which engine makes the pod's L7 decisions and, for the native one, whether the
    sidecar reads the admitted document, and its compiled rules."""
    if engine is None:
        return []
    if engine.name != L7Engine.NATIVE.value:
        return [f"L7 engine: {engine.name} (meshguard serve-authz decides each request)"]
    if engine.document is not EngineDocument.ADMITTED:
        return [
            f"L7 engine: native — {annotation_keys.L7_RBAC} is missing or not the document"
            " admitted: the sidecar denies every L7 request (or runs what was edited in): delete"
            " the pod so that meshguard admits it again"
        ]
    return [
        f"L7 engine: native (Envoy RBAC in the sidecar, document {(engine.digest or '')[:19]}…,"
        " as admitted)",
        f"  compiled rules: {', '.join(engine.rules) or 'none (every L7 request denied)'}",
    ]


def _mode_line(d: PodDescription) -> str:
    mode = d.mode or Mode.ENFORCE
    line = f"mode: {mode.value}"
    if mode is Mode.AUDIT:
        line += "  (violations are logged, not blocked)"
    admitted = d.admitted
    if admitted is not None and admitted.state is AdmittedState.CHANGED:
        line += "  (as admitted; the live annotations were changed after admission: TAMPERED)"
    elif admitted is not None and admitted.state is AdmittedState.UNVERIFIABLE:
        line += (
            "  (the live annotation's; the admitted record does not verify: TAMPERED, every L7"
            " request to this pod is denied)"
        )
    return line


def _installer_text(installer: str | None) -> str:
    """Which install mode the pod is in: meshguard-init, or Istio CNI mode (from the node)."""
    if installer == MESHGUARD_VALIDATION:
        return (
            "the node (Istio CNI mode: meshguard's chained CNI plugin),"
            f" checked in the pod by {MESHGUARD_VALIDATION} (no capabilities)"
        )
    if installer == MESHGUARD_INIT:
        return f"{MESHGUARD_INIT} (init container, after istio-init)"
    return "nothing yet (no meshguard-init or meshguard-validation in the pod)"


def _backend_text(*, native_nftables: bool) -> str:
    if native_nftables:
        return (
            "native nftables (Istio's init runs --native-nftables): table inet meshguard"
            " beside Istio's inet istio-proxy-nat, uid dispatch through one verdict map;"
            " meshguard-init fails closed if Istio's table is not there"
        )
    return (
        "iptables, in the variant Istio's capture is in (iptables-legacy if it holds rules,"
        " else iptables-nft; meshguard-init detects it, and fails closed if it finds Istio's"
        " native nftables table instead)"
    )


def _rule_text(rule: RuleData) -> str:
    sources = "every container" if ANY_CONTAINER in rule.sources else ", ".join(rule.sources)
    target = "the proxy" if rule.to == PROXY else rule.to
    ports = ", ".join(map(str, rule.ports))
    text = f"[{rule.index}] {sources} -> {target} port {ports}/{rule.protocol}"
    if rule.http is not None:
        methods = ", ".join(rule.http.methods) or "any method"
        paths = ", ".join(rule.http.paths) or "any path"
        headers = ", ".join(f"{k}={v}" for k, v in rule.http.headers.items())
        text += f", only {methods} {paths}" + (f" with {headers}" if headers else "")
        text += " (checked per request by the ext_authz server)"
    return text


def _admitted_lines(d: PodDescription) -> list[str]:
    """Whether the live policy and mode are the ones admitted (the authz server enforces
    the admitted ones only)."""
    admitted = d.admitted
    if admitted is None or admitted.state is AdmittedState.NOT_ADMITTED:
        return []  # said by the status lines
    if d.status is not None and d.status.state is StatusState.MALFORMED:
        return [
            "admitted: TAMPERED — the status annotation is not what meshguard writes; the"
            " authz server denies every L7 request to this pod: delete the pod so that"
            " meshguard admits it again"
        ]
    if admitted.state is AdmittedState.UNVERIFIABLE:
        return [
            f"admitted: TAMPERED — {admitted.error}; the authz server denies every L7 request"
            " to this pod: delete the pod so that meshguard admits it again"
        ]
    if admitted.state is AdmittedState.NO_RECORD:
        return [
            f"admitted: no admitted policy record ({ADMITTED_RECORD}) — the authz server"
            " denies every L7 request to this pod: delete the pod so that meshguard admits it"
            " again"
        ]
    digest = (admitted.digest or "")[:19]
    if admitted.state is AdmittedState.AS_ADMITTED:
        return [f"admitted: policy and mode as admitted ({digest}…)"]
    mode = admitted.mode.value if admitted.mode else "?"
    return [
        f"admitted: TAMPERED — changed after admission: {'; '.join(admitted.drift)}",
        f"  enforced: the admitted policy in {mode} mode (the edit opens"
        " nothing); to change the policy, delete the pod and create it anew",
    ]


def _status_lines(d: PodDescription) -> list[str]:
    status = d.status
    if status is None:
        return []
    if status.state is StatusState.MALFORMED:
        return [f"status: {status.error}"]
    if status.state is StatusState.NOT_INJECTED:
        return ["status: not injected by meshguard yet (no meshguard.io/status)"]
    recorded = status.ruleset or "?"
    changed = (
        [
            "changed by meshguard at admission (posture fixes):",
            *(f"  {text}" for text in d.posture_changes),
        ]
        if d.posture_changes
        else []
    )
    if status.state is StatusState.CURRENT:
        return [f"status: ruleset {recorded} — matches the policy", *changed]
    if status.state is StatusState.STALE:
        return [f"status: ruleset {recorded} — STALE: the policy changed since", *changed]
    return [f"status: ruleset {recorded}", *changed]


class Protection(enum.StrEnum):
    """Whether a pod with Istio's sidecar also has meshguard."""

    #: meshguard recorded its status: its rules are in the pod.
    PROTECTED = "protected"
    #: Istio injected its sidecar and meshguard did not: no loopback isolation.
    UNPROTECTED = "unprotected"
    #: Istio's sidecar without meshguard, by the operator's choice (annotation or label).
    OPTED_OUT = "opted-out"
    #: No Istio sidecar (not in the mesh, injection disabled, ambient mode): nothing to do.
    NO_SIDECAR = "no-sidecar"


@dataclass(frozen=True)
class Verdict:
    """How a pod is protected, and why, in a sentence."""

    protection: Protection
    #: One line for a person ("" when there is nothing to say).
    line: str


def protection(
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    namespace_opt_out: str = "",
) -> Verdict:
    """Does this admitted pod carry Istio's sidecar without meshguard?

    Istio's sidecar: istio-proxy listed in the ``sidecar.istio.io/status`` annotation Istio's
    injector writes, an unreadable status, or a container (or native sidecar) named
    istio-proxy — deliberately broad, so that a pod is never missed. meshguard: its
    ``meshguard.io/status`` annotation. ``namespace_opt_out``: the reason when the pod's
    namespace carries meshguard's opt-out label.
    """
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        annotations = {}
    if not _has_istio_sidecar(annotations, spec):
        return Verdict(Protection.NO_SIDECAR, "")
    if annotation_keys.STATUS in annotations:
        return Verdict(Protection.PROTECTED, "")
    opt_out = annotations.get(annotation_keys.INJECT)
    try:
        opted_out = parse_opt_out(None if opt_out is None else str(opt_out))
    except MeshguardError:
        opted_out = False
    if opted_out:
        return Verdict(
            Protection.OPTED_OUT,
            f'opted out of meshguard ({annotation_keys.INJECT}: "false"): Istio\'s sidecar, no'
            " loopback isolation, by choice",
        )
    if namespace_opt_out:
        return namespace_opted_out(namespace_opt_out)
    gateway = _gateway_reason(metadata, spec)
    if gateway:
        return Verdict(Protection.OPTED_OUT, f"left alone by meshguard: {gateway}")
    return Verdict(
        Protection.UNPROTECTED,
        f"UNPROTECTED: Istio injected its sidecar ({annotation_keys.ISTIO_STATUS}) but meshguard"
        f" did not (no {annotation_keys.STATUS}): no loopback isolation in this pod — the meshguard"
        " webhook did not see it (a selection or revision it does not cover, failurePolicy"
        " Ignore while it was down, or a pod created before meshguard)",
    )


def namespace_opted_out(reason: str) -> Verdict:
    """The verdict of an unprotected pod whose namespace carries meshguard's opt-out label
    (``reason`` says which label)."""
    return Verdict(
        Protection.OPTED_OUT,
        f"opted out of meshguard ({reason}): Istio's sidecar, no loopback isolation, by choice",
    )


def _gateway_reason(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """Why the webhook deliberately skips this pod as an Istio gateway, or "" (also for a
    pod that does not read: then it is not known to be one)."""
    try:
        pod = read_pod(metadata=dict(metadata), spec=dict(spec))
    except MeshguardError:
        return ""
    return gateway_reason(pod)


def _has_istio_sidecar(annotations: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    """Istio's status lists istio-proxy (a custom template without a proxy is no sidecar),
    or the status is unreadable, or a container is named istio-proxy."""
    raw = annotations.get(annotation_keys.ISTIO_STATUS)
    if raw is not None:
        try:
            status = json.loads(str(raw))
        except ValueError:
            return True
        if not isinstance(status, dict):
            return True
        for key in ("containers", "initContainers"):
            listed = status.get(key)
            if isinstance(listed, list) and PROXY_CONTAINER in listed:
                return True
    for field in ("containers", "initContainers"):
        items = spec.get(field)
        if isinstance(items, list) and any(
            isinstance(item, Mapping) and item.get("name") == PROXY_CONTAINER for item in items
        ):
            return True
    return False


PodDescription.model_rebuild()  # Protection is defined below it
