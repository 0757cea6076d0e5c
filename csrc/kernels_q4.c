/*
 * kernels_q4.c - Q4_0 weights (llama.cpp's 4-bit blocks): the portable row
 * loop (the reference), the regrouped layout the SIMD kernels read, and the
 * AVX2 and AVX-512 (VNNI) kernels for one token and for a batch of tokens.
 * Also the batched Q8_0 kernels (several tokens per weight load) for the
 * same two tiers. The NEON ones are in kernels_q4_neon.c.
 *
 * Q4_0 (docs/FORMAT.md): each row is cut into blocks of 32 values, each
 * block 18 bytes: an fp16 scale d, then 16 bytes whose byte j holds value j
 * in its low nibble and value j + 16 in its high nibble; a value is
 * (nibble - 8) * d. The activation going into the product is quantized as
 * Q8_0 in blocks of 32 (int8 values and an fp32 scale per block; quant.c,
 * the model's group size is 32). The row product (docs/FORWARD.md):
 *
 *     val = 0
 *     for each block b, in order:
 *         isum = sum over the block of (nibble - 8) * xq      (exact, int32)
 *         val = val + (float)isum * (d_w[b] * d_x[b])
 *
 * with the two float multiplies and the add each rounded (no fused
 * multiply-add: -ffp-contract=off). Every SIMD kernel computes exactly this:
 * each lane is one output row; its int32 is exact whatever the order of the
 * integer additions, and its float operations are the scalar ones in the
 * scalar order, so outputs are bit-identical to the portable loop
 * (`make testcc`, test_q4.c, checks every tier this CPU runs).
 *
 * Regrouped layout (made at load for the tier's kernels, pack_rows R = 8
 * for AVX2 and NEON, 16 for AVX-512; the last block of rows padded with
 * zero scales): for row block rb (rows R*rb ..) and 32-column block b, the
 * nibbles take R * 16 bytes, four vectors v = 0..3 of R * 4 bytes, where
 *     pq4[((rb * nb + b) * 4 + v) * 4R + 4r + i]
 *         = nibble(row R*rb + r, column 32b + 8v + i)
 *           | nibble(row R*rb + r, column 32b + 8v + 4 + i) << 4     (i < 4)
 * so one load holds 8 columns of all R rows; masking gives 4 columns of
 * every row as unsigned bytes, which multiply 4 activation bytes broadcast
 * to every lane (AVX2 maddubs + madd, AVX-512 vpdpbusd) into one int32 per
 * row. The scales: ps4[(rb * nb + b) * R + r] = fp16 d of that row's block
 * b, widened exactly by vcvtph2ps (F16C; NEON: FCVTL). The nibbles are unsigned
 * (0..15): each row's int32 starts at -8 * (sum of the block's activation
 * bytes), so that it ends at exactly sum((nibble - 8) * xq).
 */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <intrin.h>
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#define QK 32       /* values per Q4_0 block */
#define Q4_BYTES 18 /* bytes per Q4_0 block */

/* ---- fp16 ---- */

