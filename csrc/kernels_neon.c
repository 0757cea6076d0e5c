/*
 * kernels_neon.c - ARM NEON (Advanced SIMD) matrix-vector kernels for
 * aarch64, where every CPU has NEON; the int8 kernels come twice: with SDOT
 * (the dot product extension: Armv8.2 and later, Apple M1 on, Graviton 2 on,
 * Raspberry Pi 5; chosen at run time from getauxval's HWCAP_ASIMDDP on Linux)
 * and with widening multiplies for the CPUs without it (Raspberry Pi 3 and 4).
 * The two tables below also list the Q4_0 and batched Q8_0 kernels of
 * kernels_q4_neon.c. Other architectures compile this file to nothing.
 *
 * The same rule as every tier: each lane is one output row (or one attention
 * position, or one output dimension) and adds its terms in the scalar loop's
 * order with the scalar loop's rounding, so every result is bit-identical to
 * kernels_scalar.c. fp32: vmulq then vaddq (never vmla/vfma: llama2.c's two
 * roundings); bf16: vfmaq, one fused multiply-add per weight like fmaf; int8:
 * exact int32 dot products, then ((float)isum * w_scale) * x_scale per group.
 *
 * Layouts (kernels.h): AVX2's 8-row blocks (one column of a block is two
 * 4-lane vectors), int8 values 4 columns x 8 rows per 32 bytes as they are
 * (q8_format LLAMA2_Q8_SIGNED: SDOT and the widening multiplies take any
 * signed byte, -128 included).
 */
#include "kernels.h"

#if defined(__aarch64__) || defined(_M_ARM64)

#ifndef NEON_INT8_BODY
#include <arm_neon.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define INLINE __attribute__((always_inline)) static inline
#define UNROLL _Pragma("GCC unroll 8")
#else
#define INLINE static __forceinline
#define UNROLL
#endif
#if defined(__clang__)
#define SDOT_FN __attribute__((target("dotprod")))
#elif defined(__GNUC__)
#define SDOT_FN __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define SDOT_FN
#endif

/* rows [row, row + 8) of out from two vectors, the rows from r1 on left alone */
INLINE void store_rows(float *out, float32x4_t lo, float32x4_t hi, int row, int r1) {
    if (row + 8 <= r1) {
        vst1q_f32(out + row, lo);
        vst1q_f32(out + row + 4, hi);
    } else {
        float tmp[8];
        vst1q_f32(tmp, lo);
        vst1q_f32(tmp + 4, hi);
        for (int r = 0; row + r < r1; r++) out[row + r] = tmp[r];
    }
}

/* the first r1 - row of 8 rows of out (the rest zero): a parked partial sum */
INLINE float32x4_t load_rows(const float *out, int row, int r1, int half) {
    if (row + 8 <= r1) return vld1q_f32(out + row + 4 * half);
    float tmp[8] = {0};
    for (int r = 0; row + r < r1; r++) tmp[r] = out[row + r];
    return vld1q_f32(tmp + 4 * half);
}

/* 4 packed weights as fp32: bf16 widens exactly by a 16-bit shift */
INLINE float32x4_t load_w(const void *p, size_t i, int bf16) {
    if (bf16) return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)p + i), 16));
    return vld1q_f32((const float *)p + i);
}

/* acc + w * x: rounded twice for fp32 weights, once (fused) for bf16 */
INLINE float32x4_t mac(float32x4_t acc, float32x4_t w, float32x4_t x, int bf16) {
    return bf16 ? vfmaq_f32(acc, w, x) : vaddq_f32(acc, vmulq_f32(w, x));
}

