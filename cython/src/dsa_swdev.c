/* The software DSA device (see dsa_swdev.h).
 *
 * Modelling choices, where the hardware documentation leaves room:
 * - Occupancy counts descriptors queued and not yet taken by an engine, as a
 *   real WQ frees an entry when an engine dispatches the descriptor.  A batch
 *   takes one entry, its members none.
 * - An emulated engine reads a descriptor's whole source range before it
 *   compares it.  A page fault therefore reports the bytes read before the
 *   fault in bytes_completed and, in result, whether those bytes held a
 *   difference: the partial completion that QEMU's rule
 *   "bytes_completed > 0 && result != 0 means non-zero" is written for.
 * - With check_residency, a page that is not mapped in this process faults,
 *   as an SVA device without block-on-fault would: the device walks this
 *   process's page tables, so what counts is the present bit of
 *   /proc/self/pagemap, not whether the page is in the page cache (a cached
 *   file page that this mapping never touched still faults).  A cold mapping
 *   therefore exercises the same path on the emulator as on hardware.
 * - Two models: DSA 1.0 (Sapphire Rapids), which knows none of DSA 2.0's
 *   additions (the Translation Fetch operation, opcode 0x0a, and the
 *   operation-specific flag bits 23:16 that 2.0 defines for it), and DSA 2.0,
 *   which executes Translation Fetch (there is nothing to translate in
 *   process: it succeeds) and accepts its region-stride flag, bit 16.
 * - The kernel around the WQ is modelled too: a kernel that refuses to map
 *   the portal (the 2024 erratum fix without CAP_SYS_RAWIO: EPERM), one
 *   without the write() method (before that fix: EINVAL), and write() from a
 *   process whose address space is not the opener's (EPERM).
 * - A hung descriptor is taken off the queue and never completed: it neither
 *   writes a record nor touches memory again.
 * - Batch members run in list order without fences: a failed member does not
 *   stop the batch (BATCH_FAIL with descs_completed = count), a fault reading
 *   the list does (BATCH_PAGE_FAULT with descs_completed = index).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "dsa_swdev.h"

#include "completion.h"
#include "sigbus_guard.h"
#include "zeroscan.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Opcodes the emulator executes; op_config is masked with this. */
#define IMPLEMENTED_OPS                                                                       \
    ((1u << DSAMIG_OP_NOOP) | (1u << DSAMIG_OP_BATCH) | (1u << DSAMIG_OP_DRAIN) |            \
     (1u << DSAMIG_OP_MEMMOVE) | (1u << DSAMIG_OP_MEMFILL) | (1u << DSAMIG_OP_COMPARE) |     \
     (1u << DSAMIG_OP_COMPVAL) | (1u << DSAMIG_OP_TRANSL_FETCH))
/* Opcodes that DSA 2.0 added (of those the emulator executes). */
#define DSA2_OPS (1u << DSAMIG_OP_TRANSL_FETCH)
/* Translation Fetch: the region-stride flag (DSA 2.0). */
#define FLAG_TF_STRIDE 0x10000u

/* The kernel's write() method retries a refused ENQCMDS this many times
 * (IDXD_ENQCMDS_RETRIES) before it returns -EAGAIN. */
#define KERNEL_ENQCMDS_RETRIES 32

/* Largest span whose residency a batch looks up with one pagemap read. */
#define RESIDENCY_SPAN_MAX (64u << 20)

enum fault_class {
    F_PAGE_FAULT = 1,
    F_PF_OFFSET,
    F_BATCH_FAIL,
    F_BATCH_FAIL_AT,
    F_LIST_FAULT,
    F_LIST_FAULT_AT,
    F_HW_ERROR,
    F_HANG,
    F_WQ_FULL,
    F_REORDER,
};

typedef struct outcome {
    uint8_t status;
    uint8_t result;
    uint32_t bytes_completed;
    uint64_t fault_addr;
    uint32_t invalid_flags;
} outcome;

typedef struct residency {
    uintptr_t lo, hi; /* page-aligned span described by vec; hi == 0: nothing cached */
    unsigned char *vec; /* one byte per page: 1 present */
    uint64_t *raw;      /* pagemap entries as read */
    size_t cap;
} residency;

static size_t host_page_size(void)
{
    static size_t cached;
    if (!cached)
        cached = (size_t)sysconf(_SC_PAGESIZE);
    return cached;
}

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t fhash(const dsamig_swq *q, uint64_t cls, uint64_t seq, uint64_t member)
{
    uint64_t h = mix64(q->cfg.faults.seed ^ (cls << 56));
    h = mix64(h ^ (uint64_t)(uint32_t)q->cfg.id);
    h = mix64(h ^ seq);
    return mix64(h ^ member);
}

