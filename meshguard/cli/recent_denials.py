"""``describe --recent-denials`` against the live cluster: the node agent's ``/denials``
through the API server's pod proxy, else the pod's Events (see
:mod:`meshguard.recent_denials`, which chooses the agent and parses what is read here).
Agents are listed in meshguard's namespace only (``--meshguard-namespace``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from meshguard.cluster import Cluster, ClusterError, connect, list_events, proxy_get
from meshguard.cluster import list_objects as list_cluster_objects
from meshguard.manifests import PodTemplate
from meshguard.recent_denials import (
    AGENT_SELECTOR,
    MESHGUARD_NAMESPACE,
    RecentDenials,
    agent_on,
    from_events,
    parse_agent_answer,
)


def reader(args: argparse.Namespace) -> Callable[[PodTemplate], RecentDenials]:
    """Reads one pod's recent denials; meshguard's agents are listed once, on first use (a
    listing that fails is not repeated for every pod)."""
    cluster = connect(kubeconfig=args.kubeconfig, context=args.context)
    meshguard_namespace: str = args.meshguard_namespace or MESHGUARD_NAMESPACE
    listed: list[dict[str, Any]] | str | None = None  # the agents, or why they are not

    def read(template: PodTemplate) -> RecentDenials:
        nonlocal listed
        namespace, name = template.namespace or "default", template.name
        node = str(template.spec.get("nodeName") or "")
        if listed is None:
            listed = _agents(cluster, namespace=meshguard_namespace)
        if isinstance(listed, str):
            why = listed
        elif not node:
            why = "the pod is on no node yet"
        elif (agent := agent_on(listed, node=node, namespace=meshguard_namespace)) is None:
            why = f"no agent of meshguard's (namespace {meshguard_namespace}) runs on node {node}"
        else:
            answer = _from_agent(cluster, agent, namespace=namespace, pod=name)
            if answer.error is None:
                return answer
            why = answer.error
        try:
            recent = from_events(_events(cluster, namespace=namespace, pod=name))
        except ClusterError as exc:
            return RecentDenials(error=f"{why}; the pod's events cannot be read: {exc}")
        return recent.model_copy(update={"fallback": why})

    return read


def _agents(cluster: Cluster, *, namespace: str) -> list[dict[str, Any]] | str:
    """The chart's pods in meshguard's namespace, or why they cannot be listed."""
    try:
        return list(
            list_cluster_objects(
                cluster, resource="pods", namespace=namespace, selector=AGENT_SELECTOR
            )
        )
    except ClusterError as exc:
        return f"meshguard's agents in namespace {namespace} cannot be listed: {exc}"


def _from_agent(
    cluster: Cluster, agent: tuple[str, str, int], *, namespace: str, pod: str
) -> RecentDenials:
    agent_namespace, agent_name, port = agent
    where = f"{agent_namespace}/{agent_name}"
    try:
        query = [("namespace", namespace), ("pod", pod)]
        body = proxy_get(cluster, namespace=agent_namespace, pod=agent_name, port=port,
                         path="denials", query=query)  # fmt: skip
    except ClusterError as exc:
        return RecentDenials(agent=where, error=str(exc))
    return parse_agent_answer(body, agent=where)


def _events(cluster: Cluster, *, namespace: str, pod: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=Pod,involvedObject.name={pod}"
    return list_events(cluster, namespace=namespace, field_selector=selector)