float llama2_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant) { /* subnormal: normalize */
        int e = -1;
        do {
            mant <<= 1;
            e++;
        } while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t u16_at(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

int64_t llama2_q4_first_nonfinite(const llama2_matrix *m) {
    const int64_t blocks = (int64_t)m->rows * (m->cols / QK);
    for (int64_t b = 0; b < blocks; b++)
        if ((u16_at(m->q4 + Q4_BYTES * b) & 0x7c00u) == 0x7c00u) return QK * b;
    return -1;
}

/* ---- the portable loop: the reference ---- */

void llama2_matmul_q4_rows(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0,
                           int r1) {
    const int nb = w->cols / QK;
    for (int i = r0; i < r1; i++) {
        const uint8_t *blk = w->q4 + (int64_t)i * nb * Q4_BYTES;
        float val = 0.0f;
        for (int b = 0; b < nb; b++, blk += Q4_BYTES) {
            const int8_t *x = xq + QK * b;
            int32_t isum = 0;
            for (int j = 0; j < 16; j++)
                isum += ((blk[2 + j] & 15) - 8) * x[j] + ((blk[2 + j] >> 4) - 8) * x[j + 16];
            val += (float)isum * (llama2_f16_to_f32(u16_at(blk)) * xs[b]);
        }
        out[i] = val;
    }
}

/* ---- the regrouped layout ---- */

#if defined(__x86_64__) || defined(_M_X64)
/* F16C (vcvtph2ps): every AVX2 CPU has it, but a hypervisor may hide it */
static int cpu_f16c(void) {
#if defined(_MSC_VER)
    int r[4];
    __cpuid(r, 1);
    return (r[2] >> 29) & 1;
#else
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && ((c >> 29) & 1);
#endif
}
#endif

/* nibble of column c (< 32) of a block */
static int nibble(const uint8_t *blk, int c) { return c < 16 ? blk[2 + c] & 15 : blk[2 + c - 16] >> 4; }

int llama2_pack_q4(llama2_transformer *t, llama2_matrix *m, llama2_error *err) {
    const llama2_kernels *k = t ? t->kernels : NULL;
    if (!k || !k->matmul_q4 || k->matmul_q4 == llama2_matmul_q4_rows) return LLAMA2_OK;
#if defined(__x86_64__) || defined(_M_X64)
    if (!cpu_f16c()) return LLAMA2_OK; /* the portable loop runs */
#endif
    const int R = k->pack_rows ? k->pack_rows : LLAMA2_PACK_ROWS, nb = m->cols / QK, blocks = (m->rows + R - 1) / R;
    uint8_t *pq = (uint8_t *)llama2_own(t, (size_t)blocks * nb * R * 16);
    uint16_t *ps = (uint16_t *)llama2_own(t, (size_t)blocks * nb * R * 2);
    if (!pq || !ps) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping Q4_0 weights");
    for (int rb = 0; rb < blocks; rb++)
        for (int r = 0; r < R; r++) {
            const int row = rb * R + r;
            if (row >= m->rows) break; /* padding: zero scales and nibbles */
            for (int b = 0; b < nb; b++) {
                const uint8_t *src = m->q4 + ((int64_t)row * nb + b) * Q4_BYTES;
                const size_t unit = (size_t)rb * nb + b;
                ps[unit * R + r] = u16_at(src);
                for (int v = 0; v < 4; v++)
                    for (int i = 0; i < 4; i++)
                        pq[(unit * 4 + v) * 4 * R + 4 * r + i] =
                            (uint8_t)(nibble(src, 8 * v + i) | nibble(src, 8 * v + 4 + i) << 4);
            }
        }
    m->pq4 = pq;
    m->ps4 = ps;
    return LLAMA2_OK;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__GNUC__) || defined(__clang__)
#define Q4_AVX2_TARGET "avx2,fma,f16c"
#define Q4_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
#define AVX2_FN __attribute__((target(Q4_AVX2_TARGET)))
#define INLINE_AVX2 __attribute__((target(Q4_AVX2_TARGET), always_inline)) static inline
#define AVX512_FN __attribute__((target(Q4_AVX512_TARGET)))
#define INLINE_AVX512 __attribute__((target(Q4_AVX512_TARGET), always_inline)) static inline
#else
#define AVX2_FN
#define INLINE_AVX2 static __forceinline
#define AVX512_FN
#define INLINE_AVX512 static __forceinline
#endif

/* The int32 each row's block sum starts from, per token: corr[b] =
 * -8 * (sum of activation block b) for Q4_0 (bias 8), or -128 * (the same)
 * for the Q8_0 kernels whose weights are stored + 128 (bias 128). On the
 * stack for up to STACK_CORR values, else on the heap. */
#define STACK_CORR LLAMA2_STACK_CORR

INLINE_AVX2 int32_t block_sum(const int8_t *x) { /* sum of 32 int8 */
    __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x), _mm256_set1_epi8((char)0x80));
    __m256i s = _mm256_sad_epu8(v, _mm256_setzero_si256()); /* sums of (x + 128), 8 bytes each */
    __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi64(h, _mm_unpackhi_epi64(h, h));
    return (int32_t)_mm_cvtsi128_si32(h) - 128 * 32;
}

