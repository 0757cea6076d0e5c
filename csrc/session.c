/*
 * session.c - the generate and chat loops of the `run` program as a state
 * machine that advances one token per call, so the CLI, the Python binding
 * and any other host share one implementation (docs/SAMPLING.md, the
 * generate and chat loops). Besides llama2.c's chat loop, kept exactly for
 * `run -m chat`, the conversation mode is the chat of an API: turns fed in
 * one pass without drawing samples, replies that end at EOS or a token
 * limit, earlier turns fed as history, a sampler per turn.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

struct llama2_session {
    llama2_context *ctx;
    llama2_tokenizer *tk;
    llama2_sampler *s;
    int mode, steps;
    int *prompt;
    int n_prompt, cap_prompt;
    int pos, token, next, done;
    int user_turn, user_idx; /* chat */
    llama2_utf8_filter filter;
    char *text; /* output of the current step */
    int cap_text;
    /* generate mode stops (off by default, as in llama2.c) */
    int stop_at_eos;
    char **stops;
    size_t *stop_lens;
    int n_stops;
    char *hold;    /* generated text held back: it may start a stop string */
    size_t n_hold, cap_hold;
    char *out;     /* text handed out when stops are active */
    size_t cap_out;
    /* conversation mode */
    int *history;     /* every token fed, for the repetition window of a new sampler */
    int n_history, cap_history;
    int pending_eos;  /* the last reply ended at EOS: it is fed before the next turn */
    int turns;        /* turns queued so far (the system prompt goes with the first) */
    int reply_limit;  /* tokens per reply; < 0: until EOS or a full context */
    int reply_left;   /* tokens the current reply may still have: the limit, or the positions left */
    int prev;         /* the token printed last in this reply (BOS before the first) */
    int history_only; /* the queued turn is an earlier one: feed it, sample nothing */
};

/* Makes room for `more` prompt tokens after the n_prompt there are. */
static int reserve_prompt(llama2_session *ss, size_t more, llama2_error *err) {
    size_t need = (size_t)ss->n_prompt + more;
    if (need > (size_t)(1 << 28) + 8) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "prompt is too long");
    if ((size_t)ss->cap_prompt >= need) return LLAMA2_OK;
    int *grown = (int *)realloc(ss->prompt, need * sizeof(int));
    if (!grown) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory encoding the prompt");
    ss->prompt = grown;
    ss->cap_prompt = (int)need;
    return LLAMA2_OK;
}

/* Encodes text (with BOS when bos is set) after the prompt tokens there are. */
static int append_prompt(llama2_session *ss, const char *text, size_t len, int bos, llama2_error *err) {
    if (len > (size_t)(1 << 28)) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "prompt is too long (%zu bytes)", len);
    int rc = reserve_prompt(ss, len + 3, err);
    if (rc) return rc;
    int n = 0, *out = ss->prompt + ss->n_prompt;
    if ((rc = llama2_encode(ss->tk, text, len, bos, 0, out, &n, err))) return rc;
    int vocab = ss->ctx->t->config.vocab_size;
    for (int i = 0; i < n; i++)
        if (out[i] >= vocab)
            return llama2_fail(err, LLAMA2_ERR_ARGUMENT,
                               "prompt token %d is outside the model's vocabulary of %d (tokenizer and model do not match)",
                               out[i], vocab);
    ss->n_prompt += n;
    return LLAMA2_OK;
}

/* Encodes text (with BOS) into the session's prompt buffer. */
static int set_prompt(llama2_session *ss, const char *text, size_t len, llama2_error *err) {
    ss->n_prompt = 0;
    return append_prompt(ss, text, len, 1, err);
}

static void free_stops(llama2_session *ss) {
    for (int i = 0; i < ss->n_stops; i++) free(ss->stops[i]);
    free(ss->stops);
    free(ss->stop_lens);
    ss->stops = NULL;
    ss->stop_lens = NULL;
    ss->n_stops = 0;
}

void llama2_session_free(llama2_session *ss) {
    if (!ss) return;
    free(ss->prompt);
    free(ss->text);
    free_stops(ss);
    free(ss->hold);
    free(ss->out);
    free(ss->history);
    free(ss);
}

