/*
 * fuzz_llama2.c - fuzz harness for libllama2's file loaders, tokenizer and
 * generation loop.
 *
 * LLVMFuzzerTestOneInput() is libFuzzer's entry point. Built with
 * -DLLAMA2_LIBFUZZER and clang -fsanitize=fuzzer it is driven by libFuzzer;
 * built without it (plain gcc, `make fuzz`) this file also has a main() with
 * a small mutational fuzzer of its own that takes libFuzzer-style options:
 *
 *   fuzz_llama2 [-runs=N] [-max_total_time=S] [-seed=X] [-max_len=N]
 *               [-timeout=S] [-rss_limit_mb=MB] [-detect_leaks=0|1]
 *               [-artifact_prefix=DIR/] [-print_final_stats=1] CORPUS_DIR... | FILE...
 *
 * (`-name value` works too.) Directories are seed corpora: every seed runs
 * once, then mutants of them run until -runs mutants or -max_total_time
 * seconds (-runs=0: only replay the seeds). FILE arguments are reproducers:
 * each runs once. See fuzz/README.md.
 *
 * Input format (fuzz/make_corpus.py writes seeds in it):
 *
 *   byte 0    selector
 *             bits 0-1: target  0 = model loader + forward passes
 *                               1 = tokenizer loader + encode / decode
 *                               2 = full run, generate mode
 *                               3 = full run, chat mode
 *             bit 2:    open the model with LLAMA2_OPEN_QUANTIZE
 *             bit 3:    2 threads (else 1)
 *   bytes 1-8 knobs k[0..7], their meaning per target (see run_model,
 *             run_tokenizer, run_full below); missing bytes read as 0
 *   then      target 0: the model file (the rest of the input)
 *             target 1: u32 T, T bytes of tokenizer.bin, then the text to encode
 *             target 2/3: u32 M, M bytes of model file, u32 T, T bytes of
 *             tokenizer.bin, then the prompt
 *   Lengths are little-endian and clamped to what the input holds.
 *
 * The library must never crash, hang or leak, and every failure must be a
 * status of the enum with a message; the harness aborts (a crash the fuzzer
 * records) when a call breaks that contract or a documented invariant.
 */
#if !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif
#include "llama2.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* -DLLAMA2_FUZZ_NO_CONTEXTS builds the harness against engines older than
 * llama2_context (to bisect a finding): the passes then all run in the
 * model's default context. */
#ifdef LLAMA2_FUZZ_NO_CONTEXTS
typedef struct llama2_context llama2_context;
#endif

/* Sanitizer runtime hooks, weak so the harness also links without them. */
extern void __sanitizer_print_stack_trace(void) __attribute__((weak));
extern void __sanitizer_set_death_callback(void (*cb)(void)) __attribute__((weak));
extern int __sanitizer_install_malloc_and_free_hooks(void (*m)(const volatile void *, size_t),
                                                     void (*f)(const volatile void *))
    __attribute__((weak));
extern int __lsan_do_recoverable_leak_check(void) __attribute__((weak));

/* ---- limits that keep one input cheap ---- */

#define MAX_PARAMS (2 * 1000 * 1000) /* no forward pass on bigger models */
#define MAX_TEXT 512                 /* bytes of text the tokenizer target encodes */
#define MAX_PROMPT 64                /* bytes of prompt in a full run */
#define MAX_SESSION_STEPS 12         /* session steps per full run, whatever `steps` says */

/* How far inputs got (the standalone driver prints them) */
static unsigned long long n_models_opened, n_forwards_ok, n_tokenizers_opened, n_encodes_ok, n_sessions, n_steps_ok;

/* ---- contract checks ---- */

static void fuzz_die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void fuzz_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "==%d== ERROR: fuzz_llama2: ", (int)getpid());
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    if (__sanitizer_print_stack_trace) __sanitizer_print_stack_trace();
    fflush(stderr);
    abort();
}

#define CHECK(cond, ...)                   \
    do {                                   \
        if (!(cond)) fuzz_die(__VA_ARGS__); \
    } while (0)

/* A status returned together with err: in the enum, and with a message
 * (stored in err->code too) when it is a failure. */
static int check_status(const char *call, int rc, const llama2_error *err) {
    CHECK(rc >= LLAMA2_OK && rc <= LLAMA2_ERR_STATE, "%s returned %d, not a llama2_status", call, rc);
    if (rc != LLAMA2_OK) {
        CHECK(memchr(err->message, '\0', sizeof(err->message)) != NULL, "%s: message not NUL-terminated", call);
        CHECK(err->message[0] != '\0', "%s failed with status %d and an empty message", call, rc);
        CHECK(err->code == rc, "%s returned %d but err.code is %d (\"%s\")", call, rc, err->code, err->message);
    }
    return rc;
}

static void reset_err(llama2_error *err) {
    memset(err, 0, sizeof(*err));
    err->code = -12345; /* a call that fails must overwrite it */
}

/* Reads n bytes so that ASan sees any out-of-bounds piece or buffer. */
static volatile unsigned fuzz_sink;
static void touch(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    unsigned acc = 0;
    for (size_t i = 0; i < n; i++) acc += b[i];
    fuzz_sink += acc;
}

/* ---- temp files: one pair per process, rewritten every run ----
 * Each is unlinked as soon as the loader has it (the model is mapped, the
 * tokenizer read whole), so a crash later in the run leaves nothing behind. */

static char model_path[512], tok_path[512];

static void remove_temp_files(void) {
    if (model_path[0]) unlink(model_path);
    if (tok_path[0]) unlink(tok_path);
}

static void init_temp_paths(void) {
    if (model_path[0]) return;
    const char *dir = "/dev/shm";
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || access(dir, W_OK) != 0) {
        dir = getenv("TMPDIR");
        if (!dir || !*dir) dir = "/tmp";
    }
    snprintf(model_path, sizeof(model_path), "%s/fuzz_llama2-%d-model.bin", dir, (int)getpid());
    snprintf(tok_path, sizeof(tok_path), "%s/fuzz_llama2-%d-tok.bin", dir, (int)getpid());
    atexit(remove_temp_files);
}

static void write_file(const char *path, const uint8_t *data, size_t size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0, "cannot create %s: %s", path, strerror(errno));
    while (size > 0) {
        ssize_t w = write(fd, data, size);
        if (w < 0 && errno == EINTR) continue;
        CHECK(w > 0, "cannot write %s: %s", path, strerror(errno));
        data += w;
        size -= (size_t)w;
    }
    close(fd);
}

/* ---- the input ---- */

typedef struct {
    size_t start, len;
} span;

typedef struct {
    int target;
    int quantize, threads;
    uint8_t k[8];      /* knobs */
    span model, tok, text;
    size_t model_lenpos, tok_lenpos; /* where their u32 length fields are; SIZE_MAX: none */
} fuzz_input;

static uint32_t rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void wr_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* A length-prefixed section at *off: [u32 length][bytes], clamped. */
static span take_section(const uint8_t *d, size_t n, size_t *off, size_t *lenpos) {
    span s = {n, 0};
    *lenpos = SIZE_MAX;
    if (*off + 4 > n) {
        *off = n;
        return s;
    }
    *lenpos = *off;
    uint32_t len = rd_u32(d + *off);
    *off += 4;
    size_t avail = n - *off;
    s.start = *off;
    s.len = len < avail ? len : avail;
    *off += s.len;
    return s;
}

#define KNOB_BYTES 8
#define PREFIX_BYTES (1 + KNOB_BYTES)

static int parse_input(const uint8_t *d, size_t n, fuzz_input *in) {
    memset(in, 0, sizeof(*in));
    in->model_lenpos = in->tok_lenpos = SIZE_MAX;
    if (n == 0) return 0;
    in->target = d[0] & 3;
    in->quantize = (d[0] >> 2) & 1;
    in->threads = (d[0] & 8) ? 2 : 1;
    for (int i = 0; i < KNOB_BYTES; i++) in->k[i] = (size_t)(1 + i) < n ? d[1 + i] : 0;
    size_t off = n < PREFIX_BYTES ? n : PREFIX_BYTES;
    span empty = {n, 0};
    in->model = in->tok = in->text = empty;
    if (in->target == 0) {
        in->model.start = off;
        in->model.len = n - off;
    } else if (in->target == 1) {
        in->tok = take_section(d, n, &off, &in->tok_lenpos);
        in->text.start = off;
        in->text.len = n - off;
    } else {
        in->model = take_section(d, n, &off, &in->model_lenpos);
        in->tok = take_section(d, n, &off, &in->tok_lenpos);
        in->text.start = off;
        in->text.len = n - off;
    }
    return 1;
}

/* ---- choosing arguments from knob bytes ---- */

/* A token for a vocabulary of v: mostly valid, sometimes hostile. */
static int pick_token(uint8_t b, int v) {
    if (b < 240) return v > 0 ? (int)(b % (unsigned)v) : 0;
    const int hostile[16] = {-1, v, v - 1, INT_MAX, INT_MIN, 0, 1, 2, 3, 258, 259, v + 1, -2, 255, 256, 1 << 22};
    return hostile[b - 240];
}

