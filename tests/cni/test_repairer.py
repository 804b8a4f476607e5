"""The node agent's pod repair against a scripted API server (real HTTPS, real selectors):
exactly this node's broken pod is deleted, with its UID as a precondition, at a bounded rate,
each repair one JSON log line — and only while meshguard's entry is chained."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshguard.cni.node import ApiCredentials, InstallSettings, NodeLayout, run_agent
from meshguard.cni.repair import RepairMode
from meshguard.cni.repairer import Repairer, RepairSettings
from meshguard.errors import MeshguardFailure
from meshguard.logs import JsonFormatter
from tests.cni.test_repair import NODE, changed, pod
from tests.support.apiserver import ApiServer, scripted_api
from tests.support.keys import trusted_keys_file

TOKEN = "agent-token"
DELETE = RepairMode.DELETE


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    with scripted_api(tmp_path) as server:
        yield server


def credentials(api: ApiServer) -> ApiCredentials:
    return ApiCredentials(server=api.url, token=TOKEN, ca_pem=api.ca_pem)


def named(base: dict[str, Any], name: str, **paths: Any) -> dict[str, Any]:
    document = changed(base, "metadata.name", name)
    document["metadata"]["uid"] = f"uid-{name}"
    for path, value in paths.items():
        document = changed(document, path.replace("__", "."), value)
    return document


def serve_the_node(api: ApiServer) -> None:
    """One broken pod on NODE among pods that must stay: another node's broken pod, this
    node's healthy and still-probing pods, a broken pod meshguard did not admit, and a bare
    broken pod (reported, not deleted)."""
    for document in (
        named(pod(), "broken"),
        named(pod(), "elsewhere", spec__nodeName="node-b"),
        named(pod(validation={"terminated": {"exitCode": 0}}), "healthy"),
        named(pod(validation={"running": {}}), "probing"),
        named(pod(), "unadmitted", metadata__labels={"app": "web"}),
        named(pod(), "bare", metadata__ownerReferences=None),
    ):
        api.script.serve(document)


def remaining(api: ApiServer) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.script.served())


def test_exactly_the_broken_pod_is_deleted(api: ApiServer, caplog: pytest.LogCaptureFixture):
    serve_the_node(api)
    repairer = Repairer(
        RepairSettings(node_name=NODE, mode=DELETE), credentials=lambda: credentials(api)
    )
    with caplog.at_level(logging.INFO, logger="meshguard.cni.repairer"):
        deleted = repairer.run_once()
    assert [(p.namespace, p.name) for p in deleted] == [("shop", "broken")]
    assert remaining(api) == ["bare", "elsewhere", "healthy", "probing", "unadmitted"]
    # one list, filtered by the API server to this node's admitted pods; one DELETE
    methods = [(method, path.partition("?")[0]) for method, path, _ in api.script.requests]
    assert methods == [("GET", "/api/v1/pods"), ("DELETE", "/api/v1/namespaces/shop/pods/broken")]
    query = api.script.requests[0][1].partition("?")[2]
    assert "labelSelector=meshguard.io%2Fadmitted%3Dtrue" in query
    assert "fieldSelector=spec.nodeName%3Dnode-a" in query
    assert {token for _, _, token in api.script.requests} == {TOKEN}
    # each repair is one JSON line with who and why; the bare pod is reported instead
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    repairs = [line for line in lines if line.get("event") == "cni-repair"]
    assert [(r["namespace"], r["name"], r["uid"]) for r in repairs] == [
        ("shop", "broken", "uid-broken")
    ]
    assert repairs[0]["reason"] == "meshguard-validation exited 1: meshguard's node rules missing"
    skipped = [line for line in lines if line.get("event") == "cni-repair-skipped"]
    assert [(s["namespace"], s["name"]) for s in skipped] == [("shop", "bare")]
    # a second pass finds nothing more to delete and reports the bare pod only once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meshguard.cni.repairer"):
        assert repairer.run_once() == []
    assert caplog.records == []


def test_by_default_the_broken_pods_get_an_event_and_nothing_is_deleted(
    api: ApiServer, caplog: pytest.LogCaptureFixture
):
    """The default mode needs no write on pods: one Warning Event per broken pod of this
    node (the bare one too, with its own remedy), once per pod, and no DELETE."""
    serve_the_node(api)
    repairer = Repairer(RepairSettings(node_name=NODE), credentials=lambda: credentials(api))
    with caplog.at_level(logging.WARNING, logger="meshguard.cni.repairer"):
        signalled = repairer.run_once()
    assert sorted(p.name for p in signalled) == ["bare", "broken"]
    assert sorted(remaining(api)) == ["bare", "broken", "elsewhere", "healthy", "probing",
                                      "unadmitted"]  # fmt: skip
    methods = [(method, path.partition("?")[0]) for method, path, _ in api.script.requests]
    assert [m for m, _ in methods].count("DELETE") == 0
    assert sorted(methods[1:]) == [("POST", "/api/v1/namespaces/shop/events")] * 2
    by_pod = {e["involvedObject"]["name"]: e for e in api.script.events}
    event = by_pod["broken"]
    assert event["type"] == "Warning" and event["reason"] == "MeshguardRulesMissing"
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "shop",
                                       "name": "broken", "uid": "uid-broken"}  # fmt: skip
    assert event["metadata"]["namespace"] == "shop" and event["source"]["host"] == NODE
    assert "meshguard's node rules missing: delete the pod" in event["message"]
    assert "no controller owns it" in by_pod["bare"]["message"]
    logged = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert logged == ["cni-repair-event"] * 2
    # a second pass records nothing more for the same pods
    api.script.requests.clear()
    assert repairer.run_once() == []
    assert [m for m, _, _ in api.script.requests] == ["GET"]


def test_a_recreated_pod_of_the_same_name_is_not_deleted(api: ApiServer):
    """The DELETE carries the broken pod's UID: a pod recreated under its name (a
    StatefulSet's) between the list and the delete answers 409 and stays."""
    api.script.serve(named(pod(), "db-0"))

    class Racing(Repairer):
        def _list(self, credentials: ApiCredentials) -> list[dict[str, Any]]:
            listed = super()._list(credentials)
            api.script.serve(named(pod(validation={"running": {}}), "db-0",
                                   metadata__uid="uid-recreated"))  # fmt: skip
            return listed

    repairer = Racing(
        RepairSettings(node_name=NODE, mode=DELETE), credentials=lambda: credentials(api)
    )
    assert repairer.run_once() == []
    assert [p["metadata"]["uid"] for p in api.script.served()] == ["uid-recreated"]


