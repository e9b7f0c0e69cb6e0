/* Page fingerprints: see fingerprint.h.
 *
 * Construction, for a page M of L bytes padded with zeros to n 32-bit words
 * m_0 .. m_{n-1} (little-endian), and a key of two NH keys K, K' and three
 * 128-bit constants a0, a1, b:
 *
 *   NH_K(M) = sum over i < n/2 of ((m_2i + k_2i) mod 2^32) * ((m_2i+1 + k_2i+1) mod 2^32)
 *             mod 2^64
 *   h0 = NH_K(M), h1 = NH_K'(M)
 *   F(M) = ((a0 * h0 + a1 * h1 + b) mod 2^128) >> 64
 *
 * Why a change is missed with probability at most 2^-63 when the key is
 * uniformly random and independent of the pages (key derivation: see
 * dsamig/live/dirty.py):
 *   - NH over 32-bit words is 2^-32-almost-universal on equal-length inputs
 *     (Black, Halevi, Krawczyk, Krovetz, Rogaway, "UMAC: Fast and Secure
 *     Message Authentication", CRYPTO 1999, the NH theorem).  K and K' are
 *     independent, so two different pages give the same (h0, h1) with
 *     probability at most 2^-32 * 2^-32 = 2^-64.
 *   - The final stage is Dietzfelbinger's vector multiply-shift with 128-bit
 *     arithmetic for 64-bit inputs and a 64-bit output, which is strongly
 *     universal (Thorup, "High Speed Hashing for Integers and Strings",
 *     2015, vector multiply-shift, w = 64, l = 64, 128 >= w + l - 1): two
 *     different (h0, h1) give the same output with probability 2^-64.
 *   - Together: at most 2^-64 + 2^-64 = 2^-63 <= 2^-60.
 * Sums mod 2^64 do not depend on the order of their terms, so the vector
 * code may keep several partial sums per lane and every level agrees bit for
 * bit with the portable code and with the pure-Python twin.
 *
 * Speed: per 8 bytes of page, two 32-bit adds and one 32x32->64 multiply per
 * NH pass; AVX2 does four pairs per instruction.  The copy variant loads each
 * 32-byte block once, stores it to the bounce buffer and hashes the same
 * register, so what is hashed is exactly what was copied.
 */
#include "fingerprint.h"
#include "sigbus_guard.h"
#include "zeroscan.h"

#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef __SIZEOF_INT128__
#error "the page fingerprint needs a compiler with unsigned __int128 (a 64-bit target)"
#endif

typedef unsigned __int128 u128;

/* Prefetch this far ahead of the loads: measured from memory on the
 * development VMs, it lifts the rescan from about 0.75x to about 1x the
 * memcpy rate (a prefetch past the end of a mapping does not fault). */
#define PREFETCH_BYTES 2048

/* Keep a loaded value in its register: the compiler may not load it again
 * from the source (which a writer may change) for the store or for the other
 * NH pass, so both passes and the copy see the same bytes; it also saves the
 * second load. */
#if defined(__GNUC__)
#define PIN(x) __asm__ volatile("" : "+r"(x))
#define PIN_VEC(x) __asm__ volatile("" : "+x"(x))
#else
#define PIN(x) ((void)0)
#define PIN_VEC(x) ((void)0)
#endif

