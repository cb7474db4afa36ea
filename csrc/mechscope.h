/* mechscope.h — the public C API of mechscope's compute core.
 *
 * The core runs transformer forward passes (GPT-2, Llama, Qwen2, GPT-NeoX) on float32 buffers the
 * caller owns, and at every named activation ("site") it can store the value
 * (cache), change it (interventions) or hand it to a callback. Nothing here knows
 * about Python; the binding (pymodule.c) includes only this header.
 *
 * Conventions: every function returns MS_OK or an error status and writes a
 * message into an ms_error; nothing exits or aborts. All sizes come from the
 * caller. Matrices are row-major float32, or for the weight matrices also 2-byte
 * bfloat16 / float16 (ms_dtype), widened to float32 inside the products.
 */
#ifndef MECHSCOPE_H
#define MECHSCOPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MS_OK = 0, MS_ERR_VALUE = 1, MS_ERR_MEMORY = 2, MS_ERR_CALLBACK = 3,
    MS_ERR_INTERRUPTED = 4 /* the caller's interrupt flag was set (see ms_plan.stop) */
} ms_status;

typedef struct {
    char message[512];
} ms_error;

/* Activation functions of the MLP, named as in HuggingFace's ACT2FN. */
typedef enum {
    MS_ACT_GELU_NEW = 0, /* tanh approximation (GPT-2's default) */
    MS_ACT_GELU,         /* exact, with erf */
    MS_ACT_RELU,
    MS_ACT_SILU,
    MS_ACT_GELU_FAST,    /* tanh approximation written as x*0.7978845608*(1+0.044715x^2) */
    MS_ACT_QUICK_GELU,   /* x * sigmoid(1.702 x) */
    MS_ACT_TANH,
    MS_ACT_SIGMOID,
    MS_N_ACTIVATIONS
} ms_activation;

/* Normalization layers: LayerNorm (x - mean) / sqrt(var + eps) * w + b, or RMSNorm
 * x / sqrt(mean(x^2) + eps) * w (+ b when given). */
typedef enum { MS_NORM_LAYER = 0, MS_NORM_RMS = 1 } ms_norm_kind;

/* An architecture is data: the parts of its block. GPT-2 is LayerNorm, learned
 * positions, one MLP matrix in, sequential residual; Llama is RMSNorm, rotary,
 * grouped keys/values, gated MLP; GPT-NeoX is LayerNorm, partial rotary, parallel
 * attention and MLP. */
typedef struct {
    int n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx;
    int n_kv_heads;                  /* key/value heads; n_heads % n_kv_heads == 0 */
    float ln_eps;
    ms_norm_kind norm;
    ms_activation activation;
    int gated_mlp;                   /* post = act(x @ gate) * (x @ in) (SwiGLU) */
    int parallel;                    /* resid_post = resid_pre + attn(ln1 x) + mlp(ln2 x) */
    int rotary_dim;                  /* 0: learned positions (wpe); else the first rotary_dim
                                        dims of each q/k head are rotated (half-split, as HF) */
    int rotary_interleaved;          /* 1: rotated in adjacent pairs (2i, 2i + 1) instead (GPT-J) */
    int scale_attn_weights;          /* divide scores by sqrt(d_head) */
    int scale_attn_by_inverse_layer; /* also divide scores by (layer + 1) */
    int n_experts;                   /* 0: one MLP; else a mixture of experts (Mixtral): a router
                                        picks experts_per_token of n_experts gated MLPs per token */
    int experts_per_token;
    int expert_renormalize;          /* 1: the chosen experts' probabilities are renormalised to sum 1
                                        (Mixtral; Qwen3-MoE's norm_topk_prob); 0: used as they are */
    int d_shared;                    /* mixtures of experts: 0, or the width of a shared expert every
                                        token runs (Qwen2-MoE), a gated MLP whose output is scaled by
                                        sigmoid(x . shared_router) and added to the chosen experts' */
    int qk_norm;                     /* queries and keys RMS-normalised after hook_q / hook_k, before
                                        the rotation: 1 per head (Qwen3's q_norm, k_norm, [d_head]
                                        weights), 2 over all heads at once (OLMo 2's, [width]) */
    int post_norms;                  /* the attention's and the MLP's outputs are normed again
                                        (ln1_post, ln2_post) before they join the stream (Gemma 2) */
    int input_norms;                 /* 1: ln1 and ln2 norm the attention's and the MLP's inputs; 0:
                                        they read the stream as it is (OLMo 2, with post_norms) */
} ms_config;

