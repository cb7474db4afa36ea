/* forward.c — the forward driver: walks the blocks and visits every site once.
 *
 * One allocation holds all activations of the run, sized from the plan. Each site's
 * value is computed into its buffer, then handed to the plan (ms_visit_*), which
 * may cache or change it before the next operation reads it. Rows that resume a
 * base run join at their start layer with the base's residual stream, and attend
 * to the base's keys and values at the positions they do not recompute. */
#include "kernels.h"
#include "run.h"
#include "tape.h"
#include "blas.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    float *resid;   /* [N, C]   the residual stream */
    float *ln;      /* [N, C]   a layer norm's output (in a gradient run, maybe the tape's slab) */
    float *ln_home; /* [N, C]   ln's own buffer */
    float *scale;   /* [N]      a layer norm's divisor */
    float *qkv;     /* [N, QW]   q | k | v, QW = (n_heads + 2 n_kv_heads) d_head */
    float *att;     /* [sum over rows of H * n_q * n_k] scores, then pattern (only when visited) */
    float *scratch; /* [n_threads, scratch_floats] each thread's keys of one head, four rows of scores */
    float *z;       /* [N, H*d_head] */
    float *tmp_a;   /* [N, C]   embed, then attn_out */
    float *tmp_b;   /* [N, C]   pos_embed, then mlp_out */
    float *mlp;     /* [N, F] mlp pre, then post; gated: [N, 2F] gate (then post) | up */
    float *route;   /* [N, E] the router's softmax (mixtures of experts; else these four are empty) */
    float *expert_w;/* [N, E] each token's weight of each expert (0: not chosen) */
    float *gather;  /* [N, C] one expert's tokens, then its output */
    float *gate_w;  /* [N]    their weights */
    float *rope;    /* [max_keys, rotary_dim] cos | sin of each position, rotary models (then the
                       local angles' table, models that have them: see ms_block_rope) */
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
           p->metric.kind == MS_METRIC_KL || p->metric.kind == MS_METRIC_ACCURACY;
}

typedef struct {
    size_t N, att, scratch, out_rows, out_full, rope;
} ms_sizes;

/* widths of the packed buffers */
static size_t q_width(const ms_config *c) { return (size_t)c->n_heads * c->d_head; }
static size_t kv_width(const ms_config *c) { return (size_t)c->n_kv_heads * c->d_head; }
static size_t qkv_width(const ms_config *c) { return q_width(c) + 2 * kv_width(c); }
static size_t mlp_width(const ms_config *c) { return (size_t)c->d_mlp * (c->gated_mlp ? 2 : 1); }
/* the MLP's buffer, per token: a shared expert's gate | up may be the widest */
static size_t mlp_buffer_width(const ms_config *c) {
    size_t shared = 2 * (size_t)c->d_shared;
    return shared > mlp_width(c) ? shared : mlp_width(c);
}
/* per token: route, expert_w, gather and gate_w */
static size_t expert_width(const ms_config *c) {
    return c->n_experts ? 2 * (size_t)c->n_experts + (size_t)c->d_model + 1 : 0;
}

/* 1 when some action is at the scores or the pattern, of any layer: the run then
 * stores them */
static int stores_attention(const ms_plan *p) {
    for (int i = 0; i < p->n_actions; i++)
        if (ms_site_is_attention(p->actions[i].site)) return 1;
    return 0;
}

static int run_threads(const ms_plan *p) { return p->n_threads > 0 ? p->n_threads : ms_get_num_threads(); }

/* Blocks the run must compute: all of them when logits, a metric or a recorded
 * state are asked for (or an action is at ln_final); otherwise only up to the
 * deepest block an action is at, so that a run that reads layer 3 of 12 stops
 * there (the early exit of extraction). */
static int blocks_needed(const ms_model *m, const ms_plan *p) {
    int n_layers = m->cfg.n_layers;
    if (p->n_logit_pos > 0 || p->metric.kind != MS_METRIC_NONE || p->record) return n_layers;
    int n = 0;
    for (int i = 0; i < p->n_actions; i++) {
        ms_site site = p->actions[i].site;
        if (site == MS_SITE_LNF_SCALE || site == MS_SITE_LNF_NORMALIZED) return n_layers;
        if (ms_site_per_layer(site) && p->actions[i].layer + 1 > n) n = p->actions[i].layer + 1;
    }
    return n;
}

/* taped: a gradient run's forward (tape.h), which always stores the pattern */
static ms_sizes plan_sizes(const ms_model *m, const ms_plan *p, int taped) {
    ms_sizes s = {0};
    int att = taped || stores_attention(p);
    size_t max_keys = 0;
    for (int r = 0; r < p->n_rows; r++) {
        size_t n = (size_t)real_count(p, r);
        size_t first = p->start_pos ? (size_t)real_index(p, r, p->start_pos[r]) : 0;
        s.N += n - first;
        if (att) s.att += (size_t)m->cfg.n_heads * (n - first) * n;
        if (n > max_keys) max_keys = n;
    }
    size_t padded = (max_keys + 31) / 32 * 32 + 32;
    s.scratch = (size_t)run_threads(p) * ((size_t)m->cfg.d_head + 4) * padded;
    s.rope = m->cfg.rotary_dim ? max_keys * (size_t)m->cfg.rotary_dim * (m->rope_inv_freq_local ? 2 : 1) : 0;
    s.out_rows = (size_t)p->n_rows * p->n_logit_pos;
    if (p->metric.kind != MS_METRIC_NONE) {
        s.out_rows += (size_t)p->n_rows;
        if (metric_needs_logits(p)) s.out_full = (size_t)p->n_rows * m->cfg.d_vocab;
    }
    return s;
}

static size_t buffer_floats(const ms_config *c, ms_sizes s) {
    size_t C = (size_t)c->d_model;
    return s.N * (C * 4 + 1 + qkv_width(c) + q_width(c) + mlp_buffer_width(c) + expert_width(c)) + s.att + s.scratch + s.rope +
           s.out_rows * C + s.out_full;
}

size_t ms_forward_bytes(const ms_model *m, const ms_plan *plan, int taped) {
    ms_sizes s = plan_sizes(m, plan, taped);
    size_t items = (size_t)m->cfg.n_heads * (size_t)plan->n_rows;
    size_t index_bytes = sizeof(int) * ((size_t)plan->n_rows * (6 + plan->n_pos) + s.N + items) +
                         sizeof(size_t) * (plan->n_rows + 1);
    /* a new recorded state holds every real token, or capacity slots per row (keys and
     * values only: record_alloc); a run appending to its base allocates nothing */
    size_t tokens = 0;
    for (int r = 0; plan->record && r < plan->n_rows; r++) tokens += (size_t)real_count(plan, r);
    if (plan->record_capacity > 0) tokens = (size_t)plan->n_rows * plan->record_capacity;
    int resid = plan->record_capacity <= 0;
    size_t record = plan->record && plan->record != plan->base
                        ? sizeof(float) * (size_t)m->cfg.n_layers * tokens *
                              ((resid ? (size_t)m->cfg.d_model : 0) + 2 * kv_width(&m->cfg))
                        : 0;
    return buffer_floats(&m->cfg, s) * sizeof(float) + index_bytes + record;
}

size_t ms_run_workspace_bytes(const ms_model *m, const ms_plan *plan) { return ms_forward_bytes(m, plan, 0); }

void ms_layout_free(ms_layout *L) {
    free(L->row_off);
    free(L->n_real);
    free(L->first);
    free(L->layer0);
    free(L->packed_of);
    free(L->pos_of);
    free(L->att_off);
    free(L->item_off);
    free(L->item_row);
}

