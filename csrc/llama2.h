/*
 * llama2.h - public interface of libllama2, the llama2c inference engine.
 *
 * The library reads llama2.c model files (versions 0, 1, 2 and this project's
 * versions 3, 4 and 5, see docs/FORMAT.md), GGUF files and tokenizer.bin files,
 * runs the Llama 2 forward pass in fp32, bf16, int8 (Q8_0) or 4-bit (Q4_0),
 * samples, and drives generate / chat loops one token at a time.
 *
 * Rules every function follows:
 *   - it never exits, aborts or prints; failures return a non-zero
 *     llama2_status and, when `err` is not NULL, a human-readable message;
 *   - objects are independent: two transformers may run in two threads at
 *     once (one object must not be used from two threads at the same time).
 */
#ifndef LLAMA2_H
#define LLAMA2_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(LLAMA2_BUILD_DLL)
#define LLAMA2_API __declspec(dllexport)
#else
#define LLAMA2_API
#endif

/* ---- errors ------------------------------------------------------------ */

typedef enum {
    LLAMA2_OK = 0,
    LLAMA2_ERR_NOT_FOUND = 1, /* the file does not exist */
    LLAMA2_ERR_IO = 2,        /* the file exists but cannot be read or mapped */
    LLAMA2_ERR_FORMAT = 3,    /* malformed file: magic, version, size, dims */
    LLAMA2_ERR_ARGUMENT = 4,  /* bad argument: token / position out of range */
    LLAMA2_ERR_NOMEM = 5,     /* an allocation failed */
    LLAMA2_ERR_STATE = 6      /* call not valid in the object's current state */
} llama2_status;

typedef struct {
    int code;          /* a llama2_status */
    char message[512]; /* NUL-terminated reason; "" when code is LLAMA2_OK */
} llama2_error;

/* ---- model ------------------------------------------------------------- */

#define LLAMA2_WEIGHTS_F32 0
#define LLAMA2_WEIGHTS_Q8_0 1
#define LLAMA2_WEIGHTS_BF16 2
#define LLAMA2_WEIGHTS_Q4_0 3 /* llama.cpp's 4-bit blocks (docs/FORMAT.md) */

/* llama2_config.version of a GGUF file (versions 0-5 are .bin files) */
#define LLAMA2_VERSION_GGUF 100

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int head_size, kv_dim;
    int shared_classifier; /* 1: the classifier is the token embedding */
    int version;           /* file format version: 0-4, or LLAMA2_VERSION_GGUF */
    int weights;           /* LLAMA2_WEIGHTS_F32, _Q8_0, _BF16 or _Q4_0 (as run) */
    int group_size;        /* Q8_0 group size; 0 for fp32 */
    float rope_theta;      /* 10000 unless the file says otherwise (v3) */
    float norm_eps;        /* 1e-5 unless the file says otherwise (v3) */
    int64_t file_size;     /* bytes */
    int64_t n_params;      /* number of weights (embedding counted once if shared) */
    /* RoPE frequency scaling (docs/FORMAT.md, docs/LLAMA3.md): LLAMA2_ROPE_* */
    int rope_scaling;
    float rope_factor;           /* linear / llama3: frequencies divided by it (0 otherwise) */
    float rope_low_freq_factor;  /* llama3 */
    float rope_high_freq_factor; /* llama3 */
    int rope_original_ctx;       /* llama3: original_max_position_embeddings */
} llama2_config;

/* llama2_config.rope_scaling */
#define LLAMA2_ROPE_NONE 0
#define LLAMA2_ROPE_LINEAR 1  /* every frequency divided by rope_factor */
#define LLAMA2_ROPE_LLAMA3 2  /* Llama 3.1's per-frequency divisors */
#define LLAMA2_ROPE_FACTORS 3 /* a GGUF file's rope_freqs tensor (per-frequency divisors) */

typedef struct llama2_transformer llama2_transformer;

/* open flags */
#define LLAMA2_OPEN_QUANTIZE 1u /* quantize fp32 weights to Q8_0 while loading (runq) */

LLAMA2_API int llama2_transformer_open(llama2_transformer **out, const char *path,
                                       unsigned flags, llama2_error *err);
LLAMA2_API void llama2_transformer_free(llama2_transformer *t);
LLAMA2_API const llama2_config *llama2_transformer_config(const llama2_transformer *t);
/* A GGUF file's chat template (tokenizer.chat_template), or NULL. */
LLAMA2_API const char *llama2_transformer_chat_template(const llama2_transformer *t);
/* A one-line notice of what loading converted, or NULL: e.g. "GGUF tensors
 * of type Q6_K (1 tensor) were dequantized to bf16 at load". The library
 * prints nothing; run/runq print it to stderr, Python warns. */
