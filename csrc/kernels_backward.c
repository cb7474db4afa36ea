/* kernels_backward.c — one short function per operation's backward.
 *
 * As in kernels.c: matrix products are cut into panels that mechscope's threads
 * share (each panel one single-threaded BLAS call); element-wise work is plain
 * loops over rows. Reductions over rows (norm weights, biases) run on one thread in
 * a fixed order, so that gradients do not depend on the thread count. */
#include "kernels_backward.h"
#include "kernels.h"
#include "blas.h"

#include <math.h>
#include <string.h>

/* ---- matrix products ----------------------------------------------------------- */

typedef struct {
    int trans_a, trans_b, M, Nc, K;
    float alpha, beta;
    const float *A, *B;
    int lda, ldb, ldc;
    float *Cm;
    int by_rows, panel;
} gemm_job;

static void gemm_panels(void *ctx, long long lo, long long hi) {
    const gemm_job *g = ctx;
    for (long long p = lo; p < hi && !ms_interrupted(); p++) {
        int r0 = 0, r1 = g->M, c0 = 0, c1 = g->Nc;
        if (g->by_rows) r0 = (int)(p * g->panel), r1 = r0 + g->panel < g->M ? r0 + g->panel : g->M;
        else c0 = (int)(p * g->panel), c1 = c0 + g->panel < g->Nc ? c0 + g->panel : g->Nc;
        /* rows r0.. of op(A): rows of A, or columns of A when transposed */
        const float *A = g->trans_a ? g->A + r0 : g->A + (size_t)r0 * g->lda;
        const float *B = g->trans_b ? g->B + (size_t)c0 * g->ldb : g->B + c0;
        ms_sgemm(CblasRowMajor, g->trans_a ? CblasTrans : CblasNoTrans, g->trans_b ? CblasTrans : CblasNoTrans,
                 r1 - r0, c1 - c0, g->K, g->alpha, A, g->lda, B, g->ldb, g->beta,
                 g->Cm + (size_t)r0 * g->ldc + c0, g->ldc);
    }
}

void ms_gemm(int trans_a, int trans_b, int M, int Nc, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *Cm, int ldc, int n_threads) {
    if (M <= 0 || Nc <= 0) return;
    if (K <= 0) { /* an empty sum: C = beta C */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < Nc; j++) Cm[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * Cm[(size_t)i * ldc + j];
        return;
    }
    gemm_job g = {trans_a, trans_b, M, Nc, K, alpha, beta, A, B, lda, ldb, ldc, Cm, 1, M};
    double flops = 2.0 * M * Nc * K;
    const double min_panel = 1 << 22, max_panel = 4.0 * (1 << 30); /* FLOP, as kernels.c */
    long long want = n_threads > 1 ? 4LL * n_threads : 1;
    if (want > flops / min_panel) want = (long long)(flops / min_panel);
    if (want < flops / max_panel) want = (long long)(flops / max_panel) + 1;
    if (want <= 1) {
        gemm_panels(&g, 0, 1);
        return;
    }
    g.by_rows = M >= 64 * want || M >= Nc;
    int extent = g.by_rows ? M : Nc;
    int panel = (int)((extent + want - 1) / want);
    if (!g.by_rows) panel = (panel + 63) / 64 * 64;
    g.panel = panel > 0 ? panel : 1;
    ms_parallel_for((extent + g.panel - 1) / g.panel, 1, n_threads, gemm_panels, &g);
}

/* column sums of dy[N, n] (ld) added to db[n] */
static void add_column_sums(float *db, const float *dy, int ld, int N, int n) {
    for (int i = 0; i < N; i++) {
        const float *row = dy + (size_t)i * ld;
        for (int j = 0; j < n; j++) db[j] += row[j];
    }
}