int llama2_session_set_stops(llama2_session *ss, int stop_at_eos, const char *const *stops,
                             const size_t *lens, int n_stops, llama2_error *err) {
    llama2_ok(err);
    if (!ss || n_stops < 0 || (n_stops > 0 && (!stops || !lens)))
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "bad stop list");
    if (ss->mode != LLAMA2_MODE_GENERATE)
        return llama2_fail(err, LLAMA2_ERR_STATE, "stops apply to generate mode");
    if (ss->pos > 0) return llama2_fail(err, LLAMA2_ERR_STATE, "set stops before the first step");
    free_stops(ss);
    ss->stop_at_eos = stop_at_eos != 0;
    if (n_stops == 0) return LLAMA2_OK;
    ss->stops = (char **)calloc((size_t)n_stops, sizeof(char *));
    ss->stop_lens = (size_t *)calloc((size_t)n_stops, sizeof(size_t));
    if (!ss->stops || !ss->stop_lens) { free_stops(ss); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
    for (int i = 0; i < n_stops; i++) {
        if (lens[i] == 0) { free_stops(ss); return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "empty stop string"); }
        ss->stops[i] = (char *)malloc(lens[i]);
        if (!ss->stops[i]) { ss->n_stops = i; free_stops(ss); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
        memcpy(ss->stops[i], stops[i], lens[i]);
        ss->stop_lens[i] = lens[i];
        ss->n_stops = i + 1;
    }
    return LLAMA2_OK;
}

static int reserve(char **buf, size_t *cap, size_t need) {
    if (need <= *cap && *buf) return 1; /* a buffer exists even for 0 bytes: memcpy never sees NULL */
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    char *grown = (char *)realloc(*buf, c);
    if (!grown) return 0;
    *buf = grown;
    *cap = c;
    return 1;
}

/* Earliest position in the held text where a stop string starts (complete,
 * or cut off by the end of the text when `partial`); n_hold if none. */
static size_t stop_position(const llama2_session *ss, int partial, int *complete) {
    *complete = 0;
    for (size_t i = 0; i < ss->n_hold; i++) {
        for (int k = 0; k < ss->n_stops; k++) {
            size_t left = ss->n_hold - i, len = ss->stop_lens[k];
            if (left >= len && memcmp(ss->hold + i, ss->stops[k], len) == 0) { *complete = 1; return i; }
            if (partial && left < len && memcmp(ss->hold + i, ss->stops[k], left) == 0) return i;
        }
    }
    return ss->n_hold;
}

/* Passes generated text through the stop strings: st->text becomes what
 * can be printed now; a complete stop string ends the session. */
static int apply_stops(llama2_session *ss, llama2_step *st, int finishing, llama2_error *err) {
    if (!reserve(&ss->hold, &ss->cap_hold, ss->n_hold + (size_t)st->text_len))
        return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    memcpy(ss->hold + ss->n_hold, st->text, (size_t)st->text_len);
    ss->n_hold += (size_t)st->text_len;
    int complete;
    size_t cut = stop_position(ss, !finishing, &complete);
    if (complete) ss->done = 1;
    if (!reserve(&ss->out, &ss->cap_out, cut + 1)) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    memcpy(ss->out, ss->hold, cut);
    if (complete || finishing) {
        ss->n_hold = 0;
    } else {
        memmove(ss->hold, ss->hold + cut, ss->n_hold - cut);
        ss->n_hold -= cut;
    }
    st->text = ss->out;
    st->text_len = (int)cut;
    return LLAMA2_OK;
}

int llama2_session_new(llama2_session **out, llama2_transformer *t, llama2_tokenizer *tk,
                       llama2_sampler *s, int mode, const char *prompt, size_t prompt_len, int steps,
                       llama2_error *err) {
    llama2_ok(err);
    if (!out || !t) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    llama2_context *ctx;
    int rc = llama2_default_context(t, &ctx, err);
    return rc ? rc : llama2_session_new_ctx(out, ctx, tk, s, mode, prompt, prompt_len, steps, err);
}

