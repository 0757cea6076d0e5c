/*
 * gguf.c - GGUF files (llama.cpp's format, versions 2 and 3) of the
 * `llama` architecture: the header, metadata and tensor table read with
 * every length and offset checked against the file (docs/FORMAT.md,
 * docs/SECURITY.md), the weights pointed into the mapping where the engine
 * runs their type as it is (F32, BF16, Q4_0) and converted exactly where it
 * does not (F16 widened to F32, Q8_0 blocks split into int8 values and fp32
 * scales), the legacy and K-quant types (Q4_1 ... Q6_K, IQ4_NL/XS, TQ1_0/2_0)
 * dequantized at load to bf16 matrices (a notice says so), and the
 * vocabulary turned into a tokenizer.bin image for tokenizer.c.
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

/* One block of a type the engine dequantizes at load: its `block` values as
 * fp32 into y. Written from the block layouts (ggml's ggml-common.h, stated
 * in docs/FORMAT.md); fp32 arithmetic in ggml's order, so each value is
 * exactly the one llama.cpp's dequantizer gives. */
typedef void (*block_to_f32)(const unsigned char *b, float *y);

typedef struct {
    const char *name;
    int block;      /* values per block */
    int bytes;      /* bytes per block */
    block_to_f32 dequant; /* a type dequantized at load, or NULL (run as stored, or refused) */
} ggml_type_info;

#define GGML_F32 0
#define GGML_F16 1
#define GGML_Q4_0 2
#define GGML_Q8_0 8
#define GGML_BF16 30
#define GGML_TYPES 64 /* type numbers below this are counted in a load's notice */

static float half_at(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return llama2_f16_to_f32(v);
}

/* Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles (low nibbles values
 * 0-15, high ones 16-31); x = q d + m */
static void q4_1_block(const unsigned char *b, float *y) {
    const float d = half_at(b), m = half_at(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(b[4 + j] & 0x0f) * d + m;
        y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
    }
}

/* Q5_0 (22 bytes): fp16 d, a u32 of fifth bits (bit j for value j), 16 bytes
 * of nibbles as Q4_1's; x = (q - 16) d */
