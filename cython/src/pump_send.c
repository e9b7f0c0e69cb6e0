/* A sending channel's thread: work items from the loop onto the socket, one
 * sendmsg per packet (header + mapped slices), see pump.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "pump.h"
#include "crc32c.h"
#include "sigbus_guard.h"
#include "completion.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define FRAME_HEADER 8
#define T_PACKET 0x10
#define PACKET_FIXED 32
#define MAX_RUNS (4096 / 2 + 1)

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Wait until the socket takes more bytes, or the loop asks us to stop. */
static int wait_writable(dsamig_tx_channel *c)
{
    struct pollfd fds[2] = {{c->sock, POLLOUT, 0}, {c->ctl, POLLIN, 0}};
    for (;;) {
        if (c->stop)
            return ECANCELED;
        int n = poll(fds, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (fds[1].revents || c->stop)
            return ECANCELED;
        if (fds[0].revents & (POLLERR | POLLHUP))
            return EPIPE;
        return 0;
    }
}

/* Write the whole iovec as one frame; 0 or an errno value.  A stop request
 * while the socket is full abandons the frame (``abandoned`` if part of it
 * went out). */
static int send_frame(dsamig_tx_channel *c, struct iovec *iov, int iovcnt)
{
    size_t sent_total = 0;
    while (iovcnt) {
        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = iovcnt > IOV_MAX ? IOV_MAX : iovcnt;
        ssize_t w = sendmsg(c->sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int rc = wait_writable(c);
                if (rc == 0)
                    continue;
                if (sent_total)
                    c->abandoned = 1;
                return rc;
            }
            if (sent_total)
                c->abandoned = 1;
            return errno;
        }
        sent_total += (size_t)w;
        c->bytes += (uint64_t)w;
        size_t left = (size_t)w;
        while (left) {
            size_t n = left < iov->iov_len ? left : iov->iov_len;
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= n;
            left -= n;
            if (iov->iov_len == 0) {
                iov++;
                iovcnt--;
            }
        }
    }
    return 0;
}

static inline int bit(const uint8_t *bm, uint32_t i) { return (bm[i >> 3] >> (i & 7)) & 1; }

struct payload_args {
    dsamig_tx_op *op;
    uint32_t page_size;
    struct iovec *iov;        /* runs go to iov[1..] */
    int nruns;
};

/* Runs of normal pages and their CRC32C: the first touch of the mapped
 * pages, under the SIGBUS guard (the image may have shrunk). */
static void measure_payload(void *arg)
{
    struct payload_args *a = arg;
    dsamig_tx_op *op = a->op;
    uint32_t crc = 0;
    uint64_t length = 0;
    uint32_t i = 0;
    a->nruns = 0;
    while (i < op->page_count) {
        if (bit(op->bitmap, i)) {
            i++;
            continue;
        }
        uint32_t start = i;
        while (i < op->page_count && !bit(op->bitmap, i))
            i++;
        uint64_t off = (uint64_t)start * a->page_size;
        uint64_t end = (uint64_t)i * a->page_size;
        if (end > op->span)
            end = op->span;
        crc = dsamig_crc32c(crc, op->data + off, end - off);
        a->iov[1 + a->nruns].iov_base = (void *)(op->data + off);
        a->iov[1 + a->nruns].iov_len = end - off;
        a->nruns++;
        length += end - off;
    }
    op->crc = crc;
    op->payload_length = (uint32_t)length;
}

