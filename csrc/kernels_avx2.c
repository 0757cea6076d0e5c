/*
 * kernels_avx2.c - AVX2 matrix-vector kernels (x86-64), compiled for any
 * x86-64 and used only when the CPU has AVX2 and FMA (see kernels.c).
 *
 * fp32 and bf16: weights packed 8 rows per block (kernels.h), bf16 widened
 * to fp32 on load; each of the 8 lanes of an accumulator is one row, summing
 * w[r][j] * x[j] for j = 0, 1, ... exactly as the scalar loop does: fp32 with
 * a separate multiply and add (llama2.c's arithmetic), bf16 with one fused
 * multiply-add per weight (the bf16 kernels' arithmetic, kernels_scalar.c).
 * Four blocks run at once to hide the add latency.
 *
 * int8: see the int8 section below.
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define AVX2_FN __attribute__((target("avx2,fma")))
#else
#define AVX2_FN
#endif

AVX2_FN static void store_rows(float *out, __m256 v, int row, int r1) {
    if (row + 8 <= r1) {
        _mm256_storeu_ps(out + row, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        for (int r = 0; row + r < r1; r++) out[row + r] = tmp[r];
    }
}

/* Eight packed weights (one column of a row block) as fp32: bf16 widens
 * exactly by a 16-bit shift. `bf16` is a constant in every caller, so each
 * kernel below is compiled twice, once per weight type. */
#if defined(__GNUC__) || defined(__clang__)
#define INLINE_AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline
#else
#define INLINE_AVX2 static __forceinline
#endif
INLINE_AVX2 __m256 load_w(const void *p, size_t i, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)p + i);
}

/* acc + w * x: rounded twice for fp32 weights, once (fused) for bf16 */
INLINE_AVX2 __m256 mac(__m256 acc, __m256 w, __m256 x, int bf16) {
    return bf16 ? _mm256_fmadd_ps(w, x, acc) : _mm256_add_ps(acc, _mm256_mul_ps(w, x));
}

/* Four blocks at a time keep the adds busy. A big fp32 matrix with long
 * rows (8 MB and more, 1024 columns and more: TinyLlama's, not the small
 * models' classifiers) goes one block at a time instead: there a single
 * sequential stream reads faster than four 8-row streams 32 KB or more
 * apart, and one add chain per block is still quicker than memory. That
 * stream also asks for the line STREAM_AHEAD bytes ahead of each one it
 * reads (TinyLlama fp32 decode +10-15% at 1 and 2 threads, measured with
 * the two kernels alternating token by token in one process). */
#define STREAM_AHEAD 512
INLINE_AVX2 void matmul_dense(float *out, const float *x, const void *p, int n, int r0, int r1, int bf16,
                              int one_stream) {
    int b = r0 / 8, b_end = (r1 + 7) / 8;
    for (; !one_stream && b + 4 <= b_end; b += 4) {
        const size_t p0 = (size_t)b * n * 8, p1 = p0 + (size_t)n * 8, p2 = p1 + (size_t)n * 8,
                     p3 = p2 + (size_t)n * 8;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n; j++) {
            __m256 xj = _mm256_broadcast_ss(x + j);
            a0 = mac(a0, load_w(p, p0 + 8 * j, bf16), xj, bf16);
            a1 = mac(a1, load_w(p, p1 + 8 * j, bf16), xj, bf16);
            a2 = mac(a2, load_w(p, p2 + 8 * j, bf16), xj, bf16);
            a3 = mac(a3, load_w(p, p3 + 8 * j, bf16), xj, bf16);
        }
        store_rows(out, a0, 8 * b, r1);
        store_rows(out, a1, 8 * (b + 1), r1);
        store_rows(out, a2, 8 * (b + 2), r1);
        store_rows(out, a3, 8 * (b + 3), r1);
    }
    for (; b < b_end; b++) {
        const size_t p0 = (size_t)b * n * 8;
        __m256 a0 = _mm256_setzero_ps();
        int j = 0;
        for (; one_stream && !bf16 && j + 2 <= n; j += 2) { /* one 64-byte line per step */
            _mm_prefetch((const char *)((const float *)p + p0 + 8 * j) + STREAM_AHEAD, _MM_HINT_T0);
            a0 = mac(a0, load_w(p, p0 + 8 * j, bf16), _mm256_broadcast_ss(x + j), bf16);
            a0 = mac(a0, load_w(p, p0 + 8 * j + 8, bf16), _mm256_broadcast_ss(x + j + 1), bf16);
        }
        for (; j < n; j++)
            a0 = mac(a0, load_w(p, p0 + 8 * j, bf16), _mm256_broadcast_ss(x + j), bf16);
        store_rows(out, a0, 8 * b, r1);
    }
}

AVX2_FN static void matmul_f32_avx2(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    matmul_dense(out, x, w->p, w->cols, r0, r1, 0, llama2_f32_stream(w)); /* kernels.h */
}

