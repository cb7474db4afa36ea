/* kernels_backward.h — the backward of each operation of a block, on packed token rows.
 * N is the number of token rows, C = d_model, F = d_mlp; all row-major float32.
 * Gradients of weights are accumulated (+=) into the caller's buffers. */
#ifndef MS_KERNELS_BACKWARD_H
#define MS_KERNELS_BACKWARD_H

#include "mechscope.h"

/* C[M, Nc] (ldc) = alpha op(A) op(B) + beta C, op(A) [M, K], op(B) [K, Nc]; cut into
 * panels of rows (or columns) of C that the threads share, each one BLAS call */
void ms_gemm(int trans_a, int trans_b, int M, int Nc, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *Cm, int ldc, int n_threads);

/* the arguments of one ms_gemm */
typedef struct {
    int trans_a, trans_b, M, Nc, K;
    float alpha;
    const float *A;
    int lda;
    const float *B;
    int ldb;
    float beta;
    float *C;
    int ldc;
} ms_product;

/* ms_gemm of the product p */
void ms_gemm_product(const ms_product *p, int n_threads);

/* two independent products (neither reads the other's output), their tiles shared
 * by the threads in one loop */
void ms_gemm_pair(const ms_product *x, const ms_product *y, int n_threads);

/* The backward of out[N, OC] = in[N, IC] @ W + b (ms_linear):
 * dx[N, IC] (ld_dx) = dy @ W^T, or += when accumulate; dw (same layout as w, may be
 * NULL) += x^T dy; db[OC] (may be NULL) += column sums of dy. */
void ms_linear_backward(float *dx, int ld_dx, int accumulate, float *dw, float *db, const float *x, int ld_x,
                        const float *dy, int ld_dy, const ms_linear_weight *w, int N, int IC, int OC,
                        int n_threads);

/* sum of x[i] * y[i] over n, in float64 (the same sum for any caller) */
double ms_dot_f64(const float *x, const float *y, int n);

/* dw[C] += sum over rows of dy * xhat; db[C] (may be NULL) += sum of dy; dxhat = dy * w
 * (the backward of y = xhat * w + b; dw, db NULL: only dxhat) */
void ms_norm_affine_backward(float *dxhat, float *dw, float *db, const float *dy, const float *xhat,
                             const float *w, int N, int C, int n_threads);

/* xhat[N, C] = (x - mean) / scale (LayerNorm) or x / scale (RMSNorm), with the given divisor */
void ms_norm_xhat(float *xhat, const float *x, const float *scale, int N, int C, ms_norm_kind kind, int n_threads);

/* dscale[N]: the gradient of the divisor given dxhat (xhat = centred x / scale) */
void ms_norm_scale_grad(float *dscale, const float *dxhat, const float *x, const float *scale, int N, int C,
                        ms_norm_kind kind, int n_threads);

/* dx[N, C] += the gradient of the norm's input: through xhat = centred x / scale (with the
 * divisor scale as used) and through the divisor's own dependence on x (dscale, the
 * gradient of the divisor, applied to the divisor computed from x with eps) */
void ms_norm_input_backward(float *dx, const float *dxhat, const float *dscale, const float *x,
                            const float *scale, int N, int C, float eps, ms_norm_kind kind, int n_threads);

/* ms_norm_scale_grad, then ms_norm_input_backward, in one pass over the rows (each row
 * read once; the same arithmetic, so the same bits): when nothing reads or changes
 * dscale between the two */
void ms_norm_scale_and_input_backward(float *dx, float *dscale, const float *dxhat, const float *x,
                                      const float *scale, int N, int C, float eps, ms_norm_kind kind,
                                      int n_threads);

/* dpre[N, F] (ld_pre) = dpost * act'(pre) (ld_post), for N rows */
void ms_activation_backward(float *dpre, int ld_dpre, const float *dpost, int ld_dpost, const float *pre,
                            int ld_pre, int N, int F, ms_activation act, int n_threads);

/* gated MLP, post = act(gate) * up: dgate = dpost * up * act'(gate), dup = dpost * act(gate);
 * gate | up are the rows [F | F] of pre (ld), and of dpre (ld) */
void ms_gated_backward(float *dpre, int ld, const float *dpost, int ld_dpost, const float *pre, int N, int F,
                       ms_activation act, int n_threads);

/* the backward of ms_head_rmsnorm: g [N, heads of d] (stride ld) the gradient of its
 * output becomes that of its input x (stride ldx, the values before the norm); dw[d]
 * (may be NULL) += the sum over rows and heads of g * x / scale */
void ms_head_rmsnorm_backward(float *g, int ld, const float *x, int ldx, int N, int heads, int d, const float *w,
                              float *dw, float eps, int n_threads);

/* the transpose of ms_rotary: the gradient before the rotation from the one after */
void ms_rotary_backward(float *g, const float *rope, int rotary_dim, int interleaved);

#endif