/* Build the packed layout; allocates L's index arrays (freed by layout_free). */
ms_status ms_layout_build(ms_layout *L, const ms_model *m, const ms_plan *p, ms_error *err) {
    int R = p->n_rows, T = p->n_pos, H = m->cfg.n_heads;
    L->m = m;
    L->plan = p;
    L->row_off = malloc(sizeof(int) * (size_t)(R + 1));
    L->n_real = malloc(sizeof(int) * (size_t)R);
    L->first = malloc(sizeof(int) * (size_t)R);
    L->layer0 = malloc(sizeof(int) * (size_t)R);
    L->packed_of = malloc(sizeof(int) * (size_t)R * (size_t)T);
    L->att_off = malloc(sizeof(size_t) * (size_t)(R + 1));
    L->item_off = malloc(sizeof(int) * (size_t)(R + 1));
    if (!L->row_off || !L->n_real || !L->first || !L->layer0 || !L->packed_of || !L->att_off ||
        !L->item_off)
        goto oom;
    L->row_off[0] = 0;
    L->att_off[0] = 0;
    L->item_off[0] = 0;
    L->max_keys = 1;
    for (int r = 0; r < R; r++) {
        int n = real_count(p, r);
        int first = p->start_pos ? real_index(p, r, p->start_pos[r]) : 0;
        L->n_real[r] = n;
        L->first[r] = first;
        L->layer0[r] = ms_plan_row_start(p, r);
        L->row_off[r + 1] = L->row_off[r] + (n - first);
        L->att_off[r + 1] = L->att_off[r] + (size_t)H * (n - first) * n;
        L->item_off[r + 1] = L->item_off[r] + H;
        if (n > L->max_keys) L->max_keys = n;
    }
    L->N = L->row_off[R];
    L->max_keys_padded = (L->max_keys + 31) / 32 * 32;
    L->scratch_floats = (size_t)m->cfg.d_head * L->max_keys_padded + 4 * (size_t)L->max_keys;
    L->pos_of = malloc(sizeof(int) * (size_t)L->N + 1);
    L->item_row = malloc(sizeof(int) * (size_t)L->item_off[R] + 1);
    if (!L->pos_of || !L->item_row) goto oom;
    for (int r = 0; r < R; r++)
        for (int k = L->item_off[r]; k < L->item_off[r + 1]; k++) L->item_row[k] = r;
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
    b->ln = b->ln_home = b->resid + n * C;
    b->scale = b->ln + n * C;
    b->qkv = b->scale + n;
    float *att = b->qkv + n * qkv_width(c);
    b->att = s.att ? att : NULL; /* not stored when nothing visits it */
    b->scratch = att + s.att;
    b->z = b->scratch + s.scratch;
    b->tmp_a = b->z + n * q_width(c);
    b->tmp_b = b->tmp_a + n * C;
    b->mlp = b->tmp_b + n * C;
    b->route = b->mlp + n * mlp_buffer_width(c);
    b->expert_w = b->route + (c->n_experts ? n * c->n_experts : 0);
    b->gather = b->expert_w + (c->n_experts ? n * c->n_experts : 0);
    b->gate_w = b->gather + (c->n_experts ? n * C : 0);
    b->rope = b->route + n * expert_width(c);
    b->out_x = b->rope + s.rope;
    b->out_y = b->out_x + s.out_rows * C;
}

/* packed token of the base run for row r's real token j */
static size_t base_token(const ms_layout *L, int r, int j) {
    return (size_t)L->plan->base->row_off[L->plan->base_row[r]] + (size_t)j;
}

/* ---- the walk ---------------------------------------------------------------------- */

/* embed[N, C] = wte[token] * embed_scale; pos_embed[N, C] = wpe[index among the row's
 * real tokens], for the rows that start from the embedding */