AVX2_FN static void matmul_bf16_avx2(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    matmul_dense(out, x, w->ph, w->cols, r0, r1, 1, 0);
}

/* The first r1 - row lanes of out + row (the rest zero): a partial sum
 * parked between column tiles. */
AVX2_FN static __m256 load_rows(const float *out, int row, int r1) {
    if (row + 8 <= r1) return _mm256_loadu_ps(out + row);
    float tmp[8] = {0};
    for (int r = 0; row + r < r1; r++) tmp[r] = out[row + r];
    return _mm256_loadu_ps(tmp);
}

/* Batched fp32 and bf16 product (prefill): a 2-block x 6-token tile of 12
 * accumulators (12 independent add chains, 15 of the 16 registers, no
 * spills), so each weight vector loaded serves 6 tokens and each broadcast
 * x value 2 row blocks; 4-token and single-token tiles take what is left.
 * A block pair's columns go in tiles of F32_TILE whose weights (16 KB)
 * stay in L1 while every token of the batch uses them, while the next
 * tile's weights are prefetched; between tiles a sum is parked in out and
 * picked up again, so every output is still w[r][0]*x[0] + w[r][1]*x[1] +
 * ... in order, exactly as the scalar loop of its weight type. */
#define F32_TILE 256
#define ACC(o, row) (j0 == 0 ? _mm256_setzero_ps() : load_rows((o), (row), r1))
#define MULADD(c, w, x) c = mac(c, (w), (x), bf16)

/* The weights of the next tile, fetched towards L2 a few lines per token
 * group while this tile computes: its first pass then need not wait on
 * memory. Two streams (one per block), `left` lines each. */
typedef struct {
    const char *a, *b;
    int left;
} prefetch_stream;

INLINE_AVX2 void prefetch_some(prefetch_stream *ps, int lines) {
    for (; lines > 0 && ps->left > 0; lines--, ps->left--, ps->a += 64, ps->b += 64) {
        _mm_prefetch(ps->a, _MM_HINT_T1);
        _mm_prefetch(ps->b, _MM_HINT_T1);
    }
}

