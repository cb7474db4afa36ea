/* backward.c — the backward driver: a taped forward pass, then the blocks in reverse.
 *
 * The forward pass is forward.c's, over the same layout and plan (so every action of
 * the plan is applied as in ms_run), keeping in a tape (tape.h) the values the
 * backward reads. The backward then walks the same block description in reverse:
 * at each site it first stores the gradient if the caller asked for it (the
 * gradient with respect to the value after the site's actions), then takes the
 * site's actions back in reverse order (a written value is a constant, so its
 * gradient stops there; ADD passes it on; SCALE multiplies; a subspace interchange
 * passes (I - Q Q^T) g). One allocation holds the tape and the backward's buffers. */
#include "kernels.h"
#include "kernels_backward.h"
#include "run.h"
#include "tape.h"
#include "blas.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(...)                                                  \
    do {                                                           \
        snprintf(err->message, sizeof err->message, __VA_ARGS__);  \
        return MS_ERR_VALUE;                                       \
    } while (0)

static size_t q_width(const ms_config *c) { return (size_t)c->n_heads * c->d_head; }
static size_t kv_width(const ms_config *c) { return (size_t)c->n_kv_heads * c->d_head; }
static size_t qkv_width(const ms_config *c) { return q_width(c) + 2 * kv_width(c); }
static size_t mlp_width(const ms_config *c) { return (size_t)c->d_mlp * (c->gated_mlp ? 2 : 1); }
/* the MLP's buffers per token: hidden activations (dpost, moe_dh) and gate | up (dpre),
 * of the MLP, an expert, or a shared expert (the widest) */
static size_t hidden_width(const ms_config *c) {
    return c->d_shared > c->d_mlp ? (size_t)c->d_shared : (size_t)c->d_mlp;
}
static size_t pre_width(const ms_config *c) {
    size_t shared = 2 * (size_t)c->d_shared;
    return shared > mlp_width(c) ? shared : mlp_width(c);
}

/* rows of logits the metric's head computes at once: its buffer is at most 256 MB,
 * enough rows for the unembedding's gradient (a product over them) to run near full
 * speed, and (up to 1024 rows) few passes over that gradient */
static int head_chunk(const ms_config *c) {
    int n = (1 << 26) / (c->d_vocab > 0 ? c->d_vocab : 1);
    return n < 16 ? 16 : (n > 1024 ? 1024 : n);
}

typedef struct {
    size_t N, att, max_keys;
    int any_pattern_action;
    int capped, logit_softcap; /* the model soft-caps its scores, its logits */
} grad_sizes;

/* per token and layer: the MLP's taped activations (hook_pre and hook_post), or a
 * mixture of experts' routing before and after its actions (its experts' activations
 * are recomputed in the backward pass) */
static size_t mlp_tape_width(const ms_config *c) {
    return c->n_experts ? 2 * (size_t)c->n_experts : mlp_width(c) + (size_t)c->d_mlp;
}

/* per token: a mixture of experts' buffers in the backward pass (see moe_block_backward) */
static size_t moe_width(const ms_config *c) {
    return c->n_experts ? 3 * (size_t)c->d_model + hidden_width(c) + 2 * (size_t)c->n_experts : 0;
}

static size_t tape_floats(const ms_config *c, grad_sizes s) {
    size_t N = s.N, C = (size_t)c->d_model, Lr = (size_t)c->n_layers;
    size_t qk_pre = c->qk_norm ? q_width(c) + kv_width(c) : 0;
    size_t post_norms = c->post_norms ? 4 * C + 2 : 0;
    size_t per_layer = N * (4 * C + 2 + qkv_width(c) + q_width(c) + mlp_tape_width(c) + qk_pre + post_norms) +
                       s.att * ((s.any_pattern_action ? 2 : 1) + (s.capped ? 1 : 0));
    return Lr * per_layer + N * (2 * C + 1);
}

static size_t backward_floats(const ms_config *c, grad_sizes s) {
    size_t N = s.N, C = (size_t)c->d_model, ch = (size_t)head_chunk(c);
    return N * (6 * C + qkv_width(c) + q_width(c) + hidden_width(c) + pre_width(c) + 1 + 2 + moe_width(c)) + s.att +
           s.max_keys * (size_t)c->rotary_dim * 2 + ch * (2 * C + (size_t)c->d_vocab * (s.logit_softcap ? 2 : 1)) + 64;
}

static int any_action(const ms_plan *p, ms_site site) {
    for (int i = 0; i < p->n_actions; i++)
        if (p->actions[i].site == site && p->actions[i].kind != MS_DO_CACHE) return 1;
    return 0;
}

static grad_sizes sizes_of(const ms_model *m, const ms_plan *p) {
    grad_sizes s = {0};
    for (int r = 0; r < p->n_rows; r++) {
        size_t n = 0;
        for (int t = 0; t < p->n_pos; t++) n += !p->mask || p->mask[(size_t)r * p->n_pos + t];
        s.N += n;
        s.att += (size_t)m->cfg.n_heads * n * n;
        if (n > s.max_keys) s.max_keys = n;
    }
    s.any_pattern_action = any_action(p, MS_SITE_PATTERN);
    s.capped = m->attn_softcap > 0.0f;
    s.logit_softcap = m->logit_softcap > 0.0f;
    return s;
}

size_t ms_grad_workspace_bytes(const ms_model *m, const ms_plan *plan, const ms_grad_plan *g) {
    (void)g;
    grad_sizes s = sizes_of(m, plan);
    return ms_forward_bytes(m, plan, 1) + sizeof(float) * (tape_floats(&m->cfg, s) + backward_floats(&m->cfg, s));
}

/* ---- the state of one backward pass ------------------------------------------------ */

typedef struct {
    const ms_model *m;
    const ms_plan *plan;
    const ms_grad_plan *g;
    ms_layout *L;
    ms_tape *t;
    int n_threads, N;
    float *dres;   /* [N, C] gradient of the residual stream */
    float *dout;   /* [N, C] of a block's attention or MLP output when an action changes it; of an embedding */
    float *dln;    /* [N, C] of a norm's output (the next matrix's input) */
    float *xhat;   /* [N, C] a LayerNorm's normalized input; a matrix's input */
    float *tmp;    /* [N, C] */
    float *dpar;   /* [N, C] parallel blocks: the gradient from ln2 waiting for ln1's */
    float *dqkv;   /* [N, QW] */
    float *dz;     /* [N, QD] */
    float *dpost;  /* [N, F] (or a shared expert's [N, d_shared]) */
    float *dpre;   /* [N, MW] (or a shared expert's [N, 2 d_shared]) */
    float *dscale; /* [N] */
    /* mixtures of experts: one expert's tokens' inputs, their weighted output gradients,
     * their outputs (then input gradients), the gradient of the hidden activations;
     * every token's routing weights and their gradients */
    float *moe_x, *moe_dy, *moe_o, *moe_dh, *moe_w, *moe_dw;
    float *datt;   /* [att] one layer's attention gradients */
    float *rope;   /* [max_keys, rotary_dim] */
    float *head_x, *head_y, *head_dx; /* [chunk, C], [chunk, V], [chunk, C] */
    float *head_t;  /* [chunk, V] soft-capped logits: tanh(logit / cap) (logit_softcap only) */
    int *pairs;    /* [2 N] cross-entropy: packed token, target */
} bwd;

/* ---- sites: store the gradient, take the actions back --------------------------------- */

static int at_site(ms_site a_site, int a_layer, ms_site site, int layer) {
    return a_site == site && (!ms_site_per_layer(site) || a_layer == layer);
}

/* g [N, w] (row stride ld) -> out [R, T, w], zeros where nothing is computed */
static void store_tokens(const bwd *b, const float *g, int ld, int w, float *out) {
    const ms_plan *p = b->plan;
    for (size_t i = 0; i < (size_t)p->n_rows * p->n_pos; i++) {
        int k = b->L->packed_of[i];
        if (k < 0) memset(out + i * w, 0, sizeof(float) * (size_t)w);
        else memcpy(out + i * w, g + (size_t)k * ld, sizeof(float) * (size_t)w);
    }
}

/* x[cols] <- the transpose of project_interchange's map applied to x (its steps in
 * reverse, each x <- (I - q q^T) x) */
static void project_back(float *x, const float *Q, int n, int rank, const int *cols) {
    for (int k = rank - 1; k >= 0; k--) {
        float coef = 0.0f;
        for (int i = 0; i < n; i++) coef += Q[(size_t)i * rank + k] * x[cols[i]];
        for (int i = 0; i < n; i++) x[cols[i]] -= Q[(size_t)i * rank + k] * coef;
    }
}

