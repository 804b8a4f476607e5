"""The pods meshguard leaves alone, and why: opted out, Istio's injection disabled, ambient
mode, Istio's gateways, pods Istio gave no init step (unless the settings say how to protect
them: :mod:`meshguard.inject.init_step`); and the marks only meshguard writes (its
annotations and labels), removed from a pod it leaves alone. Pure: the removals are changes,
as data (:mod:`meshguard.inject.changes`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.inject.changes import Change, RemoveKey, apply_changes
from meshguard.inject.init_step import intercepts_nothing
from meshguard.pod import PodView
from meshguard.policy import parse_opt_out

AMBIENT_ANNOTATION: Final = "ambient.istio.io/redirection"
AMBIENT_LABEL: Final = "istio.io/dataplane-mode"


def skip_reason(metadata: Mapping[str, Any]) -> str:
    """Why meshguard leaves this pod alone (opted out, Istio off, ambient), or ""."""
    annotations: dict[str, Any] = metadata.get("annotations") or {}
    labels: dict[str, Any] = metadata.get("labels") or {}
    if parse_opt_out(_text(annotations.get(annotation_keys.INJECT))):
        return f'opted out ({annotation_keys.INJECT}: "false")'
    for source in (annotations, labels):
        if str(source.get(annotation_keys.ISTIO_INJECT, "")).lower() == "false":
            return f'Istio injection is disabled ({annotation_keys.ISTIO_INJECT}: "false")'
    if annotations.get(AMBIENT_ANNOTATION) == "enabled" or labels.get(AMBIENT_LABEL) == "ambient":
        return "ambient-mode pod (no sidecar): meshguard does not apply"
    return ""


def gateway_reason(pod: PodView) -> str:
    """Why an Istio gateway pod is left alone, or "".

    A pod of Istio's ``gateway`` injection template: the proxy is its only container and
    Istio gave it no init step (no istio-init, no istio-validation), so it runs without
    NET_ADMIN or root. There is no container to isolate the proxy from, and meshguard's
    init step would be the pod's only privileged container: nothing is added.
    """
    if not _without_init_step(pod) or pod.workload:
        return ""
    return (
        f"Istio gateway pod ({_template(pod)}): the proxy is the only container"
        " and Istio added no init step, so there is nothing to isolate it from and meshguard"
        " adds no privileged init container to it"
    )


def no_init_step_reason(pod: PodView) -> str:
    """Why a pod with containers besides the proxy, to which Istio gave no init step, is
    left alone under ``WithoutIstioInit.SKIP``, or "".

    Istio's ``grpc-agent`` template, ``sidecar.istio.io/interceptionMode: NONE`` and custom
    templates inject the proxy without istio-init or istio-validation: the pod runs without
    NET_ADMIN or root, and may pass Pod Security baseline or restricted. A root meshguard-init
    with NET_ADMIN would make it the pod's only privileged container, and Pod Security
    Admission would refuse a pod that ran before meshguard was installed.
    """
    if not _without_init_step(pod) or not pod.workload:
        return ""
    # short enough for an admission warning (256 characters) with the webhook's prefix
    return (
        f"Istio gave it no init step ({_how_injected(pod)}), so meshguard adds no privileged"
        " container (withoutIstioInit skip): no loopback isolation (node: rules from the"
        " node; privileged: a root meshguard-init)"
    )


def _without_init_step(pod: PodView) -> bool:
    """Istio injected its proxy and gave the pod no init step (no istio-init, no
    istio-validation)."""
    return pod.proxy is not None and pod.istio_init_step is None


def _how_injected(pod: PodView) -> str:
    """What made Istio leave out its init step, as the pod says it."""
    if intercepts_nothing(pod.annotations):
        return f"{annotation_keys.ISTIO_INTERCEPTION_MODE}: NONE"
    return _template(pod)


def _template(pod: PodView) -> str:
    template = pod.annotations.get(annotation_keys.ISTIO_TEMPLATES) or "(not named)"
    return f"injection template {template}"


def opts_out(metadata: Mapping[str, Any]) -> bool:
    """The pod's author opted it out (``meshguard.io/inject`` or ``sidecar.istio.io/inject``
    "false": the latter skips meshguard even where Istio injects anyway, e.g. a label
    ``"true"`` that Istio lets win over the annotation); ambient pods have no sidecar."""
    annotations: dict[str, Any] = metadata.get("annotations") or {}
    labels: dict[str, Any] = metadata.get("labels") or {}
    values = (
        annotations.get(annotation_keys.INJECT),
        annotations.get(annotation_keys.ISTIO_INJECT),
        labels.get(annotation_keys.ISTIO_INJECT),
    )
    return any(str(v).strip().lower() == "false" for v in values if v is not None)


#: What meshguard writes on a pod it admits: never on a pod it did not.
ADMISSION_ANNOTATIONS: Final = (
    annotation_keys.RULESET,
    annotation_keys.STATUS,
    annotation_keys.ATTESTATION,
    annotation_keys.L7_RBAC,
)


def strip_admission_marks(metadata: dict[str, Any]) -> tuple[str, ...]:
    """Remove meshguard's annotations and ``meshguard.io/admitted`` label from a pod meshguard
    does not inject (forged by its author, or copied from another pod); what was removed, as
    warnings."""
    removals, warning = mark_removals(metadata)
    apply_changes(removals, metadata=metadata, spec={})
    return warning


def mark_removals(metadata: Mapping[str, Any]) -> tuple[tuple[Change, ...], tuple[str, ...]]:
    """The removals of :func:`strip_admission_marks`, and the warning that names them."""
    removals: list[RemoveKey] = []
    removed: list[str] = []
    annotations = metadata.get("annotations")
    if isinstance(annotations, dict):
        for key in ADMISSION_ANNOTATIONS:
            if annotations.get(key) is not None:
                removals.append(RemoveKey(at=("metadata", "annotations"), key=key))
                removed.append(f"annotation {key}")
    labels = metadata.get("labels")
    if isinstance(labels, dict):
        # meshguard.io/l7-engine as a label is meshguard's choice (EnvoyFilters select by it)
        for key in (annotation_keys.ADMITTED_LABEL, annotation_keys.L7_ENGINE):
            if labels.get(key) is not None:
                removals.append(RemoveKey(at=("metadata", "labels"), key=key))
                removed.append(f"label {key}")
    if not removed:
        return (), ()
    return tuple(removals), (
        f"meshguard removed {', '.join(removed)}: only meshguard's webhook writes them, on the"
        " pods it admits",
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
