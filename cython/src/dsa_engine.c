/* DSA backend of the engine contract (see dsa_engine.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "dsa_engine.h"

#include "sigbus_guard.h"
#include "zeroscan.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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

typedef struct dsa_job dsa_job;

/* One submission to a WQ: a BATCH descriptor or a lone descriptor. */
typedef struct dsa_unit {
    dsa_job *job;
    dsamig_dsa_cr *cr; /* the record that says the unit is done */
    uint64_t submitted_ns;
    uint64_t deadline_ns;
    uint32_t first, count; /* member descriptors [first, first + count) */
    uint8_t state;
} dsa_unit;

/* One batch of pages on its way through the engine. */
struct dsa_job {
    dsamig_batch *b;
    dsa_job *next;             /* staged list, free list, quarantine */
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
    int wq;
    int quarantined;           /* the device may still write here */
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

struct dsa_wq {
    const portal_ops *ops;
    int method;
    int emulated;
    int dedicated;
    int fd;
    void *portal;
    dsamig_swq swq;
    uint32_t credits, outstanding, max_batch, max_xfer;
    int healthy;
    char reason[128];
    char portal_note[128];
    char name[256];
    uint64_t latency_ns;      /* moving average, submit to completion seen */
    uint64_t svc_ns_per_desc; /* moving average of the WQ's service time */
    uint64_t outstanding_descs; /* descriptors of the units in flight */
    uint64_t pass_descs;      /* descriptors seen complete in this poll pass */
    uint64_t pass_old_done;   /* units done in this pass that were in flight at the last */
    uint64_t prev_outstanding; /* units in flight at the end of the last pass */
    uint64_t acc_ns, acc_descs; /* busy time and descriptors not learnt from yet */
    /* counters, read with relaxed loads from other threads */
    uint64_t jobs, descriptors, batch_descriptors, submit_retries, page_faults, errors,
        timeouts, cpu_fallback_pages;
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
    unsigned cpu;
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
    dsa_job *quarantine;
    uint32_t rr;
    uint64_t spin_from_ns, sleep_ns, next_expected_ns, last_poll_ns;
    uint64_t job_seq;
    dsamig_dsa_stats s;
};

#define INC(field, n) __atomic_fetch_add(&(field), (uint64_t)(n), __ATOMIC_RELAXED)
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

/* ---- CPU features and instructions ----------------------------------------- */

unsigned dsamig_dsa_cpu_features(void)
{
    unsigned f = 0;
#if DSAMIG_X86
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        if (c & (1u << 5))
            f |= DSAMIG_CPU_WAITPKG;
        if (c & (1u << 28))
            f |= DSAMIG_CPU_MOVDIR64B;
        if (c & (1u << 29))
            f |= DSAMIG_CPU_ENQCMD;
    }
#endif
    return f;
}

static inline void cpu_relax(void)
{
#if DSAMIG_X86
    _mm_pause();
#endif
}

#if DSAMIG_X86
/* ENQCMD and MOVDIR64B are compiled for their own target so the extension
 * builds with any x86-64 compiler flags; they only run after CPUID said so.
 * The SFENCE makes the descriptor list and the cleared records visible to
 * the device before the enqueue store, which is not ordered with them. */
__attribute__((target("enqcmd"))) static int hw_enqcmd(dsa_wq *w, const dsamig_dsa_desc *d)
{
    _mm_sfence();
    return _enqcmd(w->portal, d) ? 1 : 0; /* ZF=1: not accepted */
}

__attribute__((target("movdir64b"))) static void hw_movdir64b(dsa_wq *w, const dsamig_dsa_desc *d)
{
    _mm_sfence();
    _movdir64b(w->portal, d);
}

/* Wait (C0.1) until the record's line is written or about max_ticks TSC ticks. */
__attribute__((target("waitpkg"))) static void hw_umwait(volatile uint8_t *status,
                                                        uint64_t max_ticks)
{
    _umonitor((void *)status);
    if (*status == 0)
        _umwait(1, __rdtsc() + max_ticks);
}
#else
static int hw_enqcmd(dsa_wq *w, const dsamig_dsa_desc *d)
{
    (void)w;
    (void)d;
    return -EOPNOTSUPP;
}

static void hw_movdir64b(dsa_wq *w, const dsamig_dsa_desc *d)
{
    (void)w;
    (void)d;
}
#endif

static long hw_write(dsa_wq *w, const dsamig_dsa_desc *d, size_t n)
{
    ssize_t r = write(w->fd, d, n * sizeof(*d));
    if (r < 0)
        return -errno;
    return (long)((size_t)r / sizeof(*d));
}

static void hw_close(dsa_wq *w)
{
    /* Closing the file drains this process's descriptors from the WQ, so
     * quarantined memory is safe to free afterwards. */
    if (w->portal)
        munmap(w->portal, PORTAL_SIZE);
    if (w->fd >= 0)
        close(w->fd);
    w->portal = NULL;
    w->fd = -1;
}

static const portal_ops hw_ops = {hw_enqcmd, hw_movdir64b, hw_write, hw_close};

static int emu_enqcmd(dsa_wq *w, const dsamig_dsa_desc *d)
{
    return dsamig_swq_enqcmd(&w->swq, d);
}

static void emu_movdir64b(dsa_wq *w, const dsamig_dsa_desc *d)
{
    dsamig_swq_movdir64b(&w->swq, d);
}

static long emu_write(dsa_wq *w, const dsamig_dsa_desc *d, size_t n)
{
    return dsamig_swq_write(&w->swq, d, n);
}

static void emu_close(dsa_wq *w)
{
    dsamig_swq_stop(&w->swq); /* joins its engines: nothing writes any more */
}

static const portal_ops emu_ops = {emu_enqcmd, emu_movdir64b, emu_write, emu_close};

/* ---- helpers ---------------------------------------------------------------- */

static size_t host_page_size(void)
{
    static size_t cached;
    if (!cached)
        cached = (size_t)sysconf(_SC_PAGESIZE);
    return cached;
}

struct touch_args {
    const uint8_t *buf;
    size_t len;
};

/* Fault pages in before the device sees them.  A load per page costs a
 * cache miss on a mapped page (about 20 ns on the development VM) where
 * MADV_POPULATE_READ costs 200-400 ns per page even when every page is
 * mapped already; for a page that is not mapped both cost the fault. */
static void touch_call(void *arg)
{
    const struct touch_args *a = arg;
    size_t ps = host_page_size();
    uint8_t acc = 0;
    if (!a->len)
        return;
    for (size_t off = 0; off < a->len; off += ps)
        acc |= ((const volatile uint8_t *)a->buf)[off];
    acc |= ((const volatile uint8_t *)a->buf)[a->len - 1];
    __asm__ __volatile__("" : : "r"(acc));
}