static void embed_tokens(const ms_layout *L, float *embed, float *pos_embed) {
    const ms_model *m = L->m;
    const ms_plan *p = L->plan;
    size_t C = (size_t)m->cfg.d_model;
    for (int r = 0; r < L->active_rows; r++) {
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            int tok = p->tokens[(size_t)r * p->n_pos + L->pos_of[k]];
            int pos = L->first[r] + (k - L->row_off[r]);
            if (m->wte_dtype != MS_F32) ms_widen(embed + k * C, m->wte16 + (size_t)tok * C, C, m->wte_dtype);
            else memcpy(embed + k * C, m->wte + (size_t)tok * C, sizeof(float) * C);
            if (m->embed_scale != 1.0f)
                for (size_t i = 0; i < C; i++) embed[k * C + i] *= m->embed_scale;
            if (m->wpe) memcpy(pos_embed + k * C, m->wpe + (size_t)pos * C, sizeof(float) * C);
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

/* Every row starts at this block from the plan's residual stream (start_resid). */
static void load_start_resid(const ms_layout *L, float *resid) {
    const ms_plan *p = L->plan;
    size_t C = (size_t)L->m->cfg.d_model;
    for (int r = 0; r < p->n_rows; r++)
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++)
            memcpy(resid + (size_t)k * C, p->start_resid + ((size_t)r * p->n_pos + L->pos_of[k]) * C,
                   sizeof(float) * C);
}

/* LayerNorm with its two sites: the divisor is visited (and may be changed) before
 * it is applied, as in TransformerLens. RMSNorm's hook_normalized is x / scale, its
 * weight applied after the visit (TransformerLens's RMSNorm). */
static ms_status layernorm_sites(const ms_layout *L, ms_buffers *b, const float *in, const float *w,
                                 const float *bias, ms_site scale_site, int layer, float *save_scale,
                                 float *save_ln, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    int N = L->active_N, C = c->d_model;
    ms_status st;
    if (!w) { /* no norm (OLMo 2's inputs): the products read the stream itself, no sites */
        b->ln = (float *)in;
        return MS_OK;
    }
    /* A gradient run keeps the divisor and hook_normalized as they were used: a
     * LayerNorm's output is computed in the tape's slab, which then needs no copy (an
     * RMSNorm's weight is applied after it is kept, so that output is copied). */
    int in_tape = save_ln && c->norm != MS_NORM_RMS;
    b->ln = in_tape ? save_ln : b->ln_home;
    ms_layernorm(b->ln, b->scale, in, w, bias, N, C, c->ln_eps, c->norm, L->n_threads);
    if (ms_plan_touches(L->plan, scale_site, layer)) {
        if ((st = ms_visit_tokens(L, scale_site, layer, b->scale, 1, err))) return st;
        /* recompute the normalized value from the (possibly changed) divisor */
        ms_layernorm_apply(b->ln, b->scale, in, w, bias, N, C, c->norm);
    } else if ((st = ms_visit_tokens(L, scale_site, layer, b->scale, 1, err))) {
        return st;
    }
    if ((st = ms_visit_tokens(L, scale_site + 1, layer, b->ln, C, err))) return st;
    if (save_scale) memcpy(save_scale, b->scale, sizeof(float) * (size_t)N);
    if (save_ln && !in_tape) ms_copy(save_ln, b->ln, (size_t)N * C, L->n_threads);
    if (c->norm == MS_NORM_RMS) ms_norm_weight(b->ln, w, bias, N, C);
    return MS_OK;
}

/* ---- attention ------------------------------------------------------------------- */

/* Where the keys (or values) of row r and head h are: the base run's for the row's
 * first `n_base` real tokens (resuming rows), then the row's own, in qkv. A base with
 * a capacity holds its keys transposed (base_transposed: dimension c of key j at
 * base[c * ld_base + j]). */
typedef struct {
    const float *base, *own;
    int ld_base, ld_own, n_base, base_transposed;
} kv_source;

/* which: 1 keys, 2 values; g: the key/value head */
static kv_source row_kv(const ms_layout *L, const ms_buffers *b, int r, int layer, int g, int which) {
    const ms_config *c = &L->m->cfg;
    size_t QW = qkv_width(c), KW = kv_width(c), dh = (size_t)c->d_head;
    kv_source src = {0};
    src.own = b->qkv + (size_t)L->row_off[r] * QW + q_width(c) + (size_t)(which - 1) * KW + (size_t)g * dh;
    src.ld_own = (int)QW;
    src.n_base = L->first[r];
    if (src.n_base > 0) {
        const ms_state *st = L->plan->base;
        const float *all = which == 1 ? st->k : st->v;
        src.base = all + ((size_t)layer * st->N + base_token(L, r, 0)) * KW + (size_t)g * dh;
        src.ld_base = (int)KW;
        if (which == 1 && st->capacity > 0) { /* the row's [KW, capacity] block, head g's rows */
            src.base = all + ((size_t)layer * st->N + base_token(L, r, 0)) * KW + (size_t)g * dh * st->capacity;
            src.ld_base = st->capacity;
            src.base_transposed = 1;
        }
    }
    return src;
}

/* kt[c, j] = key j, dimension c, for keys j < n */
static void keys_transposed(float *kt, int ldkt, kv_source k, int n, int d) {
    int nb = n < k.n_base ? n : k.n_base;
    if (nb > 0 && k.base_transposed)
        for (int c = 0; c < d; c++) memcpy(kt + (size_t)c * ldkt, k.base + (size_t)c * k.ld_base, sizeof(float) * nb);
    else if (nb > 0)
        ms_transpose_keys(kt, ldkt, k.base, k.ld_base, nb, d);
    if (n > nb) ms_transpose_keys(kt + nb, ldkt, k.own, k.ld_own, n - nb, d);
}

/* z[d] += sum over keys lo <= j < hi of p[j] * value j */
static void mix_range(float *z, const float *p, kv_source v, int lo, int hi, int d) {
    if (lo >= hi) return;
    if (lo < v.n_base) {
        int end = hi < v.n_base ? hi : v.n_base;
        ms_mix_values(z, p + lo, v.base + (size_t)lo * v.ld_base, v.ld_base, end - lo, d);
        lo = end;
    }
    if (lo < hi) ms_mix_values(z, p + lo, v.own + (size_t)(lo - v.n_base) * v.ld_own, v.ld_own, hi - lo, d);
}

/* z[d] = sum over keys lo <= j < hi of p[j] * value j, for four queries at once: rows
 * of z (stride ldz) and of p (stride ldp) */
static void mix4(float *z, int ldz, const float *p, int ldp, kv_source v, int lo, int hi, int d) {
    for (int i = 0; i < 4; i++) memset(z + (size_t)i * ldz, 0, sizeof(float) * (size_t)d);
    int nb = hi < v.n_base ? hi : v.n_base;
    if (lo < nb) ms_mix_values4(z, ldz, p + lo, ldp, v.base + (size_t)lo * v.ld_base, v.ld_base, nb - lo, d);
    int own = lo > v.n_base ? lo : v.n_base;
    if (own < hi)
        ms_mix_values4(z, ldz, p + own, ldp, v.own + (size_t)(own - v.n_base) * v.ld_own, v.ld_own, hi - own, d);
}

/* z of g <= 4 consecutive queries, query k seeing keys [lo[k], hi[k]) (both ends grow
 * with k): the keys all of them see go through the four-query kernel, the others
 * one query at a time. A key a query does not see never enters its arithmetic
 * (0 * an inf or NaN value would be NaN). */
static void mix_group(float *z, int ldz, const float *p, int ldp, kv_source v, const int *lo, const int *hi,
                      int g, int d) {
    int a = 0, b = 0; /* the keys all four see */
    if (g == 4 && lo[3] < hi[0]) {
        a = lo[3], b = hi[0];
        mix4(z, ldz, p, ldp, v, a, b, d);
    } else {
        for (int k = 0; k < g; k++) memset(z + (size_t)k * ldz, 0, sizeof(float) * (size_t)d);
    }
    for (int k = 0; k < g; k++) {
        float *zk = z + (size_t)k * ldz;
        const float *pk = p + (size_t)k * ldp;
        if (a < b) {
            mix_range(zk, pk, v, lo[k], a, d);
            mix_range(zk, pk, v, b, hi[k], d);
        } else {
            mix_range(zk, pk, v, lo[k], hi[k], d);
        }
    }
}

/* Phases of the attention of one layer. When no action visits the scores or the
 * pattern, each query goes from scores to z in one go (ALL), and the pattern is
 * kept only for a gradient run's tape (ALL_KEPT, written straight into it);
 * otherwise the scores and the pattern are stored for the visits, between phases. */
enum { PHASE_ALL, PHASE_ALL_KEPT, PHASE_SCORES, PHASE_SOFTMAX, PHASE_MIX };

typedef struct {
    const ms_layout *L;
    ms_buffers *b;
    int layer, phase, n_slots, n_items;
    float scale;
    float *att; /* the scores / pattern of the phases that store them (b->att, or the tape's) */
    float *capped; /* PHASE_ALL_KEPT with soft-capped scores: the tape's, laid out as att */
} attention_job;

/* One work item: one head of one row, its queries taken four at a time (so that
 * each key and value loaded serves four queries); its keys transposed once. */
static void attention_item(const attention_job *j, int item, float *scratch) {
    const ms_layout *L = j->L;
    const ms_config *c = &L->m->cfg;
    int QW = (int)qkv_width(c), ZW = (int)q_width(c), d = c->d_head;
    int r = L->item_row[item], h = item - L->item_off[r];
    int g = h / (c->n_heads / c->n_kv_heads); /* the head's key/value head */
    int nq = L->row_off[r + 1] - L->row_off[r];
    int nk = L->n_real[r], q0 = L->first[r]; /* query i is the row's real token q0 + i */
    const float *q = j->b->qkv + (size_t)L->row_off[r] * QW + (size_t)h * d;
    float *z = j->b->z + (size_t)L->row_off[r] * ZW + (size_t)h * d;
    float *slab = j->att ? j->att + L->att_off[r] + (size_t)h * nq * nk : NULL;
    /* kt: [d, ldkt], keys padded to a multiple of 32 for ms_query_scores4; s: four rows of nk */
    int ldkt = (nk + 31) / 32 * 32;
    float *kt = scratch, *s = scratch + (size_t)d * L->max_keys_padded;
    kv_source keys = row_kv(L, j->b, r, j->layer, g, 1), values = row_kv(L, j->b, r, j->layer, g, 2);
    int all = j->phase == PHASE_ALL || j->phase == PHASE_ALL_KEPT;
    if (all || j->phase == PHASE_SCORES) {
        keys_transposed(kt, ldkt, keys, nk, d);
        for (int dim = 0; dim < d; dim++) /* the padding: zeros, so that it stays harmless */
            for (int x = nk; x < ldkt; x++) kt[(size_t)dim * ldkt + x] = 0.0f;
    }
    for (int i = 0; i < nq; i += 4) {
        int n4 = nq - i < 4 ? nq - i : 4;
        int seen = q0 + i + n4 < nk ? q0 + i + n4 : nk; /* keys the group's last query sees */
        /* keys before the group's first query's window are not scored; from a multiple
         * of 32, as the four-query kernel reads keys in blocks of 32 */
        int from = ms_first_key(L->m, j->layer, q0 + i) / 32 * 32;
        int lo[4] = {0}, hi[4] = {0}; /* the keys query k sees: [lo[k], hi[k]) */
        for (int k = 0; k < n4; k++) {
            lo[k] = ms_first_key(L->m, j->layer, q0 + i + k);
            hi[k] = q0 + i + k + 1 < nk ? q0 + i + k + 1 : nk;
        }
        const float *qi = q + (size_t)i * QW;
        float *zi = z + (size_t)i * ZW;
        float *rows = j->phase == PHASE_ALL ? s : slab + (size_t)i * nk;
        if (all || j->phase == PHASE_SCORES) {
            if (n4 == 4) ms_query_scores4(rows + from, nk, qi, QW, kt + from, ldkt, seen - from, d, j->scale);
            else
                for (int k = 0; k < n4; k++)
                    ms_query_scores(rows + (size_t)k * nk + from, qi + (size_t)k * QW, kt + from, ldkt, seen - from,
                                    d, j->scale);
        }
        float cap = L->m->attn_softcap;
        for (int k = 0; k < n4; k++) {
            int a = lo[k], b = hi[k];
            float *row = rows + (size_t)k * nk;
            if (cap > 0.0f && (all || j->phase == PHASE_SCORES)) { /* Gemma 2: before the mask */
                for (int x = a; x < b; x++) row[x] = ms_softcap(row[x], cap);
                if (j->capped) memcpy(j->capped + (row - j->att) + a, row + a, sizeof(float) * (size_t)(b - a));
            }
            if (j->phase == PHASE_SCORES) {
                for (int x = 0; x < a; x++) row[x] = -INFINITY;
                for (int x = b; x < nk; x++) row[x] = -INFINITY;
            } else if (j->phase == PHASE_SOFTMAX || j->phase == PHASE_ALL_KEPT) {
                ms_softmax(row + a, b - a);
                for (int x = 0; x < a; x++) row[x] = 0.0f;
                for (int x = b; x < nk; x++) row[x] = 0.0f;
            } else if (j->phase == PHASE_ALL) {
                ms_softmax(row + a, b - a);
            }
        }
        if (all || j->phase == PHASE_MIX) mix_group(zi, ZW, rows, nk, values, lo, hi, n4, d);
    }
}

/* slots [lo, hi): slot t takes items t, t + n_slots, ... (interleaved, so that
 * long and short rows, late and early query blocks are shared out evenly) */
static void attention_slots(void *ctx, long long lo, long long hi) {
    const attention_job *j = ctx;
    for (long long t = lo; t < hi; t++) {
        float *scratch = j->b->scratch + (size_t)t * j->L->scratch_floats;
        for (long long item = t; item < j->n_items && !ms_interrupted(); item += j->n_slots)
            attention_item(j, (int)item, scratch);
    }
}

static void attention_phase(attention_job *job, int phase) {
    const ms_layout *L = job->L;
    job->phase = phase;
    job->n_items = L->item_off[L->active_rows];
    /* threads only when each gets enough work to outweigh starting it */
    double work = 0.0;
    for (int r = 0; r < L->active_rows; r++)
        work += (double)(L->row_off[r + 1] - L->row_off[r]) * L->n_real[r];
    work *= (double)L->m->cfg.d_model;
    int slots = (int)(work / (1 << 18)) + 1;
    if (slots > L->n_threads) slots = L->n_threads;
    if (slots > job->n_items) slots = job->n_items > 0 ? job->n_items : 1;
    job->n_slots = slots;
    ms_parallel_for(slots, 1, L->n_threads, attention_slots, job);
}

/* scores -> visit -> softmax -> visit -> z, for every active row */
static ms_status attention_sites(const ms_layout *L, ms_buffers *b, int layer, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    attention_job job = {L, b, layer, 0, 0, 0, 1.0f, b->att, NULL};
    if (L->m->attn_scale > 0.0f) job.scale = L->m->attn_scale;
    else if (c->scale_attn_weights) job.scale /= sqrtf((float)c->d_head);
    if (c->scale_attn_by_inverse_layer) job.scale /= (float)(layer + 1);
    ms_status st;
    ms_tape *tape = L->tape;
    if (ms_plan_visits(L->plan, MS_SITE_ATTN_SCORES, layer) || ms_plan_visits(L->plan, MS_SITE_PATTERN, layer)) {
        attention_phase(&job, PHASE_SCORES);
        if (tape && tape->capped) /* the capped scores before the site's actions */
            ms_copy(tape->capped + (size_t)layer * tape->att, b->att, tape->att, L->n_threads);
        if ((st = ms_visit_attention(L, MS_SITE_ATTN_SCORES, layer, b->att, err))) return st;
        attention_phase(&job, PHASE_SOFTMAX);
        if (tape) ms_copy(tape->pattern + (size_t)layer * tape->att, b->att, tape->att, L->n_threads);
        if ((st = ms_visit_attention(L, MS_SITE_PATTERN, layer, b->att, err))) return st;
        if (tape && tape->pattern_used)
            ms_copy(tape->pattern_used + (size_t)layer * tape->att, b->att, tape->att, L->n_threads);
        attention_phase(&job, PHASE_MIX);
    } else if (tape) {
        job.att = tape->pattern + (size_t)layer * tape->att;
        if (tape->capped) job.capped = tape->capped + (size_t)layer * tape->att;
        attention_phase(&job, PHASE_ALL_KEPT);
        if (tape->pattern_used) ms_copy(tape->pattern_used + (size_t)layer * tape->att, job.att, tape->att, L->n_threads);
    } else {
        attention_phase(&job, PHASE_ALL);
    }
    return ms_visit_tokens(L, MS_SITE_Z, layer, b->z, (int)q_width(c), err);
}

/* Layer slab dst_layer [rec->N, width] of the recorded state: the tokens each row
 * computed (src [L->N, width], row stride ld) in the row's slots, after the `first`
 * slots a row appending to its base already holds. */
static void record_state(const ms_layout *L, const float *src, int ld, float *dst_layer, size_t width) {
    const ms_state *rec = L->plan->record;
    for (int r = 0; r < L->plan->n_rows; r++) {
        float *dst = dst_layer + (size_t)rec->row_off[r] * width;
        size_t first = (size_t)L->first[r];
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++)
            memcpy(dst + (first + (size_t)(k - L->row_off[r])) * width, src + (size_t)k * ld, sizeof(float) * width);
    }
}

