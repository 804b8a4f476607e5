"""What a logged loopback packet means for its pod: a denial event and its counters (pure).

The second part of issue 26 item 2: a packet read from a pod's NFLOG group
(:mod:`meshguard.cni.nflog`) becomes a :class:`Denial` — namespace, pod, the source
container (from the sending socket's uid and the pod's admitted ``meshguard.io/status``:
its containers' uids and the proxy's), the destination (the container that declares the
port, the proxy for its own ports, meshguard's loopback listener), port, protocol and
verdict (the rule's prefix: :data:`DENY_PREFIX` for a dropped packet, :data:`AUDIT_PREFIX`
for one audit mode let through) — written as one JSON line and counted in
:class:`DenialCounters`, a Prometheus counter family whose series are bounded.

The rules' NFLOG statements, their group and prefixes are the compiler's
(:mod:`meshguard.rules.settings`, :mod:`meshguard.rules.chains`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from meshguard.cni.nflog import Logged
from meshguard.mesh import PROXY_PORT_RANGE
from meshguard.rules.settings import AUDIT_PREFIX, DENY_PREFIX
from meshguard.status import PodStatus

PROXY: Final = "istio-proxy"
LISTENER: Final = "meshguard-listener"
UNKNOWN: Final = "unknown"
#: Series kept at most; beyond, one ``overflow`` series counts the rest (see DenialCounters).
MAX_SERIES: Final = 5000
METRIC: Final = "meshguard_loopback_denials_total"
LABELS: Final = ("namespace", "pod", "source", "destination", "verdict")


@dataclass(frozen=True, kw_only=True)
class PodView:
    """What attribution needs of one pod: its admitted status and declared ports."""

    namespace: str
    name: str
    status: PodStatus
    #: container port -> the container that declares it
    ports: Mapping[int, str]


@dataclass(frozen=True, kw_only=True)
class Denial:
    namespace: str
    pod: str
    source: str
    destination: str
    port: int | None
    protocol: str
    family: str
    verdict: str  # "denied" or "would-deny" (audit)
    uid: int | None

    def json_line(self) -> str:
        document = {"event": "loopback-denial", **self.__dict__}
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    def labels(self) -> tuple[str, ...]:
        return (self.namespace, self.pod, self.source, self.destination, self.verdict)


def verdict_of(prefix: str) -> str | None:
    """The verdict a rule's prefix records; None for a prefix that is not meshguard's."""
    return {DENY_PREFIX: "denied", AUDIT_PREFIX: "would-deny"}.get(prefix.strip())


def attribute(logged: Logged, pod: PodView) -> Denial | None:
    """The denial ``logged`` records for ``pod``; None when no meshguard rule logged it."""
    verdict = verdict_of(logged.prefix)
    if verdict is None:
        return None
    return Denial(
        namespace=pod.namespace,
        pod=pod.name,
        source=_source(logged.uid, pod.status),
        destination=_destination(logged.dport, pod),
        port=logged.dport,
        protocol=logged.protocol,
        family=logged.family,
        verdict=verdict,
        uid=logged.uid,
    )


def _source(uid: int | None, status: PodStatus) -> str:
    if uid is None:
        return UNKNOWN
    if status.proxy is not None and uid == status.proxy.uid:
        return PROXY
    owners = sorted(name for name, owner in status.containers.items() if owner == uid)
    # Containers sharing a uid cannot be told apart by the kernel: name them all.
    return "+".join(owners) if owners else f"uid {uid}"


def _destination(port: int | None, pod: PodView) -> str:
    if port is None:
        return UNKNOWN
    if port in pod.ports:
        return pod.ports[port]
    if port == pod.status.listener.port:
        return LISTENER
    low, high = PROXY_PORT_RANGE
    return PROXY if low <= port <= high else f"port {port}"


class DenialCounters:
    """``meshguard_loopback_denials_total`` by namespace, pod, source, destination, verdict.

    A node has a bounded number of pods and each pod a bounded number of containers, so the
    series are bounded by pods x (containers + 2)^2 x 2; ``max_series`` caps them anyway
    (a pod with many uids not its containers', ports not declared): past it, denials count
    in the one series whose labels are all ``overflow``. A pod's series go when it does
    (:meth:`forget`)."""

    def __init__(self, *, max_series: int = MAX_SERIES) -> None:
        self._max = max_series
        self._counts: dict[tuple[str, ...], int] = {}

    def add(self, denial: Denial) -> None:
        key = denial.labels()
        if key not in self._counts and len(self._counts) >= self._max:
            key = ("overflow",) * len(LABELS)
        self._counts[key] = self._counts.get(key, 0) + 1

    def forget(self, *, namespace: str, pod: str) -> None:
        for key in [k for k in self._counts if k[:2] == (namespace, pod)]:
            del self._counts[key]

    def exposition(self) -> str:
        """The Prometheus text format of the family."""
        lines = [
            f"# HELP {METRIC} Loopback connections meshguard's rules denied (or would deny, in"
            " audit mode), per pod, source and destination container.",
            f"# TYPE {METRIC} counter",
        ]
        for key, count in sorted(self._counts.items()):
            labels = ",".join(
                f'{name}="{_escape(value)}"' for name, value in zip(LABELS, key, strict=True)
            )
            lines.append(f"{METRIC}{{{labels}}} {count}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
