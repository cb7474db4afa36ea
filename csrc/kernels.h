/* kernels.h — the layer math of one transformer block, on packed token rows.
 * N is the number of token rows, C = d_model, F = d_mlp; all row-major float32. */
#ifndef MS_KERNELS_H
#define MS_KERNELS_H

#include "mechscope.h"

/* out[N, OC] = in[N, IC] @ w[IC, OC] + bias[OC]; in has row stride ld_in. */
void ms_linear(float *out, const float *in, int ld_in, const float *w, const float *bias,
               int N, int IC, int OC, int n_threads);

/* scale[N] = sqrt(var(x) + eps); out[N, C] = (x - mean) / scale * w + b */
void ms_layernorm(float *out, float *scale, const float *in, const float *w, const float *b,
                  int N, int C, float eps, int n_threads);

/* x[n] = act(x[n]) in place */
void ms_activation_inplace(float *x, size_t n, ms_activation act, int n_threads);

/* out[n] = a[n] + b[n] */
void ms_add(float *out, const float *a, const float *b, size_t n, int n_threads);

/* One sequence's causal self-attention, all heads.
 * qkv: [n, 3C] rows (q | k | v, heads of d_head inside each), row stride ld_qkv.
 * scores: [H, n, n] written: scale * q.k for k <= q, -inf above the diagonal. */
void ms_attention_scores(float *scores, const float *qkv, int ld_qkv, int n, int H, int d_head,
                         float scale, int use_blas);

/* In place over [rows, n]: row i of each [n, n] block becomes softmax over keys 0..i;
 * keys above i become 0. rows = H * n. */
void ms_causal_softmax(float *att, int H, int n, int n_threads);

/* z[n, C] (row stride ld_z) = pattern[H, n, n] @ v, with v inside qkv as above. */
void ms_attention_mix(float *z, int ld_z, const float *pattern, const float *qkv, int ld_qkv,
                      int n, int H, int d_head, int use_blas);

/* out[M, V] = x[M, C] @ unembed[V, C]^T */
void ms_unembed(float *out, const float *x, const float *unembed, int M, int C, int V);

#endif