/* The keys of a state with a capacity: each row's block [width, capacity] of layer
 * slab dst_layer gets the computed keys (src [L->N, width], row stride ld) in the
 * row's slots, transposed (the slots before are the base's, when appending). */
static void record_keys_transposed(const ms_layout *L, const float *src, int ld, float *dst_layer, size_t width) {
    const ms_state *rec = L->plan->record;
    size_t cap = (size_t)rec->capacity;
    for (int r = 0; r < L->plan->n_rows; r++) {
        float *block = dst_layer + (size_t)rec->row_off[r] * width;
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            size_t slot = (size_t)L->first[r] + (size_t)(k - L->row_off[r]);
            for (size_t e = 0; e < width; e++) block[e * cap + slot] = src[(size_t)k * ld + e];
        }
    }
}

/* rope[t, :] = cos | sin of the angles of position t (t < n): HF's half-split
 * tables, angle_i = t * inv_freq_i in float as HF computes them */
static void angle_table(float *rope, const float *inv_freq, float scale, int half, int n) {
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            float angle = (float)t * inv_freq[i];
            rope[(size_t)t * 2 * half + i] = (float)cos((double)angle) * scale;
            rope[(size_t)t * 2 * half + half + i] = (float)sin((double)angle) * scale;
        }
}

/* the model's table, then (models with local angles) the local one: [2][n, rotary_dim] */
static void rope_table(float *rope, const ms_model *m, int n) {
    int half = m->cfg.rotary_dim / 2;
    angle_table(rope, m->rope_inv_freq, m->rope_scale, half, n);
    if (m->rope_inv_freq_local)
        angle_table(rope + (size_t)n * m->cfg.rotary_dim, m->rope_inv_freq_local, 1.0f, half, n);
}

const float *ms_block_rope(const float *rope, const ms_model *m, int layer, int n) {
    return m->blocks[layer].rope_local ? rope + (size_t)n * m->cfg.rotary_dim : rope;
}

/* x[N, heads of d] (row stride ld) rotated in place, token k at its position
 * among its row's real tokens */
static void rotate(const ms_layout *L, const float *rope, float *x, int ld, int heads) {
    const ms_config *c = &L->m->cfg;
    for (int r = 0; r < L->active_rows; r++)
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            int pos = L->first[r] + (k - L->row_off[r]);
            for (int h = 0; h < heads; h++)
                ms_rotary(x + (size_t)k * ld + (size_t)h * c->d_head, rope + (size_t)pos * c->rotary_dim,
                          c->rotary_dim, c->rotary_interleaved);
        }
}

/* a gradient run keeps the active rows of src [N, width] (contiguous) in layer l's
 * slab [L->N, width] of a tape array */
