/* WQ health (see dsa_internal.h and dsa_engine.h): quarantine, NOOP probes,
 * re-admission, out for good.
 *
 * A transient problem sends a WQ in service to quarantine with a strike.
 * The completion thread then sends it a NOOP probe: the first one at once,
 * since most such faults are one-offs (a hardware error on one descriptor,
 * other processes filling a shared WQ for a moment), later ones after a
 * back-off that doubles from quarantine_ns.  A probe that completes
 * re-admits the WQ; one that fails, times out or is refused is another
 * strike.  Strikes are forgiven when work submitted after the last
 * re-admission completes cleanly, so a WQ that fails now and then stays in
 * service while one that keeps failing reaches max_strikes and is out.
 * Problems that say the WQ is not what it claimed to be (it rejects
 * descriptors that are right by construction, or a submission fails with an
 * error) take it out at once.
 */
#include "dsa_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

dsa_probe *dsa_probe_new(void)
{
    void *m;
    if (posix_memalign(&m, 64, sizeof(dsa_probe)) != 0)
        return NULL;
    memset(m, 0, sizeof(dsa_probe));
    return m;
}

void dsa_probe_retire(dsamig_dsa_engine *e, dsa_probe *p)
{
    if (!p)
        return;
    p->next = e->dead_probes;
    e->dead_probes = p;
}