/* ---- fp32 and bf16, one token: four 8-row blocks (8 add chains) at a time ---- */
INLINE void matmul_dense(float *out, const float *x, const void *p, int n, int r0, int r1, int bf16) {
    int b = r0 / 8;
    const int b_end = (r1 + 7) / 8;
    const size_t bs = (size_t)n * 8;
    for (; b + 4 <= b_end; b += 4) {
        const size_t p0 = (size_t)b * bs;
        float32x4_t a[8];
        UNROLL for (int u = 0; u < 8; u++) a[u] = vdupq_n_f32(0.0f);
        for (int j = 0; j < n; j++) {
            const float32x4_t xj = vdupq_n_f32(x[j]);
            UNROLL for (int u = 0; u < 4; u++) {
                a[2 * u] = mac(a[2 * u], load_w(p, p0 + u * bs + 8 * (size_t)j, bf16), xj, bf16);
                a[2 * u + 1] = mac(a[2 * u + 1], load_w(p, p0 + u * bs + 8 * (size_t)j + 4, bf16), xj, bf16);
            }
        }
        UNROLL for (int u = 0; u < 4; u++) store_rows(out, a[2 * u], a[2 * u + 1], 8 * (b + u), r1);
    }
    for (; b < b_end; b++) {
        const size_t p0 = (size_t)b * bs;
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
        for (int j = 0; j < n; j++) {
            const float32x4_t xj = vdupq_n_f32(x[j]);
            a0 = mac(a0, load_w(p, p0 + 8 * (size_t)j, bf16), xj, bf16);
            a1 = mac(a1, load_w(p, p0 + 8 * (size_t)j + 4, bf16), xj, bf16);
        }
        store_rows(out, a0, a1, 8 * b, r1);
    }
}

static void matmul_f32_neon(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    matmul_dense(out, x, w->p, w->cols, r0, r1, 0);
}

static void matmul_bf16_neon(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    matmul_dense(out, x, w->ph, w->cols, r0, r1, 1);
}

/* ---- fp32 and bf16, a batch of tokens (prefill) ----
 * Tiles of 2 blocks (16 rows, 4 vectors) x 4 tokens: 16 accumulators, each
 * weight vector loaded serving 4 tokens. Column tiles of TILE whose weights
 * (16 KB) stay in L1 while every token uses them; between tiles a sum is
 * parked in out and picked up again, so every output is still
 * w[r][0]*x[0] + w[r][1]*x[1] + ... in order. bf16 tiles are widened once. */
#define TILE 256

INLINE void batch_tile(float *out, size_t os, const llama2_activation *a, int t, int j0, int m, const float *w0p,
                       const float *w1p, int row, int r1, const int W, const int T, int bf16) {
    float32x4_t c[4][4]; /* [token][vector] */
    const float *xp[4];
    UNROLL for (int u = 0; u < T; u++) {
        const float *o = out + (size_t)(t + u) * os;
        xp[u] = a[t + u].x + j0;
        UNROLL for (int v = 0; v < 2 * W; v++)
            c[u][v] = j0 == 0 ? vdupq_n_f32(0.0f) : load_rows(o, row + 8 * (v / 2), r1, v % 2);
    }
    for (int j = 0; j < m; j++) {
        float32x4_t wv[4];
        UNROLL for (int v = 0; v < 2 * W; v++) wv[v] = vld1q_f32((v < 2 ? w0p : w1p) + 8 * j + 4 * (v % 2));
        UNROLL for (int u = 0; u < T; u++) {
            const float32x4_t xj = vld1q_dup_f32(xp[u] + j);
            UNROLL for (int v = 0; v < 2 * W; v++) c[u][v] = mac(c[u][v], wv[v], xj, bf16);
        }
    }
    UNROLL for (int u = 0; u < T; u++) {
        float *o = out + (size_t)(t + u) * os;
        store_rows(o, c[u][0], c[u][1], row, r1);
        if (W == 2) store_rows(o, c[u][2], c[u][3], row + 8, r1);
    }
}