static void tape_copy(const ms_layout *L, float *dst, int l, const float *src, size_t width) {
    ms_copy(dst + (size_t)l * L->N * width, src, (size_t)L->active_N * width, L->n_threads);
}

/* q | k | v of the active rows: one product when the three matrices are column
 * blocks of one (GPT-2's c_attn, or a fused copy), else three */
static int fused(const ms_linear_weight *a, const ms_linear_weight *b, size_t a_out) {
    size_t step = a->trans ? a_out * (size_t)a->ld : a_out;
    int biases = (!a->b && !b->b) || (a->b && b->b && b->b == a->b + a_out);
    int next = a->dtype == MS_F32 ? b->w == a->w + step : b->w16 == a->w16 + step;
    return a->trans == b->trans && a->ld == b->ld && a->dtype == b->dtype && next && biases;
}

static void qkv_forward(const ms_layout *L, ms_buffers *b, const ms_block *w, int N) {
    const ms_config *c = &L->m->cfg;
    int C = c->d_model, QD = (int)q_width(c), KD = (int)kv_width(c), QW = (int)qkv_width(c);
    if (fused(&w->q, &w->k, (size_t)QD) && fused(&w->k, &w->v, (size_t)KD)) {
        ms_linear(b->qkv, QW, b->ln, C, &w->q, N, C, QW, L->n_threads);
        return;
    }
    ms_linear(b->qkv, QW, b->ln, C, &w->q, N, C, QD, L->n_threads);
    ms_linear(b->qkv + QD, QW, b->ln, C, &w->k, N, C, KD, L->n_threads);
    ms_linear(b->qkv + QD + KD, QW, b->ln, C, &w->v, N, C, KD, L->n_threads);
}

/* A block's output out[N, C] (the attention's or the MLP's) and its site; with
 * post_norms (Gemma 2), first its own RMSNorm, in place, with that norm's two sites.
 * A gradient run keeps the norm's input, divisor and hook_normalized. */
static ms_status output_sites(const ms_layout *L, ms_buffers *b, float *out, int l, int mlp, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    if (c->post_norms) {
        const ms_block *w = &L->m->blocks[l];
        ms_tape *t = L->tape;
        size_t at = (size_t)l * L->N, C = (size_t)c->d_model, NC = (size_t)L->active_N * C;
        if (t) ms_copy((mlp ? t->mlp_raw : t->attn_raw) + at * C, out, NC, L->n_threads);
        ms_status st = layernorm_sites(L, b, out, mlp ? w->ln2_post_w : w->ln1_post_w, NULL,
                                       mlp ? MS_SITE_LN2_POST_SCALE : MS_SITE_LN1_POST_SCALE, l,
                                       t ? (mlp ? t->ln2_post_scale : t->ln1_post_scale) + at : NULL,
                                       t ? (mlp ? t->ln2_post : t->ln1_post) + at * C : NULL, err);
        if (st) return st;
        ms_copy(out, b->ln, NC, L->n_threads);
    }
    return ms_visit_tokens(L, mlp ? MS_SITE_MLP_OUT : MS_SITE_ATTN_OUT, l, out, c->d_model, err);
}

/* expert e's part of a stacked expert matrix: `offset` numbers further on */
static ms_linear_weight expert_part(const ms_linear_weight *w, size_t offset) {
    ms_linear_weight x = *w;
    if (x.w) x.w += offset;
    if (x.w16) x.w16 += offset;
    return x;
}

/* A shared expert on every row of ln, added to tmp_b (Qwen2-MoE):
 *   tmp_b[t] += sigmoid(ln[t] . shared_router) * down(act(ln[t] gate) * (ln[t] up))
 * gate | up in b->mlp, the output in b->gather, the gate's logits in b->gate_w (the
 * experts' loop is done with them). */
static void shared_expert(const ms_layout *L, ms_buffers *b, const ms_block *w, int N) {
    const ms_config *c = &L->m->cfg;
    int C = c->d_model, S = c->d_shared;
    ms_linear(b->mlp, 2 * S, b->ln, C, &w->shared_gate, N, C, S, L->n_threads);
    ms_linear(b->mlp + S, 2 * S, b->ln, C, &w->shared_in, N, C, S, L->n_threads);
    ms_gated_activation(b->mlp, 2 * S, b->mlp, 2 * S, N, S, c->activation, L->n_threads);
    ms_linear(b->gather, C, b->mlp, 2 * S, &w->shared_out, N, S, C, L->n_threads);
    ms_linear(b->gate_w, 1, b->ln, C, &w->shared_router, N, C, 1, L->n_threads);
    for (int t = 0; t < N; t++) {
        float s = 1.0f / (1.0f + expf(-b->gate_w[t]));
        float *out = b->tmp_b + (size_t)t * C;
        const float *y = b->gather + (size_t)t * C;
        for (int j = 0; j < C; j++) out[j] += s * y[j];
    }
}

/* A mixture of experts on ln's rows (Mixtral's sparse MLP), into tmp_b:
 *   route[N, E] = softmax(ln @ router)                        (hook_expert_weights)
 *   expert_w[t] = route[t] at the token's k most probable experts (renormalised over
 *                 them if expert_renormalize), 0 elsewhere
 *   tmp_b[t] = sum over those experts e of expert_w[t, e] * expert_e(ln[t])
 * each expert a gated MLP run on its own tokens only, the experts in order (as
 * HuggingFace adds them up); then the shared expert's part, if any (shared_expert). */
static ms_status moe_sites(const ms_layout *L, ms_buffers *b, const ms_block *w, int l, int N,
                           ms_error *err) {
    const ms_config *c = &L->m->cfg;
    int C = c->d_model, F = c->d_mlp, E = c->n_experts, K = c->experts_per_token;
    ms_status st;
    ms_linear(b->route, E, b->ln, C, &w->router, N, C, E, L->n_threads);
    for (int t = 0; t < N; t++) ms_softmax(b->route + (size_t)t * E, E);
    if (L->tape) tape_copy(L, L->tape->route_raw, l, b->route, (size_t)E);
    if ((st = ms_visit_tokens(L, MS_SITE_EXPERT_WEIGHTS, l, b->route, E, err))) return st;
    if (L->tape) tape_copy(L, L->tape->route, l, b->route, (size_t)E);
    for (int t = 0; t < N; t++)
        ms_expert_weights(b->expert_w + (size_t)t * E, b->route + (size_t)t * E, E, K, c->expert_renormalize);
    ms_zero(b->tmp_b, (size_t)N * C, L->n_threads);
    for (int e = 0; e < E; e++) {
        int n = 0;
        for (int t = 0; t < N; t++) {
            float wt = b->expert_w[(size_t)t * E + e];
            if (wt == 0.0f) continue;
            memcpy(b->gather + (size_t)n * C, b->ln + (size_t)t * C, sizeof(float) * C);
            b->gate_w[n++] = wt;
        }
        if (!n) continue;
        ms_linear_weight gate = expert_part(&w->mlp_gate, (size_t)e * w->expert_in_stride);
        ms_linear_weight up = expert_part(&w->mlp_in, (size_t)e * w->expert_in_stride);
        ms_linear_weight down = expert_part(&w->mlp_out, (size_t)e * w->expert_out_stride);
        if (fused(&gate, &up, (size_t)F)) {
            ms_linear(b->mlp, 2 * F, b->gather, C, &gate, n, C, 2 * F, L->n_threads);
        } else {
            ms_linear(b->mlp, 2 * F, b->gather, C, &gate, n, C, F, L->n_threads);
            ms_linear(b->mlp + F, 2 * F, b->gather, C, &up, n, C, F, L->n_threads);
        }
        ms_gated_activation(b->mlp, 2 * F, b->mlp, 2 * F, n, F, c->activation, L->n_threads);
        ms_linear(b->gather, C, b->mlp, 2 * F, &down, n, F, C, L->n_threads);
        /* the same tokens in the same order: row i of gather is the i-th routed token */
        for (int t = 0, i = 0; t < N; t++) {
            if (b->expert_w[(size_t)t * E + e] == 0.0f) continue;
            float *out = b->tmp_b + (size_t)t * C;
            const float *y = b->gather + (size_t)i * C;
            float wt = b->gate_w[i++];
            for (int j = 0; j < C; j++) out[j] += y[j] * wt;
        }
    }
    if (c->d_shared) shared_expert(L, b, w, N);
    return output_sites(L, b, b->tmp_b, l, 1, err);
}