/* How a weight matrix is stored: float32, or two bytes per number (bfloat16, the top
 * half of a float32; or IEEE float16). 2-byte matrices stay 2-byte in memory: each
 * product widens one panel of them at a time into a per-thread float32 buffer. */
typedef enum { MS_F32 = 0, MS_BF16 = 1, MS_F16 = 2 } ms_dtype;

/* A linear layer: out[N, n_out] = in[N, n_in] @ W + b. W is [n_in, n_out] (HF's
 * Conv1D) or, with trans, [n_out, n_in] (nn.Linear); rows of stride ld, so that a
 * column block of a fused matrix can be given in place. b may be NULL (and is
 * float32 always). W is w (dtype MS_F32) or the 2-byte w16 (MS_BF16, MS_F16). */
typedef struct {
    const float *w;
    const float *b;
    int ld, trans;
    ms_dtype dtype;
    const uint16_t *w16;
} ms_linear_weight;

/* One transformer block. Norm biases may be NULL (RMSNorm). */
typedef struct {
    const float *ln1_w, *ln1_b;  /* [d_model] */
    ms_linear_weight q, k, v;    /* d_model -> n_heads*d_head, n_kv_heads*d_head (x2) */
    ms_linear_weight o;          /* n_heads*d_head -> d_model */
    const float *q_norm_w, *k_norm_w; /* [d_head] (qk_norm only) */
    const float *ln2_w, *ln2_b;  /* [d_model] */
    const float *ln1_post_w, *ln2_post_w; /* [d_model] the outputs' norms (post_norms only; RMSNorm) */
    int rope_local;              /* rotary models: 1 when the block rotates with the model's local
                                    angles (Gemma 3's sliding-window layers) */
    int attn_window;             /* > 0: sliding-window attention, a query sees the last attn_window
                                    tokens (itself included); 0: every earlier token */
    ms_linear_weight mlp_in;     /* d_model -> d_mlp (the "up" projection when gated) */
    ms_linear_weight mlp_gate;   /* d_model -> d_mlp, gated MLPs only */
    ms_linear_weight mlp_out;    /* d_mlp -> d_model */
    /* mixture of experts (cfg.n_experts > 0): mlp_gate, mlp_in and mlp_out are expert 0's;
     * expert e's are e * expert_in_stride (gate and up) and e * expert_out_stride numbers
     * further into the same arrays */
    ms_linear_weight router;     /* d_model -> n_experts */
    size_t expert_in_stride, expert_out_stride;
    /* the shared expert (cfg.d_shared > 0): gate, up d_model -> d_shared, out d_shared ->
     * d_model, and its gate's weights d_model -> 1 */
    ms_linear_weight shared_gate, shared_in, shared_out, shared_router;
} ms_block;

/* A run's working memory kept for the next run of the same model: large runs
 * would otherwise pay for fresh pages (page faults) every time. Thread-safe; a
 * run that finds it in use allocates its own. */
typedef struct ms_workspace ms_workspace;
ms_workspace *ms_workspace_new(void);
void ms_workspace_free(ms_workspace *w);
/* at least n floats: the kept buffer if it is free and fits, else a new one (NULL
 * when out of memory); give it back with ms_workspace_give(w, buf, n) */
float *ms_workspace_take(ms_workspace *w, size_t n);
void ms_workspace_give(ms_workspace *w, float *buf, size_t n);