static void undo_token_action(const bwd *b, const ms_action *a, float *g, int ld) {
    const ms_layout *L = b->L;
    const ms_plan *p = b->plan;
    int first = a->row < 0 ? 0 : a->row, last = a->row < 0 ? p->n_rows : a->row + 1;
    for (int r = first; r < last; r++) {
        for (int ia = 0; ia < a->n_a; ia++) {
            int k = L->packed_of[(size_t)r * p->n_pos + a->a[ia]];
            if (k < 0) continue;
            float *x = g + (size_t)k * ld;
            int ks = -1;
            if (a->kind == MS_DO_COPY_ROW || a->kind == MS_DO_PROJECT_ROW)
                ks = L->packed_of[(size_t)a->src_row * p->n_pos + a->a[ia]];
            switch (a->kind) {
            case MS_DO_SET:
                for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] = 0.0f;
                break;
            case MS_DO_SCALE:
                for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] *= a->value[0];
                break;
            case MS_DO_COPY_ROW:
                if (ks >= 0)
                    for (int ib = 0; ib < a->n_b; ib++) x[a->b[ib]] = 0.0f;
                break;
            case MS_DO_PROJECT:
                project_back(x, a->value, a->n_b, a->rank, a->b);
                break;
            case MS_DO_PROJECT_ROW:
                if (ks >= 0 && ks != k) project_back(x, a->value, a->n_b, a->rank, a->b);
                break;
            default: /* ADD: the identity */
                break;
            }
        }
    }
}


/* g [N, w] (row stride ld) += a seed's value [R, T, w] at the computed tokens */
static void add_seed(const bwd *b, const float *value, int w, float *g, int ld) {
    const ms_plan *p = b->plan;
    for (size_t i = 0; i < (size_t)p->n_rows * p->n_pos; i++) {
        int k = b->L->packed_of[i];
        if (k < 0) continue;
        float *x = g + (size_t)k * ld;
        const float *v = value + i * w;
        for (int j = 0; j < w; j++) x[j] += v[j];
    }
}

static int seeded(const bwd *b, ms_site site, int layer) {
    for (int i = 0; i < b->g->n_seeds; i++)
        if (at_site(b->g->seeds[i].site, b->g->seeds[i].layer, site, layer)) return 1;
    return 0;
}

/* whether the gradient at (site, layer) is read (a gradient site) or changed (a seed
 * or an action there, which token_site adds or takes back) */
static int touched(const bwd *b, ms_site site, int layer) {
    for (int i = 0; i < b->g->n_sites; i++)
        if (at_site(b->g->sites[i].site, b->g->sites[i].layer, site, layer)) return 1;
    return seeded(b, site, layer) || ms_plan_touches(b->plan, site, layer);
}

/* At a token site: add the seeds' read-outs of it to g (they read the value after the
 * site's actions), store g if asked for, then take the site's actions back. */
static void token_site(const bwd *b, ms_site site, int layer, float *g, int ld) {
    int w = ms_site_width(&b->m->cfg, site);
    for (int i = 0; i < b->g->n_seeds; i++) {
        const ms_grad_seed *s = &b->g->seeds[i];
        if (at_site(s->site, s->layer, site, layer)) add_seed(b, s->value, w, g, ld);
    }
    for (int i = 0; i < b->g->n_sites; i++) {
        const ms_grad_site *s = &b->g->sites[i];
        if (at_site(s->site, s->layer, site, layer)) store_tokens(b, g, ld, w, s->out);
    }
    for (int i = b->plan->n_actions - 1; i >= 0; i--) {
        const ms_action *a = &b->plan->actions[i];
        if (a->kind != MS_DO_CACHE && at_site(a->site, a->layer, site, layer)) undo_token_action(b, a, g, ld);
    }
}

static int is_real(const ms_plan *p, int r, int t) { return !p->mask || p->mask[(size_t)r * p->n_pos + t]; }

static int key_index(const ms_plan *p, int r, int t) {
    int n = 0;
    for (int u = 0; u < t; u++) n += is_real(p, r, u);
    return n;
}

/* datt -> out [R, H, T, T], zeros where nothing is computed */
static void store_attention(const bwd *b, const float *datt, float *out) {
    const ms_layout *L = b->L;
    const ms_plan *p = b->plan;
    int H = b->m->cfg.n_heads, T = p->n_pos;
    memset(out, 0, sizeof(float) * (size_t)p->n_rows * H * T * T);
    for (int r = 0; r < p->n_rows; r++) {
        int n = L->n_real[r];
        const int *pos = L->pos_of + L->row_off[r];
        for (int h = 0; h < H; h++) {
            const float *src = datt + L->att_off[r] + (size_t)h * n * n;
            float *dst = out + ((size_t)r * H + h) * T * T;
            for (int i = 0; i < n; i++)
                for (int j = 0; j < n; j++) dst[(size_t)pos[i] * T + pos[j]] = src[(size_t)i * n + j];
        }
    }
}

static void undo_attention_action(const bwd *b, const ms_action *a, float *datt) {
    const ms_layout *L = b->L;
    const ms_plan *p = b->plan;
    int first = a->row < 0 ? 0 : a->row, last = a->row < 0 ? p->n_rows : a->row + 1;
    for (int r = first; r < last; r++) {
        int n = L->n_real[r];
        for (int ib = 0; ib < a->n_b; ib++) {
            int qk = L->packed_of[(size_t)r * p->n_pos + a->b[ib]];
            if (qk < 0) continue;
            int qi = qk - L->row_off[r];
            if (a->kind == MS_DO_COPY_ROW && L->packed_of[(size_t)a->src_row * p->n_pos + a->b[ib]] < 0) continue;
            for (int ic = 0; ic < a->n_c; ic++) {
                if (!is_real(p, r, a->c[ic]) || a->c[ic] > a->b[ib]) continue;
                if (a->kind == MS_DO_COPY_ROW && !is_real(p, a->src_row, a->c[ic])) continue;
                int kj = key_index(p, r, a->c[ic]);
                for (int ia = 0; ia < a->n_a; ia++) {
                    float *x = datt + L->att_off[r] + ((size_t)a->a[ia] * n + qi) * n + kj;
                    if (a->kind == MS_DO_SET || a->kind == MS_DO_COPY_ROW) *x = 0.0f;
                    else if (a->kind == MS_DO_SCALE) *x *= a->value[0];
                }
            }
        }
    }
}

/* whether attention_site would do anything at this site and layer */
static int attention_site_touched(const bwd *b, ms_site site, int layer) {
    for (int i = 0; i < b->g->n_sites; i++)
        if (at_site(b->g->sites[i].site, b->g->sites[i].layer, site, layer)) return 1;
    for (int i = 0; i < b->plan->n_actions; i++) {
        const ms_action *a = &b->plan->actions[i];
        if (a->kind != MS_DO_CACHE && at_site(a->site, a->layer, site, layer)) return 1;
    }
    return 0;
}

static void attention_site(const bwd *b, ms_site site, int layer, float *datt) {
    for (int i = 0; i < b->g->n_sites; i++) {
        const ms_grad_site *s = &b->g->sites[i];
        if (at_site(s->site, s->layer, site, layer)) store_attention(b, datt, s->out);
    }
    for (int i = b->plan->n_actions - 1; i >= 0; i--) {
        const ms_action *a = &b->plan->actions[i];
        if (a->kind != MS_DO_CACHE && at_site(a->site, a->layer, site, layer)) undo_attention_action(b, a, datt);
    }
}

/* ---- norms ------------------------------------------------------------------------------- */

/* out[N, C] = the matrix input a norm gave: hook_normalized itself (LayerNorm), or
 * hook_normalized * w + b (RMSNorm, whose weight comes after the site) */
static const float *norm_output(const bwd *b, const float *site, const float *w, const float *bias, float *out) {
    if (b->m->cfg.norm == MS_NORM_LAYER) return site;
    memcpy(out, site, sizeof(float) * (size_t)b->N * b->m->cfg.d_model);
    ms_norm_weight(out, w, bias, b->N, b->m->cfg.d_model);
    return out;
}

/* dy [N, C]: the gradient of the norm's output (the matrix input); dx += the
 * gradient of its input x. Sites: hook_normalized, then hook_scale. */
static void norm_backward(bwd *b, ms_site scale_site, int layer, const float *x, const float *scale,
                          const float *site_value, const float *w, float *dw, float *db, float *dy, float *dx) {
    const ms_config *c = &b->m->cfg;
    int N = b->N, C = c->d_model;
    if (c->norm == MS_NORM_LAYER) {
        /* the site is the output itself: y = xhat * w + b */
        token_site(b, scale_site + 1, layer, dy, C);
        ms_norm_xhat(b->xhat, x, scale, N, C, c->norm, b->n_threads);
        ms_norm_affine_backward(dy, dw, db, dy, b->xhat, w, N, C, b->n_threads);
    } else {
        /* the site is xhat; y = site * w (+ b) */
        ms_norm_affine_backward(dy, dw, db, dy, site_value, w, N, C, b->n_threads);
        token_site(b, scale_site + 1, layer, dy, C);
    }
    if (touched(b, scale_site, layer)) { /* the divisor's gradient is read or changed in between */
        ms_norm_scale_grad(b->dscale, dy, x, scale, N, C, c->norm, b->n_threads);
        token_site(b, scale_site, layer, b->dscale, 1);
        ms_norm_input_backward(dx, dy, b->dscale, x, scale, N, C, c->ln_eps, c->norm, b->n_threads);
    } else {
        ms_norm_scale_and_input_backward(dx, b->dscale, dy, x, scale, N, C, c->ln_eps, c->norm, b->n_threads);
    }
}