static void q5_0_block(const unsigned char *b, float *y) {
    const float d = half_at(b);
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    for (int j = 0; j < 16; j++) {
        const int lo = (b[6 + j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        const int hi = (b[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = (float)(lo - 16) * d;
        y[j + 16] = (float)(hi - 16) * d;
    }
}

/* Q5_1 (24 bytes): fp16 d, fp16 m, then Q5_0's fifth bits and nibbles; x = q d + m */
static void q5_1_block(const unsigned char *b, float *y) {
    const float d = half_at(b), m = half_at(b + 2);
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    for (int j = 0; j < 16; j++) {
        const int lo = (b[8 + j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        const int hi = (b[8 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = (float)lo * d + m;
        y[j + 16] = (float)hi * d + m;
    }
}

/* Q2_K (84 bytes, 256 values): 16 bytes of 4-bit scale / 4-bit min per
 * 16 values, 64 bytes of 2-bit values, fp16 d, fp16 dmin. Each half of 128
 * values reads 32 bytes four times (bit pairs 0-1, 2-3, 4-5, 6-7), 16 bytes
 * per sub-block; x = d sc q - dmin mn */
static void q2_k_block(const unsigned char *b, float *y) {
    const unsigned char *sc = b, *q = b + 16;
    const float d = half_at(b + 80), dmin = half_at(b + 82);
    int is = 0;
    for (int n = 0; n < 2; n++, q += 32)
        for (int shift = 0; shift < 8; shift += 2)
            for (int h = 0; h < 2; h++, is++) {
                const float dl = d * (float)(sc[is] & 0x0f), ml = dmin * (float)(sc[is] >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[16 * h + l] >> shift) & 3) - ml;
            }
}

/* Q3_K (110 bytes): 32 bytes of high bits (bit k of byte l for the k-th pass),
 * 64 bytes of 2-bit values (Q2_K's order), 12 bytes of 16 6-bit scales (low
 * nibbles in bytes 0-7, then their high nibbles; top two bits in bytes 8-11),
 * fp16 d; x = d (sc - 32) (q - (high bit ? 0 : 4)) */
static void q3_k_block(const unsigned char *b, float *y) {
    const unsigned char *hm = b, *q = b + 32, *s = b + 96;
    const float d = half_at(b + 108);
    int is = 0;
    unsigned m = 1;
    for (int n = 0; n < 2; n++, q += 32)
        for (int shift = 0; shift < 8; shift += 2, m <<= 1)
            for (int h = 0; h < 2; h++, is++) {
                const int lo = is < 8 ? s[is] & 0x0f : s[is - 8] >> 4;
                const float dl = d * (float)((lo | ((s[8 + is % 4] >> (2 * (is / 4))) & 3) << 4) - 32);
                for (int l = 0; l < 16; l++) {
                    const int k = 16 * h + l;
                    *y++ = dl * (float)(((q[k] >> shift) & 3) - ((hm[k] & m) ? 0 : 4));
                }
            }
}

/* the 6-bit scale and min of sub-block j (0-7) from a Q4_K / Q5_K block's 12 scale bytes */
static void scale_min_k4(int j, const unsigned char *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4;
        *mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* sub-blocks j and j + 1 of a Q4_K / Q5_K block b (scales at b + 4): each
 * one's multiplier d * sc and offset dmin * mn */
static void pair_scales_k4(int j, const unsigned char *b, float d, float dmin, float *d1, float *m1, float *d2,
                           float *m2) {
    int sc, mn;
    scale_min_k4(j, b + 4, &sc, &mn);
    *d1 = d * (float)sc, *m1 = dmin * (float)mn;
    scale_min_k4(j + 1, b + 4, &sc, &mn);
    *d2 = d * (float)sc, *m2 = dmin * (float)mn;
}

/* Q4_K (144 bytes): fp16 d, fp16 dmin, 12 scale bytes, 128 bytes of nibbles;
 * each 64 values are 32 bytes' low nibbles then their high ones, sub-blocks
 * of 32; x = d sc q - dmin mn */
static void q4_k_block(const unsigned char *b, float *y) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const unsigned char *q = b + 16;
    for (int j = 0; j < 8; j += 2, q += 32) {
        float d1, m1, d2, m2;
        pair_scales_k4(j, b, d, dmin, &d1, &m1, &d2, &m2);
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0x0f) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
    }
}

/* Q5_K (176 bytes): Q4_K's d, dmin and scales, 32 bytes of fifth bits (bit j
 * of byte l for sub-block j), then Q4_K's 128 bytes of nibbles */
static void q5_k_block(const unsigned char *b, float *y) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const unsigned char *qh = b + 16, *q = b + 48;
    for (int j = 0; j < 8; j += 2, q += 32) {
        float d1, m1, d2, m2;
        pair_scales_k4(j, b, d, dmin, &d1, &m1, &d2, &m2);
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)((q[l] & 0x0f) + ((qh[l] >> j) & 1) * 16) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)((q[l] >> 4) + ((qh[l] >> (j + 1)) & 1) * 16) - m2;
    }
}

/* Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16
 * int8 scales (one per 16 values), fp16 d. Per half of 128 values: 64 low
 * bytes, 32 high bytes, 8 scales; x = d sc (q - 32) */
static void q6_k_block(const unsigned char *b, float *y) {
    const float d = half_at(b + 208);
    const unsigned char *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    for (int n = 0; n < 2; n++, y += 128, ql += 64, qh += 32, sc += 8)
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32;
            const int q2 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32;
            const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
            const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
}

/* IQ4_NL / IQ4_XS: 4-bit indices into this fixed table */
static const int8_t iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* IQ4_NL (18 bytes): Q4_0's layout, the nibble an index; x = d value */
static void iq4_nl_block(const unsigned char *b, float *y) {
    const float d = half_at(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)iq4_values[b[2 + j] & 0x0f];
        y[j + 16] = d * (float)iq4_values[b[2 + j] >> 4];
    }
}

/* IQ4_XS (136 bytes): fp16 d, u16 of scale high bits (2 per sub-block of 32),
 * 4 bytes of scale low nibbles, then per sub-block 16 bytes as IQ4_NL's;
 * x = d (sc - 32) value */
static void iq4_xs_block(const unsigned char *b, float *y) {
    const float d = half_at(b);
    uint16_t sh;
    memcpy(&sh, b + 2, 2);
    const unsigned char *q = b + 8;
    for (int ib = 0; ib < 8; ib++, y += 32, q += 16) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0f) | ((sh >> (2 * ib)) & 3) << 4;
        const float dl = d * (float)(ls - 32);
        for (int j = 0; j < 16; j++) {
            y[j] = dl * (float)iq4_values[q[j] & 0x0f];
            y[j + 16] = dl * (float)iq4_values[q[j] >> 4];
        }
    }
}

