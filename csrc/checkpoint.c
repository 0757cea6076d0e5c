/*
 * checkpoint.c - opening model files: map the file, read and check the
 * header of any supported version, point the weight tensors into the
 * mapping, and (optionally) quantize fp32 weights to Q8_0 while loading.
 *
 * Nothing is touched before the header has been checked and the file size
 * matches what the header implies, so a malformed file is an error, never a
 * crash. All sizes are 64-bit.
 */
#include "kernels.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#include <windows.h>
#else
#include <sys/mman.h>
#include <unistd.h>
#endif

#define MODEL_MAGIC 0x616b3432u
#define HEADER_BYTES 256
#define LEGACY_HEADER_BYTES 28

/* Upper bounds that keep every size computation far from 64-bit overflow
 * (the largest product, n_layers * hidden_dim * dim * 4, stays below 2^52). */
#define MAX_DIM (1 << 16)
#define MAX_HIDDEN (1 << 20)
#define MAX_LAYERS 1024
#define MAX_VOCAB (1 << 22)
#define MAX_SEQ (1 << 22)
#define MAX_GROUP (1 << 16)

/* ---- mapping a file read-only ---- */

static int map_file(const char *path, void **data, int64_t *size, llama2_error *err) {
    int fd;
    int rc = llama2_open_regular(path, &fd, size, err);
    if (rc) return rc;
#if defined(_WIN32)
    if (*size == 0) { *data = NULL; return LLAMA2_OK; }
    HANDLE fh = CreateFileA(path, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING,
                            FILE_ATTRIBUTE_NORMAL, NULL);
    if (fh == INVALID_HANDLE_VALUE) return llama2_fail(err, LLAMA2_ERR_IO, "%s: cannot open", path);
    HANDLE mh = CreateFileMappingA(fh, NULL, PAGE_READONLY, 0, 0, NULL);
    CloseHandle(fh);
    if (!mh) return llama2_fail(err, LLAMA2_ERR_IO, "%s: cannot map", path);
    *data = MapViewOfFile(mh, FILE_MAP_READ, 0, 0, 0);
    CloseHandle(mh);
    if (!*data) return llama2_fail(err, LLAMA2_ERR_IO, "%s: cannot map", path);
    return LLAMA2_OK;
#else
    if (*size == 0) { close(fd); *data = NULL; return LLAMA2_OK; }
    void *p = mmap(NULL, (size_t)*size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return llama2_fail(err, LLAMA2_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
    *data = p;
    return LLAMA2_OK;
#endif
}

static void unmap_file(void *data, int64_t size) {
    if (!data) return;
#if defined(_WIN32)
    (void)size;
    UnmapViewOfFile(data);
#else
    munmap(data, (size_t)size);
#endif
}

/* ---- header ---- */

static int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static float read_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

static int check_positive(const char *name, int v, int max, llama2_error *err) {
    if (v <= 0) return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s must be positive (got %d)", name, v);
    if (v > max) return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s = %d is too large (limit %d)", name, v, max);
    return LLAMA2_OK;
}

static int check_config(llama2_config *c, llama2_error *err) {
    int rc;
    if ((rc = check_positive("dim", c->dim, MAX_DIM, err))) return rc;
    if ((rc = check_positive("hidden_dim", c->hidden_dim, MAX_HIDDEN, err))) return rc;
    if ((rc = check_positive("n_layers", c->n_layers, MAX_LAYERS, err))) return rc;
    if ((rc = check_positive("n_heads", c->n_heads, MAX_DIM, err))) return rc;
    if ((rc = check_positive("n_kv_heads", c->n_kv_heads, MAX_DIM, err))) return rc;
    if ((rc = check_positive("vocab_size", c->vocab_size, MAX_VOCAB, err))) return rc;
    if ((rc = check_positive("seq_len", c->seq_len, MAX_SEQ, err))) return rc;
    if (c->dim % c->n_heads != 0)
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "dim (%d) is not a multiple of n_heads (%d)", c->dim, c->n_heads);
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0)
        return llama2_fail(err, LLAMA2_ERR_FORMAT,
                           "n_heads (%d) is not a multiple of n_kv_heads (%d)", c->n_heads, c->n_kv_heads);
    c->head_size = c->dim / c->n_heads;
    if (c->head_size % 2 != 0)
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "head_size (%d = dim / n_heads) must be even for RoPE", c->head_size);
    c->kv_dim = c->head_size * c->n_kv_heads;
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "rope_theta must be finite and positive (got %g)", (double)c->rope_theta);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps))
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "norm_eps must be finite and positive (got %g)", (double)c->norm_eps);
    return LLAMA2_OK;
}