int llama2_session_new_ctx(llama2_session **out, llama2_context *ctx, llama2_tokenizer *tk,
                           llama2_sampler *s, int mode, const char *prompt, size_t prompt_len, int steps,
                           llama2_error *err) {
    llama2_ok(err);
    if (!out || !ctx || !tk || !s) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    *out = NULL;
    if (mode != LLAMA2_MODE_GENERATE && mode != LLAMA2_MODE_CHAT && mode != LLAMA2_MODE_CONVERSATION)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "unknown mode %d", mode);
    const llama2_config *c = &ctx->t->config;
    if (llama2_tokenizer_vocab_size(tk) < c->vocab_size)
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "tokenizer has %d tokens but the model's vocab_size is %d",
                           llama2_tokenizer_vocab_size(tk), c->vocab_size);
    llama2_session *ss = (llama2_session *)calloc(1, sizeof(*ss));
    if (!ss) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    ss->ctx = ctx;
    ss->tk = tk;
    ss->s = s;
    ss->mode = mode;
    ss->steps = steps <= 0 || steps > ctx->n_ctx ? ctx->n_ctx : steps;
    int longest = 0;
    for (int i = 0; i < c->vocab_size; i++) {
        int len = 0;
        llama2_tokenizer_piece(tk, i, NULL, &len, NULL, NULL);
        if (len > longest) longest = len;
    }
    ss->cap_text = longest + 8;
    ss->text = (char *)malloc((size_t)ss->cap_text);
    if (!ss->text) { llama2_session_free(ss); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
    llama2_utf8_filter_reset(&ss->filter);
    if (mode == LLAMA2_MODE_GENERATE) {
        int rc = set_prompt(ss, prompt ? prompt : "", prompt ? prompt_len : 0, err);
        if (rc) { llama2_session_free(ss); return rc; }
        ss->token = ss->prompt[0];
    } else {
        ss->user_turn = 1;
        ss->reply_limit = -1;
    }
    *out = ss;
    return LLAMA2_OK;
}

int llama2_session_pos(const llama2_session *ss) { return ss ? ss->pos : 0; }

/* What token prints after prev, through the UTF-8 filter, appended at text[at]. */
static int emit(llama2_session *ss, int prev, int token, int at) {
    const char *piece;
    int len;
    if (llama2_decode(ss->tk, prev, token, &piece, &len, NULL) != LLAMA2_OK) return at;
    return at + llama2_utf8_filter_push(&ss->filter, piece, len, ss->text + at);
}

/* Feeds prompt[from .. from+m) at positions pos.. in one batched pass (their
 * logits are not needed) and returns in st the text those m steps print.
 * chat: each of those steps would also have drawn a sample. */
static int prefill(llama2_session *ss, llama2_step *st, int from, int m, int chat, llama2_error *err) {
    int rc = llama2_context_forward_batch(ss->ctx, ss->prompt + from, m, ss->pos, NULL, err);
    if (rc) return rc;
    size_t n = 0;
    for (int i = 0; i < m; i++) {
        llama2_sampler_accept(ss->s, ss->prompt[from + i]);
        if (chat) llama2_sampler_skip(ss->s);
        if (chat) continue; /* chat prints nothing while its prompt is fed */
        if (!reserve(&ss->out, &ss->cap_out, n + (size_t)ss->cap_text))
            return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
        int len = emit(ss, ss->prompt[from + i], ss->prompt[from + i + 1], 0);
        memcpy(ss->out + n, ss->text, (size_t)len);
        n += (size_t)len;
    }
    ss->pos += m;
    st->token = ss->prompt[from + m - 1];
    st->next = ss->prompt[from + m];
    st->pos = ss->pos;
    st->in_prompt = 1;
    st->text = ss->out;
    st->text_len = (int)n;
    return LLAMA2_OK;
}

static int step_generate(llama2_session *ss, llama2_step *st, llama2_error *err) {
    if (ss->pos == 0) {
        /* steps that feed the prompt up to its last token, before a BOS in it */
        int m = ss->n_prompt - 1 < ss->steps ? ss->n_prompt - 1 : ss->steps;
        for (int i = 0; i < m; i++)
            if (ss->prompt[i + 1] == LLAMA2_TOKEN_BOS) { m = i; break; }
        if (m >= 2) {
            int rc = prefill(ss, st, 0, m, 0, err);
            if (rc) return rc;
            ss->token = ss->prompt[m];
            ss->next = ss->prompt[m];
            return LLAMA2_OK;
        }
    }
    float *logits;
    int rc = llama2_context_forward(ss->ctx, ss->token, ss->pos, &logits, err);
    if (rc) return rc;
    st->token = ss->token;
    st->in_prompt = ss->pos < ss->n_prompt - 1;
    llama2_sampler_accept(ss->s, ss->token);
    ss->next = st->in_prompt ? ss->prompt[ss->pos + 1] : llama2_sample(ss->s, logits);
    ss->pos++;
    st->next = ss->next;
    st->pos = ss->pos;
    if (ss->next == LLAMA2_TOKEN_BOS || (ss->stop_at_eos && ss->next == LLAMA2_TOKEN_EOS)) {
        /* BOS: the model starts a new text; EOS: an instruct model is done */
        ss->done = 1;
        st->kind = LLAMA2_STEP_DONE;
        return ss->n_stops ? apply_stops(ss, st, 1, err) : LLAMA2_OK;
    }
    st->text_len = emit(ss, ss->token, ss->next, 0);
    ss->token = ss->next;
    if (ss->n_stops && !st->in_prompt) return apply_stops(ss, st, ss->pos >= ss->steps, err);
    return LLAMA2_OK;
}

