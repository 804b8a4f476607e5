"""What stays as admitted: the changes no UPDATE may make to a pod meshguard admitted
(pure: old and new pod in, the refused changes out).

Kubernetes lets a running pod's images, labels and annotations change. What meshguard's
guarantees rest on must not: its annotations and its ``meshguard.io/admitted`` label (by
which the authz server and meshguard's UPDATE review find the pod), Istio's selection of the
pod (relabelling must not take it out of any review), the init steps and the proxy, and
meshguard's volume. The chart's ValidatingAdmissionPolicy (``meshguard-annotation-guard``)
refuses the same changes in the API server; the webhook checks them on the UPDATEs it is
sent, so the guard holds where that policy is off (Kubernetes < 1.30, ``annotationGuard``
disabled or in Warn mode). docs/security-design.md, "Fixed at admission", lists them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.init_container import MESHGUARD_INIT, MESHGUARD_VALIDATION, RULESET_VOLUME
from meshguard.pod import ISTIO_INIT, ISTIO_VALIDATION, PROXY_CONTAINER

#: The containers meshguard's protection rests on, compared whole (by name: a workload
#: container of such a name is frozen too, which only widens the guard).
GUARDED_CONTAINERS: Final = (
    ISTIO_INIT, ISTIO_VALIDATION, MESHGUARD_INIT, MESHGUARD_VALIDATION, PROXY_CONTAINER,
)  # fmt: skip
#: Istio's selection of a pod, as label or annotation.
ISTIO_SELECTION: Final = (annotation_keys.ISTIO_INJECT, "istio.io/rev")
MESHGUARD_PREFIX: Final = "meshguard.io/"


def is_admitted(metadata: Mapping[str, Any]) -> bool:
    """meshguard admitted the pod: its status annotation, or its admitted label."""
    return annotation_keys.STATUS in _map(metadata, "annotations") or (
        annotation_keys.ADMITTED_LABEL in _map(metadata, "labels")
    )


def refused_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What this UPDATE changes that must stay as admitted (empty: nothing, or the pod is
    not meshguard's). Each entry names the field."""
    old_meta, new_meta = _map(old, "metadata"), _map(new, "metadata")
    new_labels = _map(new_meta, "labels")
    if not is_admitted(old_meta) and annotation_keys.ADMITTED_LABEL not in new_labels:
        return []
    found = _annotation_changes(_map(old_meta, "annotations"), _map(new_meta, "annotations"))
    found += _label_changes(old_meta, new_meta)
    found += _container_changes(_map(old, "spec"), _map(new, "spec"))
    if _volume(_map(old, "spec")) != _volume(_map(new, "spec")):
        found.append(f"volume {RULESET_VOLUME!r}")
    return found


def _annotation_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = {k for k in (*old, *new) if k.startswith(MESHGUARD_PREFIX)}
    keys |= {*ISTIO_SELECTION, annotation_keys.ISTIO_STATUS}
    return [f"annotation {k}" for k in sorted(keys) if old.get(k) != new.get(k)]


def _label_changes(old_meta: Mapping[str, Any], new_meta: Mapping[str, Any]) -> list[str]:
    old, new = _map(old_meta, "labels"), _map(new_meta, "labels")
    found = [f"label {k}" for k in ISTIO_SELECTION if old.get(k) != new.get(k)]
    label = annotation_keys.ADMITTED_LABEL
    if label in old and old.get(label) != new.get(label):
        found.append(f"label {label}")
    elif (
        label not in old
        and label in new
        and annotation_keys.STATUS not in _map(old_meta, "annotations")
    ):
        found.append(f"label {label} (added to a pod meshguard did not admit)")
    return found


def _container_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    before, after = _guarded(old), _guarded(new)
    return [
        f"container {name!r}" for name in GUARDED_CONTAINERS if before.get(name) != after.get(name)
    ]


def _guarded(spec: Mapping[str, Any]) -> dict[str, list[object]]:
    found: dict[str, list[object]] = {}
    for field in ("initContainers", "containers"):
        for container in _list(spec.get(field)):
            name = container.get("name") if isinstance(container, Mapping) else None
            if name in GUARDED_CONTAINERS:
                found.setdefault(str(name), []).append(container)
    return found


def _volume(spec: Mapping[str, Any]) -> list[object]:
    return [
        v for v in _list(spec.get("volumes"))
        if isinstance(v, Mapping) and v.get("name") == RULESET_VOLUME
    ]  # fmt: skip


def _map(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Sequence[object]:
    return value if isinstance(value, list) else []
