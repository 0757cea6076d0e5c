/*
 * kernels_q4_neon.c - the NEON (aarch64) kernels of kernels_q4.c: Q4_0
 * weights for one token and for a batch of tokens (several tokens per
 * weight load), and the batched Q8_0 kernel (prompts and the server's
 * llama2_decode_batch). Like kernels_neon.c's int8 kernels they come twice,
 * from one body that this file includes twice: with SDOT (the dot product
 * extension) and with widening multiplies for the CPUs without it; the two
 * tables of kernels_neon.c list them. Other architectures compile this file
 * to nothing.
 *
 * Every kernel computes exactly what the portable loops compute: each lane
 * is one output row; its int32 is the exact block (or group) dot product,
 * whatever the order of the integer additions; then its float steps are the
 * scalar loop's, in the scalar order, with separate roundings (vmulq then
 * vaddq, never a fused multiply-add):
 *   Q4_0 (llama2_matmul_q4_rows): val = val + (float)isum * (d_w * d_x), per block of 32;
 *   Q8_0 (llama2_matmul_q8_rows): val = val + ((float)isum * w_scale) * x_scale, per group.
 * test_q4.c checks them bit for bit (`make test-neon` runs it under qemu).
 *
 * Layouts: AVX2's, made at load with pack_rows 8 (kernels_q4.c's
 * llama2_pack_q4, kernels.c's llama2_pack_scales). Q4_0: per 8-row block
 * and 32-column block, four 32-byte vectors v = 0..3, whose bytes 16h ..
 * 16h + 15 hold rows 4h .. 4h + 3, 4 bytes per row, byte i of a row being
 *     nibble(column 8v + i) | nibble(column 8v + 4 + i) << 4,
 * and the 8 rows' fp16 scales (widened exactly by FCVTL, subnormals
 * included). So a 16-byte load masked with 15 holds columns 8v .. 8v + 3 of
 * 4 rows, shifted right by 4 columns 8v + 4 .. 8v + 7: with SDOT by lane
 * each int32 lane (one row) adds those 4 bytes times the 4 activation bytes
 * of the same columns, one 32-bit lane of the activation in a register.
 * Without SDOT, widening multiply-accumulates (SMLAL, SMLAL2: 8 x 8 -> 16
 * bits) against those 4 activation bytes duplicated to every 32-bit lane; a
 * 16-bit lane adds 8 products per block, each at most 15 x 128 = 1920 in
 * magnitude, so at most 15360, and pairwise widening adds fold the lanes
 * into rows. The nibbles are stored without the -8: each row's int32 starts
 * at -8 x (sum of the block's activation bytes) and ends at exactly
 * sum((nibble - 8) * xq).
 *
 * Q8_0: 4 columns of the 8 rows per 32 bytes (kernels.h, q8_format
 * LLAMA2_Q8_SIGNED: signed bytes as they are, -128 included), as the
 * single-token kernels of kernels_neon.c read them; SDOT takes 16
 * activation bytes per load and 4 columns per instruction, the widening
 * multiplies one product per 16-bit lane (two -128 x -128 would not fit),
 * accumulated pairwise into int32.
 *
 * Shapes (the instruction counts per weight of GCC 12 -O3's inner loops are
 * in docs/BENCHMARKS.md, "ARM (NEON)"): one token, 8 rows per pass with
 * SDOT, 16 without; a batch, with SDOT tiles of one 8-row block x 2 tokens
 * (Q4_0) or x 4 tokens (Q8_0), each weight load serving every token of the
 * tile, without SDOT 16 rows x 1 token (Q4_0) or 8 rows x 2 tokens (Q8_0);
 * either way a row block's weights stay in cache while every token of the
 * batch goes over them. More rows or tokens per pass make GCC spill
 * accumulators for no fewer instructions (the counts beside each kernel).
 */
#include "kernels.h"

#if defined(__aarch64__) || defined(_M_ARM64)

#ifndef Q4_NEON_BODY
#include <arm_neon.h>
#include <stdlib.h>

#if defined(__GNUC__) || defined(__clang__)
#define INLINE __attribute__((always_inline)) static inline
#define UNROLL _Pragma("GCC unroll 8")
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define INLINE static __forceinline
#define UNROLL
#define PREFETCH(p) ((void)0)
#endif
#if defined(__clang__)
#define SDOT_FN __attribute__((target("dotprod")))
#elif defined(__GNUC__)
#define SDOT_FN __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define SDOT_FN
#endif

