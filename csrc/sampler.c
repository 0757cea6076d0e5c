/*
 * sampler.c - choosing the next token from logits (docs/SAMPLING.md):
 * greedy at temperature 0, otherwise softmax over logits / temperature and
 * either plain multinomial sampling or top-p (nucleus) sampling, driven by
 * a xorshift64* generator so a seed reproduces llama2.c's choices.
 *
 * Extensions, all off by default: top-k, min-p and a repetition penalty.
 * With them off, every float operation is llama2.c's, in its order.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float prob;
    int index;
} prob_index;

struct llama2_sampler {
    int vocab_size;
    llama2_sampler_params params;
    uint64_t rng_state;
    prob_index *candidates, *scratch; /* for top-p / top-k / min-p */
    int *recent;  /* ring buffer of the last `window` tokens */
    int *counts;  /* occurrences of each token in the ring */
    int window, n_recent, next_slot;
    int *bias_token;  /* logit_bias: added to these tokens' logits before anything else */
    float *bias;
    int n_bias;
};

uint32_t llama2_random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

float llama2_random_f32(uint64_t *state) {
    return (llama2_random_u32(state) >> 8) / 16777216.0f;
}

void llama2_sampler_params_default(llama2_sampler_params *p) {
    p->temperature = 1.0f;
    p->topp = 0.9f;
    p->topk = 0;
    p->minp = 0.0f;
    p->repetition_penalty = 1.0f;
    p->repetition_window = 0;
}

int llama2_sampler_new(llama2_sampler **out, int vocab_size, const llama2_sampler_params *params,
                       uint64_t seed, llama2_error *err) {
    llama2_ok(err);
    if (!out || !params) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    *out = NULL;
    const llama2_sampler_params *p = params;
    if (vocab_size <= 0) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "vocab_size must be positive (got %d)", vocab_size);
    if (!(p->temperature >= 0.0f) || isinf(p->temperature))
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "temperature must be finite and >= 0 (got %g)", (double)p->temperature);
    if (p->topp != p->topp) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "topp is NaN");
    if (p->topk < 0) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "topk must be >= 0 (got %d)", p->topk);
    if (!(p->minp >= 0.0f && p->minp <= 1.0f))
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "minp must be in [0, 1] (got %g)", (double)p->minp);
    if (!(p->repetition_penalty > 0.0f) || isinf(p->repetition_penalty))
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "repetition_penalty must be positive (got %g)",
                           (double)p->repetition_penalty);
    if (p->repetition_window < 0)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "repetition_window must be >= 0 (got %d)", p->repetition_window);
    llama2_sampler *s = (llama2_sampler *)calloc(1, sizeof(*s));
    if (!s) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    s->vocab_size = vocab_size;
    s->params = *p;
    s->rng_state = seed;
    s->window = p->repetition_window > 0 ? p->repetition_window : 64;
    s->candidates = (prob_index *)malloc((size_t)vocab_size * sizeof(prob_index));
    s->scratch = (prob_index *)malloc((size_t)vocab_size * sizeof(prob_index));
    s->recent = (int *)malloc((size_t)s->window * sizeof(int));
    s->counts = (int *)calloc((size_t)vocab_size, sizeof(int));
    if (!s->candidates || !s->scratch || !s->recent || !s->counts) {
        llama2_sampler_free(s);
        return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    }
    *out = s;
    return LLAMA2_OK;
}

void llama2_sampler_free(llama2_sampler *s) {
    if (!s) return;
    free(s->bias_token);
    free(s->bias);
    free(s->candidates);
    free(s->scratch);
    free(s->recent);
    free(s->counts);
    free(s);
}

uint64_t llama2_sampler_rng_state(const llama2_sampler *s) { return s ? s->rng_state : 0; }

void llama2_sampler_accept(llama2_sampler *s, int token) {
    if (!s || token < 0 || token >= s->vocab_size) return;
    if (s->n_recent == s->window) {
        s->counts[s->recent[s->next_slot]]--;
    } else {
        s->n_recent++;
    }
    s->recent[s->next_slot] = token;
    s->counts[token]++;
    s->next_slot = (s->next_slot + 1) % s->window;
}

int llama2_sampler_window(const llama2_sampler *s) { return s->window; }

void llama2_sampler_skip(llama2_sampler *s) {
    if (s->params.temperature != 0.0f) (void)llama2_random_f32(&s->rng_state);
}

/* llama2.c's loop (the first index of the largest value; NaNs never win), run
   only over the blocks that hold a value larger than the best so far: each
   block's largest value comes from 16 independent running maxima, which the
   compiler vectorizes (5x faster over a 32,000-token vocabulary; greedy
   decoding of a batch of streams calls this once per stream and step). */
static int argmax(const float *p, int n) {
    enum { LANES = 16, BLOCK = 128 };
    int best = 0;
    float max_p = p[0];
    int i = 1;
    for (; i + BLOCK <= n; i += BLOCK) {
        float m[LANES];
        for (int k = 0; k < LANES; k++) m[k] = -INFINITY;
        for (int j = 0; j < BLOCK; j += LANES)
            for (int k = 0; k < LANES; k++) m[k] = p[i + j + k] > m[k] ? p[i + j + k] : m[k];
        float top = m[0];
        for (int k = 1; k < LANES; k++) top = m[k] > top ? m[k] : top;
        if (top > max_p)
            for (int j = i; j < i + BLOCK; j++)
                if (p[j] > max_p) { max_p = p[j]; best = j; }
    }
    for (; i < n; i++)
        if (p[i] > max_p) { max_p = p[i]; best = i; }
    return best;
}

static int sample_multinomial(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1;
}

