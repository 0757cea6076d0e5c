/*
 * kernels.c - picking the matrix-vector kernels for this CPU at run time,
 * and repacking weights for the kernels that want it. One build runs on any
 * x86-64 (portable, AVX2 or AVX-512 kernels, chosen by CPUID and the OS's
 * saved register state) or aarch64 (NEON, with SDOT where the CPU has it),
 * and compiles anywhere else with the portable kernels.
 */
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(_MSC_VER)
#include <intrin.h>
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(_M_ARM64)
#include <windows.h>
#endif

#if defined(_MSC_VER)
#define THREAD_LOCAL __declspec(thread)
#else
#define THREAD_LOCAL _Thread_local
#endif

/* ---- what this CPU (and its OS) can run ---- */

typedef struct {
    int x86, avx2, fma, avx512f, avx512bw, avx512vl, avx512vnni, os_ymm, os_zmm;
    int amx_int8, os_amx; /* AMX tiles with int8, and their state saved by the OS (XCR0) */
    int arm64, neon, sdot;
} cpu_features;

#if defined(LLAMA2_HAVE_AVX2_KERNELS)
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
    int info[4];
    __cpuidex(info, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)info[i];
#else
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

/* XCR0: which register states the OS saves on a context switch */
static unsigned long long xgetbv0(void) {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
#endif
}
#endif

#if defined(__APPLE__)
static int sysctl_flag(const char *name) {
    int v = 0;
    size_t len = sizeof(v);
    return sysctlbyname(name, &v, &len, NULL, 0) == 0 && v;
}
#endif

static void detect(cpu_features *c) {
    memset(c, 0, sizeof(*c));
#if defined(LLAMA2_HAVE_AVX2_KERNELS)
    unsigned r[4];
    c->x86 = 1;
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    cpuid(1, 0, r);
    const int osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
    c->fma = (r[2] >> 12) & 1;
    if (osxsave) {
        const unsigned long long xcr0 = xgetbv0();
        c->os_ymm = avx && (xcr0 & 0x6) == 0x6;          /* SSE and AVX state */
        c->os_zmm = c->os_ymm && (xcr0 & 0xe0) == 0xe0;  /* opmask, ZMM0-15 upper halves, ZMM16-31 */
        c->os_amx = (xcr0 & 0x60000) == 0x60000;         /* tile configuration and tile data */
    }
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        c->avx2 = (r[1] >> 5) & 1;
        c->avx512f = (r[1] >> 16) & 1;
        c->avx512bw = (r[1] >> 30) & 1;
        c->avx512vl = (r[1] >> 31) & 1;
        c->avx512vnni = (r[2] >> 11) & 1;
        c->amx_int8 = ((r[3] >> 24) & 1) && ((r[3] >> 25) & 1); /* AMX-TILE, AMX-INT8 */
    }
#if defined(__APPLE__)
    /* macOS turns AVX-512 state on at a thread's first use, so XCR0 may not
     * show it yet; the kernel says whether it will */
    if (c->os_ymm && !c->os_zmm && c->avx512f) c->os_zmm = sysctl_flag("hw.optional.avx512f");
#endif
#elif defined(LLAMA2_HAVE_NEON_KERNELS)
    c->arm64 = 1;
    c->neon = 1; /* every aarch64 CPU has Advanced SIMD */
#if defined(__linux__) && defined(AT_HWCAP)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
    c->sdot = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    c->sdot = sysctl_flag("hw.optional.arm.FEAT_DotProd") || sysctl_flag("hw.optional.armv8_2_dotprod");
#elif defined(_M_ARM64)
    c->sdot = IsProcessorFeaturePresent(43 /* PF_ARM_V82_DP_INSTRUCTIONS_AVAILABLE */) != 0;
#endif
#endif
}

/* Why the AVX-512 tier cannot use AMX for batched int8, or NULL when it can. */
static const char *amx_missing(const cpu_features *c) {
#if defined(LLAMA2_HAVE_AMX_KERNELS)
    if (!c->amx_int8) return "the CPU lacks AMX-INT8";
    if (!c->os_amx) return "the OS does not save AMX tile registers";
    if (!llama2_amx_permitted()) return "the OS refused this process the AMX tile state";
    return NULL;
#else
    (void)c;
    return "this build has no AMX kernels (GCC 11 or clang 12 on Linux)";
#endif
}

