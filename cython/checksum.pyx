from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from native cimport *


def crc32c(data, unsigned int crc=0):
    """CRC32C of ``data`` continuing from ``crc`` (GIL released for big buffers)."""
    cdef Py_buffer view
    cdef uint32_t result
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len >= 65536:
            with nogil:
                result = dsamig_crc32c(crc, view.buf, <size_t>view.len)
        else:
            result = dsamig_crc32c(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return result


def crc32c_impl():
    """Which CRC32C implementation runs: ``sse4.2-3way`` or ``table``."""
    return dsamig_crc32c_impl().decode()


def crc32c_force_portable(bint on):
    """Use the table implementation even where SSE4.2 exists (for tests)."""
    dsamig_crc32c_force_portable(on)
