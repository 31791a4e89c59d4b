/* Layer kinds and their operations: see et_layers.h. Only dense is implemented so far. */
#include "et_layers.h"
#include "et_kernels.h"

#include <string.h>

/* ------------------------------------------------------------------ dense (the 1x1 case) */
static void dense_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                          int ldx, int rows, float *z, int ldz) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    if (wt) et_gemm_nn(rows, out, in, x, ldx, wt, out, z, ldz, 0);
    else et_gemm_nt(rows, out, in, x, ldx, w, in, z, ldz, 0, NULL);
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) z[(size_t)r * ldz + o] += bias[o];
}

static void dense_input_grad(const et_layer *l, const float *wt, const float *w, const float *g, int rows,
                             float *dx, float *scratch) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    if (w) et_gemm_nn(rows, in, out, g, out, w, in, dx, in, 0);
    else et_gemm_nt(rows, in, out, g, out, wt, out, dx, in, 0, scratch);
}

static void dense_weight_grad(const et_layer *l, const float *x, const float *g, int rows, float *dwt) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    et_gemm_tn(in, out, rows, x, in, g, out, dwt, out, 0);
}

static size_t dense_scratch_floats(const et_layer *l) {
    return (size_t)et_layer_in(l) * (size_t)et_layer_out(l);
}

static void dense_int8_accumulate(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    const int8_t *w = l->qw;
    const int32_t *b = l->qbias;
    for (int r = 0; r < rows; r++) {
        const int8_t *qr = q + (size_t)r * ldq;
        for (int o = 0; o < out; o++) {
            const int8_t *wo = w + (size_t)o * in;
            int32_t s = 0;
            for (int i = 0; i < in; i++) s += (int32_t)qr[i] * (int32_t)wo[i];
            acc[(size_t)r * out + o] = s + b[o];
        }
    }
}

/* ------------------------------------------------------------------ the table */
static const et_layer_ops OPS[] = {
    [ET_LAYER_DENSE] = {dense_forward, dense_input_grad, dense_weight_grad, dense_scratch_floats,
                        dense_int8_accumulate},
};

const et_layer_ops *et_layer_ops_of(int32_t kind) {
    if (kind < 0 || kind >= (int32_t)(sizeof OPS / sizeof OPS[0])) return NULL;
    return &OPS[kind];
}

void et_layer_activate(const et_layer *l, float *z, int ldz, int rows) {
    const int out = et_layer_out(l);
    if (l->activation == ET_IDENTITY) return;
    if (ldz == out) {
        et_act_forward(l->activation, z, (int64_t)rows * out);
        return;
    }
    for (int r = 0; r < rows; r++) et_act_forward(l->activation, z + (size_t)r * ldz, out);
}

void et_layer_dense(et_layer *l, int32_t in, int32_t out, int32_t activation) {
    memset(l, 0, sizeof(*l));
    l->kind = ET_LAYER_DENSE;
    l->in_c = in;
    l->out_c = out;
    l->in_h = l->in_w = l->out_h = l->out_w = 1;
    l->kernel_h = l->kernel_w = l->stride_h = l->stride_w = l->groups = 1;
    l->activation = activation;
}

/* A dense layer must be exactly the 1x1 case. */
static int dense_shape_ok(const et_layer *l) {
    return l->in_h == 1 && l->in_w == 1 && l->out_h == 1 && l->out_w == 1 && l->kernel_h == 1 && l->kernel_w == 1
           && l->stride_h == 1 && l->stride_w == 1 && l->pad_h == 0 && l->pad_w == 0 && l->groups == 1;
}

int32_t et_backbone_check(const et_backbone *bb) {
    if (!bb || bb->n_layers < 1 || bb->n_layers > ET_MAX_LAYERS || (bb->is_int8 != 0 && bb->is_int8 != 1))
        return ET_ERR_ARGUMENT;
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        if (!et_layer_ops_of(l->kind)) return ET_ERR_UNSUPPORTED;
        if (l->in_c < 1 || l->in_h < 1 || l->in_w < 1 || l->out_c < 1 || l->out_h < 1 || l->out_w < 1)
            return ET_ERR_ARGUMENT;
        /* products of the shapes must fit an int32 */
        if ((int64_t)l->in_c * l->in_h * l->in_w > INT32_MAX || (int64_t)l->out_c * l->out_h * l->out_w > INT32_MAX)
            return ET_ERR_ARGUMENT;
        if (l->kind == ET_LAYER_DENSE && !dense_shape_ok(l)) return ET_ERR_ARGUMENT;
        if (l->activation < ET_RELU || l->activation > ET_IDENTITY) return ET_ERR_ARGUMENT;
        if (k > 0 && (l->in_c != bb->layers[k - 1].out_c || l->in_h != bb->layers[k - 1].out_h
                      || l->in_w != bb->layers[k - 1].out_w))
            return ET_ERR_ARGUMENT;
    }
    return ET_OK;
}
