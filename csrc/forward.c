/* forward.c — the forward driver: walks the blocks and visits every site once.
 *
 * One allocation holds all activations of the run, sized from the plan. Each site's
 * value is computed into its buffer, then handed to the plan (ms_visit_*), which
 * may cache or change it before the next operation reads it. Rows that resume a
 * base run join at their start layer with the base's residual stream, and attend
 * to the base's keys and values at the positions they do not recompute. */
#include "kernels.h"
#include "run.h"
#include "blas.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Attention over at least this many queries x keys uses the BLAS; smaller ones use
 * plain loops, many sequences at once on different threads. */
#define MS_ATTENTION_BLAS_MIN (48 * 48)

typedef struct {
    float *resid;   /* [N, C]   the residual stream */
    float *ln;      /* [N, C]   a layer norm's output */
    float *scale;   /* [N]      a layer norm's divisor */
    float *qkv;     /* [N, 3C] */
    float *att;     /* [sum over rows of H * n_q * n_k] scores, then pattern */
    float *kv;      /* [sum over resuming rows of 2 * n_k * C] their keys | values */
    float *z;       /* [N, C] */
    float *tmp_a;   /* [N, C]   embed, then attn_out */
    float *tmp_b;   /* [N, C]   pos_embed, then mlp_out */
    float *mlp;     /* [N, F]   mlp pre, then post */
    float *out_x;   /* [n_out_rows, C] final-normed rows whose logits are needed */
    float *out_y;   /* [n_out_rows, V] their logits, when a metric needs the whole row */
} ms_buffers;

/* ---- layout ------------------------------------------------------------------- */

static int real_count(const ms_plan *p, int r) {
    if (!p->mask) return p->n_pos;
    int n = 0;
    for (int t = 0; t < p->n_pos; t++) n += p->mask[(size_t)r * p->n_pos + t] != 0;
    return n;
}

/* index of padded position t among row r's real tokens */
static int real_index(const ms_plan *p, int r, int t) {
    if (!p->mask) return t;
    int n = 0;
    for (int u = 0; u < t; u++) n += p->mask[(size_t)r * p->n_pos + u] != 0;
    return n;
}

static int metric_needs_logits(const ms_plan *p) {
    return p->metric.kind == MS_METRIC_LOGPROB || p->metric.kind == MS_METRIC_PROB ||
           p->metric.kind == MS_METRIC_KL;
}

typedef struct {
    size_t N, att, kv, out_rows, out_full;
} ms_sizes;

static ms_sizes plan_sizes(const ms_model *m, const ms_plan *p) {
    ms_sizes s = {0};
    for (int r = 0; r < p->n_rows; r++) {
        size_t n = (size_t)real_count(p, r);
        size_t first = p->start_pos ? (size_t)real_index(p, r, p->start_pos[r]) : 0;
        s.N += n - first;
        s.att += (size_t)m->cfg.n_heads * (n - first) * n;
        if (first > 0) s.kv += 2 * n * (size_t)m->cfg.d_model;
    }
    s.out_rows = (size_t)p->n_rows * p->n_logit_pos;
    if (p->metric.kind != MS_METRIC_NONE) {
        s.out_rows += (size_t)p->n_rows;
        if (metric_needs_logits(p)) s.out_full = (size_t)p->n_rows * m->cfg.d_vocab;
    }
    return s;
}

static size_t buffer_floats(const ms_config *c, ms_sizes s) {
    size_t C = (size_t)c->d_model;
    return s.N * (C * 6 + 1 + 3 * C + (size_t)c->d_mlp) + s.att + s.kv + s.out_rows * C + s.out_full;
}

size_t ms_run_workspace_bytes(const ms_model *m, const ms_plan *plan) {
    ms_sizes s = plan_sizes(m, plan);
    size_t index_bytes = sizeof(int) * ((size_t)plan->n_rows * (5 + plan->n_pos) + s.N) +
                         2 * sizeof(size_t) * (plan->n_rows + 1);
    size_t record = plan->record ? 3 * sizeof(float) * (size_t)m->cfg.n_layers * s.N * m->cfg.d_model : 0;
    return buffer_floats(&m->cfg, s) * sizeof(float) + index_bytes + record;
}

