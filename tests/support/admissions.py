"""The one HTTPS admission client of ``tests/load``, ``benchmarks/load.py`` and
``benchmarks/webhook.py``: POSTs with a number in flight over one keep-alive session."""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Posted:
    """One request: its answer's status and body, or the transport error (status 0)."""

    key: str
    seconds: float  # send until the whole answer is read
    status: int = 0
    payload: bytes = b""
    error: str = ""


async def post_all(
    url: str, ca_file: Path, phases: Sequence[Iterable[tuple[str, bytes]]], *,
    concurrency: int, answered: Callable[[Posted], None], timeout: float = 30.0,
    max_seconds: float = math.inf,
) -> list[float]:  # fmt: skip
    """POST each phase's ``(key, body)`` pairs in turn, ``concurrency`` in flight, over one
    session (keep-alive, connector limit = concurrency, so a later phase reuses the earlier
    one's connections); ``answered`` sees each outcome as it arrives, on the worker that sent
    it. A phase stops early past ``max_seconds``. Returns each phase's wall seconds."""
    context = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    headers = {"Content-Type": "application/json"}
    elapsed = []
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def worker(pending: Iterator[tuple[str, bytes]], stop_at: float) -> None:
            for key, body in pending:
                if time.monotonic() > stop_at:
                    return
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        payload, status = await answer.read(), answer.status
                except (aiohttp.ClientError, OSError) as exc:  # OSError: TimeoutError too
                    answered(Posted(key, time.perf_counter() - started, error=type(exc).__name__))
                    continue
                answered(Posted(key, time.perf_counter() - started, status, payload))

        for bodies in phases:
            pending, stop_at = iter(bodies), time.monotonic() + max_seconds
            began = time.perf_counter()
            await asyncio.gather(*(worker(pending, stop_at) for _ in range(concurrency)))
            elapsed.append(time.perf_counter() - began)
    return elapsed


def admission_metrics(text: str) -> dict[str, Any]:
    """serve-webhook's ``/metrics``: ``admissions`` by result, and its latency histogram's
    ``seconds_sum`` and ``seconds_count`` (absent before the first admission)."""
    found: dict[str, Any] = {"admissions": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "meshguard_admissions_total":
                found["admissions"][sample.labels["result"]] = int(sample.value)
            elif sample.name == "meshguard_admission_seconds_sum":
                found["seconds_sum"] = sample.value
            elif sample.name == "meshguard_admission_seconds_count":
                found["seconds_count"] = int(sample.value)
    return found


def answer_problem(response: Mapping[str, Any], uid: str) -> str | None:
    """Why an AdmissionReview's ``response`` is not an injection for ``uid``, or None."""
    if response.get("uid") != uid:
        return "answer for another uid"
    if response.get("allowed") is not True:
        return f"not allowed: {response.get('status')}"
    if response.get("patchType") != "JSONPatch" or not response.get("patch"):
        return "no patch"
    return None