/* the MLP on ln's rows, from hook_pre to hook_mlp_out (in tmp_b) */
static ms_status mlp_sites(const ms_layout *L, ms_buffers *b, const ms_block *w, int l, int N,
                           ms_error *err) {
    const ms_config *c = &L->m->cfg;
    int C = c->d_model, F = c->d_mlp, MW = (int)mlp_width(c);
    ms_status st;
    if (c->n_experts) return moe_sites(L, b, w, l, N, err);
    /* A gradient run with every row computes hook_pre (gated: gate | up) in the tape's
     * slab and the activation from it into hook_post's slab, which then need no copy;
     * any other run computes both in b->mlp, hook_post over hook_pre. */
    int in_tape = L->tape && N == L->N;
    size_t at = (size_t)l * L->N;
    float *pre = in_tape ? L->tape->mlp_pre + at * MW : b->mlp;
    float *post = in_tape ? L->tape->mlp_post + at * F : b->mlp;
    int ld_post = in_tape ? F : MW;
    if (c->gated_mlp) {
        if (fused(&w->mlp_gate, &w->mlp_in, (size_t)F)) {
            ms_linear(pre, MW, b->ln, C, &w->mlp_gate, N, C, 2 * F, L->n_threads);
        } else {
            ms_linear(pre, MW, b->ln, C, &w->mlp_gate, N, C, F, L->n_threads);
            ms_linear(pre + F, MW, b->ln, C, &w->mlp_in, N, C, F, L->n_threads);
        }
        if ((st = ms_visit_tokens(L, MS_SITE_MLP_PRE, l, pre, MW, err))) return st;
        if ((st = ms_visit_tokens(L, MS_SITE_MLP_PRE_LINEAR, l, pre + F, MW, err))) return st;
        if (L->tape && !in_tape) tape_copy(L, L->tape->mlp_pre, l, pre, (size_t)MW);
        ms_gated_activation(post, ld_post, pre, MW, N, F, c->activation, L->n_threads);
    } else { /* MW == F */
        ms_linear(pre, F, b->ln, C, &w->mlp_in, N, C, F, L->n_threads);
        if ((st = ms_visit_tokens(L, MS_SITE_MLP_PRE, l, pre, F, err))) return st;
        if (L->tape && !in_tape) tape_copy(L, L->tape->mlp_pre, l, pre, (size_t)F);
        ms_activate(post, pre, (size_t)N * F, c->activation, L->n_threads);
    }
    if ((st = ms_visit_tokens(L, MS_SITE_MLP_POST, l, post, ld_post, err))) return st;
    if (L->tape && !in_tape) /* hook_post: the first F columns of rows of MW */
        ms_copy_rows(L->tape->mlp_post + at * F, F, post, ld_post, N, F, L->n_threads);
    ms_linear(b->tmp_b, C, post, ld_post, &w->mlp_out, N, F, C, L->n_threads);
    return output_sites(L, b, b->tmp_b, l, 1, err);
}

