/*
 * gguf.c - GGUF files (llama.cpp's format, versions 2 and 3) of the
 * `llama` architecture: the header, metadata and tensor table read with
 * every length and offset checked against the file (docs/FORMAT.md,
 * docs/SECURITY.md), the weights pointed into the mapping where the engine
 * runs their type as it is (F32, BF16, Q4_0) and converted exactly where it
 * does not (F16 widened to F32, Q8_0 blocks split into int8 values and fp32
 * scales), and the vocabulary turned into a
 * tokenizer.bin image for tokenizer.c.
 */
#include "kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* ---- the byte reader: every read checks the bytes left ---- */

typedef struct {
    const unsigned char *p, *end;
} reader;

static int take(reader *r, void *out, size_t n) {
    if ((size_t)(r->end - r->p) < n) return 0;
    if (out) memcpy(out, r->p, n);
    r->p += n;
    return 1;
}

/* a GGUF string: u64 length, then the bytes (not NUL-terminated) */
static int take_string(reader *r, const char **s, uint64_t *len) {
    uint64_t n;
    if (!take(r, &n, 8) || n > (uint64_t)(r->end - r->p)) return 0;
    *s = (const char *)r->p;
    *len = n;
    r->p += n;
    return 1;
}

enum { T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64, T_I64, T_F64, T_COUNT };
static const int scalar_bytes[T_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static int skip_value(reader *r, uint32_t type, int depth);

/* skips `count` elements of type elem */
static int skip_elements(reader *r, uint32_t elem, uint64_t count, int depth) {
    if (elem >= T_COUNT) return 0;
    if (elem != T_STRING && elem != T_ARRAY) {
        if (count > (uint64_t)(r->end - r->p) / (uint64_t)scalar_bytes[elem]) return 0;
        r->p += count * (uint64_t)scalar_bytes[elem];
        return 1;
    }
    if (count > (uint64_t)(r->end - r->p) / 8) return 0; /* every element takes 8 bytes at least */
    for (uint64_t i = 0; i < count; i++)
        if (!skip_value(r, elem, depth + 1)) return 0;
    return 1;
}

/* skips one value of type `type` (arrays nest at most 4 deep) */
static int skip_value(reader *r, uint32_t type, int depth) {
    if (type >= T_COUNT) return 0;
    if (type == T_STRING) {
        const char *s;
        uint64_t n;
        return take_string(r, &s, &n);
    }
    if (type != T_ARRAY) return take(r, NULL, (size_t)scalar_bytes[type]);
    uint32_t elem;
    uint64_t count;
    if (depth >= 4 || !take(r, &elem, 4) || !take(r, &count, 8)) return 0;
    return skip_elements(r, elem, count, depth);
}

/* a scalar of any numeric type as a double */
static int read_number(reader *r, uint32_t type, double *out) {
    unsigned char b[8];
    if (type >= T_COUNT || type == T_STRING || type == T_ARRAY || !take(r, b, (size_t)scalar_bytes[type])) return 0;
    switch (type) {
    case T_U8: *out = b[0]; break;
    case T_I8: *out = (int8_t)b[0]; break;
    case T_BOOL: *out = b[0] != 0; break;
    case T_U16: { uint16_t v; memcpy(&v, b, 2); *out = v; break; }
    case T_I16: { int16_t v; memcpy(&v, b, 2); *out = v; break; }
    case T_U32: { uint32_t v; memcpy(&v, b, 4); *out = v; break; }
    case T_I32: { int32_t v; memcpy(&v, b, 4); *out = v; break; }
    case T_F32: { float v; memcpy(&v, b, 4); *out = v; break; }
    case T_U64: { uint64_t v; memcpy(&v, b, 8); *out = (double)v; break; }
    case T_I64: { int64_t v; memcpy(&v, b, 8); *out = (double)v; break; }
    default: { double v; memcpy(&v, b, 8); *out = v; break; }
    }
    return 1;
}

static int key_is(const char *key, uint64_t len, const char *want) {
    return strlen(want) == len && memcmp(key, want, (size_t)len) == 0;
}

/* ---- ggml tensor types ---- */

typedef struct {
    const char *name;
    int block;      /* values per block */
    int bytes;      /* bytes per block */
} ggml_type_info;

#define GGML_F32 0
#define GGML_F16 1
#define GGML_Q4_0 2
#define GGML_Q8_0 8
#define GGML_BF16 30

static ggml_type_info type_info(uint32_t type) {
    switch (type) {
    case 0: return (ggml_type_info){"F32", 1, 4};
    case 1: return (ggml_type_info){"F16", 1, 2};
    case 2: return (ggml_type_info){"Q4_0", 32, 18};
    case 3: return (ggml_type_info){"Q4_1", 32, 20};
    case 6: return (ggml_type_info){"Q5_0", 32, 22};
    case 7: return (ggml_type_info){"Q5_1", 32, 24};
    case 8: return (ggml_type_info){"Q8_0", 32, 34};
    case 9: return (ggml_type_info){"Q8_1", 32, 36};
    case 10: return (ggml_type_info){"Q2_K", 256, 84};
    case 11: return (ggml_type_info){"Q3_K", 256, 110};
    case 12: return (ggml_type_info){"Q4_K", 256, 144};
    case 13: return (ggml_type_info){"Q5_K", 256, 176};
    case 14: return (ggml_type_info){"Q6_K", 256, 210};
    case 15: return (ggml_type_info){"Q8_K", 256, 292};
    case 30: return (ggml_type_info){"BF16", 1, 2};
    default: return (ggml_type_info){NULL, 0, 0};
    }
}

static int runs_type(uint32_t type) {
    return type == GGML_F32 || type == GGML_F16 || type == GGML_BF16 || type == GGML_Q8_0 || type == GGML_Q4_0;
}

/* ---- the parsed file ---- */

typedef struct {
    char name[128];
    int n_dims;
    int64_t ne[4];
    uint32_t type;
    const unsigned char *data;
} gguf_tensor;

typedef struct {
    uint32_t version;
    char arch[32];
    double hp[9]; /* hyperparameters by HP_* index, NAN when absent */
    const char *rope_scaling;
    uint64_t rope_scaling_len;
    const char *chat_template;
    uint64_t chat_template_len;
    const char *tok_model;
    uint64_t tok_model_len;
    const unsigned char *tokens, *scores, *token_types; /* array payloads (after type and count) */
    uint64_t n_tokens, n_scores, n_token_types;
    uint32_t scores_type, token_types_type;
    double bos, eos;
    double alignment; /* general.alignment; 32 when absent */
    gguf_tensor *tensors;
    int64_t n_tensors;
} gguf_file;

enum { HP_CTX, HP_DIM, HP_LAYERS, HP_FF, HP_HEADS, HP_KV_HEADS, HP_THETA, HP_EPS, HP_ROPE_DIM };
static const char *hp_keys[9] = {"context_length", "embedding_length", "block_count", "feed_forward_length",
                                 "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                                 "attention.layer_norm_rms_epsilon", "rope.dimension_count"};

static void gguf_free(gguf_file *g) { free(g->tensors); }

#define FAIL(...) llama2_fail(err, LLAMA2_ERR_FORMAT, __VA_ARGS__)

/* one metadata entry: the keys the engine uses are kept, the rest skipped */
static int read_kv(reader *r, gguf_file *g, llama2_error *err, uint64_t index) {
    const char *key;
    uint64_t klen;
    uint32_t type;
    if (!take_string(r, &key, &klen) || !take(r, &type, 4))
        return FAIL("GGUF metadata entry %llu is cut short", (unsigned long long)index);
    if (type >= T_COUNT)
        return FAIL("GGUF metadata entry %.*s has unknown value type %u", (int)(klen > 80 ? 80 : klen), key, type);
    const unsigned char *value_at = r->p;
    if (!skip_value(r, type, 0))
        return FAIL("GGUF metadata entry %.*s runs past the end of the file", (int)(klen > 80 ? 80 : klen), key);
    reader v = {value_at, r->p};
    if (key_is(key, klen, "general.alignment")) {
        if (!read_number(&v, type, &g->alignment)) return FAIL("GGUF general.alignment is not a number");
        return LLAMA2_OK;
    }
    if (key_is(key, klen, "general.architecture") && type == T_STRING) {
        const char *s = "";
        uint64_t n = 0;
        take_string(&v, &s, &n);
        snprintf(g->arch, sizeof(g->arch), "%.*s", (int)(n < 31 ? n : 31), s);
        return LLAMA2_OK;
    }
    if (klen > 6 && memcmp(key, "llama.", 6) == 0) {
        for (int i = 0; i < 9; i++)
            if (key_is(key + 6, klen - 6, hp_keys[i]) && !read_number(&v, type, &g->hp[i]))
                return FAIL("GGUF metadata %.*s is not a number", (int)klen, key);
        if (key_is(key + 6, klen - 6, "rope.scaling.type") && type == T_STRING)
            take_string(&v, &g->rope_scaling, &g->rope_scaling_len);
        return LLAMA2_OK;
    }
    if (key_is(key, klen, "tokenizer.chat_template") && type == T_STRING) {
        take_string(&v, &g->chat_template, &g->chat_template_len);
    } else if (key_is(key, klen, "tokenizer.ggml.model") && type == T_STRING) {
        take_string(&v, &g->tok_model, &g->tok_model_len);
    } else if (key_is(key, klen, "tokenizer.ggml.bos_token_id")) {
        read_number(&v, type, &g->bos);
    } else if (key_is(key, klen, "tokenizer.ggml.eos_token_id")) {
        read_number(&v, type, &g->eos);
    } else if (type == T_ARRAY && (key_is(key, klen, "tokenizer.ggml.tokens") || key_is(key, klen, "tokenizer.ggml.scores") ||
                                   key_is(key, klen, "tokenizer.ggml.token_type"))) {
        uint32_t elem = 0;
        uint64_t count = 0;
        take(&v, &elem, 4);
        take(&v, &count, 8);
        if (key_is(key, klen, "tokenizer.ggml.tokens")) {
            if (elem != T_STRING) return FAIL("GGUF tokenizer.ggml.tokens is not an array of strings");
            g->tokens = v.p, g->n_tokens = count;
        } else if (key_is(key, klen, "tokenizer.ggml.scores")) {
            if (elem != T_F32) return FAIL("GGUF tokenizer.ggml.scores is not an array of float32");
            g->scores = v.p, g->n_scores = count, g->scores_type = elem;
        } else {
            if (elem != T_I32 && elem != T_U32) return FAIL("GGUF tokenizer.ggml.token_type is not an array of int32");
            g->token_types = v.p, g->n_token_types = count, g->token_types_type = elem;
        }
    }
    return LLAMA2_OK;
}

static int is_gguf(const unsigned char *d, int64_t size) { return size >= 4 && memcmp(d, "GGUF", 4) == 0; }

int llama2_is_gguf(const void *data, int64_t size) { return is_gguf((const unsigned char *)data, size); }

/* The header, metadata and tensor table of a GGUF file in memory. */
static int gguf_parse(const unsigned char *d, int64_t size, gguf_file *g, llama2_error *err) {
    memset(g, 0, sizeof(*g));
    for (int i = 0; i < 9; i++) g->hp[i] = NAN;
    g->bos = g->eos = NAN;
    g->alignment = 32;
    reader r = {d, d + size};
    uint64_t n_tensors, n_kv;
    if (!take(&r, NULL, 4) || !take(&r, &g->version, 4) || !take(&r, &n_tensors, 8) || !take(&r, &n_kv, 8))
        return FAIL("GGUF header is cut short (%lld bytes)", (long long)size);
    if (g->version != 2 && g->version != 3)
        return FAIL("GGUF version %u is not supported (2 and 3 are)", g->version);
    if (n_tensors > (1u << 20) || n_kv > (1u << 20))
        return FAIL("GGUF header claims %llu tensors and %llu metadata entries: implausible",
                    (unsigned long long)n_tensors, (unsigned long long)n_kv);
    for (uint64_t i = 0; i < n_kv; i++) {
        int rc = read_kv(&r, g, err, i);
        if (rc) return rc;
    }
    g->tensors = (gguf_tensor *)calloc(n_tensors ? n_tensors : 1, sizeof(gguf_tensor));
    if (!g->tensors) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading the GGUF tensor table");
    g->n_tensors = (int64_t)n_tensors;
    uint64_t *offsets = (uint64_t *)calloc(n_tensors ? n_tensors : 1, 8);
    if (!offsets) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading the GGUF tensor table");
    int rc = LLAMA2_OK;
    for (uint64_t i = 0; i < n_tensors && !rc; i++) {
        gguf_tensor *t = &g->tensors[i];
        const char *name;
        uint64_t nlen;
        uint32_t n_dims;
        if (!take_string(&r, &name, &nlen) || !take(&r, &n_dims, 4)) { rc = FAIL("GGUF tensor %llu is cut short", (unsigned long long)i); break; }
        if (nlen >= sizeof(t->name)) { rc = FAIL("GGUF tensor %llu has a name of %llu bytes", (unsigned long long)i, (unsigned long long)nlen); break; }
        memcpy(t->name, name, (size_t)nlen);
        if (n_dims < 1 || n_dims > 4) { rc = FAIL("GGUF tensor %s has %u dimensions", t->name, n_dims); break; }
        t->n_dims = (int)n_dims;
        int64_t count = 1;
        for (uint32_t k = 0; k < 4; k++) t->ne[k] = 1;
        for (uint32_t k = 0; k < n_dims && !rc; k++) {
            uint64_t ne;
            if (!take(&r, &ne, 8)) rc = FAIL("GGUF tensor %s is cut short", t->name);
            else if (ne < 1 || ne > (1u << 30) || (uint64_t)count > (UINT64_C(1) << 40) / ne)
                rc = FAIL("GGUF tensor %s has an implausible dimension %llu", t->name, (unsigned long long)ne);
            else { t->ne[k] = (int64_t)ne; count *= (int64_t)ne; }
        }
        if (rc) break;
        if (!take(&r, &t->type, 4) || !take(&r, &offsets[i], 8)) { rc = FAIL("GGUF tensor %s is cut short", t->name); break; }
    }
    if (!rc) {
        /* the data section starts at the next multiple of the alignment (32 unless the file says) */
        uint64_t align = 32;
        if (!(g->alignment >= 8 && g->alignment <= 65536) || g->alignment != floor(g->alignment) ||
            (((uint64_t)g->alignment) & ((uint64_t)g->alignment - 1)))
            rc = FAIL("GGUF general.alignment %g is not a power of two in [8, 65536]", g->alignment);
        else
            align = (uint64_t)g->alignment;
        uint64_t header = (uint64_t)(r.p - d);
        uint64_t start = (header + align - 1) / align * align;
        for (uint64_t i = 0; i < n_tensors && !rc; i++) {
            gguf_tensor *t = &g->tensors[i];
            ggml_type_info ti = type_info(t->type);
            if (!ti.name) { t->data = NULL; continue; } /* unknown type: refused if the model needs it */
            if (t->ne[0] % ti.block) { rc = FAIL("GGUF tensor %s: rows of %lld values do not fill %s blocks of %d", t->name, (long long)t->ne[0], ti.name, ti.block); break; }
            uint64_t bytes = (uint64_t)(t->ne[0] / ti.block) * (uint64_t)ti.bytes * (uint64_t)(t->ne[1] * t->ne[2] * t->ne[3]);
            if (offsets[i] % align || offsets[i] > (uint64_t)size || start > (uint64_t)size - offsets[i] ||
                bytes > (uint64_t)size - start - offsets[i]) {
                rc = FAIL("GGUF tensor %s (%llu bytes at offset %llu) lies outside the file", t->name,
                          (unsigned long long)bytes, (unsigned long long)offsets[i]);
                break;
            }
            t->data = d + start + offsets[i];
        }
    }
    free(offsets);
    return rc;
}

static const gguf_tensor *find(const gguf_file *g, const char *name) {
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

/* ---- values ---- */


static uint16_t u16_at(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* n values of a tensor as fp32 (every type the engine reads), into out */
static void to_f32(const gguf_tensor *t, float *out, int64_t n) {
    const unsigned char *p = t->data;
    switch (t->type) {
    case GGML_F32: memcpy(out, p, (size_t)n * 4); break;
    case GGML_F16: for (int64_t i = 0; i < n; i++) out[i] = llama2_f16_to_f32(u16_at(p + 2 * i)); break;
    case GGML_BF16: for (int64_t i = 0; i < n; i++) out[i] = llama2_bf16_to_f32(u16_at(p + 2 * i)); break;
    case GGML_Q8_0:
        for (int64_t b = 0; b < n / 32; b++) {
            const unsigned char *blk = p + 34 * b;
            float d = llama2_f16_to_f32(u16_at(blk));
            for (int i = 0; i < 32; i++) out[32 * b + i] = (float)(int8_t)blk[2 + i] * d;
        }
        break;
    case GGML_Q4_0:
        for (int64_t b = 0; b < n / 32; b++) {
            const unsigned char *blk = p + 18 * b;
            float d = llama2_f16_to_f32(u16_at(blk));
            for (int i = 0; i < 16; i++) {
                out[32 * b + i] = (float)((blk[2 + i] & 0x0f) - 8) * d;
                out[32 * b + i + 16] = (float)((blk[2 + i] >> 4) - 8) * d;
            }
        }
        break;
    }
}

/* ---- the model ---- */

static int need(const gguf_file *g, const char *name, int64_t ne0, int64_t ne1, const gguf_tensor **out,
                llama2_error *err) {
    const gguf_tensor *t = find(g, name);
    if (!t) return FAIL("GGUF file has no tensor %s", name);
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return FAIL("GGUF tensor %s is %lld x %lld, expected %lld x %lld", name, (long long)t->ne[0],
                    (long long)t->ne[1], (long long)ne0, (long long)ne1);
    if (!runs_type(t->type)) {
        ggml_type_info ti = type_info(t->type);
        if (ti.name)
            return llama2_fail(err, LLAMA2_ERR_FORMAT,
                               "GGUF tensor %s is %s, which llama2c does not run: convert the file with "
                               "`llama2c export OUT.bin --version 1 --gguf IN.gguf` (dequantizes with the gguf package)",
                               name, ti.name);
        return FAIL("GGUF tensor %s has unknown ggml type %u", name, t->type);
    }
    *out = t;
    return LLAMA2_OK;
}

/* an fp32 vector (norm weights): a copy, whatever the stored type */
static int vector_into(const gguf_file *g, const char *name, int64_t n, float *out, llama2_error *err) {
    const gguf_tensor *t;
    int rc = need(g, name, n, 1, &t, err);
    if (rc) return rc;
    if (t->type == GGML_Q8_0 || t->type == GGML_Q4_0) return FAIL("GGUF tensor %s: a norm must not be quantized", name);
    to_f32(t, out, n);
    return LLAMA2_OK;
}

/* A weight matrix (rows = ne1 outputs of ne0 inputs): F32, BF16 and Q4_0
 * point into the file (tensor data is 32-byte aligned; Q4_0 blocks are
 * llama.cpp's, which the Q4_0 engine reads as they are, kernels_q4.c);
 * Q8_0 blocks are split into the engine's int8 values and fp32 scales
 * (group size 32); F16 is widened to fp32. All exact. */
static int matrix_from(llama2_transformer *t, const gguf_tensor *src, llama2_matrix *m, llama2_error *err) {
    memset(m, 0, sizeof(*m));
    m->rows = (int)src->ne[1];
    m->cols = (int)src->ne[0];
    int64_t n = src->ne[0] * src->ne[1];
    if (src->type == GGML_F32) {
        m->type = LLAMA2_WEIGHTS_F32;
        m->f = (const float *)src->data;
    } else if (src->type == GGML_BF16) {
        m->type = LLAMA2_WEIGHTS_BF16;
        m->h = (const uint16_t *)src->data;
    } else if (src->type == GGML_Q4_0) { /* rows are whole blocks: gguf_parse checked ne0 % 32 */
        m->type = LLAMA2_WEIGHTS_Q4_0;
        m->q4 = src->data;
    } else if (src->type == GGML_Q8_0) {
        int8_t *q = (int8_t *)llama2_own(t, (size_t)n);
        float *s = (float *)llama2_own(t, (size_t)(n / 32) * 4);
        if (!q || !s) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading %s", src->name);
        for (int64_t b = 0; b < n / 32; b++) {
            const unsigned char *blk = src->data + 34 * b;
            s[b] = llama2_f16_to_f32(u16_at(blk));
            memcpy(q + 32 * b, blk + 2, 32);
        }
        m->type = LLAMA2_WEIGHTS_Q8_0;
        m->q = q;
        m->s = s;
    } else {
        float *f = (float *)llama2_own(t, (size_t)n * 4);
        if (!f) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading %s", src->name);
        to_f32(src, f, n);
        m->type = LLAMA2_WEIGHTS_F32;
        m->f = f;
    }
    return LLAMA2_OK;
}

static int hp_int(const gguf_file *g, int i, int fallback, int *out, llama2_error *err) {
    double v = g->hp[i];
    if (isnan(v)) {
        if (fallback < 0) return FAIL("GGUF metadata llama.%s is missing", hp_keys[i]);
        v = fallback;
    }
    if (!(v >= 1 && v <= (1 << 24)) || v != floor(v)) return FAIL("GGUF metadata llama.%s = %g is out of range", hp_keys[i], v);
    *out = (int)v;
    return LLAMA2_OK;
}

int llama2_gguf_load(llama2_transformer *t, llama2_error *err) {
    gguf_file g;
    int rc = gguf_parse((const unsigned char *)t->map, t->map_size, &g, err);
    if (rc) { gguf_free(&g); return rc; }
    llama2_config *c = &t->config;
    if (strcmp(g.arch, "llama") != 0) {
        rc = FAIL("GGUF architecture \"%s\" is not supported (llama2c runs \"llama\")", g.arch[0] ? g.arch : "(none)");
        goto done;
    }
    if (g.rope_scaling && !(g.rope_scaling_len == 4 && memcmp(g.rope_scaling, "none", 4) == 0)) {
        rc = FAIL("GGUF rope scaling \"%.*s\" is not supported", (int)(g.rope_scaling_len > 20 ? 20 : g.rope_scaling_len),
                  g.rope_scaling);
        goto done;
    }
    if ((rc = hp_int(&g, HP_DIM, -1, &c->dim, err)) || (rc = hp_int(&g, HP_LAYERS, -1, &c->n_layers, err)) ||
        (rc = hp_int(&g, HP_FF, -1, &c->hidden_dim, err)) || (rc = hp_int(&g, HP_HEADS, -1, &c->n_heads, err)) ||
        (rc = hp_int(&g, HP_KV_HEADS, c->n_heads, &c->n_kv_heads, err)) ||
        (rc = hp_int(&g, HP_CTX, 2048, &c->seq_len, err)))
        goto done;
    if (c->n_layers > 1024 || c->n_heads > c->dim || c->dim % c->n_heads || c->n_heads % c->n_kv_heads ||
        (c->dim / c->n_heads) % 2) {
        rc = FAIL("GGUF hyperparameters do not fit together: dim %d, heads %d, kv heads %d, layers %d", c->dim,
                  c->n_heads, c->n_kv_heads, c->n_layers);
        goto done;
    }
    c->head_size = c->dim / c->n_heads;
    c->kv_dim = c->n_kv_heads * c->head_size;
    if (!isnan(g.hp[HP_ROPE_DIM]) && g.hp[HP_ROPE_DIM] != c->head_size) {
        rc = FAIL("GGUF rope.dimension_count %g differs from the head size %d (partial rotary is not supported)",
                  g.hp[HP_ROPE_DIM], c->head_size);
        goto done;
    }
    c->rope_theta = isnan(g.hp[HP_THETA]) ? 10000.0f : (float)g.hp[HP_THETA];
    c->norm_eps = isnan(g.hp[HP_EPS]) ? 1e-5f : (float)g.hp[HP_EPS];
    if (!(c->rope_theta > 0 && isfinite(c->rope_theta)) || !(c->norm_eps > 0 && c->norm_eps < 1)) {
        rc = FAIL("GGUF rope.freq_base %g or layer_norm_rms_epsilon %g is out of range", (double)c->rope_theta,
                  (double)c->norm_eps);
        goto done;
    }
    const gguf_tensor *emb = find(&g, "token_embd.weight");
    if (!emb) { rc = FAIL("GGUF file has no tensor token_embd.weight"); goto done; }
    if (emb->ne[1] > (1 << 22)) { rc = FAIL("GGUF vocabulary of %lld tokens is implausible", (long long)emb->ne[1]); goto done; }
    c->vocab_size = (int)emb->ne[1];
    if ((rc = need(&g, "token_embd.weight", c->dim, c->vocab_size, &emb, err))) goto done;
    const gguf_tensor *out = find(&g, "output.weight");
    c->shared_classifier = out == NULL;
    c->version = LLAMA2_VERSION_GGUF;

    const int L = c->n_layers, d = c->dim, h = c->hidden_dim, kv = c->kv_dim;
    float *norms = (float *)llama2_own(t, (size_t)(2 * L + 1) * (size_t)d * 4);
    float *e = (float *)llama2_own(t, (size_t)c->vocab_size * (size_t)d * 4);
    if (!norms || !e) { rc = llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory loading the GGUF model"); goto done; }
    if ((rc = llama2_own_matrices(t, err))) goto done;
    t->rms_att = norms;
    t->rms_ffn = norms + (size_t)L * d;
    t->rms_final = norms + (size_t)2 * L * d;
    to_f32(emb, e, (int64_t)c->vocab_size * d); /* looked up row by row */
    t->token_embedding = e;
    if ((rc = vector_into(&g, "output_norm.weight", d, norms + (size_t)2 * L * d, err))) goto done;
    static const char *names[7] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"};
    const int64_t shape[7][2] = {{d, d}, {d, kv}, {d, kv}, {d, d}, {d, h}, {h, d}, {d, h}};
    char name[64];
    for (int l = 0; l < L && !rc; l++) {
        snprintf(name, sizeof(name), "blk.%d.attn_norm.weight", l);
        if ((rc = vector_into(&g, name, d, norms + (size_t)l * d, err))) break;
        snprintf(name, sizeof(name), "blk.%d.ffn_norm.weight", l);
        if ((rc = vector_into(&g, name, d, norms + (size_t)(L + l) * d, err))) break;
        for (int k = 0; k < 7 && !rc; k++) {
            const gguf_tensor *src;
            snprintf(name, sizeof(name), "blk.%d.%s.weight", l, names[k]);
            if (!(rc = need(&g, name, shape[k][0], shape[k][1], &src, err)))
                rc = matrix_from(t, src, &t->matrices[k * L + l], err);
        }
    }
    if (rc) goto done;
    if (out) {
        if ((rc = need(&g, "output.weight", d, c->vocab_size, &out, err))) goto done;
        rc = matrix_from(t, out, &t->wcls, err);
    } else if (emb->type == GGML_F32 || emb->type == GGML_F16) {
        t->wcls = (llama2_matrix){.rows = c->vocab_size, .cols = d, .type = LLAMA2_WEIGHTS_F32, .f = e};
    } else {
        rc = matrix_from(t, emb, &t->wcls, err);
    }
    if (rc) goto done;
    /* Q8_0 or Q4_0 anywhere: activations are quantized in blocks of 32, as llama.cpp does */
    t->gs = 0;
    for (int i = 0; i <= 7 * L; i++) {
        const int type = (i < 7 * L ? t->matrices[i] : t->wcls).type;
        if (type == LLAMA2_WEIGHTS_Q8_0 || type == LLAMA2_WEIGHTS_Q4_0) t->gs = 32;
    }
    c->weights = t->wq[0].type;
    c->group_size = t->gs;
    if (g.chat_template && g.chat_template_len < (1u << 20)) {
        char *tmpl = (char *)llama2_own(t, (size_t)g.chat_template_len + 1);
        if (!tmpl) { rc = llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); goto done; }
        memcpy(tmpl, g.chat_template, (size_t)g.chat_template_len);
        t->chat_template = tmpl;
    }
done:
    gguf_free(&g);
    return rc;
}

/* ---- the vocabulary as a tokenizer.bin image ---- */

/* The `llama` (SentencePiece) vocabulary of a GGUF file as the bytes of a
 * tokenizer.bin: each piece with U+2581 turned into a space, BOS and EOS as
 * "\n<s>\n" and "\n</s>\n" (as llama2.c's exporter writes them). */
int llama2_gguf_tokenizer_bin(const unsigned char *data, size_t size, unsigned char **bin, size_t *bin_size,
                              llama2_error *err) {
    gguf_file g;
    int rc = gguf_parse(data, (int64_t)size, &g, err);
    if (rc) { gguf_free(&g); return rc; }
    if (!g.tokens || g.n_tokens < 3) { rc = FAIL("GGUF file has no vocabulary (tokenizer.ggml.tokens)"); goto done; }
    if (!(g.tok_model && g.tok_model_len == 5 && memcmp(g.tok_model, "llama", 5) == 0)) {
        rc = FAIL("GGUF tokenizer model \"%.*s\" is not SentencePiece (\"llama\"): give a tokenizer for it, "
                  "e.g. its tokenizer.json through Python", (int)(g.tok_model ? (g.tok_model_len > 20 ? 20 : g.tok_model_len) : 6),
                  g.tok_model ? g.tok_model : "(none)");
        goto done;
    }
    if (g.n_tokens > (1u << 22) || (g.scores && g.n_scores != g.n_tokens)) {
        rc = FAIL("GGUF vocabulary has %llu tokens and %llu scores", (unsigned long long)g.n_tokens,
                  (unsigned long long)g.n_scores);
        goto done;
    }
    int bos = isnan(g.bos) ? 1 : (int)g.bos, eos = isnan(g.eos) ? 2 : (int)g.eos;
    /* sizes first: a piece only shrinks (3-byte U+2581 -> 1 byte) or becomes "\n<s>\n" */
    reader r = {g.tokens, data + size};
    size_t total = 4;
    for (uint64_t i = 0; i < g.n_tokens; i++) {
        const char *s;
        uint64_t n;
        if (!take_string(&r, &s, &n)) { rc = FAIL("GGUF vocabulary is cut short"); goto done; }
        total += 8 + (n > 8 ? n : 8);
    }
    unsigned char *out = (unsigned char *)malloc(total);
    if (!out) { rc = llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); goto done; }
    r.p = g.tokens;
    size_t at = 4;
    uint32_t max_len = 1;
    for (uint64_t i = 0; i < g.n_tokens; i++) {
        const char *s = "";
        uint64_t n = 0;
        take_string(&r, &s, &n);
        float score = 0.0f;
        if (g.scores) memcpy(&score, g.scores + 4 * i, 4);
        unsigned char *piece = out + at + 8;
        int32_t len = 0;
        if ((int)i == bos || (int)i == eos) {
            const char *special = (int)i == bos ? "\n<s>\n" : "\n</s>\n";
            len = (int32_t)strlen(special);
            memcpy(piece, special, (size_t)len);
        } else {
            for (uint64_t k = 0; k < n; k++) {
                if (k + 2 < n && (unsigned char)s[k] == 0xE2 && (unsigned char)s[k + 1] == 0x96 &&
                    (unsigned char)s[k + 2] == 0x81) {
                    piece[len++] = ' ';
                    k += 2;
                } else {
                    piece[len++] = (unsigned char)s[k];
                }
            }
        }
        if ((uint32_t)len > max_len) max_len = (uint32_t)len;
        memcpy(out + at, &score, 4);
        memcpy(out + at + 4, &len, 4);
        at += 8 + (size_t)len;
    }
    memcpy(out, &max_len, 4);
    *bin = out;
    *bin_size = at;
done:
    gguf_free(&g);
    return rc;
}
