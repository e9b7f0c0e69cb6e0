/* Private to the DSA engine (dsa_*.c): the structs its parts share.
 *
 * The engine is split along its sections:
 *   dsa_portal.c  CPU features, the submission instructions, the portals of
 *                 real and emulated WQs, opening a WQ and choosing its method;
 *   dsa_jobs.c    jobs (descriptor memory), building descriptors, submitting
 *                 them, applying member results;
 *   dsa_poll.c    completion polling, timeouts, pacing, the idle wait;
 *   dsa_health.c  WQ health: quarantine, NOOP probes, re-admission, out;
 *   dsa_probe.c   synchronous probes at configure time and the WQ check;
 *   dsa_engine.c  the completion thread and the public lifecycle.
 * Everything here except the lifecycle runs on the completion thread, which
 * owns the jobs, the staged and active lists and the in-flight table.
 */
#ifndef DSAMIG_DSA_INTERNAL_H
#define DSAMIG_DSA_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "dsa_engine.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* DSAMIG_NO_X86_INSNS builds the portable variant on x86 too (to check it). */
#if defined(__x86_64__) && !defined(DSAMIG_NO_X86_INSNS)
#include <cpuid.h>
#include <immintrin.h>
#include <x86intrin.h>
#define DSAMIG_X86 1
#endif

#define PORTAL_SIZE 4096
#define DEFAULT_TIMEOUT_NS 1000000000ull
#define DEFAULT_SUBMIT_ATTEMPTS 64
#define DEFAULT_QUARANTINE_NS 1000000ull /* 1 ms before the second probe */
#define DEFAULT_MAX_STRIKES 6
#define QUARANTINE_MAX_NS 1000000000ull  /* longest back-off between probes */
#define SUBMIT_BACKOFF_MAX_NS 256000ull  /* longest wait before asking a full WQ again */
#define SLEEP_MIN_NS 4000ull
#define SLEEP_MAX_NS 200000ull    /* backoff sleeps once a prediction was missed */
#define PREDICTED_MAX_NS 5000000ull /* longest sleep on a prediction */
#define MAX_CREDITS 1024u
#define WAKE_SKIP_NS 50000ull
#define FREE_JOBS_KEPT 32

/* page_flags bits */
#define PG_NONZERO 1u
#define PG_CPU 2u

enum unit_state { UNIT_STAGED = 0, UNIT_INFLIGHT = 1, UNIT_DONE = 2 };

/* What an event says about a WQ. */
enum wq_event {
    WQ_TRANSIENT = 1, /* quarantine, probe, re-admit */
    WQ_FATAL = 2,     /* out for good */
};

typedef struct dsa_job dsa_job;

/* One submission to a WQ: a BATCH descriptor or a lone descriptor. */
typedef struct dsa_unit {
    dsa_job *job;
    dsamig_dsa_cr *cr; /* the record that says the unit is done */
    uint64_t submitted_ns;
    uint64_t deadline_ns;
    uint32_t first, count; /* member descriptors [first, first + count) */
    int wq;                /* where it was submitted */
    uint8_t state;
} dsa_unit;

/* One batch of pages on its way through the engine. */
struct dsa_job {
    dsamig_batch *b;
    dsa_job *next;             /* staged list, free list, held list */
    dsa_job *anext, *aprev;    /* active list */
    void *mem;
    size_t cap_descs, cap_units, cap_pages;
    dsamig_dsa_desc *descs;    /* one per page piece, 64-byte aligned */
    dsamig_dsa_desc *bdescs;   /* one per unit */
    dsamig_dsa_cr *crs;        /* one per member, 32-byte aligned */
    dsamig_dsa_cr *bcrs;       /* one per unit */
    dsa_unit *units;
    uint8_t *page_flags;
    size_t pages, ndescs, nunits, next_unit, units_left, inflight_units;
    uint64_t seq;              /* order of arrival: the oldest job is waited for first */
    uint64_t inflight_descs;   /* descriptors of its units in flight */
    size_t piece;              /* bytes per descriptor */
    size_t pieces_per_page;
    size_t per_unit;           /* members per unit (1: lone descriptors) */
    int wq;                    /* where its next units go */
    int held;                  /* the device may still write here */
    int cancelled;
    int error;                 /* EFAULT/EIO: the image lost pages (truncated file) */
    int staged;
};

typedef struct dsa_wq dsa_wq;