INLINE_AVX2 void matmul_dense_batch(float *out, size_t os, const llama2_activation *a, int nt, const void *p,
                                    int n, int r0, int r1, int bf16) {
    const int b_first = r0 / 8, b_end = (r1 + 7) / 8;
    /* bf16 tiles are widened once into this buffer, then every token uses fp32 */
    float wide[2 * F32_TILE * 8];
    for (int b = b_first; b < b_end; b += 2) {
        const int two = b + 1 < b_end, row = 8 * b;
        const size_t p0 = (size_t)b * n * 8, p1 = p0 + (size_t)n * 8;
        for (int j0 = 0; j0 < n; j0 += F32_TILE) { /* the two blocks' weights stream in order */
            const int j1 = j0 + F32_TILE < n ? j0 + F32_TILE : n, m = j1 - j0;
            const float *w0p, *w1p; /* the tile's columns j0..j1 of both blocks, 8 floats each */
            const size_t es = bf16 ? 2 : 4;
            prefetch_stream next = {0, 0, 0}; /* the same blocks' next columns, or the next pair's first */
            if (j1 < n) {
                int mn = n - j1 < F32_TILE ? n - j1 : F32_TILE;
                next = (prefetch_stream){(const char *)p + (p0 + 8 * (size_t)j1) * es,
                                         (const char *)p + (p1 + 8 * (size_t)j1) * es, (int)((mn * 8 * es + 63) / 64)};
            } else if (b + 2 < b_end) {
                int mn = n < F32_TILE ? n : F32_TILE;
                next = (prefetch_stream){(const char *)p + (p1 + (size_t)n * 8) * es,
                                         (const char *)p + (p1 + (size_t)n * 16) * es, (int)((mn * 8 * es + 63) / 64)};
            }
            const int per_group = next.left / 6 + 1; /* spread over the first token groups */
            if (bf16) {
                for (int j = 0; j < m; j++) {
                    _mm256_storeu_ps(wide + 8 * j, load_w(p, p0 + 8 * (size_t)(j0 + j), 1));
                    if (two) _mm256_storeu_ps(wide + 8 * (F32_TILE + j), load_w(p, p1 + 8 * (size_t)(j0 + j), 1));
                }
                w0p = wide;
                w1p = wide + 8 * F32_TILE;
            } else {
                w0p = (const float *)p + p0 + 8 * (size_t)j0;
                w1p = (const float *)p + p1 + 8 * (size_t)j0;
            }
            int t = 0;
            for (; two && t + 6 <= nt; t += 6) { /* 2 blocks x 6 tokens: 12 accumulators */
                prefetch_some(&next, per_group);
                const float *x0 = a[t].x + j0, *x1 = a[t + 1].x + j0, *x2 = a[t + 2].x + j0, *x3 = a[t + 3].x + j0,
                            *x4 = a[t + 4].x + j0, *x5 = a[t + 5].x + j0;
                float *o0 = out + (size_t)t * os, *o1 = o0 + os, *o2 = o1 + os, *o3 = o2 + os, *o4 = o3 + os,
                      *o5 = o4 + os;
                __m256 c00 = ACC(o0, row), c01 = ACC(o1, row), c02 = ACC(o2, row), c03 = ACC(o3, row),
                       c04 = ACC(o4, row), c05 = ACC(o5, row);
                __m256 c10 = ACC(o0, row + 8), c11 = ACC(o1, row + 8), c12 = ACC(o2, row + 8),
                       c13 = ACC(o3, row + 8), c14 = ACC(o4, row + 8), c15 = ACC(o5, row + 8);
                for (int j = 0; j < m; j++) {
                    __m256 w0 = _mm256_loadu_ps(w0p + 8 * j), w1 = _mm256_loadu_ps(w1p + 8 * j), xj;
                    xj = _mm256_broadcast_ss(x0 + j); MULADD(c00, w0, xj); MULADD(c10, w1, xj);
                    xj = _mm256_broadcast_ss(x1 + j); MULADD(c01, w0, xj); MULADD(c11, w1, xj);
                    xj = _mm256_broadcast_ss(x2 + j); MULADD(c02, w0, xj); MULADD(c12, w1, xj);
                    xj = _mm256_broadcast_ss(x3 + j); MULADD(c03, w0, xj); MULADD(c13, w1, xj);
                    xj = _mm256_broadcast_ss(x4 + j); MULADD(c04, w0, xj); MULADD(c14, w1, xj);
                    xj = _mm256_broadcast_ss(x5 + j); MULADD(c05, w0, xj); MULADD(c15, w1, xj);
                }
                store_rows(o0, c00, row, r1); store_rows(o1, c01, row, r1); store_rows(o2, c02, row, r1);
                store_rows(o3, c03, row, r1); store_rows(o4, c04, row, r1); store_rows(o5, c05, row, r1);
                store_rows(o0, c10, row + 8, r1); store_rows(o1, c11, row + 8, r1); store_rows(o2, c12, row + 8, r1);
                store_rows(o3, c13, row + 8, r1); store_rows(o4, c14, row + 8, r1); store_rows(o5, c15, row + 8, r1);
            }
            for (; two && t + 4 <= nt; t += 4) {
                const float *x0 = a[t].x + j0, *x1 = a[t + 1].x + j0, *x2 = a[t + 2].x + j0, *x3 = a[t + 3].x + j0;
                float *o0 = out + (size_t)t * os, *o1 = o0 + os, *o2 = o1 + os, *o3 = o2 + os;
                __m256 c00 = ACC(o0, row), c01 = ACC(o1, row), c02 = ACC(o2, row), c03 = ACC(o3, row);
                __m256 c10 = ACC(o0, row + 8), c11 = ACC(o1, row + 8), c12 = ACC(o2, row + 8),
                       c13 = ACC(o3, row + 8);
                for (int j = 0; j < m; j++) {
                    __m256 w0 = _mm256_loadu_ps(w0p + 8 * j), w1 = _mm256_loadu_ps(w1p + 8 * j), xj;
                    xj = _mm256_broadcast_ss(x0 + j); MULADD(c00, w0, xj); MULADD(c10, w1, xj);
                    xj = _mm256_broadcast_ss(x1 + j); MULADD(c01, w0, xj); MULADD(c11, w1, xj);
                    xj = _mm256_broadcast_ss(x2 + j); MULADD(c02, w0, xj); MULADD(c12, w1, xj);
                    xj = _mm256_broadcast_ss(x3 + j); MULADD(c03, w0, xj); MULADD(c13, w1, xj);
                }
                store_rows(o0, c00, row, r1); store_rows(o1, c01, row, r1);
                store_rows(o2, c02, row, r1); store_rows(o3, c03, row, r1);
                store_rows(o0, c10, row + 8, r1); store_rows(o1, c11, row + 8, r1);
                store_rows(o2, c12, row + 8, r1); store_rows(o3, c13, row + 8, r1);
            }
            for (; !two && t + 4 <= nt; t += 4) { /* a last single block */
                const float *x0 = a[t].x + j0, *x1 = a[t + 1].x + j0, *x2 = a[t + 2].x + j0, *x3 = a[t + 3].x + j0;
                float *o0 = out + (size_t)t * os, *o1 = o0 + os, *o2 = o1 + os, *o3 = o2 + os;
                __m256 c0 = ACC(o0, row), c1 = ACC(o1, row), c2 = ACC(o2, row), c3 = ACC(o3, row);
                for (int j = 0; j < m; j++) {
                    __m256 w0 = _mm256_loadu_ps(w0p + 8 * j);
                    MULADD(c0, w0, _mm256_broadcast_ss(x0 + j));
                    MULADD(c1, w0, _mm256_broadcast_ss(x1 + j));
                    MULADD(c2, w0, _mm256_broadcast_ss(x2 + j));
                    MULADD(c3, w0, _mm256_broadcast_ss(x3 + j));
                }
                store_rows(o0, c0, row, r1); store_rows(o1, c1, row, r1);
                store_rows(o2, c2, row, r1); store_rows(o3, c3, row, r1);
            }
            for (; t < nt; t++) { /* leftover tokens, one at a time */
                const float *x0 = a[t].x + j0;
                float *o0 = out + (size_t)t * os;
                __m256 c0 = ACC(o0, row), c1 = two ? ACC(o0, row + 8) : _mm256_setzero_ps();
                for (int j = 0; j < m; j++) {
                    __m256 xj = _mm256_broadcast_ss(x0 + j);
                    MULADD(c0, _mm256_loadu_ps(w0p + 8 * j), xj);
                    if (two) MULADD(c1, _mm256_loadu_ps(w1p + 8 * j), xj);
                }
                store_rows(o0, c0, row, r1);
                if (two) store_rows(o0, c1, row + 8, r1);
            }
        }
    }
}

