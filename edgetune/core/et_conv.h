/*
 * Kernels of the spatial layer kinds: convolution (stride, zero padding, groups: depthwise
 * and pointwise included), max and average pooling, and global average pooling. Float32,
 * no allocation, no global state; the reference they equal is edgetune/nn/layers.py.
 *
 * Layout: a batch is `count` rows, one per sample; a row is the sample's tensor flattened
 * channels first, (C, H, W) in C order. A 1-D layer (C, L) is a 2-D one of height 1
 * (in_h = 1, kernel_h = 1, stride_h = 1, pad_h = 0). A convolution's weight is
 * (out_c, in_c / groups, kernel_h, kernel_w) in C order, as PyTorch stores it.
 *
 * Every layer is described by one et_conv_dims, checked and completed by the derive
 * function of its kind before any kernel runs: a kernel trusts the dims it is given. Sizes
 * in floats below use IN = in_c * in_h * in_w, OUT = out_c * out_h * out_w and
 * WEIGHT = out_c * (in_c / groups) * kernel_h * kernel_w. Scratch (im2col) buffers are the
 * caller's: et_*_scratch_bytes(dims, count) says how many bytes each call needs, in the
 * manner of TFLM's ..._get_buffer_size; a scratch pointer may be NULL where that is 0.
 */
#ifndef ET_CONV_H
#define ET_CONV_H

#include <stddef.h>
#include <stdint.h>

/* One spatial layer's shape, in the manner of CMSIS-NN's dims and conv params. */
typedef struct et_conv_dims {
    int32_t in_c, in_h, in_w;
    int32_t out_c, out_h, out_w;    /* out_h, out_w: written by the derive functions */
    int32_t kernel_h, kernel_w;
    int32_t stride_h, stride_w;
    int32_t pad_h, pad_w;           /* zeros (convolution, average) or -inf (max) on each side */
    int32_t groups;                 /* convolution: divides in_c and out_c; otherwise 1 */
} et_conv_dims;

/* sizeof(et_conv_dims), for the binding to check its mirror of the struct. */
size_t et_conv_dims_sizeof(void);

/*
 * Check d's fields and write out_h, out_w. Returns 0, or -1 (ET_ERR_ARGUMENT) for what the
 * layer description (LayerSpec) refuses or what does not fit the kernels' int sizes:
 *   conv: every size >= 1, padding >= 0, groups dividing in_c and out_c, the kernel no
 *         longer than the padded input, IN, OUT, WEIGHT and the im2col buffer < 2^31.
 *   pool: as conv, and out_c == in_c, groups == 1, padding at most half the kernel.
 *   gap:  out_c == in_c, groups == 1, the window the whole input (kernel = in_h x in_w,
 *         stride 1, padding 0): global average pooling is that average pooling.
 */
int et_conv_dims_derive(et_conv_dims *d);
int et_pool_dims_derive(et_conv_dims *d);
int et_gap_dims_derive(et_conv_dims *d);

/* ---------------------------------------------------------------- convolution */
/*
 * Scratch bytes of each convolution call for `count` rows (the same for any count: the
 * buffer is reused row by row), with K = in_c / groups * kernel_h * kernel_w,
 * S = out_h * out_w and O = out_c / groups, in floats:
 *   forward, input gradient   K * S (im2col)
 *   weight gradient           K * S (im2col) + S * O (g transposed) + K * O (the sum)
 * 0 for depthwise layers (direct loops); pointwise ones (1x1, stride 1, no padding: the
 * input is the matrix) need no im2col.
 */
/*
 * In place (MCUNet's trick for frozen layers): a depthwise convolution whose output has its
 * input's shape (et_conv_in_place_ok: multiplier 1, out_c == in_c, the same height and
 * width) overwrites x (count, IN, row stride ldx) with z: each channel is computed into
 * `chan` (out_h * out_w floats), its bias added, and copied back over its input channel, which
 * no other channel reads. The same float operations as et_conv_forward.
 */
