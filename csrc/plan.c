/* plan.c — what one run does at its sites: cache, intervene, call back.
 *
 * Every action names a site (and a layer for per-block sites) and a box of the
 * row's value in the caller's padded layout. The forward driver hands each site's
 * packed value here right after computing it; the actions for that site run in
 * the order the plan lists them. */
#include "run.h"

#include <math.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ms_site_width(const ms_config *c, ms_site s) {
    switch (s) {
    case MS_SITE_LN1_SCALE:
    case MS_SITE_LN2_SCALE:
    case MS_SITE_LN1_POST_SCALE:
    case MS_SITE_LN2_POST_SCALE:
    case MS_SITE_LNF_SCALE:
        return 1;
    case MS_SITE_MLP_PRE:
    case MS_SITE_MLP_PRE_LINEAR:
    case MS_SITE_MLP_POST:
        return c->d_mlp;
    case MS_SITE_EXPERT_WEIGHTS:
        return c->n_experts;
    case MS_SITE_Q:
    case MS_SITE_ROT_Q:
    case MS_SITE_Z:
        return c->n_heads * c->d_head;
    case MS_SITE_K:
    case MS_SITE_V:
    case MS_SITE_ROT_K:
        return c->n_kv_heads * c->d_head;
    case MS_SITE_ATTN_SCORES:
    case MS_SITE_PATTERN:
        return 0;
    default:
        return c->d_model;
    }
}

int ms_site_exists(const ms_config *c, ms_site s) {
    switch (s) {
    case MS_SITE_POS_EMBED:
        return c->rotary_dim == 0;
    case MS_SITE_ROT_Q:
    case MS_SITE_ROT_K:
        return c->rotary_dim > 0;
    case MS_SITE_MLP_PRE_LINEAR:
        return c->gated_mlp && !c->n_experts;
    case MS_SITE_MLP_PRE:
    case MS_SITE_MLP_POST:
        return !c->n_experts;
    case MS_SITE_EXPERT_WEIGHTS:
        return c->n_experts > 0;
    case MS_SITE_RESID_MID:
        return !c->parallel;
    case MS_SITE_LN1_POST_SCALE:
    case MS_SITE_LN1_POST_NORMALIZED:
    case MS_SITE_LN2_POST_SCALE:
    case MS_SITE_LN2_POST_NORMALIZED:
        return c->post_norms;
    default:
        return (int)s >= 0 && s < MS_N_SITES;
    }
}

int ms_site_per_layer(ms_site s) {
    return s != MS_SITE_EMBED && s != MS_SITE_POS_EMBED && s != MS_SITE_LNF_SCALE &&
           s != MS_SITE_LNF_NORMALIZED;
}

int ms_site_is_attention(ms_site s) { return s == MS_SITE_ATTN_SCORES || s == MS_SITE_PATTERN; }

static int action_at(const ms_action *a, ms_site site, int layer) {
    return a->site == site && (!ms_site_per_layer(site) || a->layer == layer);
}

int ms_plan_touches(const ms_plan *p, ms_site site, int layer) {
    for (int i = 0; i < p->n_actions; i++)
        if (action_at(&p->actions[i], site, layer) && p->actions[i].kind != MS_DO_CACHE) return 1;
    return 0;
}

int ms_plan_visits(const ms_plan *p, ms_site site, int layer) {
    for (int i = 0; i < p->n_actions; i++)
        if (action_at(&p->actions[i], site, layer)) return 1;
    return 0;
}

/* ---- checks ------------------------------------------------------------------ */

#define FAIL(...)                                                  \
    do {                                                           \
        snprintf(err->message, sizeof err->message, __VA_ARGS__);  \
        return MS_ERR_VALUE;                                       \
    } while (0)

static ms_status check_indices(const int *idx, int n, int limit, const char *what, int ai,
                               ms_error *err) {
    if (n < 0 || (n > 0 && !idx)) FAIL("action %d: %s index list is missing", ai, what);
    for (int i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= limit)
            FAIL("action %d: %s index %d out of range [0, %d)", ai, what, idx[i], limit);
    return MS_OK;
}

static int is_real(const ms_plan *p, int row, int pos) {
    return !p->mask || p->mask[(size_t)row * p->n_pos + pos];
}