/* ---- attention ----------------------------------------------------------------------------- */

/* The three steps of the attention's backward; ALL: the three in turn for each head,
 * when nothing reads or changes the pattern's or the scores' gradient in between. */
enum { ATT_PATTERN, ATT_SOFTMAX, ATT_SCORES, ATT_ALL };

/* queries per causal block of the attention's backward (rows shorter than two blocks: one) */
enum { ATT_QUERY_BLOCK = 32 };

typedef struct {
    bwd *b;
    int layer, phase, n_items;
    float scale;
} att_job;

/* one row r and one key/value head g (the heads that share it in turn, so that
 * their key and value gradients add up without races) */
static void att_item(const att_job *j, int item) {
    bwd *b = j->b;
    const ms_layout *L = b->L;
    const ms_config *c = &b->m->cfg;
    int G = c->n_kv_heads, r = item / G, g = item % G, per = c->n_heads / G, d = c->d_head;
    int QW = (int)qkv_width(c), QD = (int)q_width(c), KD = (int)kv_width(c);
    int n = L->n_real[r];
    size_t row0 = (size_t)L->row_off[r];
    const float *qkv = b->t->qkv + ((size_t)j->layer * L->N + row0) * QW;
    const float *K = qkv + QD + (size_t)g * d, *V = qkv + QD + KD + (size_t)g * d;
    float *dK = b->dqkv + row0 * QW + QD + (size_t)g * d, *dV = dK + KD;
    /* causal blocks of queries: queries [i0, i1) see keys [k0, i1) only (k0: where the
     * block's first query's sliding window starts, else 0), so the products skip the
     * keys no query of the block sees (5/8 of the square at 4 blocks), in the same
     * order for any thread count */
    int block = n > 2 * ATT_QUERY_BLOCK ? ATT_QUERY_BLOCK : n;
    for (int h = g * per; h < (g + 1) * per; h++) {
        size_t off = (size_t)j->layer * b->t->att + L->att_off[r] + (size_t)h * n * n;
        const float *P0 = b->t->pattern + off;
        const float *Pu = b->t->pattern_used ? b->t->pattern_used + off : P0;
        float *dP = b->datt + L->att_off[r] + (size_t)h * n * n;
        const float *Q = qkv + (size_t)h * d;
        float *dQ = b->dqkv + row0 * QW + (size_t)h * d;
        const float *dZ = b->dz + row0 * QD + (size_t)h * d;
        for (int i0 = 0; i0 < n; i0 += block) {
            int i1 = i0 + block < n ? i0 + block : n, m = i1 - i0;
            int k0 = ms_first_key(b->m, j->layer, i0), nk = i1 - k0;
            float *dPi = dP + (size_t)i0 * n;
            if (j->phase == ATT_PATTERN || j->phase == ATT_ALL) {
                /* z = P V: dP = dZ V^T (keys the query does not see: 0), dV += P^T dZ */
                ms_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nk, d, 1.0f, dZ + (size_t)i0 * QD, QD,
                         V + (size_t)k0 * QW, QW, 0.0f, dPi + k0, n);
                for (int i = i0; i < i1; i++) {
                    int lo = ms_first_key(b->m, j->layer, i);
                    for (int k = 0; k < lo; k++) dP[(size_t)i * n + k] = 0.0f;
                    for (int k = i + 1; k < n; k++) dP[(size_t)i * n + k] = 0.0f;
                }
                ms_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, d, m, 1.0f, Pu + (size_t)i0 * n + k0, n,
                         dZ + (size_t)i0 * QD, QD, 1.0f, dV + (size_t)k0 * QW, QW);
            }
            if (j->phase == ATT_SOFTMAX || j->phase == ATT_ALL) {
                /* P = softmax(S): dS = P * (dP - sum_k P dP) */
                for (int i = i0; i < i1; i++) {
                    int lo = ms_first_key(b->m, j->layer, i);
                    const float *p = P0 + (size_t)i * n;
                    float *gp = dP + (size_t)i * n;
                    float dot = (float)ms_dot_f64(p + lo, gp + lo, i + 1 - lo);
                    for (int k = 0; k < n; k++) gp[k] = k >= lo && k <= i ? p[k] * (gp[k] - dot) : 0.0f;
                }
            }
            if (j->phase == ATT_SCORES || j->phase == ATT_ALL) {
                if (b->t->capped) { /* S = cap tanh(S0 / cap): dS0 = dS (1 - (S / cap)^2) */
                    const float *S = b->t->capped + off;
                    float cap = b->m->attn_softcap;
                    for (int i = i0; i < i1; i++)
                        for (int k = ms_first_key(b->m, j->layer, i); k <= i; k++) {
                            float y = S[(size_t)i * n + k] / cap;
                            dP[(size_t)i * n + k] *= 1.0f - y * y;
                        }
                }
                /* S0 = scale Q K^T: dQ = scale dS0 K, dK += scale dS0^T Q */
                ms_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, nk, j->scale, dPi + k0, n,
                         K + (size_t)k0 * QW, QW, 0.0f, dQ + (size_t)i0 * QW, QW);
                ms_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, d, m, j->scale, dPi + k0, n,
                         Q + (size_t)i0 * QW, QW, 1.0f, dK + (size_t)k0 * QW, QW);
            }
        }
    }
}

static void att_items(void *ctx, long long lo, long long hi) {
    const att_job *j = ctx;
    for (long long i = lo; i < hi && !ms_interrupted(); i++) att_item(j, (int)i);
}

/* dz -> dqkv (rotated q, k and v), through the pattern and the scores sites */
static void attention_backward(bwd *b, int layer) {
    const ms_config *c = &b->m->cfg;
    att_job job = {b, layer, 0, b->plan->n_rows * c->n_kv_heads, 1.0f};
    if (b->m->attn_scale > 0.0f) job.scale = b->m->attn_scale;
    else if (c->scale_attn_weights) job.scale /= sqrtf((float)c->d_head);
    if (c->scale_attn_by_inverse_layer) job.scale /= (float)(layer + 1);
    ms_zero(b->dqkv, (size_t)b->N * qkv_width(c), b->n_threads);
    if (!attention_site_touched(b, MS_SITE_PATTERN, layer) && !attention_site_touched(b, MS_SITE_ATTN_SCORES, layer)) {
        job.phase = ATT_ALL;
        ms_parallel_for(job.n_items, 1, b->n_threads, att_items, &job);
        return;
    }
    job.phase = ATT_PATTERN;
    ms_parallel_for(job.n_items, 1, b->n_threads, att_items, &job);
    attention_site(b, MS_SITE_PATTERN, layer, b->datt);
    job.phase = ATT_SOFTMAX;
    ms_parallel_for(job.n_items, 1, b->n_threads, att_items, &job);
    attention_site(b, MS_SITE_ATTN_SCORES, layer, b->datt);
    job.phase = ATT_SCORES;
    ms_parallel_for(job.n_items, 1, b->n_threads, att_items, &job);
}

/* g [N, heads of d] (row stride ld) rotated back with block `layer`'s angles, token k
 * at its position */
static void unrotate(const bwd *b, int layer, float *g, int ld, int heads) {
    const ms_layout *L = b->L;
    const ms_config *c = &b->m->cfg;
    const float *rope = ms_block_rope(b->rope, b->m, layer, (int)L->max_keys);
    for (int r = 0; r < b->plan->n_rows; r++)
        for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
            int pos = k - L->row_off[r];
            for (int h = 0; h < heads; h++)
                ms_rotary_backward(g + (size_t)k * ld + (size_t)h * c->d_head, rope + (size_t)pos * c->rotary_dim,
                                   c->rotary_dim, c->rotary_interleaved);
        }
}

static int fused(const ms_linear_weight *a, const ms_linear_weight *b, size_t a_out) {
    size_t step = a->trans ? a_out * (size_t)a->ld : a_out;
    int biases = (!a->b && !b->b) || (a->b && b->b && b->b == a->b + a_out);
    return a->trans == b->trans && a->ld == b->ld && b->w == a->w + step && biases;
}

/* The gradient of a block's output (hook_attn_out or hook_mlp_out): dres itself, as
 * the output adds to the stream, unless a seed or an action at the site changes it on
 * the way back; then a copy of it in dout. (dres is read here before the block's norm
 * backward adds to it.) */
static float *output_grad(bwd *b, ms_site site, int l) {
    if (!seeded(b, site, l) && !ms_plan_touches(b->plan, site, l)) return b->dres;
    ms_copy(b->dout, b->dres, (size_t)b->N * b->m->cfg.d_model, b->n_threads);
    return b->dout;
}

/* Gemma 2's norm of a block's output, backward: dy (hook_attn_out's or hook_mlp_out's
 * gradient) -> the gradient of the norm's input, the output matrix's product, in dln
 * (free until the block's input matrices write it). The norm's backward changes its
 * dy, so dy (which may be dres) is copied into dout first. */
