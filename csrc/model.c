/* model.c — validation of a model's configuration and weights.
 *
 * Weights are the caller's buffers (memory-mapped checkpoint files, or arrays);
 * this file checks that they are all present and finite before any run uses them. */
#include "mechscope.h"

#include <math.h>
#include <stdio.h>

#define FAIL(...)                                                  \
    do {                                                           \
        snprintf(err->message, sizeof err->message, __VA_ARGS__);  \
        return MS_ERR_VALUE;                                       \
    } while (0)

/* index of the first non-finite value of x[n], or -1 */
static long long first_non_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return (long long)i;
    return -1;
}

static ms_status check_tensor(const float *x, size_t n, const char *name, int layer, ms_error *err);

/* index of the first non-finite 2-byte value of x[n] (all exponent bits set), or -1 */
static long long first_non_finite_half(const uint16_t *x, size_t n, ms_dtype dtype) {
    uint16_t e = dtype == MS_F16 ? 0x7c00u : 0x7f80u;
    for (size_t i = 0; i < n; i++)
        if ((x[i] & e) == e) return (long long)i;
    return -1;
}

/* a matrix of floats or 2-byte numbers: as check_tensor */
static ms_status check_matrix(const float *x, const uint16_t *x16, ms_dtype dtype, size_t n, const char *name,
                              ms_error *err) {
    if (dtype == MS_F32) return check_tensor(x, n, name, -1, err);
    if (dtype != MS_BF16 && dtype != MS_F16) FAIL("weights: %s has unknown dtype code %d", name, (int)dtype);
    if (!x16) FAIL("weights: %s is missing", name);
    long long bad = first_non_finite_half(x16, n, dtype);
    if (bad >= 0) FAIL("weights: %s has a non-finite value (NaN or inf) at flat index %lld", name, bad);
    return MS_OK;
}

static ms_status check_tensor(const float *x, size_t n, const char *name, int layer, ms_error *err) {
    if (!x) {
        if (layer >= 0) FAIL("weights: blocks.%d.%s is missing", layer, name);
        FAIL("weights: %s is missing", name);
    }
    long long bad = first_non_finite(x, n);
    if (bad >= 0) {
        if (layer >= 0) FAIL("weights: blocks.%d.%s has a non-finite value (NaN or inf) at flat index %lld", layer, name, bad);
        FAIL("weights: %s has a non-finite value (NaN or inf) at flat index %lld", name, bad);
    }
    return MS_OK;
}

static ms_status check_linear(const ms_linear_weight *w, size_t n_in, size_t n_out, const char *name,
                              int layer, ms_error *err) {
    ms_status st;
    int half = w->dtype != MS_F32;
    if (half && w->dtype != MS_BF16 && w->dtype != MS_F16)
        FAIL("weights: blocks.%d.%s has unknown dtype code %d", layer, name, (int)w->dtype);
    if (half ? !w->w16 : !w->w) FAIL("weights: blocks.%d.%s is missing", layer, name);
    size_t rows = w->trans ? n_out : n_in, cols = w->trans ? n_in : n_out;
    if ((size_t)w->ld < cols) FAIL("weights: blocks.%d.%s has row stride %d < %zu", layer, name, w->ld, cols);
    for (size_t r = 0; r < rows; r++) {
        long long bad = half ? first_non_finite_half(w->w16 + r * (size_t)w->ld, cols, w->dtype)
                             : first_non_finite(w->w + r * (size_t)w->ld, cols);
        if (bad >= 0)
            FAIL("weights: blocks.%d.%s has a non-finite value (NaN or inf) in row %zu", layer, name, r);
    }
    char bias[96];
    snprintf(bias, sizeof bias, "%s.bias", name);
    if (w->b && (st = check_tensor(w->b, n_out, bias, layer, err))) return st;
    return MS_OK;
}