/* Under the SIGBUS guard, as everything here that reads the image: a file
 * truncated while it is sent fails the batch (EFAULT) instead of the process. */
static int touch_pages(const uint8_t *buf, size_t len)
{
    struct touch_args a = {buf, len};
    return dsamig_guarded(touch_call, &a);
}

/* Take a WQ out of service; the first reason is kept for the stats and the
 * log line the Python side writes when it sees the event counter move. */
static void set_unhealthy(dsamig_dsa_engine *e, dsa_wq *w, const char *reason)
{
    if (!w->healthy)
        return;
    pthread_mutex_lock(&e->lock);
    w->healthy = 0;
    snprintf(w->reason, sizeof(w->reason), "%s", reason);
    pthread_mutex_unlock(&e->lock);
    INC(e->s.unhealthy_events, 1);
}

static void post(dsamig_dsa_engine *e, dsamig_batch *b)
{
    dsamig_cq_post(&e->cq, b);
}

/* The whole batch on the CPU (no healthy WQ, out of memory, dead thread);
 * counted is set when the batch was already counted as a job. */
static void cpu_whole(dsamig_dsa_engine *e, dsamig_batch *b, int counted)
{
    size_t pages = (b->len + b->page_size - 1) / b->page_size;
    b->status = dsamig_zero_bitmap_guarded(b->buf, b->len, b->page_size, b->group_pages,
                                           b->bitmap, &b->zero_pages);
    b->cpu_pages = pages;
    if (!counted) {
        INC(e->s.jobs, 1);
        INC(e->s.pages, pages);
    }
    INC(e->s.zero_pages, b->zero_pages);
    INC(e->s.cpu_fallback_pages, pages);
    post(e, b);
}

/* ---- jobs --------------------------------------------------------------------- */

static void job_free(dsa_job *j)
{
    free(j->mem);
    free(j);
}

static dsa_job *job_get(dsamig_dsa_engine *e, size_t ndescs, size_t nunits, size_t pages)
{
    dsa_job *j = e->free_jobs, *prev = NULL;
    size_t off, size;
    uint8_t *m;
    for (; j; prev = j, j = j->next)
        if (j->cap_descs >= ndescs && j->cap_units >= nunits && j->cap_pages >= pages)
            break;
    if (j) {
        if (prev)
            prev->next = j->next;
        else
            e->free_jobs = j->next;
        e->nfree--;
        j->next = NULL;
        return j;
    }
    j = calloc(1, sizeof(*j));
    if (!j)
        return NULL;
    /* One block: descriptors (64-aligned), records (32-aligned), then the rest. */
    size = 64 * ndescs + 64 * nunits + 32 * ndescs + 32 * nunits;
    off = size;
    size += sizeof(dsa_unit) * nunits + pages;
    size = (size + 63) & ~(size_t)63;
    if (posix_memalign(&j->mem, 64, size) != 0) {
        free(j);
        return NULL;
    }
    m = j->mem;
    j->descs = (dsamig_dsa_desc *)m;
    j->bdescs = (dsamig_dsa_desc *)(m + 64 * ndescs);
    j->crs = (dsamig_dsa_cr *)(m + 64 * ndescs + 64 * nunits);
    j->bcrs = (dsamig_dsa_cr *)(m + 64 * ndescs + 64 * nunits + 32 * ndescs);
    j->units = (dsa_unit *)(m + off);
    j->page_flags = m + off + sizeof(dsa_unit) * nunits;
    j->cap_descs = ndescs;
    j->cap_units = nunits;
    j->cap_pages = pages;
    return j;
}

static void job_release(dsamig_dsa_engine *e, dsa_job *j)
{
    j->b = NULL;
    if (j->quarantined) {
        j->next = e->quarantine;
        e->quarantine = j;
        INC(e->s.quarantined, 1);
    } else if (e->nfree < FREE_JOBS_KEPT) {
        j->next = e->free_jobs;
        e->free_jobs = j;
        e->nfree++;
    } else {
        job_free(j);
    }
}

static void active_add(dsamig_dsa_engine *e, dsa_job *j)
{
    j->aprev = NULL;
    j->anext = e->active;
    if (e->active)
        e->active->aprev = j;
    e->active = j;
}

static void active_remove(dsamig_dsa_engine *e, dsa_job *j)
{
    if (j->aprev)
        j->aprev->anext = j->anext;
    else
        e->active = j->anext;
    if (j->anext)
        j->anext->aprev = j->aprev;
    j->anext = j->aprev = NULL;
}

static void staged_append(dsamig_dsa_engine *e, dsa_job *j)
{
    j->next = NULL;
    j->staged = 1;
    if (e->staged_tail)
        e->staged_tail->next = j;
    else
        e->staged_head = j;
    e->staged_tail = j;
}

/* Fill the bitmap from the page flags and hand the batch back. */
static void job_finish(dsamig_dsa_engine *e, dsa_job *j)
{
    dsamig_batch *b = j->b;
    const uint8_t *flags = j->page_flags;
    uint8_t *out = b->bitmap;
    size_t zero = 0, cpu = 0;
    /* Group by group, each starting on a byte (the wire bitmaps, concatenated). */
    for (size_t start = 0; start < j->pages; start += b->group_pages) {
        size_t n = j->pages - start < b->group_pages ? j->pages - start : b->group_pages;
        for (size_t i = 0; i < n; i += 8) {
            unsigned byte = 0;
            for (size_t k = 0; k < 8 && i + k < n; k++) {
                uint8_t f = flags[start + i + k];
                unsigned is_zero = !(f & PG_NONZERO);
                byte |= is_zero << k;
                zero += is_zero;
                cpu += (f & PG_CPU) != 0;
            }
            *out++ = (uint8_t)byte;
        }
    }
    b->zero_pages = j->error ? 0 : zero;
    b->cpu_pages = cpu;
    b->status = j->error ? j->error : j->cancelled ? ECANCELED : 0;
    if (j->cancelled)
        INC(e->s.cancelled, 1);
    INC(e->s.zero_pages, zero);
    INC(e->s.cpu_fallback_pages, cpu);
    INC(e->wqs[j->wq].cpu_fallback_pages, cpu);
    active_remove(e, j);
    job_release(e, j);
    post(e, b);
}

static void job_unit_done(dsamig_dsa_engine *e, dsa_job *j, dsa_unit *u)
{
    u->state = UNIT_DONE;
    j->units_left--;
    if (j->units_left == 0 && !j->staged)
        job_finish(e, j);
}