/* Reads the header into c; *header_bytes is where the weights start. */
static int parse_header(const unsigned char *p, int64_t size, llama2_config *c, int *gs,
                        int64_t *header_bytes, llama2_error *err) {
    memset(c, 0, sizeof(*c));
    c->rope_theta = 10000.0f;
    c->norm_eps = 1e-5f;
    *gs = 0;
    if (size < 4)
        return llama2_fail(err, LLAMA2_ERR_FORMAT, "file is too small to be a model (%lld bytes)", (long long)size);
    uint32_t magic;
    memcpy(&magic, p, 4);
    if (magic == MODEL_MAGIC) {
        if (size < HEADER_BYTES)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "truncated header: %lld bytes, a versioned model header has %d",
                               (long long)size, HEADER_BYTES);
        c->version = read_i32(p + 4);
        if (c->version < 1 || c->version > 5)
            return llama2_fail(err, LLAMA2_ERR_FORMAT,
                               "unknown model file version %d (this engine reads versions 0 to 5)", c->version);
        int *dims[7] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads,
                        &c->n_kv_heads, &c->vocab_size, &c->seq_len};
        for (int i = 0; i < 7; i++) *dims[i] = read_i32(p + 8 + 4 * i);
        unsigned shared = p[36];
        if (shared > 1)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "shared_classifier flag must be 0 or 1 (got %u)", shared);
        c->shared_classifier = (int)shared;
        if (c->version == 2) {
            *gs = read_i32(p + 37);
        } else if (c->version >= 3) { /* 3: fp32, 4: bf16, 5: Q4_0, all with rope_theta and norm_eps */
            c->rope_theta = read_f32(p + 40);
            c->norm_eps = read_f32(p + 44);
            /* rope scaling (zero padding in older files: none), checked by rope.c */
            c->rope_scaling = p[48];
            if (c->rope_scaling != LLAMA2_ROPE_NONE) {
                c->rope_factor = read_f32(p + 52);
                c->rope_low_freq_factor = read_f32(p + 56);
                c->rope_high_freq_factor = read_f32(p + 60);
                c->rope_original_ctx = read_i32(p + 64);
            }
            if (c->rope_scaling == LLAMA2_ROPE_FACTORS)
                return llama2_fail(err, LLAMA2_ERR_FORMAT,
                                   "rope scaling type 3 (per-frequency factors) exists only in GGUF files");
        }
        *header_bytes = HEADER_BYTES;
    } else {
        if (size < LEGACY_HEADER_BYTES)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "truncated header: %lld bytes, a version 0 header has %d",
                               (long long)size, LEGACY_HEADER_BYTES);
        c->version = 0;
        int *dims[7] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads,
                        &c->n_kv_heads, &c->vocab_size, &c->seq_len};
        for (int i = 0; i < 7; i++) *dims[i] = read_i32(p + 4 * i);
        /* a negative vocab_size marks an unshared classifier */
        c->shared_classifier = c->vocab_size > 0;
        if (c->vocab_size < 0 && c->vocab_size != INT32_MIN) c->vocab_size = -c->vocab_size;
        *header_bytes = LEGACY_HEADER_BYTES;
    }
    int rc = check_config(c, err);
    if (rc) {
        if (c->version == 0 && err) {
            /* say how the file was read when its "dims" are nonsense */
            size_t used = strlen(err->message);
            snprintf(err->message + used, sizeof(err->message) - used,
                     " (read as a version 0 file: it has no 'ak42' magic)");
        }
        return rc;
    }
    if (c->version == 2) {
        if (*gs <= 0 || *gs > MAX_GROUP)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "bad group_size %d in version 2 header", *gs);
        if (c->dim % *gs != 0)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "group_size %d does not divide dim %d", *gs, c->dim);
    }
    if (c->version == 5) { /* Q4_0: blocks of 32 along every row of dim values */
        if (c->dim % 32 != 0)
            return llama2_fail(err, LLAMA2_ERR_FORMAT, "version 5 (Q4_0) needs dim a multiple of 32 (got %d)", c->dim);
        *gs = 32; /* activations in Q8_0 blocks of 32 */
    }
    return LLAMA2_OK;
}

