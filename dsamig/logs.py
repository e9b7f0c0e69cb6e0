"""Logging setup: structlog, JSON lines when not on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "warning", *, json: bool | None = None, stream: Any = None) -> None:
    """Send structlog events to ``stream`` (stderr): JSON unless it is a terminal.

    Called once by the CLI; library code only calls ``get_logger``.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    """A bound structlog logger carrying ``context`` (job id, channel, ...)."""
    return structlog.get_logger("dsamig").bind(**context)
