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

/* fp32 rows are repacked in blocks of R rows (R = the kernels' pack_rows:
 * LLAMA2_PACK_ROWS = 8 for AVX2 and NEON, 16 for AVX-512), interleaved by column:
 * packed[(block * n + j) * R + r] = W[block * R + r][j]
 * (the last block zero-padded); bf16 rows the same way. Q8_0 scales of a matrix whose rows hold
 * whole groups are regrouped the same way:
 * ps[(block * groups + g) * R + r] = scale of row block*R+r, group g,
 * and, when the group size is a multiple of 32, their int8 values 4 columns
 * of R rows at a time:
 * pq[((block * n / 4 + k) * R + r) * 4 + i] = Q[block*R+r][4*k + i],
 * so one load (32 bytes for R = 8, 64 for R = 16) holds 4 columns of a whole
 * block. How the int8 values are stored is the kernels' q8_format:
 *   LLAMA2_Q8_SIGNED_NO_MIN (AVX2): as they are; a value of -128 (outside
 *     Q8_0's [-127, 127], only in hand-made files) leaves pq NULL, since the
 *     kernels' sign trick needs |w| <= 127 (kernels_avx2.c);
 *   LLAMA2_Q8_SIGNED (NEON): as they are, any value;
 *   LLAMA2_Q8_BIASED (AVX-512 VNNI): w + 128 as unsigned bytes (VNNI
 *     multiplies unsigned by signed bytes; the kernels take 128 * sum(x)
 *     back off, exactly), any value.
 *
 * When groups run across rows (n % gs != 0, n and gs multiples of 32), a
 * row's scalar sum goes segment by segment (kernels_scalar.c), and every
 * segment boundary falls on a multiple of 32 columns. Then pq is laid out as above,
 * and for each block and 32-column run c:
 * pends[(block * n/32 + c) * R/8 + r/8] has bit r%8 set when row r's segment ends with run c,
 * ps[(block * n/32 + c) * R + r] = that segment's weight scale. */
#define LLAMA2_PACK_ROWS 8

enum { LLAMA2_Q8_SIGNED_NO_MIN = 0, LLAMA2_Q8_SIGNED = 1, LLAMA2_Q8_BIASED = 2 };

typedef struct llama2_kernels_s {
    const char *name;
    int packs; /* wants the packed layouts at load */
    int pack_rows; /* rows per packed block (above): 8 or 16; 0 means 8 */
    int f32_stream_rows; /* the same for fp32 stream matrices (llama2_f32_stream); 0: pack_rows */
    int q8_format; /* how pq stores int8 values (above): LLAMA2_Q8_* */
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
    /* the same for the n_tok activations a[t] at once (out[t] = out + t * out_stride), each
     * exactly as matmul_q8 computes it (n % gs == 0, gs % 32 == 0); NULL: none (kernels_q4.c) */
    void (*matmul_q8_batch)(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                            const llama2_matrix *w, int gs, int r0, int r1);
    /* Q4_0 weights (kernels_q4.c): rows [r0, r1) of the product with a Q8_0 activation in
     * blocks of 32, and the same for n_tok activations; NULL: the portable loop */
    void (*matmul_q4)(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0, int r1);
    void (*matmul_q4_batch)(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                            const llama2_matrix *w, int r0, int r1);
    /* an activation quantized in groups of gs, exactly as llama2_quantize
     * (quant.c) does it; NULL: that function */
    void (*quantize)(int8_t *q, float *s, const float *x, int n, int gs);
    /* one head's attention scores: att[p] = (q[0]*k_p[0] + q[1]*k_p[1] + ...) / scale
     * for p < n, the keys in the cache's blocked layout (LLAMA2_KEY_BLOCK below) */
    void (*attn_scores)(float *att, const float *q, const float *kt, int n, int hs, float scale);
    /* one head's output: out[i] = att[0]*v_0[i] + att[1]*v_1[i] + ... over p < n,
     * v_p = v + p * stride */
    void (*attn_values)(float *out, const float *att, const float *v, int n, int hs, size_t stride);
    /* hb[i] = hb[i] * (1 / (1 + expf(-hb[i]))) * hb2[i] (SwiGLU), exactly as
     * llama2_swiglu (ops.c); NULL: that function */
    void (*swiglu)(float *hb, const float *hb2, int n);
    /* x = softmax(x), exactly as llama2_softmax (ops.c); NULL: that function */
    void (*softmax)(float *x, int n);
    /* out[i] = exp(x[i]) for i < n by the lanes the two above use (below);
     * NULL: none */
    void (*exp_lanes)(float *out, const float *x, int n);
} llama2_kernels;

/* ---- expf in SIMD lanes (expf_simd.c) ----
 * The x86 tiers' swiglu and softmax take exp() of 8 or 16 floats at once by
 * the algorithm of glibc's expf, which gives that expf's bits for every
 * input, once llama2_expf_agrees() has found their lanes equal to this C
 * library's expf; else they call expf per element. The double-precision
 * constants, as bit patterns: */
