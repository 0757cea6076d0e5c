/*
 * ops.c - the vector operations of the forward pass besides the matmuls:
 * RMSNorm and softmax (softmax also turns logits into probabilities in
 * sampler.c).
 *
 * Both are llama2.c's loops, in its order (sequential float sums, no
 * fast-math), so the sampled tokens match its `run` bit for bit.
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

/* SwiGLU's gate: hb = silu(hb) * hb2 (silu(x) = x * sigmoid(x)) */
void llama2_swiglu(float *hb, const float *hb2, int n) {
    for (int i = 0; i < n; i++) {
        float val = hb[i];
        val *= (1.0f / (1.0f + expf(-val)));
        val *= hb2[i];
        hb[i] = val;
    }
}
