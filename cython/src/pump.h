/* Native data pumps: one thread per channel moves the bytes of PACKET frames
 * with the GIL released; the event loop keeps every decision.
 *
 * Receiving: a channel thread reads frames from its socket.  A PACKET whose
 * header passes the same checks as the Python decoder and tracker is claimed
 * in the job's status array (an atomic compare-and-swap, so two channels can
 * never both take a packet), its payload lands in the destination (through a
 * buffer and pwritev, or straight into a shared mapping of the partial file),
 * its CRC32C is verified, and one completion goes to the loop.  Every other
 * frame, and any PACKET header the checks refuse, goes to the loop as raw
 * bytes: the Python decoder and the job core then say what is wrong, in their
 * own words, so that the rules and messages live in one place.
 *
 * Sending: the loop hands a channel thread work items (one scanned chunk laid
 * out by the send core: frames to write as they are, packets to checksum and
 * send as header + mapped slices in one sendmsg, packets to checksum only).
 * The thread posts each item back with the CRC of every packet it handled.
 *
 * Completions reach the loop through one eventfd per pump, written only when
 * its queue goes from empty to non-empty, as the engines do (completion.h).
 * Native threads never touch a Python object.
 */
#ifndef DSAMIG_PUMP_H
#define DSAMIG_PUMP_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* ---- a queue of events for the loop, with a coalescing eventfd ---------------------- */

typedef struct dsamig_event {
    struct dsamig_event *next;
    int kind;
} dsamig_event;

typedef struct dsamig_evq {
    pthread_mutex_t lock;
    dsamig_event *head;
    dsamig_event *tail;
    int efd;
    uint64_t posted;
    uint64_t wakeups;
} dsamig_evq;

int dsamig_evq_init(dsamig_evq *q);
void dsamig_evq_destroy(dsamig_evq *q);
void dsamig_evq_post(dsamig_evq *q, dsamig_event *e);
dsamig_event *dsamig_evq_drain(dsamig_evq *q);

/* ---- receiving -------------------------------------------------------------------- */

/* Where a packet's payload lands. */
enum { DSAMIG_RX_PWRITE = 0, DSAMIG_RX_MMAP = 1 };

/* Per-packet status bytes, shared with dsamig/proto/tracker.py. */
enum { DSAMIG_FREE = 0, DSAMIG_CLAIMED = 1, DSAMIG_DONE = 2, DSAMIG_ZERO = 3 };

/* What every channel of one job shares; owned by the Python side, which keeps
 * the status array and the mapping alive until every thread has stopped. */
typedef struct dsamig_rx_job {
    uint64_t image_size;
    uint64_t packet_count;
    uint32_t page_size;
    uint32_t packet_pages;
    uint8_t *status;          /* one byte per packet (the tracker's bytearray) */
    int tolerant;             /* packets may arrive again (acknowledgements) */
    int live;                 /* PAGE_LIST packets (live rounds) go to the loop with their payload */
    int fd;                   /* the partial file */
    int mode;                 /* DSAMIG_RX_PWRITE or DSAMIG_RX_MMAP */
    uint8_t *map;             /* DSAMIG_RX_MMAP: the partial file, MAP_SHARED */
    /* One packet's pwrites at a time.  The file system serialises writes to
     * one file anyway (the inode lock), but a thread waiting for the inode
     * lock spins on a CPU while its holder copies; waiting here sleeps, and
     * leaves that CPU to the threads still receiving. */
    pthread_mutex_t write_lock;
} dsamig_rx_job;

enum {
    DSAMIG_RXE_PACKET = 1,    /* a packet stored (or compared: again) and verified */
    DSAMIG_RXE_FRAME = 2,     /* a frame for the loop to decode, as received */
    DSAMIG_RXE_CORRUPT = 3,   /* a payload failed its CRC32C; nothing of it counts */
    DSAMIG_RXE_EOF = 4,       /* the peer closed the connection */
    DSAMIG_RXE_ERROR = 5,     /* a socket or file error: err is the errno value */
    DSAMIG_RXE_STOPPED = 6,   /* the thread ended: always the last event */
};

