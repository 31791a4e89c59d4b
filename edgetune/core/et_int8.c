/*
 * The int8 backbone's forward pass: int32 accumulation and fixed-point requantisation,
 * as a microcontroller kernel does it. Bit-identical to edgetune/quant/int8.py.
 *
 *   q_0    = clip(rint(x / s_0), -127, 127)
 *   acc_k  = layer k on q_k in int32 (its kind's int8_accumulate: dense and conv
 *            q_k . Wq_k^T + bq_k; the other kinds below)
 *   q_k+1  = clip(round(acc_k * mult >> shift), lo, hi)   dense and conv, per output channel
 *          = clip(acc_k, lo, hi)                          the other kinds
 *            ([lo, hi]: the activation, fused: identity [-127, 127], ReLU [0, 127],
 *             ReLU6 [0, min(127, rint(6 / s_k+1))])
 *   logits = acc_n * (s_n * s_w)                          (float; the last layer has weights)
 */
#include "et_int8.h"
#include "et_core.h"
#include "et_layers.h"

#include <math.h>

/* floor(v / 2**s) for any sign: an arithmetic shift that does not rely on the compiler's. */
static int64_t shift_floor(int64_t v, int s) {
    return v >= 0 ? (v >> s) : -(((-v) - 1) >> s) - 1;
}

static void conv_channel(const et_layer *l, const int8_t *x, int o, int32_t *ao); /* below, with the kinds */

/* The int8 range [lo, hi] of hidden layer k's output: its activation fused into the clamp. */
static void clamp_range(const et_backbone *bb, int k, int32_t *lo, int32_t *hi) {
    const et_layer *l = &bb->layers[k];
    *lo = l->activation == ET_IDENTITY ? -127 : 0;
    *hi = 127;
    if (l->activation == ET_RELU6) {
        const float top = rintf(6.0f / bb->layers[k + 1].act_scale);
        *hi = top < 127.0f ? (int32_t)top : 127;
    }
}

int32_t et_int8_backbone_check(const et_backbone *bb) {
    const int32_t rc = et_backbone_check_layers(bb, 1);
    if (rc != ET_OK) return rc;
    if (!bb->is_int8) return ET_ERR_ARGUMENT;
    const int n = bb->n_layers;
    if (!et_layer_has_weights(&bb->layers[n - 1])) return ET_ERR_UNSUPPORTED; /* the logits come from weights */
    for (int k = 0; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        if (!(l->act_scale > 0.0f) || !isfinite(l->act_scale)) return ET_ERR_ARGUMENT;
        if (k < n - 1 && l->activation != ET_IDENTITY && l->activation != ET_RELU && l->activation != ET_RELU6)
            return ET_ERR_UNSUPPORTED;
        int n_rq = 0;
        if (et_layer_has_weights(l)) {
            if (!l->qw || !l->wscale || !l->qbias) return ET_ERR_ARGUMENT;
            n_rq = k < n - 1 ? l->out_c : 0;
        } else if (l->kind == ET_LAYER_ADD) {
            n_rq = 2;
            if (!l->rq_shift || l->rq_shift[0] != l->rq_shift[1]) return ET_ERR_ARGUMENT;
        }
        if (n_rq && (!l->rq_mult || !l->rq_shift)) return ET_ERR_ARGUMENT;
        for (int i = 0; i < n_rq; i++)
            if (l->rq_mult[i] < 0 || l->rq_shift[i] < 1 || l->rq_shift[i] > 62) return ET_ERR_ARGUMENT;
    }
    return ET_OK;
}

void et_int8_quantize_input(const et_backbone *bb, const float *x, int ldx, int rows, int8_t *q, int ldq) {
    const float s = bb->layers[0].act_scale;
    const int in = et_width(bb, 0);
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < in; i++) {
            float v = rintf(x[(size_t)r * ldx + i] / s);
            v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
            q[(size_t)r * ldq + i] = (int8_t)v;
        }
    }
}

void et_int8_accumulate(const et_backbone *bb, int k, const int8_t *q, int ldq, int rows, int32_t *acc) {
    const et_layer *l = &bb->layers[k];
    et_layer_ops_of(l->kind)->int8_accumulate(l, q, ldq, rows, acc, NULL, 0);
}