/* The page and byte range of member descriptor i. */
static void member_range(const dsa_job *j, size_t i, size_t *page, size_t *off, size_t *len)
{
    const dsamig_batch *b = j->b;
    size_t p, k;
    if (j->pieces_per_page == 1) {
        *page = i;
        *off = i * b->page_size;
        *len = b->len - *off < b->page_size ? b->len - *off : b->page_size;
        return;
    }
    p = i / j->pieces_per_page;
    k = i % j->pieces_per_page;
    size_t o = p * b->page_size + k * j->piece;
    size_t n = j->piece;
    if (k * j->piece + n > b->page_size)
        n = b->page_size - k * j->piece;
    if (o + n > b->len)
        n = b->len - o;
    *page = p;
    *off = o;
    *len = n;
}

struct check_args {
    const uint8_t *buf;
    size_t len;
    int zero;
};

static void check_call(void *arg)
{
    struct check_args *a = arg;
    a->zero = dsamig_is_zero(a->buf, a->len);
}

static void cpu_check(dsa_job *j, size_t p, size_t off, size_t len)
{
    uint8_t *f = &j->page_flags[p];
    struct check_args a = {j->b->buf + off, len, 1};
    int err;
    if (*f & PG_NONZERO)
        return; /* another piece of the page already decided it */
    *f |= PG_CPU;
    if (!len)
        return;
    err = dsamig_guarded(check_call, &a);
    if (err && !j->error)
        j->error = err;
    if (!a.zero)
        *f |= PG_NONZERO;
}

/* Status codes after which the WQ is not trusted with more work: hardware
 * errors, and rejections of descriptors that are right by construction
 * (the WQ must be configured differently from what it reported). */
static int status_disables_wq(unsigned code)
{
    return code >= DSAMIG_COMP_BAD_OPCODE;
}

/* Apply the final status of member descriptor i. */
static void member_result(dsamig_dsa_engine *e, dsa_wq *w, dsa_job *j, size_t i, uint8_t st)
{
    const dsamig_dsa_cr *cr = &j->crs[i];
    unsigned code = st & DSAMIG_COMP_STATUS_MASK;
    size_t p, off, len;
    member_range(j, i, &p, &off, &len);
    switch (code) {
    case DSAMIG_COMP_SUCCESS:
    case DSAMIG_COMP_SUCCESS_PRED:
        if (cr->result)
            j->page_flags[p] |= PG_NONZERO;
        break;
    case DSAMIG_COMP_PAGE_FAULT_NOBOF: {
        size_t done = cr->bytes_completed;
        INC(e->s.page_faults, 1);
        INC(w->page_faults, 1);
        if (done > 0 && cr->result) {
            j->page_flags[p] |= PG_NONZERO; /* a difference before the fault */
            break;
        }
        if (done > len)
            done = 0;
        cpu_check(j, p, off + done, len - done);
        break;
    }
    case DSAMIG_COMP_NONE: /* not attempted: the batch stopped before it */
        cpu_check(j, p, off, len);
        break;
    default:
        INC(e->s.errors, 1);
        INC(w->errors, 1);
        if (status_disables_wq(code)) {
            char why[64];
            snprintf(why, sizeof(why), "a descriptor completed with status 0x%02x", code);
            set_unhealthy(e, w, why);
        }
        cpu_check(j, p, off, len);
        break;
    }
}

/* ---- building and submitting ------------------------------------------------- */

static int pick_wq(dsamig_dsa_engine *e)
{
    for (int k = 0; k < e->nwqs; k++) {
        int i = (int)((e->rr + (uint32_t)k) % (uint32_t)e->nwqs);
        if (e->wqs[i].healthy) {
            e->rr = (uint32_t)i + 1;
            return i;
        }
    }
    return -1;
}

static void units_off_device_all(dsa_job *j)
{
    j->next_unit = j->nunits;
    j->units_left = 0;
}

