# Page fingerprints for live rounds (cython/src/fingerprint.c): what changed
# since the bytes were sent.  The pure-Python twin and the specification of
# the construction are in dsamig/_pure.py; the bound on missed changes is
# argued in cython/src/fingerprint.c.
import hashlib as _hashlib

from fingerprint cimport *

FINGERPRINT_SEED_BYTES = 16
_FP_DOMAIN = b"dsamig page fingerprint v1\0"


def _fp_check_page_size(page_size):
    if page_size <= 0 or page_size % 8:
        raise ValueError(f"page_size must be a positive multiple of 8, not {page_size}")


cdef int _fp_check_key(const Py_buffer *key, size_t page_size) except -1:
    cdef size_t need = dsamig_fp_key_bytes(page_size)
    if <size_t>key.len != need:
        raise ValueError(f"the key is {key.len} bytes; pages of {page_size} bytes need a key "
                         f"of {need} (see fingerprint_key)")
    return 0


cdef int _fp_check_slots(const Py_buffer *buf, Py_ssize_t index, size_t pages,
                         str what) except -1:
    if index < 0:
        raise ValueError(f"index must not be negative, not {index}")
    if <size_t>buf.len // 8 < <size_t>index + pages:
        raise ValueError(f"{what} holds {buf.len // 8} fingerprints; pages {index}.."
                         f"{index + pages - 1} do not fit")
    return 0


cdef int _fp_writable(object obj, Py_buffer *view, str what) except -1:
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    if view.readonly:
        PyBuffer_Release(view)
        raise BufferError(f"{what} is not writable")
    return 0


def _fp_raise(int err):
    raise OSError(err, _os.strerror(err) + " (reading a mapped page: was the file truncated?)")


def fingerprint_key(seed, page_size):
    """The key of the page fingerprints for pages of ``page_size`` bytes.

    ``seed`` is at least FINGERPRINT_SEED_BYTES random bytes, drawn once per
    job (``os.urandom``); the key is SHAKE-128 of it, so it is as good as a
    uniformly random key to anything that does not know the seed.
    """
    _fp_check_page_size(page_size)
    seed = bytes(seed)
    if len(seed) < FINGERPRINT_SEED_BYTES:
        raise ValueError(f"the seed must be at least {FINGERPRINT_SEED_BYTES} bytes, "
                         f"not {len(seed)}")
    material = _FP_DOMAIN + page_size.to_bytes(8, "little") + seed
    return _hashlib.shake_128(material).digest(dsamig_fp_key_bytes(page_size))


def fingerprint_pages(data, size_t page_size, key, out, Py_ssize_t index=0):
    """Fingerprint ``data`` page by page into ``out[index:]``; return the pages.

    ``out`` is a writable buffer of native-endian 64-bit slots (an
    ``array('Q')``); the last page of ``data`` may be short.
    """
    cdef Py_buffer src, k, dst
    cdef size_t pages
    cdef int err
    _fp_check_page_size(page_size)
    PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(key, &k, PyBUF_SIMPLE)
        try:
            _fp_check_key(&k, page_size)
            _fp_writable(out, &dst, "out")
            try:
                pages = (<size_t>src.len + page_size - 1) // page_size
                _fp_check_slots(&dst, index, pages, "out")
                with nogil:
                    err = dsamig_fp_pages_guarded(<const uint8_t *>src.buf, <size_t>src.len,
                                                  page_size, <const uint8_t *>k.buf,
                                                  <uint64_t *>dst.buf + index)
            finally:
                PyBuffer_Release(&dst)
        finally:
            PyBuffer_Release(&k)
    finally:
        PyBuffer_Release(&src)
    if err:
        _fp_raise(err)
    return pages


def copy_fingerprint(dst, src, size_t page_size, key, out, Py_ssize_t index=0):
    """Copy ``src`` into ``dst`` and fingerprint what was copied; return the pages.

    One pass over ``src``: every byte is read once, written to ``dst`` and
    hashed from the same register, so ``out[index:]`` describes ``dst``
    exactly even while a writer changes ``src``.
    """
    cdef Py_buffer s, d, k, o
    cdef size_t pages
    cdef int err
    _fp_check_page_size(page_size)
    PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
    try:
        _fp_writable(dst, &d, "dst")
        try:
            if d.len < s.len:
                raise ValueError(f"dst is {d.len} bytes, shorter than src ({s.len} bytes)")
            PyObject_GetBuffer(key, &k, PyBUF_SIMPLE)
            try:
                _fp_check_key(&k, page_size)
                _fp_writable(out, &o, "out")
                try:
                    pages = (<size_t>s.len + page_size - 1) // page_size
                    _fp_check_slots(&o, index, pages, "out")
                    with nogil:
                        err = dsamig_fp_copy_pages_guarded(
                            <uint8_t *>d.buf, <const uint8_t *>s.buf, <size_t>s.len, page_size,
                            <const uint8_t *>k.buf, <uint64_t *>o.buf + index)
                finally:
                    PyBuffer_Release(&o)
            finally:
                PyBuffer_Release(&k)
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
    if err:
        _fp_raise(err)
    return pages


def fingerprint_changes(data, size_t page_size, key, previous, Py_ssize_t index=0,
                        size_t group_pages=0):
    """Pages of ``data`` whose fingerprint differs from ``previous[index:]``.

    Returns ``(bitmap, changed_pages)``: bit i of a group's bitmap (LSB first)
    is set when page i of the group changed; each group of ``group_pages``
    pages (0: one group) starts on a new byte, as in zero_bitmap().
    ``previous`` is not updated: record what is sent with copy_fingerprint().
    """
    cdef Py_buffer src, k, prev
    cdef size_t pages, nbytes, changed = 0
    cdef bytes bitmap
    cdef uint8_t *bits
    cdef int err
    _fp_check_page_size(page_size)
    PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(key, &k, PyBUF_SIMPLE)
        try:
            _fp_check_key(&k, page_size)
            PyObject_GetBuffer(previous, &prev, PyBUF_SIMPLE)
            try:
                pages = (<size_t>src.len + page_size - 1) // page_size
                _fp_check_slots(&prev, index, pages, "previous")
                if group_pages == 0:
                    group_pages = pages if pages else 1
                nbytes = dsamig_bitmap_bytes(<size_t>src.len, page_size, group_pages)
                bitmap = PyBytes_FromStringAndSize(NULL, nbytes)
                bits = <uint8_t *>PyBytes_AS_STRING(bitmap)
                with nogil:
                    err = dsamig_fp_changes_guarded(
                        <const uint8_t *>src.buf, <size_t>src.len, page_size, group_pages,
                        <const uint8_t *>k.buf, <const uint64_t *>prev.buf + index,
                        bits, &changed)
            finally:
                PyBuffer_Release(&prev)
        finally:
            PyBuffer_Release(&k)
    finally:
        PyBuffer_Release(&src)
    if err:
        _fp_raise(err)
    return bitmap, changed
