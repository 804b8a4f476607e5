"""The pod's L7 engine at admission: which one, and for the native engine its RBAC document.

The native engine (the default) compiles the admitted policy into the pod's Envoy RBAC
document (:func:`meshguard.rbac.compile_rbac`), stored in ``meshguard.io/l7-rbac`` and
mounted read-only into istio-proxy by a downward API volume, where the loopback listener's
RBAC filter reads it once at startup (ECDS from a file). The pod is labelled
``meshguard.io/l7-engine: native`` so that only pods with the file get the native listener
(a missing file makes Envoy refuse the listener); ``ext-authz`` pods get the listener that
asks ``meshguard serve-authz``, and carry no document. Pure: the changes, as data
(:mod:`meshguard.inject.changes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.errors import PolicyError, Problem
from meshguard.inject.changes import ByName, Change, Path, RemoveKey, ReplaceNamed, SetKey
from meshguard.inject.stats import STATS_REGEXPS, merge_stats
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


def engine_changes(
    *,
    engine: L7Engine,
    policy: Policy,
    mode: Mode,
    sources: Mapping[str, Sequence[str]],
) -> tuple[tuple[Change, ...], str | None]:
    """The changes that give the pod its engine: for the native one its RBAC document, and
    the volume and mount that carry it to istio-proxy (an earlier pass's go first, so that
    injecting twice equals injecting once); for ext-authz, none of them. The engine's label
    is the transform's, with meshguard's other labels. Also the document's digest (None for
    ext-authz), for the admitted record."""
    annotations: Path = ("metadata", "annotations")
    proxies: tuple[Path, ...] = tuple(
        ("spec", key, ByName(PROXY_CONTAINER)) for key in ("containers", "initContainers")
    )
    if engine is L7Engine.EXT_AUTHZ:
        return (
            RemoveKey(at=annotations, key=annotation_keys.L7_RBAC),
            ReplaceNamed(at=("spec",), key="volumes", name=L7_VOLUME),
            *(ReplaceNamed(at=p, key="volumeMounts", name=L7_VOLUME) for p in proxies),
        ), None
    text = rbac_document_text(compile_rbac(policy=policy, mode=mode, sources=sources))
    field = f"metadata.annotations['{annotation_keys.L7_RBAC}']"
    volume = {
        "name": L7_VOLUME,
        "downwardAPI": {
            "defaultMode": 0o444,
            "items": [{"path": RBAC_FILE, "fieldRef": {"fieldPath": field}}],
        },
    }
    mount = {"name": L7_VOLUME, "mountPath": RBAC_DIR, "readOnly": True}
    return (
        SetKey(at=annotations, key=annotation_keys.L7_RBAC, value=text),
        ReplaceNamed(at=("spec",), key="volumes", name=L7_VOLUME, item=volume),
        # a native sidecar proxy among the init containers too
        *(ReplaceNamed(at=p, key="volumeMounts", name=L7_VOLUME, item=mount) for p in proxies),
    ), rbac_digest(text)


def stats_changes(
    annotations: Mapping[str, Any], proxy: Mapping[str, Any]
) -> tuple[tuple[Change, ...], tuple[str, ...]]:
    """The listener's RBAC and ext_authz stats into Istio's Prometheus merge, whatever the
    engine (see :mod:`meshguard.inject.stats`), from the pod's annotations and its proxy
    container's spec, and the warning when that cannot be done safely."""
    env = proxy.get("env")
    merge = merge_stats(annotations=annotations, proxy_env=env if isinstance(env, list) else [])
    if merge.left_out:
        # within an admission warning's 256 characters
        warning = (
            f"meshguard left {STATS_REGEXPS} as it is ({merge.left_out}): the loopback"
            " listener's decision stats stay out of Prometheus; add meshguard's regex to"
            " proxyStatsMatcher yourself (istio/README.md)"
        )
        return (), (warning,)
    if merge.value is None:
        return (), ()
    return (SetKey(at=("metadata", "annotations"), key=STATS_REGEXPS, value=merge.value),), ()
