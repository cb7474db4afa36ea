/* tape.h — what the forward pass of a gradient run keeps for the backward pass.
 *
 * Every array holds packed token rows (run.h's layout; a gradient run computes every
 * row from the embedding). Per-layer arrays are slabs of [N, width], one per block.
 * Values are kept as the next operation read them, after the plan's actions at
 * their site: the backward pass differentiates the intervened run. */
#ifndef MS_TAPE_H
#define MS_TAPE_H

#include <stddef.h>

typedef struct ms_tape {
    size_t att;          /* floats of one layer's attention (sum over rows of H * n * n) */
    float *resid_pre;    /* [L][N, C]  input of ln1 (and of ln2 in parallel blocks) */
    float *ln1_scale;    /* [L][N]     ln1's divisor after its actions */
    float *ln1;          /* [L][N, C]  ln1.hook_normalized after its actions */
    float *qkv;          /* [L][N, QW] q | k | v as attention read them (normalised, rotated) */
    float *qk_pre;       /* [L][N, QD + KD] q | k before their per-head norm (qk_norm only) */
    float *pattern;      /* [L][att]   softmax of the scores, before the pattern's actions */
    float *pattern_used; /* [L][att]   after them; NULL when no action changes a pattern */
    float *capped;       /* [L][att]   soft-capped scores before the scores' actions (attn_softcap only) */
    float *z;            /* [L][N, QD] */
    float *attn_raw;     /* [L][N, C]  post_norms only: the attention's output before its norm, */
    float *ln1_post_scale; /* [L][N]   that norm's divisor */
    float *ln1_post;     /* [L][N, C]  and its hook_normalized, after their actions */
    float *resid_mid;    /* [L][N, C]  input of ln2 (sequential blocks) */
    float *ln2_scale;    /* [L][N] */
    float *ln2;          /* [L][N, C] */
    float *mlp_pre;      /* [L][N, MW] hook_pre (gated: gate | up) after their actions */
    float *mlp_post;     /* [L][N, F]  hook_post after its actions (not for mixtures of experts) */
    float *mlp_raw;      /* [L][N, C]  post_norms only: the MLP's output before its norm, */
    float *ln2_post_scale; /* [L][N] */
    float *ln2_post;     /* [L][N, C] */
    float *route_raw;    /* [L][N, E]  mixtures of experts: the router's softmax, before the actions */
    float *route;        /* [L][N, E]  hook_expert_weights after them */
    float *resid_final;  /* [N, C]     input of ln_final */
    float *lnf_scale;    /* [N] */
    float *lnf;          /* [N, C]     ln_final.hook_normalized after its actions */
} ms_tape;

#endif
