/* A receiving channel's thread: PACKET frames from the socket into the
 * destination, everything else to the loop (see pump.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "pump.h"
#include "crc32c.h"
#include "sigbus_guard.h"
#include "completion.h"

#include <errno.h>
#include <fcntl.h>
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
#define T_END 0x12
#define PAGE_LIST 0x01
#define PACKET_FIXED 32
#define MAX_PACKET_PAGES 4096
#define MAX_PAGE_SIZE (1u << 20)
/* The largest body a sender may send (proto.frames.RECEIVER_MAX_BODY). */
#define MAX_BODY (4 + 4096)
#define MAX_RUNS (MAX_PACKET_PAGES / 2 + 1)

enum { RD_OK = 0, RD_EOF = 1, RD_ERROR = 2, RD_STOP = 3 };

typedef struct {
    uint64_t number;
    uint64_t first_page;
    uint32_t page_count;
    uint32_t payload_length;
    uint32_t crc;
    uint16_t bitmap_len;
    const uint8_t *bitmap;
    uint64_t offset;          /* of the packet in the image */
    uint64_t span;            /* its bytes (the last page may be short) */
    size_t nruns;
    uint64_t run_off[MAX_RUNS];   /* file offsets */
    uint64_t run_len[MAX_RUNS];
} packet_t;

static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

static void post_simple(dsamig_rx_channel *c, int kind, int err, int what, uint64_t packet, int again)
{
    dsamig_rx_event *e = calloc(1, sizeof(*e));
    if (!e)
        return; /* out of memory: the loop's idle bound ends the job */
    e->base.kind = kind;
    e->err = err;
    e->what = what;
    e->packet = packet;
    e->again = again;
    dsamig_evq_post(&c->q, &e->base);
}

static void post_frame(dsamig_rx_channel *c, const uint8_t *hdr, const uint8_t *body, size_t body_len)
{
    dsamig_rx_event *e = calloc(1, sizeof(*e) + FRAME_HEADER + body_len);
    if (!e)
        return;
    e->base.kind = DSAMIG_RXE_FRAME;
    e->frame_len = (uint32_t)(FRAME_HEADER + body_len);
    memcpy(e->frame, hdr, FRAME_HEADER);
    if (body_len)
        memcpy(e->frame + FRAME_HEADER, body, body_len);
    dsamig_evq_post(&c->q, &e->base);
}

/* Wait until the socket is readable or the loop asks us to stop. */
static int wait_readable(dsamig_rx_channel *c)
{
    struct pollfd fds[2] = {{c->sock, POLLIN, 0}, {c->ctl, POLLIN, 0}};
    for (;;) {
        if (c->stop)
            return RD_STOP;
        int n = poll(fds, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return RD_ERROR;
        }
        if (fds[1].revents || c->stop)
            return RD_STOP;
        return RD_OK;
    }
}

/* Read exactly the iovec's bytes (consuming the loop's prefix first).
 * *got says how many arrived before an EOF or error. */
static int read_iov(dsamig_rx_channel *c, struct iovec *iov, int iovcnt, size_t *got, int *err)
{
    size_t want = 0, have = 0;
    for (int i = 0; i < iovcnt; i++)
        want += iov[i].iov_len;
    *got = 0;
    while (c->prefix_off < c->prefix_len && have < want) {
        while (iovcnt && iov->iov_len == 0) {
            iov++;
            iovcnt--;
        }
        size_t n = c->prefix_len - c->prefix_off;
        if (n > iov->iov_len)
            n = iov->iov_len;
        memcpy(iov->iov_base, c->prefix + c->prefix_off, n);
        c->prefix_off += n;
        iov->iov_base = (uint8_t *)iov->iov_base + n;
        iov->iov_len -= n;
        have += n;
    }
    while (have < want) {
        while (iovcnt && iov->iov_len == 0) {
            iov++;
            iovcnt--;
        }
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = iovcnt > IOV_MAX ? IOV_MAX : iovcnt;
        ssize_t r = recvmsg(c->sock, &msg, MSG_DONTWAIT);
        if (r > 0) {
            have += (size_t)r;
            c->bytes += (uint64_t)r;
            size_t left = (size_t)r;
            while (left) {
                size_t n = left < iov->iov_len ? left : iov->iov_len;
                iov->iov_base = (uint8_t *)iov->iov_base + n;
                iov->iov_len -= n;
                left -= n;
                if (iov->iov_len == 0 && left) {
                    iov++;
                    iovcnt--;
                }
            }
            continue;
        }
        if (r == 0) {
            *got = have;
            return RD_EOF;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_readable(c);
            if (w == RD_OK)
                continue;
            *got = have;
            if (w == RD_ERROR)
                *err = errno;
            return w;
        }
        *err = errno;
        *got = have;
        return RD_ERROR;
    }
    *got = have;
    return RD_OK;
}

