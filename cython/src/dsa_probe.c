/* Synchronous work on one WQ, outside the completion thread (see
 * dsa_internal.h): the probe that proves a WQ's submission method at
 * configure time, and the check behind `dsamig dsa check`.
 *
 * The probe follows Intel's DTO library, which submits a NOOP to find out
 * whether write() works: a NOOP, then (where batches are to be used) a BATCH
 * of two NOOPs.  Every wait is bounded by the engine's timeout; memory a
 * device may still write after a timeout is held until the WQs close.
 */
#include "dsa_internal.h"

#include "zeroscan.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK_PAGE 4096u
#define SPIN_NS 200000ull /* poll a record with pause this long before napping */

static void nap_ns(uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
}

static const char *method_name(int method)
{
    switch (method) {
    case DSAMIG_DSA_ENQCMD:
        return "ENQCMD";
    case DSAMIG_DSA_MOVDIR64B:
        return "MOVDIR64B";
    default:
        return "write()";
    }
}

/* Submit d, asking again while the WQ answers "full", within the retry
 * budget: 0, 1 (still full), or -errno. */
static int submit_sync(dsamig_dsa_engine *e, dsa_wq *w, const dsamig_dsa_desc *d)
{
    for (uint32_t attempt = 1;; attempt++) {
        int r = dsa_submit_one(w, d);
        if (r != 1)
            return r;
        INC(w->submit_retries, 1);
        INC(e->s.submit_retries, 1);
        if (attempt >= e->cfg.submit_attempts)
            return 1;
        nap_ns(attempt < 8 ? 1000ull << attempt : SUBMIT_BACKOFF_MAX_NS);
    }
}

/* The record's status once it is written, or 0 when the deadline passed. */
static uint8_t wait_status(const dsamig_dsa_cr *cr, uint64_t start, uint64_t deadline)
{
    for (;;) {
        uint8_t st = __atomic_load_n(&cr->status, __ATOMIC_ACQUIRE);
        uint64_t now;
        if (st)
            return st;
        now = dsamig_now_ns();
        if (now >= deadline)
            return 0;
        if (now - start < SPIN_NS)
            dsa_cpu_relax();
        else
            nap_ns(20000);
    }
}

/* Why a submission of `what` failed (r: 1 still full, or -errno). */
static void submit_failure(dsamig_dsa_engine *e, dsa_wq *w, int r, const char *what, char *why,
                           size_t whylen)
{
    if (r == 1)
        snprintf(why, whylen, "%s was refused %u times: the shared WQ stays full", what,
                 e->cfg.submit_attempts);
    else if (w->method == DSAMIG_DSA_WRITE && r == -EINVAL)
        snprintf(why, whylen,
                 "write() failed with EINVAL: this kernel has no write() method for DSA (it "
                 "predates the INTEL-SA-01084 fix: Linux 6.10, 6.9.1, 6.8.10, 6.6.31, 6.1.91), "
                 "and the portal cannot be used (%s)",
                 w->portal_note[0] ? w->portal_note : "write() requested");
    else if (w->method == DSAMIG_DSA_WRITE && r == -EPERM)
        snprintf(why, whylen,
                 "write() failed with EPERM: this process's address space is not the one "
                 "that opened the WQ");
    else
        snprintf(why, whylen, "submitting %s with %s failed: %s", what, method_name(w->method),
                 strerror(-r));
}

