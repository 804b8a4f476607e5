"""Which pods the node agent repairs (pure logic; the API calls are in :mod:`repairer`).

CNI runs once per pod sandbox. An injected pod whose sandbox was created while the node
agent was away (a rolling update of the DaemonSet, a crash) got no rules from the node; its
``meshguard-validation`` then exits 1 and the pod never runs its app — safe, but stuck for
good. The agent deletes such a pod once its entry is chained again, so the pod's controller
creates a new one, which the node's plugin then sets up. A pod is broken exactly when:

- it runs on this node (``spec.nodeName``) and is not being deleted already;
- meshguard admitted it (the ``meshguard.io/admitted`` label and the ``meshguard.io/status``
  annotation) in Istio CNI mode (its init containers include ``meshguard-validation``);
- its ``meshguard-validation`` terminated with meshguard-validation's failure status
  (:data:`VALIDATION_FAILED`, what ``meshguard cni validate`` exits with when the rules are
  missing), now or as the last state before a restart (CrashLoopBackOff). Any other exit
  (an OOM kill, a signal) is not the node's to repair.

A broken pod that no controller owns is reported, never deleted: nothing would recreate it.

How a broken pod is repaired is the operator's choice (:class:`RepairMode`). The default,
``event``, needs no write on pods: the agent records a Warning Event on the pod
(:func:`event_document`, reason ``MeshguardRulesMissing``, seen in ``kubectl describe pod``
and by alerting on events) and logs it; someone, or a controller with the right, deletes
it. ``delete`` deletes it; it needs ``delete`` on pods, which RBAC cannot scope to a node, so
the chart pairs it with a ValidatingAdmissionPolicy that lets the agent's service account
delete only pods of the node its token is bound to. A ``label`` mode (Istio's) is not
offered: it needs ``patch`` on pods, which would let every node rewrite any pod.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.errors import EXIT_FAILED
from meshguard.init_container import MESHGUARD_VALIDATION

#: ``meshguard cni validate``'s exit status when meshguard's rules are not in place.
VALIDATION_FAILED: Final = EXIT_FAILED
#: What the agent lists: the pods meshguard admitted (and, as a field selector, its node's).
ADMITTED_SELECTOR: Final = (
    f"{annotation_keys.ADMITTED_LABEL}={annotation_keys.ADMITTED_LABEL_VALUE}"
)


class RepairMode(enum.StrEnum):
    """What the agent does with a broken pod."""

    EVENT = "event"  # a Warning Event on the pod; no write on pods needed
    DELETE = "delete"  # delete it (needs delete on pods: scoped to the node by the chart)


#: The Event's reason (``kubectl get events --field-selector reason=MeshguardRulesMissing``).
EVENT_REASON: Final = "MeshguardRulesMissing"
#: The Event's reporting component.
EVENT_COMPONENT: Final = "meshguard-cni"


class Action(enum.StrEnum):
    DELETE = "delete"  # a controller recreates it
    REPORT = "report"  # no controller: deleting it would lose it


@dataclass(frozen=True, kw_only=True)
class Broken:
    """A pod stopped at its meshguard-validation for want of the node's rules."""

    namespace: str
    name: str
    uid: str
    reason: str
    action: Action


def node_selector(node_name: str) -> str:
    """The field selector of the pods scheduled on ``node_name``."""
    return f"spec.nodeName={node_name}"


def assess(pod: Mapping[str, Any], *, node_name: str) -> Broken | None:
    """The pod as a broken one to repair on ``node_name``, or None (leave it alone)."""
    metadata = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    if pod.get("kind", "Pod") != "Pod" or not node_name or spec.get("nodeName") != node_name:
        return None
    if metadata.get("deletionTimestamp") or not _admitted_in_cni_mode(metadata, spec):
        return None
    reason = _validation_failure(_mapping(pod.get("status")))
    namespace, name, uid = metadata.get("namespace"), metadata.get("name"), metadata.get("uid")
    if reason is None or not all(isinstance(v, str) and v for v in (namespace, name, uid)):
        return None
    action = Action.DELETE if _controlled(metadata) else Action.REPORT
    return Broken(
        namespace=str(namespace), name=str(name), uid=str(uid), reason=reason, action=action
    )


def event_document(broken: Broken, *, node_name: str, now: str) -> dict[str, Any]:
    """The core/v1 Event that reports ``broken`` on its pod (``now``: RFC 3339, UTC)."""
    remedy = (
        "delete the pod so that its controller recreates it with the node's rules"
        if broken.action is Action.DELETE
        else "no controller owns it: delete it and create it anew"
    )
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{broken.name}.meshguard-", "namespace": broken.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": broken.namespace,
            "name": broken.name,
            "uid": broken.uid,
        },
        "reason": EVENT_REASON,
        "message": f"{broken.reason}: {remedy}",
        "type": "Warning",
        "source": {"component": EVENT_COMPONENT, "host": node_name},
        "reportingComponent": EVENT_COMPONENT,
        "reportingInstance": node_name,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def deletion_budget(recent: Sequence[float], *, now: float, per_minute: int) -> int:
    """How many pods may still be deleted now, given the times of the recent deletions."""
    in_window = sum(1 for moment in recent if now - moment < 60.0)
    return max(0, per_minute - in_window)


def _admitted_in_cni_mode(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    labels = _mapping(metadata.get("labels"))
    annotations = _mapping(metadata.get("annotations"))
    if labels.get(annotation_keys.ADMITTED_LABEL) != annotation_keys.ADMITTED_LABEL_VALUE:
        return False
    if not annotations.get(annotation_keys.STATUS):
        return False
    init = spec.get("initContainers")
    names = [_mapping(c).get("name") for c in init] if isinstance(init, list) else []
    return MESHGUARD_VALIDATION in names


def _validation_failure(status: Mapping[str, Any]) -> str | None:
    statuses = status.get("initContainerStatuses")
    if not isinstance(statuses, list):
        return None
    for entry in map(_mapping, statuses):
        if entry.get("name") != MESHGUARD_VALIDATION:
            continue
        state = _mapping(entry.get("state"))
        if _failed(_mapping(state.get("terminated"))):
            return (
                f"{MESHGUARD_VALIDATION} exited {VALIDATION_FAILED}: meshguard's node rules missing"
            )
        waiting = state.get("waiting")
        last = _mapping(_mapping(entry.get("lastState")).get("terminated"))
        if isinstance(waiting, Mapping) and _failed(last):
            why = _mapping(waiting).get("reason") or "waiting"
            return (
                f"{MESHGUARD_VALIDATION} exited {VALIDATION_FAILED} and is {why}"
                f" (restarts: {entry.get('restartCount', 0)}): meshguard's node rules missing"
            )
    return None


def _failed(terminated: Mapping[str, Any]) -> bool:
    code = terminated.get("exitCode")
    return isinstance(code, int) and not isinstance(code, bool) and code == VALIDATION_FAILED


def _controlled(metadata: Mapping[str, Any]) -> bool:
    owners = metadata.get("ownerReferences")
    return isinstance(owners, list) and any(_mapping(o).get("controller") is True for o in owners)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
