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
 *
 * With asymmetric activations (l->asymmetric: TFLite Micro's and CMSIS-NN's int8 conventions,
 * edgetune.quant.int8 with activations="asymmetric") every layer input has a zero point zp:
 *   q_0    = clip(roundf(x / s_0) + zp_0, -128, 127)
 *   acc_k  = bq + sum over the valid (non-padding) window of (q_k - zp_k) x Wq
 *   q_k+1  = clip(mbqm(acc_k, mult, exp) + zp_k+1, act_min, act_max)   dense and conv
 *            (mbqm: TFLM's MultiplyByQuantizedMultiplier, below; [act_min, act_max]: identity
 *             [-128, 127], ReLU [zp, 127], ReLU6 [zp, min(127, zp + roundf(6 / s_k+1))])
 * and the kinds beyond dense as TFLM's reference kernels compute them (below).
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

/* TFLM's fixed-point helpers, on int32 values (gemmlowp's definitions):
 * the high 32 bits of 2 a b rounded half away from zero (saturating the one overflow). */
static int32_t rounding_doubling_high_mul(int32_t a, int32_t b) {
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    const int64_t ab = (int64_t)a * (int64_t)b;
    const int64_t nudge = ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30));
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31)); /* C99 division truncates toward zero */
}

/* x / 2**e (0 <= e <= 31) rounded to nearest, ties away from zero. */
static int32_t rounding_divide_by_pot(int32_t x, int e) {
    const int64_t floor = shift_floor(x, e);
    const int64_t remainder = (int64_t)x - floor * ((int64_t)1 << e); /* x & mask, without relying on it */
    const int64_t threshold = ((((int64_t)1 << e) - 1) >> 1) + (x < 0 ? 1 : 0);
    return (int32_t)(floor + (remainder > threshold ? 1 : 0));
}

/* TFLM's MultiplyByQuantizedMultiplier: x * mult * 2**(e - 31), e > 0 shifting x left first (the
 * binding checked that the accumulator then still fits int32). */
static int32_t multiply_by_quantized_multiplier(int32_t x, int32_t mult, int32_t e) {
    const int32_t left = e > 0 ? e : 0, right = e > 0 ? 0 : -e;
    return rounding_divide_by_pot(rounding_doubling_high_mul((int32_t)((int64_t)x * ((int64_t)1 << left)), mult),
                                  right);
}

/* The int8 range [lo, hi] of hidden layer k's output: its activation fused into the clamp. */
static void clamp_range(const et_backbone *bb, int k, int32_t *lo, int32_t *hi) {
    const et_layer *l = &bb->layers[k];
    if (l->asymmetric) { /* TFLM's CalculateActivationRangeQuantized */
        const int32_t zp = l->out_zero_point;
        *lo = l->activation == ET_IDENTITY ? -128 : zp;
        *hi = 127;
        if (l->activation == ET_RELU6) {
            const float six = roundf(6.0f / bb->layers[k + 1].act_scale);
            *hi = six < (float)(127 - zp) ? zp + (int32_t)six : 127;
        }
        return;
    }
    *lo = l->activation == ET_IDENTITY ? -127 : 0;
    *hi = 127;
    if (l->activation == ET_RELU6) {
        const float top = rintf(6.0f / bb->layers[k + 1].act_scale);
        *hi = top < 127.0f ? (int32_t)top : 127;
    }
}

/* Layer k of an asymmetric backbone: zero points in -128..127 and equal to the layers' they name,
 * TFLM's requantisers (exponents -31..30, multipliers >= 0; an add's three below 1), and an
 * accumulator that still fits int32 when a multiplier above 1 shifts it left. */
static int32_t int8_asymmetric_check(const et_backbone *bb, int k) {
    const et_layer *l = &bb->layers[k];
    const int n = bb->n_layers;
    if (l->zero_point < -128 || l->zero_point > 127) return ET_ERR_ARGUMENT;
    if (l->out_zero_point != (k < n - 1 ? bb->layers[k + 1].zero_point : 0)) return ET_ERR_ARGUMENT;
    if (l->kind == ET_LAYER_ADD ? l->source_zero_point != bb->layers[l->source].zero_point
                                : l->source_zero_point != 0)
        return ET_ERR_ARGUMENT;
    if (k < n - 1 && l->activation != ET_IDENTITY && l->activation != ET_RELU && l->activation != ET_RELU6)
        return ET_ERR_UNSUPPORTED;
    if (et_layer_has_weights(l)) {
        if (!l->qw || !l->wscale || !l->qbias) return ET_ERR_ARGUMENT;
        if (k == n - 1) return ET_OK;
        if (!l->rq_mult || !l->rq_shift) return ET_ERR_ARGUMENT;
        const int64_t fan_in = (int64_t)(l->in_c / l->groups) * l->kernel_h * l->kernel_w;
        for (int c = 0; c < l->out_c; c++) {
            const int32_t e = l->rq_shift[c];
            if (l->rq_mult[c] < 0 || e < -31 || e > 30) return ET_ERR_ARGUMENT;
            const int64_t b = l->qbias[c] < 0 ? -(int64_t)l->qbias[c] : l->qbias[c];
            if (e > 0 && fan_in * 255 * 127 + b >= ((int64_t)1 << (31 - e))) return ET_ERR_ARGUMENT;
        }
    } else if (l->kind == ET_LAYER_ADD) {
        if (!l->rq_mult || !l->rq_shift) return ET_ERR_ARGUMENT;
        for (int i = 0; i < 3; i++)
            if (l->rq_mult[i] < 0 || l->rq_shift[i] < -31 || l->rq_shift[i] > 0) return ET_ERR_ARGUMENT;
    }
    return ET_OK;
}

