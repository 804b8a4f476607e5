"""JSON lines: one object per record, written at once outside an event loop, and at the end of
the loop's pass (together, before it waits) inside one."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshguard.logs import JsonFormatter, JsonLinesHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, CountingStream]]:
    stream = CountingStream()
    handler = JsonLinesHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("meshguard.test-logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.handlers.clear()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_outside_a_loop_every_line_is_written_at_once(logged):
    logger, stream = logged
    logger.info("one", extra={"fields": {"event": "a", "n": 1}})
    assert lines(stream) == [
        {"time": lines(stream)[0]["time"], "level": "info", "logger": "meshguard.test-logs",
         "msg": "one", "event": "a", "n": 1}
    ]  # fmt: skip
    logger.warning("two %s", "x")
    assert [line["msg"] for line in lines(stream)] == ["one", "two x"]
    assert str(lines(stream)[0]["time"]).endswith("Z")


def test_inside_a_loop_the_lines_of_one_pass_are_written_together_before_it_waits(logged):
    logger, stream = logged

    async def main() -> tuple[int, int]:
        for n in range(5):
            logger.info("decision", extra={"fields": {"n": n}})
        held = len(lines(stream))  # not yet: the pass has not ended
        await asyncio.sleep(0)  # the loop's next pass runs the flush
        await asyncio.sleep(0)
        return held, len(lines(stream))

    held, written = asyncio.run(main())
    assert (held, written) == (0, 5)
    assert stream.writes == 1
    assert [line["n"] for line in lines(stream)] == [0, 1, 2, 3, 4]


def test_a_line_logged_as_the_loop_ends_is_not_lost(logged):
    """asyncio.run runs the loop once more (cancelling tasks, closing generators) after
    the main coroutine: the scheduled write runs then; logging's shutdown flushes too."""
    logger, stream = logged

    async def main() -> None:
        logger.info("last", extra={"fields": {"event": "bye"}})

    asyncio.run(main())  # the loop runs the scheduled flush before it closes
    assert [line["msg"] for line in lines(stream)] == ["last"]


def test_an_unencodable_value_is_written_as_text(logged):
    logger, stream = logged
    logger.info("odd", extra={"fields": {"value": object}})
    assert lines(stream)[0]["value"] == str(object)


@pytest.mark.parametrize("module", ["meshguard.cni.plugin", "meshguard.cli.init"])
def test_the_per_pod_commands_do_not_import_asyncio(module):
    """meshguard init and the CNI plugin run at every pod start: logging does not pull in
    asyncio (a tenth of a second of imports) for them."""
    code = f"import sys, {module}; print('asyncio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "False"