/* a real token that the row computes (resuming rows compute from start_pos on) */
static int is_computed(const ms_plan *p, int row, int pos) {
    return is_real(p, row, pos) && (!p->start_pos || pos >= p->start_pos[row]);
}

/* index of padded position t among row r's real tokens */
static int key_index(const ms_plan *p, int r, int t) {
    if (!p->mask) return t;
    int n = 0;
    for (int u = 0; u < t; u++) n += p->mask[(size_t)r * p->n_pos + u] != 0;
    return n;
}

int ms_plan_row_start(const ms_plan *p, int r) {
    return p->start_layer ? p->start_layer[r] : p->start_resid ? p->start_block : -1;
}

static ms_status check_action(const ms_model *m, const ms_plan *p, int ai, ms_error *err) {
    const ms_action *a = &p->actions[ai];
    const ms_config *c = &m->cfg;
    ms_status st;
    if ((int)a->site < 0 || a->site >= MS_N_SITES) FAIL("action %d: unknown site %d", ai, a->site);
    if ((int)a->kind < 0 || a->kind > MS_DO_PROJECT_ROW) FAIL("action %d: unknown kind %d", ai, a->kind);
    if (!ms_site_exists(c, a->site)) FAIL("action %d: this model's architecture has no site %d", ai, a->site);
    if (ms_site_per_layer(a->site) && (a->layer < 0 || a->layer >= c->n_layers))
        FAIL("action %d: layer %d out of range [0, %d)", ai, a->layer, c->n_layers);
    if (a->row < -1 || a->row >= p->n_rows)
        FAIL("action %d: row %d out of range [0, %d)", ai, a->row, p->n_rows);
    /* a resuming row computes the embedding only if it starts there (-1), and a
     * block only from its start layer on; rows of a base run's sweep may cache what
     * they do not compute (the base's value is read instead), rows given their
     * residual stream may not (nothing would be written) */
    if ((p->start_layer && a->kind != MS_DO_CACHE && a->kind != MS_DO_CALLBACK) || p->start_resid) {
        int layer = ms_site_per_layer(a->site) ? a->layer : (a->site <= MS_SITE_POS_EMBED ? -1 : c->n_layers);
        int copies = a->kind == MS_DO_COPY_ROW || a->kind == MS_DO_PROJECT_ROW;
        for (int r = a->row < 0 ? 0 : a->row; r < (a->row < 0 ? p->n_rows : a->row + 1); r++)
            if (ms_plan_row_start(p, r) > layer || (copies && ms_plan_row_start(p, a->src_row) > layer))
                FAIL("action %d: row %d does not compute layer %d", ai, r, layer);
    }
    if (a->kind == MS_DO_CACHE || a->kind == MS_DO_CALLBACK) {
        if (!a->out) FAIL("action %d: no output buffer", ai);
        if (a->kind == MS_DO_CALLBACK && !p->callback) FAIL("action %d: no callback given", ai);
        return MS_OK;
    }
    if (a->kind == MS_DO_COPY_ROW || a->kind == MS_DO_PROJECT_ROW) {
        if (a->row < 0) FAIL("action %d: a row copy needs a target row", ai);
        if (a->src_row < 0 || a->src_row >= p->n_rows)
            FAIL("action %d: source row %d out of range [0, %d)", ai, a->src_row, p->n_rows);
    } else if (!a->value) {
        FAIL("action %d: no value given", ai);
    }
    if (a->kind == MS_DO_PROJECT && (a->rank < 1 || !a->value2))
        FAIL("action %d: a subspace interchange needs a basis and source values", ai);
    if (a->kind == MS_DO_PROJECT_ROW && (a->rank < 1 || !a->value || ms_site_is_attention(a->site)))
        FAIL("action %d: a subspace interchange needs a basis and a token site", ai);
    /* entries at padding (or, in resuming rows, before the first recomputed position)
     * are left alone: the apply functions skip them */
    if (ms_site_is_attention(a->site)) {
        if ((st = check_indices(a->a, a->n_a, c->n_heads, "head", ai, err))) return st;
        if ((st = check_indices(a->b, a->n_b, p->n_pos, "query position", ai, err))) return st;
        if ((st = check_indices(a->c, a->n_c, p->n_pos, "key position", ai, err))) return st;
    } else {
        if ((st = check_indices(a->a, a->n_a, p->n_pos, "position", ai, err))) return st;
        if ((st = check_indices(a->b, a->n_b, ms_site_width(c, a->site), "column", ai, err))) return st;
    }
    return MS_OK;
}

