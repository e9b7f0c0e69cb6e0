/* Page fingerprints for change detection between live rounds.
 *
 * A fingerprint is 64 bits per page, keyed: two NH passes with independent
 * keys (UMAC's NH, 32-bit words, sums mod 2^64) give a 128-bit value that a
 * vector multiply-shift hash folds to 64 bits.  For two different pages of
 * the same length, over a random key, the fingerprints are equal with
 * probability at most 2^-63 (see fingerprint.c and docs/architecture.md).
 *
 * The key is 2 * page_size + 48 bytes: NH key 0, NH key 1 (page_size bytes
 * each, read as little-endian 32-bit words) and the three 128-bit
 * little-endian constants a0, a1, b of the final stage.  A page shorter than
 * page_size (the end of an image) is padded with zeros to a multiple of 8
 * bytes; fingerprints only compare pages of the same length.
 *
 * Every function runs at the level dsamig_simd_level() chooses (AVX2, SSE2
 * or portable C) and every level gives bit-identical results.
 */
#ifndef DSAMIG_FINGERPRINT_H
#define DSAMIG_FINGERPRINT_H

#include <stddef.h>
#include <stdint.h>

#define DSAMIG_FP_FINAL_KEY_BYTES 48

/* Bytes of the key for pages of page_size bytes. */
size_t dsamig_fp_key_bytes(size_t page_size);

/* Fingerprint buf[0..len) page by page (the last page may be short) into
 * out[0..pages).  out need not be aligned. */
void dsamig_fp_pages(const uint8_t *buf, size_t len, size_t page_size, const uint8_t *key,
                     uint64_t *out);

/* Copy src[0..len) to dst and fingerprint the bytes written to dst, in one
 * pass: each word is loaded from src once, stored and hashed from the same
 * register, so the fingerprint describes dst even if src changes meanwhile. */
void dsamig_fp_copy_pages(uint8_t *dst, const uint8_t *src, size_t len, size_t page_size,
                          const uint8_t *key, uint64_t *out);

/* Fingerprint buf page by page and compare with previous[0..pages): bit i of
 * a group's bitmap (LSB first, each group of group_pages pages starting on a
 * new byte, as dsamig_zero_bitmap) is set when page i's fingerprint differs.
 * Returns the number of such pages. */
size_t dsamig_fp_changes(const uint8_t *buf, size_t len, size_t page_size, size_t group_pages,
                         const uint8_t *key, const uint64_t *previous, uint8_t *bitmap);

/* The three functions above under the SIGBUS guard (sigbus_guard.h): 0, or
 * the errno value dsamig_guarded() returns; results are valid only on 0. */
int dsamig_fp_pages_guarded(const uint8_t *buf, size_t len, size_t page_size,
                            const uint8_t *key, uint64_t *out);
int dsamig_fp_copy_pages_guarded(uint8_t *dst, const uint8_t *src, size_t len,
                                 size_t page_size, const uint8_t *key, uint64_t *out);
int dsamig_fp_changes_guarded(const uint8_t *buf, size_t len, size_t page_size,
                              size_t group_pages, const uint8_t *key, const uint64_t *previous,
                              uint8_t *bitmap, size_t *changed);

#endif
