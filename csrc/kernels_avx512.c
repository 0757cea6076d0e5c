/*
 * kernels_avx512.c - AVX-512 matrix-vector kernels (x86-64), compiled for
 * any x86-64 (per-function target attributes) and used only when the CPU
 * has AVX-512 F, BW, VL and VNNI and the OS saves the zmm and mask
 * registers (kernels.c).
 *
 * The same rule as every tier: each of the 16 lanes of a vector is one
 * output row (or one attention position, or one output dimension) and adds
 * its terms in the scalar loop's order with the scalar loop's rounding, so
 * every result is bit-identical to kernels_scalar.c (`make testcc` checks
 * each kernel). fp32: a multiply, then an add (llama2.c's arithmetic); bf16:
 * one fused multiply-add per weight; int8: exact int32 dot products (VNNI),
 * then ((float)isum * w_scale) * x_scale added per group, as the scalar loop.
 *
 * Layouts (kernels.h): blocks of 16 rows (pack_rows = 16), so that one
 * column of a block is one 64-byte vector (fp32: one cache line); int8
 * values 4 columns x 16 rows per 64-byte vector, stored + 128 (VNNI's
 * vpdpbusd multiplies unsigned bytes by signed ones: the sum of
 * (w + 128) * x is exactly the wanted sum plus 128 * sum(x), which is taken
 * back off). Big fp32 matrices with long rows keep AVX2's 8-row blocks
 * (f32_stream_rows: decode streams them as AVX2 does; prefill interleaves
 * each tile into 16-row columns). A call's rows need not start or end on a
 * 16-row block: one-token kernels run a half block on its own 8 rows, the
 * batched ones compute whole blocks, and every store goes through a lane
 * mask, so exactly rows [r0, r1) are written.
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define AVX512_FN __attribute__((target(AVX512_TARGET)))
#define INLINE_AVX512 __attribute__((target(AVX512_TARGET), always_inline)) static inline
#define ALIGN64 __attribute__((aligned(64)))
#define UNROLL _Pragma("GCC unroll 16")
#else
#define AVX512_FN
#define INLINE_AVX512 static __forceinline
#define ALIGN64 __declspec(align(64))
#define UNROLL
#endif

/* 16 packed weights (one column of a block) as fp32: bf16 widens exactly by
 * a 16-bit shift. `bf16` is a constant in every caller, so each kernel below
 * is compiled twice, once per weight type. */
INLINE_AVX512 __m512 load_w(const void *p, size_t i, int bf16) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p + i);
}

/* acc + w * x: rounded twice for fp32 weights, once (fused) for bf16 */
INLINE_AVX512 __m512 mac(__m512 acc, __m512 w, __m512 x, int bf16) {
    return bf16 ? _mm512_fmadd_ps(w, x, acc) : _mm512_add_ps(acc, _mm512_mul_ps(w, x));
}

/* ---- which rows a call computes ----
 * Callers hand a kernel rows [r0, r1) with r0 a multiple of 8 (matmul.c's
 * split, and its row tiles: 24 rows of a TinyLlama fp32 matrix, 8 of its
 * w2; any r0 for the span kernel), so a call may start or end halfway
 * through a 16-row block. Such a
 * half block runs on its 8 rows alone with 256-bit vectors (its half of
 * every 64-byte column), so that no row is computed (and no weight read)
 * twice over; whole blocks in between run 16 rows at a time. */
typedef struct {
    int head;       /* 1: block b_first - 1's upper half (rows 8-15) comes first */
    int b, b_end;   /* whole blocks [b, b_end) */
    int tail;       /* 1: block b_end's lower half (rows 0-7) comes last */
} block_plan;

INLINE_AVX512 block_plan plan_blocks(int r0, int r1) {
    block_plan bp;
    bp.b = r0 / 16;
    bp.b_end = (r1 + 15) / 16;
    bp.head = r0 % 16 >= 8; /* only the upper half of the first block */
    if (bp.head) bp.b++;
    bp.tail = r1 % 16 != 0 && r1 % 16 <= 8 && bp.b_end - 1 >= bp.b;
    if (bp.tail) bp.b_end--;
    return bp;
}

/* the lanes of the half block (8 rows from `row`) that fall in [r0, r1) */
INLINE_AVX512 __mmask8 half_lanes(int row, int r0, int r1) { return (__mmask8)(llama2_lanes16(row, r0, r1) & 0xff); }

/* ---- fp32 and bf16, one token ----
 * Four blocks (64 rows) at a time keep the adds busy, then two, then one.
 *
 * Big fp32 matrices with long rows (llama2_f32_stream: 8 MB and more, 1024
 * columns and more: TinyLlama's) are packed in 8-row blocks instead
 * (f32_stream_rows) and read as in the AVX2 tier, one block at a time: one
 * sequential stream, the line STREAM_AHEAD bytes ahead asked for as each is
 * read; one add chain per block is still quicker than memory. In 16-row
 * blocks they would be split by matmul.c's row tiles (24 rows of TinyLlama's
 * 2048-column matrices, 8 of its w2) into half blocks whose second halves
 * cost a pass of their own. */
#define STREAM_AHEAD 512

/* 8 packed weights (half a column of a block) as fp32 */
INLINE_AVX512 __m256 load_w8(const void *p, size_t i, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)p + i);
}

/* rows 8 * hi .. 8 * hi + 7 of block b */
INLINE_AVX512 void dense_half(float *out, const float *x, const void *p, int n, int b, int hi, int r0, int r1,
                              int bf16) {
    const size_t p0 = (size_t)b * n * 16 + 8 * hi;
    __m256 a = _mm256_setzero_ps();
    for (int j = 0; j < n; j++) {
        const __m256 w = load_w8(p, p0 + 16 * (size_t)j, bf16), xj = _mm256_set1_ps(x[j]);
        a = bf16 ? _mm256_fmadd_ps(w, xj, a) : _mm256_add_ps(a, _mm256_mul_ps(w, xj));
    }
    _mm256_mask_storeu_ps(out + 16 * b + 8 * hi, half_lanes(16 * b + 8 * hi, r0, r1), a);
}

