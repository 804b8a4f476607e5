"""The keys of the pod annotations (and the label) meshguard reads and writes, and of the
Istio ones it honors."""

from __future__ import annotations

import difflib
from typing import Final

POLICY: Final = "meshguard.io/policy"
MODE: Final = "meshguard.io/mode"
INJECT: Final = "meshguard.io/inject"
STATUS: Final = "meshguard.io/status"
RULESET: Final = "meshguard.io/ruleset"
#: The L7 engine a pod asks for (``native`` or ``ext-authz``; the chart's default when
#: absent); meshguard sets the label of the same key to the engine it chose, and Istio's
#: EnvoyFilters select the pods of each engine by it.
L7_ENGINE: Final = "meshguard.io/l7-engine"
#: The pod's Envoy RBAC document (native engine), mounted into istio-proxy by the downward API.
L7_RBAC: Final = "meshguard.io/l7-rbac"
#: The webhook's signature over the ruleset and status it wrote (meshguard.attestation).
ATTESTATION: Final = "meshguard.io/attestation"

#: The label meshguard sets on every pod it admitted: the authz server lists and watches only
#: pods carrying it (a label selector, evaluated by the API server).
ADMITTED_LABEL: Final = "meshguard.io/admitted"
ADMITTED_LABEL_VALUE: Final = "true"

ISTIO_INJECT: Final = "sidecar.istio.io/inject"
ISTIO_STATUS: Final = "sidecar.istio.io/status"
ISTIO_TEMPLATES: Final = "inject.istio.io/templates"
#: NONE: Istio's sidecar template injects no istio-init (nor istio-validation).
ISTIO_INTERCEPTION_MODE: Final = "sidecar.istio.io/interceptionMode"


MESHGUARD_PREFIX: Final = "meshguard.io/"


def known_keys() -> frozenset[str]:
    """Every ``meshguard.io/`` key this module names: a key added here is known at once."""
    return frozenset(
        value
        for value in globals().values()
        if isinstance(value, str)
        and value.startswith(MESHGUARD_PREFIX)
        and value != MESHGUARD_PREFIX
    )


def unknown_keys(annotations: object) -> list[str]:
    """A warning per ``meshguard.io/*`` annotation key meshguard does not know (a misspelled
    ``meshguard.io/polciy`` would otherwise be silently ignored), naming the closest known
    key — as Istio's analyzer does for its own annotations."""
    if not isinstance(annotations, dict):
        return []
    known = known_keys()
    warnings: list[str] = []
    for key in sorted(k for k in annotations if isinstance(k, str)):
        if not key.startswith(MESHGUARD_PREFIX) or key in known:
            continue
        names = sorted(k.removeprefix(MESHGUARD_PREFIX) for k in known)
        close = difflib.get_close_matches(key.removeprefix(MESHGUARD_PREFIX), names, n=1)
        hint = (
            f"; did you mean {MESHGUARD_PREFIX}{close[0]}?"
            if close
            else f" (known: {', '.join(sorted(known))})"
        )
        warnings.append(f"unknown annotation {key}: meshguard ignores it{hint}")
    return warnings