void ms_linear_backward(float *dx, int ld_dx, int accumulate, float *dw, float *db, const float *x, int ld_x,
                        const float *dy, int ld_dy, const ms_linear_weight *w, int N, int IC, int OC,
                        int n_threads) {
    if (dx) /* dx = dy W^T: W [IC, OC] (ld) is read transposed; [OC, IC] (trans) as it is */
        ms_gemm(0, !w->trans, N, IC, OC, 1.0f, dy, ld_dy, w->w, w->ld, accumulate ? 1.0f : 0.0f, dx, ld_dx,
                n_threads);
    if (dw) {
        if (w->trans) /* dW [OC, IC] += dy^T x */
            ms_gemm(1, 0, OC, IC, N, 1.0f, dy, ld_dy, x, ld_x, 1.0f, dw, w->ld, n_threads);
        else /* dW [IC, OC] += x^T dy */
            ms_gemm(1, 0, IC, OC, N, 1.0f, x, ld_x, dy, ld_dy, 1.0f, dw, w->ld, n_threads);
    }
    if (db) add_column_sums(db, dy, ld_dy, N, OC);
}

/* ---- norms -------------------------------------------------------------------------- */

void ms_norm_affine_backward(float *dxhat, float *dw, float *db, const float *dy, const float *xhat,
                             const float *w, int N, int C) {
    for (int i = 0; i < N; i++) {
        const float *g = dy + (size_t)i * C, *xh = xhat + (size_t)i * C;
        float *out = dxhat + (size_t)i * C;
        if (dw)
            for (int c = 0; c < C; c++) dw[c] += g[c] * xh[c];
        if (db)
            for (int c = 0; c < C; c++) db[c] += g[c];
        for (int c = 0; c < C; c++) out[c] = g[c] * w[c];
    }
}

static double row_mean(const float *x, int C) {
    double s = 0.0;
    for (int c = 0; c < C; c++) s += x[c];
    return s / C;
}

void ms_norm_xhat(float *xhat, const float *x, const float *scale, int N, int C, ms_norm_kind kind) {
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * C;
        float *out = xhat + (size_t)i * C;
        float mean = kind == MS_NORM_LAYER ? (float)row_mean(xi, C) : 0.0f, inv = 1.0f / scale[i];
        for (int c = 0; c < C; c++) out[c] = (xi[c] - mean) * inv;
    }
}

void ms_norm_scale_grad(float *dscale, const float *dxhat, const float *x, const float *scale, int N, int C,
                        ms_norm_kind kind) {
    /* xhat_c = xc_c / s: d/ds = -xc_c / s^2 */
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * C, *g = dxhat + (size_t)i * C;
        float mean = kind == MS_NORM_LAYER ? (float)row_mean(xi, C) : 0.0f;
        double s = 0.0;
        for (int c = 0; c < C; c++) s += (double)g[c] * (xi[c] - mean);
        dscale[i] = (float)(-s / ((double)scale[i] * scale[i]));
    }
}

typedef struct {
    float *dx;
    const float *dxhat, *dscale, *x, *scale;
    int C;
    float eps;
    ms_norm_kind kind;
} norm_job;

static void norm_input_rows(void *ctx, long long lo, long long hi) {
    const norm_job *j = ctx;
    int C = j->C;
    for (long long i = lo; i < hi; i++) {
        const float *xi = j->x + i * C, *g = j->dxhat + i * C;
        float *out = j->dx + i * C;
        float mean = 0.0f;
        double gmean = 0.0, var = 0.0;
        if (j->kind == MS_NORM_LAYER) {
            mean = (float)row_mean(xi, C);
            gmean = row_mean(g, C);
        }
        for (int c = 0; c < C; c++) var += (double)(xi[c] - mean) * (xi[c] - mean);
        /* the divisor as the input gives it (the one used may have been changed) */
        double s0 = sqrt(var / C + (double)j->eps);
        float inv = 1.0f / j->scale[i];
        float k = (float)((double)j->dscale[i] / (C * s0)); /* d s0 / d x_c = xc_c / (C s0) */
        for (int c = 0; c < C; c++) out[c] += (g[c] - (float)gmean) * inv + k * (xi[c] - mean);
    }
}