static int roll(const dsamig_swq *q, double p, uint64_t cls, uint64_t seq, uint64_t member)
{
    if (!(p > 0.0))
        return 0;
    if (p >= 1.0)
        return 1;
    return (double)(fhash(q, cls, seq, member) >> 11) * 0x1p-53 < p;
}

#define COUNT(q, field, n) __atomic_fetch_add(&(q)->c.field, (uint64_t)(n), __ATOMIC_RELAXED)

void dsamig_swq_config_default(dsamig_swq_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = 32;
    cfg->threshold = 32;
    cfg->max_batch_size = 128;
    cfg->max_transfer_size = 2u << 20;
    cfg->op_config = IMPLEMENTED_OPS;
    cfg->engines = 1;
    cfg->check_residency = 1;
    cfg->model = 1;
    cfg->write_method = 1;
}

/* ---- completion records ------------------------------------------------ */

/* Write a record the way the device does: every other byte first, then the
 * status byte, so a poller that sees a status sees a final record.
 * Returns -1 when a record was due but has nowhere to go. */
static int write_cr(dsamig_swq *q, const dsamig_dsa_desc *d, const outcome *o)
{
    uint32_t flags = dsamig_desc_flags(d);
    dsamig_dsa_cr *cr;
    if (!(flags & DSAMIG_FLAG_CRAV))
        return o->status == DSAMIG_COMP_SUCCESS ? 0 : -1;
    if (!(flags & DSAMIG_FLAG_RCR) && o->status == DSAMIG_COMP_SUCCESS)
        return 0; /* successful descriptors are written back only on request */
    if (d->completion_addr == 0 || d->completion_addr % DSAMIG_CR_ALIGN) {
        COUNT(q, cr_lost, 1);
        return -1;
    }
    cr = (dsamig_dsa_cr *)(uintptr_t)d->completion_addr;
    cr->result = o->result;
    cr->rsvd = 0;
    cr->bytes_completed = o->bytes_completed;
    cr->fault_addr = o->fault_addr;
    memset(cr->op_specific, 0, sizeof(cr->op_specific));
    cr->invalid_flags = o->invalid_flags & 0xffffffu;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&cr->status, o->status, __ATOMIC_RELEASE);
    return 0;
}

/* ---- validation, in the hardware's order ---------------------------------- */

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static int reserved_nonzero(const dsamig_dsa_desc *d, uint32_t op, int model)
{
    /* User descriptors carry no PASID or privilege: ENQCMD inserts them and a
     * dedicated WQ has its own; the bits are reserved in what we receive. */
    if (d->pasid_priv != 0 || d->rsvd1 != 0)
        return 1;
    switch (op) {
    case DSAMIG_OP_NOOP:
        return d->src_addr || d->dst_addr || d->xfer_size || !all_zero(d->op_specific, 24);
    case DSAMIG_OP_BATCH:
        return d->dst_addr || !all_zero(d->op_specific, 24);
    case DSAMIG_OP_DRAIN:
        return d->xfer_size || !all_zero(d->op_specific, 24);
    case DSAMIG_OP_MEMMOVE:
    case DSAMIG_OP_MEMFILL:
        return !all_zero(d->op_specific, 24);
    case DSAMIG_OP_COMPARE:
    case DSAMIG_OP_COMPVAL:
        return !all_zero(d->op_specific + 1, 23); /* byte 0 is expected_res */
    case DSAMIG_OP_TRANSL_FETCH: /* region_stride (u32 at 0x30) is the only field */
        if (model < 2)
            return 0; /* an opcode DSA 1.0 does not know: rejected as such */
        return d->dst_addr || !all_zero(d->op_specific, 8) || !all_zero(d->op_specific + 12, 12);
    default:
        return 0;
    }
}

static int is_data_op(uint32_t op)
{
    return op == DSAMIG_OP_MEMMOVE || op == DSAMIG_OP_MEMFILL || op == DSAMIG_OP_COMPARE ||
           op == DSAMIG_OP_COMPVAL;
}