int dsa_probe_sync(dsamig_dsa_engine *e, dsa_wq *w, char *why, size_t whylen)
{
    dsa_probe *p = dsa_probe_new();
    uint64_t t0;
    unsigned code;
    uint8_t st;
    int r;
    if (!p) {
        snprintf(why, whylen, "out of memory");
        return -ENOMEM;
    }
    dsa_probe_noop(p);
    t0 = dsamig_now_ns();
    r = submit_sync(e, w, &p->desc[0]);
    if (r != 0) {
        submit_failure(e, w, r, "a NOOP", why, whylen);
        free(p);
        return r == 1 ? -EBUSY : r;
    }
    st = wait_status(&p->cr[0], t0, t0 + e->cfg.timeout_ns);
    if (!st) {
        int noted = w->method == DSAMIG_DSA_WRITE && w->portal_note[0];
        snprintf(why, whylen, "a NOOP submitted with %s did not complete in %.3g s%s%s%s",
                 method_name(w->method), (double)e->cfg.timeout_ns / 1e9, noted ? " (" : "",
                 noted ? w->portal_note : "", noted ? ")" : "");
        INC(e->s.probe_timeouts, 1);
        INC(w->probe_timeouts, 1);
        dsa_probe_retire(e, p);
        return -ETIMEDOUT;
    }
    code = st & DSAMIG_COMP_STATUS_MASK;
    if (code != DSAMIG_COMP_SUCCESS) {
        snprintf(why, whylen, "a NOOP completed with status 0x%02x", code);
        free(p);
        return -EIO;
    }
    w->probe_ns = dsamig_now_ns() - t0;
    if (w->method == DSAMIG_DSA_WRITE || w->max_batch < 2) {
        free(p);
        return 0;
    }
    dsa_probe_batch(p);
    t0 = dsamig_now_ns();
    r = submit_sync(e, w, &p->desc[0]);
    if (r == 1) {
        submit_failure(e, w, r, "a BATCH", why, whylen);
        free(p);
        return -EBUSY;
    }
    if (r < 0) {
        w->max_batch = 1;
        snprintf(w->batch_note, sizeof(w->batch_note),
                 "submitting a BATCH failed (%s): one descriptor per page", strerror(-r));
        free(p);
        return 0;
    }
    st = wait_status(&p->cr[0], t0, t0 + e->cfg.timeout_ns);
    code = st & DSAMIG_COMP_STATUS_MASK;
    if (!st) {
        w->max_batch = 1;
        snprintf(w->batch_note, sizeof(w->batch_note),
                 "a BATCH of two NOOPs did not complete in %.3g s: one descriptor per page",
                 (double)e->cfg.timeout_ns / 1e9);
        INC(e->s.probe_timeouts, 1);
        INC(w->probe_timeouts, 1);
        dsa_probe_retire(e, p);
        return 0;
    }
    if (code != DSAMIG_COMP_SUCCESS || p->cr[0].bytes_completed != 2 ||
        p->cr[2].status != DSAMIG_COMP_SUCCESS || p->cr[3].status != DSAMIG_COMP_SUCCESS) {
        w->max_batch = 1;
        snprintf(w->batch_note, sizeof(w->batch_note),
                 "the WQ refused a BATCH of two NOOPs (status 0x%02x): one descriptor per page",
                 code);
    }
    free(p);
    return 0;
}

/* ---- dsamig dsa check --------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Memory a device may still write: freed when the WQs close. */
static void hold(dsamig_dsa_engine *e, void *p)
{
    dsa_mem *m = malloc(sizeof(*m));
    if (!m)
        return; /* then it stays allocated for good, which is safe */
    m->p = p;
    m->next = e->held_mem;
    e->held_mem = m;
}

/* Pages of every kind a zero check must tell apart. */
static void craft(uint8_t *buf, uint32_t pages)
{
    memset(buf, 0, (size_t)pages * CHECK_PAGE);
    for (uint32_t k = 0; k < pages; k++) {
        uint8_t *pg = buf + (size_t)k * CHECK_PAGE;
        switch (k % 6) {
        case 1:
            pg[0] = 1;
            break;
        case 2:
            pg[2047] = 0x80;
            break;
        case 3:
            pg[CHECK_PAGE - 1] = 1;
            break;
        case 4:
            for (uint32_t b = 0; b < CHECK_PAGE; b++)
                pg[b] = (uint8_t)(b * 131 + k);
            break;
        default: /* 0 and 5: zero pages */
            break;
        }
    }
}

