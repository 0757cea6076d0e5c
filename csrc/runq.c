/*
 * runq.c - the int8 (Q8_0) engine: quantizing activations and weights in
 * groups, and the int8 matrix-vector product.
 *
 * Groups run over a matrix flattened row after row. When the row length n
 * is a multiple of the group size every row starts a fresh group and the
 * product is llama2.c's: per group an exact int32 dot product scaled by the
 * weight and activation scales. When it is not (hidden_dim for w2, say), a
 * group spans two rows; the row is then cut into segments where both the
 * weight group and the activation group are constant, which is exactly the
 * dequantized product. The original runq dropped those row tails.
 */
#include "internal.h"

#include <float.h>
#include <math.h>

/* Activations: per group scale = max|x| / 127, q = round half away from zero.
 * The last group is partial when n is not a multiple of gs. */
/* roundf (half away from zero) for |v| <= 127.5, without the libm call:
 * truncate, then step away from zero when the dropped part is >= 0.5
 * (v - trunc(v) is exact here). Values past +-127, which only a subnormal
 * scale can produce, saturate. */
static inline int8_t round_away(float v) {
    if (v > 127.0f) return 127;
    if (v < -127.0f) return -127;
    int i = (int)v;
    float frac = v - (float)i;
    return (int8_t)(i + (frac >= 0.5f) - (frac <= -0.5f));
}

void llama2_quantize(int8_t *q, float *s, const float *x, int n, int gs) {
    for (int start = 0, g = 0; start < n; start += gs, g++) {
        int end = start + gs < n ? start + gs : n;
        float wmax = 0.0f;
        int finite = 1;
        for (int i = start; i < end; i++) {
            float v = fabsf(x[i]);
            if (v > wmax) wmax = v;
            finite &= v <= FLT_MAX; /* false for NaN and infinity */
        }
        float scale = finite ? wmax / 127.0f : NAN; /* NaN carries on into the products, as in fp32 */
        s[g] = scale;
        for (int i = start; i < end; i++) q[i] = !finite || scale == 0.0f ? 0 : round_away(x[i] / scale);
    }
}

/* Weights, as the exporter does it: round half to even (n % gs == 0). */
void llama2_quantize_weights(int8_t *q, float *s, const float *x, int64_t n, int gs) {
    for (int64_t start = 0, g = 0; start < n; start += gs, g++) {
        float wmax = 0.0f;
        for (int64_t i = start; i < start + gs; i++) {
            float v = fabsf(x[i]);
            if (v > wmax) wmax = v;
        }
        float scale = wmax / 127.0f;
        s[g] = scale;
        for (int64_t i = start; i < start + gs; i++) {
            /* |r| <= 127 except under a subnormal scale: saturate there */
            float r = scale == 0.0f ? 0.0f : rintf(x[i] / scale);
            q[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
    }
}

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

/* Rows [r0, r1) of the Q8_0 product: the portable kernel. */
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
