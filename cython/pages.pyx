from libc.errno cimport errno, EINTR
import os as _os
from posix.unistd cimport pwrite
from posix.types cimport off_t

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE


cdef inline bint _bit(const uint8_t *bm, size_t i) noexcept nogil:
    return (bm[i >> 3] >> (i & 7)) & 1


def normal_runs(bitmap, size_t page_count):
    """Runs of normal (clear-bit) pages as ``[(first, count), ...]``."""
    cdef const uint8_t[::1] bm = bitmap
    cdef size_t i = 0, start
    cdef list runs = []
    if <size_t>bm.shape[0] * 8 < page_count:
        raise ValueError("bitmap shorter than page_count")
    while i < page_count:
        if bm[i >> 3] == 0xFF and (i & 7) == 0 and i + 8 <= page_count:
            i += 8
            continue
        if _bit(&bm[0], i):
            i += 1
            continue
        start = i
        while i < page_count and not _bit(&bm[0], i):
            i += 1
        runs.append((start, i - start))
    return runs


def packet_payload(data, bitmap, size_t page_size):
    """The payload of one packet: ``(views, payload_length, crc32c)``.

    ``data`` is the packet's bytes (a memoryview of the image; the last page may
    be short); ``views`` are zero-copy slices of it, one per run of normal
    pages, ready for ``writelines``.
    """
    cdef Py_buffer view
    cdef size_t page_count, first, count, start, end, total = 0
    cdef uint32_t crc = 0
    cdef int err = 0
    cdef list views = []
    mv = data if isinstance(data, memoryview) else memoryview(data)
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    try:
        page_count = (<size_t>view.len + page_size - 1) // page_size
        for first, count in normal_runs(bitmap, page_count):
            start = first * page_size
            end = min((first + count) * page_size, <size_t>view.len)
            # Guarded: the first touch of these pages; the image may have been
            # truncated under its mapping since it was scanned.
            err = dsamig_crc32c_guarded(crc, <const uint8_t *>view.buf + start, end - start, &crc)
            if err:
                raise OSError(err, _os.strerror(err) +
                              " (reading a mapped page: was the file truncated?)")
            total += end - start
            views.append(mv[start:end])
    finally:
        PyBuffer_Release(&view)
    return views, total, crc


def write_runs(int fd, payload, bitmap, size_t page_size, unsigned long long offset, size_t span):
    """Write a packet's payload into ``fd``: each run of normal pages at its place.

    ``offset`` is the file offset of the packet's first page and ``span`` the
    packet's byte length (the image's last page may be short).  Zero pages are
    not written, so a fresh file stays sparse.  Returns the bytes written;
    raises OSError (ENOSPC, EIO, ...) naming nothing: the caller adds context.
    """
    cdef Py_buffer view
    cdef size_t page_count = (span + page_size - 1) // page_size
    cdef size_t pos = 0, first, count, start, end, done
    cdef ssize_t n
    cdef int err = 0
    runs = normal_runs(bitmap, page_count)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        for first, count in runs:
            start = first * page_size
            end = min((first + count) * page_size, span)
            if pos + (end - start) > <size_t>view.len:
                raise ValueError("payload shorter than the normal pages of its bitmap")
            done = 0
            with nogil:
                while done < end - start:
                    n = pwrite(fd, <const uint8_t *>view.buf + pos + done, end - start - done,
                               offset + start + done)
                    if n < 0:
                        if errno == EINTR:
                            continue
                        err = errno
                        break
                    if n == 0:
                        err = 28  # ENOSPC: a zero-length write means no room
                        break
                    done += <size_t>n
            if err:
                raise OSError(err, _os.strerror(err))
            pos += end - start
        if pos != <size_t>view.len:
            raise ValueError("payload longer than the normal pages of its bitmap")
    finally:
        PyBuffer_Release(&view)
    return pos


def punch_hole(int fd, unsigned long long offset, unsigned long long length):
    """Make ``length`` bytes of ``fd`` from ``offset`` read as zeros, freeing
    their blocks (``fallocate`` PUNCH_HOLE, size kept).  Raises OSError, with
    EOPNOTSUPP where the file system cannot punch holes."""
    cdef int rc
    if length == 0:
        return
    with nogil:
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, <off_t>offset,
                       <off_t>length)
    if rc != 0:
        raise OSError(errno, _os.strerror(errno))