/* Why this CPU cannot run a tier, or NULL when it can. */
static const char *missing(const char *tier, const cpu_features *c) {
    if (strcmp(tier, "scalar") == 0 || strcmp(tier, "portable") == 0) return NULL;
    if (strcmp(tier, "avx2") == 0) {
        if (!c->x86) return "not an x86-64 build";
        if (!c->avx2 || !c->fma) return "the CPU lacks AVX2 or FMA";
        if (!c->os_ymm) return "the OS does not save AVX (ymm) registers";
        return NULL;
    }
    if (strcmp(tier, "avx512") == 0 || strcmp(tier, "avx512-noamx") == 0 || strcmp(tier, "avx512-amx") == 0) {
        if (!c->x86) return "not an x86-64 build";
        if (!c->avx512f || !c->avx512bw || !c->avx512vl) return "the CPU lacks AVX-512 F/BW/VL";
        if (!c->avx512vnni) return "the CPU lacks AVX512_VNNI (int8 dot products)";
        if (!c->fma || !c->avx2) return "the CPU lacks AVX2 or FMA";
        if (!c->os_zmm) return "the OS does not save AVX-512 (zmm and mask) registers";
        if (strcmp(tier, "avx512-amx") == 0) return amx_missing(c);
        return NULL;
    }
    if (strcmp(tier, "neon") == 0 || strcmp(tier, "neon-nosdot") == 0) {
#if defined(LLAMA2_HAVE_NEON_KERNELS)
        return NULL;
#else
        return "not an aarch64 build";
#endif
    }
    if (strcmp(tier, "neon-sdot") == 0) {
#if defined(LLAMA2_HAVE_NEON_SDOT_KERNELS)
        return c->sdot ? NULL : "the CPU lacks the dot product instructions (SDOT)";
#elif defined(LLAMA2_HAVE_NEON_KERNELS)
        return "this compiler's build has no SDOT kernels";
#else
        return "not an aarch64 build";
#endif
    }
    return "not a tier name (portable, scalar, avx2, avx512, neon)";
}

static const llama2_kernels *table(const char *tier, const cpu_features *c) {
    if (missing(tier, c)) return NULL;
    if (strcmp(tier, "scalar") == 0 || strcmp(tier, "portable") == 0) return &llama2_kernels_scalar;
#ifdef LLAMA2_HAVE_AVX2_KERNELS
    if (strcmp(tier, "avx2") == 0) return &llama2_kernels_avx2;
#endif
#ifdef LLAMA2_HAVE_AMX_KERNELS
    if (strcmp(tier, "avx512-amx") == 0 || (strcmp(tier, "avx512") == 0 && !amx_missing(c)))
        return &llama2_kernels_avx512_amx;
#endif
#ifdef LLAMA2_HAVE_AVX512_KERNELS
    if (strcmp(tier, "avx512") == 0 || strcmp(tier, "avx512-noamx") == 0) return &llama2_kernels_avx512;
#endif
#ifdef LLAMA2_HAVE_NEON_SDOT_KERNELS
    if (strcmp(tier, "neon-sdot") == 0 || (strcmp(tier, "neon") == 0 && c->sdot)) return &llama2_kernels_neon_sdot;
#endif
#ifdef LLAMA2_HAVE_NEON_KERNELS
    if (strcmp(tier, "neon") == 0 || strcmp(tier, "neon-nosdot") == 0) return &llama2_kernels_neon;
#endif
    return NULL;
}

const llama2_kernels *llama2_kernels_by_name(const char *name) {
    if (!name) return NULL;
    cpu_features c;
    detect(&c);
    return table(name, &c);
}

const char *llama2_kernels_unavailable(const char *name) {
    cpu_features c;
    detect(&c);
    const char *why = missing(name ? name : "", &c);
    return why ? why : "";
}

/* The best tier this CPU runs and, in why (when not NULL), why not the better ones. */
static const llama2_kernels *best(const cpu_features *c, char *why, size_t len) {
    static const char *const order[] = {"avx512", "avx2", "neon", "scalar"};
    size_t used = 0;
    if (why && len) why[0] = '\0';
    for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
        const llama2_kernels *k = table(order[i], c);
        if (k) return k;
        const char *m = missing(order[i], c);
        if (why && strncmp(m, "not an", 6) != 0 && used < len) /* a tier of another architecture: not worth saying */
            used += (size_t)snprintf(why + used, len - used, "%sno %s: %s", used ? "; " : "", order[i], m);
    }
    return &llama2_kernels_scalar;
}

