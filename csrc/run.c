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
#include "threadpool.h"

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

/* Attention of one head, the portable kernels: llama2.c's loops, the keys
 * read from the blocked layout of the cache (kernels.h). */
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
    .attn_scores = attn_scores_scalar,
    .attn_values = attn_values_scalar,
};

/* One thread's share of a matmul, with the best kernel that fits the matrix. */
/* Rows [r0, r1) of out[b] = W a[b] for every activation of the batch, by
 * the matrix's weight type (weight_types.c): its batched kernel where it has
 * one, else row tiles that stay in cache while every activation goes over
 * them. */
static void matvec_batch_rows(float *out_base, size_t out_stride, const llama2_activation *a,
                              int n_batch, const llama2_matrix *w, int gs, const llama2_kernels *k,
                              int r0, int r1) {
    const llama2_weight_type *type = &llama2_weight_types[w->type];
    if (n_batch > 1 && type->batch && type->batch(out_base, out_stride, a, n_batch, w, k, r0, r1)) return;
    size_t row_bytes = (size_t)w->cols * (size_t)type->bits / 8;
    int tile = (int)((192 * 1024) / (row_bytes ? row_bytes : 1));
    const int quad = 4 * LLAMA2_PACK_ROWS; /* whole 4-block units where they fit */
    tile = tile < LLAMA2_PACK_ROWS ? LLAMA2_PACK_ROWS
           : tile < quad           ? tile / LLAMA2_PACK_ROWS * LLAMA2_PACK_ROWS
                                   : tile / quad * quad;
    for (int t0 = r0; t0 < r1; t0 += tile) {
        int t1 = t0 + tile < r1 ? t0 + tile : r1;
        for (int b = 0; b < n_batch; b++) type->rows(out_base + b * out_stride, &a[b], w, gs, k, t0, t1);
    }
}

typedef struct {
    float *out_base;
    size_t out_stride;
    const llama2_activation *a;
    int n_batch, gs, rows_per_chunk;
    const llama2_matrix *w;
    const llama2_kernels *k;
} matvec_job;

static void matvec_chunk(void *ctx, int chunk) {
    const matvec_job *j = (const matvec_job *)ctx;
    int r0 = chunk * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->w->rows) r1 = j->w->rows;
    matvec_batch_rows(j->out_base, j->out_stride, j->a, j->n_batch, j->w, j->gs, j->k, r0, r1);
}

/* Splits rows [0, d) into chunks of whole LLAMA2_PACK_ROWS blocks, several
 * per thread so that a thread the OS holds back holds up little work;
 * products too small to pay for the hand-off run on the calling thread. */
void llama2_matvec_batch(float *out_base, size_t out_stride, const llama2_activation *a, int n_batch,
                         const llama2_matrix *w, int gs, const llama2_kernels *k, llama2_pool *pool) {
    const int d = w->rows, threads = llama2_pool_threads(pool);
    const int64_t work = (int64_t)d * w->cols * n_batch;
    if (threads <= 1 || work < 32 * 1024 || d < 4 * LLAMA2_PACK_ROWS) {
        matvec_batch_rows(out_base, out_stride, a, n_batch, w, gs, k, 0, d);
        return;
    }
    int blocks = (d + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS, blocks_per_chunk;
    if (n_batch > 1) {
        /* a batch: whole block pairs (the batched kernels' tile height),
         * 16 chunks per thread where there are enough pairs, so that the
         * threads, claiming chunks as they go, finish within a small chunk
         * of one another, and each chunk is long enough for the kernel's
         * prefetching of the next pair's weights to pay */
        int pairs = (blocks + 1) / 2, chunks = pairs < 16 * threads ? pairs : 16 * threads;
        blocks_per_chunk = 2 * ((pairs + chunks - 1) / chunks);
    } else {
        /* one token: chunks of whole 4-block units (32 rows) where the matrix
         * allows, since the kernels run 4 blocks at a time at full speed */
        int unit = blocks >= 4 * threads ? 4 : 1;
        int units = (blocks + unit - 1) / unit;
        int chunks = threads * 8 < units ? threads * 8 : units;
        blocks_per_chunk = (units + chunks - 1) / chunks * unit;
    }
    matvec_job job = {out_base, out_stride, a, n_batch, gs, blocks_per_chunk * LLAMA2_PACK_ROWS, w, k};
    llama2_pool_run(pool, matvec_chunk, &job, (blocks + blocks_per_chunk - 1) / blocks_per_chunk);
}

/* out = W x */
void llama2_matvec(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                   const llama2_kernels *k, llama2_pool *pool) {
    llama2_matvec_batch(out, 0, a, 1, w, gs, k, pool);
}