static uint8_t validate(const dsamig_swq *q, const dsamig_dsa_desc *d, int in_batch,
                        uint32_t *invalid)
{
    uint32_t op = dsamig_desc_opcode(d);
    uint32_t flags = dsamig_desc_flags(d);
    uint32_t bad;

    *invalid = 0;
    if (reserved_nonzero(d, op, q->cfg.model))
        return DSAMIG_COMP_NOZERO_RESERVE;

    bad = flags & ~DSAMIG_FLAG_DSA_DEFINED & 0xffffffu;
    if (q->cfg.model >= 2 && op == DSAMIG_OP_TRANSL_FETCH)
        bad &= ~FLAG_TF_STRIDE;
    /* Block-on-fault applies to operations that touch memory, never to
     * Batch, Drain or No-op; Check Result only to comparisons. */
    if (op == DSAMIG_OP_BATCH || op == DSAMIG_OP_DRAIN || op == DSAMIG_OP_NOOP)
        bad |= flags & DSAMIG_FLAG_BOF;
    if (op != DSAMIG_OP_COMPARE && op != DSAMIG_OP_COMPVAL)
        bad |= flags & DSAMIG_FLAG_CR;
    if (bad) {
        *invalid = bad;
        return DSAMIG_COMP_INVALID_FLAGS;
    }

    if (op >= 32 || !(q->cfg.op_config & (1u << op)))
        return DSAMIG_COMP_BAD_OPCODE;
    if (in_batch && (op == DSAMIG_OP_BATCH || op == DSAMIG_OP_DRAIN))
        return DSAMIG_COMP_BAD_OPCODE;

    if (is_data_op(op) && (d->xfer_size == 0 || d->xfer_size > q->cfg.max_transfer_size))
        return DSAMIG_COMP_XFER_ERANGE;
    if (op == DSAMIG_OP_TRANSL_FETCH && d->xfer_size == 0) /* region_size */
        return DSAMIG_COMP_XFER_ERANGE;

    if (op == DSAMIG_OP_BATCH) {
        if (d->xfer_size < 2 || d->xfer_size > q->cfg.max_batch_size)
            return DSAMIG_COMP_DESC_CNT_ERANGE;
        if (d->src_addr % DSAMIG_DESC_ALIGN)
            return DSAMIG_COMP_DESCLIST_ALIGN;
    }
    return 0;
}

/* ---- execution ------------------------------------------------------------ */

/* Hold the engine back until the WQ's bandwidth allows nbytes more.
 * 0 to go on, -1 when the queue is stopping (the descriptor is abandoned). */
static int throttle(dsamig_swq *q, size_t nbytes)
{
    uint64_t start, done;
    struct timespec ts;
    int stopping;
    if (!q->cfg.rate_bytes_s || !nbytes)
        return 0;
    pthread_mutex_lock(&q->lock);
    start = dsamig_now_ns();
    if (q->busy_until_ns > start)
        start = q->busy_until_ns;
    done = start + (uint64_t)((double)nbytes * 1e9 / (double)q->cfg.rate_bytes_s);
    q->busy_until_ns = done;
    ts.tv_sec = (time_t)(done / 1000000000ull);
    ts.tv_nsec = (long)(done % 1000000000ull);
    while (!q->stopping && dsamig_now_ns() < done)
        pthread_cond_timedwait(&q->throttle_cond, &q->lock, &ts);
    stopping = q->stopping;
    pthread_mutex_unlock(&q->lock);
    return stopping ? -1 : 0;
}

/* Whether each page of [lo, hi) is mapped in this process: bit 63 of its
 * /proc/self/pagemap entry.  -1 when that cannot be told (then nothing
 * faults: better than faults the hardware would not take). */
static int residency_load(const dsamig_swq *q, residency *r, uintptr_t lo, uintptr_t hi)
{
    size_t ps = host_page_size();
    size_t pages = (hi - lo) / ps;
    ssize_t got;
    if (q->pagemap_fd < 0)
        return -1;
    if (pages > r->cap) {
        unsigned char *v = realloc(r->vec, pages);
        uint64_t *raw;
        if (!v)
            return -1;
        r->vec = v;
        raw = realloc(r->raw, pages * sizeof(*raw));
        if (!raw)
            return -1;
        r->raw = raw;
        r->cap = pages;
    }
    got = pread(q->pagemap_fd, r->raw, pages * sizeof(*r->raw),
                (off_t)((lo / ps) * sizeof(*r->raw)));
    if (got < 0)
        return -1;
    for (size_t i = 0; i < pages; i++)
        r->vec[i] = i < (size_t)got / sizeof(*r->raw) && (r->raw[i] >> 63) & 1;
    r->lo = lo;
    r->hi = hi;
    return 0;
}