/* One accumulator value p of output channel c as int8: rescaled (dense and conv), then clamped. */
static int8_t requantize_one(const et_layer *l, int weighted, int c, int32_t lo, int32_t hi, int64_t p) {
    if (weighted) {
        const int s = l->rq_shift[c];
        p = shift_floor(p * (int64_t)l->rq_mult[c] + ((int64_t)1 << (s - 1)), s);
    }
    p = p < lo ? lo : (p > hi ? hi : p);
    return (int8_t)p;
}

void et_int8_requantize(const et_backbone *bb, int k, const int32_t *acc, int rows, int8_t *q, int ldq) {
    const et_layer *l = &bb->layers[k];
    const int out = et_layer_out(l), npos = l->out_h * l->out_w, weighted = et_layer_has_weights(l);
    int32_t lo, hi;
    clamp_range(bb, k, &lo, &hi);
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++)
            q[(size_t)r * ldq + o] = requantize_one(l, weighted, o / npos, lo, hi, acc[(size_t)r * out + o]);
}

void et_int8_accumulate_channel(const et_backbone *bb, int k, const int8_t *q, int c, int32_t *acc) {
    const et_layer *l = &bb->layers[k];
    if (l->kind == ET_LAYER_DENSE) {
        const int in = et_layer_in(l);
        const int8_t *wo = l->qw + (size_t)c * in;
        int32_t s = 0;
        for (int i = 0; i < in; i++) s += (int32_t)q[i] * (int32_t)wo[i];
        acc[0] = s + l->qbias[c];
    } else {
        conv_channel(l, q, c, acc);
    }
}

void et_int8_requantize_channel(const et_backbone *bb, int k, int c, const int32_t *acc, int8_t *q) {
    const et_layer *l = &bb->layers[k];
    const int npos = l->out_h * l->out_w;
    int32_t lo, hi;
    clamp_range(bb, k, &lo, &hi);
    const int weighted = et_layer_has_weights(l); /* a layer without weights: the clamp only */
    for (int i = 0; i < npos; i++) q[(size_t)c * npos + i] = requantize_one(l, weighted, c, lo, hi, acc[i]);
}

void et_int8_logits(const et_backbone *bb, const int32_t *acc, int rows, float *logits, int ldl) {
    const et_layer *l = &bb->layers[bb->n_layers - 1];
    const int out = et_layer_out(l);
    for (int r = 0; r < rows; r++) {
        for (int o = 0; o < out; o++) {
            const float unit = l->act_scale * l->wscale[o];
            logits[(size_t)r * ldl + o] = (float)((double)acc[(size_t)r * out + o] * (double)unit);
        }
    }
}

void et_int8_run(const et_backbone *bb, const float *x, int ldx, int rows, int8_t *taps, int ldt,
                 float *logits, int ldl, int32_t *acc) {
    et_int8_quantize_input(bb, x, ldx, rows, taps, ldt);
    et_int8_run_layers(bb, rows, taps, ldt, logits, ldl, acc);
}

void et_int8_run_layers(const et_backbone *bb, int rows, int8_t *taps, int ldt, float *logits, int ldl,
                        int32_t *acc) {
    const int n = bb->n_layers;
    int col = 0; /* layer k's input starts at column col (the sum of the widths before it) */
    for (int k = 0; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        int src = 0; /* an add's source's input column */
        for (int j = 0; l->kind == ET_LAYER_ADD && j < l->source; j++) src += et_width(bb, j);
        const int8_t *residual = l->kind == ET_LAYER_ADD ? taps + src : NULL;
        et_layer_ops_of(l->kind)->int8_accumulate(l, taps + col, ldt, rows, acc, residual, ldt);
        if (k == n - 1) et_int8_logits(bb, acc, rows, logits, ldl);
        else et_int8_requantize(bb, k, acc, rows, taps + col + et_width(bb, k), ldt);
        col += et_width(bb, k);
    }
}

size_t et_int8_workspace_size(const et_backbone *bb, int32_t rows) {
    int maxw = 0;
    if (et_int8_backbone_check(bb) != ET_OK) return 0;
    for (int k = 1; k <= bb->n_layers; k++) maxw = et_width(bb, k) > maxw ? et_width(bb, k) : maxw;
    return (size_t)rows * (size_t)maxw * sizeof(int32_t);
}

