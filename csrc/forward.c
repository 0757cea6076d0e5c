/*
 * forward.c - the transformer forward pass for one token at one position,
 * or a batch of prompt tokens, shared by the fp32, bf16 and int8 engines
 * (each matmul goes to the kernel that matches its weights). It runs in a
 * context (context.c): one sequence's KV cache and buffers, over a model's
 * weights that any number of contexts share.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

#include "threadpool.h"

/* fn(ctx, i) for every i < n, on the pool in about `chunks` ranges of
 * consecutive items (whole multiples of 8 where there is room): steps too
 * small to pay for one claim each go over in a few pieces, and neighbouring
 * tokens, whose keys share cache lines of the key cache, mostly stay on one
 * thread. */
typedef struct {
    llama2_task_fn fn;
    void *ctx;
    int n, per_chunk;
} range_job;

static void run_range(void *ctx, int chunk) {
    const range_job *r = (const range_job *)ctx;
    int i1 = (chunk + 1) * r->per_chunk < r->n ? (chunk + 1) * r->per_chunk : r->n;
    for (int i = chunk * r->per_chunk; i < i1; i++) r->fn(r->ctx, i);
}

static void for_ranges(llama2_pool *pool, llama2_task_fn fn, void *ctx, int n, int chunks) {
    int per = (n + chunks - 1) / chunks;
    if (per > 8) per = (per + 7) / 8 * 8;
    range_job r = {fn, ctx, n, per};
    int ranges = (n + per - 1) / per;
    if (!pool || ranges < 2) {
        for (int i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    llama2_pool_run(pool, run_range, &r, ranges);
}

/* The keys of one layer's kv head h, in the blocked layout */
static float *key_head(const llama2_context *cx, int layer, int h) {
    const llama2_config *c = &cx->t->config;
    return cx->key_cache + ((size_t)layer * c->n_kv_heads + (size_t)h) * llama2_key_positions(cx) * (size_t)c->head_size;
}

/* Stores the (rotated) key k of position pos into the layer's cache. */
static void store_key(const llama2_context *cx, int layer, int pos, const float *k) {
    const llama2_config *c = &cx->t->config;
    const int hs = c->head_size;
    const size_t at = (size_t)(pos / LLAMA2_KEY_BLOCK) * LLAMA2_KEY_BLOCK * hs + pos % LLAMA2_KEY_BLOCK;
    for (int h = 0; h < c->n_kv_heads; h++) {
        float *kt = key_head(cx, layer, h) + at;
        for (int i = 0; i < hs; i++) kt[LLAMA2_KEY_BLOCK * i] = k[h * hs + i];
    }
}

/* Makes x (row `row` of a batch) ready for a matmul: with int8 weights also
 * quantized, into that row of q_rows / s_rows (which fp32 runs do not have). */
static void prepare(llama2_activation *a, const float *x, int n, int8_t *q_rows, float *s_rows, int row, int gs,
                    const llama2_kernels *k) {
    a->x = x;
    a->n = n;
    a->q = gs > 0 ? q_rows + (size_t)row * n : NULL;
    a->s = gs > 0 ? s_rows + (size_t)row * llama2_groups(n, gs) : NULL;
    if (gs > 0) (k->quantize ? k->quantize : llama2_quantize)(a->q, a->s, x, n, gs);
}

/* The rotation angles' cos and sin of positions up to `end`, tabled once as
 * positions are first reached, with exactly the expressions llama2.c
 * evaluates per token (so the same floats):
 * freq = 1 / theta^(head_dim / head_size), val = pos * freq; a model with
 * rope scaling divides freq by its divisor for that pair (rope.c). */
static void rope_extend(llama2_context *cx, int end) {
    const llama2_config *c = &cx->t->config;
    const float *div = cx->t->rope_div;
    if (end <= cx->rope_ready) return;
    float *cs = cx->rope_cs;
    for (int i = 0; i < c->head_size; i += 2) {
        float freq = 1.0f / powf(c->rope_theta, i / (float)c->head_size);
        if (div) freq /= div[i / 2];
        for (int pos = cx->rope_ready; pos < end; pos++) {
            float val = pos * freq;
            cs[(size_t)pos * c->head_size + i] = cosf(val);
            cs[(size_t)pos * c->head_size + i + 1] = sinf(val);
        }
    }
    cx->rope_ready = end;
}

static void rope(const llama2_context *cx, float *q, float *k, int pos) {
    const llama2_config *c = &cx->t->config;
    const float *cs = cx->rope_cs + (size_t)pos * c->head_size;
    for (int i = 0; i < c->dim; i += 2) {
        int head_dim = i % c->head_size;
        float fcr = cs[head_dim];
        float fci = cs[head_dim + 1];
        int rotn = i < c->kv_dim ? 2 : 1; /* k is only kv_dim long */
        for (int v = 0; v < rotn; v++) {
            float *vec = v == 0 ? q : k;
            float v0 = vec[i];
            float v1 = vec[i + 1];
            vec[i] = v0 * fcr - v1 * fci;
            vec[i + 1] = v0 * fci + v1 * fcr;
        }
    }
}

/* Where row b of a pass belongs: its sequence's context and its position
 * there (one sequence: the same context, consecutive positions; the
 * decoding of several sequences: one row each). */
typedef struct {
    llama2_context *cx;
    int pos;
} row_at;

typedef struct {
    const row_at *rows;
    int layer;
    const float *q_all; /* n tokens' queries, dim apart */
    float *out;         /* n tokens' outputs, dim apart */
    float *att;         /* scores: n_heads * att_stride per token */
    size_t att_stride;
    int n;              /* tokens */
} attention_job;

/* Item c: head c / n of token c % n, attending over positions
 * 0..pos of one layer's cache, written to its slice of out. */
static void attention_head(void *ctx, int c) {
    const attention_job *j = (const attention_job *)ctx;
    const int b = c % j->n, h = c / j->n;
    const llama2_context *cx = j->rows[b].cx;
    const llama2_transformer *t = cx->t;
    const llama2_config *cf = &t->config;
    const int hs = cf->head_size, kv_h = h / (cf->n_heads / cf->n_kv_heads), pos = j->rows[b].pos;
    const size_t kv_dim = (size_t)cf->kv_dim;
    const float *q = j->q_all + (size_t)b * cf->dim + (size_t)h * hs;
    float *att = j->att + ((size_t)b * cf->n_heads + h) * j->att_stride;
    t->kernels->attn_scores(att, q, key_head(cx, j->layer, kv_h), pos + 1, hs, sqrtf((float)hs));
    (t->kernels->softmax ? t->kernels->softmax : llama2_softmax)(att, pos + 1);
    const float *v = cx->value_cache + (size_t)j->layer * (size_t)cx->n_ctx * kv_dim + (size_t)kv_h * hs;
    t->kernels->attn_values(j->out + (size_t)b * cf->dim + (size_t)h * hs, att, v, pos + 1, hs, kv_dim);
}

/* Multi-head attention of n tokens (their keys and values already in the
 * cache), every (token, head) pair one item of work, the items in ranges of
 * consecutive tokens of a head spread over the pool once there is enough work
 * (many ranges: later tokens attend over more positions). */
static void attention(const llama2_config *c, const row_at *rows, int layer, int n, const float *q_all, float *out,
                      float *att, size_t att_stride, llama2_pool *pool) {
    attention_job job = {rows, layer, q_all, out, att, att_stride, n};
    int items = n * c->n_heads;
    int64_t work = 0;
    for (int b = 0; b < n; b++) work += (int64_t)(rows[b].pos + 1) * c->dim;
    for_ranges(work > 16384 ? pool : NULL, attention_head, &job, items, 8 * llama2_pool_threads(pool));
}



/* The per-token steps between matmuls. Each token's step is independent of
 * the others', so a batch spreads them over the pool, token by token. */
typedef struct {
    const row_at *rows;
    const llama2_transformer *t;
    const llama2_run_state *rs;
    llama2_activation *a;
    int layer;
    int own_values; /* values were written to rs->xb2 (rows in several caches): copy each to its cache */
} step_job;

/* (layer > 0: the previous layer's FFN residual) RMSNorm before attention */
static void step_attn_in(void *ctx, int b) {
    const step_job *j = (const step_job *)ctx;
    const llama2_transformer *t = j->t;
    const int dim = t->config.dim;
    float *x = j->rs->x + (size_t)b * dim, *xb = j->rs->xb + (size_t)b * dim;
    if (j->layer > 0)
        for (int i = 0; i < dim; i++) x[i] += xb[i];
    llama2_rmsnorm(xb, x, t->rms_att + (size_t)j->layer * dim, dim, t->config.norm_eps);
    prepare(&j->a[b], xb, dim, j->rs->xq, j->rs->xs, b, t->gs, t->kernels);
}

/* RoPE on the query and key, the key into the cache */
static void step_rope(void *ctx, int b) {
    const step_job *j = (const step_job *)ctx;
    const llama2_config *c = &j->t->config;
    const row_at *r = &j->rows[b];
    float *k = j->rs->k + (size_t)b * c->kv_dim;
    rope(r->cx, j->rs->q + (size_t)b * c->dim, k, r->pos);
    store_key(r->cx, j->layer, r->pos, k);
    if (j->own_values) {
        const size_t kv_dim = (size_t)c->kv_dim;
        float *v = r->cx->value_cache + ((size_t)j->layer * (size_t)r->cx->n_ctx + (size_t)r->pos) * kv_dim;
        memcpy(v, j->rs->xb2 + (size_t)b * c->dim, kv_dim * sizeof(float));
    }
}

static void step_attn_out(void *ctx, int b) {
    const step_job *j = (const step_job *)ctx;
    const int dim = j->t->config.dim;
    prepare(&j->a[b], j->rs->xb + (size_t)b * dim, dim, j->rs->xq, j->rs->xs, b, j->t->gs, j->t->kernels);
}

/* attention residual, RMSNorm before the FFN */
static void step_ffn_in(void *ctx, int b) {
    const step_job *j = (const step_job *)ctx;
    const llama2_transformer *t = j->t;
    const int dim = t->config.dim;
    float *x = j->rs->x + (size_t)b * dim, *xb = j->rs->xb + (size_t)b * dim;
    const float *xb2 = j->rs->xb2 + (size_t)b * dim;
    for (int i = 0; i < dim; i++) x[i] += xb2[i];
    llama2_rmsnorm(xb, x, t->rms_ffn + (size_t)j->layer * dim, dim, t->config.norm_eps);
    prepare(&j->a[b], xb, dim, j->rs->xq, j->rs->xs, b, t->gs, t->kernels);
}

static void step_swiglu(void *ctx, int b) {
    const step_job *j = (const step_job *)ctx;
    const int hidden = j->t->config.hidden_dim;
    float *hb = j->rs->hb + (size_t)b * hidden;
    const float *hb2 = j->rs->hb2 + (size_t)b * hidden;
    const llama2_kernels *k = j->t->kernels;
    (k->swiglu ? k->swiglu : llama2_swiglu)(hb, hb2, hidden);
    prepare(&j->a[b], hb, hidden, j->rs->hq, j->rs->hs, b, j->t->gs, j->t->kernels);
}

static void for_each_token(llama2_pool *pool, llama2_task_fn fn, step_job *job, int n) {
    for_ranges(pool, fn, job, n, 2 * llama2_pool_threads(pool));
}

/* What a pass hands back after the last layer. */
typedef struct {
    int last_logits;  /* the last token's logits into cx->logits */
    float *logits;    /* every token's logits, row b at logits + b * vocab_size (or NULL) */
    float *hidden;    /* every token's final-norm hidden state, row b at hidden + b * dim (or NULL) */
} pass_outputs;

/* the last FFN residual and the final norm of token b, then its activation for the classifier */
static void step_final(void *ctx, int b) {
    const step_job *j = (const step_job *)ctx;
    const llama2_transformer *t = j->t;
    const int dim = t->config.dim;
    float *x = j->rs->x + (size_t)b * dim;
    const float *xb = j->rs->xb + (size_t)b * dim;
    for (int i = 0; i < dim; i++) x[i] += xb[i];
    llama2_rmsnorm(x, x, t->rms_final, dim, t->config.norm_eps);
    prepare(&j->a[b], x, dim, j->rs->xq, j->rs->xs, b, t->gs, t->kernels);
}

/* Runs tokens[0..n) at positions pos..pos+n-1 (n <= LLAMA2_MAX_BATCH),
 * filling the KV cache, then produces what `out` asks for. Every token goes
 * through exactly the arithmetic of a single-token pass: the batch only
 * shares the reading of the weights and spreads the per-token steps over
 * the threads. */
static void forward_rows(llama2_context *cx, const llama2_run_state *rs, const int *tokens, int n,
                         const row_at *rows, int one_sequence, const pass_outputs *out) {
    const llama2_transformer *t = cx->t;
    const llama2_config *c = &t->config;
    const int dim = c->dim, hidden = c->hidden_dim, kv_dim = c->kv_dim, gs = t->gs;
    llama2_pool *pool = llama2_context_pool(cx);
    const llama2_kernels *k = t->kernels;
    llama2_activation a[LLAMA2_MAX_BATCH];
    step_job job = {rows, t, rs, a, 0, !one_sequence};
    const int pos = rows[0].pos;

    for (int b = 0; b < n; b++) rope_extend(rows[b].cx, rows[b].pos + 1);
    for (int b = 0; b < n; b++)
        memcpy(rs->x + (size_t)b * dim, t->token_embedding + (size_t)tokens[b] * dim, (size_t)dim * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        size_t loff = (size_t)l * (size_t)cx->n_ctx * (size_t)kv_dim;
        float *v0 = cx->value_cache + loff + (size_t)pos * kv_dim;
        job.layer = l;

        for_each_token(pool, step_attn_in, &job, n);
        llama2_matvec_batch(rs->q, (size_t)dim, a, n, &t->wq[l], gs, k, pool);
        llama2_matvec_batch(rs->k, (size_t)kv_dim, a, n, &t->wk[l], gs, k, pool);
        if (one_sequence) /* consecutive positions of one cache: straight in */
            llama2_matvec_batch(v0, (size_t)kv_dim, a, n, &t->wv[l], gs, k, pool);
        else /* each row to its own cache in step_rope (xb2 is free until wo) */
            llama2_matvec_batch(rs->xb2, (size_t)dim, a, n, &t->wv[l], gs, k, pool);
        for_each_token(pool, step_rope, &job, n);
        attention(c, rows, l, n, rs->q, rs->xb, rs->att, (size_t)cx->n_ctx, pool);
        for_each_token(pool, step_attn_out, &job, n);
        llama2_matvec_batch(rs->xb2, (size_t)dim, a, n, &t->wo[l], gs, k, pool);
        for_each_token(pool, step_ffn_in, &job, n);
        llama2_matvec_batch(rs->hb, (size_t)hidden, a, n, &t->w1[l], gs, k, pool);
        llama2_matvec_batch(rs->hb2, (size_t)hidden, a, n, &t->w3[l], gs, k, pool);
        for_each_token(pool, step_swiglu, &job, n);
        llama2_matvec_batch(rs->xb, (size_t)dim, a, n, &t->w2[l], gs, k, pool);
    }
    if (out->logits || out->hidden) {
        /* every token goes on: final norm (and hidden state), then one classifier pass for all */
        for_each_token(pool, step_final, &job, n);
        if (out->hidden) memcpy(out->hidden, rs->x, (size_t)n * dim * sizeof(float));
        if (out->logits) llama2_matvec_batch(out->logits, (size_t)c->vocab_size, a, n, &t->wcls, gs, k, pool);
    }
    if (!out->last_logits) return;
    if (out->logits) { /* already computed: the last row */
        memcpy(cx->logits, out->logits + (size_t)(n - 1) * c->vocab_size, (size_t)c->vocab_size * sizeof(float));
        return;
    }
    /* only the last token goes on: its last FFN residual, the final norm, the classifier */
    if (!out->hidden) step_final(&job, n - 1);
    llama2_matvec(cx->logits, &a[n - 1], &t->wcls, gs, k, pool);
}

/* tokens[0..n) of one sequence at positions pos..pos+n-1 of cx */
static void forward_tokens(llama2_context *cx, const llama2_run_state *rs, const int *tokens, int n, int pos,
                           const pass_outputs *out) {
    row_at rows[LLAMA2_MAX_BATCH];
    for (int b = 0; b < n; b++) rows[b] = (row_at){cx, pos + b};
    forward_rows(cx, rs, tokens, n, rows, 1, out);
}

static int check_token(const llama2_config *c, int token, llama2_error *err) {
    if (token < 0 || token >= c->vocab_size)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "token %d out of range [0, %d)", token, c->vocab_size);
    return LLAMA2_OK;
}

int llama2_context_forward(llama2_context *cx, int token, int pos, float **logits, llama2_error *err) {
    if (!cx) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null context");
    const llama2_config *c = &cx->t->config;
    int rc = check_token(c, token, err);
    if (rc) return rc;
    if (pos < 0 || pos >= cx->n_ctx)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "position %d out of range [0, %d)", pos, cx->n_ctx);
    const pass_outputs out = {1, NULL, NULL};
    forward_tokens(cx, &cx->token, &token, 1, pos, &out);
    if (logits) *logits = cx->logits;
    llama2_ok(err);
    return LLAMA2_OK;
}

