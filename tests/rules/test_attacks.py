"""Escape attempts from inside a container, against the real kernel, after meshguard-init.

A container whose capabilities the webhook dropped (every non-root uid here has none) can
neither open raw sockets (to forge packets of established flows), nor change the rules, nor
become the proxy; neither can root once its bounding set lacks those capabilities. In each
backend Istio's capture can be in: the rules attacked are where meshguard-init put them.
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
from tests.support.netfilter import NETFILTERS, Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox, Server, compile_for, own_lines, pod_sandbox

pytestmark = pytest.mark.root

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
APP = Server("app", 1000, 1000, tcp=(8080,))
PROXY = Server("proxy", 1337, 1337, tcp=(15000,))
ESCAPES = [{"attack": "raw-socket"}, {"attack": "setuid", "uid": 1337}]


def iptables_tampering(tool: str) -> list[dict[str, object]]:
    return [
        {"attack": "iptables", "tool": tool, "args": args}
        for args in (["-F", "MESHGUARD_OUTPUT"], ["-I", "OUTPUT", "1", "-j", "ACCEPT"])
    ]


#: Changing meshguard's rules where they are, per backend.
TAMPERING = {
    Netfilter.IPTABLES_NFT: iptables_tampering("iptables-nft"),
    Netfilter.IPTABLES_LEGACY: iptables_tampering("iptables-legacy"),
    Netfilter.NFTABLES: [
        {"attack": "nft", "args": args}
        for args in (
            ["flush", "chain", "inet", "meshguard", "MESHGUARD_OUTPUT"],
            ["insert", "rule", "inet", "meshguard", "filter_output", "accept"],
            ["delete", "table", "inet", "meshguard"],
        )
    ],
}
#: What the webhook drops from a root container (posture fix), as a bounding set.
DROPPED = "-net_admin,-net_raw,-setuid,-setgid,-sys_admin,-sys_ptrace"


@pytest.fixture(params=NETFILTERS, ids=str)
def box(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PodSandbox]:
    netfilter: Netfilter = request.param
    ruleset = compile_for(pod_for(yaml.safe_load(EXAMPLE.read_text()), netfilter))
    nft = matrix_capture_nft() if netfilter is Netfilter.NFTABLES else None
    with pod_sandbox(
        ruleset,
        tmp_path,
        istio={Family.IPV4: "ipnets.golden"},
        netfilter=netfilter,
        istio_nft=nft,
    ) as sandbox:
        sandbox.serve(APP)
        sandbox.serve(PROXY)
        yield sandbox


def attacks(box: PodSandbox) -> list[dict[str, object]]:
    return [*ESCAPES, *TAMPERING[box.netfilter]]


def test_a_container_uid_can_neither_forge_packets_nor_touch_rules_nor_become_the_proxy(box):
    before = own_lines(box.save(Family.IPV4))
    assert before
    results = box.probe(uid=1000, gid=1000, targets=attacks(box))
    assert [r["result"] for r in results] == ["deny"] * len(attacks(box)), results
    assert own_lines(box.save(Family.IPV4)) == before
    # ... and its loopback access is still exactly its policy's.
    reach = box.probe(uid=1000, gid=1000, targets=[{"host": "127.0.0.1", "port": 15000}])
    assert reach[0]["result"] == "deny"


def test_root_without_the_dropped_capabilities_cannot_either(box):
    argv = ["setpriv", f"--bounding-set={DROPPED}", f"--inh-caps={DROPPED}",
            *probe_command(uid=0, gid=0)]  # fmt: skip
    results = json.loads(box.ns.run(argv, stdin=json.dumps(attacks(box))))
    assert [r["result"] for r in results] == ["deny"] * len(attacks(box)), results


def test_the_attacks_work_with_the_capabilities_so_the_denials_above_mean_something(box):
    before = own_lines(box.save(Family.IPV4))
    results = json.loads(box.ns.run(probe_command(uid=0, gid=0), stdin=json.dumps(attacks(box))))
    assert [r["result"] for r in results] == ["allow"] * len(attacks(box)), results
    assert own_lines(box.save(Family.IPV4)) != before  # the tampering did tamper
