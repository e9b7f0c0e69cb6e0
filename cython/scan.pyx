from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
import os as _os

SIMD_LEVELS = ("generic", "sse2", "avx2")


def simd_level():
    """The SIMD level the zero scan uses: ``avx2``, ``sse2`` or ``generic``."""
    return dsamig_simd_name(dsamig_simd_level()).decode()


def force_simd(level):
    """Cap the zero scan at ``level`` (a name from SIMD_LEVELS), None to undo."""
    dsamig_simd_force(-1 if level is None else SIMD_LEVELS.index(level))


def bitmap_bytes(size_t length, size_t page_size, size_t group_pages=0):
    """Bytes of the bitmap that zero_bitmap() returns for these arguments."""
    if page_size == 0:
        raise ValueError("page_size must be positive")
    if group_pages == 0:
        group_pages = max(1, (length + page_size - 1) // page_size)
    return dsamig_bitmap_bytes(length, page_size, group_pages)


def zero_bitmap(data, size_t page_size, size_t group_pages=0):
    """Scan ``data`` page by page; return ``(bitmap, zero_pages)``.

    Bit i of a group's bitmap is set when page i of the group is all zero;
    every group of ``group_pages`` pages (0: one group) starts on a new byte, so
    the result is the wire bitmaps of consecutive packets, concatenated.
    """
    cdef Py_buffer view
    cdef size_t zero, nbytes
    cdef bytes out
    cdef uint8_t *dst
    cdef int err
    if page_size == 0:
        raise ValueError("page_size must be positive")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if group_pages == 0:
            group_pages = max(1, (<size_t>view.len + page_size - 1) // page_size)
        nbytes = dsamig_bitmap_bytes(<size_t>view.len, page_size, group_pages)
        out = PyBytes_FromStringAndSize(NULL, nbytes)
        dst = <uint8_t *>PyBytes_AS_STRING(out)
        with nogil:
            # Guarded: ``data`` may be a mapping of a file truncated under us.
            err = dsamig_zero_bitmap_guarded(<const uint8_t *>view.buf, <size_t>view.len,
                                             page_size, group_pages, dst, &zero)
    finally:
        PyBuffer_Release(&view)
    if err:
        raise OSError(err, _os.strerror(err) +
                      " (reading a mapped page: was the file truncated?)")
    return out, zero


def set_thread_name(name):
    """Name the calling OS thread (15 characters at most), for top -H and perf."""
    dsamig_set_thread_name(name.encode()[:15])


def thread_cpu_s():
    """CPU seconds used so far by the calling thread."""
    return dsamig_thread_cpu_ns() / 1e9
