"""dsamig's error classes and the exit codes (``dsamig.settings``) they map to.

Every error a user can cause or meet carries a one-line message that names the
problem (the path, the address, the field); the CLI prints it without a
traceback and exits with the class's code.
"""

from __future__ import annotations

from dsamig.settings import (
    EXIT_LOCAL_IO,
    EXIT_NETWORK,
    EXIT_TRANSFER,
    EXIT_USAGE,
)


class DsamigError(Exception):
    """Base of every error dsamig reports to a user."""

    exit_code = EXIT_TRANSFER


class ConfigError(DsamigError):
    """Bad arguments, options or configuration values."""

    exit_code = EXIT_USAGE


class SourceError(DsamigError):
    """The image cannot be opened, read or mapped."""

    exit_code = EXIT_LOCAL_IO


class SinkError(DsamigError):
    """The destination cannot be created, written or committed."""

    exit_code = EXIT_LOCAL_IO


class NetworkError(DsamigError):
    """A listener cannot be bound or a peer cannot be reached."""

    exit_code = EXIT_NETWORK


class TransferError(DsamigError):
    """A job failed after it started: the peer failed, vanished or broke the protocol."""

    exit_code = EXIT_TRANSFER


class EngineError(DsamigError):
    """The zero-page engine cannot be started or failed."""

    exit_code = EXIT_USAGE