INLINE_AVX512 void matmul_dense(float *out, const float *x, const void *p, int n, int r0, int r1, int bf16) {
    const block_plan bp = plan_blocks(r0, r1);
    if (bp.head) dense_half(out, x, p, n, bp.b - 1, 1, r0, r1, bf16);
    int b = bp.b;
    const int b_end = bp.b_end;
    const size_t bs = (size_t)n * 16; /* values per block */
    for (; b + 4 <= b_end; b += 4) {
        const size_t p0 = (size_t)b * bs;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n; j++) {
            __m512 xj = _mm512_set1_ps(x[j]);
            a0 = mac(a0, load_w(p, p0 + 16 * (size_t)j, bf16), xj, bf16);
            a1 = mac(a1, load_w(p, p0 + bs + 16 * (size_t)j, bf16), xj, bf16);
            a2 = mac(a2, load_w(p, p0 + 2 * bs + 16 * (size_t)j, bf16), xj, bf16);
            a3 = mac(a3, load_w(p, p0 + 3 * bs + 16 * (size_t)j, bf16), xj, bf16);
        }
        _mm512_mask_storeu_ps(out + 16 * b, llama2_lanes16(16 * b, r0, r1), a0);
        _mm512_mask_storeu_ps(out + 16 * (b + 1), llama2_lanes16(16 * (b + 1), r0, r1), a1);
        _mm512_mask_storeu_ps(out + 16 * (b + 2), llama2_lanes16(16 * (b + 2), r0, r1), a2);
        _mm512_mask_storeu_ps(out + 16 * (b + 3), llama2_lanes16(16 * (b + 3), r0, r1), a3);
    }
    for (; b + 2 <= b_end; b += 2) {
        const size_t p0 = (size_t)b * bs;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int j = 0; j < n; j++) {
            __m512 xj = _mm512_set1_ps(x[j]);
            a0 = mac(a0, load_w(p, p0 + 16 * (size_t)j, bf16), xj, bf16);
            a1 = mac(a1, load_w(p, p0 + bs + 16 * (size_t)j, bf16), xj, bf16);
        }
        _mm512_mask_storeu_ps(out + 16 * b, llama2_lanes16(16 * b, r0, r1), a0);
        _mm512_mask_storeu_ps(out + 16 * (b + 1), llama2_lanes16(16 * (b + 1), r0, r1), a1);
    }
    for (; b < b_end; b++) {
        const size_t p0 = (size_t)b * bs;
        __m512 a0 = _mm512_setzero_ps();
        for (int j = 0; j < n; j++) a0 = mac(a0, load_w(p, p0 + 16 * (size_t)j, bf16), _mm512_set1_ps(x[j]), bf16);
        _mm512_mask_storeu_ps(out + 16 * b, llama2_lanes16(16 * b, r0, r1), a0);
    }
    if (bp.tail) dense_half(out, x, p, n, b_end, 0, r0, r1, bf16);
}

/* A stream matrix (8-row blocks): each block one sequential stream, two
 * columns (one 64-byte line) per step. */
INLINE_AVX512 void matmul_stream(float *out, const float *x, const float *p, int n, int r0, int r1) {
    for (int b = r0 / 8, b_end = (r1 + 7) / 8; b < b_end; b++) {
        const float *pb = p + (size_t)b * n * 8;
        __m256 a = _mm256_setzero_ps();
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            _mm_prefetch((const char *)(pb + 8 * (size_t)j) + STREAM_AHEAD, _MM_HINT_T0);
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(pb + 8 * (size_t)j), _mm256_set1_ps(x[j])));
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(pb + 8 * (size_t)j + 8), _mm256_set1_ps(x[j + 1])));
        }
        for (; j < n; j++) a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(pb + 8 * (size_t)j), _mm256_set1_ps(x[j])));
        _mm256_mask_storeu_ps(out + 8 * b, half_lanes(8 * b, r0, r1), a);
    }
}

AVX512_FN static void matmul_f32_avx512(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    if (llama2_f32_stream(w))
        matmul_stream(out, x, w->p, w->cols, r0, r1);
    else
        matmul_dense(out, x, w->p, w->cols, r0, r1, 0);
}

AVX512_FN static void matmul_bf16_avx512(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    matmul_dense(out, x, w->ph, w->cols, r0, r1, 1);
}

/* ---- fp32 and bf16, a batch of tokens (prefill) ----
 * Tiles of 2 blocks (32 rows) x 8 tokens: 16 accumulators, 16 independent
 * add chains; each weight vector loaded serves 8 tokens and each broadcast x
 * value 2 blocks. fp32 costs a multiply and an add per 16 products, so the
 * two vector ports, not the loads, set the pace. A block pair's columns go
 * in tiles of TILE whose weights (16 KB) stay in L1 while every token of the
 * batch uses them, while the next tile's weights are prefetched; between
 * tiles a sum is parked in out and picked up again (masked to the lanes the
 * call owns), so every output is still w[r][0]*x[0] + w[r][1]*x[1] + ...
 * in order, exactly as the scalar loop of its weight type. bf16 tiles are
 * widened once into an aligned buffer, and the 8-row blocks of a stream
 * matrix interleaved there into 16-row ones, then every token uses those. */
#ifndef AVX512_TILE /* -DAVX512_TILE=64 / 256 measured the same within noise (bench_kernels) */
#define AVX512_TILE 128
#endif
#define TILE AVX512_TILE

typedef struct {
    const char *s[4]; /* up to 4 streams (NULL: none), `left` lines each */
    int left;
} prefetch_stream;

INLINE_AVX512 void prefetch_some(prefetch_stream *ps, int lines) {
    for (; lines > 0 && ps->left > 0; lines--, ps->left--)
        for (int i = 0; i < 4; i++)
            if (ps->s[i]) {
                _mm_prefetch(ps->s[i], _MM_HINT_T1);
                ps->s[i] += 64;
            }
}

