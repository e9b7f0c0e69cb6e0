/* The pumps' event queue: a mutex-protected list and one eventfd that is
 * written only when the list goes from empty to non-empty (see completion.c,
 * the same pattern for engine batches). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "pump.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int dsamig_evq_init(dsamig_evq *q)
{
    memset(q, 0, sizeof(*q));
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0)
        return -errno;
    pthread_mutex_init(&q->lock, NULL);
    return 0;
}

void dsamig_evq_destroy(dsamig_evq *q)
{
    if (q->efd >= 0) {
        close(q->efd);
        q->efd = -1;
        pthread_mutex_destroy(&q->lock);
    }
}

void dsamig_evq_post(dsamig_evq *q, dsamig_event *e)
{
    int was_empty;
    e->next = NULL;
    pthread_mutex_lock(&q->lock);
    was_empty = q->head == NULL;
    if (q->tail)
        q->tail->next = e;
    else
        q->head = e;
    q->tail = e;
    q->posted++;
    if (was_empty)
        q->wakeups++;
    pthread_mutex_unlock(&q->lock);
    if (was_empty) {
        uint64_t one = 1;
        ssize_t r = write(q->efd, &one, sizeof(one)); /* EAGAIN: saturated, awake anyway */
        (void)r;
    }
}

dsamig_event *dsamig_evq_drain(dsamig_evq *q)
{
    uint64_t count;
    dsamig_event *list;
    /* Reset the eventfd before taking the list: anything posted after the
     * take finds the queue empty and signals again, so nothing is missed. */
    ssize_t r = read(q->efd, &count, sizeof(count));
    (void)r;
    pthread_mutex_lock(&q->lock);
    list = q->head;
    q->head = q->tail = NULL;
    pthread_mutex_unlock(&q->lock);
    return list;
}