static inline uint32_t le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline u128 le128(const uint8_t *p)
{
    u128 v = 0;
    for (int i = 15; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline uint64_t nh_word(uint64_t m, const uint8_t *k)
{
    /* m holds two little-endian 32-bit words as they lay in memory. */
    uint32_t lo, hi;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    m = __builtin_bswap64(m);
#endif
    lo = (uint32_t)m + le32(k);
    hi = (uint32_t)(m >> 32) + le32(k + 4);
    return (uint64_t)lo * hi;
}

/* Portable NH of p[0..len) into h0/h1, copying to dst first when it is not
 * NULL.  len may be any length: the last partial word is zero-padded. */
static void nh_generic(uint8_t *dst, const uint8_t *p, size_t len, const uint8_t *k0,
                       const uint8_t *k1, uint64_t *h0, uint64_t *h1)
{
    uint64_t a = 0, b = 0;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t m;
        memcpy(&m, p + i, 8);
        if (dst != NULL) {
            PIN(m);
            memcpy(dst + i, &m, 8);
        }
        a += nh_word(m, k0 + i);
        b += nh_word(m, k1 + i);
    }
    if (i < len) {
        uint8_t tail[8] = {0};
        uint64_t m;
        memcpy(tail, p + i, len - i);
        if (dst != NULL)
            memcpy(dst + i, tail, len - i);
        memcpy(&m, tail, 8);
        a += nh_word(m, k0 + i);
        b += nh_word(m, k1 + i);
    }
    *h0 += a;
    *h1 += b;
}

#if defined(__x86_64__)
__attribute__((target("sse2"))) static inline __m128i nh_sse2_step(__m128i m, const uint8_t *k)
{
    __m128i s = _mm_add_epi32(m, _mm_loadu_si128((const __m128i *)k));
    return _mm_mul_epu32(s, _mm_srli_epi64(s, 32));
}

__attribute__((target("sse2"))) static inline uint64_t hsum_sse2(__m128i v)
{
    uint64_t lanes[2];
    _mm_storeu_si128((__m128i *)lanes, v);
    return lanes[0] + lanes[1];
}

/* NH of the 32-byte blocks of p[0..len); returns the bytes consumed. */
__attribute__((target("sse2"), always_inline)) static inline size_t
nh_sse2_body(uint8_t *dst, const uint8_t *p, size_t len, const uint8_t *k0, const uint8_t *k1,
             uint64_t *h0, uint64_t *h1, int copy)
{
    __m128i a0 = _mm_setzero_si128(), a1 = a0, b0 = a0, b1 = a0;
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        __m128i m, n;
        __builtin_prefetch(p + i + PREFETCH_BYTES);
        m = _mm_loadu_si128((const __m128i *)(p + i));
        n = _mm_loadu_si128((const __m128i *)(p + i + 16));
        PIN_VEC(m);
        PIN_VEC(n);
        if (copy) {
            _mm_storeu_si128((__m128i *)(dst + i), m);
            _mm_storeu_si128((__m128i *)(dst + i + 16), n);
        }
        a0 = _mm_add_epi64(a0, nh_sse2_step(m, k0 + i));
        a1 = _mm_add_epi64(a1, nh_sse2_step(n, k0 + i + 16));
        b0 = _mm_add_epi64(b0, nh_sse2_step(m, k1 + i));
        b1 = _mm_add_epi64(b1, nh_sse2_step(n, k1 + i + 16));
    }
    *h0 += hsum_sse2(_mm_add_epi64(a0, a1));
    *h1 += hsum_sse2(_mm_add_epi64(b0, b1));
    return i;
}

__attribute__((target("sse2"))) static size_t nh_sse2(const uint8_t *p, size_t len,
                                                      const uint8_t *k0, const uint8_t *k1,
                                                      uint64_t *h0, uint64_t *h1)
{
    return nh_sse2_body(NULL, p, len, k0, k1, h0, h1, 0);
}

__attribute__((target("sse2"))) static size_t nh_sse2_copy(uint8_t *dst, const uint8_t *p,
                                                           size_t len, const uint8_t *k0,
                                                           const uint8_t *k1, uint64_t *h0,
                                                           uint64_t *h1)
{
    return nh_sse2_body(dst, p, len, k0, k1, h0, h1, 1);
}

__attribute__((target("avx2"))) static inline __m256i nh_avx2_step(__m256i m, const uint8_t *k)
{
    __m256i s = _mm256_add_epi32(m, _mm256_loadu_si256((const __m256i *)k));
    return _mm256_mul_epu32(s, _mm256_srli_epi64(s, 32));
}

__attribute__((target("avx2"))) static inline uint64_t hsum_avx2(__m256i v)
{
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, v);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