void dsa_probe_noop(dsa_probe *p)
{
    memset(p->desc, 0, sizeof(p->desc));
    memset(p->cr, 0, sizeof(p->cr));
    p->desc[0].flags_opcode = dsamig_desc_word(DSAMIG_OP_NOOP, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
    p->desc[0].completion_addr = (uint64_t)(uintptr_t)&p->cr[0];
}

void dsa_probe_batch(dsa_probe *p)
{
    memset(p->desc, 0, sizeof(p->desc));
    memset(p->cr, 0, sizeof(p->cr));
    for (int k = 2; k < 4; k++) {
        p->desc[k].flags_opcode =
            dsamig_desc_word(DSAMIG_OP_NOOP, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
        p->desc[k].completion_addr = (uint64_t)(uintptr_t)&p->cr[k];
    }
    p->desc[0].flags_opcode = dsamig_desc_word(DSAMIG_OP_BATCH, DSAMIG_FLAG_CRAV | DSAMIG_FLAG_RCR);
    p->desc[0].completion_addr = (uint64_t)(uintptr_t)&p->cr[0];
    p->desc[0].src_addr = (uint64_t)(uintptr_t)&p->desc[2]; /* desc_list_addr */
    p->desc[0].xfer_size = 2;                                /* desc_count */
}

/* State, healthy and reason change under the lock: other threads read them
 * for the stats. */
static void set_state(dsamig_dsa_engine *e, dsa_wq *w, int state, const char *reason)
{
    pthread_mutex_lock(&e->lock);
    w->state = state;
    w->healthy = state == DSAMIG_WQ_IN_SERVICE;
    if (reason)
        snprintf(w->reason, sizeof(w->reason), "%s", reason);
    pthread_mutex_unlock(&e->lock);
}

static uint64_t backoff_ns(const dsamig_dsa_engine *e, uint32_t strikes)
{
    uint64_t ns = e->cfg.quarantine_ns;
    if (strikes <= 1)
        return 0;
    for (uint32_t k = 2; k < strikes && ns < QUARANTINE_MAX_NS; k++)
        ns *= 2;
    return ns < QUARANTINE_MAX_NS ? ns : QUARANTINE_MAX_NS;
}

static void take_out(dsamig_dsa_engine *e, dsa_wq *w, const char *reason)
{
    if (w->state == DSAMIG_WQ_OUT)
        return;
    if (w->probe_sent_ns) {
        /* the device may still write its record */
        dsa_probe_retire(e, w->probe);
        w->probe = NULL;
        w->probe_sent_ns = 0;
        w->outstanding--;
    }
    set_state(e, w, DSAMIG_WQ_OUT, reason);
    INC(e->s.wqs_out, 1);
}

/* One more failure: quarantine (again), or out when there were too many. */
static void strike(dsamig_dsa_engine *e, dsa_wq *w, const char *reason, uint64_t now)
{
    w->strikes++;
    if (w->strikes >= e->cfg.max_strikes) {
        char why[320];
        if (w->strikes == 1)
            snprintf(why, sizeof(why), "%s", reason);
        else
            snprintf(why, sizeof(why), "out after %u failures in a row, the last: %s", w->strikes,
                     reason);
        take_out(e, w, why);
        return;
    }
    w->probe_due_ns = now + backoff_ns(e, w->strikes);
    if (w->state != DSAMIG_WQ_QUARANTINED) {
        w->quarantined_ns = now;
        INC(e->s.quarantines, 1);
        INC(w->quarantines, 1);
    }
    set_state(e, w, DSAMIG_WQ_QUARANTINED, reason);
}

void dsa_wq_event(dsamig_dsa_engine *e, dsa_wq *w, int kind, uint64_t submitted_ns,
                  const char *reason)
{
    if (w->state == DSAMIG_WQ_OUT)
        return;
    if (kind == WQ_FATAL) {
        take_out(e, w, reason);
        return;
    }
    /* Already being dealt with, or about work from before the WQ was last
     * re-admitted: the probe that re-admitted it came after that. */
    if (w->state == DSAMIG_WQ_QUARANTINED || (submitted_ns && submitted_ns < w->admitted_ns))
        return;
    strike(e, w, reason, dsamig_now_ns());
}

/* Hardware errors and address-translation failures can be one-offs; the
 * other error codes reject descriptors that are right by construction, so
 * the WQ must be configured differently from what it reported. */
static int transient_status(unsigned code)
{
    return code == DSAMIG_COMP_CRA_XLAT || code == DSAMIG_COMP_HW_ERR1 ||
           code == DSAMIG_COMP_HW_ERR_DRB || code == DSAMIG_COMP_TRANSLATION_FAIL;
}

void dsa_status_error(dsamig_dsa_engine *e, dsa_wq *w, dsa_unit *u, unsigned code,
                      const char *what)
{
    char why[96];
    INC(e->s.errors, 1);
    INC(w->errors, 1);
    if (code < DSAMIG_COMP_BAD_OPCODE)
        return; /* about the data (a fault the device could not resolve), not the WQ */
    snprintf(why, sizeof(why), "%s completed with status 0x%02x%s", what, code,
             code == DSAMIG_COMP_HW_ERR1 || code == DSAMIG_COMP_HW_ERR_DRB ? " (hardware error)"
             : transient_status(code)                                   ? " (address translation)"
                                                                        : " (rejected)");
    dsa_wq_event(e, w, transient_status(code) ? WQ_TRANSIENT : WQ_FATAL, u ? u->submitted_ns : 0,
                 why);
}

int dsa_wq_worth_waiting(const dsamig_dsa_engine *e, const dsa_wq *w, uint64_t now)
{
    return w->state == DSAMIG_WQ_QUARANTINED && now - w->quarantined_ns < e->cfg.timeout_ns;
}

void dsa_wq_clean(dsa_wq *w, const dsa_unit *u)
{
    if (w->state == DSAMIG_WQ_IN_SERVICE && u->submitted_ns >= w->admitted_ns)
        w->strikes = 0;
}

static void readmit(dsamig_dsa_engine *e, dsa_wq *w, uint64_t now)
{
    w->probe_ns = now - w->probe_sent_ns;
    w->probe_sent_ns = 0;
    w->outstanding--;
    w->admitted_ns = now;
    w->submit_attempt = 0;
    w->retry_at_ns = 0;
    set_state(e, w, DSAMIG_WQ_IN_SERVICE, NULL);
    INC(e->s.readmissions, 1);
    INC(w->readmissions, 1);
}

static void probe_failed(dsamig_dsa_engine *e, dsa_wq *w, const char *why, int kind, uint64_t now)
{
    INC(e->s.probe_failures, 1);
    INC(w->probe_failures, 1);
    if (kind == WQ_FATAL)
        take_out(e, w, why);
    else
        strike(e, w, why, now);
}

/* Look at the probe in flight on w; returns when to look again. */
static uint64_t check_probe(dsamig_dsa_engine *e, dsa_wq *w, uint64_t now)
{
    uint8_t st = __atomic_load_n(&w->probe->cr[0].status, __ATOMIC_ACQUIRE);
    unsigned code = st & DSAMIG_COMP_STATUS_MASK;
    char why[96];
    if (code == DSAMIG_COMP_SUCCESS) {
        readmit(e, w, now);
        return now; /* work may be waiting for it: look again at once */
    }
    if (st) {
        w->probe_sent_ns = 0;
        w->outstanding--;
        snprintf(why, sizeof(why), "a NOOP probe completed with status 0x%02x", code);
        probe_failed(e, w, why, transient_status(code) ? WQ_TRANSIENT : WQ_FATAL, now);
        return now;
    }
    if (now < w->probe_deadline_ns)
        return w->probe_deadline_ns;
    dsa_probe_retire(e, w->probe); /* the device may write it yet */
    INC(e->s.probe_timeouts, 1);
    INC(w->probe_timeouts, 1);
    w->probe = NULL;
    w->probe_sent_ns = 0;
    w->outstanding--;
    snprintf(why, sizeof(why), "a NOOP probe did not complete in %.3g s",
             (double)e->cfg.timeout_ns / 1e9);
    probe_failed(e, w, why, WQ_TRANSIENT, now);
    return now;
}

/* Send a probe to quarantined w if it is due; returns when to look again. */
static uint64_t send_probe(dsamig_dsa_engine *e, dsa_wq *w, uint64_t now)
{
    char why[96];
    int r;
    if (now < w->probe_due_ns)
        return w->probe_due_ns;
    if (w->outstanding >= w->credits)
        return now + SLEEP_MIN_NS; /* a dedicated WQ would drop it: wait for a slot */
    if (!w->probe && !(w->probe = dsa_probe_new()))
        return now + SLEEP_MAX_NS;
    dsa_probe_noop(w->probe);
    r = dsa_submit_one(w, &w->probe->desc[0]);
    if (r == 0) {
        w->probe_sent_ns = now;
        w->probe_deadline_ns = now + e->cfg.timeout_ns;
        w->outstanding++;
        return w->probe_deadline_ns;
    }
    if (r == 1) {
        INC(w->submit_retries, 1);
        INC(e->s.submit_retries, 1);
        probe_failed(e, w, "the WQ refused a NOOP probe (full)", WQ_TRANSIENT, now);
    } else {
        snprintf(why, sizeof(why), "a NOOP probe could not be submitted: %s", strerror(-r));
        probe_failed(e, w, why, WQ_FATAL, now);
    }
    return now;
}

uint64_t dsa_health_tick(dsamig_dsa_engine *e, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    e->probes_inflight = 0;
    for (int i = 0; i < e->nwqs; i++) {
        dsa_wq *w = &e->wqs[i];
        uint64_t t = UINT64_MAX;
        if (w->state == DSAMIG_WQ_QUARANTINED && w->probe_sent_ns)
            t = check_probe(e, w, now);
        if (w->state == DSAMIG_WQ_QUARANTINED && !w->probe_sent_ns)
            t = send_probe(e, w, now);
        if (t < next)
            next = t;
        e->probes_inflight += w->state == DSAMIG_WQ_QUARANTINED && w->probe_sent_ns;
    }
    return next;
}