typedef struct {
    ms_config cfg;
    ms_workspace *workspace;     /* may be NULL: every run allocates afresh */
    ms_workspace *grad_workspace; /* the same for a gradient run's tape (may be NULL) */
    const float *wte;            /* [d_vocab, d_model] token embedding (NULL if 2-byte: wte16) */
    const float *wpe;            /* [n_ctx, d_model] position embedding (NULL with rotary) */
    const float *rope_inv_freq;  /* [rotary_dim / 2] angle per position of each pair (rotary) */
    float rope_scale;            /* cos and sin are multiplied by this (1 but for YaRN-like types) */
    const float *rope_inv_freq_local; /* [rotary_dim / 2] or NULL: the angles of the blocks marked
                                    rope_local (not multiplied by rope_scale) */
    float embed_scale;           /* hook_embed = wte[token] * this (Gemma: sqrt(d_model); else 1) */
    int padding_idx;             /* >= 0: this token's embedding row takes no gradient from the
                                    lookup (nn.Embedding's padding_idx); -1: none */
    float attn_scale;            /* > 0: scores = q.k * this, instead of / sqrt(d_head) (Gemma 2's
                                    query_pre_attn_scalar^-1/2) */
    float attn_softcap;          /* > 0: scores <- cap tanh(scores / cap) before the mask (Gemma 2) */
    float logit_softcap;         /* > 0: logits <- cap tanh(logits / cap) (Gemma 2) */
    const float *lnf_w, *lnf_b;  /* [d_model]; lnf_b may be NULL */
    const float *unembed;        /* [d_vocab, d_model]: logits = x @ unembed^T (== wte when tied;
                                    NULL if 2-byte: unembed16) */
    const float *unembed_b;      /* [d_vocab] or NULL: added to the logits (Phi, GPT-J) */
    const ms_block *blocks;      /* [n_layers] */
    /* 2-byte embedding / unembedding (dtype MS_BF16 or MS_F16): then wte / unembed
     * are NULL and these hold them (unembed16 == wte16 when tied) */
    ms_dtype wte_dtype, unembed_dtype;
    const uint16_t *wte16, *unembed16;
} ms_model;

/* Sites, in the order a forward pass visits them (TransformerLens's hook order). */
typedef enum {
    MS_SITE_EMBED = 0,      /* hook_embed          [b, p, d_model] */
    MS_SITE_POS_EMBED,      /* hook_pos_embed      [b, p, d_model] */
    MS_SITE_RESID_PRE,      /* blocks.L.hook_resid_pre */
    MS_SITE_LN1_SCALE,      /* ln1.hook_scale      [b, p, 1] */
    MS_SITE_LN1_NORMALIZED, /* ln1.hook_normalized [b, p, d_model] */
    MS_SITE_Q,              /* attn.hook_q         [b, p, head, d_head] */
    MS_SITE_K,
    MS_SITE_V,
    MS_SITE_ROT_Q,          /* attn.hook_rot_q     q after rotary (rotary models) */
    MS_SITE_ROT_K,          /* attn.hook_rot_k     [b, p, kv_head, d_head] */
    MS_SITE_ATTN_SCORES,    /* attn.hook_attn_scores [b, head, q, k] */
    MS_SITE_PATTERN,        /* attn.hook_pattern     [b, head, q, k] */
    MS_SITE_Z,              /* attn.hook_z         [b, p, head, d_head] */
    MS_SITE_LN1_POST_SCALE, /* ln1_post.hook_scale [b, p, 1] the attention output's norm (post_norms) */
    MS_SITE_LN1_POST_NORMALIZED,
    MS_SITE_ATTN_OUT,       /* hook_attn_out */
    MS_SITE_RESID_MID,
    MS_SITE_LN2_SCALE,
    MS_SITE_LN2_NORMALIZED,
    MS_SITE_EXPERT_WEIGHTS, /* mlp.hook_expert_weights [b, p, n_experts] the router's softmax (mixtures of experts) */
    MS_SITE_MLP_PRE,        /* mlp.hook_pre        [b, p, d_mlp] (the gate, when gated) */
    MS_SITE_MLP_PRE_LINEAR, /* mlp.hook_pre_linear [b, p, d_mlp] the up projection (gated) */
    MS_SITE_MLP_POST,
    MS_SITE_LN2_POST_SCALE, /* ln2_post.hook_scale the MLP output's norm (post_norms) */
    MS_SITE_LN2_POST_NORMALIZED,
    MS_SITE_MLP_OUT,
    MS_SITE_RESID_POST,
    MS_SITE_LNF_SCALE,      /* ln_final.hook_scale */
    MS_SITE_LNF_NORMALIZED,
    MS_N_SITES
} ms_site;

