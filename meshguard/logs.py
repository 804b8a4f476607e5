"""Structured logging: one JSON object per line, for decisions and lifecycle events.

Library code logs through :mod:`logging` with ``extra={"fields": {...}}``; the CLI installs
:class:`JsonFormatter` on stderr. Nothing in the library prints.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import time
from typing import Any, TextIO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, sort_keys=False, default=str)


#: Log records buffered between a server's event loop and the thread that writes them.
BUFFERED_RECORDS = 100_000


class _BlockingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; waits (never drops) when the buffer is full."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self._records = records

    def enqueue(self, record: logging.LogRecord) -> None:
        self._records.put(record)


def configure(
    *, stream: TextIO, level: int = logging.INFO, background: bool = False
) -> logging.handlers.QueueListener | None:
    """Send meshguard's logs to ``stream`` as JSON lines.

    ``background``: for servers — the event loop only queues records and a thread writes
    them, so a slow reader of ``stream`` (a stalled log pipe) does not stall every request
    until the buffer of :data:`BUFFERED_RECORDS` is full. Returns the listener to stop at exit.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("meshguard")
    root.setLevel(level)
    root.propagate = False
    if not background:
        root.handlers[:] = [handler]
        return None
    records: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=BUFFERED_RECORDS)
    listener = logging.handlers.QueueListener(records, handler)
    root.handlers[:] = [_BlockingQueueHandler(records)]
    listener.start()
    return listener
