"""dsamig's error classes and the exit codes they map to.

Every error a user can cause or meet carries a one-line message that names the
problem (the path, the address, the field); the CLI prints it without a
traceback and exits with the class's code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TRANSFER = 1  # the job ran and failed (peer error, integrity, disconnect)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_LOCAL_IO = 3  # the image or the output cannot be read, created or written
EXIT_NETWORK = 4  # cannot listen, cannot connect
EXIT_CANCELLED = 5  # dsamig start --wait: the job was cancelled
# 128 + the signal's number, as a shell reports a command a signal ended:
EXIT_HANGUP = 129  # SIGHUP: the terminal went away during a one-shot command
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C) or SIGTERM ended a one-shot command


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