static void layout_free(ms_layout *L) {
    free(L->row_off);
    free(L->n_real);
    free(L->first);
    free(L->layer0);
    free(L->packed_of);
    free(L->pos_of);
    free(L->att_off);
    free(L->kv_off);
}

/* Build the packed layout; allocates L's index arrays (freed by layout_free). */
static ms_status layout_build(ms_layout *L, const ms_model *m, const ms_plan *p, ms_error *err) {
    int R = p->n_rows, T = p->n_pos, H = m->cfg.n_heads;
    size_t C = (size_t)m->cfg.d_model;
    L->m = m;
    L->plan = p;
    L->row_off = malloc(sizeof(int) * (size_t)(R + 1));
    L->n_real = malloc(sizeof(int) * (size_t)R);
    L->first = malloc(sizeof(int) * (size_t)R);
    L->layer0 = malloc(sizeof(int) * (size_t)R);
    L->packed_of = malloc(sizeof(int) * (size_t)R * (size_t)T);
    L->att_off = malloc(sizeof(size_t) * (size_t)(R + 1));
    L->kv_off = malloc(sizeof(size_t) * (size_t)(R + 1));
    if (!L->row_off || !L->n_real || !L->first || !L->layer0 || !L->packed_of || !L->att_off ||
        !L->kv_off)
        goto oom;
    L->row_off[0] = 0;
    L->att_off[0] = 0;
    L->kv_off[0] = 0;
    for (int r = 0; r < R; r++) {
        int n = real_count(p, r);
        int first = p->start_pos ? real_index(p, r, p->start_pos[r]) : 0;
        L->n_real[r] = n;
        L->first[r] = first;
        L->layer0[r] = p->start_layer ? p->start_layer[r] : -1;
        L->row_off[r + 1] = L->row_off[r] + (n - first);
        L->att_off[r + 1] = L->att_off[r] + (size_t)H * (n - first) * n;
        L->kv_off[r + 1] = L->kv_off[r] + (first > 0 ? 2 * (size_t)n * C : 0);
    }
    L->N = L->row_off[R];
    L->pos_of = malloc(sizeof(int) * (size_t)L->N + 1);
    if (!L->pos_of) goto oom;
    for (int r = 0; r < R; r++) {
        int k = L->row_off[r], idx = 0;
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)r * T + t;
            int real = !p->mask || p->mask[i];
            if (real && idx >= L->first[r]) {
                L->packed_of[i] = k;
                L->pos_of[k++] = t;
            } else {
                L->packed_of[i] = -1;
            }
            idx += real;
        }
    }
    return MS_OK;
oom:
    snprintf(err->message, sizeof err->message, "out of memory building the run layout");
    return MS_ERR_MEMORY;
}

/* Rows computed at block `layer` (-1: the embedding): a prefix, since start layers
 * do not decrease. */
static void set_active(ms_layout *L, int layer) {
    int R = L->plan->n_rows, r = 0;
    while (r < R && L->layer0[r] <= layer) r++;
    L->active_rows = r;
    L->active_N = L->row_off[r];
}

static void carve_buffers(ms_buffers *b, float *base, const ms_config *c, ms_sizes s) {
    size_t C = (size_t)c->d_model, n = s.N;
    b->resid = base;
    b->ln = b->resid + n * C;
    b->scale = b->ln + n * C;
    b->qkv = b->scale + n;
    b->att = b->qkv + n * 3 * C;
    b->kv = b->att + s.att;
    b->z = b->kv + s.kv;
    b->tmp_a = b->z + n * C;
    b->tmp_b = b->tmp_a + n * C;
    b->mlp = b->tmp_b + n * C;
    b->out_x = b->mlp + n * (size_t)c->d_mlp;
    b->out_y = b->out_x + s.out_rows * C;
}

/* packed token of the base run for row r's real token j */
static size_t base_token(const ms_layout *L, int r, int j) {
    return (size_t)L->plan->base->row_off[L->plan->base_row[r]] + (size_t)j;
}

/* ---- the walk ---------------------------------------------------------------------- */

/* embed[N, C] = wte[token]; pos_embed[N, C] = wpe[index among the row's real tokens],
 * for the rows that start from the embedding */
