"""``kubectl meshguard describe --recent-denials`` against a scripted API server over real
HTTPS, through the official client: the agent pod on the described pod's node is found by
the chart's labels, its ``/denials`` read through the API server's pod proxy (forwarded to
a local HTTP server answering as the agent does), and shown in words and in the document;
a pod on a node without an agent says why nothing could be read."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


@contextlib.contextmanager
def agent_http() -> Iterator[tuple[int, list[str]]]:
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps(ANSWER).encode()
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


def agent_pod(node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "meshguard", "name": f"meshguard-denials-{node}", "labels": {
            "app.kubernetes.io/name": "meshguard", "app.kubernetes.io/component": "denials"}},
        "spec": {"nodeName": node, "containers": [{"name": "denials", "image": "x", "ports": [
            {"name": "metrics", "containerPort": 9103}]}]},
        "status": {"phase": "Running"},
    }  # fmt: skip


@pytest.fixture
def served(api: ScriptedApiServer) -> None:  # noqa: F811 - the fixture
    for name, node in (("served", "n1"), ("elsewhere-node", "n2")):
        pod = admitted(example_pod(name, "shop", app="shop"))
        pod["spec"]["nodeName"] = node
        api.put(pod)
    api.put(agent_pod("n1"))


@pytest.mark.usefixtures("served")
def test_describe_shows_the_node_agents_recent_denials(
    api: ScriptedApiServer,  # noqa: F811
    kubeconfig: Path,  # noqa: F811
) -> None:
    with agent_http() as (port, asked):
        api.proxied["meshguard/meshguard-denials-n1:9103"] = f"http://127.0.0.1:{port}"
        done = plugin("describe", "pod", "served", "-n", "shop", "-o", "json",
                      "--recent-denials", kubeconfig=kubeconfig)  # fmt: skip
        text = plugin("describe", "pod", "served", "-n", "shop", "--recent-denials",
                      kubeconfig=kubeconfig)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (data,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert data["recentDenials"] == {
        "origin": "agent", "agent": "meshguard/meshguard-denials-n1",
        "denials": [{"source": "cache", "destination": "app", "port": 8080, "protocol": "tcp",
                     "verdict": "denied", "uid": 1002, "time": 1.5}],
    }  # fmt: skip
    assert asked[0] == "/denials?namespace=shop&pod=served"
    assert "  cache -> app 8080/tcp: denied" in text.stdout
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
