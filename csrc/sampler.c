/*
 * sampler.c - choosing the next token from logits (SPEC.md section 5):
 * greedy at temperature 0, otherwise softmax over logits / temperature and
 * either plain multinomial sampling or top-p (nucleus) sampling, driven by
 * a xorshift64* generator so a seed reproduces llama2.c's choices.
 */
#include "internal.h"

#include <stdlib.h>

typedef struct {
    float prob;
    int index;
} prob_index;

struct llama2_sampler {
    int vocab_size;
    llama2_sampler_params params;
    uint64_t rng_state;
    prob_index *candidates; /* scratch for top-p */
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

int llama2_sampler_new(llama2_sampler **out, int vocab_size, const llama2_sampler_params *params,
                       uint64_t seed, llama2_error *err) {
    llama2_ok(err);
    if (!out || !params) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    *out = NULL;
    if (vocab_size <= 0) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "vocab_size must be positive (got %d)", vocab_size);
    if (!(params->temperature >= 0.0f))
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "temperature must be >= 0 (got %g)", (double)params->temperature);
    if (params->topp != params->topp) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "topp is NaN");
    llama2_sampler *s = (llama2_sampler *)calloc(1, sizeof(*s));
    if (!s) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    s->candidates = (prob_index *)malloc((size_t)vocab_size * sizeof(prob_index));
    if (!s->candidates) { free(s); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
    s->vocab_size = vocab_size;
    s->params = *params;
    s->rng_state = seed;
    *out = s;
    return LLAMA2_OK;
}

void llama2_sampler_free(llama2_sampler *s) {
    if (!s) return;
    free(s->candidates);
    free(s);
}

uint64_t llama2_sampler_rng_state(const llama2_sampler *s) { return s ? s->rng_state : 0; }

static int argmax(const float *p, int n) {
    int best = 0;
    float max_p = p[0];
    for (int i = 1; i < n; i++)
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

/* descending probability; equal probabilities keep index order */
static int by_prob_desc(const void *a, const void *b) {
    const prob_index *x = (const prob_index *)a, *y = (const prob_index *)b;
    if (x->prob > y->prob) return -1;
    if (x->prob < y->prob) return 1;
    return (x->index > y->index) - (x->index < y->index);
}

static int sample_topp(const float *p, int n, float topp, prob_index *cand, float coin) {
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
    qsort(cand, (size_t)n0, sizeof(prob_index), by_prob_desc);
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

int llama2_sample(llama2_sampler *s, float *logits) {
    int n = s->vocab_size;
    if (s->params.temperature == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= s->params.temperature;
    llama2_softmax(logits, n);
    float coin = llama2_random_f32(&s->rng_state);
    float topp = s->params.topp;
    if (topp <= 0 || topp >= 1 || n < 2) return sample_multinomial(logits, n, coin);
    return sample_topp(logits, n, topp, s->candidates, coin);
}