static void embed_tokens(const ms_layout *L, float *embed, float *pos_embed) {
    const ms_model *m = L->m;
    const ms_plan *p = L->plan;
    size_t C = (size_t)m->cfg.d_model;
    for (int r = 0; r < L->active_rows; r++) {
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            int tok = p->tokens[(size_t)r * p->n_pos + L->pos_of[k]];
            int pos = L->first[r] + (k - L->row_off[r]);
            memcpy(embed + k * C, m->wte + (size_t)tok * C, sizeof(float) * C);
            memcpy(pos_embed + k * C, m->wpe + (size_t)pos * C, sizeof(float) * C);
        }
    }
}

/* Rows whose start layer is `layer` join with the base run's residual stream. */
static void join_rows(const ms_layout *L, float *resid, int layer) {
    const ms_state *st = L->plan->base;
    size_t C = (size_t)L->m->cfg.d_model;
    for (int r = 0; r < L->active_rows; r++) {
        if (L->layer0[r] != layer) continue;
        const float *src = st->resid + ((size_t)layer * st->N + base_token(L, r, L->first[r])) * C;
        memcpy(resid + (size_t)L->row_off[r] * C, src,
               sizeof(float) * C * (size_t)(L->row_off[r + 1] - L->row_off[r]));
    }
}

/* LayerNorm with its two sites: the divisor is visited (and may be changed) before
 * it is applied, as in TransformerLens. */
static ms_status layernorm_sites(const ms_layout *L, ms_buffers *b, const float *w, const float *bias,
                                 ms_site scale_site, int layer, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    int N = L->active_N, C = c->d_model;
    ms_status st;
    ms_layernorm(b->ln, b->scale, b->resid, w, bias, N, C, c->ln_eps, L->n_threads);
    if (ms_plan_touches(L->plan, scale_site, layer)) {
        if ((st = ms_visit_tokens(L, scale_site, layer, b->scale, 1, err))) return st;
        /* recompute the normalized value from the (possibly changed) divisor */
        ms_layernorm_apply(b->ln, b->scale, b->resid, w, bias, N, C);
    } else if ((st = ms_visit_tokens(L, scale_site, layer, b->scale, 1, err))) {
        return st;
    }
    return ms_visit_tokens(L, scale_site + 1, layer, b->ln, C, err);
}

/* Where row r's keys and values are: in qkv itself, or (resuming rows) in the
 * scratch, base prefix first. */
static void row_keys(const ms_layout *L, ms_buffers *b, int r, int layer, const float **k,
                     const float **v, int *ld) {
    int C = L->m->cfg.d_model;
    const float *own = b->qkv + (size_t)L->row_off[r] * 3 * C;
    if (L->first[r] == 0) {
        *k = own + C;
        *v = own + 2 * C;
        *ld = 3 * C;
        return;
    }
    const ms_state *st = L->plan->base;
    float *kk = b->kv + L->kv_off[r], *vv = kk + (size_t)L->n_real[r] * C;
    int f = L->first[r];
    size_t base0 = (size_t)layer * st->N + base_token(L, r, 0);
    memcpy(kk, st->k + base0 * C, sizeof(float) * (size_t)f * C);
    memcpy(vv, st->v + base0 * C, sizeof(float) * (size_t)f * C);
    for (int j = f; j < L->n_real[r]; j++) {
        memcpy(kk + (size_t)j * C, own + (size_t)(j - f) * 3 * C + C, sizeof(float) * C);
        memcpy(vv + (size_t)j * C, own + (size_t)(j - f) * 3 * C + 2 * C, sizeof(float) * C);
    }
    *k = kk;
    *v = vv;
    *ld = C;
}

static int use_blas(const ms_layout *L, int r) {
    long long nq = L->row_off[r + 1] - L->row_off[r];
    return nq * L->n_real[r] >= MS_ATTENTION_BLAS_MIN;
}

/* The attention of rows [lo, hi) that are small enough for plain loops: each row
 * on one thread, all its heads, from scores to z. Only when no action reads or
 * changes the scores or the pattern. */
typedef struct {
    const ms_layout *L;
    ms_buffers *b;
    int layer;
    float scale;
} attention_job;

