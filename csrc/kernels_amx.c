/*
 * kernels_amx.c - batched Q8_0 products on AMX (Intel's tile matrix unit),
 * for the AVX-512 tier on CPUs that have it (Sapphire Rapids and later):
 * the kernel table "avx512-amx", which is the AVX-512 table with this one
 * kernel in place of its VNNI one.
 *
 * Why: decoding several sequences at once (the server) or a prompt runs the
 * same weights against 2-64 activation rows. With VNNI each 64-byte weight
 * vector costs one vpdpbusd per row, so at 8 rows the int8 products are
 * bound by that one instruction a cycle; one AMX tdpbsud multiplies a whole
 * 16 x 64 tile of a weight block by 64 bytes of up to 16 rows.
 *
 * Exactly the arithmetic of the portable loop (llama2_matmul_q8_rows): the
 * AVX-512 layout stores per 16-row block, for each 4 consecutive columns,
 * the 16 rows' 4 bytes (w + 128, unsigned) in 64 bytes. That is AMX's B
 * tile layout as it is: 16 such vectors (64 columns) are one B tile of 16
 * output rows. The A tile is up to 16 token rows of 64 activation bytes
 * (signed), so C[t][r] = sum over the 64 columns of x_t * (w_r + 128), an
 * exact int32; adding -128 * sum(x_t) over the group (exact) gives the
 * scalar loop's integer sum, then per lane val += ((float)isum * w_scale) *
 * x_scale, group after group, as every other kernel does.
 *
 * Using AMX needs the OS's leave (Linux: arch_prctl ARCH_REQ_XCOMP_PERM for
 * the tile data, once per process) and a tile configuration per thread,
 * loaded at the start of each call and released at its end so that a
 * thread between calls carries no tile state.
 */
#define _DEFAULT_SOURCE /* syscall() */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(LLAMA2_HAVE_AMX_KERNELS)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_FN __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int llama2_amx_permitted(void) {
    static volatile int state; /* 0: not asked yet, 1: granted, -1: refused (asking twice is harmless) */
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state > 0;
}

/* LDTILECFG's 64-byte operand (palette 1) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tiles 0, 1: C of the block pair for even groups, 2, 3: for odd groups
 * (m x 16 int32); 4: A (m tokens x k bytes); 5, 6: B of the two blocks
 * (k / 4 x 64 bytes) */
AMX_FN static void configure(int m, int k) {
    tile_config c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int i = 0; i < 4; i++) c.rows[i] = (uint8_t)m, c.colsb[i] = 64;
    c.rows[4] = (uint8_t)m, c.colsb[4] = (uint16_t)k;
    for (int i = 5; i < 7; i++) c.rows[i] = (uint8_t)(k / 4), c.colsb[i] = 64;
    _tile_loadconfig(&c);
}

/* acc[t] += ((float)(c[t] + corr[t]) * ws) * xs[t] for the m tokens of a group */
AMX_FN static inline void scale_group(__m512 *acc, const int32_t *c, const int32_t *corr, size_t corr_stride,
                                      const float *ws_p, const llama2_activation *a, int g, int m) {
    const __m512 ws = _mm512_loadu_ps(ws_p);
    for (int t = 0; t < m; t++) {
        const __m512i isum = _mm512_add_epi32(_mm512_loadu_si512((const void *)(c + 16 * t)),
                                              _mm512_set1_epi32(corr[(size_t)t * corr_stride]));
        acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), ws),
                                                     _mm512_set1_ps(a[t].s[g])));
    }
}

#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif
#ifndef PREFETCH_COLS
#define PREFETCH_COLS 1024
#endif

/* group g's products into tiles CA (block 0) and CB (block 1). A tile load
 * waits for the previous product on its tile, so the weights come ahead by
 * prefetches, PREFETCH_COLS columns on. */
#define GROUP_PRODUCTS(CA, CB, g)                                                                        \
    do {                                                                                                 \
        _tile_zero(CA);                                                                                  \
        if (pair) _tile_zero(CB);                                                                        \
        for (int j = (g) * gs; j < ((g) + 1) * gs; j += k) {                                             \
            for (int line = 0; line < k / 4; line++) {                                                   \
                _mm_prefetch((const char *)(p0 + 16 * (j + PREFETCH_COLS) + 64 * line), PREFETCH_HINT);  \
                if (pair)                                                                                \
                    _mm_prefetch((const char *)(p1 + 16 * (j + PREFETCH_COLS) + 64 * line), PREFETCH_HINT); \
            }                                                                                            \
            _tile_loadd(4, x + j, stride);                                                               \
            _tile_loadd(5, p0 + 16 * j, 64);                                                             \
            _tile_dpbsud(CA, 4, 5);                                                                      \
            if (pair) {                                                                                  \
                _tile_loadd(6, p1 + 16 * j, 64);                                                         \
                _tile_dpbsud(CB, 4, 6);                                                                  \
            }                                                                                            \
        }                                                                                                \
    } while (0)

