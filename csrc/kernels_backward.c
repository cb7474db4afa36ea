/* kernels_backward.c — one short function per operation's backward.
 *
 * As in kernels.c: matrix products are cut into panels that mechscope's threads
 * share (each panel one single-threaded BLAS call); element-wise work is plain
 * loops over rows. Reductions over rows (norm weights, biases) sum each column on
 * one thread in row order, so that gradients do not depend on the thread count. */
#include "kernels_backward.h"
#include "kernels.h"
#include "blas.h"
#include "fastmath.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- matrix products ----------------------------------------------------------- */

/* A product is cut into tiles that the threads share, each tile one single-threaded
 * BLAS call, on the grid that packs the least (ms_gemm_grid). When K is long and C
 * small (the unembedding's input gradient), K itself is cut into parts whose sums
 * are added at the end, so that each operand is packed once; those parts depend on
 * the shape alone, never on the thread count. */
typedef struct {
    ms_product p;
    int tile_m, tile_n, tiles_n; /* the grid: tiles of tile_m rows by tile_n columns */
    int k_part, k_parts;         /* K cut into k_parts of k_part (1 part: not cut) */
    float *partial;              /* [k_parts - 1, M, Nc] the sums of parts 1.. */
} gemm_job;

static void gemm_tiles(void *ctx, long long lo, long long hi) {
    const gemm_job *g = ctx;
    const ms_product *q = &g->p;
    for (long long t = lo; t < hi && !ms_interrupted(); t++) {
        int kp = (int)(t % g->k_parts), tile = (int)(t / g->k_parts);
        int r0 = tile / g->tiles_n * g->tile_m, c0 = tile % g->tiles_n * g->tile_n;
        int r1 = r0 + g->tile_m < q->M ? r0 + g->tile_m : q->M, c1 = c0 + g->tile_n < q->Nc ? c0 + g->tile_n : q->Nc;
        int k0 = kp * g->k_part, k1 = k0 + g->k_part < q->K ? k0 + g->k_part : q->K;
        /* rows r0.. of op(A): rows of A, or columns of A when transposed; k0.. likewise */
        const float *A = q->trans_a ? q->A + (size_t)k0 * q->lda + r0 : q->A + (size_t)r0 * q->lda + k0;
        const float *B = q->trans_b ? q->B + (size_t)c0 * q->ldb + k0 : q->B + (size_t)k0 * q->ldb + c0;
        float *Cm = kp ? g->partial + (size_t)(kp - 1) * q->M * q->Nc : q->C;
        int ldc = kp ? q->Nc : q->ldc;
        ms_sgemm(CblasRowMajor, q->trans_a ? CblasTrans : CblasNoTrans, q->trans_b ? CblasTrans : CblasNoTrans,
                 r1 - r0, c1 - c0, k1 - k0, q->alpha, A, q->lda, B, q->ldb, kp ? 0.0f : q->beta,
                 Cm + (size_t)r0 * ldc + c0, ldc);
    }
}

/* C += the partial sums of K's parts 1.., in order, for rows [lo, hi) */
static void add_partials(void *ctx, long long lo, long long hi) {
    const gemm_job *g = ctx;
    const ms_product *q = &g->p;
    for (long long i = lo; i < hi; i++) {
        float *row = q->C + (size_t)i * q->ldc;
        for (int kp = 1; kp < g->k_parts; kp++) {
            const float *part = g->partial + ((size_t)(kp - 1) * q->M + (size_t)i) * q->Nc;
            for (int j = 0; j < q->Nc; j++) row[j] += part[j];
        }
    }
}

static double product_flops(const ms_product *p) { return 2.0 * p->M * p->Nc * p->K; }

/* Cuts the product p (C = alpha op(A) op(B) + beta C) into at least `want` tiles
 * (fewer when it is small): fills g and returns the number of tiles, 0 when there is
 * nothing to multiply (C empty, or K = 0: then C = beta C here). */