void ms_norm_input_backward(float *dx, const float *dxhat, const float *dscale, const float *x,
                            const float *scale, int N, int C, float eps, ms_norm_kind kind, int n_threads) {
    norm_job job = {dx, dxhat, dscale, x, scale, C, eps, kind};
    ms_parallel_for(N, 65536 / (C + 1) + 1, n_threads, norm_input_rows, &job);
}

/* ---- activations ------------------------------------------------------------------- */

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* act(x) and act'(x), in float as the forward's (to its 2e-7) */
static void act_and_grad(float x, ms_activation act, float *f, float *df) {
    switch (act) {
    case MS_ACT_GELU_NEW:
    case MS_ACT_GELU_FAST: {
        const float k = 0.7978845608028654f;
        float t = tanhf(k * (x + 0.044715f * x * x * x));
        *f = 0.5f * x * (1.0f + t);
        *df = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
        break;
    }
    case MS_ACT_GELU: {
        float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
        *f = x * cdf;
        *df = cdf + x * 0.3989422804014327f * expf(-0.5f * x * x);
        break;
    }
    case MS_ACT_RELU:
        *f = x > 0.0f ? x : 0.0f;
        *df = x > 0.0f ? 1.0f : 0.0f;
        break;
    case MS_ACT_SILU: {
        float s = sigmoidf(x);
        *f = x * s;
        *df = s * (1.0f + x * (1.0f - s));
        break;
    }
    case MS_ACT_QUICK_GELU: {
        float s = sigmoidf(1.702f * x);
        *f = x * s;
        *df = s + 1.702f * x * s * (1.0f - s);
        break;
    }
    case MS_ACT_TANH: {
        float t = tanhf(x);
        *f = t;
        *df = 1.0f - t * t;
        break;
    }
    case MS_ACT_SIGMOID: {
        float s = sigmoidf(x);
        *f = s;
        *df = s * (1.0f - s);
        break;
    }
    default:
        *f = x;
        *df = 1.0f;
        break;
    }
}

typedef struct {
    float *dpre;
    const float *dpost, *pre;
    int ld_dpre, ld_dpost, ld_pre, F, gated;
    ms_activation act;
} act_job;

static void act_rows(void *ctx, long long lo, long long hi) {
    const act_job *j = ctx;
    for (long long i = lo; i < hi; i++) {
        const float *g = j->dpost + i * j->ld_dpost, *x = j->pre + i * j->ld_pre;
        float *out = j->dpre + i * j->ld_dpre;
        for (int c = 0; c < j->F; c++) {
            float f, df;
            act_and_grad(x[c], j->act, &f, &df);
            if (j->gated) { /* x: gate | up */
                float up = x[j->F + c];
                out[c] = g[c] * up * df;
                out[j->F + c] = g[c] * f;
            } else {
                out[c] = g[c] * df;
            }
        }
    }
}

void ms_activation_backward(float *dpre, int ld_dpre, const float *dpost, int ld_dpost, const float *pre,
                            int ld_pre, int N, int F, ms_activation act, int n_threads) {
    act_job job = {dpre, dpost, pre, ld_dpre, ld_dpost, ld_pre, F, 0, act};
    ms_parallel_for(N, 65536 / (F + 1) + 1, n_threads, act_rows, &job);
}

void ms_gated_backward(float *dpre, int ld, const float *dpost, int ld_dpost, const float *pre, int N, int F,
                       ms_activation act, int n_threads) {
    act_job job = {dpre, dpost, pre, ld, ld_dpost, ld, F, 1, act};
    ms_parallel_for(N, 65536 / (F + 1) + 1, n_threads, act_rows, &job);
}

void ms_rotary_backward(float *g, const float *rope, int rotary_dim) {
    int half = rotary_dim / 2;
    const float *cs = rope, *sn = rope + half;
    for (int i = 0; i < half; i++) {
        float g1 = g[i], g2 = g[i + half];
        g[i] = g1 * cs[i] + g2 * sn[i];
        g[i + half] = g2 * cs[i] - g1 * sn[i];
    }
}
