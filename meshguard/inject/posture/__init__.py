"""Posture checks: can any container of the pod escape its loopback rules or pass as Envoy?

Two families, one review (:func:`review_posture`) over the pod spec after Istio's injection:

- :mod:`~meshguard.inject.posture.baseline` — Pod Security Standards "baseline", the floor,
  versioned like Pod Security Admission's ``enforce-version`` (``latest`` = v1.37;
  :class:`BaselineVersion`, :func:`parse_baseline_version`);
- :mod:`~meshguard.inject.posture.isolation` — meshguard's own checks, stricter than
  baseline where the loopback isolation needs it (uids and gids, SETUID/SETGID, NET_RAW,
  privilege escalation, ...), each with its reason (:data:`OWN_REASONS`).

Which containers are checked comes from the pod view's classification
(:func:`meshguard.pod.read_pod`), never from names: Istio's and meshguard's own containers
are exempt from the workload checks only where Istio's status and their place say they are
theirs, and even then Istio's init steps may hold no more than Istio gives them. Ephemeral
(``kubectl debug``) containers get the same checks; they cannot be patched after the fact, so
their findings are always refusals.

Per check an action is configured: ``deny`` refuses the pod, naming the container, the field
and the fix; ``fix`` decides a patch of the spec (dropping a capability, assigning a uid, ...),
carried by the finding as data (:class:`Fix`, made by :func:`apply_fixes`), and says what it
changes, and refuses what has no safe patch (host network, a hostPath, ...);
``report`` changes and refuses nothing: the findings become warnings (a pod in audit mode
gets :attr:`PostureSettings.audit_action`, ``report`` by default). Every finding ends fixed,
refused or reported (:class:`Outcome`), never silently kept.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from meshguard.inject.posture import baseline, isolation
from meshguard.inject.posture.baseline import safe_sysctls, selinux_types
from meshguard.inject.posture.baseline_version import (
    LATEST,
    LATEST_MINOR,
    BadBaselineVersionError,
    BaselineVersion,
    parse_baseline_version,
)
from meshguard.inject.posture.capabilities import (
    ALL_CAPABILITIES,
    BASELINE_CAPABILITIES,
    DEFAULT_CAPABILITIES,
)
from meshguard.inject.posture.model import (
    BASELINE_CHECKS,
    OWN_REASONS,
    UNFIXABLE,
    Check,
    Finding,
    Fix,
    Origin,
    Outcome,
    PostureAction,
    PostureSettings,
    Review,
    apply_fixes,
    final_fixes,
    origin,
)
from meshguard.pod import PodView

__all__ = [
    "ALL_CAPABILITIES",
    "BASELINE_CAPABILITIES",
    "BASELINE_CHECKS",
    "DEFAULT_CAPABILITIES",
    "LATEST",
    "LATEST_MINOR",
    "OWN_REASONS",
    "UNFIXABLE",
    "BadBaselineVersionError",
    "BaselineVersion",
    "Check",
    "Finding",
    "Fix",
    "Origin",
    "Outcome",
    "PostureAction",
    "PostureSettings",
    "apply_fixes",
    "final_fixes",
    "origin",
    "parse_baseline_version",
    "refusals",
    "review_ephemeral",
    "review_posture",
    "safe_sysctls",
    "selinux_types",
]


def review_posture(
    spec: Mapping[str, Any], *, pod: PodView, settings: PostureSettings
) -> list[Finding]:
    """Every finding on the pod, fixed or not; a fixed one carries its fix as data
    (:class:`Fix`, made by :func:`apply_fixes`). ``spec`` is not edited.

    ``pod`` is the view of this very spec: its classification says which containers are
    Istio's, meshguard's and the workload's.
    """
    review = Review.of(spec, pod=pod, settings=settings)
    baseline.check_pod(review)
    isolation.check_pod_groups(review)
    for container in pod.containers:
        baseline.check_container(review, isolation.subject(review, container))
    for container in pod.mesh_init:
        isolation.check_mesh_init(review, isolation.subject(review, container))
    for container in pod.workload:
        isolation.check_container(review, isolation.subject(review, container))
    isolation.check_uids(review)
    isolation.check_ephemeral(review, {c.name for c in pod.ephemeral})
    return review.findings


def review_ephemeral(
    spec: Mapping[str, Any], *, pod: PodView, settings: PostureSettings, names: Collection[str]
) -> list[Finding]:
    """The findings on the named ephemeral containers (``kubectl debug`` adding them)."""
    review = Review.of(spec, pod=pod, settings=settings)
    isolation.check_ephemeral(review, names)
    return review.findings


def refusals(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.outcome is Outcome.REFUSED]
