"""The prober's wire format: what an echo server's reply becomes, and bad targets refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meshguard.errors import UsageError
from meshguard.sandbox.netns import NetworkNamespace, probe_command, serve_http_command
from meshguard.sandbox.probe import _echo_reply, _landing


def test_an_echo_reply_says_where_the_flow_landed() -> None:
    line = json.dumps({"server": "app", "port": 8080, "peer": "127.0.0.6"})
    assert _landing(line.encode() + b"\nmore") == {
        "result": "allow",
        "server": "app",
        "port": 8080,
        "peer": "127.0.0.6",
    }


def test_an_http_echo_reply_keeps_method_path_and_meshguard_headers() -> None:
    line = json.dumps(
        {"server": "app", "port": 9090, "method": "GET", "path": "/api/x",
         "peer": "127.0.0.1", "meshguard_headers": ["x-meshguard-source"]}
    )  # fmt: skip
    assert _echo_reply(line) == {
        "result": "allow", "server": "app", "port": 9090, "peer": "127.0.0.1",
        "method": "GET", "path": "/api/x", "meshguard_headers": ["x-meshguard-source"],
    }  # fmt: skip


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 200 OK\r\n", b'["server"]', b"5", b"\xff\xfe"],
)
def test_an_answer_that_is_not_a_json_object_is_raw_bytes(reply: bytes) -> None:
    assert _landing(reply) == {"result": "allow", "raw_bytes": len(reply)}


def test_another_json_document_passes_through_and_cannot_change_the_result() -> None:
    reply = _echo_reply(json.dumps({"stats": [{"name": "x", "value": 1}], "result": "deny"}))
    assert reply == {"result": "allow", "stats": [{"name": "x", "value": 1}]}


def test_no_answer_is_a_deny() -> None:
    assert _landing(b"") == {"result": "deny", "errno": "EOF"}


@pytest.mark.parametrize("stdin", ['{"host": "127.0.0.1"}', "[1, 2]", '["x"]'])
def test_targets_that_are_not_a_list_of_objects_are_refused(stdin: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshguard.sandbox.probe", "probe",
         "--uid", str(os.getuid()), "--gid", str(os.getgid()),
         "--groups", ",".join(map(str, os.getgroups()))],
        input=stdin, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "stdin must be a JSON list of target objects" in done.stderr
    assert done.stdout == ""


@pytest.mark.root
def test_an_http_echo_server_answers_403_to_its_forbidden_prefixes_only() -> None:
    """``--forbid``: an app's own 403 (the same echo body), for upstream-403 tests."""
    paths = ["/api/forbidden", "/api/forbidden/x?q=1", "/admin", "/api/x", "/", "/x/admin"]
    targets = [
        {"protocol": "http", "host": host, "port": 8080, "path": path}
        for host in ("127.0.0.1", "::1")
        for path in paths
    ]
    with NetworkNamespace() as ns:
        ns.spawn(
            serve_http_command(name="app", uid=1000, gid=1000, ports=[8080],
                               forbid=["/api/forbidden", "/admin"]),
            ready_line="ready",
        )  # fmt: skip
        results = json.loads(ns.run(probe_command(uid=1000, gid=1000), stdin=json.dumps(targets)))
    assert [r["status"] for r in results] == [403, 403, 403, 200, 200, 200] * 2, results
    for target, result in zip(targets, results, strict=True):
        body = json.loads(result["body"]) if result["status"] == 403 else result
        assert (body["server"], body["path"]) == ("app", target["path"]), result


@pytest.mark.parametrize("forbid", [["api"], [""], ["/a,/b"]])
def test_a_forbidden_prefix_that_is_not_a_path_is_refused(forbid: list[str]) -> None:
    with pytest.raises(UsageError, match="path prefixes start with /"):
        serve_http_command(name="app", uid=1000, gid=1000, ports=[8080], forbid=forbid)