/* The choice and its reason (reason may be NULL). */
static const llama2_kernels *choose(char *reason, size_t len) {
    cpu_features c;
    detect(&c);
    char why[192];
    const llama2_kernels *k = best(&c, why, sizeof(why));
    const char *env = getenv("LLAMA2_KERNELS");
    if (env && *env) {
        const llama2_kernels *forced = table(env, &c);
        if (forced) {
            if (reason) snprintf(reason, len, "forced by LLAMA2_KERNELS=%s", env);
            return forced;
        }
        if (reason)
            snprintf(reason, len, "LLAMA2_KERNELS=%.40s asked for a tier this CPU cannot run (%s): using %s, the best it runs",
                     env, missing(env, &c), k->name);
        return k;
    }
    if (reason) {
        if (why[0])
            snprintf(reason, len, "the best this CPU runs (%s)", why);
        else
            snprintf(reason, len, "the best this CPU runs");
    }
    return k;
}

const llama2_kernels *llama2_kernels_select(void) { return choose(NULL, 0); }

const char *llama2_kernels_name(void) {
    const char *name = choose(NULL, 0)->name;
    if (strcmp(name, "neon-sdot") == 0) return "neon"; /* the tier; the reason tells SDOT */
    if (strcmp(name, "avx512-amx") == 0) return "avx512"; /* and AMX */
    return name;
}

const char *llama2_kernels_reason(void) {
    static THREAD_LOCAL char reason[384];
    const llama2_kernels *k = choose(reason, sizeof(reason));
    if (strncmp(k->name, "avx512", 6) == 0 && strncmp(reason, "forced", 6) != 0) { /* a forced one says its name */
        size_t used = strlen(reason);
        snprintf(reason + used, sizeof(reason) - used, "; batched int8 on %s",
                 strcmp(k->name, "avx512-amx") == 0 ? "AMX tiles" : "VNNI (no AMX)");
        return reason;
    }
    if (k == &llama2_kernels_scalar || strncmp(k->name, "neon", 4) != 0) return reason;
    size_t used = strlen(reason);
    snprintf(reason + used, sizeof(reason) - used, "; int8 with %s",
             strcmp(k->name, "neon-sdot") == 0 ? "SDOT" : "widening multiplies (no SDOT)");
    return reason;
}

const char *llama2_cpu_features(void) {
    static THREAD_LOCAL char out[160];
    cpu_features c;
    detect(&c);
    out[0] = '\0';
    struct { int on; const char *name; } f[] = {
        {c.avx2, "avx2"}, {c.fma, "fma"}, {c.avx512f, "avx512f"}, {c.avx512bw, "avx512bw"},
        {c.avx512vl, "avx512vl"}, {c.avx512vnni, "avx512_vnni"}, {c.amx_int8, "amx_int8"}, {c.os_ymm, "os_ymm"},
        {c.os_zmm, "os_zmm"}, {c.os_amx, "os_amx"},
        {c.neon, "neon"}, {c.sdot, "asimddp"},
    };
    size_t used = 0;
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++)
        if (f[i].on && used < sizeof(out)) used += (size_t)snprintf(out + used, sizeof(out) - used, "%s%s", used ? " " : "", f[i].name);
    return out;
}

/* ---- packing (layouts: kernels.h) ---- */

static int rows_of(const llama2_transformer *t) {
    return t && t->kernels && t->kernels->pack_rows ? t->kernels->pack_rows : LLAMA2_PACK_ROWS;
}

static int q8_format_of(const llama2_transformer *t) {
    return t && t->kernels ? t->kernels->q8_format : LLAMA2_Q8_SIGNED_NO_MIN;
}

int llama2_pack_f32(llama2_transformer *t, llama2_matrix *m, llama2_error *err) {
    const int stream_rows = t && t->kernels ? t->kernels->f32_stream_rows : 0;
    const int R = stream_rows && llama2_f32_stream(m) ? stream_rows : rows_of(t), n = m->cols,
              blocks = (m->rows + R - 1) / R;
    float *p = (float *)llama2_own(t, (size_t)blocks * R * (size_t)n * sizeof(float));
    if (!p) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory repacking weights");
    for (int b = 0; b < blocks; b++) {
        float *dst = p + (size_t)b * n * R;
        for (int r = 0; r < R; r++) {
            int row = b * R + r;
            if (row >= m->rows) break; /* padding stays zero */
            const float *src = m->f + (int64_t)row * n;
            for (int j = 0; j < n; j++) dst[(size_t)j * R + r] = src[j];
        }
    }
    m->p = p;
    return LLAMA2_OK;
}

int llama2_pack_bf16(llama2_transformer *t, llama2_matrix *m, llama2_error *err) {
    const int R = rows_of(t), n = m->cols, blocks = (m->rows + R - 1) / R;
    uint16_t *p = (uint16_t *)llama2_own(t, (size_t)blocks * R * (size_t)n * 2);
    if (!p) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory repacking weights");
    for (int b = 0; b < blocks; b++) {
        uint16_t *dst = p + (size_t)b * n * R;
        for (int r = 0; r < R; r++) {
            int row = b * R + r;
            if (row >= m->rows) break; /* padding stays zero */
            const uint16_t *src = m->h + (int64_t)row * n;
            for (int j = 0; j < n; j++) dst[(size_t)j * R + r] = src[j];
        }
    }
    m->ph = p;
    return LLAMA2_OK;
}