/* The weight type of each file version's matrices: the one place where a
 * version becomes a type (weight_types.c has what each type means). */
static const int version_weights[6] = {
    [0] = LLAMA2_WEIGHTS_F32, [1] = LLAMA2_WEIGHTS_F32, [2] = LLAMA2_WEIGHTS_Q8_0,
    [3] = LLAMA2_WEIGHTS_F32, [4] = LLAMA2_WEIGHTS_BF16, [5] = LLAMA2_WEIGHTS_Q4_0,
};

/* Bytes of one Q8_0 matrix of n values: n int8 then n/gs fp32 scales. */
static int64_t q8_bytes(int64_t n, int gs) { return n + 4 * (n / gs); }

/* Bytes of one Q4_0 matrix of n values (rows whole blocks): 18 per 32 values. */
static int64_t q4_bytes(int64_t n) { return n / 32 * 18; }

/* Version 5 stores w2 (rows of hidden_dim values) as Q4_0 when its rows are
 * whole blocks of 32, else as fp32. */
static int v5_w2_q4(const llama2_config *c) { return c->hidden_dim % 32 == 0; }

static int64_t expected_size(const llama2_config *c, int gs) {
    int64_t L = c->n_layers, d = c->dim, h = c->hidden_dim, kv = c->kv_dim, V = c->vocab_size;
    int64_t unshared = c->shared_classifier ? 0 : 1;
    if (c->version == 0) {
        int64_t floats = V * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d +
                         3 * L * h * d + d + (int64_t)c->seq_len * c->head_size + unshared * V * d;
        return LEGACY_HEADER_BYTES + 4 * floats;
    }
    if (c->version == 2) {
        int64_t bytes = 4 * (2 * L * d + d) + q8_bytes(V * d, gs);
        bytes += L * (2 * q8_bytes(d * d, gs) + 2 * q8_bytes(kv * d, gs) + 3 * q8_bytes(h * d, gs));
        bytes += unshared * q8_bytes(V * d, gs);
        return HEADER_BYTES + bytes;
    }
    int64_t norms = 2 * L * d + d, matrix = V * d + L * (2 * d * d + 2 * kv * d + 3 * h * d) + unshared * V * d;
    if (c->version == 4) return HEADER_BYTES + 4 * norms + 2 * matrix; /* bf16 matrices */
    if (c->version == 5) { /* Q4_0 matrices; w2 fp32 when hidden_dim % 32 != 0 */
        int64_t bytes = q4_bytes(V * d) * (1 + unshared) + L * (2 * q4_bytes(d * d) + 2 * q4_bytes(kv * d) +
                                                               2 * q4_bytes(h * d));
        bytes += L * (v5_w2_q4(c) ? q4_bytes(d * h) : 4 * d * h);
        return HEADER_BYTES + 4 * norms + bytes;
    }
    return HEADER_BYTES + 4 * (norms + matrix);
}

/* ---- pointing tensors into the file ---- */

typedef struct {
    const unsigned char *p;
} cursor;

static const float *take_f32(cursor *cur, int64_t n) {
    const float *f = (const float *)cur->p;
    cur->p += 4 * n;
    return f;
}

static void set_f32_matrices(llama2_matrix *m, int count, cursor *cur, int rows, int cols) {
    for (int i = 0; i < count; i++) {
        memset(&m[i], 0, sizeof(m[i]));
        m[i].rows = rows;
        m[i].cols = cols;
        m[i].type = LLAMA2_WEIGHTS_F32;
        m[i].f = take_f32(cur, (int64_t)rows * cols);
    }
}

