"""The authz server's pod cache against a scripted API server over real HTTPS, 10,000
admitted pods and steady churn: ready only after the paginated LIST, the label selector
sent, correct decisions after churn, one watch for every --workers process, resume from
bookmarks, a fresh LIST after 410 Gone, the last view served while the API is down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshguard.authz.decision import Reason
from meshguard.authz.feed import Feed, FrameEncoder
from meshguard.authz.kube import HttpPodSource, ResourceExpired
from meshguard.authz.server import check
from meshguard.authz.store import KubernetesStore, Snapshot
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.kube_api import ApiAccess, ApiError
from tests.authz.test_server import check_request, free_port
from tests.authz.test_store import EXAMPLE
from tests.support.apiserver import TOKEN, ScriptedApiServer
from tests.support.apiserver import Churn as ApiChurn
from tests.support.keys import SIGNER, TRUSTED, trusted_keys_file
from tests.support.processes import children, listeners, wait_for

PODS = 10_000
SELECTOR = "meshguard.io/admitted=true"


def _template() -> str:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return json.dumps(pod)


TEMPLATE = _template()


def admitted(name: str, *, labelled: bool = True) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads(TEMPLATE)
    pod["metadata"]["name"] = name
    pod["metadata"]["uid"] = f"uid-{name}"
    if not labelled:
        del pod["metadata"]["labels"]["meshguard.io/admitted"]
    return pod


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ScriptedApiServer]:
    with ScriptedApiServer(tmp_path) as server:
        server.put_many(admitted(f"p{i}") for i in range(PODS))
        # admitted-looking pods without the label: the API server never sends them
        server.put_many(admitted(f"unlabelled{i}", labelled=False) for i in range(50))
        yield server


class Churn(ApiChurn):
    """Steady churn in a thread: each round deletes a pod, creates one, modifies one (a
    status update) and changes an unlabelled pod, about 200 changes a second."""

    def __init__(self, api: ScriptedApiServer) -> None:
        super().__init__(api, interval=0.02)
        self.created: list[str] = []
        self.deleted: list[str] = []

    def round(self, index: int) -> None:
        self.api.delete(f"demo/p{index}")
        self.deleted.append(f"demo/p{index}")
        self.api.put(admitted(f"new{index}"))
        self.created.append(f"demo/new{index}")
        modified = admitted(f"p{PODS - 1 - index}")
        modified["status"] = {"phase": "Running", "round": index}
        self.api.put(modified)
        self.api.put(admitted(f"unlabelled{index % 50}", labelled=False))


def access(api: ScriptedApiServer, *, token: str = TOKEN) -> ApiAccess:
    return ApiAccess(server=f"https://127.0.0.1:{api.port}", ca_file=str(api.ca_file), token=token)


def start_store(api: ScriptedApiServer, **knobs: Any) -> KubernetesStore:
    store = KubernetesStore(
        trusted=TRUSTED, source=HttpPodSource(access(api)), backoff_initial=0.05, **knobs
    )
    store.start()
    return store


def decision_reason(store: KubernetesStore, key: str) -> Reason:
    from meshguard.authz.server import request_of  # noqa: PLC0415

    request = request_of(check_request(pod=key, path="/quitquitquit"))
    return check(request, store, header_bytes=0).kind


def test_the_cache_lists_in_pages_with_the_selector_and_follows_churn(api):
    store = start_store(api)
    try:
        wait_for(store.is_synced, what="the first LIST")
        assert store.stats().pods == PODS
        assert store.get("demo/unlabelled0") is None
        with Churn(api) as churn:
            time.sleep(2)
        wait_for(lambda: set(store.keys()) == api.keys(SELECTOR), what="the churn to settle")
        assert len(churn.deleted) > 20
        for key in churn.created[-5:]:
            assert decision_reason(store, key) is Reason.ALLOWED_BY_RULE
        for key in churn.deleted[-5:]:
            assert decision_reason(store, key) is Reason.UNKNOWN_POD
        assert decision_reason(store, f"demo/p{PODS // 2}") is Reason.ALLOWED_BY_RULE
    finally:
        store.stop()
    lists, watches = api.lists(), api.watches()
    assert len(lists) == PODS // 100  # one LIST, in pages of 100
    assert all(r.query["labelSelector"] == SELECTOR and r.query["limit"] == "100" for r in lists)
    assert [r.query.get("continue") is None for r in lists].count(True) == 1
    assert len({r.peer for r in lists}) == 1  # the pages over one kept-alive connection
    assert len(watches) == 1  # no relist, no new watch: one stream followed the churn
    assert watches[0].query == {
        "watch": "1", "labelSelector": SELECTOR, "resourceVersion": "11050",
        "allowWatchBookmarks": "true", "timeoutSeconds": "300",
    }  # fmt: skip
    assert store.relists == 1 and store.reconnects == 0


def test_bookmarks_advance_the_version_a_broken_watch_resumes_from(api):
    store = start_store(api)
    try:
        wait_for(store.is_synced, what="the first LIST")
        listed = int(store.resource_version)
        api.put(admitted("unlabelled1", labelled=False))  # not for us: only a bookmark says it
        wait_for(lambda: int(store.resource_version) == api.version, what="a bookmark")
        assert int(store.resource_version) > listed
        api.end_watches()
        wait_for(lambda: len(api.watches()) == 2, what="the watch to resume")
        assert api.watches()[1].query["resourceVersion"] == str(api.version)
        assert store.relists == 1  # resumed, not listed again
    finally:
        store.stop()


def test_a_node_name_is_sent_as_a_field_selector(api):
    source = HttpPodSource(access(api), node_name="n1")
    page = next(iter(source.list()))
    next(iter(source.watch(page.resource_version, 1)), None)
    assert [r.query.get("fieldSelector") for r in api.requests] == ["spec.nodeName=n1"] * 2


def test_an_expired_continue_token_starts_the_list_again(api):
    api.script.page_delay = 0.05
    store = start_store(api)
    try:
        wait_for(lambda: len(api.lists()) >= 2, what="the second page")
        api.compact()  # the list's snapshot is gone: the next continue token gets 410
        wait_for(store.is_synced, what="the LIST started again")
        assert store.stats().pods == PODS
    finally:
        store.stop()
    starts = [r for r in api.lists() if "continue" not in r.query]
    assert len(starts) == 2 and store.expired == 1 and store.relists == 1


@pytest.mark.parametrize("gone_as", ["event", "status"])
def test_a_watch_too_old_410_lists_again_and_serves_the_changes(api, gone_as):
    api.script.gone_as = gone_as
    store = start_store(api)
    try:
        wait_for(store.is_synced, what="the first LIST")
        api.script.down = True  # while the API is down, the last view stays in service
        api.end_watches()
        wait_for(lambda: store.reconnects >= 2, what="failed reconnects")
        assert store.is_synced()
        assert decision_reason(store, "demo/p1") is Reason.ALLOWED_BY_RULE
        with Churn(api) as churn:
            time.sleep(1)
            api.compact()  # the changes while we were away are no longer in the log
            api.script.down = False
            time.sleep(1)
        wait_for(lambda: set(store.keys()) == api.keys(SELECTOR), what="the relist")
        assert store.expired == 1 and store.relists == 2
        assert decision_reason(store, churn.deleted[0]) is Reason.UNKNOWN_POD
        assert decision_reason(store, churn.created[0]) is Reason.ALLOWED_BY_RULE
    finally:
        store.stop()


def test_serve_authz_workers_share_one_watch_and_serve_only_once_synced(api, tmp_path):
    api.script.list_gate.clear()  # the LIST answers only when the test says so
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(api.kubeconfig(tmp_path / "kubeconfig"))
    port, metrics = free_port(), free_port()
    argv = [sys.executable, "-m", "meshguard", "serve-authz", "--kubernetes",
            "--insecure-plaintext", "--port", str(port), "--metrics-port", str(metrics),
            "--workers", "2", "--trusted-keys", str(trusted_keys_file(tmp_path))]  # fmt: skip
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: listeners(port) == 2, what="both workers to listen")
        assert set(health(port, channels=8)) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        early = checks(port, ["demo/p1"] * 8)
        assert {reason for reason, _ in early} == {"the pod cache has not synced yet: no decision"}
        api.script.list_gate.set()
        wait_for(
            lambda: set(health(port, channels=8)) == {health_pb2.HealthCheckResponse.SERVING},
            what="both workers to serve",
        )
        with Churn(api) as churn:
            time.sleep(1)
        created, deleted = churn.created[-1], churn.deleted[-1]
        wait_for(
            lambda: (
                {c for _, c in checks(port, [created] * 8)} == {0}
                and {c for _, c in checks(port, [deleted] * 8)} == {7}
            ),
            what="every worker to see the churn",
        )
        sizes = [scrape(metrics + i, "meshguard_authz_cache_pods") for i in range(2)]
        assert sizes[0] == sizes[1] == len(api.keys(SELECTOR))
        assert [scrape(metrics + i, "meshguard_authz_relists_total") for i in range(2)] == [1, 1]
        # A worker killed is started again and fed by the same watch: no new LIST or WATCH.
        (worker,) = children(server.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: len(children(server.pid)) == 1 and children(server.pid) != [worker],
                 what="the worker to be started again", timeout=30)  # fmt: skip
        wait_for(lambda: listeners(port) == 2, what="the new worker to listen")
        wait_for(
            lambda: scraped(metrics + 1, "meshguard_authz_cache_pods") == len(api.keys(SELECTOR)),
            what="the new worker to get the parent's view",
        )
        assert {c for _, c in checks(port, [created] * 8)} == {0}
        assert {c for _, c in checks(port, [deleted] * 8)} == {7}
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert len(api.lists()) == PODS // 100 and len(api.watches()) == 1, stderr.decode()[-2000:]


def health(port: int, *, channels: int) -> list[int]:
    """One health answer per fresh channel (SO_REUSEPORT spreads them over the workers)."""

    async def ask() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            return int(answer.status)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(ask() for _ in range(channels))))

    return asyncio.run(main())


def checks(port: int, pods: list[str]) -> list[tuple[str, int]]:
    """(message, gRPC status code) of one Check per pod, each on a fresh channel."""
    from envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: PLC0415

    async def ask(pod: str) -> tuple[str, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            answer = await stub.Check(check_request(pod=pod, path="/quitquitquit"), timeout=5)
            return answer.status.message, answer.status.code

    async def main() -> list[tuple[str, int]]:
        return list(await asyncio.gather(*(ask(pod) for pod in pods)))

    return asyncio.run(main())


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not on :{port}"
    return float(match.group(1))


def scraped(port: int, name: str) -> float | None:
    """The metric, or None while nothing serves the port yet."""
    try:
        return scrape(port, name)
    except OSError:
        return None


def test_a_worker_that_is_gone_gets_nothing_queued():
    read_end, write_end = os.pipe()
    os.close(read_end)
    feed = Feed(write_end, name="1", encoder=FrameEncoder())
    store = KubernetesStore(
        trusted=TRUSTED, source=HttpPodSource(ApiAccess(server="https://127.0.0.1:1"))
    )
    feed(Snapshot({}, store.stats()))  # EPIPE: the writer stops
    writer = feed._writer
    writer._thread.join(timeout=5)
    feed(Snapshot({}, store.stats()))
    assert writer._queue.empty()
    feed.close()


@pytest.mark.parametrize(
    ("knob", "message"),
    [("token", "pod LIST: HTTP 401 (Unauthorized)"),
     ("down", "pod LIST: HTTP 503 (the API server is down)")],
)  # fmt: skip
def test_api_failures_are_errors_that_say_what_the_server_said(api, knob, message):
    token = "wrong" if knob == "token" else TOKEN
    api.script.down = knob == "down"
    with pytest.raises(ApiError) as caught:
        next(iter(HttpPodSource(access(api, token=token)).list()))
    assert str(caught.value) == message
    assert not isinstance(caught.value, ResourceExpired)


@pytest.mark.parametrize("size", ["0", "-5"])
def test_a_list_page_size_below_one_is_refused(size):
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "serve-authz", "--kubernetes",
         "--insecure-plaintext", "--list-page-size", size],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"--list-page-size {size}: expected at least 1" in done.stderr


def test_the_workers_feeds_encode_a_change_once():
    store = KubernetesStore(
        trusted=TRUSTED, source=HttpPodSource(ApiAccess(server="https://127.0.0.1:1"))
    )
    encoder = FrameEncoder()
    first, second = Snapshot({}, store.stats()), Snapshot({}, store.stats())
    frame = encoder(first)
    assert encoder(first) is frame  # the same change object: the same frame, not encoded again
    assert encoder(second) == frame and encoder(second) is not frame  # an equal new change