/* Offset of the first byte of [p, p+len) on a page that is not resident,
 * or len when every page is. */
static size_t first_absent(const dsamig_swq *q, residency *r, const uint8_t *p, size_t len)
{
    size_t ps = host_page_size();
    uintptr_t lo = (uintptr_t)p & ~(uintptr_t)(ps - 1);
    uintptr_t end = (uintptr_t)p + len;
    uintptr_t hi = (end + ps - 1) & ~(uintptr_t)(ps - 1);
    if (!(r->hi && lo >= r->lo && hi <= r->hi) && residency_load(q, r, lo, hi) != 0)
        return len; /* cannot tell: assume resident */
    for (uintptr_t pg = lo; pg < end; pg += ps)
        if (!(r->vec[(pg - r->lo) / ps] & 1))
            return pg <= (uintptr_t)p ? 0 : (size_t)(pg - (uintptr_t)p);
    return len;
}

/* Offset of the first 8-byte word of src that differs from the pattern
 * (at most the first differing byte, as on hardware), or len if none. */
static size_t first_difference(const uint8_t *src, size_t len, uint64_t pattern)
{
    size_t i = 0;
    if (pattern == 0 && dsamig_is_zero(src, len))
        return len;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, src + i, 8);
        if (w != pattern)
            return i;
    }
    for (; i < len; i++)
        if (src[i] != (uint8_t)(pattern >> (8 * (i % 8))))
            return i;
    return len;
}

struct diff_args {
    const uint8_t *src;
    size_t len;
    uint64_t pattern;
    size_t diff;
};

static void diff_call(void *arg)
{
    struct diff_args *a = arg;
    a->diff = first_difference(a->src, a->len, a->pattern);
}

static int exec_compval(dsamig_swq *q, const dsamig_dsa_desc *d, uint64_t seq, uint64_t member,
                        residency *r, outcome *o)
{
    const uint8_t *src = (const uint8_t *)(uintptr_t)d->src_addr;
    size_t n = d->xfer_size, limit = n, diff;
    int injected = 0;
    if (q->cfg.check_residency)
        limit = first_absent(q, r, src, n);
    if (roll(q, q->cfg.faults.page_fault, F_PAGE_FAULT, seq, member)) {
        size_t f = (size_t)(fhash(q, F_PF_OFFSET, seq, member) % ((n + 63) / 64)) * 64;
        if (f < limit) {
            limit = f;
            injected = 1;
        }
    }
    if (throttle(q, limit) != 0)
        return -1;
    {
        /* A page that vanished under us (a truncated file) is a fault the
         * device cannot resolve, not a crash. */
        struct diff_args a = {src, limit, d->dst_addr, limit};
        if (dsamig_guarded(diff_call, &a) != 0) {
            COUNT(q, faults_absent, 1);
            o->status = DSAMIG_COMP_PAGE_FAULT_NOBOF;
            o->fault_addr = (uint64_t)(uintptr_t)src;
            return 0;
        }
        diff = a.diff;
    }
    COUNT(q, bytes, limit);
    if (limit < n) {
        if (injected)
            COUNT(q, faults_injected, 1);
        else
            COUNT(q, faults_absent, 1);
        o->status = DSAMIG_COMP_PAGE_FAULT_NOBOF;
        o->bytes_completed = (uint32_t)limit;
        o->result = diff < limit;
        o->fault_addr = (uint64_t)(uintptr_t)(src + limit);
    } else {
        o->status = DSAMIG_COMP_SUCCESS;
        o->result = diff < n;
        o->bytes_completed = diff < n ? (uint32_t)diff : 0;
    }
    return 0;
}

static int exec_compare(dsamig_swq *q, const dsamig_dsa_desc *d, outcome *o)
{
    const uint8_t *a = (const uint8_t *)(uintptr_t)d->src_addr;
    const uint8_t *b = (const uint8_t *)(uintptr_t)d->dst_addr;
    size_t n = d->xfer_size, i = 0;
    if (throttle(q, n) != 0)
        return -1;
    while (i + 8 <= n && memcmp(a + i, b + i, 8) == 0)
        i += 8;
    if (i + 8 > n) /* a tail shorter than a word is compared byte by byte */
        while (i < n && a[i] == b[i])
            i++;
    COUNT(q, bytes, n);
    o->status = DSAMIG_COMP_SUCCESS;
    o->result = i < n;
    o->bytes_completed = i < n ? (uint32_t)i : 0;
    return 0;
}