static int read_exact(dsamig_rx_channel *c, void *buf, size_t len, size_t *got, int *err)
{
    struct iovec iov = {buf, len};
    return read_iov(c, &iov, 1, got, err);
}

static inline int bit(const uint8_t *bm, uint32_t i) { return (bm[i >> 3] >> (i & 7)) & 1; }

/* The checks of FrameDecoder._decode_packet and PacketTracker.check_packet
 * (but the claim); 0 when they pass.  A header that fails any of them goes to
 * the loop, whose Python checks name the problem. */
static int check_packet(const dsamig_rx_job *job, const uint8_t *hdr, const uint8_t *body,
                        uint32_t body_len, packet_t *pk)
{
    if (hdr[1] != 0 || le16(hdr + 2) != 0)
        return -1; /* flags (PAGE_LIST) or reserved */
    if (body_len < PACKET_FIXED + 1 || body_len > PACKET_FIXED + MAX_PACKET_PAGES / 8)
        return -1;
    pk->number = le64(body);
    pk->first_page = le64(body + 8);
    pk->page_count = le32(body + 16);
    pk->payload_length = le32(body + 20);
    pk->crc = le32(body + 24);
    if (le16(body + 28) != 0 || le16(body + 30) != 0)
        return -1; /* region, reserved */
    if (pk->page_count == 0 || pk->page_count > MAX_PACKET_PAGES)
        return -1;
    pk->bitmap_len = (uint16_t)((pk->page_count + 7) >> 3);
    if (body_len != PACKET_FIXED + pk->bitmap_len)
        return -1;
    if ((uint64_t)pk->payload_length > (uint64_t)pk->page_count * MAX_PAGE_SIZE)
        return -1;
    pk->bitmap = body + PACKET_FIXED;
    if ((pk->page_count & 7) && (pk->bitmap[pk->bitmap_len - 1] >> (pk->page_count & 7)))
        return -1; /* padding bits */
    /* Against the manifest. */
    if (pk->number >= job->packet_count)
        return -1;
    if (pk->first_page != pk->number * job->packet_pages)
        return -1;
    uint64_t page_count_img = (job->image_size + job->page_size - 1) / job->page_size;
    uint64_t pages = page_count_img - pk->first_page;
    if (pages > job->packet_pages)
        pages = job->packet_pages;
    if (pk->page_count != pages)
        return -1;
    pk->offset = pk->first_page * job->page_size;
    pk->span = job->image_size - pk->offset;
    if (pk->span > (uint64_t)pages * job->page_size)
        pk->span = (uint64_t)pages * job->page_size;
    /* The exact payload length, and the runs of normal pages. */
    uint64_t length = 0;
    pk->nruns = 0;
    uint32_t i = 0;
    while (i < pk->page_count) {
        if (bit(pk->bitmap, i)) {
            i++;
            continue;
        }
        uint32_t start = i;
        while (i < pk->page_count && !bit(pk->bitmap, i))
            i++;
        uint64_t off = (uint64_t)start * job->page_size;
        uint64_t end = (uint64_t)i * job->page_size;
        if (end > pk->span)
            end = pk->span;
        pk->run_off[pk->nruns] = pk->offset + off;
        pk->run_len[pk->nruns] = end - off;
        pk->nruns++;
        length += end - off;
    }
    if (length != pk->payload_length)
        return -1;
    return 0;
}

