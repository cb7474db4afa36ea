/* kernels.c — one short function per operation of a GPT-2 block.
 *
 * Matrix products go to the BLAS (blas.h); the element-wise work is plain loops,
 * split over rows with OpenMP. The BLAS keeps its own threads, so the two never
 * run at the same time: a loop here starts only after the BLAS call returned. */
#include "kernels.h"
#include "blas.h"

#include <math.h>
#include <string.h>

void ms_linear(float *out, const float *in, int ld_in, const float *w, const float *bias,
               int N, int IC, int OC, int n_threads) {
    if (N <= 0) return;
    /* start from the bias in every row, then accumulate the product onto it */
#pragma omp parallel for num_threads(n_threads) schedule(static) if (N >= 64)
    for (int i = 0; i < N; i++) memcpy(out + (size_t)i * OC, bias, sizeof(float) * (size_t)OC);
    ms_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, OC, IC, 1.0f, in, ld_in, w, OC, 1.0f,
             out, OC);
}

void ms_layernorm(float *out, float *scale, const float *in, const float *w, const float *b,
                  int N, int C, float eps, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (N >= 64)
    for (int i = 0; i < N; i++) {
        const float *x = in + (size_t)i * C;
        float *y = out + (size_t)i * C;
        /* two passes, as the reference does: the mean, then the centred variance */
        double mean = 0.0;
        for (int c = 0; c < C; c++) mean += x[c];
        mean /= C;
        double var = 0.0;
        for (int c = 0; c < C; c++) {
            double d = x[c] - mean;
            var += d * d;
        }
        var /= C;
        float s = (float)sqrt(var + (double)eps);
        float m = (float)mean;
        float inv = 1.0f / s;
        for (int c = 0; c < C; c++) y[c] = (x[c] - m) * inv * w[c] + b[c];
        scale[i] = s;
    }
}

static float act_one(float x, ms_activation act) {
    switch (act) {
    case MS_ACT_GELU_NEW:
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case MS_ACT_GELU:
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case MS_ACT_RELU:
        return x > 0.0f ? x : 0.0f;
    case MS_ACT_SILU:
        return x / (1.0f + expf(-x));
    case MS_ACT_GELU_FAST:
        return 0.5f * x * (1.0f + tanhf(x * 0.7978845608028654f * (1.0f + 0.044715f * x * x)));
    case MS_ACT_QUICK_GELU:
        return x / (1.0f + expf(-1.702f * x));
    case MS_ACT_TANH:
        return tanhf(x);
    case MS_ACT_SIGMOID:
        return 1.0f / (1.0f + expf(-x));
    default:
        return x;
    }
}

void ms_activation_inplace(float *x, size_t n, ms_activation act, int n_threads) {
    long long nn = (long long)n;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (nn >= 16384)
    for (long long i = 0; i < nn; i++) x[i] = act_one(x[i], act);
}

void ms_add(float *out, const float *a, const float *b, size_t n, int n_threads) {
    long long nn = (long long)n;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (nn >= 65536)
    for (long long i = 0; i < nn; i++) out[i] = a[i] + b[i];
}

void ms_attention_scores(float *scores, const float *q, int ldq, const float *k, int ldk, int nq,
                         int nk, int q0, int H, int d_head, float scale, int use_blas) {
    for (int h = 0; h < H; h++) {
        const float *qh = q + h * d_head;
        const float *kh = k + h * d_head;
        float *s = scores + (size_t)h * nq * nk;
        if (use_blas) {
            /* the full rectangle, then the keys a query cannot see are masked below */
            ms_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, d_head, scale, qh, ldq, kh,
                     ldk, 0.0f, s, nk);
        } else {
            for (int i = 0; i < nq; i++) {
                const float *qi = qh + (size_t)i * ldq;
                int visible = q0 + i + 1 < nk ? q0 + i + 1 : nk;
                for (int j = 0; j < visible; j++) {
                    const float *kj = kh + (size_t)j * ldk;
                    float dot = 0.0f;
                    for (int d = 0; d < d_head; d++) dot += qi[d] * kj[d];
                    s[(size_t)i * nk + j] = dot * scale;
                }
            }
        }
        for (int i = 0; i < nq; i++)
            for (int j = q0 + i + 1; j < nk; j++) s[(size_t)i * nk + j] = -INFINITY;
    }
}

void ms_causal_softmax(float *att, int H, int nq, int nk, int q0, int n_threads) {
    long long rows = (long long)H * nq;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (rows * nk >= 16384)
    for (long long r = 0; r < rows; r++) {
        int i = (int)(r % nq);
        int visible = q0 + i + 1 < nk ? q0 + i + 1 : nk;
        float *p = att + (size_t)r * nk;
        float mx = -INFINITY;
        for (int j = 0; j < visible; j++)
            if (p[j] > mx) mx = p[j];
        if (mx == -INFINITY) {
            /* every visible key masked (only an intervention does that): attend nowhere */
            for (int j = 0; j < nk; j++) p[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        for (int j = 0; j < visible; j++) {
            p[j] = expf(p[j] - mx);
            sum += p[j];
        }
        float inv = 1.0f / sum;
        for (int j = 0; j < visible; j++) p[j] *= inv;
        for (int j = visible; j < nk; j++) p[j] = 0.0f;
    }
}

void ms_attention_mix(float *z, int ld_z, const float *pattern, const float *v, int ldv, int nq,
                      int nk, int H, int d_head, int use_blas) {
    for (int h = 0; h < H; h++) {
        const float *vh = v + h * d_head;
        const float *p = pattern + (size_t)h * nq * nk;
        float *zh = z + h * d_head;
        if (use_blas) {
            ms_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, d_head, nk, 1.0f, p, nk, vh,
                     ldv, 0.0f, zh, ld_z);
            continue;
        }
        for (int i = 0; i < nq; i++) {
            float *zi = zh + (size_t)i * ld_z;
            for (int d = 0; d < d_head; d++) zi[d] = 0.0f;
            /* every key, not only the visible ones: an intervention may have written any entry */
            for (int j = 0; j < nk; j++) {
                float w = p[(size_t)i * nk + j];
                if (w == 0.0f) continue;
                const float *vj = vh + (size_t)j * ldv;
                for (int d = 0; d < d_head; d++) zi[d] += w * vj[d];
            }
        }
    }
}

void ms_unembed(float *out, const float *x, const float *unembed, int M, int C, int V) {
    if (M <= 0) return;
    ms_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, V, C, 1.0f, x, C, unembed, C, 0.0f, out,
             V);
}
