/*
 * The int8 backbone's forward pass: int32 accumulation and fixed-point requantisation,
 * as a microcontroller kernel does it. Bit-identical to edgetune/quant/int8.py.
 *
 *   q_0    = clip(rint(x / s_0), -127, 127)
 *   acc_k  = q_k . Wq_k^T + bq_k                          (int32)
 *   q_k+1  = clip(round(acc_k * mult >> shift), lo, 127)  (lo = 0 for ReLU: fused)
 *   logits = acc_n * (s_n * s_w)                          (float)
 */
#include "et_int8.h"
#include "et_core.h"
#include "et_layers.h"

#include <math.h>

/* floor(v / 2**s) for any sign: an arithmetic shift that does not rely on the compiler's. */
static int64_t shift_floor(int64_t v, int s) {
    return v >= 0 ? (v >> s) : -(((-v) - 1) >> s) - 1;
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
    et_layer_ops_of(l->kind)->int8_accumulate(l, q, ldq, rows, acc);
}

void et_int8_requantize(const et_backbone *bb, int k, const int32_t *acc, int rows, int8_t *q, int ldq) {
    const et_layer *l = &bb->layers[k];
    const int out = et_layer_out(l);
    const int32_t lo = l->activation == ET_RELU ? 0 : -127;
    for (int r = 0; r < rows; r++) {
        for (int o = 0; o < out; o++) {
            const int s = l->rq_shift[o];
            int64_t p = (int64_t)acc[(size_t)r * out + o] * (int64_t)l->rq_mult[o];
            p = shift_floor(p + ((int64_t)1 << (s - 1)), s);
            p = p < lo ? lo : (p > 127 ? 127 : p);
            q[(size_t)r * ldq + o] = (int8_t)p;
        }
    }
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
    const int n = bb->n_layers;
    et_int8_quantize_input(bb, x, ldx, rows, taps, ldt);
    int col = 0;
    for (int k = 0; k < n; k++) {
        et_int8_accumulate(bb, k, taps + col, ldt, rows, acc);
        if (k == n - 1) {
            et_int8_logits(bb, acc, rows, logits, ldl);
        } else {
            et_int8_requantize(bb, k, acc, rows, taps + col + et_width(bb, k), ldt);
            col += et_width(bb, k);
        }
    }
}

size_t et_int8_workspace_size(const et_backbone *bb, int32_t rows) {
    int maxw = 0;
    if (et_backbone_check(bb) != ET_OK) return 0;
    for (int k = 1; k <= bb->n_layers; k++) maxw = et_width(bb, k) > maxw ? et_width(bb, k) : maxw;
    return (size_t)rows * (size_t)maxw * sizeof(int32_t);
}

int32_t et_int8_forward_taps(const et_backbone *bb, const float *x, int32_t count, int8_t *taps,
                             float *logits, void *workspace, size_t workspace_bytes) {
    const int32_t rc = et_backbone_check(bb);
    if (rc != ET_OK) return rc;
    if (!x || !taps || !logits || count < 1 || !bb->is_int8) return ET_ERR_ARGUMENT;
    if (!workspace || workspace_bytes < et_int8_workspace_size(bb, count)) return ET_ERR_WORKSPACE;
    int d_in = 0;
    for (int k = 0; k < bb->n_layers; k++) d_in += et_width(bb, k);
    et_int8_run(bb, x, et_width(bb, 0), count, taps, d_in, logits, et_width(bb, bb->n_layers),
                (int32_t *)workspace);
    return ET_OK;
}