AVX2_FN static void matmul_f32_batch_avx2(float *out, size_t os, const llama2_activation *a, int nt,
                                          const llama2_matrix *w, int r0, int r1) {
    matmul_dense_batch(out, os, a, nt, w->p, w->cols, r0, r1, 0);
}

AVX2_FN static void matmul_bf16_batch_avx2(float *out, size_t os, const llama2_activation *a, int nt,
                                           const llama2_matrix *w, int r0, int r1) {
    matmul_dense_batch(out, os, a, nt, w->ph, w->cols, r0, r1, 1);
}
#undef ACC
#undef MULADD

/* ---- int8 (Q8_0) ----
 *
 * Regrouped weights (w->pq, kernels.h) hold, for each block of 8 rows, 4
 * consecutive columns of all 8 rows in one 32-byte vector. Broadcasting 4
 * activation bytes against it, maddubs + madd leave one int32 per lane, that
 * is per row: the rows' dot products build up lane by lane with no
 * horizontal sums. The product of a group is exact in int32, then per lane
 * val += ((float)isum * w_scale) * x_scale, the scalar order, so every
 * output is bit-identical to llama2_matmul_q8_rows. The sign trick puts
 * x's sign on w and multiplies by |x|, which needs |w| <= 127 (a -128 in a
 * hand-made file leaves pq NULL and the in-place path below runs). */

/* 4 bytes of x at k as one int32 broadcast to every lane */
INLINE_AVX2 __m256i x4(const int8_t *xq, int k) {
    int32_t v;
    memcpy(&v, xq + k, 4);
    return _mm256_set1_epi32(v);
}

/* s += per-row dot products of 4 columns: |x| * (w with x's sign) */
INLINE_AVX2 __m256i dot4(__m256i s, __m256i ux, __m256i xb, __m256i w) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(ux, _mm256_sign_epi8(w, xb)), ones));
}

/* val += ((float)isum * ws) * xs, lane by lane */
INLINE_AVX2 __m256 scale_add(__m256 val, __m256i isum, const float *ws, float xs) {
    return _mm256_add_ps(val, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_loadu_ps(ws)),
                                            _mm256_set1_ps(xs)));
}

/* NB consecutive row blocks (8 rows each) from `row`, one token */
INLINE_AVX2 void q8_blocks(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs, int row,
                           const int NB) {
    const int n = w->cols, groups = n / gs;
    const int8_t *pb = w->pq + (int64_t)(row / 8) * 8 * n;    /* NB blocks follow one another */
    const float *sb = w->ps + (int64_t)(row / 8) * groups * 8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < groups; g++) {
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        for (int k = g * gs; k < (g + 1) * gs; k += 4) {
            __m256i xb = x4(xq, k), ux = _mm256_sign_epi8(xb, xb);
            for (int b = 0; b < NB; b++)
                s[b] = dot4(s[b], ux, xb, _mm256_loadu_si256((const __m256i *)(pb + (int64_t)b * 8 * n + 8 * k)));
        }
        for (int b = 0; b < NB; b++) acc[b] = scale_add(acc[b], s[b], sb + ((int64_t)b * groups + g) * 8, xs[g]);
    }
    for (int b = 0; b < NB; b++) _mm256_storeu_ps(out + row + 8 * b, acc[b]);
}

/* int32 dot-product partial sums of 32 int8 pairs, added into acc (in-place rows) */
AVX2_FN static inline __m256i dot32(__m256i acc, __m256i x, __m256i w) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i aw = _mm256_sign_epi8(w, w);       /* |w| as unsigned bytes */
    __m256i sx = _mm256_sign_epi8(x, w);       /* x with w's sign */
    __m256i pairs = _mm256_maddubs_epi16(aw, sx); /* |w|*x*sign: at most 2*128*127, no saturation */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}

