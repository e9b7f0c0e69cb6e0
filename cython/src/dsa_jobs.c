/* Jobs and descriptors (see dsa_internal.h): the descriptor memory of each
 * batch, building COMPVAL and BATCH descriptors, submitting them, and
 * turning member records into page flags. */
#include "dsa_internal.h"

#include "sigbus_guard.h"
#include "zeroscan.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- helpers -------------------------------------------------------------------- */

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

void dsa_post(dsamig_dsa_engine *e, dsamig_batch *b)
{
    dsamig_cq_post(&e->cq, b);
}

/* The whole batch on the CPU (no WQ in service, out of memory, dead thread);
 * counted is set when the batch was already counted as a job. */
void dsa_cpu_whole(dsamig_dsa_engine *e, dsamig_batch *b, int counted)
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
    dsa_post(e, b);
}

/* ---- jobs --------------------------------------------------------------------- */

void dsa_job_free(dsa_job *j)
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

void dsa_job_release(dsamig_dsa_engine *e, dsa_job *j)
{
    j->b = NULL;
    if (j->held) {
        j->next = e->held;
        e->held = j;
        INC(e->s.held, 1);
    } else if (e->nfree < FREE_JOBS_KEPT) {
        j->next = e->free_jobs;
        e->free_jobs = j;
        e->nfree++;
    } else {
        dsa_job_free(j);
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

void dsa_active_remove(dsamig_dsa_engine *e, dsa_job *j)
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
    dsa_active_remove(e, j);
    dsa_job_release(e, j);
    dsa_post(e, b);
}

void dsa_job_unit_done(dsamig_dsa_engine *e, dsa_job *j, dsa_unit *u)
{
    u->state = UNIT_DONE;
    j->units_left--;
    if (j->units_left == 0 && !j->staged)
        job_finish(e, j);
}

/* The page and byte range of member descriptor i. */
void dsa_member_range(const dsa_job *j, size_t i, size_t *page, size_t *off, size_t *len)
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

void dsa_cpu_check(dsa_job *j, size_t p, size_t off, size_t len)
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

/* Apply the final status of member descriptor i of unit u. */
void dsa_member_result(dsamig_dsa_engine *e, dsa_wq *w, dsa_unit *u, size_t i, uint8_t st)
{
    dsa_job *j = u->job;
    const dsamig_dsa_cr *cr = &j->crs[i];
    unsigned code = st & DSAMIG_COMP_STATUS_MASK;
    size_t p, off, len;
    dsa_member_range(j, i, &p, &off, &len);
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
        dsa_cpu_check(j, p, off + done, len - done);
        break;
    }
    case DSAMIG_COMP_NONE: /* not attempted: the batch stopped before it */
        dsa_cpu_check(j, p, off, len);
        break;
    default:
        dsa_status_error(e, w, u, code, "a descriptor");
        dsa_cpu_check(j, p, off, len);
        break;
    }
}

/* ---- building and submitting ------------------------------------------------- */

/* The next WQ in service, round-robin; else one that was quarantined a
 * moment ago (its probe will most likely re-admit it); else -1. */
static int pick_wq(dsamig_dsa_engine *e)
{
    uint64_t now;
    for (int k = 0; k < e->nwqs; k++) {
        int i = (int)((e->rr + (uint32_t)k) % (uint32_t)e->nwqs);
        if (e->wqs[i].healthy) {
            e->rr = (uint32_t)i + 1;
            return i;
        }
    }
    now = dsamig_now_ns();
    for (int i = 0; i < e->nwqs; i++)
        if (dsa_wq_worth_waiting(e, &e->wqs[i], now))
            return i;
    return -1;
}

static void units_off_device_all(dsa_job *j)
{
    j->next_unit = j->nunits;
    j->units_left = 0;
}