static float *post_norm_backward(bwd *b, int l, int mlp, const float *dy, const ms_block_grad *wg) {
    const ms_block *w = &b->m->blocks[l];
    ms_tape *t = b->t;
    size_t C = (size_t)b->m->cfg.d_model, at = (size_t)l * b->L->N, NC = (size_t)b->N * C;
    if (dy != b->dout) ms_copy(b->dout, dy, NC, b->n_threads);
    ms_zero(b->dln, NC, b->n_threads);
    norm_backward(b, mlp ? MS_SITE_LN2_POST_SCALE : MS_SITE_LN1_POST_SCALE, l, (mlp ? t->mlp_raw : t->attn_raw) + at * C,
                  (mlp ? t->ln2_post_scale : t->ln1_post_scale) + at, (mlp ? t->ln2_post : t->ln1_post) + at * C,
                  mlp ? w->ln2_post_w : w->ln1_post_w, wg ? (mlp ? wg->ln2_post_w : wg->ln1_post_w) : NULL, NULL,
                  b->dout, b->dln);
    return b->dln;
}

/* the gradient of hook_attn_out -> dln (of ln1's output) */
static void attn_block_backward(bwd *b, int l, const ms_block_grad *wg) {
    const ms_config *c = &b->m->cfg;
    const ms_block *w = &b->m->blocks[l];
    ms_tape *t = b->t;
    int N = b->N, C = c->d_model, QD = (int)q_width(c), KD = (int)kv_width(c), QW = (int)qkv_width(c);
    size_t at = (size_t)l * b->L->N;
    float *dy = output_grad(b, MS_SITE_ATTN_OUT, l);
    token_site(b, MS_SITE_ATTN_OUT, l, dy, C);
    if (c->post_norms) dy = post_norm_backward(b, l, 0, dy, wg);
    ms_linear_backward(b->dz, QD, 0, wg ? wg->o.w : NULL, wg ? wg->o.b : NULL, t->z + at * QD, QD, dy, C,
                       &w->o, N, QD, C, b->n_threads);
    token_site(b, MS_SITE_Z, l, b->dz, QD);
    attention_backward(b, l);
    if (c->rotary_dim) {
        token_site(b, MS_SITE_ROT_K, l, b->dqkv + QD, QW);
        token_site(b, MS_SITE_ROT_Q, l, b->dqkv, QW);
        unrotate(b, l, b->dqkv, QW, c->n_heads);
        unrotate(b, l, b->dqkv + QD, QW, c->n_kv_heads);
    }
    if (c->qk_norm) {
        const float *pre = t->qk_pre + at * (size_t)(QD + KD);
        int whole = c->qk_norm == 2; /* OLMo 2: one norm over all heads */
        ms_head_rmsnorm_backward(b->dqkv, QW, pre, QD + KD, N, whole ? 1 : c->n_heads, whole ? QD : c->d_head,
                                 w->q_norm_w, wg ? wg->q_norm_w : NULL, c->ln_eps, b->n_threads);
        ms_head_rmsnorm_backward(b->dqkv + QD, QW, pre + QD, QD + KD, N, whole ? 1 : c->n_kv_heads,
                                 whole ? KD : c->d_head, w->k_norm_w, wg ? wg->k_norm_w : NULL, c->ln_eps,
                                 b->n_threads);
    }
    token_site(b, MS_SITE_V, l, b->dqkv + QD + KD, QW);
    token_site(b, MS_SITE_K, l, b->dqkv + QD, QW);
    token_site(b, MS_SITE_Q, l, b->dqkv, QW);
    /* the products' input: ln1's output, or the stream itself (no input norm) */
    const float *x = w->ln1_w ? norm_output(b, t->ln1 + at * C, w->ln1_w, w->ln1_b, b->tmp) : t->resid_pre + at * C;
    if (fused(&w->q, &w->k, (size_t)QD) && fused(&w->k, &w->v, (size_t)KD)) {
        ms_linear_backward(b->dln, C, 0, wg ? wg->q.w : NULL, wg ? wg->q.b : NULL, x, C, b->dqkv, QW, &w->q, N, C,
                           QW, b->n_threads);
        return;
    }
    ms_linear_backward(b->dln, C, 0, wg ? wg->q.w : NULL, wg ? wg->q.b : NULL, x, C, b->dqkv, QW, &w->q, N, C, QD,
                       b->n_threads);
    ms_linear_backward(b->dln, C, 1, wg ? wg->k.w : NULL, wg ? wg->k.b : NULL, x, C, b->dqkv + QD, QW, &w->k, N, C,
                       KD, b->n_threads);
    ms_linear_backward(b->dln, C, 1, wg ? wg->v.w : NULL, wg ? wg->v.b : NULL, x, C, b->dqkv + QD + KD, QW, &w->v,
                       N, C, KD, b->n_threads);
}

/* the gradient of hook_mlp_out -> dln (of ln2's output) */
static void mlp_block_backward(bwd *b, int l, const ms_block_grad *wg) {
    const ms_config *c = &b->m->cfg;
    const ms_block *w = &b->m->blocks[l];
    ms_tape *t = b->t;
    int N = b->N, C = c->d_model, F = c->d_mlp, MW = (int)mlp_width(c);
    size_t at = (size_t)l * b->L->N;
    float *dy = output_grad(b, MS_SITE_MLP_OUT, l);
    token_site(b, MS_SITE_MLP_OUT, l, dy, C);
    if (c->post_norms) dy = post_norm_backward(b, l, 1, dy, wg);
    ms_linear_backward(b->dpost, F, 0, wg ? wg->mlp_out.w : NULL, wg ? wg->mlp_out.b : NULL, t->mlp_post + at * F,
                       F, dy, C, &w->mlp_out, N, F, C, b->n_threads);
    token_site(b, MS_SITE_MLP_POST, l, b->dpost, F);
    const float *pre = t->mlp_pre + at * MW;
    if (c->gated_mlp) ms_gated_backward(b->dpre, MW, b->dpost, F, pre, N, F, c->activation, b->n_threads);
    else ms_activation_backward(b->dpre, MW, b->dpost, F, pre, MW, N, F, c->activation, b->n_threads);
    if (c->gated_mlp) token_site(b, MS_SITE_MLP_PRE_LINEAR, l, b->dpre + F, MW);
    token_site(b, MS_SITE_MLP_PRE, l, b->dpre, MW);
    const float *x = w->ln2_w ? norm_output(b, t->ln2 + at * C, w->ln2_w, w->ln2_b, b->tmp) : t->resid_mid + at * C;
    if (!c->gated_mlp) {
        ms_linear_backward(b->dln, C, 0, wg ? wg->mlp_in.w : NULL, wg ? wg->mlp_in.b : NULL, x, C, b->dpre, MW,
                           &w->mlp_in, N, C, F, b->n_threads);
    } else if (fused(&w->mlp_gate, &w->mlp_in, (size_t)F)) {
        ms_linear_backward(b->dln, C, 0, wg ? wg->mlp_gate.w : NULL, wg ? wg->mlp_gate.b : NULL, x, C, b->dpre, MW,
                           &w->mlp_gate, N, C, 2 * F, b->n_threads);
    } else {
        ms_linear_backward(b->dln, C, 0, wg ? wg->mlp_gate.w : NULL, wg ? wg->mlp_gate.b : NULL, x, C, b->dpre, MW,
                           &w->mlp_gate, N, C, F, b->n_threads);
        ms_linear_backward(b->dln, C, 1, wg ? wg->mlp_in.w : NULL, wg ? wg->mlp_in.b : NULL, x, C, b->dpre + F, MW,
                           &w->mlp_in, N, C, F, b->n_threads);
    }
}

/* expert e's part of a stacked matrix (or of its gradient): offset numbers on */
static ms_linear_weight expert_part(const ms_linear_weight *w, size_t offset) {
    ms_linear_weight x = *w;
    x.w += offset;
    return x;
}

static float *grad_part(float *g, size_t offset) { return g ? g + offset : NULL; }

/* The shared expert's backward (Qwen2-MoE), from dy (hook_mlp_out's gradient), added to
 * dln; its forward recomputed from x: h = gate | up, a = act(gate) * up, o = a Wd,
 * s = sigmoid(z), z = x . wr, y += s o. So d o = s dy, dz = (dy . o) s (1 - s); the
 * gate's logits and their gradients in dscale (free until the norm's backward). */
