"""The decision cache: a hit only for the same request about the very same pod object; a
changed, deleted or other pod, or another value of a header a rule names, is decided afresh;
the identity, sync and size checks run on every Check, hit or not."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from meshguard.authz.cache import DecisionCache
from meshguard.authz.decision import DECISION_HEADERS, Decision, PodPolicy, Reason, Request, decide
from meshguard.authz.identity import WorkloadIdentity
from meshguard.authz.server import AuthzSettings, Caller, check, serve_authz
from meshguard.authz.store import StoreStats
from tests.authz.test_decision import POLICY, STATUS, pod, req
from tests.authz.test_server import check_request, free_port

TOKEN_RULE = "rules: [{from: app, to: app, ports: [8080], http: {headers: {x-token: s3cret}}}]"
#: Istio's patterns closed: they would allow POST /quitquitquit to every container.
GET_ONLY = (
    "{rules: [{from: app, to: proxy, ports: [15020], http: {methods: [GET]}}],"
    " istioPatterns: false}"
)
POST_ONLY = GET_ONLY.replace("GET", "POST")


class Counting:
    """decide(), counting how often the cache had to call it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: Request, policy: PodPolicy | None) -> Callable[[], Decision]:
        def compute() -> Decision:
            self.calls += 1
            return decide(request, policy)

        return compute


def test_the_same_request_about_the_same_pod_is_decided_once():
    cache: DecisionCache[Decision] = DecisionCache()
    decided, web = Counting(), pod()
    first = cache.get(req(), web, decided(req(), web))
    second = cache.get(req(), web, decided(req(), web))
    assert first.allowed and second is first
    assert decided.calls == 1
    assert (cache.stats().hits, cache.stats().misses) == (1, 1)


def test_a_changed_pod_is_decided_afresh_even_with_an_equal_key():
    cache: DecisionCache[Decision] = DecisionCache()
    decided = Counting()
    before = pod(policy=POST_ONLY)
    assert cache.get(req(), before, decided(req(), before)).allowed
    after = pod(policy=GET_ONLY)  # the store's new object for the same pod key
    decision = cache.get(req(), after, decided(req(), after))
    assert not decision.allowed
    assert decision.kind is Reason.NO_RULE
    assert decided.calls == 2
    # An equal but re-created object is a new object too: decided again, never assumed.
    again = dataclasses.replace(after)
    assert again == after and again is not after
    cache.get(req(), again, decided(req(), again))
    assert decided.calls == 3


def test_one_pods_answer_is_never_another_pods():
    cache: DecisionCache[Decision] = DecisionCache()
    decided = Counting()
    open_pod = pod()
    closed = PodPolicy.from_pod(
        key="other/web-1",
        annotations={"meshguard.io/policy": GET_ONLY, "meshguard.io/status": STATUS},
        ports={},
    )
    mine = req()
    theirs = dataclasses.replace(mine, pod="other/web-1")
    assert cache.get(mine, open_pod, decided(mine, open_pod)).allowed
    decision = cache.get(theirs, closed, decided(theirs, closed))
    assert not decision.allowed
    assert decided.calls == 2


def test_a_deleted_pod_is_unknown_and_nothing_is_cached_for_it():
    cache: DecisionCache[Decision] = DecisionCache()
    decided = Counting()
    web = pod()
    assert cache.get(req(), web, decided(req(), web)).allowed
    decision = cache.get(req(), None, decided(req(), None))
    assert decision.kind is Reason.UNKNOWN_POD
    assert cache.stats().uncached == 1


def test_the_values_of_headers_the_rules_name_are_part_of_the_key():
    cache: DecisionCache[Decision] = DecisionCache()
    decided = Counting()
    web = pod(policy=TOKEN_RULE)
    assert set(web.header_names) == {"x-token", *DECISION_HEADERS}

    def ask(headers: dict[str, str]) -> Decision:
        request = req(port=8080, method="GET", path="/a", headers=headers)
        return cache.get(request, web, decided(request, web))

    assert ask({"x-token": "s3cret"}).allowed
    assert not ask({"x-token": "wrong"}).allowed
    assert not ask({}).allowed
    assert decided.calls == 3
    # A header no rule names does not split the cache: the same answer, from the cache.
    assert ask({"x-token": "s3cret", "x-request-id": "1"}).allowed
    assert not ask({"x-token": "wrong", "x-request-id": "2"}).allowed
    assert decided.calls == 3


