# C declarations of cython/src, declared once and shared by every .pyx.
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "crc32c.h" nogil:
    uint32_t dsamig_crc32c(uint32_t crc, const void *buf, size_t len)
    void dsamig_crc32c_force_portable(int on)
    const char *dsamig_crc32c_impl()


cdef extern from "zeroscan.h" nogil:
    enum dsamig_simd:
        DSAMIG_SIMD_GENERIC
        DSAMIG_SIMD_SSE2
        DSAMIG_SIMD_AVX2
    int dsamig_is_zero(const uint8_t *buf, size_t len)
    size_t dsamig_bitmap_bytes(size_t len, size_t page_size, size_t group_pages)
    size_t dsamig_zero_bitmap(const uint8_t *buf, size_t len, size_t page_size,
                              size_t group_pages, uint8_t *bitmap)
    dsamig_simd dsamig_simd_level()
    const char *dsamig_simd_name(dsamig_simd level)
    void dsamig_simd_force(int level)


cdef extern from "completion.h" nogil:
    ctypedef struct dsamig_batch:
        uint64_t token
        const uint8_t *buf
        size_t len
        size_t page_size
        size_t group_pages
        uint8_t *bitmap
        size_t zero_pages
        int status
        uint64_t cpu_pages
        dsamig_batch *next

    ctypedef struct dsamig_cq:
        int efd
        uint64_t posted
        uint64_t wakeups

    dsamig_batch *dsamig_cq_drain(dsamig_cq *cq)
    void dsamig_cq_destroy(dsamig_cq *cq)
    void dsamig_set_thread_name(const char *name)
    uint64_t dsamig_now_ns()
    uint64_t dsamig_thread_cpu_ns()


cdef extern from "cpu_engine.h" nogil:
    ctypedef struct dsamig_cpu_engine:
        dsamig_cq cq
        int started
        int stopping
        int nthreads
        uint64_t batches
        uint64_t pages
        uint64_t zero_pages
        uint64_t worker_cpu_ns

    int dsamig_cpu_engine_start(dsamig_cpu_engine *e, int nthreads, int prefault)
    int dsamig_cpu_engine_submit(dsamig_cpu_engine *e, dsamig_batch *b)
    void dsamig_cpu_engine_stop(dsamig_cpu_engine *e)
    void dsamig_prefault(const void *buf, size_t len)


cdef extern from "sigbus_guard.h" nogil:
    int dsamig_guarded(void (*fn)(void *) noexcept nogil, void *arg)
    uint64_t dsamig_sigbus_caught()
    int dsamig_zero_bitmap_guarded(const uint8_t *buf, size_t len, size_t page_size,
                                   size_t group_pages, uint8_t *bitmap, size_t *zero_pages)
    int dsamig_crc32c_guarded(uint32_t crc, const void *buf, size_t len, uint32_t *out)