/* one ternary digit of TQ1_0: byte q holds 5 (or 4) digits as a fraction
 * of 243; digit n is the integer part of 3 (q 3^n mod 256) / 256 */
static float tq1_digit(unsigned q, int n, float d) {
    static const unsigned pow3[5] = {1, 3, 9, 27, 81};
    const unsigned v = (q * pow3[n]) & 0xff;
    return (float)((int)((v * 3) >> 8) - 1) * d;
}

/* TQ1_0 (54 bytes): 48 bytes of 5 ternary digits (32 bytes x 5 digits, then
 * 16 x 5), 4 bytes of 4 digits, fp16 d; x = (t - 1) d */
static void tq1_0_block(const unsigned char *b, float *y) {
    const float d = half_at(b + 52);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++) *y++ = tq1_digit(b[m], n, d);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++) *y++ = tq1_digit(b[32 + m], n, d);
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) *y++ = tq1_digit(b[48 + m], n, d);
}

/* TQ2_0 (66 bytes): 64 bytes of 2-bit values (each 32 bytes four times, bit
 * pairs 0-1 first), fp16 d; x = (q - 1) d */
static void tq2_0_block(const unsigned char *b, float *y) {
    const float d = half_at(b + 64);
    for (int j = 0; j < 64; j += 32)
        for (int shift = 0; shift < 8; shift += 2)
            for (int m = 0; m < 32; m++) *y++ = (float)((int)((b[j + m] >> shift) & 3) - 1) * d;
}

static ggml_type_info type_info(uint32_t type) {
    switch (type) {
    case 0: return (ggml_type_info){"F32", 1, 4, NULL};
    case 1: return (ggml_type_info){"F16", 1, 2, NULL};
    case 2: return (ggml_type_info){"Q4_0", 32, 18, NULL};
    case 3: return (ggml_type_info){"Q4_1", 32, 20, q4_1_block};
    case 6: return (ggml_type_info){"Q5_0", 32, 22, q5_0_block};
    case 7: return (ggml_type_info){"Q5_1", 32, 24, q5_1_block};
    case 8: return (ggml_type_info){"Q8_0", 32, 34, NULL};
    case 9: return (ggml_type_info){"Q8_1", 32, 36, NULL};
    case 10: return (ggml_type_info){"Q2_K", 256, 84, q2_k_block};
    case 11: return (ggml_type_info){"Q3_K", 256, 110, q3_k_block};
    case 12: return (ggml_type_info){"Q4_K", 256, 144, q4_k_block};
    case 13: return (ggml_type_info){"Q5_K", 256, 176, q5_k_block};
    case 14: return (ggml_type_info){"Q6_K", 256, 210, q6_k_block};
    case 15: return (ggml_type_info){"Q8_K", 256, 292, NULL};
    case 16: return (ggml_type_info){"IQ2_XXS", 256, 66, NULL};
    case 17: return (ggml_type_info){"IQ2_XS", 256, 74, NULL};
    case 18: return (ggml_type_info){"IQ3_XXS", 256, 98, NULL};
    case 19: return (ggml_type_info){"IQ1_S", 256, 50, NULL};
    case 20: return (ggml_type_info){"IQ4_NL", 32, 18, iq4_nl_block};
    case 21: return (ggml_type_info){"IQ3_S", 256, 110, NULL};
    case 22: return (ggml_type_info){"IQ2_S", 256, 82, NULL};
    case 23: return (ggml_type_info){"IQ4_XS", 256, 136, iq4_xs_block};
    case 29: return (ggml_type_info){"IQ1_M", 256, 56, NULL};
    case 30: return (ggml_type_info){"BF16", 1, 2, NULL};
    case 34: return (ggml_type_info){"TQ1_0", 256, 54, tq1_0_block};
    case 35: return (ggml_type_info){"TQ2_0", 256, 66, tq2_0_block};
    default: return (ggml_type_info){NULL, 0, 0, NULL};
    }
}