static void attention_row(const attention_job *j, int r, int phase) {
    const ms_layout *L = j->L;
    const ms_config *c = &L->m->cfg;
    int C = c->d_model, nq = L->row_off[r + 1] - L->row_off[r];
    int blas = use_blas(L, r);
    const float *k, *v;
    int ld;
    float *att = j->b->att + L->att_off[r];
    if (phase == 0) {
        row_keys(L, j->b, r, j->layer, &k, &v, &ld);
        ms_attention_scores(att, j->b->qkv + (size_t)L->row_off[r] * 3 * C, 3 * C, k, ld, nq,
                            L->n_real[r], L->first[r], c->n_heads, c->d_head, j->scale, blas);
    } else if (phase == 1) {
        ms_causal_softmax(att, c->n_heads, nq, L->n_real[r], L->first[r]);
    } else {
        /* the keys and values are where row_keys put them in phase 0 */
        if (L->first[r] == 0) row_keys(L, j->b, r, j->layer, &k, &v, &ld);
        else k = j->b->kv + L->kv_off[r], v = k + (size_t)L->n_real[r] * C, ld = C;
        ms_attention_mix(j->b->z + (size_t)L->row_off[r] * C, C, att, v, ld, nq, L->n_real[r],
                         c->n_heads, c->d_head, blas);
    }
}

typedef struct {
    const attention_job *job;
    int phase_lo, phase_hi;
} small_rows_job;

static void small_rows(void *ctx, long long lo, long long hi) {
    const small_rows_job *s = ctx;
    for (long long r = lo; r < hi; r++) {
        if (use_blas(s->job->L, (int)r)) continue;
        for (int phase = s->phase_lo; phase < s->phase_hi; phase++) attention_row(s->job, (int)r, phase);
    }
}

/* phases [lo, hi) of every active row: big rows one after the other, each with all
 * threads in the BLAS; small rows side by side on the threads */
static void attention_phases(const attention_job *job, int lo, int hi) {
    const ms_layout *L = job->L;
    for (int r = 0; r < L->active_rows; r++)
        if (use_blas(L, r))
            for (int phase = lo; phase < hi; phase++) attention_row(job, r, phase);
    small_rows_job s = {job, lo, hi};
    ms_parallel_for(L->active_rows, 8, L->n_threads, small_rows, &s);
}

/* scores -> visit -> softmax -> visit -> z, for every active row */
static ms_status attention_sites(const ms_layout *L, ms_buffers *b, int layer, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    attention_job job = {L, b, layer, 1.0f};
    if (c->scale_attn_weights) job.scale /= sqrtf((float)c->d_head);
    if (c->scale_attn_by_inverse_layer) job.scale /= (float)(layer + 1);
    ms_status st;
    if (ms_plan_visits(L->plan, MS_SITE_ATTN_SCORES, layer) || ms_plan_visits(L->plan, MS_SITE_PATTERN, layer)) {
        attention_phases(&job, 0, 1);
        if ((st = ms_visit_attention(L, MS_SITE_ATTN_SCORES, layer, b->att, err))) return st;
        attention_phases(&job, 1, 2);
        if ((st = ms_visit_attention(L, MS_SITE_PATTERN, layer, b->att, err))) return st;
        attention_phases(&job, 2, 3);
    } else {
        attention_phases(&job, 0, 3);
    }
    return ms_visit_tokens(L, MS_SITE_Z, layer, b->z, c->d_model, err);
}

static void record_state(const ms_layout *L, const float *src, int ld, float *dst_layer) {
    size_t C = (size_t)L->m->cfg.d_model;
    for (int k = 0; k < L->N; k++) memcpy(dst_layer + (size_t)k * C, src + (size_t)k * ld, sizeof(float) * C);
}

