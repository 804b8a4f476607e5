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
    """A Namespace object, and whether it carries meshguard's opt-out label."""

    name: str
    opted_out: bool


#: What a source gives out, in order: Namespaces, and the pods (or templates) to judge.
Found = NamespaceSeen | PodTemplate