AVX2_FN static void corrections(int32_t *corr, const int8_t *xq, int nb, int32_t bias) {
    for (int b = 0; b < nb; b++) corr[b] = -bias * block_sum(xq + QK * b);
}

/* the corrections of n_tok activations (token t's at corr + t * nb), or NULL (no memory) */
AVX2_FN static int32_t *batch_corrections(int32_t *stack, const llama2_activation *a, int n_tok, int nb,
                                          int32_t bias) {
    int32_t *corr = (size_t)n_tok * nb <= STACK_CORR ? stack : (int32_t *)malloc(sizeof(int32_t) * n_tok * (size_t)nb);
    if (corr)
        for (int t = 0; t < n_tok; t++) corrections(corr + (size_t)t * nb, a[t].q, nb, bias);
    return corr;
}

/* ================= AVX2: 8 rows per block ================= */

/* 4 activation bytes at p broadcast to every 32-bit lane */
INLINE_AVX2 __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* rows [row, row + 8) of out that fall before r1 */
AVX2_FN static void store8(float *out, __m256 v, int row, int r1) {
    if (row + 8 <= r1) {
        _mm256_storeu_ps(out + row, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        for (int r = 0; row + r < r1; r++) out[row + r] = tmp[r];
    }
}

/* The 8 maddubs of one block are summed in int16: each is at most
 * 2 * 15 * 128 = 3840 in magnitude, so 8 of them stay under 32768. */
#define Q4_DOT_AVX2(s, pw, xb)                                                                        \
    do {                                                                                              \
        const __m256i w_ = _mm256_loadu_si256((const __m256i *)(pw));                                 \
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(w_, m4), bcast4(xb)));          \
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w_, 4), m4), \
                                                     bcast4((xb) + 4)));                              \
    } while (0)

/* val + (float)isum * (d_w * d_x), lane by lane */
INLINE_AVX2 __m256 q4_scale_add(__m256 val, __m256i isum, __m256 dw, float dx) {
    return _mm256_add_ps(val, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(dx))));
}

/* NB row blocks from rb, one token */
INLINE_AVX2 void q4_blocks_avx2(float *out, const int8_t *xq, const float *xs, const int32_t *corr,
                                const llama2_matrix *w, int rb, int r1, const int NB) {
    const int nb = w->cols / QK;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 128;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        const int8_t *x = xq + QK * b;
        for (int v = 0; v < 4; v++)
            for (int u = 0; u < NB; u++) Q4_DOT_AVX2(s[u], pw + ((int64_t)u * nb + b) * 128 + 32 * v, x + 8 * v);
        const __m256i cb = _mm256_set1_epi32(corr[b]);
        for (int u = 0; u < NB; u++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(pd + ((int64_t)u * nb + b) * 8)));
            acc[u] = q4_scale_add(acc[u], _mm256_add_epi32(_mm256_madd_epi16(s[u], ones), cb), dw, xs[b]);
        }
    }
    for (int u = 0; u < NB; u++) store8(out, acc[u], 8 * (rb + u), r1);
}