#define QK 32 /* values per Q4_0 block */
/* the corrections (-8 x the sum of each activation block, per token) on
 * the stack up to this many, else on the heap */
#define STACK_CORR 2048

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

/* d[i] = activation bytes 4i .. 4i + 3 of a 32-byte block, in every 32-bit lane */
INLINE void dup_block(int8x16_t *d, const int8_t *x) {
    const int32x4_t x0 = vreinterpretq_s32_s8(vld1q_s8(x)), x1 = vreinterpretq_s32_s8(vld1q_s8(x + 16));
    d[0] = vreinterpretq_s8_s32(vdupq_laneq_s32(x0, 0));
    d[1] = vreinterpretq_s8_s32(vdupq_laneq_s32(x0, 1));
    d[2] = vreinterpretq_s8_s32(vdupq_laneq_s32(x0, 2));
    d[3] = vreinterpretq_s8_s32(vdupq_laneq_s32(x0, 3));
    d[4] = vreinterpretq_s8_s32(vdupq_laneq_s32(x1, 0));
    d[5] = vreinterpretq_s8_s32(vdupq_laneq_s32(x1, 1));
    d[6] = vreinterpretq_s8_s32(vdupq_laneq_s32(x1, 2));
    d[7] = vreinterpretq_s8_s32(vdupq_laneq_s32(x1, 3));
}

/* 4 fp16 scales, widened exactly */
INLINE float32x4_t f16x4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

/* Q4_0's float step for 4 rows: val + (float)isum * (d_w * d_x) */
INLINE float32x4_t q4_scale_add(float32x4_t val, int32x4_t isum, float32x4_t dw, float dx) {
    return vaddq_f32(val, vmulq_f32(vcvtq_f32_s32(isum), vmulq_f32(dw, vdupq_n_f32(dx))));
}

/* Q8_0's float step for 4 rows: val + ((float)isum * w_scale) * x_scale */
INLINE float32x4_t q8_scale_add(float32x4_t val, int32x4_t isum, float32x4_t ws, float xs) {
    return vaddq_f32(val, vmulq_f32(vmulq_f32(vcvtq_f32_s32(isum), ws), vdupq_n_f32(xs)));
}

/* corr[b] = -8 x (sum of the 32 activation bytes of block b) for nb blocks */
static void corrections(int32_t *corr, const int8_t *xq, int nb) {
    for (int b = 0; b < nb; b++)
        corr[b] = -8 * ((int32_t)vaddlvq_s8(vld1q_s8(xq + QK * b)) + (int32_t)vaddlvq_s8(vld1q_s8(xq + QK * b + 16)));
}

/* the corrections of n_tok activations (token t's at corr + t * nb), in
 * stack when they fit, or NULL (no memory) */
static int32_t *batch_corrections(int32_t *stack, const llama2_activation *a, int n_tok, int nb) {
    int32_t *corr = (size_t)n_tok * nb <= STACK_CORR ? stack : (int32_t *)malloc(sizeof(int32_t) * n_tok * (size_t)nb);
    if (corr)
        for (int t = 0; t < n_tok; t++) corrections(corr + (size_t)t * nb, a[t].q, nb);
    return corr;
}

#define Q4_NEON_BODY
#define SDOT 0
#define FN(name) name##_mull
#define TARGET
#include "kernels_q4_neon.c"
#undef SDOT
#undef FN
#undef TARGET
#if defined(LLAMA2_HAVE_NEON_SDOT_KERNELS)
#define SDOT 1
#define FN(name) name##_sdot
#define TARGET SDOT_FN
#include "kernels_q4_neon.c"
#undef SDOT
#undef FN
#undef TARGET
#endif

#else /* Q4_NEON_BODY: the kernels, compiled once per instruction set (SDOT 0 or 1) */

/* ---- Q4_0 ----
 * The int32 of 4 rows for one 32-column block: w points at the block's
 * first vector (v = 0) of those rows (vectors 32 bytes apart); s starts at
 * the correction. */
