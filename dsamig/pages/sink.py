"""The destination: a sparse ``.partial`` file, promoted only when verified."""

from __future__ import annotations

import contextlib
import os

from dsamig.errors import SinkError
from dsamig.native import impl

PARTIAL_SUFFIX = ".partial"


class PageSink:
    """Receives pages into ``<path>.partial`` and renames it into place on commit.

    The partial file is created at the image size without writing anything, so
    every page that is never written stays a hole: zero pages cost no blocks.
    Normal pages are written with ``pwrite`` (a full disk is an ENOSPC error,
    never a SIGBUS).  ``commit`` fsyncs the file, renames it atomically and
    fsyncs the directory; ``abort`` removes the partial file.  A failed or
    cancelled job therefore never leaves a file under the final name.
    """

    def __init__(self, path: str, image_size: int) -> None:
        self.path = os.path.abspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.image_size = image_size
        self.bytes_written = 0
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise SinkError(f"output directory {directory!r} does not exist")
        if os.path.isdir(self.path):
            raise SinkError(f"output {self.path!r} is a directory")
        try:
            self._fd = os.open(
                self.partial_path,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        except OSError as exc:
            raise SinkError(f"cannot create {self.partial_path!r}: {exc.strerror}") from None
        try:
            os.ftruncate(self._fd, image_size)
        except OSError as exc:
            self.abort()
            raise SinkError(
                f"cannot size {self.partial_path!r} to {image_size} bytes: {exc.strerror}"
            ) from None
        self._open = True

    def write_packet(
        self, payload: memoryview, bitmap: bytes, page_size: int, offset: int, span: int
    ) -> None:
        """Write the normal pages of one verified packet; zero pages are skipped."""
        try:
            self.bytes_written += impl.write_runs(
                self._fd, payload, bitmap, page_size, offset, span
            )
        except OSError as exc:
            raise SinkError(f"cannot write {self.partial_path!r}: {exc.strerror}") from None

    def commit(self) -> None:
        """Make the data durable and give it its final name (blocking: run off-loop)."""
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._open = False
            os.rename(self.partial_path, self.path)
            dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise SinkError(f"cannot commit {self.path!r}: {exc.strerror}") from None

    def abort(self) -> None:
        """Close and delete the partial file; idempotent, never raises."""
        if getattr(self, "_open", True) and hasattr(self, "_fd"):
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._open = False
        try:
            os.unlink(self.partial_path)
        except FileNotFoundError:
            pass
        except OSError:
            pass
