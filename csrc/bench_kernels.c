/*
 * bench_kernels.c - times each matrix-vector kernel on its own (`make
 * bench-kernels`): one thread, a matrix that fits in cache and one that does
 * not, reporting GB/s of weights read and billions of multiply-adds per
 * second. For tuning kernels; end-to-end speed is `llama2c bench`.
 */
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

static void bench(const llama2_kernels *k, int rows, int cols, int gs, int reps) {
    unsigned seed = 1;
    size_t n = (size_t)rows * cols;
    float *w = malloc(n * 4), *x = malloc((size_t)cols * 4), *out = malloc((size_t)rows * 4);
    int8_t *wq = malloc(n), *xq = malloc((size_t)cols);
    float *ws = malloc(n / gs * 4), *xs = malloc((size_t)cols / gs * 4 + 4);
    for (size_t i = 0; i < n; i++) w[i] = frand(&seed);
    for (int i = 0; i < cols; i++) x[i] = frand(&seed);
    llama2_quantize_weights(wq, ws, w, (int64_t)n, gs);
    llama2_quantize(xq, xs, x, cols, gs);
    llama2_transformer *own = calloc(1, sizeof(llama2_transformer));
    llama2_matrix mf = {.rows = rows, .cols = cols, .f = w};
    llama2_matrix mq = {.rows = rows, .cols = cols, .q = wq, .s = ws};
    if (k->packs) {
        llama2_pack_f32(own, &mf, NULL);
        llama2_pack_scales(own, &mq, gs, NULL);
    }
    double t0 = now();
    for (int r = 0; r < reps; r++) k->matmul_f32(out, x, &mf, 0, rows);
    double tf = (now() - t0) / reps;
    t0 = now();
    for (int r = 0; r < reps; r++) k->matmul_q8(out, xq, xs, &mq, gs, 0, rows);
    double tq = (now() - t0) / reps;
    printf("%-7s %5d x %-5d  fp32 %6.1f GB/s %6.2f GMAC/s   int8 %6.1f GB/s %6.2f GMAC/s\n", k->name, rows,
           cols, n * 4 / tf / 1e9, n / tf / 1e9, n * (1 + 4.0 / gs) / tq / 1e9, n / tq / 1e9);
    if (k->matmul_f32_batch) { /* prefill: 32 tokens against the same weights */
        enum { NT = 32 };
        float *xb = malloc((size_t)cols * NT * 4), *ob = malloc((size_t)rows * NT * 4);
        llama2_activation a[NT];
        for (int b = 0; b < NT; b++) {
            for (int i = 0; i < cols; i++) xb[(size_t)b * cols + i] = frand(&seed);
            a[b].x = xb + (size_t)b * cols;
            a[b].n = cols;
        }
        int breps = reps / 8 > 0 ? reps / 8 : 1;
        t0 = now();
        for (int r = 0; r < breps; r++) k->matmul_f32_batch(ob, (size_t)rows, a, NT, &mf, 0, rows);
        double tb = (now() - t0) / breps;
        printf("%-7s %5d x %-5d  fp32 batch of %d: %6.2f GMAC/s\n", k->name, rows, cols, NT, n * NT / tb / 1e9);
        free(xb); free(ob);
    }
    llama2_buffers_free(&own->owned);
    free(own);
    free(w); free(x); free(out); free(wq); free(xq); free(ws); free(xs);
}

int main(void) {
    const char *names[] = {"scalar", "avx2"};
    for (int i = 0; i < 2; i++) {
        const llama2_kernels *k = llama2_kernels_by_name(names[i]);
        if (!k) continue;
        bench(k, 768, 288, 32, 2000);     /* in cache */
        bench(k, 2048, 2048, 64, 40);     /* 16 MB fp32: memory */
        bench(k, 32000, 288, 32, 20);     /* a classifier */
        bench(k, 5632, 2048, 64, 10);     /* TinyLlama w1 */
        bench(k, 288, 32000, 32, 20);     /* wide rows */
    }
    return 0;
}