#if SDOT
/* x0, x1: the block's 32 activation bytes; SDOT by lane: lanes 0-3 of x0
 * are columns 0-3, 4-7, 8-11, 12-15 (x1: 16-31) */
#define Q4_V(s, w, m4, x, l)                                                                   \
    do {                                                                                       \
        const uint8x16_t raw_ = vld1q_u8(w);                                                   \
        s = vdotq_laneq_s32(s, vreinterpretq_s8_u8(vandq_u8(raw_, m4)), x, l);                 \
        s = vdotq_laneq_s32(s, vreinterpretq_s8_u8(vshrq_n_u8(raw_, 4)), x, (l) + 1);          \
    } while (0)
TARGET INLINE int32x4_t FN(q4_rows4)(int32x4_t s, const uint8_t *w, const int8x16_t x0, const int8x16_t x1,
                                     uint8x16_t m4) {
    Q4_V(s, w, m4, x0, 0);
    Q4_V(s, w + 32, m4, x0, 2);
    Q4_V(s, w + 64, m4, x1, 0);
    Q4_V(s, w + 96, m4, x1, 2);
    return s;
}
#undef Q4_V
#else
/* xd[i]: activation bytes 4i .. 4i + 3 of the block in every 32-bit lane
 * (dup_block). a01 (16-bit lanes: row 0 x 4 columns, row 1 x 4) and a23
 * (rows 2, 3) sum 8 products each, then fold into rows. */
TARGET INLINE int32x4_t FN(q4_rows4)(int32x4_t s, const uint8_t *w, const int8x16_t *xd, uint8x16_t m4) {
    int16x8_t a01, a23;
    UNROLL for (int v = 0; v < 4; v++) {
        const uint8x16_t raw = vld1q_u8(w + 32 * v);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, m4)), hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        if (v == 0) {
            a01 = vmull_s8(vget_low_s8(lo), vget_low_s8(xd[0]));
            a23 = vmull_high_s8(lo, xd[0]);
        } else {
            a01 = vmlal_s8(a01, vget_low_s8(lo), vget_low_s8(xd[2 * v]));
            a23 = vmlal_high_s8(a23, lo, xd[2 * v]);
        }
        a01 = vmlal_s8(a01, vget_low_s8(hi), vget_low_s8(xd[2 * v + 1]));
        a23 = vmlal_high_s8(a23, hi, xd[2 * v + 1]);
    }
    return vaddq_s32(s, vpaddq_s32(vpaddlq_s16(a01), vpaddlq_s16(a23)));
}
#endif

/* NB row blocks (8 rows each) from rb, one token. NB is Q4_BLOCKS: GCC 12
 * -O3 loads every weight vector of an iteration early, and with more blocks
 * it spills accumulators for no fewer instructions per weight (SDOT: 0.23
 * with 1 block, 0.24 with 2 or 4, both spilling; widening multiplies: 0.37
 * with 1, 0.34 with 2, 0.37 with 4, spilling). */
#define Q4_BLOCKS (SDOT ? 1 : 2)
TARGET INLINE void FN(q4_blocks)(float *out, const int8_t *xq, const float *xs, const int32_t *corr,
                                 const llama2_matrix *w, int rb, int r1, const int NB) {
    const int nb = w->cols / QK;
    const uint8x16_t m4 = vdupq_n_u8(15);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 128;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 8;
    float32x4_t acc[4];
    UNROLL for (int v = 0; v < 2 * NB; v++) acc[v] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const int8_t *x = xq + QK * b;
#if SDOT
        const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);
#else
        int8x16_t xd[8];
        dup_block(xd, x);
#endif
        const int32x4_t cb = vdupq_n_s32(corr[b]);
        const float dx = xs[b];
        UNROLL for (int v = 0; v < 2 * NB; v++) {
            const int64_t unit = (int64_t)(v / 2) * nb + b; /* block v / 2, rows 4 (v % 2) .. */
#if SDOT
            const int32x4_t s = FN(q4_rows4)(cb, pw + unit * 128 + 16 * (v % 2), x0, x1, m4);
#else
            const int32x4_t s = FN(q4_rows4)(cb, pw + unit * 128 + 16 * (v % 2), xd, m4);
#endif
            acc[v] = q4_scale_add(acc[v], s, f16x4(pd + unit * 8 + 4 * (v % 2)), dx);
        }
    }
    UNROLL for (int u = 0; u < NB; u++) store_rows(out, acc[2 * u], acc[2 * u + 1], 8 * (rb + u), r1);
}

