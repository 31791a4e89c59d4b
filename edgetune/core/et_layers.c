/* Layer kinds and their operations: see et_layers.h. */
#include "et_layers.h"
#include "et_conv.h"
#include "et_int8.h"
#include "et_kernels.h"

#include <string.h>

/* ------------------------------------------------------------------ dense (the 1x1 case) */
static void dense_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                          int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    (void)residual;
    (void)scratch;
    if (wt) et_gemm_nn(rows, out, in, x, ldx, wt, out, z, ldz, 0);
    else et_gemm_nt(rows, out, in, x, ldx, w, in, z, ldz, 0, NULL);
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) z[(size_t)r * ldz + o] += bias[o];
}

static void dense_input_grad(const et_layer *l, const float *wt, const float *w, const float *x, const float *g,
                             int rows, float *dx, float *scratch) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    (void)x;
    if (w) et_gemm_nn(rows, in, out, g, out, w, in, dx, in, 0);
    else et_gemm_nt(rows, in, out, g, out, wt, out, dx, in, 0, scratch);
}

static void dense_weight_grad(const et_layer *l, const float *x, const float *g, int rows, float *dwt,
                              float *scratch) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    (void)scratch;
    et_gemm_tn(in, out, rows, x, in, g, out, dwt, out, 0);
}

static void dense_weight_rows_grad(const et_layer *l, const float *x, const float *g, int rows, int out_rows,
                                   float *dw, float *scratch) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    (void)scratch;
    et_gemm_tn(out_rows, in, rows, g, out, x, in, dw, in, 0); /* dW[:out_rows] = g[:, :out_rows]^T x */
}

static size_t dense_scratch_floats(const et_layer *l) {
    return (size_t)et_layer_in(l) * (size_t)et_layer_out(l);
}

static void dense_bias_grad(const et_layer *l, const float *g, int rows, float *db) {
    const int out = et_layer_out(l);
    for (int o = 0; o < out; o++) db[o] = 0.0f;
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) db[o] += g[(size_t)r * out + o];
}

static void dense_int8_accumulate(const et_layer *l, const int8_t *q, int ldq, int rows, int32_t *acc,
                                  const int8_t *residual, int ldr) {
    const int in = et_layer_in(l), out = et_layer_out(l);
    const int8_t *w = l->qw;
    const int32_t *b = l->qbias;
    (void)residual, (void)ldr;
    for (int r = 0; r < rows; r++) {
        const int8_t *qr = q + (size_t)r * ldq;
        for (int o = 0; o < out; o++) {
            const int8_t *wo = w + (size_t)o * in;
            int32_t s = 0;
            for (int i = 0; i < in; i++) s += (int32_t)qr[i] * (int32_t)wo[i];
            /* asymmetric activations: TFLM's input_offset, -zp times the row's weight sum (0 symmetric) */
            acc[(size_t)r * out + o] = s + et_int8_offset_sum(l, wo, in) + b[o];
        }
    }
}

static size_t no_scratch(const et_layer *l, int rows) {
    (void)l;
    (void)rows;
    return 0;
}

static size_t no_floats(const et_layer *l) {
    (void)l;
    return 0;
}

/* ------------------------------------------------------------------ spatial kinds (et_conv.c) */
/* The et_conv_dims of a layer (its own fields; et_backbone_check derived and compared them). */
et_conv_dims et_layer_dims(const et_layer *l) {
    et_conv_dims d;
    d.in_c = l->in_c, d.in_h = l->in_h, d.in_w = l->in_w;
    d.out_c = l->out_c, d.out_h = l->out_h, d.out_w = l->out_w;
    d.kernel_h = l->kernel_h, d.kernel_w = l->kernel_w, d.stride_h = l->stride_h, d.stride_w = l->stride_w;
    d.pad_h = l->pad_h, d.pad_w = l->pad_w, d.groups = l->groups;
    return d;
}

static void conv_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                         int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt;
    (void)residual;
    et_conv_forward(&d, rows, x, ldx, w, bias, z, ldz, scratch);
}