/* Claim the packet for this channel: 1 claimed, 0 done already (tolerant: a
 * repeat, only compared), -1 refused (being received elsewhere, or twice). */
static int claim(const dsamig_rx_job *job, uint64_t n)
{
    uint8_t expected = DSAMIG_FREE;
    if (__atomic_compare_exchange_n(&job->status[n], &expected, DSAMIG_CLAIMED, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 1;
    if ((expected == DSAMIG_DONE || expected == DSAMIG_ZERO) && job->tolerant)
        return 0;
    return -1;
}

/* Make the packet's pages in the mapping read as zeros again (holes): a
 * payload that landed there and failed its CRC, or was cut short, must
 * leave nothing a retransmission with zero pages could keep. */
static void clear_runs(const dsamig_rx_job *job, const packet_t *pk)
{
    for (size_t r = 0; r < pk->nruns; r++) {
        if (fallocate(job->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)pk->run_off[r], (off_t)pk->run_len[r]) != 0) {
            /* No hole punching: write zeros through the mapping instead. */
            memset(job->map + pk->run_off[r], 0, pk->run_len[r]);
        }
    }
}

struct crc_args {
    const dsamig_rx_job *job;
    const packet_t *pk;
    uint32_t crc;
};

static void crc_mapped(void *arg)
{
    struct crc_args *a = arg;
    uint32_t crc = 0;
    for (size_t r = 0; r < a->pk->nruns; r++)
        crc = dsamig_crc32c(crc, a->job->map + a->pk->run_off[r], a->pk->run_len[r]);
    a->crc = crc;
}

static int write_runs_locked(const dsamig_rx_job *job, const packet_t *pk, const uint8_t *payload)
{
    size_t pos = 0;
    for (size_t r = 0; r < pk->nruns; r++) {
        uint64_t done = 0;
        while (done < pk->run_len[r]) {
            ssize_t w = pwrite(job->fd, payload + pos + done, pk->run_len[r] - done,
                               (off_t)(pk->run_off[r] + done));
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return errno;
            }
            if (w == 0)
                return ENOSPC;
            done += (uint64_t)w;
        }
        pos += pk->run_len[r];
    }
    return 0;
}

static int write_runs(dsamig_rx_job *job, const packet_t *pk, const uint8_t *payload)
{
    pthread_mutex_lock(&job->write_lock);
    int err = write_runs_locked(job, pk, payload);
    pthread_mutex_unlock(&job->write_lock);
    return err;
}

/* One PACKET whose header passed: 0 to go on, else the thread ends (the
 * event saying why is posted). *claimed is set while the packet is ours. */