/* A position: `valid` mostly, sometimes hostile. */
static int pick_pos(uint8_t b, int valid, int seq_len) {
    if (b < 224) return valid;
    const int hostile[8] = {-1, seq_len, seq_len - 1, INT_MAX, INT_MIN, INT_MAX - 1, seq_len - 2, 1 << 30};
    return hostile[(b - 224) & 7];
}

static void check_config(const llama2_config *c, size_t file_size) {
    CHECK(c != NULL, "llama2_transformer_config returned NULL");
    CHECK(c->dim > 0 && c->hidden_dim > 0 && c->n_layers > 0 && c->n_heads > 0 && c->n_kv_heads > 0 &&
              c->vocab_size > 0 && c->seq_len > 0,
          "opened a model with a non-positive dimension (dim %d hidden %d layers %d heads %d kv %d vocab %d seq %d)",
          c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len);
    CHECK(c->head_size > 0 && c->head_size * c->n_heads == c->dim && c->head_size % 2 == 0,
          "bad head_size %d (dim %d, n_heads %d)", c->head_size, c->dim, c->n_heads);
    CHECK(c->n_heads % c->n_kv_heads == 0 && c->kv_dim == c->head_size * c->n_kv_heads, "bad kv_dim %d", c->kv_dim);
    CHECK((c->version >= 0 && c->version <= 5) || c->version == LLAMA2_VERSION_GGUF, "version %d", c->version);
    CHECK(c->weights == LLAMA2_WEIGHTS_F32 || c->weights == LLAMA2_WEIGHTS_Q8_0 || c->weights == LLAMA2_WEIGHTS_BF16 ||
              c->weights == LLAMA2_WEIGHTS_Q4_0,
          "weights kind %d", c->weights);
    CHECK(c->shared_classifier == 0 || c->shared_classifier == 1, "shared_classifier %d", c->shared_classifier);
    CHECK(c->file_size == (int64_t)file_size, "file_size %lld, file has %zu bytes", (long long)c->file_size, file_size);
    CHECK(c->n_params > 0, "n_params %lld", (long long)c->n_params);
}

static void check_logits(int rc, const float *logits, int vocab) {
    if (rc != LLAMA2_OK) return;
    n_forwards_ok++;
    CHECK(logits != NULL, "forward succeeded without logits");
    touch(logits, (size_t)vocab * sizeof(float));
}

/* Where forward passes run: the model's default context or one of ours. */
typedef struct {
    llama2_transformer *t;
    llama2_context *ctx; /* NULL: the default context (llama2_forward) */
    int n_ctx;           /* positions it holds */
} runner;

static int run_forward(const runner *r, int token, int pos, float **logits, llama2_error *err) {
#ifndef LLAMA2_FUZZ_NO_CONTEXTS
    if (r->ctx) return llama2_context_forward(r->ctx, token, pos, logits, err);
#endif
    return llama2_forward(r->t, token, pos, logits, err);
}

static int run_batch(const runner *r, const int *tokens, int n, int pos, float **logits, llama2_error *err) {
#ifndef LLAMA2_FUZZ_NO_CONTEXTS
    if (r->ctx) return llama2_context_forward_batch(r->ctx, tokens, n, pos, logits, err);
#endif
    return llama2_forward_batch(r->t, tokens, n, pos, logits, err);
}

/* n_ctx for a context: index into the table (seq_len-relative and hostile values) */
static int pick_n_ctx(unsigned idx, int seq_len) {
    const int table[16] = {0, seq_len, 1, 2, 3, 4, 8, seq_len - 1, seq_len + 1, -1, INT_MAX, INT_MIN, 16, 5, 0, 0};
    return table[idx & 15];
}

/* A new context of n_ctx positions, checked against its contract; NULL if it failed. */
static llama2_context *new_context(llama2_transformer *t, int n_ctx, int seq_len) {
#ifndef LLAMA2_FUZZ_NO_CONTEXTS
    llama2_context *ctx = NULL;
    llama2_error err;
    reset_err(&err);
    int rc = check_status("llama2_context_new", llama2_context_new(&ctx, t, n_ctx, &err), &err);
    if (n_ctx > seq_len) CHECK(rc != LLAMA2_OK, "llama2_context_new accepted n_ctx %d > seq_len %d", n_ctx, seq_len);
    else CHECK(rc == LLAMA2_OK || rc == LLAMA2_ERR_NOMEM, "llama2_context_new(n_ctx %d, seq_len %d) failed: %s",
               n_ctx, seq_len, err.message);
    if (rc) {
        CHECK(ctx == NULL, "llama2_context_new failed but set *out");
        return NULL;
    }
    int want = n_ctx <= 0 ? seq_len : n_ctx;
    CHECK(llama2_context_n_ctx(ctx) == want, "context n_ctx %d, asked for %d (seq_len %d)", llama2_context_n_ctx(ctx),
          n_ctx, seq_len);
    return ctx;
#else
    (void)t, (void)n_ctx, (void)seq_len;
    return NULL;
#endif
}

static int context_n_ctx(const llama2_context *ctx) {
#ifndef LLAMA2_FUZZ_NO_CONTEXTS
    return llama2_context_n_ctx(ctx);
#else
    (void)ctx;
    return 0;
#endif
}

static void free_context(llama2_context *ctx) {
#ifndef LLAMA2_FUZZ_NO_CONTEXTS
    llama2_context_free(ctx);
#else
    (void)ctx;
#endif
}

/* Two single passes and a batch in one context. */
static void run_passes(const runner *r, const fuzz_input *in, int V) {
    const int S = r->n_ctx;
    llama2_error err;
    float *logits = NULL;
    reset_err(&err);
    int rc = check_status("llama2_forward", run_forward(r, pick_token(in->k[0], V), 0, &logits, &err), &err);
    check_logits(rc, logits, V);
    reset_err(&err);
    rc = check_status("llama2_forward", run_forward(r, pick_token(in->k[1], V), pick_pos(in->k[2], 1, S), &logits, &err),
                      &err);
    check_logits(rc, logits, V);
    /* batch tokens: k[4..6] for the first three (maybe hostile), valid ones after */
    int tokens[72];
    for (int i = 0; i < 72; i++) tokens[i] = (int)(((unsigned)in->k[4 + i % 3] + (unsigned)i) % (unsigned)V);
    for (int i = 0; i < 3; i++) tokens[i] = pick_token(in->k[4 + i], V);
    /* k[3]: bit 0 three tokens, bits 2-7 (v): < 48 position 2; 48-55 a hostile position; 56-63 an odd size */
    int n = 2 + (in->k[3] & 1), pos = 2;
    const int *batch = tokens;
    const unsigned v = (unsigned)in->k[3] >> 2;
    if (v >= 48 && v < 56) {
        pos = pick_pos((uint8_t)(224 + (v - 48)), 2, S);
    } else if (v >= 56) { /* never more tokens than the buffer holds */
        const int sizes[8] = {0, -1, 1, 64, 65, 72, INT_MIN, 3};
        n = sizes[v - 56];
        if (v == 63) batch = NULL;
    }
    logits = NULL;
    reset_err(&err);
    rc = check_status("llama2_forward_batch", run_batch(r, batch, n, pos, (in->k[3] & 2) ? NULL : &logits, &err), &err);
    if (!(in->k[3] & 2)) check_logits(rc, logits, V);
}

/* ---- target 0: model loader, forward, forward_batch ----
 * k[0], k[1]: the tokens of the two forward passes (pick_token)
 * k[2]: the second pass's position (pick_pos, valid = 1)
 * k[3]: bit 0: batch of 3 (else 2); bit 1: no logits; bits 2-7 (v = k[3] >> 2): v < 48 the
 *       batch at position 2, 48-55 at a hostile position (pick_pos), 56-63 odd batch sizes
 *       (0, -1, 1, 64, 65, 72, INT_MIN, NULL tokens)
 * k[4..6]: the batch tokens
 * k[7]: bits 0-1: where the passes run: 0 the model's default context, 1 a new
 *       context, 2 two new contexts, 3 a new context then the default one;
 *       bits 2-5: the new contexts' n_ctx (pick_n_ctx) */
static void run_model(const uint8_t *data, const fuzz_input *in) {
    llama2_error err;
    llama2_transformer *t = NULL;
    write_file(model_path, data + in->model.start, in->model.len);
    reset_err(&err);
    int rc = check_status("llama2_transformer_open",
                          llama2_transformer_open(&t, model_path, in->quantize ? LLAMA2_OPEN_QUANTIZE : 0, &err), &err);
    unlink(model_path);
    if (rc) {
        CHECK(t == NULL, "llama2_transformer_open failed but set *out");
        return;
    }
    CHECK(t != NULL, "llama2_transformer_open succeeded with *out == NULL");
    n_models_opened++;
    const llama2_config *c = llama2_transformer_config(t);
    check_config(c, in->model.len);
    CHECK(!in->quantize || c->weights == LLAMA2_WEIGHTS_Q8_0 || c->weights == LLAMA2_WEIGHTS_Q4_0, /* Q4_0 stays */
          "quantized open gave weights %d", c->weights);
    llama2_transformer_set_threads(t, in->threads);
    if (c->n_params <= MAX_PARAMS) {
        const int V = c->vocab_size, S = c->seq_len;
        int where = in->k[7] & 3;
#ifdef LLAMA2_FUZZ_NO_CONTEXTS
        where = 0;
#endif
        if (where == 0) {
            runner r = {t, NULL, S};
            run_passes(&r, in, V);
        } else {
            int n_ctx = pick_n_ctx((unsigned)in->k[7] >> 2, S);
            runner r1 = {t, new_context(t, n_ctx, S), n_ctx <= 0 ? S : n_ctx};
            runner r2 = {t, where == 2 ? new_context(t, pick_n_ctx((unsigned)in->k[7] >> 4, S), S) : NULL, 0};
            if (r2.ctx) r2.n_ctx = context_n_ctx(r2.ctx);
            if (r1.ctx) run_passes(&r1, in, V);
            if (r2.ctx) run_passes(&r2, in, V);
            if (r1.ctx && r2.ctx) run_passes(&r1, in, V); /* again, after the other context ran */
            if (where == 3) {
                runner r0 = {t, NULL, S};
                run_passes(&r0, in, V);
            }
            free_context(r2.ctx);
            free_context(r1.ctx);
        }
    }
    llama2_transformer_free(t);
}

