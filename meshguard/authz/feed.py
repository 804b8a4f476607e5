"""One pod watch for all ``serve-authz --workers`` processes: the parent feeds its children.

The parent process runs the only :class:`~meshguard.authz.store.KubernetesStore` (one LIST
and one WATCH against the API server, whatever the number of workers) and sends every
change to each worker over a pipe it created for that worker and nobody else holds:
the complete view after a LIST, then each pod's new policy (or its removal), and the
watch's figures with bookmarks. A worker keeps a :class:`FedStore`: NOT_SERVING until the
first complete view arrives, then the same answers as the parent's store.

Frames are an 8-byte length and a pickle of frozen dataclasses (:class:`~meshguard.authz.
store.Snapshot`, :class:`~meshguard.authz.store.Update`): the policies are built (parsed,
verified) once, in the parent, and a worker loads 10,000 of them in a fraction of the time
it would take to build them. Pickle is acceptable here only because the pipe is private to
the two processes (same program, same uid, created by the parent, inherited by the child
alone); the feed is never read from a socket or a file.

A slow worker never stalls the watch: each worker has its own queue and writer thread.
A worker started again gets a pipe and a feed of its own, the current view first.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import struct
import threading
import time
from typing import Final

from meshguard.authz.decision import PodPolicy
from meshguard.authz.store import Change, Snapshot, StoreStats, Update

log = logging.getLogger(__name__)

_HEADER: Final = struct.Struct("!Q")
MAX_FRAME_BYTES: Final = 1 << 30


def encode(change: Change) -> bytes:
    body = pickle.dumps(change, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class FrameEncoder:
    """Each change encoded once for every worker's feed: the store hands the same change
    object to its subscribers one after the other (under its lock), so the last frame is
    reused while the change is the same object."""

    def __init__(self) -> None:
        self._change: Change | None = None
        self._frame = b""

    def __call__(self, change: Change) -> bytes:
        if change is not self._change:
            self._frame, self._change = encode(change), change
        return self._frame


class Feed:
    """The parent's side of one worker's pipe: a store subscriber that queues each change's
    frame (from the ``encoder`` all the workers' feeds share) to the pipe's writer."""

    def __init__(self, fd: int, *, name: str, encoder: FrameEncoder) -> None:
        self._writer = FeedWriter(fd, name=name)
        self._encode = encoder

    def __call__(self, change: Change) -> None:
        self._writer.send(self._encode(change))

    def close(self) -> None:
        self._writer.close()


class FeedWriter:
    """The parent's end of one worker's pipe: frames queue up, a thread writes them."""

    def __init__(self, fd: int, *, name: str) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name=f"feed-{name}", daemon=True)
        self._thread.start()

    def send(self, frame: bytes) -> None:
        if self._thread.is_alive():  # a worker that is gone gets nothing queued for it
            self._queue.put(frame)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _write(self) -> None:
        try:
            while (frame := self._queue.get()) is not None:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as exc:  # the worker is gone: its parent stops it anyway
            log.warning("worker feed closed: %s", exc, extra={"fields": {"event": "feed-closed"}})
        finally:
            os.close(self._fd)


class FedStore:
    """A worker's policy store, fed by its parent's watch (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._policies: dict[str, PodPolicy] = {}
        self._stats = StoreStats(pods=0, synced_at=None)
        self._received_at: float | None = None
        self.synced = threading.Event()
        self._thread = threading.Thread(target=self.run, name="meshguard-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def get(self, key: str) -> PodPolicy | None:
        return self._policies.get(key)

    def is_synced(self) -> bool:
        return self.synced.is_set()

    def stats(self) -> StoreStats:
        """The parent's watch figures, with this worker's own cache size."""
        return StoreStats(
            pods=len(self._policies),
            synced_at=self._stats.synced_at,
            relists=self._stats.relists,
            watch_restarts=self._stats.watch_restarts,
        )

    def run(self) -> None:
        with os.fdopen(self._fd, "rb", buffering=1 << 20) as stream:
            while (header := stream.read(_HEADER.size)) and len(header) == _HEADER.size:
                (size,) = _HEADER.unpack(header)
                if size > MAX_FRAME_BYTES:
                    break
                body = stream.read(size)
                if len(body) != size:
                    break
                self.apply(pickle.loads(body))  # noqa: S301 - the parent's private pipe
        log.warning(
            "the parent's feed ended: serving the last known policies",
            extra={"fields": {"event": "feed-ended"}},
        )

    def apply(self, change: Change) -> None:
        self._stats = change.stats
        self._received_at = time.time()
        if isinstance(change, Snapshot):
            self._policies = dict(change.policies)
            self.synced.set()
        elif isinstance(change, Update) and change.key:
            if change.policy is None:  # one dict operation: atomic for readers
                self._policies.pop(change.key, None)
            else:
                self._policies[change.key] = change.policy
