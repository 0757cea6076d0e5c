/*
 * test_common.h - what the C test programs (test_llama2.c, test_q4.c)
 * share: the CHECK macro and its counters, a xorshift random stream, the
 * temporary-file folder, the list of kernel tiers this CPU runs, and dummy
 * transformers that own packed weight buffers. Included once per program.
 */
#ifndef LLAMA2_TEST_COMMON_H
#define LLAMA2_TEST_COMMON_H

#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef VERBOSITY
#define VERBOSITY 0
#endif

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                \
    do {                                                \
        checks++;                                       \
        if (!(cond)) {                                  \
            failures++;                                 \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);                        \
            printf("\n");                               \
        } else if (VERBOSITY) {                         \
            printf("ok   ");                            \
            printf(__VA_ARGS__);                        \
            printf("\n");                               \
        }                                               \
    } while (0)

/* one step of Marsaglia's xorshift64 on *s */
static uint64_t xorshift64(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* temporary files go to $TMPDIR (or /tmp), named <prefix><name> */
static char tmp_dir[256] = "/tmp";
static const char *tmp_prefix = "llama2_test_";
static void use_tmpdir_from_env(const char *prefix) {
    const char *env = getenv("TMPDIR");
    if (env && strlen(env) < 200) snprintf(tmp_dir, sizeof(tmp_dir), "%s", env);
    tmp_prefix = prefix;
}
static const char *tmp_path(const char *name) {
    static char buf[512];
    snprintf(buf, sizeof(buf), "%s/%s%s", tmp_dir, tmp_prefix, name);
    return buf;
}

/* every kernel table this CPU can run, scalar first (kernel_tier: the name
 * that selects it through LLAMA2_KERNELS); the tiers it cannot run, with the
 * reason, in kernels_skipped */
static const char *const tier_names[] = {"scalar", "avx2", "avx512-noamx", "avx512-amx", "neon-nosdot", "neon-sdot"};
static const llama2_kernels *kernel_list[8];
static const char *kernel_tier[8];
static int n_kernels = 0;
static char kernels_skipped[512] = "";

static void find_kernels(void) {
    size_t used = 0;
    for (size_t i = 0; i < sizeof(tier_names) / sizeof(tier_names[0]); i++) {
        const llama2_kernels *k = llama2_kernels_by_name(tier_names[i]);
        if (k) {
            int seen = 0; /* "neon" and "neon-sdot" may be one table */
            for (int j = 0; j < n_kernels; j++) seen |= kernel_list[j] == k;
            if (!seen) {
                kernel_tier[n_kernels] = tier_names[i];
                kernel_list[n_kernels++] = k;
            }
        } else if (used < sizeof(kernels_skipped)) {
            used += (size_t)snprintf(kernels_skipped + used, sizeof(kernels_skipped) - used, "\n  skipped %s: %s",
                                     tier_names[i], llama2_kernels_unavailable(tier_names[i]));
        }
    }
}

/* a dummy transformer that owns packed buffers, in the layout of kernels k */
static llama2_transformer *owner_for(const llama2_kernels *k) {
    llama2_transformer *t = (llama2_transformer *)calloc(1, sizeof(llama2_transformer));
    t->kernels = k;
    return t;
}
static void free_owner(llama2_transformer *t) {
    llama2_buffers_free(&t->owned);
    free(t);
}

#endif