/* ---- target 1: tokenizer ----
 * k[0]: bits 0-1: the vocab_size argument: 0: -1, 1: k16 % 600, 2: k16, 3: hostile (k16 picks);
 *       bit 2: BOS, bit 3: EOS, bit 4: also encode an empty text
 * k[1], k[2]: k16 (little-endian)
 * k[3..7]: ids for llama2_decode / llama2_tokenizer_piece (pick_token) */
static void decode_all(llama2_tokenizer *tk, const int *tokens, int n, int vocab) {
    llama2_utf8_filter filter;
    llama2_utf8_filter_reset(&filter);
    int prev = LLAMA2_TOKEN_BOS;
    for (int i = 0; i < n; i++) {
        const char *piece = NULL;
        int len = -1;
        llama2_error err;
        reset_err(&err);
        int rc = check_status("llama2_decode", llama2_decode(tk, prev, tokens[i], &piece, &len, &err), &err);
        int in_range = tokens[i] >= 0 && tokens[i] < vocab;
        CHECK(rc == LLAMA2_OK || !in_range, "llama2_decode of token %d (vocab %d) failed: %s", tokens[i], vocab,
              err.message);
        CHECK(rc != LLAMA2_OK || in_range, "llama2_decode accepted token %d outside [0, %d)", tokens[i], vocab);
        if (rc == LLAMA2_OK) {
            CHECK(piece != NULL && len >= 0, "llama2_decode gave piece %p len %d", (const void *)piece, len);
            touch(piece, (size_t)len);
            char *buf = (char *)malloc((size_t)len + 4);
            CHECK(buf != NULL, "out of memory");
            int w = llama2_utf8_filter_push(&filter, piece, len, buf);
            CHECK(w >= 0 && w <= len + 4, "llama2_utf8_filter_push wrote %d bytes for %d", w, len);
            free(buf);
        }
        prev = tokens[i];
    }
}

static void run_tokenizer(const uint8_t *data, const fuzz_input *in) {
    const int k16 = in->k[1] | in->k[2] << 8;
    int vocab_arg;
    switch (in->k[0] & 3) {
    case 0: vocab_arg = -1; break;
    case 1: vocab_arg = k16 % 600; break;
    case 2: vocab_arg = k16; break;
    default: {
        const int hostile[8] = {0, 1, 2, 3, 258, 259, INT_MAX, INT_MIN};
        vocab_arg = hostile[k16 & 7];
    }
    }
    write_file(tok_path, data + in->tok.start, in->tok.len);
    llama2_error err;
    llama2_tokenizer *tk = NULL;
    reset_err(&err);
    int rc = check_status("llama2_tokenizer_open", llama2_tokenizer_open(&tk, tok_path, vocab_arg, &err), &err);
    unlink(tok_path);
    if (rc) {
        CHECK(tk == NULL, "llama2_tokenizer_open failed but set *out");
        return;
    }
    CHECK(tk != NULL, "llama2_tokenizer_open succeeded with *out == NULL");
    n_tokenizers_opened++;
    const int V = llama2_tokenizer_vocab_size(tk);
    CHECK(V >= 3, "tokenizer opened with vocab_size %d", V);
    CHECK(vocab_arg < 0 || V == vocab_arg, "tokenizer opened at vocab_size %d has %d tokens", vocab_arg, V);

    size_t len = in->text.len < MAX_TEXT ? in->text.len : MAX_TEXT;
    /* an exactly-sized copy of the text, so reading past it is caught */
    char *text = (char *)malloc(len ? len : 1);
    int *tokens = (int *)malloc((len + 3) * sizeof(int));
    CHECK(text && tokens, "out of memory");
    memcpy(text, data + in->text.start, len);
    for (int round = 0; round < ((in->k[0] & 16) ? 2 : 1); round++) {
        size_t n_text = round == 0 ? len : 0;
        int n = -1;
        reset_err(&err);
        rc = check_status("llama2_encode",
                          llama2_encode(tk, round == 0 ? text : NULL, n_text, (in->k[0] >> 2) & 1, (in->k[0] >> 3) & 1,
                                        tokens, &n, &err),
                          &err);
        if (rc) continue;
        n_encodes_ok++;
        CHECK(n >= 0 && (size_t)n <= n_text + 3, "llama2_encode produced %d tokens for %zu bytes", n, n_text);
        for (int i = 0; i < n; i++)
            CHECK(tokens[i] >= 0 && tokens[i] < V, "llama2_encode produced token %d (index %d of %d) outside [0, %d)",
                  tokens[i], i, n, V);
        decode_all(tk, tokens, n, V);
    }
    /* random and hostile ids, after each other and after BOS */
    int ids[10];
    for (int i = 0; i < 5; i++) ids[i] = pick_token(in->k[3 + i], V);
    for (int i = 5; i < 10; i++) ids[i] = pick_token(len > (size_t)(i - 5) ? (uint8_t)text[i - 5] : 0, V);
    decode_all(tk, ids, 10, V);
    for (int i = 0; i < 10; i++) {
        const char *piece = NULL;
        int plen = -1;
        float score = 0;
        reset_err(&err);
        rc = check_status("llama2_tokenizer_piece", llama2_tokenizer_piece(tk, ids[i], &piece, &plen, &score, &err),
                          &err);
        CHECK((rc == LLAMA2_OK) == (ids[i] >= 0 && ids[i] < V), "llama2_tokenizer_piece(%d) of %d tokens returned %d",
              ids[i], V, rc);
        if (rc == LLAMA2_OK) {
            CHECK(piece != NULL && plen >= 0, "llama2_tokenizer_piece gave piece %p len %d", (const void *)piece, plen);
            touch(piece, (size_t)plen + 1); /* NUL-terminated copies */
        }
    }
    free(text);
    free(tokens);
    llama2_tokenizer_free(tk);
}

/* ---- targets 2 and 3: model + tokenizer + sampler + session ----
 * k[0]: low nibble temperature, high nibble top-p (tables below; 0 = default)
 * k[1]: low nibble top-k, high nibble min-p
 * k[2]: low nibble repetition penalty, high nibble repetition window
 * k[3]: bits 0-2: steps - 1; bit 3: llama2_session_run (generate) or LLAMA2_MODE_CONVERSATION (chat:
 *       reply limit bits 0-2 minus 1, an earlier turn when bit 4 is set); bit 4: tokenizer opened with
 *       vocab_size -1 (else the model's); bit 5: stop strings; bit 6: stop at EOS; bit 7: steps 0 (= seq_len)
 * k[4..6]: sampler seed
 * k[7]: bit 0: the session runs in a new context (llama2_session_new_ctx), else the model's
 *       default context; bits 1-4: that context's n_ctx (pick_n_ctx) */
static const float temps[16] = {1.0f, 0.0f, 0.0f, 0.5f, 1.0f, 2.0f, 0.8f, 1e-6f, 1e-30f, 1e30f, NAN, -1.0f,
                                INFINITY, 1.0f, 0.0f, 1.0f};
static const float topps[16] = {0.9f, 0.0f, 1.0f, 0.5f, 0.99f, NAN, -0.5f, 1e-9f, 2.0f, 0.9f, 0.9f, 0.1f,
                                0.9f, 0.9f, 0.9f, 0.9f};
static const int topks[16] = {0, 1, 2, 5, 40, 300, 512, 100000, -1, 0, 0, 0, 0, 0, 0, 3};
static const float minps[16] = {0.0f, 0.05f, 0.5f, 1.0f, 2.0f, NAN, -0.1f, 1e-9f, 0.0f, 0.0f, 0.0f, 0.0f,
                                0.0f, 0.0f, 0.0f, 0.1f};
static const float penalties[16] = {1.0f, 1.3f, 0.5f, 0.0f, -1.0f, INFINITY, NAN, 1e30f, 1e-30f, 1.0f, 1.0f,
                                    1.0f, 1.0f, 1.0f, 1.0f, 2.0f};
static const int windows[16] = {0, 1, 3, 64, -1, 1000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2};

