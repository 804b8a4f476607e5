"""Escape attempts from inside a container, against the real kernel, after meshguard-init.

A container whose capabilities the webhook dropped (every non-root uid here has none) can
neither open raw sockets (to forge packets of established flows), nor change the rules, nor
become the proxy; neither can root once its bounding set lacks those capabilities.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import meshguard
from meshguard.rules.ruleset import Family
from meshguard.sandbox.netns import probe_command
from tests.support.podns import PodSandbox, Server, compile_for, own_lines, pod_sandbox

pytestmark = pytest.mark.root

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
APP = Server("app", 1000, 1000, tcp=(8080,))
PROXY = Server("proxy", 1337, 1337, tcp=(15000,))
ATTACKS = [
    {"attack": "raw-socket"},
    {"attack": "setuid", "uid": 1337},
    {"attack": "iptables", "args": ["-F", "MESHGUARD_OUTPUT"]},
    {"attack": "iptables", "args": ["-I", "OUTPUT", "1", "-j", "ACCEPT"]},
]
#: What the webhook drops from a root container (posture fix), as a bounding set.
DROPPED = "-net_admin,-net_raw,-setuid,-setgid,-sys_admin,-sys_ptrace"


@pytest.fixture
def box(tmp_path: Path) -> Iterator[PodSandbox]:
    ruleset = compile_for(yaml.safe_load(EXAMPLE.read_text()))
    with pod_sandbox(ruleset, tmp_path, istio={Family.IPV4: "ipnets.golden"}) as sandbox:
        sandbox.serve(APP)
        sandbox.serve(PROXY)
        yield sandbox


def test_a_container_uid_can_neither_forge_packets_nor_touch_rules_nor_become_the_proxy(box):
    before = own_lines(box.save(Family.IPV4))
    results = box.probe(uid=1000, gid=1000, targets=ATTACKS)
    assert [r["result"] for r in results] == ["deny"] * len(ATTACKS), results
    assert own_lines(box.save(Family.IPV4)) == before
    # ... and its loopback access is still exactly its policy's.
    reach = box.probe(uid=1000, gid=1000, targets=[{"host": "127.0.0.1", "port": 15000}])
    assert reach[0]["result"] == "deny"


def test_root_without_the_dropped_capabilities_cannot_either(box):
    argv = ["setpriv", f"--bounding-set={DROPPED}", f"--inh-caps={DROPPED}",
            *probe_command(uid=0, gid=0)]  # fmt: skip
    results = json.loads(box.ns.run(argv, stdin=json.dumps(ATTACKS)))
    assert [r["result"] for r in results] == ["deny"] * len(ATTACKS), results


def test_the_attacks_work_with_the_capabilities_so_the_denials_above_mean_something(box):
    results = json.loads(box.ns.run(probe_command(uid=0, gid=0), stdin=json.dumps(ATTACKS[:2])))
    assert [r["result"] for r in results] == ["allow", "allow"]
