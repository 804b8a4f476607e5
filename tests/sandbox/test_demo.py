"""``meshguard demo`` for real: every flow as the policy says, JSON output, cleanup, with
Istio's capture in each backend (iptables-nft, iptables-legacy, native nftables)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root

BACKENDS = ["iptables-nft", "iptables-legacy", "nftables"]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("meshguard-")}


def demo(*args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "meshguard", "demo", *args],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_json_every_flow_as_the_policy_says_and_nothing_left_behind(backend):
    done = demo("--output", "json", "--backend", backend)
    assert done.returncode == 0, done.stderr[-2000:]
    # meshguard-init found Istio's backend by itself, twice (enforce, then audit mode).
    assert re.findall(r"\((?:enforce|audit) mode\) in (.+)", done.stderr) == [backend] * 2
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
    # Its own namespace is gone (other runs on this machine may add or remove theirs).
    (sandbox,) = re.findall(r"network namespace (meshguard-\w+)", done.stderr)
    assert sandbox not in namespaces()


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_text_shows_progress_and_the_matrix_within_80_columns(backend):
    done = demo("--backend", backend, columns=80)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "meshguard-init installed ruleset sha256:" in done.stderr
    assert f"Istio's capture in {backend}" in done.stdout
    lines = done.stdout.splitlines()
    titles = [line.rstrip() for line in lines if line.startswith("Loopback connectivity")]
    assert titles == ["Loopback connectivity, ipv4", "Loopback connectivity, ipv6"]  # not split
    assert "15000" in done.stdout and "15090" in done.stdout
    assert "flows tried: all as the policy says" in done.stdout
    assert max(len(line) for line in lines) <= 80
    assert not any("…" in line for line in lines)


def test_ctrl_c_with_keep_removes_the_sandbox():
    process = subprocess.Popen(
        [sys.executable, "-m", "meshguard", "demo", "--keep"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sandbox = ""
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 240
        for line in process.stderr:
            sandbox = sandbox or "".join(re.findall(r"network namespace (meshguard-\w+)", line))
            if "sandbox kept" in line or time.monotonic() > deadline:
                break
        assert sandbox in namespaces(), "the sandbox should be up while kept"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert sandbox not in namespaces()