static long long gemm_cut(gemm_job *g, const ms_product *p, long long want) {
    int M = p->M, Nc = p->Nc, K = p->K;
    if (M <= 0 || Nc <= 0) return 0;
    if (K <= 0) { /* an empty sum: C = beta C */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < Nc; j++) {
                float *c = p->C + (size_t)i * p->ldc + j;
                *c = p->beta == 0.0f ? 0.0f : p->beta * *c;
            }
        return 0;
    }
    *g = (gemm_job){*p, M, Nc, 1, K, 1, NULL};
    if (want > 1) {
        ms_gemm_grid(M, Nc, want, &g->tile_m, &g->tile_n);
        g->tiles_n = (Nc + g->tile_n - 1) / g->tile_n;
    }
    /* K cut in parts of at least 4096 when it is long next to C's sides (then packing
     * each operand once saves more than writing and reading the partial sums costs).
     * The parts are fixed by the shape alone, so that the sums do not depend on the
     * thread count. */
    int parts = K / 4096 < 8 ? K / 4096 : 8;
    if (parts > 1 && K >= 4 * (M > Nc ? M : Nc) && (double)M * Nc * parts <= (1 << 24)) {
        g->partial = malloc(sizeof(float) * (size_t)(parts - 1) * M * Nc);
        if (g->partial)
            g->k_parts = parts, g->k_part = (K + parts - 1) / parts, g->tile_m = M, g->tile_n = Nc, g->tiles_n = 1;
    }
    return (long long)((M + g->tile_m - 1) / g->tile_m) * g->tiles_n * g->k_parts;
}

/* after the tiles: the partial sums of K's parts added to C */
static void gemm_finish(gemm_job *g, int n_threads) {
    if (!g->partial) return;
    if (!ms_interrupted()) ms_parallel_for(g->p.M, 16, n_threads, add_partials, g);
    free(g->partial);
    g->partial = NULL;
}

void ms_gemm_product(const ms_product *p, int n_threads) {
    gemm_job g;
    long long tiles = gemm_cut(&g, p, ms_gemm_tiles_wanted(product_flops(p), n_threads));
    if (tiles == 0) return;
    if (tiles == 1) gemm_tiles(&g, 0, 1);
    else ms_parallel_for(tiles, 1, n_threads, gemm_tiles, &g);
    gemm_finish(&g, n_threads);
}

void ms_gemm(int trans_a, int trans_b, int M, int Nc, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *Cm, int ldc, int n_threads) {
    ms_product p = {trans_a, trans_b, M, Nc, K, alpha, A, lda, B, ldb, beta, Cm, ldc};
    ms_gemm_product(&p, n_threads);
}

/* Two independent products whose tiles the threads share in one loop: the first's
 * tiles, then the second's. */
typedef struct {
    gemm_job *first, *second;
    long long first_tiles;
} gemm_pair_job;

static void gemm_pair_tiles(void *ctx, long long lo, long long hi) {
    const gemm_pair_job *j = ctx;
    for (long long p = lo; p < hi; p++) {
        if (p < j->first_tiles) gemm_tiles(j->first, p, p + 1);
        else gemm_tiles(j->second, p - j->first_tiles, p - j->first_tiles + 1);
    }
}

/* Tiles for one product of a pair: half the threads each when they are even, as many
 * as the threads when odd (so that the two products' tiles share out evenly), none
 * below 2^22 FLOP and none above 2^34 (an interrupted run still stops within about a
 * tenth of a second). With two threads each product is then one BLAS call on its own
 * thread, which packs each operand once and ran 0-7% faster here than both products
 * cut in two tiles each, one after the other (GPT-2 small's layers, 1,024 rows). */
static long long pair_tiles_wanted(double flops, int n_threads) {
    const double min_tile = 1 << 22, max_tile = 16.0 * (1 << 30); /* FLOP */
    long long share = n_threads % 2 == 0 ? n_threads / 2 : n_threads, want = share;
    if (want > flops / min_tile) want = (long long)(flops / min_tile);
    if (want < flops / max_tile) { /* more tiles: in whole shares, which still share out evenly */
        want = (long long)(flops / max_tile) + 1;
        want = (want + share - 1) / share * share;
    }
    return want > 1 ? want : 1;
}

void ms_gemm_pair(const ms_product *x, const ms_product *y, int n_threads) {
    double fx = product_flops(x), fy = product_flops(y);
    if (n_threads < 2 || fx < (1 << 22) || fy < (1 << 22)) { /* too small to share: one after the other */
        ms_gemm_product(x, n_threads);
        ms_gemm_product(y, n_threads);
        return;
    }
    gemm_job gx, gy;
    long long tx = gemm_cut(&gx, x, pair_tiles_wanted(fx, n_threads));
    long long ty = gemm_cut(&gy, y, pair_tiles_wanted(fy, n_threads));
    gemm_pair_job pair = {&gx, &gy, tx};
    ms_parallel_for(tx + ty, 1, n_threads, gemm_pair_tiles, &pair);
    if (tx) gemm_finish(&gx, n_threads);
    if (ty) gemm_finish(&gy, n_threads);
}