AVX2_FN void llama2_matmul_q4_avx2(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0,
                                   int r1) {
    const int nb = w->cols / QK;
    int32_t stack[STACK_CORR], *corr = !w->pq4 ? NULL : nb <= STACK_CORR ? stack : (int32_t *)malloc(sizeof(int32_t) * nb);
    if (!corr) { /* not regrouped (or no memory): the portable loop */
        llama2_matmul_q4_rows(out, xq, xs, w, r0, r1);
        return;
    }
    corrections(corr, xq, nb, 8);
    int rb = r0 / 8; /* r0 is a multiple of 8 */
    const int rb_end = (r1 + 7) / 8;
    for (; rb + 4 <= rb_end; rb += 4) q4_blocks_avx2(out, xq, xs, corr, w, rb, r1, 4);
    for (; rb + 2 <= rb_end; rb += 2) q4_blocks_avx2(out, xq, xs, corr, w, rb, r1, 2);
    for (; rb < rb_end; rb++) q4_blocks_avx2(out, xq, xs, corr, w, rb, r1, 1);
    if (corr != stack) free(corr);
}

/* One row block, T tokens from a (T <= 4): each weight load serves T tokens. */
INLINE_AVX2 void q4_tile_avx2(float *out, size_t os, const llama2_activation *a, const int32_t *corr,
                              const llama2_matrix *w, int rb, int r1, const int T) {
    const int nb = w->cols / QK;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 128;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        for (int v = 0; v < 4; v++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(pw + (int64_t)b * 128 + 32 * v));
            if (v % 2 == 0) _mm_prefetch((const char *)(pw + ((int64_t)nb + b) * 128 + 32 * v), _MM_HINT_T0);
            const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
            for (int t = 0; t < T; t++) {
                const int8_t *x = a[t].q + QK * b + 8 * v;
                s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(lo, bcast4(x)));
                s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(hi, bcast4(x + 4)));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(pd + (int64_t)b * 8)));
        if (b % 4 == 0) _mm_prefetch((const char *)(pd + ((int64_t)nb + b) * 8), _MM_HINT_T0);
        for (int t = 0; t < T; t++)
            acc[t] = q4_scale_add(acc[t], _mm256_add_epi32(_mm256_madd_epi16(s[t], ones),
                                                           _mm256_set1_epi32(corr[(size_t)t * nb + b])),
                                  dw, a[t].s[b]);
    }
    for (int t = 0; t < T; t++) store8(out + t * os, acc[t], 8 * rb, r1);
}

AVX2_FN void llama2_matmul_q4_batch_avx2(float *out, size_t os, const llama2_activation *a, int n_tok,
                                         const llama2_matrix *w, int r0, int r1) {
    const int nb = w->cols / QK;
    int32_t stack[STACK_CORR], *corr = w->pq4 ? batch_corrections(stack, a, n_tok, nb, 8) : NULL;
    if (!corr) {
        for (int t = 0; t < n_tok; t++) llama2_matmul_q4_rows(out + t * os, a[t].q, a[t].s, w, r0, r1);
        return;
    }
    for (int rb = r0 / 8; rb < (r1 + 7) / 8; rb++) { /* the row block's weights stay in cache over the tokens */
        int t = 0;
        for (; t + 4 <= n_tok; t += 4) q4_tile_avx2(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r1, 4);
        switch (n_tok - t) {
        case 3: q4_tile_avx2(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r1, 3); break;
        case 2: q4_tile_avx2(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r1, 2); break;
        case 1: q4_tile_avx2(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r1, 1); break;
        default: break;
        }
    }
    if (corr != stack) free(corr);
}

/* ================= AVX-512 (VNNI): 16 rows per block ================= */