/* T tokens from t over W (1 or 2) blocks, columns j0 .. j0 + m of the tile */
INLINE_AVX512 void batch_tile(float *out, size_t os, const llama2_activation *a, int t, int j0, int m,
                              const float *w0p, const float *w1p, int row, __mmask16 m0, __mmask16 m1,
                              const int W, const int T, int bf16) {
    __m512 c0[8], c1[8];
    const float *xp[8];
    UNROLL for (int u = 0; u < T; u++) {
        const float *o = out + (size_t)(t + u) * os;
        xp[u] = a[t + u].x + j0;
        c0[u] = j0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, o + row);
        if (W == 2) c1[u] = j0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, o + row + 16);
    }
    for (int j = 0; j < m; j++) {
        const __m512 w0 = _mm512_loadu_ps(w0p + 16 * j);
        const __m512 w1 = W == 2 ? _mm512_loadu_ps(w1p + 16 * j) : w0;
        UNROLL for (int u = 0; u < T; u++) {
            const __m512 xj = _mm512_set1_ps(xp[u][j]);
            c0[u] = mac(c0[u], w0, xj, bf16);
            if (W == 2) c1[u] = mac(c1[u], w1, xj, bf16);
        }
    }
    UNROLL for (int u = 0; u < T; u++) {
        float *o = out + (size_t)(t + u) * os;
        _mm512_mask_storeu_ps(o + row, m0, c0[u]);
        if (W == 2) _mm512_mask_storeu_ps(o + row + 16, m1, c1[u]);
    }
}

/* columns j0 .. j0 + m of 16-row block b of a stream matrix (8-row blocks,
 * blocks8 of them) as 16-row columns at dst */
INLINE_AVX512 void interleave_tile(float *dst, const float *p, int n, int blocks8, int b, int j0, int m) {
    const float *lo = p + (size_t)(2 * b) * n * 8 + 8 * (size_t)j0, *hi = lo + (size_t)n * 8;
    const int has_hi = 2 * b + 1 < blocks8;
    for (int j = 0; j < m; j++) {
        _mm256_store_ps(dst + 16 * j, _mm256_loadu_ps(lo + 8 * j));
        _mm256_store_ps(dst + 16 * j + 8, has_hi ? _mm256_loadu_ps(hi + 8 * j) : _mm256_setzero_ps());
    }
}

/* rows8: p is a stream matrix's 8-row layout (fp32 only) */
INLINE_AVX512 void matmul_dense_batch(float *out, size_t os, const llama2_activation *a, int nt, const void *p,
                                      int n, int rows, int r0, int r1, int bf16, int rows8) {
    const int b_first = r0 / 16, b_end = (r1 + 15) / 16, blocks8 = (rows + 7) / 8;
    const size_t bs = (size_t)n * 16, es = bf16 ? 2 : 4;
    ALIGN64 float wide[2 * TILE * 16]; /* bf16 tiles widened, stream tiles interleaved */
    for (int b = b_first; b < b_end; b += 2) {
        const int two = b + 1 < b_end, row = 16 * b;
        const __mmask16 m0 = llama2_lanes16(row, r0, r1), m1 = two ? llama2_lanes16(row + 16, r0, r1) : 0;
        const size_t p0 = (size_t)b * bs, p1 = p0 + bs;
        for (int j0 = 0; j0 < n; j0 += TILE) {
            const int j1 = j0 + TILE < n ? j0 + TILE : n, m = j1 - j0;
            /* the next tile: the same blocks' next columns, or the next pair's first */
            prefetch_stream next = {{0, 0, 0, 0}, 0};
            const int nb = j1 < n ? b : b + 2, nj = j1 < n ? j1 : 0;
            if (nb < b_end) {
                const int mn = n - nj < TILE ? n - nj : TILE, nblocks = nb + 1 < b_end ? 2 : 1;
                if (rows8) {
                    for (int i = 0; i < 2 * nblocks && 2 * nb + i < blocks8; i++)
                        next.s[i] = (const char *)((const float *)p + (size_t)(2 * nb + i) * n * 8 + 8 * (size_t)nj);
                    next.left = (mn * 8 * 4 + 63) / 64;
                } else {
                    for (int i = 0; i < nblocks; i++)
                        next.s[i] = (const char *)p + ((size_t)(nb + i) * bs + 16 * (size_t)nj) * es;
                    next.left = (int)((mn * 16 * es + 63) / 64);
                }
            }
            const int per_group = next.left / 8 + 1; /* spread over the first token groups */
            const float *w0p, *w1p;
            if (bf16) {
                for (int j = 0; j < m; j++) {
                    _mm512_store_ps(wide + 16 * j, load_w(p, p0 + 16 * (size_t)(j0 + j), 1));
                    if (two) _mm512_store_ps(wide + 16 * (TILE + j), load_w(p, p1 + 16 * (size_t)(j0 + j), 1));
                }
                w0p = wide;
                w1p = wide + 16 * TILE;
            } else if (rows8) {
                interleave_tile(wide, (const float *)p, n, blocks8, b, j0, m);
                if (two) interleave_tile(wide + 16 * TILE, (const float *)p, n, blocks8, b + 1, j0, m);
                w0p = wide;
                w1p = wide + 16 * TILE;
            } else {
                w0p = (const float *)p + p0 + 16 * (size_t)j0;
                w1p = two ? (const float *)p + p1 + 16 * (size_t)j0 : w0p;
            }
            int t = 0;
            if (two) {
                for (; t + 8 <= nt; t += 8) {
                    prefetch_some(&next, per_group);
                    batch_tile(out, os, a, t, j0, m, w0p, w1p, row, m0, m1, 2, 8, bf16);
                }
                for (; t + 4 <= nt; t += 4) batch_tile(out, os, a, t, j0, m, w0p, w1p, row, m0, m1, 2, 4, bf16);
                for (; t < nt; t++) batch_tile(out, os, a, t, j0, m, w0p, w1p, row, m0, m1, 2, 1, bf16);
            } else {
                for (; t + 8 <= nt; t += 8) {
                    prefetch_some(&next, per_group);
                    batch_tile(out, os, a, t, j0, m, w0p, w0p, row, m0, 0, 1, 8, bf16);
                }
                for (; t + 4 <= nt; t += 4) batch_tile(out, os, a, t, j0, m, w0p, w0p, row, m0, 0, 1, 4, bf16);
                for (; t < nt; t++) batch_tile(out, os, a, t, j0, m, w0p, w0p, row, m0, 0, 1, 1, bf16);
            }
            prefetch_some(&next, next.left);
        }
    }
}