/* Sums over rows (a bias's or a norm weight's gradient) are split over the threads
 * by blocks of columns: each column is still summed by one thread, in row order, so
 * the sums do not depend on the thread count. */

/* the threads worth waking for a pass over N x C floats */
static int threads_for(size_t N, size_t C, int n_threads) { return N * C >= (1 << 16) ? n_threads : 1; }

/* columns per block: one block per thread (long runs of each row, which stream
 * better than short ones), in multiples of 16 */
static int column_block(int C, int threads) {
    int w = (C + threads - 1) / threads;
    return (w + 15) / 16 * 16;
}

typedef struct {
    float *db;
    const float *dy;
    int ld, N, n, block;
} column_sum_job;

MS_VECTOR_CLONES
static void column_sum_blocks(void *ctx, long long lo, long long hi) {
    const column_sum_job *j = ctx;
    int c0 = (int)lo * j->block, c1 = (int)hi * j->block < j->n ? (int)hi * j->block : j->n;
    for (int i = 0; i < j->N; i++) {
        const float *row = j->dy + (size_t)i * j->ld;
        for (int c = c0; c < c1; c++) j->db[c] += row[c];
    }
}

/* column sums of dy[N, n] (ld) added to db[n] */
static void add_column_sums(float *db, const float *dy, int ld, int N, int n, int n_threads) {
    int threads = threads_for((size_t)N, (size_t)n, n_threads);
    column_sum_job job = {db, dy, ld, N, n, column_block(n, threads)};
    ms_parallel_for((n + job.block - 1) / job.block, 1, threads, column_sum_blocks, &job);
}

void ms_linear_backward(float *dx, int ld_dx, int accumulate, float *dw, float *db, const float *x, int ld_x,
                        const float *dy, int ld_dy, const ms_linear_weight *w, int N, int IC, int OC,
                        int n_threads) {
    /* dx = dy W^T: W [IC, OC] (ld) is read transposed; [OC, IC] (trans) as it is */
    ms_product px = {0, !w->trans, N, IC, OC, 1.0f, dy, ld_dy, w->w, w->ld, accumulate ? 1.0f : 0.0f, dx, ld_dx};
    /* dW [OC, IC] += dy^T x, or dW [IC, OC] += x^T dy */
    ms_product pw = w->trans ? (ms_product){1, 0, OC, IC, N, 1.0f, dy, ld_dy, x, ld_x, 1.0f, dw, w->ld}
                             : (ms_product){1, 0, IC, OC, N, 1.0f, x, ld_x, dy, ld_dy, 1.0f, dw, w->ld};
    if (dx && dw) ms_gemm_pair(&px, &pw, n_threads);
    else if (dx) ms_gemm_product(&px, n_threads);
    else if (dw) ms_gemm_product(&pw, n_threads);
    if (db) add_column_sums(db, dy, ld_dy, N, OC, n_threads);
}

/* ---- norms -------------------------------------------------------------------------- */

typedef struct {
    float *dxhat, *dw, *db;
    const float *dy, *xhat, *w;
    int N, C, block;
} affine_job;

MS_VECTOR_CLONES
static void affine_blocks(void *ctx, long long lo, long long hi) {
    const affine_job *j = ctx;
    int c0 = (int)lo * j->block, c1 = (int)hi * j->block < j->C ? (int)hi * j->block : j->C;
    for (int i = 0; i < j->N; i++) {
        const float *g = j->dy + (size_t)i * j->C, *xh = j->xhat + (size_t)i * j->C;
        float *out = j->dxhat + (size_t)i * j->C;
        if (j->dw)
            for (int c = c0; c < c1; c++) j->dw[c] += g[c] * xh[c];
        if (j->db)
            for (int c = c0; c < c1; c++) j->db[c] += g[c];
        for (int c = c0; c < c1; c++) out[c] = g[c] * j->w[c];
    }
}