typedef struct dsamig_rx_event {
    dsamig_event base;
    uint64_t packet;
    uint32_t payload_length;
    uint32_t crc;             /* RXE_PACKET: verified; RXE_CORRUPT: what arrived */
    uint32_t header_crc;      /* RXE_CORRUPT: what the header announced */
    int again;
    int err;                  /* RXE_ERROR: errno; what was being done is in `what` */
    int what;                 /* 0 receiving, 1 writing the file */
    uint16_t bitmap_len;
    uint8_t bitmap[512];
    uint32_t frame_len;       /* RXE_FRAME: header and body */
    uint8_t frame[];
} dsamig_rx_event;

typedef struct dsamig_rx_channel {
    dsamig_rx_job *job;
    int sock;                 /* our own descriptor of the connection (non-blocking) */
    int ctl;                  /* eventfd: the loop asks the thread to stop */
    int index;
    volatile int stop;
    int started;
    pthread_t thread;
    dsamig_evq q;
    uint8_t *buf;             /* one packet: payload (pwrite) or a repeat's bytes */
    size_t buf_len;
    uint8_t *prefix;          /* bytes the loop had read already, consumed first */
    size_t prefix_len;
    size_t prefix_off;
    /* After END (or a frame the loop must judge) every frame goes to the loop. */
    int raw_only;
    /* counters (written by the thread, read by the loop) */
    uint64_t bytes;
    uint64_t packets;
    uint64_t payload_bytes;
    uint64_t cpu_ns;
} dsamig_rx_channel;

/* Set up and tear down a job's lock; the other fields are plain data. */
int dsamig_rx_job_init(dsamig_rx_job *job);
void dsamig_rx_job_destroy(dsamig_rx_job *job);

/* Start the channel's thread (named dsamig-recv-<index>); 0 or -errno. */
int dsamig_rx_start(dsamig_rx_channel *c);
/* Ask the thread to stop after the frame it is in; it posts RXE_STOPPED. */
void dsamig_rx_stop(dsamig_rx_channel *c);

/* ---- sending ---------------------------------------------------------------------- */

enum {
    DSAMIG_TX_FRAME = 1,      /* write these bytes as they are (ZERO_RANGE, END) */
    DSAMIG_TX_PACKET = 2,     /* checksum, then header + normal pages in one sendmsg */
    DSAMIG_TX_VERIFY = 3,     /* checksum only: the receiver holds this packet */
};

typedef struct dsamig_tx_op {
    int kind;
    /* FRAME */
    const uint8_t *frame;
    uint32_t frame_len;
    /* PACKET, VERIFY */
    uint64_t packet;
    uint64_t first_page;
    uint32_t page_count;
    const uint8_t *data;      /* the packet's bytes in the mapped image */
    uint64_t span;            /* its length (the image's last page may be short) */
    uint16_t bitmap_len;
    uint8_t bitmap[512];
    uint32_t payload_length;  /* out */
    uint32_t crc;             /* out */
} dsamig_tx_op;

typedef struct dsamig_tx_item {
    dsamig_event base;        /* kind: 0 work, DSAMIG_TXE_* when posted back */
    struct dsamig_tx_item *next_work;
    uint64_t token;
    uint32_t nops;
    int status;               /* 0, or errno (EFAULT: the image shrank) */
    uint32_t page_size;
    dsamig_tx_op *ops;
} dsamig_tx_item;

enum { DSAMIG_TXE_DONE = 1, DSAMIG_TXE_STOPPED = 2 };

typedef struct dsamig_tx_channel {
    int sock;
    int ctl;
    int index;
    volatile int stop;
    int started;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    dsamig_tx_item *work_head;
    dsamig_tx_item *work_tail;
    dsamig_evq q;
    dsamig_tx_item stopped;   /* posted as the last event */
    /* Stopped in the middle of a frame (the peer stopped reading): the
     * connection carries a partial frame and can only be closed. */
    int abandoned;
    uint64_t bytes;
    uint64_t packets;
    uint64_t cpu_ns;
} dsamig_tx_channel;

int dsamig_tx_start(dsamig_tx_channel *c);
/* Queue a work item; the thread posts it back (DSAMIG_TXE_DONE) when done. */
void dsamig_tx_submit(dsamig_tx_channel *c, dsamig_tx_item *item);
/* Ask the thread to stop: after the frame it is writing if the socket takes
 * it, else at once (``abandoned``); items not started come back with status
 * ECANCELED, then TXE_STOPPED. */
void dsamig_tx_stop(dsamig_tx_channel *c);

#endif
