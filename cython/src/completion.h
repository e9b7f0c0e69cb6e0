/* The engine contract on the native side: batches of pages in, zero bitmaps
 * out, completions handed to the event loop through one eventfd.
 *
 * Every backend (CPU workers, DSA) fills a dsamig_batch and posts it to the
 * engine's dsamig_cq from its own thread.  The loop thread drains the queue
 * when the eventfd becomes readable.  Native threads never touch Python
 * objects: a batch holds raw pointers that the Python side pinned before
 * submission and releases after draining.
 */
#ifndef DSAMIG_COMPLETION_H
#define DSAMIG_COMPLETION_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct dsamig_batch {
    uint64_t token;           /* chosen by the submitter, returned as is */
    const uint8_t *buf;       /* pages to scan, pinned by the submitter */
    size_t len;               /* bytes; the last page may be short */
    size_t page_size;
    size_t group_pages;       /* each group's bitmap starts on a byte */
    uint8_t *bitmap;          /* dsamig_bitmap_bytes(len, page_size, group_pages) */
    size_t zero_pages;        /* out */
    int status;               /* out: 0, or an errno value */
    uint64_t cpu_pages;       /* out: pages the CPU checked (fallbacks on DSA) */
    struct dsamig_batch *next;
} dsamig_batch;

typedef struct dsamig_cq {
    pthread_mutex_t lock;
    dsamig_batch *head;
    dsamig_batch *tail;
    int efd;
    uint64_t posted;
    uint64_t wakeups;
} dsamig_cq;

int dsamig_cq_init(dsamig_cq *cq);
void dsamig_cq_destroy(dsamig_cq *cq);

/* Append a finished batch; wakes the loop only when the queue was empty, so
 * a burst of completions costs one wake-up. */
void dsamig_cq_post(dsamig_cq *cq, dsamig_batch *b);

/* Take every finished batch, oldest first (NULL if none). */
dsamig_batch *dsamig_cq_drain(dsamig_cq *cq);

/* Name the calling thread (visible in top -H, perf, /proc). */
void dsamig_set_thread_name(const char *name);

uint64_t dsamig_now_ns(void);
/* CPU time of the calling thread. */
uint64_t dsamig_thread_cpu_ns(void);

#endif
