"""Logging setup: one line per event, JSON when not on a terminal, fit for the journal.

* Not a terminal: one JSON object per line (``journalctl -o cat ... | jq``).
* A terminal: ``17:23:07 info     job finished  name=vm-1 status=completed ...``,
  nested figures flattened to ``key.sub=value``.
* stderr connected to the journal (``$JOURNAL_STREAM`` names its device and
  inode): each line starts with its syslog priority, ``<6>`` for info, which
  journald strips and records, so ``journalctl -p warning`` selects by level.

Everything else that would write to stderr is routed through the same
pipeline, so no raw traceback breaks the line format: the standard
``logging`` module (asyncio reports through it), ``warnings``, exceptions of
threads, and asyncio's exception handler (:func:`loop_exception_handler`).
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")

#: syslog priorities (sd-daemon(3)) of our levels.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

_HANDLER_MARK = "_dsamig_handler"


def stream_is_journal(stream: Any) -> bool:
    """Whether ``stream`` is the journal's stream socket (``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def configure(level: str = "warning", *, json: bool | None = None, stream: Any = None,
              journal: bool | None = None) -> None:
    """Send log events at ``level`` and above to ``stream`` (stderr).

    ``json``: JSON lines, by default unless ``stream`` is a terminal;
    ``journal``: syslog priority prefixes, by default when ``stream`` is the
    journal.  Called by the CLI and on a reload; library code only calls
    :func:`get_logger`.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not _isatty(stream)
    if journal is None:
        journal = stream_is_journal(stream)
    threshold = logging.getLevelNamesMapping()[level.upper()]
    render = render_line(json=json, journal=journal)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(stream, threshold, render, timestamper)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def render_line(*, json: bool, journal: bool) -> Callable[[Any, str, Any], str]:
    """The final processor: JSON or a terminal line, with a priority prefix for the journal."""
    inner: Any = (
        structlog.processors.JSONRenderer(default=str) if json else TerminalRenderer()
    )
    if not journal:
        return inner

    def with_priority(logger: Any, method: str, event_dict: Any) -> str:
        priority = PRIORITIES.get(str(event_dict.get("level", method)), 6)
        return f"<{priority}>{inner(logger, method, event_dict)}"

    return with_priority


def _route_stdlib(stream: Any, threshold: int, render: Callable[[Any, str, Any], str],
                  timestamper: Any) -> None:
    """Render records of the standard ``logging`` module (asyncio's among them),
    warnings and thread exceptions as our own events."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
            structlog.processors.format_exc_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render],
    ))
    root.addHandler(handler)
    root.setLevel(threshold)
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    get_logger(component="thread").error(
        "thread failed", thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def get_logger(**context: Any) -> Any:
    """A bound structlog logger carrying ``context`` (job id, channel, ...)."""
    return structlog.get_logger("dsamig").bind(**context)


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's exception handler: one log event, never a traceback on stderr.

    An unretrieved ``CancelledError`` is the echo of a cancellation we asked
    for (a stopped job), not a failure: it is logged at debug level.
    """
    exc = context.get("exception")
    message = str(context.get("message") or "event loop error")
    where = {key: repr(context[key])[:200] for key in ("future", "task", "handle")
             if key in context}
    log = get_logger(component="loop")
    if isinstance(exc, asyncio.CancelledError):
        log.debug(message, exception_class=type(exc).__name__, **where)
    elif exc is not None:
        log.error(message, exc_info=exc, **where)
    else:
        log.error(message, **where)


class TerminalRenderer:
    """``17:23:07 info     job finished  name=vm-1 status=completed elapsed_s=1.2``.

    Nested values are flattened (``limits.max_jobs=4``); a list of mappings
    is shown as its length; a traceback follows on its own lines.
    """

    def __call__(self, logger: Any, method: str, event_dict: Any) -> str:
        fields = dict(event_dict)
        stamp = str(fields.pop("timestamp", ""))
        level = str(fields.pop("level", method))
        event = str(fields.pop("event", ""))
        exception = fields.pop("exception", None)
        time_of_day = stamp[11:19] if len(stamp) >= 19 else stamp
        pairs = " ".join(f"{key}={_show(value)}" for key, value in _flatten(fields))
        line = f"{time_of_day} {level:<8} {event}" + (f"  {pairs}" if pairs else "")
        return line if exception is None else f"{line}\n{exception}"


def _flatten(fields: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "."))
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
            out.append((name, f"[{len(value)} items]"))
        elif isinstance(value, list | tuple):
            out.append((name, ",".join(str(v) for v in value)))
        else:
            out.append((name, value))
    return out


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text == "" or any(c.isspace() or c in "\"=" for c in text):
        return jsonlib.dumps(text)
    return text
