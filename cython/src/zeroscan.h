/* Zero-page detection on the CPU: sample bytes first, then SIMD. */
#ifndef DSAMIG_ZEROSCAN_H
#define DSAMIG_ZEROSCAN_H

#include <stddef.h>
#include <stdint.h>

enum dsamig_simd { DSAMIG_SIMD_GENERIC = 0, DSAMIG_SIMD_SSE2 = 1, DSAMIG_SIMD_AVX2 = 2 };

/* 1 if buf[0..len) is all zero. */
int dsamig_is_zero(const uint8_t *buf, size_t len);

/* Bitmap length of a scan: each group of group_pages pages starts on a byte. */
size_t dsamig_bitmap_bytes(size_t len, size_t page_size, size_t group_pages);

/* Scan buf[0..len) page by page (the last page may be short).  Bit i of a
 * group's bitmap (byte i/8, bit i%8, LSB first) is set when that page is all
 * zero; each group of group_pages pages starts on a new byte, so the output is
 * the concatenation of the wire bitmaps of consecutive packets.  Returns the
 * number of zero pages. */
size_t dsamig_zero_bitmap(const uint8_t *buf, size_t len, size_t page_size, size_t group_pages,
                          uint8_t *bitmap);

/* The level chosen at run time by CPUID (capped by dsamig_simd_force). */
enum dsamig_simd dsamig_simd_level(void);
const char *dsamig_simd_name(enum dsamig_simd level);

/* Cap the level (tests run every path); -1 restores the detected level. */
void dsamig_simd_force(int level);

#endif