/* One step of llama2.c's chat loop, kept exactly: the token after EOS is
 * still run (and sampled) before the user's next turn. */
static int step_chat(llama2_session *ss, llama2_step *st, llama2_error *err) {
    int m = ss->n_prompt - 1 - ss->user_idx; /* prompt tokens before the last */
    if (m > ss->steps - ss->pos) m = ss->steps - ss->pos;
    if (m >= 2) {
        int rc = prefill(ss, st, ss->user_idx, m, 1, err);
        ss->user_idx += m;
        return rc;
    }
    int token = ss->user_idx < ss->n_prompt ? ss->prompt[ss->user_idx++] : ss->next;
    if (token == LLAMA2_TOKEN_EOS) ss->user_turn = 1;
    float *logits;
    int rc = llama2_context_forward(ss->ctx, token, ss->pos, &logits, err);
    if (rc) return rc;
    llama2_sampler_accept(ss->s, token);
    ss->next = llama2_sample(ss->s, logits);
    ss->pos++;
    st->token = token;
    st->next = ss->next;
    st->pos = ss->pos;
    st->in_prompt = ss->user_idx < ss->n_prompt;
    int n = 0;
    if (!st->in_prompt && ss->next != LLAMA2_TOKEN_EOS) n = emit(ss, token, ss->next, 0);
    if (ss->next == LLAMA2_TOKEN_EOS) {
        ss->text[n++] = '\n';
        st->end_of_turn = 1;
    }
    st->text_len = n;
    return LLAMA2_OK;
}

/* Records a token fed in conversation mode (for the next sampler's window). */
static int remember(llama2_session *ss, int token, llama2_error *err) {
    if (ss->n_history == ss->cap_history) {
        int cap = ss->cap_history ? 2 * ss->cap_history : 256;
        int *grown = (int *)realloc(ss->history, (size_t)cap * sizeof(int));
        if (!grown) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
        ss->history = grown;
        ss->cap_history = cap;
    }
    ss->history[ss->n_history++] = token;
    llama2_sampler_accept(ss->s, token);
    return LLAMA2_OK;
}

/* One step of a conversation: the queued turn in one pass (no samples
 * drawn), or one reply token: sampled, printed, then run. A reply ends at
 * EOS (not run now: it goes in front of the next turn), at the reply limit,
 * or when the context is full. */
static int step_conversation(llama2_session *ss, llama2_step *st, llama2_error *err) {
    llama2_context *cx = ss->ctx;
    float *logits;
    int rc;
    if (ss->user_idx < ss->n_prompt) {
        int m = ss->n_prompt - ss->user_idx;
        if ((rc = llama2_context_forward_batch(cx, ss->prompt + ss->user_idx, m, ss->pos, &logits, err))) return rc;
        for (int i = ss->user_idx; i < ss->n_prompt; i++)
            if ((rc = remember(ss, ss->prompt[i], err))) return rc;
        ss->pos += m;
        ss->user_idx = ss->n_prompt;
        st->token = ss->prompt[ss->n_prompt - 1];
        st->pos = ss->pos;
        st->in_prompt = 1;
        ss->reply_left = ss->reply_limit >= 0 ? ss->reply_limit : cx->n_ctx - ss->pos;
        if (ss->history_only) { /* an earlier turn with its reply: done, EOS next */
            ss->history_only = 0;
            ss->pending_eos = 1;
            ss->user_turn = 1;
            st->end_of_turn = 1;
        } else if (ss->reply_left == 0) {
            ss->user_turn = 1;
            st->end_of_turn = 1;
        }
        return LLAMA2_OK;
    }
    int token = llama2_sample(ss->s, cx->logits);
    st->next = token;
    if (token == LLAMA2_TOKEN_EOS) {
        ss->pending_eos = 1;
        ss->user_turn = 1;
        st->end_of_turn = 1;
        return LLAMA2_OK;
    }
    st->text_len = emit(ss, ss->prev, token, 0);
    ss->prev = token;
    if (ss->pos >= cx->n_ctx) { /* the context is full: the reply ends unrun */
        ss->user_turn = 1;
        st->end_of_turn = 1;
        return LLAMA2_OK;
    }
    if ((rc = llama2_context_forward(cx, token, ss->pos, &logits, err))) return rc;
    if ((rc = remember(ss, token, err))) return rc;
    ss->pos++;
    st->token = token;
    st->pos = ss->pos;
    if (--ss->reply_left <= 0) {
        ss->user_turn = 1;
        st->end_of_turn = 1;
    }
    return LLAMA2_OK;
}

