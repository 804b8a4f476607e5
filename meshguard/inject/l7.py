"""The pod's L7 engine at admission: which one, and for the native engine its RBAC document.

The native engine (the default) compiles the admitted policy into the pod's Envoy RBAC
document (:func:`meshguard.rbac.compile_rbac`), stored in ``meshguard.io/l7-rbac`` and
mounted read-only into istio-proxy by a downward API volume, where the loopback listener's
RBAC filter reads it once at startup (ECDS from a file). The pod is labelled
``meshguard.io/l7-engine: native`` so that only pods with the file get the native listener
(a missing file makes Envoy refuse the listener); ``ext-authz`` pods get the listener that
asks ``meshguard serve-authz``, and carry no document. Pure: dicts in, edited in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.errors import PolicyError, Problem
from meshguard.inject.stats import STATS_REGEXPS, stats_annotation
from meshguard.l7 import RBAC_DIR, RBAC_FILE, L7Engine
from meshguard.pod import PROXY_CONTAINER
from meshguard.policy import Mode, Policy
from meshguard.rbac import compile_rbac, rbac_digest, rbac_document_text

L7_VOLUME: Final = "meshguard-l7"


def parse_engine(text: object, *, default: L7Engine) -> L7Engine:
    """``meshguard.io/l7-engine`` as the pod asks; absent: the install's default."""
    if text is None:
        return default
    try:
        return L7Engine(str(text).strip().lower())
    except ValueError:
        raise PolicyError(
            annotation=annotation_keys.L7_ENGINE,
            problems=[Problem(path="", value=text, expected="'native' or 'ext-authz'")],
        ) from None


def apply_engine(
    metadata: dict[str, Any],
    spec: dict[str, Any],
    *,
    engine: L7Engine,
    policy: Policy,
    mode: Mode,
    sources: Mapping[str, Sequence[str]],
) -> str | None:
    """Record the engine on the pod; for the native one write and mount its RBAC document.
    Returns the document's digest (None for ext-authz), for the admitted record."""
    annotations = metadata.setdefault("annotations", {})
    metadata["labels"] = {
        **(metadata.get("labels") or {}),
        annotation_keys.L7_ENGINE: engine.value,
    }
    _remove_mount(spec)
    _include_listener_stats(annotations, spec)
    if engine is L7Engine.EXT_AUTHZ:
        annotations.pop(annotation_keys.L7_RBAC, None)
        return None
    text = rbac_document_text(compile_rbac(policy=policy, mode=mode, sources=sources))
    annotations[annotation_keys.L7_RBAC] = text
    _mount(spec)
    return rbac_digest(text)


def _include_listener_stats(annotations: dict[str, Any], spec: dict[str, Any]) -> None:
    """The listener's RBAC and ext_authz stats into Istio's Prometheus merge (see
    :mod:`meshguard.inject.stats`)."""
    proxies = _proxies(spec)
    env = _entries(proxies[0].get("env")) if proxies else []
    value = stats_annotation(annotations=annotations, proxy_env=env)
    if value is not None:
        annotations[STATS_REGEXPS] = value


def _mount(spec: dict[str, Any]) -> None:
    field = f"metadata.annotations['{annotation_keys.L7_RBAC}']"
    volume = {
        "name": L7_VOLUME,
        "downwardAPI": {
            "defaultMode": 0o444,
            "items": [{"path": RBAC_FILE, "fieldRef": {"fieldPath": field}}],
        },
    }
    spec["volumes"] = [*_entries(spec.get("volumes")), volume]
    mount = {"name": L7_VOLUME, "mountPath": RBAC_DIR, "readOnly": True}
    for container in _proxies(spec):  # a native sidecar proxy among the init containers too
        container["volumeMounts"] = [*_entries(container.get("volumeMounts")), mount]


def _remove_mount(spec: dict[str, Any]) -> None:
    """Idempotence: the volume and mount of an earlier pass go before this pass adds its own."""
    if "volumes" in spec:
        spec["volumes"] = [v for v in _entries(spec["volumes"]) if _name(v) != L7_VOLUME]
    for container in _proxies(spec):
        if "volumeMounts" in container:
            container["volumeMounts"] = [
                m for m in _entries(container["volumeMounts"]) if _name(m) != L7_VOLUME
            ]


def _proxies(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """istio-proxy, as a container or a native sidecar (an entry of another shape is the API
    server's to refuse, not meshguard's to crash on)."""
    return [
        container
        for key in ("containers", "initContainers")
        for container in _entries(spec.get(key))
        if isinstance(container, dict) and container.get("name") == PROXY_CONTAINER
    ]


def _entries(value: object) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _name(entry: object) -> object:
    return entry.get("name") if isinstance(entry, dict) else None
