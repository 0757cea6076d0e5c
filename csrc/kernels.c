/*
 * kernels.c - picking the matrix-vector kernels for this CPU at run time,
 * and repacking fp32 weights for the kernels that want it. One build runs
 * on any x86-64 (and compiles anywhere else with the scalar kernels).
 */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>
#if defined(_MSC_VER)
#include <intrin.h>
#endif

/* AVX2 and FMA (every AVX2 CPU made has both; the bf16 kernels use FMA) */
static int cpu_has_avx2(void) {
#if defined(LLAMA2_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(LLAMA2_HAVE_AVX2_KERNELS) && defined(_MSC_VER)
    int info[4];
    __cpuid(info, 0);
    if (info[0] < 7) return 0;
    __cpuid(info, 1);
    int osxsave = (info[2] >> 27) & 1, avx = (info[2] >> 28) & 1, fma = (info[2] >> 12) & 1;
    if (!osxsave || !avx || !fma || (_xgetbv(0) & 6) != 6) return 0;
    __cpuidex(info, 7, 0);
    return (info[1] >> 5) & 1;
#else
    return 0;
#endif
}

const llama2_kernels *llama2_kernels_by_name(const char *name) {
    if (!name) return NULL;
    if (strcmp(name, "scalar") == 0) return &llama2_kernels_scalar;
#ifdef LLAMA2_HAVE_AVX2_KERNELS
    if (strcmp(name, "avx2") == 0) return cpu_has_avx2() ? &llama2_kernels_avx2 : NULL;
#endif
    return NULL;
}

const llama2_kernels *llama2_kernels_select(void) {
    const llama2_kernels *forced = llama2_kernels_by_name(getenv("LLAMA2_KERNELS"));
    if (forced) return forced;
#ifdef LLAMA2_HAVE_AVX2_KERNELS
    if (cpu_has_avx2()) return &llama2_kernels_avx2;
#endif
    return &llama2_kernels_scalar;
}