static void check_step(const llama2_step *st, int rc, int vocab) {
    CHECK(st->kind >= LLAMA2_STEP_ERROR && st->kind <= LLAMA2_STEP_NEED_INPUT, "step kind %d", st->kind);
    CHECK((rc != LLAMA2_OK) == (st->kind == LLAMA2_STEP_ERROR), "step returned %d with kind %d", rc, st->kind);
    if (rc) return;
    CHECK(st->text_len >= 0, "step text_len %d", st->text_len);
    if (st->text_len > 0) {
        CHECK(st->text != NULL, "step text NULL with text_len %d", st->text_len);
        touch(st->text, (size_t)st->text_len);
    }
    if (st->kind == LLAMA2_STEP_TOKEN)
        CHECK(st->next >= 0 && st->next < vocab && st->token >= 0 && st->token < vocab,
              "step token %d next %d outside [0, %d)", st->token, st->next, vocab);
}

static void run_full(const uint8_t *data, const fuzz_input *in) {
    const int chat = in->target == 3;
    llama2_error err;
    llama2_transformer *t = NULL;
    llama2_tokenizer *tk = NULL;
    llama2_sampler *s = NULL;
    llama2_session *ss = NULL;
    llama2_context *ctx = NULL;
    write_file(model_path, data + in->model.start, in->model.len);
    reset_err(&err);
    int open_rc = check_status("llama2_transformer_open",
                               llama2_transformer_open(&t, model_path, in->quantize ? LLAMA2_OPEN_QUANTIZE : 0, &err), &err);
    unlink(model_path);
    if (open_rc) return;
    const llama2_config *c = llama2_transformer_config(t);
    check_config(c, in->model.len);
    if (c->n_params > MAX_PARAMS) goto done;
    llama2_transformer_set_threads(t, in->threads);
    const int V = c->vocab_size;

    write_file(tok_path, data + in->tok.start, in->tok.len);
    reset_err(&err);
    int tok_rc = check_status("llama2_tokenizer_open",
                              llama2_tokenizer_open(&tk, tok_path, (in->k[3] & 16) ? -1 : V, &err), &err);
    unlink(tok_path);
    if (tok_rc) goto done;

    llama2_sampler_params p;
    llama2_sampler_params_default(&p);
    CHECK(p.temperature == 1.0f && p.topk == 0 && p.repetition_penalty == 1.0f, "sampler defaults changed");
    p.temperature = temps[in->k[0] & 15];
    p.topp = in->k[0] >> 4 ? topps[in->k[0] >> 4] : p.topp;
    p.topk = topks[in->k[1] & 15];
    p.minp = minps[in->k[1] >> 4];
    p.repetition_penalty = penalties[in->k[2] & 15];
    p.repetition_window = windows[in->k[2] >> 4];
    uint64_t seed = (uint64_t)in->k[4] | (uint64_t)in->k[5] << 8 | (uint64_t)in->k[6] << 16;
    reset_err(&err);
    if (check_status("llama2_sampler_new", llama2_sampler_new(&s, V, &p, seed, &err), &err)) goto done;

    size_t plen = in->text.len < MAX_PROMPT ? in->text.len : MAX_PROMPT;
    char *prompt = (char *)malloc(plen ? plen : 1);
    CHECK(prompt != NULL, "out of memory");
    memcpy(prompt, data + in->text.start, plen);
    int steps = (in->k[3] & 128) ? 0 : 1 + (in->k[3] & 7);
    int n_ctx = c->seq_len;
    const char *ptext = chat ? NULL : prompt;
    size_t ptext_len = chat ? 0 : plen;
    /* k[3] bit 3: in chat, the API's conversation mode instead of llama2.c's loop */
    const int conversation = chat && (in->k[3] & 8);
    const int mode = conversation ? LLAMA2_MODE_CONVERSATION : chat ? LLAMA2_MODE_CHAT : LLAMA2_MODE_GENERATE;
    int rc;
#ifndef LLAMA2_FUZZ_NO_CONTEXTS
    if (in->k[7] & 1) {
        int want = pick_n_ctx((unsigned)in->k[7] >> 1, c->seq_len);
        ctx = new_context(t, want, c->seq_len);
        if (!ctx) {
            free(prompt);
            goto done;
        }
        n_ctx = llama2_context_n_ctx(ctx);
        reset_err(&err);
        rc = check_status("llama2_session_new_ctx",
                          llama2_session_new_ctx(&ss, ctx, tk, s, mode, ptext, ptext_len, steps, &err), &err);
    } else
#endif
    {
        reset_err(&err);
        rc = check_status("llama2_session_new", llama2_session_new(&ss, t, tk, s, mode, ptext, ptext_len, steps, &err),
                          &err);
    }
    if (rc) {
        CHECK(ss == NULL, "session creation failed but set *out");
        free(prompt);
        goto done;
    }
    n_sessions++;
    if (conversation) {
        size_t half = plen / 2;
        reset_err(&err);
        check_status("llama2_session_set_reply_limit",
                     llama2_session_set_reply_limit(ss, (int)(in->k[3] & 7) - 1, &err), &err);
        if (in->k[3] & 16) { /* an earlier turn: system, user and reply cut from the prompt */
            reset_err(&err);
            check_status("llama2_session_chat_history",
                         llama2_session_chat_history(ss, prompt, half / 2, prompt + half / 2, half - half / 2,
                                                     prompt + half, plen - half, &err),
                         &err);
        }
    }
    if (!chat && (in->k[3] & (32 | 64))) {
        /* stop strings: pieces of the prompt's tail */
        const char *stops[2] = {prompt + plen / 2, prompt + plen - (plen > 0)};
        size_t lens[2] = {plen - plen / 2, plen > 0};
        int n_stops = (in->k[3] & 32) ? (plen > 1 ? 2 : plen > 0 ? 1 : 0) : 0;
        reset_err(&err);
        check_status("llama2_session_set_stops",
                     llama2_session_set_stops(ss, (in->k[3] >> 6) & 1, n_stops ? stops : NULL, lens, n_stops, &err),
                     &err);
    }
    if (!chat && (in->k[3] & 8) && steps > 0) {
        char *text = NULL;
        size_t tlen = 0;
        int n_steps = -1;
        reset_err(&err);
        rc = check_status("llama2_session_run", llama2_session_run(ss, &text, &tlen, &n_steps, &err), &err);
        if (rc == LLAMA2_OK) {
            CHECK(text != NULL && text[tlen] == '\0', "llama2_session_run text not terminated");
            CHECK(n_steps >= 0 && n_steps <= steps && n_steps <= n_ctx, "llama2_session_run ran %d steps of %d (n_ctx %d)",
                  n_steps, steps, n_ctx);
            touch(text, tlen);
            llama2_free(text);
        }
    } else {
        int turns = 0;
        for (int i = 0; i < MAX_SESSION_STEPS; i++) {
            llama2_step st;
            reset_err(&err);
            rc = check_status("llama2_session_step", llama2_session_step(ss, &st, &err), &err);
            check_step(&st, rc, V);
            if (rc || st.kind == LLAMA2_STEP_DONE) break;
            n_steps_ok++;
            if (st.kind == LLAMA2_STEP_NEED_INPUT) {
                CHECK(chat, "generate session asked for input");
                if (turns++ == 2) break;
                size_t half = plen / 2;
                if (conversation) {
                    reset_err(&err);
                    if (check_status("llama2_session_set_sampler", llama2_session_set_sampler(ss, s, &err), &err))
                        break;
                }
                reset_err(&err);
                rc = check_status("llama2_session_chat_input",
                                  llama2_session_chat_input(ss, turns == 1 ? prompt : NULL, half, prompt + half,
                                                            plen - half, &err),
                                  &err);
                if (rc) break;
            }
        }
        CHECK(llama2_session_pos(ss) >= 0 && llama2_session_pos(ss) <= n_ctx, "session pos %d of %d",
              llama2_session_pos(ss), n_ctx);
    }
    llama2_session_free(ss);
    free(prompt);
done:
    free_context(ctx);
    llama2_sampler_free(s);
    llama2_tokenizer_free(tk);
    llama2_transformer_free(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    init_temp_paths();
    fuzz_input in;
    if (!parse_input(data, size, &in)) return 0;
    switch (in.target) {
    case 0: run_model(data, &in); break;
    case 1: run_tokenizer(data, &in); break;
    default: run_full(data, &in); break;
    }
    return 0;
}

/* ======================================================================
 * Mutations (both builds): generic byte-level ones plus format-aware ones
 * that keep model files at the size their header implies and edit
 * tokenizer entries. The gcc driver uses them alone; the libFuzzer build
 * mixes them with libFuzzer's own (LLVMFuzzerCustomMutator).
 * ====================================================================== */

/* ---- random numbers (deterministic with -seed) ---- */

static uint64_t rng_state;
static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static size_t rnd_below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }
static int coin(int percent) { return (int)rnd_below(100) < percent; }

/* ---- corpus (the standalone driver's; empty under libFuzzer) ---- */

typedef struct {
    uint8_t *data;
    size_t size;
    size_t alloc_mb; /* what its run allocated: huge buffers are slow under ASan */
} unit;

static unit *corpus;
static size_t n_corpus;

/* ---- mutations ---- */

static const int32_t interesting32[] = {0, -1, 1, 2, 3, 4, 7, 8, 16, 32, 64, 100, 127, 128, 255, 256, 257, 258, 259,
                                        260, 512, 1000, 1024, 4096, 32767, 32768, 65535, 65536, 1 << 20, (1 << 22) - 1,
                                        1 << 22, (1 << 22) + 1, 1 << 24, 1 << 30, INT_MAX, INT_MAX - 1, INT_MIN,
                                        INT_MIN + 1, -2, -128, -256, -259, 0x616b3432};