static void job_begin(dsamig_dsa_engine *e, dsamig_batch *b)
{
    size_t pages = (b->len + b->page_size - 1) / b->page_size;
    size_t piece, ppp, last_len, ndescs, per_unit, nunits;
    dsamig_dsa_desc tmpl;
    dsa_wq *w;
    dsa_job *j;
    int wq = pick_wq(e);

    if (pages == 0) {
        b->zero_pages = 0;
        b->cpu_pages = 0;
        b->status = 0;
        INC(e->s.jobs, 1);
        post(e, b);
        return;
    }
    if (wq < 0) {
        cpu_whole(e, b, 0);
        return;
    }
    w = &e->wqs[wq];
    piece = b->page_size < w->max_xfer ? b->page_size : w->max_xfer;
    ppp = (b->page_size + piece - 1) / piece;
    last_len = b->len - (pages - 1) * b->page_size;
    ndescs = (pages - 1) * ppp + (last_len + piece - 1) / piece;
    per_unit = (w->method != DSAMIG_DSA_WRITE && w->max_batch >= 2) ? w->max_batch : 1;
    nunits = (ndescs + per_unit - 1) / per_unit;
    j = job_get(e, ndescs, nunits, pages);
    if (!j) {
        cpu_whole(e, b, 0);
        return;
    }
    j->b = b;
    j->pages = pages;
    j->ndescs = ndescs;
    j->nunits = nunits;
    j->next_unit = 0;
    j->units_left = nunits;
    j->inflight_units = 0;
    j->piece = piece;
    j->pieces_per_page = ppp;
    j->wq = wq;
    j->quarantined = 0;
    j->error = 0;
    j->seq = e->job_seq++;
    j->inflight_descs = 0;
    j->cancelled = 0;
    j->staged = 0;
    INC(e->s.jobs, 1);
    INC(e->s.pages, pages);
    INC(w->jobs, 1);

    /* COMPVAL against the pattern 0 (comp_pattern, at dst_addr, stays 0):
     * a record for every page (RCR), no block-on-fault: a fault comes back
     * as a partial completion and the CPU finishes that page. */
    memset(&tmpl, 0, sizeof(tmpl));
    tmpl.flags_opcode = dsamig_desc_word(DSAMIG_OP_COMPVAL, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
    memset(j->crs, 0, ndescs * sizeof(dsamig_dsa_cr));
    memset(j->page_flags, 0, pages);
    /* The touch (when asked) faults the pages in; see touch_call(). */
    if (e->cfg.prefault && touch_pages(b->buf, b->len) != 0) {
        /* The image lost these pages: nothing for a device to read. */
        units_off_device_all(j);
        j->error = EFAULT;
        active_add(e, j);
        job_finish(e, j);
        return;
    }
    for (size_t i = 0; i < ndescs; i++) {
        size_t p, off, len;
        dsamig_dsa_desc *d = &j->descs[i];
        member_range(j, i, &p, &off, &len);
        *d = tmpl;
        d->completion_addr = (uint64_t)(uintptr_t)&j->crs[i];
        d->src_addr = (uint64_t)(uintptr_t)(b->buf + off);
        d->xfer_size = (uint32_t)len;
    }
    for (size_t u = 0; u < nunits; u++) {
        dsa_unit *unit = &j->units[u];
        unit->job = j;
        unit->first = (uint32_t)(u * per_unit);
        unit->count = (uint32_t)(ndescs - unit->first < per_unit ? ndescs - unit->first : per_unit);
        unit->state = UNIT_STAGED;
        if (unit->count == 1) {
            unit->cr = &j->crs[unit->first]; /* a lone descriptor: no batch around it */
        } else {
            dsamig_dsa_desc *bd = &j->bdescs[u];
            memset(bd, 0, sizeof(*bd));
            bd->flags_opcode =
                dsamig_desc_word(DSAMIG_OP_BATCH, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
            bd->completion_addr = (uint64_t)(uintptr_t)&j->bcrs[u];
            bd->src_addr = (uint64_t)(uintptr_t)&j->descs[unit->first]; /* desc_list_addr */
            bd->xfer_size = unit->count;                                /* desc_count */
            memset(&j->bcrs[u], 0, sizeof(dsamig_dsa_cr));
            unit->cr = &j->bcrs[u];
        }
    }
    active_add(e, j);
    staged_append(e, j);
}

/* Wait a little before asking a full WQ again: pause first, then sleep,
 * so a WQ shared with other processes gets time to drain. */
static void submit_backoff(uint32_t attempt)
{
    if (attempt < 6) {
        for (uint32_t i = 0; i < (16u << attempt); i++)
            cpu_relax();
    } else {
        uint64_t ns = 1000ull << (attempt < 14 ? attempt - 6 : 8);
        struct timespec ts = {0, (long)ns};
        nanosleep(&ts, NULL);
    }
}

static void unit_in_flight(dsamig_dsa_engine *e, dsa_wq *w, dsa_unit *u, uint64_t now)
{
    u->state = UNIT_INFLIGHT;
    u->submitted_ns = now;
    u->deadline_ns = now + e->cfg.timeout_ns;
    u->job->inflight_descs += u->count;
    w->outstanding_descs += u->count;
    u->job->inflight_units++;
    w->outstanding++;
    e->inflight[e->ninflight++] = u;
    INC(w->descriptors, u->count + (u->count > 1));
    INC(e->s.descriptors, u->count + (u->count > 1));
    if (u->count > 1) {
        INC(w->batch_descriptors, 1);
        INC(e->s.batch_descriptors, 1);
    }
}

/* Submit units of job j to its WQ while credits last.  Returns the number
 * submitted, or -errno when the WQ failed. */
static long submit_units(dsamig_dsa_engine *e, dsa_wq *w, dsa_job *j)
{
    long done = 0;
    while (j->next_unit < j->nunits && w->outstanding < w->credits) {
        dsa_unit *u = &j->units[j->next_unit];
        uint32_t attempt = 0;
        if (w->method == DSAMIG_DSA_WRITE) {
            /* Lone descriptors of consecutive units are contiguous: one
             * write() for as many as the credits allow. */
            size_t n = j->nunits - j->next_unit;
            long r;
            if (n > w->credits - w->outstanding)
                n = w->credits - w->outstanding;
            for (;;) {
                r = w->ops->write(w, &j->descs[u->first], n);
                if (r != -EAGAIN)
                    break;
                INC(w->submit_retries, 1);
                INC(e->s.submit_retries, 1);
                if (++attempt >= e->cfg.submit_attempts)
                    break;
                submit_backoff(attempt);
            }
            if (r <= 0)
                return r < 0 ? r : -EIO;
            uint64_t now = dsamig_now_ns();
            for (long k = 0; k < r; k++)
                unit_in_flight(e, w, &j->units[j->next_unit++], now);
            done += r;
            continue;
        }
        const dsamig_dsa_desc *d = u->count == 1 ? &j->descs[u->first] : &j->bdescs[u - j->units];
        if (w->method == DSAMIG_DSA_MOVDIR64B) {
            w->ops->movdir64b(w, d);
        } else {
            int r;
            while ((r = w->ops->enqcmd(w, d)) == 1) {
                INC(w->submit_retries, 1);
                INC(e->s.submit_retries, 1);
                if (++attempt >= e->cfg.submit_attempts)
                    return -EBUSY;
                submit_backoff(attempt);
            }
            if (r < 0)
                return r;
        }
        unit_in_flight(e, w, u, dsamig_now_ns());
        j->next_unit++;
        done++;
    }
    return done;
}

/* Units that will not reach a device: the CPU checks their pages, or at
 * stop they are cancelled. */
static void units_off_device(dsamig_dsa_engine *e, dsa_job *j, int cancel)
{
    while (j->next_unit < j->nunits) {
        dsa_unit *u = &j->units[j->next_unit++];
        if (cancel) {
            j->cancelled = 1;
        } else {
            for (uint32_t i = u->first; i < u->first + u->count; i++) {
                size_t p, off, len;
                member_range(j, i, &p, &off, &len);
                cpu_check(j, p, off, len);
            }
        }
        u->state = UNIT_DONE;
        j->units_left--;
    }
    (void)e;
}

static void submit_staged(dsamig_dsa_engine *e)
{
    dsa_job *j = e->staged_head, *prev = NULL;
    while (j) {
        dsa_job *next = j->next;
        dsa_wq *w = &e->wqs[j->wq];
        if (__atomic_load_n(&e->stopping, __ATOMIC_RELAXED)) {
            units_off_device(e, j, 1);
        } else if (!w->healthy) {
            units_off_device(e, j, 0);
        } else {
            long r = submit_units(e, w, j);
            if (r < 0) {
                char why[96];
                snprintf(why, sizeof(why), "submission failed: %s", strerror((int)-r));
                INC(e->s.submit_failures, 1);
                set_unhealthy(e, w, why);
                units_off_device(e, j, 0);
            }
        }
        if (j->next_unit == j->nunits) { /* nothing left to submit */
            if (prev)
                prev->next = next;
            else
                e->staged_head = next;
            if (e->staged_tail == j)
                e->staged_tail = prev;
            j->next = NULL;
            j->staged = 0;
            if (j->units_left == 0)
                job_finish(e, j);
        } else {
            prev = j;
        }
        j = next;
    }
}

/* ---- completions ------------------------------------------------------------- */

static void unit_complete(dsamig_dsa_engine *e, dsa_unit *u, uint8_t st, uint64_t now)
{
    dsa_job *j = u->job;
    dsa_wq *w = &e->wqs[j->wq];
    unsigned code = st & DSAMIG_COMP_STATUS_MASK;
    uint64_t lat = now - u->submitted_ns;
    w->outstanding--;
    w->outstanding_descs -= u->count;
    j->inflight_units--;
    j->inflight_descs -= u->count;
    __atomic_store_n(&w->latency_ns,
                     w->latency_ns ? w->latency_ns - w->latency_ns / 8 + lat / 8 : lat,
                     __ATOMIC_RELAXED);
    w->pass_descs += u->count;
    if (u->submitted_ns <= e->last_poll_ns)
        w->pass_old_done++;
    if (u->count == 1) {
        member_result(e, w, j, u->first, st);
    } else {
        uint32_t end = u->first + u->count;
        switch (code) {
        case DSAMIG_COMP_BATCH_PAGE_FAULT:
            INC(e->s.page_faults, 1);
            INC(w->page_faults, 1);
            /* members before the fault have their records, the rest are
             * still 0 and go to the CPU */
            __attribute__((fallthrough));
        case DSAMIG_COMP_SUCCESS:
        case DSAMIG_COMP_BATCH_FAIL:
            if (code == DSAMIG_COMP_BATCH_FAIL)
                INC(e->s.batch_failures, 1);
            for (uint32_t i = u->first; i < end; i++) {
                const dsamig_dsa_cr *cr = &j->crs[i];
                uint8_t mst = cr->status;
                /* The common case, one descriptor per page, inline. */
                if (mst == DSAMIG_COMP_SUCCESS && j->pieces_per_page == 1)
                    j->page_flags[i] |= cr->result ? PG_NONZERO : 0;
                else
                    member_result(e, w, j, i, mst);
            }
            break;
        default:
            INC(e->s.errors, 1);
            INC(w->errors, 1);
            if (status_disables_wq(code)) {
                char why[64];
                snprintf(why, sizeof(why), "a batch completed with status 0x%02x", code);
                set_unhealthy(e, w, why);
            }
            for (uint32_t i = u->first; i < end; i++) {
                size_t p, off, len;
                member_range(j, i, &p, &off, &len);
                cpu_check(j, p, off, len);
            }
            break;
        }
    }
    job_unit_done(e, j, u);
}

static void unit_timeout(dsamig_dsa_engine *e, dsa_unit *u)
{
    dsa_job *j = u->job;
    dsa_wq *w = &e->wqs[j->wq];
    char why[64];
    INC(e->s.timeouts, 1);
    INC(w->timeouts, 1);
    snprintf(why, sizeof(why), "a descriptor did not complete in %.3g s",
             (double)e->cfg.timeout_ns / 1e9);
    set_unhealthy(e, w, why);
    /* The device may still write these records (and read the list): the
     * job's memory is never reused while the WQ is open. */
    j->quarantined = 1;
    w->outstanding--;
    w->outstanding_descs -= u->count;
    j->inflight_units--;
    j->inflight_descs -= u->count;
    for (uint32_t i = u->first; i < u->first + u->count; i++) {
        size_t p, off, len;
        member_range(j, i, &p, &off, &len);
        cpu_check(j, p, off, len);
    }
    job_unit_done(e, j, u);
}

/* Learn a WQ's service time per descriptor, at the end of every poll pass.
 * Only time during which the WQ certainly had work counts: an interval
 * between two passes in which some unit that was already in flight at the
 * first pass is still not done.  The descriptors finished in such intervals
 * over their total length is the WQ's pace, however late the poller looked;
 * an interval in which the WQ ran dry says nothing and is dropped (a poller
 * that oversleeps must not teach itself to sleep longer). */
static void learn_pace(dsa_wq *w, uint64_t now, uint64_t prev_pass_ns)
{
    if (w->prev_outstanding && w->prev_outstanding > w->pass_old_done) {
        w->acc_ns += now - prev_pass_ns;
        w->acc_descs += w->pass_descs;
    } else {
        w->acc_ns = w->acc_descs = 0;
    }
    if (w->acc_descs >= 64) {
        uint64_t sample = w->acc_ns / w->acc_descs;
        w->svc_ns_per_desc = w->svc_ns_per_desc
                                 ? w->svc_ns_per_desc - w->svc_ns_per_desc / 4 + sample / 4
                                 : sample;
        w->acc_ns = w->acc_descs = 0;
    }
    w->pass_descs = w->pass_old_done = 0;
    w->prev_outstanding = w->outstanding;
}

/* One pass over everything in flight, in no particular order.  Returns the
 * number of units that finished, and sets e->next_expected_ns to when there
 * should be something worth waking for, predicted afresh from what is left
 * (so errors do not pile up): per WQ, its oldest batch's descriptors still in
 * flight at the WQ's pace, or a single unit's worth while that batch still
 * has units waiting for credits; never past a deadline. */
static size_t poll_inflight(dsamig_dsa_engine *e)
{
    uint64_t now = dsamig_now_ns(), deadline = UINT64_MAX, expected = UINT64_MAX;
    dsa_job *oldest[DSAMIG_DSA_MAX_WQS] = {NULL};
    size_t done = 0;
    INC(e->s.polls, 1);
    for (size_t i = 0; i < e->ninflight;) {
        dsa_unit *u = e->inflight[i];
        uint8_t st = __atomic_load_n(&u->cr->status, __ATOMIC_ACQUIRE);
        if (st || now >= u->deadline_ns) {
            e->inflight[i] = e->inflight[--e->ninflight];
            if (st)
                unit_complete(e, u, st, now);
            else
                unit_timeout(e, u);
            done++;
            continue;
        }
        if (u->deadline_ns < deadline)
            deadline = u->deadline_ns;
        i++;
    }
    for (size_t i = 0; i < e->ninflight; i++) {
        dsa_job *j = e->inflight[i]->job;
        if (!oldest[j->wq] || j->seq < oldest[j->wq]->seq)
            oldest[j->wq] = j;
    }
    for (int k = 0; k < e->nwqs; k++) {
        dsa_wq *w = &e->wqs[k];
        dsa_job *j = oldest[k];
        learn_pace(w, now, e->last_poll_ns);
        if (j && w->svc_ns_per_desc) {
            uint64_t descs = j->inflight_descs;
            if (j->next_unit < j->nunits && descs > w->max_batch)
                descs = w->max_batch ? w->max_batch : 1;
            if (now + descs * w->svc_ns_per_desc < expected)
                expected = now + descs * w->svc_ns_per_desc;
        }
    }
    e->last_poll_ns = now;
    /* No prediction yet (no pace learnt): poll and back off instead. */
    e->next_expected_ns = expected < deadline ? expected : expected == UINT64_MAX ? expected
                                                                                    : deadline;
    return done;
}

/* Sleep on the condition variable until abs_ns, unless a batch arrives
 * that should not wait that long. */
static void sleep_until(dsamig_dsa_engine *e, uint64_t abs_ns)
{
    struct timespec ts = {(time_t)(abs_ns / 1000000000ull), (long)(abs_ns % 1000000000ull)};
    uint64_t dry = UINT64_MAX, now = dsamig_now_ns();
    for (int i = 0; i < e->nwqs; i++) {
        dsa_wq *w = &e->wqs[i];
        uint64_t until = now + w->outstanding_descs * w->svc_ns_per_desc;
        if (w->healthy && until < dry)
            dry = until;
    }
    pthread_mutex_lock(&e->lock);
    if (!e->pending_head && !e->kill) {
        e->sleeping = 1;
        e->sleep_until_ns = abs_ns;
        e->dry_ns = dry;
        pthread_cond_timedwait(&e->cond, &e->lock, &ts);
        e->sleeping = 0;
    }
    pthread_mutex_unlock(&e->lock);
    INC(e->s.sleeps, 1);
}

/* Nothing finished in the last pass: wait a little, adaptively.  Sleep
 * through most of the expected latency, then spin (UMWAIT where the CPU has
 * it) for spin_ns, then sleep in growing steps; never past a deadline. */
static void idle_wait(dsamig_dsa_engine *e)
{
    uint64_t now = dsamig_now_ns();
    if (e->next_expected_ns != UINT64_MAX && e->next_expected_ns > now + SLEEP_MIN_NS) {
        uint64_t until = e->next_expected_ns;
        if (until > now + PREDICTED_MAX_NS)
            until = now + PREDICTED_MAX_NS;
        sleep_until(e, until);
        e->spin_from_ns = until; /* if the prediction was early, spin from there */
        return;
    }
    if (now - e->spin_from_ns < e->cfg.spin_ns) {
#if DSAMIG_X86
        if ((e->cpu & DSAMIG_CPU_WAITPKG) && e->ninflight) {
            hw_umwait(&e->inflight[0]->cr->status, 20000);
            return;
        }
#endif
        for (int i = 0; i < 64; i++)
            cpu_relax();
        return;
    }
    e->sleep_ns = e->sleep_ns ? e->sleep_ns * 2 : SLEEP_MIN_NS;
    if (e->sleep_ns > SLEEP_MAX_NS)
        e->sleep_ns = SLEEP_MAX_NS;
    sleep_until(e, now + e->sleep_ns);
}

/* ---- the completion thread ----------------------------------------------------- */

static dsamig_batch *take_pending(dsamig_dsa_engine *e)
{
    dsamig_batch *list = e->pending_head;
    e->pending_head = e->pending_tail = NULL;
    __atomic_store_n(&e->pending_n, 0, __ATOMIC_RELAXED);
    return list;
}

/* The exit path of a failing completion thread: no WQ gets work any more,
 * every batch it holds is checked on the CPU, memory the devices may still
 * write is quarantined, and later batches are checked by the submitter. */
static void die(dsamig_dsa_engine *e)
{
    dsamig_batch *list;
    pthread_mutex_lock(&e->lock);
    e->dead = 1;
    list = take_pending(e);
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->nwqs; i++)
        set_unhealthy(e, &e->wqs[i], "the completion thread exited");
    for (size_t i = 0; i < e->ninflight; i++) {
        dsa_unit *u = e->inflight[i];
        u->job->quarantined = 1;
        e->wqs[u->job->wq].outstanding--;
        e->wqs[u->job->wq].outstanding_descs -= u->count;
    }
    e->ninflight = 0;
    e->staged_head = e->staged_tail = NULL;
    while (e->active) {
        dsa_job *j = e->active;
        dsamig_batch *b = j->b;
        active_remove(e, j);
        job_release(e, j);
        cpu_whole(e, b, 1);
    }
    while (list) {
        dsamig_batch *next = list->next;
        cpu_whole(e, list, 0);
        list = next;
    }
}

static void completion_exit(dsamig_dsa_engine *e)
{
    uint64_t cpu = dsamig_thread_cpu_ns();
    pthread_mutex_lock(&e->lock);
    INC(e->s.completion_cpu_ns, cpu);
    e->thread_exited = 1;
    pthread_mutex_unlock(&e->lock);
}

static void *completion_main(void *arg)
{
    dsamig_dsa_engine *e = arg;
    dsamig_set_thread_name("dsamig-dsa-cmpl");
    /* Short sleeps must stay short: the default 50 us slack would add more
     * than a batch takes on hardware. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    e->spin_from_ns = dsamig_now_ns();
    e->next_expected_ns = UINT64_MAX;
    for (;;) {
        size_t done;
        int stopping = __atomic_load_n(&e->stopping, __ATOMIC_RELAXED);
        if (__atomic_load_n(&e->kill, __ATOMIC_RELAXED)) {
            die(e);
            break;
        }
        if (__atomic_load_n(&e->pending_n, __ATOMIC_RELAXED) ||
            (!e->ninflight && !e->staged_head)) {
            dsamig_batch *list;
            pthread_mutex_lock(&e->lock);
            while (!e->pending_head && !e->ninflight && !e->staged_head && !e->stopping &&
                   !e->kill) {
                e->sleeping = 1;
                e->sleep_until_ns = 0;
                pthread_cond_wait(&e->cond, &e->lock);
                e->sleeping = 0;
            }
            if (e->kill) {
                pthread_mutex_unlock(&e->lock);
                continue;
            }
            list = take_pending(e);
            stopping = e->stopping;
            pthread_mutex_unlock(&e->lock);
            while (list) {
                dsamig_batch *next = list->next;
                if (stopping) {
                    list->status = ECANCELED;
                    list->zero_pages = 0;
                    list->cpu_pages = 0;
                    INC(e->s.cancelled, 1);
                    post(e, list);
                } else {
                    job_begin(e, list);
                }
                list = next;
            }
            e->spin_from_ns = dsamig_now_ns();
            e->sleep_ns = 0;
        }
        submit_staged(e);
        done = poll_inflight(e);
        /* At stop, what is in flight completes or times out first: its
         * memory must not go back to the caller while a device reads it. */
        if (stopping && !e->ninflight && !e->staged_head && !e->active)
            break;
        if (done) {
            e->spin_from_ns = dsamig_now_ns();
            e->sleep_ns = 0;
        } else if (e->ninflight) {
            idle_wait(e);
        }
    }
    if (!e->dead) {
        /* Submitted while we were deciding to stop: cancelled too. */
        dsamig_batch *list;
        pthread_mutex_lock(&e->lock);
        list = take_pending(e);
        pthread_mutex_unlock(&e->lock);
        while (list) {
            dsamig_batch *next = list->next;
            list->status = ECANCELED;
            list->zero_pages = 0;
            list->cpu_pages = 0;
            INC(e->s.cancelled, 1);
            post(e, list);
            list = next;
        }
    }
    completion_exit(e);
    return NULL;
}