/* group g's int32 sums out of tiles CA, CB into the float accumulators */
#define GROUP_SCALE(CA, CB, g)                                                                           \
    do {                                                                                                 \
        _tile_stored(CA, c0, 64);                                                                        \
        scale_group(acc0, c0, corr + (g), (size_t)groups, s0 + (int64_t)(g) * 16, a, g, m);              \
        if (pair) {                                                                                      \
            _tile_stored(CB, c1, 64);                                                                    \
            scale_group(acc1, c1, corr + (g), (size_t)groups, s1 + (int64_t)(g) * 16, a, g, m);          \
        }                                                                                                \
    } while (0)

/* m (<= 16) tokens whose activation bytes are rows of x (stride bytes apart),
 * blocks [rb, rb_end) of 16 rows; two blocks at a time share the A tile.
 * Groups alternate between two sets of C tiles, so that one group's scaling
 * runs while the tile unit works on the next; each lane still adds its
 * groups in order. */
AMX_FN static void tokens_tile(float *out, size_t os, const llama2_activation *a, int m, const int8_t *x, size_t stride,
                               const int32_t *corr, const llama2_matrix *w, int gs, int k, int rb, int rb_end, int r0,
                               int r1) {
    const int n = w->cols, groups = n / gs;
    int32_t c0[16 * 16], c1[16 * 16];
    __m512 acc0[16], acc1[16];
    for (; rb < rb_end; rb += 2) {
        const int pair = rb + 1 < rb_end;
        const int8_t *p0 = w->pq + (int64_t)rb * 16 * n, *p1 = p0 + (int64_t)16 * n;
        const float *s0 = w->ps + (int64_t)rb * groups * 16, *s1 = s0 + (int64_t)groups * 16;
        for (int t = 0; t < m; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
        for (int g = 0; g < groups; g += 2) {
            GROUP_PRODUCTS(0, 1, g);
            if (g > 0) GROUP_SCALE(2, 3, g - 1);
            if (g + 1 < groups) GROUP_PRODUCTS(2, 3, g + 1);
            GROUP_SCALE(0, 1, g);
        }
        if (groups % 2 == 0) GROUP_SCALE(2, 3, groups - 1);
        const __mmask16 l0 = llama2_lanes16(16 * rb, r0, r1), l1 = llama2_lanes16(16 * (rb + 1), r0, r1);
        for (int t = 0; t < m; t++) {
            _mm512_mask_storeu_ps(out + t * os + 16 * rb, l0, acc0[t]);
            if (pair) _mm512_mask_storeu_ps(out + t * os + 16 * (rb + 1), l1, acc1[t]);
        }
    }
}

AMX_FN void llama2_matmul_q8_batch_amx(float *out, size_t os, const llama2_activation *a, int n_tok,
                                       const llama2_matrix *w, int gs, int r0, int r1) {
    const int n = w->cols, groups = n / gs;
    if (!w->pq || !w->ps || gs % 32 != 0 || !llama2_amx_permitted()) { /* not this layout: VNNI */
        llama2_matmul_q8_batch_avx512(out, os, a, n_tok, w, gs, r0, r1);
        return;
    }
    /* per token and group: -128 * (the group's activation bytes); and the
     * activation rows, if they are not evenly spaced, copied so that they are */
    int32_t stack[LLAMA2_STACK_CORR], *corr = llama2_q8_group_corrections(stack, a, n_tok, n, gs, 128);
    size_t stride = n_tok > 1 ? (size_t)(a[1].q - a[0].q) : (size_t)n;
    int even = a[0].q != NULL && (n_tok == 1 || a[1].q > a[0].q);
    for (int t = 2; t < n_tok && even; t++) even = a[t].q == a[0].q + (size_t)t * stride;
    int8_t *packed = even ? NULL : (int8_t *)malloc((size_t)n_tok * n);
    if (!corr || (!even && !packed)) {
        if (corr != stack) free(corr);
        free(packed);
        llama2_matmul_q8_batch_avx512(out, os, a, n_tok, w, gs, r0, r1);
        return;
    }
    if (!even) {
        for (int t = 0; t < n_tok; t++) memcpy(packed + (size_t)t * n, a[t].q, (size_t)n);
        stride = (size_t)n;
    }
    const int8_t *x = even ? a[0].q : packed;
    const int k = gs % 64 == 0 ? 64 : 32;
    int configured = 0;
    for (int t = 0; t < n_tok; t += 16) {
        const int m = n_tok - t < 16 ? n_tok - t : 16;
        if (m != configured) configure(m, k), configured = m;
        tokens_tile(out + t * os, os, a + t, m, x + (size_t)t * stride, stride, corr + (size_t)t * groups, w, gs, k,
                    r0 / 16, (r1 + 15) / 16, r0, r1);
    }
    _tile_release();
    if (corr != stack) free(corr);
    free(packed);
}

#endif /* LLAMA2_HAVE_AMX_KERNELS */
