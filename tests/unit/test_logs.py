"""Log lines: JSON or a readable terminal line, syslog priorities for the journal,
and everything else that writes to stderr routed through the same pipeline."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Iterator

import pytest
import structlog

from dsamig.logs import (
    configure,
    get_logger,
    loop_exception_handler,
    stream_is_journal,
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    hook = threading.excepthook
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dsamig_handler", False):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    threading.excepthook = hook


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines() -> None:
    out = io.StringIO()
    configure("info", json=True, stream=out)
    get_logger(role="sender", job="j1").info("job finished", status="completed",
                                             figures={"zero": 1}, path=b"raw")
    get_logger().debug("not shown")
    (line,) = lines(out)
    event = json.loads(line)
    assert event["event"] == "job finished" and event["level"] == "info"
    assert event["figures"] == {"zero": 1} and event["job"] == "j1"
    assert event["path"] == "b'raw'"  # not JSON-able: its text, never a crash


def test_terminal_lines_are_short_and_flat() -> None:
    out = io.StringIO()
    configure("info", json=False, stream=out)
    get_logger(role="receiver").info(
        "daemon ready", limits={"max-jobs": 4, "max-bandwidth": None}, sources=["a", "b"],
        channels=[{"index": 0}, {"index": 1}], note="two words", rate=1 / 3)
    (line,) = lines(out)
    assert line[:9].count(":") == 2 and " info     daemon ready  " in line
    assert "limits.max-jobs=4" in line and "max-bandwidth" not in line
    assert "sources=a,b" in line and 'channels="[2 items]"' in line
    assert 'note="two words"' in line and "rate=0.333333" in line
    assert "{" not in line


def test_journal_lines_start_with_the_syslog_priority() -> None:
    out = io.StringIO()
    configure("debug", json=True, stream=out, journal=True)
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    prefixes = [line[:3] for line in lines(out)]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines(out)] == ["d", "i", "w", "e"]


def test_the_journal_is_recognised_by_device_and_inode(tmp_path, monkeypatch) -> None:
    with open(tmp_path / "stream", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stream_is_journal(stream)
        assert not stream_is_journal(other)
        assert not stream_is_journal(io.StringIO())
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not stream_is_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stream_is_journal(stream)


def test_stdlib_logging_warnings_and_threads_become_events() -> None:
    out = io.StringIO()
    configure("info", json=True, stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    thread = threading.Thread(target=lambda: 1 / 0, name="dsamig-test")
    thread.start()
    thread.join()
    events = [json.loads(line) for line in lines(out)]  # every line is JSON
    stdlib, warned, crashed = events
    assert stdlib["event"] == "Task exception was never retrieved"
    assert stdlib["level"] == "error" and "ValueError: boom" in stdlib["exception"]
    assert warned["level"] == "warning" and "careful" in warned["event"]
    assert crashed["event"] == "thread failed" and crashed["thread"] == "dsamig-test"
    assert "ZeroDivisionError" in crashed["exception"]


async def test_loop_exceptions_are_one_event() -> None:
    out = io.StringIO()
    configure("debug", json=True, stream=out)
    loop = asyncio.get_running_loop()
    loop_exception_handler(loop, {"message": "_GatheringFuture exception was never retrieved",
                                  "exception": asyncio.CancelledError(), "future": "f"})
    loop_exception_handler(loop, {"message": "Exception in callback",
                                  "exception": RuntimeError("bug"), "handle": "h"})
    loop_exception_handler(loop, {"message": "no exception here"})
    cancelled, failed, plain = (json.loads(line) for line in lines(out))
    # A cancellation's echo is not a failure.
    assert cancelled["level"] == "debug" and cancelled["exception_class"] == "CancelledError"
    assert "exception" not in cancelled
    assert failed["level"] == "error" and "RuntimeError: bug" in failed["exception"]
    assert failed["handle"] == "'h'"
    assert plain["level"] == "error" and plain["event"] == "no exception here"