int llama2_pack_f32(llama2_transformer *t, llama2_matrix *m, llama2_error *err) {
    const int n = m->cols, blocks = (m->rows + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS;
    float *p = (float *)llama2_own(t, (size_t)blocks * LLAMA2_PACK_ROWS * (size_t)n * sizeof(float));
    if (!p) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory repacking weights");
    for (int b = 0; b < blocks; b++) {
        float *dst = p + (size_t)b * n * LLAMA2_PACK_ROWS;
        for (int r = 0; r < LLAMA2_PACK_ROWS; r++) {
            int row = b * LLAMA2_PACK_ROWS + r;
            if (row >= m->rows) break; /* padding stays zero */
            const float *src = m->f + (int64_t)row * n;
            for (int j = 0; j < n; j++) dst[(size_t)j * LLAMA2_PACK_ROWS + r] = src[j];
        }
    }
    m->p = p;
    return LLAMA2_OK;
}

int llama2_pack_bf16(llama2_transformer *t, llama2_matrix *m, llama2_error *err) {
    const int n = m->cols, blocks = (m->rows + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS;
    uint16_t *p = (uint16_t *)llama2_own(t, (size_t)blocks * LLAMA2_PACK_ROWS * (size_t)n * 2);
    if (!p) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory repacking weights");
    for (int b = 0; b < blocks; b++) {
        uint16_t *dst = p + (size_t)b * n * LLAMA2_PACK_ROWS;
        for (int r = 0; r < LLAMA2_PACK_ROWS; r++) {
            int row = b * LLAMA2_PACK_ROWS + r;
            if (row >= m->rows) break; /* padding stays zero */
            const uint16_t *src = m->h + (int64_t)row * n;
            for (int j = 0; j < n; j++) dst[(size_t)j * LLAMA2_PACK_ROWS + r] = src[j];
        }
    }
    m->ph = p;
    return LLAMA2_OK;
}

/* The int8 values 4 columns x 8 rows at a time (kernels.h), or NULL when a
 * -128 is present; *failed set when memory ran out. */
static const int8_t *regroup_values(llama2_transformer *t, const llama2_matrix *m, int *failed) {
    *failed = 0;
    for (int64_t i = 0, n = (int64_t)m->rows * m->cols; i < n; i++)
        if (m->q[i] == -128) return NULL; /* see kernels.h: pq stays NULL */
    const int steps = m->cols / 4, blocks = (m->rows + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS;
    int8_t *pq = (int8_t *)llama2_own(t, (size_t)blocks * LLAMA2_PACK_ROWS * (size_t)m->cols);
    if (!pq) {
        *failed = 1;
        return NULL;
    }
    for (int b = 0; b < blocks; b++)
        for (int r = 0; r < LLAMA2_PACK_ROWS; r++) {
            int row = b * LLAMA2_PACK_ROWS + r;
            if (row >= m->rows) break; /* padding stays zero */
            for (int k = 0; k < steps; k++)
                memcpy(pq + (((size_t)b * steps + k) * LLAMA2_PACK_ROWS + r) * 4, m->q + (int64_t)row * m->cols + 4 * k, 4);
        }
    return pq;
}

/* A matrix whose groups run across rows (n % gs != 0; n and gs multiples of
 * 32): the values regrouped as usual, and for every block and 32-column run
 * c, which rows' segments end with the run (bit r of pends) and the weight
 * scale of each such segment (ps, kernels.h). */
static int pack_span(llama2_transformer *t, llama2_matrix *m, int gs, llama2_error *err) {
    if (gs % 32 != 0 || m->cols % 32 != 0) return LLAMA2_OK; /* the scalar kernel handles it */
    const int n = m->cols, runs = n / 32, blocks = (m->rows + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS;
    float *ps = (float *)llama2_own(t, (size_t)blocks * runs * LLAMA2_PACK_ROWS * sizeof(float));
    uint8_t *pends = (uint8_t *)llama2_own(t, (size_t)blocks * runs);
    if (!ps || !pends) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping scales");
    for (int b = 0; b < blocks; b++)
        for (int c = 0; c < runs; c++) {
            const int end = 32 * (c + 1); /* column just past the run */
            unsigned bits = 0;
            for (int r = 0; r < LLAMA2_PACK_ROWS; r++) {
                int row = b * LLAMA2_PACK_ROWS + r;
                int64_t flat_end = (int64_t)row * n + end;
                if (end == n || end % gs == 0 || flat_end % gs == 0) bits |= 1u << r;
                ps[((size_t)b * runs + c) * LLAMA2_PACK_ROWS + r] = row < m->rows ? m->s[(flat_end - 1) / gs] : 0.0f;
            }
            pends[(size_t)b * runs + c] = (uint8_t)bits;
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
    const int groups = m->cols / gs, blocks = (m->rows + LLAMA2_PACK_ROWS - 1) / LLAMA2_PACK_ROWS;
    float *ps = (float *)llama2_own(t, (size_t)blocks * groups * LLAMA2_PACK_ROWS * sizeof(float));
    if (!ps) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping scales");
    for (int b = 0; b < blocks; b++)
        for (int r = 0; r < LLAMA2_PACK_ROWS; r++) {
            int row = b * LLAMA2_PACK_ROWS + r;
            if (row >= m->rows) break;
            for (int g = 0; g < groups; g++)
                ps[((size_t)b * groups + g) * LLAMA2_PACK_ROWS + r] = m->s[(int64_t)row * groups + g];
        }
    m->ps = ps;
    if (gs % 32 != 0) return LLAMA2_OK;
    int failed;
    m->pq = regroup_values(t, m, &failed);
    if (failed) return llama2_fail(err, LLAMA2_ERR_NOMEM, "out of memory regrouping weights");
    return LLAMA2_OK;
}