/* the checks every batched call makes */
static int check_batch(const llama2_context *cx, const int *tokens, int n, int pos, llama2_error *err) {
    if (!cx || (!tokens && n > 0)) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    const llama2_config *c = &cx->t->config;
    if (n <= 0) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "a batch needs at least one token (got %d)", n);
    if (pos < 0 || pos > cx->n_ctx - n)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "%d tokens at position %d do not fit in [0, %d)", n, pos,
                           cx->n_ctx);
    for (int i = 0; i < n; i++) {
        int rc = check_token(c, tokens[i], err);
        if (rc) return rc;
    }
    return LLAMA2_OK;
}

int llama2_context_forward_batch(llama2_context *cx, const int *tokens, int n, int pos, float **logits,
                                 llama2_error *err) {
    int rc = check_batch(cx, tokens, n, pos, err);
    if (rc) return rc;
    if (n == 1) return llama2_context_forward(cx, tokens[0], pos, logits, err);
    rc = llama2_context_alloc_batch(cx, err);
    if (rc) return rc;
    for (int done = 0; done < n; done += LLAMA2_MAX_BATCH) {
        int m = n - done < LLAMA2_MAX_BATCH ? n - done : LLAMA2_MAX_BATCH;
        const pass_outputs out = {logits != NULL && done + m == n, NULL, NULL};
        forward_tokens(cx, &cx->batch, tokens + done, m, pos + done, &out);
    }
    if (logits) *logits = cx->logits;
    llama2_ok(err);
    return LLAMA2_OK;
}