/* 8 vectors of partial sums -> one vector holding each one's total */
AVX2_FN static inline __m256i sum8(__m256i s0, __m256i s1, __m256i s2, __m256i s3, __m256i s4,
                                   __m256i s5, __m256i s6, __m256i s7) {
    __m256i h01 = _mm256_hadd_epi32(s0, s1), h23 = _mm256_hadd_epi32(s2, s3);
    __m256i h45 = _mm256_hadd_epi32(s4, s5), h67 = _mm256_hadd_epi32(s6, s7);
    __m256i q0 = _mm256_hadd_epi32(h01, h23); /* rows 0-3, per 128-bit half */
    __m256i q1 = _mm256_hadd_epi32(h45, h67); /* rows 4-7 */
    __m256i lo = _mm256_permute2x128_si256(q0, q1, 0x20);
    __m256i hi = _mm256_permute2x128_si256(q0, q1, 0x31);
    return _mm256_add_epi32(lo, hi);
}

/* 8 rows in place (row-major int8, scales per row): any value, -128 included */
AVX2_FN static void q8_rows_in_place(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                     int gs, int i) {
    const int n = w->cols, groups = n / gs, chunks = gs / 32;
    const int8_t *w0 = w->q + (int64_t)i * n;
    const float *sr = w->s + (int64_t)i * groups;
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
        for (int c = 0, off = g * gs; c < chunks; c++, off += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + off));
#define DOT_ROW(k) s##k = dot32(s##k, xv, _mm256_loadu_si256((const __m256i *)(w0 + (int64_t)k * n + off)))
            DOT_ROW(0); DOT_ROW(1); DOT_ROW(2); DOT_ROW(3);
            DOT_ROW(4); DOT_ROW(5); DOT_ROW(6); DOT_ROW(7);
#undef DOT_ROW
        }
        __m256i isum = sum8(s0, s1, s2, s3, s4, s5, s6, s7);
        __m256 ws = _mm256_set_ps(sr[7 * groups + g], sr[6 * groups + g], sr[5 * groups + g], sr[4 * groups + g],
                                  sr[3 * groups + g], sr[2 * groups + g], sr[groups + g], sr[g]);
        __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), ws), _mm256_set1_ps(xs[g]));
        acc = _mm256_add_ps(acc, t);
    }
    _mm256_storeu_ps(out + i, acc);
}

AVX2_FN static void matmul_q8_avx2(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                   int gs, int r0, int r1) {
    int i = r0;
    if (w->pq) {
        for (; i + 32 <= r1; i += 32) q8_blocks(out, xq, xs, w, gs, i, 4);
        for (; i + 16 <= r1; i += 16) q8_blocks(out, xq, xs, w, gs, i, 2);
        for (; i + 8 <= r1; i += 8) q8_blocks(out, xq, xs, w, gs, i, 1);
    } else {
        for (; i + 8 <= r1; i += 8) q8_rows_in_place(out, xq, xs, w, gs, i);
    }
    if (i < r1) llama2_kernels_scalar.matmul_q8(out, xq, xs, w, gs, i, r1);
}

/* Rows whose groups run across row boundaries (w2 of stories42M: hidden
 * 1376, groups of 64). The scalar loop goes segment by segment, where both
 * the weight group and the activation group stay the same; n and gs are
 * multiples of 32, so every boundary falls between 32-column runs. Each
 * segment is an exact int32 dot product, then val += ((float)isum *
 * w_scale) * x_scale as the scalar loop does: bit-identical to it. */

/* One row on its own (rows outside whole blocks, or no regrouped layout) */
AVX2_FN static float q8_span_row(const int8_t *xq, const float *xs, const llama2_matrix *w, int gs, int i) {
    const int n = w->cols;
    const int64_t base = (int64_t)i * n;
    const int8_t *wq = w->q + base;
    float val = 0.0f;
    for (int j = 0; j < n;) {
        const int64_t wg = (base + j) / gs;
        const int xg = j / gs;
        int end = n;
        if (wg * gs + gs - base < end) end = (int)(wg * gs + gs - base);
        if ((xg + 1) * gs < end) end = (xg + 1) * gs;
        __m256i s = _mm256_setzero_si256();
        for (int k = j; k < end; k += 32)
            s = dot32(s, _mm256_loadu_si256((const __m256i *)(xq + k)), _mm256_loadu_si256((const __m256i *)(wq + k)));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
        val += ((float)_mm_cvtsi128_si32(h)) * w->s[wg] * xs[xg];
        j = end;
    }
    return val;
}

/* NB whole blocks from `row` in the regrouped layout: the lanes' int32 sums
 * run on over 32-column runs; after each run the lanes whose segment ends
 * there (pends) add it to their value and start again from zero, the other
 * lanes keep both unchanged. */
