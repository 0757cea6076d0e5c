/*
 * rope.c - RoPE frequency scaling: the per-frequency divisors a model holds
 * (t->rope_div, head_size / 2 floats), computed once at load from the
 * config's rope scaling, and applied by forward.c where it tables the
 * rotation angles (freq = 1 / theta^(d / head_size) / rope_div[d / 2]).
 *
 *   linear  every divisor is rope_factor (HF "linear", GGUF rope.scaling.type linear);
 *   llama3  Llama 3.1's divisors (HF rope_type "llama3"): with wavelength
 *           w = 2 pi / f of each unscaled frequency f, L = original_ctx,
 *           1 where w < L / high_freq_factor, factor where w > L / low_freq_factor,
 *           else 1 / ((1 - s) / factor + s) with s = (L / w - low) / (high - low);
 *           computed in double (transformers computes the same in float32:
 *           the frequencies agree to about 1e-7 relative, docs/LLAMA3.md);
 *   factors a GGUF file's rope_freqs tensor (llama.cpp's converter writes
 *           the llama3 divisors there), times rope_factor when the file also
 *           says linear.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

static int positive(float v) { return v > 0.0f && isfinite(v); }

static int check(const llama2_config *c, const float *factors, llama2_error *err) {
    switch (c->rope_scaling) {
    case LLAMA2_ROPE_NONE:
        return LLAMA2_OK;
    case LLAMA2_ROPE_LINEAR:
        if (!positive(c->rope_factor))
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "linear rope scaling needs a finite positive factor (got %g)",
                               (double)c->rope_factor);
        return LLAMA2_OK;
    case LLAMA2_ROPE_LLAMA3:
        if (!positive(c->rope_factor) || !positive(c->rope_low_freq_factor) || !positive(c->rope_high_freq_factor))
            return llama2_fail(err, LLAMA2_ERR_FORMAT,
                               "llama3 rope scaling needs finite positive factor, low_freq_factor and "
                               "high_freq_factor (got %g, %g, %g)", (double)c->rope_factor,
                               (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor);
        if (!(c->rope_high_freq_factor > c->rope_low_freq_factor))
            return llama2_fail(err, LLAMA2_ERR_FORMAT,
                               "llama3 rope scaling needs high_freq_factor > low_freq_factor (got %g and %g)",
                               (double)c->rope_high_freq_factor, (double)c->rope_low_freq_factor);
        if (c->rope_original_ctx <= 0)
            return llama2_fail(err, LLAMA2_ERR_FORMAT,
                               "llama3 rope scaling needs a positive original context length (got %d)",
                               c->rope_original_ctx);
        return LLAMA2_OK;
    case LLAMA2_ROPE_FACTORS:
        if (!factors) return llama2_fail(err, LLAMA2_ERR_FORMAT, "rope frequency factors are missing");
        if (c->rope_factor != 0.0f && !positive(c->rope_factor))
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "rope scaling factor %g is not finite and positive",
                               (double)c->rope_factor);
        for (int j = 0; j < c->head_size / 2; j++)
            if (!positive(factors[j]))
                return llama2_fail(err, LLAMA2_ERR_FORMAT,
                                   "rope frequency factor %d is %g: each must be finite and positive", j,
                                   (double)factors[j]);
        return LLAMA2_OK;
    default:
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "unknown rope scaling type %d (known: 0 none, 1 linear, 2 llama3)",
                           c->rope_scaling);
    }
}

/* The llama3 divisor of the frequency of pair j. */
static float llama3_divisor(const llama2_config *c, int j) {
    const double pi = 3.14159265358979323846;
    double freq = 1.0 / pow((double)c->rope_theta, (2.0 * j) / (double)c->head_size);
    double wavelen = 2.0 * pi / freq, old = (double)c->rope_original_ctx;
    double low = c->rope_low_freq_factor, high = c->rope_high_freq_factor, factor = c->rope_factor;
    if (wavelen < old / high) return 1.0f;
    if (wavelen > old / low) return (float)factor;
    double smooth = (old / wavelen - low) / (high - low);
    return (float)(1.0 / ((1.0 - smooth) / factor + smooth));
}

int llama2_rope_setup(llama2_transformer *t, const float *factors, llama2_error *err) {
    const llama2_config *c = &t->config;
    int rc = check(c, factors, err);
    if (rc || c->rope_scaling == LLAMA2_ROPE_NONE) return rc;
    const int n = c->head_size / 2;
    float *div = (float *)llama2_own(t, (size_t)n * sizeof(float));
    if (!div) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory for the rope frequency divisors");
    for (int j = 0; j < n; j++) {
        if (c->rope_scaling == LLAMA2_ROPE_LINEAR)
            div[j] = c->rope_factor;
        else if (c->rope_scaling == LLAMA2_ROPE_LLAMA3)
            div[j] = llama3_divisor(c, j);
        else
            div[j] = c->rope_factor > 0.0f ? factors[j] * c->rope_factor : factors[j];
    }
    t->rope_div = div;
    return LLAMA2_OK;
}