static size_t conv_scratch_bytes(const et_layer *l, int rows) {
    const et_conv_dims d = et_layer_dims(l);
    return et_conv_forward_scratch_bytes(&d, rows);
}

static void conv_input_grad(const et_layer *l, const float *wt, const float *w, const float *x, const float *g,
                            int rows, float *dx, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)x;
    et_conv_input_grad(&d, rows, g, w, dx, scratch);
}

static void conv_weight_grad(const et_layer *l, const float *x, const float *g, int rows, float *dw, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    et_conv_weight_grad(&d, rows, x, g, dw, 0, scratch);
}

static void conv_weight_rows_grad(const et_layer *l, const float *x, const float *g, int rows, int out_rows,
                                  float *dw, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    et_conv_weight_grad_rows(&d, rows, x, g, out_rows, dw, 0, scratch);
}

static void conv_bias_grad(const et_layer *l, const float *g, int rows, float *db) {
    const et_conv_dims d = et_layer_dims(l);
    et_conv_bias_grad(&d, rows, g, db, 0);
}

static size_t conv_backward_scratch_bytes(const et_layer *l, int rows) {
    const et_conv_dims d = et_layer_dims(l);
    const size_t a = et_conv_input_grad_scratch_bytes(&d, rows), b = et_conv_weight_grad_scratch_bytes(&d, rows);
    return a > b ? a : b;
}

static void maxpool_input_grad(const et_layer *l, const float *wt, const float *w, const float *x, const float *g,
                               int rows, float *dx, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)w, (void)scratch;
    et_maxpool_input_grad(&d, rows, x, g, dx);
}

static void avgpool_input_grad(const et_layer *l, const float *wt, const float *w, const float *x, const float *g,
                               int rows, float *dx, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)w, (void)x, (void)scratch;
    et_avgpool_input_grad(&d, rows, g, dx);
}

static void gap_input_grad(const et_layer *l, const float *wt, const float *w, const float *x, const float *g,
                           int rows, float *dx, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)w, (void)x, (void)scratch;
    et_gap_input_grad(&d, rows, g, dx);
}

/* flatten and add: the gradient passes unchanged (an add's second copy goes to its source). */
static void copy_input_grad(const et_layer *l, const float *wt, const float *w, const float *x, const float *g,
                            int rows, float *dx, float *scratch) {
    (void)wt, (void)w, (void)x, (void)scratch;
    memcpy(dx, g, (size_t)rows * et_layer_in(l) * sizeof(float));
}

static void maxpool_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                            int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)w, (void)bias, (void)residual, (void)scratch;
    et_maxpool_forward(&d, rows, x, ldx, z, ldz);
}

static void avgpool_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                            int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)w, (void)bias, (void)residual, (void)scratch;
    et_avgpool_forward(&d, rows, x, ldx, z, ldz);
}

static void gap_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                        int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const et_conv_dims d = et_layer_dims(l);
    (void)wt, (void)w, (void)bias, (void)residual, (void)scratch;
    et_gap_forward(&d, rows, x, ldx, z, ldz);
}

/* flatten: the row does not change. */
static void flatten_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                            int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const int in = et_layer_in(l);
    (void)wt, (void)w, (void)bias, (void)residual, (void)scratch;
    for (int r = 0; r < rows; r++) memcpy(z + (size_t)r * ldz, x + (size_t)r * ldx, (size_t)in * sizeof(float));
}

/* add: z = x + residual, the residual the input of the layer `source` (rows, in). */
static void add_forward(const et_layer *l, const float *wt, const float *w, const float *bias, const float *x,
                        int ldx, int rows, float *z, int ldz, const float *residual, float *scratch) {
    const int in = et_layer_in(l);
    (void)wt, (void)w, (void)bias, (void)scratch;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx, *rr = residual + (size_t)r * in;
        float *zr = z + (size_t)r * ldz;
        for (int i = 0; i < in; i++) zr[i] = xr[i] + rr[i];
    }
}