/* Execute one non-batch descriptor into *o.  0 done, -1 abandoned (stop). */
static int exec_desc(dsamig_swq *q, const dsamig_dsa_desc *d, uint64_t seq, uint64_t member,
                     residency *r, outcome *o)
{
    uint32_t op = dsamig_desc_opcode(d);
    uint8_t st;
    memset(o, 0, sizeof(*o));
    COUNT(q, executed, 1);
    st = validate(q, d, member != 0, &o->invalid_flags);
    if (st) {
        COUNT(q, invalid, 1);
        o->status = st;
        return 0;
    }
    if (is_data_op(op) && roll(q, q->cfg.faults.hw_error, F_HW_ERROR, seq, member)) {
        COUNT(q, hw_errors_injected, 1);
        o->status = DSAMIG_COMP_HW_ERR1;
        return 0;
    }
    switch (op) {
    case DSAMIG_OP_COMPVAL:
        if (exec_compval(q, d, seq, member, r, o) != 0)
            return -1;
        break;
    case DSAMIG_OP_COMPARE:
        if (exec_compare(q, d, o) != 0)
            return -1;
        break;
    case DSAMIG_OP_MEMMOVE:
        if (throttle(q, d->xfer_size) != 0)
            return -1;
        memmove((void *)(uintptr_t)d->dst_addr, (const void *)(uintptr_t)d->src_addr,
                d->xfer_size);
        COUNT(q, bytes, d->xfer_size);
        o->status = DSAMIG_COMP_SUCCESS;
        break;
    case DSAMIG_OP_MEMFILL: {
        uint8_t *dst = (uint8_t *)(uintptr_t)d->dst_addr;
        if (throttle(q, d->xfer_size) != 0)
            return -1;
        for (uint32_t i = 0; i < d->xfer_size; i++)
            dst[i] = (uint8_t)(d->src_addr >> (8 * (i % 8)));
        COUNT(q, bytes, d->xfer_size);
        o->status = DSAMIG_COMP_SUCCESS;
        break;
    }
    case DSAMIG_OP_TRANSL_FETCH: /* the addresses are this process's own: nothing to fetch */
    default: /* NOOP, DRAIN: nothing to do in a queue that is drained in order */
        o->status = DSAMIG_COMP_SUCCESS;
        break;
    }
    if ((dsamig_desc_flags(d) & DSAMIG_FLAG_CR) && o->status == DSAMIG_COMP_SUCCESS &&
        o->result != d->expected_res)
        o->status = DSAMIG_COMP_SUCCESS_PRED;
    return 0;
}

static void exec_batch(dsamig_swq *q, const dsamig_dsa_desc *bd, uint64_t seq, residency *r)
{
    const dsamig_dsa_desc *list = (const dsamig_dsa_desc *)(uintptr_t)bd->src_addr;
    outcome bo;
    uint32_t n, stop, failed_at;
    int failed = 0, list_fault = 0;

    memset(&bo, 0, sizeof(bo));
    COUNT(q, executed, 1);
    bo.status = validate(q, bd, 0, &bo.invalid_flags);
    if (bo.status) {
        COUNT(q, invalid, 1);
        write_cr(q, bd, &bo);
        return;
    }
    COUNT(q, batches, 1);
    n = bd->xfer_size;
    stop = n;
    if (roll(q, q->cfg.faults.list_fault, F_LIST_FAULT, seq, 0)) {
        stop = (uint32_t)(fhash(q, F_LIST_FAULT_AT, seq, 0) % n);
        list_fault = 1;
        COUNT(q, list_faults_injected, 1);
    }
    failed_at = UINT32_MAX;
    if (stop > 0 && roll(q, q->cfg.faults.batch_fail, F_BATCH_FAIL, seq, 0)) {
        failed_at = (uint32_t)(fhash(q, F_BATCH_FAIL_AT, seq, 0) % stop);
        COUNT(q, batch_fails_injected, 1);
    }

    if (q->cfg.check_residency) {
        /* One pagemap read for the span of all members instead of one each. */
        uintptr_t lo = UINTPTR_MAX, hi = 0;
        size_t ps = host_page_size();
        for (uint32_t i = 0; i < stop; i++) {
            dsamig_dsa_desc m;
            memcpy(&m, &list[i], sizeof(m));
            if (dsamig_desc_opcode(&m) != DSAMIG_OP_COMPVAL || m.xfer_size == 0)
                continue;
            if (m.src_addr < lo)
                lo = (uintptr_t)m.src_addr;
            if (m.src_addr + m.xfer_size > hi)
                hi = (uintptr_t)(m.src_addr + m.xfer_size);
        }
        if (hi > lo) {
            lo &= ~(uintptr_t)(ps - 1);
            hi = (hi + ps - 1) & ~(uintptr_t)(ps - 1);
            if (hi - lo <= RESIDENCY_SPAN_MAX)
                residency_load(q, r, lo, hi);
        }
    }

    for (uint32_t i = 0; i < stop; i++) {
        dsamig_dsa_desc m;
        outcome mo;
        memcpy(&m, &list[i], sizeof(m));
        if (i == failed_at) {
            memset(&mo, 0, sizeof(mo));
            COUNT(q, executed, 1);
            mo.status = DSAMIG_COMP_PAGE_FAULT_IR;
            mo.fault_addr = m.src_addr;
        } else if (exec_desc(q, &m, seq, (uint64_t)i + 1, r, &mo) != 0) {
            return; /* stopping */
        }
        if (mo.status != DSAMIG_COMP_SUCCESS && mo.status != DSAMIG_COMP_SUCCESS_PRED)
            failed = 1;
        if (write_cr(q, &m, &mo) != 0)
            failed = 1;
    }
    bo.bytes_completed = stop; /* descs_completed */
    if (list_fault) {
        bo.status = DSAMIG_COMP_BATCH_PAGE_FAULT;
        bo.fault_addr = (uint64_t)(uintptr_t)&list[stop];
    } else if (failed) {
        bo.status = DSAMIG_COMP_BATCH_FAIL;
        bo.result = 1;
    } else {
        bo.status = DSAMIG_COMP_SUCCESS;
    }
    write_cr(q, bd, &bo); /* after every member's record */
}

