/* The portal: how a descriptor reaches a WQ (see dsa_internal.h).
 *
 * The only part of the engine that differs between hardware and emulation:
 * ENQCMD, MOVDIR64B and write() on a real WQ, the software device's models
 * of the same on an emulated one.
 */
#include "dsa_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- CPU features and instructions ----------------------------------------- */

unsigned dsamig_dsa_cpu_features(void)
{
    unsigned f = 0;
#if DSAMIG_X86
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        if (c & (1u << 5))
            f |= DSAMIG_CPU_WAITPKG;
        if (c & (1u << 28))
            f |= DSAMIG_CPU_MOVDIR64B;
        if (c & (1u << 29))
            f |= DSAMIG_CPU_ENQCMD;
    }
#endif
    return f;
}

#if DSAMIG_X86
/* ENQCMD and MOVDIR64B are compiled for their own target so the extension
 * builds with any x86-64 compiler flags; they only run after CPUID said so.
 * The SFENCE makes the descriptor list and the cleared records visible to
 * the device before the enqueue store, which is not ordered with them. */
__attribute__((target("enqcmd"))) static int hw_enqcmd(dsa_wq *w, const dsamig_dsa_desc *d)
{
    _mm_sfence();
    return _enqcmd(w->portal, d) ? 1 : 0; /* ZF=1: not accepted */
}

__attribute__((target("movdir64b"))) static void hw_movdir64b(dsa_wq *w, const dsamig_dsa_desc *d)
{
    _mm_sfence();
    _movdir64b(w->portal, d);
}

__attribute__((target("waitpkg"))) void dsa_umwait(volatile uint8_t *status, uint64_t max_ticks)
{
    _umonitor((void *)status);
    if (*status == 0)
        _umwait(1, __rdtsc() + max_ticks);
}
#else
static int hw_enqcmd(dsa_wq *w, const dsamig_dsa_desc *d)
{
    (void)w;
    (void)d;
    return -EOPNOTSUPP;
}

static void hw_movdir64b(dsa_wq *w, const dsamig_dsa_desc *d)
{
    (void)w;
    (void)d;
}
#endif

static long hw_write(dsa_wq *w, const dsamig_dsa_desc *d, size_t n)
{
    ssize_t r = write(w->fd, d, n * sizeof(*d));
    if (r < 0)
        return -errno;
    return (long)((size_t)r / sizeof(*d));
}

static void hw_close(dsa_wq *w)
{
    /* Closing the file drains this process's descriptors from the WQ, so
     * quarantined memory is safe to free afterwards. */
    if (w->portal)
        munmap(w->portal, PORTAL_SIZE);
    if (w->fd >= 0)
        close(w->fd);
    w->portal = NULL;
    w->fd = -1;
}

const portal_ops dsa_hw_ops = {hw_enqcmd, hw_movdir64b, hw_write, hw_close};

static int emu_enqcmd(dsa_wq *w, const dsamig_dsa_desc *d)
{
    return dsamig_swq_enqcmd(&w->swq, d);
}

static void emu_movdir64b(dsa_wq *w, const dsamig_dsa_desc *d)
{
    dsamig_swq_movdir64b(&w->swq, d);
}

static long emu_write(dsa_wq *w, const dsamig_dsa_desc *d, size_t n)
{
    return dsamig_swq_write(&w->swq, d, n);
}

static void emu_close(dsa_wq *w)
{
    dsamig_swq_stop(&w->swq); /* joins its engines: nothing writes any more */
}

const portal_ops dsa_emu_ops = {emu_enqcmd, emu_movdir64b, emu_write, emu_close};

/* ---- opening a real WQ -------------------------------------------------------- */

int dsa_open_real_wq(dsamig_dsa_engine *e, dsa_wq *w, const dsamig_dsa_wq_config *c, char *err,
                     size_t errlen)
{
    struct stat st;
    int want_portal;
    w->fd = open(c->path, O_RDWR | O_CLOEXEC);
    if (w->fd < 0) {
        int rc = errno;
        snprintf(err, errlen, "cannot open DSA work queue %s: %s%s", c->path, strerror(rc),
                 rc == EBUSY ? " (a dedicated WQ is open in another process)" : "");
        return -rc;
    }
    if (fstat(w->fd, &st) != 0 || !S_ISCHR(st.st_mode)) {
        snprintf(err, errlen, "%s is not a DSA work queue (not a character device)", c->path);
        close(w->fd);
        w->fd = -1;
        return -ENODEV;
    }
    w->ops = &dsa_hw_ops;
    want_portal = !c->use_write &&
                  (c->dedicated ? (e->cpu & DSAMIG_CPU_MOVDIR64B) : (e->cpu & DSAMIG_CPU_ENQCMD));
    if (c->use_write)
        snprintf(w->portal_note, sizeof(w->portal_note), "write() requested");
    else if (!want_portal)
        snprintf(w->portal_note, sizeof(w->portal_note), "the CPU lacks %s",
                 c->dedicated ? "MOVDIR64B" : "ENQCMD");
    if (want_portal) {
        void *p = mmap(NULL, PORTAL_SIZE, PROT_WRITE, MAP_SHARED | MAP_POPULATE, w->fd, 0);
        if (p != MAP_FAILED) {
            w->portal = p;
        } else if (errno == EPERM) {
            snprintf(w->portal_note, sizeof(w->portal_note),
                     "mapping the portal needs CAP_SYS_RAWIO");
        } else {
            snprintf(w->portal_note, sizeof(w->portal_note), "cannot map the portal: %s",
                     strerror(errno));
        }
    }
    if (w->portal)
        w->method = c->dedicated ? DSAMIG_DSA_MOVDIR64B : DSAMIG_DSA_ENQCMD;
    else
        w->method = DSAMIG_DSA_WRITE;
    return 0;
}
