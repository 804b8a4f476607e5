"""``meshguard demo`` for real: every flow as the policy says, JSON output, cleanup."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("meshguard-")}


def test_demo_json_every_flow_as_the_policy_says_and_nothing_left_behind():
    before = namespaces()
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "demo", "--output", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    flows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(flows) > 100
    for flow in flows:
        assert set(flow) >= {"from", "to", "port", "protocol", "family", "expected", "observed"}
        assert flow["observed"] == flow["expected"], flow
    assert {f["kind"] for f in flows} == {"l4", "l7", "mesh", "audit", "broadcast"}
    assert {f["family"] for f in flows} == {"ipv4", "ipv6"}
    assert {f["protocol"] for f in flows} == {"tcp", "udp", "http"}
    assert any(f["expected"] == "deny" for f in flows) and any(
        f["expected"] == "allow" for f in flows
    )
    http = next(f for f in flows if f["protocol"] == "http")
    assert {"method", "path"} <= set(http)
    assert namespaces() == before


def test_demo_text_shows_progress_and_the_matrix():
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "meshguard-init installed ruleset sha256:" in done.stderr
    assert "Loopback connectivity, ipv4" in done.stdout
    assert "flows tried: all as the policy says" in done.stdout


def test_ctrl_c_with_keep_removes_the_sandbox():
    before = namespaces()
    process = subprocess.Popen(
        [sys.executable, "-m", "meshguard", "demo", "--keep"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 240
        for line in process.stderr:
            if "sandbox kept" in line or time.monotonic() > deadline:
                break
        assert namespaces() - before, "the sandbox should be up while kept"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert namespaces() == before
