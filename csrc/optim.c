/* optim.c — the AdamW update of one parameter array, in place.
 *
 * The same float32 operations, in the same order, as gradient clipping in place
 * followed by torch.optim.AdamW's:
 *   g *= grad_scale                   (the clipping coefficient, or 1)
 *   p *= 1 - lr * weight_decay
 *   m += (1 - beta1) (g - m)
 *   v  = beta2 v + (1 - beta2) g^2
 *   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
 * with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t). One pass over
 * the four arrays, split over the threads (element-wise, so any split gives the
 * same bits). */
#include "kernels.h"
#include "fastmath.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    float *p, *m, *v;
    const float *g;
    ms_adamw_args a;
} adamw_job;

MS_VECTOR_CLONES
static void adamw_span(float *p, float *m, float *v, const float *g, long long n, const ms_adamw_args *a) {
    float decay = a->decay, b1c = 1.0f - a->beta1, b2 = a->beta2, b2c = 1.0f - a->beta2;
    float bc2 = a->bc2_sqrt, eps = a->eps, step = a->step_size, scale = a->grad_scale;
    for (long long i = 0; i < n; i++) {
        float gi = g[i] * scale;
        float pi = p[i] * decay;
        float mi = m[i] + b1c * (gi - m[i]);
        float vi = b2 * v[i] + b2c * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step * (mi / (sqrtf(vi) / bc2 + eps));
    }
}

static void adamw_range(void *ctx, long long lo, long long hi) {
    const adamw_job *j = ctx;
    adamw_span(j->p + lo, j->m + lo, j->v + lo, j->g + lo, hi - lo, &j->a);
}

void ms_adamw(float *p, const float *g, float *m, float *v, size_t n, const ms_adamw_args *a, int n_threads) {
    adamw_job job = {p, m, v, g, *a};
    ms_parallel_for((long long)n, 1 << 16, n_threads, adamw_range, &job);
}

/* The sum of squares of x[n], for the global gradient norm that clipping needs: in
 * float64, over fixed blocks whose sums are added in order, so that the total does
 * not depend on the thread count. */
#define SQUARES_BLOCK (1 << 16)

typedef struct {
    const float *x;
    size_t n;
    double *sums; /* [blocks] */
} squares_job;

/* 16 running sums (their order fixed), so that the loop vectorizes */
MS_VECTOR_CLONES
static double squares_span(const float *x, size_t n) {
    double acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += (double)x[i + l] * x[i + l];
    double s = 0.0;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

static void squares_blocks(void *ctx, long long lo, long long hi) {
    const squares_job *j = ctx;
    for (long long k = lo; k < hi; k++) {
        size_t i0 = (size_t)k * SQUARES_BLOCK, i1 = i0 + SQUARES_BLOCK < j->n ? i0 + SQUARES_BLOCK : j->n;
        j->sums[k] = squares_span(j->x + i0, i1 - i0);
    }
}

int ms_sum_of_squares(const float *x, size_t n, int n_threads, double *out) {
    size_t blocks = (n + SQUARES_BLOCK - 1) / SQUARES_BLOCK;
    double *sums = malloc(sizeof(double) * (blocks ? blocks : 1));
    if (!sums) return -1;
    squares_job job = {x, n, sums};
    ms_parallel_for((long long)blocks, 1, n_threads, squares_blocks, &job);
    double total = 0.0;
    for (size_t k = 0; k < blocks; k++) total += sums[k];
    free(sums);
    *out = total;
    return 0;
}