INLINE_AVX2 void q8_span_blocks(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs,
                                int row, const int NB) {
    const int n = w->cols, runs = n / 32;
    const int8_t *pb = w->pq + (int64_t)(row / 8) * 8 * n;
    const float *sb = w->ps + (int64_t)(row / 8) * runs * 8;
    const uint8_t *eb = w->pends + (int64_t)(row / 8) * runs;
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                    _mm256_setzero_si256()};
    for (int c = 0; c < runs; c++) {
        for (int k = 32 * c; k < 32 * c + 32; k += 4) {
            __m256i xb = x4(xq, k), ux = _mm256_sign_epi8(xb, xb);
            for (int b = 0; b < NB; b++)
                s[b] = dot4(s[b], ux, xb, _mm256_loadu_si256((const __m256i *)(pb + (int64_t)b * 8 * n + 8 * k)));
        }
        const float x_scale = xs[32 * c / gs];
        for (int b = 0; b < NB; b++) {
            const int ends = eb[(int64_t)b * runs + c];
            if (!ends) continue;
            __m256 sum = scale_add(acc[b], s[b], sb + ((int64_t)b * runs + c) * 8, x_scale);
            if (ends == 0xff) {
                acc[b] = sum;
                s[b] = _mm256_setzero_si256();
            } else {
                __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(ends), lane_bit), lane_bit);
                acc[b] = _mm256_blendv_ps(acc[b], sum, _mm256_castsi256_ps(m));
                s[b] = _mm256_andnot_si256(m, s[b]);
            }
        }
    }
    for (int b = 0; b < NB; b++) _mm256_storeu_ps(out + row + 8 * b, acc[b]);
}

AVX2_FN static void matmul_q8_span_avx2(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                        int gs, int r0, int r1) {
    int i = r0;
    if (w->pq && w->pends) {
        for (; i < r1 && i % 8; i++) out[i] = q8_span_row(xq, xs, w, gs, i);
        for (; i + 32 <= r1; i += 32) q8_span_blocks(out, xq, xs, w, gs, i, 4);
        for (; i + 16 <= r1; i += 16) q8_span_blocks(out, xq, xs, w, gs, i, 2);
        for (; i + 8 <= r1; i += 8) q8_span_blocks(out, xq, xs, w, gs, i, 1);
    }
    for (; i < r1; i++) out[i] = q8_span_row(xq, xs, w, gs, i);
}

/* ---- attention ----
 *
 * Scores: the key cache's blocked layout (kernels.h) puts dimension i of 8
 * positions in one vector, so each lane is one position summing q[i] * k[i]
 * for i = 0, 1, ... in order, 4 blocks (32 positions) at once. Values: each
 * lane is one output dimension summing att[p] * v_p[i] for p = 0, 1, ... in
 * order, up to 64 dimensions held in registers across the positions. */
AVX2_FN static void attn_scores_avx2(float *att, const float *q, const float *kt, int n, int hs, float scale) {
    const __m256 sc = _mm256_set1_ps(scale);
    const size_t bs = (size_t)8 * hs; /* floats per block of 8 positions */
    const int blocks = (n + 7) / 8;
    int b = 0;
    for (; b + 4 <= blocks; b += 4) {
        const float *k0 = kt + (size_t)b * bs;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int i = 0; i < hs; i++) {
            __m256 qi = _mm256_broadcast_ss(q + i);
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(qi, _mm256_loadu_ps(k0 + 8 * i)));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(qi, _mm256_loadu_ps(k0 + bs + 8 * i)));
            s2 = _mm256_add_ps(s2, _mm256_mul_ps(qi, _mm256_loadu_ps(k0 + 2 * bs + 8 * i)));
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(qi, _mm256_loadu_ps(k0 + 3 * bs + 8 * i)));
        }
        store_rows(att, _mm256_div_ps(s0, sc), 8 * b, n);
        store_rows(att, _mm256_div_ps(s1, sc), 8 * (b + 1), n);
        store_rows(att, _mm256_div_ps(s2, sc), 8 * (b + 2), n);
        store_rows(att, _mm256_div_ps(s3, sc), 8 * (b + 3), n);
    }
    for (; b < blocks; b++) {
        const float *k0 = kt + (size_t)b * bs;
        __m256 s0 = _mm256_setzero_ps();
        for (int i = 0; i < hs; i++)
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_broadcast_ss(q + i), _mm256_loadu_ps(k0 + 8 * i)));
        store_rows(att, _mm256_div_ps(s0, sc), 8 * b, n);
    }
}

/* NV vectors (8 * NV output dimensions) from out + i0 */
INLINE_AVX2 void attn_values_vectors(float *out, const float *att, const float *v, int n, size_t stride, int i0,
                                     const int NV) {
    __m256 acc[8];
    for (int k = 0; k < NV; k++) acc[k] = _mm256_setzero_ps();
    for (int p = 0; p < n; p++) {
        const float *vp = v + (size_t)p * stride + i0;
        __m256 a = _mm256_broadcast_ss(att + p);
        for (int k = 0; k < NV; k++) acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(a, _mm256_loadu_ps(vp + 8 * k)));
    }
    for (int k = 0; k < NV; k++) _mm256_storeu_ps(out + i0 + 8 * k, acc[k]);
}