int32_t et_int8_offset_sum(const et_layer *l, const int8_t *w, int n) {
    if (!l->zero_point) return 0;
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += (int32_t)w[i];
    return -l->zero_point * s;
}

int32_t et_int8_backbone_check(const et_backbone *bb) {
    const int32_t rc = et_backbone_check_layers(bb, 1);
    if (rc != ET_OK) return rc;
    if (!bb->is_int8) return ET_ERR_ARGUMENT;
    const int n = bb->n_layers;
    if (!et_layer_has_weights(&bb->layers[n - 1])) return ET_ERR_UNSUPPORTED; /* the logits come from weights */
    const int32_t asym = bb->layers[0].asymmetric;
    if (asym != 0 && asym != 1) return ET_ERR_ARGUMENT;
    for (int k = 0; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        if (!(l->act_scale > 0.0f) || !isfinite(l->act_scale)) return ET_ERR_ARGUMENT;
        if (l->asymmetric != asym) return ET_ERR_ARGUMENT;
        if (asym) {
            if (int8_asymmetric_check(bb, k) != ET_OK) return ET_ERR_ARGUMENT;
            continue;
        }
        if (l->zero_point || l->out_zero_point || l->source_zero_point) return ET_ERR_ARGUMENT; /* symmetric: 0 */
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
    if (bb->layers[0].asymmetric) { /* TFLM's quantize: roundf(x / s) + zp */
        const float zp = (float)bb->layers[0].zero_point;
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < in; i++) {
                float v = roundf(x[(size_t)r * ldx + i] / s) + zp;
                v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
                q[(size_t)r * ldq + i] = (int8_t)v;
            }
        }
        return;
    }
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
    if (weighted && l->asymmetric) {
        p = (int64_t)multiply_by_quantized_multiplier((int32_t)p, l->rq_mult[c], l->rq_shift[c]) + l->out_zero_point;
    } else if (weighted) {
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
        acc[0] = s + et_int8_offset_sum(l, wo, in) + l->qbias[c];
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

/* a[i] += w * (x[i * stride] + off) for i < n (off: TFLM's input_offset, minus the zero point);
 * restrict: int8_t may alias anything, and the compiler vectorises this only when told that a
 * and x do not overlap. */
static void axpy_i8(int32_t *restrict a, const int8_t *restrict x, int32_t w, int32_t off, int n, int stride) {
    if (off != 0) {
        for (int i = 0; i < n; i++) a[i] += w * ((int32_t)x[i * stride] + off);
        return;
    }
    if (stride == 1) /* the symmetric kernels' loops, as before the offset existed */
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
                if (iy < 0 || iy >= l->in_h) continue; /* the padding contributes nothing */
                const int8_t *xrow = xc + (size_t)iy * l->in_w;
                int32_t *arow = ao + (size_t)oy * l->out_w;
                for (int kx = 0; kx < kw; kx++) {
                    const int32_t wv = w[((size_t)ci * kh + ky) * kw + kx];
                    int lo, hi;
                    valid_range(l->in_w, l->out_w, sw, l->pad_w, kx, &lo, &hi);
                    /* output ox reads input ox * sw + kx - pad_w */
                    if (lo <= hi)
                        axpy_i8(arow + lo, xrow + lo * sw + kx - l->pad_w, wv, -l->zero_point, hi - lo + 1, sw);
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
                    int32_t s = max ? -128 : 0, count = 0;
                    for (int ky = 0; ky < kh; ky++) {
                        const int iy = oy * l->stride_h - l->pad_h + ky;
                        if (iy < 0 || iy >= l->in_h) continue;
                        for (int kx = 0; kx < kw; kx++) {
                            const int ix = ox * l->stride_w - l->pad_w + kx;
                            if (ix < 0 || ix >= l->in_w) continue;
                            const int32_t v = xc[iy * l->in_w + ix];
                            if (max) s = v > s ? v : s;
                            else s += v;
                            count++;
                        }
                    }
                    /* average: symmetric counts the padding as 0; asymmetric (TFLM) divides by the valid count */
                    a[(size_t)c * npos + oy * l->out_w + ox] =
                        max ? s : div_round(s, l->asymmetric ? count : kh * kw);
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
    if (l->asymmetric) { /* TFLM's add: each input offset, shifted left 20, rescaled; the sum rescaled */
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < in; i++) {
                const int32_t a = ((int32_t)q[(size_t)r * ldq + i] - l->zero_point) * (1 << 20);
                const int32_t b = ((int32_t)residual[(size_t)r * ldr + i] - l->source_zero_point) * (1 << 20);
                const int32_t sum = multiply_by_quantized_multiplier(a, l->rq_mult[0], l->rq_shift[0]) +
                                    multiply_by_quantized_multiplier(b, l->rq_mult[1], l->rq_shift[1]);
                acc[(size_t)r * in + i] =
                    multiply_by_quantized_multiplier(sum, l->rq_mult[2], l->rq_shift[2]) + l->out_zero_point;
            }
        }
        return;
    }
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < in; i++) {
            int64_t t = (int64_t)q[(size_t)r * ldq + i] * mx + (int64_t)residual[(size_t)r * ldr + i] * mr;
            t = shift_floor(t + ((int64_t)1 << (s - 1)), s);
            t = t < -32768 ? -32768 : (t > 32768 ? 32768 : t);
            acc[(size_t)r * in + i] = (int32_t)t;
        }
    }
}