#define LLAMA2_EXPF_INVLN2N 0x40471547652b82feull /* 32 / ln 2 */
#define LLAMA2_EXPF_SHIFT 0x4338000000000000ull   /* 1.5 * 2^52: adding it rounds to an integer */
#define LLAMA2_EXPF_C0 0x3ebc6af84b912394ull      /* the cubic's coefficients of r^3, r^2, r */
#define LLAMA2_EXPF_C1 0x3f2ebfce50fac4f3ull
#define LLAMA2_EXPF_C2 0x3f962e42ff0c52d6ull
#define LLAMA2_EXPF_BIG_TOP 0x42b                 /* top 12 bits of |x| from which x is >= 88, inf or NaN */
#define LLAMA2_EXPF_OVER 0x42b17217u              /* float bits: above this x, +inf */
#define LLAMA2_EXPF_UNDER 0xc2cff1b4u             /* below this (negative) x, 0 */
extern const uint64_t llama2_exp2_table[32];
typedef void (*llama2_expf_lanes)(float *out, const float *x, int n); /* out[i] = expf(x[i]), i < n */
int llama2_expf_agrees(llama2_expf_lanes f);

/* A "stream" matrix: big fp32 with long rows (8 MB and more, 1024 columns
 * and more: TinyLlama's), which the decode kernels read one block at a time
 * as one prefetched memory stream; AVX-512 packs these in 8-row blocks
 * (f32_stream_rows) so that matmul.c's row tiles of such matrices (24 or 8
 * rows) never split a block. */
/* the lanes (bit i: row row + i) of the 16-row block starting at `row` that
 * fall in [r0, r1): the store mask of the AVX-512 and AMX kernels */
static inline uint16_t llama2_lanes16(int row, int r0, int r1) {
    const int lo = r0 > row ? r0 - row : 0, hi = r1 - row < 16 ? r1 - row : 16;
    if (hi <= lo) return 0;
    return (uint16_t)((0xffffu >> (16 - hi)) & (0xffffu << lo));
}

static inline int llama2_f32_stream(const llama2_matrix *m) {
    return m->cols >= 1024 && (int64_t)m->rows * m->cols * 4 >= ((int64_t)8 << 20);
}

/* The key cache holds each (layer, kv head) as blocks of LLAMA2_KEY_BLOCK
 * positions, interleaved by dimension: key i of position p at
 * kt[(p / 8) * 8 * head_size + i * 8 + p % 8], so that one load holds
 * dimension i of 8 positions and the scores of 8 positions build up lane by
 * lane, each in the scalar order. */
/* (LLAMA2_KEY_BLOCK is defined in internal.h, beside the context) */

extern const llama2_kernels llama2_kernels_scalar; /* kernels_scalar.c */
#if defined(__x86_64__) || defined(_M_X64)
#define LLAMA2_HAVE_AVX2_KERNELS 1
extern const llama2_kernels llama2_kernels_avx2; /* kernels_avx2.c */
#define LLAMA2_HAVE_AVX512_KERNELS 1
extern const llama2_kernels llama2_kernels_avx512; /* kernels_avx512.c */
/* AMX (kernels_amx.c): GCC 11 or clang 12 and later on Linux, which grants
 * the tile state per process (arch_prctl) */
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11))
#define LLAMA2_HAVE_AMX_KERNELS 1
extern const llama2_kernels llama2_kernels_avx512_amx; /* the AVX-512 table, batched int8 on AMX */
/* asks the OS for the tile data state once per process; 1 when granted */
int llama2_amx_permitted(void);
void llama2_matmul_q8_batch_amx(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                const llama2_matrix *w, int gs, int r0, int r1);
#endif
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
#define LLAMA2_HAVE_NEON_KERNELS 1
extern const llama2_kernels llama2_kernels_neon; /* kernels_neon.c: NEON without SDOT */
/* SDOT kernels need a compiler that targets the dot product extension per
 * function: GCC, clang 16 and later, or a build for CPUs that have it */
#if defined(__ARM_FEATURE_DOTPROD) || (defined(__GNUC__) && !defined(__clang__)) || \
    (defined(__clang__) && __clang_major__ >= 16)
#define LLAMA2_HAVE_NEON_SDOT_KERNELS 1
extern const llama2_kernels llama2_kernels_neon_sdot; /* the same with SDOT for int8 */
#endif
#endif

/* The kernels a model opened now gets: the best this CPU runs, or the tier
 * LLAMA2_KERNELS names (portable or scalar, avx2, avx512, neon) when the CPU
 * runs it; a tier it cannot run falls back to the best it can (the reason
 * says so: llama2_kernels_reason in llama2.h). */
