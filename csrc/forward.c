/* forward.c — the forward driver: walks the blocks and visits every site once.
 *
 * One allocation holds all activations of the run, sized from the plan. Each site's
 * value is computed into its buffer, then handed to the plan (ms_visit_*), which
 * may cache or change it before the next operation reads it. */
#include "kernels.h"
#include "run.h"
#include "blas.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Attention on sequences at least this long uses the BLAS; shorter ones use plain
 * loops, many sequences at once on different threads. */
#define MS_ATTENTION_BLAS_MIN_LEN 48

typedef struct {
    float *resid;  /* [N, C]   the residual stream */
    float *ln;     /* [N, C]   a layer norm's output */
    float *scale;  /* [N]      a layer norm's divisor */
    float *qkv;    /* [N, 3C] */
    float *att;    /* [sum over rows of H * n * n] scores, then pattern */
    float *z;      /* [N, C] */
    float *tmp_a;  /* [N, C]   embed, then attn_out */
    float *tmp_b;  /* [N, C]   pos_embed, then mlp_out */
    float *mlp;    /* [N, F]   mlp pre, then post */
    float *logit_x;/* [n_rows * n_logit_pos, C] final-normed rows whose logits are needed */
} ms_buffers;

static size_t buffer_floats(const ms_config *c, int N, size_t att_total, size_t n_logit_rows) {
    size_t C = (size_t)c->d_model, n = (size_t)N;
    return n * C * 6 + n + n * 3 * C + att_total + n * (size_t)c->d_mlp + n_logit_rows * C;
}

static int row_length(const ms_plan *p, int r) {
    if (!p->mask) return p->n_pos;
    int n = 0;
    for (int t = 0; t < p->n_pos; t++) n += p->mask[(size_t)r * p->n_pos + t] != 0;
    return n;
}

size_t ms_run_workspace_bytes(const ms_model *m, const ms_plan *plan) {
    size_t N = 0, att = 0;
    for (int r = 0; r < plan->n_rows; r++) {
        size_t n = (size_t)row_length(plan, r);
        N += n;
        att += (size_t)m->cfg.n_heads * n * n;
    }
    size_t floats = buffer_floats(&m->cfg, (int)N, att, (size_t)plan->n_rows * plan->n_logit_pos);
    size_t ints = (size_t)plan->n_rows * 2 + 2 + (size_t)plan->n_rows * plan->n_pos + N;
    return floats * sizeof(float) + ints * sizeof(int) + (plan->n_rows + 1) * sizeof(size_t);
}

/* Build the packed layout; allocates L's index arrays (freed by layout_free). */
static ms_status layout_build(ms_layout *L, const ms_model *m, const ms_plan *p, ms_error *err) {
    int R = p->n_rows, T = p->n_pos;
    L->m = m;
    L->plan = p;
    L->row_off = malloc(sizeof(int) * (size_t)(R + 1));
    L->packed_of = malloc(sizeof(int) * (size_t)R * (size_t)T + 1);
    L->att_off = malloc(sizeof(size_t) * (size_t)(R + 1));
    if (!L->row_off || !L->packed_of || !L->att_off) goto oom;
    L->row_off[0] = 0;
    L->att_off[0] = 0;
    for (int r = 0; r < R; r++) {
        int n = row_length(p, r);
        L->row_off[r + 1] = L->row_off[r] + n;
        L->att_off[r + 1] = L->att_off[r] + (size_t)m->cfg.n_heads * n * n;
    }
    L->N = L->row_off[R];
    L->pos_of = malloc(sizeof(int) * (size_t)L->N + 1);
    if (!L->pos_of) goto oom;
    for (int r = 0; r < R; r++) {
        int k = L->row_off[r];
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)r * T + t;
            if (!p->mask || p->mask[i]) {
                L->packed_of[i] = k;
                L->pos_of[k++] = t;
            } else {
                L->packed_of[i] = -1;
            }
        }
    }
    return MS_OK;
oom:
    snprintf(err->message, sizeof err->message, "out of memory building the run layout");
    return MS_ERR_MEMORY;
}

static void layout_free(ms_layout *L) {
    free(L->row_off);
    free(L->packed_of);
    free(L->pos_of);
    free(L->att_off);
}

static void carve_buffers(ms_buffers *b, float *base, const ms_config *c, int N, size_t att_total) {
    size_t C = (size_t)c->d_model, n = (size_t)N;
    b->resid = base;
    b->ln = b->resid + n * C;
    b->scale = b->ln + n * C;
    b->qkv = b->scale + n;
    b->att = b->qkv + n * 3 * C;
    b->z = b->att + att_total;
    b->tmp_a = b->z + n * C;
    b->tmp_b = b->tmp_a + n * C;
    b->mlp = b->tmp_b + n * C;
    b->logit_x = b->mlp + n * (size_t)c->d_mlp;
}

