/*
 * kernels_avx2.c - AVX2 matrix-vector kernels (x86-64), compiled for any
 * x86-64 and used only when the CPU has AVX2 (see kernels.c).
 *
 * fp32: weights packed 8 rows per block (kernels.h); each of the 8 lanes of
 * an accumulator is one row, summing w[r][j] * x[j] for j = 0, 1, ... with a
 * separate multiply and add, exactly the scalar loop. Four blocks run at
 * once to hide the add latency.
 *
 * int8: per group, exact int32 dot products of 8 rows (sign trick +
 * maddubs + madd), gathered into one vector of 8 row sums; then per lane
 * val += ((float)isum * w_scale) * x_scale, the scalar order.
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__GNUC__) || defined(__clang__)
#define AVX2_FN __attribute__((target("avx2")))
#else
#define AVX2_FN
#endif

AVX2_FN static void store_rows(float *out, __m256 v, int row, int r1) {
    if (row + 8 <= r1) {
        _mm256_storeu_ps(out + row, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        for (int r = 0; row + r < r1; r++) out[row + r] = tmp[r];
    }
}

AVX2_FN static void matmul_f32_avx2(float *out, const float *x, const llama2_matrix *w, int r0, int r1) {
    const int n = w->cols;
    const float *p = w->p;
    int b = r0 / 8, b_end = (r1 + 7) / 8;
    for (; b + 4 <= b_end; b += 4) {
        const float *p0 = p + (size_t)b * n * 8;
        const float *p1 = p0 + (size_t)n * 8, *p2 = p1 + (size_t)n * 8, *p3 = p2 + (size_t)n * 8;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n; j++) {
            __m256 xj = _mm256_broadcast_ss(x + j);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(p0 + 8 * j), xj));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(p1 + 8 * j), xj));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(p2 + 8 * j), xj));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(p3 + 8 * j), xj));
        }
        store_rows(out, a0, 8 * b, r1);
        store_rows(out, a1, 8 * (b + 1), r1);
        store_rows(out, a2, 8 * (b + 2), r1);
        store_rows(out, a3, 8 * (b + 3), r1);
    }
    for (; b < b_end; b++) {
        const float *p0 = p + (size_t)b * n * 8;
        __m256 a0 = _mm256_setzero_ps();
        for (int j = 0; j < n; j++)
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(p0 + 8 * j), _mm256_broadcast_ss(x + j)));
        store_rows(out, a0, 8 * b, r1);
    }
}

/* int32 dot-product partial sums of 32 int8 pairs, added into acc */
AVX2_FN static inline __m256i dot32(__m256i acc, __m256i x, __m256i w) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i aw = _mm256_sign_epi8(w, w);       /* |w| as unsigned bytes */
    __m256i sx = _mm256_sign_epi8(x, w);       /* x with w's sign */
    __m256i pairs = _mm256_maddubs_epi16(aw, sx); /* |w|*x*sign: at most 2*127*127, no saturation */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}

/* 8 vectors of partial sums -> one vector holding each one's total */
AVX2_FN static inline __m256i sum8(__m256i s0, __m256i s1, __m256i s2, __m256i s3, __m256i s4,
                                   __m256i s5, __m256i s6, __m256i s7) {
    __m256i h01 = _mm256_hadd_epi32(s0, s1), h23 = _mm256_hadd_epi32(s2, s3);
    __m256i h45 = _mm256_hadd_epi32(s4, s5), h67 = _mm256_hadd_epi32(s6, s7);
    __m256i q0 = _mm256_hadd_epi32(h01, h23); /* rows 0-3, per 128-bit half */
    __m256i q1 = _mm256_hadd_epi32(h45, h67); /* rows 4-7 */
    __m256i lo = _mm256_permute2x128_si256(q0, q1, 0x20);
    __m256i hi = _mm256_permute2x128_si256(q0, q1, 0x31);
    return _mm256_add_epi32(lo, hi);
}

AVX2_FN static void matmul_q8_avx2(float *out, const int8_t *xq, const float *xs, const llama2_matrix *w,
                                   int gs, int r0, int r1) {
    const int n = w->cols, groups = n / gs, chunks = gs / 32;
    int i = r0;
    for (; i + 8 <= r1; i += 8) {
        /* the 8 rows' runs of 32 values: regrouped into one stream, or in place */
        const int8_t *pq = w->pq ? w->pq + (int64_t)(i / 8) * 8 * n : NULL;
        const int8_t *w0 = w->q + (int64_t)i * n;
        const float *sr = w->s + (int64_t)i * groups;
        const float *ps = w->ps ? w->ps + (int64_t)(i / 8) * groups * 8 : NULL;
        __m256 acc = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0,
                    s7 = s0;
            for (int c = 0, off = g * gs; c < chunks; c++, off += 32) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + off));
                if (pq) {
                    const int8_t *run = pq + (int64_t)off * 8; /* 8 rows x 32 values */
#define DOT_RUN(k) s##k = dot32(s##k, xv, _mm256_loadu_si256((const __m256i *)(run + 32 * k)))
                    DOT_RUN(0); DOT_RUN(1); DOT_RUN(2); DOT_RUN(3);
                    DOT_RUN(4); DOT_RUN(5); DOT_RUN(6); DOT_RUN(7);
#undef DOT_RUN
                } else {
#define DOT_ROW(k) s##k = dot32(s##k, xv, _mm256_loadu_si256((const __m256i *)(w0 + (int64_t)k * n + off)))
                    DOT_ROW(0); DOT_ROW(1); DOT_ROW(2); DOT_ROW(3);
                    DOT_ROW(4); DOT_ROW(5); DOT_ROW(6); DOT_ROW(7);
#undef DOT_ROW
                }
            }
            __m256 isum = _mm256_cvtepi32_ps(sum8(s0, s1, s2, s3, s4, s5, s6, s7));
            __m256 ws = ps ? _mm256_loadu_ps(ps + 8 * g)
                           : _mm256_set_ps(sr[7 * groups + g], sr[6 * groups + g], sr[5 * groups + g],
                                           sr[4 * groups + g], sr[3 * groups + g], sr[2 * groups + g],
                                           sr[groups + g], sr[g]);
            __m256 t = _mm256_mul_ps(_mm256_mul_ps(isum, ws), _mm256_set1_ps(xs[g]));
            acc = _mm256_add_ps(acc, t);
        }
        _mm256_storeu_ps(out + i, acc);
    }
    if (i < r1) llama2_kernels_scalar.matmul_q8(out, xq, xs, w, gs, i, r1);
}

const llama2_kernels llama2_kernels_avx2 = {"avx2", 1, matmul_f32_avx2, matmul_q8_avx2};
#endif
