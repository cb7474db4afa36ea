/* kernels.h — the layer math of one transformer block, on packed token rows.
 * N is the number of token rows, C = d_model, F = d_mlp; all row-major float32. */
#ifndef MS_KERNELS_H
#define MS_KERNELS_H

#include "mechscope.h"

/* fn(ctx, lo, hi) over [0, n) split among up to n_threads threads, each getting
 * at least min_per_thread items; returns when all are done. */
typedef void (*ms_range_fn)(void *ctx, long long lo, long long hi);
void ms_parallel_for(long long n, long long min_per_thread, int n_threads, ms_range_fn fn,
                     void *ctx);

/* out[N, OC] = in[N, IC] @ w[IC, OC] + bias[OC]; in has row stride ld_in. */
void ms_linear(float *out, const float *in, int ld_in, const float *w, const float *bias,
               int N, int IC, int OC);

/* scale[N] = sqrt(var(x) + eps); out[N, C] = (x - mean) / scale * w + b */
void ms_layernorm(float *out, float *scale, const float *in, const float *w, const float *b,
                  int N, int C, float eps, int n_threads);

/* out[N, C] = (x - mean) / scale * w + b with a given divisor scale[N] */
void ms_layernorm_apply(float *out, const float *scale, const float *in, const float *w,
                        const float *b, int N, int C);

/* x[n] = act(x[n]) in place */
void ms_activation_inplace(float *x, size_t n, ms_activation act, int n_threads);

/* out[n] = a[n] + b[n] */
void ms_add(float *out, const float *a, const float *b, size_t n);

/* One sequence's causal self-attention, all heads. Query i is at position q0 + i
 * and sees keys 0 .. q0 + i. q: [nq, C] (row stride ldq), k and v: [nk, C] (row
 * strides ldk, ldv), heads of d_head side by side in each row. */

/* scores[H, nq, nk] = scale * q.k for visible keys, -inf for the others */
void ms_attention_scores(float *scores, const float *q, int ldq, const float *k, int ldk, int nq,
                         int nk, int q0, int H, int d_head, float scale, int use_blas);

/* In place: each row of scores becomes the softmax over its visible keys; the
 * others become 0. A row with no finite score becomes all 0. */
void ms_causal_softmax(float *att, int H, int nq, int nk, int q0);

/* z[nq, C] (row stride ld_z) = pattern[H, nq, nk] @ v */
void ms_attention_mix(float *z, int ld_z, const float *pattern, const float *v, int ldv, int nq,
                      int nk, int H, int d_head, int use_blas);

/* log(sum(exp(y[n]))), computed stably */
double ms_log_sum_exp(const float *y, int n);

/* KL(ref || q) = sum ref_p * (ref_logprob - (y - log_z)) over n entries, where
 * q = softmax(y) and log_z = ms_log_sum_exp(y) */
double ms_kl_divergence(const float *ref_logprob, const float *y, double log_z, int n);

/* out[M, V] = x[M, C] @ unembed[V, C]^T */
void ms_unembed(float *out, const float *x, const float *unembed, int M, int C, int V);

#endif
