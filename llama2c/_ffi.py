"""cffi binding of libllama2 (ABI mode: the shared library is loaded with dlopen).

The declarations below mirror csrc/llama2.h; tests/test_ffi_header.py checks
that every function declared there is declared here too.

Where the library comes from, first match wins:
  1. the path in the LLAMA2C_LIBRARY environment variable;
  2. libllama2.{so,dylib} / llama2.dll inside this package, put there by
     `pip install` (setup.py compiles csrc/) or by `make` (it copies its build).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

CDEF = """
typedef struct { int code; char message[512]; } llama2_error;

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int head_size, kv_dim;
    int shared_classifier;
    int version;
    int weights;
    int group_size;
    float rope_theta;
    float norm_eps;
    int64_t file_size;
    int64_t n_params;
    int rope_scaling;
    float rope_factor;
    float rope_low_freq_factor;
    float rope_high_freq_factor;
    int rope_original_ctx;
} llama2_config;

typedef struct llama2_transformer llama2_transformer;
int llama2_transformer_open(llama2_transformer **out, const char *path, unsigned flags, llama2_error *err);
void llama2_transformer_free(llama2_transformer *t);
const llama2_config *llama2_transformer_config(const llama2_transformer *t);
const char *llama2_transformer_chat_template(const llama2_transformer *t);
const char *llama2_transformer_notice(const llama2_transformer *t);
void llama2_transformer_set_threads(llama2_transformer *t, int n);
typedef struct llama2_context llama2_context;
int llama2_context_new(llama2_context **out, llama2_transformer *t, int n_ctx, llama2_error *err);
void llama2_context_free(llama2_context *ctx);
int llama2_context_reserve(llama2_context *ctx, int n_positions, llama2_error *err);
int llama2_context_n_ctx(const llama2_context *ctx);
int llama2_context_forward(llama2_context *ctx, int token, int pos, float **logits, llama2_error *err);
int llama2_context_forward_batch(llama2_context *ctx, const int *tokens, int n, int pos, float **logits, llama2_error *err);
int llama2_context_eval(llama2_context *ctx, const int *tokens, int n, int pos, float *logits, float *hidden, llama2_error *err);
int llama2_decode_batch(llama2_context *const *ctxs, const int *tokens, const int *pos, int n, float *logits, llama2_error *err);
int llama2_forward(llama2_transformer *t, int token, int pos, float **logits, llama2_error *err);
int llama2_forward_batch(llama2_transformer *t, const int *tokens, int n, int pos, float **logits, llama2_error *err);

typedef struct llama2_tokenizer llama2_tokenizer;
int llama2_tokenizer_open(llama2_tokenizer **out, const char *path, int vocab_size, llama2_error *err);
void llama2_tokenizer_free(llama2_tokenizer *tk);
int llama2_tokenizer_vocab_size(const llama2_tokenizer *tk);
int llama2_tokenizer_piece(const llama2_tokenizer *tk, int token, const char **piece, int *len, float *score, llama2_error *err);
int llama2_encode(llama2_tokenizer *tk, const char *text, size_t len, int bos, int eos, int *tokens, int *n_tokens, llama2_error *err);
int llama2_decode(const llama2_tokenizer *tk, int prev_token, int token, const char **piece, int *len, llama2_error *err);

typedef struct { unsigned char pending[4]; int n_pending; int n_needed; } llama2_utf8_filter;
void llama2_utf8_filter_reset(llama2_utf8_filter *f);
int llama2_utf8_filter_push(llama2_utf8_filter *f, const char *piece, int len, char *out);

