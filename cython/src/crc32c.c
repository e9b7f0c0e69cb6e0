/* CRC32C: carry-less multiplication folding, the SSE4.2 crc32 instruction,
 * or a table, the fastest the CPU has.
 *
 * - "pclmul-fold4" (PCLMULQDQ + SSE4.2): four 128-bit accumulators fold the
 *   buffer 64 bytes at a time (Intel's "Fast CRC Computation for Generic
 *   Polynomials Using PCLMULQDQ"); two crc32 instructions reduce the last
 *   accumulator.  Where crc32 has a throughput of one per three cycles (AMD
 *   Zen), this is twice as fast as the crc32 instruction can be.
 * - "sse4.2-3way": the crc32 instruction has a latency of 3 cycles and, on
 *   Intel, a throughput of 1, so a single dependency chain runs at a third of
 *   the possible speed.  We split each 3*BLOCK chunk into three blocks, run
 *   one chain per block and merge them with precomputed "shift by n zero
 *   bytes" tables (the CRC is linear over GF(2)).
 * - "table": slice-by-8, for machines without SSE4.2.
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82F63B78u
#define BLOCK 4096

static uint32_t table8[8][256];
/* shift_tab[0]: advance a raw state over BLOCK zero bytes; [1]: over 2*BLOCK. */
static uint32_t shift_tab[2][4][256];
enum { IMPL_TABLE, IMPL_SSE42, IMPL_PCLMUL };
static const char *const impl_names[] = {"table", "sse4.2-3way", "pclmul-fold4"};
static int best_impl;   /* the fastest this CPU has */
static int active_impl; /* best_impl, or a slower one a test forced */
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static uint32_t raw_zero_bytes(uint32_t state, size_t n)
{
    while (n--)
        state = table8[0][state & 0xff] ^ (state >> 8);
    return state;
}

static void init_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table8[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table8[t][i] = (table8[t - 1][i] >> 8) ^ table8[0][table8[t - 1][i] & 0xff];

    for (int which = 0; which < 2; which++) {
        size_t n = (size_t)BLOCK * (size_t)(which + 1);
        uint32_t basis[32];
        for (int bit = 0; bit < 32; bit++)
            basis[bit] = raw_zero_bytes(1u << bit, n);
        for (int pos = 0; pos < 4; pos++)
            for (uint32_t v = 0; v < 256; v++) {
                uint32_t r = 0;
                for (int bit = 0; bit < 8; bit++)
                    if (v & (1u << bit))
                        r ^= basis[pos * 8 + bit];
                shift_tab[which][pos][v] = r;
            }
    }
    best_impl = IMPL_TABLE;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2"))
        best_impl = __builtin_cpu_supports("pclmul") ? IMPL_PCLMUL : IMPL_SSE42;
#endif
    active_impl = best_impl;
}

static inline uint32_t shift(int which, uint32_t s)
{
    return shift_tab[which][0][s & 0xff] ^ shift_tab[which][1][(s >> 8) & 0xff] ^
           shift_tab[which][2][(s >> 16) & 0xff] ^ shift_tab[which][3][s >> 24];
}

