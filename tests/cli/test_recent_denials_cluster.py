"""``kubectl meshguard describe --recent-denials`` against a scripted API server over real
HTTPS, through the official client: the agent pod on the described pod's node is found in
meshguard's namespace by the chart's labels and DaemonSet, its ``/denials`` read through the
API server's pod proxy (forwarded to a local HTTP server answering as the agent does), and
shown in words and in the document; a look-alike agent in another namespace is never asked;
without an agent, only the agent's Events are read, as advisory; a pod on a node without an
agent says why nothing could be read."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard.cni.denials import Denial
from meshguard.cni.events import event_object
from tests.cli.test_kubectl_plugin import (  # noqa: F401 - the fixtures
    _installed,
    admitted,
    api,
    example_pod,
    kubeconfig,
    plugin,
)
from tests.support.apiserver import ScriptedApiServer

ANSWER = {"namespace": "shop", "pod": "served", "denials": [
    {"event": "loopback-denial", "namespace": "shop", "pod": "served", "source": "cache",
     "destination": "app", "port": 8080, "protocol": "tcp", "family": "ipv4",
     "verdict": "denied", "uid": 1002, "time": 1.5}]}  # fmt: skip


#: What a look-alike agent answers: a denial that never happened.
FORGED = {"denials": [{"source": "app", "destination": "db-admin", "port": 5432,
                       "protocol": "tcp", "verdict": "denied"}]}  # fmt: skip


@contextlib.contextmanager
def agent_http(answer: dict[str, Any] = ANSWER) -> Iterator[tuple[int, list[str]]]:
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()


def agent_pod(node: str, namespace: str = "meshguard-system") -> dict[str, Any]:
    """A pod of the chart's ``meshguard-denials`` DaemonSet (or a copy of one's labels,
    owner and port in ``namespace``: what anyone who may create pods there can make)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": f"meshguard-denials-{node}", "labels": {
            "app.kubernetes.io/name": "meshguard", "app.kubernetes.io/component": "denials"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                 "name": "meshguard-denials", "uid": "1", "controller": True}]},
        "spec": {"nodeName": node, "containers": [{"name": "denials", "image": "x", "ports": [
            {"name": "metrics", "containerPort": 9103}]}]},
        "status": {"phase": "Running"},
    }  # fmt: skip


def proxied(server: ScriptedApiServer) -> list[str]:
    """The pods the client asked the API server's pod proxy for (``namespace/pod:port``)."""
    return sorted(
        urllib.parse.unquote("/".join(r.path.split("/")[4:7:2]))
        for r in server.requests
        if "/proxy/" in r.path
    )


@pytest.fixture
def served(api: ScriptedApiServer) -> None:  # noqa: F811 - the fixture
    for name, node in (("served", "n1"), ("elsewhere-node", "n2")):
        pod = admitted(example_pod(name, "shop", app="shop"))
        pod["spec"]["nodeName"] = node
        api.put(pod)
    api.put(agent_pod("n1", namespace="shop"))  # a look-alike, listed before the agent
    api.put(agent_pod("n1"))


def describe_recent(pod: str, *, config: Path) -> tuple[dict[str, Any], str]:
    """``describe pod POD --recent-denials`` in namespace shop: its JSON and its text."""
    done = plugin("describe", "pod", pod, "-n", "shop", "-o", "json", "--recent-denials",
                  kubeconfig=config)  # fmt: skip
    text = plugin("describe", "pod", pod, "-n", "shop", "--recent-denials", kubeconfig=config)
    assert done.returncode == 0, done.stderr
    assert text.returncode == 0, text.stderr
    (data,) = [json.loads(line) for line in done.stdout.splitlines()]
    return data, text.stdout


@pytest.mark.usefixtures("served")
def test_describe_shows_the_node_agents_recent_denials(
    api: ScriptedApiServer,  # noqa: F811
    kubeconfig: Path,  # noqa: F811
) -> None:
    with agent_http() as (port, asked):
        api.proxied["meshguard-system/meshguard-denials-n1:9103"] = f"http://127.0.0.1:{port}"
        data, text = describe_recent("served", config=kubeconfig)
    assert data["recentDenials"] == {
        "origin": "agent", "agent": "meshguard-system/meshguard-denials-n1",
        "denials": [{"source": "cache", "destination": "app", "port": 8080, "protocol": "tcp",
                     "verdict": "denied", "uid": 1002, "time": 1.5}],
    }  # fmt: skip
    assert asked[0] == "/denials?namespace=shop&pod=served"
    assert "recent denials (from node agent meshguard-system/meshguard-denials-n1" in text
    assert "  cache -> app 8080/tcp: denied" in text
    assert set(proxied(api)) == {"meshguard-system/meshguard-denials-n1:9103"}
    without = plugin("describe", "pod", "served", "-n", "shop", "-o", "json",
                     kubeconfig=kubeconfig)  # fmt: skip
    assert "recentDenials" not in json.loads(without.stdout)  # only when asked


@pytest.mark.usefixtures("served")
def test_a_pod_whose_node_has_no_agent_says_why_there_is_nothing(
    kubeconfig: Path,  # noqa: F811
) -> None:
    done = plugin("describe", "pod", "elsewhere-node", "-n", "shop", "--recent-denials",
                  kubeconfig=kubeconfig)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "recent denials: not available (" in done.stdout


