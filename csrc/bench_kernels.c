/*
 * bench_kernels.c - times each matrix-vector kernel on its own (`make
 * bench-kernels`): one thread, matrices that fit in cache and ones that do
 * not, reporting GB/s of weights read and billions of multiply-adds per
 * second (best of the repetitions), for every kernel tier this CPU runs
 * (weights packed in each tier's own layout). For tuning kernels; end-to-end
 * speed is `llama2c bench`.
 *
 *   bench_kernels [TIER ...]     only these tiers (scalar, avx2, avx512, neon, neon-sdot)
 *   BENCH_QUICK=1                fewer repetitions
 *
 * A/B of whole models: one process opens the model once per tier (LLAMA2_KERNELS
 * at open) and alternates them rep by rep (the order flipped every rep), each
 * rep a P-token prefill at position 0 then D decode steps, and prints each
 * tier's median tokens/s: separate processes, even interleaved, drift too much
 * on a shared machine for a 5-10% difference.
 *
 *   bench_kernels --model FILE [--tiers avx2,avx512] [--threads N] [--prompt P]
 *                 [--decode D] [--reps R] [--quantize]
 *
 * Memory bandwidth, the ceiling of decode on models that do not fit in cache:
 * N threads each read their share of a 1 GiB buffer (one sequential stream
 * per thread, the line 512 bytes ahead prefetched, as the stream kernels do),
 * best of 5 passes.
 *
 *   bench_kernels --bandwidth [--threads N]
 */
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

static int quick = 0;