TARGET void FN(llama2_matmul_q4_neon)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                      int r0, int r1) {
    const int nb = w->cols / QK;
    int32_t stack[STACK_CORR], *corr = !w->pq4 || r0 % 8 ? NULL : nb <= STACK_CORR ? stack
                                                                 : (int32_t *)malloc(sizeof(int32_t) * nb);
    if (!corr) { /* not regrouped, a start inside a row block (matmul.c never makes one), or no memory */
        llama2_matmul_q4_rows(out, xq, xs, w, r0, r1);
        return;
    }
    corrections(corr, xq, nb);
    int rb = r0 / 8;
    const int rb_end = (r1 + 7) / 8;
    for (; rb + Q4_BLOCKS <= rb_end; rb += Q4_BLOCKS) FN(q4_blocks)(out, xq, xs, corr, w, rb, r1, Q4_BLOCKS);
    if (rb < rb_end) FN(q4_blocks)(out, xq, xs, corr, w, rb, r1, 1);
    if (corr != stack) free(corr);
}

#if SDOT
/* One row block, T tokens from a: each weight load, and its masked
 * nibbles, serve T tokens; per vector v, 8 activation bytes of each token
 * (columns 8v .. 8v + 7). T <= 2: with more, GCC 12 -O3 spills, and the
 * instructions per weight and token go up (0.19 at 2 tokens, 0.21 at 3 or 4). */
#define Q4_TILE 2
TARGET INLINE void FN(q4_tile)(float *out, size_t os, const llama2_activation *a, const int32_t *corr,
                               const llama2_matrix *w, int rb, int r1, const int T) {
    const int nb = w->cols / QK;
    const uint8x16_t m4 = vdupq_n_u8(15);
    const uint8_t *pw = w->pq4 + (int64_t)rb * nb * 128;
    const uint16_t *pd = w->ps4 + (int64_t)rb * nb * 8;
    float32x4_t acc[Q4_TILE][2];
    UNROLL for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pw + (int64_t)b * 128;
        PREFETCH(p + (int64_t)nb * 128); /* the next row block, line for line */
        PREFETCH(p + (int64_t)nb * 128 + 64);
        int32x4_t s[Q4_TILE][2];
        UNROLL for (int t = 0; t < T; t++) s[t][0] = s[t][1] = vdupq_n_s32(corr[(size_t)t * nb + b]);
        UNROLL for (int v = 0; v < 4; v++) {
            int8x16_t lo[2], hi[2]; /* rows 0-3, 4-7 */
            UNROLL for (int h = 0; h < 2; h++) {
                const uint8x16_t raw = vld1q_u8(p + 32 * v + 16 * h);
                lo[h] = vreinterpretq_s8_u8(vandq_u8(raw, m4));
                hi[h] = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
            }
            UNROLL for (int t = 0; t < T; t++) {
                const int8x8_t x8 = vld1_s8(a[t].q + QK * b + 8 * v);
                UNROLL for (int h = 0; h < 2; h++) {
                    s[t][h] = vdotq_lane_s32(s[t][h], lo[h], x8, 0);
                    s[t][h] = vdotq_lane_s32(s[t][h], hi[h], x8, 1);
                }
            }
        }
        const float32x4_t dw0 = f16x4(pd + (int64_t)b * 8), dw1 = f16x4(pd + (int64_t)b * 8 + 4);
        UNROLL for (int t = 0; t < T; t++) {
            acc[t][0] = q4_scale_add(acc[t][0], s[t][0], dw0, a[t].s[b]);
            acc[t][1] = q4_scale_add(acc[t][1], s[t][1], dw1, a[t].s[b]);
        }
    }
    UNROLL for (int t = 0; t < T; t++) store_rows(out + t * os, acc[t][0], acc[t][1], 8 * rb, r1);
}
#endif

/* A batch: with SDOT, row block by row block in tiles of 2 tokens; without,
 * token by token over each pair of row blocks (16 KB of weights for 4096
 * columns: in L1 while every token goes over them) with the one-token
 * kernel, whose 16-row blocks share the activation's broadcasts over more
 * rows than a tile of tokens could (0.34 instructions per weight and token,
 * against 0.36 for a 2-token tile). */
