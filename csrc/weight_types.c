/*
 * weight_types.c - each weight type as data. A matrix carries its type
 * (llama2_matrix.type, one of LLAMA2_WEIGHTS_*: f32, q8_0, bf16, q4_0); this table says, per type,
 * how many bytes a row takes, how a product of rows runs (this CPU's kernel
 * when the matrix was packed for it, else the portable loop the kernels are
 * tested against), whether there is a batched kernel, how the type is packed
 * at load and how its values are checked for NaN and infinity.
 *
 * Adding a type: its portable row loop and SIMD kernels (fields of
 * llama2_kernels, kernels.h), its packing, and one entry here; the reader
 * maps a file version to a type in checkpoint.c's version table.
 */
#include "kernels.h"

#include <string.h>

/* ---- NaN / infinity scans (fp32 and bf16 bit patterns) ---- */

int64_t llama2_first_nonfinite(const void *data, int64_t n, int bf16) {
    const int64_t block = 4096; /* blocks without an early exit: the all-finite case runs at memory speed */
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        int64_t b1 = b0 + block < n ? b0 + block : n;
        unsigned bad = 0;
        if (bf16) {
            const uint16_t *h = (const uint16_t *)data;
            for (int64_t i = b0; i < b1; i++) bad |= (h[i] & 0x7f80u) == 0x7f80u;
        } else {
            const uint32_t *u = (const uint32_t *)data;
            for (int64_t i = b0; i < b1; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
        }
        if (!bad) continue;
        for (int64_t i = b0; i < b1; i++) {
            int e = bf16 ? (((const uint16_t *)data)[i] & 0x7f80u) == 0x7f80u
                         : (((const uint32_t *)data)[i] & 0x7f800000u) == 0x7f800000u;
            if (e) return i;
        }
    }
    return -1;
}

/* ---- fp32 ---- */

static void f32_rows(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                     const llama2_kernels *k, int r0, int r1) {
    const llama2_kernels *use = w->p && k->packs ? k : &llama2_kernels_scalar;
    use->matmul_f32(out, a->x, w, r0, r1);
}

static int f32_batch(float *out, size_t stride, const llama2_activation *a, int n, const llama2_matrix *w, int gs,
                     const llama2_kernels *k, int r0, int r1) {
    if (!(k->packs && w->p && k->matmul_f32_batch)) return 0;
    k->matmul_f32_batch(out, stride, a, n, w, r0, r1); /* register-blocked */
    return 1;
}

static int f32_pack(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    return llama2_pack_f32(t, m, err);
}

static int64_t f32_nonfinite(const llama2_matrix *m, int gs) {
    return llama2_first_nonfinite(m->f, (int64_t)m->rows * m->cols, 0);
}

/* ---- bf16 ---- */

static void bf16_rows(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                      const llama2_kernels *k, int r0, int r1) {
    const llama2_kernels *use = w->ph && k->packs ? k : &llama2_kernels_scalar;
    use->matmul_bf16(out, a->x, w, r0, r1);
}

static int bf16_batch(float *out, size_t stride, const llama2_activation *a, int n, const llama2_matrix *w, int gs,
                      const llama2_kernels *k, int r0, int r1) {
    if (!(k->packs && w->ph && k->matmul_bf16_batch)) return 0;
    k->matmul_bf16_batch(out, stride, a, n, w, r0, r1);
    return 1;
}

static int bf16_pack(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    return llama2_pack_bf16(t, m, err);
}

static int64_t bf16_nonfinite(const llama2_matrix *m, int gs) {
    return llama2_first_nonfinite(m->h, (int64_t)m->rows * m->cols, 1);
}

/* ---- Q8_0 ---- */

static void q8_rows(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                    const llama2_kernels *k, int r0, int r1) {
    if (w->cols % gs == 0 && gs % 32 == 0)
        k->matmul_q8(out, a->q, a->s, w, gs, r0, r1);
    else if (w->cols % 32 == 0 && gs % 32 == 0 && k->matmul_q8_span)
        k->matmul_q8_span(out, a->q, a->s, w, gs, r0, r1); /* groups span rows */
    else
        llama2_matmul_q8_rows(out, a->q, a->s, w, gs, r0, r1);
}

/* groups that run across rows (n % gs != 0) have no batched kernel: row tiles (matmul.c) */
static int q8_batch(float *out, size_t stride, const llama2_activation *a, int n, const llama2_matrix *w, int gs,
                    const llama2_kernels *k, int r0, int r1) {
    if (!(k->matmul_q8_batch && w->pq && w->ps && gs % 32 == 0 && w->cols % gs == 0)) return 0;
    k->matmul_q8_batch(out, stride, a, n, w, gs, r0, r1); /* register-blocked over tokens (kernels_q4.c) */
    return 1;
}

static int q8_pack(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    return llama2_pack_scales(t, m, gs, err);
}

static int64_t q8_nonfinite(const llama2_matrix *m, int gs) { /* int8 values are finite: the scales */
    return llama2_first_nonfinite(m->s, (int64_t)m->rows * m->cols / gs, 0);
}

/* ---- Q4_0 (kernels_q4.c): activations in Q8_0 blocks of 32 (gs = 32) ---- */

static void q4_rows(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                    const llama2_kernels *k, int r0, int r1) {
    if (w->pq4 && k->matmul_q4)
        k->matmul_q4(out, a->q, a->s, w, r0, r1);
    else
        llama2_matmul_q4_rows(out, a->q, a->s, w, r0, r1);
}

static int q4_batch(float *out, size_t stride, const llama2_activation *a, int n, const llama2_matrix *w, int gs,
                    const llama2_kernels *k, int r0, int r1) {
    if (!(w->pq4 && k->matmul_q4_batch)) return 0;
    k->matmul_q4_batch(out, stride, a, n, w, r0, r1); /* register-blocked over tokens */
    return 1;
}

static int q4_pack(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    return llama2_pack_q4(t, m, err);
}

static int64_t q4_nonfinite(const llama2_matrix *m, int gs) { return llama2_q4_first_nonfinite(m); }

const llama2_weight_type llama2_weight_types[LLAMA2_N_WEIGHT_TYPES] = {
    [LLAMA2_WEIGHTS_F32] = {.name = "f32", .bits = 32, .rows = f32_rows, .batch = f32_batch,
                            .pack = f32_pack, .first_nonfinite = f32_nonfinite},
    [LLAMA2_WEIGHTS_Q8_0] = {.name = "q8_0", .bits = 8, .rows = q8_rows, .batch = q8_batch,
                             .pack = q8_pack, .first_nonfinite = q8_nonfinite},
    [LLAMA2_WEIGHTS_BF16] = {.name = "bf16", .bits = 16, .rows = bf16_rows, .batch = bf16_batch,
                             .pack = bf16_pack, .first_nonfinite = bf16_nonfinite},
    [LLAMA2_WEIGHTS_Q4_0] = {.name = "q4_0", .bits = 4, .rows = q4_rows, .batch = q4_batch,
                             .pack = q4_pack, .first_nonfinite = q4_nonfinite},
};