static void execute(dsamig_swq *q, const dsamig_dsa_desc *d, uint64_t seq, residency *r)
{
    outcome o;
    r->hi = 0; /* residency is looked up afresh for every descriptor */
    if (roll(q, q->cfg.faults.hang, F_HANG, seq, 0)) {
        COUNT(q, hangs_injected, 1);
        return;
    }
    if (dsamig_desc_opcode(d) == DSAMIG_OP_BATCH) {
        exec_batch(q, d, seq, r);
        return;
    }
    if (exec_desc(q, d, seq, 0, r, &o) == 0)
        write_cr(q, d, &o);
}

static void *engine_main(void *arg)
{
    dsamig_swq *q = arg;
    residency r = {0, 0, NULL, NULL, 0};
    char name[16];
    uint64_t cpu_start = dsamig_thread_cpu_ns();
    int index;

    pthread_mutex_lock(&q->lock);
    for (index = 0; index < q->nthreads; index++)
        if (pthread_equal(q->threads[index], pthread_self()))
            break;
    pthread_mutex_unlock(&q->lock);
    snprintf(name, sizeof(name), "dsamig-swdsa-%d", q->cfg.id * q->cfg.engines + index);
    dsamig_set_thread_name(name);

    for (;;) {
        dsamig_swq_entry e;
        uint32_t pick = 0, idx;
        pthread_mutex_lock(&q->lock);
        while (!q->count && !q->stopping)
            pthread_cond_wait(&q->cond, &q->lock);
        if (q->stopping) {
            pthread_mutex_unlock(&q->lock);
            break;
        }
        if (q->cfg.reorder && q->count > 1) {
            uint32_t window = q->count < 4 ? q->count : 4;
            pick = (uint32_t)(fhash(q, F_REORDER, q->ring[q->head].seq, 0) % window);
        }
        idx = (q->head + pick) % q->cfg.size;
        e = q->ring[idx];
        if (pick)
            q->ring[idx] = q->ring[q->head];
        q->head = (q->head + 1) % q->cfg.size;
        q->count--;
        pthread_mutex_unlock(&q->lock);
        execute(q, &e.desc, e.seq, &r);
    }
    free(r.vec);
    free(r.raw);
    COUNT(q, engine_cpu_ns, dsamig_thread_cpu_ns() - cpu_start);
    return NULL;
}

/* ---- the portal ----------------------------------------------------------- */