static int receive_packet(dsamig_rx_channel *c, packet_t *pk, int *claimed)
{
    dsamig_rx_job *job = c->job;
    int again = 0;
    int direct = 0;
    size_t got = 0;
    int err = 0;
    int rc;
    uint32_t crc = 0;

    int cl = claim(job, pk->number);
    if (cl < 0)
        return -1; /* the caller posts the header for the loop to judge */
    again = cl == 0;
    *claimed = cl == 1;
    direct = !again && job->mode == DSAMIG_RX_MMAP;
    if (pk->payload_length) {
        if (direct) {
            /* Blocks first, so that a full disk is ENOSPC here, never a
             * SIGBUS on a page of the mapping. */
            for (size_t r = 0; r < pk->nruns; r++) {
                if (fallocate(job->fd, 0, (off_t)pk->run_off[r], (off_t)pk->run_len[r]) != 0
                    && errno != EOPNOTSUPP) {
                    post_simple(c, DSAMIG_RXE_ERROR, errno, 1, pk->number, 0);
                    return 1;
                }
            }
            struct iovec iov[MAX_RUNS];
            for (size_t r = 0; r < pk->nruns; r++) {
                iov[r].iov_base = job->map + pk->run_off[r];
                iov[r].iov_len = pk->run_len[r];
            }
            rc = read_iov(c, iov, (int)pk->nruns, &got, &err);
        } else {
            rc = read_exact(c, c->buf, pk->payload_length, &got, &err);
        }
        if (rc != RD_OK) {
            if (direct && got)
                clear_runs(job, pk);
            if (rc == RD_EOF)
                post_simple(c, DSAMIG_RXE_EOF, 0, 1, 0, 0);
            else if (rc == RD_ERROR)
                post_simple(c, DSAMIG_RXE_ERROR, err, 0, 0, 0);
            return 1;
        }
        if (direct) {
            struct crc_args a = {job, pk, 0};
            int fault = dsamig_guarded(crc_mapped, &a);
            if (fault) {
                post_simple(c, DSAMIG_RXE_ERROR, fault, 1, pk->number, 0);
                return 1;
            }
            crc = a.crc;
        } else {
            crc = dsamig_crc32c(0, c->buf, pk->payload_length);
        }
    }
    if (crc != pk->crc) {
        if (direct)
            clear_runs(job, pk);
        dsamig_rx_event *e = calloc(1, sizeof(*e));
        if (e) {
            e->base.kind = DSAMIG_RXE_CORRUPT;
            e->packet = pk->number;
            e->crc = crc;
            e->header_crc = pk->crc;
            e->again = again;
            dsamig_evq_post(&c->q, &e->base);
        }
        return 1;
    }
    if (!again && !direct && pk->payload_length) {
        int werr = write_runs(job, pk, c->buf);
        if (werr) {
            post_simple(c, DSAMIG_RXE_ERROR, werr, 1, pk->number, 0);
            return 1;
        }
    }
    dsamig_rx_event *e = calloc(1, sizeof(*e));
    if (!e) {
        post_simple(c, DSAMIG_RXE_ERROR, ENOMEM, 0, 0, 0);
        return 1;
    }
    e->base.kind = DSAMIG_RXE_PACKET;
    e->packet = pk->number;
    e->payload_length = pk->payload_length;
    e->crc = crc;
    e->again = again;
    e->bitmap_len = pk->bitmap_len;
    memcpy(e->bitmap, pk->bitmap, pk->bitmap_len);
    *claimed = 0; /* the loop records it now */
    c->packets++;
    c->payload_bytes += pk->payload_length;
    dsamig_evq_post(&c->q, &e->base);
    return 0;
}

/* Post a PAGE_LIST frame with its payload for the loop; 0 when the thread
 * must end (the event saying why is posted). */
static int forward_page_list(dsamig_rx_channel *c, const uint8_t *hdr, const uint8_t *body,
                             uint32_t body_len)
{
    uint32_t payload = le32(body + 20);
    size_t got = 0;
    int err = 0;
    if ((uint64_t)payload > (uint64_t)c->job->packet_pages * c->job->page_size) {
        post_frame(c, hdr, body, body_len); /* the loop names the bad length */
        return 0;
    }
    dsamig_rx_event *e = calloc(1, sizeof(*e) + FRAME_HEADER + body_len + payload);
    if (!e) {
        post_simple(c, DSAMIG_RXE_ERROR, ENOMEM, 0, 0, 0);
        return 0;
    }
    e->base.kind = DSAMIG_RXE_FRAME;
    e->frame_len = (uint32_t)(FRAME_HEADER + body_len + payload);
    memcpy(e->frame, hdr, FRAME_HEADER);
    memcpy(e->frame + FRAME_HEADER, body, body_len);
    int rc = read_exact(c, e->frame + FRAME_HEADER + body_len, payload, &got, &err);
    if (rc != RD_OK) {
        free(e);
        if (rc == RD_EOF)
            post_simple(c, DSAMIG_RXE_EOF, 0, 1, 0, 0);
        else if (rc == RD_ERROR)
            post_simple(c, DSAMIG_RXE_ERROR, err, 0, 0, 0);
        return 0;
    }
    dsamig_evq_post(&c->q, &e->base);
    return 1;
}

