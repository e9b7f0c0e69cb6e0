/* Zero-page detection on the CPU.
 *
 * As in QEMU's util/bufferiszero.c: a page in use rarely starts, ends and has
 * its middle byte all zero, so three loads reject most normal pages before any
 * vector work.  Zero pages are then proven with an OR-reduction of 128-byte
 * blocks (AVX2: four 32-byte loads; SSE2: eight 16-byte loads) that exits at the
 * first non-zero block.  AVX-512 is not used: on the machines we measured it
 * brought nothing for a memory-bound loop, and it lowers clocks on some parts.
 */
#include "zeroscan.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

static enum dsamig_simd detected = DSAMIG_SIMD_GENERIC;
static int forced = -1;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_level(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        detected = DSAMIG_SIMD_AVX2;
    else
        detected = DSAMIG_SIMD_SSE2; /* baseline of x86-64 */
#endif
}

enum dsamig_simd dsamig_simd_level(void)
{
    pthread_once(&init_once, init_level);
    if (forced >= 0 && forced < (int)detected)
        return (enum dsamig_simd)forced;
    return detected;
}

void dsamig_simd_force(int level)
{
    pthread_once(&init_once, init_level);
    forced = level;
}

const char *dsamig_simd_name(enum dsamig_simd level)
{
    switch (level) {
    case DSAMIG_SIMD_AVX2:
        return "avx2";
    case DSAMIG_SIMD_SSE2:
        return "sse2";
    default:
        return "generic";
    }
}

static int zero_generic(const uint8_t *p, size_t len)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, 64);
        acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
        if (acc)
            return 0;
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    for (; i < len; i++)
        acc |= p[i];
    return acc == 0;
}

#if defined(__x86_64__)
__attribute__((target("sse2"))) static int zero_sse2(const uint8_t *p, size_t len)
{
    size_t i = 0;
    const __m128i zero = _mm_setzero_si128();
    for (; i + 128 <= len; i += 128) {
        const __m128i *v = (const __m128i *)(p + i);
        __m128i t = _mm_or_si128(_mm_or_si128(_mm_loadu_si128(v + 0), _mm_loadu_si128(v + 1)),
                                 _mm_or_si128(_mm_loadu_si128(v + 2), _mm_loadu_si128(v + 3)));
        __m128i u = _mm_or_si128(_mm_or_si128(_mm_loadu_si128(v + 4), _mm_loadu_si128(v + 5)),
                                 _mm_or_si128(_mm_loadu_si128(v + 6), _mm_loadu_si128(v + 7)));
        t = _mm_or_si128(t, u);
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(t, zero)) != 0xFFFF)
            return 0;
    }
    return zero_generic(p + i, len - i);
}

__attribute__((target("avx2"))) static int zero_avx2(const uint8_t *p, size_t len)
{
    size_t i = 0;
    for (; i + 128 <= len; i += 128) {
        const __m256i *v = (const __m256i *)(p + i);
        __m256i t = _mm256_or_si256(_mm256_or_si256(_mm256_loadu_si256(v + 0), _mm256_loadu_si256(v + 1)),
                                    _mm256_or_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
        if (!_mm256_testz_si256(t, t))
            return 0;
    }
    return zero_generic(p + i, len - i);
}
#endif

static inline int is_zero_level(const uint8_t *p, size_t len, enum dsamig_simd level)
{
    if (len == 0)
        return 1;
    /* QEMU's sample: first, last and middle byte. */
    if (p[0] | p[len - 1] | p[len / 2])
        return 0;
#if defined(__x86_64__)
    if (level == DSAMIG_SIMD_AVX2)
        return zero_avx2(p, len);
    if (level == DSAMIG_SIMD_SSE2)
        return zero_sse2(p, len);
#endif
    (void)level;
    return zero_generic(p, len);
}

int dsamig_is_zero(const uint8_t *buf, size_t len)
{
    return is_zero_level(buf, len, dsamig_simd_level());
}

size_t dsamig_bitmap_bytes(size_t len, size_t page_size, size_t group_pages)
{
    size_t pages = (len + page_size - 1) / page_size;
    size_t full_groups = pages / group_pages;
    size_t rest = pages % group_pages;
    return full_groups * ((group_pages + 7) / 8) + (rest + 7) / 8;
}

size_t dsamig_zero_bitmap(const uint8_t *buf, size_t len, size_t page_size, size_t group_pages,
                         uint8_t *bitmap)
{
    enum dsamig_simd level = dsamig_simd_level();
    size_t pages = (len + page_size - 1) / page_size;
    size_t zero = 0, out = 0;
    memset(bitmap, 0, dsamig_bitmap_bytes(len, page_size, group_pages));
    for (size_t first = 0; first < pages; first += group_pages) {
        size_t n = pages - first < group_pages ? pages - first : group_pages;
        for (size_t i = 0; i < n; i++) {
            size_t off = (first + i) * page_size;
            size_t plen = len - off < page_size ? len - off : page_size;
            if (is_zero_level(buf + off, plen, level)) {
                bitmap[out + i / 8] |= (uint8_t)(1u << (i % 8));
                zero++;
            }
        }
        out += (n + 7) / 8;
    }
    return zero;
}