AVX512_FN static void matmul_f32_batch_avx512(float *out, size_t os, const llama2_activation *a, int nt,
                                              const llama2_matrix *w, int r0, int r1) {
    matmul_dense_batch(out, os, a, nt, w->p, w->cols, w->rows, r0, r1, 0, llama2_f32_stream(w));
}

AVX512_FN static void matmul_bf16_batch_avx512(float *out, size_t os, const llama2_activation *a, int nt,
                                               const llama2_matrix *w, int r0, int r1) {
    matmul_dense_batch(out, os, a, nt, w->ph, w->cols, w->rows, r0, r1, 1, 0);
}

/* ---- int8 (Q8_0) ----
 *
 * w->pq holds, per block of 16 rows, 4 consecutive columns of all 16 rows
 * in one 64-byte vector, each value + 128 as an unsigned byte. vpdpbusd
 * against 4 activation bytes broadcast to every lane adds (w + 128) * x over
 * the 4 columns into each row's int32: the rows' dot products build up lane
 * by lane with no horizontal sums. Each group's int32 starts at
 * -128 * sum(x over the group), so it ends at exactly sum(w * x), the
 * scalar loop's int32; then per lane val += ((float)isum * w_scale) *
 * x_scale, the scalar order: bit-identical to llama2_matmul_q8_rows. */

INLINE_AVX512 __m512i x4(const int8_t *xq, int k) {
    int32_t v;
    memcpy(&v, xq + k, 4);
    return _mm512_set1_epi32(v);
}

/* out[c - c0] = -128 * (xq[32c] + ... + xq[32c + 31]) for runs c in [c0, c1) */
INLINE_AVX512 void run_corrections(int32_t *out, const int8_t *xq, int c0, int c1) {
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    int c = c0;
    for (; c + 2 <= c1; c += 2) {
        __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, _mm512_loadu_si512((const void *)(xq + 32 * c)));
        __m256i h = _mm256_hadd_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
        h = _mm256_hadd_epi32(h, h); /* lanes 0, 1: first and second run's halves */
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        out[c - c0] = -_mm_cvtsi128_si32(s);
        out[c - c0 + 1] = -_mm_extract_epi32(s, 1);
    }
    if (c < c1) {
        __m256i v = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm512_castsi512_si256(k128),
                                        _mm256_loadu_si256((const __m256i *)(xq + 32 * c)));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        out[c - c0] = -_mm_cvtsi128_si32(s);
    }
}

/* NB blocks of 16 rows from block b, one token; corr[g]: group g's start.
 * Each block's int32 sum runs in two chains (even and odd 4-column steps),
 * added at the group's end: integer sums are exact in any order, and two
 * chains per block hide vpdpbusd's latency. */
#define DP(acc, u, k) acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512((const void *)(pb + (int64_t)(u) * 16 * n + 16 * (k))), xb)
INLINE_AVX512 void q8_blocks(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs, int b,
                             const int32_t *corr, int r0, int r1, const int NB) {
    const int n = w->cols, groups = n / gs;
    const int8_t *pb = w->pq + (int64_t)b * 16 * n; /* NB blocks follow one another */
    const float *sb = w->ps + (int64_t)b * groups * 16;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int g = 0; g < groups; g++) {
        __m512i s0 = _mm512_set1_epi32(corr[g]), s1 = s0, s2 = s0, s3 = s0;
        __m512i t0 = _mm512_setzero_si512(), t1 = t0, t2 = t0, t3 = t0;
        for (int k = g * gs; k < (g + 1) * gs; k += 8) { /* gs is a multiple of 32 */
            __m512i xb = x4(xq, k);
            DP(s0, 0, k);
            if (NB > 1) DP(s1, 1, k);
            if (NB > 2) { DP(s2, 2, k); DP(s3, 3, k); }
            xb = x4(xq, k + 4);
            DP(t0, 0, k + 4);
            if (NB > 1) DP(t1, 1, k + 4);
            if (NB > 2) { DP(t2, 2, k + 4); DP(t3, 3, k + 4); }
        }
        const __m512 xsc = _mm512_set1_ps(xs[g]);
#define SCALE(acc, s, t, u) \
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s, t)), \
                                                         _mm512_loadu_ps(sb + ((int64_t)(u) * groups + g) * 16)), xsc))
        SCALE(acc0, s0, t0, 0);
        if (NB > 1) SCALE(acc1, s1, t1, 1);
        if (NB > 2) { SCALE(acc2, s2, t2, 2); SCALE(acc3, s3, t3, 3); }
#undef SCALE
    }
    _mm512_mask_storeu_ps(out + 16 * b, llama2_lanes16(16 * b, r0, r1), acc0);
    if (NB > 1) _mm512_mask_storeu_ps(out + 16 * (b + 1), llama2_lanes16(16 * (b + 1), r0, r1), acc1);
    if (NB > 2) {
        _mm512_mask_storeu_ps(out + 16 * (b + 2), llama2_lanes16(16 * (b + 2), r0, r1), acc2);
        _mm512_mask_storeu_ps(out + 16 * (b + 3), llama2_lanes16(16 * (b + 3), r0, r1), acc3);
    }
}

/* rows 8 * hi .. 8 * hi + 7 of block b (256-bit VNNI on their half of each vector) */
INLINE_AVX512 void q8_half(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs, int b,
                           int hi, const int32_t *corr, int r0, int r1) {
    const int n = w->cols, groups = n / gs;
    const int8_t *pb = w->pq + (int64_t)b * 16 * n + 32 * hi;
    const float *sb = w->ps + (int64_t)b * groups * 16 + 8 * hi;
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i s = _mm256_set1_epi32(corr[g]), t = _mm256_setzero_si256();
        for (int k = g * gs; k < (g + 1) * gs; k += 8) {
            s = _mm256_dpbusd_epi32(s, _mm256_loadu_si256((const __m256i *)(pb + 16 * k)), _mm512_castsi512_si256(x4(xq, k)));
            t = _mm256_dpbusd_epi32(t, _mm256_loadu_si256((const __m256i *)(pb + 16 * (k + 4))),
                                    _mm512_castsi512_si256(x4(xq, k + 4)));
        }
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s, t)),
                                                             _mm256_loadu_ps(sb + (int64_t)g * 16)),
                                               _mm256_set1_ps(xs[g])));
    }
    _mm256_mask_storeu_ps(out + 16 * b + 8 * hi, half_lanes(16 * b + 8 * hi, r0, r1), acc);
}