/* ------------------------------------------------------------------ the table */
static const et_layer_ops OPS[] = {
    /* forward, input_grad, weight_grad, bias_grad, scratch_floats, int8_accumulate, forward_scratch_bytes,
       backward_scratch_bytes, weight_rows_grad */
    [ET_LAYER_DENSE] = {dense_forward, dense_input_grad, dense_weight_grad, dense_bias_grad, dense_scratch_floats,
                        dense_int8_accumulate, no_scratch, no_scratch, dense_weight_rows_grad},
    [ET_LAYER_CONV1D] = {conv_forward, conv_input_grad, conv_weight_grad, conv_bias_grad, no_floats,
                         et_int8_conv_accumulate, conv_scratch_bytes, conv_backward_scratch_bytes,
                         conv_weight_rows_grad},
    [ET_LAYER_CONV2D] = {conv_forward, conv_input_grad, conv_weight_grad, conv_bias_grad, no_floats,
                         et_int8_conv_accumulate, conv_scratch_bytes, conv_backward_scratch_bytes,
                         conv_weight_rows_grad},
    [ET_LAYER_MAXPOOL1D] = {maxpool_forward, maxpool_input_grad, NULL, NULL, no_floats, et_int8_maxpool, no_scratch,
                            no_scratch, NULL},
    [ET_LAYER_MAXPOOL2D] = {maxpool_forward, maxpool_input_grad, NULL, NULL, no_floats, et_int8_maxpool, no_scratch,
                            no_scratch, NULL},
    [ET_LAYER_AVGPOOL1D] = {avgpool_forward, avgpool_input_grad, NULL, NULL, no_floats, et_int8_avgpool, no_scratch,
                            no_scratch, NULL},
    [ET_LAYER_AVGPOOL2D] = {avgpool_forward, avgpool_input_grad, NULL, NULL, no_floats, et_int8_avgpool, no_scratch,
                            no_scratch, NULL},
    [ET_LAYER_GAP] = {gap_forward, gap_input_grad, NULL, NULL, no_floats, et_int8_gap, no_scratch, no_scratch, NULL},
    [ET_LAYER_FLATTEN] = {flatten_forward, copy_input_grad, NULL, NULL, no_floats, et_int8_flatten, no_scratch,
                          no_scratch, NULL},
    [ET_LAYER_ADD] = {add_forward, copy_input_grad, NULL, NULL, no_floats, et_int8_add, no_scratch, no_scratch, NULL},
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
    l->source = -1;
}

int et_layer_has_weights(const et_layer *l) {
    return l->kind == ET_LAYER_DENSE || l->kind == ET_LAYER_CONV1D || l->kind == ET_LAYER_CONV2D;
}

int32_t et_layer_row_floats(const et_layer *l) {
    return l->in_c / l->groups * l->kernel_h * l->kernel_w;
}

int et_backbone_is_dense(const et_backbone *bb) {
    for (int k = 0; k < bb->n_layers; k++)
        if (bb->layers[k].kind != ET_LAYER_DENSE) return 0;
    return 1;
}

/* No kernel: 1x1, stride 1, padding 0, groups 1 (dense, flatten, add). */
static int no_window(const et_layer *l) {
    return l->kernel_h == 1 && l->kernel_w == 1 && l->stride_h == 1 && l->stride_w == 1 && l->pad_h == 0
           && l->pad_w == 0 && l->groups == 1;
}

static int flat_out(const et_layer *l) { return l->out_h == 1 && l->out_w == 1; }

static int is_1d(int32_t kind) {
    return kind == ET_LAYER_CONV1D || kind == ET_LAYER_MAXPOOL1D || kind == ET_LAYER_AVGPOOL1D;
}

