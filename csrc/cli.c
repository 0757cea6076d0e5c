/*
 * cli.c - the command line of the `run` and `runq` programs (run.c and
 * runq.c are their main()s; cli.h). Not part of libllama2: everything here
 * goes through the public API (llama2.h), as any program using it would.
 *
 *   run <checkpoint> [-t temp] [-p topp] [-s seed] [-n steps] [-i prompt]
 *                    [-z tokenizer] [-m generate|chat] [-y system] [-c n_ctx]
 *
 * Flags and defaults are llama2.c's; so is stdout, byte for byte, except
 * that multi-byte UTF-8 arriving as byte tokens is printed instead of
 * dropped. All errors go to stderr with a non-zero exit status.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(_WIN32)
#include <windows.h>
#endif

/* the program running: run or runq (set once, by llama2_cli_main) */
static const llama2_cli_program *program;

static long long time_in_ms(void) {
#if defined(_WIN32)
    return (long long)GetTickCount64();
#else
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
#endif
}

/* The usage text on stderr and exit status 1, as llama2.c; asked for with
 * -h or --help alone, on stdout and status 0. */
static void usage(const char *why) {
    static int asked = 0;
    if (why && strcmp(why, "--help") == 0) {
        asked = 1;
        why = NULL;
    }
    FILE *out = asked ? stdout : stderr;
    if (why) fprintf(out, "%s: %s\n\n", program->name, why);
    fprintf(out, "usage: %s <model.bin> [options]\n", program->name);
    fprintf(out, "example: %s stories15M.bin -n 256 -i \"Once upon a time\"\n", program->name);
    fprintf(out,
            "options:\n"
            "  -t <float>  temperature, 0 = greedy (default 1.0)\n"
            "  -p <float>  top-p (nucleus) threshold in [0,1] (default 0.9)\n"
            "  -s <int>    random seed; 0 or negative seeds from the clock (default)\n"
            "  -n <int>    number of steps, 0 = the model's seq_len (default 256)\n"
            "  -i <string> prompt\n"
            "  -z <string> tokenizer file (default: tokenizer.bin; a .gguf model's own)\n"
            "  -m <string> mode: generate or chat (default generate)\n"
            "  -y <string> system prompt for chat mode\n"
            "  -c <int>    context length in tokens, 0 = the model's seq_len (default 0)\n");
    fprintf(out, "%s\n", program->weights);
    exit(asked ? EXIT_SUCCESS : EXIT_FAILURE);
}

static void die(const llama2_error *err) {
    fprintf(stderr, "%s: error: %s\n", program->name, err->message[0] ? err->message : "unknown error");
    exit(EXIT_FAILURE);
}

/* Reads one line of any length from stdin without its newline; NULL at EOF. */
static char *read_line(const char *guide) {
    printf("%s", guide);
    fflush(stdout);
    size_t cap = 256, n = 0;
    char *buf = (char *)malloc(cap);
    if (!buf) return NULL;
    int c;
    while ((c = getchar()) != EOF && c != '\n') {
        if (n + 1 >= cap) {
            char *grown = (char *)realloc(buf, cap *= 2);
            if (!grown) break;
            buf = grown;
        }
        buf[n++] = (char)c;
    }
    if (c == EOF && n == 0) { free(buf); return NULL; }
    buf[n] = '\0';
    return buf;
}

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = (char *)malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static void print_text(const llama2_step *st) {
    if (st->text_len > 0) fwrite(st->text, 1, (size_t)st->text_len, stdout);
    fflush(stdout);
}

static void generate(llama2_session *ss, llama2_error *err) {
    llama2_step st;
    long long start = 0;
    int pos = 0, timed_from = 0;
    for (;;) {
        if (llama2_session_step(ss, &st, err)) die(err);
        pos = st.pos;
        print_text(&st);
        if (st.kind != LLAMA2_STEP_TOKEN) break;
        if (start == 0) { /* the first step warms up (and runs a batched prompt): not timed */
            start = time_in_ms();
            timed_from = pos;
        }
    }
    printf("\n");
    fflush(stdout);
    if (pos > 1 && start != 0) {
        long long end = time_in_ms();
        double elapsed = (double)(end - start);
        fprintf(stderr, "achieved tok/s: %f\n", elapsed > 0 ? (pos - timed_from) / elapsed * 1000 : 0.0);
    }
}