INLINE void matmul_dense_batch(float *out, size_t os, const llama2_activation *a, int nt, const void *p, int n,
                               int r0, int r1, int bf16) {
    const int b_first = r0 / 8, b_end = (r1 + 7) / 8;
    const size_t bs = (size_t)n * 8;
    float wide[2 * TILE * 8];
    for (int b = b_first; b < b_end; b += 2) {
        const int two = b + 1 < b_end, row = 8 * b;
        const size_t p0 = (size_t)b * bs, p1 = p0 + bs;
        for (int j0 = 0; j0 < n; j0 += TILE) {
            const int m = (j0 + TILE < n ? j0 + TILE : n) - j0;
            const float *w0p, *w1p;
            if (bf16) {
                for (int j = 0; j < m; j++)
                    for (int h = 0; h < 2; h++) {
                        vst1q_f32(wide + 8 * j + 4 * h, load_w(p, p0 + 8 * (size_t)(j0 + j) + 4 * h, 1));
                        if (two) vst1q_f32(wide + 8 * (TILE + j) + 4 * h, load_w(p, p1 + 8 * (size_t)(j0 + j) + 4 * h, 1));
                    }
                w0p = wide;
                w1p = wide + 8 * TILE;
            } else {
                w0p = (const float *)p + p0 + 8 * (size_t)j0;
                w1p = two ? (const float *)p + p1 + 8 * (size_t)j0 : w0p;
            }
            int t = 0;
            if (two) {
                for (; t + 4 <= nt; t += 4) batch_tile(out, os, a, t, j0, m, w0p, w1p, row, r1, 2, 4, bf16);
                for (; t < nt; t++) batch_tile(out, os, a, t, j0, m, w0p, w1p, row, r1, 2, 1, bf16);
            } else {
                for (; t + 4 <= nt; t += 4) batch_tile(out, os, a, t, j0, m, w0p, w0p, row, r1, 1, 4, bf16);
                for (; t < nt; t++) batch_tile(out, os, a, t, j0, m, w0p, w0p, row, r1, 1, 1, bf16);
            }
        }
    }
}

static void matmul_f32_batch_neon(float *out, size_t os, const llama2_activation *a, int nt, const llama2_matrix *w,
                                  int r0, int r1) {
    matmul_dense_batch(out, os, a, nt, w->p, w->cols, r0, r1, 0);
}

static void matmul_bf16_batch_neon(float *out, size_t os, const llama2_activation *a, int nt, const llama2_matrix *w,
                                   int r0, int r1) {
    matmul_dense_batch(out, os, a, nt, w->ph, w->cols, r0, r1, 1);
}

/* ---- attention ----
 * Scores: the key cache's blocks of 8 positions (kernels.h) put dimension i
 * of 8 positions in two vectors, each lane one position summing q[i] * k[i]
 * for i = 0, 1, ... in order, 2 blocks (4 chains) at a time. Values: each
 * lane one output dimension summing att[p] * v_p[i] for p = 0, 1, ... in
 * order, up to 64 dimensions held in registers across the positions. */
static void attn_scores_neon(float *att, const float *q, const float *kt, int n, int hs, float scale) {
    const float32x4_t sc = vdupq_n_f32(scale);
    const size_t bs = (size_t)8 * hs;
    const int blocks = (n + 7) / 8;
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const float *k0 = kt + (size_t)b * bs, *k1 = k0 + bs;
        float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
        for (int i = 0; i < hs; i++) {
            const float32x4_t qi = vdupq_n_f32(q[i]);
            s0 = vaddq_f32(s0, vmulq_f32(qi, vld1q_f32(k0 + 8 * i)));
            s1 = vaddq_f32(s1, vmulq_f32(qi, vld1q_f32(k0 + 8 * i + 4)));
            s2 = vaddq_f32(s2, vmulq_f32(qi, vld1q_f32(k1 + 8 * i)));
            s3 = vaddq_f32(s3, vmulq_f32(qi, vld1q_f32(k1 + 8 * i + 4)));
        }
        store_rows(att, vdivq_f32(s0, sc), vdivq_f32(s1, sc), 8 * b, n);
        store_rows(att, vdivq_f32(s2, sc), vdivq_f32(s3, sc), 8 * (b + 1), n);
    }
    if (b < blocks) {
        const float *k0 = kt + (size_t)b * bs;
        float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
        for (int i = 0; i < hs; i++) {
            const float32x4_t qi = vdupq_n_f32(q[i]);
            s0 = vaddq_f32(s0, vmulq_f32(qi, vld1q_f32(k0 + 8 * i)));
            s1 = vaddq_f32(s1, vmulq_f32(qi, vld1q_f32(k0 + 8 * i + 4)));
        }
        store_rows(att, vdivq_f32(s0, sc), vdivq_f32(s1, sc), 8 * b, n);
    }
}

