"""The keys of the pod annotations (and the label) meshguard reads and writes, and of the
Istio ones it honors."""

from __future__ import annotations

from typing import Final

POLICY: Final = "meshguard.io/policy"
MODE: Final = "meshguard.io/mode"
INJECT: Final = "meshguard.io/inject"
STATUS: Final = "meshguard.io/status"
RULESET: Final = "meshguard.io/ruleset"
#: The webhook's signature over the ruleset and status it wrote (meshguard.attestation).
ATTESTATION: Final = "meshguard.io/attestation"

#: The label meshguard sets on every pod it admitted: the authz server lists and watches only
#: pods carrying it (a label selector, evaluated by the API server).
ADMITTED_LABEL: Final = "meshguard.io/admitted"
ADMITTED_LABEL_VALUE: Final = "true"

ISTIO_INJECT: Final = "sidecar.istio.io/inject"
ISTIO_STATUS: Final = "sidecar.istio.io/status"
ISTIO_TEMPLATES: Final = "inject.istio.io/templates"