int llama2_session_step(llama2_session *ss, llama2_step *st, llama2_error *err) {
    llama2_ok(err);
    if (!ss || !st) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    memset(st, 0, sizeof(*st));
    st->text = ss->text;
    st->pos = ss->pos;
    const int conversation = ss->mode == LLAMA2_MODE_CONVERSATION;
    if (ss->done || (!conversation && ss->pos >= ss->steps)) {
        ss->done = 1;
        st->kind = LLAMA2_STEP_DONE;
        return LLAMA2_OK;
    }
    if (ss->mode != LLAMA2_MODE_GENERATE && ss->user_turn) {
        st->kind = LLAMA2_STEP_NEED_INPUT;
        return LLAMA2_OK;
    }
    st->kind = LLAMA2_STEP_TOKEN;
    int rc = conversation                   ? step_conversation(ss, st, err)
             : ss->mode == LLAMA2_MODE_CHAT ? step_chat(ss, st, err)
                                            : step_generate(ss, st, err);
    if (rc) {
        st->kind = LLAMA2_STEP_ERROR;
        ss->done = 1;
    }
    return rc;
}

/* The Llama 2 template of a user turn, "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user}
 * [/INST]" (the system block only when with_system), in a malloc'd buffer. */
static char *render_turn(const char *system, size_t system_len, int with_system, const char *user,
                         size_t user_len, size_t *n_out) {
    size_t cap = user_len + system_len + 64, n = 0;
    char *rendered = (char *)malloc(cap);
    if (!rendered) return NULL;
#define PUT(s, l) (memcpy(rendered + n, (s), (l)), n += (l))
    if (with_system) {
        PUT("[INST] <<SYS>>\n", 15);
        PUT(system, system_len);
        PUT("\n<</SYS>>\n\n", 11);
    } else {
        PUT("[INST] ", 7);
    }
    if (user_len) PUT(user, user_len);
    PUT(" [/INST]", 8);
#undef PUT
    *n_out = n;
    return rendered;
}

/* Conversation mode: queues [EOS of the last reply] + BOS + the rendered turn
 * [+ " reply " for an earlier turn, encoded with the turn as one text, as
 * transformers' Llama 2 chat template tokenizes it]; refused whole when it
 * cannot fit. */
