"""``describe --recent-denials`` (meshguard/recent_denials.py): the agent's answer and the
pod's Events read into ``recentDenials``, anything else an error (never denials); the agent
of the pod's node chosen; the description's text and JSON carry them. (The agent's real
``/denials`` answer is read in tests/cni/test_node_denials.py.)"""

from __future__ import annotations

import json

import pytest

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


def test_the_agent_is_the_running_one_on_the_pods_node():
    def agent(name: str, node: str, phase: str = "Running") -> dict[str, object]:
        return {"metadata": {"namespace": "meshguard", "name": name,
                             "labels": {"app.kubernetes.io/component": "denials"}},
                "spec": {"nodeName": node, "containers": [
                    {"ports": [{"name": "metrics", "containerPort": 9103}]}]},
                "status": {"phase": phase}}  # fmt: skip

    pods = [agent("a", "n1"), agent("b", "n2", "Pending"), agent("c", "n2")]
    assert agent_on(pods, node="n2") == ("meshguard", "c", 9103)
    assert agent_on(pods, node="n3") is None


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
