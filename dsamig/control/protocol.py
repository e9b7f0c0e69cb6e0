"""The control protocol's messages: newline-delimited JSON in the style of QMP.

On connect the daemon sends one greeting line.  Then each request is one
line, ``{"execute": "cmd", "arguments": {...}, "id": ANY}``, answered by one
line, ``{"return": ..., "id": ANY}`` or ``{"error": {"class": ...,
"desc": ...}, "id": ANY}`` (``id`` echoed when given).  A client that
subscribed also gets event lines, ``{"event": NAME, "data": {...},
"timestamp": {"seconds": S, "microseconds": US}}``, between replies.
``docs/control-api.md`` documents every command.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
#: A request line longer than this is refused (the rest of it is discarded).
MAX_REQUEST_LINE = 64 * 1024
#: Replies can be long (``query-jobs`` with many retained jobs): the client's bound.
MAX_REPLY_LINE = 64 * 1024 * 1024

EVENT_JOB_STATUS_CHANGE = "JOB_STATUS_CHANGE"
EVENT_SHUTDOWN = "SHUTDOWN"
EVENTS = (EVENT_JOB_STATUS_CHANGE, EVENT_SHUTDOWN)


class ErrorClass(enum.StrEnum):
    """The ``class`` of an error reply."""

    GENERIC = "GenericError"  # the request itself is malformed
    COMMAND_NOT_FOUND = "CommandNotFound"
    INVALID_ARGUMENT = "InvalidArgument"
    JOB_NOT_FOUND = "JobNotFound"
    INVALID_STATE = "InvalidState"  # e.g. cancelling a finished job
    UNAVAILABLE = "Unavailable"  # shutting down, queue full
    INTERNAL = "InternalError"  # a bug: logged by the daemon


class CommandError(Exception):
    """A command failed; becomes an error reply of ``error_class``."""

    def __init__(self, error_class: ErrorClass, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


_NO_ID = object()


@dataclass
class Request:
    """One parsed request line."""

    execute: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = _NO_ID

    def reply(self, message: dict[str, Any]) -> dict[str, Any]:
        """``message`` with this request's ``id``, when it had one."""
        if self.id is not _NO_ID:
            message["id"] = self.id
        return message


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> Request:
    """Decode one request line, or raise CommandError(GenericError) saying why.

    When the line is a JSON object with an ``id``, the error carries it in
    ``request_id`` so the error reply can still echo it.
    """
    try:
        obj = json.loads(line, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise CommandError(ErrorClass.GENERIC, f"request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandError(ErrorClass.GENERIC, "request must be a JSON object")
    request_id = obj.get("id", _NO_ID)
    problem: str | None = None
    unknown = sorted(set(obj) - {"execute", "arguments", "id"})
    if unknown:
        problem = f"request has unknown key {unknown[0]!r} (allowed: execute, arguments, id)"
    elif not isinstance(obj.get("execute"), str):
        problem = "request needs \"execute\": the command name as a string"
    elif not isinstance(obj.get("arguments", {}), dict):
        problem = "\"arguments\" must be a JSON object"
    if problem is not None:
        error = CommandError(ErrorClass.GENERIC, problem)
        error.request_id = request_id  # type: ignore[attr-defined]
        raise error
    return Request(obj["execute"], obj.get("arguments", {}), request_id)


def error_reply(error_class: ErrorClass | str, desc: str) -> dict[str, Any]:
    """An error answer (without ``id``)."""
    return {"error": {"class": str(error_class), "desc": desc}}


def event_message(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event line with QMP's timestamp."""
    now = time.time()
    seconds = int(now)
    return {
        "event": name,
        "data": data,
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
    }


def encode_line(message: dict[str, Any]) -> bytes:
    """One message as one line (compact JSON, UTF-8, newline)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def request_id_of(error: CommandError) -> Any:
    """The ``id`` of the malformed request ``error`` is about, if it could be read."""
    return getattr(error, "request_id", _NO_ID)


def with_id(message: dict[str, Any], request_id: Any) -> dict[str, Any]:
    """``message`` with ``request_id`` added, unless there was none."""
    if request_id is not _NO_ID:
        message["id"] = request_id
    return message