/* NV vectors (4 * NV output dimensions) from out + i0 */
INLINE void attn_values_vectors(float *out, const float *att, const float *v, int n, size_t stride, int i0,
                                const int NV) {
    float32x4_t acc[16];
    UNROLL for (int k = 0; k < NV; k++) acc[k] = vdupq_n_f32(0.0f);
    for (int p = 0; p < n; p++) {
        const float *vp = v + (size_t)p * stride + i0;
        const float32x4_t a = vdupq_n_f32(att[p]);
        UNROLL for (int k = 0; k < NV; k++) acc[k] = vaddq_f32(acc[k], vmulq_f32(a, vld1q_f32(vp + 4 * k)));
    }
    UNROLL for (int k = 0; k < NV; k++) vst1q_f32(out + i0 + 4 * k, acc[k]);
}

static void attn_values_neon(float *out, const float *att, const float *v, int n, int hs, size_t stride) {
    int i0 = 0;
    for (; i0 + 64 <= hs; i0 += 64) attn_values_vectors(out, att, v, n, stride, i0, 16);
    for (; i0 + 16 <= hs; i0 += 16) attn_values_vectors(out, att, v, n, stride, i0, 4);
    for (; i0 + 4 <= hs; i0 += 4) attn_values_vectors(out, att, v, n, stride, i0, 1);
    for (int i = i0; i < hs; i++) { /* dimensions past the last whole vector */
        float o = 0.0f;
        for (int p = 0; p < n; p++) o += att[p] * v[(size_t)p * stride + i];
        out[i] = o;
    }
}

/* ---- int8 (Q8_0) ----
 * w->pq holds, per block of 8 rows, 4 consecutive columns of all 8 rows in
 * 32 bytes: two vectors of 4 rows x 4 bytes. With SDOT each int32 lane (one
 * row) adds the dot product of its 4 bytes with 4 activation bytes; without
 * it, widening multiplies (8 x 8 -> 16 bits, at most 128 * 128) and pairwise
 * widening adds leave half-rows that one pairwise add per 32-column run
 * folds into rows. Either way a row's int32 is its exact dot product (the
 * scalar loop's); then val += ((float)isum * w_scale) * x_scale per lane in
 * the scalar order: bit-identical to llama2_matmul_q8_rows. Both versions
 * come from the body below, included twice. */

/* 4 bytes of x at k as an int32 */
INLINE int32_t x4(const int8_t *xq, int k) {
    int32_t v;
    memcpy(&v, xq + k, 4);
    return v;
}

/* val += ((float)isum * ws) * xs for 4 rows */
INLINE float32x4_t scale_add(float32x4_t val, int32x4_t isum, const float *ws, float xs) {
    return vaddq_f32(val, vmulq_f32(vmulq_f32(vcvtq_f32_s32(isum), vld1q_f32(ws)), vdupq_n_f32(xs)));
}

#define NEON_INT8_BODY
#define SDOT 0
#define FN(name) name##_mull
#define TARGET
#include "kernels_neon.c"
#undef SDOT
#undef FN
#undef TARGET
#if defined(LLAMA2_HAVE_NEON_SDOT_KERNELS)
#define SDOT 1
#define FN(name) name##_sdot
#define TARGET SDOT_FN
#include "kernels_neon.c"
#undef SDOT
#undef FN
#undef TARGET
#endif

const llama2_kernels llama2_kernels_neon = {
    .name = "neon",
    .packs = 1,
    .pack_rows = 8,
    .q8_format = LLAMA2_Q8_SIGNED,
    .matmul_f32 = matmul_f32_neon,
    .matmul_f32_batch = matmul_f32_batch_neon,
    .matmul_q8_span = matmul_q8_span_mull,
    .matmul_bf16 = matmul_bf16_neon,
    .matmul_bf16_batch = matmul_bf16_batch_neon,
    .matmul_q8 = matmul_q8_mull,
    .matmul_q8_batch = llama2_matmul_q8_batch_neon_mull, /* kernels_q4_neon.c */
    .matmul_q4 = llama2_matmul_q4_neon_mull,
    .matmul_q4_batch = llama2_matmul_q4_batch_neon_mull,
    .attn_scores = attn_scores_neon,
    .attn_values = attn_values_neon,
};