/* Width of one token's value at a token site (0 for the attention sites). */
int ms_site_width(const ms_config *cfg, ms_site site);
/* 1 when the model's architecture has this site (hook_pos_embed only with learned
 * positions, hook_rot_* only with rotary, hook_pre_linear only gated, hook_resid_mid
 * only sequential blocks; a mixture of experts has hook_expert_weights instead of
 * hook_pre, hook_pre_linear and hook_post, which would hold each expert's own tokens). */
int ms_site_exists(const ms_config *cfg, ms_site site);
/* 1 for sites that exist once per block, 0 for the embedding and final sites. */
int ms_site_per_layer(ms_site site);
/* 1 for hook_attn_scores and hook_pattern, whose value per row is [head, q, k]. */
int ms_site_is_attention(ms_site site);

/* What a plan does at one site.
 *
 * A selection picks a box of the row's value: for token sites the value of row r
 * is [pos, width] and the box is (positions a[] x columns b[]); for attention
 * sites it is [head, q, k] and the box is (heads a[] x queries b[] x keys c[]).
 * Positions are those of the caller's padded [batch, pos] layout. Values for SET
 * and ADD are dense over the box: [n_a, n_b] or [n_a, n_b, n_c].
 *
 * At attention sites the causal mask holds whatever a plan does: entries whose key
 * comes after its query (and padding) are never written, by actions or callbacks;
 * they stay -inf in the scores and 0 in the pattern. */
typedef enum {
    MS_DO_CACHE = 0,  /* copy the whole site, all rows, into out [batch, pos, width] / [batch, head, pos, pos] */
    MS_DO_SET,        /* box <- value */
    MS_DO_ADD,        /* box <- box + value */
    MS_DO_SCALE,      /* box <- box * value[0] */
    MS_DO_COPY_ROW,   /* box <- the same box of row src_row, at this same site */
    MS_DO_PROJECT,    /* box rows b <- (I - Q Q^T) b + Q Q^T s, Q = value [width_sel, rank], s = value2 [n_a, n_b] */
    MS_DO_CALLBACK,   /* call callback(ctx, id, site, layer, out) with the site's value gathered to out, then scatter back */
    MS_DO_PROJECT_ROW,/* as PROJECT, with s the same box of row src_row at this same site */
} ms_action_kind;

typedef struct {
    ms_action_kind kind;
    ms_site site;
    int layer;          /* block index for per-layer sites, ignored otherwise */
    int row;            /* batch row the action applies to; -1 for every row */
    int src_row;        /* MS_DO_COPY_ROW and MS_DO_PROJECT_ROW only */
    int n_a, n_b, n_c;  /* selection sizes (n_c only for attention sites) */
    const int *a, *b, *c;
    const float *value; /* SET / ADD / SCALE / PROJECT's basis */
    const float *value2;/* PROJECT's source values */
    int rank;           /* PROJECT's number of basis vectors */
    float *out;         /* CACHE / CALLBACK: dense [batch, pos, width] or [batch, head, pos, pos] */
    int id;             /* CALLBACK: passed back to the callback */
} ms_action;

/* A callback returns 0 to go on, nonzero to stop the run with MS_ERR_CALLBACK. */
typedef int (*ms_callback)(void *ctx, int id, ms_site site, int layer, float *value);

/* The state of a finished run that later rows resume from: each layer's residual
 * stream before the block (NULL in a state with a capacity: then only rows starting
 * from the embedding may resume it), and its keys and values, for every
 * real token. Patched rows of a sweep and the steps of generation resume one. */
