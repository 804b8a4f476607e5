"""What ``describe`` and ``unprotected`` read, whether from files or from the cluster: the
Namespaces (with their opt-out) and the pods or pod templates to judge, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meshguard.manifests import PodTemplate

#: The resource names ``describe`` takes, as kubectl spells pods.
POD_TYPES: Final = ("pod", "pods", "po")


@dataclass(frozen=True)
class NamespaceSeen:
    """A Namespace object: whether it carries meshguard's opt-out label, and the exemption."""

    name: str
    opted_out: bool
    #: Labelled meshguard.io/opt-out=allowed: its pods may opt out where that is refused.
    exempt: bool = False


#: What a source gives out, in order: Namespaces, and the pods (or templates) to judge.
Found = NamespaceSeen | PodTemplate
