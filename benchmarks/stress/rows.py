"""The load test's profiles and what each scenario reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from tests.support.latency import LatencyMs


@dataclass(frozen=True)
class Profile:
    name: str
    admissions: int
    admission_warmup: int
    checks: int
    check_warmup: int
    rss_every: int  # Checks between two RSS samples
    fault_cycles: int
    fault_workers: int
    up_seconds: float  # load before each kill
    down_seconds: float  # the server stays dead this long
    after_seconds: float  # load after the last restart
    phase_seconds: float  # a load phase stops early past this (then fewer are reported)
    watchdog_seconds: int


FULL = Profile("full", admissions=10_000, admission_warmup=500, checks=100_000,
               check_warmup=5_000, rss_every=10_000, fault_cycles=3, fault_workers=8,
               up_seconds=3.0, down_seconds=2.0, after_seconds=3.0, phase_seconds=240.0,
               watchdog_seconds=900)  # fmt: skip
QUICK = Profile("quick", admissions=2_000, admission_warmup=200, checks=20_000,
                check_warmup=2_000, rss_every=5_000, fault_cycles=1, fault_workers=4,
                up_seconds=1.5, down_seconds=1.5, after_seconds=2.0, phase_seconds=60.0,
                watchdog_seconds=300)  # fmt: skip


class Watchdog(Exception):
    """The run took longer than the profile allows."""


@dataclass(frozen=True)
class Row:
    """One line of the summary table (and of the JSON document's ``rows``)."""

    scenario: str
    sent: int
    errors: int
    wrong: int
    rate: float  # per second
    latency: LatencyMs
    notes: str
    problems: list[str] = field(default_factory=list)  # what went wrong, for the report


class FaultCycle(TypedDict):
    """One kill and restart of the authz server in the fault scenario."""

    cycle: int
    down_seconds: float
    restart_to_listening_s: float
    restart_to_allowed_s: float
    by_phase: dict[str, int]  # "phase method status" -> requests around this kill