/* bf16 matrices in place: 2-byte aligned in a version 4 file, since every
 * tensor before them has an even number of bytes. */
static void set_bf16_matrices(llama2_matrix *m, int count, cursor *cur, int rows, int cols) {
    for (int i = 0; i < count; i++) {
        memset(&m[i], 0, sizeof(m[i]));
        m[i].rows = rows;
        m[i].cols = cols;
        m[i].type = LLAMA2_WEIGHTS_BF16;
        m[i].h = (const uint16_t *)cur->p;
        cur->p += 2 * (int64_t)rows * cols;
    }
}

/* wq, wk, wv, wo, w1, w2, w3 of every layer, in the order of versions 1, 3 and 4. */
static void set_layer_matrices(llama2_transformer *t, cursor *cur,
                               void (*set)(llama2_matrix *, int, cursor *, int, int)) {
    const llama2_config *c = &t->config;
    int L = c->n_layers, d = c->dim, h = c->hidden_dim, kv = c->kv_dim;
    set(t->wq, L, cur, d, d);
    set(t->wk, L, cur, kv, d);
    set(t->wv, L, cur, kv, d);
    set(t->wo, L, cur, d, d);
    set(t->w1, L, cur, h, d);
    set(t->w2, L, cur, d, h);
    set(t->w3, L, cur, h, d);
}

/* Q8_0 matrix in place; scales that do not sit on a 4-byte boundary are copied. */
static int set_q8_matrices(llama2_transformer *t, llama2_matrix *m, int count, cursor *cur,
                           int rows, int cols, llama2_error *err) {
    int64_t n = (int64_t)rows * cols, ns = n / t->gs;
    for (int i = 0; i < count; i++) {
        memset(&m[i], 0, sizeof(m[i]));
        m[i].rows = rows;
        m[i].cols = cols;
        m[i].type = LLAMA2_WEIGHTS_Q8_0;
        m[i].q = (const int8_t *)cur->p;
        cur->p += n;
        if (((uintptr_t)cur->p & 3u) == 0) {
            m[i].s = (const float *)cur->p;
        } else {
            float *s = (float *)llama2_own(t, (size_t)ns * 4);
            if (!s) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory copying scales");
            memcpy(s, cur->p, (size_t)ns * 4);
            m[i].s = s;
        }
        cur->p += 4 * ns;
    }
    return LLAMA2_OK;
}

/* Q4_0 matrices in place (llama.cpp's blocks, row after row; kernels_q4.c):
 * 2-byte aligned in a version 5 file (every tensor before them has an even
 * number of bytes), and the kernels read the fp16 scales bytewise anyway. */
static void set_q4_matrices(llama2_matrix *m, int count, cursor *cur, int rows, int cols) {
    for (int i = 0; i < count; i++) {
        memset(&m[i], 0, sizeof(m[i]));
        m[i].rows = rows;
        m[i].cols = cols;
        m[i].type = LLAMA2_WEIGHTS_Q4_0;
        m[i].q4 = cur->p;
        cur->p += q4_bytes((int64_t)rows * cols);
    }
}

/* fp32 matrices that follow Q4_0 ones in a version 5 file (w2 when
 * hidden_dim % 32 != 0): in place when 4-byte aligned, else copied. */
static int set_f32_copied(llama2_transformer *t, llama2_matrix *m, int count, cursor *cur, int rows, int cols,
                          llama2_error *err) {
    const int64_t n = (int64_t)rows * cols;
    set_f32_matrices(m, count, cur, rows, cols);
    if (((uintptr_t)m[0].f & 3u) == 0) return LLAMA2_OK;
    for (int i = 0; i < count; i++) {
        float *f = (float *)llama2_own(t, (size_t)n * 4);
        if (!f) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory copying weights");
        memcpy(f, m[i].f, (size_t)n * 4);
        m[i].f = f;
    }
    return LLAMA2_OK;
}

