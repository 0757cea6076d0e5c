/*
 * run.c - the fp32 engine: RMSNorm, softmax and the fp32 matrix-vector
 * product, plus the dispatch that sends each matmul to the fp32 or the
 * int8 kernel (runq.c) according to how the weights are stored.
 *
 * The arithmetic follows llama2.c's order exactly (sequential float sums,
 * no fast-math), so sampled outputs match it bit for bit.
 */
#include "internal.h"

#include <math.h>

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

/* out[d] = W[d][n] x[n] */
void llama2_matmul_f32(float *out, const float *x, const float *w, int n, int d, int nt) {
    (void)nt;
    int i;
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (i = 0; i < d; i++) {
        const float *row = w + (int64_t)i * n;
        float val = 0.0f;
        for (int j = 0; j < n; j++) val += row[j] * x[j];
        out[i] = val;
    }
}

void llama2_matvec(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                   int nt) {
    if (w->f)
        llama2_matmul_f32(out, a->x, w->f, w->cols, w->rows, nt);
    else
        llama2_matmul_q8(out, a->q, a->s, w, w->cols, w->rows, gs, nt);
}
