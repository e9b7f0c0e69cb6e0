/* CRC32C (Castagnoli), as carried by every dsamig packet. */
#ifndef DSAMIG_CRC32C_H
#define DSAMIG_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC32C over buf[0..len): crc32c(crc32c(0, a), b) == crc32c(0, a||b). */
uint32_t dsamig_crc32c(uint32_t crc, const void *buf, size_t len);

/* CRC32C of A||B from crc32c(A), crc32c(B) and the length of B: the CRC is
 * linear over GF(2), so appending B multiplies A's CRC by x^(8*len(B)).
 * dsamig_crc32c_op(len) precomputes that factor for a length used often. */
uint32_t dsamig_crc32c_op(uint64_t len);
uint32_t dsamig_crc32c_extend(uint32_t op, uint32_t crc_a, uint32_t crc_b);
uint32_t dsamig_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

/* Use the implementation called name, one this CPU has ("table" always),
 * instead of the fastest (tests compare every path); NULL undoes it.
 * -1 when this CPU does not have it. */
int dsamig_crc32c_force(const char *name);

/* The name of implementation i, slowest first; NULL past the last. */
const char *dsamig_crc32c_impl_name(int i);

/* The implementation in use: "pclmul-fold4", "sse4.2-3way" or "table". */
const char *dsamig_crc32c_impl(void);

#endif