/* A bf16 matrix's values as fp32, in a buffer the caller frees (NULL: no memory). */
static float *bf16_to_f32_copy(const llama2_matrix *m) {
    int64_t n = (int64_t)m->rows * m->cols;
    float *f = (float *)malloc((size_t)n * 4);
    if (f)
        for (int64_t i = 0; i < n; i++) f[i] = llama2_bf16_to_f32(m->h[i]);
    return f;
}

static int quantize_matrix(llama2_transformer *t, llama2_matrix *m, llama2_error *err) {
    int64_t n = (int64_t)m->rows * m->cols;
    int8_t *q = (int8_t *)llama2_own(t, (size_t)n);
    float *s = (float *)llama2_own(t, (size_t)(n / t->gs) * 4);
    const int bf16 = m->type == LLAMA2_WEIGHTS_BF16;
    float *tmp = bf16 ? bf16_to_f32_copy(m) : NULL;
    if (!q || !s || (bf16 && !tmp)) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory quantizing weights");
    llama2_quantize_weights(q, s, tmp ? tmp : m->f, n, t->gs);
    free(tmp);
    m->f = NULL;
    m->p = NULL;
    m->h = NULL;
    m->type = LLAMA2_WEIGHTS_Q8_0;
    m->q = q;
    m->s = s;
    return LLAMA2_OK;
}

/* The embedding is looked up row by row: keep a dequantized fp32 copy. */
static int dequantize_embedding(llama2_transformer *t, const llama2_matrix *emb, llama2_error *err) {
    int64_t n = (int64_t)emb->rows * emb->cols;
    float *e = (float *)llama2_own(t, (size_t)n * 4);
    if (!e) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory dequantizing the embedding");
    for (int64_t i = 0; i < n; i++) e[i] = emb->q[i] * emb->s[i / t->gs];
    t->token_embedding = e;
    return LLAMA2_OK;
}