static int run_packet(dsamig_tx_channel *c, dsamig_tx_item *item, dsamig_tx_op *op,
                      struct iovec *iov, uint8_t *hdr)
{
    struct payload_args a = {op, item->page_size, iov, 0};
    int fault = dsamig_guarded(measure_payload, &a);
    if (fault)
        return fault;
    if (op->kind == DSAMIG_TX_VERIFY)
        return 0;
    hdr[0] = T_PACKET;
    hdr[1] = 0;
    put16(hdr + 2, 0);
    put32(hdr + 4, PACKET_FIXED + op->bitmap_len);
    put64(hdr + 8, op->packet);
    put64(hdr + 16, op->first_page);
    put32(hdr + 24, op->page_count);
    put32(hdr + 28, op->payload_length);
    put32(hdr + 32, op->crc);
    put16(hdr + 36, 0);
    put16(hdr + 38, 0);
    memcpy(hdr + FRAME_HEADER + PACKET_FIXED, op->bitmap, op->bitmap_len);
    iov[0].iov_base = hdr;
    iov[0].iov_len = FRAME_HEADER + PACKET_FIXED + op->bitmap_len;
    int rc = send_frame(c, iov, 1 + a.nruns);
    if (rc == 0)
        c->packets++;
    return rc;
}

static int run_item(dsamig_tx_channel *c, dsamig_tx_item *item, struct iovec *iov, uint8_t *hdr)
{
    for (uint32_t k = 0; k < item->nops; k++) {
        dsamig_tx_op *op = &item->ops[k];
        int rc;
        if (c->stop)
            return ECANCELED;
        if (op->kind == DSAMIG_TX_FRAME) {
            struct iovec one = {(void *)op->frame, op->frame_len};
            rc = send_frame(c, &one, 1);
        } else {
            rc = run_packet(c, item, op, iov, hdr);
        }
        if (rc)
            return rc;
    }
    return 0;
}

static void *tx_main(void *arg)
{
    dsamig_tx_channel *c = arg;
    char name[16];
    uint64_t cpu_start = dsamig_thread_cpu_ns();
    struct iovec *iov = malloc(sizeof(struct iovec) * (1 + MAX_RUNS));
    uint8_t hdr[FRAME_HEADER + PACKET_FIXED + 512];
    int failed = iov == NULL ? ENOMEM : 0;

    snprintf(name, sizeof(name), "dsamig-send-%d", c->index);
    dsamig_set_thread_name(name);
    for (;;) {
        dsamig_tx_item *item;
        pthread_mutex_lock(&c->lock);
        while (!c->work_head && !c->stop)
            pthread_cond_wait(&c->cond, &c->lock);
        item = c->work_head;
        if (item) {
            c->work_head = item->next_work;
            if (!c->work_head)
                c->work_tail = NULL;
        }
        pthread_mutex_unlock(&c->lock);
        if (!item)
            break; /* stopping, and nothing queued */
        if (failed || c->stop)
            item->status = failed ? failed : ECANCELED;
        else
            item->status = run_item(c, item, iov, hdr);
        if (item->status && !failed)
            failed = item->status; /* later items cannot follow a lost frame */
        item->base.kind = DSAMIG_TXE_DONE;
        dsamig_evq_post(&c->q, &item->base);
    }
    free(iov);
    c->cpu_ns = dsamig_thread_cpu_ns() - cpu_start;
    c->stopped.base.kind = DSAMIG_TXE_STOPPED;
    dsamig_evq_post(&c->q, &c->stopped.base);
    return NULL;
}

int dsamig_tx_start(dsamig_tx_channel *c)
{
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    int rc = pthread_create(&c->thread, NULL, tx_main, c);
    if (rc != 0) {
        pthread_mutex_destroy(&c->lock);
        pthread_cond_destroy(&c->cond);
        return -rc;
    }
    pthread_detach(c->thread);
    c->started = 1;
    return 0;
}

void dsamig_tx_submit(dsamig_tx_channel *c, dsamig_tx_item *item)
{
    item->next_work = NULL;
    pthread_mutex_lock(&c->lock);
    if (c->work_tail)
        c->work_tail->next_work = item;
    else
        c->work_head = item;
    c->work_tail = item;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

void dsamig_tx_stop(dsamig_tx_channel *c)
{
    uint64_t one = 1;
    pthread_mutex_lock(&c->lock);
    c->stop = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    ssize_t r = write(c->ctl, &one, sizeof(one));
    (void)r;
}