static const uint8_t interesting8[] = {0, 0xff, 0x7f, 0x80, 1, 0xfe, 2, 3, 4, 0x20, 0x3c, 0x3e};

static uint32_t interesting_float_bits(void) {
    const float f[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e-45f, 1e-38f, 3.4028235e38f, -3.4028235e38f,
                       1e10f, -1e10f, 1.0f, -1.0f, 1e30f, 1e-5f, 10000.0f, 1e-11f, -1e11f};
    float v = f[rnd_below(sizeof(f) / sizeof(f[0]))];
    uint32_t bits;
    memcpy(&bits, &v, 4);
    return bits;
}

/* A growable buffer for building mutants. */
typedef struct {
    uint8_t *d;
    size_t n, cap, max;
} buffer;

static void buf_reserve(buffer *b, size_t n) {
    if (n <= b->cap) return;
    size_t c = b->cap ? b->cap : 256;
    while (c < n) c *= 2;
    b->d = (uint8_t *)realloc(b->d, c);
    CHECK(b->d != NULL, "out of memory");
    b->cap = c;
}

static void buf_set(buffer *b, const uint8_t *d, size_t n) {
    buf_reserve(b, n);
    memcpy(b->d, d, n);
    b->n = n;
}

/* Inserts k bytes at pos (filled by the caller) */
static uint8_t *buf_insert(buffer *b, size_t pos, size_t k) {
    buf_reserve(b, b->n + k);
    memmove(b->d + pos + k, b->d + pos, b->n - pos);
    b->n += k;
    return b->d + pos;
}

static void buf_erase(buffer *b, size_t pos, size_t k) {
    memmove(b->d + pos, b->d + pos + k, b->n - pos - k);
    b->n -= k;
}

/* Keeps the u32 length field of the section holding pos in step with a
 * size change there (most of the time: stale lengths are worth a try too). */
static void fix_length(buffer *b, const fuzz_input *in, size_t pos, long delta) {
    if (!coin(85)) return;
    const size_t lp[2] = {in->model_lenpos, in->tok_lenpos};
    const span sp[2] = {in->model, in->tok};
    for (int i = 0; i < 2; i++) {
        if (lp[i] == SIZE_MAX || pos < sp[i].start || pos > sp[i].start + sp[i].len) continue;
        if (lp[i] + 4 > b->n) continue;
        wr_u32(b->d + lp[i], (uint32_t)((long)rd_u32(b->d + lp[i]) + delta));
        return;
    }
}

/* A random span of the input to aim at: a section, or anywhere. */
static span pick_region(const buffer *b, const fuzz_input *in) {
    span all = {0, b->n};
    int r = (int)rnd_below(4);
    if (r == 0 && in->model.len) return in->model;
    if (r == 1 && in->tok.len) return in->tok;
    if (r == 2 && in->text.len) return in->text;
    return all;
}

/* Header-aware: set a model dimension and resize the body to what the header
 * now implies (zeros, random bytes or NaNs), keeping the section length. */
static int64_t model_expected_size(const int32_t *dims, int version, int shared, int gs, int64_t header) {
    int64_t d = dims[0], h = dims[1], L = dims[2], nh = dims[3], nkv = dims[4], V = dims[5], S = dims[6];
    if (d <= 0 || h <= 0 || L <= 0 || nh <= 0 || nkv <= 0 || V <= 0 || S <= 0) return -1;
    if (d % nh || nh % nkv) return -1;
    int64_t hs = d / nh, kv = hs * nkv, unshared = shared ? 0 : 1;
    if (d > 4096 || h > 1 << 16 || L > 64 || V > 1 << 20) return -1;
    if (version == 0) return header + 4 * (V * d + 2 * L * d + 2 * L * d * d + 2 * L * kv * d + 3 * L * h * d + d +
                                           S * hs + unshared * V * d);
    int64_t norms = 2 * L * d + d, matrix = V * d + L * (2 * d * d + 2 * kv * d + 3 * h * d) + unshared * V * d;
    if (version == 2) {
        if (gs <= 0 || d % gs) return -1;
        int64_t nm = matrix; /* every matrix's size is a multiple of d, so of gs */
        return header + 4 * norms + nm + 4 * (nm / gs);
    }
    if (version == 4) return header + 4 * norms + 2 * matrix;
    return header + 4 * (norms + matrix);
}

static int mutate_model_header(buffer *b, const fuzz_input *in, size_t max_len) {
    if (in->model.len < 28) return 0;
    uint8_t *m = b->d + in->model.start;
    int versioned = rd_u32(m) == 0x616b3432u;
    if (versioned && in->model.len < 256) return 0;
    size_t doff = versioned ? 8 : 0;
    int32_t dims[7];
    for (int i = 0; i < 7; i++) dims[i] = (int32_t)rd_u32(m + doff + 4 * i);
    int version = versioned ? (int32_t)rd_u32(m + 4) : 0;
    int shared = versioned ? m[36] : dims[5] > 0;
    int gs = version == 2 ? (int32_t)rd_u32(m + 37) : 0;
    if (version == 0 && dims[5] < 0 && dims[5] != INT_MIN) dims[5] = -dims[5];
    int field = (int)rnd_below(9);
    if (field < 7) {
        const int32_t small[] = {1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 3, 5, 255, 256, 258, 259, 260, 300, 512};
        int32_t v = coin(75) ? small[rnd_below(sizeof(small) / sizeof(small[0]))]
                             : interesting32[rnd_below(sizeof(interesting32) / sizeof(interesting32[0]))];
        if (coin(20)) v = (int32_t)((uint32_t)dims[field] + (uint32_t)rnd_below(5) - 2u);
        dims[field] = v;
    } else if (field == 7 && versioned) {
        shared = !shared;
    } else if (version == 2) {
        const int32_t g[] = {1, 2, 4, 8, 16, 32, 64, 3, 0, -1};
        gs = g[rnd_below(sizeof(g) / sizeof(g[0]))];
    } else {
        return 0;
    }
    int64_t want = model_expected_size(dims, version, shared, gs, versioned ? 256 : 28);
    if (versioned) {
        for (int i = 0; i < 7; i++) wr_u32(m + 8 + 4 * i, (uint32_t)dims[i]);
        m[36] = (uint8_t)shared;
        if (version == 2) wr_u32(m + 37, (uint32_t)gs);
    } else {
        for (int i = 0; i < 7; i++) wr_u32(m + 4 * i, i == 5 && !shared ? 0u - (uint32_t)dims[5] : (uint32_t)dims[i]);
    }
    if (want < 0 || (size_t)want > in->model.len + (max_len - b->n) || !coin(90)) return 1; /* header only */
    /* resize the body to the implied size */
    size_t end = in->model.start + in->model.len;
    long delta = (long)want - (long)in->model.len;
    if (delta > 0) {
        uint8_t *p = buf_insert(b, end, (size_t)delta);
        int fill = (int)rnd_below(4);
        for (long i = 0; i < delta; i++) {
            if (fill == 0) p[i] = 0;
            else if (fill == 1) p[i] = (uint8_t)rnd();
            else p[i] = (uint8_t)((i & 3) == 3 ? 0x3c : (i & 3) == 2 ? 0x23 : 0xd7); /* ~0.01 */
        }
        if (fill == 3 && delta >= 4) { /* and a NaN or Inf somewhere */
            uint32_t bits = interesting_float_bits();
            wr_u32(p + (rnd_below((size_t)delta / 4)) * 4, bits);
        }
    } else if (delta < 0) {
        buf_erase(b, end + (size_t)delta, (size_t)-delta);
    }
    if (in->model_lenpos != SIZE_MAX) wr_u32(b->d + in->model_lenpos, (uint32_t)want);
    return 1;
}