int32_t et_int8_forward_taps(const et_backbone *bb, const float *x, int32_t count, int8_t *taps,
                             float *logits, void *workspace, size_t workspace_bytes) {
    const int32_t rc = et_int8_backbone_check(bb);
    if (rc != ET_OK) return rc;
    if (!x || !taps || !logits || count < 1) return ET_ERR_ARGUMENT;
    if (!workspace || workspace_bytes < et_int8_workspace_size(bb, count)) return ET_ERR_WORKSPACE;
    int d_in = 0;
    for (int k = 0; k < bb->n_layers; k++) d_in += et_width(bb, k);
    et_int8_run(bb, x, et_width(bb, 0), count, taps, d_in, logits, et_width(bb, bb->n_layers),
                (int32_t *)workspace);
    return ET_OK;
}

/* ------------------------------------------------------------------ the kinds beyond dense
 * The int8_accumulate entries of et_layers.c's table, bit-identical to the int8_accumulate
 * methods of edgetune/nn/layers.py.
 *
 * Activations are symmetric int8 (zero point 0, values -127..127), so a convolution's zero
 * padding reads 0. Each kernel writes int32 values, rows x et_layer_out(l), packed:
 *   conv       acc = bias + sum of q x Wq over the window        (requantised per channel
 *                                                                  by et_int8_requantize)
 *   maxpool    the window's maximum (padding never wins)          (same scale in and out)
 *   avgpool    the window's sum, padding counted as 0, divided by the window's size,
 *              rounded half away from zero                        (same scale)
 *   gap        the channel's sum divided by its positions, rounded likewise
 *   flatten    the input
 *   add        (q mx + r mr + 2**(s-1)) >> s, r the source layer's input and
 *              (mx, mr, s) = (rq_mult[0], rq_mult[1], rq_shift[0]): both inputs rescaled
 *              to the output scale, clipped to +-2**15 (the clamp to int8 follows)
 * Loops are plain and in the order a reader expects; the integer sums do not depend on it.
 */

/* s / n rounded half away from zero (n >= 1), as TFLM's average pooling. */
static int32_t div_round(int32_t s, int32_t n) {
    return s >= 0 ? (s + n / 2) / n : -((-s + n / 2) / n);
}

/* The outputs o in [*lo, *hi] of one axis whose input o * stride - pad + k is inside [0, n);
 * empty when *lo > *hi. */
static void valid_range(int n, int out, int stride, int pad, int k, int *lo, int *hi) {
    const int first = pad - k, last = n - 1 + pad - k; /* o * stride must lie in [first, last] */
    *lo = first > 0 ? (first + stride - 1) / stride : 0;
    *hi = last < 0 ? -1 : last / stride;
    if (*hi > out - 1) *hi = out - 1;
}

/* a[i] += w * x[i * stride] for i < n; restrict: int8_t may alias anything, and the compiler
 * vectorises this only when told that a and x do not overlap. */
static void axpy_i8(int32_t *restrict a, const int8_t *restrict x, int32_t w, int n, int stride) {
    if (stride == 1)
        for (int i = 0; i < n; i++) a[i] += w * (int32_t)x[i];
    else
        for (int i = 0; i < n; i++) a[i] += w * (int32_t)x[i * stride];
}

/* ao (out_h * out_w) = output channel o of convolution l on one sample's int8 input x: the bias,
 * then each weight's products along a row of outputs (a loop without branches, over contiguous
 * inputs at stride 1, that compilers vectorise). */