int et_conv_in_place_ok(const et_conv_dims *d);
void et_conv_depthwise_in_place(const et_conv_dims *d, int count, float *x, int ldx, const float *w, const float *bias,
                                float *chan);

size_t et_conv_forward_scratch_bytes(const et_conv_dims *d, int count);
size_t et_conv_input_grad_scratch_bytes(const et_conv_dims *d, int count);
size_t et_conv_weight_grad_scratch_bytes(const et_conv_dims *d, int count);
/* et_conv_weight_grad_rows's scratch for its first out_rows output channels (at most the above). */
size_t et_conv_weight_grad_rows_scratch_bytes(const et_conv_dims *d, int count, int out_rows);

/*
 * z (count, OUT) = conv(x (count, IN), w (WEIGHT)) [+ bias (out_c), per output channel;
 * bias may be NULL]. Row r of x starts at x + r * ldx (ldx >= IN) and of z at z + r * ldz
 * (ldz >= OUT), as the forward operation of the engine's layer table reads rows inside
 * wider ones; the rest of a wider row is neither read nor written. scratch:
 * et_conv_forward_scratch_bytes.
 */
void et_conv_forward(const et_conv_dims *d, int count, const float *x, int ldx, const float *w, const float *bias,
                     float *z, int ldz, float *scratch);
/* dx (count, IN) = d loss / d x, given g (count, OUT) = d loss / d z; dx is overwritten. */
void et_conv_input_grad(const et_conv_dims *d, int count, const float *g, const float *w, float *dx,
                        float *scratch);
/*
 * dw (WEIGHT) [+]= d loss / d w summed over the count rows, given x (count, IN) and
 * g (count, OUT); overwritten unless `accumulate` (count 0 then writes zeros).
 */
void et_conv_weight_grad(const et_conv_dims *d, int count, const float *x, const float *g, float *dw,
                         int accumulate, float *scratch);
/*
 * The same for the first out_rows (1..out_c) output channels only: dw (out_rows * WEIGHT / out_c),
 * the leading rows of the full gradient, computed without the others (the sparse update trains
 * a layer's first channels). Scratch: et_conv_weight_grad_rows_scratch_bytes(d, count, out_rows).
 */
void et_conv_weight_grad_rows(const et_conv_dims *d, int count, const float *x, const float *g, int out_rows,
                              float *dw, int accumulate, float *scratch);
/* db (out_c) [+]= g (count, OUT) summed over the rows and positions of each channel. */
void et_conv_bias_grad(const et_conv_dims *d, int count, const float *g, float *db, int accumulate);

/* ---------------------------------------------------------------- pooling */
/* Pooling and global average pooling need no scratch: these return 0. */
size_t et_pool_scratch_bytes(const et_conv_dims *d, int count);
size_t et_gap_scratch_bytes(const et_conv_dims *d, int count);

/*
 * The forward passes below take row strides ldx >= IN and ldz >= OUT as et_conv_forward.
 *
 * Max pooling, x (count, IN) -> z (count, OUT), padding counted as -inf. The input
 * gradient dx (count, IN) (overwritten) sends each window's gradient g (count, OUT) whole
 * to the window's FIRST maximum in row-major order (a NaN counts as the maximum), as
 * PyTorch and NumPy's argmax do; it reads x again instead of keeping indices.
 */
void et_maxpool_forward(const et_conv_dims *d, int count, const float *x, int ldx, float *z, int ldz);
void et_maxpool_input_grad(const et_conv_dims *d, int count, const float *x, const float *g, float *dx);
/* Average pooling over kernel_h * kernel_w values, zero padding included (PyTorch's default). */
void et_avgpool_forward(const et_conv_dims *d, int count, const float *x, int ldx, float *z, int ldz);
void et_avgpool_input_grad(const et_conv_dims *d, int count, const float *g, float *dx);

/* Global average pooling: x (count, IN) -> z (count, in_c); dx (count, IN) from g (count, in_c). */
void et_gap_forward(const et_conv_dims *d, int count, const float *x, int ldx, float *z, int ldz);
void et_gap_input_grad(const et_conv_dims *d, int count, const float *g, float *dx);

#endif