static void check_noops(dsamig_dsa_engine *e, dsa_wq *w, uint32_t noops, dsamig_dsa_check *out)
{
    uint64_t *lat = calloc(noops ? noops : 1, sizeof(*lat));
    dsa_probe *p = dsa_probe_new();
    uint32_t n = 0;
    if (!lat || !p) {
        snprintf(out->error, sizeof(out->error), "out of memory");
        free(lat);
        free(p);
        return;
    }
    for (; n < noops; n++) {
        uint64_t t0;
        uint8_t st;
        int r;
        dsa_probe_noop(p);
        t0 = dsamig_now_ns();
        r = submit_sync(e, w, &p->desc[0]);
        if (r != 0) {
            submit_failure(e, w, r, "a NOOP", out->error, sizeof(out->error));
            break;
        }
        st = wait_status(&p->cr[0], t0, t0 + e->cfg.timeout_ns);
        if (!st) {
            snprintf(out->error, sizeof(out->error), "a NOOP did not complete in %.3g s",
                     (double)e->cfg.timeout_ns / 1e9);
            dsa_probe_retire(e, p);
            p = NULL;
            break;
        }
        if ((st & DSAMIG_COMP_STATUS_MASK) != DSAMIG_COMP_SUCCESS) {
            snprintf(out->error, sizeof(out->error), "a NOOP completed with status 0x%02x",
                     st & DSAMIG_COMP_STATUS_MASK);
            break;
        }
        lat[n] = dsamig_now_ns() - t0;
    }
    out->noops = n;
    out->noop_ok = noops > 0 && n == noops;
    if (n) {
        qsort(lat, n, sizeof(*lat), cmp_u64);
        out->noop_min_ns = lat[0];
        out->noop_median_ns = lat[n / 2];
        out->noop_max_ns = lat[n - 1];
    }
    free(lat);
    free(p);
}

/* The layout of the check's memory: pages, then one descriptor and one
 * record per page, then the batch's descriptor and record. */
typedef struct check_mem {
    uint8_t *buf;
    dsamig_dsa_desc *descs, *bdesc;
    dsamig_dsa_cr *crs, *bcr;
} check_mem;

static void *check_alloc(uint32_t pages, check_mem *m)
{
    size_t data = (size_t)pages * CHECK_PAGE;
    size_t size = data + 64 * ((size_t)pages + 1) + 32 * ((size_t)pages + 1);
    void *block;
    if (posix_memalign(&block, CHECK_PAGE, size) != 0)
        return NULL;
    memset(block, 0, size);
    m->buf = block;
    m->descs = (dsamig_dsa_desc *)(m->buf + data);
    m->bdesc = m->descs + pages;
    m->crs = (dsamig_dsa_cr *)(m->bdesc + 1);
    m->bcr = m->crs + pages;
    return block;
}