static void shared_expert_backward(bwd *b, const ms_block *w, const ms_block_grad *wg, const float *x,
                                   const float *dy) {
    const ms_config *c = &b->m->cfg;
    int N = b->N, C = c->d_model, S = c->d_shared;
    ms_linear(b->dpre, 2 * S, x, C, &w->shared_gate, N, C, S, b->n_threads);
    ms_linear(b->dpre + S, 2 * S, x, C, &w->shared_in, N, C, S, b->n_threads);
    ms_gated_activation(b->dpost, S, b->dpre, 2 * S, N, S, c->activation, b->n_threads);
    ms_linear(b->moe_o, C, b->dpost, S, &w->shared_out, N, S, C, b->n_threads);
    ms_linear(b->dscale, 1, x, C, &w->shared_router, N, C, 1, b->n_threads);
    for (int i = 0; i < N; i++) {
        const float *g = dy + (size_t)i * C;
        float s = 1.0f / (1.0f + expf(-b->dscale[i]));
        b->dscale[i] = (float)ms_dot_f64(g, b->moe_o + (size_t)i * C, C) * s * (1.0f - s);
        for (int j = 0; j < C; j++) b->moe_dy[(size_t)i * C + j] = s * g[j];
    }
    ms_linear_backward(b->dln, C, 1, wg ? wg->shared_router.w : NULL, NULL, x, C, b->dscale, 1, &w->shared_router,
                       N, C, 1, b->n_threads);
    ms_linear_backward(b->moe_dh, S, 0, wg ? wg->shared_out.w : NULL, NULL, b->dpost, S, b->moe_dy, C,
                       &w->shared_out, N, S, C, b->n_threads);
    ms_gated_backward(b->dpre, 2 * S, b->moe_dh, S, b->dpre, N, S, c->activation, b->n_threads);
    ms_linear_backward(b->dln, C, 1, wg ? wg->shared_gate.w : NULL, NULL, x, C, b->dpre, 2 * S, &w->shared_gate,
                       N, C, S, b->n_threads);
    ms_linear_backward(b->dln, C, 1, wg ? wg->shared_in.w : NULL, NULL, x, C, b->dpre + S, 2 * S, &w->shared_in,
                       N, C, S, b->n_threads);
}

/* A mixture of experts' backward, the gradient of hook_mlp_out -> dln (of ln2's
 * output). Forward: p = softmax(x Wr) (hook_expert_weights, then its actions: q),
 * w = q renormalised over each token's chosen experts, y = sum over them of
 * w_e f_e(x), f_e a gated MLP. Each expert's activations are recomputed here from x:
 *   dw_e = dy . f_e(x);  f_e's backward from w_e dy (its weights' gradients, dx);
 *   dq_e = (dw_e - sum_j dw_j w_j) / S for the chosen e (S their q's sum; without the
 *   renormalisation, dq_e = dw_e), else 0
 *   (which experts are chosen does not change under a small change of q);
 *   dp = the actions taken back; d(x Wr) = p * (dp - p . dp). */
static void moe_block_backward(bwd *b, int l, const ms_block_grad *wg) {
    const ms_config *c = &b->m->cfg;
    const ms_block *w = &b->m->blocks[l];
    ms_tape *t = b->t;
    int N = b->N, C = c->d_model, F = c->d_mlp, E = c->n_experts, K = c->experts_per_token;
    size_t at = (size_t)l * b->L->N;
    const float *q = t->route + at * E, *p = t->route_raw + at * E;
    float *dy = output_grad(b, MS_SITE_MLP_OUT, l);
    token_site(b, MS_SITE_MLP_OUT, l, dy, C);
    const float *x = norm_output(b, t->ln2 + at * C, w->ln2_w, w->ln2_b, b->tmp);
    for (int i = 0; i < N; i++)
        ms_expert_weights(b->moe_w + (size_t)i * E, q + (size_t)i * E, E, K, c->expert_renormalize);
    ms_zero(b->moe_dw, (size_t)N * E, b->n_threads);
    ms_zero(b->dln, (size_t)N * C, b->n_threads);
    if (c->d_shared) shared_expert_backward(b, w, wg, x, dy);
    for (int e = 0; e < E; e++) {
        int n = 0;
        for (int i = 0; i < N; i++) {
            float we = b->moe_w[(size_t)i * E + e];
            if (we == 0.0f) continue; /* as the forward: the expert did not run for this token */
            memcpy(b->moe_x + (size_t)n * C, x + (size_t)i * C, sizeof(float) * C);
            for (int j = 0; j < C; j++) b->moe_dy[(size_t)n * C + j] = we * dy[(size_t)i * C + j];
            n++;
        }
        if (!n) continue;
        ms_linear_weight gate = expert_part(&w->mlp_gate, (size_t)e * w->expert_in_stride);
        ms_linear_weight up = expert_part(&w->mlp_in, (size_t)e * w->expert_in_stride);
        ms_linear_weight down = expert_part(&w->mlp_out, (size_t)e * w->expert_out_stride);
        /* the expert's forward again: gate | up in dpre, the hidden activations in dpost */
        ms_linear(b->dpre, 2 * F, b->moe_x, C, &gate, n, C, F, b->n_threads);
        ms_linear(b->dpre + F, 2 * F, b->moe_x, C, &up, n, C, F, b->n_threads);
        ms_gated_activation(b->dpost, F, b->dpre, 2 * F, n, F, c->activation, b->n_threads);
        ms_linear(b->moe_o, C, b->dpost, F, &down, n, F, C, b->n_threads);
        for (int i = 0, k = 0; i < N; i++) {
            if (b->moe_w[(size_t)i * E + e] == 0.0f) continue;
            b->moe_dw[(size_t)i * E + e] = (float)ms_dot_f64(dy + (size_t)i * C, b->moe_o + (size_t)k++ * C, C);
        }
        /* its backward from w_e dy */
        size_t in_at = (size_t)e * w->expert_in_stride, out_at = (size_t)e * w->expert_out_stride;
        ms_linear_backward(b->moe_dh, F, 0, wg ? grad_part(wg->mlp_out.w, out_at) : NULL, NULL, b->dpost, F,
                           b->moe_dy, C, &down, n, F, C, b->n_threads);
        ms_gated_backward(b->dpre, 2 * F, b->moe_dh, F, b->dpre, n, F, c->activation, b->n_threads);
        ms_linear_backward(b->moe_o, C, 0, wg ? grad_part(wg->mlp_gate.w, in_at) : NULL, NULL, b->moe_x, C, b->dpre,
                           2 * F, &gate, n, C, F, b->n_threads);
        ms_linear_backward(b->moe_o, C, 1, wg ? grad_part(wg->mlp_in.w, in_at) : NULL, NULL, b->moe_x, C,
                           b->dpre + F, 2 * F, &up, n, C, F, b->n_threads);
        for (int i = 0, k = 0; i < N; i++) {
            if (b->moe_w[(size_t)i * E + e] == 0.0f) continue;
            float *dst = b->dln + (size_t)i * C;
            const float *src = b->moe_o + (size_t)k++ * C;
            for (int j = 0; j < C; j++) dst[j] += src[j];
        }
    }
    /* the renormalisation, in place: moe_dw becomes dq (without one, dq = dw for the chosen) */
    for (int i = 0; i < N && c->expert_renormalize; i++) {
        const float *qi = q + (size_t)i * E, *wi = b->moe_w + (size_t)i * E;
        float *g = b->moe_dw + (size_t)i * E, sum = 0.0f, dot = 0.0f;
        for (int e = 0; e < E; e++) {
            if (ms_expert_rank(qi, E, e) < K) sum += qi[e];
            dot += g[e] * wi[e];
        }
        for (int e = 0; e < E; e++) g[e] = wi[e] != 0.0f ? (g[e] - dot) / sum : 0.0f;
    }
    token_site(b, MS_SITE_EXPERT_WEIGHTS, l, b->moe_dw, E);
    /* the softmax, in place: dp becomes the gradient of the router's logits */
    for (int i = 0; i < N; i++) {
        const float *pi = p + (size_t)i * E;
        float *g = b->moe_dw + (size_t)i * E;
        float dot = (float)ms_dot_f64(pi, g, E);
        for (int e = 0; e < E; e++) g[e] = pi[e] * (g[e] - dot);
    }
    ms_linear_backward(b->dln, C, 1, wg ? wg->router.w : NULL, NULL, x, C, b->moe_dw, E, &w->router, N, C, E,
                       b->n_threads);
}

/* dres: the gradient of hook_resid_post of block l -> of its hook_resid_pre */
static void block_backward(bwd *b, int l) {
    const ms_config *c = &b->m->cfg;
    const ms_block *w = &b->m->blocks[l];
    const ms_block_grad *wg = b->g->weights ? &b->g->weights->blocks[l] : NULL;
    ms_tape *t = b->t;
    int C = c->d_model;
    size_t at = (size_t)l * b->L->N, NC = (size_t)b->N * C;
    const float *x0 = t->resid_pre + at * C;
    token_site(b, MS_SITE_RESID_POST, l, b->dres, C);
    /* the MLP: its output adds to the stream */
    if (c->n_experts) moe_block_backward(b, l, wg);
    else mlp_block_backward(b, l, wg);
    const float *x_mlp = c->parallel ? x0 : t->resid_mid + at * C;
    if (c->parallel) ms_zero(b->dpar, NC, b->n_threads);
    /* parallel blocks: ln2's input gradient waits in dpar, as resid_post's gradient
     * is also the attention output's */
    if (w->ln2_w)
        norm_backward(b, MS_SITE_LN2_SCALE, l, x_mlp, t->ln2_scale + at, t->ln2 + at * C, w->ln2_w,
                      wg ? wg->ln2_w : NULL, wg ? wg->ln2_b : NULL, b->dln, c->parallel ? b->dpar : b->dres);
    else /* no input norm: the MLP read the stream */
        ms_add(b->dres, b->dres, b->dln, NC, b->n_threads);
    if (!c->parallel) token_site(b, MS_SITE_RESID_MID, l, b->dres, C);
    attn_block_backward(b, l, wg);
    if (w->ln1_w)
        norm_backward(b, MS_SITE_LN1_SCALE, l, x0, t->ln1_scale + at, t->ln1 + at * C, w->ln1_w,
                      wg ? wg->ln1_w : NULL, wg ? wg->ln1_b : NULL, b->dln, b->dres);
    else
        ms_add(b->dres, b->dres, b->dln, NC, b->n_threads);
    if (c->parallel) ms_add(b->dres, b->dres, b->dpar, NC, b->n_threads);
    token_site(b, MS_SITE_RESID_PRE, l, b->dres, C);
}