/* Tokenizer-aware: edit one entry, or cut the vocabulary at an entry. */
static int mutate_tokenizer(buffer *b, const fuzz_input *in, size_t max_len) {
    if (in->tok.len < 4) return 0;
    uint8_t *t = b->d + in->tok.start;
    size_t n = in->tok.len;
    /* entry offsets */
    size_t offs[1024];
    int count = 0;
    size_t off = 4;
    while (off + 8 <= n && count < 1024) {
        int32_t len = (int32_t)rd_u32(t + off + 4);
        if (len < 0 || (size_t)len > n - off - 8) break;
        offs[count++] = off;
        off += 8 + (size_t)len;
    }
    int op = (int)rnd_below(7);
    if (op == 0 || count == 0) { /* max_token_length */
        wr_u32(t, (uint32_t)interesting32[rnd_below(sizeof(interesting32) / sizeof(interesting32[0]))]);
        return 1;
    }
    size_t e = offs[rnd_below((size_t)count)];
    int32_t elen = (int32_t)rd_u32(t + e + 4);
    switch (op) {
    case 1: /* score */
        wr_u32(t + e, coin(50) ? interesting_float_bits() : (uint32_t)rnd());
        return 1;
    case 2: /* length field (breaks the layout after it) */
        wr_u32(t + e + 4, (uint32_t)interesting32[rnd_below(sizeof(interesting32) / sizeof(interesting32[0]))]);
        return 1;
    case 3: { /* cut the vocabulary after some entry */
        size_t cut = in->tok.start + e;
        size_t drop = in->tok.start + in->tok.len - cut;
        buf_erase(b, cut, drop);
        if (in->tok_lenpos != SIZE_MAX) wr_u32(b->d + in->tok_lenpos, (uint32_t)(cut - in->tok.start));
        return 1;
    }
    case 4: { /* the piece becomes a byte token <0xHH> (or a broken one) */
        const char *forms[] = {"<0x%02X>", "<0x%X>", "<0x%02x", "<0x", "<0xZZ>", "<0x%02X%02X>"};
        char piece[16];
        int v = (int)rnd_below(256);
        int len = snprintf(piece, sizeof(piece), forms[rnd_below(6)], v, v);
        size_t at = in->tok.start + e + 8;
        if (b->n + (size_t)len > max_len) return 0;
        buf_erase(b, at, (size_t)elen);
        memcpy(buf_insert(b, at, (size_t)len), piece, (size_t)len);
        wr_u32(b->d + in->tok.start + e + 4, (uint32_t)len);
        if ((uint32_t)len > rd_u32(b->d + in->tok.start)) wr_u32(b->d + in->tok.start, (uint32_t)len);
        if (in->tok_lenpos != SIZE_MAX)
            wr_u32(b->d + in->tok_lenpos, (uint32_t)(in->tok.len + (size_t)len - (size_t)elen));
        return 1;
    }
    case 5: { /* duplicate an entry at the end */
        size_t elen_all = 8 + (size_t)elen;
        if (b->n + elen_all > max_len) return 0;
        size_t end = in->tok.start + off;
        uint8_t *p = buf_insert(b, end, elen_all);
        memcpy(p, b->d + in->tok.start + e, elen_all);
        if (in->tok_lenpos != SIZE_MAX) wr_u32(b->d + in->tok_lenpos, (uint32_t)(in->tok.len + elen_all));
        return 1;
    }
    default: /* a piece's bytes from the text or random */
        for (int32_t i = 0; i < elen; i++)
            t[e + 8 + (size_t)i] = in->text.len && coin(50) ? b->d[in->text.start + rnd_below(in->text.len)]
                                                            : (uint8_t)rnd();
        return 1;
    }
}

static void mutate(buffer *b, size_t max_len) {
    int n_mut = 1 + (int)rnd_below(coin(50) ? 2 : 6);
    for (int m = 0; m < n_mut; m++) {
        fuzz_input in;
        parse_input(b->d, b->n, &in);
        int op = (int)rnd_below(16);
        if (b->n == 0) op = 9;
        span r = pick_region(b, &in);
        if (r.len == 0) r.start = 0, r.len = b->n;
        size_t pos = r.start + rnd_below(r.len);
        switch (op) {
        case 0: /* bit flip */
            b->d[pos] ^= (uint8_t)(1u << rnd_below(8));
            break;
        case 1: /* interesting byte */
            b->d[pos] = interesting8[rnd_below(sizeof(interesting8))];
            break;
        case 2: /* random byte */
            b->d[pos] = (uint8_t)rnd();
            break;
        case 3:
        case 4: { /* interesting int32, often aligned to its section */
            if (coin(70) && pos >= r.start) pos = r.start + (pos - r.start) / 4 * 4;
            if (coin(50) && r.len > 0) pos = r.start + 4 * rnd_below(r.len < 64 ? (r.len + 3) / 4 : 16);
            if (pos + 4 > b->n) break;
            uint32_t v = op == 3 ? (uint32_t)interesting32[rnd_below(sizeof(interesting32) / sizeof(interesting32[0]))]
                                 : interesting_float_bits();
            wr_u32(b->d + pos, v);
            break;
        }
        case 5: { /* int32 plus or minus a little */
            if (pos + 4 > b->n) break;
            wr_u32(b->d + pos, rd_u32(b->d + pos) + (uint32_t)((int)rnd_below(33) - 16));
            break;
        }
        case 6: { /* insert bytes */
            size_t k = 1 + rnd_below(coin(80) ? 8 : 256);
            if (b->n + k > max_len) break;
            uint8_t *p = buf_insert(b, pos, k);
            uint8_t fill = (uint8_t)rnd();
            int same = coin(50);
            for (size_t i = 0; i < k; i++) p[i] = same ? fill : (uint8_t)rnd();
            fix_length(b, &in, pos, (long)k);
            break;
        }
        case 7: { /* delete bytes */
            size_t k = 1 + rnd_below(coin(80) ? 8 : 256);
            if (pos + k > b->n) k = b->n - pos;
            buf_erase(b, pos, k);
            fix_length(b, &in, pos, -(long)k);
            break;
        }
        case 8: /* truncate */
            b->n = pos;
            break;
        case 9: { /* extend */
            size_t k = 1 + rnd_below(coin(70) ? 16 : 1024);
            if (b->n + k > max_len) break;
            uint8_t *p = buf_insert(b, b->n, k);
            int zero = coin(50);
            for (size_t i = 0; i < k; i++) p[i] = zero ? 0 : (uint8_t)rnd();
            break;
        }
        case 10: { /* splice with another unit (libFuzzer does its own crossover) */
            if (n_corpus == 0) break;
            const unit *o = &corpus[rnd_below(n_corpus)];
            if (o->size == 0) break;
            size_t from = rnd_below(o->size);
            size_t keep = rnd_below(b->n + 1);
            size_t k = o->size - from;
            if (keep + k > max_len) k = max_len - keep;
            b->n = keep;
            buf_reserve(b, keep + k);
            memcpy(b->d + keep, o->data + from, k);
            b->n = keep + k;
            break;
        }
        case 11: { /* copy a chunk within */
            size_t k = 1 + rnd_below(32);
            size_t from = rnd_below(b->n);
            if (from + k > b->n) k = b->n - from;
            if (pos + k > b->n) k = b->n - pos;
            memmove(b->d + pos, b->d + from, k);
            break;
        }
        case 12: /* the selector */
            b->d[0] = coin(50) ? (uint8_t)((b->d[0] & ~3u) | rnd_below(4)) : (uint8_t)(b->d[0] ^ (4u << rnd_below(2)));
            break;
        case 13: /* a knob */
            if (b->n >= PREFIX_BYTES) b->d[1 + rnd_below(KNOB_BYTES)] = (uint8_t)rnd();
            break;
        case 14:
            if (!mutate_model_header(b, &in, max_len)) b->d[pos] ^= 1;
            break;
        default:
            if (!mutate_tokenizer(b, &in, max_len)) b->d[pos] ^= 2;
            break;
        }
        if (b->n == 0) {
            buf_reserve(b, 1);
            b->d[0] = (uint8_t)rnd();
            b->n = 1;
        }
    }
    if (b->n > max_len) b->n = max_len;
}

#ifdef LLAMA2_LIBFUZZER
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed);

/* Half of the time libFuzzer's own mutations (they learn from comparisons),
 * else ours, which know the file formats. */
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
    if (size == 0 || max_size < PREFIX_BYTES || coin(50)) return LLVMFuzzerMutate(data, size, max_size);
    static buffer b;
    buf_set(&b, data, size);
    mutate(&b, max_size);
    memcpy(data, b.d, b.n);
    return b.n;
}
#else /* the standalone driver */

/* Sanitizer defaults (the environment's ASAN_OPTIONS / UBSAN_OPTIONS still
 * win). gcc links UBSan apart from ASan, so ASan's death callback does not
 * see UBSan's reports: aborting lets the SIGABRT handler keep the input. The
 * library must turn a failed allocation into LLAMA2_ERR_NOMEM, so failed
 * allocations return NULL instead of being reported. */
const char *__ubsan_default_options(void);
const char *__ubsan_default_options(void) { return "halt_on_error=1:abort_on_error=1:print_stacktrace=1"; }
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1:detect_leaks=1"; }
/* ---- coverage feedback from -fsanitize-coverage=trace-pc (gcc) ----
 * The Makefile instruments the library's parsing code (not the matmul
 * kernels, where a callback per basic block would cost most of the time).
 * Edges hash into a bitmap of hit-count buckets, as AFL does; an input that
 * sets a new bucket bit joins the corpus. */
#define COV_BITS 16
#define COV_SIZE (1u << COV_BITS)
static uint8_t cov_hits[COV_SIZE];
static uint8_t cov_seen[COV_SIZE];
static __thread uintptr_t cov_prev;
static unsigned long long cov_calls;

void __sanitizer_cov_trace_pc(void);
void __sanitizer_cov_trace_pc(void) {
    /* relative to this function, so the same edges hash alike under ASLR */
    uintptr_t pc = (uintptr_t)__builtin_return_address(0) - (uintptr_t)&__sanitizer_cov_trace_pc;
    pc = (pc ^ (pc >> COV_BITS)) * 0x9E3779B1u;
    uintptr_t cur = pc >> 7;
    cov_hits[(cur ^ cov_prev) & (COV_SIZE - 1)]++;
    cov_prev = cur >> 1;
    cov_calls++;
}

