/*
 * expf_simd.c - what the SIMD tiers' exp() in lanes shares: the algorithm's
 * table and constants, and the check that a lanes version gives the C
 * library's expf, bit for bit, before a tier uses it (kernels.h).
 *
 * The algorithm is glibc's expf (since 2.27; the same in musl): with N = 32,
 * z = x * N / ln 2 in double, k = z rounded to the nearest integer (ties to
 * even, by adding and taking away 1.5 * 2^52), r = z - k, then
 * exp(x) = 2^(k / N) * (1 + C2 r + C1 r^2 + C0 r^3), 2^(k / N) being a table
 * entry for k mod N with k / N added to its exponent, and one rounding to
 * float at the end. glibc's x86-64 build for CPUs with FMA (the one this
 * library's AVX2 and AVX-512 tiers run beside) fuses x * N / ln 2 with both
 * the shift and the subtraction of k, and the cubic's two multiply-adds;
 * written that way the lanes give that expf's bits for all 2^32 floats
 * (checked exhaustively: `LLAMA2_TEST_EXPF=all make testcc`). Inputs of
 * magnitude 88 and more, infinities and NaNs take glibc's special cases.
 *
 * Another C library's expf may round some inputs differently, so a tier
 * calls llama2_expf_agrees() once before using its lanes: it compares them
 * with expf on a spread of the float range, the range where exp() neither
 * overflows nor underflows more densely, the special cases, and inputs
 * where the unfused form of the same algorithm rounds the other way.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* the bits of 2^(i/32) rounded to double, less i << 47 (the exponent of 2^(k/32) is added back per lane) */
const uint64_t llama2_exp2_table[32] = {
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

static int same_bits(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y;
}

/* f against expf on n inputs with these bits */
static int agrees_on(llama2_expf_lanes f, const uint32_t *bits, int n) {
    float x[256], got[256];
    for (int done = 0; done < n; done += 256) {
        const int m = n - done < 256 ? n - done : 256;
        memcpy(x, bits + done, (size_t)m * 4);
        f(got, x, m);
        for (int i = 0; i < m; i++)
            if (!same_bits(got[i], expf(x[i]))) return 0;
    }
    return 1;
}

int llama2_expf_agrees(llama2_expf_lanes f) {
    static const uint32_t special[] = {
        0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x3f800000u, 0xbf800000u,
        0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu,
        0x42b00000u, 0xc2b00000u, 0x42b17217u, 0x42b17218u, 0xc2cff1b4u, 0xc2cff1b5u,
        0xc2ce8ed0u, 0xc2ce8ecfu, 0x42aeac4fu, 0xc2aeac50u, 0x7f7fffffu, 0xff7fffffu,
        0x4202422fu, 0xc27c65d9u, /* where x * N / ln 2 unfused rounds the result the other way */
    };
    if (!agrees_on(f, special, (int)(sizeof(special) / sizeof(special[0])))) return 0;
    uint32_t bits[256];
    /* every 65521st float (a prime stride: all exponents, scattered mantissas) */
    for (uint64_t u = 0, i = 0; u < (1ull << 32); u += 65521) {
        bits[i++] = (uint32_t)u;
        if (i == 256 || u + 65521 >= (1ull << 32)) {
            if (!agrees_on(f, bits, (int)i)) return 0;
            i = 0;
        }
    }
    /* more densely where the result is a normal float: -87.3 < x < 88.7, every 16411th */
    const uint32_t ranges[2][2] = {{0x00000000u, 0x42b17218u}, {0x80000000u, 0xc2aeac50u}};
    for (int r = 0; r < 2; r++) {
        int i = 0;
        for (uint64_t u = ranges[r][0]; u <= ranges[r][1]; u += 16411) {
            bits[i++] = (uint32_t)u;
            if (i == 256) {
                if (!agrees_on(f, bits, i)) return 0;
                i = 0;
            }
        }
        if (i && !agrees_on(f, bits, i)) return 0;
    }
    return 1;
}