static void *rx_main(void *arg)
{
    dsamig_rx_channel *c = arg;
    char name[16];
    uint64_t cpu_start = dsamig_thread_cpu_ns();
    uint8_t hdr[FRAME_HEADER];
    uint8_t body[MAX_BODY];
    packet_t *pk = malloc(sizeof(packet_t));
    uint64_t unfinished = UINT64_MAX;

    snprintf(name, sizeof(name), "dsamig-recv-%d", c->index);
    dsamig_set_thread_name(name);
    while (pk && !c->stop) {
        size_t got = 0;
        int err = 0;
        int rc = read_exact(c, hdr, FRAME_HEADER, &got, &err);
        if (rc == RD_EOF) {
            post_simple(c, DSAMIG_RXE_EOF, 0, got != 0, 0, 0);
            break;
        }
        if (rc == RD_ERROR)
            post_simple(c, DSAMIG_RXE_ERROR, err, 0, 0, 0);
        if (rc != RD_OK)
            break;
        uint32_t body_len = le32(hdr + 4);
        if (body_len > MAX_BODY) {
            post_frame(c, hdr, NULL, 0); /* the decoder says: body too large */
            break;
        }
        rc = read_exact(c, body, body_len, &got, &err);
        if (rc == RD_EOF) {
            post_simple(c, DSAMIG_RXE_EOF, 0, 1, 0, 0);
            break;
        }
        if (rc == RD_ERROR)
            post_simple(c, DSAMIG_RXE_ERROR, err, 0, 0, 0);
        if (rc != RD_OK)
            break;
        if (hdr[0] == T_PACKET && hdr[1] == PAGE_LIST && c->job->live && !c->raw_only) {
            /* A live round's PAGE_LIST: the loop applies it, payload and all. */
            if (body_len < PACKET_FIXED) {
                post_frame(c, hdr, body, body_len); /* the decoder names the problem */
                break;
            }
            if (!forward_page_list(c, hdr, body, body_len))
                break;
            continue;
        }
        if (hdr[0] != T_PACKET || c->raw_only) {
            post_frame(c, hdr, body, body_len);
            if (hdr[0] == T_PACKET)
                break; /* after END: the loop refuses it, and its payload follows */
            if (hdr[0] == T_END)
                c->raw_only = 1; /* only COMMIT_REQUEST or ERROR may follow */
            continue;
        }
        if (check_packet(c->job, hdr, body, body_len, pk) != 0) {
            post_frame(c, hdr, body, body_len);
            break; /* its payload follows: nothing more can be read */
        }
        int claimed = 0;
        rc = receive_packet(c, pk, &claimed);
        if (rc < 0) {
            post_frame(c, hdr, body, body_len);
            break;
        }
        if (rc > 0) {
            if (claimed)
                unfinished = pk->number;
            break;
        }
    }
    if (!pk)
        post_simple(c, DSAMIG_RXE_ERROR, ENOMEM, 0, 0, 0);
    free(pk);
    c->cpu_ns = dsamig_thread_cpu_ns() - cpu_start;
    /* Last: a packet claimed and never finished, for the loop to release. */
    post_simple(c, DSAMIG_RXE_STOPPED, 0, 0, unfinished, unfinished != UINT64_MAX);
    return NULL;
}

int dsamig_rx_job_init(dsamig_rx_job *job)
{
    return -pthread_mutex_init(&job->write_lock, NULL);
}

void dsamig_rx_job_destroy(dsamig_rx_job *job)
{
    pthread_mutex_destroy(&job->write_lock);
}

int dsamig_rx_start(dsamig_rx_channel *c)
{
    int rc = pthread_create(&c->thread, NULL, rx_main, c);
    if (rc != 0)
        return -rc;
    pthread_detach(c->thread);
    c->started = 1;
    return 0;
}

void dsamig_rx_stop(dsamig_rx_channel *c)
{
    uint64_t one = 1;
    c->stop = 1;
    ssize_t r = write(c->ctl, &one, sizeof(one));
    (void)r;
}