/* Layer k's own fields against what its kind derives from its input; 1 when they agree. */
static int layer_shape_ok(const et_backbone *bb, int k) {
    const et_layer *l = &bb->layers[k];
    if (l->kind != ET_LAYER_ADD && l->source != -1) return 0;
    if (is_1d(l->kind) && (l->in_h != 1 || l->kernel_h != 1 || l->stride_h != 1 || l->pad_h != 0)) return 0;
    et_conv_dims d = et_layer_dims(l);
    int rc;
    switch (l->kind) {
    case ET_LAYER_DENSE:
        return l->in_h == 1 && l->in_w == 1 && flat_out(l) && no_window(l);
    case ET_LAYER_FLATTEN:
        return (int64_t)l->out_c == (int64_t)l->in_c * l->in_h * l->in_w && flat_out(l) && no_window(l);
    case ET_LAYER_ADD: {
        if (l->source < 0 || l->source >= k || !no_window(l)) return 0;
        const et_layer *s = &bb->layers[l->source];
        return l->out_c == l->in_c && l->out_h == l->in_h && l->out_w == l->in_w && s->in_c == l->in_c
               && s->in_h == l->in_h && s->in_w == l->in_w;
    }
    case ET_LAYER_CONV1D:
    case ET_LAYER_CONV2D:
        rc = et_conv_dims_derive(&d);
        break;
    case ET_LAYER_MAXPOOL1D:
    case ET_LAYER_MAXPOOL2D:
    case ET_LAYER_AVGPOOL1D:
    case ET_LAYER_AVGPOOL2D:
        rc = et_pool_dims_derive(&d);
        break;
    case ET_LAYER_GAP: /* the window is the whole input (et_conv.h) */
        rc = et_gap_dims_derive(&d);
        break;
    default:
        return 0;
    }
    return rc == 0 && d.out_h == l->out_h && d.out_w == l->out_w;
}

int32_t et_backbone_check(const et_backbone *bb) {
    return et_backbone_check_layers(bb, 0);
}

int32_t et_backbone_check_layers(const et_backbone *bb, int int8_any_kind) {
    if (!bb || bb->n_layers < 1 || bb->n_layers > ET_MAX_LAYERS || (bb->is_int8 != 0 && bb->is_int8 != 1))
        return ET_ERR_ARGUMENT;
    int weighted = 0;
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        if (!et_layer_ops_of(l->kind)) return ET_ERR_UNSUPPORTED;
        if (bb->is_int8 && !int8_any_kind && l->kind != ET_LAYER_DENSE) return ET_ERR_UNSUPPORTED; /* training */
        if (l->in_c < 1 || l->in_h < 1 || l->in_w < 1 || l->out_c < 1 || l->out_h < 1 || l->out_w < 1)
            return ET_ERR_ARGUMENT;
        if (l->kernel_h < 1 || l->kernel_w < 1 || l->stride_h < 1 || l->stride_w < 1 || l->pad_h < 0 || l->pad_w < 0
            || l->groups < 1)
            return ET_ERR_ARGUMENT;
        /* products of the shapes must fit an int32 */
        if ((int64_t)l->in_c * l->in_h * l->in_w > INT32_MAX || (int64_t)l->out_c * l->out_h * l->out_w > INT32_MAX)
            return ET_ERR_ARGUMENT;
        if (!layer_shape_ok(bb, k)) return ET_ERR_ARGUMENT;
        if (l->activation < ET_RELU || l->activation > ET_RELU6) return ET_ERR_ARGUMENT;
        if (k > 0 && (l->in_c != bb->layers[k - 1].out_c || l->in_h != bb->layers[k - 1].out_h
                      || l->in_w != bb->layers[k - 1].out_w))
            return ET_ERR_ARGUMENT;
        weighted += et_layer_has_weights(l);
    }
    /* the logits are flat, and the skip adapters need at least one layer with weights */
    if (!flat_out(&bb->layers[bb->n_layers - 1]) || !weighted) return ET_ERR_ARGUMENT;
    return ET_OK;
}

int32_t et_skip_taps(const et_backbone *bb, int32_t *layers, int32_t *widths) {
    int32_t n = 0;
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        if (!et_layer_has_weights(l)) continue;
        if (layers) layers[n] = k;
        if (widths) widths[n] = l->in_h * l->in_w > 1 ? l->in_c : et_layer_in(l);
        n++;
    }
    return n;
}

int32_t et_skip_d_in(const et_backbone *bb) {
    int32_t d = 0; /* et_skip_taps' widths, summed without a table of ET_MAX_LAYERS on the stack */
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        if (et_layer_has_weights(l)) d += l->in_h * l->in_w > 1 ? l->in_c : et_layer_in(l);
    }
    return d;
}
