/* Completion polling (see dsa_internal.h): one pass over the records in
 * flight, timeouts, learning each WQ's pace, and the adaptive idle wait. */
#include "dsa_internal.h"

#include <stdio.h>

/* ---- completions ------------------------------------------------------------- */

static void unit_complete(dsamig_dsa_engine *e, dsa_unit *u, uint8_t st, uint64_t now)
{
    dsa_job *j = u->job;
    dsa_wq *w = &e->wqs[u->wq];
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
    if (code == DSAMIG_COMP_SUCCESS)
        dsa_wq_clean(w, u);
    if (u->count == 1) {
        dsa_member_result(e, w, u, u->first, st);
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
                    dsa_member_result(e, w, u, i, mst);
            }
            break;
        default:
            dsa_status_error(e, w, u, code, "a batch");
            for (uint32_t i = u->first; i < end; i++) {
                size_t p, off, len;
                dsa_member_range(j, i, &p, &off, &len);
                dsa_cpu_check(j, p, off, len);
            }
            break;
        }
    }
    dsa_job_unit_done(e, j, u);
}

static void unit_timeout(dsamig_dsa_engine *e, dsa_unit *u)
{
    dsa_job *j = u->job;
    dsa_wq *w = &e->wqs[u->wq];
    char why[64];
    INC(e->s.timeouts, 1);
    INC(w->timeouts, 1);
    snprintf(why, sizeof(why), "a descriptor did not complete in %.3g s",
             (double)e->cfg.timeout_ns / 1e9);
    dsa_wq_event(e, w, WQ_TRANSIENT, u->submitted_ns, why);
    /* The device may still write these records (and read the list): the
     * job's memory is never reused while the WQ is open. */
    j->held = 1;
    w->outstanding--;
    w->outstanding_descs -= u->count;
    j->inflight_units--;
    j->inflight_descs -= u->count;
    for (uint32_t i = u->first; i < u->first + u->count; i++) {
        size_t p, off, len;
        dsa_member_range(j, i, &p, &off, &len);
        dsa_cpu_check(j, p, off, len);
    }
    dsa_job_unit_done(e, j, u);
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
size_t dsa_poll_inflight(dsamig_dsa_engine *e)
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
        dsa_unit *u = e->inflight[i];
        if (!oldest[u->wq] || u->job->seq < oldest[u->wq]->seq)
            oldest[u->wq] = u->job;
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

/* Sleep on the condition variable until abs_ns (or the engine's timer,
 * whichever is first), unless a batch arrives that should not wait that
 * long. */
void dsa_sleep_until(dsamig_dsa_engine *e, uint64_t abs_ns)
{
    struct timespec ts;
    uint64_t dry = UINT64_MAX, now = dsamig_now_ns();
    if (e->timer_ns < abs_ns)
        abs_ns = e->timer_ns;
    if (abs_ns <= now)
        return;
    ts.tv_sec = (time_t)(abs_ns / 1000000000ull);
    ts.tv_nsec = (long)(abs_ns % 1000000000ull);
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
void dsa_idle_wait(dsamig_dsa_engine *e)
{
    uint64_t now = dsamig_now_ns();
    if (e->next_expected_ns != UINT64_MAX && e->next_expected_ns > now + SLEEP_MIN_NS) {
        uint64_t until = e->next_expected_ns;
        if (until > now + PREDICTED_MAX_NS)
            until = now + PREDICTED_MAX_NS;
        dsa_sleep_until(e, until);
        e->spin_from_ns = until; /* if the prediction was early, spin from there */
        return;
    }
    if (now - e->spin_from_ns < e->cfg.spin_ns) {
#if DSAMIG_X86
        if ((e->cpu & DSAMIG_CPU_WAITPKG) && e->ninflight) {
            dsa_umwait(&e->inflight[0]->cr->status, 20000);
            return;
        }
#endif
        for (int i = 0; i < 64; i++)
            dsa_cpu_relax();
        return;
    }
    e->sleep_ns = e->sleep_ns ? e->sleep_ns * 2 : SLEEP_MIN_NS;
    if (e->sleep_ns > SLEEP_MAX_NS)
        e->sleep_ns = SLEEP_MAX_NS;
    dsa_sleep_until(e, now + e->sleep_ns);
}