def test_deletions_are_rate_limited_per_minute(api: ApiServer):
    for index in range(5):
        api.script.serve(named(pod(), f"broken-{index}"))
    now = [1000.0]
    repairer = Repairer(RepairSettings(node_name=NODE, per_minute=2, mode=DELETE),
                        credentials=lambda: credentials(api), clock=lambda: now[0])  # fmt: skip
    assert len(repairer.run_once()) == 2
    now[0] += 30
    assert repairer.run_once() == []  # still 2 in the last minute
    now[0] += 31
    assert len(repairer.run_once()) == 2
    assert len(remaining(api)) == 1


def test_passes_follow_the_interval_and_api_failures_are_not_fatal(
    api: ApiServer, caplog: pytest.LogCaptureFixture
):
    api.script.serve(named(pod(), "broken"))
    now = [0.0]
    wrong = ApiCredentials(server=api.url, token=TOKEN, ca_pem="not a CA")
    use = [wrong]
    repairer = Repairer(RepairSettings(node_name=NODE, interval=10, mode=DELETE),
                        credentials=lambda: use[0], clock=lambda: now[0])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="meshguard.cni.repairer"):
        assert repairer.run_due() == []
    assert [getattr(r, "fields", {}).get("event") for r in caplog.records] == ["cni-repair-failed"]
    use[0] = credentials(api)
    now[0] = 5.0
    assert repairer.run_due() == []  # not due yet
    assert api.script.requests == []
    now[0] = 10.0
    assert [p.name for p in repairer.run_due()] == ["broken"]