ms_status ms_plan_check(const ms_model *m, const ms_plan *p, ms_error *err) {
    const ms_config *c = &m->cfg;
    if (p->n_rows < 1 || p->n_pos < 1) FAIL("tokens: need at least one row and one position");
    if (!p->tokens) FAIL("tokens: missing");
    for (int r = 0; r < p->n_rows; r++) {
        int n = 0;
        for (int t = 0; t < p->n_pos; t++) {
            if (!is_real(p, r, t)) continue;
            n++;
            int tok = p->tokens[(size_t)r * p->n_pos + t];
            if (tok < 0 || tok >= c->d_vocab)
                FAIL("tokens: id %d at [%d, %d] out of range [0, %d)", tok, r, t, c->d_vocab);
        }
        if (n == 0) FAIL("attention_mask: row %d has no real token", r);
        if (n > c->n_ctx) FAIL("tokens: row %d has %d tokens, more than n_ctx = %d", r, n, c->n_ctx);
    }
    if (p->n_logit_pos < 0 || (p->n_logit_pos > 0 && (!p->logit_pos || !p->logits)))
        FAIL("logits: positions or output missing");
    for (size_t i = 0; i < (size_t)p->n_rows * p->n_logit_pos; i++)
        if (p->logit_pos[i] < 0 || p->logit_pos[i] >= p->n_pos)
            FAIL("logits: position %d out of range [0, %d)", p->logit_pos[i], p->n_pos);
    if (p->base || p->start_layer || p->start_pos || p->base_row) {
        if (!p->base || !p->start_layer || !p->start_pos || !p->base_row)
            FAIL("base: resuming rows need base, base_row, start_layer and start_pos");
        for (int r = 0; r < p->n_rows; r++) {
            if (p->base_row[r] < 0 || p->base_row[r] >= p->base->n_rows)
                FAIL("base_row: %d out of range [0, %d)", p->base_row[r], p->base->n_rows);
            if (p->start_layer[r] < -1 || p->start_layer[r] >= c->n_layers ||
                (r > 0 && p->start_layer[r] < p->start_layer[r - 1]))
                FAIL("start_layer: must be in [-1, %d) and non-decreasing over rows", c->n_layers);
            if (p->start_pos[r] < 0 || p->start_pos[r] >= p->n_pos || !is_real(p, r, p->start_pos[r]))
                FAIL("start_pos: row %d starts at position %d, which is not a real token", r, p->start_pos[r]);
            /* the row reads its tokens before start_pos from its base row */
            const ms_state *b = p->base;
            int b_tokens = b->n_tokens[p->base_row[r]];
            if (key_index(p, r, p->start_pos[r]) > b_tokens)
                FAIL("start_pos: row %d resumes after %d real tokens, but its base row has %d", r,
                     key_index(p, r, p->start_pos[r]), b_tokens);
            if (p->start_layer[r] >= 0 && !b->resid)
                FAIL("start_layer: the base kept no residual stream (row %d starts at block %d)", r,
                     p->start_layer[r]);
            if (p->record && p->start_layer[r] != -1)
                FAIL("record: a run that records its state computes every block of every row (row %d "
                     "starts at block %d)", r, p->start_layer[r]);
            if (p->record) { /* a resuming run records by appending to its base, in place */
                int n = key_index(p, r, p->n_pos);
                if (p->record != p->base || b->capacity == 0 || p->base_row[r] != r)
                    FAIL("record: a run appends to a state recorded with room for more tokens, row r to "
                         "row r (of its first rows)");
                if (n > b->capacity)
                    FAIL("record: row %d has %d real tokens, more than the %d the state has room for", r, n,
                         b->capacity);
            }
        }
        if (p->base->n_layers != c->n_layers || p->base->d_model != c->d_model ||
            p->base->d_kv != c->n_kv_heads * c->d_head)
            FAIL("base: recorded by a model of another shape");
    }
    if (p->record_capacity < 0 || p->record_capacity > c->n_ctx)
        FAIL("record_capacity: %d out of range [0, %d]", p->record_capacity, c->n_ctx);
    if (p->record_capacity > 0) {
        if (!p->record || p->base)
            FAIL("record_capacity: only for a run that records a new state, from the embedding");
        if ((long long)p->n_rows * p->record_capacity > INT_MAX)
            FAIL("record_capacity: %d rows of %d tokens are too many", p->n_rows, p->record_capacity);
        for (int r = 0; r < p->n_rows; r++)
            if (key_index(p, r, p->n_pos) > p->record_capacity)
                FAIL("record_capacity: row %d has %d real tokens, more than %d", r, key_index(p, r, p->n_pos),
                     p->record_capacity);
    }
    if (p->start_resid) {
        if (p->base || p->start_layer || p->start_pos || p->base_row)
            FAIL("start_resid: rows start either from a base run or from a given residual stream");
        if (p->start_block < 0 || p->start_block >= c->n_layers)
            FAIL("start_block: %d out of range [0, %d)", p->start_block, c->n_layers);
        if (p->record) FAIL("record: a run that starts at a block cannot record its state");
    }
    if (p->metric.kind != MS_METRIC_NONE) {
        if (!p->metric_out || !p->metric.pos) FAIL("metric: positions or output missing");
        for (int r = 0; r < p->n_rows; r++) {
            int pos = p->metric.pos[r];
            if (pos < 0 || pos >= p->n_pos || !is_computed(p, r, pos))
                FAIL("metric: row %d reads position %d, which is padding or not recomputed", r, pos);
            int need_wrong = p->metric.kind == MS_METRIC_LOGIT_DIFF;
            int need_correct = p->metric.kind != MS_METRIC_KL;
            if (need_correct && (!p->metric.correct || p->metric.correct[r] < 0 || p->metric.correct[r] >= c->d_vocab))
                FAIL("metric: answer token of row %d out of range [0, %d)", r, c->d_vocab);
            if (need_wrong && (!p->metric.wrong || p->metric.wrong[r] < 0 || p->metric.wrong[r] >= c->d_vocab))
                FAIL("metric: wrong-answer token of row %d out of range [0, %d)", r, c->d_vocab);
        }
        if (p->metric.kind == MS_METRIC_KL && !p->metric.ref_logprob) FAIL("metric: KL needs reference log-probabilities");
    }
    if (p->n_actions < 0 || (p->n_actions > 0 && !p->actions)) FAIL("actions: missing");
    for (int i = 0; i < p->n_actions; i++) {
        ms_status st = check_action(m, p, i, err);
        if (st) return st;
    }
    return MS_OK;
}

