/* The software DSA device: an in-process emulated work queue.
 *
 * It consumes the same 64-byte descriptors as a real DSA work queue, through
 * an emulated portal with the same submission semantics (ENQCMD on a shared
 * WQ reports "retry" when the WQ is at its threshold; MOVDIR64B on a
 * dedicated WQ is posted and silently dropped when the WQ is full; write()
 * behaves like the kernel's idxd write() method), validates them in the
 * hardware's order with the hardware's status codes, executes them on its own
 * engine threads (dsamig-swdsa-N) and writes completion records with the
 * status byte last.  Addresses in descriptors are this process's virtual
 * addresses, as with SVA on real hardware.
 *
 * Faults are injected deterministically: every decision is a hash of the
 * seed, the WQ id and the descriptor's submission number, so a run can be
 * replayed whatever the thread timing.
 */
#ifndef DSAMIG_DSA_SWDEV_H
#define DSAMIG_DSA_SWDEV_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "dsa_hw.h"

#define DSAMIG_SWQ_MAX_ENGINES 8

typedef struct dsamig_swq_faults {
    double page_fault;  /* per COMPVAL/COMPARE: PAGE_FAULT_NOBOF part way through */
    double batch_fail;  /* per batch: one member fails (PAGE_FAULT_IR), batch BATCH_FAIL */
    double list_fault;  /* per batch: reading member i faults, BATCH_PAGE_FAULT */
    double hw_error;    /* per executed descriptor: HW_ERR1 */
    double hang;        /* per submitted descriptor: never completes */
    double wq_full;     /* per submit attempt: refused (ENQCMD) or dropped (MOVDIR64B) */
    uint64_t seed;
} dsamig_swq_faults;

typedef struct dsamig_swq_config {
    int id;                     /* index among the emulated WQs (names, fault hash) */
    int dedicated;              /* 0: shared WQ (ENQCMD), 1: dedicated WQ (MOVDIR64B) */
    uint32_t size;              /* WQ entries */
    uint32_t threshold;         /* shared WQ: entries usable through the limited portal */
    uint32_t max_batch_size;
    uint32_t max_transfer_size;
    uint32_t op_config;         /* bit N set: opcode N enabled (opcodes below 32) */
    int engines;                /* engine threads, 1..DSAMIG_SWQ_MAX_ENGINES */
    uint64_t rate_bytes_s;      /* throughput cap of the whole WQ, 0: unlimited */
    int check_residency;        /* pages not mapped here fault, like an SVA device without BOF */
    int reorder;                /* engines pick any of the first 4 queued descriptors */
    int model;                  /* 1: DSA 1.0 (Sapphire Rapids), 2: DSA 2.0 */
    /* The kernel around the WQ: */
    int map_eperm;              /* mapping the portal fails with EPERM (no CAP_SYS_RAWIO) */
    int write_method;           /* 0: no write() method (EINVAL), as before the 2024 fix */
    int foreign_mm;             /* write() from another address space than the opener's: EPERM */
    dsamig_swq_faults faults;
} dsamig_swq_config;

/* Device-side counters, read with dsamig_swq_counters(). */
typedef struct dsamig_swq_counters {
    uint64_t accepted;        /* descriptors accepted by the portal */
    uint64_t refused;         /* ENQCMD answered retry (full or injected) */
    uint64_t dropped;         /* MOVDIR64B to a full WQ (or injected): lost silently */
    uint64_t rejected;        /* refused at submission: bad CR alignment, PASID bits */
    uint64_t executed;        /* descriptors executed, batch members included */
    uint64_t batches;         /* batch descriptors executed */
    uint64_t bytes;           /* source bytes processed */
    uint64_t invalid;         /* descriptors completed with a validation error */
    uint64_t faults_injected; /* PAGE_FAULT_NOBOF from injection */
    uint64_t faults_absent;   /* PAGE_FAULT_NOBOF on pages not in memory */
    uint64_t batch_fails_injected;
    uint64_t list_faults_injected;
    uint64_t hw_errors_injected;
    uint64_t hangs_injected;
    uint64_t wq_full_injected;
    uint64_t cr_lost;         /* a CR that could not be written (misaligned in a batch) */
    uint64_t discarded;       /* queued at stop, never executed */
    uint64_t engine_cpu_ns;   /* CPU time of the engine threads that have exited */
} dsamig_swq_counters;

typedef struct dsamig_swq_entry {
    dsamig_dsa_desc desc; /* the 64 bytes as the portal received them */
    uint64_t seq;         /* submission number, keys the fault decisions */
} dsamig_swq_entry;

typedef struct dsamig_swq {
    dsamig_swq_config cfg;
    pthread_mutex_t lock;
    pthread_cond_t cond;          /* engines wait here for descriptors */
    pthread_cond_t throttle_cond; /* engines held back by the rate cap wait here */
    dsamig_swq_entry *ring; /* cfg.size entries */
    uint32_t head, count;   /* count = occupancy */
    uint64_t seq;
    uint64_t attempts;
    uint64_t busy_until_ns; /* rate model: when the WQ's bandwidth is next free */
    int started;
    int stopping;
    int pagemap_fd;         /* /proc/self/pagemap, for residency */
    int nthreads;
    pthread_t threads[DSAMIG_SWQ_MAX_ENGINES];
    dsamig_swq_counters c;
} dsamig_swq;

/* A usable default configuration (shared, size 32, batches of 128, 2 MiB). */
void dsamig_swq_config_default(dsamig_swq_config *cfg);

/* 0 or -errno (-EINVAL for an impossible configuration).  Zero q first. */
int dsamig_swq_start(dsamig_swq *q, const dsamig_swq_config *cfg);

/* Stop the engines; queued descriptors are discarded, never completed.
 * Idempotent; the queue can be started again afterwards. */
void dsamig_swq_stop(dsamig_swq *q);

/* ENQCMD through the emulated portal: 0 accepted, 1 not accepted (ZF=1:
 * retry), -EINVAL where the CPU would fault (#GP: PASID bits set) or the
 * device could never report (CR not 32-byte aligned), -EOPNOTSUPP on a
 * dedicated WQ, -ESHUTDOWN when stopped. */
int dsamig_swq_enqcmd(dsamig_swq *q, const void *desc);

/* MOVDIR64B: a posted write with no status, as on hardware.  Overflow and
 * unreportable descriptors are dropped and only counted. */
void dsamig_swq_movdir64b(dsamig_swq *q, const void *desc);

/* The kernel's mmap() of the portal: 0, or -EPERM where the modelled kernel
 * refuses it (map_eperm). */
int dsamig_swq_map_portal(dsamig_swq *q);

/* The kernel's write() method on the WQ's file: descriptors accepted, or
 * -errno when none was: -EINVAL for a BATCH descriptor or a misaligned CR
 * (or for everything on a kernel without the method), -EPERM from a foreign
 * address space, -EAGAIN when a shared WQ stayed full through the kernel's
 * retries. */
long dsamig_swq_write(dsamig_swq *q, const void *descs, size_t n);

/* Occupancy now (descriptors queued and not yet taken by an engine). */
uint32_t dsamig_swq_occupancy(dsamig_swq *q);

void dsamig_swq_get_counters(dsamig_swq *q, dsamig_swq_counters *out);

/* Check the "status byte last" rule from the outside: submit n COMPVAL
 * descriptors whose CR is poisoned, spin on each status byte from this
 * thread and count records whose other fields were not final when the status
 * became visible.  Returns that count (0 is right), or -errno. */
long dsamig_swq_probe_cr_order(dsamig_swq *q, long n);

#endif