static ms_status block_forward(ms_layout *L, ms_buffers *b, int l, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    const ms_block *w = &L->m->blocks[l];
    ms_state *rec = L->plan->record;
    ms_tape *tape = L->tape;
    size_t at = (size_t)l * L->N; /* this layer's first token in the tape's slabs */
    int C = c->d_model, QD = (int)q_width(c), KD = (int)kv_width(c), QW = (int)qkv_width(c);
    ms_status st;

    set_active(L, l);
    int N = L->active_N;
    size_t NC = (size_t)N * C;
    /* A gradient run (every row in every layer): q|k|v, z, the residual stream and
     * the MLP's activations (mlp_sites) are computed in the tape's slabs of this
     * layer, which then need no copy. The values the tape keeps are the same: each
     * slab holds its site after the last change to it. The residual stream moves
     * from slab to slab: hook_resid_pre here, hook_resid_mid in its slab,
     * hook_resid_post in the next layer's hook_resid_pre (after the last layer, the
     * input of ln_final). */
    int in_tape = tape && N == L->N;
    float *resid_mid = b->resid, *resid_post = b->resid; /* not in the tape: in place */
    if (in_tape) {
        b->qkv = tape->qkv + at * QW;
        b->z = tape->z + at * QD;
        float *pre = tape->resid_pre + at * C;
        if (b->resid != pre) { /* the first layer in the tape: the stream comes from elsewhere */
            int loaded = L->plan->start_resid && l == L->plan->start_block; /* load_start_resid fills it */
            if (!loaded) ms_copy(pre, b->resid, NC, L->n_threads);
            b->resid = pre;
        }
        if (!c->parallel) resid_mid = tape->resid_mid + at * C;
        resid_post = l + 1 < c->n_layers ? tape->resid_pre + (at + L->N) * C : tape->resid_final;
    }
    if (L->plan->base) join_rows(L, b->resid, l);
    else if (L->plan->start_resid && l == L->plan->start_block) load_start_resid(L, b->resid);
    if ((st = ms_visit_tokens(L, MS_SITE_RESID_PRE, l, b->resid, C, err))) return st;
    if (rec && rec->resid)
        record_state(L, b->resid, C, rec->resid + (size_t)l * rec->N * C, (size_t)C);
    if (tape && !in_tape) tape_copy(L, tape->resid_pre, l, b->resid, (size_t)C);
    if ((st = layernorm_sites(L, b, b->resid, w->ln1_w, w->ln1_b, MS_SITE_LN1_SCALE, l, tape ? tape->ln1_scale + at : NULL,
                              tape ? tape->ln1 + at * C : NULL, err)))
        return st;
    qkv_forward(L, b, w, N);
    if ((st = ms_visit_tokens(L, MS_SITE_Q, l, b->qkv, QW, err))) return st;
    if ((st = ms_visit_tokens(L, MS_SITE_K, l, b->qkv + QD, QW, err))) return st;
    if ((st = ms_visit_tokens(L, MS_SITE_V, l, b->qkv + QD + KD, QW, err))) return st;
    if (c->qk_norm) { /* the tape keeps q | k before it for the backward pass */
        if (tape)
            ms_copy_rows(tape->qk_pre + at * (size_t)(QD + KD), QD + KD, b->qkv, QW, N, QD + KD, L->n_threads);
        int whole = c->qk_norm == 2; /* OLMo 2: one norm over all heads */
        ms_head_rmsnorm(b->qkv, QW, N, whole ? 1 : c->n_heads, whole ? QD : c->d_head, w->q_norm_w, c->ln_eps,
                        L->n_threads);
        ms_head_rmsnorm(b->qkv + QD, QW, N, whole ? 1 : c->n_kv_heads, whole ? KD : c->d_head, w->k_norm_w,
                        c->ln_eps, L->n_threads);
    }
    if (c->rotary_dim) {
        const float *rope = ms_block_rope(b->rope, L->m, l, L->max_keys);
        rotate(L, rope, b->qkv, QW, c->n_heads);
        rotate(L, rope, b->qkv + QD, QW, c->n_kv_heads);
        if ((st = ms_visit_tokens(L, MS_SITE_ROT_Q, l, b->qkv, QW, err))) return st;
        if ((st = ms_visit_tokens(L, MS_SITE_ROT_K, l, b->qkv + QD, QW, err))) return st;
    }
    if (rec) {
        size_t off = (size_t)l * rec->N * KD;
        if (rec->capacity > 0) record_keys_transposed(L, b->qkv + QD, QW, rec->k + off, (size_t)KD);
        else record_state(L, b->qkv + QD, QW, rec->k + off, (size_t)KD);
        record_state(L, b->qkv + QD + KD, QW, rec->v + off, (size_t)KD);
    }
    if (tape && !in_tape) tape_copy(L, tape->qkv, l, b->qkv, (size_t)QW);
    if ((st = attention_sites(L, b, l, err))) return st;
    if (tape && !in_tape) tape_copy(L, tape->z, l, b->z, (size_t)QD);
    ms_linear(b->tmp_a, C, b->z, QD, &w->o, N, QD, C, L->n_threads);
    if ((st = output_sites(L, b, b->tmp_a, l, 0, err))) return st;
    if (c->parallel) {
        /* attention and MLP both read resid_pre; their outputs are added together */
        if ((st = layernorm_sites(L, b, b->resid, w->ln2_w, w->ln2_b, MS_SITE_LN2_SCALE, l,
                                  tape ? tape->ln2_scale + at : NULL, tape ? tape->ln2 + at * C : NULL, err)))
            return st;
        if ((st = mlp_sites(L, b, w, l, N, err))) return st;
        ms_add(resid_post, b->resid, b->tmp_a, NC, L->n_threads);
        b->resid = resid_post;
        ms_add(b->resid, b->resid, b->tmp_b, NC, L->n_threads);
        return ms_visit_tokens(L, MS_SITE_RESID_POST, l, b->resid, C, err);
    }
    ms_add(resid_mid, b->resid, b->tmp_a, NC, L->n_threads);
    b->resid = resid_mid;
    if ((st = ms_visit_tokens(L, MS_SITE_RESID_MID, l, b->resid, C, err))) return st;
    if (tape && !in_tape) tape_copy(L, tape->resid_mid, l, b->resid, (size_t)C);
    if ((st = layernorm_sites(L, b, b->resid, w->ln2_w, w->ln2_b, MS_SITE_LN2_SCALE, l, tape ? tape->ln2_scale + at : NULL,
                              tape ? tape->ln2 + at * C : NULL, err)))
        return st;
    if ((st = mlp_sites(L, b, w, l, N, err))) return st;
    ms_add(resid_post, b->resid, b->tmp_b, NC, L->n_threads);
    b->resid = resid_post;
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

/* out[M, V] = x[M, C] @ unembed^T (+ unembed_b), the unembedding float32 or 2-byte */
static void unembed(const ms_layout *L, float *out, const float *x, int M) {
    const ms_model *m = L->m;
    int C = m->cfg.d_model, V = m->cfg.d_vocab;
    ms_linear_weight u = {m->unembed, m->unembed_b, C, 1, m->unembed_dtype, m->unembed16};
    ms_linear(out, V, x, C, &u, M, C, V, L->n_threads);
    if (m->logit_softcap > 0.0f) ms_softcap_all(out, (size_t)M * V, m->logit_softcap, L->n_threads);
}

/* unembed[row, i] as a float */
static float unembed_at(const ms_model *m, size_t row, int i) {
    size_t at = row * (size_t)m->cfg.d_model + (size_t)i;
    return m->unembed_dtype == MS_F32 ? m->unembed[at] : ms_half_to_float(m->unembed16[at], m->unembed_dtype);
}

/* logits[r, j] = ln_final(x at row r, position logit_pos[r, j]) @ unembed^T */
static void compute_logits(const ms_layout *L, ms_buffers *b) {
    const ms_plan *p = L->plan;
    const ms_config *c = &L->m->cfg;
    for (int r = 0; r < p->n_rows; r++)
        for (int j = 0; j < p->n_logit_pos; j++)
            take_row(L, b, r, p->logit_pos[(size_t)r * p->n_logit_pos + j],
                     b->out_x + ((size_t)r * p->n_logit_pos + j) * c->d_model);
    unembed(L, p->logits, b->out_x, p->n_rows * p->n_logit_pos);
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
        if (mt->kind == MS_METRIC_ACCURACY) {
            int top = 0;  /* the first of the largest logits, as numpy.argmax */
            for (int v = 1; v < V; v++)
                if (y[v] > y[top]) top = v;
            p->metric_out[r] = top == mt->correct[r] ? 1.0f : 0.0f;
            continue;
        }
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
    int C = c->d_model, R = p->n_rows;
    float *x = b->out_x + (size_t)p->n_rows * p->n_logit_pos * C;
    for (int r = 0; r < R; r++) take_row(L, b, r, mt->pos[r], x + (size_t)r * C);
    if (mt->kind == MS_METRIC_LOGIT_DIFF) {
        /* two rows of the unembedding are all a logit difference needs */
        float cap = L->m->logit_softcap;
        const float *ub = L->m->unembed_b;
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * C;
            /* the biases' difference (0 without them) */
            double d = ub ? (double)ub[mt->correct[r]] - (double)ub[mt->wrong[r]] : 0.0;
            if (cap > 0.0f) { /* the two logits capped apart */
                double lc = ub ? ub[mt->correct[r]] : 0.0, lw = ub ? ub[mt->wrong[r]] : 0.0;
                for (int i = 0; i < C; i++) {
                    lc += (double)xr[i] * unembed_at(L->m, (size_t)mt->correct[r], i);
                    lw += (double)xr[i] * unembed_at(L->m, (size_t)mt->wrong[r], i);
                }
                d = (double)ms_softcap((float)lc, cap) - (double)ms_softcap((float)lw, cap);
            } else if (L->m->unembed_dtype == MS_F32) {
                const float *uc = L->m->unembed + (size_t)mt->correct[r] * C;
                const float *uw = L->m->unembed + (size_t)mt->wrong[r] * C;
                for (int i = 0; i < C; i++) d += (double)xr[i] * (uc[i] - uw[i]);
            } else {
                for (int i = 0; i < C; i++)
                    d += (double)xr[i] * (unembed_at(L->m, (size_t)mt->correct[r], i) -
                                          unembed_at(L->m, (size_t)mt->wrong[r], i));
            }
            p->metric_out[r] = (float)d;
        }
        return;
    }
    unembed(L, b->out_y, x, R);
    metric_job job = {L, b->out_y};
    ms_parallel_for(R, 4, L->n_threads, metric_rows, &job);
}

/* ---- working memory ------------------------------------------------------------------ */

struct ms_workspace {
    pthread_mutex_t lock;
    float *buf;
    size_t floats;
    int busy;
};

ms_workspace *ms_workspace_new(void) {
    ms_workspace *w = calloc(1, sizeof *w);
    if (w && pthread_mutex_init(&w->lock, NULL) != 0) {
        free(w);
        return NULL;
    }
    return w;
}

void ms_workspace_free(ms_workspace *w) {
    if (!w) return;
    pthread_mutex_destroy(&w->lock);
    free(w->buf);
    free(w);
}

/* A buffer of at least n floats: the kept one if it is free and not more than twice
 * too big, else a new one (a kept buffer that does not fit is freed first, so that
 * the two never add up). */
float *ms_workspace_take(ms_workspace *w, size_t n) {
    float *buf = NULL, *drop = NULL;
    if (w) {
        pthread_mutex_lock(&w->lock);
        if (!w->busy && w->buf) {
            if (w->floats >= n && w->floats / 2 <= n) {
                buf = w->buf;
                w->busy = 1;
            } else {
                drop = w->buf;
                w->buf = NULL;
                w->floats = 0;
            }
        }
        pthread_mutex_unlock(&w->lock);
        free(drop);
        if (buf) return buf;
    }
    return malloc(sizeof(float) * n);
}

/* Give the buffer back: it becomes the kept one unless another run holds that. */
void ms_workspace_give(ms_workspace *w, float *buf, size_t n) {
    if (!w) {
        free(buf);
        return;
    }
    float *drop = buf;
    pthread_mutex_lock(&w->lock);
    if (buf == w->buf) {
        w->busy = 0;
        drop = NULL;
    } else if (!w->busy) {
        drop = w->buf;
        w->buf = buf;
        w->floats = n;
    }
    pthread_mutex_unlock(&w->lock);
    free(drop);
}