def test_every_attribute_of_the_request_is_part_of_the_key():
    cache: DecisionCache[Decision] = DecisionCache()
    decided = Counting()
    web = pod(policy=POLICY + "istioPatterns: false\n")  # cache's POST /quitquitquit: denied
    allowed = req()
    assert cache.get(allowed, web, decided(allowed, web)).allowed
    for change in (
        {"source_address": "127.0.100.2"},  # cache, not app
        {"port": 15021},
        {"method": "GET"},
        {"path": "/quitquitquit/x"},
    ):
        other = dataclasses.replace(allowed, **change)
        assert not cache.get(other, web, decided(other, web)).allowed, change
    assert decided.calls == 5


def test_bounded_first_in_first_out_and_long_keys_not_cached():
    cache: DecisionCache[Decision] = DecisionCache(max_entries=2, max_key_chars=50)
    decided = Counting()
    web = pod()
    requests = [req(path=f"/p{i}") for i in range(3)]
    for request in requests:
        cache.get(request, web, decided(request, web))
    assert cache.stats().entries == 2
    cache.get(requests[0], web, decided(requests[0], web))  # evicted: decided again
    assert decided.calls == 4
    long = req(path="/" + "a" * 60)
    cache.get(long, web, decided(long, web))
    cache.get(long, web, decided(long, web))
    assert decided.calls == 6
    assert cache.stats().uncached == 2
    with pytest.raises(ValueError, match="at least 1"):
        DecisionCache(max_entries=0)


class MutableStore:
    """A PolicyStore whose pods the test replaces, as the watch does on a pod change."""

    def __init__(self, *policies: PodPolicy) -> None:
        self.policies = {p.key: p for p in policies}

    def get(self, key: str) -> PodPolicy | None:
        return self.policies.get(key)

    def is_synced(self) -> bool:
        return True

    def stats(self) -> StoreStats:
        return StoreStats(pods=len(self.policies), synced_at=0.0)


def test_check_keeps_the_identity_binding_on_a_cached_answer():
    """The identity check runs before the cache: an answer cached for the pod's own
    identity is never given to another caller."""
    web = pod()
    store = MutableStore(web)
    cache: DecisionCache[Decision] = DecisionCache()

    def caller(namespace: str) -> Caller:
        identity = WorkloadIdentity(
            trust_domain="cluster.local", namespace=namespace, service_account="default"
        )
        return Caller(identity=identity)

    own, other = caller("shop"), caller("attacker")
    assert check(req(), store, header_bytes=0, caller=own, cache=cache).allowed
    assert check(req(), store, header_bytes=0, caller=own, cache=cache).allowed
    assert cache.stats().hits == 1
    denied = check(req(), store, header_bytes=0, caller=other, cache=cache)
    assert (denied.allowed, denied.kind) == (False, Reason.IDENTITY_MISMATCH)
    anonymous = check(req(), store, header_bytes=0, caller=Caller(problem="no TLS"), cache=cache)
    assert anonymous.kind is Reason.NO_IDENTITY
    too_big = check(req(), store, header_bytes=70_000, caller=own, cache=cache)
    assert too_big.kind is Reason.HEADERS_TOO_LARGE


def test_the_server_answers_a_changed_pod_with_its_new_policy():
    """Over real gRPC: the same Check, allowed, then the pod's policy object is replaced (a
    re-created pod with a new policy), then denied; then the pod is gone: unknown."""

    def shop(policy: str) -> PodPolicy:
        annotations = {"meshguard.io/policy": policy, "meshguard.io/status": STATUS}
        return PodPolicy.from_pod(key="shop/web-1", annotations=annotations, ports={})

    store = MutableStore(shop(POST_ONLY))

    async def main() -> list[Any]:
        port = free_port()
        stop = asyncio.Event()
        settings = AuthzSettings(port=port, metrics_port=None, grace_seconds=0.1)
        server = asyncio.create_task(serve_authz(settings, store=store, stop=stop))
        answers = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 10)
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                request = check_request(path="/quit")
                answers.append(await stub.Check(request, timeout=5))
                answers.append(await stub.Check(request, timeout=5))
                store.policies["shop/web-1"] = shop(GET_ONLY)
                answers.append(await stub.Check(request, timeout=5))
                del store.policies["shop/web-1"]
                answers.append(await stub.Check(request, timeout=5))
        finally:
            stop.set()
            await server
        return answers

    allowed, cached, changed, gone = asyncio.run(main())
    assert (allowed.status.code, cached.status.code) == (0, 0)
    assert changed.status.code == 7
    assert changed.status.message.startswith("no rule allows app -> proxy:15020 POST /quit")
    assert gone.status.code == 7
    assert gone.status.message.startswith("unknown pod 'shop/web-1'")