static int map_weights(llama2_transformer *t, const unsigned char *body, llama2_error *err) {
    llama2_config *c = &t->config;
    int L = c->n_layers, d = c->dim, h = c->hidden_dim, kv = c->kv_dim, V = c->vocab_size;
    cursor cur = {body};
    int rc0 = llama2_own_matrices(t, err);
    if (rc0) return rc0;

    if (c->version == 0) {
        t->token_embedding = take_f32(&cur, (int64_t)V * d);
        t->rms_att = take_f32(&cur, (int64_t)L * d);
        set_f32_matrices(t->wq, L, &cur, d, d);
        set_f32_matrices(t->wk, L, &cur, kv, d);
        set_f32_matrices(t->wv, L, &cur, kv, d);
        set_f32_matrices(t->wo, L, &cur, d, d);
        t->rms_ffn = take_f32(&cur, (int64_t)L * d);
        set_f32_matrices(t->w1, L, &cur, h, d);
        set_f32_matrices(t->w2, L, &cur, d, h);
        set_f32_matrices(t->w3, L, &cur, h, d);
        t->rms_final = take_f32(&cur, d);
        take_f32(&cur, (int64_t)c->seq_len * c->head_size); /* freq_cis real + imag */
    } else {
        t->rms_att = take_f32(&cur, (int64_t)L * d);
        t->rms_ffn = take_f32(&cur, (int64_t)L * d);
        t->rms_final = take_f32(&cur, d);
    }

    if (c->version == 2) {
        llama2_matrix emb = {0};
        int rc = set_q8_matrices(t, &emb, 1, &cur, V, d, err);
        if (!rc) rc = set_q8_matrices(t, t->wq, L, &cur, d, d, err);
        if (!rc) rc = set_q8_matrices(t, t->wk, L, &cur, kv, d, err);
        if (!rc) rc = set_q8_matrices(t, t->wv, L, &cur, kv, d, err);
        if (!rc) rc = set_q8_matrices(t, t->wo, L, &cur, d, d, err);
        if (!rc) rc = set_q8_matrices(t, t->w1, L, &cur, h, d, err);
        if (!rc) rc = set_q8_matrices(t, t->w2, L, &cur, d, h, err);
        if (!rc) rc = set_q8_matrices(t, t->w3, L, &cur, h, d, err);
        if (rc) return rc;
        if (c->shared_classifier) {
            t->wcls = emb;
        } else if ((rc = set_q8_matrices(t, &t->wcls, 1, &cur, V, d, err))) {
            return rc;
        }
        return dequantize_embedding(t, &emb, err);
    }

    if (c->version == 5) {
        llama2_matrix emb;
        set_q4_matrices(&emb, 1, &cur, V, d);
        set_q4_matrices(t->wq, L, &cur, d, d);
        set_q4_matrices(t->wk, L, &cur, kv, d);
        set_q4_matrices(t->wv, L, &cur, kv, d);
        set_q4_matrices(t->wo, L, &cur, d, d);
        set_q4_matrices(t->w1, L, &cur, h, d);
        if (v5_w2_q4(c)) {
            set_q4_matrices(t->w2, L, &cur, d, h);
        } else {
            int rc = set_f32_copied(t, t->w2, L, &cur, d, h, err);
            if (rc) return rc;
        }
        set_q4_matrices(t->w3, L, &cur, h, d);
        if (c->shared_classifier)
            t->wcls = emb;
        else
            set_q4_matrices(&t->wcls, 1, &cur, V, d);
        /* the embedding is looked up row by row: dequantized, (nibble - 8) * d */
        float *e = (float *)llama2_own(t, (size_t)V * d * 4);
        if (!e) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory dequantizing the embedding");
        for (int64_t b = 0; b < (int64_t)V * d / 32; b++) {
            const unsigned char *blk = emb.q4 + 18 * b;
            uint16_t h16;
            memcpy(&h16, blk, 2);
            const float scale = llama2_f16_to_f32(h16);
            for (int j = 0; j < 16; j++) {
                e[32 * b + j] = (float)((blk[2 + j] & 15) - 8) * scale;
                e[32 * b + j + 16] = (float)((blk[2 + j] >> 4) - 8) * scale;
            }
        }
        t->token_embedding = e;
        return LLAMA2_OK;
    }

    if (c->version == 4) {
        llama2_matrix emb;
        set_bf16_matrices(&emb, 1, &cur, V, d);
        set_layer_matrices(t, &cur, set_bf16_matrices);
        if (c->shared_classifier)
            t->wcls = emb;
        else
            set_bf16_matrices(&t->wcls, 1, &cur, V, d);
        /* the embedding is looked up row by row: an fp32 copy */
        float *e = (float *)llama2_own(t, (size_t)V * d * 4);
        if (!e) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory converting the embedding");
        for (int64_t i = 0; i < (int64_t)V * d; i++) e[i] = llama2_bf16_to_f32(emb.h[i]);
        t->token_embedding = e;
    } else {
        if (c->version != 0) {
            t->token_embedding = take_f32(&cur, (int64_t)V * d);
            set_layer_matrices(t, &cur, set_f32_matrices);
        }
        if (c->shared_classifier) {
            t->wcls.rows = V;
            t->wcls.cols = d;
            t->wcls.type = LLAMA2_WEIGHTS_F32;
            t->wcls.f = t->token_embedding;
        } else {
            set_f32_matrices(&t->wcls, 1, &cur, V, d);
        }
    }

    return LLAMA2_OK;
}

/* Exactly what the exporter's version 2 file of these weights runs: group
 * size 64 halved until it divides dim, every matrix quantized, the embedding
 * looked up dequantized. */
