/*
 * What a layer computes, by kind: one table of operations per et_layer_kind (et_layers.c).
 * Every place in the engine that applies a layer goes through et_layer_ops_of(kind), so a
 * new kind is one new table entry, with the same operations:
 *
 *   forward          z (rows, out) = the layer applied to x (rows, in), plus its bias
 *                    (no activation: a method may add to z before it, as LoRA does);
 *                    an add layer also reads `residual` (rows, in), its source's input;
 *                    `scratch` holds forward_scratch_bytes(l, rows) bytes (a convolution's
 *                    im2col buffer; NULL where that is 0)
 *   forward_scratch_bytes  the scratch forward needs for `rows` rows (et_conv.h's sizes)
 *   input_grad       dx (rows, in) = the gradient of the input, given g = dL/dz (rows, out)
 *   weight_grad      dwt = the gradient of the weight in the forward layout (dense: (in, out))
 *   scratch_floats   floats of scratch input_grad needs when the weight is given only in
 *                    the forward layout (dense: in * out, the transposed weight)
 *   int8_accumulate  acc (rows, out) = the integer pass q . Wq^T + bq, exactly, in int32
 *
 * Row-major buffers; ld* are row strides in elements. in and out are et_layer_in(l) and
 * et_layer_out(l). The caller passes the weight tensors explicitly (a method may train
 * them), so the ops read shapes only from the layer.
 *
 * The spatial kinds (conv1d/2d, max/avg pooling, gap) and flatten and add have forward
 * only: the engine runs them in the frozen forward pass of the skip methods. input_grad,
 * weight_grad and int8_accumulate are NULL for them (et_train refuses the layer-wise and
 * sparse methods, and et_backbone_check int8 tensors, on a backbone with such a layer).
 */
#ifndef ET_LAYERS_H
#define ET_LAYERS_H

#include <stddef.h>

#include "et_core.h"

typedef struct et_layer_ops {
    /* dense: z = x W^T + b, wt (forward layout) used when given, else w (out, in); conv: w as
     * stored (out_c, in_c / groups, kernel_h, kernel_w). residual: add only, row stride in. */
    void (*forward)(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x, int ldx,
                    int rows, float *z, int ldz, const float *residual, float *scratch);
    /* dx = g W. w (out, in) is used when given, else wt through `scratch` (scratch_floats). */
    void (*input_grad)(const et_layer *l, const float *wt, const float *w, const float *g, int rows, float *dx,
                       float *scratch);
    /* dwt (forward layout) = x^T g over the rows. */
    void (*weight_grad)(const et_layer *l, const float *x, const float *g, int rows, float *dwt);
    size_t (*scratch_floats)(const et_layer *l);
    /* acc (rows, out) = q . Wq^T + bq with l->qw and l->qbias. */
    void (*int8_accumulate)(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc);
    size_t (*forward_scratch_bytes)(const et_layer *l, int rows);
} et_layer_ops;

/* The operations of a layer kind, or NULL for a kind this build does not implement. */
const et_layer_ops *et_layer_ops_of(int32_t kind);

/* Apply the layer's own activation to z (rows, out), row stride ldz, in place. */
void et_layer_activate(const et_layer *l, float *z, int ldz, int rows);

/* 1 for the kinds with a weight and a bias (dense, conv1d, conv2d). */
int et_layer_has_weights(const et_layer *l);

/* 1 when every layer of bb is dense (an MLP). */
int et_backbone_is_dense(const et_backbone *bb);

/* A dense layer of `in` inputs and `out` outputs (the 1x1 case), without tensors. */
void et_layer_dense(et_layer *l, int32_t in, int32_t out, int32_t activation);

#endif
