/*
 * quant.c - Q8_0 quantization: activations before each int8 matmul
 * (forward.c), and fp32 / bf16 weights when `runq` (or Python's
 * Llama(quantize=True)) loads a model (checkpoint.c).
 *
 * Groups of gs values, each with one scale = max|x| / 127 and int8 values
 * in [-127, 127]. Activations round half away from zero like llama2.c's
 * runq; weights round half to even like the exporter (`llama2c export`).
 * The products of quantized rows: kernels_scalar.c and kernels_avx2.c.
 */
#include "internal.h"

#include <float.h>
#include <math.h>

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

/* Activations: per group scale = max|x| / 127, q = round half away from zero.
 * The last group is partial when n is not a multiple of gs. */
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
