"""Protocol errors, split by whose fault they are.

A :class:`LocalProtocolError` means this side was about to do something the
protocol forbids (a bug in the caller); a :class:`RemoteProtocolError` means the
peer sent something the protocol forbids. Both carry the :class:`ErrorCode`
that an ERROR frame reporting them should use.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """The ``code`` field of an ERROR frame (docs/protocol.md, "ERROR")."""

    PROTOCOL = 1
    VERSION = 2
    REJECTED = 3
    IO = 4
    INTEGRITY = 5
    CANCELLED = 6
    INTERNAL = 7
    AUTH = 8


class ProtocolError(Exception):
    """Base class of protocol violations; ``code`` says how to report it."""

    code: ErrorCode

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        """The human-readable description, naming the field and its value."""
        return str(self.args[0]) if self.args else ""


class LocalProtocolError(ProtocolError):
    """This side tried to encode or send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class LimitExceededError(RemoteProtocolError):
    """The peer went beyond one of this side's limits (reconnects, a minimum
    rate). What it sent is sound, so a receiver keeps it for a resume."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.REJECTED)


class ChannelRefusedError(RemoteProtocolError):
    """One channel is refused (a stray or forged HELLO); its job goes on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.REJECTED)


__all__ = [
    "ChannelRefusedError",
    "ErrorCode",
    "LimitExceededError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]