/* ---- the scalar: a metric of the final states, or the cross-entropy ------------------------ */

typedef struct {
    const bwd *b;
    int n, kind;         /* rows in the chunk; MS_METRIC_* or 0 for the cross-entropy */
    const int *rows;     /* [n] the plan row of each (metric: for its answers) */
    const int *targets;  /* [n] cross-entropy: the next token */
    float weight;        /* cross-entropy: 1 / pairs */
    double *values;      /* [n] */
} head_job;

/* y [V] of one row -> its value, and y <- d value / d y (times weight) */
static double head_row(const head_job *j, int i, float *y) {
    const ms_metric *mt = &j->b->g->metric;
    int V = j->b->m->cfg.d_vocab, r = j->rows[i];
    if (j->kind == 0) return ms_cross_entropy_backward(y, V, j->targets[i], j->weight);
    double lz = ms_log_sum_exp(y, V);
    double value;
    if (j->kind == MS_METRIC_KL) {
        const float *ref = mt->ref_logprob + (size_t)r * V;
        double mass = 0.0;
        value = 0.0;
        for (int v = 0; v < V; v++)
            if (ref[v] > -87.0f) { /* as the forward's: entries of zero reference probability are 0 */
                double p = exp((double)ref[v]);
                value += p * ((double)ref[v] - ((double)y[v] - lz));
                mass += p;
            }
        for (int v = 0; v < V; v++) {
            double p = ref[v] > -87.0f ? exp((double)ref[v]) : 0.0;
            y[v] = (float)(mass * exp((double)y[v] - lz) - p);
        }
    } else {
        int t = mt->correct[r];
        double lp = (double)y[t] - lz, scale = j->kind == MS_METRIC_PROB ? exp(lp) : 1.0;
        value = j->kind == MS_METRIC_PROB ? scale : lp;
        for (int v = 0; v < V; v++) y[v] = (float)(-scale * exp((double)y[v] - lz));
        y[t] += (float)scale;
    }
    return value;
}

static void head_rows(void *ctx, long long lo, long long hi) {
    const head_job *j = ctx;
    int V = j->b->m->cfg.d_vocab;
    float cap = j->b->m->logit_softcap;
    for (long long i = lo; i < hi; i++) {
        float *y = j->b->head_y + i * V;
        if (cap <= 0.0f) {
            j->values[i] = head_row(j, (int)i, y);
            continue;
        }
        /* Gemma 2: the value of the capped logits; d logit = d capped (1 - tanh^2) */
        float *t = j->b->head_t + i * V;
        for (int v = 0; v < V; v++) {
            y[v] = ms_softcap(y[v], cap);
            t[v] = y[v] / cap;
        }
        j->values[i] = head_row(j, (int)i, y);
        for (int v = 0; v < V; v++) y[v] *= 1.0f - t[v] * t[v];
    }
}

/* The final states of packed tokens ks[n] (the norm's output x) through the
 * unembedding: values[n], dln[ks] += d / dx, unembed's gradient += */
static void head_backward(bwd *b, const int *ks, const int *rows, const int *targets, int n, int kind, float weight,
                          double *values) {
    const ms_config *c = &b->m->cfg;
    int C = c->d_model, V = c->d_vocab, CH = head_chunk(c);
    float *du = b->g->weights ? b->g->weights->unembed : NULL;
    if (n > CH) { /* chunks of equal size: a short last one would run its products slowly */
        int chunks = (n + CH - 1) / CH;
        CH = (n + chunks - 1) / chunks;
    }
    for (int i0 = 0; i0 < n && !ms_interrupted(); i0 += CH) {
        int ch = n - i0 < CH ? n - i0 : CH;
        for (int i = 0; i < ch; i++)
            memcpy(b->head_x + (size_t)i * C, b->xhat + (size_t)ks[i0 + i] * C, sizeof(float) * C);
        ms_unembed(b->head_y, b->head_x, b->m->unembed, ch, C, V, b->n_threads);
        const float *ub = b->m->unembed_b;
        if (ub)
            for (int i = 0; i < ch; i++)
                for (int v = 0; v < V; v++) b->head_y[(size_t)i * V + v] += ub[v];
        head_job job = {b, ch, kind, rows + i0, targets ? targets + i0 : NULL, weight, values + i0};
        ms_parallel_for(ch, 1, b->n_threads, head_rows, &job);
        float *dub = b->g->weights ? b->g->weights->unembed_b : NULL;
        if (dub) /* the bias's gradient: each row's d logits */
            for (int i = 0; i < ch; i++)
                for (int v = 0; v < V; v++) dub[v] += b->head_y[(size_t)i * V + v];
        /* d head_x = dy U; dU += dy^T head_x */
        ms_product px = {0, 0, ch, C, V, 1.0f, b->head_y, V, b->m->unembed, C, 0.0f, b->head_dx, C};
        ms_product pu = {1, 0, V, C, ch, 1.0f, b->head_y, V, b->head_x, C, 1.0f, du, C};
        if (du) ms_gemm_pair(&pu, &px, b->n_threads);
        else ms_gemm_product(&px, b->n_threads);
        for (int i = 0; i < ch; i++) {
            float *dst = b->dln + (size_t)ks[i0 + i] * C;
            const float *src = b->head_dx + (size_t)i * C;
            for (int k = 0; k < C; k++) dst[k] += src[k];
        }
    }
}

/* The scalar and its gradient with respect to ln_final's output (in dln); the
 * final states (the norm's output) are in xhat. */