INLINE_AVX512 __m512i bcast4_512(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* NB row blocks from rb, one token. Two int32 chains per block (low and high
 * nibbles) hide vpdpbusd's latency; integer sums are exact in any order. */
INLINE_AVX512 void q4_blocks_avx512(float *out, const int8_t *xq, const float *xs, const int32_t *corr,
                                    const llama2_matrix *w, int rb, int r0, int r1, const int NB) {
    const int nb = w->cols / QK;
    const __m512i m4 = _mm512_set1_epi8(15);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 256;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 16;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        __m512i s[2], t[2];
        for (int u = 0; u < NB; u++) {
            s[u] = _mm512_set1_epi32(corr[b]);
            t[u] = _mm512_setzero_si512();
        }
        const int8_t *x = xq + QK * b;
        for (int v = 0; v < 4; v++) {
            const __m512i xl = bcast4_512(x + 8 * v), xh = bcast4_512(x + 8 * v + 4);
            for (int u = 0; u < NB; u++) {
                const __m512i wv = _mm512_loadu_si512((const void *)(pw + ((int64_t)u * nb + b) * 256 + 64 * v));
                s[u] = _mm512_dpbusd_epi32(s[u], _mm512_and_si512(wv, m4), xl);
                t[u] = _mm512_dpbusd_epi32(t[u], _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4), xh);
            }
        }
        const __m512 dx = _mm512_set1_ps(xs[b]);
        for (int u = 0; u < NB; u++) {
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pd + ((int64_t)u * nb + b) * 16)));
            acc[u] = _mm512_add_ps(acc[u], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s[u], t[u])),
                                                         _mm512_mul_ps(dw, dx)));
        }
    }
    for (int u = 0; u < NB; u++) _mm512_mask_storeu_ps(out + 16 * (rb + u), llama2_lanes16(16 * (rb + u), r0, r1), acc[u]);
}

/* rows 8 * hi .. 8 * hi + 7 of row block rb alone (a call that starts or ends
 * halfway through a block): 256-bit vectors on that half of each vector */
INLINE_AVX512 void q4_half_avx512(float *out, const int8_t *xq, const float *xs, const int32_t *corr,
                                  const llama2_matrix *w, int rb, int hi, int r0, int r1) {
    const int nb = w->cols / QK;
    const __m256i m4 = _mm256_set1_epi8(15);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 256 + 32 * hi;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 16 + 8 * hi;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i s = _mm256_set1_epi32(corr[b]), t = _mm256_setzero_si256();
        const int8_t *x = xq + QK * b;
        for (int v = 0; v < 4; v++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(pw + (int64_t)b * 256 + 64 * v));
            s = _mm256_dpbusd_epi32(s, _mm256_and_si256(wv, m4), bcast4(x + 8 * v));
            t = _mm256_dpbusd_epi32(t, _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4), bcast4(x + 8 * v + 4));
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(pd + (int64_t)b * 16)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s, t)),
                                               _mm256_mul_ps(dw, _mm256_set1_ps(xs[b]))));
    }
    const int row = 16 * rb + 8 * hi;
    _mm256_mask_storeu_ps(out + row, (__mmask8)(llama2_lanes16(row, r0, r1) & 0xff), acc);
}

AVX512_FN void llama2_matmul_q4_avx512(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                       int r0, int r1) {
    const int nb = w->cols / QK;
    int32_t stack[STACK_CORR], *corr = !w->pq4 ? NULL : nb <= STACK_CORR ? stack : (int32_t *)malloc(sizeof(int32_t) * nb);
    if (!corr) {
        llama2_matmul_q4_rows(out, xq, xs, w, r0, r1);
        return;
    }
    corrections(corr, xq, nb, 8);
    int rb = r0 / 16, rb_end = (r1 + 15) / 16;
    if (r0 % 16 >= 8) q4_half_avx512(out, xq, xs, corr, w, rb++, 1, r0, r1); /* upper half only */
    const int tail = rb < rb_end && r1 % 16 != 0 && r1 % 16 <= 8;          /* lower half only */
    if (tail) rb_end--;
    for (; rb + 2 <= rb_end; rb += 2) q4_blocks_avx512(out, xq, xs, corr, w, rb, r0, r1, 2);
    for (; rb < rb_end; rb++) q4_blocks_avx512(out, xq, xs, corr, w, rb, r0, r1, 1);
    if (tail) q4_half_avx512(out, xq, xs, corr, w, rb_end, 0, r0, r1);
    if (corr != stack) free(corr);
}