static void conv_channel(const et_layer *l, const int8_t *x, int o, int32_t *ao) {
    const int cin_g = l->in_c / l->groups, cout_g = l->out_c / l->groups;
    const int kh = l->kernel_h, kw = l->kernel_w, sw = l->stride_w, npos = l->out_h * l->out_w;
    const int8_t *w = l->qw + (size_t)o * cin_g * kh * kw;
    const int g = o / cout_g;
    for (int i = 0; i < npos; i++) ao[i] = l->qbias[o];
    for (int ci = 0; ci < cin_g; ci++) {
        const int8_t *xc = x + (size_t)(g * cin_g + ci) * l->in_h * l->in_w;
        for (int ky = 0; ky < kh; ky++) {
            for (int oy = 0; oy < l->out_h; oy++) {
                const int iy = oy * l->stride_h - l->pad_h + ky;
                if (iy < 0 || iy >= l->in_h) continue; /* the padding reads 0 */
                const int8_t *xrow = xc + (size_t)iy * l->in_w;
                int32_t *arow = ao + (size_t)oy * l->out_w;
                for (int kx = 0; kx < kw; kx++) {
                    const int32_t wv = w[((size_t)ci * kh + ky) * kw + kx];
                    int lo, hi;
                    valid_range(l->in_w, l->out_w, sw, l->pad_w, kx, &lo, &hi);
                    /* output ox reads input ox * sw + kx - pad_w */
                    if (lo <= hi) axpy_i8(arow + lo, xrow + lo * sw + kx - l->pad_w, wv, hi - lo + 1, sw);
                }
            }
        }
    }
}

void et_int8_conv_accumulate(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc,
                             const int8_t *residual, int ldr) {
    const int npos = l->out_h * l->out_w, out = et_layer_out(l);
    (void)residual, (void)ldr;
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < l->out_c; o++) conv_channel(l, q + (size_t)r * ldq, o, acc + (size_t)r * out + (size_t)o * npos);
}

/* Max (max = 1) or average pooling over the layer's windows. */
static void pool(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, int max) {
    const int kh = l->kernel_h, kw = l->kernel_w, npos = l->out_h * l->out_w, out = et_layer_out(l);
    for (int r = 0; r < rows; r++) {
        const int8_t *x = q + (size_t)r * ldq;
        int32_t *a = acc + (size_t)r * out;
        for (int c = 0; c < l->out_c; c++) {
            const int8_t *xc = x + (size_t)c * l->in_h * l->in_w;
            for (int oy = 0; oy < l->out_h; oy++) {
                for (int ox = 0; ox < l->out_w; ox++) {
                    int32_t s = max ? -128 : 0;
                    for (int ky = 0; ky < kh; ky++) {
                        const int iy = oy * l->stride_h - l->pad_h + ky;
                        if (iy < 0 || iy >= l->in_h) continue;
                        for (int kx = 0; kx < kw; kx++) {
                            const int ix = ox * l->stride_w - l->pad_w + kx;
                            if (ix < 0 || ix >= l->in_w) continue;
                            const int32_t v = xc[iy * l->in_w + ix];
                            if (max) s = v > s ? v : s;
                            else s += v;
                        }
                    }
                    a[(size_t)c * npos + oy * l->out_w + ox] = max ? s : div_round(s, kh * kw);
                }
            }
        }
    }
}

void et_int8_maxpool(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                     int ldr) {
    (void)residual, (void)ldr;
    pool(l, q, ldq, rows, acc, 1);
}

void et_int8_avgpool(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                     int ldr) {
    (void)residual, (void)ldr;
    pool(l, q, ldq, rows, acc, 0);
}

void et_int8_gap(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                 int ldr) {
    const int npos = l->in_h * l->in_w;
    (void)residual, (void)ldr;
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < l->in_c; c++) {
            const int8_t *xc = q + (size_t)r * ldq + (size_t)c * npos;
            int32_t s = 0;
            for (int i = 0; i < npos; i++) s += xc[i];
            acc[(size_t)r * l->out_c + c] = div_round(s, npos);
        }
    }
}

void et_int8_flatten(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                     int ldr) {
    const int in = et_layer_in(l);
    (void)residual, (void)ldr;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < in; i++) acc[(size_t)r * in + i] = q[(size_t)r * ldq + i];
}

void et_int8_add(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc, const int8_t *residual,
                 int ldr) {
    const int in = et_layer_in(l), s = l->rq_shift[0];
    const int64_t mx = l->rq_mult[0], mr = l->rq_mult[1];
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < in; i++) {
            int64_t t = (int64_t)q[(size_t)r * ldq + i] * mx + (int64_t)residual[(size_t)r * ldr + i] * mr;
            t = shift_floor(t + ((int64_t)1 << (s - 1)), s);
            t = t < -32768 ? -32768 : (t > 32768 ? 32768 : t);
            acc[(size_t)r * in + i] = (int32_t)t;
        }
    }
}