#if defined(LLAMA2_HAVE_NEON_SDOT_KERNELS)
const llama2_kernels llama2_kernels_neon_sdot = {
    .name = "neon-sdot",
    .packs = 1,
    .pack_rows = 8,
    .q8_format = LLAMA2_Q8_SIGNED,
    .matmul_f32 = matmul_f32_neon,
    .matmul_f32_batch = matmul_f32_batch_neon,
    .matmul_q8_span = matmul_q8_span_sdot,
    .matmul_bf16 = matmul_bf16_neon,
    .matmul_bf16_batch = matmul_bf16_batch_neon,
    .matmul_q8 = matmul_q8_sdot,
    .matmul_q8_batch = llama2_matmul_q8_batch_neon_sdot, /* kernels_q4_neon.c */
    .matmul_q4 = llama2_matmul_q4_neon_sdot,
    .matmul_q4_batch = llama2_matmul_q4_batch_neon_sdot,
    .attn_scores = attn_scores_neon,
    .attn_values = attn_values_neon,
};
#endif

#else /* NEON_INT8_BODY: the int8 kernels, compiled once per instruction set (SDOT 0 or 1) */

/* s[2u], s[2u + 1] (rows 0-3 and 4-7 of block u) += the dot products of
 * columns [k0, k1) (a multiple of 16 apart) for NB blocks from pb */
TARGET INLINE void FN(dot_cols)(int32x4_t *s, const int8_t *pb, int n, const int8_t *xq, int k0, int k1, const int NB) {
#if SDOT
    for (int k = k0; k < k1; k += 16) {
        const int8x16_t xv = vld1q_s8(xq + k);
#define STEP(l)                                                                                                     \
    UNROLL for (int u = 0; u < NB; u++) {                                                                           \
        const int8_t *wp = pb + (int64_t)u * 8 * n + 8 * (k + 4 * (l));                                             \
        s[2 * u] = vdotq_laneq_s32(s[2 * u], vld1q_s8(wp), xv, l);                                                  \
        s[2 * u + 1] = vdotq_laneq_s32(s[2 * u + 1], vld1q_s8(wp + 16), xv, l);                                     \
    }
        STEP(0) STEP(1) STEP(2) STEP(3)
#undef STEP
    }
#else
    int32x4_t lo[8], hi[8]; /* per 4-row vector: lanes (row a, row a, row b, row b) halves */
    UNROLL for (int v = 0; v < 2 * NB; v++) lo[v] = hi[v] = vdupq_n_s32(0);
    for (int k = k0; k < k1; k += 4) {
        const int8x8_t xb = vreinterpret_s8_s32(vdup_n_s32(x4(xq, k)));
        UNROLL for (int v = 0; v < 2 * NB; v++) {
            const int8x16_t wv = vld1q_s8(pb + (int64_t)(v / 2) * 8 * n + 8 * k + 16 * (v % 2));
            lo[v] = vpadalq_s16(lo[v], vmull_s8(vget_low_s8(wv), xb));   /* rows 0, 1 of the vector */
            hi[v] = vpadalq_s16(hi[v], vmull_s8(vget_high_s8(wv), xb)); /* rows 2, 3 */
        }
    }
    UNROLL for (int v = 0; v < 2 * NB; v++) s[v] = vaddq_s32(s[v], vpaddq_s32(lo[v], hi[v]));
#endif
}

/* NB blocks of 8 rows from `row`, one token, groups within rows */
TARGET INLINE void FN(q8_blocks)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs, int row,
                                 int r1, const int NB) {
    const int n = w->cols, groups = n / gs;
    const int8_t *pb = w->pq + (int64_t)(row / 8) * 8 * n;
    const float *sb = w->ps + (int64_t)(row / 8) * groups * 8;
    float32x4_t acc[8];
    UNROLL for (int v = 0; v < 2 * NB; v++) acc[v] = vdupq_n_f32(0.0f);
    for (int g = 0; g < groups; g++) {
        int32x4_t s[8];
        UNROLL for (int v = 0; v < 2 * NB; v++) s[v] = vdupq_n_s32(0);
        for (int k = g * gs; k < (g + 1) * gs; k += 32) FN(dot_cols)(s, pb, n, xq, k, k + 32, NB);
        UNROLL for (int v = 0; v < 2 * NB; v++)
            acc[v] = scale_add(acc[v], s[v], sb + ((int64_t)(v / 2) * groups + g) * 8 + 4 * (v % 2), xs[g]);
    }
    UNROLL for (int u = 0; u < NB; u++) store_rows(out, acc[2 * u], acc[2 * u + 1], row + 8 * u, r1);
}

