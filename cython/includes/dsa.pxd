# C declarations of the DSA engine and the software DSA device (cython/src/dsa_*.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from native cimport dsamig_batch, dsamig_cq


cdef extern from "dsa_hw.h" nogil:
    ctypedef struct dsamig_dsa_desc:
        uint32_t pasid_priv
        uint32_t flags_opcode
        uint64_t completion_addr
        uint64_t src_addr
        uint64_t dst_addr
        uint32_t xfer_size
        uint16_t int_handle
        uint16_t rsvd1
        uint8_t expected_res
        uint8_t op_specific[24]

    ctypedef struct dsamig_dsa_cr:
        uint8_t status
        uint8_t result
        uint16_t rsvd
        uint32_t bytes_completed
        uint64_t fault_addr
        uint32_t invalid_flags
        uint64_t crc_val
        uint8_t op_specific[16]

    int DSAMIG_HAVE_LINUX_IDXD_H


cdef extern from "dsa_swdev.h" nogil:
    ctypedef struct dsamig_swq_faults:
        double page_fault
        double batch_fail
        double list_fault
        double hw_error
        double hang
        double wq_full
        uint64_t seed

    ctypedef struct dsamig_swq_config:
        int id
        int dedicated
        uint32_t size
        uint32_t threshold
        uint32_t max_batch_size
        uint32_t max_transfer_size
        uint32_t op_config
        int engines
        uint64_t rate_bytes_s
        int check_residency
        int reorder
        int model
        int map_eperm
        int write_method
        int foreign_mm
        dsamig_swq_faults faults

    ctypedef struct dsamig_swq_counters:
        uint64_t accepted
        uint64_t refused
        uint64_t dropped
        uint64_t rejected
        uint64_t executed
        uint64_t batches
        uint64_t bytes
        uint64_t invalid
        uint64_t faults_injected
        uint64_t faults_absent
        uint64_t batch_fails_injected
        uint64_t list_faults_injected
        uint64_t hw_errors_injected
        uint64_t hangs_injected
        uint64_t wq_full_injected
        uint64_t cr_lost
        uint64_t discarded
        uint64_t engine_cpu_ns

    ctypedef struct dsamig_swq:
        dsamig_swq_config cfg

    void dsamig_swq_config_default(dsamig_swq_config *cfg)
    int dsamig_swq_start(dsamig_swq *q, const dsamig_swq_config *cfg)
    void dsamig_swq_stop(dsamig_swq *q)
    int dsamig_swq_enqcmd(dsamig_swq *q, const void *desc)
    void dsamig_swq_movdir64b(dsamig_swq *q, const void *desc)
    int dsamig_swq_map_portal(dsamig_swq *q)
    long dsamig_swq_write(dsamig_swq *q, const void *descs, size_t n)
    uint32_t dsamig_swq_occupancy(dsamig_swq *q)
    void dsamig_swq_get_counters(dsamig_swq *q, dsamig_swq_counters *out)
    long dsamig_swq_probe_cr_order(dsamig_swq *q, long n)


