"""The ``meshguard-init`` container and the downward-API volume that hands it the ruleset;
in Istio CNI mode, the capability-free ``meshguard-validation`` container instead.

The same definitions feed the webhook, ``meshguard inject`` and the Istio injection template
in ``istio/`` (``meshguard istio-template`` prints it), so the container is identical
whichever of them put it in the pod.

In Istio CNI mode (``istio-validation`` instead of ``istio-init``) the rules are installed
from the node by meshguard's chained CNI plugin (:mod:`meshguard.cni`) before any container
starts; the pod only gets ``meshguard-validation``: non-root, no capabilities, which proves
the rules are in place (``meshguard cni validate``) before the app's containers start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshguard import __version__, annotation_keys

MESHGUARD_INIT: Final = "meshguard-init"
MESHGUARD_VALIDATION: Final = "meshguard-validation"
#: The validation container runs as the highest free uid at or below this one (a uid that
#: belongs to no container, so meshguard's rules give it nothing over loopback).
VALIDATION_UID_CEILING: Final = 65532
RULESET_VOLUME: Final = "meshguard-ruleset"
RULESET_DIR: Final = "/etc/meshguard"
RULESET_FILE: Final = "ruleset"
#: Beside the ruleset: the webhook's signature over it (``meshguard.io/attestation``).
ATTESTATION_FILE: Final = "attestation"
#: meshguard-init's trusted public keys (PEM), when the webhook knows them.
TRUSTED_KEYS_ENV: Final = "MESHGUARD_TRUSTED_KEYS"
#: The servers' image (the webhook, the authz server): the Dockerfile's default target.
DEFAULT_IMAGE: Final = f"ghcr.io/meshguard/meshguard:{__version__}"
#: The slim image of meshguard-init and meshguard-validation (the Dockerfile's ``init``
#: target: the core install and the netfilter tools, none of the servers' libraries).
DEFAULT_INIT_IMAGE: Final = f"ghcr.io/meshguard/meshguard-init:{__version__}"


@dataclass(frozen=True, kw_only=True)
class InitContainerSettings:
    image: str = DEFAULT_INIT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "10m"
    memory_request: str = "32Mi"
    cpu_limit: str = "200m"
    memory_limit: str = "64Mi"
    #: Secrets (in the pod's namespace) the kubelet pulls :attr:`image` with: added to the
    #: pod's imagePullSecrets with the init step.
    pull_secrets: tuple[str, ...] = ()
    #: The webhook's public keys (PEM) for meshguard-init's consistency check of the
    #: attestation (``$MESHGUARD_TRUSTED_KEYS``); None: no check.
    trusted_keys: str | None = None


def init_container(settings: InitContainerSettings) -> dict[str, Any]:
    """meshguard-init: root for iptables, NET_ADMIN and NET_RAW only, nothing else."""
    env = (
        {"env": [{"name": TRUSTED_KEYS_ENV, "value": settings.trusted_keys}]}
        if settings.trusted_keys
        else {}
    )
    return {
        **env,
        "name": MESHGUARD_INIT,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["init", "--ruleset-file", f"{RULESET_DIR}/{RULESET_FILE}"],
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "runAsUser": 0,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"mountPath": RULESET_DIR, "name": RULESET_VOLUME, "readOnly": True}],
    }


def ruleset_volume() -> dict[str, Any]:
    """The compiled ruleset (annotation ``meshguard.io/ruleset``) as a file, via downward API."""
    return {
        "name": RULESET_VOLUME,
        "downwardAPI": {
            "items": [
                {
                    "path": RULESET_FILE,
                    "fieldRef": {"fieldPath": f"metadata.annotations['{annotation_keys.RULESET}']"},
                },
                {
                    "path": ATTESTATION_FILE,
                    "fieldRef": {
                        "fieldPath": f"metadata.annotations['{annotation_keys.ATTESTATION}']"
                    },
                },
            ]
        },
    }


def validation_container(settings: InitContainerSettings, *, uid: int, mode: str) -> dict[str, Any]:
    """meshguard-validation (Istio CNI mode): non-root, no capabilities, no privilege.

    Runs as ``uid`` — one that belongs to no container of the pod, to which meshguard's rules
    refuse every loopback flow — and probes that refusal (``meshguard cni validate``). It
    satisfies Pod Security Standards "restricted".
    """
    return {
        "name": MESHGUARD_VALIDATION,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["cni", "validate", "--mode", mode],
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": uid,
            "runAsNonRoot": True,
            "runAsUser": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


#: Fields of meshguard-validation that vary per pod or per installation.
_VALIDATION_VARIABLE: Final = frozenset({"image", "imagePullPolicy", "resources", "args"})


def is_validation_container(
    item: Mapping[str, Any], settings: InitContainerSettings | None
) -> bool:
    """Whether ``item`` is the meshguard-validation meshguard generates (any uid and mode)."""
    if item.get("name") != MESHGUARD_VALIDATION:
        return False
    context = item.get("securityContext")
    uid = context.get("runAsUser") if isinstance(context, Mapping) else None
    args = item.get("args")
    mode = args[-1] if isinstance(args, list) and len(args) == 4 else None
    if isinstance(uid, bool) or not isinstance(uid, int) or not isinstance(mode, str):
        return False
    expected = validation_container(settings or InitContainerSettings(), uid=uid, mode=mode)
    if settings is not None:
        return dict(item) == expected
    return {k: v for k, v in item.items() if k not in _VALIDATION_VARIABLE} == {
        k: v for k, v in expected.items() if k not in _VALIDATION_VARIABLE
    } and item.get("args") == expected["args"]