/* One row block, T tokens from a (T <= 8): each weight load serves T tokens. */
INLINE_AVX512 void q4_tile_avx512(float *out, size_t os, const llama2_activation *a, const int32_t *corr,
                                  const llama2_matrix *w, int rb, int r0, int r1, const int T) {
    const int nb = w->cols / QK;
    const __m512i m4 = _mm512_set1_epi8(15);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 256;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 16;
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i s[8];
        for (int t = 0; t < T; t++) s[t] = _mm512_set1_epi32(corr[(size_t)t * nb + b]);
        for (int v = 0; v < 4; v++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(pw + (int64_t)b * 256 + 64 * v));
            _mm_prefetch((const char *)(pw + ((int64_t)nb + b) * 256 + 64 * v), _MM_HINT_T0); /* the next row block */
            const __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
            for (int t = 0; t < T; t++) {
                const int8_t *x = a[t].q + QK * b + 8 * v;
                s[t] = _mm512_dpbusd_epi32(s[t], lo, bcast4_512(x));
                s[t] = _mm512_dpbusd_epi32(s[t], hi, bcast4_512(x + 4));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pd + (int64_t)b * 16)));
        _mm_prefetch((const char *)(pd + ((int64_t)nb + b) * 16), _MM_HINT_T0);
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(s[t]),
                                                         _mm512_mul_ps(dw, _mm512_set1_ps(a[t].s[b]))));
    }
    const __mmask16 m = llama2_lanes16(16 * rb, r0, r1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(out + t * os + 16 * rb, m, acc[t]);
}

AVX512_FN void llama2_matmul_q4_batch_avx512(float *out, size_t os, const llama2_activation *a, int n_tok,
                                             const llama2_matrix *w, int r0, int r1) {
    const int nb = w->cols / QK;
    int32_t stack[STACK_CORR], *corr = w->pq4 ? batch_corrections(stack, a, n_tok, nb, 8) : NULL;
    if (!corr) {
        for (int t = 0; t < n_tok; t++) llama2_matmul_q4_rows(out + t * os, a[t].q, a[t].s, w, r0, r1);
        return;
    }
    for (int rb = r0 / 16; rb < (r1 + 15) / 16; rb++) { /* whole blocks, stored through the lane mask */
        int t = 0;
        for (; t + 8 <= n_tok; t += 8) q4_tile_avx512(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r0, r1, 8);
        const int32_t *c = corr + (size_t)t * nb;
        switch (n_tok - t) {
        case 7: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 7); break;
        case 6: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 6); break;
        case 5: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 5); break;
        case 4: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 4); break;
        case 3: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 3); break;
        case 2: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 2); break;
        case 1: q4_tile_avx512(out + t * os, os, a + t, c, w, rb, r0, r1, 1); break;
        default: break;
        }
    }
    if (corr != stack) free(corr);
}

/* ================= batched Q8_0 ================= *
 * Several tokens per weight load over the Q8_0 layouts of kernels.h (pq,
 * ps; whole groups per row, gs a multiple of 32), for prompts and for the
 * server's batched decoding: each token's lanes compute exactly what the
 * single-token kernels (kernels_avx2.c, kernels_avx512.c) and the portable
 * loop compute, an exact int32 per group then
 * val += ((float)isum * w_scale) * x_scale, group after group. */

/* per token t, group g: corr[t * groups + g] = -bias * (sum of the group's activation bytes) (kernels.h) */
AVX2_FN int32_t *llama2_q8_group_corrections(int32_t *stack, const llama2_activation *a, int n_tok, int n, int gs,
                                             int32_t bias) {
    const int groups = n / gs, per = gs / 32;
    int32_t *corr = (size_t)n_tok * groups <= STACK_CORR ? stack
                                                         : (int32_t *)malloc(sizeof(int32_t) * n_tok * (size_t)groups);
    if (corr)
        for (int t = 0; t < n_tok; t++)
            for (int g = 0; g < groups; g++) {
                int32_t sum = 0;
                for (int c = 0; c < per; c++) sum += block_sum(a[t].q + g * gs + 32 * c);
                corr[(size_t)t * groups + g] = -bias * sum;
            }
    return corr;
}

