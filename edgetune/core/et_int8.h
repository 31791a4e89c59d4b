/*
 * The int8 backbone's kernels (et_int8.c). Row-major buffers with explicit row strides
 * (ld*, in elements); `acc` holds rows x (the layer's outputs) int32 values, packed.
 */
#ifndef ET_INT8_H
#define ET_INT8_H

#include "et_core.h"

/* q (rows, et_width(bb, 0)) = the int8 input of layer 0 for prepared float inputs x. */
void et_int8_quantize_input(const et_backbone *bb, const float *x, int ldx, int rows, int8_t *q, int ldq);
/* acc (rows, et_width(bb, k+1)) = q . Wq_k^T + bq_k, exactly, in int32 (the layer kind's int8_accumulate). */
void et_int8_accumulate(const et_backbone *bb, int k, const int8_t *q, int ldq, int rows, int32_t *acc);
/* q (rows, et_width(bb, k+1)) = hidden layer k's int8 output from its accumulator (ReLU fused). */
void et_int8_requantize(const et_backbone *bb, int k, const int32_t *acc, int rows, int8_t *q, int ldq);
/* Float logits from the last layer's accumulator. */
void et_int8_logits(const et_backbone *bb, const int32_t *acc, int rows, float *logits, int ldl);
/*
 * The whole pass: taps (rows, d_in) receive every layer's int8 input side by side
 * [q_0 | ... | q_{n-1}], logits (rows, out) the float logits. acc: rows x max width.
 */
void et_int8_run(const et_backbone *bb, const float *x, int ldx, int rows, int8_t *taps, int ldt,
                 float *logits, int ldl, int32_t *acc);

#endif