int llama2_context_eval(llama2_context *cx, const int *tokens, int n, int pos, float *logits, float *hidden,
                        llama2_error *err) {
    int rc = check_batch(cx, tokens, n, pos, err);
    if (rc) return rc;
    if (n > 1 && (rc = llama2_context_alloc_batch(cx, err)) != LLAMA2_OK) return rc;
    const llama2_config *c = &cx->t->config;
    for (int done = 0; done < n; done += LLAMA2_MAX_BATCH) {
        int m = n - done < LLAMA2_MAX_BATCH ? n - done : LLAMA2_MAX_BATCH;
        const pass_outputs out = {0, logits ? logits + (size_t)done * c->vocab_size : NULL,
                                  hidden ? hidden + (size_t)done * c->dim : NULL};
        forward_tokens(cx, n > 1 ? &cx->batch : &cx->token, tokens + done, m, pos + done, &out);
    }
    llama2_ok(err);
    return LLAMA2_OK;
}

int llama2_decode_batch(llama2_context *const *ctxs, const int *tokens, const int *pos, int n, float *logits,
                        llama2_error *err) {
    if (!ctxs || !tokens || !pos || !logits || n <= 0)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "a batch needs contexts, tokens, positions and logits (n = %d)", n);
    llama2_context *lead = ctxs[0];
    for (int b = 0; b < n; b++) {
        const llama2_context *cx = ctxs[b];
        if (!cx) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "row %d has no context", b);
        if (cx->t != lead->t) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "row %d's context is of another model", b);
        if (cx->n_ctx > lead->n_ctx)
            return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "row %d's context (n_ctx %d) is longer than row 0's (%d)", b,
                               cx->n_ctx, lead->n_ctx);
        if (pos[b] < 0 || pos[b] >= cx->n_ctx)
            return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "row %d: position %d out of range [0, %d)", b, pos[b], cx->n_ctx);
        int rc = check_token(&lead->t->config, tokens[b], err);
        if (rc) return rc;
        for (int e = 0; e < b; e++)
            if (ctxs[e] == cx && pos[e] >= pos[b])
                return llama2_fail(err, LLAMA2_ERR_ARGUMENT,
                                   "rows %d and %d: rows of one context must be at increasing positions", e, b);
    }
    int rc = llama2_context_alloc_batch(lead, err);
    if (rc) return rc;
    const size_t vocab = (size_t)lead->t->config.vocab_size;
    for (int done = 0; done < n; done += LLAMA2_MAX_BATCH) {
        int m = n - done < LLAMA2_MAX_BATCH ? n - done : LLAMA2_MAX_BATCH;
        row_at rows[LLAMA2_MAX_BATCH];
        for (int b = 0; b < m; b++) rows[b] = (row_at){ctxs[done + b], pos[done + b]};
        const pass_outputs out = {0, logits + (size_t)done * vocab, NULL};
        forward_rows(lead, &lead->batch, tokens + done, m, rows, 0, &out);
    }
    llama2_ok(err);
    return LLAMA2_OK;
}

/* The model-level calls run in the model's own default context. */
int llama2_forward(llama2_transformer *t, int token, int pos, float **logits, llama2_error *err) {
    llama2_context *cx;
    int rc = llama2_default_context(t, &cx, err);
    return rc ? rc : llama2_context_forward(cx, token, pos, logits, err);
}

int llama2_forward_batch(llama2_transformer *t, const int *tokens, int n, int pos, float **logits,
                         llama2_error *err) {
    llama2_context *cx;
    int rc = llama2_default_context(t, &cx, err);
    return rc ? rc : llama2_context_forward_batch(cx, tokens, n, pos, logits, err);
}
