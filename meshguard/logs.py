"""Structured logging: one JSON object per line, for decisions and lifecycle events.

Library code logs through :mod:`logging` with ``extra={"fields": {...}}``; the CLI installs
:class:`JsonLinesHandler` with :class:`JsonFormatter` on stderr. Nothing in the library prints.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import asyncio


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._encode = json.JSONEncoder(default=str, check_circular=False).encode

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": f"{self._time(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return self._encode(document)

    def _time(self, created: float) -> str:
        """UTC to the second, formatted once per second (a server logs thousands a second)."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._stamp


class JsonLinesHandler(logging.Handler):
    """Writes each record as one line. Outside an asyncio loop every line is written and
    flushed at once; inside a running loop the lines are written together at the end of the
    loop's current pass (one write for all the Checks answered in it, before the loop waits
    for I/O again), not later."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._pending: list[str] = []
        self._scheduled: set[asyncio.AbstractEventLoop] = set()
        self._write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # logging must never raise into its caller
            self.handleError(record)
            return
        loop = _running_loop()
        with self._write_lock:
            self._pending.append(line)
            if loop is not None and loop in self._scheduled:
                return
            if loop is not None and not loop.is_closed():
                self._scheduled.add(loop)
                loop.call_soon(self._flush_for, loop)
                return
        self.flush()

    def _flush_for(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._write_lock:
            self._scheduled.discard(loop)
        self.flush()

    def flush(self) -> None:
        with self._write_lock:
            lines, self._pending = self._pending, []
            if not lines:
                return
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing to write to
                return

    def close(self) -> None:
        self.flush()
        super().close()


def configure(*, stream: TextIO, level: int = logging.INFO) -> None:
    """Send meshguard's logs to ``stream`` as JSON lines (:class:`JsonLinesHandler`).

    A thread-and-queue writer was measured at +120 us of CPU per authz Check (a third of
    meshguard's own cost per Check), so the servers write in their own thread; container
    runtimes drain stderr continuously. The records carry no thread, process or
    multiprocessing names (the JSON lines do not show them; the logging HOWTO's
    optimizations): the authz server logs a record per Check.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = JsonLinesHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("meshguard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, if any. asyncio is not imported for it: a process that never
    imported asyncio has no loop, and the short-lived commands (meshguard init, the CNI plugin
    at every pod start) save its import (~0.1 s on a small VM)."""
    module = sys.modules.get("asyncio")
    if module is None:
        return None
    try:
        loop: asyncio.AbstractEventLoop = module.get_running_loop()
    except RuntimeError:
        return None
    return loop