AVX2_FN static void attn_values_avx2(float *out, const float *att, const float *v, int n, int hs, size_t stride) {
    int i0 = 0;
    for (; i0 + 64 <= hs; i0 += 64) attn_values_vectors(out, att, v, n, stride, i0, 8);
    switch ((hs - i0) / 8) {
    case 7: attn_values_vectors(out, att, v, n, stride, i0, 7); break;
    case 6: attn_values_vectors(out, att, v, n, stride, i0, 6); break;
    case 5: attn_values_vectors(out, att, v, n, stride, i0, 5); break;
    case 4: attn_values_vectors(out, att, v, n, stride, i0, 4); break;
    case 3: attn_values_vectors(out, att, v, n, stride, i0, 3); break;
    case 2: attn_values_vectors(out, att, v, n, stride, i0, 2); break;
    case 1: attn_values_vectors(out, att, v, n, stride, i0, 1); break;
    default: break;
    }
    for (int i = i0 + (hs - i0) / 8 * 8; i < hs; i++) { /* dimensions past the last whole vector */
        float o = 0.0f;
        for (int p = 0; p < n; p++) o += att[p] * v[(size_t)p * stride + i];
        out[i] = o;
    }
}

/* ---- quantizing an activation: quant.c's llama2_quantize, 8 lanes (the
 * method of the AVX-512 version, kernels_avx512.c) ---- */
AVX2_FN static void quantize_avx2(int8_t *q, float *s, const float *x, int n, int gs) {
    if (gs % 8 != 0) {
        llama2_quantize(q, s, x, n, gs);
        return;
    }
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(FLT_MAX), half = _mm256_set1_ps(0.5f);
    const __m256 nhalf = _mm256_set1_ps(-0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    int start = 0, g = 0;
    for (; start + gs <= n; start += gs, g++) {
        __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int i = start; i < start + gs; i += 8) {
            const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
            vmax = _mm256_max_ps(vmax, v);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, fmax, _CMP_NLE_UQ)); /* NaN or infinity */
        }
        float lanes[8], wmax = 0.0f;
        _mm256_storeu_ps(lanes, vmax);
        for (int i = 0; i < 8; i++) wmax = lanes[i] > wmax ? lanes[i] : wmax;
        const int nonfinite = _mm256_movemask_ps(bad) != 0;
        const float scale = nonfinite ? NAN : wmax / 127.0f;
        s[g] = scale;
        if (nonfinite || scale == 0.0f) {
            memset(q + start, 0, (size_t)gs);
            continue;
        }
        const __m256 vs = _mm256_set1_ps(scale);
        for (int i = start; i < start + gs; i += 8) {
            const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), vs);
            const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(v, t);
            __m256 r = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(f, half, _CMP_GE_OQ), one));
            r = _mm256_sub_ps(r, _mm256_and_ps(_mm256_cmp_ps(f, nhalf, _CMP_LE_OQ), one));
            r = _mm256_min_ps(_mm256_max_ps(r, nlim), lim);
            const __m256i i32 = _mm256_cvttps_epi32(r);
            const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
            _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(i16, i16));
        }
    }
    if (start < n) llama2_quantize(q + start, s + g, x + start, n - start, gs);
}

/* ---- exp() in 8 lanes (expf_simd.c: the algorithm, and why it gives the
 * C library's bits), and the two steps that take it ---- */
AVX2_FN static inline __m256d exp_pd4(__m256d xd) {
    const __m256d invln2n = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)LLAMA2_EXPF_INVLN2N));
    const __m256d shift = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)LLAMA2_EXPF_SHIFT));
    __m256d kd = _mm256_fmadd_pd(invln2n, xd, shift); /* k in the low bits */
    const __m256i ki = _mm256_castpd_si256(kd);
    kd = _mm256_sub_pd(kd, shift);
    const __m256d r = _mm256_fmsub_pd(invln2n, xd, kd);
    const __m256i t = _mm256_add_epi64(_mm256_i64gather_epi64((const long long *)llama2_exp2_table,
                                                              _mm256_and_si256(ki, _mm256_set1_epi64x(31)), 8),
                                       _mm256_slli_epi64(ki, 47));
    const __m256d c0 = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)LLAMA2_EXPF_C0));
    const __m256d c1 = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)LLAMA2_EXPF_C1));
    const __m256d c2 = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)LLAMA2_EXPF_C2));
    const __m256d z = _mm256_fmadd_pd(c0, r, c1), r2 = _mm256_mul_pd(r, r);
    const __m256d y = _mm256_fmadd_pd(z, r2, _mm256_fmadd_pd(c2, r, _mm256_set1_pd(1.0)));
    return _mm256_mul_pd(y, _mm256_castsi256_pd(t));
}