/* ---- lifecycle ------------------------------------------------------------------- */

dsamig_dsa_engine *dsamig_dsa_engine_new(void)
{
    pthread_condattr_t ca;
    dsamig_dsa_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    if (dsamig_cq_init(&e->cq) != 0) {
        free(e);
        return NULL;
    }
    pthread_mutex_init(&e->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->cond, &ca);
    pthread_condattr_destroy(&ca);
    e->cpu = dsamig_dsa_cpu_features();
    return e;
}

dsamig_cq *dsamig_dsa_engine_cq(dsamig_dsa_engine *e)
{
    return &e->cq;
}

void dsamig_dsa_engine_free(dsamig_dsa_engine *e)
{
    if (!e)
        return;
    dsamig_dsa_engine_cleanup(e);
    dsamig_cq_destroy(&e->cq);
    pthread_cond_destroy(&e->cond);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

static int open_real_wq(dsamig_dsa_engine *e, dsa_wq *w, const dsamig_dsa_wq_config *c, char *err,
                        size_t errlen)
{
    struct stat st;
    int want_portal;
    w->fd = open(c->path, O_RDWR | O_CLOEXEC);
    if (w->fd < 0) {
        int rc = errno;
        snprintf(err, errlen, "cannot open DSA work queue %s: %s%s", c->path, strerror(rc),
                 rc == EBUSY ? " (a dedicated WQ is open in another process)" : "");
        return -rc;
    }
    if (fstat(w->fd, &st) != 0 || !S_ISCHR(st.st_mode)) {
        snprintf(err, errlen, "%s is not a DSA work queue (not a character device)", c->path);
        close(w->fd);
        w->fd = -1;
        return -ENODEV;
    }
    w->ops = &hw_ops;
    want_portal = !c->use_write &&
                  (c->dedicated ? (e->cpu & DSAMIG_CPU_MOVDIR64B) : (e->cpu & DSAMIG_CPU_ENQCMD));
    if (c->use_write)
        snprintf(w->portal_note, sizeof(w->portal_note), "write() requested");
    else if (!want_portal)
        snprintf(w->portal_note, sizeof(w->portal_note), "the CPU lacks %s",
                 c->dedicated ? "MOVDIR64B" : "ENQCMD");
    if (want_portal) {
        void *p = mmap(NULL, PORTAL_SIZE, PROT_WRITE, MAP_SHARED | MAP_POPULATE, w->fd, 0);
        if (p != MAP_FAILED) {
            w->portal = p;
        } else if (errno == EPERM) {
            snprintf(w->portal_note, sizeof(w->portal_note),
                     "mapping the portal needs CAP_SYS_RAWIO");
        } else {
            snprintf(w->portal_note, sizeof(w->portal_note), "cannot map the portal: %s",
                     strerror(errno));
        }
    }
    if (w->portal)
        w->method = c->dedicated ? DSAMIG_DSA_MOVDIR64B : DSAMIG_DSA_ENQCMD;
    else
        w->method = DSAMIG_DSA_WRITE;
    return 0;
}

int dsamig_dsa_engine_configure(dsamig_dsa_engine *e, const dsamig_dsa_config *cfg, char *err,
                                size_t errlen)
{
    size_t credits = 0;
    int rc = 0;
    if (err && errlen)
        err[0] = 0;
    dsamig_dsa_engine_cleanup(e);
    if (cfg->nwqs < 1 || cfg->nwqs > DSAMIG_DSA_MAX_WQS) {
        snprintf(err, errlen, "between 1 and %d work queues, not %d", DSAMIG_DSA_MAX_WQS,
                 cfg->nwqs);
        return -EINVAL;
    }
    e->cfg = *cfg;
    if (!e->cfg.timeout_ns)
        e->cfg.timeout_ns = DEFAULT_TIMEOUT_NS;
    if (!e->cfg.submit_attempts)
        e->cfg.submit_attempts = DEFAULT_SUBMIT_ATTEMPTS;
    for (int i = 0; i < cfg->nwqs; i++) {
        const dsamig_dsa_wq_config *c = &cfg->wqs[i];
        dsa_wq *w = &e->wqs[i];
        memset(w, 0, sizeof(*w));
        w->fd = -1;
        w->dedicated = c->dedicated;
        w->emulated = c->emulated;
        w->max_batch = c->max_batch_size;
        w->max_xfer = c->max_transfer_size ? c->max_transfer_size : 4096;
        if (c->size < 1 || (!c->dedicated && c->threshold > c->size)) {
            snprintf(err, errlen, "work queue %d: size %u and threshold %u are not usable", i,
                     c->size, c->threshold);
            rc = -EINVAL;
        } else if (c->emulated) {
            dsamig_swq_config q = c->emu;
            q.id = i;
            q.dedicated = c->dedicated;
            q.size = c->size;
            q.threshold = c->threshold ? c->threshold : c->size;
            q.max_batch_size = c->max_batch_size ? c->max_batch_size : 1;
            q.max_transfer_size = w->max_xfer;
            snprintf(w->name, sizeof(w->name), "emulated:%d", i);
            rc = dsamig_swq_start(&w->swq, &q);
            if (rc)
                snprintf(err, errlen, "cannot start software work queue %d: %s", i,
                         strerror(-rc));
            w->ops = &emu_ops;
            w->method = c->use_write ? DSAMIG_DSA_WRITE
                        : c->dedicated ? DSAMIG_DSA_MOVDIR64B
                                       : DSAMIG_DSA_ENQCMD;
        } else {
            snprintf(w->name, sizeof(w->name), "%s", c->path);
            rc = open_real_wq(e, w, c, err, errlen);
        }
        if (rc) {
            for (int k = 0; k < i; k++)
                e->wqs[k].ops->close(&e->wqs[k]);
            memset(w, 0, sizeof(*w));
            return rc;
        }
        /* Never more in flight than the WQ takes: a dedicated WQ drops the
         * excess silently, a shared one would only answer "retry". */
        w->credits = c->dedicated || !c->threshold ? c->size : c->threshold;
        if (w->credits > MAX_CREDITS)
            w->credits = MAX_CREDITS;
        w->healthy = 1;
        credits += w->credits;
    }
    e->inflight = calloc(credits, sizeof(*e->inflight));
    if (!e->inflight) {
        for (int k = 0; k < cfg->nwqs; k++)
            e->wqs[k].ops->close(&e->wqs[k]);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    e->cap_inflight = credits;
    e->nwqs = cfg->nwqs;
    e->rr = 0;
    e->configured = 1;
    return 0;
}

int dsamig_dsa_engine_start(dsamig_dsa_engine *e)
{
    int rc;
    pthread_mutex_lock(&e->lock);
    if (e->running) {
        pthread_mutex_unlock(&e->lock);
        return 0;
    }
    if (!e->configured) {
        pthread_mutex_unlock(&e->lock);
        return -EINVAL;
    }
    e->stopping = 0;
    e->dead = 0;
    e->kill = 0;
    e->thread_exited = 0;
    rc = pthread_create(&e->thread, NULL, completion_main, e);
    if (rc == 0) {
        e->running = 1;
        if (pthread_getcpuclockid(e->thread, &e->thread_clock) != 0)
            e->thread_exited = 1; /* no live figure: only the one it leaves at exit */
    }
    pthread_mutex_unlock(&e->lock);
    return -rc;
}

/* CPU time of the completion thread while it runs (lock held). */
static uint64_t live_thread_cpu_ns(dsamig_dsa_engine *e)
{
    struct timespec ts;
    if (!e->running || e->thread_exited || clock_gettime(e->thread_clock, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void dsamig_dsa_engine_stop(dsamig_dsa_engine *e)
{
    pthread_mutex_lock(&e->lock);
    if (!e->running || e->stopping) {
        pthread_mutex_unlock(&e->lock);
        return;
    }
    e->stopping = 1;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->thread, NULL);
    pthread_mutex_lock(&e->lock);
    e->running = 0;
    e->stopping = 0;
    pthread_mutex_unlock(&e->lock);
}

void dsamig_dsa_engine_cleanup(dsamig_dsa_engine *e)
{
    dsamig_dsa_engine_stop(e);
    if (!e->configured)
        return;
    for (int i = 0; i < e->nwqs; i++)
        e->wqs[i].ops->close(&e->wqs[i]);
    /* Only now can nothing write into quarantined jobs. */
    while (e->quarantine) {
        dsa_job *j = e->quarantine;
        e->quarantine = j->next;
        job_free(j);
    }
    while (e->free_jobs) {
        dsa_job *j = e->free_jobs;
        e->free_jobs = j->next;
        job_free(j);
    }
    e->nfree = 0;
    free(e->inflight);
    e->inflight = NULL;
    e->cap_inflight = e->ninflight = 0;
    e->nwqs = 0;
    e->configured = 0;
}

int dsamig_dsa_engine_is_running(dsamig_dsa_engine *e)
{
    int r;
    pthread_mutex_lock(&e->lock);
    r = e->running && !e->stopping;
    pthread_mutex_unlock(&e->lock);
    return r;
}

int dsamig_dsa_engine_is_configured(dsamig_dsa_engine *e)
{
    return e->configured;
}

int dsamig_dsa_engine_submit(dsamig_dsa_engine *e, dsamig_batch *b)
{
    b->next = NULL;
    pthread_mutex_lock(&e->lock);
    if (!e->running || e->stopping) {
        pthread_mutex_unlock(&e->lock);
        return -ESHUTDOWN;
    }
    if (e->dead) {
        pthread_mutex_unlock(&e->lock);
        cpu_whole(e, b, 0);
        return 0;
    }
    if (e->pending_tail)
        e->pending_tail->next = b;
    else
        e->pending_head = b;
    e->pending_tail = b;
    __atomic_store_n(&e->pending_n, e->pending_n + 1, __ATOMIC_RELAXED);
    /* A wake-up is a system call here and a context switch there: skip it
     * while every WQ has work queued past the thread's own wake-up time, or
     * that time is near anyway. */
    if (e->sleeping &&
        (!e->sleep_until_ns ||
         (e->sleep_until_ns > e->dry_ns && e->sleep_until_ns > dsamig_now_ns() + WAKE_SKIP_NS)))
        pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

void dsamig_dsa_engine_fail_completion_thread(dsamig_dsa_engine *e)
{
    pthread_mutex_lock(&e->lock);
    __atomic_store_n(&e->kill, 1, __ATOMIC_RELAXED);
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

void dsamig_dsa_engine_get_stats(dsamig_dsa_engine *e, dsamig_dsa_stats *out)
{
    const uint64_t *src = (const uint64_t *)&e->s;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    /* Under the lock, so a thread that exits now is counted exactly once. */
    pthread_mutex_lock(&e->lock);
    out->completion_cpu_ns = LOAD(e->s.completion_cpu_ns) + live_thread_cpu_ns(e);
    pthread_mutex_unlock(&e->lock);
}

int dsamig_dsa_engine_nwqs(dsamig_dsa_engine *e)
{
    return e->nwqs;
}

int dsamig_dsa_engine_get_wq_stats(dsamig_dsa_engine *e, int i, dsamig_dsa_wq_stats *out)
{
    dsa_wq *w;
    if (i < 0 || i >= e->nwqs)
        return -EINVAL;
    w = &e->wqs[i];
    memset(out, 0, sizeof(*out));
    out->jobs = LOAD(w->jobs);
    out->descriptors = LOAD(w->descriptors);
    out->batch_descriptors = LOAD(w->batch_descriptors);
    out->submit_retries = LOAD(w->submit_retries);
    out->page_faults = LOAD(w->page_faults);
    out->errors = LOAD(w->errors);
    out->timeouts = LOAD(w->timeouts);
    out->cpu_fallback_pages = LOAD(w->cpu_fallback_pages);
    out->credits = w->credits;
    out->outstanding = __atomic_load_n(&w->outstanding, __ATOMIC_RELAXED);
    out->latency_ns = LOAD(w->latency_ns);
    out->method = w->method;
    out->emulated = w->emulated;
    out->dedicated = w->dedicated;
    pthread_mutex_lock(&e->lock);
    out->healthy = w->healthy;
    snprintf(out->reason, sizeof(out->reason), "%s", w->reason);
    snprintf(out->portal_note, sizeof(out->portal_note), "%s", w->portal_note);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

dsamig_swq *dsamig_dsa_engine_swq(dsamig_dsa_engine *e, int i)
{
    if (i < 0 || i >= e->nwqs || !e->wqs[i].emulated)
        return NULL;
    return &e->wqs[i].swq;
}
