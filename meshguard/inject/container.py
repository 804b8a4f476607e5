"""The ``meshguard-init`` container and the downward-API volume that hands it the ruleset.

The same definitions feed the webhook, ``meshguard inject`` and the Istio injection template
in ``istio/`` (``meshguard istio-template`` prints it), so the container is identical
whichever of them put it in the pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from meshguard import __version__, annotation_keys

MESHGUARD_INIT: Final = "meshguard-init"
RULESET_VOLUME: Final = "meshguard-ruleset"
RULESET_DIR: Final = "/etc/meshguard"
RULESET_FILE: Final = "ruleset"
#: The image that serves the webhook, the authz server and meshguard-init.
DEFAULT_IMAGE: Final = f"ghcr.io/meshguard/meshguard:{__version__}"


@dataclass(frozen=True, kw_only=True)
class InitContainerSettings:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "10m"
    memory_request: str = "32Mi"
    cpu_limit: str = "200m"
    memory_limit: str = "64Mi"


def init_container(settings: InitContainerSettings) -> dict[str, Any]:
    """meshguard-init: root for iptables, NET_ADMIN and NET_RAW only, nothing else."""
    return {
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
                }
            ]
        },
    }