typedef struct {
    int n_layers, d_model, d_kv;  /* d_kv = n_kv_heads * d_head */
    int n_rows, n_pos, N;   /* the base run's layout: N token slots per layer */
    int *row_off;           /* [n_rows + 1] first token slot of each row */
    int *n_tokens;          /* [n_rows] tokens recorded for each row, in its first slots */
    int capacity;           /* 0: rows packed (each row's slots are its tokens); else every
                               row has this many slots, and later runs append to it */
    float *resid;           /* [n_layers, N, d_model] hook_resid_pre */
    float *k, *v;           /* [n_layers, N, d_kv] keys (after rotary) and values, heads side by side;
                               with a capacity, each row's keys are [d_kv, capacity] instead
                               (dimension-major: how attention reads them, without transposing) */
} ms_state;

void ms_state_free(ms_state *s);

/* Metrics a run reduces its logits to, one value per row, in C. */
typedef enum {
    MS_METRIC_NONE = 0,
    MS_METRIC_LOGIT_DIFF, /* logit[correct] - logit[wrong] */
    MS_METRIC_LOGPROB,    /* log softmax[correct] */
    MS_METRIC_PROB,       /* softmax[correct] */
    MS_METRIC_KL,         /* KL(reference || this run) over the vocabulary */
    MS_METRIC_ACCURACY,   /* 1 if correct is the top logit (the first of equal ones), else 0; no gradient */
} ms_metric_kind;

typedef struct {
    ms_metric_kind kind;
    const int32_t *pos;       /* [n_rows] padded position each row's metric reads */
    const int32_t *correct;   /* [n_rows] */
    const int32_t *wrong;     /* [n_rows] (logit difference) */
    const float *ref_logprob; /* [n_rows, d_vocab] (KL): the reference's log-probabilities */
} ms_metric;

typedef struct {
    int n_rows, n_pos;       /* the caller's padded layout [n_rows, n_pos] */
    const int32_t *tokens;   /* [n_rows, n_pos] */
    const int32_t *mask;     /* [n_rows, n_pos], 1 = real token; NULL = all real */
    int n_actions;
    const ms_action *actions;/* applied in this order at each site */
    /* logits: for each row, n_logit_pos positions of the padded layout
     * (logit_pos [n_rows, n_logit_pos]); written to logits [n_rows, n_logit_pos, d_vocab] */
    int n_logit_pos;
    const int32_t *logit_pos;
    float *logits;
    ms_callback callback;
    void *callback_ctx;
    int n_threads;
    /* Rows that resume a base run (patching sweeps); all NULL for an ordinary run.
     * Row r copies row base_row[r] of the base run, is computed from block
     * start_layer[r] (-1: from the embedding; non-decreasing over rows) at positions
     * >= start_pos[r] (padded position of a real token), and reads everything
     * before from the base. */
    const ms_state *base;
    const int32_t *base_row, *start_layer, *start_pos;
    /* Rows that start from a given residual stream, all at one block: with
     * start_resid set (not with base), every row is computed from block
     * start_block on, with start_resid [n_rows, n_pos, d_model] (the padded
     * layout; padding is not read) as its hook_resid_pre there. For repeated
     * gradient runs whose earlier blocks never change (DAS's base inputs). */
    const float *start_resid;
    int start_block;
    ms_state *record;        /* if set, the run records its state here (allocated by ms_run).
                                A run that resumes a base records only by appending its tokens
                                to that base in place: record == base, a state recorded with
                                room for them, row r resuming row r, every row from the
                                embedding */
    int record_capacity;     /* > 0: the recorded state has room for this many real tokens
                                per row, and keeps keys and values only */
    ms_metric metric;        /* if kind != NONE: metric_out[n_rows] */
    float *metric_out;
    /* If not NULL, the run polls *stop between layers, matrix panels and attention
     * heads, and returns MS_ERR_INTERRUPTED soon after another thread sets it. */
    const volatile int *stop;
} ms_plan;

