/*
 * run.c - the fp32 engine: RMSNorm, softmax and the fp32 matrix-vector
 * product, plus the dispatch that sends each matmul to the fp32 or the
 * int8 kernel (runq.c) according to how the weights are stored.
 *
 * The arithmetic follows llama2.c's order exactly (sequential float sums,
 * no fast-math), so sampled outputs match it bit for bit; the SIMD kernels
 * (kernels_avx2.c) reproduce these loops exactly, lane by lane.
 */
#include "kernels.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void llama2_rmsnorm(float *o, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    ss /= n;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < n; j++) o[j] = w[j] * (ss * x[j]);
}

void llama2_softmax(float *x, int n) {
    float max_val = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* Rows [r0, r1) of out = W x for a row-major W of n columns: the portable
 * kernel every SIMD kernel must match bit for bit. */
static void matmul_f32_rows(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    const int n = w->cols;
    for (int i = r0; i < r1; i++) {
        const float *row = w->f + (int64_t)i * n;
        float val = 0.0f;
        for (int j = 0; j < n; j++) val += row[j] * x[j];
        out[i] = val;
    }
}

const llama2_kernels llama2_kernels_scalar = {"scalar", 0, matmul_f32_rows, llama2_matmul_q8_rows};

/* One thread's share of a matmul, with the best kernel that fits the matrix. */
static void matvec_rows(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                        const llama2_kernels *k, int r0, int r1) {
    if (w->f) {
        if (w->p && k->packs)
            k->matmul_f32(out, a->x, w, r0, r1);
        else
            matmul_f32_rows(out, a->x, w, r0, r1);
    } else if (w->cols % gs == 0 && gs % 32 == 0) {
        k->matmul_q8(out, a->q, a->s, w, gs, r0, r1);
    } else {
        llama2_matmul_q8_rows(out, a->q, a->s, w, gs, r0, r1);
    }
}

/* Rows [r0, r1) for every activation of a batch. The rows are walked in
 * tiles small enough to stay in cache while each activation uses them, so
 * the weights are read from memory once per batch instead of once per token;
 * every output is computed exactly as in the single-token product. */
static void matvec_batch_rows(float *out_base, size_t out_stride, const llama2_activation *a,
                              int n_batch, const llama2_matrix *w, int gs, const llama2_kernels *k,
                              int r0, int r1) {
    size_t row_bytes = (size_t)w->cols * (w->f ? 4 : 1);
    int tile = (int)((192 * 1024) / (row_bytes ? row_bytes : 1));
    tile = tile < LLAMA2_PACK_ROWS ? LLAMA2_PACK_ROWS : tile / LLAMA2_PACK_ROWS * LLAMA2_PACK_ROWS;
    for (int t0 = r0; t0 < r1; t0 += tile) {
        int t1 = t0 + tile < r1 ? t0 + tile : r1;
        for (int b = 0; b < n_batch; b++) matvec_rows(out_base + b * out_stride, &a[b], w, gs, k, t0, t1);
    }
}

/* Splits rows [0, d) over nt threads in blocks of LLAMA2_PACK_ROWS and runs
 * the batch on each share (a single activation is a batch of one). */
void llama2_matvec_batch(float *out_base, size_t out_stride, const llama2_activation *a, int n_batch,
                         const llama2_matrix *w, int gs, const llama2_kernels *k, int nt) {
    const int d = w->rows;
    if (nt <= 1 || d < 8 * LLAMA2_PACK_ROWS) {
        matvec_batch_rows(out_base, out_stride, a, n_batch, w, gs, k, 0, d);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int blocks = (d + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS;
        int r0 = (int)((int64_t)blocks * tid / nth) * LLAMA2_PACK_ROWS;
        int r1 = (int)((int64_t)blocks * (tid + 1) / nth) * LLAMA2_PACK_ROWS;
        if (r1 > d) r1 = d;
        if (r0 < r1) matvec_batch_rows(out_base, out_stride, a, n_batch, w, gs, k, r0, r1);
    }
#else
    matvec_batch_rows(out_base, out_stride, a, n_batch, w, gs, k, 0, d);
#endif
}

/* out = W x */
void llama2_matvec(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                   const llama2_kernels *k, int nt) {
    llama2_matvec_batch(out, 0, a, 1, w, gs, k, nt);
}