/* AVX2 (weights as they are, |w| <= 127): one 8-row block, T tokens (T <= 4);
 * per 4 columns maddubs(|x|, w with x's sign) + madd, as the one-token kernel;
 * ux[t] holds token t's |x| (computed once per call) */
INLINE_AVX2 void q8_tile_avx2(float *out, size_t os, const llama2_activation *a, const uint8_t *const *ux,
                              const llama2_matrix *w, int gs, int rb, int r1, const int T) {
    const int n = w->cols, groups = n / gs;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *pb = w->pq + (int64_t)rb * 8 * n;
    const float *sb = w->ps + (int64_t)rb * groups * 8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < groups; g++) {
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        for (int k = g * gs; k < (g + 1) * gs; k += 4) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(pb + 8 * k));
            if (k % 8 == 0) _mm_prefetch((const char *)(pb + 8 * (int64_t)n + 8 * k), _MM_HINT_T0); /* the next block */
            for (int t = 0; t < T; t++) {
                const __m256i xb = bcast4(a[t].q + k), uxb = bcast4((const int8_t *)ux[t] + k);
                s[t] = _mm256_add_epi32(s[t], _mm256_madd_epi16(_mm256_maddubs_epi16(uxb, _mm256_sign_epi8(wv, xb)),
                                                                 ones));
            }
        }
        const __m256 ws = _mm256_loadu_ps(sb + (int64_t)g * 8);
        for (int t = 0; t < T; t++)
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[t]), ws),
                                                         _mm256_set1_ps(a[t].s[g])));
    }
    for (int t = 0; t < T; t++) store8(out + t * os, acc[t], 8 * rb, r1);
}

AVX2_FN void llama2_matmul_q8_batch_avx2(float *out, size_t os, const llama2_activation *a, int n_tok,
                                         const llama2_matrix *w, int gs, int r0, int r1) {
    const int n = w->cols;
    uint8_t stack[STACK_CORR * 4];
    uint8_t *abs_x = (size_t)n_tok * n <= sizeof(stack) ? stack : (uint8_t *)malloc((size_t)n_tok * n);
    if (!w->pq || !w->ps || !abs_x) { /* not regrouped (a -128 in the file: kernels.h), or no memory */
        for (int t = 0; t < n_tok; t++) llama2_matmul_q8_rows(out + t * os, a[t].q, a[t].s, w, gs, r0, r1);
        if (abs_x && abs_x != stack) free(abs_x);
        return;
    }
    const uint8_t *ux[LLAMA2_MAX_BATCH];
    for (int t = 0; t < n_tok && t < LLAMA2_MAX_BATCH; t++) { /* |x| as unsigned bytes (|-128| = 128) */
        uint8_t *u = abs_x + (size_t)t * n;
        for (int j = 0; j < n; j += 32) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + j));
            _mm256_storeu_si256((__m256i *)(u + j), _mm256_sign_epi8(x, x));
        }
        ux[t] = u;
    }
    for (int t0 = 0; t0 < n_tok; t0 += LLAMA2_MAX_BATCH) { /* (callers pass at most LLAMA2_MAX_BATCH) */
        const int nt = n_tok - t0 < LLAMA2_MAX_BATCH ? n_tok - t0 : LLAMA2_MAX_BATCH;
        if (t0)
            for (int t = 0; t < nt; t++) {
                uint8_t *u = abs_x + (size_t)(t0 + t) * n;
                for (int j = 0; j < n; j += 32) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t0 + t].q + j));
                    _mm256_storeu_si256((__m256i *)(u + j), _mm256_sign_epi8(x, x));
                }
                ux[t] = u;
            }
        const llama2_activation *at = a + t0;
        float *o = out + (size_t)t0 * os;
        for (int rb = r0 / 8; rb < (r1 + 7) / 8; rb++) { /* r0 is a multiple of 8 */
            int t = 0;
            for (; t + 4 <= nt; t += 4) q8_tile_avx2(o + t * os, os, at + t, ux + t, w, gs, rb, r1, 4);
            switch (nt - t) {
            case 3: q8_tile_avx2(o + t * os, os, at + t, ux + t, w, gs, rb, r1, 3); break;
            case 2: q8_tile_avx2(o + t * os, os, at + t, ux + t, w, gs, rb, r1, 2); break;
            case 1: q8_tile_avx2(o + t * os, os, at + t, ux + t, w, gs, rb, r1, 1); break;
            default: break;
            }
        }
    }
    if (abs_x != stack) free(abs_x);
}