/* the int32 corrections of 32-column runs: on the stack, or (very long rows) the heap */
#define STACK_RUNS 512

AVX512_FN static void matmul_q8_avx512(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                       int gs, int r0, int r1) {
    const int n = w->cols, runs = n / 32, groups = n / gs, per = gs / 32;
    int32_t stack[STACK_RUNS], *corr = !w->pq || !w->ps ? NULL
                                       : runs <= STACK_RUNS ? stack : (int32_t *)malloc(sizeof(int32_t) * runs);
    if (!corr) { /* not packed for these kernels (or no memory): the portable loop */
        llama2_matmul_q8_rows(out, xq, xs, w, gs, r0, r1);
        return;
    }
    run_corrections(corr, xq, 0, runs);
    for (int g = 0; g < groups; g++) { /* runs -> groups, in place (group g reads runs g*per.. >= g) */
        int32_t sum = 0;
        for (int i = 0; i < per; i++) sum += corr[g * per + i];
        corr[g] = sum;
    }
    const block_plan bp = plan_blocks(r0, r1);
    if (bp.head) q8_half(out, xq, xs, w, gs, bp.b - 1, 1, corr, r0, r1);
    int b = bp.b;
    for (; b + 4 <= bp.b_end; b += 4) q8_blocks(out, xq, xs, w, gs, b, corr, r0, r1, 4);
    for (; b + 2 <= bp.b_end; b += 2) q8_blocks(out, xq, xs, w, gs, b, corr, r0, r1, 2);
    for (; b < bp.b_end; b++) q8_blocks(out, xq, xs, w, gs, b, corr, r0, r1, 1);
    if (bp.tail) q8_half(out, xq, xs, w, gs, bp.b_end, 0, corr, r0, r1);
    if (corr != stack) free(corr);
}

/* Rows whose groups run across row boundaries (w2 of stories42M: hidden
 * 1376, groups of 64). The scalar loop goes segment by segment, where both
 * the weight group and the activation group stay the same; n and gs are
 * multiples of 32, so every boundary falls between 32-column runs. The
 * lanes' int32 sums run on over the runs (each run's sum starting with its
 * -128 * sum(x) correction); after each run the lanes whose segment ends
 * there (pends, 16 bits per run) add ((float)isum * w_scale) * x_scale to
 * their value and start again from zero, the other lanes keep both. */
INLINE_AVX512 void q8_span_blocks(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs,
                                  int b, const int32_t *corr, int r0, int r1, const int NB) {
    const int n = w->cols, runs = n / 32;
    const int8_t *pb = w->pq + (int64_t)b * 16 * n;
    const float *sb = w->ps + (int64_t)b * runs * 16;
    const uint8_t *eb = w->pends + (int64_t)b * runs * 2;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int c = 0; c < runs; c++) {
        const __m512i start = _mm512_set1_epi32(corr[c]);
        __m512i t0 = _mm512_setzero_si512(), t1 = t0, t2 = t0, t3 = t0;
        s0 = _mm512_add_epi32(s0, start);
        if (NB > 1) s1 = _mm512_add_epi32(s1, start);
        if (NB > 2) { s2 = _mm512_add_epi32(s2, start); s3 = _mm512_add_epi32(s3, start); }
        for (int k = 32 * c; k < 32 * c + 32; k += 8) {
            __m512i xb = x4(xq, k);
            DP(s0, 0, k);
            if (NB > 1) DP(s1, 1, k);
            if (NB > 2) { DP(s2, 2, k); DP(s3, 3, k); }
            xb = x4(xq, k + 4);
            DP(t0, 0, k + 4);
            if (NB > 1) DP(t1, 1, k + 4);
            if (NB > 2) { DP(t2, 2, k + 4); DP(t3, 3, k + 4); }
        }
        s0 = _mm512_add_epi32(s0, t0);
        if (NB > 1) s1 = _mm512_add_epi32(s1, t1);
        if (NB > 2) { s2 = _mm512_add_epi32(s2, t2); s3 = _mm512_add_epi32(s3, t3); }
        const __m512 xsc = _mm512_set1_ps(xs[32 * c / gs]);
#define END(acc, s, u)                                                                                       \
    do {                                                                                                     \
        const uint8_t *e = eb + ((int64_t)(u) * runs + c) * 2;                                               \
        const __mmask16 ends = (__mmask16)(e[0] | (e[1] << 8));                                              \
        if (ends) {                                                                                          \
            __m512 sum = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s),               \
                                                                        _mm512_loadu_ps(sb + ((int64_t)(u) * runs + c) * 16)), \
                                                          xsc));                                             \
            acc = _mm512_mask_mov_ps(acc, ends, sum);                                                        \
            s = _mm512_maskz_mov_epi32((__mmask16)~ends, s);                                                 \
        }                                                                                                    \
    } while (0)
        END(acc0, s0, 0);
        if (NB > 1) END(acc1, s1, 1);
        if (NB > 2) { END(acc2, s2, 2); END(acc3, s3, 3); }
#undef END
    }
    _mm512_mask_storeu_ps(out + 16 * b, llama2_lanes16(16 * b, r0, r1), acc0);
    if (NB > 1) _mm512_mask_storeu_ps(out + 16 * (b + 1), llama2_lanes16(16 * (b + 1), r0, r1), acc1);
    if (NB > 2) {
        _mm512_mask_storeu_ps(out + 16 * (b + 2), llama2_lanes16(16 * (b + 2), r0, r1), acc2);
        _mm512_mask_storeu_ps(out + 16 * (b + 3), llama2_lanes16(16 * (b + 3), r0, r1), acc3);
    }
}
#undef DP

