/* Turning SIGBUS from a vanished file page into an error return.
 *
 * The sender maps the image MAP_SHARED.  If the file is truncated while it is
 * being sent, touching a page past the new end raises SIGBUS, which would kill
 * the process.  Code that touches mapped pages runs inside dsamig_guarded():
 * a SIGBUS raised by the kernel on that thread, inside that call, abandons the
 * call and makes it return an errno value instead.  A SIGBUS anywhere else goes
 * to the handler that was installed before ours (the default one kills the
 * process as usual, faulthandler prints a traceback).
 */
#ifndef DSAMIG_SIGBUS_GUARD_H
#define DSAMIG_SIGBUS_GUARD_H

#include <stddef.h>
#include <stdint.h>

/* Run fn(arg) on the calling thread.  Returns 0, EFAULT if fn touched a mapped
 * page that has no backing any more (a truncated file), or EIO for a hardware
 * memory error on a mapped page.  fn is abandoned where it faulted, so it must
 * not take locks, allocate or leave shared state half-updated while it may
 * touch mapped memory.  Calls nest.  Installs the handler on first use. */
int dsamig_guarded(void (*fn)(void *), void *arg);

/* SIGBUS faults turned into errors so far, in this process. */
uint64_t dsamig_sigbus_caught(void);

/* dsamig_zero_bitmap() and dsamig_crc32c() under the guard: 0 or an errno
 * value as for dsamig_guarded(); the results are only valid on 0. */
int dsamig_zero_bitmap_guarded(const uint8_t *buf, size_t len, size_t page_size,
                               size_t group_pages, uint8_t *bitmap, size_t *zero_pages);
int dsamig_crc32c_guarded(uint32_t crc, const void *buf, size_t len, uint32_t *out);

#endif