static uint8_t bucket(uint8_t hits) {
    if (hits == 0) return 0;
    if (hits <= 3) return (uint8_t)(1u << (hits - 1)); /* 1, 2, 4 */
    if (hits <= 7) return 8;
    if (hits <= 15) return 16;
    if (hits <= 31) return 32;
    if (hits <= 127) return 64;
    return 128;
}

/* Folds the last run's hits into the seen map: the number of new bucket bits. */
static int cov_merge(void) {
    int fresh = 0;
    const uint64_t *w = (const uint64_t *)cov_hits;
    for (size_t i = 0; i < COV_SIZE / 8; i++) {
        if (!w[i]) continue;
        for (size_t j = i * 8; j < i * 8 + 8; j++) {
            uint8_t b = bucket(cov_hits[j]);
            if (b & ~cov_seen[j]) {
                cov_seen[j] |= b;
                fresh++;
            }
        }
    }
    memset(cov_hits, 0, sizeof(cov_hits));
    return fresh;
}

static size_t cov_edges(void) {
    size_t n = 0;
    for (size_t i = 0; i < COV_SIZE; i++) n += cov_seen[i] != 0;
    return n;
}

static size_t cap_corpus, n_seeds, corpus_bytes;
#define MAX_CORPUS 4096
#define MAX_CORPUS_BYTES ((size_t)512 << 20)

static void corpus_add(const uint8_t *d, size_t n) {
    if (n_corpus == MAX_CORPUS || corpus_bytes + n > MAX_CORPUS_BYTES) return;
    if (n_corpus == cap_corpus) {
        cap_corpus = cap_corpus ? 2 * cap_corpus : 64;
        corpus = (unit *)realloc(corpus, cap_corpus * sizeof(unit));
        CHECK(corpus != NULL, "out of memory");
    }
    uint8_t *copy = (uint8_t *)malloc(n ? n : 1);
    CHECK(copy != NULL, "out of memory");
    memcpy(copy, d, n);
    corpus[n_corpus].data = copy;
    corpus[n_corpus].size = n;
    corpus[n_corpus].alloc_mb = 0;
    n_corpus++;
    corpus_bytes += n;
}

static int read_whole(const char *path, size_t max_len, uint8_t **out, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t cap = 4096, n = 0;
    uint8_t *buf = (uint8_t *)malloc(cap);
    while (buf) {
        size_t want = cap - n;
        size_t got = fread(buf + n, 1, want, f);
        n += got;
        if (got < want) break;
        uint8_t *grown = (uint8_t *)realloc(buf, cap * 2);
        if (!grown) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = grown;
        cap *= 2;
    }
    fclose(f);
    if (!buf) return 0;
    if (n > max_len) n = max_len;
    *out = buf;
    *size = n;
    return 1;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The regular files of a directory, sorted by name (so runs are reproducible). */
static char **list_dir(const char *dir, size_t *count) {
    DIR *d = opendir(dir);
    *count = 0;
    if (!d) return NULL;
    char **names = NULL;
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        char *path = (char *)malloc(len);
        CHECK(path != NULL, "out of memory");
        snprintf(path, len, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
            free(path);
            continue;
        }
        if (*count == cap) {
            cap = cap ? 2 * cap : 64;
            names = (char **)realloc(names, cap * sizeof(char *));
            CHECK(names != NULL, "out of memory");
        }
        names[(*count)++] = path;
    }
    closedir(d);
    if (*count) qsort(names, *count, sizeof(char *), cmp_str);
    return names;
}
/* ---- crash artifacts and watchdog ---- */

static const char *artifact_prefix = "./";
static char inflight_path[1024];
static int inflight_fd = -1;
static const uint8_t *cur_data;
static size_t cur_size;
static volatile int in_run;
static volatile long long run_started_ms;
static int timeout_s = 30, rss_limit_mb = 2048;
static pthread_t main_thread;
static volatile int watchdog_reason; /* 1 timeout, 2 rss */
static volatile long watchdog_rss_mb;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t hash64(const uint8_t *d, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= d[i];
        h *= 1099511628211ull;
    }
    return h ^ (uint64_t)n;
}

/* Writes the input of the current run out under prefix + kind-<hash>. */
static void save_artifact(const char *kind) {
    if (!cur_data) return;
    char path[1200];
    snprintf(path, sizeof(path), "%s%s-%016llx", artifact_prefix, kind, (unsigned long long)hash64(cur_data, cur_size));
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        size_t off = 0;
        while (off < cur_size) {
            ssize_t w = write(fd, cur_data + off, cur_size - off);
            if (w <= 0) break;
            off += (size_t)w;
        }
        close(fd);
        fprintf(stderr, "artifact_prefix='%s'; Test unit written to %s\n", artifact_prefix, path);
        if (inflight_path[0]) unlink(inflight_path);
    } else {
        fprintf(stderr, "fuzz_llama2: cannot write %s: %s (the input is in %s)\n", path, strerror(errno),
                inflight_path);
    }
    fflush(stderr);
}

static void on_death(void) {
    if (!in_run) return;
    in_run = 0;
    save_artifact("crash");
    remove_temp_files();
}

/* A signal to the main thread when a run goes on too long or takes too much
 * memory: print where it is, keep the input, exit. */
static void on_watchdog_signal(int sig) {
    (void)sig;
    if (watchdog_reason == 1)
        fprintf(stderr, "==%d== ERROR: fuzz_llama2: timeout: one input ran for more than %d seconds\n", (int)getpid(),
                timeout_s);
    else
        fprintf(stderr, "==%d== ERROR: fuzz_llama2: out-of-memory (used: %ldMb; exceeds: %dMb)\n", (int)getpid(),
                watchdog_rss_mb, rss_limit_mb);
    if (__sanitizer_print_stack_trace) __sanitizer_print_stack_trace();
    in_run = 0;
    save_artifact(watchdog_reason == 1 ? "timeout" : "oom");
    remove_temp_files();
    _exit(watchdog_reason == 1 ? 70 : 71);
}

static long rss_mb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    long pages_total = 0, pages_rss = 0;
    if (fscanf(f, "%ld %ld", &pages_total, &pages_rss) != 2) pages_rss = 0;
    fclose(f);
    return pages_rss * (sysconf(_SC_PAGESIZE) / 1024) / 1024;
}

static void *watchdog(void *arg) {
    (void)arg;
    for (;;) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (!in_run || watchdog_reason) continue;
        long rss = rss_limit_mb > 0 ? rss_mb() : 0;
        if (rss_limit_mb > 0 && rss > rss_limit_mb) {
            watchdog_rss_mb = rss;
            watchdog_reason = 2;
        } else if (timeout_s > 0 && now_ms() - run_started_ms > (long long)timeout_s * 1000) {
            watchdog_reason = 1;
        }
        if (watchdog_reason) pthread_kill(main_thread, SIGUSR2);
    }
    return NULL;
}

/* Leak check per run, as libFuzzer does: when a run allocated more blocks than it freed. */
static volatile long long n_mallocs, n_frees;
static volatile unsigned long long run_alloc_bytes;
static void count_malloc(const volatile void *p, size_t n) {
    (void)p;
    if (in_run) {
        __atomic_add_fetch(&n_mallocs, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&run_alloc_bytes, (unsigned long long)n, __ATOMIC_RELAXED);
    }
}
static void count_free(const volatile void *p) {
    (void)p;
    if (in_run) __atomic_add_fetch(&n_frees, 1, __ATOMIC_RELAXED);
}
static int detect_leaks = 1;