/* rows 8 * hi .. 8 * hi + 7 of block b, groups across rows */
INLINE_AVX512 void q8_span_half(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs,
                                int b, int hi, const int32_t *corr, int r0, int r1) {
    const int n = w->cols, runs = n / 32;
    const int8_t *pb = w->pq + (int64_t)b * 16 * n + 32 * hi;
    const float *sb = w->ps + (int64_t)b * runs * 16 + 8 * hi;
    const uint8_t *eb = w->pends + (int64_t)b * runs * 2 + hi;
    __m256 acc = _mm256_setzero_ps();
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < runs; c++) {
        __m256i t = _mm256_setzero_si256();
        s = _mm256_add_epi32(s, _mm256_set1_epi32(corr[c]));
        for (int k = 32 * c; k < 32 * c + 32; k += 8) {
            s = _mm256_dpbusd_epi32(s, _mm256_loadu_si256((const __m256i *)(pb + 16 * k)), _mm512_castsi512_si256(x4(xq, k)));
            t = _mm256_dpbusd_epi32(t, _mm256_loadu_si256((const __m256i *)(pb + 16 * (k + 4))),
                                    _mm512_castsi512_si256(x4(xq, k + 4)));
        }
        s = _mm256_add_epi32(s, t);
        const __mmask8 ends = (__mmask8)eb[(int64_t)c * 2];
        if (ends) {
            __m256 sum = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(sb + (int64_t)c * 16)),
                                                          _mm256_set1_ps(xs[32 * c / gs])));
            acc = _mm256_mask_mov_ps(acc, ends, sum);
            s = _mm256_maskz_mov_epi32((__mmask8)~ends, s);
        }
    }
    _mm256_mask_storeu_ps(out + 16 * b + 8 * hi, half_lanes(16 * b + 8 * hi, r0, r1), acc);
}

AVX512_FN static void matmul_q8_span_avx512(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                            int gs, int r0, int r1) {
    const int runs = w->cols / 32;
    int32_t stack[STACK_RUNS], *corr = !w->pq || !w->pends ? NULL
                                       : runs <= STACK_RUNS ? stack : (int32_t *)malloc(sizeof(int32_t) * runs);
    if (!corr) {
        llama2_matmul_q8_rows(out, xq, xs, w, gs, r0, r1);
        return;
    }
    run_corrections(corr, xq, 0, runs);
    const block_plan bp = plan_blocks(r0, r1);
    if (bp.head) q8_span_half(out, xq, xs, w, gs, bp.b - 1, 1, corr, r0, r1);
    int b = bp.b;
    for (; b + 4 <= bp.b_end; b += 4) q8_span_blocks(out, xq, xs, w, gs, b, corr, r0, r1, 4);
    for (; b + 2 <= bp.b_end; b += 2) q8_span_blocks(out, xq, xs, w, gs, b, corr, r0, r1, 2);
    for (; b < bp.b_end; b++) q8_span_blocks(out, xq, xs, w, gs, b, corr, r0, r1, 1);
    if (bp.tail) q8_span_half(out, xq, xs, w, gs, bp.b_end, 0, corr, r0, r1);
    if (corr != stack) free(corr);
}

/* ---- attention ----
 *
 * Scores: the key cache's blocks of 8 positions (kernels.h) put dimension i
 * of 8 positions in 8 consecutive floats; two neighbouring blocks make the 16
 * lanes, each lane one position summing q[i] * k[i] for i = 0, 1, ... in
 * order, 4 vectors (64 positions) at once. Values: each lane is one output
 * dimension summing att[p] * v_p[i] for p = 0, 1, ... in order, up to 128
 * dimensions held in registers across the positions (the last vector
 * masked when the head size is not a multiple of 16). */

/* dimension i of the 16 positions of blocks b and b + 1 */
INLINE_AVX512 __m512 keys16(const float *k0, size_t bs, int i) {
    const __m256 lo = _mm256_loadu_ps(k0 + 8 * i), hi = _mm256_loadu_ps(k0 + bs + 8 * i);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

/* NV vectors of 16 positions (blocks b .. b + 2 * NV) in one pass: NV add chains */
INLINE_AVX512 void attn_scores_vectors(float *att, const float *q, const float *kt, int n, int hs, __m512 sc,
                                       int b, const int NV) {
    const size_t bs = (size_t)8 * hs; /* floats per block of 8 positions */
    const float *k0 = kt + (size_t)b * bs;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int i = 0; i < hs; i++) {
        const __m512 qi = _mm512_set1_ps(q[i]);
        s0 = _mm512_add_ps(s0, _mm512_mul_ps(qi, keys16(k0, bs, i)));
        if (NV > 1) s1 = _mm512_add_ps(s1, _mm512_mul_ps(qi, keys16(k0 + 2 * bs, bs, i)));
        if (NV > 2) s2 = _mm512_add_ps(s2, _mm512_mul_ps(qi, keys16(k0 + 4 * bs, bs, i)));
        if (NV > 3) s3 = _mm512_add_ps(s3, _mm512_mul_ps(qi, keys16(k0 + 6 * bs, bs, i)));
    }
    _mm512_mask_storeu_ps(att + 8 * b, llama2_lanes16(8 * b, 0, n), _mm512_div_ps(s0, sc));
    if (NV > 1) _mm512_mask_storeu_ps(att + 8 * b + 16, llama2_lanes16(8 * b + 16, 0, n), _mm512_div_ps(s1, sc));
    if (NV > 2) _mm512_mask_storeu_ps(att + 8 * b + 32, llama2_lanes16(8 * b + 32, 0, n), _mm512_div_ps(s2, sc));
    if (NV > 3) _mm512_mask_storeu_ps(att + 8 * b + 48, llama2_lanes16(8 * b + 48, 0, n), _mm512_div_ps(s3, sc));
}