static ms_status scalar_backward(bwd *b, ms_error *err) {
    const ms_grad_plan *g = b->g;
    const ms_plan *p = b->plan;
    const ms_layout *L = b->L;
    const ms_config *c = &b->m->cfg;
    int C = c->d_model, R = g->n_metric_rows, T = p->n_pos;
    int *ks = b->pairs, *targets = b->pairs + b->N;
    /* each entry's value and row; per-row sums and counts (cross-entropy) */
    size_t n_max = (size_t)(b->N > R ? b->N : R);
    double *values = malloc(sizeof(double) * (n_max + (size_t)R) + sizeof(int) * (n_max + (size_t)R) + 1);
    if (!values) {
        snprintf(err->message, sizeof err->message, "out of memory computing the metric");
        return MS_ERR_MEMORY;
    }
    double *sums = values + n_max;
    int *rows = (int *)(sums + R), *count = rows + n_max;
    memset(b->dln, 0, sizeof(float) * (size_t)b->N * C);
    double total = 0.0;
    if (!g->cross_entropy && g->metric.kind == MS_METRIC_NONE) {
        /* the seeds alone: nothing from the logits */
        for (int r = 0; r < R; r++) g->metric_out[r] = 0.0f;
        *g->value_out = 0.0;
    } else if (g->cross_entropy) {
        int n = 0;
        for (int r = 0; r < R; r++)
            for (int t = 0; t + 1 < T; t++)
                if (is_real(p, r, t) && is_real(p, r, t + 1)) {
                    ks[n] = L->packed_of[(size_t)r * T + t];
                    targets[n] = p->tokens[(size_t)r * T + t + 1];
                    rows[n++] = r;
                }
        head_backward(b, ks, rows, targets, n, 0, 1.0f / (float)n, values);
        for (int r = 0; r < R; r++) sums[r] = 0.0, count[r] = 0;
        for (int i = 0; i < n; i++) {
            total += values[i];
            sums[rows[i]] += values[i];
            count[rows[i]]++;
        }
        for (int r = 0; r < R; r++) g->metric_out[r] = count[r] ? (float)(sums[r] / count[r]) : NAN;
        *g->value_out = total / n;
    } else {
        const ms_metric *mt = &g->metric;
        for (int r = 0; r < R; r++) {
            ks[r] = L->packed_of[(size_t)r * T + mt->pos[r]];
            rows[r] = r;
        }
        if (mt->kind == MS_METRIC_LOGIT_DIFF && b->m->logit_softcap > 0.0f) {
            /* capped: cap tanh(x.uc / cap) - cap tanh(x.uw / cap), each logit's slope apart */
            float *du = g->weights ? g->weights->unembed : NULL;
            float *dub = g->weights ? g->weights->unembed_b : NULL;
            const float *ub = b->m->unembed_b;
            float cap = b->m->logit_softcap;
            for (int r = 0; r < R; r++) {
                const float *x = b->xhat + (size_t)ks[r] * C;
                const float *uc = b->m->unembed + (size_t)mt->correct[r] * C;
                const float *uw = b->m->unembed + (size_t)mt->wrong[r] * C;
                float *dx = b->dln + (size_t)ks[r] * C;
                double lc = ub ? ub[mt->correct[r]] : 0.0, lw = ub ? ub[mt->wrong[r]] : 0.0;
                for (int k = 0; k < C; k++) {
                    lc += (double)x[k] * uc[k];
                    lw += (double)x[k] * uw[k];
                }
                float yc = ms_softcap((float)lc, cap), yw = ms_softcap((float)lw, cap);
                float sc = 1.0f - (yc / cap) * (yc / cap), sw = 1.0f - (yw / cap) * (yw / cap);
                values[r] = (double)yc - (double)yw;
                if (mt->correct[r] == mt->wrong[r]) continue; /* 0, whatever x */
                for (int k = 0; k < C; k++) dx[k] += sc * uc[k] - sw * uw[k];
                if (dub) dub[mt->correct[r]] += sc, dub[mt->wrong[r]] -= sw;
                if (du)
                    for (int k = 0; k < C; k++) {
                        du[(size_t)mt->correct[r] * C + k] += sc * x[k];
                        du[(size_t)mt->wrong[r] * C + k] -= sw * x[k];
                    }
            }
        } else if (mt->kind == MS_METRIC_LOGIT_DIFF) {
            /* logit[correct] - logit[wrong]: two rows of the unembedding (and of its bias) */
            float *du = g->weights ? g->weights->unembed : NULL;
            float *dub = g->weights ? g->weights->unembed_b : NULL;
            const float *ub = b->m->unembed_b;
            for (int r = 0; r < R; r++) {
                const float *x = b->xhat + (size_t)ks[r] * C;
                const float *uc = b->m->unembed + (size_t)mt->correct[r] * C;
                const float *uw = b->m->unembed + (size_t)mt->wrong[r] * C;
                float *dx = b->dln + (size_t)ks[r] * C;
                double v = ub ? (double)ub[mt->correct[r]] - (double)ub[mt->wrong[r]] : 0.0;
                for (int k = 0; k < C; k++) {
                    v += (double)x[k] * (uc[k] - uw[k]);
                    dx[k] += uc[k] - uw[k];
                }
                values[r] = v;
                if (du && mt->correct[r] != mt->wrong[r])
                    for (int k = 0; k < C; k++) {
                        du[(size_t)mt->correct[r] * C + k] += x[k];
                        du[(size_t)mt->wrong[r] * C + k] -= x[k];
                    }
                if (dub && mt->correct[r] != mt->wrong[r]) dub[mt->correct[r]] += 1.0f, dub[mt->wrong[r]] -= 1.0f;
            }
        } else {
            head_backward(b, ks, rows, NULL, R, mt->kind, 1.0f, values);
        }
        for (int r = 0; r < R; r++) {
            g->metric_out[r] = (float)values[r];
            total += values[r];
        }
        *g->value_out = total;
    }
    free(values);
    return MS_OK;
}

/* ---- the whole pass ---------------------------------------------------------------------------- */

/* the lowest block the backward must go through: -1 for the embedding (weights, or
 * an embedding site), n_layers when only ln_final's sites are asked for (a seed
 * changes only the gradients of sites at or before its own, which set this already) */
static int lowest_block(const ms_model *m, const ms_grad_plan *g) {
    if (g->weights) return -1;
    int low = m->cfg.n_layers;
    for (int i = 0; i < g->n_sites; i++) {
        ms_site s = g->sites[i].site;
        if (s == MS_SITE_EMBED || s == MS_SITE_POS_EMBED) return -1;
        if (ms_site_per_layer(s) && g->sites[i].layer < low) low = g->sites[i].layer;
    }
    return low;
}

/* the blocks the forward must compute: all of them for a metric or the cross-entropy;
 * for seeds alone, only up to the last block that holds a seed, a requested site or a
 * cache action (nothing after those can change the scalar or what is returned) */
static int taped_blocks(const ms_model *m, const ms_plan *p, const ms_grad_plan *g) {
    int all = m->cfg.n_layers, n = 0;
    if (g->metric.kind != MS_METRIC_NONE || g->cross_entropy) return all;
#define REACH(site, layer) \
    do { \
        if (ms_site_per_layer(site)) n = (layer) + 1 > n ? (layer) + 1 : n; \
        else if ((site) != MS_SITE_EMBED && (site) != MS_SITE_POS_EMBED) return all; \
    } while (0)
    for (int i = 0; i < g->n_seeds; i++) REACH(g->seeds[i].site, g->seeds[i].layer);
    for (int i = 0; i < g->n_sites; i++) REACH(g->sites[i].site, g->sites[i].layer);
    for (int i = 0; i < p->n_actions; i++)
        if (p->actions[i].kind == MS_DO_CACHE) REACH(p->actions[i].site, p->actions[i].layer);
#undef REACH
    return n;
}

static void embedding_backward(bwd *b) {
    const ms_plan *p = b->plan;
    const ms_layout *L = b->L;
    int C = b->m->cfg.d_model;
    size_t NC = (size_t)b->N * C;
    ms_weight_grad *wg = b->g->weights;
    for (int pass = 0; pass < (b->m->wpe ? 2 : 1); pass++) {
        ms_copy(b->dout, b->dres, NC, b->n_threads);
        token_site(b, pass ? MS_SITE_POS_EMBED : MS_SITE_EMBED, 0, b->dout, C);
        float *dw = wg ? (pass ? wg->wpe : wg->wte) : NULL;
        if (!dw) continue;
        for (int r = 0; r < p->n_rows; r++)
            for (int k = L->row_off[r]; k < L->row_off[r + 1]; k++) {
                size_t at = pass ? (size_t)(k - L->row_off[r])
                                 : (size_t)p->tokens[(size_t)r * p->n_pos + L->pos_of[k]];
                if (!pass && (long long)at == b->m->padding_idx) continue; /* as nn.Embedding(padding_idx) */
                float *dst = dw + at * C;
                const float *src = b->dout + (size_t)k * C;
                float s = pass ? 1.0f : b->m->embed_scale; /* hook_embed = wte[token] * embed_scale */
                for (int i = 0; i < C; i++) dst[i] += s * src[i];
            }
    }
}

static ms_status backward(bwd *b, ms_error *err) {
    const ms_model *m = b->m;
    const ms_config *c = &m->cfg;
    ms_weight_grad *wg = b->g->weights;
    ms_tape *t = b->t;
    int C = c->d_model;
    ms_status st;
    int top = b->L->tape_blocks; /* the forward computed blocks [0, top) */
    if (c->rotary_dim) ms_rope_table(b->rope, m, (int)b->L->max_keys);
    memset(b->dres, 0, sizeof(float) * (size_t)b->N * C);
    if (top == c->n_layers) {
        /* the final states, as the unembedding reads them, in xhat */
        const float *x = norm_output(b, t->lnf, m->lnf_w, m->lnf_b, b->xhat);
        if (x != b->xhat) memcpy(b->xhat, x, sizeof(float) * (size_t)b->N * C);
        if ((st = scalar_backward(b, err))) return st;
        norm_backward(b, MS_SITE_LNF_SCALE, 0, t->resid_final, t->lnf_scale, t->lnf, m->lnf_w,
                      wg ? wg->lnf_w : NULL, wg ? wg->lnf_b : NULL, b->dln, b->dres);
    } else {
        /* seeds alone, all below block top: its output's gradient is 0 */
        for (int r = 0; r < b->g->n_metric_rows; r++) b->g->metric_out[r] = 0.0f;
        *b->g->value_out = 0.0;
    }
    int low = lowest_block(m, b->g);
    for (int l = top - 1; l >= 0 && l >= low; l--) {
        block_backward(b, l);
        if (ms_interrupted()) break;
    }
    if (low < 0 && !ms_interrupted()) embedding_backward(b);
    if (ms_interrupted()) {
        snprintf(err->message, sizeof err->message, "interrupted");
        return MS_ERR_INTERRUPTED;
    }
    return MS_OK;
}