/* NH of the 64-byte blocks of p[0..len); returns the bytes consumed. */
__attribute__((target("avx2"), always_inline)) static inline size_t
nh_avx2_body(uint8_t *dst, const uint8_t *p, size_t len, const uint8_t *k0, const uint8_t *k1,
             uint64_t *h0, uint64_t *h1, int copy)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        __m256i m, n;
        __builtin_prefetch(p + i + PREFETCH_BYTES);
        m = _mm256_loadu_si256((const __m256i *)(p + i));
        n = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        PIN_VEC(m);
        PIN_VEC(n);
        if (copy) {
            _mm256_storeu_si256((__m256i *)(dst + i), m);
            _mm256_storeu_si256((__m256i *)(dst + i + 32), n);
        }
        a0 = _mm256_add_epi64(a0, nh_avx2_step(m, k0 + i));
        a1 = _mm256_add_epi64(a1, nh_avx2_step(n, k0 + i + 32));
        b0 = _mm256_add_epi64(b0, nh_avx2_step(m, k1 + i));
        b1 = _mm256_add_epi64(b1, nh_avx2_step(n, k1 + i + 32));
    }
    *h0 += hsum_avx2(_mm256_add_epi64(a0, a1));
    *h1 += hsum_avx2(_mm256_add_epi64(b0, b1));
    return i;
}

__attribute__((target("avx2"))) static size_t nh_avx2(const uint8_t *p, size_t len,
                                                      const uint8_t *k0, const uint8_t *k1,
                                                      uint64_t *h0, uint64_t *h1)
{
    return nh_avx2_body(NULL, p, len, k0, k1, h0, h1, 0);
}

__attribute__((target("avx2"))) static size_t nh_avx2_copy(uint8_t *dst, const uint8_t *p,
                                                           size_t len, const uint8_t *k0,
                                                           const uint8_t *k1, uint64_t *h0,
                                                           uint64_t *h1)
{
    return nh_avx2_body(dst, p, len, k0, k1, h0, h1, 1);
}
#endif

struct fp_key {
    const uint8_t *k0, *k1; /* the NH keys */
    u128 a0, a1, b;         /* the final stage */
};

static struct fp_key parse_key(const uint8_t *key, size_t page_size)
{
    struct fp_key k = {key, key + page_size, le128(key + 2 * page_size),
                       le128(key + 2 * page_size + 16), le128(key + 2 * page_size + 32)};
    return k;
}

/* Fingerprint of one page of plen bytes, copied to dst first unless NULL. */
static uint64_t fp_page(uint8_t *dst, const uint8_t *p, size_t plen, const struct fp_key *key,
                        enum dsamig_simd level)
{
    const uint8_t *k0 = key->k0, *k1 = key->k1;
    uint64_t h0 = 0, h1 = 0;
    size_t done = 0;
#if defined(__x86_64__)
    if (level == DSAMIG_SIMD_AVX2)
        done = dst ? nh_avx2_copy(dst, p, plen, k0, k1, &h0, &h1)
                   : nh_avx2(p, plen, k0, k1, &h0, &h1);
    else if (level == DSAMIG_SIMD_SSE2)
        done = dst ? nh_sse2_copy(dst, p, plen, k0, k1, &h0, &h1)
                   : nh_sse2(p, plen, k0, k1, &h0, &h1);
#endif
    (void)level;
    nh_generic(dst ? dst + done : NULL, p + done, plen - done, k0 + done, k1 + done, &h0, &h1);
    return (uint64_t)((key->a0 * h0 + key->a1 * h1 + key->b) >> 64);
}

static inline void store64(uint64_t *out, size_t i, uint64_t v)
{
    memcpy((uint8_t *)out + i * 8, &v, 8);
}

size_t dsamig_fp_key_bytes(size_t page_size)
{
    return 2 * page_size + DSAMIG_FP_FINAL_KEY_BYTES;
}

