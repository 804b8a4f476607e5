"""Which init step meshguard gives a pod: never more privilege than Istio's injection gave it.

Istio's init step says what the pod may hold. ``istio-init`` runs as root with NET_ADMIN and
NET_RAW: meshguard-init, with the same two capabilities, follows it. ``istio-validation``
(Istio CNI mode) holds nothing: the rules come from the node (meshguard's chained CNI
plugin) and the capability-free meshguard-validation checks them. A pod Istio gave no init
step at all although it has containers besides the proxy (the ``grpc-agent`` template,
``sidecar.istio.io/interceptionMode: NONE``, custom templates) holds nothing either; what
meshguard does with it is the installation's choice (:class:`WithoutIstioInit`), because a
privileged container there would lower the pod's Pod Security level. Pure.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.pod import ISTIO_VALIDATION, PodView

#: Istio's injection template that adds istio-init (istio-validation in CNI mode).
ISTIO_SIDECAR_TEMPLATE: Final = "sidecar"


class InstallMode(enum.StrEnum):
    """Who installs the pod's rules."""

    INIT = "init-container"  # meshguard-init, after istio-init
    CNI = "cni"  # meshguard's chained CNI plugin, from the node; meshguard-validation checks


class WithoutIstioInit(enum.StrEnum):
    """What meshguard does with a pod that has containers besides the proxy but no Istio init
    step (no istio-init, no istio-validation)."""

    #: Left alone, with the reason (refused where pod opt-out is refused): the default,
    #: since adding a root container with NET_ADMIN makes Pod Security Admission refuse
    #: pods that ran before.
    SKIP = "skip"
    #: The rules from the node (meshguard's CNI plugin, ``cni.enabled``), checked by
    #: meshguard-validation: no capability in the pod.
    NODE = "node"
    #: A root meshguard-init with NET_ADMIN and NET_RAW, as in a pod with istio-init: for
    #: namespaces that allow privileged pods.
    PRIVILEGED = "privileged"


def install_mode(pod: PodView, *, without_istio_init: WithoutIstioInit) -> InstallMode:
    """Istio CNI mode when Istio's recognized init step is istio-validation (no istio-init);
    without an Istio init step, as ``without_istio_init`` says (a pod that setting skips
    never gets this far)."""
    step = pod.istio_init_step
    if step is None:
        return InstallMode.CNI if without_istio_init is WithoutIstioInit.NODE else InstallMode.INIT
    return InstallMode.CNI if step.name == ISTIO_VALIDATION else InstallMode.INIT


def istio_will_add_init_step(annotations: Mapping[str, Any]) -> bool:
    """Whether Istio's injection, still to come, gives the pod an init step, as far as the
    pod says: its templates include ``sidecar`` (the default) and its interceptionMode is not
    NONE (a mesh-wide interceptionMode in ProxyConfig is not visible here)."""
    named = str(annotations.get(annotation_keys.ISTIO_TEMPLATES) or ISTIO_SIDECAR_TEMPLATE)
    templates = {t.strip() for t in named.split(",")}
    return ISTIO_SIDECAR_TEMPLATE in templates and not intercepts_nothing(annotations)


def intercepts_nothing(annotations: Mapping[str, Any]) -> bool:
    """The pod asks Istio for no capture (``sidecar.istio.io/interceptionMode: NONE``), so
    Istio's sidecar template gives it no init step."""
    interception = str(annotations.get(annotation_keys.ISTIO_INTERCEPTION_MODE) or "")
    return interception.strip().upper() == "NONE"
