/* peak.c — the machine's multiply-add peak: FLOP/s of fused multiply-adds kept in
 * registers (no memory traffic) on every thread. No matrix product can run faster,
 * so the benchmarks compare the BLAS's sgemm and mechscope's steps with it.
 *
 * Each thread runs CHAINS independent accumulators, enough to keep both FMA ports
 * busy through the instruction's latency (4 cycles x 2 ports = 8 in flight on
 * current x86 cores), in the widest vectors the CPU has. */
#include "kernels.h"

#include <time.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MS_X86_FMA 1
#endif

enum { CHAINS = 12 };

/* a = a * 0.999999 + 1e-6 converges to 1: the values stay finite however long it runs */
#define MUL 0.999999f
#define ADD 1e-6f

#ifdef MS_X86_FMA
__attribute__((target("avx512f"))) static float chains_avx512(long long iterations) {
    __m512 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    const __m512 mul = _mm512_set1_ps(MUL), add = _mm512_set1_ps(ADD);
    for (long long it = 0; it < iterations; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
    float sum = 0.0f;
    for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_ps(acc[i]);
    return sum;
}

__attribute__((target("avx2,fma"))) static float chains_avx2(long long iterations) {
    __m256 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    const __m256 mul = _mm256_set1_ps(MUL), add = _mm256_set1_ps(ADD);
    for (long long it = 0; it < iterations; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
    float lanes[8], sum = 0.0f;
    for (int i = 0; i < CHAINS; i++) {
        _mm256_storeu_ps(lanes, acc[i]);
        for (int k = 0; k < 8; k++) sum += lanes[k];
    }
    return sum;
}
#endif

/* other CPUs: a multiply and an add in 4 lanes, as the compiler emits them (fused
 * where the target has FMA, as -ffp-contract=fast lets it) */
static float chains_plain(long long iterations) {
    float acc[CHAINS][4];
    for (int i = 0; i < CHAINS; i++)
        for (int k = 0; k < 4; k++) acc[i][k] = (float)i;
    for (long long it = 0; it < iterations; it++)
        for (int i = 0; i < CHAINS; i++)
            for (int k = 0; k < 4; k++) acc[i][k] = acc[i][k] * MUL + ADD;
    float sum = 0.0f;
    for (int i = 0; i < CHAINS; i++)
        for (int k = 0; k < 4; k++) sum += acc[i][k];
    return sum;
}

typedef float (*chains_fn)(long long iterations);

typedef struct {
    chains_fn fn;
    long long iterations; /* per piece */
    long long sink;       /* keeps the results, so the loops are not optimized away */
} peak_job;

static void peak_pieces(void *ctx, long long lo, long long hi) {
    peak_job *j = ctx;
    float s = 0.0f;
    for (long long p = lo; p < hi; p++) s += j->fn(j->iterations);
    __atomic_fetch_add(&j->sink, (long long)s, __ATOMIC_RELAXED);
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* the widest multiply-add this CPU has, and its lanes */
static chains_fn widest(int *lanes, const char **name) {
#ifdef MS_X86_FMA
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        *lanes = 16, *name = "AVX-512 FMA";
        return chains_avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *lanes = 8, *name = "AVX2 FMA";
        return chains_avx2;
    }
#endif
    *lanes = 4, *name = "multiply-add, 4 lanes";
    return chains_plain;
}

double ms_fma_peak(int n_threads, const char **instructions) {
    int lanes;
    peak_job job = {widest(&lanes, instructions), 1 << 12, 0};
    if (n_threads < 1) n_threads = 1;
    /* many pieces per thread, so that a thread that starts late costs little */
    long long pieces = 16LL * n_threads;
    double best = 0.0;
    for (int timed = 0; timed < 5;) {
        double t0 = seconds_now();
        ms_parallel_for(pieces, 1, n_threads, peak_pieces, &job);
        double t = seconds_now() - t0;
        if (t < 0.05) { /* too short to time well: more iterations */
            job.iterations *= 2;
            continue;
        }
        double flops = 2.0 * CHAINS * lanes * (double)job.iterations * (double)pieces;
        if (flops / t > best) best = flops / t;
        timed++;
    }
    return best / 1e9;
}