void dsamig_fp_pages(const uint8_t *buf, size_t len, size_t page_size, const uint8_t *key,
                     uint64_t *out)
{
    enum dsamig_simd level = dsamig_simd_level();
    struct fp_key k = parse_key(key, page_size);
    size_t i = 0;
    for (size_t off = 0; off < len; off += page_size, i++) {
        size_t plen = len - off < page_size ? len - off : page_size;
        store64(out, i, fp_page(NULL, buf + off, plen, &k, level));
    }
}

void dsamig_fp_copy_pages(uint8_t *dst, const uint8_t *src, size_t len, size_t page_size,
                          const uint8_t *key, uint64_t *out)
{
    enum dsamig_simd level = dsamig_simd_level();
    struct fp_key k = parse_key(key, page_size);
    size_t i = 0;
    for (size_t off = 0; off < len; off += page_size, i++) {
        size_t plen = len - off < page_size ? len - off : page_size;
        store64(out, i, fp_page(dst + off, src + off, plen, &k, level));
    }
}

size_t dsamig_fp_changes(const uint8_t *buf, size_t len, size_t page_size, size_t group_pages,
                         const uint8_t *key, const uint64_t *previous, uint8_t *bitmap)
{
    enum dsamig_simd level = dsamig_simd_level();
    struct fp_key k = parse_key(key, page_size);
    size_t pages = (len + page_size - 1) / page_size;
    size_t changed = 0, out = 0;
    memset(bitmap, 0, dsamig_bitmap_bytes(len, page_size, group_pages));
    for (size_t first = 0; first < pages; first += group_pages) {
        size_t n = pages - first < group_pages ? pages - first : group_pages;
        for (size_t i = 0; i < n; i++) {
            size_t off = (first + i) * page_size;
            size_t plen = len - off < page_size ? len - off : page_size;
            uint64_t was;
            memcpy(&was, (const uint8_t *)previous + (first + i) * 8, 8);
            if (fp_page(NULL, buf + off, plen, &k, level) != was) {
                bitmap[out + i / 8] |= (uint8_t)(1u << (i % 8));
                changed++;
            }
        }
        out += (n + 7) / 8;
    }
    return changed;
}

struct fp_call {
    uint8_t *dst;
    const uint8_t *src;
    size_t len, page_size, group_pages;
    const uint8_t *key;
    const uint64_t *previous;
    uint64_t *out;
    uint8_t *bitmap;
    size_t changed;
};

static void run_pages(void *arg)
{
    struct fp_call *c = arg;
    dsamig_fp_pages(c->src, c->len, c->page_size, c->key, c->out);
}

static void run_copy(void *arg)
{
    struct fp_call *c = arg;
    dsamig_fp_copy_pages(c->dst, c->src, c->len, c->page_size, c->key, c->out);
}

static void run_changes(void *arg)
{
    struct fp_call *c = arg;
    c->changed = dsamig_fp_changes(c->src, c->len, c->page_size, c->group_pages, c->key,
                                   c->previous, c->bitmap);
}

int dsamig_fp_pages_guarded(const uint8_t *buf, size_t len, size_t page_size,
                            const uint8_t *key, uint64_t *out)
{
    struct fp_call c = {.src = buf, .len = len, .page_size = page_size, .key = key, .out = out};
    return dsamig_guarded(run_pages, &c);
}

int dsamig_fp_copy_pages_guarded(uint8_t *dst, const uint8_t *src, size_t len,
                                 size_t page_size, const uint8_t *key, uint64_t *out)
{
    struct fp_call c = {.dst = dst, .src = src, .len = len, .page_size = page_size, .key = key,
                        .out = out};
    return dsamig_guarded(run_copy, &c);
}

int dsamig_fp_changes_guarded(const uint8_t *buf, size_t len, size_t page_size,
                              size_t group_pages, const uint8_t *key, const uint64_t *previous,
                              uint8_t *bitmap, size_t *changed)
{
    struct fp_call c = {.src = buf, .len = len, .page_size = page_size,
                        .group_pages = group_pages, .key = key, .previous = previous,
                        .bitmap = bitmap};
    int err = dsamig_guarded(run_changes, &c);
    *changed = c.changed;
    return err;
}
