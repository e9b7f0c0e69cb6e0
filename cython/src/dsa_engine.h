/* DSA backend of the engine contract.
 *
 * A batch of pages handed to dsamig_dsa_engine_submit() becomes one COMPVAL
 * descriptor per page (or per max_transfer_size piece of a page) against the
 * pattern 0, grouped under BATCH descriptors of up to max_batch_size members
 * (a lone descriptor when one is left), and goes to one of the engine's work
 * queues, chosen round-robin among the healthy ones.  One completion thread
 * per engine (dsamig-dsa-cmpl) builds and submits the descriptors, polls every
 * record in flight, finishes each batch and posts it to the engine's
 * completion queue; it sleeps on a condition variable when nothing is in
 * flight.
 *
 * Nothing waits without a bound: a descriptor that does not complete within
 * the timeout, a submission that keeps failing, a hardware error or a dead
 * completion thread sends the pages concerned to the CPU check and the batch
 * completes anyway.  Memory the device may still write after a timeout is
 * held until the WQs are closed.
 *
 * A WQ's health: a transient problem (a shared WQ that stays full through
 * the retry budget, a timeout, an address-translation or hardware error)
 * puts it in quarantine; it is re-admitted once a NOOP probe completes,
 * first at once, then after growing back-offs.  A WQ that keeps failing
 * (max_strikes quarantines without a clean completion in between), rejects
 * descriptors that are right by construction, or fails a submission with an
 * error is out for the life of the configuration, with the reason.
 *
 * Descriptors reach a WQ through a portal: ENQCMD or MOVDIR64B on the mmap'd
 * portal of a real WQ, write() on its file, or the software device
 * (dsa_swdev.h).  The rest of the engine does not know which.  At configure
 * time each WQ is probed with the chosen method: a NOOP, then a BATCH of two
 * NOOPs; a WQ that refuses the BATCH gets lone descriptors, one that fails
 * the NOOP is left out with the reason.
 */
#ifndef DSAMIG_DSA_ENGINE_H
#define DSAMIG_DSA_ENGINE_H

#include "completion.h"
#include "dsa_hw.h"
#include "dsa_swdev.h"

#define DSAMIG_DSA_MAX_WQS 16

/* CPUID.(EAX=7,ECX=0):ECX features that matter to user-space DSA. */
#define DSAMIG_CPU_WAITPKG 0x1u   /* bit 5: UMONITOR/UMWAIT/TPAUSE */
#define DSAMIG_CPU_MOVDIR64B 0x2u /* bit 28 */
#define DSAMIG_CPU_ENQCMD 0x4u    /* bit 29 */

/* How descriptors reach a WQ. */
enum dsamig_dsa_method {
    DSAMIG_DSA_ENQCMD = 1,    /* shared WQ: ENQCMD, retry while it answers "full" */
    DSAMIG_DSA_MOVDIR64B = 2, /* dedicated WQ: posted writes, credit-counted */
    DSAMIG_DSA_WRITE = 3,     /* write() on the WQ's file: no batches */
};

typedef struct dsamig_dsa_wq_config {
    char path[256];             /* a real WQ (/dev/dsa/wqX.Y); unused when emulated */
    int emulated;               /* a software WQ, configured by emu */
    int dedicated;              /* dedicated WQ (else shared) */
    uint32_t size;              /* WQ entries */
    uint32_t threshold;         /* shared WQ: entries usable through the limited portal */
    uint32_t max_batch_size;    /* 0 or 1: no batch descriptors */
    uint32_t max_transfer_size; /* bytes per descriptor */
    int use_write;              /* submit with write() (real) / the write() model (emulated) */
    dsamig_swq_config emu;      /* rate, faults, engines, ...; the fields above override */
} dsamig_dsa_wq_config;

/* A WQ's state. */
enum dsamig_dsa_wq_state {
    DSAMIG_WQ_IN_SERVICE = 0,
    DSAMIG_WQ_QUARANTINED = 1, /* waiting for a NOOP probe to be re-admitted */
    DSAMIG_WQ_OUT = 2,         /* for good: failed its probe, keeps failing, or rejects work */
};