/* Sorts by probability, descending; equal probabilities keep index order
 * (the order glibc's merge sort gives llama2.c). Probabilities are positive
 * floats, whose bit patterns order like integers, so a stable LSD radix sort
 * on the inverted bits does it in linear time. */
static void sort_desc(prob_index *a, prob_index *tmp, int n) {
    if (n < 2) return;
    for (int shift = 0; shift < 32; shift += 8) {
        int count[257] = {0};
        for (int i = 0; i < n; i++) {
            uint32_t key;
            memcpy(&key, &a[i].prob, 4);
            count[((~key >> shift) & 0xFF) + 1]++;
        }
        int same = 0; /* every key has the same byte here: nothing to move */
        for (int b = 0; b < 256 && !same; b++) same = count[b + 1] == n;
        if (same) continue;
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int i = 0; i < n; i++) {
            uint32_t key;
            memcpy(&key, &a[i].prob, 4);
            tmp[count[(~key >> shift) & 0xFF]++] = a[i];
        }
        memcpy(a, tmp, (size_t)n * sizeof(prob_index));
    }
}

static int sample_topp(const float *p, int n, float topp, llama2_sampler *s, float coin) {
    prob_index *cand = s->candidates;
    /* tokens below the cutoff can never be in the nucleus: skip sorting them */
    int n0 = 0;
    const float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) {
        if (p[i] >= cutoff) {
            cand[n0].index = i;
            cand[n0].prob = p[i];
            n0++;
        }
    }
    if (n0 == 0) return argmax(p, n); /* a near-uniform distribution with a tiny topp */
    sort_desc(cand, s->scratch, n0);
    float cumulative = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cumulative += cand[i].prob;
        if (cumulative > topp) { last = i; break; }
    }
    float r = coin * cumulative;
    float cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += cand[i].prob;
        if (r < cdf) return cand[i].index;
    }
    return cand[last].index;
}

/* top-k and/or min-p (with optional top-p over what they keep): the kept
 * tokens' probabilities are sampled in proportion, most likely first. */
static int sample_filtered(const float *p, int n, llama2_sampler *s, float coin) {
    const llama2_sampler_params *pr = &s->params;
    prob_index *cand = s->candidates;
    float pmax = p[argmax(p, n)];
    float floor_p = pr->minp > 0.0f ? pr->minp * pmax : 0.0f;
    int n0 = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] > 0.0f && p[i] >= floor_p) {
            cand[n0].index = i;
            cand[n0].prob = p[i];
            n0++;
        }
    }
    if (n0 == 0) return argmax(p, n);
    sort_desc(cand, s->scratch, n0);
    if (pr->topk > 0 && pr->topk < n0) n0 = pr->topk;
    float mass = 0.0f;
    for (int i = 0; i < n0; i++) mass += cand[i].prob;
    int last = n0 - 1;
    if (pr->topp > 0.0f && pr->topp < 1.0f) {
        float cumulative = 0.0f;
        for (int i = 0; i < n0; i++) {
            cumulative += cand[i].prob;
            if (cumulative > pr->topp * mass) { last = i; break; }
        }
        mass = cumulative;
    }
    float r = coin * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += cand[i].prob;
        if (r < cdf) return cand[i].index;
    }
    return cand[last].index;
}

static void apply_repetition_penalty(llama2_sampler *s, float *logits) {
    float pen = s->params.repetition_penalty;
    for (int i = 0; i < s->n_recent; i++) {
        int t = s->recent[i];
        if (s->counts[t] <= 0) continue;
        s->counts[t] = -s->counts[t]; /* mark: penalize each token once */
        logits[t] = logits[t] > 0.0f ? logits[t] / pen : logits[t] * pen;
    }
    for (int i = 0; i < s->n_recent; i++) {
        int t = s->recent[i];
        if (s->counts[t] < 0) s->counts[t] = -s->counts[t];
    }
}

int llama2_sampler_set_logit_bias(llama2_sampler *s, const int *tokens, const float *bias, int n,
                                  llama2_error *err) {
    llama2_ok(err);
    if (!s || n < 0 || (n > 0 && (!tokens || !bias))) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "bad logit bias");
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= s->vocab_size)
            return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "logit bias for token %d, outside [0, %d)", tokens[i],
                               s->vocab_size);
        if (bias[i] != bias[i] || bias[i] == INFINITY)
            return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "logit bias of token %d must be a number or -inf (got %g)",
                               tokens[i], (double)bias[i]);
    }
    int *t = n ? (int *)malloc((size_t)n * sizeof(int)) : NULL;
    float *b = n ? (float *)malloc((size_t)n * sizeof(float)) : NULL;
    if (n && (!t || !b)) {
        free(t);
        free(b);
        return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    }
    if (n) {
        memcpy(t, tokens, (size_t)n * sizeof(int));
        memcpy(b, bias, (size_t)n * sizeof(float));
    }
    free(s->bias_token);
    free(s->bias);
    s->bias_token = t;
    s->bias = b;
    s->n_bias = n;
    return LLAMA2_OK;
}

int llama2_sample(llama2_sampler *s, float *logits) {
    int n = s->vocab_size;
    const llama2_sampler_params *p = &s->params;
    for (int i = 0; i < s->n_bias; i++) logits[s->bias_token[i]] += s->bias[i];
    if (p->repetition_penalty != 1.0f) apply_repetition_penalty(s, logits);
    if (p->temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= p->temperature;
    llama2_softmax(logits, n);
    float coin = llama2_random_f32(&s->rng_state);
    if ((p->topk > 0 && p->topk < n) || p->minp > 0.0f) return sample_filtered(logits, n, s, coin);
    if (p->topp <= 0 || p->topp >= 1 || n < 2) return sample_multinomial(logits, n, coin);
    return sample_topp(logits, n, p->topp, s, coin);
}
