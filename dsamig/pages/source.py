"""The image being sent: mapped read-only, read in packets, released behind us."""

from __future__ import annotations

import errno
import mmap
import os
import stat

from dsamig.errors import SourceError


def open_image(path: str) -> int:
    """A read-only descriptor of the image at ``path``; SourceError saying why not."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"image {path!r} does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"image {path!r} is a directory") from None
    except PermissionError:
        raise SourceError(f"image {path!r} is not readable (permission denied)") from None
    except OSError as exc:
        raise SourceError(f"cannot open image {path!r}: {exc.strerror}") from None


def image_size(fd: int, path: str) -> int:
    """Bytes of the image open as ``fd``: the one check of what may be sent
    (the one-shot sender, the sender daemon, ``dsamig verify``).

    An image is a regular file or a block device; anything else (a
    directory, a FIFO, a socket) is a SourceError naming ``path``.
    """
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        raise SourceError(f"cannot read image {path!r}: {exc.strerror}") from None
    what = " (it is a directory)" if stat.S_ISDIR(st.st_mode) else ""
    raise SourceError(f"image {path!r} is not a regular file or block device{what}")


class PageSource:
    """A memory image opened for sending.

    The file is mapped read-only: the engine scans the mapping and the
    transport hands slices of it to the kernel without copying.  Ranges that
    were sent are released (``MADV_DONTNEED``) so the sender's resident memory
    stays flat however big the image is; the page cache keeps the data.
    """

    def __init__(self, path: str, *, fd: int | None = None) -> None:
        """Open ``path``, or with ``fd`` use that descriptor, already open for
        reading (``path`` then only names it in messages).  The source owns
        ``fd`` from here on: it is closed with the source, or at once if the
        file cannot be sent."""
        self.path = path
        self._fd = open_image(path) if fd is None else fd
        try:
            self.size = image_size(self._fd, path)
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
            self._map: mmap.mmap | None = None
            self.view = memoryview(b"")
            if self.size:
                self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
                self.view = memoryview(self._map)
        except OSError as exc:
            os.close(self._fd)
            raise SourceError(f"cannot map image {path!r}: {exc.strerror}") from None
        except SourceError:
            os.close(self._fd)
            raise
        self._closed = False

    def data_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges ``[(start, end)]`` that may hold data; the rest are holes.

        A sparse image (a RAM file on tmpfs, a snapshot written with holes)
        reads as zeros in its holes, so they need no scanning at all.  Where the
        file system cannot tell, the whole image is one range.
        """
        ranges: list[tuple[int, int]] = []
        pos = 0
        try:
            while pos < self.size:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                        break
                    raise
                end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
                ranges.append((start, end))
                pos = end
        except OSError:
            return [(0, self.size)] if self.size else []
        return ranges

    def truncation_error(self) -> SourceError | None:
        """The error to report if the file is now shorter than when it was mapped.

        Pages past a file's end cannot be read through its mapping (the
        native code turns the SIGBUS into EFAULT, the kernel's writes fail
        with EFAULT); whatever failed, this names the real cause.
        """
        if self._closed or not self._regular:
            return None
        try:
            now = os.fstat(self._fd).st_size
        except OSError:
            return None
        if now >= self.size:
            return None
        return SourceError(
            f"image {self.path!r} was truncated while being sent (now {now} bytes, "
            f"was {self.size})"
        )

    def check_size(self) -> None:
        """Raise SourceError if the image shrank since it was mapped (one fstat)."""
        error = self.truncation_error()
        if error is not None:
            raise error

    def release(self, start: int, end: int) -> None:
        """Drop our mapping of ``[start, end)`` (page aligned inward); data stays cached."""
        if self._map is None:
            return
        page = mmap.PAGESIZE
        start = -(-start // page) * page
        end = min(end, self.size) // page * page
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Unmap and close; idempotent.  Buffers handed out must be released first."""
        if self._closed:
            return
        self._closed = True
        try:
            self.view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            # A slice is still referenced (a traceback, a transport being torn
            # down); the mapping goes away with the last reference.
            pass
        os.close(self._fd)

    def __enter__(self) -> PageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