LLAMA2_API const char *llama2_transformer_notice(const llama2_transformer *t);
/* n <= 0: as many as the machine has; more than 256 counts as 256. Takes
 * effect on each context's next pass; not while a pass runs. */
LLAMA2_API void llama2_transformer_set_threads(llama2_transformer *t, int n);

/* ---- contexts: one sequence's KV cache and run state ------------------- */

/* A model holds only weights; a context holds what one sequence needs: its
 * KV cache for positions 0..n_ctx-1 and the buffers a pass works in. Any
 * number of contexts share one model, and contexts of one model may run in
 * different threads at once (one context must not be used from two threads
 * at the same time). Memory is committed as positions are reached, so a
 * short run costs little however large n_ctx is. */
typedef struct llama2_context llama2_context;

/* n_ctx <= 0: the model's seq_len; larger than seq_len is an error. The
 * context borrows t, which must outlive it. */
LLAMA2_API int llama2_context_new(llama2_context **out, llama2_transformer *t, int n_ctx,
                                  llama2_error *err);
LLAMA2_API void llama2_context_free(llama2_context *ctx);
LLAMA2_API int llama2_context_n_ctx(const llama2_context *ctx);
/* Commits the memory of the KV cache of positions 0..n_positions-1 now
 * (capped at n_ctx) instead of page by page as a pass first writes them,
 * which takes that cost off a later pass. The cache's contents are left as
 * they are, so this may run in another thread while ctx is in use. Where the
 * OS has no way to do that (before Linux 5.14, other systems, sanitizer
 * builds) it does nothing and succeeds. */
LLAMA2_API int llama2_context_reserve(llama2_context *ctx, int n_positions, llama2_error *err);

/* Runs one token at one position and returns the logits (vocab_size floats,
 * owned by the context, valid until its next call). The KV cache keeps
 * positions 0..pos-1 from earlier calls. */
LLAMA2_API int llama2_context_forward(llama2_context *ctx, int token, int pos, float **logits,
                                      llama2_error *err);

/* Runs n tokens at positions pos..pos+n-1 in one pass over the weights
 * (prompt processing). The KV cache and, when logits is not NULL, the last
 * token's logits are bit-identical to n calls of llama2_context_forward. */
LLAMA2_API int llama2_context_forward_batch(llama2_context *ctx, const int *tokens, int n, int pos,
                                            float **logits, llama2_error *err);

/* Runs n tokens at positions pos..pos+n-1 like llama2_context_forward_batch
 * and writes every token's outputs into the caller's buffers: logits (when
 * not NULL) gets n x vocab_size floats, row i the logits after token i;
 * hidden (when not NULL) gets n x dim floats, row i token i's hidden state
 * after the final RMSNorm (the classifier's input: embeddings). Row i is
 * bit-identical to what llama2_context_forward returns for token i. */
LLAMA2_API int llama2_context_eval(llama2_context *ctx, const int *tokens, int n, int pos, float *logits,
                                   float *hidden, llama2_error *err);

/* Decodes several sequences at once (continuous batching): row b runs
 * tokens[b] at position pos[b] of ctxs[b], all rows in one pass over the
 * weights, and writes its logits to logits + b * vocab_size. Each row's
 * arithmetic is exactly that of llama2_context_forward(ctxs[b], tokens[b],
 * pos[b]), so a sequence's results do not depend on what else is in the
 * batch. The contexts must be of one model, none longer (n_ctx) than
 * ctxs[0], whose batch buffers and threads the pass uses; rows of one
 * context must come at increasing positions; none may be in use elsewhere
 * during the call. */
LLAMA2_API int llama2_decode_batch(llama2_context *const *ctxs, const int *tokens, const int *pos, int n,
                                   float *logits, llama2_error *err);

/* The same two in the model's own default context (made on first use, with
 * n_ctx = seq_len): what llama2.c's single-sequence programs need. */
LLAMA2_API int llama2_forward(llama2_transformer *t, int token, int pos, float **logits,
                              llama2_error *err);
LLAMA2_API int llama2_forward_batch(llama2_transformer *t, const int *tokens, int n, int pos,
                                    float **logits, llama2_error *err);

/* ---- tokenizer --------------------------------------------------------- */

typedef struct llama2_tokenizer llama2_tokenizer;

/* vocab_size < 0 reads every entry in the file; otherwise the first
 * vocab_size entries (the file must hold at least that many). */
LLAMA2_API int llama2_tokenizer_open(llama2_tokenizer **out, const char *path, int vocab_size,
                                     llama2_error *err);
