"""The injection transform: one pod (metadata + spec) in, the meshguard pod out.

A pod without ``istio-proxy`` is not Istio's yet: the transform asks Istio for the
``meshguard`` template next to its own (``inject.istio.io/templates``) when
``request_template`` is set, else leaves it (the chart's webhook runs after Istio's
injectors and sees such a pod only if it carries Istio's labels itself). Istio's gateway
pods (the proxy alone, no init step) are left alone (:mod:`meshguard.inject.left_alone`).
Once the proxy is there: parse the policy, check the posture (refuse, or fix and warn),
compile the ruleset, record it and the status on the pod, label it admitted
(``meshguard.io/admitted: "true"``, the authz server's label selector), and put
``meshguard-init`` right after ``istio-init``, whether the template already added it or
not. In Istio CNI mode (Istio's recognized init step is ``istio-validation``: no
istio-init, no NET_ADMIN in the pod) meshguard's chained CNI plugin installs the same
ruleset from the node, and the pod gets the capability-free ``meshguard-validation`` right
after ``istio-validation`` instead: no container with added capabilities, privilege or root.
A pod Istio gave no init step at all gets no more privilege than Istio gave it either: left
alone by default, or as the settings say (:mod:`meshguard.inject.init_step`).

One pass (dicts in, edited in place): the pod is read once into its view
(:func:`meshguard.pod.read_pod`); every change is decided from it as data (posture fixes,
the stale init step's removal, annotations and labels, the L7 engine's document and mount,
meshguard's init step, volume and pull secrets: :mod:`meshguard.inject.changes`) and made at
once, each through its JSONPatch operations; the status's ``changes`` are those changes'
notes, the webhook's patch is their operations, and the CLI prints the edited documents.
Applying it twice equals applying it once (and the second pass has no operation).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard import __version__, annotation_keys
from meshguard.admitted import Admitted
from meshguard.attestation import Signer, subject_of
from meshguard.errors import RefusedError
from meshguard.init_container import (
    MESHGUARD_INIT,
    MESHGUARD_VALIDATION,
    RULESET_VOLUME,
    VALIDATION_UID_CEILING,
    InitContainerSettings,
    init_container,
    is_validation_container,
    ruleset_volume,
    validation_container,
)
from meshguard.inject.changes import (
    Append,
    Change,
    InsertAfter,
    Operation,
    Path,
    PodEdit,
    PostureFixes,
    RemoveItem,
    RemoveKey,
    ReplaceNamed,
    SetKey,
)
from meshguard.inject.changes import notes as change_notes
from meshguard.inject.init_step import (
    ISTIO_SIDECAR_TEMPLATE,
    InstallMode,
    WithoutIstioInit,
    install_mode,
    istio_will_add_init_step,
)
from meshguard.inject.l7 import engine_changes, parse_engine, stats_changes
from meshguard.inject.left_alone import (
    gateway_reason,
    mark_removals,
    no_init_step_reason,
    opts_out,
    skip_reason,
)
from meshguard.inject.posture import (
    Finding,
    PostureSettings,
    refusals,
    review_ephemeral,
    review_posture,
)
from meshguard.inject.posture import (
    Outcome as PostureOutcome,
)
from meshguard.l7 import L7Engine
from meshguard.pod import (
    PROXY_CONTAINER,
    PodView,
    Role,
    check_shape,
    effective_ids,
    is_meshguard_init,
    read_pod,
)
from meshguard.policy import Mode, parse_mode, parse_policy
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_cached
from meshguard.rules.ruleset import Ruleset
from meshguard.status import (
    ListenerStatus,
    MalformedStatusError,
    PodStatus,
    ProxyStatus,
    read_status,
)

TEMPLATE_NAME: Final = "meshguard"


class OptOut(enum.StrEnum):
    """What the webhook does with a pod-level opt-out of a pod Istio injects."""

    ALLOW = "allow"  # the pod runs with Istio's sidecar and without meshguard
    #: Refused, unless the pod's namespace carries :data:`OPT_OUT_EXEMPTION` (a label only
    #: whoever may edit namespaces, normally cluster admins, can set).
    REFUSE = "refuse"


#: The namespace label that lets a namespace's pods opt out under ``OptOut.REFUSE``.
OPT_OUT_EXEMPTION: Final = ("meshguard.io/opt-out", "allowed")


class Outcome(enum.StrEnum):
    INJECTED = "injected"
    TEMPLATE_REQUESTED = "template-requested"
    SKIPPED = "skipped"


@dataclass(frozen=True, kw_only=True)
class InjectSettings:
    posture: PostureSettings = field(default_factory=PostureSettings)
    compiler: CompilerSettings = field(default_factory=CompilerSettings)
    init: InitContainerSettings = field(default_factory=InitContainerSettings)
    #: Before Istio injected: ask for the ``meshguard`` template (istiod must have it).
    request_template: bool = True
    #: The L7 engine of pods that do not ask for one (``meshguard.io/l7-engine``).
    l7_engine: L7Engine = L7Engine.NATIVE
    #: The mode of a pod without ``meshguard.io/mode``: its namespace's (the webhook's
    #: request says it) or the cluster default (``--default-mode``). Recorded on the pod.
    default_mode: Mode = Mode.ENFORCE
    #: The webhook's signing key (:mod:`meshguard.attestation`). Without it an injected pod
    #: carries no ``meshguard.io/attestation``, and every consumer refuses it.
    signer: Signer | None = None
    #: Pod-level opt-out of a pod that has (or gets) Istio's sidecar: allowed, or refused.
    opt_out: OptOut = OptOut.ALLOW
    #: namespace -> whether it carries :data:`OPT_OUT_EXEMPTION` (the webhook reads the
    #: namespace from the API); None: no namespace is exempt.
    opt_out_exempt: Callable[[str], bool] | None = None
    #: A pod with containers besides the proxy but no Istio init step: left alone, rules
    #: from the node, or a privileged meshguard-init (:mod:`meshguard.inject.init_step`).
    without_istio_init: WithoutIstioInit = WithoutIstioInit.SKIP


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    warnings: tuple[str, ...] = ()
    reason: str = ""
    ruleset: Ruleset | None = None
    #: The JSONPatch (RFC 6902) of what was changed, from the pod as given: the webhook's.
    operations: tuple[Operation, ...] = ()


def inject_pod(
    metadata: dict[str, Any],
    spec: dict[str, Any],
    *,
    settings: InjectSettings,
    namespace: str | None = None,
) -> Result:
    """Transform one pod in place; :class:`RefusedError` when it cannot be made safe.

    One pass: the pod is read once into its view, every change is decided as data
    (:mod:`meshguard.inject.changes`), then made at once; last, the attestation signs what
    they made. The result carries the JSONPatch operations that made them (the webhook's
    patch). ``namespace``: the admission request's (the pod may not state its own); the
    attestation is signed for it. A pod meshguard does not inject leaves with none of
    meshguard's annotations nor its label
    (:func:`meshguard.inject.left_alone.strip_admission_marks`).
    """
    check_shape(metadata=metadata, spec=spec)
    settings = _with_init_keys(settings)
    pod = read_pod(metadata=metadata, spec=spec, init_settings=settings.init)
    plan = _plan(metadata, spec, pod=pod, settings=settings, namespace=namespace)
    edit = PodEdit(metadata=metadata, spec=spec)
    edit.make(plan.changes)
    if plan.result.outcome is Outcome.INJECTED:
        edit.make(_attestation(metadata, spec, signer=settings.signer, namespace=namespace))
    return dataclasses.replace(plan.result, operations=edit.operations)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What an admission does to a pod: the changes, in order, and its result."""

    changes: tuple[Change, ...]
    result: Result