TARGET void FN(llama2_matmul_q4_batch_neon)(float *out, size_t os, const llama2_activation *a, int n_tok,
                                            const llama2_matrix *w, int r0, int r1) {
    const int nb = w->cols / QK;
    int32_t stack[STACK_CORR], *corr = w->pq4 && r0 % 8 == 0 ? batch_corrections(stack, a, n_tok, nb) : NULL;
    if (!corr) { /* not regrouped, a start inside a row block, or no memory: the portable loop */
        for (int t = 0; t < n_tok; t++) llama2_matmul_q4_rows(out + t * os, a[t].q, a[t].s, w, r0, r1);
        return;
    }
    const int rb_end = (r1 + 7) / 8;
#if SDOT
    for (int rb = r0 / 8; rb < rb_end; rb++) { /* the row block's weights stay in cache over the tokens */
        int t = 0;
        for (; t + Q4_TILE <= n_tok; t += Q4_TILE)
            FN(q4_tile)(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r1, Q4_TILE);
        if (t < n_tok) FN(q4_tile)(out + t * os, os, a + t, corr + (size_t)t * nb, w, rb, r1, 1);
    }
#else
    for (int rb = r0 / 8; rb < rb_end; rb += 2)
        for (int t = 0; t < n_tok; t++) {
            float *o = out + t * os;
            const int32_t *c = corr + (size_t)t * nb;
            if (rb + 2 <= rb_end) FN(q4_blocks)(o, a[t].q, a[t].s, c, w, rb, r1, 2);
            else FN(q4_blocks)(o, a[t].q, a[t].s, c, w, rb, r1, 1);
        }
#endif
    if (corr != stack) free(corr);
}
#undef Q4_TILE
#undef Q4_BLOCKS

/* ---- batched Q8_0 ----
 * One 8-row block, T tokens (T <= Q8_TILE): the group's int32 of each
 * token and row, then the single-token kernels' float step, group after
 * group. Instructions per weight and token in GCC 12 -O3's inner loop: SDOT
 * 0.19, 0.13, 0.10 at 1, 2, 4 tokens; widening multiplies 0.38, 0.34, and
 * 0.38 at 4 tokens, where it spills. */