static int queue_turn(llama2_session *ss, const char *system, size_t system_len, const char *user,
                      size_t user_len, const char *reply, size_t reply_len, int history, llama2_error *err) {
    size_t n;
    char *rendered = render_turn(system, system_len, ss->turns == 0 && system_len > 0, user, user_len, &n);
    if (!rendered) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    if (history) {
        char *longer = (char *)realloc(rendered, n + reply_len + 2);
        if (!longer) { free(rendered); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
        rendered = longer;
        rendered[n++] = ' ';
        if (reply_len) memcpy(rendered + n, reply, reply_len);
        n += reply_len;
        rendered[n++] = ' ';
    }
    ss->n_prompt = 0;
    int rc = reserve_prompt(ss, 1, err);
    if (!rc && ss->pending_eos) ss->prompt[ss->n_prompt++] = LLAMA2_TOKEN_EOS;
    if (!rc) rc = append_prompt(ss, rendered, n, 1, err);
    free(rendered);
    if (rc) { ss->n_prompt = 0; return rc; }
    if (ss->pos + ss->n_prompt > ss->ctx->n_ctx) {
        int more = ss->n_prompt;
        ss->n_prompt = 0;
        return llama2_fail(err, LLAMA2_ERR_ARGUMENT,
                           "the conversation is longer than the context: %d tokens so far and %d more do not fit "
                           "in n_ctx %d", ss->pos, more, ss->ctx->n_ctx);
    }
    ss->pending_eos = 0;
    ss->turns++;
    ss->history_only = history;
    ss->prev = LLAMA2_TOKEN_BOS;
    llama2_utf8_filter_reset(&ss->filter);
    ss->user_idx = 0;
    ss->user_turn = 0;
    return LLAMA2_OK;
}

int llama2_session_chat_input(llama2_session *ss, const char *system, size_t system_len,
                              const char *user, size_t user_len, llama2_error *err) {
    llama2_ok(err);
    if (!ss) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    const int conversation = ss->mode == LLAMA2_MODE_CONVERSATION;
    /* a conversation may cut a reply short: its printed tokens have all been run */
    if (ss->mode == LLAMA2_MODE_GENERATE || (!ss->user_turn && !conversation) || ss->done)
        return llama2_fail(err, LLAMA2_ERR_STATE, "the session is not waiting for a user turn");
    if (!user) user_len = 0;
    if (!system) system_len = 0;
    if (conversation)
        return queue_turn(ss, system, system_len, user, user_len, NULL, 0, 0, err);
    size_t n;
    char *rendered = render_turn(system, system_len, ss->pos == 0 && system_len > 0, user, user_len, &n);
    if (!rendered) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    int rc = set_prompt(ss, rendered, n, err);
    free(rendered);
    if (rc) return rc;
    ss->user_idx = 0;
    ss->user_turn = 0;
    return LLAMA2_OK;
}

int llama2_session_chat_history(llama2_session *ss, const char *system, size_t system_len, const char *user,
                                size_t user_len, const char *reply, size_t reply_len, llama2_error *err) {
    llama2_ok(err);
    if (!ss) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    if (ss->mode != LLAMA2_MODE_CONVERSATION || ss->done)
        return llama2_fail(err, LLAMA2_ERR_STATE, "earlier turns are fed in conversation mode");
    return queue_turn(ss, system, system ? system_len : 0, user, user ? user_len : 0, reply,
                      reply ? reply_len : 0, 1, err);
}

int llama2_session_set_reply_limit(llama2_session *ss, int max_tokens, llama2_error *err) {
    llama2_ok(err);
    if (!ss || ss->mode != LLAMA2_MODE_CONVERSATION)
        return llama2_fail(err, LLAMA2_ERR_STATE, "a reply limit applies to conversation mode");
    ss->reply_limit = max_tokens < 0 ? -1 : max_tokens;
    return LLAMA2_OK;
}

int llama2_session_set_sampler(llama2_session *ss, llama2_sampler *s, llama2_error *err) {
    llama2_ok(err);
    if (!ss || !s) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    if (ss->mode != LLAMA2_MODE_CONVERSATION || ss->done)
        return llama2_fail(err, LLAMA2_ERR_STATE, "the sampler changes between turns of a conversation");
    ss->s = s;
    int from = ss->n_history - llama2_sampler_window(s);
    for (int i = from > 0 ? from : 0; i < ss->n_history; i++) llama2_sampler_accept(s, ss->history[i]);
    return LLAMA2_OK;
}

int llama2_session_run(llama2_session *ss, char **text, size_t *len, int *n_steps,
                       llama2_error *err) {
    llama2_ok(err);
    if (!ss || !text || !len) return llama2_fail(err, LLAMA2_ERR_ARGUMENT, "null argument");
    if (ss->mode != LLAMA2_MODE_GENERATE)
        return llama2_fail(err, LLAMA2_ERR_STATE, "llama2_session_run is for generate mode");
    size_t cap = 256, n = 0;
    char *buf = (char *)malloc(cap);
    if (!buf) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory");
    llama2_step st;
    for (;;) {
        int rc = llama2_session_step(ss, &st, err);
        if (rc) { free(buf); return rc; }
        if (n + (size_t)st.text_len + 1 > cap) {
            while (n + (size_t)st.text_len + 1 > cap) cap *= 2;
            char *grown = (char *)realloc(buf, cap);
            if (!grown) { free(buf); return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory"); }
            buf = grown;
        }
        memcpy(buf + n, st.text, (size_t)st.text_len);
        n += (size_t)st.text_len;
        if (st.kind != LLAMA2_STEP_TOKEN) break;
    }
    buf[n] = '\0';
    *text = buf;
    *len = n;
    if (n_steps) *n_steps = ss->pos;
    return LLAMA2_OK;
}