def _plan(
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    pod: PodView,
    settings: InjectSettings,
    namespace: str | None,
) -> Plan:
    """Every change the admission makes, decided from the pod as it came (nothing edited)."""
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    notes = tuple(annotation_keys.unknown_keys(annotations))
    skip = skip_reason(metadata)
    if skip and pod.proxy is not None and opts_out(metadata):
        _refuse_opt_out(pod, skip=skip, settings=settings, namespace=namespace)
    reason = (
        skip or gateway_reason(pod) or _unprotectable(pod, settings=settings, namespace=namespace)
    )
    if reason:
        stripped, warning = mark_removals(metadata)
        return Plan(
            changes=stripped,
            result=Result(Outcome.SKIPPED, reason=reason, warnings=(*notes, *warning)),
        )
    if pod.proxy is None:
        _refuse_unrecognized_proxy(pod)
        stripped, warning = mark_removals(metadata)
        if not settings.request_template:
            return Plan(
                changes=stripped,
                result=Result(
                    Outcome.SKIPPED,
                    reason="no istio-proxy container (not injected by Istio)",
                    warnings=(*notes, *warning),
                ),
            )
        if not (
            istio_will_add_init_step(annotations)
            or settings.without_istio_init is WithoutIstioInit.PRIVILEGED
        ):
            return Plan(
                changes=stripped,
                result=Result(
                    Outcome.SKIPPED,
                    reason="the meshguard template would add a root meshguard-init, and Istio's"
                    f" injection here ({_templates_of(annotations)}) adds no init step: not"
                    " requested (meshguard reviews the pod once Istio injected it)",
                    warnings=(*notes, *warning),
                ),
            )
        return Plan(
            changes=(*stripped, _template_request(annotations)),
            result=Result(
                Outcome.TEMPLATE_REQUESTED,
                reason="asked Istio for the meshguard template",
                warnings=(*notes, *warning),
            ),
        )
    return _admission(metadata, spec, pod=pod, settings=settings, notes=notes)