/* The int8 values 4 columns x R rows at a time in the kernels' format
 * (kernels.h), or NULL when the format excludes a -128 that is present;
 * *failed set when memory ran out. */
static const int8_t *regroup_values(llama2_transformer *t, const llama2_matrix *m, int *failed) {
    const int R = rows_of(t), format = q8_format_of(t);
    *failed = 0;
    if (format == LLAMA2_Q8_SIGNED_NO_MIN)
        for (int64_t i = 0, n = (int64_t)m->rows * m->cols; i < n; i++)
            if (m->q[i] == -128) return NULL; /* see kernels.h: pq stays NULL */
    const int steps = m->cols / 4, blocks = (m->rows + R - 1) / R;
    int8_t *pq = (int8_t *)llama2_own(t, (size_t)blocks * R * (size_t)m->cols);
    if (!pq) {
        *failed = 1;
        return NULL;
    }
    /* padding: weight 0, stored +128 when biased */
    if (format == LLAMA2_Q8_BIASED) memset(pq, 0x80, (size_t)blocks * R * (size_t)m->cols);
    for (int b = 0; b < blocks; b++)
        for (int r = 0; r < R; r++) {
            int row = b * R + r;
            if (row >= m->rows) break;
            for (int k = 0; k < steps; k++) {
                int8_t *dst = pq + (((size_t)b * steps + k) * R + r) * 4;
                const int8_t *src = m->q + (int64_t)row * m->cols + 4 * k;
                for (int i = 0; i < 4; i++)
                    dst[i] = format == LLAMA2_Q8_BIASED ? (int8_t)(uint8_t)((uint8_t)src[i] ^ 0x80u) : src[i];
            }
        }
    return pq;
}

/* A matrix whose groups run across rows (n % gs != 0; n and gs multiples of
 * 32): the values regrouped as usual, and for every block and 32-column run
 * c, which rows' segments end with the run (bit r of pends) and the weight
 * scale of each such segment (ps, kernels.h). */
static int pack_span(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    if (gs % 32 != 0 || m->cols % 32 != 0) return LLAMA2_OK; /* the scalar kernel handles it */
    const int R = rows_of(t), n = m->cols, runs = n / 32, blocks = (m->rows + R - 1) / R;
    float *ps = (float *)llama2_own(t, (size_t)blocks * runs * R * sizeof(float));
    uint8_t *pends = (uint8_t *)llama2_own(t, (size_t)blocks * runs * (R / 8));
    if (!ps || !pends) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping scales");
    for (int b = 0; b < blocks; b++)
        for (int c = 0; c < runs; c++) {
            const int end = 32 * (c + 1); /* column just past the run */
            for (int r = 0; r < R; r++) {
                int row = b * R + r;
                int64_t flat_end = (int64_t)row * n + end;
                if (end == n || end % gs == 0 || flat_end % gs == 0)
                    pends[((size_t)b * runs + c) * (R / 8) + r / 8] |= (uint8_t)(1u << (r % 8));
                ps[((size_t)b * runs + c) * R + r] = row < m->rows ? m->s[(flat_end - 1) / gs] : 0.0f;
            }
        }
    int failed;
    const int8_t *pq = regroup_values(t, m, &failed);
    if (failed) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping weights");
    if (pq) {
        m->ps = ps;
        m->pends = pends;
        m->pq = pq;
    }
    return LLAMA2_OK;
}

int llama2_pack_scales(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    if (m->cols % gs != 0) return pack_span(t, m, gs, err);
    const int R = rows_of(t), groups = m->cols / gs, blocks = (m->rows + R - 1) / R;
    float *ps = (float *)llama2_own(t, (size_t)blocks * groups * R * sizeof(float));
    if (!ps) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping scales");
    for (int b = 0; b < blocks; b++)
        for (int r = 0; r < R; r++) {
            int row = b * R + r;
            if (row >= m->rows) break;
            for (int g = 0; g < groups; g++)
                ps[((size_t)b * groups + g) * R + r] = m->s[(int64_t)row * groups + g];
        }
    m->ps = ps;
    if (gs % 32 != 0) return LLAMA2_OK;
    int failed;
    m->pq = regroup_values(t, m, &failed);
    if (failed) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping weights");
    return LLAMA2_OK;
}