/* AVX-512 (weights stored + 128, vpdpbusd): one 16-row block, T tokens
 * (T <= 8); each group's int32 starts at -128 * sum(x), as the one-token kernel */
INLINE_AVX512 void q8_tile_avx512(float *out, size_t os, const llama2_activation *a, const int32_t *corr,
                                  const llama2_matrix *w, int gs, int rb, int r0, int r1, const int T) {
    const int n = w->cols, groups = n / gs;
    const int8_t *pb = w->pq + (int64_t)rb * 16 * n;
    const float *sb = w->ps + (int64_t)rb * groups * 16;
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i s[8];
        for (int t = 0; t < T; t++) s[t] = _mm512_set1_epi32(corr[(size_t)t * groups + g]);
        for (int k = g * gs; k < (g + 1) * gs; k += 4) {
            const __m512i wv = _mm512_loadu_si512((const void *)(pb + 16 * k));
            _mm_prefetch((const char *)(pb + 16 * (int64_t)n + 16 * k), _MM_HINT_T0); /* the next block, line for line */
            for (int t = 0; t < T; t++) s[t] = _mm512_dpbusd_epi32(s[t], wv, bcast4_512(a[t].q + k));
        }
        const __m512 ws = _mm512_loadu_ps(sb + (int64_t)g * 16);
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s[t]), ws),
                                                         _mm512_set1_ps(a[t].s[g])));
    }
    const __mmask16 m = llama2_lanes16(16 * rb, r0, r1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(out + t * os + 16 * rb, m, acc[t]);
}

AVX512_FN void llama2_matmul_q8_batch_avx512(float *out, size_t os, const llama2_activation *a, int n_tok,
                                             const llama2_matrix *w, int gs, int r0, int r1) {
    const int groups = w->cols / gs;
    int32_t stack[STACK_CORR], *corr = w->pq && w->ps ? llama2_q8_group_corrections(stack, a, n_tok, w->cols, gs, 128) : NULL;
    if (!corr) { /* not regrouped, or no memory: the portable loop */
        for (int t = 0; t < n_tok; t++) llama2_matmul_q8_rows(out + t * os, a[t].q, a[t].s, w, gs, r0, r1);
        return;
    }
    for (int rb = r0 / 16; rb < (r1 + 15) / 16; rb++) { /* whole blocks, stored through the lane mask */
        int t = 0;
        for (; t + 8 <= n_tok; t += 8)
            q8_tile_avx512(out + t * os, os, a + t, corr + (size_t)t * groups, w, gs, rb, r0, r1, 8);
        const int32_t *c = corr + (size_t)t * groups;
        switch (n_tok - t) {
        case 7: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 7); break;
        case 6: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 6); break;
        case 5: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 5); break;
        case 4: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 4); break;
        case 3: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 3); break;
        case 2: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 2); break;
        case 1: q8_tile_avx512(out + t * os, os, a + t, c, w, gs, rb, r0, r1, 1); break;
        default: break;
        }
    }
    if (corr != stack) free(corr);
}

#endif /* x86-64 */