def _admission(
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    pod: PodView,
    settings: InjectSettings,
    notes: tuple[str, ...],
) -> Plan:
    """The changes that make an Istio-injected pod meshguard's."""
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    policy = parse_policy(annotations.get(annotation_keys.POLICY))  # a bad one is refused first
    mode = effective_mode(annotations, settings)
    changes: list[Change] = []
    # the pod as the review sees it: without a stale init step, which is replaced
    reviewed, view = spec, pod
    stale = _stale_init_container(pod, spec)
    replaced = change_notes(stale)
    if stale:
        (removal,) = stale
        changes.append(removal)
        view = pod.without(
            next(c for c in pod.containers if (c.field, c.index) == (removal.key, removal.index))
        )
        kept = [c for i, c in enumerate(spec[removal.key]) if i != removal.index]
        reviewed = {**spec, removal.key: kept}
    posture = settings.posture.for_audit() if mode is Mode.AUDIT else settings.posture
    findings = review_posture(reviewed, pod=view, settings=posture)
    _raise_refusals(view, findings)
    changes.append(PostureFixes(findings=tuple(findings)))
    fixed = view.with_ids(_fixed_ids(reviewed, findings))
    ruleset = compile_cached(
        fixed.containers,
        annotations.get(annotation_keys.POLICY),
        mode,
        settings.compiler,
        native_nftables=uses_native_nftables(pod, spec),
    )
    engine = parse_engine(annotations.get(annotation_keys.L7_ENGINE), default=settings.l7_engine)
    engine_edits, rbac = engine_changes(
        engine=engine, policy=policy, mode=mode,
        sources={s.container: (s.address4, s.address6) for s in ruleset.sources},
    )  # fmt: skip
    # what the authz server (or the pod's Envoy, natively) will enforce
    admitted = Admitted(policy=policy, mode=mode, l7_engine=engine.value, rbac_digest=rbac)
    # Injected again (a webhook reinvocation, meshguard inject twice): what the first pass
    # changed is still what meshguard changed.
    earlier = _recorded_changes(annotations.get(annotation_keys.STATUS))
    recorded = tuple(dict.fromkeys((*earlier, *change_notes(changes))))
    reported = tuple(str(f) for f in findings if f.outcome is PostureOutcome.REPORTED)
    status = status_annotation(
        fixed, ruleset, mode=mode.value, admitted=admitted, changes=recorded, findings=reported
    )
    stats, stats_warnings = stats_changes(annotations, _proxy_spec(pod, spec))
    marks: Path = ("metadata", "annotations")
    changes += [
        # The namespace's or cluster's mode is written on the pod, so that whoever reads the
        # pod's annotations (the authz server's drift check, describe, the CNI plugin) agrees.
        SetKey(at=marks, key=annotation_keys.MODE, value=mode.value, keep=True),
        # (labels shared with other parts of a manifest by a YAML anchor are copied first)
        SetKey(at=("metadata", "labels"), key=annotation_keys.L7_ENGINE, value=engine.value),
        SetKey(
            at=("metadata", "labels"),
            key=annotation_keys.ADMITTED_LABEL,
            value=annotation_keys.ADMITTED_LABEL_VALUE,
        ),
        *engine_edits,
        *stats,
        SetKey(at=marks, key=annotation_keys.RULESET, value=ruleset.to_json()),
        SetKey(at=marks, key=annotation_keys.STATUS, value=status),
        *_init_step(fixed, settings=settings, mode=mode),
        *_pull_secrets(spec, settings.init.pull_secrets),
    ]
    warnings = (
        *notes,
        *replaced,
        *(str(f) for f in findings),
        *ruleset.warnings,
        *stats_warnings,
    )
    return Plan(
        changes=tuple(changes), result=Result(Outcome.INJECTED, warnings=warnings, ruleset=ruleset)
    )


