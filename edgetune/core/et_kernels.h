/*
 * The numeric kernels the training loop is made of: small dense matrix products, the
 * activations, softmax cross-entropy and the optimizers. Plain loops that the compiler
 * vectorises; no allocation; every size is an argument.
 */
#ifndef ET_KERNELS_H
#define ET_KERNELS_H

#include <stdint.h>

/* C (M, N) = [C +] A (M, K) B (K, N); row strides lda, ldb, ldc (in floats). */
void et_gemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate);
/*
 * C (M, N) = [C +] A (M, K) B^T, with B stored (N, K). With `pack` (K * N floats of
 * scratch) a wide B is transposed into it first, so the fast kernel runs; without, or for
 * N < 16, each entry is one dot product.
 */
void et_gemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate, float *pack);
/* out[t] += sum_i coef[i * coef_stride] * rows[i][offset + t], t < width (rows given by pointer). */
void et_weighted_rows(int count, const float *coef, int coef_stride, const float *const *rows, int offset,
                      int width, float *out);
/* The same over int8 rows: out[t] += sum_i coef[i * coef_stride] * (float)rows[i][offset + t]. */
void et_weighted_rows_i8(int count, const float *coef, int coef_stride, const int8_t *const *rows, int offset,
                         int width, float *out);
/*
 * out[i * out_stride] = sum_t a[t] * rows[i][offset + t], t < width, for i < count: the dot
 * products of one vector with several rows, four rows at a time (each of a's values is read
 * once per four rows). The _i8 form reads int8 rows, each value converted to float.
 */
void et_dot_rows(int count, const float *a, const float *const *rows, int offset, int width, float *out,
                 int out_stride);
void et_dot_rows_i8(int count, const float *a, const int8_t *const *rows, int offset, int width, float *out,
                    int out_stride);
/* dst (cols, rows) = src (rows, cols)^T; src row stride lds. */
void et_transpose(int rows, int cols, const float *src, int lds, float *dst);
/* C (M, N) = [C +] A^T B, with A stored (K, M) and B (K, N). */
void et_gemm_tn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate);

float et_dot(const float *a, const float *b, int n);
void et_axpy(int n, float a, const float *x, float *y);     /* y += a x */

/*
 * exp, log, log1p and tanh of float32, the same bits on every target and compiler (only
 * IEEE 754 arithmetic, no C library call; the build must not contract multiply-adds). Within
 * 2 ulp of the exact values. The training loop's activations and loss use these where
 * ET_PORTABLE_MATH is defined (every exported project's Makefile), the C library's otherwise.
 */
float et_expf(float x);
float et_logf(float x);
float et_log1pf(float x);
float et_tanhf(float x);

/* Activation of n values in place, and dh *= f'(z) given the output h. */
void et_act_forward(int act, float *z, int64_t n);
void et_act_grad_mul(int act, float *dh, const float *h, int64_t n);

/*
 * Softmax cross-entropy on logits (rows, classes), in place: logits become
 * d(mean loss)/d(logits) for a batch of `rows`. Returns the sum of the rows' losses.
 */
double et_softmax_xent_grad(float *logits, const int32_t *y, int rows, int classes);
/* The same for `rows` of a batch of `batch_rows`: the gradient is of the batch's mean loss. */
double et_softmax_xent_grad_of(float *logits, const int32_t *y, int rows, int classes, int batch_rows);

/* One optimizer step on n parameters (et_optimizer from et_core.h; t advanced). */
struct et_optimizer;
void et_optimizer_step(struct et_optimizer *opt, float *p, const float *g, int64_t n);

#endif
