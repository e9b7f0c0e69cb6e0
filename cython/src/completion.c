#define _GNU_SOURCE
#include "completion.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int dsamig_cq_init(dsamig_cq *cq)
{
    memset(cq, 0, sizeof(*cq));
    cq->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (cq->efd < 0)
        return -errno;
    pthread_mutex_init(&cq->lock, NULL);
    return 0;
}

void dsamig_cq_destroy(dsamig_cq *cq)
{
    if (cq->efd >= 0) {
        close(cq->efd);
        cq->efd = -1;
        pthread_mutex_destroy(&cq->lock);
    }
}

void dsamig_cq_post(dsamig_cq *cq, dsamig_batch *b)
{
    int was_empty;
    b->next = NULL;
    pthread_mutex_lock(&cq->lock);
    was_empty = cq->head == NULL;
    if (cq->tail)
        cq->tail->next = b;
    else
        cq->head = b;
    cq->tail = b;
    cq->posted++;
    if (was_empty)
        cq->wakeups++;
    pthread_mutex_unlock(&cq->lock);
    if (was_empty) {
        uint64_t one = 1;
        /* EAGAIN only if the counter is saturated: the loop is awake anyway. */
        ssize_t r = write(cq->efd, &one, sizeof(one));
        (void)r;
    }
}

dsamig_batch *dsamig_cq_drain(dsamig_cq *cq)
{
    uint64_t count;
    dsamig_batch *list;
    /* Reset the eventfd before taking the list: anything posted after the
     * take finds the queue empty and signals again, so nothing is missed. */
    ssize_t r = read(cq->efd, &count, sizeof(count));
    (void)r;
    pthread_mutex_lock(&cq->lock);
    list = cq->head;
    cq->head = cq->tail = NULL;
    pthread_mutex_unlock(&cq->lock);
    return list;
}

void dsamig_set_thread_name(const char *name)
{
    char buf[16];
    strncpy(buf, name, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = 0;
    prctl(PR_SET_NAME, buf, 0, 0, 0);
}

uint64_t dsamig_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t dsamig_thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
