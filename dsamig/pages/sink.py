"""The destination: a sparse ``.partial`` file, promoted only when verified."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterable

from dsamig.errors import SinkError
from dsamig.native import impl

PARTIAL_SUFFIX = ".partial"
PROGRESS_SUFFIX = ".progress"
TEMP_SUFFIX = ".tmp"
#: Mode of every file the sink creates, whatever the umask.
FILE_MODE = 0o600
#: ioctl FICLONE: share another file's blocks (btrfs, XFS); from linux/fs.h.
FICLONE = 0x40049409


def max_checkpoint_bytes(image_size: int) -> int:
    """The largest progress record an image of ``image_size`` bytes can have.

    A record holds a bit and four bytes per packet, and a packet is at least
    one 512-byte page; anything larger is not ours and is not read.
    """
    return 4096 + image_size // 64


def check_output(path: str, *, dir_fd: int | None = None, replace: bool = True) -> None:
    """The one check of a destination before anything is written to it.

    Its directory exists (or is ``dir_fd``), ``path`` is not a directory,
    and, unless ``replace``, nothing is there yet.  SinkError naming the
    problem otherwise.  Nothing is followed: a link at ``path`` counts as
    something there.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if dir_fd is None and not os.path.isdir(directory):
        raise SinkError(f"output directory {directory!r} does not exist")
    try:
        st = os.stat(os.path.basename(path) if dir_fd is not None else path, dir_fd=dir_fd,
                     follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise SinkError(f"output {path!r} is a directory")
    if not replace:
        raise SinkError(f"output {path!r} already exists (--force replaces it)")


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

    No link is ever followed in the destination directory: every file is
    opened, created, renamed and removed relative to one descriptor of the
    directory (``dir_fd``, e.g. a daemon's ``storage_dir``, or the output's
    directory opened by ``open``), with ``O_NOFOLLOW``.  Files are created
    with ``O_EXCL`` after removing whatever had the name, so a link or a hard
    link planted there is replaced, never written through, and they are mode
    0600.  A kept partial file must be a regular file with no other name.

    ``checkpoint`` and ``commit`` block and run off the loop.  An ``abort``
    that arrives while one of them runs removes the files at once and stops
    it from renaming anything afterwards (a checkpoint may still land if the
    partial file is kept for resume), but the descriptors are closed only
    when it returns, so they are never closed, or reused, under it.

    Construction only checks the path; ``open`` creates or reopens the file.
    """

    def __init__(self, path: str, image_size: int, *, dir_fd: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.name = os.path.basename(self.path)
        self.partial_name = self.name + PARTIAL_SUFFIX
        self.progress_name = self.partial_name + PROGRESS_SUFFIX
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.progress_path = self.partial_path + PROGRESS_SUFFIX
        self.image_size = image_size
        self.bytes_written = 0
        self._fd = -1
        self._given_dir_fd = dir_fd
        self._dir_fd = -1
        self._lock = threading.Lock()
        self._busy = 0  # blocking operations now using the descriptors
        self._aborted: bool | None = None  # keep_for_resume of the abort, once aborted
        self._finished = False  # committed or aborted: nothing more to do
        check_output(self.path, dir_fd=dir_fd)

    # --- the directory ---------------------------------------------------------------

    def _open_directory(self) -> int:
        try:
            if self._given_dir_fd is not None:
                return os.dup(self._given_dir_fd)
            return os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SinkError(
                f"cannot open output directory {self.directory!r}: {exc.strerror}"
            ) from None

    def _begin(self) -> int:
        """Mark a blocking operation as using the descriptors; the directory's."""
        with self._lock:
            if self._fd < 0 or self._dir_fd < 0:
                raise SinkError(f"{self.partial_path!r} is not open")
            self._busy += 1
            return self._dir_fd

    def _end(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._busy == 0 and self._aborted is not None:
                self._close()

    def _may_rename(self) -> bool:
        """Whether a rename may still happen (call with the lock held): never
        after an abort.  Not even a checkpoint of a file kept for resume: the
        next job may already have read the checkpoint there was and punched
        out what it does not cover, and a later record would claim those
        packets."""
        return self._aborted is None

    def _unlink(self, name: str, dir_fd: int) -> None:
        """Remove ``name`` (a link is removed itself); absent is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)

    def _create(self, name: str, dir_fd: int, flags: int) -> int:
        """A new, empty mode-0600 file under ``name``, never through a link."""
        self._unlink(name, dir_fd)
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE, dir_fd=dir_fd)
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits we rely on
        except OSError:
            os.close(fd)
            raise
        return fd

    # --- opening -------------------------------------------------------------------

    def open(self, *, keep_partial: bool = False) -> bool:
        """Create the partial file, or with ``keep_partial`` reuse one of the
        right size; return True when an existing partial file was kept."""
        if self._fd >= 0:
            return False
        self._dir_fd = self._open_directory()
        if keep_partial:
            fd = self._open_kept_partial()
            if fd >= 0:
                self._fd = fd
                return True
        try:
            self._fd = self._create(self.partial_name, self._dir_fd, os.O_RDWR)
        except OSError as exc:
            os.close(self._dir_fd)
            self._dir_fd = -1
            raise SinkError(f"cannot create {self.partial_path!r}: {exc.strerror}") from None
        self._drop_checkpoint(self._dir_fd)
        try:
            os.ftruncate(self._fd, self.image_size)
        except OSError as exc:
            self.abort()
            raise SinkError(
                f"cannot size {self.partial_path!r} to {self.image_size} bytes: {exc.strerror}"
            ) from None
        return False

    def _open_kept_partial(self) -> int:
        """The existing partial file if it may be reused, else -1."""
        try:
            # O_NONBLOCK: a FIFO planted under the name must not hang us.
            fd = os.open(self.partial_name,
                         os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dir_fd)
        except OSError:
            return -1
        try:
            st = os.fstat(fd)
            # A second name would let our writes land in a file outside our care.
            if (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                    and st.st_size == self.image_size):
                os.set_blocking(fd, True)
                return fd
        except OSError:
            pass
        os.close(fd)
        return -1

    def reset(self) -> None:
        """Throw away what a kept partial file holds: back to a fresh sparse file."""
        dir_fd = self._begin()
        try:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.image_size)
            self._drop_checkpoint(dir_fd)
        except OSError as exc:
            raise SinkError(f"cannot reset {self.partial_path!r}: {exc.strerror}") from None
        finally:
            self._end()

    # --- refresh ----------------------------------------------------------------------

    def open_committed(self) -> int | None:
        """A read-only descriptor of the committed image under the final name,
        to refresh: a regular file of this image's size with one name, never
        reached through a link. None when there is no such file. Call after
        :meth:`open`."""
        if self._dir_fd < 0:
            raise SinkError(f"{self.partial_path!r} is not open")
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dir_fd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == self.image_size:
                os.set_blocking(fd, True)
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def clone_from(self, fd: int) -> bool:
        """Make the partial file share the blocks of ``fd`` (a reflink: instant,
        and no space until a page changes); False where the file system cannot,
        and the partial file is then unchanged."""
        try:
            fcntl.ioctl(self._fd, FICLONE, fd)
        except OSError:
            return False
        return True

    # --- checkpoints ------------------------------------------------------------------

    def fileno(self) -> int:
        """The partial file's descriptor (while open)."""
        if self._fd < 0:
            raise SinkError(f"{self.partial_path!r} is not open")
        return self._fd

    def discard(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Make byte ranges ``(offset, length)`` of the partial file read as
        zeros again, freeing their blocks (holes).

        A kept partial file may hold bytes that no checkpoint recorded (a
        receiver killed between writing and checkpointing); a zero page that
        arrives for such a place is never written, so the place must be a
        hole first.  Returns False where the file system cannot punch holes
        (the caller then starts from an empty file); SinkError otherwise.
        """
        self._begin()
        try:
            for offset, length in ranges:
                impl.punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise SinkError(
                f"cannot clear pages of {self.partial_path!r}: {exc.strerror}"
            ) from None
        finally:
            self._end()
        return True

    def load_checkpoint(self) -> bytes | None:
        """The progress record stored by the last ``checkpoint``, if any.

        Only a regular file under the record's own name counts: a link, a
        FIFO or a file too big to be a record of this image is not read.
        """
        if self._dir_fd < 0:
            return None
        try:
            fd = os.open(self.progress_name,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dir_fd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_checkpoint_bytes(self.image_size):
                return None
            chunks = []
            left = st.st_size
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    def checkpoint(self, record: bytes) -> None:
        """Make every page written so far durable, then store ``record``.

        The data is fsynced before the record is written, so a record never
        claims pages a crash could lose.  Blocking: run it off the loop.
        """
        dir_fd = self._begin()
        temp = self.progress_name + TEMP_SUFFIX
        try:
            os.fsync(self._fd)
            fd = self._create(temp, dir_fd, os.O_WRONLY)
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:  # an abort either comes before this rename or after it
                if not self._may_rename():
                    self._unlink(temp, dir_fd)
                    raise SinkError(f"{self.partial_path!r} was discarded during a checkpoint")
                os.rename(temp, self.progress_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise SinkError(f"cannot checkpoint {self.partial_path!r}: {exc.strerror}") from None
        finally:
            self._end()

    def _drop_checkpoint(self, dir_fd: int) -> None:
        for name in (self.progress_name, self.progress_name + TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                self._unlink(name, dir_fd)

    # --- data ------------------------------------------------------------------------------

    def write_packet(
        self, payload: memoryview, bitmap: bytes, page_size: int, offset: int, span: int
    ) -> None:
        """Write the normal pages of one verified packet; zero pages are skipped."""
        self._begin()  # a thread may write: the descriptor stays open under it
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
        finally:
            self._end()

    def read(self, offset: int, length: int) -> bytearray:
        """The partial file's bytes at ``offset`` (holes read as zeros)."""
        return read_exact(self._fd, offset, length, self.partial_path)

    def zero_pages(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Make byte ranges read as zeros: punched out where the file system can,
        written as zeros where it cannot."""
        ranges = list(ranges)
        if self.discard(ranges):
            return
        try:
            for offset, length in ranges:
                zeros = bytes(length)
                done = 0
                while done < length:
                    done += os.pwrite(self._fd, zeros[done:], offset + done)
        except OSError as exc:
            raise SinkError(f"cannot write {self.partial_path!r}: {exc.strerror}") from None

    # --- the end ----------------------------------------------------------------------------

    def commit(self) -> None:
        """Make the data durable and give it its final name (blocking: run off-loop).

        The rename is relative to the directory's descriptor: a link planted
        under the final name is replaced, never followed.
        """
        dir_fd = self._begin()
        try:
            os.fsync(self._fd)
            with self._lock:  # a failed job's file never gets the final name
                if not self._may_rename():
                    raise SinkError(f"{self.partial_path!r} was discarded before its commit")
                os.rename(self.partial_name, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                self._finished = True
            self._drop_checkpoint(dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            if not self._finished:
                self.abort()
            raise SinkError(f"cannot commit {self.path!r}: {exc.strerror}") from None
        finally:
            self._end()
            with self._lock:
                if self._finished:
                    self._close()

    def abort(self, *, keep_for_resume: bool = False) -> None:
        """Close; delete the partial file and its checkpoint unless
        ``keep_for_resume`` (then a later job may continue from the
        checkpoint).  Idempotent, never raises.

        While a checkpoint or commit runs, the files go at once (or, kept,
        stay as the last checkpoint that landed left them: the running one
        never lands); the descriptors are closed when it returns.
        """
        with self._lock:
            if self._finished or self._aborted is not None:
                return
            self._aborted = keep_for_resume
            if not keep_for_resume:
                self._remove_files()
            if not self._busy:
                self._close()

    def _remove_files(self) -> None:
        dir_fd = self._dir_fd
        if dir_fd < 0:  # never opened: find the directory now
            try:
                dir_fd = self._open_directory()
            except SinkError:
                return
            self._dir_fd = dir_fd
        with contextlib.suppress(OSError):
            self._unlink(self.partial_name, dir_fd)
        self._drop_checkpoint(dir_fd)

    def _close(self) -> None:
        self._finished = True
        for attr in ("_fd", "_dir_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)


def read_exact(fd: int, offset: int, length: int, path: str) -> bytearray:
    """``length`` bytes of ``fd`` at ``offset`` (SinkError naming ``path`` if
    they cannot all be read)."""
    data = bytearray(length)
    view = memoryview(data)
    done = 0
    try:
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise SinkError(f"{path!r} is shorter than the image")
            done += n
    except OSError as exc:
        raise SinkError(f"cannot read {path!r}: {exc.strerror}") from None
    finally:
        view.release()
    return data