LLAMA2_API void llama2_tokenizer_free(llama2_tokenizer *tk);
LLAMA2_API int llama2_tokenizer_vocab_size(const llama2_tokenizer *tk);
/* The raw piece of a token as stored (spaces as ' '), its length and score. */
LLAMA2_API int llama2_tokenizer_piece(const llama2_tokenizer *tk, int token, const char **piece,
                                      int *len, float *score, llama2_error *err);
/* Encodes len bytes of text. tokens must hold len + 3 ints. */
LLAMA2_API int llama2_encode(llama2_tokenizer *tk, const char *text, size_t len, int bos,
                             int eos, int *tokens, int *n_tokens, llama2_error *err);
/* The bytes that token prints after prev_token: the leading space is dropped
 * after BOS, and <0xHH> pieces become the single byte HH. */
LLAMA2_API int llama2_decode(const llama2_tokenizer *tk, int prev_token, int token,
                             const char **piece, int *len, llama2_error *err);

/* Printable-text filter used for output: ASCII behaves like llama2.c
 * (non-printable single bytes are dropped), and multi-byte UTF-8 that
 * arrives one byte token at a time is held until the code point completes. */
typedef struct {
    unsigned char pending[4];
    int n_pending;
    int n_needed;
} llama2_utf8_filter;

LLAMA2_API void llama2_utf8_filter_reset(llama2_utf8_filter *f);
/* Appends what should be printed for `piece` to out (capacity len + 4);
 * returns the number of bytes written. */
LLAMA2_API int llama2_utf8_filter_push(llama2_utf8_filter *f, const char *piece, int len,
                                       char *out);

/* ---- sampler ----------------------------------------------------------- */

/* The defaults (temperature 1, topp 0.9, the rest off) sample exactly as
 * llama2.c does; top-k, min-p and the repetition penalty are extensions. */
typedef struct {
    float temperature;        /* 0: greedy */
    float topp;               /* nucleus; <= 0 or >= 1 disables it */
    int topk;                 /* keep the k most likely tokens; 0 disables it */
    float minp;               /* keep tokens with p >= minp * p_max; 0 disables it */
    float repetition_penalty; /* > 1 discourages tokens seen in the window; 1 disables it */
    int repetition_window;    /* how many recent tokens count; 0: 64 */
} llama2_sampler_params;

LLAMA2_API void llama2_sampler_params_default(llama2_sampler_params *p);

typedef struct llama2_sampler llama2_sampler;

LLAMA2_API int llama2_sampler_new(llama2_sampler **out, int vocab_size,
                                  const llama2_sampler_params *params, uint64_t seed,
                                  llama2_error *err);
LLAMA2_API void llama2_sampler_free(llama2_sampler *s);
/* logit_bias: bias[i] is added to the logit of tokens[i] before any other
 * step (also for greedy sampling); -INFINITY bans a token. Replaces an earlier
 * bias; n = 0 clears it. Tokens must be in range, biases numbers or -inf. */
LLAMA2_API int llama2_sampler_set_logit_bias(llama2_sampler *s, const int *tokens, const float *bias, int n,
                                             llama2_error *err);
/* Samples a token; the logits are modified in place (scaled, softmaxed). */
LLAMA2_API int llama2_sample(llama2_sampler *s, float *logits);
/* Records a token of the context, for the repetition penalty (sessions call
 * it for every token they feed). */
LLAMA2_API void llama2_sampler_accept(llama2_sampler *s, int token);
LLAMA2_API uint64_t llama2_sampler_rng_state(const llama2_sampler *s);

/* The xorshift RNG of the sampler, exposed for tests. */
LLAMA2_API uint32_t llama2_random_u32(uint64_t *state);
LLAMA2_API float llama2_random_f32(uint64_t *state);

/* ---- generation sessions ---------------------------------------------- */

#define LLAMA2_TOKEN_BOS 1
#define LLAMA2_TOKEN_EOS 2

typedef enum {
    LLAMA2_STEP_TOKEN = 0,      /* a token was produced; text may be empty */
    LLAMA2_STEP_DONE = 1,       /* finished (steps, BOS, EOS or a stop string); may carry text */
    LLAMA2_STEP_NEED_INPUT = 2, /* chat: the user's turn; call llama2_session_chat_input */
    LLAMA2_STEP_ERROR = -1
} llama2_step_kind;

typedef struct {
    int kind;          /* llama2_step_kind */
    int token;         /* the token fed at this step */
    int next;          /* the token chosen to follow it */
    int pos;           /* positions run so far */
    int in_prompt;     /* 1 while the prompt is still being fed */
    int end_of_turn;   /* chat: the assistant's turn ended (EOS) at this step */
    int text_len;      /* bytes in text */
    const char *text;  /* what to print for this step; valid until the next step */
} llama2_step;