const llama2_kernels *llama2_kernels_select(void);
/* A table by its name or tier name ("scalar", "portable", "avx2", "avx512"
 * (AMX for batched int8 where the CPU has it), "avx512-amx", "avx512-noamx"
 * (AVX-512 without AMX, for tests), "neon" (SDOT where the CPU has it),
 * "neon-sdot", "neon-nosdot" (NEON without SDOT, for tests)); NULL if unknown
 * or this CPU (or this build) cannot run it. */
const llama2_kernels *llama2_kernels_by_name(const char *name);
/* Why by_name(name) is NULL ("" when it is not): for tests and the reason. */
const char *llama2_kernels_unavailable(const char *name);

/* Repacks an fp32 matrix / the scales of a Q8_0 matrix for kernels that
 * want it (buffers owned by t), in the layout of t->kernels (pack_rows and
 * q8_format; t->kernels NULL: AVX2's). */
int llama2_pack_f32(llama2_transformer *t, llama2_matrix *m, llama2_error *err);
int llama2_pack_bf16(llama2_transformer *t, llama2_matrix *m, llama2_error *err); /* same layout, 16-bit */
int llama2_pack_scales(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err);

/* ---- weight types as data (weight_types.c) ---- */

#define LLAMA2_N_WEIGHT_TYPES 4 /* LLAMA2_WEIGHTS_F32, _Q8_0, _BF16, _Q4_0 (llama2.h) */

typedef struct {
    const char *name;
    int bits; /* per stored value (scales not counted) */
    /* rows [r0, r1) of out = W a (r0 a multiple of LLAMA2_PACK_ROWS) */
    void (*rows)(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                 const llama2_kernels *k, int r0, int r1);
    /* the same for n activations at once; returns 0 when there is no batched
     * kernel for this matrix (the caller then runs `rows` per activation);
     * NULL: never */
    int (*batch)(float *out, size_t stride, const llama2_activation *a, int n, const llama2_matrix *w, int gs,
                 const llama2_kernels *k, int r0, int r1);
    /* the layouts the SIMD kernels want, made at load */
    int (*pack)(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err);
    /* index of the first NaN or infinity among the stored values (or scales), or -1 */
    int64_t (*first_nonfinite)(const llama2_matrix *m, int gs);
} llama2_weight_type;

extern const llama2_weight_type llama2_weight_types[LLAMA2_N_WEIGHT_TYPES];

/* index of the first NaN or infinity among n fp32 (bf16: bf16) values, or -1 */
int64_t llama2_first_nonfinite(const void *data, int64_t n, int bf16);

/* ---- Q4_0 (kernels_q4.c; layouts there) ---- */

float llama2_f16_to_f32(uint16_t h); /* exact */
/* the portable loop (the reference every Q4_0 kernel matches bit for bit) */
void llama2_matmul_q4_rows(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0, int r1);
/* regroups m->q4 for t->kernels' Q4_0 kernels (m->pq4, m->ps4); nothing when they have none */
int llama2_pack_q4(llama2_transformer *t, llama2_matrix *m, llama2_error *err);
/* index of the first value whose block scale is a NaN or infinity, or -1 */
int64_t llama2_q4_first_nonfinite(const llama2_matrix *m);
#if defined(__x86_64__) || defined(_M_X64)
void llama2_matmul_q4_avx2(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q4_batch_avx2(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                 const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q4_avx512(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q4_batch_avx512(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                   const llama2_matrix *w, int r0, int r1);
/* batched Q8_0 (n % gs == 0, gs % 32 == 0) over the tiers' pq / ps layouts */
void llama2_matmul_q8_batch_avx2(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                 const llama2_matrix *w, int gs, int r0, int r1);
void llama2_matmul_q8_batch_avx512(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                   const llama2_matrix *w, int gs, int r0, int r1);
/* per token t and group g (n / gs of them): corr[t * groups + g] = -bias *
 * (the sum of the group's activation bytes), in stack when n_tok * groups <=
 * LLAMA2_STACK_CORR, else in a malloc'd array (free it when it is not stack);
 * NULL when out of memory */
#define LLAMA2_STACK_CORR 2048
int32_t *llama2_q8_group_corrections(int32_t *stack, const llama2_activation *a, int n_tok, int n, int gs,
                                     int32_t bias);
#endif
#if defined(LLAMA2_HAVE_NEON_KERNELS)
/* kernels_q4_neon.c: NEON with widening multiplies (_mull) and with SDOT (_sdot), over AVX2's layouts */
void llama2_matmul_q4_neon_mull(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q4_batch_neon_mull(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                      const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q8_batch_neon_mull(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                      const llama2_matrix *w, int gs, int r0, int r1);
#if defined(LLAMA2_HAVE_NEON_SDOT_KERNELS)
void llama2_matmul_q4_neon_sdot(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q4_batch_neon_sdot(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                      const llama2_matrix *w, int r0, int r1);
void llama2_matmul_q8_batch_neon_sdot(float *out, size_t out_stride, const llama2_activation *a, int n_tok,
                                      const llama2_matrix *w, int gs, int r0, int r1);
#endif
#endif

#endif
