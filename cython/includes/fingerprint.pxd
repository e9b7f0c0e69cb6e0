# C declarations of the page fingerprints (cython/src/fingerprint.h).
from libc.stdint cimport uint8_t, uint64_t


cdef extern from "fingerprint.h" nogil:
    size_t dsamig_fp_key_bytes(size_t page_size)
    int dsamig_fp_pages_guarded(const uint8_t *buf, size_t len, size_t page_size,
                                const uint8_t *key, uint64_t *out)
    int dsamig_fp_copy_pages_guarded(uint8_t *dst, const uint8_t *src, size_t len,
                                     size_t page_size, const uint8_t *key, uint64_t *out)
    int dsamig_fp_changes_guarded(const uint8_t *buf, size_t len, size_t page_size,
                                  size_t group_pages, const uint8_t *key,
                                  const uint64_t *previous, uint8_t *bitmap, size_t *changed)