@pytest.mark.usefixtures("served")
def test_a_look_alike_agent_in_another_namespace_is_never_asked(
    api: ScriptedApiServer,  # noqa: F811
    kubeconfig: Path,  # noqa: F811
) -> None:
    """Labels, port and even the DaemonSet owner can be copied by anyone who may create pods
    in some namespace; on a node where meshguard's own agent does not run (n2), such a pod
    must not be asked, and its denials must not be shown."""
    api.put(agent_pod("n2", namespace="shop"))
    with agent_http(FORGED) as (port, asked):
        api.proxied["shop/meshguard-denials-n2:9103"] = f"http://127.0.0.1:{port}"
        done = plugin("describe", "pod", "elsewhere-node", "-n", "shop", "-o", "json",
                      "--recent-denials", kubeconfig=kubeconfig)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert asked == [] and proxied(api) == []
    (data,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert data["recentDenials"]["error"].startswith(  # and no Events served
        "no agent of meshguard's (namespace meshguard-system) runs on node n2; the pod's events"
    )
    assert "db-admin" not in done.stdout
    agent_lists = [r for r in api.requests if r.query.get("labelSelector")]
    assert {r.path for r in agent_lists} == {"/api/v1/namespaces/meshguard-system/pods"}


@pytest.mark.usefixtures("served")
def test_the_agents_namespace_is_the_one_named(
    api: ScriptedApiServer,  # noqa: F811
    kubeconfig: Path,  # noqa: F811
) -> None:
    """Installed elsewhere (``helm install -n security``): ``--meshguard-namespace security``
    asks the agent there, and the default namespace's look-alike is not asked then."""
    api.put(agent_pod("n2", namespace="security"))
    api.put(agent_pod("n2"))  # not meshguard's when meshguard is in "security"
    with agent_http() as (port, asked), agent_http(FORGED) as (forged_port, forged_asked):
        api.proxied["security/meshguard-denials-n2:9103"] = f"http://127.0.0.1:{port}"
        api.proxied["meshguard-system/meshguard-denials-n2:9103"] = (
            f"http://127.0.0.1:{forged_port}"
        )
        done = plugin("describe", "pod", "elsewhere-node", "-n", "shop", "-o", "json",
                      "--recent-denials", "--meshguard-namespace", "security",
                      kubeconfig=kubeconfig)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (data,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert data["recentDenials"]["agent"] == "security/meshguard-denials-n2"
    assert len(asked) == 1 and forged_asked == []


def _event(pod: str, **changes: Any) -> dict[str, Any]:
    denial = Denial(namespace="shop", pod=pod, source="cache", destination="app", port=8080,
                    protocol="tcp", family="ipv4", verdict="would-deny", uid=1002)  # fmt: skip
    event = event_object(denial, suppressed=0, component="meshguard-node-agent", now=0.0)
    event["metadata"] = {"namespace": "shop", "name": f"{pod}.{len(changes)}"}
    return {**event, **changes}


@pytest.mark.usefixtures("served")
def test_without_an_agent_only_the_agents_events_are_read_and_called_advisory(
    api: ScriptedApiServer,  # noqa: F811
    kubeconfig: Path,  # noqa: F811
) -> None:
    """Anyone who may create Events in the pod's namespace can post one with the agent's
    reason; one naming another reporter (or none) is not read, and what is read is labelled
    as the pod's Events, advisory."""
    forged = "meshguard denied app -> db-admin port 5432 tcp"
    api.events = [
        _event("elsewhere-node"),
        _event("elsewhere-node", source={"component": "kubectl"}, reason="LoopbackDenied",
               message=forged),
        _event("elsewhere-node", source={}, reportingComponent="", reason="LoopbackDenied",
               message=forged),
        _event("elsewhere-node", reportingComponent="someone", reason="LoopbackDenied",
               message=forged),
    ]  # fmt: skip
    data, text = describe_recent("elsewhere-node", config=kubeconfig)
    assert data["recentDenials"] == {
        "origin": "events",
        "fallback": "no agent of meshguard's (namespace meshguard-system) runs on node n2",
        "denials": [{"source": "cache", "destination": "app", "port": 8080, "protocol": "tcp",
                     "verdict": "would-deny"}],
    }  # fmt: skip
    assert "db-admin" not in text
    assert [line.removeprefix("  ") for line in text.splitlines()[-3:]] == [
        "recent denials (from the pod's events, newest last):",
        "  cache -> app 8080/tcp: would-deny",
        "  (advisory: anyone who may create events in the pod's namespace can write them; read"
        " because no agent of meshguard's (namespace meshguard-system) runs on node n2)",
    ]


@pytest.mark.usefixtures("served")
def test_without_rbac_in_meshguards_namespace_the_events_are_read(
    api: ScriptedApiServer,  # noqa: F811
    kubeconfig: Path,  # noqa: F811
) -> None:
    """Whoever may not list meshguard's pods still gets the pod's Events, told why; the
    refused listing is asked once, not once per pod."""
    api.script.forbidden.add("/api/v1/namespaces/meshguard-system/pods")
    api.events = [_event("served"), _event("elsewhere-node")]
    done = plugin("describe", "pod", "served", "elsewhere-node", "-n", "shop", "-o", "json",
                  "--recent-denials", kubeconfig=kubeconfig)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for data in (json.loads(line) for line in done.stdout.splitlines()):
        recent = data["recentDenials"]
        assert recent["origin"] == "events" and len(recent["denials"]) == 1
        assert recent["fallback"].startswith(
            "meshguard's agents in namespace meshguard-system cannot be listed: Error from"
            " server (Forbidden)"
        )
    agent_lists = [r for r in api.requests if r.path.endswith("/meshguard-system/pods")]
    assert len(agent_lists) == 1 and proxied(api) == []