static ms_status grad_check(const ms_model *m, const ms_plan *p, const ms_grad_plan *g, ms_error *err) {
    /* before the plan's own check, which would refuse a site's cache action below the
     * start block as an action of a row that does not compute it (a block out of
     * range is the plan check's to report) */
    if (p->start_resid && p->start_block >= 0 && p->start_block < m->cfg.n_layers &&
        (g->weights || lowest_block(m, g) < p->start_block))
        FAIL("start_block: a run that starts at block %d has no gradient for the weights or for a site "
             "before it", p->start_block);
    ms_status st = ms_plan_check(m, p, err);
    if (st) return st;
    if (p->base || p->record || p->n_logit_pos || p->metric.kind != MS_METRIC_NONE)
        FAIL("grad: the plan must not resume a base, record, or ask for logits or a metric");
    for (int i = 0; i < p->n_actions; i++)
        if (p->actions[i].kind == MS_DO_CALLBACK)
            FAIL("hooks: a gradient run cannot call Python hooks (their changes cannot be differentiated); "
                 "use interventions");
    if (g->n_metric_rows < 1 || g->n_metric_rows > p->n_rows)
        FAIL("grad: n_metric_rows %d out of range [1, %d]", g->n_metric_rows, p->n_rows);
    if (!g->value_out || !g->metric_out) FAIL("grad: outputs missing");
    if (g->metric.kind != MS_METRIC_NONE && g->cross_entropy)
        FAIL("metric: give one of a metric and the cross-entropy, not both");
    if (g->metric.kind == MS_METRIC_NONE && !g->cross_entropy && g->n_seeds < 1)
        FAIL("metric: give a metric, the cross-entropy or seeds (the scalar would be 0)");
    if (g->n_seeds < 0 || (g->n_seeds > 0 && !g->seeds)) FAIL("seeds: missing");
    for (int i = 0; i < g->n_seeds; i++) {
        const ms_grad_seed *s = &g->seeds[i];
        if ((int)s->site < 0 || s->site >= MS_N_SITES || !ms_site_exists(&m->cfg, s->site))
            FAIL("seeds: site %d does not exist in this model", s->site);
        if (ms_site_is_attention(s->site)) FAIL("seeds: an attention pattern cannot be a seed's site");
        if (ms_site_per_layer(s->site) && (s->layer < 0 || s->layer >= m->cfg.n_layers))
            FAIL("seeds: layer %d out of range [0, %d)", s->layer, m->cfg.n_layers);
        if (!s->value) FAIL("seeds: no value");
    }
    if (g->metric.kind == MS_METRIC_ACCURACY)
        FAIL("metric: Accuracy (0 or 1) has no gradient; differentiate LogitDiff, LogProb, Prob or KL");
    if (g->metric.kind != MS_METRIC_NONE) {
        ms_plan pc = *p;
        pc.metric = g->metric;
        pc.metric_out = g->metric_out;
        if ((st = ms_plan_check(m, &pc, err))) return st;
    } else if (g->cross_entropy) {
        int pairs = 0;
        for (int r = 0; r < g->n_metric_rows && !pairs; r++)
            for (int t = 0; t + 1 < p->n_pos; t++) pairs += is_real(p, r, t) && is_real(p, r, t + 1);
        if (!pairs) FAIL("cross_entropy: no token has a real next token (every row has a single real token)");
    }
    if (g->n_sites < 0 || (g->n_sites > 0 && !g->sites)) FAIL("sites: missing");
    for (int i = 0; i < g->n_sites; i++) {
        const ms_grad_site *s = &g->sites[i];
        if ((int)s->site < 0 || s->site >= MS_N_SITES || !ms_site_exists(&m->cfg, s->site))
            FAIL("sites: site %d does not exist in this model", s->site);
        if (ms_site_per_layer(s->site) && (s->layer < 0 || s->layer >= m->cfg.n_layers))
            FAIL("sites: layer %d out of range [0, %d)", s->layer, m->cfg.n_layers);
        if (!s->out) FAIL("sites: no output buffer");
    }
    if (g->weights && !g->weights->blocks) FAIL("weights: no block gradients");
    return MS_OK;
}

/* 1 if any weight matrix of m is stored in 2 bytes (the backward pass reads float32) */
static int has_half_weights(const ms_model *m) {
    if (m->wte_dtype != MS_F32 || m->unembed_dtype != MS_F32) return 1;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const ms_block *b = &m->blocks[l];
        if (b->q.dtype || b->k.dtype || b->v.dtype || b->o.dtype || b->mlp_in.dtype || b->mlp_out.dtype ||
            (m->cfg.gated_mlp && b->mlp_gate.dtype) || (m->cfg.n_experts && b->router.dtype))
            return 1;
    }
    return 0;
}

ms_status ms_grad(const ms_model *m, const ms_plan *plan, const ms_grad_plan *g, ms_error *err) {
    if (has_half_weights(m)) {
        snprintf(err->message, sizeof err->message,
                 "gradients need float32 weights; this model keeps 2-byte (bf16/fp16) weight matrices");
        return MS_ERR_VALUE;
    }
    ms_status st = grad_check(m, plan, g, err);
    if (st) return st;
    const volatile int *outer_stop = ms_stop_flag_swap(plan->stop);
    const ms_config *c = &m->cfg;
    ms_layout L = {0};
    ms_tape t = {0};
    bwd b = {0};
    float *mem = NULL;
    size_t total = 0;
    L.n_threads = plan->n_threads > 0 ? plan->n_threads : ms_get_num_threads();
    if ((st = ms_layout_build(&L, m, plan, err))) goto done;
    grad_sizes s = sizes_of(m, plan);
    total = tape_floats(c, s) + backward_floats(c, s);
    mem = ms_workspace_take(m->grad_workspace, total);
    if (!mem) {
        snprintf(err->message, sizeof err->message, "out of memory allocating the gradient run (%zu MB)",
                 total * sizeof(float) >> 20);
        st = MS_ERR_MEMORY;
        goto done;
    }
    size_t N = s.N, C = (size_t)c->d_model, Lr = (size_t)c->n_layers, F = (size_t)c->d_mlp;
    float *p = mem;
#define CARVE(ptr, n) (ptr = p, p += (n))
    t.att = s.att;
    CARVE(t.resid_pre, Lr * N * C);
    CARVE(t.ln1_scale, Lr * N);
    CARVE(t.ln1, Lr * N * C);
    CARVE(t.qkv, Lr * N * qkv_width(c));
    if (c->qk_norm) CARVE(t.qk_pre, Lr * N * (q_width(c) + kv_width(c)));
    CARVE(t.pattern, Lr * s.att);
    if (s.any_pattern_action) CARVE(t.pattern_used, Lr * s.att);
    if (s.capped) CARVE(t.capped, Lr * s.att);
    CARVE(t.z, Lr * N * q_width(c));
    if (c->post_norms) {
        CARVE(t.attn_raw, Lr * N * C);
        CARVE(t.ln1_post_scale, Lr * N);
        CARVE(t.ln1_post, Lr * N * C);
        CARVE(t.mlp_raw, Lr * N * C);
        CARVE(t.ln2_post_scale, Lr * N);
        CARVE(t.ln2_post, Lr * N * C);
    }
    CARVE(t.resid_mid, Lr * N * C);
    CARVE(t.ln2_scale, Lr * N);
    CARVE(t.ln2, Lr * N * C);
    if (c->n_experts) {
        CARVE(t.route_raw, Lr * N * (size_t)c->n_experts);
        CARVE(t.route, Lr * N * (size_t)c->n_experts);
    } else {
        CARVE(t.mlp_pre, Lr * N * mlp_width(c));
        CARVE(t.mlp_post, Lr * N * F);
    }
    CARVE(t.resid_final, N * C);
    CARVE(t.lnf_scale, N);
    CARVE(t.lnf, N * C);
    CARVE(b.dres, N * C);
    CARVE(b.dout, N * C);
    CARVE(b.dln, N * C);
    CARVE(b.xhat, N * C);
    CARVE(b.tmp, N * C);
    CARVE(b.dpar, N * C);
    CARVE(b.dqkv, N * qkv_width(c));
    CARVE(b.dz, N * q_width(c));
    CARVE(b.dpost, N * hidden_width(c));
    CARVE(b.dpre, N * pre_width(c));
    CARVE(b.dscale, N);
    if (c->n_experts) {
        CARVE(b.moe_x, N * C);
        CARVE(b.moe_dy, N * C);
        CARVE(b.moe_o, N * C);
        CARVE(b.moe_dh, N * hidden_width(c));
        CARVE(b.moe_w, N * (size_t)c->n_experts);
        CARVE(b.moe_dw, N * (size_t)c->n_experts);
    }
    CARVE(b.datt, s.att);
    CARVE(b.rope, s.max_keys * (size_t)c->rotary_dim * (m->rope_inv_freq_local ? 2 : 1));
    size_t ch = (size_t)head_chunk(c);
    CARVE(b.head_x, ch * C);
    CARVE(b.head_y, ch * (size_t)c->d_vocab);
    CARVE(b.head_dx, ch * C);
    if (s.logit_softcap) CARVE(b.head_t, ch * (size_t)c->d_vocab);
    b.pairs = (int *)p; /* 2 N ints in the room of 2 N floats */
#undef CARVE
    L.tape = &t;
    L.tape_blocks = taped_blocks(m, plan, g);
    if ((st = ms_forward_layout(m, plan, &L, err))) goto done;
    b.m = m, b.plan = plan, b.g = g, b.L = &L, b.t = &t, b.n_threads = L.n_threads, b.N = L.N;
    st = backward(&b, err);

done:
    ms_stop_flag_swap(outer_stop);
    if (mem) ms_workspace_give(m->grad_workspace, mem, total);
    ms_layout_free(&L);
    return st;
}
