"""``meshguard describe --recent-denials``: what the kernel denied a pod lately (issue 26).

The node agent on the pod's node (``meshguard cni denials``, DaemonSet ``meshguard-denials``;
or the CNI agent with ``--agent-denials``, DaemonSet ``meshguard-cni-node``) keeps each
watched pod's last denials and serves them on ``GET /denials?namespace=NS&pod=NAME`` beside
``/metrics``. ``describe`` reaches it through the API server's pod proxy (``pods/proxy``: the
caller's own RBAC decides, no port opened to the caller).

Only meshguard's own agents are asked: pods in meshguard's release namespace
(``--meshguard-namespace``, default :data:`MESHGUARD_NAMESPACE`), labelled
``app.kubernetes.io/name=meshguard`` with component ``denials`` or ``cni``, controlled by the
chart's DaemonSet of that component, running on the described pod's node, their container
port named ``metrics`` (:func:`agent_on`). Labels alone would trust any pod that copies them,
in any namespace where someone may create pods; the namespace is the boundary (whoever may
create pods there administers meshguard already), the DaemonSet owner keeps meshguard's other
pods and hand-made copies out.

Where no agent answers, the pod's Events (``LoopbackDenied``, ``LoopbackWouldDeny``) are read
instead, only those the agent reports (:data:`EVENT_COMPONENT`). They are advisory: whoever
may create Events in the pod's namespace can write one that looks like the agent's, so the
description says they came from Events (``origin: events``). Failing both,
:attr:`RecentDenials.error` says why. The parsing and the words are pure
(:func:`parse_agent_answer`, :func:`from_events`, :func:`text_lines`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: The chart's install namespace (charts/meshguard/README.md): where its agents run.
MESHGUARD_NAMESPACE: Final = "meshguard-system"
#: The chart's pods (listed with this selector, in meshguard's namespace only).
AGENT_SELECTOR: Final = "app.kubernetes.io/name=meshguard"
#: The agents among them: component label -> the chart's DaemonSet that must control the pod.
AGENT_DAEMONSETS: Final[Mapping[str, str]] = {
    "denials": "meshguard-denials",
    "cni": "meshguard-cni-node",
}
EVENT_REASONS: Final = frozenset({"LoopbackDenied", "LoopbackWouldDeny"})
#: What the agent's Events name as their reporter (``source.component``,
#: ``reportingComponent``); meshguard.cni.events writes it.
EVENT_COMPONENT: Final = "meshguard-node-agent"
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

    #: Where they were read: meshguard's node agent's ``/denials``, or the pod's Events
    #: (advisory: anyone who may create Events in the pod's namespace can write them).
    origin: Literal["agent", "events"] | None = None
    #: The agent pod that answered (``namespace/name``).
    agent: str | None = None
    #: Why the Events were read instead of an agent's answer.
    fallback: str | None = None
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
    """The agent's Events on the pod (their messages say what was denied); Events of any
    other reporter are not read, whatever their reason."""
    denials = []
    for event in events:
        if event.get("reason") not in EVENT_REASONS or not _reported_by_agent(event):
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


def _reported_by_agent(event: Mapping[str, Any]) -> bool:
    """Every reporter the Event names is the agent, and it names one."""
    source = event.get("source")
    names = (
        source.get("component") if isinstance(source, Mapping) else None,
        event.get("reportingComponent"),
    )
    return {name for name in names if isinstance(name, str) and name} == {EVENT_COMPONENT}


def agent_on(
    pods: Sequence[Mapping[str, Any]], *, node: str, namespace: str
) -> tuple[str, str, int] | None:
    """(namespace, name, metrics port) of a running meshguard agent on ``node``, if any: a
    pod of ``namespace`` (meshguard's) that the chart's DaemonSet of its component controls."""
    for pod in pods:
        metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if metadata.get("namespace") != namespace or not _controlled_by_agent_daemonset(metadata):
            continue
        if spec.get("nodeName") != node or (pod.get("status") or {}).get("phase") != "Running":
            continue
        for container in spec.get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics" and isinstance(port.get("containerPort"), int):
                    return namespace, str(metadata.get("name")), port["containerPort"]
    return None


def _controlled_by_agent_daemonset(metadata: Mapping[str, Any]) -> bool:
    labels = metadata.get("labels") or {}
    daemonset = AGENT_DAEMONSETS.get(str(labels.get("app.kubernetes.io/component")))
    controllers = [
        ref
        for ref in metadata.get("ownerReferences") or ()
        if isinstance(ref, Mapping) and ref.get("controller") is True
    ]
    return daemonset is not None and any(
        (ref.get("apiVersion"), ref.get("kind"), ref.get("name"))
        == ("apps/v1", "DaemonSet", daemonset)
        for ref in controllers
    )


def text_lines(recent: RecentDenials | None) -> list[str]:
    """The describe text's lines for them (none when not asked)."""
    if recent is None:
        return []
    if recent.error is not None:
        return [f"recent denials: not available ({recent.error})"]
    where = f"node agent {recent.agent}" if recent.origin == "agent" else "the pod's events"
    if not recent.denials:
        lines = [f"recent denials: none (from {where})"]
    else:
        lines = [f"recent denials (from {where}, newest last):"]
    for d in recent.denials:
        port = f"{d.port}/{d.protocol}" if d.port is not None else d.protocol
        lines.append(f"  {d.source} -> {d.destination} {port}: {d.verdict}")
    if recent.origin == "events":
        because = f"; read because {recent.fallback}" if recent.fallback else ""
        lines.append(
            "  (advisory: anyone who may create events in the pod's namespace can write"
            f" them{because})"
        )
    return lines
