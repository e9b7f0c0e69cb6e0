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
#include <stdlib.h>
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

int dsamig_dsa_kernel_cpu_flags(const char *path)
{
    static const struct {
        const char *name;
        unsigned bit;
    } known[] = {{"waitpkg", DSAMIG_CPU_WAITPKG},
                 {"movdir64b", DSAMIG_CPU_MOVDIR64B},
                 {"enqcmd", DSAMIG_CPU_ENQCMD}};
    char line[8192];
    int flags = 0;
    FILE *f = fopen(path && *path ? path : "/proc/cpuinfo", "re");
    if (!f)
        return -errno;
    /* The first processor's flags line; the kernel keeps them the same on
     * every CPU. */
    while (fgets(line, sizeof(line), f)) {
        char *save = NULL, *tok, *colon;
        if (strncmp(line, "flags", 5) != 0 || !(colon = strchr(line, ':')))
            continue;
        for (tok = strtok_r(colon + 1, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save))
            for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++)
                if (strcmp(tok, known[k].name) == 0)
                    flags |= (int)known[k].bit;
        break;
    }
    fclose(f);
    return flags;
}

#if DSAMIG_X86
/* ENQCMD and MOVDIR64B are compiled for their own target so the extension
 * builds with any x86-64 compiler flags; they only run after CPUID and the
 * kernel's flags both said so.
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

int dsa_submit_one(dsa_wq *w, const dsamig_dsa_desc *d)
{
    long r;
    switch (w->method) {
    case DSAMIG_DSA_ENQCMD:
        return w->ops->enqcmd(w, d);
    case DSAMIG_DSA_MOVDIR64B:
        w->ops->movdir64b(w, d);
        return 0;
    default:
        r = w->ops->write(w, d, 1);
        if (r == 1)
            return 0;
        if (r == -EAGAIN)
            return 1; /* the kernel's own ENQCMDS retries found the WQ full */
        return r < 0 ? (int)r : -EIO;
    }
}

/* ---- opening a WQ and choosing its method ------------------------------------- */

static void note_refused_map(dsa_wq *w, int err)
{
    if (err == EPERM)
        snprintf(w->portal_note, sizeof(w->portal_note),
                 "the kernel refused to map the portal (EPERM: since the INTEL-SA-01084 fix "
                 "that needs CAP_SYS_RAWIO)");
    else
        snprintf(w->portal_note, sizeof(w->portal_note), "the kernel cannot map the portal: %s",
                 strerror(err));
}

void dsa_choose_emulated_method(dsa_wq *w, const dsamig_dsa_wq_config *c)
{
    int rc;
    if (c->use_write) {
        snprintf(w->portal_note, sizeof(w->portal_note), "write() requested");
        w->method = DSAMIG_DSA_WRITE;
    } else if ((rc = dsamig_swq_map_portal(&w->swq)) != 0) {
        note_refused_map(w, -rc);
        w->method = DSAMIG_DSA_WRITE;
    } else {
        w->method = c->dedicated ? DSAMIG_DSA_MOVDIR64B : DSAMIG_DSA_ENQCMD;
    }
}

/* Which of the CPU's instructions this WQ needs, and why the engine may not
 * use it ("" when it may). */
static void instruction_note(dsamig_dsa_engine *e, int dedicated, char *out, size_t outlen)
{
    unsigned bit = dedicated ? DSAMIG_CPU_MOVDIR64B : DSAMIG_CPU_ENQCMD;
    const char *name = dedicated ? "MOVDIR64B" : "ENQCMD";
    out[0] = 0;
    if (e->cpu & bit)
        return;
    if (!(e->cpu_cpuid & bit))
        snprintf(out, outlen, "the CPU lacks %s", name);
    else if (e->cpu_kernel < 0)
        snprintf(out, outlen, "CPUID reports %s but the kernel's CPU flags cannot be read (%s)",
                 name, strerror(-e->cpu_kernel));
    else
        snprintf(out, outlen,
                 "CPUID reports %s but the kernel cleared it (/proc/cpuinfo): a user %s would "
                 "fault",
                 name, name);
}

int dsa_open_real_wq(dsamig_dsa_engine *e, dsa_wq *w, const dsamig_dsa_wq_config *c, char *err,
                     size_t errlen)
{
    struct stat st;
    char insn[160];
    void *p;
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
    w->method = DSAMIG_DSA_WRITE;
    if (c->use_write) {
        snprintf(w->portal_note, sizeof(w->portal_note), "write() requested");
        return 0;
    }
    /* Map first, whatever the capabilities: only the kernel knows whether it
     * lets this process map the portal (any process may before the 2024
     * erratum fix; with it, only one with CAP_SYS_RAWIO).  Only a refusal
     * sends the WQ to write(); the probe then proves the choice. */
    p = mmap(NULL, PORTAL_SIZE, PROT_WRITE, MAP_SHARED | MAP_POPULATE, w->fd, 0);
    if (p == MAP_FAILED) {
        note_refused_map(w, errno);
        return 0;
    }
    instruction_note(e, c->dedicated, insn, sizeof(insn));
    if (insn[0]) {
        munmap(p, PORTAL_SIZE);
        snprintf(w->portal_note, sizeof(w->portal_note), "%s", insn);
        return 0;
    }
    w->portal = p;
    w->method = c->dedicated ? DSAMIG_DSA_MOVDIR64B : DSAMIG_DSA_ENQCMD;
    return 0;
}