void ms_norm_affine_backward(float *dxhat, float *dw, float *db, const float *dy, const float *xhat,
                             const float *w, int N, int C, int n_threads) {
    int threads = threads_for((size_t)N, (size_t)C, n_threads);
    affine_job job = {dxhat, dw, db, dy, xhat, w, N, C, column_block(C, threads)};
    ms_parallel_for((C + job.block - 1) / job.block, 1, threads, affine_blocks, &job);
}

/* Row sums in float64, in MS_LANES running sums added in a fixed order, so that
 * they vectorize: of x; of g (x - mean); of (x - mean)^2. */
static inline double row_mean(const float *x, int C) {
    double acc[MS_LANES] = {0}, s = 0.0;
    int c = 0;
    for (; c + MS_LANES <= C; c += MS_LANES)
        for (int k = 0; k < MS_LANES; k++) acc[k] += x[c + k];
    for (int k = 0; k < MS_LANES; k++) s += acc[k];
    for (; c < C; c++) s += x[c];
    return s / C;
}

static inline double centred_dot(const float *g, const float *x, float mean, int C) {
    double acc[MS_LANES] = {0}, s = 0.0;
    int c = 0;
    for (; c + MS_LANES <= C; c += MS_LANES)
        for (int k = 0; k < MS_LANES; k++) acc[k] += (double)g[c + k] * (x[c + k] - mean);
    for (int k = 0; k < MS_LANES; k++) s += acc[k];
    for (; c < C; c++) s += (double)g[c] * (x[c] - mean);
    return s;
}

MS_VECTOR_CLONES
double ms_dot_f64(const float *x, const float *y, int n) { return centred_dot(x, y, 0.0f, n); }

static inline double centred_squares(const float *x, float mean, int C) {
    double acc[MS_LANES] = {0}, s = 0.0;
    int c = 0;
    for (; c + MS_LANES <= C; c += MS_LANES)
        for (int k = 0; k < MS_LANES; k++) acc[k] += (double)(x[c + k] - mean) * (x[c + k] - mean);
    for (int k = 0; k < MS_LANES; k++) s += acc[k];
    for (; c < C; c++) s += (double)(x[c] - mean) * (x[c] - mean);
    return s;
}

typedef struct {
    float *out;
    const float *x, *g, *scale;
    int C;
    ms_norm_kind kind;
} norm_rows_job;

MS_VECTOR_CLONES
static void xhat_rows(void *ctx, long long lo, long long hi) {
    const norm_rows_job *j = ctx;
    for (long long i = lo; i < hi; i++) {
        const float *xi = j->x + i * j->C;
        float *out = j->out + i * j->C;
        float mean = j->kind == MS_NORM_LAYER ? (float)row_mean(xi, j->C) : 0.0f, inv = 1.0f / j->scale[i];
        for (int c = 0; c < j->C; c++) out[c] = (xi[c] - mean) * inv;
    }
}

void ms_norm_xhat(float *xhat, const float *x, const float *scale, int N, int C, ms_norm_kind kind, int n_threads) {
    norm_rows_job job = {xhat, x, NULL, scale, C, kind};
    ms_parallel_for(N, (1 << 16) / (C + 1) + 1, n_threads, xhat_rows, &job);
}

/* xhat_c = xc_c / s: d/ds = -xc_c / s^2 */
MS_VECTOR_CLONES
static void scale_grad_rows(void *ctx, long long lo, long long hi) {
    const norm_rows_job *j = ctx;
    for (long long i = lo; i < hi; i++) {
        const float *xi = j->x + i * j->C, *g = j->g + i * j->C;
        float mean = j->kind == MS_NORM_LAYER ? (float)row_mean(xi, j->C) : 0.0f;
        double s = centred_dot(g, xi, mean, j->C);
        j->out[i] = (float)(-s / ((double)j->scale[i] * j->scale[i]));
    }
}

void ms_norm_scale_grad(float *dscale, const float *dxhat, const float *x, const float *scale, int N, int C,
                        ms_norm_kind kind, int n_threads) {
    norm_rows_job job = {dscale, x, dxhat, scale, C, kind};
    ms_parallel_for(N, (1 << 16) / (C + 1) + 1, n_threads, scale_grad_rows, &job);
}

