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
 *                    and the layer's input (max pooling reads it)
 *   weight_grad      the gradient of the weight in its forward layout (dense: (in, out);
 *                    conv: as stored), and bias_grad the bias's (out_c)
 *   weight_rows_grad the gradient of the first out_rows output channels' weights only, in
 *                    the stored layout (out_rows, in / groups, kernel_h, kernel_w); dense:
 *                    (out_rows, in). The sparse update trains those rows.
 *   backward_scratch_bytes  the scratch input_grad and weight_grad need (a convolution's)
 *   scratch_floats   floats of scratch a dense input_grad needs when the weight is given
 *                    only in the forward layout (in * out, the transposed weight)
 *   int8_accumulate  acc (rows, out) = the layer on int8 rows in int32: a kind with weights
 *                    gives its accumulator q . Wq^T + bq, exactly; the others their output at
 *                    the input's scale (pooling, gap, flatten) or the output scale (add, which
 *                    reads its source's int8 input `residual`), before the activation's clamp
 *
 * Row-major buffers; ld* are row strides in elements. in and out are et_layer_in(l) and
 * et_layer_out(l). The caller passes the weight tensors explicitly (a method may train
 * them), so the ops read shapes only from the layer.
 *
 * The kinds without weights have no weight_grad, weight_rows_grad and bias_grad (NULL). The
 * spatial kinds' forward and gradients are et_conv.c's kernels, their int8_accumulate
 * et_int8.c's. Training takes int8 MLPs only (et_backbone_check); the int8 forward pass
 * takes every kind (et_int8_backbone_check).
 */
#ifndef ET_LAYERS_H
#define ET_LAYERS_H

#include <stddef.h>

#include "et_conv.h"
#include "et_core.h"

typedef struct et_layer_ops {
    /* dense: z = x W^T + b, wt (forward layout) used when given, else w (out, in); conv: w as
     * stored (out_c, in_c / groups, kernel_h, kernel_w). residual: add only, row stride in. */
    void (*forward)(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x, int ldx,
                    int rows, float *z, int ldz, const float *residual, float *scratch);
    /* dx (rows, in) from g (rows, out) and the layer's input x (max pooling reads it). dense:
     * dx = g W, w (out, in) used when given, else wt through `scratch` (scratch_floats);
     * conv: w as stored, scratch of backward_scratch_bytes. */
    void (*input_grad)(const et_layer *l, const float *wt, const float *w, const float *x, const float *g, int rows,
                       float *dx, float *scratch);
    /* the weight's gradient in its forward layout (dense: dwt (in, out) = x^T g; conv: (out, in/groups, kh, kw))
     * over the rows; NULL for the kinds without weights. */
    void (*weight_grad)(const et_layer *l, const float *x, const float *g, int rows, float *dwt, float *scratch);
    /* db (out_c): g summed over the rows (and a convolution's positions); NULL without weights. */
    void (*bias_grad)(const et_layer *l, const float *g, int rows, float *db);
    size_t (*scratch_floats)(const et_layer *l);
    /* acc (rows, out), packed: dense and conv q . Wq^T + bq with l->qw and l->qbias; see above.
     * residual (rows, in), row stride ldr: an add's source input; NULL for the other kinds. */
    void (*int8_accumulate)(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc,
                            const int8_t *residual, int ldr);
    size_t (*forward_scratch_bytes)(const et_layer *l, int rows);
    /* the scratch input_grad and weight_grad (and weight_rows_grad) need for `rows` rows (a convolution's; else 0) */
    size_t (*backward_scratch_bytes)(const et_layer *l, int rows);
    /* dw (out_rows, in / groups, kh, kw), the first 1..out_c output channels' rows of the weight's gradient
     * as stored (dense: (out_rows, in) = g[:, :out_rows]^T x) over the rows; NULL for the kinds without weights. */
    void (*weight_rows_grad)(const et_layer *l, const float *x, const float *g, int rows, int out_rows, float *dw,
                             float *scratch);
} et_layer_ops;

/* The operations of a layer kind, or NULL for a kind this build does not implement. */
const et_layer_ops *et_layer_ops_of(int32_t kind);

/* Apply the layer's own activation to z (rows, out), row stride ldz, in place. */
void et_layer_activate(const et_layer *l, float *z, int ldz, int rows);

/* The layer's shape as et_conv.h's kernels take it. */
et_conv_dims et_layer_dims(const et_layer *l);

/* 1 for the kinds with a weight and a bias (dense, conv1d, conv2d). */
int et_layer_has_weights(const et_layer *l);

/* Floats of one output channel's weights: in_c / groups * kernel_h * kernel_w (dense: in). */
int32_t et_layer_row_floats(const et_layer *l);

/* et_backbone_check, with int8 tensors allowed on every layer kind when int8_any_kind is 1
 * (the int8 forward pass; et_int8_backbone_check adds the int8 tensors' own checks). */
int32_t et_backbone_check_layers(const et_backbone *bb, int int8_any_kind);

/* 1 when every layer of bb is dense (an MLP). */
int et_backbone_is_dense(const et_backbone *bb);

/* A dense layer of `in` inputs and `out` outputs (the 1x1 case), without tensors. */
void et_layer_dense(et_layer *l, int32_t in, int32_t out, int32_t activation);

#endif