AVX512_FN static void attn_scores_avx512(float *att, const float *q, const float *kt, int n, int hs, float scale) {
    const __m512 sc = _mm512_set1_ps(scale);
    const int blocks = (n + 7) / 8;
    int b = 0;
    for (; b + 8 <= blocks; b += 8) attn_scores_vectors(att, q, kt, n, hs, sc, b, 4);
    switch ((blocks - b) / 2) { /* what is left in one pass */
    case 3: attn_scores_vectors(att, q, kt, n, hs, sc, b, 3); b += 6; break;
    case 2: attn_scores_vectors(att, q, kt, n, hs, sc, b, 2); b += 4; break;
    case 1: attn_scores_vectors(att, q, kt, n, hs, sc, b, 1); b += 2; break;
    default: break;
    }
    if (b < blocks) { /* a last block of 8 on its own */
        const float *k0 = kt + (size_t)b * 8 * hs;
        __m256 s0 = _mm256_setzero_ps();
        for (int i = 0; i < hs; i++)
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_set1_ps(q[i]), _mm256_loadu_ps(k0 + 8 * i)));
        _mm256_mask_storeu_ps(att + 8 * b, (__mmask8)llama2_lanes16(8 * b, 0, n), _mm256_div_ps(s0, _mm512_castps512_ps256(sc)));
    }
}

/* NV vectors (16 * NV output dimensions) from out + i0, the last one through `last` */
INLINE_AVX512 void attn_values_vectors(float *out, const float *att, const float *v, int n, size_t stride, int i0,
                                       const int NV, __mmask16 last) {
    __m512 acc[8];
    UNROLL for (int k = 0; k < NV; k++) acc[k] = _mm512_setzero_ps();
    for (int p = 0; p < n; p++) {
        const float *vp = v + (size_t)p * stride + i0;
        const __m512 a = _mm512_set1_ps(att[p]);
        UNROLL for (int k = 0; k < NV; k++) {
            const __m512 vk = k + 1 < NV ? _mm512_loadu_ps(vp + 16 * k) : _mm512_maskz_loadu_ps(last, vp + 16 * k);
            acc[k] = _mm512_add_ps(acc[k], _mm512_mul_ps(a, vk));
        }
    }
    UNROLL for (int k = 0; k < NV; k++) _mm512_mask_storeu_ps(out + i0 + 16 * k, k + 1 < NV ? 0xffff : last, acc[k]);
}

AVX512_FN static void attn_values_avx512(float *out, const float *att, const float *v, int n, int hs, size_t stride) {
    int i0 = 0;
    for (; i0 + 128 <= hs; i0 += 128) attn_values_vectors(out, att, v, n, stride, i0, 8, 0xffff);
    const int left = hs - i0;
    const __mmask16 last = llama2_lanes16(0, 0, left - (left - 1) / 16 * 16);
    switch ((left + 15) / 16) {
    case 8: attn_values_vectors(out, att, v, n, stride, i0, 8, last); break;
    case 7: attn_values_vectors(out, att, v, n, stride, i0, 7, last); break;
    case 6: attn_values_vectors(out, att, v, n, stride, i0, 6, last); break;
    case 5: attn_values_vectors(out, att, v, n, stride, i0, 5, last); break;
    case 4: attn_values_vectors(out, att, v, n, stride, i0, 4, last); break;
    case 3: attn_values_vectors(out, att, v, n, stride, i0, 3, last); break;
    case 2: attn_values_vectors(out, att, v, n, stride, i0, 2, last); break;
    case 1: attn_values_vectors(out, att, v, n, stride, i0, 1, last); break;
    default: break;
    }
}

/* ---- quantizing an activation (quant.c's llama2_quantize, 16 lanes) ----
 * Per group: the largest |x| (a maximum is exact in any order), scale =
 * max / 127 as the scalar code divides it, then each x / scale (the same
 * IEEE division) rounded half away from zero: t = trunc(v), and one step
 * away from zero when the exact v - t reaches +-0.5, clamped to +-127 (only
 * a subnormal scale gets past). A group holding a NaN or an infinity gets a
 * NaN scale and zeros, a group of zeros a zero scale and zeros. A last
 * partial group (n % gs) goes to the scalar code. */
AVX512_FN static void quantize_avx512(int8_t *q, float *s, const float *x, int n, int gs) {
    if (gs % 16 != 0) {
        llama2_quantize(q, s, x, n, gs);
        return;
    }
    const __m512 fmax = _mm512_set1_ps(FLT_MAX), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    int start = 0, g = 0;
    for (; start + gs <= n; start += gs, g++) {
        __m512 vmax = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int i = start; i < start + gs; i += 16) {
            const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + i));
            vmax = _mm512_max_ps(vmax, v);
            bad |= _mm512_cmp_ps_mask(v, fmax, _CMP_NLE_UQ); /* NaN or infinity */
        }
        const float scale = bad ? NAN : _mm512_reduce_max_ps(vmax) / 127.0f;
        s[g] = scale;
        if (bad || scale == 0.0f) {
            memset(q + start, 0, (size_t)gs);
            continue;
        }
        const __m512 vs = _mm512_set1_ps(scale);
        for (int i = start; i < start + gs; i += 16) {
            const __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + i), vs);
            const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(v, t);
            __m512 r = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(f, half, _CMP_GE_OQ), t, one);
            r = _mm512_mask_sub_ps(r, _mm512_cmp_ps_mask(f, _mm512_sub_ps(_mm512_setzero_ps(), half), _CMP_LE_OQ), r, one);
            r = _mm512_min_ps(_mm512_max_ps(r, nlim), lim);
            _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r)));
        }
    }
    if (start < n) llama2_quantize(q + start, s + g, x + start, n - start, gs);
}

/* ---- exp() in 16 lanes (expf_simd.c: the algorithm, and why it gives
 * the C library's bits), and the two steps that take it ---- */
INLINE_AVX512 __m512d exp_pd8(__m512d xd) {
    const __m512d invln2n = _mm512_castsi512_pd(_mm512_set1_epi64((long long)LLAMA2_EXPF_INVLN2N));
    const __m512d shift = _mm512_castsi512_pd(_mm512_set1_epi64((long long)LLAMA2_EXPF_SHIFT));
    __m512d kd = _mm512_fmadd_pd(invln2n, xd, shift); /* k in the low bits */
    const __m512i ki = _mm512_castpd_si512(kd);
    kd = _mm512_sub_pd(kd, shift);
    const __m512d r = _mm512_fmsub_pd(invln2n, xd, kd);
    const __m512i t = _mm512_add_epi64(_mm512_i64gather_epi64(_mm512_and_si512(ki, _mm512_set1_epi64(31)),
                                                              (const void *)llama2_exp2_table, 8),
                                       _mm512_slli_epi64(ki, 47));
    const __m512d c0 = _mm512_castsi512_pd(_mm512_set1_epi64((long long)LLAMA2_EXPF_C0));
    const __m512d c1 = _mm512_castsi512_pd(_mm512_set1_epi64((long long)LLAMA2_EXPF_C1));
    const __m512d c2 = _mm512_castsi512_pd(_mm512_set1_epi64((long long)LLAMA2_EXPF_C2));
    const __m512d z = _mm512_fmadd_pd(c0, r, c1), r2 = _mm512_mul_pd(r, r);
    const __m512d y = _mm512_fmadd_pd(z, r2, _mm512_fmadd_pd(c2, r, _mm512_set1_pd(1.0)));
    return _mm512_mul_pd(y, _mm512_castsi512_pd(t));
}

