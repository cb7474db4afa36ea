/* fastmath.h — what element-wise loops need to vectorize, shared by the forward
 * kernels, their backward and the optimizer: e^x, the sigmoid and erf in float,
 * branch-free; the CPU-specific clones of a loop; the lane count of reductions. */
#ifndef MS_FASTMATH_H
#define MS_FASTMATH_H

#include <stdint.h>
#include <string.h>

/* Element-wise functions are written as plain loops over float arrays that the
 * compiler vectorizes; on x86-64 each is compiled for AVX-512, AVX2 and the
 * baseline, and the best one for the CPU is chosen when the library loads. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MS_NO_CLONES)
#define MS_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MS_VECTOR_CLONES
#endif

/* Partial sums in this many lanes let the compiler vectorize a reduction without
 * reordering it behind our back (C forbids that for floats). */
#define MS_LANES 16

/* e^x in float, relative error below 2e-7; 0 for x < -87 (so e^-inf is exactly 0),
 * saturating at e^88. Range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6
 * polynomial for e^r (the classic Cephes expf coefficients) and 2^n put into the
 * exponent bits. Branch-free, so loops over it vectorize. */
static inline float exp_approx(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = xc * 1.44269504088896341f + shifter;
    float n = t - shifter;
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t ti, scale_bits;
    memcpy(&ti, &t, sizeof ti);
    scale_bits = (ti - 0x4B400000 + 127) * (1 << 23); /* (n + 127) << 23 */
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* 1 / (1 + e^-x) */
static inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* erf(x), absolute error below 2e-7: Abramowitz & Stegun 7.1.26 on |x|, sign restored */
static inline float erf_approx(float x) {
    float a = x < 0.0f ? -x : x;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                 t * (-1.453152027f + t * 1.061405429f))));
    float y = 1.0f - poly * exp_approx(-a * a);
    return x < 0.0f ? -y : y;
}

#endif