static uint32_t crc_table(uint32_t s, const uint8_t *p, size_t len)
{
    while (len && ((uintptr_t)p & 7)) {
        s = table8[0][(s ^ *p++) & 0xff] ^ (s >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= s;
        s = table8[7][w & 0xff] ^ table8[6][(w >> 8) & 0xff] ^ table8[5][(w >> 16) & 0xff] ^
            table8[4][(w >> 24) & 0xff] ^ table8[3][(w >> 32) & 0xff] ^
            table8[2][(w >> 40) & 0xff] ^ table8[1][(w >> 48) & 0xff] ^ table8[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        s = table8[0][(s ^ *p++) & 0xff] ^ (s >> 8);
    return s;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t s32, const uint8_t *p, size_t len)
{
    uint64_t s = s32;
    while (len && ((uintptr_t)p & 7)) {
        s = _mm_crc32_u8((uint32_t)s, *p++);
        len--;
    }
    while (len >= 3 * BLOCK) {
        uint64_t a = s, b = 0, c = 0;
        for (size_t i = 0; i < BLOCK; i += 8) {
            uint64_t wa, wb, wc;
            memcpy(&wa, p + i, 8);
            memcpy(&wb, p + BLOCK + i, 8);
            memcpy(&wc, p + 2 * BLOCK + i, 8);
            a = _mm_crc32_u64(a, wa);
            b = _mm_crc32_u64(b, wb);
            c = _mm_crc32_u64(c, wc);
        }
        s = shift(1, (uint32_t)a) ^ shift(0, (uint32_t)b) ^ (uint32_t)c;
        p += 3 * BLOCK;
        len -= 3 * BLOCK;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        s = _mm_crc32_u64(s, w);
        p += 8;
        len -= 8;
    }
    while (len--)
        s = _mm_crc32_u8((uint32_t)s, *p++);
    return (uint32_t)s;
}

#include <wmmintrin.h>
#include <xmmintrin.h>

/* The folding constants: K(n) = reflect32(x^n mod P) << 1, for a fold across
 * 4*128 bits (64 bytes) and across 128 bits (16 bytes); the low lane
 * multiplies an accumulator's low (earlier) half, the high lane its high half. */
#define K_FOLD4_LO 0x740eef02ull   /* K(4*128 + 32) */
#define K_FOLD4_HI 0x9e4addf8ull   /* K(4*128 - 32) */
#define K_FOLD1_LO 0xf20c0dfeull   /* K(128 + 32) */
#define K_FOLD1_HI 0x14cd00bd6ull  /* K(128 - 32) */

/* acc = acc folded forward by the distance k was made for, XOR data. */
__attribute__((target("pclmul,sse4.2"))) static inline __m128i fold(__m128i acc, __m128i k,
                                                                   __m128i data)
{
    __m128i lo = _mm_clmulepi64_si128(acc, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(acc, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), data);
}

__attribute__((target("pclmul,sse4.2"))) static uint32_t crc_pclmul(uint32_t s, const uint8_t *p,
                                                                   size_t len)
{
    if (len < 128)
        return crc_hw(s, p, len);
    const __m128i k4 = _mm_set_epi64x((long long)K_FOLD4_HI, (long long)K_FOLD4_LO);
    const __m128i k1 = _mm_set_epi64x((long long)K_FOLD1_HI, (long long)K_FOLD1_LO);
    /* The state enters as the first 32 bits of the message. */
    __m128i a0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)s));
    __m128i a1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i a2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i a3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    len -= 64;
    while (len >= 64) {
        /* The sender checksums pages straight from memory; asking for the
         * line 1 KiB ahead keeps more misses in flight across page ends,
         * where the hardware prefetcher stops (15 % on a cold image). */
        _mm_prefetch((const char *)p + 1024, _MM_HINT_T0);
        a0 = fold(a0, k4, _mm_loadu_si128((const __m128i *)p));
        a1 = fold(a1, k4, _mm_loadu_si128((const __m128i *)(p + 16)));
        a2 = fold(a2, k4, _mm_loadu_si128((const __m128i *)(p + 32)));
        a3 = fold(a3, k4, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        len -= 64;
    }
    a0 = fold(a0, k1, a1);
    a0 = fold(a0, k1, a2);
    a0 = fold(a0, k1, a3);
    while (len >= 16) {
        a0 = fold(a0, k1, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        len -= 16;
    }
    /* a0 is congruent to everything so far: its CRC from a zero state is the
     * state, and the tail continues from there. */
    uint64_t r = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(a0));
    r = _mm_crc32_u64(r, (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(a0, a0)));
    return crc_hw((uint32_t)r, p, len);
}
#endif

uint32_t dsamig_crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&init_once, init_tables);
    uint32_t s = ~crc;
#if defined(__x86_64__)
    if (active_impl == IMPL_PCLMUL)
        return ~crc_pclmul(s, (const uint8_t *)buf, len);
    if (active_impl == IMPL_SSE42)
        return ~crc_hw(s, (const uint8_t *)buf, len);
#endif
    return ~crc_table(s, (const uint8_t *)buf, len);
}

/* Multiplication modulo the (reflected) polynomial: a and b are polynomials
 * with x^0 in the top bit, as the reflected CRC holds them. */
static uint32_t mult_mod_p(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

/* x^(2^k) mod P for k = 0..63, built once by squaring. */
static uint32_t x2k[64];
static pthread_once_t x2k_once = PTHREAD_ONCE_INIT;

static void init_x2k(void)
{
    uint32_t p = 1u << 30; /* x^1 */
    for (int k = 0; k < 64; k++) {
        x2k[k] = p;
        p = mult_mod_p(p, p);
    }
}

uint32_t dsamig_crc32c_op(uint64_t len)
{
    pthread_once(&x2k_once, init_x2k);
    uint32_t p = 1u << 31; /* x^0 */
    uint64_t bits = len * 8; /* x^(8 len): one factor per set bit of the exponent */
    for (int k = 0; bits && k < 64; k++, bits >>= 1)
        if (bits & 1)
            p = mult_mod_p(x2k[k], p);
    return p;
}

uint32_t dsamig_crc32c_extend(uint32_t op, uint32_t crc_a, uint32_t crc_b)
{
    return mult_mod_p(op, crc_a) ^ crc_b;
}

uint32_t dsamig_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    return dsamig_crc32c_extend(dsamig_crc32c_op(len_b), crc_a, crc_b);
}

int dsamig_crc32c_force(const char *name)
{
    pthread_once(&init_once, init_tables);
    if (name == NULL) {
        active_impl = best_impl;
        return 0;
    }
    for (int i = 0; i <= best_impl; i++)
        if (strcmp(name, impl_names[i]) == 0) {
            active_impl = i;
            return 0;
        }
    return -1;
}

const char *dsamig_crc32c_impl_name(int i)
{
    return i >= 0 && i < (int)(sizeof(impl_names) / sizeof(impl_names[0])) ? impl_names[i] : NULL;
}

const char *dsamig_crc32c_impl(void)
{
    pthread_once(&init_once, init_tables);
    return impl_names[active_impl];
}