/* Check shapes, finiteness of all weights; fills err on failure. */
ms_status ms_model_check(const ms_model *m, ms_error *err);

/* Check a plan against a model without running it. */
ms_status ms_plan_check(const ms_model *m, const ms_plan *plan, ms_error *err);

/* Bytes of working memory ms_run would allocate for this plan. */
size_t ms_run_workspace_bytes(const ms_model *m, const ms_plan *plan);

/* Run the plan: one forward pass of all rows, applying the actions at their sites.
 * A plan without logits, metric or record stops after the deepest block one of
 * its actions is at: later blocks and the unembedding are not computed. */
ms_status ms_run(const ms_model *m, const ms_plan *plan, ms_error *err);

/* A patching sweep: every patch is one intervened run of all base rows, of which
 * only what the patch can change is recomputed (layers >= its first layer,
 * positions >= its first position), many patches together through each matrix
 * product.
 *
 * A patch is one or more writes; a write sets a box of one site's value to the
 * same box of a source value (the clean run's cache, say). Rows for which every
 * write would leave the value as it is, or which only touch positions after the
 * one their metric reads, cannot change and are not recomputed. */
typedef struct {
    ms_site site;
    int layer;
    int a0, na, b0, nb, c0, nc; /* the box, as contiguous ranges (see ms_action) */
    const float *source;        /* the site's full value in the padded layout, for
                                   source_rows rows: [rows, n_pos, width] or [rows, head, n_pos, n_pos] */
    int source_rows;            /* n_rows (row b reads source row b) or 1 (all read row 0) */
} ms_write;

typedef struct {
    int first_write, n_writes;  /* writes[first_write .. first_write + n_writes) */
} ms_patch;

typedef struct {
    int n_rows, n_pos;           /* the base run [n_rows, n_pos] */
    const int32_t *tokens, *mask;
    int n_base_actions;          /* interventions of the base run (SET, ADD, SCALE, PROJECT), */
    const ms_action *base_actions; /* which hold under every patch too */
    int n_writes;
    const ms_write *writes;
    int n_patches;
    const ms_patch *patches;
    ms_metric metric;            /* per base row */
    size_t chunk_bytes;          /* working memory per chunk of rows */
    int (*progress)(void *ctx, int done, int total); /* nonzero return stops the sweep */
    void *progress_ctx;
    int n_threads;
    const volatile int *stop;    /* as ms_plan's: polled throughout, MS_ERR_INTERRUPTED */
} ms_sweep_plan;

/* Check a sweep against a model without running it. */
ms_status ms_sweep_check(const ms_model *m, const ms_sweep_plan *s, ms_error *err);

/* out[n_patches, n_rows]: the metric of every base row under every patch; if
 * base_out is not NULL, base_out[n_rows]: the metric of the unpatched base run. */
ms_status ms_sweep(const ms_model *m, const ms_sweep_plan *s, float *out, float *base_out,
                   ms_error *err);

/* ---- gradients ------------------------------------------------------------------
 *
 * ms_grad runs a plan forward (its actions applied, caches filled) and then
 * backward: the gradient of one scalar with respect to chosen sites and, if asked,
 * every weight. The scalar is the sum over the first n_metric_rows rows of a
 * metric, or the mean next-token cross-entropy over those rows. Values written by
 * actions are constants (SET, COPY_ROW, the source part of PROJECT*); ADD is the
 * identity, SCALE multiplies the gradient, PROJECT* pass (I - Q Q^T) g. */

typedef struct {
    ms_site site;
    int layer;  /* for per-layer sites */
    float *out; /* [n_rows, n_pos, width] or [n_rows, head, n_pos, n_pos]: d scalar / d site value
                   (after the site's actions); 0 at padding */
} ms_grad_site;

/* Weight gradients, laid out as the weights they belong to (same ld and trans; a
 * fused matrix's blocks point into one buffer). Accumulated (+=): the caller zeros
 * them. NULL pointers are skipped; unembed may equal wte (tied). */
typedef struct {
    float *w, *b;
} ms_linear_grad;