cdef extern from "dsa_engine.h" nogil:
    int DSAMIG_DSA_MAX_WQS
    unsigned DSAMIG_CPU_WAITPKG
    unsigned DSAMIG_CPU_MOVDIR64B
    unsigned DSAMIG_CPU_ENQCMD
    int DSAMIG_DSA_ENQCMD
    int DSAMIG_DSA_MOVDIR64B
    int DSAMIG_DSA_WRITE
    int DSAMIG_WQ_IN_SERVICE
    int DSAMIG_WQ_QUARANTINED
    int DSAMIG_WQ_OUT

    ctypedef struct dsamig_dsa_wq_config:
        char path[256]
        int emulated
        int dedicated
        uint32_t size
        uint32_t threshold
        uint32_t max_batch_size
        uint32_t max_transfer_size
        int use_write
        dsamig_swq_config emu

    ctypedef struct dsamig_dsa_config:
        int nwqs
        dsamig_dsa_wq_config wqs[16]
        uint64_t timeout_ns
        int prefault
        uint32_t submit_attempts
        uint64_t spin_ns
        int probe
        uint64_t quarantine_ns
        uint32_t max_strikes
        char cpuinfo_path[128]

    ctypedef struct dsamig_dsa_stats:
        uint64_t jobs
        uint64_t pages
        uint64_t zero_pages
        uint64_t descriptors
        uint64_t batch_descriptors
        uint64_t submit_retries
        uint64_t retry_exhausted
        uint64_t submit_failures
        uint64_t page_faults
        uint64_t batch_failures
        uint64_t errors
        uint64_t timeouts
        uint64_t cpu_fallback_pages
        uint64_t quarantines
        uint64_t readmissions
        uint64_t probe_failures
        uint64_t probe_timeouts
        uint64_t wqs_out
        uint64_t held
        uint64_t cancelled
        uint64_t polls
        uint64_t sleeps
        uint64_t completion_cpu_ns

    ctypedef struct dsamig_dsa_wq_stats:
        uint64_t jobs
        uint64_t descriptors
        uint64_t batch_descriptors
        uint64_t submit_retries
        uint64_t retry_exhausted
        uint64_t quarantines
        uint64_t readmissions
        uint64_t probe_failures
        uint64_t probe_timeouts
        uint64_t page_faults
        uint64_t errors
        uint64_t timeouts
        uint64_t cpu_fallback_pages
        uint64_t credits
        uint64_t outstanding
        uint64_t latency_ns
        uint64_t probe_ns
        uint32_t max_batch
        uint32_t strikes
        int method
        int emulated
        int dedicated
        int healthy
        int state
        char reason[320]
        char portal_note[160]
        char batch_note[128]

    ctypedef struct dsamig_dsa_check:
        int noop_ok
        int compval_ok
        int batch_ok
        uint32_t noops
        uint64_t noop_min_ns
        uint64_t noop_median_ns
        uint64_t noop_max_ns
        uint32_t compval_pages
        uint32_t compval_mismatches
        uint64_t compval_median_ns
        uint32_t batch_pages
        uint32_t batch_mismatches
        uint64_t batch_ns
        char error[160]

    ctypedef struct dsamig_dsa_engine:
        pass

    unsigned dsamig_dsa_cpu_features()
    int dsamig_dsa_kernel_cpu_flags(const char *path)
    dsamig_dsa_engine *dsamig_dsa_engine_new()
    void dsamig_dsa_engine_free(dsamig_dsa_engine *e)
    dsamig_cq *dsamig_dsa_engine_cq(dsamig_dsa_engine *e)
    int dsamig_dsa_engine_configure(dsamig_dsa_engine *e, const dsamig_dsa_config *cfg,
                                    char *err, size_t errlen)
    int dsamig_dsa_engine_start(dsamig_dsa_engine *e)
    void dsamig_dsa_engine_stop(dsamig_dsa_engine *e)
    void dsamig_dsa_engine_cleanup(dsamig_dsa_engine *e)
    int dsamig_dsa_engine_is_running(dsamig_dsa_engine *e)
    int dsamig_dsa_engine_is_configured(dsamig_dsa_engine *e)
    int dsamig_dsa_engine_submit(dsamig_dsa_engine *e, dsamig_batch *b)
    void dsamig_dsa_engine_get_stats(dsamig_dsa_engine *e, dsamig_dsa_stats *out)
    int dsamig_dsa_engine_nwqs(dsamig_dsa_engine *e)
    int dsamig_dsa_engine_get_wq_stats(dsamig_dsa_engine *e, int i, dsamig_dsa_wq_stats *out)
    dsamig_swq *dsamig_dsa_engine_swq(dsamig_dsa_engine *e, int i)
    int dsamig_dsa_engine_check_wq(dsamig_dsa_engine *e, int i, uint32_t noops, uint32_t pages,
                                   dsamig_dsa_check *out)
    void dsamig_dsa_engine_fail_completion_thread(dsamig_dsa_engine *e)