/* a mixture of experts' router and every expert's three matrices */
static ms_status check_experts(const ms_block *b, const ms_config *c, int layer, ms_error *err) {
    size_t C = (size_t)c->d_model, F = (size_t)c->d_mlp;
    ms_status st;
    char name[64];
    if ((st = check_linear(&b->router, C, (size_t)c->n_experts, "mlp.router", layer, err))) return st;
    for (int e = 0; e < c->n_experts; e++) {
        const ms_linear_weight *parts[3] = {&b->mlp_gate, &b->mlp_in, &b->mlp_out};
        const char *names[3] = {"gate", "in", "out"};
        for (int i = 0; i < 3; i++) {
            ms_linear_weight w = *parts[i];
            size_t offset = (size_t)e * (i < 2 ? b->expert_in_stride : b->expert_out_stride);
            if (w.w) w.w += offset;
            if (w.w16) w.w16 += offset;
            snprintf(name, sizeof name, "mlp.experts.%d.%s", e, names[i]);
            if ((st = check_linear(&w, i < 2 ? C : F, i < 2 ? F : C, name, layer, err))) return st;
        }
    }
    if (c->d_shared) {
        size_t S = (size_t)c->d_shared;
        if ((st = check_linear(&b->shared_gate, C, S, "mlp.shared.gate", layer, err))) return st;
        if ((st = check_linear(&b->shared_in, C, S, "mlp.shared.in", layer, err))) return st;
        if ((st = check_linear(&b->shared_out, S, C, "mlp.shared.out", layer, err))) return st;
        if ((st = check_linear(&b->shared_router, C, 1, "mlp.shared.router", layer, err))) return st;
    }
    return MS_OK;
}

