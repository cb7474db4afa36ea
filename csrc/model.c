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

ms_status ms_model_check(const ms_model *m, ms_error *err) {
    const ms_config *c = &m->cfg;
    if (c->n_layers < 1 || c->d_model < 1 || c->n_heads < 1 || c->d_mlp < 1 || c->d_vocab < 1 ||
        c->n_ctx < 1)
        FAIL("config: sizes must be positive (n_layer=%d n_embd=%d n_head=%d n_inner=%d vocab_size=%d n_positions=%d)",
             c->n_layers, c->d_model, c->n_heads, c->d_mlp, c->d_vocab, c->n_ctx);
    if (c->d_head * c->n_heads != c->d_model)
        FAIL("config: n_embd (%d) must be a multiple of n_head (%d)", c->d_model, c->n_heads);
    if ((int)c->activation < 0 || c->activation >= MS_N_ACTIVATIONS)
        FAIL("config: unknown activation_function code %d", c->activation);
    if (!(c->ln_eps >= 0.0f)) FAIL("config: layer_norm_epsilon must be >= 0");
    if (!m->blocks) FAIL("weights: no blocks");

    size_t C = (size_t)c->d_model, F = (size_t)c->d_mlp, V = (size_t)c->d_vocab;
    ms_status st;
#define CHECK(ptr, n, name, layer) \
    if ((st = check_tensor(ptr, n, name, layer, err))) return st
    CHECK(m->wte, V * C, "wte.weight", -1);
    CHECK(m->wpe, (size_t)c->n_ctx * C, "wpe.weight", -1);
    CHECK(m->lnf_w, C, "ln_f.weight", -1);
    CHECK(m->lnf_b, C, "ln_f.bias", -1);
    if (m->unembed != m->wte) CHECK(m->unembed, V * C, "lm_head.weight", -1);
    for (int l = 0; l < c->n_layers; l++) {
        const ms_block *b = &m->blocks[l];
        CHECK(b->ln1_w, C, "ln_1.weight", l);
        CHECK(b->ln1_b, C, "ln_1.bias", l);
        CHECK(b->w_qkv, C * 3 * C, "attn.c_attn.weight", l);
        CHECK(b->b_qkv, 3 * C, "attn.c_attn.bias", l);
        CHECK(b->w_o, C * C, "attn.c_proj.weight", l);
        CHECK(b->b_o, C, "attn.c_proj.bias", l);
        CHECK(b->ln2_w, C, "ln_2.weight", l);
        CHECK(b->ln2_b, C, "ln_2.bias", l);
        CHECK(b->w_in, C * F, "mlp.c_fc.weight", l);
        CHECK(b->b_in, F, "mlp.c_fc.bias", l);
        CHECK(b->w_out, F * C, "mlp.c_proj.weight", l);
        CHECK(b->b_out, C, "mlp.c_proj.bias", l);
    }
#undef CHECK
    return MS_OK;
}