static ms_status block_forward(ms_layout *L, ms_buffers *b, int l, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    const ms_block *w = &L->m->blocks[l];
    ms_state *rec = L->plan->record;
    int C = c->d_model, F = c->d_mlp, nt = L->n_threads;
    ms_status st;

    set_active(L, l);
    int N = L->active_N;
    size_t NC = (size_t)N * C;
    if (L->plan->base) join_rows(L, b->resid, l);
    if ((st = ms_visit_tokens(L, MS_SITE_RESID_PRE, l, b->resid, C, err))) return st;
    if (rec) record_state(L, b->resid, C, rec->resid + (size_t)l * rec->N * C);
    if ((st = layernorm_sites(L, b, w->ln1_w, w->ln1_b, MS_SITE_LN1_SCALE, l, err))) return st;
    ms_linear(b->qkv, b->ln, C, w->w_qkv, w->b_qkv, N, C, 3 * C);
    if ((st = ms_visit_tokens(L, MS_SITE_Q, l, b->qkv, 3 * C, err))) return st;
    if ((st = ms_visit_tokens(L, MS_SITE_K, l, b->qkv + C, 3 * C, err))) return st;
    if ((st = ms_visit_tokens(L, MS_SITE_V, l, b->qkv + 2 * C, 3 * C, err))) return st;
    if (rec) {
        record_state(L, b->qkv + C, 3 * C, rec->k + (size_t)l * rec->N * C);
        record_state(L, b->qkv + 2 * C, 3 * C, rec->v + (size_t)l * rec->N * C);
    }
    if ((st = attention_sites(L, b, l, err))) return st;
    ms_linear(b->tmp_a, b->z, C, w->w_o, w->b_o, N, C, C);
    if ((st = ms_visit_tokens(L, MS_SITE_ATTN_OUT, l, b->tmp_a, C, err))) return st;
    ms_add(b->resid, b->resid, b->tmp_a, NC);
    if ((st = ms_visit_tokens(L, MS_SITE_RESID_MID, l, b->resid, C, err))) return st;
    if ((st = layernorm_sites(L, b, w->ln2_w, w->ln2_b, MS_SITE_LN2_SCALE, l, err))) return st;
    ms_linear(b->mlp, b->ln, C, w->w_in, w->b_in, N, C, F);
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_PRE, l, b->mlp, F, err))) return st;
    ms_activation_inplace(b->mlp, (size_t)N * F, c->activation, nt);
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_POST, l, b->mlp, F, err))) return st;
    ms_linear(b->tmp_b, b->mlp, F, w->w_out, w->b_out, N, F, C);
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_OUT, l, b->tmp_b, C, err))) return st;
    ms_add(b->resid, b->resid, b->tmp_b, NC);
    return ms_visit_tokens(L, MS_SITE_RESID_POST, l, b->resid, C, err);
}

/* ---- outputs -------------------------------------------------------------------------- */

/* x[C] <- the final-normed value at padded position pos of row r (zeros if not computed) */
static void take_row(const ms_layout *L, const ms_buffers *b, int r, int pos, float *x) {
    size_t C = (size_t)L->m->cfg.d_model;
    int k = L->packed_of[(size_t)r * L->plan->n_pos + pos];
    if (k < 0) memset(x, 0, sizeof(float) * C);
    else memcpy(x, b->ln + (size_t)k * C, sizeof(float) * C);
}

/* logits[r, j] = ln_final(x at row r, position logit_pos[r, j]) @ unembed^T */
static void compute_logits(const ms_layout *L, ms_buffers *b) {
    const ms_plan *p = L->plan;
    const ms_config *c = &L->m->cfg;
    for (int r = 0; r < p->n_rows; r++)
        for (int j = 0; j < p->n_logit_pos; j++)
            take_row(L, b, r, p->logit_pos[(size_t)r * p->n_logit_pos + j],
                     b->out_x + ((size_t)r * p->n_logit_pos + j) * c->d_model);
    ms_unembed(p->logits, b->out_x, L->m->unembed, p->n_rows * p->n_logit_pos, c->d_model, c->d_vocab);
}

/* metric_out[r] for rows [lo, hi) from their logits in out_y (not the logit difference) */
typedef struct {
    const ms_layout *L;
    const float *logits;
} metric_job;

static void metric_rows(void *ctx, long long lo, long long hi) {
    const metric_job *j = ctx;
    const ms_plan *p = j->L->plan;
    const ms_metric *mt = &p->metric;
    int V = j->L->m->cfg.d_vocab;
    for (long long r = lo; r < hi; r++) {
        const float *y = j->logits + (size_t)r * V;
        double lz = ms_log_sum_exp(y, V);
        if (mt->kind == MS_METRIC_KL) {
            /* resuming rows share their base row's reference */
            const float *ref = mt->ref_logprob + (size_t)(p->base_row ? p->base_row[r] : r) * V;
            p->metric_out[r] = (float)ms_kl_divergence(ref, y, lz, V);
        } else {
            double lp = (double)y[mt->correct[r]] - lz;
            p->metric_out[r] = (float)(mt->kind == MS_METRIC_PROB ? exp(lp) : lp);
        }
    }
}

