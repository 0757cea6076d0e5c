/*
 * matmul.c - every matrix-vector product of the forward pass, for one token
 * (llama2_matvec) or a batch of prompt tokens (llama2_matvec_batch): the
 * rows are split into chunks the thread pool's threads claim, and each
 * chunk is handed to the matrix's weight type (weight_types.c), which runs
 * this CPU's kernel or the portable loop (kernels_scalar.c).
 *
 * How the rows are split never changes a result: each output row is summed
 * by one thread, in the kernels' fixed order.
 */
#include "kernels.h"
#include "threadpool.h"

#ifndef BATCH_CHUNKS_PER_THREAD
#define BATCH_CHUNKS_PER_THREAD 2
#endif

/* Rows [r0, r1) of out[b] = W a[b] for every activation of the batch, by
 * the matrix's weight type: its batched kernel where it has one, else row
 * tiles that stay in cache while every activation goes over them. */
static void matvec_batch_rows(float *out_base, size_t out_stride, const llama2_activation *a,
                              int n_batch, const llama2_matrix *w, int gs, const llama2_kernels *k,
                              int r0, int r1) {
    const llama2_weight_type *type = &llama2_weight_types[w->type];
    if (n_batch > 1 && type->batch && type->batch(out_base, out_stride, a, n_batch, w, gs, k, r0, r1)) return;
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

/* One thread's share: chunk number `chunk` of the job. */
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
         * BATCH_CHUNKS_PER_THREAD chunks per thread. The kernels prefetch
         * the next tile's weights as they go, so only the first tile of a
         * chunk comes cold from memory: with 16 chunks per thread (one block
         * pair each on the stories shapes) that cost 13-16% more CPU time
         * for the same fp32, int8 and Q4_0 prefill work at 2 threads than
         * with 2 per thread (bench_kernels, interleaved). Two per thread
         * still lets a thread that finishes early take the other's second
         * chunk. */
        int pairs = (blocks + 1) / 2, chunks = pairs < BATCH_CHUNKS_PER_THREAD * threads
                                                   ? pairs : BATCH_CHUNKS_PER_THREAD * threads;
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