AVX2_FN static inline __m256 exp_ps8(__m256 x) {
    const __m128 lo = _mm256_cvtpd_ps(exp_pd4(_mm256_cvtps_pd(_mm256_castps256_ps128(x))));
    const __m128 hi = _mm256_cvtpd_ps(exp_pd4(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
    __m256 y = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i top = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(0x7ff));
    const __m256 big = _mm256_castsi256_ps(_mm256_cmpgt_epi32(top, _mm256_set1_epi32(LLAMA2_EXPF_BIG_TOP - 1)));
    if (_mm256_movemask_ps(big)) { /* |x| >= 88, infinities, NaNs */
        const __m256 over = _mm256_castsi256_ps(_mm256_set1_epi32((int)LLAMA2_EXPF_OVER));
        const __m256 under = _mm256_castsi256_ps(_mm256_set1_epi32((int)LLAMA2_EXPF_UNDER));
        y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_and_ps(big, _mm256_cmp_ps(x, over, _CMP_GT_OQ)));
        y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_and_ps(big, _mm256_cmp_ps(x, under, _CMP_LT_OQ)));
        const __m256 special = _mm256_castsi256_ps(_mm256_cmpgt_epi32(top, _mm256_set1_epi32(0x7f7)));
        y = _mm256_blendv_ps(y, _mm256_add_ps(x, x), special);
        const __m256 minf = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_set1_epi32((int)0xff800000u)));
        y = _mm256_blendv_ps(y, _mm256_setzero_ps(), minf);
    }
    return y;
}

AVX2_FN static void expf_avx2(float *out, const float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp_ps8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float tail[8] = {0};
        memcpy(tail, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(tail, exp_ps8(_mm256_loadu_ps(tail)));
        memcpy(out + i, tail, (size_t)(n - i) * sizeof(float));
    }
}

static int expf_avx2_agrees(void) {
    static volatile int state; /* 0: not checked yet, 1: agrees, -1: does not (checking twice is harmless) */
    if (!state) state = llama2_expf_agrees(expf_avx2) ? 1 : -1;
    return state > 0;
}

AVX2_FN static void swiglu_avx2(float *hb, const float *hb2, int n) {
    if (!expf_avx2_agrees()) {
        llama2_swiglu(hb, hb2, n);
        return;
    }
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(hb + i);
        const __m256 gate = _mm256_div_ps(one, _mm256_add_ps(one, exp_ps8(_mm256_xor_ps(v, sign))));
        _mm256_storeu_ps(hb + i, _mm256_mul_ps(_mm256_mul_ps(v, gate), _mm256_loadu_ps(hb2 + i)));
    }
    if (i < n) llama2_swiglu(hb + i, hb2 + i, n - i);
}

/* x[i] = expf(x[i] - max_val) */
AVX2_FN static void expf_shifted_avx2(float *x, int n, float max_val) {
    const __m256 vmax = _mm256_set1_ps(max_val);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp_ps8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax)));
    if (i < n) {
        for (int j = i; j < n; j++) x[j] -= max_val;
        expf_avx2(x + i, x + i, n - i);
    }
}

/* the maximum per lane as the scalar loop takes it (x[0], then strictly
 * greater values), then the exps in lanes, the sum in the scalar loop's
 * order, and the divisions */
AVX2_FN static void softmax_avx2(float *x, int n) {
    if (n < 8 || !expf_avx2_agrees()) {
        llama2_softmax(x, n);
        return;
    }
    __m256 mx = _mm256_set1_ps(x[0]);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        mx = _mm256_blendv_ps(mx, v, _mm256_cmp_ps(v, mx, _CMP_GT_OQ));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    float max_val = lanes[0];
    for (int l = 1; l < 8; l++)
        if (lanes[l] > max_val) max_val = lanes[l];
    for (; i < n; i++)
        if (x[i] > max_val) max_val = x[i];
    expf_shifted_avx2(x, n, max_val);
    float sum = 0.0f;
    for (i = 0; i < n; i++) sum += x[i];
    const __m256 vsum = _mm256_set1_ps(sum);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), vsum));
    for (; i < n; i++) x[i] /= sum;
}

const llama2_kernels llama2_kernels_avx2 = {
    .name = "avx2",
    .packs = 1,
    .pack_rows = 8,
    .q8_format = LLAMA2_Q8_SIGNED_NO_MIN,
    .matmul_f32 = matmul_f32_avx2,
    .matmul_f32_batch = matmul_f32_batch_avx2,
    .matmul_q8_span = matmul_q8_span_avx2,
    .matmul_bf16 = matmul_bf16_avx2,
    .matmul_bf16_batch = matmul_bf16_batch_avx2,
    .matmul_q8 = matmul_q8_avx2,
    .matmul_q4 = llama2_matmul_q4_avx2, /* kernels_q4.c */
    .matmul_q4_batch = llama2_matmul_q4_batch_avx2,
    .matmul_q8_batch = llama2_matmul_q8_batch_avx2,
    .quantize = quantize_avx2,
    .attn_scores = attn_scores_avx2,
    .attn_values = attn_values_avx2,
    .swiglu = swiglu_avx2,
    .softmax = softmax_avx2,
    .exp_lanes = expf_avx2,
};
#endif