ms_status ms_model_check(const ms_model *m, ms_error *err) {
    const ms_config *c = &m->cfg;
    if (c->n_layers < 1 || c->d_model < 1 || c->n_heads < 1 || c->d_mlp < 1 || c->d_vocab < 1 ||
        c->n_ctx < 1 || c->d_head < 1 || c->n_kv_heads < 1)
        FAIL("config: sizes must be positive (n_layers=%d d_model=%d n_heads=%d n_kv_heads=%d d_head=%d "
             "d_mlp=%d d_vocab=%d n_ctx=%d)",
             c->n_layers, c->d_model, c->n_heads, c->n_kv_heads, c->d_head, c->d_mlp, c->d_vocab, c->n_ctx);
    if (c->n_heads % c->n_kv_heads)
        FAIL("config: n_heads (%d) must be a multiple of n_kv_heads (%d)", c->n_heads, c->n_kv_heads);
    if ((int)c->activation < 0 || c->activation >= MS_N_ACTIVATIONS)
        FAIL("config: unknown activation_function code %d", c->activation);
    if (c->norm != MS_NORM_LAYER && c->norm != MS_NORM_RMS) FAIL("config: unknown norm kind %d", c->norm);
    if (c->rotary_dim < 0 || c->rotary_dim % 2 || c->rotary_dim > c->d_head)
        FAIL("config: rotary_dim %d must be even and within [0, d_head=%d]", c->rotary_dim, c->d_head);
    if (!(c->ln_eps >= 0.0f)) FAIL("config: layer_norm_epsilon must be >= 0");
    if (c->n_experts < 0 || (c->n_experts && (c->experts_per_token < 1 || c->experts_per_token > c->n_experts)))
        FAIL("config: experts_per_token (%d) must be within [1, n_experts=%d]", c->experts_per_token, c->n_experts);
    if (c->n_experts && !c->gated_mlp) FAIL("config: a mixture of experts needs gated MLPs");
    if (c->d_shared < 0 || (c->d_shared && !c->n_experts))
        FAIL("config: d_shared (%d) must be 0, or > 0 in a mixture of experts", c->d_shared);
    if (c->qk_norm && !c->rotary_dim) FAIL("config: per-head query and key norms need rotary positions");
    if (!m->blocks) FAIL("weights: no blocks");

    size_t C = (size_t)c->d_model, F = (size_t)c->d_mlp, V = (size_t)c->d_vocab;
    size_t QD = (size_t)c->n_heads * c->d_head, KD = (size_t)c->n_kv_heads * c->d_head;
    ms_status st;
#define CHECK(ptr, n, name, layer) \
    if ((st = check_tensor(ptr, n, name, layer, err))) return st
#define CHECK_OPT(ptr, n, name, layer) \
    if (ptr && (st = check_tensor(ptr, n, name, layer, err))) return st
#define CHECK_LIN(w, n_in, n_out, name, layer) \
    if ((st = check_linear(&(w), n_in, n_out, name, layer, err))) return st
    if ((st = check_matrix(m->wte, m->wte16, m->wte_dtype, V * C, "embed", err))) return st;
    if (!(isfinite(m->attn_scale) && m->attn_scale >= 0.0f && isfinite(m->attn_softcap) &&
          m->attn_softcap >= 0.0f && isfinite(m->logit_softcap) && m->logit_softcap >= 0.0f))
        FAIL("config: attn_scale, attn_softcap and logit_softcap must be finite numbers >= 0 (0: none)");
    if (c->post_norms && (c->norm != MS_NORM_RMS || c->n_experts))
        FAIL("config: the outputs' norms (post_norms) are RMSNorms, of blocks without experts");
    if (c->qk_norm < 0 || c->qk_norm > 2) FAIL("config: qk_norm must be 0, 1 (per head) or 2 (all heads)");
    if (c->input_norms != 0 && c->input_norms != 1) FAIL("config: input_norms must be 0 or 1");
    if (!c->input_norms && (!c->post_norms || c->parallel))
        FAIL("config: blocks without input norms (input_norms 0) need the outputs' norms (post_norms), in sequence");
    if (!(isfinite(m->embed_scale) && m->embed_scale > 0.0f))
        FAIL("config: embed_scale must be a finite number > 0, got %g", (double)m->embed_scale);
    if (m->padding_idx < -1 || m->padding_idx >= c->d_vocab)
        FAIL("config: padding_idx must be a token (0 to %d) or -1 (none), got %d", c->d_vocab - 1, m->padding_idx);
    if (c->rotary_dim) {
        CHECK(m->rope_inv_freq, (size_t)c->rotary_dim / 2, "rope_inv_freq", -1);
        CHECK_OPT(m->rope_inv_freq_local, (size_t)c->rotary_dim / 2, "rope_inv_freq_local", -1);
        if (!isfinite(m->rope_scale)) FAIL("config: rope scale is not finite");
    } else {
        CHECK(m->wpe, (size_t)c->n_ctx * C, "pos_embed", -1);
    }
    CHECK(m->lnf_w, C, "ln_final.w", -1);
    CHECK_OPT(m->lnf_b, C, "ln_final.b", -1);
    CHECK_OPT(m->unembed_b, V, "unembed.b", -1);
    int tied = m->unembed_dtype == m->wte_dtype &&
               (m->wte_dtype == MS_F32 ? m->unembed == m->wte : m->unembed16 == m->wte16);
    if (!tied && (st = check_matrix(m->unembed, m->unembed16, m->unembed_dtype, V * C, "unembed", err))) return st;
    for (int l = 0; l < c->n_layers; l++) {
        const ms_block *b = &m->blocks[l];
        if (b->rope_local && !(c->rotary_dim && m->rope_inv_freq_local))
            FAIL("config: block %d rotates with local angles, and the model has none (rope_inv_freq_local)", l);
        if (c->input_norms) {
            CHECK(b->ln1_w, C, "ln1.w", l);
            CHECK(b->ln2_w, C, "ln2.w", l);
        } else if (b->ln1_w || b->ln1_b || b->ln2_w || b->ln2_b) {
            FAIL("config: block %d has input norms, and input_norms is 0", l);
        }
        CHECK_OPT(b->ln1_b, C, "ln1.b", l);
        CHECK_LIN(b->q, C, QD, "attn.q", l);
        CHECK_LIN(b->k, C, KD, "attn.k", l);
        CHECK_LIN(b->v, C, KD, "attn.v", l);
        CHECK_LIN(b->o, QD, C, "attn.o", l);
        if (c->qk_norm) {
            CHECK(b->q_norm_w, c->qk_norm == 2 ? QD : (size_t)c->d_head, "attn.q_norm.w", l);
            CHECK(b->k_norm_w, c->qk_norm == 2 ? KD : (size_t)c->d_head, "attn.k_norm.w", l);
        }
        CHECK_OPT(b->ln2_b, C, "ln2.b", l);
        if (c->post_norms) {
            CHECK(b->ln1_post_w, C, "ln1_post.w", l);
            CHECK(b->ln2_post_w, C, "ln2_post.w", l);
        }
        if (c->n_experts) {
            if ((st = check_experts(b, c, l, err))) return st;
            continue;
        }
        CHECK_LIN(b->mlp_in, C, F, "mlp.in", l);
        if (c->gated_mlp) CHECK_LIN(b->mlp_gate, C, F, "mlp.gate", l);
        CHECK_LIN(b->mlp_out, F, C, "mlp.out", l);
    }
#undef CHECK
#undef CHECK_OPT
#undef CHECK_LIN
    return MS_OK;
}
