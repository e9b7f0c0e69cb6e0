#define _GNU_SOURCE
#include "cpu_engine.h"
#include "sigbus_guard.h"
#include "zeroscan.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

static int populate_supported = 1;

void dsamig_prefault(const void *buf, size_t len)
{
    if (!populate_supported || len == 0)
        return;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)buf & ~(uintptr_t)(page - 1);
    uintptr_t end = (uintptr_t)buf + len;
    if (madvise((void *)start, end - start, MADV_POPULATE_READ) != 0 && errno == EINVAL)
        populate_supported = 0; /* kernel older than 5.14, or not a mapping */
}

struct scan_args {
    dsamig_batch *b;
    int prefault;
};

/* Runs under the SIGBUS guard: it touches the mapped image, which may have
 * been truncated since the batch was submitted. */
static void scan_batch(void *arg)
{
    struct scan_args *a = arg;
    dsamig_batch *b = a->b;
    if (a->prefault)
        dsamig_prefault(b->buf, b->len);
    b->zero_pages = dsamig_zero_bitmap(b->buf, b->len, b->page_size, b->group_pages, b->bitmap);
}

static void *worker_main(void *arg)
{
    dsamig_cpu_engine *e = arg;
    uint64_t cpu_start = dsamig_thread_cpu_ns();

    for (;;) {
        dsamig_batch *b;
        pthread_mutex_lock(&e->lock);
        while (!e->qhead && !e->stopping)
            pthread_cond_wait(&e->cond, &e->lock);
        if (!e->qhead) { /* stopping and nothing left */
            e->worker_cpu_ns += dsamig_thread_cpu_ns() - cpu_start;
            pthread_mutex_unlock(&e->lock);
            return NULL;
        }
        b = e->qhead;
        e->qhead = b->next;
        if (!e->qhead)
            e->qtail = NULL;
        pthread_mutex_unlock(&e->lock);

        struct scan_args args = {b, e->prefault};
        b->status = dsamig_guarded(scan_batch, &args); /* EFAULT: image truncated */
        if (b->status)
            b->zero_pages = 0;
        b->cpu_pages = (b->len + b->page_size - 1) / b->page_size;

        pthread_mutex_lock(&e->lock);
        e->batches++;
        e->pages += b->cpu_pages;
        e->zero_pages += b->zero_pages;
        pthread_mutex_unlock(&e->lock);
        dsamig_cq_post(&e->cq, b);
    }
}

int dsamig_cpu_engine_start(dsamig_cpu_engine *e, int nthreads, int prefault)
{
    int rc;
    if (e->started)
        return 0;
    if (nthreads < 1 || nthreads > DSAMIG_CPU_MAX_THREADS)
        return -EINVAL;
    rc = dsamig_cq_init(&e->cq);
    if (rc)
        return rc;
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->prefault = prefault;
    e->stopping = 0;
    pthread_mutex_lock(&e->lock);
    for (e->nthreads = 0; e->nthreads < nthreads; e->nthreads++) {
        char name[16];
        rc = pthread_create(&e->threads[e->nthreads], NULL, worker_main, e);
        if (rc)
            break;
        /* Named by the creator, so the name is there before the thread runs. */
        snprintf(name, sizeof(name), "dsamig-cpu-%d", e->nthreads);
        pthread_setname_np(e->threads[e->nthreads], name);
    }
    e->started = 1;
    pthread_mutex_unlock(&e->lock);
    if (e->nthreads == 0) {
        dsamig_cpu_engine_stop(e);
        return -rc;
    }
    return 0;
}

int dsamig_cpu_engine_submit(dsamig_cpu_engine *e, dsamig_batch *b)
{
    b->next = NULL;
    pthread_mutex_lock(&e->lock);
    if (!e->started || e->stopping) {
        pthread_mutex_unlock(&e->lock);
        return -ESHUTDOWN;
    }
    if (e->qtail)
        e->qtail->next = b;
    else
        e->qhead = b;
    e->qtail = b;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

void dsamig_cpu_engine_stop(dsamig_cpu_engine *e)
{
    dsamig_batch *left;
    if (!e->started || e->stopping)
        return;
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    left = e->qhead; /* not started yet: hand back as cancelled */
    e->qhead = e->qtail = NULL;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->nthreads; i++)
        pthread_join(e->threads[i], NULL);
    while (left) {
        dsamig_batch *next = left->next;
        left->status = ECANCELED;
        dsamig_cq_post(&e->cq, left);
        left = next;
    }
}
