/*
 * context.c - contexts: what one sequence needs to run over a model's
 * weights (its KV cache, the buffers a pass works in, its thread pool).
 * A model holds no run state, so any number of contexts share one model and
 * contexts of one model run in different threads at once.
 */
#include "internal.h"

#include <stdlib.h>

#include "threadpool.h"

/* The context's thread pool, started on first use with the model's thread
 * count (and again after llama2_transformer_set_threads). */
llama2_pool *llama2_context_pool(llama2_context *cx) {
    const llama2_transformer *t = cx->t;
    if (cx->pool && cx->pool_version != t->threads_version) {
        llama2_pool_free(cx->pool);
        cx->pool = NULL;
    }
    if (!cx->pool) {
        int n = t->n_threads > 0 ? t->n_threads : llama2_default_threads();
        if (n > 1) cx->pool = llama2_pool_new(n); /* NULL: run on this thread */
        cx->pool_version = t->threads_version;
    }
    return cx->pool;
}

/* A KV cache bigger than this is not put on huge pages: a run that touches
 * a few positions of each layer's and head's region would commit 2 MB for
 * each instead of 4 KB. */
#define HUGE_KV_LIMIT ((size_t)512 << 20)

static void *ctx_alloc(llama2_context *cx, size_t bytes, int huge_ok) {
    return llama2_buffers_alloc(&cx->owned, bytes, huge_ok);
}

/* The activations of a pass of up to `rows` tokens (row b of each buffer is
 * token b's): the same buffers for one token and for a prompt batch. */
static int alloc_run_state(llama2_context *cx, llama2_run_state *rs, size_t rows) {
    const llama2_transformer *t = cx->t;
    const llama2_config *c = &t->config;
    size_t d = (size_t)c->dim, h = (size_t)c->hidden_dim;
    int ok = (rs->x = (float *)ctx_alloc(cx, rows * d * 4, 1)) && (rs->xb = (float *)ctx_alloc(cx, rows * d * 4, 1)) &&
             (rs->xb2 = (float *)ctx_alloc(cx, rows * d * 4, 1)) && (rs->hb = (float *)ctx_alloc(cx, rows * h * 4, 1)) &&
             (rs->hb2 = (float *)ctx_alloc(cx, rows * h * 4, 1)) && (rs->q = (float *)ctx_alloc(cx, rows * d * 4, 1)) &&
             (rs->k = (float *)ctx_alloc(cx, rows * (size_t)c->kv_dim * 4, 1)) &&
             (rs->att = (float *)ctx_alloc(cx, rows * (size_t)c->n_heads * (size_t)cx->n_ctx * 4, 0));
    if (ok && t->gs > 0)
        ok = (rs->xq = (int8_t *)ctx_alloc(cx, rows * d, 1)) && (rs->hq = (int8_t *)ctx_alloc(cx, rows * h, 1)) &&
             (rs->xs = (float *)ctx_alloc(cx, rows * llama2_groups(c->dim, t->gs) * 4, 1)) &&
             (rs->hs = (float *)ctx_alloc(cx, rows * llama2_groups(c->hidden_dim, t->gs) * 4, 1));
    return ok;
}

/* The context's buffers; the caches and tables sized for n_ctx positions are
 * committed page by page as positions are reached. */
static int context_alloc(llama2_context *cx, llama2_error *err) {
    const llama2_config *c = &cx->t->config;
    size_t kv = (size_t)c->kv_dim;
    size_t cache = (size_t)c->n_layers * (size_t)cx->n_ctx * kv;
    size_t key_cache = (size_t)c->n_layers * llama2_key_positions(cx) * kv; /* whole blocks of positions */
    int huge = (cache + key_cache) * 4 <= HUGE_KV_LIMIT;
    int ok = alloc_run_state(cx, &cx->token, 1) &&
             (cx->logits = (float *)ctx_alloc(cx, (size_t)c->vocab_size * 4, 0)) &&
             (cx->key_cache = (float *)ctx_alloc(cx, key_cache * 4, huge)) &&
             (cx->value_cache = (float *)ctx_alloc(cx, cache * 4, huge)) &&
             (cx->rope_cs = (float *)ctx_alloc(cx, (size_t)cx->n_ctx * (size_t)c->head_size * 4, 0));
    if (!ok)
        return llama2_fail(err, LLAMA2_ERR_NOMEM,
                           "out of memory allocating a context (KV cache of %lld floats for n_ctx %d)",
                           (long long)cache * 2, cx->n_ctx);
    return LLAMA2_OK;
}

int llama2_context_new(llama2_context **out, llama2_transformer *t, int n_ctx, llama2_error *err) {
    llama2_ok(err);
    if (!out || !t) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    *out = NULL;
    const int seq_len = t->config.seq_len;
    if (n_ctx > seq_len)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "n_ctx %d is larger than the model's seq_len %d", n_ctx,
                           seq_len);
    llama2_context *cx = (llama2_context *)calloc(1, sizeof(*cx));
    if (!cx) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    cx->t = t;
    cx->n_ctx = n_ctx > 0 ? n_ctx : seq_len;
    int rc = context_alloc(cx, err);
    if (rc) {
        llama2_context_free(cx);
        return rc;
    }
    *out = cx;
    return LLAMA2_OK;
}

int llama2_context_reserve(llama2_context *cx, int n, llama2_error *err) {
    llama2_ok(err);
    if (!cx) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null context");
    if (n < 0) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "negative number of positions (%d)", n);
    if (n > cx->n_ctx) n = cx->n_ctx;
    if (n == 0) return LLAMA2_OK;
    const llama2_config *c = &cx->t->config;
    const size_t kv = (size_t)c->kv_dim, hs = (size_t)c->head_size, key_positions = llama2_key_positions(cx);
    const size_t blocks = ((size_t)n + LLAMA2_KEY_BLOCK - 1) / LLAMA2_KEY_BLOCK * LLAMA2_KEY_BLOCK;
    for (int l = 0; l < c->n_layers; l++) {
        llama2_lazy_populate(cx->value_cache + (size_t)l * (size_t)cx->n_ctx * kv, (size_t)n * kv * 4);
        for (int h = 0; h < c->n_kv_heads; h++) /* each (layer, kv head) of the keys: its first positions */
            llama2_lazy_populate(cx->key_cache + ((size_t)l * (size_t)c->n_kv_heads + (size_t)h) * key_positions * hs,
                                 blocks * hs * 4);
    }
    return LLAMA2_OK;
}

void llama2_context_free(llama2_context *cx) {
    if (!cx) return;
    llama2_pool_free(cx->pool);
    llama2_buffers_free(&cx->owned);
    free(cx);
}

int llama2_context_n_ctx(const llama2_context *cx) { return cx ? cx->n_ctx : 0; }

/* The batched prefill buffers, made on the first batch. */
int llama2_context_alloc_batch(llama2_context *cx, llama2_error *err) {
    if (cx->batch_ready) return LLAMA2_OK;
    if (!alloc_run_state(cx, &cx->batch, LLAMA2_MAX_BATCH))
        return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory for the prefill batch");
    cx->batch_ready = 1;
    return LLAMA2_OK;
}

int llama2_default_context(llama2_transformer *t, llama2_context **out, llama2_error *err) {
    *out = NULL;
    if (!t) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null transformer");
    if (!t->ctx) {
        int rc = llama2_context_new(&t->ctx, t, 0, err);
        if (rc) return rc;
    }
    *out = t->ctx;
    return LLAMA2_OK;
}