INLINE_AVX512 __m512 exp_ps16(__m512 x) {
    const __m256 lo = _mm512_cvtpd_ps(exp_pd8(_mm512_cvtps_pd(_mm512_castps512_ps256(x))));
    const __m256 hi = _mm512_cvtpd_ps(exp_pd8(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))));
    __m512 y = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i top = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(0x7ff));
    const __mmask16 big = _mm512_cmpge_epi32_mask(top, _mm512_set1_epi32(LLAMA2_EXPF_BIG_TOP));
    if (big) { /* |x| >= 88, infinities, NaNs */
        const __m512 over = _mm512_castsi512_ps(_mm512_set1_epi32((int)LLAMA2_EXPF_OVER));
        const __m512 under = _mm512_castsi512_ps(_mm512_set1_epi32((int)LLAMA2_EXPF_UNDER));
        y = _mm512_mask_mov_ps(y, _mm512_mask_cmp_ps_mask(big, x, over, _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
        y = _mm512_mask_mov_ps(y, _mm512_mask_cmp_ps_mask(big, x, under, _CMP_LT_OQ), _mm512_setzero_ps());
        y = _mm512_mask_add_ps(y, _mm512_mask_cmpge_epi32_mask(big, top, _mm512_set1_epi32(0x7f8)), x, x);
        y = _mm512_mask_mov_ps(y, _mm512_cmpeq_epi32_mask(bits, _mm512_set1_epi32((int)0xff800000u)),
                               _mm512_setzero_ps());
    }
    return y;
}

AVX512_FN static void expf_avx512(float *out, const float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = llama2_lanes16(i, 0, n);
        _mm512_mask_storeu_ps(out + i, m, exp_ps16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static int expf_avx512_agrees(void) {
    static volatile int state; /* 0: not checked yet, 1: agrees, -1: does not (checking twice is harmless) */
    if (!state) state = llama2_expf_agrees(expf_avx512) ? 1 : -1;
    return state > 0;
}

AVX512_FN static void swiglu_avx512(float *hb, const float *hb2, int n) {
    if (!expf_avx512_agrees()) {
        llama2_swiglu(hb, hb2, n);
        return;
    }
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = llama2_lanes16(i, 0, n);
        const __m512 v = _mm512_maskz_loadu_ps(m, hb + i);
        const __m512 minus_v = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
        const __m512 gate = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps16(minus_v)));
        _mm512_mask_storeu_ps(hb + i, m, _mm512_mul_ps(_mm512_mul_ps(v, gate), _mm512_maskz_loadu_ps(m, hb2 + i)));
    }
}

/* the maximum per lane as the scalar loop takes it (x[0], then strictly
 * greater values), then the exps in lanes, the sum in the scalar loop's
 * order, and the divisions */
AVX512_FN static void softmax_avx512(float *x, int n) {
    if (n < 16 || !expf_avx512_agrees()) {
        llama2_softmax(x, n);
        return;
    }
    __m512 mx = _mm512_set1_ps(x[0]);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = llama2_lanes16(i, 0, n);
        const __m512 v = _mm512_mask_loadu_ps(mx, m, x + i);
        mx = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(v, mx, _CMP_GT_OQ), v);
    }
    ALIGN64 float lanes[16];
    _mm512_store_ps(lanes, mx);
    float max_val = lanes[0];
    for (int i = 1; i < 16; i++)
        if (lanes[i] > max_val) max_val = lanes[i];
    const __m512 vmax = _mm512_set1_ps(max_val);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = llama2_lanes16(i, 0, n);
        _mm512_mask_storeu_ps(x + i, m, exp_ps16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmax)));
    }
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += x[i];
    const __m512 vsum = _mm512_set1_ps(sum);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = llama2_lanes16(i, 0, n);
        _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), vsum));
    }
}

/* the AVX-512 table; "avx512-amx" (kernels_amx.c) differs only in its
 * batched int8 kernel */
#define AVX512_TABLE(tier_name, q8_batch)                                                  \
    {                                                                                      \
        .name = tier_name, .packs = 1, .pack_rows = 16, .f32_stream_rows = 8,              \
        .q8_format = LLAMA2_Q8_BIASED, .matmul_f32 = matmul_f32_avx512,                    \
        .matmul_f32_batch = matmul_f32_batch_avx512, .matmul_q8_span = matmul_q8_span_avx512, \
        .matmul_bf16 = matmul_bf16_avx512, .matmul_bf16_batch = matmul_bf16_batch_avx512,  \
        .matmul_q8 = matmul_q8_avx512, .matmul_q4 = llama2_matmul_q4_avx512, /* kernels_q4.c */ \
        .matmul_q4_batch = llama2_matmul_q4_batch_avx512, .matmul_q8_batch = q8_batch,     \
        .quantize = quantize_avx512, .attn_scores = attn_scores_avx512,                     \
        .attn_values = attn_values_avx512, .swiglu = swiglu_avx512,                        \
        .softmax = softmax_avx512, .exp_lanes = expf_avx512,                               \
    }

const llama2_kernels llama2_kernels_avx512 = AVX512_TABLE("avx512", llama2_matmul_q8_batch_avx512);
#if defined(LLAMA2_HAVE_AMX_KERNELS)
const llama2_kernels llama2_kernels_avx512_amx = AVX512_TABLE("avx512-amx", llama2_matmul_q8_batch_amx);
#endif
#endif