typedef struct {
    float *dx;
    float *dscale_out; /* not NULL: each row's dscale computed here (as ms_norm_scale_grad does) */
    const float *dxhat, *dscale, *x, *scale;
    int C;
    float eps;
    ms_norm_kind kind;
} norm_job;

MS_VECTOR_CLONES
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
        float dscale;
        if (j->dscale_out) /* scale_grad_rows' arithmetic */
            j->dscale_out[i] = dscale = (float)(-centred_dot(g, xi, mean, C) / ((double)j->scale[i] * j->scale[i]));
        else
            dscale = j->dscale[i];
        var = centred_squares(xi, mean, C);
        /* the divisor as the input gives it (the one used may have been changed) */
        double s0 = sqrt(var / C + (double)j->eps);
        float inv = 1.0f / j->scale[i];
        float k = (float)((double)dscale / (C * s0)); /* d s0 / d x_c = xc_c / (C s0) */
        for (int c = 0; c < C; c++) out[c] += (g[c] - (float)gmean) * inv + k * (xi[c] - mean);
    }
}

void ms_norm_input_backward(float *dx, const float *dxhat, const float *dscale, const float *x,
                            const float *scale, int N, int C, float eps, ms_norm_kind kind, int n_threads) {
    norm_job job = {dx, NULL, dxhat, dscale, x, scale, C, eps, kind};
    ms_parallel_for(N, 65536 / (C + 1) + 1, n_threads, norm_input_rows, &job);
}

void ms_norm_scale_and_input_backward(float *dx, float *dscale, const float *dxhat, const float *x,
                                      const float *scale, int N, int C, float eps, ms_norm_kind kind,
                                      int n_threads) {
    norm_job job = {dx, dscale, dxhat, NULL, x, scale, C, eps, kind};
    ms_parallel_for(N, 65536 / (C + 1) + 1, n_threads, norm_input_rows, &job);
}

/* ---- activations ------------------------------------------------------------------- */

/* f = act(x) and df = act'(x) over a span, in float as the forward's (to its 2e-7);
 * one plain loop per activation, so that each vectorizes */
MS_VECTOR_CLONES
static void act_and_grad(const float *x, float *f, float *df, int n, ms_activation act) {
    switch (act) {
    case MS_ACT_GELU_NEW:
    case MS_ACT_GELU_FAST: /* 0.5 x (1 + tanh u) == x s, s = sigmoid(2u); 1 - tanh^2 u == 4 s (1 - s) */
        for (int i = 0; i < n; i++) {
            const float k = 0.7978845608028654f;
            float v = x[i], s = sigmoid_approx(2.0f * k * (v + 0.044715f * v * v * v));
            f[i] = v * s;
            df[i] = s + 2.0f * v * s * (1.0f - s) * k * (1.0f + 3.0f * 0.044715f * v * v);
        }
        break;
    case MS_ACT_GELU:
        for (int i = 0; i < n; i++) {
            float v = x[i], cdf = 0.5f * (1.0f + erf_approx(v * 0.7071067811865476f));
            f[i] = v * cdf;
            df[i] = cdf + v * 0.3989422804014327f * exp_approx(-0.5f * v * v);
        }
        break;
    case MS_ACT_RELU:
        for (int i = 0; i < n; i++) {
            f[i] = x[i] > 0.0f ? x[i] : 0.0f;
            df[i] = x[i] > 0.0f ? 1.0f : 0.0f;
        }
        break;
    case MS_ACT_SILU:
        for (int i = 0; i < n; i++) {
            float s = sigmoid_approx(x[i]);
            f[i] = x[i] * s;
            df[i] = s * (1.0f + x[i] * (1.0f - s));
        }
        break;
    case MS_ACT_QUICK_GELU:
        for (int i = 0; i < n; i++) {
            float s = sigmoid_approx(1.702f * x[i]);
            f[i] = x[i] * s;
            df[i] = s + 1.702f * x[i] * s * (1.0f - s);
        }
        break;
    case MS_ACT_TANH:
        for (int i = 0; i < n; i++) {
            float t = 2.0f * sigmoid_approx(2.0f * x[i]) - 1.0f;
            f[i] = t;
            df[i] = 1.0f - t * t;
        }
        break;
    case MS_ACT_SIGMOID:
        for (int i = 0; i < n; i++) {
            float s = sigmoid_approx(x[i]);
            f[i] = s;
            df[i] = s * (1.0f - s);
        }
        break;
    default:
        for (int i = 0; i < n; i++) f[i] = x[i], df[i] = 1.0f;
        break;
    }
}