/* ---- entry points ------------------------------------------------------------------------- */

void ms_state_free(ms_state *s) {
    if (!s) return;
    free(s->row_off);
    free(s->n_tokens);
    free(s->resid);
    free(s->k);
    free(s->v);
    memset(s, 0, sizeof *s);
}

/* The state a run records: every real token of every row, in row order. With
 * record_capacity, every row gets that many slots instead, and keeps only keys and
 * values: later runs append to them in place (generation: each step adds one token
 * per row, without copying the state) and compute every block of their new tokens,
 * so they never read a residual stream. */
static ms_status record_alloc(ms_state *rec, const ms_layout *L, ms_error *err) {
    const ms_config *c = &L->m->cfg;
    int R = L->plan->n_rows, cap = L->plan->record_capacity;
    size_t tokens = 0;
    for (int r = 0; r < R; r++) tokens += (size_t)L->n_real[r];
    if (cap > 0) tokens = (size_t)R * cap; /* the check made sure every row fits */
    int with_resid = cap <= 0;
    size_t n = with_resid ? (size_t)c->n_layers * tokens * c->d_model + 1 : 0;
    size_t nkv = (size_t)c->n_layers * tokens * kv_width(c) + 1;
    memset(rec, 0, sizeof *rec);
    rec->n_layers = c->n_layers;
    rec->d_model = c->d_model;
    rec->d_kv = (int)kv_width(c);
    rec->n_rows = L->plan->n_rows;
    rec->n_pos = L->plan->n_pos;
    rec->N = (int)tokens;
    rec->capacity = cap > 0 ? cap : 0;
    rec->row_off = malloc(sizeof(int) * (size_t)(rec->n_rows + 1));
    rec->n_tokens = malloc(sizeof(int) * (size_t)rec->n_rows + 1);
    rec->resid = with_resid ? malloc(sizeof(float) * n) : NULL;
    rec->k = malloc(sizeof(float) * nkv);
    rec->v = malloc(sizeof(float) * nkv);
    if (!rec->row_off || !rec->n_tokens || (with_resid && !rec->resid) || !rec->k || !rec->v) {
        ms_state_free(rec);
        snprintf(err->message, sizeof err->message, "out of memory recording the base run");
        return MS_ERR_MEMORY;
    }
    rec->row_off[0] = 0;
    for (int r = 0; r < R; r++) {
        rec->row_off[r + 1] = rec->row_off[r] + (cap > 0 ? cap : L->n_real[r]);
        rec->n_tokens[r] = L->n_real[r];
    }
    return MS_OK;
}

/* MS_ERR_INTERRUPTED once the run's interrupt flag is set: buffers written after
 * it may be incomplete, so nothing computed since is used */
static ms_status check_stop(ms_error *err) {
    if (!ms_interrupted()) return MS_OK;
    snprintf(err->message, sizeof err->message, "interrupted");
    return MS_ERR_INTERRUPTED;
}

/* The forward pass of a plan over a built layout; with a tape (L->tape), every
 * block is computed and the values the backward pass needs are kept in it. */
ms_status ms_forward_layout(const ms_model *m, const ms_plan *plan, ms_layout *L, ms_error *err) {
    const ms_config *c = &m->cfg;
    ms_tape *tape = L->tape;
    float *base = NULL;
    size_t floats = 0;
    ms_buffers b;
    ms_status st = MS_OK;
    ms_sizes sizes = plan_sizes(m, plan, tape != NULL);
    floats = buffer_floats(c, sizes) + 1;
    base = ms_workspace_take(m->workspace, floats);
    if (!base) {
        snprintf(err->message, sizeof err->message, "out of memory allocating the run's activations");
        return MS_ERR_MEMORY;
    }
    carve_buffers(&b, base, c, sizes);
    /* a run appending to its base (record == base) writes into the base's slots */
    int appends = plan->record && plan->record == plan->base;
    if (plan->record && !appends && (st = record_alloc(plan->record, L, err))) goto done;

    if (c->rotary_dim) rope_table(b.rope, m, L->max_keys);
    /* rows given their residual stream at a block compute nothing before it */
    int first_block = plan->start_resid ? plan->start_block : 0;
    if (!plan->start_resid) {
        set_active(L, -1);
        embed_tokens(L, b.tmp_a, b.tmp_b);
        if ((st = ms_visit_tokens(L, MS_SITE_EMBED, 0, b.tmp_a, c->d_model, err))) goto done;
        if (m->wpe) {
            if ((st = ms_visit_tokens(L, MS_SITE_POS_EMBED, 0, b.tmp_b, c->d_model, err))) goto done;
            ms_add(b.resid, b.tmp_a, b.tmp_b, (size_t)L->active_N * c->d_model, L->n_threads);
        } else {
            memcpy(b.resid, b.tmp_a, sizeof(float) * (size_t)L->active_N * c->d_model);
        }
    }
    int n_blocks = tape ? L->tape_blocks : blocks_needed(m, plan);
    for (int l = first_block; l < n_blocks; l++)
        if ((st = block_forward(L, &b, l, err)) || (st = check_stop(err))) goto done;
    if (n_blocks < c->n_layers) goto done; /* nothing after this block is asked for */
    L->active_rows = plan->n_rows;
    L->active_N = L->N;
    if (tape && b.resid != tape->resid_final) /* the last layer was not computed in the tape */
        memcpy(tape->resid_final, b.resid, sizeof(float) * (size_t)L->N * c->d_model);
    if ((st = layernorm_sites(L, &b, b.resid, m->lnf_w, m->lnf_b, MS_SITE_LNF_SCALE, 0, tape ? tape->lnf_scale : NULL,
                              tape ? tape->lnf : NULL, err)))
        goto done;
    if (plan->n_logit_pos > 0) compute_logits(L, &b);
    if (plan->metric.kind != MS_METRIC_NONE) compute_metric(L, &b);
    st = check_stop(err);
    /* the appended tokens count once the run is complete: an interrupted one leaves
     * the counts as they were, having written only beyond them (or, in a row that
     * recomputes tokens it had, those tokens again) */
    if (!st && appends)
        for (int r = 0; r < plan->n_rows; r++) plan->record->n_tokens[r] = L->n_real[r];

done:
    if (st && plan->record && !appends) ms_state_free(plan->record);
    ms_workspace_give(m->workspace, base, floats);
    return st;
}

ms_status ms_run(const ms_model *m, const ms_plan *plan, ms_error *err) {
    ms_status st = ms_plan_check(m, plan, err);
    if (st) return st;
    const volatile int *outer_stop = ms_stop_flag_swap(plan->stop);
    ms_layout L = {0};
    L.n_threads = run_threads(plan);
    if (!(st = ms_layout_build(&L, m, plan, err))) st = ms_forward_layout(m, plan, &L, err);
    ms_stop_flag_swap(outer_stop);
    ms_layout_free(&L);
    return st;
}

void ms_rope_table(float *rope, const ms_model *m, int n) { rope_table(rope, m, n); }

/* The BLAS always runs single-threaded: products are cut into panels that
 * mechscope's own threads share (kernels.c says why). The default thread count is
 * the one the BLAS picked for this machine when it loaded. */
static int g_threads = 0;
static pthread_once_t threads_once = PTHREAD_ONCE_INIT;

static void threads_init(void) {
    g_threads = ms_blas_get_threads();
    if (g_threads < 1) g_threads = 1;
    ms_blas_set_threads(1);
}

void ms_set_num_threads(int n) {
    pthread_once(&threads_once, threads_init);
    g_threads = n < 1 ? 1 : n;
}

int ms_get_num_threads(void) {
    pthread_once(&threads_once, threads_init);
    return g_threads;
}

const char *ms_blas_config(void) { return ms_blas_get_config(); }
const char *ms_blas_corename(void) { return ms_blas_get_corename(); }