static int quantize_all(llama2_transformer *t, llama2_error *err) {
    llama2_config *c = &t->config;
    int L = c->n_layers, d = c->dim, V = c->vocab_size;
    if (!t->gs) { /* (a GGUF file with Q8_0 matrices has its group size, 32, already) */
        t->gs = 64;
        while (d % t->gs != 0) t->gs /= 2;
    }
    for (int i = 0; i < 7 * L; i++) {
        if (t->matrices[i].type == LLAMA2_WEIGHTS_Q8_0 || t->matrices[i].type == LLAMA2_WEIGHTS_Q4_0) continue;
        int rc = quantize_matrix(t, &t->matrices[i], err);
        if (rc) return rc;
    }
    int rc;
    if (t->wcls.type == LLAMA2_WEIGHTS_Q8_0 || t->wcls.type == LLAMA2_WEIGHTS_Q4_0) {
        /* already quantized (GGUF): nothing to do */
    } else if (c->shared_classifier) {
        llama2_matrix emb = {.rows = V, .cols = d, .type = LLAMA2_WEIGHTS_F32, .f = t->token_embedding};
        if ((rc = quantize_matrix(t, &emb, err))) return rc;
        t->wcls = emb;
        if ((rc = dequantize_embedding(t, &emb, err))) return rc;
    } else {
        llama2_matrix emb = {.rows = V, .cols = d, .type = LLAMA2_WEIGHTS_F32, .f = t->token_embedding};
        if ((rc = quantize_matrix(t, &emb, err))) return rc;
        if ((rc = dequantize_embedding(t, &emb, err))) return rc;
        if ((rc = quantize_matrix(t, &t->wcls, err))) return rc;
    }
    c->weights = LLAMA2_WEIGHTS_Q8_0;
    c->group_size = t->gs;
    return LLAMA2_OK;
}

/* ---- refusing NaN and infinite weights ---- */

static int nonfinite_error(llama2_error *err, const char *what, int layer, int64_t at) {
    if (layer >= 0)
        return llama2_fail(err, LLAMA2_ERR_FORMAT,
                           "%s of layer %d holds a NaN or infinite value (element %lld): the file is corrupt",
                           what, layer, (long long)at);
    return llama2_fail(err, LLAMA2_ERR_FORMAT, "%s holds a NaN or infinite value (element %lld): the file is corrupt",
                       what, (long long)at);
}

/* A matrix's weights (fp32, bf16) or, for Q8_0, its scales. */
static int64_t matrix_nonfinite(const llama2_matrix *m, int gs) {
    return llama2_weight_types[m->type].first_nonfinite(m, gs);
}

/* Every norm weight, embedding, matrix and scale must be finite: a NaN
 * would silently turn every output into NaN. */
static int check_finite(const llama2_transformer *t, llama2_error *err) {
    const llama2_config *c = &t->config;
    static const char *names[7] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
    int64_t L = c->n_layers, d = c->dim, at;
    if ((at = llama2_first_nonfinite(t->rms_att, L * d, 0)) >= 0) return nonfinite_error(err, "rms_att_weight", (int)(at / d), at % d);
    if ((at = llama2_first_nonfinite(t->rms_ffn, L * d, 0)) >= 0) return nonfinite_error(err, "rms_ffn_weight", (int)(at / d), at % d);
    if ((at = llama2_first_nonfinite(t->rms_final, d, 0)) >= 0) return nonfinite_error(err, "rms_final_weight", -1, at);
    if ((at = llama2_first_nonfinite(t->token_embedding, (int64_t)c->vocab_size * d, 0)) >= 0)
        return nonfinite_error(err, "the token embedding", -1, at);
    for (int i = 0; i < 7 * c->n_layers; i++)
        if ((at = matrix_nonfinite(&t->matrices[i], t->gs)) >= 0)
            return nonfinite_error(err, names[i / c->n_layers], i % c->n_layers, at);
    if (t->wcls.f != t->token_embedding && (at = matrix_nonfinite(&t->wcls, t->gs)) >= 0)
        return nonfinite_error(err, "the classifier", -1, at);
    return LLAMA2_OK;
}

/* Picks the kernels for this CPU and repacks weights if they want it. */
static int select_kernels(llama2_transformer *t, llama2_error *err) {
    const llama2_kernels *k = llama2_kernels_select();
    t->kernels = k;
    if (!k->packs) return LLAMA2_OK;
    for (int i = 0; i <= 7 * t->config.n_layers; i++) {
        llama2_matrix *m = i < 7 * t->config.n_layers ? &t->matrices[i] : &t->wcls;
        int rc = llama2_weight_types[m->type].pack(t, m, t->gs, err);
        if (rc) return rc;
    }
    return LLAMA2_OK;
}

