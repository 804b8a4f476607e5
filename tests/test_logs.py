"""JSON lines: one object per record, on the stream (flushed) when logging returns, inside an
event loop too: a decision's line is out before its answer leaves."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshguard.logs import InfoLines, configure, members


class FlushCountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, FlushCountingStream]]:
    stream = FlushCountingStream()
    root = logging.getLogger("meshguard")
    saved = (root.handlers[:], root.level, root.propagate)
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    configure(stream=stream)
    yield logging.getLogger("meshguard.test-logs"), stream
    root.handlers[:], root.level, root.propagate = saved
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line_with_the_fields(logged):
    logger, stream = logged
    logger.info("one", extra={"fields": {"event": "a", "n": 1, "nested": {"x": None}}})
    logger.warning("two %s", "x")
    first, second = lines(stream.getvalue())
    assert first == {
        "time": first["time"], "level": "info", "logger": "meshguard.test-logs",
        "msg": "one", "event": "a", "n": 1, "nested": {"x": None},
    }  # fmt: skip
    assert (second["level"], second["msg"]) == ("warning", "two x")
    stamp = str(first["time"])
    assert len(stamp) == len("2026-01-01T00:00:00.000Z") and stamp.endswith("Z")


def test_every_line_is_flushed_before_logging_returns_also_in_a_loop(logged):
    logger, stream = logged

    async def main() -> list[int]:
        seen = []
        for n in range(3):
            logger.info("decision", extra={"fields": {"n": n}})
            seen.append(len(lines(stream.flushed)))  # before the loop runs anything else
        return seen

    assert asyncio.run(main()) == [1, 2, 3]


def test_an_unencodable_value_is_written_as_text_and_an_error_is_logged(logged):
    logger, stream = logged
    logger.info("odd", extra={"fields": {"value": object}})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    odd, failed = lines(stream.getvalue())
    assert odd["value"] == str(object)
    assert "ValueError: boom" in str(failed["exception"])


def test_info_lines_write_the_formatters_document_directly_and_flushed(logged):
    logger, stream = logged
    lines_of = InfoLines(logger)
    logger.info("decision", extra={"fields": {"event": "decision", "n": 1}})
    lines_of.write("decision", {"event": "decision", "n": 1})
    assert stream.flushed == stream.getvalue()
    through_logging, direct = lines(stream.getvalue())
    assert direct == through_logging | {"time": direct["time"]}
    assert through_logging["time"][:16] == direct["time"][:16]


def test_repeated_fields_encoded_once_make_the_same_line(logged):
    logger, stream = logged
    repeated = members({"event": "decision", "request": {"path": '/a"b', "port": 1}, "x": None})
    logger.info("decision", extra={"fields": {**repeated.fields, "us": 7}})
    InfoLines(logger).write("decision", {"us": 7}, repeated=repeated)
    through_logging, direct = stream.getvalue().splitlines()
    assert direct.split('"level"', 1)[1] == through_logging.split('"level"', 1)[1]
    assert json.loads(direct)["request"] == {"path": '/a"b', "port": 1}


def test_info_lines_go_through_logging_when_another_handler_listens(logged, caplog):
    logger, stream = logged
    root = logging.getLogger("meshguard")
    root.propagate = True  # caplog's handler sits on the root logger
    caplog.set_level(logging.INFO)
    InfoLines(logger).write("decision", {"n": 2}, repeated=members({"event": "decision"}))
    captured = [r.fields for r in caplog.records if r.name == logger.name]  # type: ignore[attr-defined]
    assert captured and all(fields == {"event": "decision", "n": 2} for fields in captured)
    assert lines(stream.getvalue())[0]["n"] == 2  # meshguard's handler wrote it too


def test_info_lines_write_nothing_below_their_level(logged):
    logger, stream = logged
    logging.getLogger("meshguard").setLevel(logging.WARNING)
    lines_of = InfoLines(logger)
    assert not lines_of.enabled
    lines_of.write("decision", {"event": "decision"})
    assert stream.getvalue() == ""


def test_records_carry_no_thread_or_process_names(logged):
    logger, _ = logged
    record = logger.makeRecord(logger.name, logging.INFO, "", 0, "x", (), None)
    assert (record.threadName, record.processName, record.process) == (None, None, None)
    assert logging.logThreads is False


@pytest.mark.parametrize("module", ["meshguard.cni.plugin", "meshguard.cli.init"])
def test_the_per_pod_commands_do_not_import_asyncio(module):
    """meshguard init and the CNI plugin run at every pod start: logging does not pull in
    asyncio (a tenth of a second of imports) for them."""
    code = f"import sys, {module}; print('asyncio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "False"


class FailingStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_info_lines_on_a_failing_stream_report_it_and_never_raise(capsys):
    root = logging.getLogger("meshguard")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        configure(stream=FailingStream())
        InfoLines(logging.getLogger("meshguard.test-logs")).write("decision", {"n": 3})
    finally:
        root.handlers[:], root.level, root.propagate = saved
    assert "No space left on device" in capsys.readouterr().err  # logging's handleError