/* embed[N, C] = wte[token]; pos_embed[N, C] = wpe[index among the row's real tokens] */
static void embed_tokens(const ms_layout *L, float *embed, float *pos_embed) {
    const ms_model *m = L->m;
    const ms_plan *p = L->plan;
    size_t C = (size_t)m->cfg.d_model;
    for (int r = 0; r < p->n_rows; r++) {
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            int tok = p->tokens[(size_t)r * p->n_pos + L->pos_of[k]];
            int pos = k - L->row_off[r];
            memcpy(embed + k * C, m->wte + (size_t)tok * C, sizeof(float) * C);
            memcpy(pos_embed + k * C, m->wpe + (size_t)pos * C, sizeof(float) * C);
        }
    }
}

/* LayerNorm with its two sites: the divisor is visited (and may be changed) before
 * it is applied, as in TransformerLens. */
static ms_status layernorm_sites(const ms_layout *L, ms_buffers *b, const float *w, const float *bias,
                                 ms_site scale_site, int layer, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    ms_status st;
    ms_layernorm(b->ln, b->scale, b->resid, w, bias, L->N, c->d_model, c->ln_eps, L->n_threads);
    if (ms_plan_touches(L->plan, scale_site, layer)) {
        if ((st = ms_visit_tokens(L, scale_site, layer, b->scale, 1, err))) return st;
        /* recompute the normalized value from the (possibly changed) divisor */
        int C = c->d_model;
        for (int i = 0; i < L->N; i++) {
            const float *x = b->resid + (size_t)i * C;
            float *y = b->ln + (size_t)i * C;
            double mean = 0.0;
            for (int d = 0; d < C; d++) mean += x[d];
            float mu = (float)(mean / C), inv = 1.0f / b->scale[i];
            for (int d = 0; d < C; d++) y[d] = (x[d] - mu) * inv * w[d] + bias[d];
        }
    }
    return ms_visit_tokens(L, scale_site + 1, layer, b->ln, c->d_model, err);
}

/* scores -> visit -> softmax -> visit -> z, for every row */
static ms_status attention_sites(const ms_layout *L, ms_buffers *b, int layer, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    const ms_plan *p = L->plan;
    int H = c->n_heads, Dh = c->d_head, C = c->d_model;
    float scale = 1.0f;
    if (c->scale_attn_weights) scale /= sqrtf((float)Dh);
    if (c->scale_attn_by_inverse_layer) scale /= (float)(layer + 1);
    ms_status st;

    for (int r = 0; r < p->n_rows; r++) {
        int n = L->row_off[r + 1] - L->row_off[r];
        if (n >= MS_ATTENTION_BLAS_MIN_LEN)
            ms_attention_scores(b->att + L->att_off[r], b->qkv + (size_t)L->row_off[r] * 3 * C,
                                3 * C, n, H, Dh, scale, 1);
    }
#pragma omp parallel for num_threads(L->n_threads) schedule(dynamic)
    for (int r = 0; r < p->n_rows; r++) {
        int n = L->row_off[r + 1] - L->row_off[r];
        if (n < MS_ATTENTION_BLAS_MIN_LEN)
            ms_attention_scores(b->att + L->att_off[r], b->qkv + (size_t)L->row_off[r] * 3 * C,
                                3 * C, n, H, Dh, scale, 0);
    }
    if ((st = ms_visit_attention(L, MS_SITE_ATTN_SCORES, layer, b->att, err))) return st;

    for (int r = 0; r < p->n_rows; r++) {
        int n = L->row_off[r + 1] - L->row_off[r];
        ms_causal_softmax(b->att + L->att_off[r], H, n, L->n_threads);
    }
    if ((st = ms_visit_attention(L, MS_SITE_PATTERN, layer, b->att, err))) return st;

    for (int r = 0; r < p->n_rows; r++) {
        int n = L->row_off[r + 1] - L->row_off[r];
        if (n >= MS_ATTENTION_BLAS_MIN_LEN)
            ms_attention_mix(b->z + (size_t)L->row_off[r] * C, C, b->att + L->att_off[r],
                             b->qkv + (size_t)L->row_off[r] * 3 * C, 3 * C, n, H, Dh, 1);
    }
#pragma omp parallel for num_threads(L->n_threads) schedule(dynamic)
    for (int r = 0; r < p->n_rows; r++) {
        int n = L->row_off[r + 1] - L->row_off[r];
        if (n < MS_ATTENTION_BLAS_MIN_LEN)
            ms_attention_mix(b->z + (size_t)L->row_off[r] * C, C, b->att + L->att_off[r],
                             b->qkv + (size_t)L->row_off[r] * 3 * C, 3 * C, n, H, Dh, 0);
    }
    return ms_visit_tokens(L, MS_SITE_Z, layer, b->z, C, err);
}