/* run as stored (or widened exactly, F16) */
static int native_type(uint32_t type) {
    return type == GGML_F32 || type == GGML_F16 || type == GGML_BF16 || type == GGML_Q8_0 || type == GGML_Q4_0;
}

/* run at all: natively, or dequantized at load */
static int runs_type(uint32_t type) { return native_type(type) || type_info(type).dequant != NULL; }

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
    double rope_factor; /* llama.rope.scaling.factor, NAN when absent */
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
        if (key_is(key + 6, klen - 6, "rope.scaling.factor") && !read_number(&v, type, &g->rope_factor))
            return FAIL("GGUF metadata %.*s is not a number", (int)klen, key);
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
    g->rope_factor = NAN;
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

/* n values of a tensor as fp32 (every type the engine reads), into out;
 * n is whole blocks (a row is, gguf_parse checked) */
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
    default: { /* a type dequantized at load (need() let only those through) */
        const ggml_type_info ti = type_info(t->type);
        for (int64_t b = 0; b < n / ti.block; b++) ti.dequant(p + (size_t)b * (size_t)ti.bytes, out + b * ti.block);
        break;
    }
    }
}

/* fp32 -> bf16, rounded to nearest even; NaN stays NaN (quiet), so the
 * non-finite check at load refuses it */
static uint16_t f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
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
    if (type_info(t->type).block > 1) return FAIL("GGUF tensor %s: a norm must not be quantized", name);
    to_f32(t, out, n);
    return LLAMA2_OK;
}

/* A weight matrix (rows = ne1 outputs of ne0 inputs): F32, BF16 and Q4_0
 * point into the file (tensor data is 32-byte aligned; Q4_0 blocks are
 * llama.cpp's, which the Q4_0 engine reads as they are, kernels_q4.c);
 * Q8_0 blocks are split into the engine's int8 values and fp32 scales
 * (group size 32); F16 is widened to fp32. All exact. Every other type
 * (Q4_1, Q5_0, Q5_1, Q2_K-Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0) is
 * dequantized block by block and rounded to bf16 (nearest even: 2^-9
 * relative, far below the quantization's own error; half fp32's memory and
 * the bf16 kernels), counted in converted[type] for the load's notice. */
static int matrix_from(llama2_transformer *t, const gguf_tensor *src, llama2_matrix *m, int *converted,
                       llama2_error *err) {
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
    } else if (!native_type(src->type)) {
        const ggml_type_info ti = type_info(src->type);
        uint16_t *h = (uint16_t *)llama2_own(t, (size_t)n * 2);
        if (!h) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading %s", src->name);
        float y[256]; /* the largest block */
        for (int64_t b = 0; b < n / ti.block; b++) {
            ti.dequant(src->data + (size_t)b * (size_t)ti.bytes, y);
            for (int i = 0; i < ti.block; i++) h[b * ti.block + i] = f32_to_bf16(y[i]);
        }
        if (converted) converted[src->type]++;
        m->type = LLAMA2_WEIGHTS_BF16;
        m->h = h;
    } else {
        float *f = (float *)llama2_own(t, (size_t)n * 4);
        if (!f) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory reading %s", src->name);
        to_f32(src, f, n);
        m->type = LLAMA2_WEIGHTS_F32;
        m->f = f;
    }
    return LLAMA2_OK;
}

/* The one-line notice of a load that dequantized tensors (NULL when none):
 * "GGUF tensors of type Q4_K (10 tensors), Q6_K (3 tensors) were dequantized
 * to bf16 at load", plus " (the token embedding to fp32)" when it was one
 * of them. The library prints nothing: run/runq and Python show it. */