static void compute_metric(const ms_layout *L, ms_buffers *b) {
    const ms_plan *p = L->plan;
    const ms_metric *mt = &p->metric;
    const ms_config *c = &L->m->cfg;
    int C = c->d_model, V = c->d_vocab, R = p->n_rows;
    float *x = b->out_x + (size_t)p->n_rows * p->n_logit_pos * C;
    for (int r = 0; r < R; r++) take_row(L, b, r, mt->pos[r], x + (size_t)r * C);
    if (mt->kind == MS_METRIC_LOGIT_DIFF) {
        /* two rows of the unembedding are all a logit difference needs */
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * C;
            const float *uc = L->m->unembed + (size_t)mt->correct[r] * C;
            const float *uw = L->m->unembed + (size_t)mt->wrong[r] * C;
            double d = 0.0;
            for (int i = 0; i < C; i++) d += (double)xr[i] * (uc[i] - uw[i]);
            p->metric_out[r] = (float)d;
        }
        return;
    }
    ms_unembed(b->out_y, x, L->m->unembed, R, C, V);
    metric_job job = {L, b->out_y};
    ms_parallel_for(R, 4, L->n_threads, metric_rows, &job);
}

/* ---- entry points ------------------------------------------------------------------------- */

void ms_state_free(ms_state *s) {
    if (!s) return;
    free(s->row_off);
    free(s->resid);
    free(s->k);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static ms_status record_alloc(ms_state *rec, const ms_layout *L, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    size_t n = (size_t)c->n_layers * L->N * c->d_model + 1;
    memset(rec, 0, sizeof *rec);
    rec->n_layers = c->n_layers;
    rec->d_model = c->d_model;
    rec->n_rows = L->plan->n_rows;
    rec->n_pos = L->plan->n_pos;
    rec->N = L->N;
    rec->row_off = malloc(sizeof(int) * (size_t)(rec->n_rows + 1));
    rec->resid = malloc(sizeof(float) * n);
    rec->k = malloc(sizeof(float) * n);
    rec->v = malloc(sizeof(float) * n);
    if (!rec->row_off || !rec->resid || !rec->k || !rec->v) {
        ms_state_free(rec);
        snprintf(err->message, sizeof err->message, "out of memory recording the base run");
        return MS_ERR_MEMORY;
    }
    memcpy(rec->row_off, L->row_off, sizeof(int) * (size_t)(rec->n_rows + 1));
    return MS_OK;
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
    ms_sizes sizes = plan_sizes(m, plan);
    base = malloc(sizeof(float) * (buffer_floats(c, sizes) + 1));
    if (!base) {
        snprintf(err->message, sizeof err->message, "out of memory allocating the run's activations");
        st = MS_ERR_MEMORY;
        goto done;
    }
    carve_buffers(&b, base, c, sizes);
    if (plan->record && (st = record_alloc(plan->record, &L, err))) goto done;

    set_active(&L, -1);
    embed_tokens(&L, b.tmp_a, b.tmp_b);
    if ((st = ms_visit_tokens(&L, MS_SITE_EMBED, 0, b.tmp_a, c->d_model, err))) goto done;
    if ((st = ms_visit_tokens(&L, MS_SITE_POS_EMBED, 0, b.tmp_b, c->d_model, err))) goto done;
    ms_add(b.resid, b.tmp_a, b.tmp_b, (size_t)L.active_N * c->d_model);
    for (int l = 0; l < c->n_layers; l++)
        if ((st = block_forward(&L, &b, l, err))) goto done;
    L.active_rows = plan->n_rows;
    L.active_N = L.N;
    if ((st = layernorm_sites(&L, &b, m->lnf_w, m->lnf_b, MS_SITE_LNF_SCALE, 0, err))) goto done;
    if (plan->n_logit_pos > 0) compute_logits(&L, &b);
    if (plan->metric.kind != MS_METRIC_NONE) compute_metric(&L, &b);

done:
    if (st && plan->record) ms_state_free(plan->record);
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
