"""Whether a pod with Istio's sidecar also has meshguard (``meshguard unprotected``,
``describe --fail-on-unprotected``): the pods an operator must find. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshguard import annotation_keys
from meshguard.describe_schema import Protection
from meshguard.errors import MeshguardError
from meshguard.inject.left_alone import gateway_reason, no_init_step_reason
from meshguard.pod import PROXY_CONTAINER, PodView, read_pod
from meshguard.policy import parse_opt_out


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
    left_alone = _left_alone(metadata, spec)
    if left_alone is not None:
        return left_alone
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


def _left_alone(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict | None:
    """The verdict on a pod the webhook leaves alone on purpose: an Istio gateway (nothing
    to isolate), or a pod Istio gave no init step (unprotected, and why)."""
    view = _view(metadata, spec)
    if view is None:
        return None
    gateway = gateway_reason(view)
    if gateway:
        return Verdict(Protection.OPTED_OUT, f"left alone by meshguard: {gateway}")
    unprivileged = no_init_step_reason(view)
    if unprivileged:
        return Verdict(Protection.UNPROTECTED, f"UNPROTECTED: {unprivileged}")
    return None


def _view(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> PodView | None:
    """The pod as the webhook reads it; None for a pod that does not read (then it is not
    known to be one the webhook skips on purpose)."""
    try:
        return read_pod(metadata=dict(metadata), spec=dict(spec))
    except MeshguardError:
        return None


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