def test_no_node_name_is_refused():
    with pytest.raises(MeshguardFailure, match="node's name"):
        Repairer(RepairSettings(node_name=""), credentials=lambda: pytest.fail("no call"))


def test_the_agent_repairs_only_while_its_entry_is_chained(api: ApiServer, tmp_path: Path):
    """run_agent as ``meshguard cni install`` runs it: with no istio-cni to chain after (the
    entry is missing) no pass runs; once chained, the broken pod is deleted."""
    serve_the_node(api)
    layout = NodeLayout(conf_dir=tmp_path / "net.d", bin_dir=tmp_path / "bin")
    layout.conf_dir.mkdir()
    layout.bin_dir.mkdir()
    shim = tmp_path / "meshguard-cni"
    shim.write_bytes(b"the executable")
    conflist = layout.conf_dir / "10-calico.conflist"
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s",
                                    "plugins": [{"type": "calico"}]}))  # fmt: skip
    repairer = Repairer(RepairSettings(node_name=NODE, interval=0, mode=DELETE),
                        credentials=lambda: credentials(api))  # fmt: skip

    def agent_passes(passes: int) -> None:
        stop = threading.Event()
        calls = [0]

        def counted() -> ApiCredentials:
            calls[0] += 1
            if calls[0] >= passes:
                stop.set()
            return credentials(api)

        run_agent(layout, InstallSettings(plugin_source=shim), credentials=counted, stop=stop,
                  interval=0.01, uninstall_on_stop=False,
                  while_chained=repairer.run_due)  # fmt: skip

    agent_passes(3)
    assert api.script.requests == []  # not chained: no list, no delete
    assert "broken" in remaining(api)
    chained = [{"type": "calico"}, {"type": "istio-cni"}]
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": chained}))
    agent_passes(3)
    assert "broken" not in remaining(api)
    assert remaining(api) == ["bare", "elsewhere", "healthy", "probing", "unadmitted"]


def test_the_agent_process_repairs_with_the_daemonsets_flags(api: ApiServer, tmp_path: Path):
    """``meshguard cni install --repair-pods`` as the chart runs it (NODE_NAME from the
    environment, the API server and CA from its pod's service account): the broken pod is
    deleted, the others stay; without a node name it refuses to start."""
    serve_the_node(api)
    conf, binaries, account = tmp_path / "net.d", tmp_path / "bin", tmp_path / "account"
    for directory in (conf, binaries, account):
        directory.mkdir()
    plugins = [{"type": "calico"}, {"type": "istio-cni"}]
    (conf / "10-calico.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s",
                                                         "plugins": plugins}))  # fmt: skip
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_text(api.ca_pem)
    shim = tmp_path / "meshguard-cni"
    shim.write_bytes(b"the executable")
    port = api.url.rsplit(":", 1)[1]
    environment = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                   "KUBERNETES_SERVICE_PORT": port}  # fmt: skip
    command = [sys.executable, "-m", "meshguard", "cni", "install", "--cni-conf-dir", str(conf),
               "--cni-bin-dir", str(binaries), "--plugin-binary", str(shim),
               "--service-account-dir", str(account), "--interval", "0.1", "--repair-pods",
               "--repair-mode", "delete", "--repair-interval", "0.1",
               "--trusted-keys", str(trusted_keys_file(tmp_path))]  # fmt: skip
    refused = subprocess.run(command, env=environment, capture_output=True, text=True,
                             timeout=120, check=False)  # fmt: skip
    assert refused.returncode == 1
    assert "pod repair needs the node's name" in refused.stderr
    agent = subprocess.Popen(command, env={**environment, "NODE_NAME": NODE},
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "broken" in remaining(api) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr
    assert remaining(api) == ["bare", "elsewhere", "healthy", "probing", "unadmitted"]
    repairs = [json.loads(line) for line in stderr.splitlines() if '"cni-repair"' in line]
    assert [(r["namespace"], r["name"]) for r in repairs] == [("shop", "broken")]