#define Q8_TILE (SDOT ? 4 : 2)
TARGET INLINE void FN(q8_tile)(float *out, size_t os, const llama2_activation *a, const llama2_matrix *w, int gs,
                               int rb, int r1, const int T) {
    const int n = w->cols, groups = n / gs;
    const int8_t *pb = w->pq + (int64_t)rb * 8 * n;
    const float *sb = w->ps + (int64_t)rb * groups * 8;
    float32x4_t acc[4][2];
    UNROLL for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int g = 0; g < groups; g++) {
        int32x4_t s[4][2];
#if SDOT
        UNROLL for (int t = 0; t < T; t++) s[t][0] = s[t][1] = vdupq_n_s32(0);
        for (int k = g * gs; k < (g + 1) * gs; k += 16) {
            const int8_t *p = pb + 8 * (int64_t)k; /* columns k .. k + 15 of the 8 rows: 128 bytes */
            PREFETCH(p + 8 * (int64_t)n);           /* the next row block, line for line */
            PREFETCH(p + 8 * (int64_t)n + 64);
            int8x16_t x[4];
            UNROLL for (int t = 0; t < T; t++) x[t] = vld1q_s8(a[t].q + k);
#define STEP(l)                                                                      \
    {                                                                                \
        const int8x16_t w0 = vld1q_s8(p + 32 * (l)), w1 = vld1q_s8(p + 32 * (l) + 16); \
        UNROLL for (int t = 0; t < T; t++) {                                         \
            s[t][0] = vdotq_laneq_s32(s[t][0], w0, x[t], l);                          \
            s[t][1] = vdotq_laneq_s32(s[t][1], w1, x[t], l);                          \
        }                                                                            \
    }
            STEP(0) STEP(1) STEP(2) STEP(3)
#undef STEP
        }
#else
        int32x4_t lo[4][2], hi[4][2]; /* per token and 4-row vector: lanes (row a, row a, row b, row b) */
        UNROLL for (int t = 0; t < T; t++) lo[t][0] = lo[t][1] = hi[t][0] = hi[t][1] = vdupq_n_s32(0);
        for (int k = g * gs; k < (g + 1) * gs; k += 16) {
            const int8_t *p = pb + 8 * (int64_t)k; /* columns k .. k + 15 of the 8 rows: 128 bytes */
            PREFETCH(p + 8 * (int64_t)n);           /* the next row block, line for line */
            PREFETCH(p + 8 * (int64_t)n + 64);
            int32x4_t x[4];
            UNROLL for (int t = 0; t < T; t++) x[t] = vreinterpretq_s32_s8(vld1q_s8(a[t].q + k));
#define STEP(l)                                                                                            \
    {                                                                                                      \
        const int8x16_t w0 = vld1q_s8(p + 32 * (l)), w1 = vld1q_s8(p + 32 * (l) + 16);                     \
        UNROLL for (int t = 0; t < T; t++) {                                                               \
            const int8x16_t xb = vreinterpretq_s8_s32(vdupq_laneq_s32(x[t], l)); /* columns k + 4l .. */ \
            lo[t][0] = vpadalq_s16(lo[t][0], vmull_s8(vget_low_s8(w0), vget_low_s8(xb))); /* rows 0, 1 */ \
            hi[t][0] = vpadalq_s16(hi[t][0], vmull_high_s8(w0, xb));                      /* rows 2, 3 */ \
            lo[t][1] = vpadalq_s16(lo[t][1], vmull_s8(vget_low_s8(w1), vget_low_s8(xb))); /* rows 4, 5 */ \
            hi[t][1] = vpadalq_s16(hi[t][1], vmull_high_s8(w1, xb));                      /* rows 6, 7 */ \
        }                                                                                                  \
    }
            STEP(0) STEP(1) STEP(2) STEP(3)
#undef STEP
        }
        UNROLL for (int t = 0; t < T; t++) {
            s[t][0] = vpaddq_s32(lo[t][0], hi[t][0]);
            s[t][1] = vpaddq_s32(lo[t][1], hi[t][1]);
        }
#endif
        const float32x4_t ws0 = vld1q_f32(sb + (int64_t)g * 8), ws1 = vld1q_f32(sb + (int64_t)g * 8 + 4);
        UNROLL for (int t = 0; t < T; t++) {
            acc[t][0] = q8_scale_add(acc[t][0], s[t][0], ws0, a[t].s[g]);
            acc[t][1] = q8_scale_add(acc[t][1], s[t][1], ws1, a[t].s[g]);
        }
    }
    UNROLL for (int t = 0; t < T; t++) store_rows(out + t * os, acc[t][0], acc[t][1], 8 * rb, r1);
}

/* n % gs == 0, gs % 32 == 0 (weight_types.c checks) */
TARGET void FN(llama2_matmul_q8_batch_neon)(float *out, size_t os, const llama2_activation *a, int n_tok,
                                            const llama2_matrix *w, int gs, int r0, int r1) {
    if (!w->pq || !w->ps || r0 % 8) { /* not regrouped, or a start inside a row block: the portable loop */
        for (int t = 0; t < n_tok; t++) llama2_matmul_q8_rows(out + t * os, a[t].q, a[t].s, w, gs, r0, r1);
        return;
    }
    for (int rb = r0 / 8; rb < (r1 + 7) / 8; rb++) { /* the row block's weights stay in cache over the tokens */
        int t = 0;
        for (; t + Q8_TILE <= n_tok; t += Q8_TILE) FN(q8_tile)(out + t * os, os, a + t, w, gs, rb, r1, Q8_TILE);
        switch (n_tok - t) {
#if SDOT
        case 3: FN(q8_tile)(out + t * os, os, a + t, w, gs, rb, r1, 3); break;
        case 2: FN(q8_tile)(out + t * os, os, a + t, w, gs, rb, r1, 2); break;
#endif
        case 1: FN(q8_tile)(out + t * os, os, a + t, w, gs, rb, r1, 1); break;
        default: break;
        }
    }
}
#undef Q8_TILE

#endif /* Q4_NEON_BODY */
#endif /* aarch64 */