typedef struct {
    float temperature; float topp; int topk; float minp; float repetition_penalty; int repetition_window;
} llama2_sampler_params;
void llama2_sampler_params_default(llama2_sampler_params *p);
typedef struct llama2_sampler llama2_sampler;
int llama2_sampler_new(llama2_sampler **out, int vocab_size, const llama2_sampler_params *params, uint64_t seed, llama2_error *err);
void llama2_sampler_free(llama2_sampler *s);
int llama2_sampler_set_logit_bias(llama2_sampler *s, const int *tokens, const float *bias, int n, llama2_error *err);
int llama2_sample(llama2_sampler *s, float *logits);
uint64_t llama2_sampler_rng_state(const llama2_sampler *s);
void llama2_sampler_accept(llama2_sampler *s, int token);
uint32_t llama2_random_u32(uint64_t *state);
float llama2_random_f32(uint64_t *state);

typedef struct {
    int kind; int token; int next; int pos; int in_prompt; int end_of_turn;
    int text_len; const char *text;
} llama2_step;
typedef struct llama2_session llama2_session;
int llama2_session_new_ctx(llama2_session **out, llama2_context *ctx, llama2_tokenizer *tk, llama2_sampler *s, int mode, const char *prompt, size_t prompt_len, int steps, llama2_error *err);
int llama2_session_new(llama2_session **out, llama2_transformer *t, llama2_tokenizer *tk, llama2_sampler *s, int mode, const char *prompt, size_t prompt_len, int steps, llama2_error *err);
void llama2_session_free(llama2_session *ss);
int llama2_session_step(llama2_session *ss, llama2_step *step, llama2_error *err);
int llama2_session_set_stops(llama2_session *ss, int stop_at_eos, const char *const *stops, const size_t *lens, int n_stops, llama2_error *err);
int llama2_session_chat_input(llama2_session *ss, const char *system, size_t system_len, const char *user, size_t user_len, llama2_error *err);
int llama2_session_chat_history(llama2_session *ss, const char *system, size_t system_len, const char *user, size_t user_len, const char *reply, size_t reply_len, llama2_error *err);
int llama2_session_set_reply_limit(llama2_session *ss, int max_tokens, llama2_error *err);
int llama2_session_set_sampler(llama2_session *ss, llama2_sampler *s, llama2_error *err);
int llama2_session_run(llama2_session *ss, char **text, size_t *len, int *n_steps, llama2_error *err);
int llama2_session_pos(const llama2_session *ss);
void llama2_free(void *p);
const char *llama2_version(void);
const char *llama2_kernels_name(void);
const char *llama2_kernels_reason(void);
const char *llama2_cpu_features(void);
"""

# status codes (llama2_status in llama2.h)
OK, ERR_NOT_FOUND, ERR_IO, ERR_FORMAT, ERR_ARGUMENT, ERR_NOMEM, ERR_STATE = range(7)
OPEN_QUANTIZE = 1
MODE_GENERATE, MODE_CHAT, MODE_CONVERSATION = 0, 1, 2
STEP_TOKEN, STEP_DONE, STEP_NEED_INPUT, STEP_ERROR = 0, 1, 2, -1
WEIGHTS_F32, WEIGHTS_Q8_0, WEIGHTS_BF16, WEIGHTS_Q4_0 = 0, 1, 2, 3
VERSION_GGUF = 100
ROPE_NONE, ROPE_LINEAR, ROPE_LLAMA3, ROPE_FACTORS = 0, 1, 2, 3

ffi = FFI()
ffi.cdef(CDEF)

PACKAGE_DIR = Path(__file__).resolve().parent


def library_names() -> list[str]:
    if sys.platform == "win32":
        return ["llama2.dll", "libllama2.dll"]
    if sys.platform == "darwin":
        return ["libllama2.dylib", "libllama2.so"]
    return ["libllama2.so"]


def find_library() -> Path:
    override = os.environ.get("LLAMA2C_LIBRARY")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ImportError(f"LLAMA2C_LIBRARY={override} does not name a file")
        return path
    for name in library_names():
        path = PACKAGE_DIR / name
        if path.is_file():
            return path
    raise ImportError(
        f"libllama2 was not found in {PACKAGE_DIR}: build it with `make run` "
        "(or `make runomp`) in the source tree, or reinstall with `pip install -e .`"
    )


lib = ffi.dlopen(str(find_library()))