/* ---- token sites -------------------------------------------------------------- */

/* out[R, T, w] <- value (zeros at padding) */
static void gather_tokens(const ms_layout *L, const float *value, int ld, int w, float *out) {
    const ms_plan *p = L->plan;
    for (int r = 0; r < p->n_rows; r++) {
        for (int t = 0; t < p->n_pos; t++) {
            size_t i = (size_t)r * p->n_pos + t;
            int k = r < L->active_rows ? L->packed_of[i] : -1;
            if (k < 0) memset(out + i * w, 0, sizeof(float) * (size_t)w);
            else memcpy(out + i * w, value + (size_t)k * ld, sizeof(float) * (size_t)w);
        }
    }
}

/* value <- out[R, T, w] at the real positions */
static void scatter_tokens(const ms_layout *L, float *value, int ld, int w, const float *out) {
    for (int r = 0; r < L->active_rows; r++) {
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            size_t i = (size_t)r * L->plan->n_pos + L->pos_of[k];
            memcpy(value + (size_t)k * ld, out + i * w, sizeof(float) * (size_t)w);
        }
    }
}

/* Interchange inside a subspace: x[cols] <- x + Q Q^T (s - x), Q: [n, rank] with
 * orthonormal columns; s is dense [n] (s_cols NULL) or s[s_cols[i]] (another row's
 * value, never x itself). Basis vectors are taken one at a time; orthonormality
 * makes that the same as the full projection. */
static void project_interchange(float *x, const float *s, const int *s_cols, const float *Q, int n,
                                int rank, const int *cols) {
    for (int k = 0; k < rank; k++) {
        float coef = 0.0f;
        for (int i = 0; i < n; i++) coef += Q[(size_t)i * rank + k] * (s[s_cols ? s_cols[i] : i] - x[cols[i]]);
        for (int i = 0; i < n; i++) x[cols[i]] += Q[(size_t)i * rank + k] * coef;
    }
}

