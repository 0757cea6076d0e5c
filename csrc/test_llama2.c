/*
 * test_llama2.c - C unit tests for libllama2 (`make testcc`).
 *
 * Each check compares the library with an independent, deliberately simple
 * computation written here (double-precision matmuls, a naive rescanning
 * BPE merge loop, hand-derived token ids), or checks that malformed input
 * is refused with the right status instead of crashing.
 */
#include "kernels.h"
#include "test_common.h"
#include "threadpool.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t test_rng = 88172645463325252ull;
static float frand(void) { /* uniform in [-1, 1) */
    return (float)((xorshift64(&test_rng) >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

/* ---- kernels ---- */

/* each tier's kernels (test_common.h: every tier this CPU runs) are checked
 * against the scalar loop bit for bit, on weights packed in that tier's own
 * layout (kernels.h) */
static void report_kernels(void) {
    printf("kernel tiers tested against the scalar loop on this CPU:");
    for (int i = 0; i < n_kernels; i++) printf(" %s", kernel_list[i]->name);
    printf("%s\n", kernels_skipped);
}

static llama2_transformer *owner(void) { return owner_for(NULL); }

/* Every kernel against the scalar loop, bit for bit, over all rows and over
 * a thread's sub-range. Matrices of 8 MB and more with rows of 1024 and
 * more are the ones the AVX2 kernel reads one block at a time (one memory
 * stream, prefetched). The scalar loop is checked against double math on
 * rows up to 512 long, where float rounding stays under the 1e-5 bound. */
static void check_f32(int n, int d) {
    float *w = malloc(sizeof(float) * (size_t)n * d), *x = malloc(sizeof(float) * n);
    float *ref = malloc(sizeof(float) * d), *out = malloc(sizeof(float) * d);
    for (size_t i = 0; i < (size_t)n * d; i++) w[i] = frand();
    for (int i = 0; i < n; i++) x[i] = frand();
    llama2_matrix m0 = {.rows = d, .cols = n, .f = w};
    llama2_kernels_scalar.matmul_f32(ref, x, &m0, 0, d);
    if (n <= 512) {
        double worst = 0;
        for (int i = 0; i < d; i++) {
            double exact = 0;
            for (int j = 0; j < n; j++) exact += (double)w[i * n + j] * x[j];
            worst = fmax(worst, fabs(exact - ref[i]));
        }
        CHECK(worst < 1e-5, "scalar fp32 matmul %dx%d matches double math (max err %g)", d, n, worst);
    }
    for (int k = 1; k < n_kernels; k++) {
        llama2_transformer *t = owner_for(kernel_list[k]);
        llama2_matrix m = m0;
        llama2_pack_f32(t, &m, NULL);
        /* whole range, and an 8-aligned sub-range as a thread would get */
        for (int i = 0; i < d; i++) out[i] = -1.0f;
        kernel_list[k]->matmul_f32(out, x, &m, 0, d);
        CHECK(memcmp(out, ref, sizeof(float) * d) == 0, "%s fp32 matmul %dx%d is bit-identical to scalar",
              kernel_list[k]->name, d, n);
        if (d > 16) {
            for (int i = 0; i < d; i++) out[i] = -1.0f;
            kernel_list[k]->matmul_f32(out, x, &m, 8, d - 3);
            int ok = out[7] == -1.0f && out[d - 3] == -1.0f &&
                     memcmp(out + 8, ref + 8, sizeof(float) * (d - 11)) == 0;
            CHECK(ok, "%s fp32 matmul writes exactly rows [8, %d)", kernel_list[k]->name, d - 3);
        }
        free_owner(t);
    }
    free(w); free(x); free(ref); free(out);
}

/* batched fp32 kernels: every token's rows bit-identical to the scalar
 * single-token product, for token counts around the 4-token tile, column
 * counts around the column tile, and a thread's sub-range of rows */
static void check_f32_batch(int n, int d, int nt) {
    float *w = malloc(sizeof(float) * n * d), *x = malloc(sizeof(float) * n * nt);
    size_t os = (size_t)d + 5; /* outputs need not be packed */
    float *ref = malloc(sizeof(float) * os * nt), *out = malloc(sizeof(float) * os * nt);
    for (int i = 0; i < n * d; i++) w[i] = frand();
    for (int i = 0; i < n * nt; i++) x[i] = frand();
    llama2_matrix m0 = {.rows = d, .cols = n, .f = w};
    llama2_activation a[64];
    for (int b = 0; b < nt; b++) {
        a[b].x = x + (size_t)b * n;
        a[b].n = n;
        llama2_kernels_scalar.matmul_f32(ref + b * os, a[b].x, &m0, 0, d);
    }
    for (int k = 1; k < n_kernels; k++) {
        if (!kernel_list[k]->matmul_f32_batch) continue;
        llama2_transformer *t = owner_for(kernel_list[k]);
        llama2_matrix m = m0;
        llama2_pack_f32(t, &m, NULL);
        int r0 = d > 16 ? 8 : 0, r1 = d > 16 ? d - 3 : d;
        for (size_t i = 0; i < os * nt; i++) out[i] = -1.0f;
        kernel_list[k]->matmul_f32_batch(out, os, a, nt, &m, r0, r1);
        int ok = 1;
        for (int b = 0; b < nt && ok; b++) {
            const float *o = out + b * os, *r = ref + b * os;
            ok = memcmp(o + r0, r + r0, sizeof(float) * (r1 - r0)) == 0 && (r0 == 0 || o[r0 - 1] == -1.0f) &&
                 o[r1] == -1.0f;
        }
        CHECK(ok, "%s batched fp32 matmul %dx%d x %d tokens, rows [%d, %d): bit-identical, nothing else written",
              kernel_list[k]->name, d, n, nt, r0, r1);
        free_owner(t);
    }
    free(w); free(x); free(ref); free(out);
}

/* bf16 kernels, single and batched: bit-identical to a fused multiply-add
 * chain over the values widened to fp32 (fmaf, column by column), and close
 * to the fp32 product of those values */
static void check_bf16(int n, int d, int nt) {
    uint16_t *h = malloc(2 * (size_t)n * d);
    float *wf = malloc(sizeof(float) * n * d), *x = malloc(sizeof(float) * n * nt);
    size_t os = (size_t)d + 3;
    float *ref = malloc(sizeof(float) * os * nt), *out = malloc(sizeof(float) * os * nt);
    for (int i = 0; i < n * d; i++) {
        float v = frand();
        uint32_t u;
        memcpy(&u, &v, 4);
        h[i] = (uint16_t)(u >> 16);
        wf[i] = llama2_bf16_to_f32(h[i]);
    }
    for (int i = 0; i < n * nt; i++) x[i] = frand();
    llama2_matrix mf = {.rows = d, .cols = n, .f = wf}, mh0 = {.rows = d, .cols = n, .h = h};
    llama2_activation a[64];
    double worst = 0;
    for (int b = 0; b < nt; b++) {
        a[b].x = x + (size_t)b * n;
        a[b].n = n;
        llama2_kernels_scalar.matmul_f32(out, a[b].x, &mf, 0, d);
        for (int i = 0; i < d; i++) {
            float v = 0.0f;
            for (int j = 0; j < n; j++) v = fmaf(wf[(size_t)i * n + j], a[b].x[j], v);
            ref[b * os + i] = v;
            worst = fmax(worst, fabs((double)v - out[i]) / (1.0 + fabs(out[i])));
        }
    }
    CHECK(worst < 1e-5, "bf16 fused products %dx%d are within rounding of the fp32 products (rel %g)", d, n, worst);
    for (int k = 0; k < n_kernels; k++) {
        const llama2_kernels *K = kernel_list[k];
        llama2_transformer *t = owner_for(K);
        llama2_matrix mh = mh0;
        if (K->packs) llama2_pack_bf16(t, &mh, NULL);
        for (size_t i = 0; i < os; i++) out[i] = -1.0f;
        K->matmul_bf16(out, x, &mh, 0, d);
        CHECK(memcmp(out, ref, sizeof(float) * d) == 0 && out[d] == -1.0f,
              "%s bf16 matmul %dx%d is bit-identical to the fused multiply-add chain", K->name, d, n);
        if (!K->matmul_bf16_batch) {
            free_owner(t);
            continue;
        }
        int r0 = d > 16 ? 8 : 0, r1 = d > 16 ? d - 3 : d, ok = 1;
        for (size_t i = 0; i < os * nt; i++) out[i] = -1.0f;
        K->matmul_bf16_batch(out, os, a, nt, &mh, r0, r1);
        for (int b = 0; b < nt && ok; b++) {
            const float *o = out + b * os, *r = ref + b * os;
            ok = memcmp(o + r0, r + r0, sizeof(float) * (r1 - r0)) == 0 && (r0 == 0 || o[r0 - 1] == -1.0f) &&
                 o[r1] == -1.0f;
        }
        CHECK(ok, "%s batched bf16 matmul %dx%d x %d tokens: bit-identical", K->name, d, n, nt);
        free_owner(t);
    }
    free(h); free(wf); free(x); free(ref); free(out);
}

/* activation quantization rounds half away from zero, as roundf does */
static void check_quantize_rounding(void) {
    float x[64];
    int8_t q[64];
    float s[1];
    unsigned seed = 7;
    x[0] = 127.0f; /* scale = 127 / 127 = 1: q is round(x) itself */
    const float ties[] = {0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -126.5f, 126.5f, 0.49999997f, -0.49999997f,
                          0.50000006f, 0.0f, -0.0f, 3.0f, -127.0f};
    int nt = (int)(sizeof(ties) / sizeof(ties[0]));
    for (int i = 1; i < 64; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = i <= nt ? ties[i - 1] : ((float)(seed >> 8) / 16777216.0f * 254.0f - 127.0f);
    }
    llama2_quantize(q, s, x, 64, 64);
    int ok = s[0] == 1.0f;
    for (int i = 0; i < 64; i++) ok &= q[i] == (int8_t)roundf(x[i]);
    CHECK(ok, "activation quantization rounds exactly like roundf (ties away from zero)");
}

/* int8 kernels at the edges of the value range: +-127 in every weight and
 * activation (no int16 saturation in the regrouped kernel), and a -128
 * weight (outside Q8_0, only in hand-made files), which must keep the
 * regrouped layout off the matrix and still give the scalar result */
static void check_q8_extremes(int n, int d, int gs) {
    int64_t total = (int64_t)n * d;
    int8_t *wq = malloc(total), *xq = malloc(n);
    float *ws = malloc(sizeof(float) * (total / gs)), *xs = malloc(sizeof(float) * (n / gs));
    float *ref = malloc(sizeof(float) * d), *out = malloc(sizeof(float) * d);
    for (int64_t i = 0; i < total / gs; i++) ws[i] = 0.01f + 0.001f * (float)(i % 7);
    for (int i = 0; i < n / gs; i++) xs[i] = 0.02f;
    for (int with_min = 0; with_min < 2; with_min++) {
        for (int64_t i = 0; i < total; i++) wq[i] = (int8_t)((i * 7 % 3) ? -127 : 127);
        for (int i = 0; i < n; i++) xq[i] = (int8_t)((i % 5 == 1) ? -127 : 127);
        if (with_min) wq[3] = wq[total - 1] = -128;
        llama2_matrix m0 = {.rows = d, .cols = n, .q = wq, .s = ws};
        llama2_kernels_scalar.matmul_q8(ref, xq, xs, &m0, gs, 0, d);
        llama2_transformer *t = owner();
        llama2_matrix m = m0;
        llama2_pack_scales(t, &m, gs, NULL);
        CHECK((m.pq == NULL) == with_min, "int8 values regrouped (sign-trick layout) %s (n=%d gs=%d)",
              with_min ? "not at all when a -128 is present" : "when all are in [-127, 127]", n, gs);
        free_owner(t);
        for (int k = 1; k < n_kernels; k++) {
            const llama2_kernels *K = kernel_list[k];
            t = owner_for(K);
            m = m0;
            llama2_pack_scales(t, &m, gs, NULL);
            if (K->q8_format != LLAMA2_Q8_SIGNED_NO_MIN)
                CHECK(m.pq != NULL, "%s: int8 values regrouped whatever their values (n=%d gs=%d)", K->name, n, gs);
            K->matmul_q8(out, xq, xs, &m, gs, 0, d);
            CHECK(memcmp(out, ref, sizeof(float) * d) == 0, "%s q8 matmul with %s is bit-identical to scalar",
                  K->name, with_min ? "a -128 weight" : "+-127 everywhere");
            free_owner(t);
        }
    }
    free(wq); free(xq); free(ws); free(xs); free(ref); free(out);
}

/* q8 matmul against dequantized double math, for aligned and row-spanning groups */
static void check_q8(int n, int d, int gs) {
    int64_t total = (int64_t)n * d;
    float *w = malloc(sizeof(float) * total), *x = malloc(sizeof(float) * n);
    int8_t *wq = malloc(total), *xq = malloc(n);
    float *ws = malloc(sizeof(float) * (total / gs)), *xs = malloc(sizeof(float) * (n / gs + 1));
    float *ref = malloc(sizeof(float) * d), *out = malloc(sizeof(float) * d);
    for (int64_t i = 0; i < total; i++) w[i] = frand();
    for (int i = 0; i < n; i++) x[i] = frand() * 3;
    llama2_quantize_weights(wq, ws, w, total, gs);
    llama2_quantize(xq, xs, x, n, gs);
    const llama2_matrix m0 = {.rows = d, .cols = n, .q = wq, .s = ws};
    llama2_kernels_scalar.matmul_q8(ref, xq, xs, &m0, gs, 0, d);
    double worst = 0, worst_q = 0;
    for (int i = 0; i < d; i++) {
        double exact = 0;
        for (int j = 0; j < n; j++) {
            int64_t flat = (int64_t)i * n + j;
            double wdq = (double)wq[flat] * ws[flat / gs];
            double xdq = (double)xq[j] * xs[j / gs];
            exact += wdq * xdq;
            /* quantization error stays within half a step */
            worst_q = fmax(worst_q, fabs(wdq - w[flat]) - 0.5 * ws[flat / gs] * 1.0001);
        }
        worst = fmax(worst, fabs(exact - ref[i]) / (1 + fabs(exact)));
    }
    CHECK(worst < 1e-5, "q8 matmul n=%d d=%d gs=%d matches dequantized math (rel err %g)", n, d, gs, worst);
    CHECK(worst_q <= 1e-7, "q8 weights within half a step of fp32 (n=%d gs=%d)", n, gs);
    if (n % gs == 0 && gs % 32 == 0) {
        for (int packed = 0; packed < 2; packed++) {
            for (int k = 1; k < n_kernels; k++) {
                llama2_transformer *t = owner_for(kernel_list[k]);
                llama2_matrix m = m0;
                if (packed) llama2_pack_scales(t, &m, gs, NULL);
                for (int i = 0; i < d; i++) out[i] = -1.0f;
                kernel_list[k]->matmul_q8(out, xq, xs, &m, gs, 0, d);
                CHECK(memcmp(out, ref, sizeof(float) * d) == 0,
                      "%s q8 matmul n=%d d=%d gs=%d (%s scales) is bit-identical to scalar",
                      kernel_list[k]->name, n, d, gs, packed ? "regrouped" : "plain");
                if (d > 16) { /* a thread's share: rows [8, d) */
                    for (int i = 0; i < d; i++) out[i] = -1.0f;
                    kernel_list[k]->matmul_q8(out, xq, xs, &m, gs, 8, d);
                    CHECK(out[7] == -1.0f && memcmp(out + 8, ref + 8, sizeof(float) * (d - 8)) == 0,
                          "%s q8 matmul writes exactly rows [8, %d)", kernel_list[k]->name, d);
                }
                free_owner(t);
            }
        }
    }
    if (n % gs != 0 && n % 32 == 0 && gs % 32 == 0) { /* groups span rows in whole 32-value runs */
        for (int packed = 0; packed < 2; packed++)
        for (int k = 1; k < n_kernels; k++) {
            llama2_transformer *t = owner_for(kernel_list[k]);
            llama2_matrix m = m0;
            if (packed) {
                llama2_pack_scales(t, &m, gs, NULL);
                CHECK(m.pq && m.pends, "q8 span matrix n=%d gs=%d gets the %s regrouped layout", n, gs,
                      kernel_list[k]->name);
            }
            if (!kernel_list[k]->matmul_q8_span) {
                free_owner(t);
                continue;
            }
            for (int i = 0; i < d; i++) out[i] = -1.0f;
            kernel_list[k]->matmul_q8_span(out, xq, xs, &m, gs, 0, d);
            CHECK(memcmp(out, ref, sizeof(float) * d) == 0,
                  "%s q8 matmul with groups across rows n=%d d=%d gs=%d (%s) is bit-identical to scalar",
                  kernel_list[k]->name, n, d, gs, packed ? "regrouped" : "row by row");
            if (d > 3) {
                for (int i = 0; i < d; i++) out[i] = -1.0f;
                kernel_list[k]->matmul_q8_span(out, xq, xs, &m, gs, 1, d - 1);
                CHECK(out[0] == -1.0f && out[d - 1] == -1.0f && memcmp(out + 1, ref + 1, sizeof(float) * (d - 2)) == 0,
                      "%s q8 span matmul writes exactly rows [1, %d)", kernel_list[k]->name, d - 1);
            }
            free_owner(t);
        }
    }
    free(w); free(x); free(wq); free(xq); free(ws); free(xs); free(ref); free(out);
}

/* every tier's activation quantizer against the portable one, bit for bit:
 * random groups, ties, zeros, tiny and subnormal values (scales under which
 * x / scale passes 127), NaN and infinities, and a last partial group */
static void check_quantize_tiers(int n, int gs) {
    float *x = malloc(sizeof(float) * n), *s0 = malloc(sizeof(float) * (n / gs + 1)),
          *s1 = malloc(sizeof(float) * (n / gs + 1));
    int8_t *q0 = malloc(n), *q1 = malloc(n);
    uint64_t seed = 99;
    for (int i = 0; i < n; i++) {
        const int group = i / gs, kind = group % 8;
        const float r = (float)(xorshift64(&seed) >> 40) / 16777216.0f * 2.0f - 1.0f;
        x[i] = kind == 0 ? r * 10.0f
             : kind == 1 ? (float)((int)(r * 126.0f)) + 0.5f   /* ties: the scale is 1 */
             : kind == 2 ? 0.0f
             : kind == 3 ? r * 1e-39f                           /* subnormal */
             : kind == 4 ? (i % gs == 3 ? NAN : r)
             : kind == 5 ? (i % gs == 1 ? -INFINITY : r)
             : kind == 6 ? (i % gs == 0 ? 1e-45f : 0.0f)       /* the smallest subnormal alone */
                         : r * 3e38f;
        if (kind == 1 && i % gs == 0) x[i] = 127.0f;
    }
    llama2_quantize(q0, s0, x, n, gs);
    for (int k = 1; k < n_kernels; k++) {
        if (!kernel_list[k]->quantize) continue;
        memset(q1, 0x55, n);
        kernel_list[k]->quantize(q1, s1, x, n, gs);
        const int groups = (n + gs - 1) / gs;
        int same = memcmp(q0, q1, n) == 0;
        for (int g = 0; g < groups; g++) same &= memcmp(&s0[g], &s1[g], 4) == 0 || (isnan(s0[g]) && isnan(s1[g]));
        CHECK(same, "%s quantize n %d gs %d: bit-identical to the portable loop", kernel_list[k]->name, n, gs);
    }
    free(x); free(s0); free(s1); free(q0); free(q1);
}

static void test_quantize_edges(void) {
    float x[8] = {0, 0, 0, 0, 1.0f, -2.0f, 0.5f, 127.0f};
    int8_t q[8];
    float s[2];
    llama2_quantize(q, s, x, 8, 4);
    CHECK(s[0] == 0.0f && q[0] == 0 && q[3] == 0, "all-zero group quantizes to 0 with scale 0");
    CHECK(s[1] == 1.0f && q[7] == 127 && q[5] == -2 && q[6] == 1, "activation rounding is half away from zero");
    float w[4] = {0.5f, 1.5f, 2.5f, 127.0f};
    llama2_quantize_weights(q, s, w, 4, 4);
    CHECK(q[0] == 0 && q[1] == 2 && q[2] == 2 && q[3] == 127, "weight rounding is half to even (%d %d %d)", q[0], q[1], q[2]);
}

/* every tier's exp() lanes against the C library's expf, bit for bit (NaNs
 * included): the tier's own check first, then every 251st float (every
 * float with LLAMA2_TEST_EXPF=all: about 9 minutes per tier, as half of all floats
 * take glibc's slow underflow path) */
static void check_expf_tiers(void) {
    const char *all = getenv("LLAMA2_TEST_EXPF");
    const uint64_t stride = all && strcmp(all, "all") == 0 ? 1 : 251;
    enum { CHUNK = 1 << 16 };
    float *x = malloc(sizeof(float) * CHUNK), *y = malloc(sizeof(float) * CHUNK);
    for (int k = 1; k < n_kernels; k++) {
        const llama2_kernels *K = kernel_list[k];
        if (!K->exp_lanes) continue;
        if (!llama2_expf_agrees(K->exp_lanes)) {
#if defined(__GLIBC__)
            CHECK(0, "%s exp lanes agree with glibc's expf", K->name);
#else
            printf("note: %s exp lanes differ from this C library's expf: its swiglu and softmax call expf\n", K->name);
#endif
            continue;
        }
        uint64_t bad = 0, first = 0, tested = 0;
        for (uint64_t u = 0; u < (1ull << 32);) {
            int m = 0;
            for (; m < CHUNK && u < (1ull << 32); m++, u += stride) {
                const uint32_t b = (uint32_t)u;
                memcpy(&x[m], &b, 4);
            }
            K->exp_lanes(y, x, m - 1); /* one lane short: the last is written by a call of its own (a tail) */
            K->exp_lanes(y + m - 1, x + m - 1, 1);
            for (int i = 0; i < m; i++) {
                const float want = expf(x[i]);
                if (memcmp(&want, &y[i], 4) != 0) {
                    if (!bad++) memcpy(&first, &x[i], 4);
                }
            }
            tested += (uint64_t)m;
        }
        CHECK(bad == 0, "%s exp lanes equal expf on %llu floats (%llu differ, first 0x%08llx)", K->name,
              (unsigned long long)tested, (unsigned long long)bad, (unsigned long long)first);
    }
    free(x); free(y);
}

/* every tier's swiglu and softmax against the portable ones, bit for bit:
 * lengths around the vector widths, values from tiny to past exp's range,
 * zeros of both signs, subnormals, infinities and NaNs (first and later) */
static float hostile(uint64_t *seed, int i, int kind) {
    const float r = (float)(xorshift64(seed) >> 40) / 16777216.0f * 2.0f - 1.0f;
    switch (kind % 6) {
    case 0: return r * 8.0f;
    case 1: return r * 120.0f;                                   /* past 88 and -104 */
    case 2: return i % 5 == 0 ? -0.0f : i % 5 == 1 ? 0.0f : r * 1e-40f;
    case 3: return i % 7 == 3 ? NAN : i % 7 == 5 ? -INFINITY : r;
    case 4: return i % 3 == 0 ? INFINITY : r * 0.001f;
    default: return i == 0 ? NAN : r * 30.0f;
    }
}

static void check_swiglu_softmax_tiers(void) {
    enum { MAX = 2100 };
    float *a = malloc(sizeof(float) * MAX), *b = malloc(sizeof(float) * MAX), *g = malloc(sizeof(float) * MAX),
          *ref = malloc(sizeof(float) * MAX);
    const int lengths[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 100, 768, 2048, 2051};
    for (int k = 1; k < n_kernels; k++) {
        const llama2_kernels *K = kernel_list[k];
        if (!K->swiglu && !K->softmax) continue;
        int same_swiglu = 1, same_softmax = 1;
        for (size_t li = 0; li < sizeof(lengths) / sizeof(lengths[0]); li++) {
            const int n = lengths[li];
            for (int kind = 0; kind < 6; kind++) {
                uint64_t seed = 1234 + (uint64_t)(n * 7 + kind);
                for (int i = 0; i < n; i++) a[i] = hostile(&seed, i, kind), g[i] = hostile(&seed, i, kind + 1);
                if (K->swiglu) {
                    memcpy(ref, a, sizeof(float) * n);
                    memcpy(b, a, sizeof(float) * n);
                    llama2_swiglu(ref, g, n);
                    K->swiglu(b, g, n);
                    same_swiglu &= memcmp(ref, b, sizeof(float) * n) == 0;
                }
                if (K->softmax) {
                    memcpy(ref, a, sizeof(float) * n);
                    memcpy(b, a, sizeof(float) * n);
                    llama2_softmax(ref, n);
                    K->softmax(b, n);
                    same_softmax &= memcmp(ref, b, sizeof(float) * n) == 0;
                }
            }
        }
        if (K->swiglu) CHECK(same_swiglu, "%s swiglu: bit-identical to the portable loop", K->name);
        if (K->softmax) CHECK(same_softmax, "%s softmax: bit-identical to the portable loop", K->name);
    }
    free(a); free(b); free(g); free(ref);
}

static void test_softmax_rmsnorm(void) {
    float x[5] = {1, 2, 3, 4, 1000};
    llama2_softmax(x, 5);
    CHECK(fabsf(x[4] - 1.0f) < 1e-6 && x[0] >= 0.0f, "softmax is stable for large inputs");
    float v[4] = {3, 4, 0, 0}, wt[4] = {1, 1, 1, 2}, o[4];
    llama2_rmsnorm(o, v, wt, 4, 0.0f);
    CHECK(fabsf(o[0] - 1.2f) < 1e-6 && fabsf(o[1] - 1.6f) < 1e-6, "rmsnorm scales by 1/rms");
}

/* Attention kernels: the scalar scores against a plain double-free loop
 * over row-major keys (so the blocked layout is read right), every other
 * kernel bit-identical to the scalar one, for head sizes with and without a
 * whole number of vectors and position counts around block boundaries. */
static void check_attention(int hs, int n, size_t stride) {
    const int B = LLAMA2_KEY_BLOCK;
    int blocks = (n + B - 1) / B;
    float *k = malloc(sizeof(float) * n * hs), *kt = calloc((size_t)blocks * B * hs, sizeof(float));
    float *v = malloc(sizeof(float) * n * stride), *q = malloc(sizeof(float) * hs);
    float *ref = malloc(sizeof(float) * n), *att = malloc(sizeof(float) * (n + B));
    float *oref = malloc(sizeof(float) * hs), *out = malloc(sizeof(float) * hs);
    for (int i = 0; i < hs; i++) q[i] = frand();
    for (int p = 0; p < n; p++)
        for (int i = 0; i < hs; i++) {
            k[p * hs + i] = frand();
            kt[(size_t)(p / B) * B * hs + (size_t)i * B + p % B] = k[p * hs + i];
        }
    for (size_t i = 0; i < (size_t)n * stride; i++) v[i] = frand();
    float scale = sqrtf((float)hs);
    for (int p = 0; p < n; p++) {
        float sc = 0.0f;
        for (int i = 0; i < hs; i++) sc += q[i] * k[p * hs + i];
        ref[p] = sc / scale;
    }
    llama2_kernels_scalar.attn_scores(att, q, kt, n, hs, scale);
    CHECK(memcmp(att, ref, sizeof(float) * n) == 0, "scalar attention scores read the blocked keys (hs=%d n=%d)", hs, n);
    llama2_kernels_scalar.attn_values(oref, ref, v, n, hs, stride);
    for (int kk = 1; kk < n_kernels; kk++) {
        for (int p = 0; p < n + B; p++) att[p] = -7.0f;
        kernel_list[kk]->attn_scores(att, q, kt, n, hs, scale);
        CHECK(memcmp(att, ref, sizeof(float) * n) == 0 && att[n] == -7.0f,
              "%s attention scores hs=%d n=%d are bit-identical to scalar, nothing written past n", kernel_list[kk]->name, hs, n);
        kernel_list[kk]->attn_values(out, ref, v, n, hs, stride);
        CHECK(memcmp(out, oref, sizeof(float) * hs) == 0, "%s attention values hs=%d n=%d are bit-identical to scalar",
              kernel_list[kk]->name, hs, n);
    }
    free(k); free(kt); free(v); free(q); free(ref); free(att); free(oref); free(out);
}

/* ---- sampler ---- */

static void test_sampler(void) {
    uint64_t s = 42, t = 42;
    for (int i = 0; i < 100; i++) {
        /* the xorshift64* recurrence, written out independently */
        t ^= t >> 12; t ^= t << 25; t ^= t >> 27;
        uint32_t expect = (uint32_t)((t * 0x2545F4914F6CDD1Dull) >> 32);
        uint32_t got = llama2_random_u32(&s);
        if (got != expect) { CHECK(0, "rng step %d", i); return; }
    }
    CHECK(s == t, "rng follows xorshift64*");
    uint64_t f = 7;
    float r = llama2_random_f32(&f);
    CHECK(r >= 0.0f && r < 1.0f, "random_f32 in [0,1)");

    llama2_sampler *sm;
    llama2_sampler_params greedy;
    llama2_sampler_params_default(&greedy);
    greedy.temperature = 0.0f;
    llama2_sampler_new(&sm, 5, &greedy, 1, NULL);
    float logits[5] = {0.1f, 3.0f, 3.0f, -1.0f, 2.0f};
    CHECK(llama2_sample(sm, logits) == 1, "greedy takes the first maximum");
    llama2_sampler_free(sm);

    /* top-p with a tiny topp on a uniform distribution must not crash */
    llama2_sampler_params tiny;
    llama2_sampler_params_default(&tiny);
    tiny.topp = 1e-6f;
    llama2_sampler_new(&sm, 512, &tiny, 3, NULL);
    float flat[512];
    for (int i = 0; i < 512; i++) flat[i] = 0.0f;
    int tok = llama2_sample(sm, flat);
    CHECK(tok >= 0 && tok < 512, "top-p on a flat distribution returns a valid token");
    llama2_sampler_free(sm);

    /* top-p never returns a token outside the nucleus */
    llama2_sampler_params nucleus;
    llama2_sampler_params_default(&nucleus);
    nucleus.topp = 0.5f;
    llama2_sampler_new(&sm, 4, &nucleus, 9, NULL);
    int outside = 0;
    for (int i = 0; i < 200; i++) {
        float l[4] = {5.0f, 0.0f, 0.0f, 0.0f}; /* p0 ~ 0.98 > 0.5: nucleus is {0} */
        if (llama2_sample(sm, l) != 0) outside++;
    }
    CHECK(outside == 0, "top-p keeps to the nucleus");
    llama2_sampler_free(sm);
}

/* ---- tokenizer ---- */

static void write_tokenizer(const char *path, const char **pieces, const float *scores, int n) {
    FILE *f = fopen(path, "wb");
    unsigned max_len = 0;
    for (int i = 0; i < n; i++)
        if (strlen(pieces[i]) > max_len) max_len = (unsigned)strlen(pieces[i]);
    fwrite(&max_len, 4, 1, f);
    for (int i = 0; i < n; i++) {
        int len = (int)strlen(pieces[i]);
        fwrite(&scores[i], 4, 1, f);
        fwrite(&len, 4, 1, f);
        fwrite(pieces[i], 1, (size_t)len, f);
    }
    fclose(f);
}

/* the rescanning merge loop, for comparison with the heap-based encoder */
static int naive_encode(llama2_tokenizer *tk, const char *text, int *out) {
    int n = 0;
    out[n++] = 1;
    const char *sp;
    int l;
    int space = -1;
    for (int i = 0; i < llama2_tokenizer_vocab_size(tk); i++) {
        llama2_tokenizer_piece(tk, i, &sp, &l, NULL, NULL);
        if (l == 1 && sp[0] == ' ') { space = i; break; }
    }
    if (text[0] && space >= 0) out[n++] = space;
    for (const char *c = text; *c; c++) {
        int id = -1;
        for (int i = 0; i < llama2_tokenizer_vocab_size(tk); i++) {
            llama2_tokenizer_piece(tk, i, &sp, &l, NULL, NULL);
            if (l == 1 && sp[0] == *c) { id = i; break; }
        }
        out[n++] = id >= 0 ? id : (unsigned char)*c + 3;
    }
    char buf[256];
    for (;;) {
        float best = -1e10f;
        int best_id = -1, best_i = -1;
        for (int i = 0; i + 1 < n; i++) {
            const char *a, *b;
            int la, lb;
            llama2_tokenizer_piece(tk, out[i], &a, &la, NULL, NULL);
            llama2_tokenizer_piece(tk, out[i + 1], &b, &lb, NULL, NULL);
            memcpy(buf, a, la);
            memcpy(buf + la, b, lb);
            for (int id = 0; id < llama2_tokenizer_vocab_size(tk); id++) {
                const char *p;
                int lp;
                float sc;
                llama2_tokenizer_piece(tk, id, &p, &lp, &sc, NULL);
                if (lp == la + lb && memcmp(p, buf, lp) == 0) {
                    if (sc > best) { best = sc; best_id = id; best_i = i; }
                    break;
                }
            }
        }
        if (best_i < 0) break;
        out[best_i] = best_id;
        memmove(out + best_i + 1, out + best_i + 2, sizeof(int) * (n - best_i - 2));
        n--;
    }
    return n;
}

static void test_tokenizer(void) {
    /* 0-2 specials, 3..258 bytes, then pieces */
    const char *pieces[300];
    float scores[300];
    static char bytes[256][8];
    pieces[0] = "<unk>"; pieces[1] = "\n<s>\n"; pieces[2] = "\n</s>\n";
    for (int i = 0; i < 256; i++) {
        snprintf(bytes[i], sizeof(bytes[i]), "<0x%02X>", i);
        pieces[3 + i] = bytes[i];
    }
    for (int i = 0; i < 259; i++) scores[i] = 0.0f;
    const char *extra[] = {" ", "a", "b", "c", "ab", "bc", " a", "abc", " ab", "ca", "é"};
    float extra_scores[] = {-1, -2, -3, -4, -5, -5, -6, -7, -8, -9, -10};
    int n_extra = (int)(sizeof(extra) / sizeof(extra[0]));
    for (int i = 0; i < n_extra; i++) { pieces[259 + i] = extra[i]; scores[259 + i] = extra_scores[i]; }
    int vocab = 259 + n_extra;
    const char *path = tmp_path("tok.bin");
    write_tokenizer(path, pieces, scores, vocab);

    llama2_tokenizer *tk;
    llama2_error err;
    int rc = llama2_tokenizer_open(&tk, path, -1, &err);
    CHECK(rc == LLAMA2_OK, "tokenizer opens (%s)", err.message);
    if (rc) return;
    int toks[64], n;
    llama2_encode(tk, "", 0, 1, 0, toks, &n, NULL);
    CHECK(n == 1 && toks[0] == 1, "empty text encodes to BOS only");
    llama2_encode(tk, "ab", 2, 1, 1, toks, &n, NULL);
    /* " " "a" "b": " a"(-6) vs "ab"(-5): "ab" wins, then " ab"(-8) */
    CHECK(n == 3 && toks[0] == 1 && toks[1] == 259 + 8 && toks[2] == 2, "encode 'ab' -> BOS ' ab' EOS (got n=%d %d)", n, toks[1]);
    llama2_encode(tk, "\x01", 1, 0, 0, toks, &n, NULL);
    CHECK(n == 2 && toks[1] == 0x01 + 3, "unknown byte falls back to its byte token");
    llama2_encode(tk, "\xc3\xa9", 2, 0, 0, toks, &n, NULL);
    CHECK(n == 2 && toks[1] == 259 + 10, "a known multi-byte code point is one token");
    llama2_encode(tk, "\xe2\x82\xac", 3, 0, 0, toks, &n, NULL);
    CHECK(n == 4 && toks[1] == 0xe2 + 3 && toks[3] == 0xac + 3, "an unknown code point is its bytes");

    /* heap merge == rescanning merge on many random strings */
    const char alphabet[] = "abc ";
    int mismatches = 0;
    for (int trial = 0; trial < 300; trial++) {
        char text[40];
        int len = 1 + (int)((frand() + 1) * 15);
        for (int i = 0; i < len; i++) text[i] = alphabet[(int)((frand() + 1) * 2) % 4];
        text[len] = '\0';
        int a[64], b[64], na, nb;
        llama2_encode(tk, text, (size_t)len, 1, 0, a, &na, NULL);
        nb = naive_encode(tk, text, b);
        if (na != nb || memcmp(a, b, sizeof(int) * na) != 0) mismatches++;
    }
    CHECK(mismatches == 0, "heap-based merges equal the rescanning loop (%d mismatches)", mismatches);

    const char *piece;
    int len;
    llama2_decode(tk, 1, 259 + 6, &piece, &len, NULL);
    CHECK(len == 1 && piece[0] == 'a', "leading space dropped after BOS");
    llama2_decode(tk, 5, 259 + 6, &piece, &len, NULL);
    CHECK(len == 2 && piece[0] == ' ', "leading space kept elsewhere");
    llama2_decode(tk, 5, 3 + 0x41, &piece, &len, NULL);
    CHECK(len == 1 && piece[0] == 'A', "<0x41> decodes to the byte A");
    rc = llama2_decode(tk, 5, vocab, &piece, &len, &err);
    CHECK(rc == LLAMA2_ERR_ARGUMENT, "decode refuses a token out of range");
    llama2_tokenizer_free(tk);

    rc = llama2_tokenizer_open(&tk, path, vocab + 1, &err);
    CHECK(rc == LLAMA2_ERR_FORMAT, "a tokenizer with fewer entries than the model is refused: %s", err.message);
    rc = llama2_tokenizer_open(&tk, tmp_path("missing.bin"), -1, &err);
    CHECK(rc == LLAMA2_ERR_NOT_FOUND, "a missing tokenizer file is NOT_FOUND");
    remove(path);
}

static void test_utf8_filter(void) {
    llama2_utf8_filter f;
    llama2_utf8_filter_reset(&f);
    char out[16];
    CHECK(llama2_utf8_filter_push(&f, "\xe4", 1, out) == 0, "lead byte is held");
    CHECK(llama2_utf8_filter_push(&f, "\xbd", 1, out) == 0, "continuation is held");
    int n = llama2_utf8_filter_push(&f, "\xa0", 1, out);
    CHECK(n == 3 && memcmp(out, "\xe4\xbd\xa0", 3) == 0, "completed code point is printed");
    CHECK(llama2_utf8_filter_push(&f, "\x01", 1, out) == 0, "control byte dropped like llama2.c");
    CHECK(llama2_utf8_filter_push(&f, "\n", 1, out) == 1, "newline printed");
    CHECK(llama2_utf8_filter_push(&f, "\x80", 1, out) == 0, "stray continuation dropped");
    llama2_utf8_filter_push(&f, "\xf0", 1, out);
    n = llama2_utf8_filter_push(&f, "hi", 2, out);
    CHECK(n == 2 && out[0] == 'h', "a whole piece after a broken sequence prints as is");
}

/* ---- model files ---- */

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
}

static int open_status(const void *data, size_t n, llama2_error *err) {
    const char *path = tmp_path("model.bin");
    write_bytes(path, data, n);
    llama2_transformer *t = NULL;
    int rc = llama2_transformer_open(&t, path, 0, err);
    llama2_transformer_free(t);
    remove(path);
    return rc;
}

static void test_model_errors(void) {
    llama2_error err;
    int hdr[7] = {8, 16, 1, 2, 2, 4, 4};
    /* exact v0 size: 28 + 4*(V*d + L*d + 4*L*d*d + L*d + 3*L*h*d + d + seq*hs) */
    size_t floats = 4 * 8 + 8 + 4 * 64 + 8 + 3 * 16 * 8 + 8 + 4 * 4;
    size_t size = 28 + 4 * floats;
    unsigned char *buf = calloc(1, size + 64);
    memcpy(buf, hdr, sizeof(hdr));
    CHECK(open_status(buf, size, &err) == LLAMA2_OK, "a well-formed v0 file opens (%s)", err.message);
    CHECK(open_status(buf, size - 1, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "truncated"),
          "truncated v0: %s", err.message);
    CHECK(open_status(buf, size + 4, &err) == LLAMA2_ERR_FORMAT, "trailing bytes: %s", err.message);
    CHECK(open_status(buf, 10, &err) == LLAMA2_ERR_FORMAT, "cut inside the header: %s", err.message);
    CHECK(open_status(buf, 0, &err) == LLAMA2_ERR_FORMAT, "empty file: %s", err.message);
    int bad[][7] = {
        {0, 16, 1, 2, 2, 4, 4}, {8, -16, 1, 2, 2, 4, 4}, {8, 16, 1, 3, 3, 4, 4}, {8, 16, 1, 2, 4, 4, 4},
        {8, 16, 1, 8, 8, 4, 4}, {8, 16, 1, 2, 2, 4, 0}, {8, 16, 1, 2, 2, 0, 4},
        {65536, 1 << 20, 1024, 1, 1, 1 << 22, 1 << 22}, {1 << 30, 16, 1, 2, 2, 4, 4},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memcpy(buf, bad[i], sizeof(hdr));
        int rc = open_status(buf, size, &err);
        CHECK(rc == LLAMA2_ERR_FORMAT, "bad dims #%zu refused: %s", i, err.message);
    }
    /* versioned headers */
    unsigned char vh[256 + 64];
    memset(vh, 0, sizeof(vh));
    uint32_t magic = 0x616b3432u;
    int version = 7;
    memcpy(vh, &magic, 4);
    memcpy(vh + 4, &version, 4);
    memcpy(vh + 8, hdr, sizeof(hdr));
    CHECK(open_status(vh, 256, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "version"),
          "unknown version: %s", err.message);
    version = 2;
    memcpy(vh + 4, &version, 4);
    int gs = 3;
    memcpy(vh + 37, &gs, 4);
    CHECK(open_status(vh, 256, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "group_size"),
          "bad group size: %s", err.message);
    gs = 0;
    memcpy(vh + 37, &gs, 4);
    CHECK(open_status(vh, 256, &err) == LLAMA2_ERR_FORMAT, "zero group size: %s", err.message);
    CHECK(open_status(vh, 100, &err) == LLAMA2_ERR_FORMAT, "truncated versioned header: %s", err.message);
    version = 3;
    memcpy(vh + 4, &version, 4);
    float theta = -1.0f;
    memcpy(vh + 40, &theta, 4);
    CHECK(open_status(vh, 256, &err) == LLAMA2_ERR_FORMAT, "negative rope_theta: %s", err.message);

    llama2_transformer *t;
    CHECK(llama2_transformer_open(&t, tmp_path("does-not-exist.bin"), 0, &err) == LLAMA2_ERR_NOT_FOUND,
          "missing model is NOT_FOUND");
    CHECK(llama2_transformer_open(&t, tmp_dir, 0, &err) == LLAMA2_ERR_IO, "a directory is an IO error: %s", err.message);

    /* forward refuses tokens and positions out of range */
    memcpy(buf, hdr, sizeof(hdr));
    for (size_t i = 28; i < size; i += 4) { float v = 0.01f * (float)(i % 7); memcpy(buf + i, &v, 4); }
    const char *path = tmp_path("ok.bin");
    write_bytes(path, buf, size);
    if (llama2_transformer_open(&t, path, 0, &err) == LLAMA2_OK) {
        float *logits;
        CHECK(llama2_forward(t, 4, 0, &logits, &err) == LLAMA2_ERR_ARGUMENT, "token == vocab refused");
        CHECK(llama2_forward(t, -1, 0, &logits, &err) == LLAMA2_ERR_ARGUMENT, "negative token refused");
        CHECK(llama2_forward(t, 0, 4, &logits, &err) == LLAMA2_ERR_ARGUMENT, "pos == seq_len refused");
        CHECK(llama2_forward(t, 3, 3, &logits, &err) == LLAMA2_OK, "last position runs");
        llama2_transformer_free(t);
    }
    if (llama2_transformer_open(&t, path, LLAMA2_OPEN_QUANTIZE, &err) == LLAMA2_OK) {
        CHECK(llama2_transformer_config(t)->group_size == 8, "quantize on load picks the group size dividing dim");
        llama2_transformer_free(t);
    }
    remove(path);
    free(buf);
}

/* A random version 1 model file (shared classifier) of these dims. */
static void write_v1(const char *path, int dim, int hidden, int layers, int heads, int kv_heads, int vocab,
                     int seq_len) {
    int hs = dim / heads, kv = hs * kv_heads;
    size_t floats = (size_t)2 * layers * dim + dim + (size_t)vocab * dim +
                    (size_t)layers * (2 * dim * dim + 2 * kv * dim + 3 * hidden * dim);
    unsigned char *buf = calloc(1, 256 + 4 * floats);
    uint32_t magic = 0x616b3432u;
    int head[9] = {1, dim, hidden, layers, heads, kv_heads, vocab, seq_len};
    memcpy(buf, &magic, 4);
    memcpy(buf + 4, head, 8 * sizeof(int));
    buf[36] = 1;
    float *w = (float *)(buf + 256);
    for (size_t i = 0; i < floats; i++) w[i] = 0.5f * frand();
    write_bytes(path, buf, 256 + 4 * floats);
    free(buf);
}

/* Contexts of one model are independent: interleaved sequences give
 * bit-for-bit the logits each gives alone; n_ctx bounds positions. */
static void test_contexts(void) {
    llama2_error err;
    const char *path = tmp_path("ctx.bin");
    write_v1(path, 32, 48, 2, 4, 2, 40, 64);
    llama2_transformer *t;
    if (llama2_transformer_open(&t, path, 0, &err) != LLAMA2_OK) {
        CHECK(0, "context test model opens: %s", err.message);
        return;
    }
    llama2_context *a, *b, *alone, *small;
    CHECK(llama2_context_new(&a, t, 0, &err) == LLAMA2_OK && llama2_context_n_ctx(a) == 64, "n_ctx 0 is seq_len");
    CHECK(llama2_context_new(&b, t, 0, &err) == LLAMA2_OK, "a second context");
    CHECK(llama2_context_new(&alone, t, 0, &err) == LLAMA2_OK, "a third context");
    CHECK(llama2_context_new(&small, t, 3, &err) == LLAMA2_OK && llama2_context_n_ctx(small) == 3, "n_ctx 3");
    llama2_context *big = NULL;
    CHECK(llama2_context_new(&big, t, 65, &err) == LLAMA2_ERR_ARGUMENT && !big && strstr(err.message, "seq_len"),
          "n_ctx past seq_len refused: %s", err.message);
    const int seq_a[5] = {1, 7, 9, 30, 2}, seq_b[5] = {1, 20, 21, 22, 23};
    float *la = NULL, *lb = NULL, *l1 = NULL;
    int ok = 1;
    for (int pos = 0; pos < 5; pos++) {
        ok &= llama2_context_forward(a, seq_a[pos], pos, &la, &err) == LLAMA2_OK;
        ok &= llama2_context_forward(b, seq_b[pos], pos, &lb, &err) == LLAMA2_OK;
        ok &= llama2_forward(t, seq_b[4 - pos], pos, &l1, &err) == LLAMA2_OK; /* the default context */
    }
    CHECK(ok, "interleaved forwards run");
    float *ref = NULL;
    ok = llama2_context_forward_batch(alone, seq_a, 5, 0, &ref, &err) == LLAMA2_OK;
    CHECK(ok && memcmp(ref, la, 40 * sizeof(float)) == 0, "context a unaffected by b and the default context");
    ok = llama2_context_forward_batch(alone, seq_b, 5, 0, &ref, &err) == LLAMA2_OK;
    CHECK(ok && memcmp(ref, lb, 40 * sizeof(float)) == 0, "context b unaffected by a and the default context");
    CHECK(llama2_context_forward(small, 1, 3, &la, &err) == LLAMA2_ERR_ARGUMENT, "pos == n_ctx refused");
    CHECK(llama2_context_forward_batch(small, seq_a, 4, 0, &la, &err) == LLAMA2_ERR_ARGUMENT,
          "a batch past n_ctx refused: %s", err.message);
    CHECK(llama2_context_forward_batch(a, seq_a, 3, INT_MAX - 1, &la, &err) == LLAMA2_ERR_ARGUMENT,
          "a batch at INT_MAX refused without overflow: %s", err.message);
    CHECK(llama2_context_reserve(NULL, 4, &err) == LLAMA2_ERR_ARGUMENT, "reserve: a null context refused");
    CHECK(llama2_context_reserve(a, -1, &err) == LLAMA2_ERR_ARGUMENT, "reserve: negative positions refused");
    ok = llama2_context_reserve(a, 1000, &err) == LLAMA2_OK && llama2_context_reserve(a, 0, &err) == LLAMA2_OK;
    ok &= llama2_context_forward_batch(a, seq_a, 5, 0, &la, &err) == LLAMA2_OK;
    ok &= llama2_context_forward_batch(alone, seq_a, 5, 0, &ref, &err) == LLAMA2_OK;
    CHECK(ok && memcmp(ref, la, 40 * sizeof(float)) == 0, "reserve (capped at n_ctx) changes no logits");
    llama2_transformer_set_threads(t, 3);
    ok = llama2_context_forward_batch(b, seq_a, 5, 0, &lb, &err) == LLAMA2_OK;
    ok &= llama2_context_forward_batch(alone, seq_a, 5, 0, &ref, &err) == LLAMA2_OK;
    CHECK(ok && memcmp(ref, lb, 40 * sizeof(float)) == 0, "3 threads give the same logits");
    llama2_context_free(a);
    llama2_context_free(b);
    llama2_context_free(alone);
    llama2_context_free(small);
    llama2_transformer_free(t);

    /* a NaN anywhere in the weights is a format error naming the tensor */
    FILE *f = fopen(path, "r+b");
    float nan_value = NAN;
    fseek(f, 256 + 4 * (2 * 2 * 32 + 32 + 40 * 32 + 5), SEEK_SET); /* wq of layer 0, element 5 */
    fwrite(&nan_value, 4, 1, f);
    fclose(f);
    CHECK(llama2_transformer_open(&t, path, 0, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "wq of layer 0"),
          "NaN weight refused: %s", err.message);
    CHECK(llama2_transformer_open(&t, path, LLAMA2_OPEN_QUANTIZE, &err) == LLAMA2_ERR_FORMAT,
          "NaN weight refused before quantizing: %s", err.message);
    remove(path);
}

/* LLAMA2_KERNELS forces a tier the CPU runs; a tier it cannot run (or a
 * name that is no tier) falls back to the best it runs, with a reason, and
 * models opened under each tier give bit-identical logits, fp32 and int8
 * (groups across rows included: w2's rows of 160 with groups of 32... 64). */
static void test_tiers(void) {
    const char *saved = getenv("LLAMA2_KERNELS");
    char keep[64] = "";
    if (saved) snprintf(keep, sizeof(keep), "%s", saved);
    unsetenv("LLAMA2_KERNELS");
    const llama2_kernels *best = llama2_kernels_select();
    printf("kernel tier chosen here: %s (%s)\n", llama2_kernels_name(), llama2_kernels_reason());
    printf("cpu features seen: %s\n", llama2_cpu_features());
    CHECK(strlen(llama2_kernels_reason()) > 0, "the default choice has a reason");
    const char *names[] = {"portable", "scalar", "avx2", "avx512", "neon", "no-such-tier"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        setenv("LLAMA2_KERNELS", names[i], 1);
        const llama2_kernels *want = llama2_kernels_by_name(names[i]);
        const llama2_kernels *got = llama2_kernels_select();
        const char *reason = llama2_kernels_reason();
        if (want)
            CHECK(got == want && strstr(reason, "forced"), "LLAMA2_KERNELS=%s forces %s: %s", names[i], got->name, reason);
        else
            CHECK(got == best && strstr(reason, "cannot run") && strstr(reason, best->name),
                  "LLAMA2_KERNELS=%s falls back to %s: %s", names[i], got->name, reason);
    }
    /* whole models under every tier */
    const char *path = tmp_path("tiers.bin");
    write_v1(path, 64, 160, 2, 4, 2, 40, 64);
    const int toks[6] = {1, 5, 9, 30, 2, 17};
    for (int quantize = 0; quantize < 2; quantize++) {
        float ref[40], *logits = NULL;
        for (int k = 0; k < n_kernels; k++) {
            for (size_t i = 0; i < sizeof(tier_names) / sizeof(tier_names[0]); i++) /* the name that forces this table */
                if (llama2_kernels_by_name(tier_names[i]) == kernel_list[k]) setenv("LLAMA2_KERNELS", tier_names[i], 1);
            llama2_transformer *t;
            llama2_error err;
            if (llama2_transformer_open(&t, path, quantize ? LLAMA2_OPEN_QUANTIZE : 0, &err) != LLAMA2_OK) {
                CHECK(0, "tier model opens: %s", err.message);
                continue;
            }
            int ok = 1;
            float last[40];
            ok &= llama2_forward_batch(t, toks, 4, 0, &logits, &err) == LLAMA2_OK; /* prefill */
            ok &= llama2_forward(t, toks[4], 4, &logits, &err) == LLAMA2_OK;        /* decode */
            ok &= llama2_forward(t, toks[5], 5, &logits, &err) == LLAMA2_OK;
            if (ok) memcpy(k ? last : ref, logits, sizeof(last));
            if (k) CHECK(ok && memcmp(last, ref, sizeof(last)) == 0, "%s %s model: logits bit-identical to scalar",
                         kernel_list[k]->name, quantize ? "int8" : "fp32");
            llama2_transformer_free(t);
        }
    }
    remove(path);
    if (saved) setenv("LLAMA2_KERNELS", keep, 1);
    else unsetenv("LLAMA2_KERNELS");
}

/* A vocabulary too small for byte fallback (ids 3..258) gets <unk>. */
static void test_small_vocab_byte_fallback(void) {
    const char *pieces[] = {"<unk>", "<s>", "</s>", " ", "a", "b", "ab"};
    const float scores[] = {0, 0, 0, -1, -2, -3, -4};
    const char *path = tmp_path("tok7.bin");
    write_tokenizer(path, pieces, scores, 7);
    llama2_tokenizer *tk;
    llama2_error err;
    if (llama2_tokenizer_open(&tk, path, -1, &err) != LLAMA2_OK) {
        CHECK(0, "small tokenizer opens: %s", err.message);
        return;
    }
    const char *text = "ab z\xc3\xa9\xff";
    int tokens[32], n = 0, in_range = 1;
    CHECK(llama2_encode(tk, text, strlen(text), 1, 1, tokens, &n, &err) == LLAMA2_OK, "encodes");
    for (int i = 0; i < n; i++) in_range &= tokens[i] >= 0 && tokens[i] < 7;
    /* BOS, " ", "ab", " ", then z, the two bytes of é and 0xff as <unk>, EOS */
    CHECK(in_range && n == 9 && tokens[2] == 6 && tokens[4] == 0 && tokens[7] == 0, "byte fallback past the vocabulary is <unk>");
    llama2_tokenizer_free(tk);
    remove(path);
}

/* logit_bias: added before anything else, -inf bans, bad entries refused. */
static void test_logit_bias(void) {
    llama2_sampler_params p;
    llama2_sampler_params_default(&p);
    p.temperature = 0.0f;
    llama2_sampler *s;
    llama2_error err;
    if (llama2_sampler_new(&s, 5, &p, 1, &err) != LLAMA2_OK) { CHECK(0, "sampler: %s", err.message); return; }
    float logits[5] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
    int up[1] = {1}, ban[1] = {4}, bad[1] = {5};
    float plus[1] = {100.0f}, minus_inf[1] = {-INFINITY}, nan_bias[1] = {NAN};
    CHECK(llama2_sample(s, logits) == 4, "greedy without bias");
    CHECK(llama2_sampler_set_logit_bias(s, up, plus, 1, &err) == LLAMA2_OK, "set a bias");
    float l2[5] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
    CHECK(llama2_sample(s, l2) == 1, "a +100 bias wins");
    CHECK(llama2_sampler_set_logit_bias(s, ban, minus_inf, 1, &err) == LLAMA2_OK, "ban a token");
    float l3[5] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
    CHECK(llama2_sample(s, l3) == 3, "a banned token is never chosen");
    CHECK(llama2_sampler_set_logit_bias(s, bad, plus, 1, &err) == LLAMA2_ERR_ARGUMENT, "token out of range refused");
    CHECK(llama2_sampler_set_logit_bias(s, up, nan_bias, 1, &err) == LLAMA2_ERR_ARGUMENT, "NaN bias refused");
    CHECK(llama2_sampler_set_logit_bias(s, NULL, NULL, 0, &err) == LLAMA2_OK, "clear the bias");
    float l4[5] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
    CHECK(llama2_sample(s, l4) == 4, "cleared");
    llama2_sampler_free(s);
}

/* The thread pool runs every chunk of every job exactly once and returns
 * only when all are done, also when consecutive jobs have very different
 * chunk counts (a worker still holding the last ticket of a short job must
 * not claim a chunk of the next, longer one). */
typedef struct {
    int counts[64];
    int bad; /* a chunk seen running after its job returned */
    volatile int open;
} pool_probe;

static void pool_probe_chunk(void *ctx, int c) {
    pool_probe *p = (pool_probe *)ctx;
    if (!p->open) p->bad = 1;
    __atomic_add_fetch(&p->counts[c], 1, __ATOMIC_SEQ_CST);
}

static void check_pool(void) {
    llama2_pool *pool = llama2_pool_new(3);
    CHECK(pool != NULL && llama2_pool_threads(pool) >= 2, "thread pool starts");
    if (!pool) return;
    static pool_probe probe;
    int wrong = 0;
    for (int job = 0; job < 60000 && !wrong; job++) {
        int n = job % 3 == 0 ? 2 : job % 3 == 1 ? 61 : 7;
        memset(probe.counts, 0, sizeof(probe.counts));
        probe.open = 1;
        llama2_pool_run(pool, pool_probe_chunk, &probe, n);
        probe.open = 0;
        for (int c = 0; c < 64; c++)
            if (__atomic_load_n(&probe.counts[c], __ATOMIC_SEQ_CST) != (c < n)) wrong = 1;
    }
    CHECK(!wrong && !probe.bad, "pool: 60000 jobs of 2, 61 and 7 chunks, each chunk run once, none after its job");
    llama2_pool_free(pool);
}

int main(void) {
    use_tmpdir_from_env("llama2_testc_");
    find_kernels();
    report_kernels();
    check_pool();
    check_f32(37, 11);
    check_f32(288, 288);
    check_f32(64, 50);   /* rows not a multiple of 8: padded block */
    check_f32(172, 64);
    check_f32(1024, 2061); /* 8 MB: one stream */
    check_f32(1025, 2050); /* one stream, odd row length: the last column after the line pairs */
    check_f32(288, 27);    /* rows [8, 24): halves of 16-row blocks at both ends */
    check_f32(1024, 2059); /* ... one stream */
    check_f32_batch(37, 11, 3);
    check_f32_batch(288, 288, 4);
    check_f32_batch(600, 90, 7);   /* 3 column tiles, rows not a multiple of 24 or 8 */
    check_f32_batch(256, 48, 9);
    check_f32_batch(513, 200, 32);
    check_f32_batch(256, 72, 64);  /* whole 8-token tiles over 2-block pairs, a lone last block */
    check_f32_batch(1024, 2056, 9); /* 8 MB, long rows: AVX-512's 8-row stream layout, odd block count */
    check_bf16(37, 11, 3);
    check_bf16(288, 288, 4);
    check_bf16(600, 90, 7);
    check_bf16(513, 200, 32);
    check_bf16(256, 72, 20);
    check_q8(64, 16, 64);
    check_q8_extremes(256, 40, 64);
    check_quantize_rounding();
    check_q8_extremes(96, 48, 32);
    check_q8(256, 45, 64);  /* rows not a multiple of 8 */
    check_q8(288, 32, 32);
    check_q8(64, 16, 8);
    check_q8(172, 10, 8); /* hidden_dim 172: groups span rows */
    check_q8(172, 16, 64);
    check_q8(1376, 20, 64); /* stories42M's w2: rows of 1376, groups of 64 */
    check_q8(1376, 72, 64); /* ... with 4-block passes */
    check_q8(224, 24, 96);  /* runs where no row's segment ends */
    check_q8(96, 16, 64);
    check_q8(100, 8, 32);
    check_q8(256, 40, 64);    /* rows [8, 40): half blocks at both ends */
    check_q8(128, 80, 32);    /* 4-block passes of 16 rows, and one more block */
    check_q8(256, 80, 128);
    check_q8(16416, 8, 32);   /* rows longer than the kernels' stack of per-run sums */
    check_q8(16416, 8, 64);   /* ... with groups across rows */
    test_quantize_edges();
    check_quantize_tiers(64 * 16, 64);
    check_quantize_tiers(32 * 24, 32);
    check_quantize_tiers(768 + 48, 64); /* a partial last group */
    check_quantize_tiers(8 * 40, 8);
    check_quantize_tiers(12 * 30, 12);  /* a group size no tier vectorizes */
    test_softmax_rmsnorm();
    check_expf_tiers();
    check_swiglu_softmax_tiers();
    check_attention(48, 1, 288);   /* stories15M: one position */
    check_attention(48, 37, 288);  /* a partial block after whole 4-block passes */
    check_attention(64, 128, 512);
    check_attention(8, 9, 64);     /* stories260K's heads */
    check_attention(100, 70, 100); /* 12 whole vectors and a 4-value tail */
    check_attention(6, 5, 24);     /* less than one vector */
    test_sampler();
    test_logit_bias();
    test_tokenizer();
    test_utf8_filter();
    test_model_errors();
    test_contexts();
    test_tiers();
    test_small_vocab_byte_fallback();
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