TARGET static void FN(matmul_q8)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs,
                                 int r0, int r1) {
    if (!w->pq || !w->ps) { /* not packed for these kernels: the portable loop */
        llama2_matmul_q8_rows(out, xq, xs, w, gs, r0, r1);
        return;
    }
    int i = r0;
    for (; i + 32 <= r1; i += 32) FN(q8_blocks)(out, xq, xs, w, gs, i, r1, 4);
    for (; i + 16 <= r1; i += 16) FN(q8_blocks)(out, xq, xs, w, gs, i, r1, 2);
    for (; i < r1; i += 8) FN(q8_blocks)(out, xq, xs, w, gs, i, r1, 1); /* the last block may be partial */
}

/* Groups across rows: the lanes' int32 sums run on over 32-column runs;
 * after each run the lanes whose segment ends there (pends) add
 * ((float)isum * w_scale) * x_scale to their value and start again from
 * zero, the other lanes keep both (kernels_avx2.c has the long story). */
TARGET INLINE void FN(q8_span_blocks)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs,
                                      int row, int r1, const int NB) {
    const int n = w->cols, runs = n / 32;
    const int8_t *pb = w->pq + (int64_t)(row / 8) * 8 * n;
    const float *sb = w->ps + (int64_t)(row / 8) * runs * 8;
    const uint8_t *eb = w->pends + (int64_t)(row / 8) * runs;
    static const uint32_t lane_bits[8] = {1, 2, 4, 8, 16, 32, 64, 128};
    const uint32x4_t bits_lo = vld1q_u32(lane_bits), bits_hi = vld1q_u32(lane_bits + 4);
    float32x4_t acc[8];
    int32x4_t s[8];
    UNROLL for (int v = 0; v < 2 * NB; v++) {
        acc[v] = vdupq_n_f32(0.0f);
        s[v] = vdupq_n_s32(0);
    }
    for (int c = 0; c < runs; c++) {
        FN(dot_cols)(s, pb, n, xq, 32 * c, 32 * c + 32, NB);
        const float x_scale = xs[32 * c / gs];
        UNROLL for (int u = 0; u < NB; u++) {
            const unsigned ends = eb[(int64_t)u * runs + c];
            if (!ends) continue;
            const uint32x4_t e = vdupq_n_u32(ends);
            UNROLL for (int h = 0; h < 2; h++) {
                const int v = 2 * u + h;
                const uint32x4_t m = vtstq_u32(e, h ? bits_hi : bits_lo);
                const float32x4_t sum = scale_add(acc[v], s[v], sb + ((int64_t)u * runs + c) * 8 + 4 * h, x_scale);
                acc[v] = vbslq_f32(m, sum, acc[v]);
                s[v] = vbicq_s32(s[v], vreinterpretq_s32_u32(m));
            }
        }
    }
    UNROLL for (int u = 0; u < NB; u++) store_rows(out, acc[2 * u], acc[2 * u + 1], row + 8 * u, r1);
}

TARGET static void FN(matmul_q8_span)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int gs,
                                      int r0, int r1) {
    if (!w->pq || !w->pends) { /* not packed for these kernels: the portable loop */
        llama2_matmul_q8_rows(out, xq, xs, w, gs, r0, r1);
        return;
    }
    int i = (r0 + 7) / 8 * 8; /* rows before the first whole block: the portable loop */
    if (i > r1) i = r1;
    if (i > r0) llama2_matmul_q8_rows(out, xq, xs, w, gs, r0, i);
    for (; i + 32 <= r1; i += 32) FN(q8_span_blocks)(out, xq, xs, w, gs, i, r1, 4);
    for (; i + 16 <= r1; i += 16) FN(q8_span_blocks)(out, xq, xs, w, gs, i, r1, 2);
    for (; i < r1; i += 8) FN(q8_span_blocks)(out, xq, xs, w, gs, i, r1, 1);
}

#endif /* NEON_INT8_BODY */
#endif /* aarch64 */
