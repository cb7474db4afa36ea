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
