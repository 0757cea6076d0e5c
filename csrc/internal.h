/*
 * internal.h - structures and helpers shared by the library's C files.
 * Not installed; only llama2.h is public.
 */
#ifndef LLAMA2_INTERNAL_H
#define LLAMA2_INTERNAL_H

#include "llama2.h"

#include <stdarg.h>
#include <stdint.h>

/* ---- errors: every failure goes through here ---- */
int llama2_fail(llama2_error *err, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
void llama2_ok(llama2_error *err);

/* ---- weights ---- */

/* One weight matrix of `rows` x `cols` of one weight type. For Q8_0 the
 * matrix is flattened row after row and cut into groups of group_size
 * values; scale g covers flat elements [g*gs, (g+1)*gs). */
typedef struct {
    int rows, cols;
    int type;        /* LLAMA2_WEIGHTS_F32, _Q8_0, _BF16 or _Q4_0: which data below it holds (weight_types.c) */
    const float *f;  /* fp32 data (row-major), or NULL */
    const float *p;  /* fp32 data packed for SIMD kernels (kernels.h), or NULL */
    const int8_t *q; /* int8 data, or NULL */
    const float *s;  /* scales */
    const float *ps; /* scales regrouped for SIMD kernels (kernels.h), or NULL */
    const int8_t *pq; /* int8 values regrouped for SIMD kernels (kernels.h), or NULL */
    const uint8_t *pends; /* groups across rows: where each row's segments end (kernels.h), or NULL */
    const uint16_t *h;  /* bf16 data (row-major; the top half of each fp32), or NULL */
    const uint16_t *ph; /* bf16 data packed like p, or NULL */
    const uint8_t *q4;   /* Q4_0 blocks (18 bytes per 32 values, row after row; kernels_q4.c), or NULL */
    const uint8_t *pq4;  /* Q4_0 nibbles regrouped for SIMD kernels (kernels_q4.c), or NULL */
    const uint16_t *ps4; /* their fp16 scales, regrouped the same way, or NULL */
} llama2_matrix;

/* bf16 -> fp32 is exact: the 16 bits are the top half of the float */
static inline float llama2_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* An activation vector ready for a matmul: fp32 values and, for int8
 * weights, the same vector quantized in groups of group_size. */
typedef struct {
    const float *x;
    int8_t *q;
    float *s;
    int n;
} llama2_activation;

/* ---- owned memory (memory.c) ---- */

/* A zeroed buffer whose pages are committed only when first touched
 * (anonymous mapping); huge: 2 MB-aligned and advised for huge pages. */
void *llama2_lazy_alloc(size_t bytes, int huge);
void llama2_lazy_free(void *p, size_t bytes, int huge);
void llama2_lazy_populate(void *p, size_t bytes); /* commit pages now, contents untouched (memory.c) */

typedef struct {
    void *p;
    size_t bytes;
    int lazy, huge;
} llama2_buffer;

/* Buffers freed together (a model's repacked weights, a context's state). */
typedef struct {
    llama2_buffer *items;
    int n, cap;
} llama2_buffers;

/* Zeroed; buffers of 4 MB and more come from llama2_lazy_alloc (on huge
 * pages when huge_ok), so untouched parts cost no memory. NULL: no memory. */
void *llama2_buffers_alloc(llama2_buffers *b, size_t bytes, int huge_ok);
void llama2_buffers_free(llama2_buffers *b);

/* ---- the model: weights only, shared by every context ---- */

struct llama2_transformer {
    llama2_config config;
    int gs; /* group size for Q8_0 matrices, 0 for fp32 */
    int n_threads;          /* asked for; 0 = default */
    int threads_version;    /* bumped by set_threads: contexts restart their pools */
    const struct llama2_kernels_s *kernels;

    /* weights (pointers into the mapping or into owned buffers) */
    const float *rms_att, *rms_ffn, *rms_final;
    const float *token_embedding; /* fp32 rows (dequantized for v2) */
    llama2_matrix *wq, *wk, *wv, *wo, *w1, *w2, *w3; /* n_layers each */
    llama2_matrix wcls;

    /* storage */
    void *map;          /* memory-mapped file */
    int64_t map_size;
    llama2_buffers owned;
    llama2_matrix *matrices; /* backing array for wq..w3 */

    /* the context llama2_forward and llama2_session_new use, made on first use */
    llama2_context *ctx;
    const char *chat_template; /* a GGUF file's tokenizer.chat_template (owned), or NULL */
    const char *notice;        /* what a GGUF load converted (owned; llama2_transformer_notice), or NULL */
    const float *rope_div; /* per pair of a head (head_size / 2): its RoPE frequency divisor (owned), or NULL */
};

/* ---- a context: one sequence's KV cache and the buffers a pass works in ---- */

/* The activations a forward pass works in, llama2.c's RunState names; for a
 * batch, row b of each buffer belongs to token b. */
typedef struct {
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *att;
    int8_t *xq, *hq; /* x and hb quantized (int8 weights only) */
    float *xs, *hs;  /* their group scales */
} llama2_run_state;

/* positions per block of the key cache (layout in kernels.h) */
#define LLAMA2_KEY_BLOCK 8

struct llama2_context {
    llama2_transformer *t;
    int n_ctx;                /* positions 0..n_ctx-1 */
    struct llama2_pool *pool; /* started on the first forward pass */
    int pool_version;         /* t->threads_version the pool was started for */

    llama2_run_state token; /* a pass of one token */
    float *logits;
    float *key_cache;   /* per layer and kv head, positions in blocks (kernels.h) */
    float *value_cache; /* per layer, position after position, kv_dim each */
    float *rope_cs;     /* cos, sin of each position's rotation per pair of a head: n_ctx x head_size */
    int rope_ready;     /* positions of rope_cs filled so far */

    /* a batched pass of up to LLAMA2_MAX_BATCH prompt tokens (row b of each
     * buffer is token b's; att holds n_heads * n_ctx scores per token),
     * allocated on first use */
    int batch_ready;
    llama2_run_state batch;

    llama2_buffers owned;
};

#define LLAMA2_MAX_BATCH 64

/* gguf.c: GGUF files. llama2_gguf_load fills t's config and weights from
 * its mapping (t->map); the tokenizer image is a tokenizer.bin's bytes
 * (malloc'ed) made from the file's vocabulary. */
int llama2_is_gguf(const void *data, int64_t size);
int llama2_gguf_load(llama2_transformer *t, llama2_error *err);
int llama2_gguf_tokenizer_bin(const unsigned char *data, size_t size, unsigned char **bin, size_t *bin_size,
                              llama2_error *err);

/* rope.c: t->rope_div from t->config's rope scaling (checked); factors: a GGUF
 * file's rope_freqs (head_size / 2 divisors) or NULL. Nothing for NONE. */
int llama2_rope_setup(llama2_transformer *t, const float *factors, llama2_error *err);

/* files.c: opens path for reading if it is a regular file, without
 * blocking; *size gets its size. POSIX: *fd is the open descriptor, the
 * caller closes it. Windows: the path is only checked (*fd = -1), the caller
 * opens it its own way. */
int llama2_open_regular(const char *path, int *fd, int64_t *size, llama2_error *err);

/* memory.c: a buffer the model owns, zeroed, freed with t */
void *llama2_own(llama2_transformer *t, size_t bytes);
/* memory.c: t->matrices for n_layers layers, and wq..w3 pointing into it */
int llama2_own_matrices(llama2_transformer *t, llama2_error *err);

/* Q8_0 groups of an n-value activation (the last may be partial); 0 for fp32 */
static inline size_t llama2_groups(int n, int gs) { return gs > 0 ? (size_t)(n + gs - 1) / (size_t)gs : 0; }

/* context.c */
/* n_ctx rounded up to whole blocks of the key cache (kernels.h) */
static inline size_t llama2_key_positions(const llama2_context *cx) {
    return ((size_t)cx->n_ctx + LLAMA2_KEY_BLOCK - 1) / LLAMA2_KEY_BLOCK * LLAMA2_KEY_BLOCK;
}
struct llama2_pool *llama2_context_pool(llama2_context *cx); /* NULL: run on this thread */
int llama2_context_alloc_batch(llama2_context *cx, llama2_error *err);
/* the model's default context, made on first use */
int llama2_default_context(llama2_transformer *t, llama2_context **out, llama2_error *err);

/* ops.c and matmul.c: fp32 pieces (also used by the int8 path) and the matmul split */
void llama2_rmsnorm(float *o, const float *x, const float *w, int n, float eps);
void llama2_softmax(float *x, int n);
void llama2_swiglu(float *hb, const float *hb2, int n);
struct llama2_kernels_s;
struct llama2_pool;
void llama2_matvec(float *out, const llama2_activation *a, const llama2_matrix *w, int gs,
                   const struct llama2_kernels_s *k, struct llama2_pool *pool);
/* out[b] = W a[b] for b < n_batch; out[b] is out_base + b * out_stride. */
void llama2_matvec_batch(float *out_base, size_t out_stride, const llama2_activation *a, int n_batch,
                         const llama2_matrix *w, int gs, const struct llama2_kernels_s *k,
                         struct llama2_pool *pool);

/* quant.c and kernels_scalar.c: int8 pieces */
void llama2_quantize(int8_t *q, float *s, const float *x, int n, int gs);
void llama2_quantize_weights(int8_t *q, float *s, const float *x, int64_t n, int gs);
void llama2_matmul_q8_rows(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                           int gs, int r0, int r1);

/* sampler.c: advance the RNG as one sample would, without sampling */
void llama2_sampler_skip(llama2_sampler *s);
/* how many recent tokens its repetition penalty looks at */
int llama2_sampler_window(const llama2_sampler *s);


#endif