static void bench(const llama2_kernels *k, int rows, int cols, int gs, int reps) {
    if (quick) reps = reps / 4 > 0 ? reps / 4 : 1;
    unsigned seed = 1;
    size_t n = (size_t)rows * cols;
    float *w = malloc(n * 4), *x = malloc((size_t)cols * 4), *out = malloc((size_t)rows * 4);
    uint16_t *wh = malloc(n * 2);
    int8_t *wq = malloc(n), *xq = malloc((size_t)cols);
    float *ws = malloc(n / gs * 4), *xs = malloc((size_t)cols / gs * 4 + 4);
    for (size_t i = 0; i < n; i++) {
        w[i] = frand(&seed);
        uint32_t u;
        memcpy(&u, &w[i], 4);
        wh[i] = (uint16_t)(u >> 16);
    }
    for (int i = 0; i < cols; i++) x[i] = frand(&seed);
    llama2_quantize_weights(wq, ws, w, (int64_t)n, gs);
    llama2_quantize(xq, xs, x, cols, gs);
    llama2_transformer *own = calloc(1, sizeof(llama2_transformer));
    own->kernels = k;
    llama2_matrix mf = {.rows = rows, .cols = cols, .f = w};
    llama2_matrix mh = {.rows = rows, .cols = cols, .h = wh};
    llama2_matrix mq = {.rows = rows, .cols = cols, .q = wq, .s = ws};
    if (k->packs) {
        llama2_pack_f32(own, &mf, NULL);
        llama2_pack_bf16(own, &mh, NULL);
        llama2_pack_scales(own, &mq, gs, NULL);
    }
    /* each time is the best of reps calls: on a shared machine the fastest
     * call is the one nothing else interrupted */
    double tf = 1e30, th = 1e30, tq = 1e30, t0, t;
    for (int r = 0; r < reps; r++) {
        t0 = now();
        k->matmul_f32(out, x, &mf, 0, rows);
        if ((t = now() - t0) < tf) tf = t;
        t0 = now();
        k->matmul_bf16(out, x, &mh, 0, rows);
        if ((t = now() - t0) < th) th = t;
        t0 = now();
        k->matmul_q8(out, xq, xs, &mq, gs, 0, rows);
        if ((t = now() - t0) < tq) tq = t;
    }
    printf("%-9s %5d x %-5d  fp32 %6.1f GB/s %6.2f GMAC/s  bf16 %6.1f GB/s %6.2f GMAC/s  int8 %6.1f GB/s %6.2f GMAC/s\n",
           k->name, rows, cols, n * 4 / tf / 1e9, n / tf / 1e9, n * 2 / th / 1e9, n / th / 1e9,
           n * (1 + 4.0 / gs) / tq / 1e9, n / tq / 1e9);
    if (k->matmul_f32_batch) { /* prefill: 64 tokens against the same weights */
        enum { NT = 64 };
        float *xb = malloc((size_t)cols * NT * 4), *ob = malloc((size_t)rows * NT * 4);
        llama2_activation a[NT];
        for (int b = 0; b < NT; b++) {
            for (int i = 0; i < cols; i++) xb[(size_t)b * cols + i] = frand(&seed);
            a[b].x = xb + (size_t)b * cols;
            a[b].n = cols;
        }
        int breps = reps / 16 > 2 ? reps / 16 : 3;
        double tb = 1e30, tbh = 1e30;
        for (int r = 0; r < breps; r++) {
            t0 = now();
            k->matmul_f32_batch(ob, (size_t)rows, a, NT, &mf, 0, rows);
            if ((t = now() - t0) < tb) tb = t;
            t0 = now();
            k->matmul_bf16_batch(ob, (size_t)rows, a, NT, &mh, 0, rows);
            if ((t = now() - t0) < tbh) tbh = t;
        }
        printf("%-9s %5d x %-5d  batch of %d: fp32 %6.2f GMAC/s  bf16 %6.2f GMAC/s\n", k->name, rows, cols, NT,
               n * NT / tb / 1e9, n * NT / tbh / 1e9);
        free(xb); free(ob);
    }
    llama2_buffers_free(&own->owned);
    free(own);
    free(w); free(wh); free(x); free(out); free(wq); free(xq); free(ws); free(xs);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int ab_models(int argc, char **argv) {
    const char *model = NULL, *tiers = "avx2,avx512";
    int threads = 1, prompt = 128, decode = 32, reps = 5;
    unsigned flags = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (strcmp(a, "--model") == 0) model = v, i++;
        else if (strcmp(a, "--tiers") == 0) tiers = v, i++;
        else if (strcmp(a, "--threads") == 0) threads = atoi(v), i++;
        else if (strcmp(a, "--prompt") == 0) prompt = atoi(v), i++;
        else if (strcmp(a, "--decode") == 0) decode = atoi(v), i++;
        else if (strcmp(a, "--reps") == 0) reps = atoi(v), i++;
        else if (strcmp(a, "--quantize") == 0) flags |= LLAMA2_OPEN_QUANTIZE;
        else { fprintf(stderr, "bench_kernels: unknown option %s\n", a); return 2; }
    }
    enum { MAX_TIERS = 4, MAX_REPS = 64 };
    char names[MAX_TIERS][16];
    llama2_transformer *t[MAX_TIERS];
    int nt = 0;
    for (const char *p = tiers; *p && nt < MAX_TIERS;) {
        size_t len = strcspn(p, ",");
        snprintf(names[nt], sizeof(names[nt]), "%.*s", (int)len, p);
        setenv("LLAMA2_KERNELS", names[nt], 1);
        llama2_error err;
        if (llama2_transformer_open(&t[nt], model, flags, &err) != LLAMA2_OK) {
            fprintf(stderr, "%s: %s\n", model, err.message);
            return 1;
        }
        printf("%s: %s (%s)\n", names[nt], llama2_kernels_name(), llama2_kernels_reason());
        llama2_transformer_set_threads(t[nt], threads);
        nt++;
        p += len + (p[len] == ',');
    }
    const llama2_config *c = llama2_transformer_config(t[0]);
    if (prompt + decode > c->seq_len) prompt = c->seq_len - decode;
    if (reps > MAX_REPS) reps = MAX_REPS;
    int *tokens = malloc(sizeof(int) * (size_t)(prompt + decode));
    unsigned seed = 7;
    tokens[0] = 1;
    for (int i = 1; i < prompt + decode; i++) tokens[i] = (int)((frand(&seed) + 1.0f) * 0.5f * (c->vocab_size - 1));
    double pre[MAX_TIERS][MAX_REPS], dec[MAX_TIERS][MAX_REPS];
    for (int r = -1; r < reps; r++) { /* r = -1: warm-up */
        for (int i = 0; i < nt; i++) {
            int k = r % 2 ? nt - 1 - i : i;
            float *logits;
            llama2_error err;
            double t0 = now();
            for (int pos = 0; pos < prompt; pos += 64) {
                int n = prompt - pos < 64 ? prompt - pos : 64;
                llama2_forward_batch(t[k], tokens + pos, n, pos, &logits, &err);
            }
            double t1 = now();
            for (int d = 0; d < decode; d++) llama2_forward(t[k], tokens[prompt + d], prompt + d, &logits, &err);
            double t2 = now();
            if (r >= 0) {
                pre[k][r] = prompt / (t1 - t0);
                dec[k][r] = decode / (t2 - t1);
            }
        }
    }
    printf("%s, %d thread(s), prefill %d tokens, decode %d, %d reps (tok/s: median, best):\n", model, threads, prompt,
           decode, reps);
    for (int k = 0; k < nt; k++) {
        qsort(pre[k], (size_t)reps, sizeof(double), cmp_double);
        qsort(dec[k], (size_t)reps, sizeof(double), cmp_double);
        printf("  %-9s prefill %8.2f %8.2f  decode %8.2f %8.2f", names[k], pre[k][reps / 2], pre[k][reps - 1],
               dec[k][reps / 2], dec[k][reps - 1]);
        if (k)
            printf("   (median x%.3f, x%.3f; best x%.3f, x%.3f vs %s)", pre[k][reps / 2] / pre[0][reps / 2],
                   dec[k][reps / 2] / dec[0][reps / 2], pre[k][reps - 1] / pre[0][reps - 1],
                   dec[k][reps - 1] / dec[0][reps - 1], names[0]);
        printf("\n");
        llama2_transformer_free(t[k]);
    }
    free(tokens);
    return 0;
}

typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
} read_job;

static void *read_share(void *arg) { /* a plain sequential read; 4 sums so that adds never wait */
    read_job *j = (read_job *)arg;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 8 <= j->n; i += 8) {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch((const char *)(j->p + i) + 512);
#endif
        s0 += j->p[i] ^ j->p[i + 4];
        s1 += j->p[i + 1] ^ j->p[i + 5];
        s2 += j->p[i + 2] ^ j->p[i + 6];
        s3 += j->p[i + 3] ^ j->p[i + 7];
    }
    j->sum = s0 + s1 + s2 + s3;
    return NULL;
}

static int bandwidth(int threads) {
    enum { MAX_T = 16 };
    const size_t bytes = (size_t)1 << 30, n = bytes / 8;
    uint64_t *p = malloc(bytes);
    if (!p || threads < 1 || threads > MAX_T) return 1;
    for (size_t i = 0; i < n; i++) p[i] = i * 2654435761u;
    double best = 0;
    for (int pass = 0; pass < 5; pass++) {
        pthread_t th[MAX_T];
        read_job jobs[MAX_T];
        double t0 = now();
        for (int t = 0; t < threads; t++) {
            jobs[t] = (read_job){p + n / threads * t, n / threads, 0};
            pthread_create(&th[t], NULL, read_share, &jobs[t]);
        }
        for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
        double gbs = bytes / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("memory read bandwidth, %d thread(s): %.1f GB/s (1 GiB, best of 5)\n", threads, best);
    free(p);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--bandwidth") == 0)
        return bandwidth(argc > 3 && strcmp(argv[2], "--threads") == 0 ? atoi(argv[3]) : 1);
    if (argc > 1 && strncmp(argv[1], "--", 2) == 0) return ab_models(argc, argv);
    const char *all[] = {"scalar", "avx2", "avx512", "neon", "neon-sdot"};
    const char **names = argc > 1 ? (const char **)argv + 1 : all;
    int count = argc > 1 ? argc - 1 : (int)(sizeof(all) / sizeof(all[0]));
    quick = getenv("BENCH_QUICK") != NULL;
    for (int i = 0; i < count; i++) {
        const llama2_kernels *k = llama2_kernels_by_name(names[i]);
        if (!k) {
            printf("%-9s skipped: %s\n", names[i], llama2_kernels_unavailable(names[i]));
            continue;
        }
        bench(k, 768, 288, 32, 2000);     /* in cache */
        bench(k, 2048, 2048, 64, 40);     /* 16 MB fp32: memory */
        bench(k, 32000, 288, 32, 20);     /* a classifier */
        bench(k, 5632, 2048, 64, 10);     /* TinyLlama w1 */
        bench(k, 288, 32000, 32, 20);     /* wide rows */
    }
    return 0;
}