static ms_status block_forward(const ms_layout *L, ms_buffers *b, int l, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    const ms_block *w = &L->m->blocks[l];
    int N = L->N, C = c->d_model, F = c->d_mlp, nt = L->n_threads;
    size_t NC = (size_t)N * C;
    ms_status st;

    if ((st = ms_visit_tokens(L, MS_SITE_RESID_PRE, l, b->resid, C, err))) return st;
    if ((st = layernorm_sites(L, b, w->ln1_w, w->ln1_b, MS_SITE_LN1_SCALE, l, err))) return st;
    ms_linear(b->qkv, b->ln, C, w->w_qkv, w->b_qkv, N, C, 3 * C, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_Q, l, b->qkv, 3 * C, err))) return st;
    if ((st = ms_visit_tokens(L, MS_SITE_K, l, b->qkv + C, 3 * C, err))) return st;
    if ((st = ms_visit_tokens(L, MS_SITE_V, l, b->qkv + 2 * C, 3 * C, err))) return st;
    if ((st = attention_sites(L, b, l, err))) return st;
    ms_linear(b->tmp_a, b->z, C, w->w_o, w->b_o, N, C, C, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_ATTN_OUT, l, b->tmp_a, C, err))) return st;
    ms_add(b->resid, b->resid, b->tmp_a, NC, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_RESID_MID, l, b->resid, C, err))) return st;
    if ((st = layernorm_sites(L, b, w->ln2_w, w->ln2_b, MS_SITE_LN2_SCALE, l, err))) return st;
    ms_linear(b->mlp, b->ln, C, w->w_in, w->b_in, N, C, F, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_PRE, l, b->mlp, F, err))) return st;
    ms_activation_inplace(b->mlp, (size_t)N * F, c->activation, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_POST, l, b->mlp, F, err))) return st;
    ms_linear(b->tmp_b, b->mlp, F, w->w_out, w->b_out, N, F, C, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_OUT, l, b->tmp_b, C, err))) return st;
    ms_add(b->resid, b->resid, b->tmp_b, NC, nt);
    return ms_visit_tokens(L, MS_SITE_RESID_POST, l, b->resid, C, err);
}

/* logits[r, j] = ln_final(x at row r, position logit_pos[r, j]) @ unembed^T; zeros at padding */
static void compute_logits(const ms_layout *L, ms_buffers *b) {
    const ms_plan *p = L->plan;
    const ms_config *c = &L->m->cfg;
    size_t C = (size_t)c->d_model;
    int M = p->n_rows * p->n_logit_pos;
    for (int r = 0; r < p->n_rows; r++) {
        for (int j = 0; j < p->n_logit_pos; j++) {
            int pos = p->logit_pos[(size_t)r * p->n_logit_pos + j];
            int k = L->packed_of[(size_t)r * p->n_pos + pos];
            float *dst = b->logit_x + ((size_t)r * p->n_logit_pos + j) * C;
            if (k < 0) memset(dst, 0, sizeof(float) * C);
            else memcpy(dst, b->ln + (size_t)k * C, sizeof(float) * C);
        }
    }
    ms_unembed(p->logits, b->logit_x, L->m->unembed, M, c->d_model, c->d_vocab);
}

ms_status ms_run(const ms_model *m, const ms_plan *plan, ms_error *err) {
    ms_status st = ms_plan_check(m, plan, err);
    if (st) return st;
    const ms_config *c = &m->cfg;
    ms_layout L = {0};
    float *base = NULL;
    ms_buffers b;
    L.n_threads = plan->n_threads > 0 ? plan->n_threads : ms_get_num_threads();
    if ((st = layout_build(&L, m, plan, err))) goto done;
    size_t att_total = L.att_off[plan->n_rows];
    size_t n_logit_rows = (size_t)plan->n_rows * plan->n_logit_pos;
    base = malloc(sizeof(float) * (buffer_floats(c, L.N, att_total, n_logit_rows) + 1));
    if (!base) {
        snprintf(err->message, sizeof err->message, "out of memory allocating the run's activations");
        st = MS_ERR_MEMORY;
        goto done;
    }
    carve_buffers(&b, base, c, L.N, att_total);

    embed_tokens(&L, b.tmp_a, b.tmp_b);
    if ((st = ms_visit_tokens(&L, MS_SITE_EMBED, 0, b.tmp_a, c->d_model, err))) goto done;
    if ((st = ms_visit_tokens(&L, MS_SITE_POS_EMBED, 0, b.tmp_b, c->d_model, err))) goto done;
    ms_add(b.resid, b.tmp_a, b.tmp_b, (size_t)L.N * c->d_model, L.n_threads);
    for (int l = 0; l < c->n_layers; l++)
        if ((st = block_forward(&L, &b, l, err))) goto done;
    if ((st = layernorm_sites(&L, &b, m->lnf_w, m->lnf_b, MS_SITE_LNF_SCALE, 0, err))) goto done;
    if (plan->n_logit_pos > 0) compute_logits(&L, &b);

done:
    free(base);
    layout_free(&L);
    return st;
}

static int g_threads = 0;

void ms_set_num_threads(int n) {
    if (n < 1) n = 1;
    g_threads = n;
    ms_blas_set_threads(n);
}

int ms_get_num_threads(void) {
    return g_threads > 0 ? g_threads : ms_blas_get_threads();
}

const char *ms_blas_config(void) { return ms_blas_get_config(); }
const char *ms_blas_corename(void) { return ms_blas_get_corename(); }
