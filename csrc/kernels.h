/* kernels.h — the layer math of one transformer block, on packed token rows.
 * N is the number of token rows, C = d_model, F = d_mlp; all row-major float32. */
#ifndef MS_KERNELS_H
#define MS_KERNELS_H

#include "mechscope.h"

#include <math.h>

/* fn(ctx, lo, hi) over [0, n) split among up to n_threads threads, each getting
 * at least min_per_thread items; returns when all are done. */
typedef void (*ms_range_fn)(void *ctx, long long lo, long long hi);
void ms_parallel_for(long long n, long long min_per_thread, int n_threads, ms_range_fn fn,
                     void *ctx);

/* The interrupt flag of the run the calling thread computes: set (returning the
 * previous one) by ms_run, handed on to the threads of every ms_parallel_for, which
 * stops handing out work once *stop is nonzero. ms_interrupted() tells whether it is. */
const volatile int *ms_stop_flag_swap(const volatile int *stop);
int ms_interrupted(void);

/* how many single-threaded BLAS calls a product of `flops` is cut into for n_threads */
long long ms_gemm_tiles_wanted(double flops, int n_threads);

/* the tiles (tile_m rows by tile_n columns) of an [M, Nc] product cut for threads
 * into at least `want` single-threaded BLAS calls that pack the least */
void ms_gemm_grid(int M, int Nc, long long want, int *tile_m, int *tile_n);

/* out[N, OC] (row stride ld_out) = in[N, IC] (row stride ld_in) @ W + b */
void ms_linear(float *out, int ld_out, const float *in, int ld_in, const ms_linear_weight *w,
               int N, int IC, int OC, int n_threads);

/* dst[n] = src[n] widened to float32, src holding bfloat16 or float16 (dtype) */
void ms_widen(float *dst, const uint16_t *src, size_t n, ms_dtype dtype);
float ms_half_to_float(uint16_t h, ms_dtype dtype);

/* LayerNorm: scale[N] = sqrt(var(x) + eps); out[N, C] = (x - mean) / scale * w + b.
 * RMSNorm: scale[N] = sqrt(mean(x^2) + eps); out = x / scale (w and b are applied by
 * ms_norm_weight after hook_normalized, as in TransformerLens). b may be NULL. */
void ms_layernorm(float *out, float *scale, const float *in, const float *w, const float *b,
                  int N, int C, float eps, ms_norm_kind kind, int n_threads);

/* the same with a given divisor scale[N] */
void ms_layernorm_apply(float *out, const float *scale, const float *in, const float *w,
                        const float *b, int N, int C, ms_norm_kind kind);

/* y[N, C] = y * w + b (b may be NULL): RMSNorm's weight */
void ms_norm_weight(float *y, const float *w, const float *b, int N, int C);

/* per-head RMSNorm in place (Qwen3's q_norm and k_norm): each of the N rows (stride ld)
 * holds `heads` heads of d numbers, each x <- x / sqrt(mean(x^2) + eps) * w[d] */
void ms_head_rmsnorm(float *x, int ld, int N, int heads, int d, const float *w, float eps, int n_threads);

/* gated MLP: out[i, :F] = act(x[i, :F]) * x[i, F:2F] for the N rows (strides ld_out,
 * ld); out may be x (then in place) */
void ms_gated_activation(float *out, int ld_out, const float *x, int ld, int N, int F, ms_activation act,
                         int n_threads);

/* rotary: pairs (i, i + rotary_dim/2) of x (HF's half-split), or (2i, 2i + 1) when
 * interleaved (GPT-J), rotated by the angles whose cos | sin are rope[rotary_dim] */
void ms_rotary(float *x, const float *rope, int rotary_dim, int interleaved);

/* out[n] = act(x[n]); out may be x */
void ms_activate(float *out, const float *x, size_t n, ms_activation act, int n_threads);

/* out[n] = a[n] + b[n] */
void ms_add(float *out, const float *a, const float *b, size_t n, int n_threads);

/* Soft capping (Gemma 2's scores and logits): cap tanh(x / cap), computed as HF does
 * (divide, tanh, multiply, in float32). Its derivative at the capped value y is
 * 1 - (y / cap)^2. */
static inline float ms_softcap(float x, float cap) { return tanhf(x / cap) * cap; }
void ms_softcap_all(float *x, size_t n, float cap, int n_threads);
/* dst <- src: n floats; rows [rows, width] with row strides; n zeros. Split over the threads. */
void ms_copy(float *dst, const float *src, size_t n, int n_threads);
void ms_copy_rows(float *dst, int ld_dst, const float *src, int ld_src, int rows, int width, int n_threads);
void ms_zero(float *dst, size_t n, int n_threads);

/* Attention is computed one head and one query at a time, so that the rows of a
 * batch, their heads and blocks of their queries can share the threads.
 * d is d_head; keys and values of a head are rows of stride ld (heads side by side). */

/* kt[c, j] = k[j, c] for j < n, c < d (kt row stride ldkt): the keys by dimension */
void ms_transpose_keys(float *kt, int ldkt, const float *k, int ldk, int n, int d);

/* s[j] = scale * (q . key j) for j < n, the keys given transposed (ms_transpose_keys) */
void ms_query_scores(float *s, const float *q, const float *kt, int ldkt, int n, int d, float scale);

/* the same for four queries at once: rows of q (stride ldq) and of s (stride lds);
 * may read the keys up to n rounded up to a multiple of 32, so kt must have room
 * for them (their values do not matter) */
void ms_query_scores4(float *s, int lds, const float *q, int ldq, const float *kt, int ldkt, int n,
                      int d, float scale);

/* p[n] <- softmax(p); a row of only -inf becomes 0 */
void ms_softmax(float *p, int n);

/* z[d] += sum over j < n of p[j] * v[j, :] (v row stride ldv) */
void ms_mix_values(float *z, const float *p, const float *v, int ldv, int n, int d);

/* the same for four queries at once: rows of z (stride ldz) and of p (stride ldp) */
void ms_mix_values4(float *z, int ldz, const float *p, int ldp, const float *v, int ldv, int n, int d);

/* log(sum(exp(y[n]))), computed stably */
double ms_log_sum_exp(const float *y, int n);

/* The cross-entropy -log softmax(y)[target] of logits y[n], returned; y becomes
 * weight times its gradient, weight * (softmax(y) - onehot(target)). One exponential
 * per logit. */
double ms_cross_entropy_backward(float *y, int n, int target, float weight);

/* KL(ref || q) = sum ref_p * (ref_logprob - (y - log_z)) over n entries, where
 * q = softmax(y) and log_z = ms_log_sum_exp(y) */
double ms_kl_divergence(const float *ref_logprob, const float *y, double log_z, int n);

/* Routing of a mixture of experts. The rank of expert e among the E probabilities p:
 * how many come before it (higher, or equal with a lower index: a stable descending
 * sort). w[E] <- each expert's weight for the token: for the k most probable experts
 * p[e], over their sum (summed from the most probable down) if renormalize; 0 for the
 * others; all 0 when that sum is 0. w must not be p. */
int ms_expert_rank(const float *p, int E, int e);
void ms_expert_weights(float *w, const float *p, int E, int k, int renormalize);

/* out[M, V] = x[M, C] @ unembed[V, C]^T */
void ms_unembed(float *out, const float *x, const float *unembed, int M, int C, int V, int n_threads);

#endif