static int64_t count_params(const llama2_config *c) {
    int64_t L = c->n_layers, d = c->dim, h = c->hidden_dim, kv = c->kv_dim, V = c->vocab_size;
    int64_t n = V * d + 2 * L * d + d + L * (2 * d * d + 2 * kv * d + 3 * h * d);
    if (!c->shared_classifier) n += V * d;
    return n;
}

int llama2_transformer_open(llama2_transformer **out, const char *path, unsigned flags,
                            llama2_error *err) {
    llama2_ok(err);
    if (!out || !path) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    *out = NULL;
    llama2_transformer *t = (llama2_transformer *)calloc(1, sizeof(*t));
    if (!t) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    void *data = NULL;
    int64_t size = 0;
    int rc = map_file(path, &data, &size, err);
    if (rc) { free(t); return rc; }
    t->map = data;
    t->map_size = size;

    int gs = 0;
    int64_t header_bytes = 0;
    const int gguf = llama2_is_gguf(data, size);
    if (gguf) {
        rc = llama2_gguf_load(t, err);
        if (!rc && t->config.seq_len > MAX_SEQ) t->config.seq_len = MAX_SEQ; /* positions beyond are never reached */
        if (!rc) rc = check_config(&t->config, err);
        if (!rc) {
            t->config.file_size = size;
            t->config.n_params = count_params(&t->config);
        }
    } else {
        rc = parse_header((const unsigned char *)data, size, &t->config, &gs, &header_bytes, err);
    }
    if (!rc && !gguf) {
        int64_t want = expected_size(&t->config, gs);
        if (size < want)
            rc = llama2_fail(err, LLAMA2_ERR_FORMAT,
                             "truncated model file: %lld bytes, but its header (version %d, dim %d, hidden_dim %d, "
                             "n_layers %d, vocab %d) needs %lld",
                             (long long)size, t->config.version, t->config.dim, t->config.hidden_dim,
                             t->config.n_layers, t->config.vocab_size, (long long)want);
        else if (size > want)
            rc = llama2_fail(err, LLAMA2_ERR_FORMAT,
                             "model file has %lld bytes but its header (version %d) accounts for %lld: "
                             "wrong dimensions or trailing data",
                             (long long)size, t->config.version, (long long)want);
    }
    if (!rc && !gguf) {
        t->gs = gs;
        t->config.group_size = gs;
        t->config.weights = version_weights[t->config.version];
        t->config.file_size = size;
        t->config.n_params = count_params(&t->config);
        rc = map_weights(t, (const unsigned char *)data + header_bytes, err);
        if (!rc) rc = llama2_rope_setup(t, NULL, err);
    }
    if (!rc) rc = check_finite(t, err);
    /* Q8_0 and Q4_0 models are quantized already */
    if (!rc && (flags & LLAMA2_OPEN_QUANTIZE) && t->config.weights != LLAMA2_WEIGHTS_Q8_0 &&
        t->config.weights != LLAMA2_WEIGHTS_Q4_0)
        rc = quantize_all(t, err);
    if (!rc) rc = select_kernels(t, err);
    if (rc) {
        llama2_transformer_free(t);
        return rc;
    }
    *out = t;
    return LLAMA2_OK;
}

void llama2_transformer_free(llama2_transformer *t) {
    if (!t) return;
    llama2_context_free(t->ctx);
    unmap_file(t->map, t->map_size);
    llama2_buffers_free(&t->owned);
    free(t);
}

const llama2_config *llama2_transformer_config(const llama2_transformer *t) {
    return t ? &t->config : NULL;
}

const char *llama2_transformer_chat_template(const llama2_transformer *t) {
    return t ? t->chat_template : NULL;
}

void llama2_transformer_set_threads(llama2_transformer *t, int n) {
    if (!t) return;
    t->n_threads = n > 256 ? 256 : n > 0 ? n : 0; /* capped as LLAMA2_THREADS is */
    t->threads_version++; /* contexts restart their pools with the new count */
}
