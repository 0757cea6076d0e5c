/*
 * kernels.h - the matrix-vector kernels and how one is chosen at run time.
 *
 * Every kernel computes exactly what the portable loops of kernels_scalar.c
 * compute, bit for bit: SIMD lanes hold different output rows, and each
 * lane adds its row's products in the scalar order, with the scalar
 * loop's rounding (fp32: separate multiply and add, as llama2.c; bf16: one
 * fused multiply-add per weight). Integer dot products are exact in any
 * order. So outputs never depend on which kernel the CPU gets.
 */
#ifndef LLAMA2_KERNELS_H
#define LLAMA2_KERNELS_H

#include "internal.h"

/* fp32 rows are repacked in blocks of PACK_ROWS rows, interleaved by column:
 * packed[(block * n + j) * PACK_ROWS + r] = W[block * PACK_ROWS + r][j]
 * (the last block zero-padded); bf16 rows the same way. Q8_0 scales of a matrix whose rows hold
 * whole groups are regrouped the same way:
 * ps[(block * groups + g) * PACK_ROWS + r] = scale of row block*8+r, group g,
 * and, when the group size is a multiple of 32, their int8 values 4 columns
 * of 8 rows at a time:
 * pq[((block * n / 4 + k) * PACK_ROWS + r) * 4 + i] = Q[block*8+r][4*k + i],
 * so one 32-byte load holds 4 columns of a whole block. Values of -128
 * (outside Q8_0's [-127, 127], only in hand-made files) leave pq NULL, since
 * the kernels' sign trick needs |w| <= 127 (kernels_avx2.c).
 *
 * When groups run across rows (n % gs != 0, n and gs multiples of 32), a
 * row's scalar sum goes segment by segment (kernels_scalar.c), and every
 * segment boundary falls on a multiple of 32 columns. Then pq is laid out as above,
 * and for each block and 32-column run c:
 * pends[block * n/32 + c] has bit r set when row r's segment ends with run c,
 * ps[(block * n/32 + c) * PACK_ROWS + r] = that segment's weight scale. */
#define LLAMA2_PACK_ROWS 8

typedef struct llama2_kernels_s {
    const char *name;
    int packs; /* wants the packed layouts at load */
    /* rows [r0, r1) of out = W x; r0 is a multiple of LLAMA2_PACK_ROWS */
    void (*matmul_f32)(float *out, const float *x, const llama2_matrix *w, int r0, int r1);
    /* rows [r0, r1) of out[t] = W x[t] for the n_tok activations a[t]
     * (out[t] = out + t * out_stride), each exactly as matmul_f32 computes
     * it; NULL when the kernels have no batched form */
    void (*matmul_f32_batch)(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                             const llama2_matrix *w, int r0, int r1);
    /* rows [r0, r1) of a Q8_0 product whose groups run across rows
     * (n % gs != 0), for n and gs multiples of 32; NULL: none */
    void (*matmul_q8_span)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                           int gs, int r0, int r1);
    /* the same two for bf16 weights (w->ph, packed like p) */
    void (*matmul_bf16)(float *out, const float *x, const llama2_matrix *w, int r0, int r1);
    void (*matmul_bf16_batch)(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                              const llama2_matrix *w, int r0, int r1);
    /* rows [r0, r1) of the Q8_0 product, for n % gs == 0 */
    void (*matmul_q8)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                      int gs, int r0, int r1);
    /* one head's attention scores: att[p] = (q[0]*k_p[0] + q[1]*k_p[1] + ...) / scale
     * for p < n, the keys in the cache's blocked layout (LLAMA2_KEY_BLOCK below) */
    void (*attn_scores)(float *att, const float *q, const float *kt, int n, int hs, float scale);
    /* one head's output: out[i] = att[0]*v_0[i] + att[1]*v_1[i] + ... over p < n,
     * v_p = v + p * stride */
    void (*attn_values)(float *out, const float *att, const float *v, int n, int hs, size_t stride);
} llama2_kernels;

/* The key cache holds each (layer, kv head) as blocks of LLAMA2_KEY_BLOCK
 * positions, interleaved by dimension: key i of position p at
 * kt[(p / 8) * 8 * head_size + i * 8 + p % 8], so that one load holds
 * dimension i of 8 positions and the scores of 8 positions build up lane by
 * lane, each in the scalar order. */
/* (LLAMA2_KEY_BLOCK is defined in internal.h, beside the context) */

extern const llama2_kernels llama2_kernels_scalar; /* kernels_scalar.c */
#if defined(__x86_64__) || defined(_M_X64)
#define LLAMA2_HAVE_AVX2_KERNELS 1
extern const llama2_kernels llama2_kernels_avx2;
#endif

/* The best kernels this CPU runs; LLAMA2_KERNELS=scalar|avx2 overrides. */
const llama2_kernels *llama2_kernels_select(void);
const llama2_kernels *llama2_kernels_by_name(const char *name); /* NULL if unknown/unsupported */

/* Repacks an fp32 matrix / the scales of a Q8_0 matrix for kernels that
 * want it (buffers owned by t). */
int llama2_pack_f32(llama2_transformer *t, llama2_matrix *m, llama2_error *err);
int llama2_pack_bf16(llama2_transformer *t, llama2_matrix *m, llama2_error *err); /* same layout, 16-bit */
int llama2_pack_scales(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err);

/* ---- weight types as data (weight_types.c) ---- */

#define LLAMA2_N_WEIGHT_TYPES 3 /* LLAMA2_WEIGHTS_F32, _Q8_0, _BF16 (llama2.h) */

typedef struct {
    const char *name;
    int bits; /* per stored value (scales not counted) */
    /* rows [r0, r1) of out = W a (r0 a multiple of LLAMA2_PACK_ROWS) */
    void (*rows)(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                 const llama2_kernels *k, int r0, int r1);
    /* the same for n activations at once; returns 0 when there is no batched
     * kernel for this matrix (the caller then runs `rows` per activation);
     * NULL: never */
    int (*batch)(float *out, size_t stride, const llama2_activation *a, int n, const llama2_matrix *w,
                 const llama2_kernels *k, int r0, int r1);
    /* the layouts the SIMD kernels want, made at load */
    int (*pack)(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err);
    /* index of the first NaN or infinity among the stored values (or scales), or -1 */
    int64_t (*first_nonfinite)(const llama2_matrix *m, int gs);
} llama2_weight_type;

extern const llama2_weight_type llama2_weight_types[LLAMA2_N_WEIGHT_TYPES];

/* index of the first NaN or infinity among n fp32 (bf16: bf16) values, or -1 */
int64_t llama2_first_nonfinite(const void *data, int64_t n, int bf16);

#endif
