"""The Check statistics a scrape reads: every decision series from the start, the latency
histogram's cumulative buckets, count and sum (Prometheus' text format, parsed back)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshguard.authz.decision import Decision, Reason
from meshguard.authz.metrics import LATENCY_BUCKETS, REASONS_BY_RESULT, AuthzMetrics


def scraped(metrics: AuthzMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("meshguard_authz_")
    }


def decisions(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        f"{dict(labels)['result']}/{dict(labels)['reason']}": value
        for (name, labels), value in samples.items()
        if name == "meshguard_authz_decisions_total"
    }


def test_every_decision_series_exists_before_any_check():
    counted = decisions(scraped(AuthzMetrics()))
    expected = {f"{result}/{r.value}" for result, rs in REASONS_BY_RESULT.items() for r in rs}
    assert set(counted) == expected
    assert set(counted.values()) == {0.0}


def test_decisions_are_counted_by_result_and_reason():
    metrics = AuthzMetrics()
    allowed = Decision(True, "allowed by rules[0]", 0, kind=Reason.ALLOWED_BY_RULE)
    denied = Decision(False, "no rule allows", kind=Reason.NO_RULE)
    for decision in (allowed, allowed, denied):
        metrics.checks.record(decision, 0.0002)
    # not a combination decide() gives: counted under what it says, never dropped
    metrics.checks.record(Decision(True, "odd", kind=Reason.NO_RULE), 0.0002)
    counted = decisions(scraped(metrics))
    assert counted["allow/allowed_by_rule"] == 2
    assert counted["deny/no_rule"] == 1
    assert counted["allow/no_rule"] == 1
    assert sum(counted.values()) == 4


def test_the_latency_histogram_is_cumulative_up_to_and_beyond_envoys_timeout():
    metrics = AuthzMetrics()
    decision = Decision(True, "allowed", kind=Reason.ALLOWED_BY_DEFAULT)
    elapsed = (0.00005, 0.0001, 0.0003, 0.4, 0.5, 2.0)
    for seconds in elapsed:
        metrics.checks.record(decision, seconds)
    samples = scraped(metrics)

    def bucket(le: str) -> float:
        return samples["meshguard_authz_check_seconds_bucket", (("le", le),)]

    assert LATENCY_BUCKETS[-2:] == (0.5, 1.0)  # Envoy's ext_authz timeout is 0.5 s
    assert bucket("0.0001") == 2  # a bucket holds what is less than or equal to its bound
    assert bucket("0.00025") == 2
    assert bucket("0.0005") == 3
    assert bucket("0.25") == 3
    assert bucket("0.5") == 5
    assert bucket("1.0") == 5
    assert bucket("+Inf") == 6
    assert samples["meshguard_authz_check_seconds_count", ()] == 6
    assert abs(samples["meshguard_authz_check_seconds_sum", ()] - sum(elapsed)) < 1e-9