static void apply_token_action(const ms_layout *L, const ms_action *a, float *value, int ld) {
    const ms_plan *p = L->plan;
    int first = a->row < 0 ? 0 : a->row, last = a->row < 0 ? L->active_rows : a->row + 1;
    for (int r = first; r < last && r < L->active_rows; r++) {
        size_t vr = (size_t)(r - first) * a->n_a * a->n_b; /* this row's block of value */
        for (int ia = 0; ia < a->n_a; ia++) {
            int k = L->packed_of[(size_t)r * p->n_pos + a->a[ia]];
            if (k < 0) continue; /* padding, or not recomputed */
            float *x = value + (size_t)k * ld;
            const float *v = a->value ? a->value + vr + (size_t)ia * a->n_b : NULL;
            switch (a->kind) {
            case MS_DO_SET:
                for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] = v[ib];
                break;
            case MS_DO_ADD:
                for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] += v[ib];
                break;
            case MS_DO_SCALE:
                for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] *= a->value[0];
                break;
            case MS_DO_COPY_ROW: {
                int ks = a->src_row < L->active_rows ? L->packed_of[(size_t)a->src_row * p->n_pos + a->a[ia]] : -1;
                if (ks < 0) break; /* nothing to copy from at the source row's padding */
                const float *src = value + (size_t)ks * ld;
                for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] = src[a->b[ib]];
                break;
            }
            case MS_DO_PROJECT:
                project_interchange(x, a->value2 + vr + (size_t)ia * a->n_b, NULL, a->value, a->n_b,
                                    a->rank, a->b);
                break;
            case MS_DO_PROJECT_ROW: {
                int ks = a->src_row < L->active_rows ? L->packed_of[(size_t)a->src_row * p->n_pos + a->a[ia]] : -1;
                if (ks < 0 || ks == k) break; /* the source row's padding, or the row itself: no change */
                project_interchange(x, value + (size_t)ks * ld, a->b, a->value, a->n_b, a->rank, a->b);
                break;
            }
            default:
                break;
            }
        }
    }
}

ms_status ms_visit_tokens(const ms_layout *L, ms_site site, int layer, float *value, int ld,
                          ms_error *err) {
    const ms_plan *p = L->plan;
    int w = ms_site_width(&L->m->cfg, site);
    for (int i = 0; i < p->n_actions; i++) {
        const ms_action *a = &p->actions[i];
        if (!action_at(a, site, layer)) continue;
        if (a->kind == MS_DO_CACHE) {
            gather_tokens(L, value, ld, w, a->out);
        } else if (a->kind == MS_DO_CALLBACK) {
            gather_tokens(L, value, ld, w, a->out);
            if (p->callback(p->callback_ctx, a->id, site, layer, a->out)) {
                snprintf(err->message, sizeof err->message, "a hook raised an exception");
                return MS_ERR_CALLBACK;
            }
            scatter_tokens(L, value, ld, w, a->out);
        } else {
            apply_token_action(L, a, value, ld);
        }
    }
    return MS_OK;
}

/* ---- attention sites ------------------------------------------------------------ */

/* out[R, H, T, T] <- att; entries not computed: fill (-inf for scores, 0 for the pattern) */
static void gather_attention(const ms_layout *L, const float *att, float *out, float fill) {
    const ms_plan *p = L->plan;
    int H = L->m->cfg.n_heads, T = p->n_pos;
    size_t total = (size_t)p->n_rows * H * T * T;
    for (size_t i = 0; i < total; i++) out[i] = fill;
    for (int r = 0; r < L->active_rows; r++) {
        int nq = L->row_off[r + 1] - L->row_off[r], nk = L->n_real[r];
        const int *qpos = L->pos_of + L->row_off[r];
        for (int h = 0; h < H; h++) {
            const float *src = att + L->att_off[r] + (size_t)h * nq * nk;
            float *dst = out + ((size_t)r * H + h) * T * T;
            for (int i = 0; i < nq; i++)
                for (int j = 0, t = 0; t < T; t++) {
                    if (p->mask && !p->mask[(size_t)r * T + t]) continue;
                    dst[(size_t)qpos[i] * T + t] = src[(size_t)i * nk + j++];
                }
        }
    }
}