static void fatal_signal(int sig) {
    fprintf(stderr, "==%d== ERROR: fuzz_llama2: deadly signal %d\n", (int)getpid(), sig);
    on_death();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void write_inflight(const uint8_t *d, size_t n) {
    if (inflight_fd < 0) return;
    if (ftruncate(inflight_fd, 0) != 0) return;
    size_t off = 0;
    while (off < n) {
        ssize_t w = pwrite(inflight_fd, d + off, n - off, (off_t)off);
        if (w <= 0) return;
        off += (size_t)w;
    }
}

static unsigned long long total_runs;

/* Runs one input with the crash bookkeeping around it; returns the number
 * of new coverage bits. */
static int execute(const uint8_t *d, size_t n) {
    cur_data = d;
    cur_size = n;
    write_inflight(d, n);
    n_mallocs = n_frees = 0;
    run_alloc_bytes = 0;
    run_started_ms = now_ms();
    cov_prev = 0;
    in_run = 1;
    LLVMFuzzerTestOneInput(d, n);
    in_run = 0;
    if (detect_leaks && __lsan_do_recoverable_leak_check && n_mallocs != n_frees) {
        in_run = 1; /* a leak report is a crash of this input */
        if (__lsan_do_recoverable_leak_check()) {
            fprintf(stderr, "==%d== ERROR: fuzz_llama2: the input above leaked memory\n", (int)getpid());
            in_run = 0;
            save_artifact("leak");
            remove_temp_files();
            _exit(72);
        }
        in_run = 0;
    }
    total_runs++;
    return cov_merge();
}

static int parse_flag(int argc, char **argv, int *i, const char *name, const char **value) {
    size_t len = strlen(name);
    const char *a = argv[*i];
    if (a[0] != '-' || strncmp(a + 1, name, len) != 0) return 0;
    if (a[1 + len] == '=') {
        *value = a + 2 + len;
        return 1;
    }
    if (a[1 + len] == '\0' && *i + 1 < argc) {
        *value = argv[++*i];
        return 1;
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: fuzz_llama2 [-runs=N] [-max_total_time=S] [-seed=X] [-max_len=N] [-timeout=S]\n"
            "                   [-rss_limit_mb=MB] [-detect_leaks=0|1] [-artifact_prefix=DIR/]\n"
            "                   [-print_final_stats=1] CORPUS_DIR... | FILE...\n"
            "Seeds in the directories run once each, then mutants until -runs or -max_total_time\n"
            "(-runs=0: the seeds only). FILE arguments are reproducers: each runs once.\n");
}

int main(int argc, char **argv) {
    long long runs = -1, max_total_time = 0;
    uint64_t seed = 0;
    size_t max_len = 0;
    int print_stats = 1;
    const char **paths = (const char **)calloc((size_t)argc + 1, sizeof(char *));
    int n_paths = 0;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (parse_flag(argc, argv, &i, "runs", &v)) runs = atoll(v);
        else if (parse_flag(argc, argv, &i, "max_total_time", &v)) max_total_time = atoll(v);
        else if (parse_flag(argc, argv, &i, "seed", &v)) seed = strtoull(v, NULL, 0);
        else if (parse_flag(argc, argv, &i, "max_len", &v)) max_len = (size_t)atoll(v);
        else if (parse_flag(argc, argv, &i, "timeout", &v)) timeout_s = atoi(v);
        else if (parse_flag(argc, argv, &i, "rss_limit_mb", &v)) rss_limit_mb = atoi(v);
        else if (parse_flag(argc, argv, &i, "detect_leaks", &v)) detect_leaks = atoi(v);
        else if (parse_flag(argc, argv, &i, "artifact_prefix", &v)) artifact_prefix = v;
        else if (parse_flag(argc, argv, &i, "print_final_stats", &v)) print_stats = atoi(v);
        else if (strcmp(argv[i], "-help") == 0 || strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage();
            return 0;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "fuzz_llama2: unknown option %s\n", argv[i]);
            usage();
            return 2;
        } else {
            paths[n_paths++] = argv[i];
        }
    }
    if (n_paths == 0) {
        usage();
        return 2;
    }
    if (seed == 0) seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    rng_state = seed;
    fprintf(stderr, "INFO: Seed: %llu\n", (unsigned long long)seed);

    main_thread = pthread_self();
    init_temp_paths();
    if (__sanitizer_set_death_callback) {
        __sanitizer_set_death_callback(on_death);
    } else {
        signal(SIGSEGV, fatal_signal);
        signal(SIGBUS, fatal_signal);
        signal(SIGFPE, fatal_signal);
        signal(SIGILL, fatal_signal);
    }
    signal(SIGABRT, fatal_signal); /* the harness's own CHECKs */
    signal(SIGPIPE, SIG_IGN);      /* a closed stderr pipe must not kill a report half-way */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_watchdog_signal;
    sigaction(SIGUSR2, &sa, NULL);
    if (__sanitizer_install_malloc_and_free_hooks) __sanitizer_install_malloc_and_free_hooks(count_malloc, count_free);
    pthread_t wd;
    pthread_create(&wd, NULL, watchdog, NULL);
    pthread_detach(wd);

    /* arguments: files to reproduce, or corpus directories */
    int n_dirs = 0;
    for (int i = 0; i < n_paths; i++) {
        struct stat st;
        if (stat(paths[i], &st) != 0) {
            fprintf(stderr, "fuzz_llama2: %s: %s\n", paths[i], strerror(errno));
            return 2;
        }
        n_dirs += S_ISDIR(st.st_mode) ? 1 : 0;
    }
    size_t read_limit = max_len ? max_len : (size_t)64 << 20;
    if (n_dirs == n_paths) { /* fuzzing: each input goes to disk before it runs (reproducers are files already) */
        snprintf(inflight_path, sizeof(inflight_path), "%s.inflight-%d", artifact_prefix, (int)getpid());
        inflight_fd = open(inflight_path, O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (inflight_fd < 0) inflight_path[0] = '\0';
    }

    if (n_dirs < n_paths) { /* reproducer mode */
        for (int i = 0; i < n_paths; i++) {
            uint8_t *d;
            size_t n;
            if (!read_whole(paths[i], read_limit, &d, &n)) {
                fprintf(stderr, "fuzz_llama2: cannot read %s\n", paths[i]);
                return 2;
            }
            fprintf(stderr, "Running: %s\n", paths[i]);
            execute(d, n);
            fprintf(stderr, "Executed %s in %lld ms\n", paths[i], now_ms() - run_started_ms);
            free(d);
        }
        if (inflight_fd >= 0) {
            close(inflight_fd);
            unlink(inflight_path);
        }
        free(paths);
        return 0;
    }

    long long t0 = now_ms();
    size_t largest = 0;
    for (int i = 0; i < n_paths; i++) {
        size_t count;
        char **names = list_dir(paths[i], &count);
        for (size_t j = 0; j < count; j++) {
            uint8_t *d;
            size_t n;
            if (read_whole(names[j], read_limit, &d, &n)) {
                corpus_add(d, n);
                if (n > largest) largest = n;
                free(d);
            }
            free(names[j]);
        }
        free(names);
    }
    n_seeds = n_corpus;
    if (!max_len) max_len = largest > 4096 ? largest + largest / 8 : 4096;
    fprintf(stderr, "INFO: %zu seed inputs, largest %zu bytes, -max_len=%zu\n", n_seeds, largest, max_len);
    if (n_seeds == 0) {
        corpus_add((const uint8_t *)"\0", 1);
        fprintf(stderr, "INFO: empty corpus: starting from one zero byte\n");
    }
    for (size_t i = 0; i < n_seeds; i++) {
        execute(corpus[i].data, corpus[i].size);
        corpus[i].alloc_mb = (size_t)(run_alloc_bytes >> 20);
    }
    fprintf(stderr, "#%llu\tINITED cov: %zu corp: %zu exec/s: %.0f\n", total_runs, cov_edges(), n_corpus,
            total_runs * 1000.0 / (double)(now_ms() - t0 + 1));

    buffer b = {0};
    long long t1 = now_ms();
    unsigned long long mutants = 0, next_pulse = 1024;
    long long next_time_pulse = t1 + 10000;
    while (runs < 0 || (long long)mutants < runs) {
        long long now = now_ms();
        if (max_total_time > 0 && now - t0 >= max_total_time * 1000) break;
        /* units that allocate gigabytes (huge seq_len: ASan poisons the shadow of
         * every freed byte, seconds a run) are mutated less often; decided by
         * bytes, not time, so that -seed stays deterministic */
        const unit *u = &corpus[rnd_below(n_corpus)];
        for (int tries = 0; tries < 4 && u->alloc_mb > 256 && coin(95); tries++) u = &corpus[rnd_below(n_corpus)];
        buf_set(&b, u->data, u->size);
        mutate(&b, max_len);
        int fresh = execute(b.d, b.n);
        mutants++;
        if (fresh) {
            corpus_add(b.d, b.n);
            if (n_corpus) corpus[n_corpus - 1].alloc_mb = (size_t)(run_alloc_bytes >> 20);
            if (mutants >= next_pulse / 4)
                fprintf(stderr, "#%llu\tNEW cov: %zu corp: %zu len: %zu\n", total_runs, cov_edges(), n_corpus, b.n);
        }
        if (mutants == next_pulse || now >= next_time_pulse) {
            if (mutants == next_pulse) next_pulse *= 2;
            if (now >= next_time_pulse) next_time_pulse = now + 10000;
            fprintf(stderr, "#%llu\tpulse cov: %zu corp: %zu exec/s: %.0f\n", total_runs, cov_edges(), n_corpus,
                    mutants * 1000.0 / (double)(now - t1 + 1));
        }
    }
    double secs = (double)(now_ms() - t0) / 1000.0;
    fprintf(stderr, "Done %llu runs in %.0f second(s)\n", total_runs, secs);
    if (print_stats) {
        fprintf(stderr, "stat::number_of_executed_units: %llu\n", total_runs);
        fprintf(stderr, "stat::number_of_mutants: %llu\n", mutants);
        fprintf(stderr, "stat::average_exec_per_sec: %.0f\n", secs > 0 ? (double)total_runs / secs : 0.0);
        fprintf(stderr, "stat::coverage_edges: %zu\n", cov_edges());
        fprintf(stderr, "stat::corpus_units: %zu\n", n_corpus);
        fprintf(stderr, "stat::rss_mb: %ld\n", rss_mb());
        fprintf(stderr, "stat::models_opened: %llu\nstat::forward_passes: %llu\n", n_models_opened, n_forwards_ok);
        fprintf(stderr, "stat::tokenizers_opened: %llu\nstat::encodes: %llu\n", n_tokenizers_opened, n_encodes_ok);
        fprintf(stderr, "stat::sessions: %llu\nstat::session_steps: %llu\n", n_sessions, n_steps_ok);
    }
    free(b.d);
    if (inflight_fd >= 0) {
        close(inflight_fd);
        unlink(inflight_path);
    }
    for (size_t i = 0; i < n_corpus; i++) free(corpus[i].data);
    free(corpus);
    free(paths);
    return 0;
}
#endif /* LLAMA2_LIBFUZZER */