typedef struct llama2_session llama2_session;

#define LLAMA2_MODE_GENERATE 0
#define LLAMA2_MODE_CHAT 1         /* llama2.c's chat loop, exactly (`run -m chat`) */
#define LLAMA2_MODE_CONVERSATION 2 /* the chat of an API: see llama2_session_chat_history */

/* The session borrows ctx, tk and s; they must outlive it, and it writes
 * ctx's KV cache from position 0. steps <= 0 or > n_ctx means n_ctx. In
 * generate mode the prompt (may be "") is encoded with BOS; in chat mode the
 * first call to llama2_session_step asks for input. */
LLAMA2_API int llama2_session_new_ctx(llama2_session **out, llama2_context *ctx,
                                      llama2_tokenizer *tk, llama2_sampler *s, int mode,
                                      const char *prompt, size_t prompt_len, int steps,
                                      llama2_error *err);
/* The same in t's default context (llama2_forward's). */
LLAMA2_API int llama2_session_new(llama2_session **out, llama2_transformer *t,
                                  llama2_tokenizer *tk, llama2_sampler *s, int mode,
                                  const char *prompt, size_t prompt_len, int steps,
                                  llama2_error *err);
LLAMA2_API void llama2_session_free(llama2_session *ss);
LLAMA2_API int llama2_session_step(llama2_session *ss, llama2_step *step, llama2_error *err);
/* Generate mode, before the first step: also stop when EOS is sampled
 * (chat / instruct models; llama2.c stops only at BOS), and when the
 * generated text contains one of the n_stops strings (cut before it).
 * Text that might begin a stop string is held back until it cannot. */
LLAMA2_API int llama2_session_set_stops(llama2_session *ss, int stop_at_eos,
                                        const char *const *stops, const size_t *lens, int n_stops,
                                        llama2_error *err);
/* Chat: renders the Llama 2 template for the user's turn (system only used
 * on the first turn, when non-empty) and queues it. */
LLAMA2_API int llama2_session_chat_input(llama2_session *ss, const char *system,
                                         size_t system_len, const char *user, size_t user_len,
                                         llama2_error *err);
/* Conversation mode, the chat engine of the Python API: each turn
 * (llama2_session_chat_input: the template above, the system prompt with the
 * first turn) is fed in one pass without drawing samples; the reply is sampled
 * until EOS (not run then: it goes in front of the next turn), the reply
 * limit, or a full context, and the step that ends it has end_of_turn set.
 * A turn that does not fit in the context is refused whole (ARGUMENT) and the
 * conversation stays usable. Between turns: */
/* queue an earlier turn with its reply (" reply " after the template), fed
 * without sampling; EOS follows it */
LLAMA2_API int llama2_session_chat_history(llama2_session *ss, const char *system, size_t system_len,
                                           const char *user, size_t user_len, const char *reply,
                                           size_t reply_len, llama2_error *err);
/* at most max_tokens tokens per reply (< 0: no limit, the default) */
LLAMA2_API int llama2_session_set_reply_limit(llama2_session *ss, int max_tokens, llama2_error *err);
/* use s from the next turn on (borrowed); it first sees the last tokens of
 * the conversation its repetition window covers */
LLAMA2_API int llama2_session_set_sampler(llama2_session *ss, llama2_sampler *s, llama2_error *err);

/* Generate mode: runs to the end and returns the printed text (prompt
 * included) in a malloc'd buffer the caller frees with llama2_free. */
LLAMA2_API int llama2_session_run(llama2_session *ss, char **text, size_t *len, int *n_steps,
                                  llama2_error *err);
LLAMA2_API int llama2_session_pos(const llama2_session *ss);
LLAMA2_API void llama2_free(void *p);

/* Library version string, e.g. "0.1.0". */
LLAMA2_API const char *llama2_version(void);

/* The kernel tier a model opened now runs on ("scalar", "avx2", "avx512" or
 * "neon"): the best this CPU runs, or the one LLAMA2_KERNELS names
 * (portable|scalar|avx2|avx512|neon) when the CPU runs it. */
LLAMA2_API const char *llama2_kernels_name(void);
/* Why that tier, in words (forced, or the best this CPU runs and what the
 * better tiers lack, or a forced tier the CPU cannot run and the fallback);
 * valid until this thread's next call. */
LLAMA2_API const char *llama2_kernels_reason(void);
/* The CPU features the choice looked at, space-separated (e.g. "avx2 fma
 * avx512f avx512bw avx512vl avx512_vnni os_ymm os_zmm", "neon asimddp");
 * valid until this thread's next call. */
LLAMA2_API const char *llama2_cpu_features(void);

#ifdef __cplusplus
}
#endif
#endif /* LLAMA2_H */
