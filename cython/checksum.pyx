from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
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


cdef tuple _impl_names():
    cdef list names = []
    cdef const char *name = dsamig_crc32c_impl_name(0)
    while name != NULL:
        names.append(name.decode())
        name = dsamig_crc32c_impl_name(len(names))
    return tuple(names)


#: Every implementation the extension has, slowest first (a CPU runs those
#: its instructions allow).
CRC32C_IMPLS = _impl_names()


def crc32c_impl():
    """Which CRC32C implementation runs: one of :data:`CRC32C_IMPLS`, the
    fastest this CPU has unless a test forced another."""
    return dsamig_crc32c_impl().decode()


def crc32c_force(name):
    """Use the implementation ``name`` (for tests); None for the fastest.
    ValueError when this CPU does not have it."""
    if name is None:
        dsamig_crc32c_force(NULL)
        return
    encoded = name.encode()
    if dsamig_crc32c_force(encoded) != 0:
        raise ValueError(f"CRC32C implementation {name!r} is not available on this CPU")


def crc32c_combine(unsigned int crc_a, unsigned int crc_b, unsigned long long len_b):
    """CRC32C of A||B from the CRC32Cs of A and of B, and B's length."""
    return dsamig_crc32c_combine(crc_a, crc_b, len_b)


def page_crcs(data, size_t page_size, out, size_t index=0):
    """The CRC32C of each page of ``data`` into ``out[index:]`` (an
    ``array('I')``); the last page may be short. Returns the pages."""
    cdef Py_buffer view, dest
    cdef size_t pages, i, start, length
    cdef uint32_t *crcs
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &dest, PyBUF_WRITABLE)
        try:
            if page_size == 0 or dest.itemsize != 4:
                raise ValueError("page_crcs needs a page size and an array('I')")
            pages = (<size_t>view.len + page_size - 1) // page_size
            if index + pages > <size_t>dest.len // 4:
                raise ValueError("out is too short for the pages of data")
            crcs = <uint32_t *>dest.buf
            with nogil:
                for i in range(pages):
                    start = i * page_size
                    length = min(page_size, <size_t>view.len - start)
                    crcs[index + i] = dsamig_crc32c(0, <const uint8_t *>view.buf + start, length)
        finally:
            PyBuffer_Release(&dest)
    finally:
        PyBuffer_Release(&view)
    return pages


def packet_crc(crcs, size_t first_page, size_t page_count, zero_bitmap, size_t page_size,
               size_t last_length):
    """The payload CRC32C of a packet from the CRC32Cs of its pages (``crcs``,
    an ``array('I')`` indexed by page): its normal pages (clear bits of
    ``zero_bitmap``) concatenated. ``last_length`` is the length of the
    packet's last page (the image's last page may be short)."""
    cdef Py_buffer view, bm
    cdef const uint32_t *c
    cdef const uint8_t *bits
    cdef uint32_t crc = 0, op_full, op_last
    cdef size_t i
    PyObject_GetBuffer(crcs, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(zero_bitmap, &bm, PyBUF_SIMPLE)
        try:
            if view.itemsize != 4 or first_page + page_count > <size_t>view.len // 4:
                raise ValueError("crcs is not an array('I') holding these pages")
            if <size_t>bm.len * 8 < page_count:
                raise ValueError("zero_bitmap shorter than page_count")
            c = <const uint32_t *>view.buf
            bits = <const uint8_t *>bm.buf
            op_full = dsamig_crc32c_op(page_size)
            op_last = dsamig_crc32c_op(last_length)
            for i in range(page_count):
                if (bits[i >> 3] >> (i & 7)) & 1:
                    continue
                if i == page_count - 1:
                    crc = dsamig_crc32c_extend(op_last, crc, c[first_page + i])
                else:
                    crc = dsamig_crc32c_extend(op_full, crc, c[first_page + i])
        finally:
            PyBuffer_Release(&bm)
    finally:
        PyBuffer_Release(&view)
    return crc
