"""``describe --recent-denials`` (meshguard/recent_denials.py): the agent's answer and the
agent's Events on the pod read into ``recentDenials``, anything else an error (never
denials), Events of another reporter ignored; the agent of the pod's node chosen, only one
of meshguard's (its namespace, its DaemonSet); the description's text and JSON carry them;
the flags that choose where they are read are checked. (The agent's real ``/denials``
answer is read in tests/cni/test_node_denials.py, the cluster in
tests/cli/test_recent_denials_cluster.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from meshguard.cli import main
from meshguard.cni.denials import Denial
from meshguard.cni.events import event_object
from meshguard.describe import PodDescription, PodRef, Protection, text_lines
from meshguard.recent_denials import (
    RecentDenial,
    RecentDenials,
    agent_on,
    from_events,
    parse_agent_answer,
)

DENIAL = Denial(namespace="demo", pod="shop", source="cache", destination="app", port=8080,
                protocol="tcp", family="ipv4", verdict="denied", uid=1002)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>", "answered no denials"),
        (b'{"denials": {}}', "no list of denials"),
        (b'{"denials": [{"source": "a"}]}', "answered no denials"),
        (b'{"denials": [{"source": "a", "destination": "b", "protocol": "tcp",'
         b' "verdict": "allowed"}]}', "answered no denials"),
        (b" " * (2 * 1024 * 1024), "more than 1 MiB"),
    ],
)  # fmt: skip
def test_an_answer_that_is_not_the_agents_is_an_error_never_denials(body, problem):
    recent = parse_agent_answer(body, agent="ns/agent")
    assert recent.denials == () and recent.error is not None and problem in recent.error


def test_the_agents_events_read_back_as_denials():
    events = [
        event_object(DENIAL, suppressed=0, component="meshguard-node-agent", now=0.0),
        {"reason": "Scheduled", "message": "not ours"},
    ]
    assert from_events(events) == RecentDenials(
        origin="events",
        denials=(RecentDenial(source="cache", destination="app", port=8080, protocol="tcp",
                              verdict="denied"),),
    )  # fmt: skip


def test_events_of_another_reporter_are_not_the_agents():
    """Anyone who may create Events in the namespace can give one the agent's reason; only
    those naming the agent as their reporter (and nothing else) are read."""
    ours = event_object(DENIAL, suppressed=0, component="meshguard-node-agent", now=0.0)
    others = [
        {**ours, "source": {"component": "kubectl"}, "reportingComponent": "kubectl"},
        {**ours, "reportingComponent": "someone"},  # the agent's source, another reporter
        {**ours, "source": {}, "reportingComponent": ""},  # no reporter at all
        {**ours, "source": "meshguard-node-agent", "reportingComponent": None},
    ]
    assert from_events(others) == RecentDenials(origin="events")
    legacy = {**ours, "reportingComponent": None}  # an agent before reportingComponent
    assert len(from_events([legacy]).denials) == 1


def agent(
    name: str, node: str, phase: str = "Running", *, namespace: str = "meshguard-system",
    component: str = "denials", owner: str = "meshguard-denials",
) -> dict[str, Any]:  # fmt: skip
    return {"metadata": {"namespace": namespace, "name": name,
                         "labels": {"app.kubernetes.io/component": component},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": owner, "controller": True}]},
            "spec": {"nodeName": node, "containers": [
                {"ports": [{"name": "metrics", "containerPort": 9103}]}]},
            "status": {"phase": phase}}  # fmt: skip


def test_the_agent_is_the_running_one_on_the_pods_node():
    pods = [agent("a", "n1"), agent("b", "n2", "Pending"), agent("c", "n2")]
    assert agent_on(pods, node="n2", namespace="meshguard-system") == ("meshguard-system", "c",
                                                                      9103)  # fmt: skip
    assert agent_on(pods, node="n3", namespace="meshguard-system") is None
    cni = agent("cni", "n4", component="cni", owner="meshguard-cni-node")
    assert agent_on([cni], node="n4", namespace="meshguard-system") is not None


def _owned_by(owner: dict[str, Any]) -> dict[str, Any]:
    pod = agent("x", "n1")
    pod["metadata"]["ownerReferences"] = [owner]
    return pod


@pytest.mark.parametrize(
    "pod",
    [
        agent("x", "n1", namespace="shop"),  # the labels, owner and port copied elsewhere
        agent("x", "n1", owner="meshguard-cni-node"),  # another component's DaemonSet
        agent("x", "n1", component="webhook", owner="meshguard-webhook"),
        _owned_by({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "meshguard-denials"}),
        _owned_by({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "meshguard-denials",
                   "controller": True}),
        _owned_by({"apiVersion": "v1", "kind": "DaemonSet", "name": "meshguard-denials",
                   "controller": True}),
        _owned_by("meshguard-denials"),  # type: ignore[arg-type]
    ],
    ids=["other-namespace", "other-component-daemonset", "not-an-agent", "not-controller",
         "replicaset", "other-group", "malformed"],
)  # fmt: skip
def test_only_meshguards_own_agents_are_chosen(pod: dict[str, Any]) -> None:
    """A pod in another namespace, or in meshguard's without the controller a DaemonSet of
    the chart's gives its agents, is never the agent (whatever its labels and port)."""
    assert agent_on([pod], node="n1", namespace="meshguard-system") is None
    real = agent("real", "n1")
    assert agent_on([copy.deepcopy(pod), real], node="n1", namespace="meshguard-system") == (
        "meshguard-system", "real", 9103)  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--recent-denials"], "--recent-denials cannot be combined with it"),
        (["--recent-denials", "--meshguard-namespace", "ns"], "--meshguard-namespace cannot"),
        (["--meshguard-namespace", "ns"], "give both"),
    ],
)
def test_where_denials_are_read_is_checked(
    flags: list[str], problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With -f, or without --recent-denials, the flags would be ignored: refused instead."""
    (tmp_path / "pods.yaml").write_text("{}\n")
    assert main(["describe", "-f", str(tmp_path / "pods.yaml"), *flags]) == 2
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize("name", ["Meshguard", "-x", "a_b", "a" * 64, ""])
def test_a_namespace_that_cannot_be_one_is_refused(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["describe", "--recent-denials", f"--meshguard-namespace={name}"])
    assert exited.value.code == 2
    assert "is not a namespace name (a DNS-1123 label" in capsys.readouterr().err


def test_the_description_shows_them_in_words_and_in_its_document():
    recent = parse_agent_answer(
        json.dumps({"denials": [{**DENIAL.__dict__, "time": 1.5}]}).encode(), agent="ns/agent"
    )
    description = PodDescription(
        pod=PodRef(kind="Pod", namespace="demo", name="shop"),
        protection=Protection.PROTECTED,
        recent_denials=recent,
    )
    assert text_lines(description)[-2:] == [
        "recent denials (from node agent ns/agent, newest last):",
        "  cache -> app 8080/tcp: denied",
    ]
    assert description.as_data()["recentDenials"] == {
        "origin": "agent", "agent": "ns/agent",
        "denials": [{"source": "cache", "destination": "app", "port": 8080, "protocol": "tcp",
                     "verdict": "denied", "uid": 1002, "time": 1.5}],
    }  # fmt: skip