typedef struct dsamig_dsa_config {
    int nwqs;
    dsamig_dsa_wq_config wqs[DSAMIG_DSA_MAX_WQS];
    uint64_t timeout_ns;      /* per submitted descriptor, batch or lone */
    int prefault;             /* touch every page before it is submitted */
    uint32_t submit_attempts; /* ENQCMD / write() attempts before a submission fails */
    uint64_t spin_ns;         /* poll with pause (UMWAIT) this long before sleeping */
    int probe;                /* probe every WQ at configure (NOOP, BATCH of two NOOPs) */
    uint64_t quarantine_ns;   /* back-off before the second probe; doubles after */
    uint32_t max_strikes;     /* quarantines in a row (no clean completion) before out */
    char cpuinfo_path[128];   /* the kernel's CPU flags ("": /proc/cpuinfo) */
} dsamig_dsa_config;

/* Engine-wide counters; every field is a uint64_t (copied atomically). */
typedef struct dsamig_dsa_stats {
    uint64_t jobs;               /* batches handed in */
    uint64_t pages;
    uint64_t zero_pages;
    uint64_t descriptors;        /* submitted: members, lone ones and BATCH descriptors */
    uint64_t batch_descriptors;  /* BATCH descriptors submitted */
    uint64_t submit_retries;     /* ENQCMD / write() answered "full" (work and probes) */
    uint64_t retry_exhausted;    /* submissions given up: still "full" after the retries */
    uint64_t submit_failures;    /* submissions that failed with an error */
    uint64_t page_faults;        /* PAGE_FAULT_NOBOF records and descriptor-list faults */
    uint64_t batch_failures;     /* BATCH_FAIL records */
    uint64_t errors;             /* records with any other error status */
    uint64_t timeouts;           /* descriptors that did not complete in time */
    uint64_t cpu_fallback_pages; /* pages (partly) checked by the CPU */
    uint64_t quarantines;        /* WQs sent to quarantine */
    uint64_t readmissions;       /* WQs re-admitted after a NOOP probe */
    uint64_t probe_failures;     /* re-admission probes that failed */
    uint64_t probe_timeouts;     /* probes (at configure or re-admission) that never completed */
    uint64_t wqs_out;            /* WQs taken out for good */
    uint64_t held;               /* batches whose memory is held until the WQs close */
    uint64_t cancelled;          /* batches returned with ECANCELED at stop */
    uint64_t polls;              /* passes over the records in flight */
    uint64_t sleeps;             /* timed sleeps of the completion thread */
    uint64_t completion_cpu_ns;  /* CPU time of the completion thread(s) so far */
} dsamig_dsa_stats;

typedef struct dsamig_dsa_wq_stats {
    uint64_t jobs;
    uint64_t descriptors;
    uint64_t batch_descriptors;
    uint64_t submit_retries;
    uint64_t retry_exhausted;
    uint64_t quarantines;
    uint64_t readmissions;
    uint64_t probe_failures;
    uint64_t probe_timeouts;
    uint64_t page_faults;
    uint64_t errors;
    uint64_t timeouts;
    uint64_t cpu_fallback_pages;
    uint64_t credits;     /* descriptors we keep in flight at most */
    uint64_t outstanding; /* in flight now */
    uint64_t latency_ns;  /* moving average of submit-to-completion */
    uint64_t probe_ns;    /* how long the last successful probe took */
    uint32_t max_batch;   /* members per BATCH descriptor (1: lone descriptors) */
    uint32_t strikes;     /* quarantines since the last clean completion */
    int method;           /* enum dsamig_dsa_method */
    int emulated;
    int dedicated;
    int healthy;          /* in service */
    int state;            /* enum dsamig_dsa_wq_state */
    char reason[320];     /* why it is (or was last) out of service */
    char portal_note[160]; /* why a WQ uses write() rather than its portal */
    char batch_note[128]; /* why it gets lone descriptors */
} dsamig_dsa_wq_stats;