def _fixed_ids(
    spec: Mapping[str, Any], findings: Sequence[Finding]
) -> dict[tuple[str, int], tuple[int | None, int | None]]:
    """The (uid, gid) of every container a posture fix changed, once fixed."""
    contexts: dict[tuple[str, int], Mapping[str, Any]] = {}
    pod_context: Mapping[str, Any] = spec.get("securityContext") or {}
    for finding in findings:
        if finding.fix is None:
            continue
        if finding.fix.target is None:
            pod_context = finding.fix.security_context
        else:
            contexts[finding.fix.target] = finding.fix.security_context
    return {
        (key, index): effective_ids(context, pod_context, where=f"spec.{key}[{index}]")
        for (key, index), context in contexts.items()
    }


def _proxy_spec(pod: PodView, spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The istio-proxy container's spec, where the view found it (an admitted pod has one)."""
    proxy = pod.proxy
    assert proxy is not None  # pods without istio-proxy are left alone before admission
    entry = spec[proxy.field][proxy.index]
    return entry if isinstance(entry, Mapping) else {}


def _init_step(pod: PodView, *, settings: InjectSettings, mode: Mode) -> tuple[Change, ...]:
    """meshguard's init step right after Istio's (first if there is none), and its volume.

    Any meshguard-init or meshguard-validation in the spec is meshguard's own by now (the pod
    view recognized it, or :func:`_stale_init_container` removes it); the anchor is the init
    step the view recognized as Istio's, not whatever bears its name.
    """
    step = pod.istio_init_step
    if install_mode(pod, without_istio_init=settings.without_istio_init) is InstallMode.CNI:
        uid = validation_uid(pod)
        container = validation_container(settings.init, uid=uid, mode=mode.value)
        volume = None  # the node-side plugin reads the annotation itself
    else:
        container, volume = init_container(settings.init), ruleset_volume()
    return (
        InsertAfter(
            at=("spec",),
            key="initContainers",
            item=container,
            after=step.name if step is not None else None,
            replacing=frozenset({MESHGUARD_INIT, MESHGUARD_VALIDATION}),
        ),
        ReplaceNamed(at=("spec",), key="volumes", name=RULESET_VOLUME, item=volume),
    )


def _pull_secrets(spec: Mapping[str, Any], names: Sequence[str]) -> tuple[Change, ...]:
    """The init image's pull secrets, after the pod's own (none twice)."""
    secrets = spec.get("imagePullSecrets") or []
    present = {s.get("name") for s in secrets if isinstance(s, dict)}
    missing = tuple({"name": name} for name in names if name not in present)
    if not missing:
        return ()
    return (Append(at=("spec",), key="imagePullSecrets", items=missing),)


def effective_mode(annotations: Mapping[str, Any], settings: InjectSettings) -> Mode:
    """The pod's ``meshguard.io/mode``, else its namespace's, else the cluster default."""
    text = annotations.get(annotation_keys.MODE)
    return settings.default_mode if text is None else parse_mode(str(text))


def _unprotectable(pod: PodView, *, settings: InjectSettings, namespace: str | None) -> str:
    """Why a pod Istio gave no init step is left alone (``WithoutIstioInit.SKIP``), or "".
    Under ``OptOut.REFUSE`` it is refused instead: it would run unprotected, and its author
    can choose it (``sidecar.istio.io/interceptionMode: NONE``) as an opt-out."""
    if settings.without_istio_init is not WithoutIstioInit.SKIP:
        return ""
    reason = no_init_step_reason(pod)
    if not reason or not _opt_out_refused(pod, settings=settings, namespace=namespace):
        return reason
    key, value = OPT_OUT_EXEMPTION
    raise RefusedError(
        f"meshguard refuses pod {pod.name or '(unnamed)'}: {reason}; in namespace"
        f" {_namespace(pod, namespace)} every Istio-injected pod is meshguard's (webhook"
        " opt-out: refuse). Give the pod Istio's init step (no interceptionMode NONE, the"
        " sidecar template), or set the webhook's withoutIstioInit to node (with cni.enabled)"
        f" or privileged, or ask a cluster admin to label the namespace {key}={value}"
    )


def _opt_out_refused(pod: PodView, *, settings: InjectSettings, namespace: str | None) -> bool:
    """Whether this pod's namespace may not leave an Istio-injected pod out of meshguard."""
    if settings.opt_out is OptOut.ALLOW:
        return False
    exempt = settings.opt_out_exempt
    return exempt is None or not exempt(_namespace(pod, namespace))


def _namespace(pod: PodView, namespace: str | None) -> str:
    return namespace or pod.namespace or "default"


def _refuse_opt_out(
    pod: PodView, *, skip: str, settings: InjectSettings, namespace: str | None
) -> None:
    """Under ``OptOut.REFUSE`` a pod Istio injected may not leave meshguard out, unless its
    namespace is exempt (:data:`OPT_OUT_EXEMPTION`)."""
    if not _opt_out_refused(pod, settings=settings, namespace=namespace):
        return
    where = _namespace(pod, namespace)
    key, value = OPT_OUT_EXEMPTION
    raise RefusedError(
        f"meshguard refuses pod {pod.name or '(unnamed)'}: it has Istio's sidecar and {skip};"
        f" in namespace {where} every Istio-injected pod is meshguard's (webhook opt-out:"
        f" refuse). Remove the opt-out, or ask a cluster admin to label the namespace"
        f" {key}={value}"
    )


def _with_init_keys(settings: InjectSettings) -> InjectSettings:
    """meshguard-init checks the attestation with the signer's own public key (the key that
    signed this pod), unless the settings name keys of their own."""
    if settings.signer is None or settings.init.trusted_keys is not None:
        return settings
    init = dataclasses.replace(settings.init, trusted_keys=settings.signer.public_pem())
    return dataclasses.replace(settings, init=init)


def _attestation(
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    signer: Signer | None,
    namespace: str | None,
) -> tuple[Change, ...]:
    """The signature of what was just written, for this pod (last: it covers the final
    annotations and containers); without a signer, no attestation (a stale or forged one is
    removed)."""
    marks: Path = ("metadata", "annotations")
    if signer is None:
        return (RemoveKey(at=marks, key=annotation_keys.ATTESTATION),)
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    covered = {str(k): str(v) for k, v in annotations.items() if k != annotation_keys.ATTESTATION}
    subject = subject_of(metadata=metadata, spec=spec, namespace=namespace)
    signature = signer.attest(subject=subject, annotations=covered)
    return (SetKey(at=marks, key=annotation_keys.ATTESTATION, value=signature),)


def review_ephemeral_containers(
    metadata: dict[str, Any],
    spec: dict[str, Any],
    *,
    settings: InjectSettings,
    added: Collection[str] | None = None,
) -> Result:
    """Admit ephemeral containers being added to a running pod (``kubectl debug``).

    They cannot be patched once requested, so any finding refuses them
    (:class:`RefusedError`). ``added``: the names to review (default: every ephemeral
    container of the spec). Pods meshguard does not protect are left alone.
    """
    check_shape(metadata=metadata, spec=spec)
    pod = read_pod(metadata=metadata, spec=spec, init_settings=settings.init)
    injected = annotation_keys.STATUS in pod.annotations
    if not injected and (pod.proxy is None or skip_reason(metadata)):
        return Result(Outcome.SKIPPED, reason="meshguard does not protect this pod")
    wanted = {c.name for c in pod.ephemeral} if added is None else set(added)
    mode = effective_mode(pod.annotations, settings)
    posture = settings.posture.for_audit() if mode is Mode.AUDIT else settings.posture
    findings = review_ephemeral(spec, pod=pod, settings=posture, names=wanted)
    _raise_refusals(pod, findings)
    return Result(
        Outcome.SKIPPED,
        warnings=tuple(str(f) for f in findings),
        reason="ephemeral containers reviewed: nothing to change",
    )


def _raise_refusals(pod: PodView, findings: list[Finding]) -> None:
    refused = refusals(findings)
    if refused:
        raise RefusedError(
            f"meshguard refuses pod {pod.name or '(unnamed)'}: "
            + "; ".join(str(f) for f in refused)
        )


def _refuse_unrecognized_proxy(pod: PodView) -> None:
    """Istio says it injected the pod, yet no istio-proxy is where its status puts it:
    meshguard cannot tell the proxy apart, and Istio will not inject it again."""
    if annotation_keys.ISTIO_STATUS not in pod.annotations:
        return
    fake = next((c for c in (*pod.containers, *pod.ephemeral) if c.name == PROXY_CONTAINER), None)
    if fake is not None:
        raise RefusedError(
            f"meshguard refuses pod {pod.name or '(unnamed)'}: container {PROXY_CONTAINER!r}"
            f" ({fake.where}) is not where {annotation_keys.ISTIO_STATUS} says Istio put its proxy"
            " (listed in containers, or in initContainers with restartPolicy: Always): rename"
            " the container, or let Istio inject the pod"
        )


def validation_uid(pod: PodView) -> int:
    """The uid of meshguard-validation: the highest one at or below
    :data:`VALIDATION_UID_CEILING` that no container (nor the proxy) runs as, so meshguard's
    rules grant it nothing over loopback — which is what it probes."""
    taken = {c.uid for c in pod.containers if c.uid is not None and c.name != MESHGUARD_VALIDATION}
    taken |= {pod.proxy_identity.uid, pod.proxy_identity.gid}
    uid = VALIDATION_UID_CEILING
    while uid in taken:
        uid -= 1
    return uid


def _is_own_step(item: Mapping[str, Any], name: str) -> bool:
    if name == MESHGUARD_INIT:
        return is_meshguard_init(item, None)
    return is_validation_container(item, None)


def _stale_init_container(pod: PodView, spec: Mapping[str, Any]) -> tuple[RemoveItem, ...]:
    """meshguard-init (meshguard-validation in Istio CNI mode) is meshguard's to place: an
    out-of-date or misplaced copy of it (an older template's image, say) is removed, to be
    replaced; any other container of that name would be deleted or doubled by the
    transform, so it is refused."""
    init = spec.get("initContainers") or []
    for container in (*pod.containers, *pod.ephemeral):
        own_names = (MESHGUARD_INIT, MESHGUARD_VALIDATION)
        if container.name not in own_names or container.role is Role.MESH_INIT:
            continue
        stale = container.role is Role.INIT and _is_own_step(init[container.index], container.name)
        if not stale:
            raise RefusedError(
                f"meshguard refuses pod {pod.name or '(unnamed)'}: container {container.name!r}"
                f" ({container.where}) is not meshguard's init container (its command or"
                " securityContext differ, or it is not a run-to-completion init container):"
                " the name is reserved for meshguard, rename the container"
            )
        note = (
            f"meshguard replaced {container.where} {container.name!r}: it was not the container"
            " this meshguard generates (image, resources or place differ)"
        )
        return (RemoveItem(at=("spec",), key="initContainers", index=container.index, note=note),)
    return ()


def status_annotation(
    pod: PodView,
    ruleset: Ruleset,
    *,
    mode: str,
    admitted: Admitted | None = None,
    changes: Sequence[str] = (),
    findings: Sequence[str] = (),
) -> str:
    """``meshguard.io/status``: what was installed, for kubectl and istioctl users, the
    record of the admitted policy and mode (``admitted``), the only ones the authz server
    enforces, and what the posture fixes changed in the pod (``changes``), so that
    ``kubectl describe`` and ``meshguard describe`` show it."""
    identity = pod.proxy_identity
    status = PodStatus(
        version=__version__,
        ruleset=ruleset.digest,
        mode=mode,
        proxy=ProxyStatus(uid=identity.uid, gid=identity.gid),
        containers={c.name: c.uid for c in pod.workload if c.uid is not None},
        listener=ListenerStatus(
            port=ruleset.listener_port,
            sources={s.container: (s.address4, s.address6) for s in ruleset.sources},
        ),
        admitted=admitted.to_document() if admitted is not None else None,
        changes=tuple(changes),
        findings=tuple(findings),
    )
    return status.to_annotation()


def _recorded_changes(text: object) -> tuple[str, ...]:
    """The ``changes`` an earlier pass recorded in ``meshguard.io/status``, if any (none
    from a status that does not read: this pass writes it anew)."""
    try:
        status = read_status(text if isinstance(text, str) else None)
    except MalformedStatusError:
        return ()
    return status.changes if status is not None else ()


def _templates_of(annotations: Mapping[str, Any]) -> str:
    """The pod's Istio templates and interceptionMode, as it names them."""
    said = [
        f"{key}: {annotations[key]}"
        for key in (annotation_keys.ISTIO_TEMPLATES, annotation_keys.ISTIO_INTERCEPTION_MODE)
        if annotations.get(key) is not None
    ]
    return ", ".join(said)


def _template_request(annotations: Mapping[str, Any]) -> Change:
    """Ask Istio for the ``meshguard`` template next to the pod's others."""
    current = str(annotations.get(annotation_keys.ISTIO_TEMPLATES) or ISTIO_SIDECAR_TEMPLATE)
    templates = [t.strip() for t in current.split(",") if t.strip()]
    if TEMPLATE_NAME not in templates:
        templates.append(TEMPLATE_NAME)
    return SetKey(
        at=("metadata", "annotations"),
        key=annotation_keys.ISTIO_TEMPLATES,
        value=",".join(templates),
    )
