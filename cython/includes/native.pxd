# C declarations of cython/src, declared once and shared by every .pyx.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "crc32c.h" nogil:
    uint32_t dsamig_crc32c(uint32_t crc, const void *buf, size_t len)
    uint32_t dsamig_crc32c_op(uint64_t len)
    uint32_t dsamig_crc32c_extend(uint32_t op, uint32_t crc_a, uint32_t crc_b)
    uint32_t dsamig_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
    int dsamig_crc32c_force(const char *name)
    const char *dsamig_crc32c_impl_name(int i)
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


cdef extern from "pump.h" nogil:
    ctypedef struct dsamig_event:
        dsamig_event *next
        int kind

    ctypedef struct dsamig_evq:
        int efd
        uint64_t posted
        uint64_t wakeups

    int dsamig_evq_init(dsamig_evq *q)
    void dsamig_evq_destroy(dsamig_evq *q)
    dsamig_event *dsamig_evq_drain(dsamig_evq *q)

    enum:
        DSAMIG_RX_PWRITE
        DSAMIG_RX_MMAP
        DSAMIG_RXE_PACKET
        DSAMIG_RXE_FRAME
        DSAMIG_RXE_CORRUPT
        DSAMIG_RXE_EOF
        DSAMIG_RXE_ERROR
        DSAMIG_RXE_STOPPED
        DSAMIG_TX_FRAME
        DSAMIG_TX_PACKET
        DSAMIG_TX_VERIFY
        DSAMIG_TXE_DONE
        DSAMIG_TXE_STOPPED

    ctypedef struct dsamig_rx_job:
        uint64_t image_size
        uint64_t packet_count
        uint32_t page_size
        uint32_t packet_pages
        uint8_t *status
        int tolerant
        int live
        int fd
        int mode
        uint8_t *map

    ctypedef struct dsamig_rx_event:
        dsamig_event base
        uint64_t packet
        uint32_t payload_length
        uint32_t crc
        uint32_t header_crc
        int again
        int err
        int what
        uint16_t bitmap_len
        uint8_t bitmap[512]
        uint32_t frame_len
        uint8_t frame[1]

    ctypedef struct dsamig_rx_channel:
        dsamig_rx_job *job
        int sock
        int ctl
        int index
        int stop
        int started
        dsamig_evq q
        uint8_t *buf
        size_t buf_len
        uint8_t *prefix
        size_t prefix_len
        size_t prefix_off
        int raw_only
        uint64_t bytes
        uint64_t packets
        uint64_t payload_bytes
        uint64_t cpu_ns

    int dsamig_rx_job_init(dsamig_rx_job *job)
    void dsamig_rx_job_destroy(dsamig_rx_job *job)
    int dsamig_rx_start(dsamig_rx_channel *c)
    void dsamig_rx_stop(dsamig_rx_channel *c)

    ctypedef struct dsamig_tx_op:
        int kind
        const uint8_t *frame
        uint32_t frame_len
        uint64_t packet
        uint64_t first_page
        uint32_t page_count
        const uint8_t *data
        uint64_t span
        uint16_t bitmap_len
        uint8_t bitmap[512]
        uint32_t payload_length
        uint32_t crc

    ctypedef struct dsamig_tx_item:
        dsamig_event base
        dsamig_tx_item *next_work
        uint64_t token
        uint32_t nops
        int status
        uint32_t page_size
        dsamig_tx_op *ops

    ctypedef struct dsamig_tx_channel:
        int sock
        int ctl
        int index
        int stop
        int started
        dsamig_evq q
        dsamig_tx_item stopped
        int abandoned
        uint64_t bytes
        uint64_t packets
        uint64_t cpu_ns

    int dsamig_tx_start(dsamig_tx_channel *c)
    void dsamig_tx_submit(dsamig_tx_channel *c, dsamig_tx_item *item)
    void dsamig_tx_stop(dsamig_tx_channel *c)
