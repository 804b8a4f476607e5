"""Bounded admission, through the real HTTPS webhook (``meshguard serve-webhook``) and the
app in-process.

A policy whose work exceeds meshguard's limits (YAML aliases, ports per rule, rules x ports x
source containers) is refused with ``allowed: false`` and a message naming the limit and the
field, for a CREATE; the UPDATEs meshguard reviews (``pods/ephemeralcontainers``) and those
it lets through (``pods/resize``) are answered as before. An admission is judged off the
event loop: ``/healthz`` answers while one is being judged, and past
``max_pending_admissions`` a request is answered 429 instead of queueing without bound.
What one admission costs (time, peak memory) is measured in
``benchmarks/admission_bounds.py``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from typing import Any

import aiohttp
import pytest

from meshguard.webhook import server
from meshguard.webhook.server import WebhookSettings, create_app
from tests.support.pods import admission_review, admission_update, injected_example, wide_example
from tests.webhook.test_app import HOST, Pair, pair, serving  # noqa: F401 - the fixture
from tests.webhook.test_server import Served, served  # noqa: F401 - the fixture

ALIAS_BOMB = (
    "x: &r {from: app, to: cache, ports: [" + ", ".join(map(str, range(1, 1001))) + "]}\n"
    "rules: [" + ", ".join(["*r"] * 1500) + "]"
)


def answer(served: Served, body: bytes) -> dict[str, Any]:  # noqa: F811
    status, payload = served.request("POST", "/inject", body)
    assert status == 200, payload
    response: dict[str, Any] = json.loads(payload)["response"]
    return response


@pytest.mark.parametrize(
    ("containers", "policy", "expected"),
    [
        (0, ALIAS_BOMB, "anchor or alias at line 1, column 4"),
        (
            200,
            json.dumps({"rules": [{"from": "*", "to": "app", "ports": list(range(1, 10_001))}]}),
            "rules[0].ports: got '10000 entries', expected at most 256 ports per rule",
        ),
        (
            200,
            json.dumps({"rules": [{"from": "*", "to": "app", "ports": list(range(1, 257))}]}),
            "expected at most 4096 grants",
        ),
        (
            0,
            json.dumps({"rules": [{"from": "app", "to": "cache", "ports": [6379]}] * 129}),
            "rules: got '129 rules', expected at most 128 rules per policy",
        ),
        (
            0,
            json.dumps(
                {"rules": [{"from": "app", "to": "cache", "ports": list(range(1, 201))}] * 6}
            ),
            "rules[*].ports: got '1200 ports', expected at most 1024 ports per policy",
        ),
    ],
    ids=["alias-bomb", "10000-ports-200-containers", "expansion", "rules", "ports-total"],
)
def test_a_create_past_a_limit_is_refused_naming_it(
    served: Served,  # noqa: F811
    containers: int,
    policy: str,
    expected: str,
):
    pod = wide_example(containers, policy=policy)
    response = answer(served, admission_review(pod, "bounded"))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert message.startswith("meshguard.io/policy: ")
    assert expected in message, message
    assert "meshguard's limit" in message
    assert served.request("GET", "/healthz") == (200, b"ok\n")


def test_the_widest_admitted_policy_is_injected(served: Served):  # noqa: F811
    """Within every limit, near the edge: 3 rules of 256 ports from 4 named sources (3,072
    grants), 15 containers."""
    rules = [
        {"from": ["app", "log-shipper", "c0", "c1"], "to": "cache",
         "ports": list(range(30000 + 256 * i, 30256 + 256 * i))}
        for i in range(3)
    ]  # fmt: skip
    pod = wide_example(12, policy=json.dumps({"rules": rules}))
    response = answer(served, admission_review(pod, "widest"))
    assert response["allowed"] is True and response["patch"]


def test_updates_are_answered_as_before(served: Served):  # noqa: F811
    pod = injected_example()
    debugger = {"name": "debugger", "image": "busybox",
                "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}  # fmt: skip
    debugged = copy.deepcopy(pod)
    debugged["spec"]["ephemeralContainers"] = [debugger]
    refused = answer(
        served, admission_update(pod, debugged, "e1", subresource="ephemeralcontainers")
    )
    assert (
        refused["allowed"] is False
        and "ephemeral container 'debugger'" in refused["status"]["message"]
    )
    resized = copy.deepcopy(pod)
    resized["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "2"}}
    assert answer(served, admission_update(pod, resized, "r1", subresource="resize"))["allowed"]


# --- off the event loop ---------------------------------------------------------------------


def test_health_is_answered_while_an_admission_is_judged_and_excess_gets_429(
    pair: Pair,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    """``handle`` is held inside a worker until released: on the event loop it would stall
    every other request (the health check, the next admissions)."""
    started, release = threading.Event(), threading.Event()
    real = server.handle

    def held(body: bytes, **kwargs: Any) -> Any:
        started.set()
        release.wait(60)
        return real(body, **kwargs)

    monkeypatch.setattr(server, "handle", held)
    settings = WebhookSettings(
        cert_file=pair.cert_file, key_file=pair.key_file, host=HOST,
        admission_workers=1, max_pending_admissions=1,
    )  # fmt: skip
    body = admission_review(injected_example(), "held")

    async def scenario() -> None:
        async with (
            serving(create_app(settings)) as site,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=pair.client_context())
            ) as session,
        ):
            url = f"https://{HOST}:{site.port}"
            first = asyncio.create_task(session.post(f"{url}/inject", data=body))
            await asyncio.to_thread(started.wait, 60)
            async with session.get(f"{url}/healthz") as health:
                assert (health.status, await health.text()) == (200, "ok\n")
            async with session.post(f"{url}/inject", data=body) as excess:
                assert excess.status == 429
                assert "the limit is 1" in (await excess.json())["error"]
            release.set()
            async with await first as done:
                assert done.status == 200
                assert (await done.json())["response"]["allowed"] is True

    try:
        asyncio.run(scenario())
    finally:
        release.set()