/* The portal: the only part that differs between hardware and emulation. */
typedef struct portal_ops {
    /* ENQCMD semantics: 0 accepted, 1 refused (retry), <0 -errno */
    int (*enqcmd)(dsa_wq *w, const dsamig_dsa_desc *d);
    /* MOVDIR64B semantics: posted, no answer */
    void (*movdir64b)(dsa_wq *w, const dsamig_dsa_desc *d);
    /* write() semantics: descriptors accepted, or -errno */
    long (*write)(dsa_wq *w, const dsamig_dsa_desc *d, size_t n);
    void (*close)(dsa_wq *w);
} portal_ops;

/* Memory for one NOOP probe or one BATCH of two NOOPs.  A probe that times
 * out may still be written by the device, so its block is only freed once
 * the WQs are closed. */
typedef struct dsa_probe {
    dsamig_dsa_desc desc[4]; /* 0: NOOP or BATCH, 2..3: the batch's members */
    dsamig_dsa_cr cr[4];     /* 0: its record, 2..3: the members' */
    struct dsa_probe *next;
} dsa_probe;

/* Other memory a device may still write (a check that timed out). */
typedef struct dsa_mem {
    struct dsa_mem *next;
    void *p;
} dsa_mem;

struct dsa_wq {
    const portal_ops *ops;
    int method;
    int emulated;
    int dedicated;
    int fd;
    void *portal;
    dsamig_swq swq;
    uint32_t credits, outstanding, max_batch, max_xfer;
    /* health (written by the completion thread; state, healthy and the
     * reasons under the engine lock) */
    int healthy;               /* in service */
    int state;                 /* enum dsamig_dsa_wq_state */
    uint32_t strikes;          /* quarantines since the last clean completion */
    uint64_t admitted_ns;      /* when it last entered service */
    uint64_t quarantined_ns;   /* when it last left service for quarantine */
    uint64_t probe_due_ns;     /* quarantined: when to send the next probe */
    uint64_t probe_deadline_ns; /* a probe in flight must complete by then */
    uint64_t probe_sent_ns;
    uint64_t probe_ns;         /* duration of the last successful probe */
    dsa_probe *probe;          /* the probe in flight, or NULL */
    char reason[320];
    char portal_note[160];
    char batch_note[128];
    char name[256];
    /* submission: a WQ that answers "full" is asked again at retry_at_ns */
    uint32_t submit_attempt;
    uint64_t retry_at_ns;
    uint64_t latency_ns;      /* moving average, submit to completion seen */
    uint64_t svc_ns_per_desc; /* moving average of the WQ's service time */
    uint64_t outstanding_descs; /* descriptors of the units in flight */
    uint64_t pass_descs;      /* descriptors seen complete in this poll pass */
    uint64_t pass_old_done;   /* units done in this pass that were in flight at the last */
    uint64_t prev_outstanding; /* units in flight at the end of the last pass */
    uint64_t acc_ns, acc_descs; /* busy time and descriptors not learnt from yet */
    /* counters, read with relaxed loads from other threads */
    uint64_t jobs, descriptors, batch_descriptors, submit_retries, retry_exhausted, page_faults,
        errors, timeouts, cpu_fallback_pages, quarantines, readmissions, probe_failures,
        probe_timeouts;
};

struct dsamig_dsa_engine {
    dsamig_cq cq;
    pthread_mutex_t lock;
    pthread_cond_t cond; /* CLOCK_MONOTONIC: the completion thread sleeps here */
    int configured, running, stopping, dead, sleeping, kill, thread_exited;
    uint64_t sleep_until_ns; /* end of the completion thread's timed sleep, 0: untimed */
    uint64_t dry_ns;         /* when the first healthy WQ should run out of work */
    dsamig_dsa_config cfg;
    int nwqs;
    dsa_wq wqs[DSAMIG_DSA_MAX_WQS];
    unsigned cpu;        /* what the engine may use: CPUID and the kernel agree */
    unsigned cpu_cpuid;  /* CPUID alone */
    int cpu_kernel;      /* the kernel's flags, or -errno */
    pthread_t thread;
    clockid_t thread_clock; /* CPU clock of the running completion thread */
    /* submitted, not yet taken by the completion thread (under lock) */
    dsamig_batch *pending_head, *pending_tail;
    uint64_t pending_n;
    /* owned by the completion thread */
    dsa_job *staged_head, *staged_tail;
    dsa_job *active;
    dsa_unit **inflight;
    size_t ninflight, cap_inflight;
    dsa_job *free_jobs;
    size_t nfree;
    dsa_job *held;           /* jobs the device may still write, freed at cleanup */
    dsa_probe *dead_probes;  /* likewise for probes */
    dsa_mem *held_mem;       /* and for other memory */
    uint32_t rr;
    uint64_t spin_from_ns, sleep_ns, next_expected_ns, last_poll_ns;
    uint64_t retry_wake_ns;  /* earliest retry_at_ns of a WQ with staged work */
    uint64_t timer_ns;       /* the thread must run again by then (retries, probes) */
    int probes_inflight;     /* re-admission probes waiting for their record */
    uint64_t job_seq;
    dsamig_dsa_stats s;
};