typedef struct {
    float *dpre;
    const float *dpost, *pre;
    int ld_dpre, ld_dpost, ld_pre, F, gated;
    ms_activation act;
} act_job;

enum { ACT_SPAN = 256 };

static void act_rows(void *ctx, long long lo, long long hi) {
    const act_job *j = ctx;
    float f[ACT_SPAN], df[ACT_SPAN];
    for (long long i = lo; i < hi; i++) {
        const float *g = j->dpost + i * j->ld_dpost, *x = j->pre + i * j->ld_pre;
        float *out = j->dpre + i * j->ld_dpre;
        for (int c0 = 0; c0 < j->F; c0 += ACT_SPAN) {
            int n = j->F - c0 < ACT_SPAN ? j->F - c0 : ACT_SPAN;
            act_and_grad(x + c0, f, df, n, j->act);
            if (j->gated) { /* x: gate | up */
                const float *up = x + j->F + c0;
                for (int c = 0; c < n; c++) {
                    out[c0 + c] = g[c0 + c] * up[c] * df[c];
                    out[j->F + c0 + c] = g[c0 + c] * f[c];
                }
            } else {
                for (int c = 0; c < n; c++) out[c0 + c] = g[c0 + c] * df[c];
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


void ms_rotary_backward(float *g, const float *rope, int rotary_dim, int interleaved) {
    int half = rotary_dim / 2;
    const float *cs = rope, *sn = rope + half;
    if (interleaved) {
        for (int i = 0; i < half; i++) {
            float g1 = g[2 * i], g2 = g[2 * i + 1];
            g[2 * i] = g1 * cs[i] + g2 * sn[i];
            g[2 * i + 1] = g2 * cs[i] - g1 * sn[i];
        }
        return;
    }
    for (int i = 0; i < half; i++) {
        float g1 = g[i], g2 = g[i + half];
        g[i] = g1 * cs[i] + g2 * sn[i];
        g[i + half] = g2 * cs[i] - g1 * sn[i];
    }
}

/* y = xhat * w, xhat = x / s, s = sqrt(mean(x^2) + eps): with g' = g * w,
 * dx = (g' - xhat * mean(g' * xhat)) / s and dw += g * xhat */
typedef struct {
    float *g;
    const float *x, *w;
    int ld, ldx, heads, d;
    float eps;
} head_norm_back_job;

static float head_scale(const float *x, int d, float eps) {
    double sum = 0.0;
    for (int c = 0; c < d; c++) sum += (double)x[c] * x[c];
    return sqrtf((float)(sum / d) + eps);
}

static void head_norm_back_rows(void *ctx, long long lo, long long hi) {
    const head_norm_back_job *j = ctx;
    for (long long i = lo; i < hi; i++)
        for (int h = 0; h < j->heads; h++) {
            float *g = j->g + (size_t)i * j->ld + (size_t)h * j->d;
            const float *x = j->x + (size_t)i * j->ldx + (size_t)h * j->d;
            float s = head_scale(x, j->d, j->eps);
            double dot = 0.0;
            for (int c = 0; c < j->d; c++) dot += (double)(g[c] * j->w[c]) * (x[c] / s);
            float mean = (float)(dot / j->d);
            for (int c = 0; c < j->d; c++) g[c] = (g[c] * j->w[c] - x[c] / s * mean) / s;
        }
}

void ms_head_rmsnorm_backward(float *g, int ld, const float *x, int ldx, int N, int heads, int d, const float *w,
                              float *dw, float eps, int n_threads) {
    if (dw) /* before g is overwritten; serial, so that the sums do not race */
        for (int i = 0; i < N; i++)
            for (int h = 0; h < heads; h++) {
                const float *gi = g + (size_t)i * ld + (size_t)h * d, *xi = x + (size_t)i * ldx + (size_t)h * d;
                float s = head_scale(xi, d, eps);
                for (int c = 0; c < d; c++) dw[c] += gi[c] * (xi[c] / s);
            }
    head_norm_back_job job = {g, x, w, ld, ldx, heads, d, eps};
    ms_parallel_for(N, 65536 / ((long long)heads * d + 1) + 1, n_threads, head_norm_back_rows, &job);
}
