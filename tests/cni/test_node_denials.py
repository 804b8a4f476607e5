"""The node agent's denial watch for pods in init-container mode (issue 26 item 2), end to end.

A pod admitted (and signed) by meshguard's real injection in init-container mode; its rules
installed by the real ``meshguard init`` beside Istio's real capture in a network namespace,
in each of the three backends; a process of the pod in that namespace and in a cgroup named
as the kubelet names a pod's (``kubepods/burstable/pod<uid>/<container>``). The agent's
:class:`~meshguard.cni.node_watch.NodePods` finds the namespace from /proc by the pod's UID
(no CNI call), verifies the admitted record, binds NFLOG there; a connection the policy
denies becomes one JSON line (source and destination container from the verified record)
and a counter series; ``GET /denials`` serves it for ``meshguard describe``. A pod whose
record was edited after admission is not watched; a pod gone from the node's list is
unwatched.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard import annotation_keys
from meshguard.attestation import TrustedKeys
from meshguard.cni import podnetns
from meshguard.cni.denials import Denial
from meshguard.cni.events import event_object
from meshguard.cni.kube import KeptAlive
from meshguard.cni.node_watch import NodePods
from meshguard.cni.watch import DenialWatch, serving_metrics
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.recent_denials import parse_agent_answer, text_lines
from meshguard.rules.ruleset import Family, Ruleset
from tests.support.keys import SIGNER
from tests.support.matrix import CACHE, SERVERS, example_pod
from tests.support.netfilter import NETFILTERS, Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox, pod_sandbox

CGROUP_ROOTS = (
    Path("/sys/fs/cgroup/systemd"),
    Path("/sys/fs/cgroup/unified"),
    Path("/sys/fs/cgroup"),
)
DENIED = {"host": "127.0.0.1", "port": 8080, "protocol": "tcp", "timeout": 1.0}


@pytest.mark.parametrize(
    ("cgroup", "uid"),
    [
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12345678_1234_"
            "1234_1234_123456789abc.slice/cri-containerd-ab12.scope\n",
            "12345678-1234-1234-1234-123456789abc",
        ),
        (
            "12:memory:/kubepods/besteffort/pod12345678-1234-1234-1234-123456789abc/ab12\n",
            "12345678-1234-1234-1234-123456789abc",
        ),
        ("0::/system.slice/containerd.service\n", None),
        ("0::/user.slice/podman-123.scope\n", None),
    ],
)
def test_a_processs_cgroup_names_its_pod(cgroup: str, uid: str | None) -> None:
    assert podnetns.pod_uid_of(cgroup) == uid


def admitted(netfilter: Netfilter, *, uid: str, mode: str = "enforce") -> dict[str, Any]:
    pod: dict[str, Any] = pod_for(example_pod(), netfilter)
    pod["metadata"].update(namespace="demo", name="shop", uid=uid)
    pod["metadata"]["annotations"]["meshguard.io/mode"] = mode
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def _cgroup_root() -> Path:
    for root in CGROUP_ROOTS:
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    pytest.skip("no writable cgroup hierarchy to place a pod's process in")


@pytest.fixture
def pod_process() -> Iterator[Any]:
    """Start a process in a namespace, in the cgroup the kubelet gives pod ``uid``."""
    made: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(box: PodSandbox, uid: str) -> None:
        directory = _cgroup_root() / "kubepods" / "burstable" / f"pod{uid}" / "pause"
        directory.mkdir(parents=True)
        process = subprocess.Popen(box.ns.argv(["sleep", "600"]))
        made.append((process, directory))
        (directory / "cgroup.procs").write_text(str(process.pid))

    yield start
    for process, directory in made:
        process.kill()
        process.wait()
        # the pause cgroup, the pod's, then kubepods/burstable and kubepods if left empty
        for path in (directory, *list(directory.parents)[:3]):
            for _ in range(20):  # bounded: the killed process leaves its cgroup shortly
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.fields  # type: ignore[attr-defined]
        for record in caplog.records
        if getattr(record, "fields", {}).get("event") == "loopback-denial"
    ]


@pytest.mark.root
@pytest.mark.parametrize(
    ("mode", "result", "verdict"), [("enforce", "deny", "denied"), ("audit", "allow", "would-deny")]
)
@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_an_init_container_mode_pods_denial_becomes_a_json_line_and_a_counter(
    tmp_path: Path,
    netfilter: Netfilter,
    mode: str,
    result: str,
    verdict: str,
    pod_process: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uid = str(uuid.uuid4())
    pod = admitted(netfilter, uid=uid, mode=mode)
    ruleset = Ruleset.from_json(pod["metadata"]["annotations"][annotation_keys.RULESET])
    istio = {Family.IPV4: "ipnets.golden", Family.IPV6: "ipv6-outbound-ports.golden"}
    nft = matrix_capture_nft() if netfilter is Netfilter.NFTABLES else None
    caplog.set_level(logging.INFO, logger="meshguard.cni.watch")
    with pod_sandbox(ruleset, tmp_path, istio=istio, netfilter=netfilter, istio_nft=nft) as box:
        for server in SERVERS:
            box.serve(server)
        pod_process(box, uid)
        watch = DenialWatch(connections=KeptAlive())
        try:
            node = NodePods(
                watch=watch, trusted=TrustedKeys.from_pem(SIGNER.public_pem(), origin="test")
            )
            # a copy whose record was edited after admission (cache claims app's uid) is
            # refused: the labels come from the verified record only
            edited = copy.deepcopy(pod)
            status = json.loads(edited["metadata"]["annotations"][annotation_keys.STATUS])
            status["containers"]["cache"] = 1000
            edited["metadata"]["annotations"][annotation_keys.STATUS] = json.dumps(status)
            assert node.sync([edited]) == set()
            assert node.sync([pod]) == {uid}
            with serving_metrics(watch.counters, port=0, watch=watch) as port:
                results = box.probe(uid=CACHE.uid, gid=CACHE.gid, targets=[DENIED])
                for _ in range(100):  # bounded: the reader polls every 0.5 s
                    if records(caplog):
                        break
                    time.sleep(0.05)
                metrics = _get(port, "/metrics")
                answer = _get(port, "/denials?namespace=demo&pod=shop")
            assert [r["result"] for r in results] == [result]
            (line, *_) = records(caplog)
            assert {k: line[k] for k in ("namespace", "pod", "source", "destination", "port",
                                         "protocol", "verdict", "uid")} == {
                "namespace": "demo", "pod": "shop", "source": "cache", "destination": "app",
                "port": 8080, "protocol": "tcp", "verdict": verdict, "uid": CACHE.uid,
            }  # fmt: skip
            assert (
                'meshguard_loopback_denials_total{namespace="demo",pod="shop",source="cache",'
                f'destination="app",verdict="{verdict}"}} 1'
            ) in metrics
            assert [d["destination"] for d in json.loads(answer)["denials"]] == ["app"]
            # what `meshguard describe --recent-denials` makes of the agent's answer
            recent = parse_agent_answer(answer.encode(), agent="meshguard/denials-x")
            assert text_lines(recent) == [
                "recent denials (from node agent meshguard/denials-x, newest last):",
                f"  cache -> app 8080/tcp: {verdict}",
            ]
            assert node.sync([]) == set()  # gone from the node: unwatched, series forgotten
            assert 'pod="shop"' not in watch.counters.exposition()
        finally:
            watch.close()


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return str(answer.read().decode())


def test_a_denial_event_names_the_pod_and_what_was_denied() -> None:
    denial = Denial(namespace="demo", pod="shop", source="cache", destination="app", port=8080,
                    protocol="tcp", family="ipv4", verdict="would-deny", uid=1002)  # fmt: skip
    event = event_object(denial, suppressed=3, component="meshguard-node-agent", now=0.0)
    assert event["involvedObject"] == {
        "apiVersion": "v1", "kind": "Pod", "namespace": "demo", "name": "shop"
    }  # fmt: skip
    assert (event["type"], event["reason"], event["message"]) == (
        "Warning",
        "LoopbackWouldDeny",
        "meshguard would deny (audit mode) cache -> app port 8080 tcp (3 more since the last"
        " event)",
    )
