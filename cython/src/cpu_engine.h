/* CPU backend of the engine contract: a small pool of named worker threads. */
#ifndef DSAMIG_CPU_ENGINE_H
#define DSAMIG_CPU_ENGINE_H

#include "completion.h"

#define DSAMIG_CPU_MAX_THREADS 64

typedef struct dsamig_cpu_engine {
    dsamig_cq cq;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    dsamig_batch *qhead, *qtail;
    int started;
    int stopping;
    int nthreads;
    int prefault;
    pthread_t threads[DSAMIG_CPU_MAX_THREADS];
    /* statistics, updated under lock */
    uint64_t batches;
    uint64_t pages;
    uint64_t zero_pages;
    uint64_t worker_cpu_ns;
} dsamig_cpu_engine;

/* 0 or -errno.  The engine must be zeroed before the first start. */
int dsamig_cpu_engine_start(dsamig_cpu_engine *e, int nthreads, int prefault);
/* 0, or -ESHUTDOWN when the engine is not running. */
int dsamig_cpu_engine_submit(dsamig_cpu_engine *e, dsamig_batch *b);
/* Joins the workers; queued batches complete with ECANCELED.  Idempotent. */
void dsamig_cpu_engine_stop(dsamig_cpu_engine *e);
/* Bring a page range into the page tables in one call (MADV_POPULATE_READ),
 * so scanning a cold file-backed image does not fault page by page. */
void dsamig_prefault(const void *buf, size_t len);

#endif
