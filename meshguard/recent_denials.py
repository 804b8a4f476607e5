"""``meshguard describe --recent-denials``: what the kernel denied a pod lately (issue 26).

The node agent on the pod's node (``meshguard cni denials``, DaemonSet ``meshguard-denials``;
or the CNI agent with ``--agent-denials``) keeps each watched pod's last denials and serves
them on ``GET /denials?namespace=NS&pod=NAME`` beside ``/metrics``. ``describe`` reaches it
through the API server's pod proxy (``pods/proxy``: the caller's own RBAC decides, no port
opened to the caller): it finds the agent pod on the described pod's node (label
``app.kubernetes.io/name=meshguard``, component ``denials`` or ``cni``, its container port
named ``metrics``) and reads the answer into :class:`RecentDenials`. Where no agent
answers, the pod's Events (``LoopbackDenied``, ``LoopbackWouldDeny``: the agent's optional
Events) are read instead; failing both, :attr:`RecentDenials.error` says why. The parsing
and the words are pure (:func:`parse_agent_answer`, :func:`from_events`, :func:`text_lines`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: The chart's pods (listed with this selector); the agents among them by component.
AGENT_SELECTOR: Final = "app.kubernetes.io/name=meshguard"
AGENT_COMPONENTS: Final = frozenset({"denials", "cni"})
EVENT_REASONS: Final = frozenset({"LoopbackDenied", "LoopbackWouldDeny"})
MAX_SHOWN: Final = 20
MAX_ANSWER_BYTES: Final = 1024 * 1024


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class RecentDenial(_Data):
    source: str
    destination: str
    port: int | None = None
    protocol: str
    verdict: Literal["denied", "would-deny"]
    uid: int | None = None
    #: Seconds since the epoch (the agent's clock); None from an Event.
    time: float | None = None


class RecentDenials(_Data):
    """``recentDenials`` of a PodDescription (docs/describe-schema.md)."""

    #: Where they were read: the node agent's ``/denials``, or the pod's Events.
    origin: Literal["agent", "events"] | None = None
    #: The agent pod that answered (``namespace/name``).
    agent: str | None = None
    denials: tuple[RecentDenial, ...] = Field(default=())
    error: str | None = None


def parse_agent_answer(body: bytes, *, agent: str) -> RecentDenials:
    """The agent's ``/denials`` answer; a body that is not one is an error, never denials."""
    if len(body) > MAX_ANSWER_BYTES:
        return RecentDenials(agent=agent, error=f"the agent {agent} answered more than 1 MiB")
    try:
        document = json.loads(body)
        items = document["denials"] if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise ValueError("no list of denials")
        denials = tuple(RecentDenial.model_validate(item) for item in items)
    except (ValueError, KeyError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        return RecentDenials(agent=agent, error=f"the agent {agent} answered no denials: {first}")
    return RecentDenials(origin="agent", agent=agent, denials=denials[-MAX_SHOWN:])


def from_events(events: Sequence[Mapping[str, Any]]) -> RecentDenials:
    """The agent's Events on the pod (their messages say what was denied)."""
    denials = []
    for event in events:
        if event.get("reason") not in EVENT_REASONS:
            continue
        message = str(event.get("message", ""))
        source, _, rest = message.removeprefix("meshguard ").partition(" -> ")
        verdict: Literal["denied", "would-deny"] = (
            "denied" if event.get("reason") == "LoopbackDenied" else "would-deny"
        )
        words = rest.split()
        port = int(words[2]) if len(words) > 3 and words[2].isdigit() else None
        denials.append(
            RecentDenial(
                source=source.split()[-1] if source else "unknown",
                destination=words[0] if words else "unknown",
                port=port,
                protocol=words[3] if len(words) > 3 else "unknown",
                verdict=verdict,
            )
        )
    return RecentDenials(origin="events", denials=tuple(denials[-MAX_SHOWN:]))


def agent_on(pods: Sequence[Mapping[str, Any]], *, node: str) -> tuple[str, str, int] | None:
    """(namespace, name, metrics port) of a running agent pod on ``node``, if any."""
    for pod in pods:
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/component") not in AGENT_COMPONENTS:
            continue
        if spec.get("nodeName") != node or status.get("phase") != "Running":
            continue
        for container in spec.get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics" and isinstance(port.get("containerPort"), int):
                    metadata = pod.get("metadata") or {}
                    return (
                        str(metadata.get("namespace")),
                        str(metadata.get("name")),
                        port["containerPort"],
                    )
    return None


def text_lines(recent: RecentDenials | None) -> list[str]:
    """The describe text's lines for them (none when not asked)."""
    if recent is None:
        return []
    if recent.error is not None:
        return [f"recent denials: not available ({recent.error})"]
    where = f"node agent {recent.agent}" if recent.origin == "agent" else "the pod's events"
    if not recent.denials:
        return [f"recent denials: none (from {where})"]
    lines = [f"recent denials (from {where}, newest last):"]
    for d in recent.denials:
        port = f"{d.port}/{d.protocol}" if d.port is not None else d.protocol
        lines.append(f"  {d.source} -> {d.destination} {port}: {d.verdict}")
    return lines
