/*
 * forward.c - the transformer forward pass for one token at one position,
 * shared by the fp32 and int8 engines (each matmul goes to the kernel that
 * matches its weights), and the run state it works in.
 */
#include "internal.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int resolve_threads(const llama2_transformer *t) {
    if (t->n_threads > 0) return t->n_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int llama2_alloc_state(llama2_transformer *t, llama2_error *err) {
    const llama2_config *c = &t->config;
    size_t d = (size_t)c->dim, h = (size_t)c->hidden_dim, kv = (size_t)c->kv_dim;
    size_t cache = (size_t)c->n_layers * (size_t)c->seq_len * kv;
    int ok = (t->x = (float *)llama2_own(t, d * 4)) && (t->xb = (float *)llama2_own(t, d * 4)) &&
             (t->xb2 = (float *)llama2_own(t, d * 4)) && (t->hb = (float *)llama2_own(t, h * 4)) &&
             (t->hb2 = (float *)llama2_own(t, h * 4)) && (t->q = (float *)llama2_own(t, d * 4)) &&
             (t->att = (float *)llama2_own(t, (size_t)c->n_heads * (size_t)c->seq_len * 4)) &&
             (t->logits = (float *)llama2_own(t, (size_t)c->vocab_size * 4)) &&
             (t->key_cache = (float *)llama2_own(t, cache * 4)) &&
             (t->value_cache = (float *)llama2_own(t, cache * 4));
    if (ok && t->gs > 0) {
        size_t gd = (d + (size_t)t->gs - 1) / (size_t)t->gs, gh = (h + (size_t)t->gs - 1) / (size_t)t->gs;
        ok = (t->xq = (int8_t *)llama2_own(t, d)) && (t->xs = (float *)llama2_own(t, gd * 4)) &&
             (t->hq = (int8_t *)llama2_own(t, h)) && (t->hs = (float *)llama2_own(t, gh * 4));
    }
    if (!ok)
        return llama2_fail(err, LLAMA2_ERR_NOMEM,
                           "out of memory allocating the run state (KV cache of %lld floats for seq_len %d)",
                           (long long)cache * 2, c->seq_len);
    return LLAMA2_OK;
}

/* Makes x ready for a matmul: quantized too when the weights are int8. */
static void prepare(llama2_activation *a, const float *x, int n, int8_t *q, float *s, int gs) {
    a->x = x;
    a->n = n;
    a->q = q;
    a->s = s;
    if (gs > 0) llama2_quantize(q, s, x, n, gs);
}

static void rope(float *q, float *k, int pos, const llama2_config *c) {
    for (int i = 0; i < c->dim; i += 2) {
        int head_dim = i % c->head_size;
        float freq = 1.0f / powf(c->rope_theta, head_dim / (float)c->head_size);
        float val = pos * freq;
        float fcr = cosf(val);
        float fci = sinf(val);
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

/* Multi-head attention of q over positions 0..pos of one layer's cache. */
static void attention(llama2_transformer *t, int layer, int pos, int nt) {
    const llama2_config *c = &t->config;
    int hs = c->head_size, kv_mul = c->n_heads / c->n_kv_heads;
    size_t loff = (size_t)layer * (size_t)c->seq_len * (size_t)c->kv_dim;
    float scale = sqrtf((float)hs);
    (void)nt;
    int h;
#pragma omp parallel for num_threads(nt) if (nt > 1 && pos > 32)
    for (h = 0; h < c->n_heads; h++) {
        const float *q = t->q + (size_t)h * hs;
        float *att = t->att + (size_t)h * c->seq_len;
        size_t koff = loff + (size_t)(h / kv_mul) * hs;
        for (int p = 0; p <= pos; p++) {
            const float *k = t->key_cache + koff + (size_t)p * c->kv_dim;
            float score = 0.0f;
            for (int i = 0; i < hs; i++) score += q[i] * k[i];
            score /= scale;
            att[p] = score;
        }
        llama2_softmax(att, pos + 1);
        float *xb = t->xb + (size_t)h * hs;
        memset(xb, 0, (size_t)hs * sizeof(float));
        for (int p = 0; p <= pos; p++) {
            const float *v = t->value_cache + koff + (size_t)p * c->kv_dim;
            float a = att[p];
            for (int i = 0; i < hs; i++) xb[i] += a * v[i];
        }
    }
}

int llama2_forward(llama2_transformer *t, int token, int pos, float **logits, llama2_error *err) {
    if (!t) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null transformer");
    const llama2_config *c = &t->config;
    if (token < 0 || token >= c->vocab_size)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "token %d out of range [0, %d)", token, c->vocab_size);
    if (pos < 0 || pos >= c->seq_len)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "position %d out of range [0, %d)", pos, c->seq_len);
    int dim = c->dim, hidden = c->hidden_dim, kv_dim = c->kv_dim, gs = t->gs;
    int nt = resolve_threads(t);
    float *x = t->x;
    llama2_activation a;

    memcpy(x, t->token_embedding + (size_t)token * dim, (size_t)dim * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        size_t loff = (size_t)l * (size_t)c->seq_len * (size_t)kv_dim;
        float *k = t->key_cache + loff + (size_t)pos * kv_dim;
        float *v = t->value_cache + loff + (size_t)pos * kv_dim;

        llama2_rmsnorm(t->xb, x, t->rms_att + (size_t)l * dim, dim, c->norm_eps);
        prepare(&a, t->xb, dim, t->xq, t->xs, gs);
        llama2_matvec(t->q, &a, &t->wq[l], gs, t->kernels, nt);
        llama2_matvec(k, &a, &t->wk[l], gs, t->kernels, nt);
        llama2_matvec(v, &a, &t->wv[l], gs, t->kernels, nt);
        rope(t->q, k, pos, c);

        attention(t, l, pos, nt);
        prepare(&a, t->xb, dim, t->xq, t->xs, gs);
        llama2_matvec(t->xb2, &a, &t->wo[l], gs, t->kernels, nt);
        for (int i = 0; i < dim; i++) x[i] += t->xb2[i];

        llama2_rmsnorm(t->xb, x, t->rms_ffn + (size_t)l * dim, dim, c->norm_eps);
        prepare(&a, t->xb, dim, t->xq, t->xs, gs);
        llama2_matvec(t->hb, &a, &t->w1[l], gs, t->kernels, nt);
        llama2_matvec(t->hb2, &a, &t->w3[l], gs, t->kernels, nt);
        for (int i = 0; i < hidden; i++) { /* SwiGLU */
            float val = t->hb[i];
            val *= (1.0f / (1.0f + expf(-val)));
            val *= t->hb2[i];
            t->hb[i] = val;
        }
        prepare(&a, t->hb, hidden, t->hq, t->hs, gs);
        llama2_matvec(t->xb, &a, &t->w2[l], gs, t->kernels, nt);
        for (int i = 0; i < dim; i++) x[i] += t->xb[i];
    }
    llama2_rmsnorm(x, x, t->rms_final, dim, c->norm_eps);
    prepare(&a, x, dim, t->xq, t->xs, gs);
    llama2_matvec(t->logits, &a, &t->wcls, gs, t->kernels, nt);
    if (logits) *logits = t->logits;
    llama2_ok(err);
    return LLAMA2_OK;
}