int dsamig_swq_start(dsamig_swq *q, const dsamig_swq_config *cfg)
{
    pthread_condattr_t ca;
    int rc = 0;
    if (q->started)
        return 0;
    if (cfg->size < 1 || cfg->size > 65536 || cfg->engines < 1 ||
        cfg->engines > DSAMIG_SWQ_MAX_ENGINES || cfg->max_batch_size < 1 ||
        cfg->max_batch_size > 4096 || cfg->max_transfer_size < 1 ||
        (!cfg->dedicated && (cfg->threshold < 1 || cfg->threshold > cfg->size)))
        return -EINVAL;
    if (cfg->model < 1 || cfg->model > 2)
        return -EINVAL;
    q->cfg = *cfg;
    q->cfg.op_config &= IMPLEMENTED_OPS;
    if (q->cfg.model < 2)
        q->cfg.op_config &= ~DSA2_OPS;
    q->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    q->ring = calloc(cfg->size, sizeof(*q->ring));
    if (!q->ring)
        return -ENOMEM;
    pthread_mutex_init(&q->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cond, NULL);
    pthread_cond_init(&q->throttle_cond, &ca);
    pthread_condattr_destroy(&ca);
    q->head = q->count = 0;
    q->busy_until_ns = 0;
    q->stopping = 0;
    pthread_mutex_lock(&q->lock);
    for (q->nthreads = 0; q->nthreads < cfg->engines; q->nthreads++) {
        rc = pthread_create(&q->threads[q->nthreads], NULL, engine_main, q);
        if (rc)
            break;
    }
    q->started = 1;
    pthread_mutex_unlock(&q->lock);
    if (q->nthreads == 0) {
        dsamig_swq_stop(q);
        return -rc;
    }
    return 0;
}

void dsamig_swq_stop(dsamig_swq *q)
{
    if (!q->started)
        return;
    pthread_mutex_lock(&q->lock);
    q->stopping = 1;
    pthread_cond_broadcast(&q->cond);
    pthread_cond_broadcast(&q->throttle_cond);
    pthread_mutex_unlock(&q->lock);
    for (int i = 0; i < q->nthreads; i++)
        pthread_join(q->threads[i], NULL);
    q->nthreads = 0;
    COUNT(q, discarded, q->count);
    q->count = 0;
    q->started = 0;
    free(q->ring);
    q->ring = NULL;
    if (q->pagemap_fd >= 0)
        close(q->pagemap_fd);
    q->pagemap_fd = -1;
    pthread_cond_destroy(&q->cond);
    pthread_cond_destroy(&q->throttle_cond);
    pthread_mutex_destroy(&q->lock);
}

/* Queue a descriptor if there is room below limit.  Lock held.
 * 0 accepted, 1 no room (or an injected full WQ). */
static int accept_locked(dsamig_swq *q, const dsamig_dsa_desc *d, uint32_t limit)
{
    uint64_t attempt = q->attempts++;
    dsamig_swq_entry *e;
    if (roll(q, q->cfg.faults.wq_full, F_WQ_FULL, attempt, 0)) {
        q->c.wq_full_injected++;
        return 1;
    }
    if (q->count >= limit)
        return 1;
    e = &q->ring[(q->head + q->count) % q->cfg.size];
    e->desc = *d;
    e->seq = q->seq++;
    q->count++;
    q->c.accepted++;
    pthread_cond_signal(&q->cond);
    return 0;
}

static int cr_reportable(const dsamig_dsa_desc *d)
{
    return !(dsamig_desc_flags(d) & DSAMIG_FLAG_CRAV) || d->completion_addr % DSAMIG_CR_ALIGN == 0;
}

int dsamig_swq_enqcmd(dsamig_swq *q, const void *desc)
{
    dsamig_dsa_desc d;
    int r;
    memcpy(&d, desc, sizeof(d));
    if (q->cfg.dedicated)
        return -EOPNOTSUPP;
    if (d.pasid_priv != 0 || !cr_reportable(&d)) {
        COUNT(q, rejected, 1);
        return -EINVAL;
    }
    if (!q->started)
        return -ESHUTDOWN;
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        return -ESHUTDOWN;
    }
    r = accept_locked(q, &d, q->cfg.threshold);
    if (r)
        q->c.refused++;
    pthread_mutex_unlock(&q->lock);
    return r;
}

void dsamig_swq_movdir64b(dsamig_swq *q, const void *desc)
{
    dsamig_dsa_desc d;
    memcpy(&d, desc, sizeof(d));
    if (!cr_reportable(&d)) {
        COUNT(q, rejected, 1);
        return;
    }
    if (!q->started) {
        COUNT(q, dropped, 1);
        return;
    }
    pthread_mutex_lock(&q->lock);
    if (q->stopping || accept_locked(q, &d, q->cfg.size) != 0)
        q->c.dropped++;
    pthread_mutex_unlock(&q->lock);
}