typedef struct {
    float *ln1_w, *ln1_b;
    ms_linear_grad q, k, v, o;
    float *q_norm_w, *k_norm_w;
    float *ln2_w, *ln2_b;
    float *ln1_post_w, *ln2_post_w;
    ms_linear_grad mlp_in, mlp_gate, mlp_out; /* mixtures of experts: every expert's, as the weights */
    ms_linear_grad router;
    ms_linear_grad shared_gate, shared_in, shared_out, shared_router;
} ms_block_grad;

typedef struct {
    float *wte, *wpe, *lnf_w, *lnf_b, *unembed, *unembed_b;
    ms_block_grad *blocks; /* [n_layers] */
} ms_weight_grad;

/* A linear read-out of a token site that the scalar adds: the sum over rows, positions
 * and numbers of value * the site's value (after the site's actions). */
typedef struct {
    ms_site site;        /* a token site (not an attention pattern) */
    int layer;           /* for per-layer sites */
    const float *value;  /* [n_rows, n_pos, width]; ignored at padding */
} ms_grad_seed;

typedef struct {
    ms_metric metric;        /* kind != NONE: the scalar is the sum of the metric over rows */
    int cross_entropy;       /* 1: the scalar is the mean next-token cross-entropy over pairs of
                                real tokens (metric.kind must be NONE) */
    int n_metric_rows;       /* rows 0 .. n_metric_rows - 1 count (later rows: sources) */
    int n_seeds;             /* the scalar also adds these read-outs; with neither a metric nor */
    const ms_grad_seed *seeds; /* the cross-entropy it is their sum alone (value_out, metric_out 0) */
    int n_sites;
    const ms_grad_site *sites;
    ms_weight_grad *weights; /* NULL: no weight gradients */
    double *value_out;       /* [1] the scalar */
    float *metric_out;       /* [n_metric_rows] each row's metric (cross-entropy: the row's mean,
                                NaN for a row without a pair) */
} ms_grad_plan;

/* Bytes of working memory ms_grad would allocate (the forward's and the backward's). */
size_t ms_grad_workspace_bytes(const ms_model *m, const ms_plan *plan, const ms_grad_plan *g);

/* Forward (plan: no logits, metric, record or base; no callbacks) and backward. */
ms_status ms_grad(const ms_model *m, const ms_plan *plan, const ms_grad_plan *g, ms_error *err);

/* out[n, F] = act(x[n, :F]) * x[n, F:2F]: a gated MLP's hidden activations from its
 * gate | up products (as the forward pass computes them) */
void ms_gated_post(float *out, const float *x, int n, int F, ms_activation act, int n_threads);

/* x[n] = 0, split over the threads of ms_set_num_threads */
void ms_zero_floats(float *x, size_t n);

/* Threads of mechscope's loops and matrix products (the BLAS itself runs single-threaded). */
void ms_set_num_threads(int n);
int ms_get_num_threads(void);
const char *ms_blas_config(void);
const char *ms_blas_corename(void);
/* which of mechscope's own attention kernels this CPU runs */
const char *ms_kernels_name(void);
/* GFLOP/s of register-only fused multiply-adds on n_threads threads (best of five
 * timed runs of at least 50 ms): no product can pass it. *instructions names them. */
double ms_fma_peak(int n_threads, const char **instructions);

/* One AdamW step of a parameter array p[n] with gradient g * grad_scale (a clipping
 * coefficient, or 1) and moments m, v (optim.c). decay = 1 - lr * weight_decay,
 * step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t). */
typedef struct {
    float decay, beta1, beta2, eps, step_size, bc2_sqrt, grad_scale;
} ms_adamw_args;
void ms_adamw(float *p, const float *g, float *m, float *v, size_t n, const ms_adamw_args *a, int n_threads);
/* *out = the sum of x[i]^2 in float64 (the same for any thread count); -1 when out of memory */
int ms_sum_of_squares(const float *x, size_t n, int n_threads, double *out);

#ifdef __cplusplus
}
#endif
#endif
