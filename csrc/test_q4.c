/*
 * test_q4.c - C tests of kernels_q4.c and kernels_q4_neon.c (`make testcc`
 * runs them after test_llama2.c, `make test-neon` under qemu for aarch64,
 * with and without SDOT): every Q4_0 kernel of every tier this CPU runs against
 * the portable loop, bit for bit (one token and batches of 1..64 tokens,
 * odd row counts, calls that start and end halfway through a row block),
 * the portable loop against double-precision math on the dequantized
 * weights, the batched Q8_0 kernels against the single-token ones, and
 * version 5 (Q4_0) model files: logits bit-identical under every tier,
 * the fp32 w2 of a hidden_dim that is not a multiple of 32, hostile headers.
 */
#include "kernels.h"
#include "test_common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32(void) { return (uint32_t)(xorshift64(&rng) >> 32); }
static float frand(void) { return (float)((next_u32() >> 8) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

static void report_kernels(void) {
    printf("Q4_0 / batched Q8_0 kernels tested against the portable loops on:");
    for (int i = 0; i < n_kernels; i++)
        printf(" %s%s", kernel_list[i]->name,
               i && !kernel_list[i]->matmul_q4 ? " (no Q4_0 kernel: runs the portable loop)" : "");
    printf("\n");
}

/* a random fp16 scale: either sign, exponents 2^-14 .. 2^-1, some subnormal, some zero */
static uint16_t random_scale(void) {
    uint32_t r = next_u32();
    uint16_t sign = (uint16_t)((r & 1) << 15), mant = (uint16_t)((r >> 1) & 0x3ff);
    if ((r >> 12) % 31 == 0) return sign; /* zero */
    if ((r >> 12) % 29 == 0) return sign | mant; /* subnormal */
    return (uint16_t)(sign | (uint16_t)((1 + (r >> 20) % 14) << 10) | mant);
}

/* a random Q4_0 matrix (rows x cols, cols % 32 == 0), malloc'ed */
static uint8_t *random_q4(int rows, int cols) {
    const size_t blocks = (size_t)rows * cols / 32;
    uint8_t *q = (uint8_t *)malloc(blocks * 18);
    for (size_t b = 0; b < blocks; b++) {
        uint16_t s = random_scale();
        memcpy(q + 18 * b, &s, 2);
        for (int j = 0; j < 16; j++) q[18 * b + 2 + j] = (uint8_t)next_u32();
    }
    return q;
}

/* an activation of n values quantized in blocks of 32; extreme: int8 values at the limits */
static void random_activation(int8_t *xq, float *xs, float *xf, int n, int extreme) {
    for (int i = 0; i < n; i++) xf[i] = frand() * (i % 7 == 0 ? 8.0f : 1.0f);
    llama2_quantize(xq, xs, xf, n, 32);
    if (extreme)
        for (int i = 0; i < n; i++) xq[i] = (int8_t)(i % 3 == 0 ? -128 : i % 3 == 1 ? 127 : -127);
}

static double dequant(const uint8_t *q4, int cols, int row, int col) {
    const uint8_t *blk = q4 + ((size_t)row * (cols / 32) + col / 32) * 18;
    uint16_t h;
    memcpy(&h, blk, 2);
    int c = col % 32, nib = c < 16 ? blk[2 + c] & 15 : blk[2 + c - 16] >> 4;
    return (double)(nib - 8) * (double)llama2_f16_to_f32(h);
}

/* One token: the portable loop against double math, then every tier's
 * kernel against the portable loop over all rows and sub-ranges. */
static void check_q4(int cols, int rows) {
    uint8_t *q = random_q4(rows, cols);
    int8_t *xq = malloc(cols);
    float *xs = malloc(sizeof(float) * (cols / 32)), *xf = malloc(sizeof(float) * cols);
    float *ref = malloc(sizeof(float) * rows), *out = malloc(sizeof(float) * rows);
    llama2_matrix m0 = {.rows = rows, .cols = cols, .type = LLAMA2_WEIGHTS_Q4_0, .q4 = q};
    for (int extreme = 0; extreme < 2; extreme++) {
        random_activation(xq, xs, xf, cols, extreme);
        llama2_matmul_q4_rows(ref, xq, xs, &m0, 0, rows);
        double worst = 0, scale = 0;
        for (int i = 0; i < rows; i++) {
            double exact = 0, mag = 0;
            for (int j = 0; j < cols; j++) {
                double term = dequant(q, cols, i, j) * xq[j] * xs[j / 32];
                exact += term;
                mag += fabs(term);
            }
            worst = fmax(worst, fabs(exact - ref[i]));
            scale = fmax(scale, mag);
        }
        CHECK(worst <= 1e-5 * scale + 1e-30, "portable Q4_0 %dx%d matches double math on the dequantized weights "
              "(max err %g of %g)", rows, cols, worst, scale);
        for (int k = 1; k < n_kernels; k++) {
            if (!kernel_list[k]->matmul_q4) continue;
            llama2_transformer *t = owner_for(kernel_list[k]);
            llama2_matrix m = m0;
            llama2_pack_q4(t, &m, NULL);
            CHECK(m.pq4 && m.ps4, "%s regroups Q4_0 weights", kernel_list[k]->name);
            /* (AVX-512: [8, ..) starts and [.., 40) ends halfway through a 16-row block) */
            const int ranges[6][2] = {{0, rows}, {8, rows - 3}, {24, rows}, {8, 16}, {8, 40}, {16, 24}};
            for (int r = 0; r < 6; r++) {
                int r0 = ranges[r][0], r1 = ranges[r][1] < rows ? ranges[r][1] : rows;
                if (r1 <= r0) continue;
                for (int i = 0; i < rows; i++) out[i] = -1.0f;
                kernel_list[k]->matmul_q4(out, xq, xs, &m, r0, r1);
                int same = 1;
                for (int i = 0; i < rows; i++) same &= i < r0 || i >= r1 ? out[i] == -1.0f : memcmp(&out[i], &ref[i], 4) == 0;
                CHECK(same, "%s Q4_0 %dx%d rows [%d, %d)%s: bit-identical to the portable loop, nothing else written",
                      kernel_list[k]->name, rows, cols, r0, r1, extreme ? " (activation bytes at the limits)" : "");
            }
            free_owner(t);
        }
    }
    free(q), free(xq), free(xs), free(xf), free(ref), free(out);
}

/* A batch of n_tok activations: every tier's batched kernel against the
 * portable loop token by token, whole and on a thread's block pairs. */
static void check_q4_batch(int cols, int rows, int n_tok) {
    uint8_t *q = random_q4(rows, cols);
    int8_t *xq = malloc((size_t)n_tok * cols);
    float *xs = malloc(sizeof(float) * (size_t)n_tok * (cols / 32)), *xf = malloc(sizeof(float) * cols);
    float *ref = malloc(sizeof(float) * (size_t)n_tok * rows), *out = malloc(sizeof(float) * (size_t)n_tok * rows);
    llama2_activation a[64];
    llama2_matrix m0 = {.rows = rows, .cols = cols, .type = LLAMA2_WEIGHTS_Q4_0, .q4 = q};
    for (int t = 0; t < n_tok; t++) {
        a[t] = (llama2_activation){.x = NULL, .q = xq + (size_t)t * cols, .s = xs + (size_t)t * (cols / 32), .n = cols};
        random_activation(a[t].q, a[t].s, xf, cols, t % 5 == 4);
        llama2_matmul_q4_rows(ref + (size_t)t * rows, a[t].q, a[t].s, &m0, 0, rows);
    }
    for (int k = 1; k < n_kernels; k++) {
        if (!kernel_list[k]->matmul_q4_batch) continue;
        llama2_transformer *t = owner_for(kernel_list[k]);
        llama2_matrix m = m0;
        llama2_pack_q4(t, &m, NULL);
        const int ranges[2][2] = {{0, rows}, {16, rows > 48 ? 48 : rows}};
        for (int r = 0; r < 2; r++) {
            int r0 = ranges[r][0], r1 = ranges[r][1];
            if (r1 <= r0) continue;
            for (size_t i = 0; i < (size_t)n_tok * rows; i++) out[i] = -1.0f;
            kernel_list[k]->matmul_q4_batch(out, (size_t)rows, a, n_tok, &m, r0, r1);
            int same = 1;
            for (int tk = 0; tk < n_tok; tk++)
                for (int i = 0; i < rows; i++) {
                    const size_t at = (size_t)tk * rows + i;
                    same &= i < r0 || i >= r1 ? out[at] == -1.0f : memcmp(&out[at], &ref[at], 4) == 0;
                }
            CHECK(same, "%s batched Q4_0 %dx%d, %d tokens, rows [%d, %d): bit-identical to the portable loop",
                  kernel_list[k]->name, rows, cols, n_tok, r0, r1);
        }
        free_owner(t);
    }
    free(q), free(xq), free(xs), free(xf), free(ref), free(out);
}

/* The batched Q8_0 kernels against each tier's single-token kernel (itself
 * tested against the portable loop by test_llama2.c) and the portable loop.
 * uneven: the activation rows are not evenly spaced in memory (the AMX
 * kernel then copies them). */
static void check_q8_batch_rows(int cols, int rows, int gs, int n_tok, int uneven) {
    const size_t n = (size_t)rows * cols;
    int8_t *q = malloc(n), *xq = malloc((size_t)n_tok * (cols + 64));
    float *s = malloc(sizeof(float) * (n / gs)), *xs = malloc(sizeof(float) * (size_t)n_tok * (cols / gs));
    float *xf = malloc(sizeof(float) * cols), *wf = malloc(sizeof(float) * n);
    float *ref = malloc(sizeof(float) * (size_t)n_tok * rows), *out = malloc(sizeof(float) * (size_t)n_tok * rows);
    for (size_t i = 0; i < n; i++) wf[i] = frand();
    llama2_quantize_weights(q, s, wf, (int64_t)n, gs);
    llama2_activation a[64];
    llama2_matrix m0 = {.rows = rows, .cols = cols, .type = LLAMA2_WEIGHTS_Q8_0, .q = q, .s = s};
    for (int t = 0; t < n_tok; t++) {
        for (int i = 0; i < cols; i++) xf[i] = frand();
        int8_t *row = xq + (size_t)t * (uneven ? cols + 64 : cols) + (uneven ? (t * 13) % 64 : 0);
        a[t] = (llama2_activation){.x = NULL, .q = row, .s = xs + (size_t)t * (cols / gs), .n = cols};
        llama2_quantize(a[t].q, a[t].s, xf, cols, gs);
    }
    for (int k = 1; k < n_kernels; k++) {
        if (!kernel_list[k]->matmul_q8_batch) continue;
        for (int with_min = 0; with_min < 2; with_min++) {
            llama2_transformer *t = owner_for(kernel_list[k]);
            llama2_matrix m = m0;
            q[5] = with_min ? -128 : 1;
            for (int tk = 0; tk < n_tok; tk++)
                llama2_matmul_q8_rows(ref + (size_t)tk * rows, a[tk].q, a[tk].s, &m0, gs, 0, rows);
            llama2_pack_scales(t, &m, gs, NULL); /* -128: a -128 (possible in a hand-made file) */
            const int ranges[2][2] = {{0, rows}, {16, rows > 48 ? 48 : rows}};
            for (int r = 0; r < 2; r++) {
                int r0 = ranges[r][0], r1 = ranges[r][1];
                if (r1 <= r0) continue;
                for (size_t i = 0; i < (size_t)n_tok * rows; i++) out[i] = -1.0f;
                kernel_list[k]->matmul_q8_batch(out, (size_t)rows, a, n_tok, &m, gs, r0, r1);
                int same = 1;
                for (int tk = 0; tk < n_tok; tk++)
                    for (int i = 0; i < rows; i++) {
                        const size_t at = (size_t)tk * rows + i;
                        same &= i < r0 || i >= r1 ? out[at] == -1.0f : memcmp(&out[at], &ref[at], 4) == 0;
                    }
                CHECK(same, "%s batched Q8_0 %dx%d gs %d, %d tokens%s, rows [%d, %d)%s: bit-identical to the portable loop",
                      kernel_list[k]->name, rows, cols, gs, n_tok, uneven ? " (rows unevenly spaced)" : "", r0, r1,
                      with_min ? " (a -128 weight)" : "");
            }
            free_owner(t);
        }
    }
    free(q), free(xq), free(s), free(xs), free(xf), free(wf), free(ref), free(out);
}

static void check_q8_batch(int cols, int rows, int gs, int n_tok) {
    check_q8_batch_rows(cols, rows, gs, n_tok, 0);
}

/* ---- version 5 files ---- */

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
}

/* A random version 5 model (shared classifier or not); returns its size. */
static size_t write_v5(const char *path, int dim, int hidden, int layers, int heads, int kv_heads, int vocab,
                       int seq_len, int shared) {
    const int hs = dim / heads, kv = hs * kv_heads;
    const size_t norms = (size_t)2 * layers * dim + dim;
    const size_t q4 = ((size_t)vocab * dim * (shared ? 1 : 2) +
                       (size_t)layers * (2 * dim * dim + 2 * kv * dim + 2 * hidden * dim)) / 32 * 18;
    const size_t w2 = hidden % 32 == 0 ? (size_t)layers * dim * hidden / 32 * 18 : (size_t)layers * dim * hidden * 4;
    const size_t size = 256 + 4 * norms + q4 + w2;
    unsigned char *buf = calloc(1, size);
    uint32_t magic = 0x616b3432u;
    int head[8] = {5, dim, hidden, layers, heads, kv_heads, vocab, seq_len};
    float theta = 10000.0f, eps = 1e-5f;
    memcpy(buf, &magic, 4);
    memcpy(buf + 4, head, sizeof(head));
    buf[36] = (unsigned char)shared;
    memcpy(buf + 40, &theta, 4);
    memcpy(buf + 44, &eps, 4);
    unsigned char *p = buf + 256;
    for (size_t i = 0; i < norms; i++, p += 4) {
        float v = 1.0f + 0.1f * frand();
        memcpy(p, &v, 4);
    }
    /* emb, wq, wk, wv, wo, w1 (Q4_0); w2; w3 (Q4_0); wcls */
    const size_t before_w2 = ((size_t)vocab * dim + (size_t)layers * (2 * dim * dim + 2 * kv * dim + hidden * dim)) / 32;
    for (size_t b = 0; b < before_w2; b++, p += 18) {
        uint16_t s = (uint16_t)((10 + next_u32() % 3) << 10 | (next_u32() & 0x3ff)); /* 2^-5 .. 2^-3 */
        memcpy(p, &s, 2);
        for (int j = 0; j < 16; j++) p[2 + j] = (uint8_t)next_u32();
    }
    if (hidden % 32 == 0) {
        for (size_t b = 0; b < (size_t)layers * dim * hidden / 32; b++, p += 18) {
            uint16_t s = (uint16_t)((10 + next_u32() % 3) << 10);
            memcpy(p, &s, 2);
            for (int j = 0; j < 16; j++) p[2 + j] = (uint8_t)next_u32();
        }
    } else {
        for (size_t i = 0; i < (size_t)layers * dim * hidden; i++, p += 4) {
            float v = 0.05f * frand();
            memcpy(p, &v, 4);
        }
    }
    for (; p < buf + size; p += 18) {
        uint16_t s = (uint16_t)((10 + next_u32() % 3) << 10 | (next_u32() & 0x3ff));
        memcpy(p, &s, 2);
        for (int j = 0; j < 16; j++) p[2 + j] = (uint8_t)next_u32();
    }
    write_bytes(path, buf, size);
    free(buf);
    return size;
}

/* Logits of a v5 model under every tier: prefill of 5, then 2 decode steps,
 * bit-identical to the portable loops; the batch equals token by token. */
static void check_v5_model(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int shared) {
    const char *saved = getenv("LLAMA2_KERNELS");
    char keep[64] = "";
    if (saved) snprintf(keep, sizeof(keep), "%s", saved);
    const char *path = tmp_path("v5.bin");
    write_v5(path, dim, hidden, layers, heads, kv_heads, vocab, 64, shared);
    const int toks[7] = {1, 5, 9, 30, 2, 17, 3};
    float *ref = malloc(sizeof(float) * vocab), *last = malloc(sizeof(float) * vocab), *one = malloc(sizeof(float) * vocab);
    for (int k = 0; k < n_kernels; k++) {
        setenv("LLAMA2_KERNELS", kernel_tier[k], 1);
        llama2_transformer *t;
        llama2_error err;
        if (llama2_transformer_open(&t, path, 0, &err) != LLAMA2_OK) {
            CHECK(0, "v5 model opens: %s", err.message);
            continue;
        }
        const llama2_config *c = llama2_transformer_config(t);
        CHECK(c->version == 5 && c->weights == LLAMA2_WEIGHTS_Q4_0 && c->group_size == 32,
              "v5 config: version %d, weights %d, group size %d", c->version, c->weights, c->group_size);
        float *logits = NULL;
        int ok = llama2_forward_batch(t, toks, 5, 0, &logits, &err) == LLAMA2_OK;
        ok = ok && llama2_forward(t, toks[5], 5, &logits, &err) == LLAMA2_OK;
        ok = ok && llama2_forward(t, toks[6], 6, &logits, &err) == LLAMA2_OK;
        if (ok) memcpy(k ? last : ref, logits, sizeof(float) * vocab);
        int finite = 1;
        for (int i = 0; ok && i < vocab; i++) finite &= isfinite(logits[i]);
        CHECK(ok && finite, "v5 (hidden %d) runs under %s: %s", hidden, kernel_list[k]->name, err.message);
        if (k) CHECK(ok && memcmp(last, ref, sizeof(float) * vocab) == 0,
                     "v5 model (dim %d, hidden %d%s) under %s: logits bit-identical to the portable loops", dim, hidden,
                     shared ? "" : ", separate classifier", kernel_list[k]->name);
        /* token by token in a fresh context gives the batch's floats */
        llama2_context *cx;
        ok = llama2_context_new(&cx, t, 0, &err) == LLAMA2_OK;
        for (int i = 0; ok && i < 7; i++) ok = llama2_context_forward(cx, toks[i], i, &logits, &err) == LLAMA2_OK;
        if (ok) memcpy(one, logits, sizeof(float) * vocab);
        CHECK(ok && memcmp(one, k ? last : ref, sizeof(float) * vocab) == 0,
              "v5 under %s: prefill batch = token by token", kernel_list[k]->name);
        if (ok) llama2_context_free(cx);
        /* runq's flag leaves a Q4_0 model as it is */
        llama2_transformer *tq;
        if (llama2_transformer_open(&tq, path, LLAMA2_OPEN_QUANTIZE, &err) == LLAMA2_OK) {
            CHECK(llama2_transformer_config(tq)->weights == LLAMA2_WEIGHTS_Q4_0, "quantize flag keeps Q4_0");
            llama2_transformer_free(tq);
        } else {
            CHECK(0, "v5 opens with the quantize flag: %s", err.message);
        }
        llama2_transformer_free(t);
    }
    free(ref), free(last), free(one);
    remove(path);
    if (saved) setenv("LLAMA2_KERNELS", keep, 1);
    else unsetenv("LLAMA2_KERNELS");
}

static int open_status(const char *path, llama2_error *err) {
    llama2_transformer *t = NULL;
    int rc = llama2_transformer_open(&t, path, 0, err);
    llama2_transformer_free(t);
    return rc;
}

static void test_v5_errors(void) {
    const char *path = tmp_path("v5bad.bin");
    size_t size = write_v5(path, 64, 96, 2, 4, 2, 40, 64, 1);
    FILE *f = fopen(path, "rb");
    unsigned char *buf = malloc(size + 1);
    CHECK(fread(buf, 1, size, f) == size, "read back");
    fclose(f);
    llama2_error err;
    write_bytes(path, buf, size - 1);
    CHECK(open_status(path, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "truncated"), "v5 truncated: %s", err.message);
    buf[size] = 0;
    write_bytes(path, buf, size + 1);
    CHECK(open_status(path, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "trailing"), "v5 trailing byte: %s", err.message);
    unsigned char *bad = malloc(size);
    memcpy(bad, buf, size);
    int dim = 48, heads = 4;
    memcpy(bad + 8, &dim, 4);
    memcpy(bad + 20, &heads, 4);
    write_bytes(path, bad, size);
    CHECK(open_status(path, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "multiple of 32"),
          "v5 dim 48 refused: %s", err.message);
    memcpy(bad, buf, size);
    int vocab = 1 << 30;
    memcpy(bad + 28, &vocab, 4);
    write_bytes(path, bad, size);
    CHECK(open_status(path, &err) == LLAMA2_ERR_FORMAT, "v5 huge vocab refused: %s", err.message);
    memcpy(bad, buf, size);
    /* an infinite scale in wk of layer 1 */
    const size_t wk1 = 256 + 4 * (2 * 2 * 64 + 64) + (size_t)(40 * 64 + 2 * 64 * 64 + 32 * 64) / 32 * 18;
    bad[wk1 + 18 * 3] = 0x00, bad[wk1 + 18 * 3 + 1] = 0x7c;
    write_bytes(path, bad, size);
    CHECK(open_status(path, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "wk of layer 1"),
          "v5 infinite scale refused: %s", err.message);
    memcpy(bad, buf, size);
    int version = 6;
    memcpy(bad + 4, &version, 4);
    write_bytes(path, bad, size);
    CHECK(open_status(path, &err) == LLAMA2_ERR_FORMAT && strstr(err.message, "version 6"), "version 6: %s", err.message);
    free(bad);
    free(buf);
    remove(path);
}

int main(void) {
    use_tmpdir_from_env("llama2_testq4_");
    find_kernels();
    report_kernels();
    check_q4(32, 1);
    check_q4(64, 7);
    check_q4(96, 13);
    check_q4(288, 45);
    check_q4(256, 100);
    check_q4(2048, 67);
    check_q4(65600, 24); /* more blocks than the kernels' stack of corrections */
    check_q4_batch(64, 40, 3);
    for (int nt = 1; nt <= 64; nt++) check_q4_batch(96, 37 + nt % 5, nt);
    check_q4_batch(288, 67, 17);
    check_q4_batch(65600, 16, 2);
    check_q8_batch(64, 40, 64, 3);
    for (int nt = 1; nt <= 64; nt++) check_q8_batch(96, 37 + nt % 5, 32, nt);
    check_q8_batch(288, 67, 96, 17);
    check_q8_batch(65600, 16, 64, 2);
    check_q8_batch(256, 50, 128, 9);            /* groups of two 64-column AMX steps */
    check_q8_batch_rows(192, 70, 64, 21, 1);    /* activation rows unevenly spaced */
    check_q8_batch_rows(96, 33, 32, 5, 1);
    check_v5_model(64, 96, 2, 4, 2, 40, 1);
    check_v5_model(64, 72, 2, 4, 2, 40, 1); /* hidden 72: w2 in fp32 */
    check_v5_model(96, 160, 3, 6, 3, 37, 0);
    test_v5_errors();
    printf("test_q4: %d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