static void chat(llama2_session *ss, const char *cli_prompt, const char *cli_system,
                 llama2_error *err) {
    llama2_step st;
    char *system = NULL;
    for (;;) {
        if (llama2_session_step(ss, &st, err)) die(err);
        if (st.kind == LLAMA2_STEP_DONE) break;
        if (st.kind == LLAMA2_STEP_NEED_INPUT) {
            int first = llama2_session_pos(ss) == 0;
            if (first) {
                system = cli_system ? copy_string(cli_system) : read_line("Enter system prompt (optional): ");
                if (!system) system = copy_string(""); /* no input: no system prompt */
                if (!system) break;
            }
            char *user = first && cli_prompt ? copy_string(cli_prompt) : read_line("User: ");
            if (!user) break; /* end of input ends the conversation */
            int rc = llama2_session_chat_input(ss, first ? system : NULL, first ? strlen(system) : 0,
                                               user, strlen(user), err);
            free(user);
            if (rc) die(err);
            printf("Assistant: ");
            fflush(stdout);
            continue;
        }
        print_text(&st);
    }
    free(system);
    printf("\n");
    fflush(stdout);
}

/* The main() of run and runq (cli.h). */
int llama2_cli_main(int argc, char *argv[], const llama2_cli_program *prog) {
    program = prog;
    const char *checkpoint = NULL, *tokenizer_path = NULL;
    float temperature = 1.0f, topp = 0.9f;
    int steps = 256, n_ctx = 0;
    const char *prompt = NULL, *mode = "generate", *system_prompt = NULL;
    long long seed = 0;

    if (argc < 2) usage(NULL);
    if (argc == 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) usage("--help");
    checkpoint = argv[1];
    if (checkpoint[0] == '-' && checkpoint[1] != '\0') usage("the first argument must be the model file");
    for (int i = 2; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2) usage("options look like -x <value>");
        if (i + 1 >= argc) usage("an option is missing its value");
        char flag = argv[i][1];
        const char *val = argv[i + 1];
        switch (flag) {
        case 't': temperature = (float)atof(val); break;
        case 'p': topp = (float)atof(val); break;
        case 's': seed = atoi(val); break; /* an int, as in llama2.c (glibc: low 32 bits) */
        case 'n': steps = atoi(val); break;
        case 'i': prompt = val; break;
        case 'z': tokenizer_path = val; break;
        case 'm': mode = val; break;
        case 'y': system_prompt = val; break;
        case 'c': n_ctx = atoi(val); if (n_ctx < 0) usage("the context length must be >= 0"); break;
        default: usage("unknown option");
        }
    }
    int chat_mode = strcmp(mode, "chat") == 0;
    if (!chat_mode && strcmp(mode, "generate") != 0) usage("mode must be generate or chat");
    if (seed <= 0) seed = (long long)(unsigned int)time(NULL);
    if (temperature < 0.0f || temperature != temperature) temperature = 0.0f;
    if (topp < 0.0f || topp > 1.0f || topp != topp) topp = 0.9f;
    if (steps < 0) steps = 0;

    llama2_error err;
    llama2_transformer *t;
    if (llama2_transformer_open(&t, checkpoint, program->open_flags, &err)) die(&err);
    const llama2_config *c = llama2_transformer_config(t);
    const char *notice = llama2_transformer_notice(t); /* e.g. GGUF tensors dequantized at load */
    if (notice) fprintf(stderr, "note: %s\n", notice);
    /* default: tokenizer.bin, or a GGUF model's own vocabulary */
    if (!tokenizer_path) tokenizer_path = c->version == LLAMA2_VERSION_GGUF ? checkpoint : "tokenizer.bin";
    llama2_tokenizer *tk;
    if (llama2_tokenizer_open(&tk, tokenizer_path, c->vocab_size, &err)) die(&err);
    llama2_sampler_params params;
    llama2_sampler_params_default(&params);
    params.temperature = temperature;
    params.topp = topp;
    llama2_sampler *sampler;
    if (llama2_sampler_new(&sampler, c->vocab_size, &params, (uint64_t)seed, &err)) die(&err);
    llama2_context *ctx;
    if (llama2_context_new(&ctx, t, n_ctx, &err)) die(&err);
    llama2_session *ss;
    if (llama2_session_new_ctx(&ss, ctx, tk, sampler, chat_mode ? LLAMA2_MODE_CHAT : LLAMA2_MODE_GENERATE,
                           prompt, prompt ? strlen(prompt) : 0, steps, &err))
        die(&err);

    if (chat_mode)
        chat(ss, prompt, system_prompt, &err);
    else
        generate(ss, &err);

    llama2_session_free(ss);
    llama2_sampler_free(sampler);
    llama2_context_free(ctx);
    llama2_tokenizer_free(tk);
    llama2_transformer_free(t);
    return 0;
}
