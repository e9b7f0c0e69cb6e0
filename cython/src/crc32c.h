/* CRC32C (Castagnoli), as carried by every dsamig packet. */
#ifndef DSAMIG_CRC32C_H
#define DSAMIG_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC32C over buf[0..len): crc32c(crc32c(0, a), b) == crc32c(0, a||b). */
uint32_t dsamig_crc32c(uint32_t crc, const void *buf, size_t len);

/* Force the portable table implementation (tests compare both paths). */
void dsamig_crc32c_force_portable(int on);

/* "sse4.2-3way" or "table". */
const char *dsamig_crc32c_impl(void);

#endif
