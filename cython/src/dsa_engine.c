/* DSA backend of the engine contract (see dsa_engine.h): the completion
 * thread and the public lifecycle.  The other parts are in dsa_portal.c,
 * dsa_jobs.c and dsa_poll.c (see dsa_internal.h). */
#include "dsa_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

/* ---- the completion thread ----------------------------------------------------- */

static dsamig_batch *take_pending(dsamig_dsa_engine *e)
{
    dsamig_batch *list = e->pending_head;
    e->pending_head = e->pending_tail = NULL;
    __atomic_store_n(&e->pending_n, 0, __ATOMIC_RELAXED);
    return list;
}

/* Batches that will not be looked at: back to their owner with ECANCELED. */
static void cancel_list(dsamig_dsa_engine *e, dsamig_batch *list)
{
    while (list) {
        dsamig_batch *next = list->next;
        list->status = ECANCELED;
        list->zero_pages = 0;
        list->cpu_pages = 0;
        INC(e->s.cancelled, 1);
        dsa_post(e, list);
        list = next;
    }
}

/* The exit path of a failing completion thread: no WQ gets work any more,
 * every batch it holds is checked on the CPU, memory the devices may still
 * write is held, and later batches are checked by the submitter. */
static void die(dsamig_dsa_engine *e)
{
    dsamig_batch *list;
    pthread_mutex_lock(&e->lock);
    e->dead = 1;
    list = take_pending(e);
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->nwqs; i++)
        dsa_wq_event(e, &e->wqs[i], WQ_FATAL, 0, "the completion thread exited");
    for (size_t i = 0; i < e->ninflight; i++) {
        dsa_unit *u = e->inflight[i];
        u->job->held = 1;
        e->wqs[u->wq].outstanding--;
        e->wqs[u->wq].outstanding_descs -= u->count;
    }
    e->ninflight = 0;
    e->staged_head = e->staged_tail = NULL;
    while (e->active) {
        dsa_job *j = e->active;
        dsamig_batch *b = j->b;
        dsa_active_remove(e, j);
        dsa_job_release(e, j);
        dsa_cpu_whole(e, b, 1);
    }
    while (list) {
        dsamig_batch *next = list->next;
        dsa_cpu_whole(e, list, 0);
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

/* Nothing in flight: sleep until a batch arrives, the engine stops, or the
 * timer (a full WQ's retry time, a probe) is due. */
static void wait_for_work(dsamig_dsa_engine *e)
{
    uint64_t until = e->timer_ns;
    /* Staged work is only ever held back by a retry time; never sleep
     * untimed while some is there. */
    if (e->staged_head && until == UINT64_MAX)
        until = dsamig_now_ns() + SLEEP_MAX_NS;
    pthread_mutex_lock(&e->lock);
    while (!e->pending_head && !e->stopping && !e->kill) {
        e->sleeping = 1;
        if (until == UINT64_MAX) {
            e->sleep_until_ns = 0;
            pthread_cond_wait(&e->cond, &e->lock);
        } else {
            struct timespec ts = {(time_t)(until / 1000000000ull),
                                  (long)(until % 1000000000ull)};
            if (dsamig_now_ns() >= until) {
                e->sleeping = 0;
                break;
            }
            e->sleep_until_ns = until;
            e->dry_ns = 0;
            pthread_cond_timedwait(&e->cond, &e->lock, &ts);
        }
        e->sleeping = 0;
        if (until != UINT64_MAX && dsamig_now_ns() >= until)
            break;
    }
    pthread_mutex_unlock(&e->lock);
    INC(e->s.sleeps, 1);
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
    e->retry_wake_ns = e->timer_ns = UINT64_MAX;
    for (;;) {
        size_t done;
        uint64_t health;
        int stopping = __atomic_load_n(&e->stopping, __ATOMIC_RELAXED);
        if (__atomic_load_n(&e->kill, __ATOMIC_RELAXED)) {
            die(e);
            break;
        }
        if (__atomic_load_n(&e->pending_n, __ATOMIC_RELAXED)) {
            dsamig_batch *list;
            pthread_mutex_lock(&e->lock);
            list = take_pending(e);
            stopping = e->stopping;
            pthread_mutex_unlock(&e->lock);
            if (stopping) {
                cancel_list(e, list);
            } else {
                while (list) {
                    dsamig_batch *next = list->next;
                    dsa_job_begin(e, list);
                    list = next;
                }
            }
            e->spin_from_ns = dsamig_now_ns();
            e->sleep_ns = 0;
        }
        dsa_submit_staged(e);
        done = dsa_poll_inflight(e);
        health = dsa_health_tick(e, dsamig_now_ns());
        e->timer_ns = health < e->retry_wake_ns ? health : e->retry_wake_ns;
        /* At stop, what is in flight completes or times out first: its
         * memory must not go back to the caller while a device reads it. */
        if (stopping && !e->ninflight && !e->staged_head && !e->active)
            break;
        if (done) {
            e->spin_from_ns = dsamig_now_ns();
            e->sleep_ns = 0;
        } else if (e->ninflight || e->probes_inflight) {
            dsa_idle_wait(e); /* a probe's record is polled like a unit's */
        } else {
            wait_for_work(e);
        }
    }
    if (!e->dead) {
        /* Submitted while we were deciding to stop: cancelled too. */
        dsamig_batch *list;
        pthread_mutex_lock(&e->lock);
        list = take_pending(e);
        pthread_mutex_unlock(&e->lock);
        cancel_list(e, list);
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

/* Close every WQ, then free what a device could have written into. */
static void close_and_free(dsamig_dsa_engine *e, int nwqs)
{
    for (int i = 0; i < nwqs; i++)
        if (e->wqs[i].ops)
            e->wqs[i].ops->close(&e->wqs[i]);
    /* Only now can nothing write into held jobs and probes. */
    while (e->held) {
        dsa_job *j = e->held;
        e->held = j->next;
        dsa_job_free(j);
    }
    while (e->dead_probes) {
        dsa_probe *p = e->dead_probes;
        e->dead_probes = p->next;
        free(p);
    }
    while (e->held_mem) {
        dsa_mem *m = e->held_mem;
        e->held_mem = m->next;
        free(m->p);
        free(m);
    }
    for (int i = 0; i < nwqs; i++) {
        free(e->wqs[i].probe);
        e->wqs[i].probe = NULL;
    }
}

static int open_wq(dsamig_dsa_engine *e, int i, const dsamig_dsa_wq_config *c, char *err,
                   size_t errlen)
{
    dsa_wq *w = &e->wqs[i];
    int rc;
    memset(w, 0, sizeof(*w));
    w->fd = -1;
    w->dedicated = c->dedicated;
    w->emulated = c->emulated;
    w->max_batch = c->max_batch_size;
    w->max_xfer = c->max_transfer_size ? c->max_transfer_size : 4096;
    if (c->size < 1 || (!c->dedicated && c->threshold > c->size)) {
        snprintf(err, errlen, "work queue %d: size %u and threshold %u are not usable", i, c->size,
                 c->threshold);
        return -EINVAL;
    }
    if (c->emulated) {
        dsamig_swq_config q = c->emu;
        q.id = i;
        q.dedicated = c->dedicated;
        q.size = c->size;
        q.threshold = c->threshold ? c->threshold : c->size;
        q.max_batch_size = c->max_batch_size ? c->max_batch_size : 1;
        q.max_transfer_size = w->max_xfer;
        snprintf(w->name, sizeof(w->name), "emulated:%d", i);
        rc = dsamig_swq_start(&w->swq, &q);
        if (rc) {
            snprintf(err, errlen, "cannot start software work queue %d: %s", i, strerror(-rc));
            return rc;
        }
        w->ops = &dsa_emu_ops;
        dsa_choose_emulated_method(w, c);
    } else {
        snprintf(w->name, sizeof(w->name), "%s", c->path);
        rc = dsa_open_real_wq(e, w, c, err, errlen);
        if (rc) {
            w->ops = NULL;
            return rc;
        }
    }
    /* Never more in flight than the WQ takes: a dedicated WQ drops the
     * excess silently, a shared one would only answer "retry". */
    w->credits = c->dedicated || !c->threshold ? c->size : c->threshold;
    if (w->credits > MAX_CREDITS)
        w->credits = MAX_CREDITS;
    w->healthy = 1;
    w->state = DSAMIG_WQ_IN_SERVICE;
    w->admitted_ns = dsamig_now_ns();
    return 0;
}

/* Why WQ w gets lone descriptors, when it does and the probe did not say. */
static void note_lone(dsa_wq *w)
{
    if (w->batch_note[0])
        return;
    if (w->method == DSAMIG_DSA_WRITE)
        snprintf(w->batch_note, sizeof(w->batch_note),
                 "write() takes no BATCH descriptors: one descriptor per page");
    else if (w->max_batch < 2)
        snprintf(w->batch_note, sizeof(w->batch_note),
                 "max_batch_size %u: one descriptor per page", w->max_batch);
}

int dsamig_dsa_engine_configure(dsamig_dsa_engine *e, const dsamig_dsa_config *cfg, char *err,
                                size_t errlen)
{
    size_t credits = 0;
    int rc = 0, passed = 0, first_rc = 0;
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
    if (!e->cfg.quarantine_ns)
        e->cfg.quarantine_ns = DEFAULT_QUARANTINE_NS;
    if (!e->cfg.max_strikes)
        e->cfg.max_strikes = DEFAULT_MAX_STRIKES;
    /* The engine uses an instruction only when CPUID has it and the kernel
     * has not cleared it: a user ENQCMD the kernel does not support faults. */
    e->cpu_cpuid = dsamig_dsa_cpu_features();
    e->cpu_kernel = dsamig_dsa_kernel_cpu_flags(e->cfg.cpuinfo_path);
    e->cpu = e->cpu_kernel < 0 ? 0 : e->cpu_cpuid & (unsigned)e->cpu_kernel;
    for (int i = 0; i < cfg->nwqs; i++) {
        rc = open_wq(e, i, &cfg->wqs[i], err, errlen);
        if (rc) {
            close_and_free(e, i);
            memset(&e->wqs[i], 0, sizeof(e->wqs[i]));
            return rc;
        }
        credits += e->wqs[i].credits;
    }
    if (e->cfg.probe) {
        /* Prove the method before trusting it; a WQ that fails is left out
         * (and closed: a dedicated WQ is free for others again). */
        size_t used = 0;
        for (int i = 0; i < cfg->nwqs; i++) {
            dsa_wq *w = &e->wqs[i];
            char why[300];
            int prc = dsa_probe_sync(e, w, why, sizeof(why));
            if (prc == 0) {
                passed++;
                continue;
            }
            if (!first_rc)
                first_rc = prc;
            w->ops->close(w);
            w->healthy = 0;
            w->state = DSAMIG_WQ_OUT;
            snprintf(w->reason, sizeof(w->reason), "failed its probe: %s", why);
            if (err && used < errlen)
                used += (size_t)snprintf(err + used, errlen - used, "%s%s: %s",
                                         used ? "; " : "", w->name, why);
        }
        if (!passed) {
            close_and_free(e, cfg->nwqs);
            memset(e->wqs, 0, sizeof(e->wqs));
            return first_rc;
        }
        if (err && errlen)
            err[0] = 0;
    }
    for (int i = 0; i < cfg->nwqs; i++)
        note_lone(&e->wqs[i]);
    e->inflight = calloc(credits, sizeof(*e->inflight));
    if (!e->inflight) {
        close_and_free(e, cfg->nwqs);
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
    close_and_free(e, e->nwqs);
    while (e->free_jobs) {
        dsa_job *j = e->free_jobs;
        e->free_jobs = j->next;
        dsa_job_free(j);
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
        dsa_cpu_whole(e, b, 0);
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
    out->retry_exhausted = LOAD(w->retry_exhausted);
    out->quarantines = LOAD(w->quarantines);
    out->readmissions = LOAD(w->readmissions);
    out->probe_failures = LOAD(w->probe_failures);
    out->probe_timeouts = LOAD(w->probe_timeouts);
    out->page_faults = LOAD(w->page_faults);
    out->errors = LOAD(w->errors);
    out->timeouts = LOAD(w->timeouts);
    out->cpu_fallback_pages = LOAD(w->cpu_fallback_pages);
    out->credits = w->credits;
    out->outstanding = __atomic_load_n(&w->outstanding, __ATOMIC_RELAXED);
    out->latency_ns = LOAD(w->latency_ns);
    out->probe_ns = LOAD(w->probe_ns);
    out->max_batch = __atomic_load_n(&w->max_batch, __ATOMIC_RELAXED);
    out->strikes = __atomic_load_n(&w->strikes, __ATOMIC_RELAXED);
    out->method = w->method;
    out->emulated = w->emulated;
    out->dedicated = w->dedicated;
    pthread_mutex_lock(&e->lock);
    out->healthy = w->healthy;
    out->state = w->state;
    snprintf(out->reason, sizeof(out->reason), "%s", w->reason);
    snprintf(out->portal_note, sizeof(out->portal_note), "%s", w->portal_note);
    snprintf(out->batch_note, sizeof(out->batch_note), "%s", w->batch_note);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

dsamig_swq *dsamig_dsa_engine_swq(dsamig_dsa_engine *e, int i)
{
    if (i < 0 || i >= e->nwqs || !e->wqs[i].emulated)
        return NULL;
    return &e->wqs[i].swq;
}
