"""The authz server's Prometheus metrics: Check decisions and latency, the policy store and
the decision cache, process and build info.

A Check only adds to plain counters (:class:`CheckStats`, no lock: every Check runs on the
server's event loop thread); collectors read them, and the store and cache statistics, when
Prometheus scrapes. The decision counter's ``reason`` label is a fixed set
(:class:`~meshguard.authz.decision.Reason`), each series present from the start.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

import meshguard
from meshguard.authz.cache import DecisionCache
from meshguard.authz.decision import Decision, Reason
from meshguard.authz.store import PolicyStore

#: Check latency buckets, up to Envoy's ext_authz timeout (0.5 s) and beyond it.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

_ALLOWING = (Reason.ALLOWED_BY_RULE, Reason.ALLOWED_BY_DEFAULT, Reason.AUDIT)
#: The series of the decision counter: every reason under the result it can have.
REASONS_BY_RESULT = {
    "allow": _ALLOWING,
    "deny": tuple(reason for reason in Reason if reason not in _ALLOWING),
}


class CheckStats:
    """Decisions by result and reason, and the Check latency histogram, as plain numbers."""

    def __init__(self, *, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        # Every (allowed, reason) key from the start: a scrape iterates while Checks add.
        self.decisions = {(allowed, reason): 0 for allowed in (True, False) for reason in Reason}
        self.latency_counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.latency_sum = 0.0

    def record(self, decision: Decision, elapsed: float) -> None:
        self.decisions[decision.allowed, decision.kind] += 1
        self.latency_counts[bisect_left(self.buckets, elapsed)] += 1
        self.latency_sum += elapsed


class CheckCollector(Collector):
    """:class:`CheckStats` as ``meshguard_authz_decisions`` and
    ``meshguard_authz_check_seconds``."""

    def __init__(self, stats: CheckStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        decisions = CounterMetricFamily(
            "meshguard_authz_decisions",
            "Check decisions, by result and reason (a fixed set: meshguard.authz.decision.Reason)",
            labels=["result", "reason"],
        )
        counts = dict(self._stats.decisions)
        for result, reasons in REASONS_BY_RESULT.items():
            for reason in reasons:
                decisions.add_metric(
                    [result, reason.value], counts.pop((result == "allow", reason))
                )
        for (allowed, reason), count in counts.items():  # not a combination decide() gives
            if count:
                decisions.add_metric(["allow" if allowed else "deny", reason.value], count)
        yield decisions
        latency_counts, total = list(self._stats.latency_counts), self._stats.latency_sum
        cumulative, buckets = 0, []
        for bound, count in zip((*self._stats.buckets, float("inf")), latency_counts, strict=True):
            cumulative += count
            buckets.append((_bound_label(bound), cumulative))
        yield HistogramMetricFamily(
            "meshguard_authz_check_seconds", "Time to decide a Check",
            buckets=buckets, sum_value=total,
        )  # fmt: skip


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class StoreCollector(Collector):
    """The policy store's size, sync age, relists and watch restarts, read at scrape time."""

    def __init__(self, store: PolicyStore) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._store.stats()
        yield GaugeMetricFamily(
            "meshguard_authz_cache_pods", "Pods whose admitted policy is cached", value=stats.pods
        )
        yield GaugeMetricFamily(
            "meshguard_authz_synced", "1 once the pod cache has synced",
            value=1.0 if self._store.is_synced() else 0.0,
        )  # fmt: skip
        age = -1.0 if stats.synced_at is None else max(0.0, time.time() - stats.synced_at)
        yield GaugeMetricFamily(
            "meshguard_authz_sync_age_seconds",
            "Seconds since the cache last heard from its source (a list or a watch event or"
            " bookmark); -1 before the first sync",
            value=age,
        )
        yield CounterMetricFamily(
            "meshguard_authz_relists", "Complete lists of the admitted pods", value=stats.relists
        )
        yield CounterMetricFamily(
            "meshguard_authz_watch_restarts",
            "Times the pod watch broke or expired (410 Gone) and was restarted",
            value=stats.watch_restarts,
        )


class DecisionCacheCollector(Collector):
    """The decision cache's size, hits and misses, read at scrape time."""

    def __init__(self, cache: DecisionCache[Decision]) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._cache.stats()
        yield GaugeMetricFamily(
            "meshguard_authz_decision_cache_entries", "Decisions cached", value=stats.entries
        )
        yield CounterMetricFamily(
            "meshguard_authz_decision_cache_hits",
            "Checks answered from the decision cache (same request, same pod object)",
            value=stats.hits,
        )
        yield CounterMetricFamily(
            "meshguard_authz_decision_cache_misses",
            "Checks decided and cached (new request, or the pod changed)",
            value=stats.misses,
        )


class AuthzMetrics:
    """The registry the metrics port serves, and the Check statistics it exports."""

    def __init__(
        self, store: PolicyStore | None = None, cache: DecisionCache[Decision] | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.checks = CheckStats()
        self.registry.register(CheckCollector(self.checks))
        build = Gauge(
            "meshguard_authz_build_info", "The running meshguard (always 1)",
            ["version", "python"], registry=self.registry,
        )  # fmt: skip
        build.labels(version=meshguard.__version__, python=platform.python_version()).set(1)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        if store is not None:
            self.registry.register(StoreCollector(store))
        if cache is not None:
            self.registry.register(DecisionCacheCollector(cache))