#define INC(field, n) __atomic_fetch_add(&(field), (uint64_t)(n), __ATOMIC_RELAXED)
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

/* ---- dsa_portal.c ---- */
extern const portal_ops dsa_hw_ops;
extern const portal_ops dsa_emu_ops;
/* Open and check a real WQ, map its portal if the kernel lets us, and choose
 * the method; 0 or -errno with a message in err. */
int dsa_open_real_wq(dsamig_dsa_engine *e, dsa_wq *w, const dsamig_dsa_wq_config *c, char *err,
                     size_t errlen);
/* Choose the method of a software WQ the same way (its kernel model may
 * refuse the portal). */
void dsa_choose_emulated_method(dsa_wq *w, const dsamig_dsa_wq_config *c);
/* Hand one descriptor to the WQ by its method: 0 accepted, 1 refused
 * ("full": ask again), -errno.  MOVDIR64B is always accepted. */
int dsa_submit_one(dsa_wq *w, const dsamig_dsa_desc *d);
#if DSAMIG_X86
/* Wait (C0.1) until the record's line is written or about max_ticks TSC ticks. */
void dsa_umwait(volatile uint8_t *status, uint64_t max_ticks);
#endif

static inline void dsa_cpu_relax(void)
{
#if DSAMIG_X86
    _mm_pause();
#endif
}

/* ---- dsa_jobs.c ---- */
void dsa_post(dsamig_dsa_engine *e, dsamig_batch *b);
void dsa_cpu_whole(dsamig_dsa_engine *e, dsamig_batch *b, int counted);
void dsa_job_free(dsa_job *j);
void dsa_job_release(dsamig_dsa_engine *e, dsa_job *j);
void dsa_active_remove(dsamig_dsa_engine *e, dsa_job *j);
void dsa_job_unit_done(dsamig_dsa_engine *e, dsa_job *j, dsa_unit *u);
void dsa_member_range(const dsa_job *j, size_t i, size_t *page, size_t *off, size_t *len);
void dsa_cpu_check(dsa_job *j, size_t p, size_t off, size_t len);
void dsa_member_result(dsamig_dsa_engine *e, dsa_wq *w, dsa_unit *u, size_t i, uint8_t st);
void dsa_job_begin(dsamig_dsa_engine *e, dsamig_batch *b);
void dsa_submit_staged(dsamig_dsa_engine *e);

/* ---- dsa_poll.c ---- */
size_t dsa_poll_inflight(dsamig_dsa_engine *e);
void dsa_idle_wait(dsamig_dsa_engine *e);
void dsa_sleep_until(dsamig_dsa_engine *e, uint64_t abs_ns);

/* ---- dsa_health.c ---- */
/* Something went wrong on WQ w with a unit submitted at submitted_ns (0:
 * not about a unit): quarantine it or take it out, keeping the first reason. */
void dsa_wq_event(dsamig_dsa_engine *e, dsa_wq *w, int kind, uint64_t submitted_ns,
                  const char *reason);
/* A record with an error status (what: "a descriptor" or "a batch"). */
void dsa_status_error(dsamig_dsa_engine *e, dsa_wq *w, dsa_unit *u, unsigned code,
                      const char *what);
/* Whether work for quarantined w may wait for its re-admission rather than
 * go to the CPU: only for about one probe's time, so a WQ whose probes keep
 * failing does not hold batches back. */
int dsa_wq_worth_waiting(const dsamig_dsa_engine *e, const dsa_wq *w, uint64_t now);
/* A unit completed cleanly: the WQ's strikes are forgiven. */
void dsa_wq_clean(dsa_wq *w, const dsa_unit *u);
/* Send due probes, read finished ones; returns when to look again. */
uint64_t dsa_health_tick(dsamig_dsa_engine *e, uint64_t now);
dsa_probe *dsa_probe_new(void);
/* A probe block the device may still write: kept until cleanup. */
void dsa_probe_retire(dsamig_dsa_engine *e, dsa_probe *p);
void dsa_probe_noop(dsa_probe *p);
void dsa_probe_batch(dsa_probe *p);

/* ---- dsa_probe.c ---- */
/* Probe WQ w synchronously (configure time): NOOP, then BATCH of two NOOPs
 * where batches are used.  0, or -errno with the reason in why. */
int dsa_probe_sync(dsamig_dsa_engine *e, dsa_wq *w, char *why, size_t whylen);

#endif