static void compval_desc(dsamig_dsa_desc *d, dsamig_dsa_cr *cr, const uint8_t *src, uint32_t len)
{
    memset(d, 0, sizeof(*d));
    memset(cr, 0, sizeof(*cr));
    d->flags_opcode = dsamig_desc_word(DSAMIG_OP_COMPVAL, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
    d->completion_addr = (uint64_t)(uintptr_t)cr;
    d->src_addr = (uint64_t)(uintptr_t)src;
    d->xfer_size = len;
}

/* Whether a member's record agrees with the CPU about its bytes. */
static int agrees(const dsamig_dsa_cr *cr, const uint8_t *src, uint32_t len)
{
    return cr->status == DSAMIG_COMP_SUCCESS && (cr->result != 0) == !dsamig_is_zero(src, len);
}

/* Returns -1 when memory must be held (a timeout), else 0. */
static int check_compvals(dsamig_dsa_engine *e, dsa_wq *w, check_mem *m, uint32_t pages,
                          uint32_t len, dsamig_dsa_check *out)
{
    uint64_t *lat = calloc(pages, sizeof(*lat));
    uint32_t n = 0;
    if (!lat) {
        snprintf(out->error, sizeof(out->error), "out of memory");
        return 0;
    }
    for (; n < pages; n++) {
        const uint8_t *src = m->buf + (size_t)n * CHECK_PAGE;
        uint64_t t0;
        uint8_t st;
        int r;
        compval_desc(&m->descs[n], &m->crs[n], src, len);
        t0 = dsamig_now_ns();
        r = submit_sync(e, w, &m->descs[n]);
        if (r != 0) {
            submit_failure(e, w, r, "a COMPVAL", out->error, sizeof(out->error));
            break;
        }
        st = wait_status(&m->crs[n], t0, t0 + e->cfg.timeout_ns);
        if (!st) {
            snprintf(out->error, sizeof(out->error), "a COMPVAL did not complete in %.3g s",
                     (double)e->cfg.timeout_ns / 1e9);
            free(lat);
            return -1;
        }
        lat[n] = dsamig_now_ns() - t0;
        if (!agrees(&m->crs[n], src, len)) {
            out->compval_mismatches++;
            if (!out->error[0])
                snprintf(out->error, sizeof(out->error),
                         "COMPVAL on test page %u: status 0x%02x, result %u, but the CPU finds "
                         "it %s",
                         n, st, m->crs[n].result, dsamig_is_zero(src, len) ? "zero" : "non-zero");
        }
    }
    out->compval_pages = n;
    out->compval_ok = n == pages && out->compval_mismatches == 0;
    if (n) {
        qsort(lat, n, sizeof(*lat), cmp_u64);
        out->compval_median_ns = lat[n / 2];
    }
    free(lat);
    return 0;
}

static int check_batch(dsamig_dsa_engine *e, dsa_wq *w, check_mem *m, uint32_t pages,
                       uint32_t len, dsamig_dsa_check *out)
{
    uint32_t n = pages < w->max_batch ? pages : w->max_batch;
    uint64_t t0;
    uint8_t st;
    int r;
    for (uint32_t k = 0; k < n; k++)
        compval_desc(&m->descs[k], &m->crs[k], m->buf + (size_t)k * CHECK_PAGE, len);
    memset(m->bdesc, 0, sizeof(*m->bdesc));
    memset(m->bcr, 0, sizeof(*m->bcr));
    m->bdesc->flags_opcode = dsamig_desc_word(DSAMIG_OP_BATCH, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
    m->bdesc->completion_addr = (uint64_t)(uintptr_t)m->bcr;
    m->bdesc->src_addr = (uint64_t)(uintptr_t)m->descs;
    m->bdesc->xfer_size = n;
    out->batch_ok = 0;
    t0 = dsamig_now_ns();
    r = submit_sync(e, w, m->bdesc);
    if (r != 0) {
        submit_failure(e, w, r, "a BATCH", out->error, sizeof(out->error));
        return 0;
    }
    st = wait_status(m->bcr, t0, t0 + e->cfg.timeout_ns);
    if (!st) {
        snprintf(out->error, sizeof(out->error), "a BATCH did not complete in %.3g s",
                 (double)e->cfg.timeout_ns / 1e9);
        return -1;
    }
    out->batch_ns = dsamig_now_ns() - t0;
    out->batch_pages = n;
    for (uint32_t k = 0; k < n; k++)
        if (!agrees(&m->crs[k], m->buf + (size_t)k * CHECK_PAGE, len))
            out->batch_mismatches++;
    if ((st & DSAMIG_COMP_STATUS_MASK) != DSAMIG_COMP_SUCCESS || m->bcr->bytes_completed != n) {
        if (!out->error[0])
            snprintf(out->error, sizeof(out->error),
                     "a BATCH of %u COMPVALs completed with status 0x%02x, %u done", n,
                     st & DSAMIG_COMP_STATUS_MASK, m->bcr->bytes_completed);
        return 0;
    }
    if (out->batch_mismatches && !out->error[0])
        snprintf(out->error, sizeof(out->error),
                 "%u of %u COMPVALs in a BATCH disagree with the CPU", out->batch_mismatches, n);
    out->batch_ok = out->batch_mismatches == 0;
    return 0;
}

int dsamig_dsa_engine_check_wq(dsamig_dsa_engine *e, int i, uint32_t noops, uint32_t pages,
                               dsamig_dsa_check *out)
{
    check_mem m;
    void *block;
    uint32_t len;
    int running;
    dsa_wq *w;
    memset(out, 0, sizeof(*out));
    out->batch_ok = -1;
    if (i < 0 || i >= e->nwqs || pages < 1 || pages > 4096)
        return -EINVAL;
    pthread_mutex_lock(&e->lock);
    running = e->running;
    pthread_mutex_unlock(&e->lock);
    if (running)
        return -EBUSY;
    w = &e->wqs[i];
    if (w->state != DSAMIG_WQ_IN_SERVICE) {
        snprintf(out->error, sizeof(out->error), "not in service: %s", w->reason);
        return 0;
    }
    check_noops(e, w, noops, out);
    if (out->error[0])
        return 0;
    block = check_alloc(pages, &m);
    if (!block) {
        snprintf(out->error, sizeof(out->error), "out of memory");
        return 0;
    }
    craft(m.buf, pages);
    len = w->max_xfer < CHECK_PAGE ? w->max_xfer : CHECK_PAGE;
    if (check_compvals(e, w, &m, pages, len, out) != 0 ||
        (w->method != DSAMIG_DSA_WRITE && w->max_batch >= 2 &&
         check_batch(e, w, &m, pages, len, out) != 0)) {
        hold(e, block);
        return 0;
    }
    free(block);
    return 0;
}