/* What dsamig_dsa_engine_check_wq() found on one WQ. */
typedef struct dsamig_dsa_check {
    int noop_ok, compval_ok, batch_ok; /* batch_ok -1: not tried (no batches on this WQ) */
    uint32_t noops;                    /* NOOPs timed */
    uint64_t noop_min_ns, noop_median_ns, noop_max_ns;
    uint32_t compval_pages, compval_mismatches;
    uint64_t compval_median_ns;        /* one lone COMPVAL, submit to record */
    uint32_t batch_pages, batch_mismatches;
    uint64_t batch_ns;                 /* one BATCH of batch_pages COMPVALs */
    char error[160];                   /* the first thing that went wrong */
} dsamig_dsa_check;

typedef struct dsamig_dsa_engine dsamig_dsa_engine;

/* CPUID flags (DSAMIG_CPU_*); 0 on other architectures. */
unsigned dsamig_dsa_cpu_features(void);
/* The same flags as the kernel reports them in the "flags" line of a
 * /proc/cpuinfo-style file (the kernel may clear ENQCMD, and a user ENQCMD
 * then raises #GP); -errno when the file cannot be read. */
int dsamig_dsa_kernel_cpu_flags(const char *path);

/* A new engine, not configured (NULL: out of memory). */
dsamig_dsa_engine *dsamig_dsa_engine_new(void);
/* Cleanup and release; every submitted batch must have been collected. */
void dsamig_dsa_engine_free(dsamig_dsa_engine *e);
dsamig_cq *dsamig_dsa_engine_cq(dsamig_dsa_engine *e);

/* Open (or create) the WQs.  Configuring a configured engine cleans it up
 * first.  0, or -errno with a message in err; on failure nothing stays open. */
int dsamig_dsa_engine_configure(dsamig_dsa_engine *e, const dsamig_dsa_config *cfg, char *err,
                                size_t errlen);
/* Start the completion thread.  Idempotent; -EINVAL if not configured. */
int dsamig_dsa_engine_start(dsamig_dsa_engine *e);
/* Stop accepting batches, cancel those not submitted yet (ECANCELED), wait
 * (bounded by the timeout) for descriptors in flight, join the thread.
 * Idempotent. */
void dsamig_dsa_engine_stop(dsamig_dsa_engine *e);
/* Stop, close the WQs, free everything.  Idempotent, also before configure. */
void dsamig_dsa_engine_cleanup(dsamig_dsa_engine *e);
int dsamig_dsa_engine_is_running(dsamig_dsa_engine *e);
int dsamig_dsa_engine_is_configured(dsamig_dsa_engine *e);

/* Hand a batch over; it comes back through the cq.  0, or -ESHUTDOWN when
 * the engine is not running. */
int dsamig_dsa_engine_submit(dsamig_dsa_engine *e, dsamig_batch *b);

void dsamig_dsa_engine_get_stats(dsamig_dsa_engine *e, dsamig_dsa_stats *out);
int dsamig_dsa_engine_nwqs(dsamig_dsa_engine *e);
/* -EINVAL for a bad index. */
int dsamig_dsa_engine_get_wq_stats(dsamig_dsa_engine *e, int i, dsamig_dsa_wq_stats *out);
/* The software device behind WQ i, or NULL for a real WQ. */
dsamig_swq *dsamig_dsa_engine_swq(dsamig_dsa_engine *e, int i);

/* Run NOOPs, lone COMPVALs and a BATCH of COMPVALs (where the WQ takes
 * batches) on WQ i of a configured engine whose thread is not running, over
 * a test buffer of crafted pages, and check every result against the CPU.
 * 0 (out says what passed), -EINVAL for a bad index, -EBUSY while running. */
int dsamig_dsa_engine_check_wq(dsamig_dsa_engine *e, int i, uint32_t noops, uint32_t pages,
                               dsamig_dsa_check *out);

/* Fault injection: the completion thread fails the way an internal error
 * would make it (its exit path completes everything on the CPU; later
 * batches are checked on the CPU by the submitter).  Returns at once. */
void dsamig_dsa_engine_fail_completion_thread(dsamig_dsa_engine *e);

#endif
