/*
 * kernels_scalar.c - the portable kernels (the `scalar` table of
 * kernels.h): fp32, bf16 and Q8_0 matrix-vector rows and one head's
 * attention, as plain loops.
 *
 * They are the reference: the fp32, Q8_0 and attention loops are llama2.c's,
 * in its order (sequential float sums, no fast-math), so sampled outputs
 * match it bit for bit, and every SIMD kernel (kernels_avx2.c) reproduces
 * these loops exactly, lane by lane (`make testcc` checks each one). They
 * also run wherever no SIMD kernel fits (LLAMA2_KERNELS=scalar forces them).
 */
#include "kernels.h"

#include <math.h>

/* Rows [r0, r1) of out = W x for a row-major W of n columns. */
static void matmul_f32_rows(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    const int n = w->cols;
    for (int i = r0; i < r1; i++) {
        const float *row = w->f + (int64_t)i * n;
        float val = 0.0f;
        for (int j = 0; j < n; j++) val += row[j] * x[j];
        out[i] = val;
    }
}

/* The same for bf16 weights: each weight widened to fp32 (exact), then one
 * fused multiply-add per weight, in column order. bf16 is this project's own
 * format, so its arithmetic is ours to choose: fused, it takes half the
 * instructions of llama2.c's multiply-then-add, and fmaf rounds the same on
 * every platform, so every kernel still matches this loop bit for bit. */
static void matmul_bf16_rows(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    const int n = w->cols;
    for (int i = r0; i < r1; i++) {
        const uint16_t *row = w->h + (int64_t)i * n;
        float val = 0.0f;
        for (int j = 0; j < n; j++) val = fmaf(llama2_bf16_to_f32(row[j]), x[j], val);
        out[i] = val;
    }
}

/* ---- Q8_0 ----
 * Groups run over a matrix flattened row after row. When the row length n
 * is a multiple of the group size every row starts a fresh group and the
 * product is llama2.c's: per group an exact int32 dot product scaled by the
 * weight and activation scales. When it is not (hidden_dim for w2, say), a
 * group spans two rows; the row is then cut into segments where both the
 * weight group and the activation group are constant, which is exactly the
 * dequantized product. The original runq dropped those row tails.
 * (Quantizing activations and weights: quant.c.) */

/* One output row when groups do not line up with rows. */
static float row_dot_unaligned(const int8_t *xq, const float *xs, const int8_t *wq,
                               const float *ws, int64_t base, int n, int gs) {
    float val = 0.0f;
    int j = 0;
    while (j < n) {
        int64_t wg = (base + j) / gs;
        int xg = j / gs;
        int end = n;
        int64_t w_end = (wg + 1) * gs - base;
        if (w_end < end) end = (int)w_end;
        if ((xg + 1) * gs < end) end = (xg + 1) * gs;
        int32_t ival = 0;
        for (int k = j; k < end; k++) ival += (int32_t)xq[k] * (int32_t)wq[k];
        val += ((float)ival) * ws[wg] * xs[xg];
        j = end;
    }
    return val;
}

/* Rows [r0, r1) of the Q8_0 product, aligned groups or not. */
void llama2_matmul_q8_rows(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                           int gs, int r0, int r1) {
    const int n = w->cols;
    const int aligned = n % gs == 0;
    for (int i = r0; i < r1; i++) {
        int64_t base = (int64_t)i * n;
        const int8_t *wq = w->q + base;
        if (!aligned) {
            out[i] = row_dot_unaligned(xq, xs, wq, w->s, base, n, gs);
            continue;
        }
        const float *ws = w->s + base / gs;
        float val = 0.0f;
        for (int j = 0, g = 0; j < n; j += gs, g++) {
            int32_t ival = 0;
            for (int k = 0; k < gs; k++) ival += (int32_t)xq[j + k] * (int32_t)wq[j + k];
            val += ((float)ival) * ws[g] * xs[g];
        }
        out[i] = val;
    }
}

/* ---- attention ----
 * One head: llama2.c's loops, the keys read from the blocked layout of the
 * cache (kernels.h). */
static void attn_scores_scalar(float *att, const float *q, const float *kt, int n, int hs, float scale) {
    for (int p = 0; p < n; p++) {
        const float *k = kt + (size_t)(p / LLAMA2_KEY_BLOCK) * LLAMA2_KEY_BLOCK * hs + p % LLAMA2_KEY_BLOCK;
        float score = 0.0f;
        for (int i = 0; i < hs; i++) score += q[i] * k[LLAMA2_KEY_BLOCK * i];
        att[p] = score / scale;
    }
}

static void attn_values_scalar(float *out, const float *att, const float *v, int n, int hs, size_t stride) {
    for (int i = 0; i < hs; i++) out[i] = 0.0f;
    for (int p = 0; p < n; p++) {
        const float *vp = v + (size_t)p * stride;
        float a = att[p];
        for (int i = 0; i < hs; i++) out[i] += a * vp[i];
    }
}

const llama2_kernels llama2_kernels_scalar = {
    .name = "scalar",
    .packs = 0,
    .matmul_f32 = matmul_f32_rows,
    .matmul_bf16 = matmul_bf16_rows,
    .matmul_q8 = llama2_matmul_q8_rows,
    .matmul_q4 = llama2_matmul_q4_rows, /* kernels_q4.c */
    .attn_scores = attn_scores_scalar,
    .attn_values = attn_values_scalar,
};
