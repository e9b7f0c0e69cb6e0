"""The destination: a sparse ``.partial`` file, promoted only when verified."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable

from dsamig.errors import SinkError
from dsamig.native import impl

PARTIAL_SUFFIX = ".partial"
PROGRESS_SUFFIX = ".progress"


class PageSink:
    """Receives pages into ``<path>.partial`` and renames it into place on commit.

    The partial file is created at the image size without writing anything, so
    every page that is never written stays a hole: zero pages cost no blocks.
    Normal pages are written with ``pwrite`` (a full disk is an ENOSPC error,
    never a SIGBUS).  ``commit`` fsyncs the file, renames it atomically and
    fsyncs the directory; ``abort`` removes the partial file.  A failed or
    cancelled job therefore never leaves a file under the final name.

    For resume, ``checkpoint`` makes the data written so far durable and then
    stores an opaque progress record beside the partial file
    (``<path>.partial.progress``); ``open(keep_partial=True)`` reuses an
    existing partial file and ``load_checkpoint`` returns that record.

    Construction only checks the path; ``open`` creates or reopens the file.
    """

    def __init__(self, path: str, image_size: int) -> None:
        self.path = os.path.abspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.progress_path = self.partial_path + PROGRESS_SUFFIX
        self.image_size = image_size
        self.bytes_written = 0
        self._fd = -1
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise SinkError(f"output directory {directory!r} does not exist")
        if os.path.isdir(self.path):
            raise SinkError(f"output {self.path!r} is a directory")

    def open(self, *, keep_partial: bool = False) -> bool:
        """Create the partial file, or with ``keep_partial`` reuse one of the
        right size; return True when an existing partial file was kept."""
        if self._fd >= 0:
            return False
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        if keep_partial:
            try:
                fd = os.open(self.partial_path, flags & ~os.O_CREAT)
            except OSError:
                pass
            else:
                if os.fstat(fd).st_size == self.image_size:
                    self._fd = fd
                    return True
                os.close(fd)
        try:
            self._fd = os.open(self.partial_path, flags | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise SinkError(f"cannot create {self.partial_path!r}: {exc.strerror}") from None
        self._drop_checkpoint()
        try:
            os.ftruncate(self._fd, self.image_size)
        except OSError as exc:
            self.abort()
            raise SinkError(
                f"cannot size {self.partial_path!r} to {self.image_size} bytes: {exc.strerror}"
            ) from None
        return False

    def reset(self) -> None:
        """Throw away what a kept partial file holds: back to a fresh sparse file."""
        try:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.image_size)
        except OSError as exc:
            raise SinkError(f"cannot reset {self.partial_path!r}: {exc.strerror}") from None
        self._drop_checkpoint()

    def discard(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Make byte ranges ``(offset, length)`` of the partial file read as
        zeros again, freeing their blocks (holes).

        A kept partial file may hold bytes that no checkpoint recorded (a
        receiver killed between writing and checkpointing); a zero page that
        arrives for such a place is never written, so the place must be a
        hole first.  Returns False where the file system cannot punch holes
        (the caller then starts from an empty file); SinkError otherwise.
        """
        try:
            for offset, length in ranges:
                impl.punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise SinkError(
                f"cannot clear pages of {self.partial_path!r}: {exc.strerror}"
            ) from None
        return True

    def load_checkpoint(self) -> bytes | None:
        """The progress record stored by the last ``checkpoint``, if any."""
        try:
            with open(self.progress_path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def checkpoint(self, record: bytes) -> None:
        """Make every page written so far durable, then store ``record``.

        The data is fsynced before the record is written, so a record never
        claims pages a crash could lose.  Blocking: run it off the loop.
        """
        temp = self.progress_path + ".tmp"
        try:
            os.fsync(self._fd)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, self.progress_path)
        except OSError as exc:
            raise SinkError(f"cannot checkpoint {self.partial_path!r}: {exc.strerror}") from None

    def _drop_checkpoint(self) -> None:
        for path in (self.progress_path, self.progress_path + ".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def write_packet(
        self, payload: memoryview, bitmap: bytes, page_size: int, offset: int, span: int
    ) -> None:
        """Write the normal pages of one verified packet; zero pages are skipped."""
        try:
            self.bytes_written += impl.write_runs(
                self._fd, payload, bitmap, page_size, offset, span
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                what = "no space left on device"
                if exc.errno == errno.EDQUOT:
                    what = "disk quota exceeded"
                raise SinkError(f"{what} writing {self.partial_path!r}") from None
            raise SinkError(f"cannot write {self.partial_path!r}: {exc.strerror}") from None

    def commit(self) -> None:
        """Make the data durable and give it its final name (blocking: run off-loop)."""
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.rename(self.partial_path, self.path)
            self._drop_checkpoint()
            dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise SinkError(f"cannot commit {self.path!r}: {exc.strerror}") from None

    def abort(self, *, keep_for_resume: bool = False) -> None:
        """Close; delete the partial file and its checkpoint unless
        ``keep_for_resume`` (then a later job may continue from the
        checkpoint).  Idempotent, never raises."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if keep_for_resume:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.partial_path)
        self._drop_checkpoint()
