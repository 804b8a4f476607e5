"""Structured logging: one JSON object per line, for decisions and lifecycle events.

Library code logs through :mod:`logging` with ``extra={"fields": {...}}``; the CLI installs
:class:`JsonFormatter` on stderr. Nothing in the library prints.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

#: JSON for a line: anything the encoder does not know is written as its str().
_encode = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        document = self.document(
            created=record.created, level=record.levelname, logger=record.name,
            msg=record.getMessage(), fields=fields if isinstance(fields, dict) else None,
        )  # fmt: skip
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return _encode(document)

    def document(
        self,
        *,
        created: float,
        level: str,
        logger: str,
        msg: str,
        fields: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The JSON object of one line, before encoding."""
        document: dict[str, Any] = {
            "time": self.stamp(created),
            "level": level.lower(),
            "logger": logger,
            "msg": msg,
        }
        if fields:
            document.update(fields)
        return document

    def encode(self, document: Mapping[str, Any]) -> str:
        return _encode(document)

    def stamp(self, created: float) -> str:
        """The ``time`` of a line: UTC to the millisecond, ISO 8601."""
        msecs = int((created - int(created)) * 1000)
        return f"{self._time(created)}.{msecs:03d}Z"

    def _time(self, created: float) -> str:
        """UTC to the second, formatted once per second (a server logs thousands a second)."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._stamp


def configure(*, stream: TextIO, level: int = logging.INFO) -> None:
    """Send meshguard's logs to ``stream`` as JSON lines, written and flushed synchronously:
    the authz server's decision line is out before its answer leaves (a crash loses no
    line of a delivered answer).

    A thread-and-queue writer was measured at +120 us of CPU per authz Check (a third of
    meshguard's own cost per Check), so the servers write directly; container runtimes drain
    stderr continuously. Batching lines per event-loop pass or on a timer was measured no
    cheaper per Check, and gives up that guarantee. The records carry no thread, process or
    multiprocessing names (the JSON lines do not show them; the logging HOWTO's
    optimizations): the authz server logs a record per Check.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("meshguard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@dataclass(frozen=True)
class Members:
    """Fields that many lines repeat, JSON-encoded once (``text``: the members, no braces)."""

    fields: Mapping[str, Any]
    text: str


def members(fields: Mapping[str, Any]) -> Members:
    return Members(fields=dict(fields), text=_encode(fields)[1:-1])


class InfoLines:
    """One logger's INFO lines with fields, for a line per request (the authz decisions).

    When meshguard's own handler (:func:`configure`) is the only one the logger's records
    reach, a line is the document :class:`JsonFormatter` makes, written and flushed on that
    handler's stream under its lock, without a :class:`logging.LogRecord` per line (the record,
    its handler chain and its formatting were two thirds of a Check's logging cost). Any other
    configuration (another handler, a filter, a test's capture) gets the line through
    :mod:`logging` as any record. Read at construction: build it after logging is configured.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._direct = _sole_json_handler(logger)
        self._head = functools.lru_cache(maxsize=64)(self._head_of)

    @property
    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(
        self, msg: str, fields: Mapping[str, Any], *, repeated: Members | None = None
    ) -> None:
        """One line: ``msg``, the ``repeated`` fields (encoded once, see :func:`members`),
        then ``fields``."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        handler = self._direct
        if handler is None:
            self._through_logging(msg, fields, repeated)
            return
        try:
            self._write_direct(handler, msg, fields, repeated)
        except Exception:  # a failing stream: logging's own handling reports it, never raises
            self._through_logging(msg, fields, repeated)

    def _write_direct(
        self,
        handler: logging.StreamHandler[TextIO],
        msg: str,
        fields: Mapping[str, Any],
        repeated: Members | None,
    ) -> None:
        formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
        parts = [f'{{"time": "{formatter.stamp(time.time())}", {self._head(msg)}']
        if repeated is not None and repeated.text:
            parts.append(repeated.text)
        if fields:
            parts.append(_encode(fields)[1:-1])
        line = ", ".join(parts) + "}\n"
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(line)
            handler.stream.flush()

    def _head_of(self, msg: str) -> str:
        """The members after ``time``, as :meth:`JsonFormatter.document` orders them."""
        return _encode({"level": "info", "logger": self._logger.name, "msg": msg})[1:-1]

    def _through_logging(
        self, msg: str, fields: Mapping[str, Any], repeated: Members | None
    ) -> None:
        # Logger.info without its caller lookup (a stack walk per line; the JSON line shows
        # no file and line).
        every = {**repeated.fields, **fields} if repeated is not None else dict(fields)
        self._logger.handle(
            self._logger.makeRecord(
                self._logger.name, logging.INFO, "", 0, msg, (), None, extra={"fields": every}
            )
        )


def _sole_json_handler(logger: logging.Logger) -> logging.StreamHandler[TextIO] | None:
    """The handler of :func:`configure` if it alone sees the logger's INFO records, unfiltered."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    if len(handlers) != 1:
        return None
    (handler,) = handlers
    plain = type(handler) is logging.StreamHandler and not handler.filters
    if not plain or not isinstance(handler.formatter, JsonFormatter):
        return None
    if handler.level > logging.INFO:
        return None
    return handler  # type: ignore[return-value]