/* att <- out at the keys each query sees (the others stay masked) */
static void scatter_attention(const ms_layout *L, int layer, float *att, const float *out) {
    const ms_plan *p = L->plan;
    int H = L->m->cfg.n_heads, T = p->n_pos;
    for (int r = 0; r < L->active_rows; r++) {
        int nq = L->row_off[r + 1] - L->row_off[r], nk = L->n_real[r];
        const int *qpos = L->pos_of + L->row_off[r];
        for (int h = 0; h < H; h++) {
            float *dst = att + L->att_off[r] + (size_t)h * nq * nk;
            const float *src = out + ((size_t)r * H + h) * T * T;
            for (int i = 0; i < nq; i++) {
                int lo = ms_first_key(L->m, layer, L->first[r] + i);
                for (int j = 0, t = 0; t <= qpos[i]; t++) { /* keys after the query stay masked */
                    if (p->mask && !p->mask[(size_t)r * T + t]) continue;
                    if (j >= lo) dst[(size_t)i * nk + j] = src[(size_t)qpos[i] * T + t];
                    j++;
                }
            }
        }
    }
}


static void apply_attention_action(const ms_layout *L, int layer, const ms_action *a, float *att) {
    const ms_plan *p = L->plan;
    int first = a->row < 0 ? 0 : a->row, last = a->row < 0 ? L->active_rows : a->row + 1;
    size_t box = (size_t)a->n_a * a->n_b * a->n_c;
    for (int r = first; r < last && r < L->active_rows; r++) {
        int nq = L->row_off[r + 1] - L->row_off[r], nk = L->n_real[r];
        float *row_att = att + L->att_off[r];
        for (int ib = 0; ib < a->n_b; ib++) {
            int qk = L->packed_of[(size_t)r * p->n_pos + a->b[ib]];
            if (qk < 0) continue; /* padding, or not recomputed */
            int qi = qk - L->row_off[r], lo = ms_first_key(L->m, layer, L->first[r] + qi);
            int s = a->src_row, sq = -1, sq_n = 0, sk_n = 0;
            if (a->kind == MS_DO_COPY_ROW) {
                int sk = s < L->active_rows ? L->packed_of[(size_t)s * p->n_pos + a->b[ib]] : -1;
                if (sk < 0) continue;
                sq = sk - L->row_off[s], sq_n = L->row_off[s + 1] - L->row_off[s], sk_n = L->n_real[s];
            }
            for (int ic = 0; ic < a->n_c; ic++) {
                /* padding, and keys after the query: the causal mask holds */
                if (!is_real(p, r, a->c[ic]) || a->c[ic] > a->b[ib]) continue;
                int kj = key_index(p, r, a->c[ic]);
                if (kj < lo) continue; /* before the query's sliding window: masked too */
                for (int ia = 0; ia < a->n_a; ia++) {
                    float *x = row_att + ((size_t)a->a[ia] * nq + qi) * nk + kj;
                    size_t vi = (size_t)(r - first) * box + ((size_t)ia * a->n_b + ib) * a->n_c + ic;
                    switch (a->kind) {
                    case MS_DO_SET: *x = a->value[vi]; break;
                    case MS_DO_ADD: *x += a->value[vi]; break;
                    case MS_DO_SCALE: *x *= a->value[0]; break;
                    case MS_DO_COPY_ROW:
                        if (!is_real(p, s, a->c[ic])) break;
                        *x = att[L->att_off[s] + ((size_t)a->a[ia] * sq_n + sq) * sk_n + key_index(p, s, a->c[ic])];
                        break;
                    default: break;
                    }
                }
            }
        }
    }
}

ms_status ms_visit_attention(const ms_layout *L, ms_site site, int layer, float *att,
                             ms_error *err) {
    const ms_plan *p = L->plan;
    float fill = site == MS_SITE_ATTN_SCORES ? -INFINITY : 0.0f;
    for (int i = 0; i < p->n_actions; i++) {
        const ms_action *a = &p->actions[i];
        if (!action_at(a, site, layer)) continue;
        if (a->kind == MS_DO_CACHE) {
            gather_attention(L, att, a->out, fill);
        } else if (a->kind == MS_DO_CALLBACK) {
            gather_attention(L, att, a->out, fill);
            if (p->callback(p->callback_ctx, a->id, site, layer, a->out)) {
                snprintf(err->message, sizeof err->message, "a hook raised an exception");
                return MS_ERR_CALLBACK;
            }
            scatter_attention(L, layer, att, a->out);
        } else {
            apply_attention_action(L, layer, a, att);
        }
    }
    return MS_OK;
}