static int set_notice(llama2_transformer *t, const int *converted, int embedding, llama2_error *err) {
    char line[512] = "GGUF tensors of type ";
    size_t at = strlen(line);
    int types = 0;
    for (int type = 0; type < GGML_TYPES; type++) {
        if (!converted[type]) continue;
        const int n = snprintf(line + at, sizeof(line) - at, "%s%s (%d tensor%s)", types ? ", " : "",
                               type_info((uint32_t)type).name, converted[type], converted[type] == 1 ? "" : "s");
        if (n > 0 && (size_t)n < sizeof(line) - at) at += (size_t)n;
        types++;
    }
    if (!types) return LLAMA2_OK;
    snprintf(line + at, sizeof(line) - at, " were dequantized to bf16 at load%s",
             embedding ? " (the token embedding to fp32)" : "");
    char *notice = (char *)llama2_own(t, strlen(line) + 1);
    if (!notice) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    memcpy(notice, line, strlen(line) + 1);
    t->notice = notice;
    return LLAMA2_OK;
}

const char *llama2_transformer_notice(const llama2_transformer *t) { return t ? t->notice : NULL; }

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
    const int linear = g.rope_scaling && g.rope_scaling_len == 6 && memcmp(g.rope_scaling, "linear", 6) == 0;
    if (g.rope_scaling && !linear && !(g.rope_scaling_len == 4 && memcmp(g.rope_scaling, "none", 4) == 0)) {
        rc = FAIL("GGUF rope scaling \"%.*s\" is not supported (llama2c runs none, linear, and llama3's rope_freqs)",
                  (int)(g.rope_scaling_len > 20 ? 20 : g.rope_scaling_len), g.rope_scaling);
        goto done;
    }
    if (linear && !(g.rope_factor > 0 && isfinite(g.rope_factor))) {
        rc = FAIL("GGUF linear rope scaling needs llama.rope.scaling.factor, finite and positive");
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
    /* rope scaling: linear (a factor) and/or rope_freqs, the per-frequency
     * divisors llama.cpp's converter writes for llama3 rope scaling (rope.c) */
    c->rope_scaling = linear ? LLAMA2_ROPE_LINEAR : LLAMA2_ROPE_NONE;
    c->rope_factor = linear ? (float)g.rope_factor : 0.0f;
    float *rope_freqs = NULL;
    if (find(&g, "rope_freqs.weight")) {
        rope_freqs = (float *)llama2_own(t, (size_t)(c->head_size / 2) * 4);
        if (!rope_freqs) { rc = llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); goto done; }
        if ((rc = vector_into(&g, "rope_freqs.weight", c->head_size / 2, rope_freqs, err))) goto done;
        c->rope_scaling = LLAMA2_ROPE_FACTORS;
    }
    if ((rc = llama2_rope_setup(t, rope_freqs, err))) goto done;
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
    int converted[GGML_TYPES] = {0}; /* tensors dequantized at load, by ggml type */
    if (!native_type(emb->type)) converted[emb->type]++;
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
                rc = matrix_from(t, src, &t->matrices[k * L + l], converted, err);
        }
    }
    if (rc) goto done;
    if (out) {
        if ((rc = need(&g, "output.weight", d, c->vocab_size, &out, err))) goto done;
        rc = matrix_from(t, out, &t->wcls, converted, err);
    } else if (emb->type == GGML_F32 || emb->type == GGML_F16) {
        t->wcls = (llama2_matrix){.rows = c->vocab_size, .cols = d, .type = LLAMA2_WEIGHTS_F32, .f = e};
    } else {
        rc = matrix_from(t, emb, &t->wcls, NULL, err); /* counted once, as the embedding */
    }
    if (rc) goto done;
    if ((rc = set_notice(t, converted, !native_type(emb->type), err))) goto done;
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
        rc = FAIL("GGUF tokenizer model \"%.*s\" is not SentencePiece (\"llama\"): the C tokenizer cannot read it; "
                  "run the file from Python (llama2c generate --model FILE, llama2c.Llama), which reads \"gpt2\" "
                  "vocabularies (pip install \"llama2c[hf]\")", (int)(g.tok_model ? (g.tok_model_len > 20 ? 20 : g.tok_model_len) : 6),
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
