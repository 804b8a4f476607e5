"""A bounded cache of decisions: the same request about the same admitted pod gets the same
answer without evaluating the policy again. Pure (no I/O).

:func:`~meshguard.authz.decision.decide` is a function of the pod's
:class:`~meshguard.authz.decision.PodPolicy` (a frozen value the store replaces whenever the
pod changes) and of the request's pod key, source address, destination port, method, path
and the values of the headers the pod's rules name (:attr:`PodPolicy.header_names`), and of
nothing else. The cache key holds all of those request attributes, the pod key first; an
entry also holds the very PodPolicy object it was decided for, and answers only while the
store still serves that object (``is``, never equality): a changed, deleted or re-created pod
is a miss, decided afresh. No answer can be stale or belong to another pod.

What the caller checks per request — the store's sync, the caller's identity, the header
size limit — stays outside the cache and runs on every Check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from meshguard.authz.decision import PodPolicy, Request

T = TypeVar("T")

#: Entries kept (first in, first out beyond that).
MAX_ENTRIES = 4096
#: Requests whose path and named header values are longer than this are decided every time:
#: they would make the cache's memory grow with what clients send.
MAX_KEY_CHARS = 1024

_Key = tuple[str, str | None, int | None, str | None, str, tuple[str | None, ...]]


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    pod: PodPolicy
    value: T


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    entries: int
    hits: int
    misses: int
    uncached: int  # requests too large to cache, or about no known pod


class DecisionCache(Generic[T]):
    """``value_of(request, pod)`` per (request attributes, pod object); bounded."""

    def __init__(
        self, *, max_entries: int = MAX_ENTRIES, max_key_chars: int = MAX_KEY_CHARS
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self._max_entries = max_entries
        self._max_key_chars = max_key_chars
        self._entries: dict[_Key, _Entry[T]] = {}
        self._hits = self._misses = self._uncached = 0

    def get(self, request: Request, pod: PodPolicy | None, compute: Callable[[], T]) -> T:
        """The cached value for this request about ``pod`` (the store's current object for
        ``request.pod``), or ``compute()``'s, remembered for next time."""
        key = self._key(request, pod)
        if key is None or pod is None:
            self._uncached += 1
            return compute()
        entry = self._entries.get(key)
        if entry is not None and entry.pod is pod:
            self._hits += 1
            return entry.value
        self._misses += 1
        value = compute()
        if entry is None and len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = _Entry(pod, value)
        return value

    def stats(self) -> CacheStats:
        return CacheStats(
            entries=len(self._entries), hits=self._hits, misses=self._misses,
            uncached=self._uncached,
        )  # fmt: skip

    def _key(self, request: Request, pod: PodPolicy | None) -> _Key | None:
        if pod is None or request.pod is None or request.path is None:
            return None
        if any("_" in name for name in request.headers):
            return None  # ambiguous (decided every time): the key holds only named headers
        values = tuple(request.headers.get(name) for name in pod.header_names)
        size = len(request.path) + sum(len(v) for v in values if v is not None)
        if size > self._max_key_chars:
            return None
        return (request.pod, request.source_address, request.port, request.method,
                request.path, values)  # fmt: skip