int dsamig_swq_map_portal(dsamig_swq *q)
{
    return q->cfg.map_eperm ? -EPERM : 0;
}

long dsamig_swq_write(dsamig_swq *q, const void *descs, size_t n)
{
    const uint8_t *p = descs;
    if (!q->started)
        return -ESHUTDOWN;
    if (!q->cfg.write_method)
        return -EINVAL; /* a kernel before the write() method: no such file operation */
    if (q->cfg.foreign_mm)
        return -EPERM; /* the caller's address space is not the opener's */
    for (size_t i = 0; i < n; i++) {
        dsamig_dsa_desc d;
        memcpy(&d, p + i * DSAMIG_DESC_SIZE, sizeof(d));
        /* The write() method exists for devices with the 2024 erratum and
         * refuses batches on them; it checks the record alignment itself. */
        if (dsamig_desc_opcode(&d) == DSAMIG_OP_BATCH || !cr_reportable(&d)) {
            COUNT(q, rejected, 1);
            return i ? (long)i : -EINVAL;
        }
        if (q->cfg.dedicated) {
            dsamig_swq_movdir64b(q, &d);
            continue;
        }
        d.pasid_priv = 0; /* the kernel fills in the PASID for a shared WQ */
        for (int attempt = 0;; attempt++) {
            int r;
            pthread_mutex_lock(&q->lock);
            r = q->stopping ? -ESHUTDOWN : accept_locked(q, &d, q->cfg.threshold);
            if (r == 1)
                q->c.refused++;
            pthread_mutex_unlock(&q->lock);
            if (r == 0)
                break;
            if (r < 0)
                return i ? (long)i : r;
            if (attempt >= KERNEL_ENQCMDS_RETRIES)
                return i ? (long)i : -EAGAIN;
        }
    }
    return (long)n;
}

uint32_t dsamig_swq_occupancy(dsamig_swq *q)
{
    uint32_t n;
    if (!q->started)
        return 0;
    pthread_mutex_lock(&q->lock);
    n = q->count;
    pthread_mutex_unlock(&q->lock);
    return n;
}

void dsamig_swq_get_counters(dsamig_swq *q, dsamig_swq_counters *out)
{
    const uint64_t *src = (const uint64_t *)&q->c;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

long dsamig_swq_probe_cr_order(dsamig_swq *q, long n)
{
    const uint32_t poison32 = 0xdeadbeefu;
    const uint64_t poison64 = 0x5a5a5a5a5a5a5a5aull;
    uint8_t *page;
    dsamig_dsa_cr *cr;
    long bad = 0;
    void *mem;

    if (posix_memalign(&mem, 4096, 8192) != 0)
        return -ENOMEM;
    page = mem;
    cr = (dsamig_dsa_cr *)(page + 4096);
    memset(page, 0, 4096);
    for (long k = 0; k < n; k++) {
        dsamig_dsa_desc d;
        uint64_t deadline = dsamig_now_ns() + 1000000000ull;
        uint8_t st;
        int differ = (int)(k & 1);
        page[100] = (uint8_t)differ;

        cr->result = 0xee;
        cr->bytes_completed = poison32;
        cr->fault_addr = poison64;
        cr->invalid_flags = 0xabcdefu;
        __atomic_store_n(&cr->status, 0, __ATOMIC_RELEASE);

        memset(&d, 0, sizeof(d));
        d.flags_opcode = dsamig_desc_word(DSAMIG_OP_COMPVAL, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
        d.completion_addr = (uint64_t)(uintptr_t)cr;
        d.src_addr = (uint64_t)(uintptr_t)page;
        d.xfer_size = 4096;
        if (q->cfg.dedicated) {
            dsamig_swq_movdir64b(q, &d);
        } else {
            int r;
            while ((r = dsamig_swq_enqcmd(q, &d)) == 1)
                if (dsamig_now_ns() > deadline)
                    break;
            if (r != 0) {
                bad = r < 0 ? r : -EAGAIN;
                break;
            }
        }
        while ((st = __atomic_load_n(&cr->status, __ATOMIC_ACQUIRE)) == 0)
            if (dsamig_now_ns() > deadline) {
                bad = -ETIMEDOUT;
                goto out;
            }
        if (st != DSAMIG_COMP_SUCCESS || cr->result != differ ||
            cr->bytes_completed != (differ ? 96u : 0u) || cr->fault_addr == poison64 ||
            cr->invalid_flags != 0)
            bad++;
    }
out:
    free(mem);
    return bad;
}