void dsa_job_begin(dsamig_dsa_engine *e, dsamig_batch *b)
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
        dsa_post(e, b);
        return;
    }
    if (wq < 0) {
        dsa_cpu_whole(e, b, 0);
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
        dsa_cpu_whole(e, b, 0);
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
    j->per_unit = per_unit;
    j->held = 0;
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
        dsa_member_range(j, i, &p, &off, &len);
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

/* How long a WQ that answered "full" gets before it is asked again: at
 * once for the first few answers, then a doubling wait, so a WQ shared with
 * other processes gets time to drain.  The completion thread polls the
 * other WQs meanwhile. */
static uint64_t submit_backoff_ns(uint32_t attempt)
{
    uint64_t ns;
    if (attempt < 4)
        return 0;
    ns = 1000ull << (attempt - 4 < 8 ? attempt - 4 : 8);
    return ns < SUBMIT_BACKOFF_MAX_NS ? ns : SUBMIT_BACKOFF_MAX_NS;
}

static void unit_in_flight(dsamig_dsa_engine *e, dsa_wq *w, dsa_unit *u, uint64_t now)
{
    u->state = UNIT_INFLIGHT;
    u->wq = (int)(w - e->wqs);
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

/* The WQ answered "full": ask again later, or give up once the retry
 * budget is spent (-EAGAIN). */
static int submit_refused(dsamig_dsa_engine *e, dsa_wq *w, uint64_t now)
{
    INC(w->submit_retries, 1);
    INC(e->s.submit_retries, 1);
    if (++w->submit_attempt >= e->cfg.submit_attempts)
        return -EAGAIN;
    w->retry_at_ns = now + submit_backoff_ns(w->submit_attempt);
    return 0;
}

/* Submit units of job j to WQ w while credits last and the WQ accepts
 * them.  Never waits: a WQ that answers "full" is left until its retry_at_ns.
 * Returns the number submitted, -EAGAIN when the retry budget is spent, or
 * another -errno when a submission failed. */
static long submit_units(dsamig_dsa_engine *e, dsa_wq *w, dsa_job *j)
{
    long done = 0;
    while (j->next_unit < j->nunits && w->outstanding < w->credits) {
        dsa_unit *u = &j->units[j->next_unit];
        uint64_t now;
        if (w->method == DSAMIG_DSA_WRITE) {
            /* Lone descriptors of consecutive units are contiguous: one
             * write() for as many as the credits allow. */
            size_t n = j->nunits - j->next_unit;
            long r;
            if (n > w->credits - w->outstanding)
                n = w->credits - w->outstanding;
            r = w->ops->write(w, &j->descs[u->first], n);
            now = dsamig_now_ns();
            if (r == -EAGAIN) {
                int rc = submit_refused(e, w, now);
                return rc ? rc : done;
            }
            if (r <= 0)
                return r < 0 ? r : -EIO;
            w->submit_attempt = 0;
            for (long k = 0; k < r; k++)
                unit_in_flight(e, w, &j->units[j->next_unit++], now);
            done += r;
            continue;
        }
        const dsamig_dsa_desc *d = u->count == 1 ? &j->descs[u->first] : &j->bdescs[u - j->units];
        if (w->method == DSAMIG_DSA_MOVDIR64B) {
            w->ops->movdir64b(w, d);
            now = dsamig_now_ns();
        } else {
            int r = w->ops->enqcmd(w, d);
            now = dsamig_now_ns();
            if (r == 1) {
                int rc = submit_refused(e, w, now);
                return rc ? rc : done;
            }
            if (r < 0)
                return r;
        }
        w->submit_attempt = 0;
        unit_in_flight(e, w, u, now);
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
                dsa_member_range(j, i, &p, &off, &len);
                dsa_cpu_check(j, p, off, len);
            }
        }
        u->state = UNIT_DONE;
        j->units_left--;
    }
    (void)e;
}

/* Whether WQ w can take the units of job j as they are built: the same
 * pieces fit its transfer size, and its batches hold the job's units. */
static int wq_fits(const dsa_wq *w, const dsa_job *j)
{
    if (!w->healthy || w->max_xfer < j->piece)
        return 0;
    return j->per_unit == 1 || (w->method != DSAMIG_DSA_WRITE && w->max_batch >= j->per_unit);
}

/* Another WQ in service for the units of j that its own WQ cannot take. */
static int rehome(dsamig_dsa_engine *e, dsa_job *j)
{
    for (int k = 1; k < e->nwqs; k++) {
        int i = (j->wq + k) % e->nwqs;
        if (wq_fits(&e->wqs[i], j))
            return i;
    }
    return -1;
}

void dsa_submit_staged(dsamig_dsa_engine *e)
{
    dsa_job *j = e->staged_head, *prev = NULL;
    uint64_t now = dsamig_now_ns();
    e->retry_wake_ns = UINT64_MAX;
    while (j) {
        dsa_job *next = j->next;
        dsa_wq *w = &e->wqs[j->wq];
        if (__atomic_load_n(&e->stopping, __ATOMIC_RELAXED)) {
            units_off_device(e, j, 1);
        } else {
            int wait = 0;
            if (!w->healthy) {
                /* Quarantined or out: what is not submitted yet goes to
                 * another WQ if one fits, else waits a moment for the
                 * re-admission of its own, else goes to the CPU. */
                int alt = rehome(e, j);
                if (alt >= 0) {
                    j->wq = alt;
                    w = &e->wqs[alt];
                } else if (dsa_wq_worth_waiting(e, w, now)) {
                    wait = 1;
                    if (w->quarantined_ns + e->cfg.timeout_ns < e->retry_wake_ns)
                        e->retry_wake_ns = w->quarantined_ns + e->cfg.timeout_ns;
                } else {
                    units_off_device(e, j, 0);
                }
            }
            if (wait) {
                /* looked at again when the WQ is re-admitted or the wait ends */
            } else if (j->next_unit < j->nunits && w->retry_at_ns > now) {
                if (w->retry_at_ns < e->retry_wake_ns)
                    e->retry_wake_ns = w->retry_at_ns;
            } else if (j->next_unit < j->nunits) {
                long r = submit_units(e, w, j);
                if (r == -EAGAIN) {
                    char why[96];
                    snprintf(why, sizeof(why), "still full after %u submission attempts",
                             e->cfg.submit_attempts);
                    INC(e->s.retry_exhausted, 1);
                    INC(w->retry_exhausted, 1);
                    w->submit_attempt = 0;
                    w->retry_at_ns = 0;
                    dsa_wq_event(e, w, WQ_TRANSIENT, 0, why);
                    continue; /* again, now that its WQ is out of service */
                }
                if (r < 0) {
                    char why[96];
                    snprintf(why, sizeof(why), "submission failed: %s", strerror((int)-r));
                    INC(e->s.submit_failures, 1);
                    dsa_wq_event(e, w, WQ_FATAL, 0, why);
                    units_off_device(e, j, 0);
                } else if (j->next_unit < j->nunits && w->retry_at_ns > now &&
                           w->retry_at_ns < e->retry_wake_ns) {
                    e->retry_wake_ns = w->retry_at_ns;
                }
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
