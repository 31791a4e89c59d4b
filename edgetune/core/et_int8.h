/*
 * The int8 backbone's kernels (et_int8.c). Row-major buffers with explicit row strides
 * (ld*, in elements); `acc` holds rows x (the layer's outputs) int32 values, packed.
 */
#ifndef ET_INT8_H
#define ET_INT8_H

#include "et_core.h"

/* ET_OK when bb is an int8 backbone the forward pass runs: et_backbone_check's shapes with int8
 * tensors on any kind, a last layer with weights (the logits), identity, ReLU or ReLU6 between
 * layers, every input scale positive and finite, the tensors present and the requantisers in
 * range (1 <= shift <= 62; an add's two with one shift). */
int32_t et_int8_backbone_check(const et_backbone *bb);
/* q (rows, et_width(bb, 0)) = the int8 input of layer 0 for prepared float inputs x. */
void et_int8_quantize_input(const et_backbone *bb, const float *x, int ldx, int rows, int8_t *q, int ldq);
/* acc (rows, et_width(bb, k+1)) = layer k on q in int32 (its kind's int8_accumulate; not an add, which
 * reads its source's input: et_int8_run passes it). */
void et_int8_accumulate(const et_backbone *bb, int k, const int8_t *q, int ldq, int rows, int32_t *acc);
/* q (rows, et_width(bb, k+1)) = hidden layer k's int8 output from its accumulator (per output
 * channel requantisation for dense and conv) with the activation fused into the clamp. */
void et_int8_requantize(const et_backbone *bb, int k, const int32_t *acc, int rows, int8_t *q, int ldq);
/* The same integers one output channel at a time, for a dense or conv layer k on one sample:
 * acc (out_h * out_w) = channel c of layer k on q (one sample's input, et_width(bb, k)); then
 * q (one sample's output, et_width(bb, k+1)) receives channel c's requantised positions
 * [c * out_h * out_w, (c+1) * out_h * out_w). q must not be the input: every channel reads all of it. */
void et_int8_accumulate_channel(const et_backbone *bb, int k, const int8_t *q, int c, int32_t *acc);
/* The requantisation also takes channel c of a layer without weights (its accumulator from its kind's
 * int8_accumulate on that channel): the clamp only, as et_int8_requantize. */
void et_int8_requantize_channel(const et_backbone *bb, int k, int c, const int32_t *acc, int8_t *q);
/* Float logits from the last layer's accumulator. */
void et_int8_logits(const et_backbone *bb, const int32_t *acc, int rows, float *logits, int ldl);
/*
 * The whole pass: taps (rows, d_in) receive every layer's int8 input side by side
 * [q_0 | ... | q_{n-1}] (an add reads its source's there), logits (rows, out) the float
 * logits. acc: rows x max width.
 */
void et_int8_run(const et_backbone *bb, const float *x, int ldx, int rows, int8_t *taps, int ldt,
                 float *logits, int ldl, int32_t *acc);
/* et_int8_run after the input's quantisation: q_0 is already in the first columns of taps. */
void et_int8_run_layers(const et_backbone *bb, int rows, int8_t *taps, int ldt, float *logits, int ldl,
                        int32_t *acc);

/* Asymmetric activations: sum over i < n of (q_i - zp) w_i = sum q_i w_i + (-zp) sum w_i; this is the
 * second term for one dense output (w its n weights, zp layer l's input zero point; 0 when symmetric). */
int32_t et_int8_offset_sum(const et_layer *l, const int8_t *w, int n);

/* The int8_accumulate entries of et_layers.c's table for the kinds beyond dense (et_int8.c). */
void et_int8_conv_accumulate(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc,
                             const int8_t *residual, int ldr);
void et_int8_maxpool(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                     int ldr);
void et_int8_avgpool(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                     int ldr);
void et_int8_gap(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                 int ldr);
void et_int8_flatten(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                     int ldr);
void et_int8_add(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                 int ldr);

#endif
