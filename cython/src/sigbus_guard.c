/* SIGBUS on mapped pages as an error return: see sigbus_guard.h.
 *
 * The guard is a per-thread pointer to a sigjmp_buf.  The handler jumps back
 * only for a kernel-generated SIGBUS (si_code > 0) on a thread that is inside
 * dsamig_guarded(); anything else is passed to the previous handler.
 *
 * The handler is installed with SA_NODEFER and an empty sa_mask, so the signal
 * mask is the same inside the handler as outside it, and sigsetjmp() need not
 * save it: entering a guarded call costs no system call.
 */
#include "sigbus_guard.h"
#include "crc32c.h"
#include "zeroscan.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

static struct sigaction previous;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static atomic_uint_fast64_t caught;
/* Set before fn runs, so the thread's TLS block already exists when the
 * handler reads it (no allocation inside the handler). */
static __thread sigjmp_buf *guard;

static void on_sigbus(int sig, siginfo_t *info, void *ucontext)
{
    sigjmp_buf *env = guard;

    if (env != NULL && info != NULL && info->si_code > 0) {
        int err = EFAULT;
#ifdef BUS_MCEERR_AR
        if (info->si_code == BUS_MCEERR_AR || info->si_code == BUS_MCEERR_AO)
            err = EIO;
#endif
        atomic_fetch_add(&caught, 1);
        siglongjmp(*env, err);
    }
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, ucontext);
        return;
    }
    if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* Default action: restore it and let the fault happen again (a faulting
     * access re-executes on return); a sent signal is sent again. */
    {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGBUS, &dfl, NULL);
    }
    if (info == NULL || info->si_code <= 0)
        raise(SIGBUS);
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &previous);
}

int dsamig_guarded(void (*fn)(void *), void *arg)
{
    sigjmp_buf env;
    sigjmp_buf *outer;
    int err;

    pthread_once(&install_once, install);
    outer = guard;
    err = sigsetjmp(env, 0);
    if (err == 0) {
        guard = &env;
        fn(arg);
    }
    guard = outer;
    return err;
}

uint64_t dsamig_sigbus_caught(void)
{
    return atomic_load(&caught);
}

struct zero_bitmap_args {
    const uint8_t *buf;
    size_t len, page_size, group_pages;
    uint8_t *bitmap;
    size_t zero_pages;
};

static void zero_bitmap_call(void *p)
{
    struct zero_bitmap_args *a = p;
    a->zero_pages = dsamig_zero_bitmap(a->buf, a->len, a->page_size, a->group_pages, a->bitmap);
}

int dsamig_zero_bitmap_guarded(const uint8_t *buf, size_t len, size_t page_size,
                               size_t group_pages, uint8_t *bitmap, size_t *zero_pages)
{
    struct zero_bitmap_args a = {buf, len, page_size, group_pages, bitmap, 0};
    int err = dsamig_guarded(zero_bitmap_call, &a);
    *zero_pages = err ? 0 : a.zero_pages;
    return err;
}

struct crc_args {
    uint32_t crc;
    const void *buf;
    size_t len;
};

static void crc_call(void *p)
{
    struct crc_args *a = p;
    a->crc = dsamig_crc32c(a->crc, a->buf, a->len);
}

int dsamig_crc32c_guarded(uint32_t crc, const void *buf, size_t len, uint32_t *out)
{
    struct crc_args a = {crc, buf, len};
    int err = dsamig_guarded(crc_call, &a);
    *out = a.crc;
    return err;
}
