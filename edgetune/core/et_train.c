/*
 * The training loop: the three method engines (layer-wise, skip adapters, sparse update),
 * the skip-cache, and whole epochs per call. The math follows the NumPy reference
 * engine (edgetune/methods/) operation for operation.
 *
 * The sparse update runs an MLP on its own pruned path (sp_forward, sp_backward: float and
 * int8, row by row); on any other chain of layers it runs the layer-wise path (lw_forward,
 * lw_backward) with the layers' weights as the sparse update sees them (its trained rows
 * in front of the frozen ones, assembled in the workspace) and gradients of the trained
 * rows and biases only.
 */
#include "et_core.h"
#include "et_conv.h"
#include "et_int8.h"
#include "et_kernels.h"
#include "et_layers.h"

#include <math.h>
#include <string.h>

#define ALIGN 64
#define FILL_BLOCK 64 /* rows per block when the cache is filled eagerly in place */
#define SKIP_BLOCK 4  /* rows per block of a skip batch's fused pass (skip_step): they stay in L1 */
#define ROW_BLOCK 4    /* output channels per block of an int8 chain's weight assembled a block at a time (sp_blocked):
                          et_kernels.c's product kernel holds 4 rows of its result in registers, so blocks of 4 rows
                          give every value the very operations of the whole layer's product */
#define COL_BLOCK 16   /* input columns per block of a dense layer's input gradient: a multiple of the kernel's 16
                          columns (NR), for the same reason */
#define ACT_BLOCK 32  /* values per block of an int8 chain's kept input read back for a mask (lw_backward) */

/* ------------------------------------------------------------------ the workspace */
/* Every scratch buffer of a run, carved from the caller's workspace in this order. */
typedef struct {
    float *snapshot;                       /* n_params: the epoch's starting parameters */
    int32_t *ybuf, *ids, *missing;         /* batch: labels, ids, positions of uncached rows */
    /* Per-layer tables, sized by the backbone's layers (the first piece of the workspace, so the
       run's context stays a few words on the caller's stack whatever ET_MAX_LAYERS is): */
    int32_t *width;                        /* n + 1: et_width(bb, k), read once: the hot loops index it */
    int32_t *tap_width;                    /* n: skip: each adapter's input width */
    int32_t *pending;                      /* n: layer-wise, not an MLP: pend[k] holds gradients from add layers */
    float **act;                           /* n + 1: layer-wise/sparse: batch x et_width(bb, k) (the sparse update on
                                              an int8 chain: the logits act[n] only, the inputs are in actq) */
    int8_t **actq;                         /* n: sparse, an int8 chain: layer k's input kept for the backward pass,
                                              batch x et_width(bb, k) int8 codes (act_code, act_value) where a
                                              kernel or an add reads it (kept_as) */
    uint8_t **actm;                        /* n: the same where only the mask of its gradient is read: a bit per
                                              value (batch x et_width(bb, k) bits) */
    float *deq;                            /* sparse, an int8 chain: one layer's input (or an add's source) as floats,
                                              where a kernel reads it: act_floats */
    float *lora_u;                         /* layer-wise: n x batch x rank */
    float *gbuf[2];                        /* batch x the widest input below which the backward pass goes:
                                              gradients flowing back (the sparse update on an int8 chain: in
                                              the forward pass, a layer's input and output as floats) */
    float *gu;                             /* batch x (n*rank): gradient of the adapters' middle */
    float *pack;                           /* layer-wise: a weight transposed for the backward pass */
    float *wrow;                           /* sparse int8: one widened weight row */
    int8_t *q[2];                          /* int8: an MLP: batch x max width; the sparse update on an int8 chain:
                                              each one sample's widest input before `first`, a layer's input in
                                              one and its output in the other (sp_int8_prefix) */
    int8_t *qheld;                         /* sparse, an int8 chain: one sample's int8 inputs of the layers before
                                              `first` that an add before `first` reads (int8_held) */
    int32_t *acc;                          /* int8: batch x max width (the sparse update on an int8 chain: one
                                              output channel of one sample before `first`, or a layer without
                                              weights' whole output) */
    float *taps;                           /* skip: batch x row_width */
    const float **rowp;                    /* skip: batch row pointers */
    float *u;                              /* skip: batch x (n*rank) */
    int8_t *qtaps;                         /* skip on int8: batch x d_in (a CNN: every layer's input) */
    float *walk[2];                        /* skip, not an MLP: batch x max width, each layer's input and output;
                                              sparse, not an MLP: the frozen layers' outputs before `first` */
    float **kept;                          /* n: skip, not an MLP: batch x et_width(bb, k), the inputs add layers read */
    float *scratch;                        /* not an MLP: the layers' (and LoRA convolutions') kernel scratch */
    float **pend;                          /* n: layer-wise, not an MLP: batch x et_width(bb, k), an add's gradient
                                              waiting for its source layer's input */
    float *tmp;                            /* layer-wise, not an MLP: batch x max width, a LoRA convolution's output */
    float *sw;                             /* sparse, not an MLP: the weight of one layer that sp_assembles (its
                                              trained rows in front of its frozen ones; on an int8 chain every
                                              layer with weights from `first` on, dequantised), assembled where
                                              a pass uses it: the largest such layer's out_c x et_layer_row_floats */
    float *sb;                             /* sparse, an int8 chain: one layer's dequantised bias (the largest out_c) */
    float *chan;                           /* sparse, not an MLP: one channel of an in-place depthwise layer */
    float *gstep;                          /* layer-wise and sparse: the fused update's gradient of one trained
                                              tensor at a time (the largest: fused_scratch_floats) */
} layout;

static size_t take(char **cur, size_t bytes) {
    const size_t padded = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    *cur += padded;
    return padded;
}

static int max_width(const et_backbone *bb) {
    int w = 0;
    for (int k = 0; k <= bb->n_layers; k++) w = et_width(bb, k) > w ? et_width(bb, k) : w;
    return w;
}

/* Whether an add layer j in [from, to) reads layer k's input (its source). */
static int read_between(const et_backbone *bb, int k, int from, int to) {
    for (int j = from; j < to && j < bb->n_layers; j++)
        if (bb->layers[j].kind == ET_LAYER_ADD && bb->layers[j].source == k) return 1;
    return 0;
}

static int is_source(const et_backbone *bb, int k) { return read_between(bb, k, k + 1, bb->n_layers); }

/* The two convolutions of a LoRA adapter beside convolution l, as PEFT builds them: A with
 * `rank` output channels and l's kernel, stride and padding, B a 1x1 one from rank to l's outputs. */
static void lora_dims(const et_layer *l, int rank, et_conv_dims *a, et_conv_dims *b) {
    *a = et_layer_dims(l);
    a->out_c = rank;
    a->groups = 1;
    *b = et_layer_dims(l);
    b->in_c = rank, b->in_h = l->out_h, b->in_w = l->out_w;
    b->kernel_h = b->kernel_w = b->stride_h = b->stride_w = 1;
    b->pad_h = b->pad_w = 0;
    b->groups = 1;
}

static size_t most(size_t a, size_t b) { return a > b ? a : b; }

static int sp_blocked(const et_backbone *bb, const et_method *m, int k); /* below, with the weight's assembly */

/* The sparse update on an int8 chain computes the trained rows' weight gradient of a dense or pointwise layer
 * (sp_blocked, one group) a block of rows at a time, each block stepped at once (the fused update), so the
 * gradient scratch (gstep) and the kernel's scratch hold a block: for a dense layer ROW_BLOCK rows (a block of
 * the product's result rows), for a pointwise one COL_BLOCK rows (its product's result columns), whose last
 * block takes the rows left over with it (the kernel's product runs its packed path on 16 or more columns: a
 * block of fewer would take another), so every value comes from the very operations of the whole gradient. */
static int sp_grad_blocked(const et_backbone *bb, const et_method *m, int k) {
    return m->kind == ET_SPARSE && m->rows[k] > 0 && bb->layers[k].groups == 1 && sp_blocked(bb, m, k);
}
/* Rows in the gradient block that starts `left` rows before the last trained row. */
static int grad_block(const et_layer *l, int left) {
    if (l->kind == ET_LAYER_DENSE) return left < ROW_BLOCK ? left : ROW_BLOCK;
    return left < 2 * COL_BLOCK ? left : COL_BLOCK;
}
/* The largest such block. */
static int grad_block_most(const et_layer *l, int rows) {
    if (l->kind == ET_LAYER_DENSE) return rows < ROW_BLOCK ? rows : ROW_BLOCK;
    return rows < 2 * COL_BLOCK ? rows : COL_BLOCK + rows % COL_BLOCK;
}

/* Bytes of scratch the layers' kernels need for `batch` rows: the most any layer from `from` on asks
 * (the frozen forward; with `backward` the gradients and the LoRA convolutions of the layers the
 * backward pass enters, m->first on; the sparse update's convolutions: only the gradients it computes,
 * the input's above `first` and the trained rows' weight gradient). */
static size_t kernel_scratch(const et_backbone *bb, const et_method *m, int batch, int backward, int from) {
    size_t s = 0;
    for (int k = from; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        const et_layer_ops *ops = et_layer_ops_of(l->kind);
        s = most(s, ops->forward_scratch_bytes(l, batch));
        if (!backward || k < m->first) continue;
        if (m->kind == ET_SPARSE && (l->kind == ET_LAYER_CONV1D || l->kind == ET_LAYER_CONV2D)) {
            /* the sparse update: the input's gradient above `first`, the gradient of the trained rows only
               (a block of them at a time: sp_grad_blocked, one sample at a time, as a layer of those rows) */
            et_conv_dims d = et_layer_dims(l);
            if (k > m->first) s = most(s, et_conv_input_grad_scratch_bytes(&d, batch));
            if (!sp_grad_blocked(bb, m, k)) {
                s = most(s, et_conv_weight_grad_rows_scratch_bytes(&d, batch, m->rows[k]));
            } else {
                d.out_c = grad_block_most(l, m->rows[k]);
                s = most(s, et_conv_weight_grad_rows_scratch_bytes(&d, 1, d.out_c));
            }
            continue;
        }
        s = most(s, ops->backward_scratch_bytes(l, batch));
        if (m->off_lora_a[k] >= 0 && l->kind != ET_LAYER_DENSE) {
            et_conv_dims a, b;
            lora_dims(l, m->rank, &a, &b);
            s = most(s, most(et_conv_forward_scratch_bytes(&a, batch), et_conv_forward_scratch_bytes(&b, batch)));
            s = most(s, et_conv_input_grad_scratch_bytes(&a, batch));
            s = most(s, et_conv_weight_grad_scratch_bytes(&a, batch));
            s = most(s, et_conv_input_grad_scratch_bytes(&b, batch));
            s = most(s, et_conv_weight_grad_scratch_bytes(&b, batch));
        }
    }
    return s;
}

/* Values per sample of layer k's LoRA middle u (rank x the output positions), 0 without an adapter. */
static int lora_width(const et_backbone *bb, const et_method *m, int k) {
    const et_layer *l = &bb->layers[k];
    return m->off_lora_a[k] < 0 ? 0 : m->rank * l->out_h * l->out_w;
}

static int max_lora_width(const et_backbone *bb, const et_method *m) {
    int w = m->rank;
    for (int k = 0; k < bb->n_layers; k++) w = lora_width(bb, m, k) > w ? lora_width(bb, m, k) : w;
    return w;
}

/* Values of every layer's input side by side: an int8 CNN's pass keeps them all (et_int8_run). */
static size_t int8_row(const et_backbone *bb) {
    size_t w = 0;
    for (int k = 0; k < bb->n_layers; k++) w += (size_t)et_width(bb, k);
    return w;
}

/* The layer a sparse update's forward pass starts at in floats (the int8 pass runs those before it). */
static int sp_start(const et_backbone *bb, const et_method *m) {
    return m->first < bb->n_layers - 1 ? m->first : bb->n_layers - 1;
}

/* The sparse update on an int8 chain runs the layers before `start` (sp_start) as the integer pass, a
 * sample at a time (sp_int8_prefix): each layer's int8 input in one of two buffers (q[0], q[1]) and
 * its requantised output in the other, one output channel at a time (its int32 accumulator holds one
 * channel's positions; a flatten's whole output), but the input of a layer k that an add before `start`
 * reads, which stays in its own place in qheld until then. */
static int int8_held(const et_backbone *bb, int start, int k) { return k < start && read_between(bb, k, k + 1, start); }

/* Whether the integer pass runs a layer without weights one channel at a time (its kind's int8_accumulate on a
 * layer of one channel, then et_int8_requantize_channel): pooling, gap and an add, whose output channel c reads
 * input channel c only (and the add its source's channel c); a flatten runs whole. */
static int int8_by_channel(const et_layer *l) {
    return l->kind != ET_LAYER_FLATTEN && !et_layer_has_weights(l) && l->in_c == l->out_c;
}

/* Which of q[0], q[1] layer k's int8 input is in (-1: its place in qheld), given layer k-1's (b):
 * the buffer its input was not in; layer 0's input in q[0]. */
static int int8_turn(const et_backbone *bb, int start, int k, int b) {
    return int8_held(bb, start, k) ? -1 : (k > 0 && b == 0 ? 1 : 0);
}

/* Where layer k's held input starts in qheld: the widths of the held inputs before it. */
static size_t held_col(const et_backbone *bb, int start, int k) {
    size_t s = 0;
    for (int j = 0; j < k; j++)
        if (int8_held(bb, start, j)) s += (size_t)et_width(bb, j);
    return s;
}

/* ------------------------------------------------------------------ the fused update */
/* Floats of layer k's trained tensors, as their gradients are written (et_core.h's et_method):
 * the weight (the sparse update: its trained rows), the bias, LoRA's A and B; 0 where absent. */
static int64_t weight_floats(const et_backbone *bb, const et_method *m, int k) {
    const et_layer *l = &bb->layers[k];
    if (m->off_weight[k] < 0) return 0;
    const int64_t rows = m->kind == ET_SPARSE ? m->rows[k] : l->out_c;
    return rows * et_layer_row_floats(l);
}
static int64_t bias_floats(const et_backbone *bb, const et_method *m, int k) {
    return m->off_bias[k] < 0 ? 0 : bb->layers[k].out_c;
}
static int64_t lora_a_floats(const et_backbone *bb, const et_method *m, int k) {
    const et_layer *l = &bb->layers[k];
    return m->off_lora_a[k] < 0 ? 0 : (int64_t)m->rank * l->in_c * l->kernel_h * l->kernel_w;
}
static int64_t lora_b_floats(const et_backbone *bb, const et_method *m, int k) {
    return m->off_lora_b[k] < 0 ? 0 : (int64_t)bb->layers[k].out_c * m->rank;
}

/* Floats of the fused update's gradient scratch: the largest trained tensor (or block of one: sp_grad_blocked);
 * -1 when the
 * update cannot be fused (the skip adapters, or tensors that do not cover the n_params
 * parameters exactly once, which the two-phase step would also move). */
static int64_t fused_scratch_floats(const et_backbone *bb, const et_method *m) {
    if (m->kind == ET_SKIP || m->first < 0 || m->first >= bb->n_layers) return -1;
    if (m->kind == ET_LAYERWISE && bb->is_int8) return -1;
    int64_t most_floats = 0, total = 0;
    const int64_t delta = m->off_bias_delta >= 0 ? et_width(bb, bb->n_layers) : 0;
    for (int k = 0; k < bb->n_layers; k++) {
        const int64_t t[4] = {weight_floats(bb, m, k), bias_floats(bb, m, k), lora_a_floats(bb, m, k),
                              lora_b_floats(bb, m, k)};
        for (int j = 0; j < 4; j++) {
            if (t[j] > 0 && k < m->first) return -1; /* the backward pass stops at `first` */
            /* a weight whose gradient comes a block of rows at a time (sp_grad_blocked): that block */
            const int64_t scratch = j == 0 && t[j] > 0 && k >= m->first && sp_grad_blocked(bb, m, k)
                                        ? (int64_t)grad_block_most(&bb->layers[k], m->rows[k]) *
                                              et_layer_row_floats(&bb->layers[k])
                                        : t[j];
            most_floats = scratch > most_floats ? scratch : most_floats;
            total += t[j];
        }
    }
    most_floats = delta > most_floats ? delta : most_floats;
    return total + delta == m->n_params ? most_floats : -1;
}

int32_t et_fused_update(const et_backbone *bb, const et_method *m) {
    if (!bb || !m || bb->n_layers < 1 || bb->n_layers > ET_MAX_LAYERS) return 0;
    return fused_scratch_floats(bb, m) >= 0;
}

size_t et_fused_scratch_bytes(const et_backbone *bb, const et_method *m) {
    if (!et_fused_update(bb, m)) return 0;
    const size_t bytes = (size_t)fused_scratch_floats(bb, m) * sizeof(float);
    return (bytes + ALIGN - 1) / ALIGN * ALIGN; /* as plan_layout's piece (none for 0 bytes) */
}

/* The sparse update on a float chain of layers runs the frozen layers before `first` through two
 * buffers in turn; layer k (0 < k, k + 1 < first) runs in place in its input's buffer when it is a
 * depthwise convolution whose output has its input's shape (et_conv_in_place_ok) and neither its
 * input nor its output is an add's source (those have their own pieces). */
static int prunes(const et_backbone *bb, const et_method *m) {
    return m->kind == ET_SPARSE && !et_backbone_is_dense(bb) && !bb->is_int8;
}
static int in_place(const et_backbone *bb, const et_method *m, int k) {
    if (!prunes(bb, m) || k < 1 || k + 1 >= sp_start(bb, m) || is_source(bb, k) || is_source(bb, k + 1)) return 0;
    const et_layer *l = &bb->layers[k];
    if (l->kind != ET_LAYER_CONV1D && l->kind != ET_LAYER_CONV2D) return 0;
    const et_conv_dims d = et_layer_dims(l);
    return et_conv_in_place_ok(&d);
}
/* Which of the two buffers holds act[k + 1], given act[k]'s (b): they alternate, but an in-place
 * layer's output stays in its input's (act[1] is in buffer 1). */
static int walk_next(const et_backbone *bb, const et_method *m, int k, int b) { return in_place(bb, m, k) ? b : b ^ 1; }

/* The sparse update on a chain of layers runs layer k on a weight assembled in the workspace (sp_weight):
 * a layer with trained rows, and on an int8 chain every layer with weights from `first` on. */
static int sp_assembles(const et_backbone *bb, const et_method *m, int k) {
    if (m->kind != ET_SPARSE || et_backbone_is_dense(bb) || k < m->first || k >= bb->n_layers) return 0;
    return m->rows[k] > 0 || (bb->is_int8 && et_layer_has_weights(&bb->layers[k]));
}

/* The sparse update on an int8 chain assembles the float weight of a dense, pointwise (1x1, stride 1, no
 * padding, one group) or depthwise (a filter per input channel) layer a block of rows at a time for the
 * forward pass and a block of input columns (depthwise: of channels) at a time for the input's gradient
 * (sp_forward_blocks, sp_input_grad_blocks), not the whole layer. */
static int sp_blocked(const et_backbone *bb, const et_method *m, int k) {
    if (!bb->is_int8 || !sp_assembles(bb, m, k)) return 0;
    const et_layer *l = &bb->layers[k];
    if (l->kind == ET_LAYER_DENSE) return 1;
    if (l->kind != ET_LAYER_CONV1D && l->kind != ET_LAYER_CONV2D) return 0;
    if (l->groups > 1) return l->groups == l->in_c && l->groups == l->out_c; /* depthwise */
    return l->kernel_h == 1 && l->kernel_w == 1 && l->stride_h == 1 && l->stride_w == 1 && l->pad_h == 0 &&
           l->pad_w == 0;
}

/* Channels in the block of a blocked layer that starts `left` channels before its end: ROW_BLOCK, but a
 * depthwise layer's last block takes a lone channel with it (a block of one channel would be one group, an
 * ordinary convolution to the kernels, et_conv.c, where two or more are depthwise). */
static int sp_block(const et_layer *l, int left, int step) {
    if (left <= step) return left;
    return l->groups > 1 && left == step + 1 ? left : step;
}

/* Floats of the weight scratch layer k needs (sp_assembles): the whole layer, or a blocked layer's largest block
 * (ROW_BLOCK rows forward; the input's gradient, above `first`: all rows of ROW_BLOCK or COL_BLOCK columns). */
static size_t sp_weight_floats(const et_backbone *bb, const et_method *m, int k) {
    const et_layer *l = &bb->layers[k];
    const size_t row = (size_t)et_layer_row_floats(l), out = (size_t)l->out_c;
    if (!sp_blocked(bb, m, k)) return out * row;
    if (l->groups > 1) return (out < ROW_BLOCK + 1 ? out : ROW_BLOCK + 1) * row; /* depthwise: channels, both ways */
    const size_t cols = l->kind == ET_LAYER_DENSE ? COL_BLOCK : ROW_BLOCK;
    return most((out < ROW_BLOCK ? out : ROW_BLOCK) * row, k > m->first ? out * (row < cols ? row : cols) : 0);
}

/*
 * The sparse update on an int8 chain keeps each layer's input from `start` on as int8 codes (actq), not
 * floats: every one of them is an int8 value times the layer's input scale (the integer pass's output
 * dequantised, or the float pass's output fake-quantised to it), so the code gives back the very float:
 * act_value(act_code(v), s) == v * s for v the rounded and clamped value (-127..127), its sign of zero
 * included (-0.0 has the code -128, which no int8 activation takes: they are clamped to -127..127;
 * asymmetric models, whose activations reach -128, are refused by train_check).
 */
static int8_t act_code(float v) { return v == 0.0f && signbit(v) ? (int8_t)-128 : (int8_t)v; }
static float act_value(int8_t q, float s) { return q == -128 ? -0.0f : (float)q * s; }

/* Whether a layer's input gradient reads its input (max pooling: where the maximum was); the others
 * (et_layers.c) read only the weights and the output's gradient. */
static int grad_reads_input(const et_layer *l) {
    return l->kind == ET_LAYER_MAXPOOL1D || l->kind == ET_LAYER_MAXPOOL2D;
}

/* What the sparse update on an int8 chain keeps of layer k's input (k < n) for the rest of the step: its codes
 * where a kernel reads its floats (the trained rows' weight gradient, a max pooling's input gradient) or an add
 * does (its source, the integer pass's ones included); else, above `first`, only the mask its gradient is
 * multiplied by (the activation's derivative and the clamp: 0 or 1 for the activations an int8 chain takes,
 * identity, ReLU and ReLU6), a bit a value; nothing below `first` or for a layer `first` whose weights and
 * input no kernel reads (its input's gradient is not taken). */
enum { KEPT_NONE, KEPT_CODES, KEPT_MASK };
static int kept_as(const et_backbone *bb, const et_method *m, int k) {
    const int start = sp_start(bb, m), n = bb->n_layers;
    if (k < start) return read_between(bb, k, start, n) ? KEPT_CODES : KEPT_NONE;
    const et_layer *l = &bb->layers[k];
    if ((k >= m->first && m->rows[k] > 0) || grad_reads_input(l) || is_source(bb, k)) return KEPT_CODES;
    return k > m->first ? KEPT_MASK : KEPT_NONE;
}

/* The sparse update on an int8 chain: which of the two gradient buffers (gbuf) holds layer k's input as
 * floats (k from `first` on): the backward pass hands the gradient of layer n - 1's input down in gbuf[0],
 * then they alternate, and the forward pass puts each input where its gradient will be, so each buffer is
 * sized for the inputs of every other layer. */
static int float_turn(const et_backbone *bb, int k) { return (bb->n_layers - 1 - k) & 1; }

/* The floats between which the gradient passes back through layer k's int8 input (k > 0): -127 and 127 times
 * its scale, ReLU6's int8 top for a ReLU6 in front (as the integer pass clamps: float32 division and rint). */
static void clamp_bounds(const et_backbone *bb, int k, float *top, float *bottom) {
    const float s = bb->layers[k].act_scale;
    float hi = 127.0f;
    if (bb->layers[k - 1].activation == ET_RELU6) hi = fminf(127.0f, rintf(6.0f / s));
    *top = hi * s, *bottom = -127.0f * s;
}

/* Layer k's gradient mask for `len` of its input's floats h: the activation's derivative (et_act_grad_mul on
 * ones), then 0 where the clamp held; 0 or 1 each, so one product by it is both products. */
static void grad_mask(const et_backbone *bb, int k, const float *h, int len, float *f) {
    float top, bottom;
    clamp_bounds(bb, k, &top, &bottom);
    for (int i = 0; i < len; i++) f[i] = 1.0f;
    et_act_grad_mul(bb->layers[k - 1].activation, f, h, len);
    for (int i = 0; i < len; i++) f[i] *= (float)(h[i] < top && h[i] > bottom);
}

/* The pieces plan_layout carves, by name, as et_workspace_pieces reports them (NULL: not asked). */
typedef struct {
    const char **names;
    size_t *bytes;
    int32_t max, count;
} piece_log;

static void note(piece_log *log, const char *name, size_t bytes) {
    if (!log) return;
    if (log->count < log->max) {
        log->names[log->count] = name;
        log->bytes[log->count] = bytes;
    }
    log->count++;
}

/*
 * Lays out the workspace at `base` (aligned to 64 bytes) and returns its size; with
 * base == NULL only the size, for a target whose pointers are `pointer_bytes` wide (the
 * size of the batch's row pointers). This is the only place the layout is written:
 * edgetune's planner asks et_workspace_size_for() through the binding (and
 * et_workspace_pieces for its pieces by name).
 */
static size_t plan_layout(const et_backbone *bb, const et_method *m, int batch, int pointer_bytes, char *base,
                          layout *L, piece_log *log) {
    char *cur = base;
    size_t total = 0;
    const size_t B = (size_t)batch, F = sizeof(float);
    const int n = bb->n_layers, mw = max_width(bb);
    layout dummy;
    if (!L) L = &dummy;
    memset(L, 0, sizeof(*L));
#define PIECE(field, type, count)                              \
    do {                                                       \
        if (base) L->field = (type)(void *)cur;                \
        const size_t got_ = take(&cur, (size_t)(count));       \
        note(log, #field, got_);                               \
        total += got_;                                         \
    } while (0)
    { /* the per-layer tables: 3n + 1 int32, then 3n + 1 pointers, in one piece */
        const size_t P = (size_t)pointer_bytes, ints = ((size_t)(3 * n + 1) * 4 + P - 1) / P * P;
        if (base) {
            memset(cur, 0, ints + (size_t)(3 * n + 1) * P);
            L->width = (int32_t *)(void *)cur;
            L->tap_width = L->width + n + 1;
            L->pending = L->tap_width + n;
            L->act = (float **)(void *)(cur + ints);
            L->kept = L->act + n + 1;
            L->pend = L->kept + n;
        }
        const size_t got = take(&cur, ints + (size_t)(3 * n + 1) * P);
        note(log, "tables", got);
        total += got;
    }
    PIECE(snapshot, float *, (size_t)m->n_params * F);
    PIECE(ybuf, int32_t *, B * 4);
    PIECE(ids, int32_t *, B * 4);
    PIECE(missing, int32_t *, B * 4);
    if (m->kind == ET_SKIP) { /* the skip adapters need only the logits and their gradient */
        PIECE(gbuf[0], float *, B * et_width(bb, n) * F);
    } else if (m->kind == ET_SPARSE && bb->is_int8 && !et_backbone_is_dense(bb)) {
        size_t gw[2] = {0, 0}; /* the gradients flow back to the first trained layer's input, no further; */
        for (int k = m->first; k < n; k++) /* each buffer sized for the inputs that land in it (float_turn) */
            gw[float_turn(bb, k)] = most(gw[float_turn(bb, k)], (size_t)et_width(bb, k));
        PIECE(gbuf[0], float *, B * gw[0] * F);
        PIECE(gbuf[1], float *, B * gw[1] * F);
    } else {
        /* the gradients the backward pass hands down: layer k's input for k > first (and the logits) */
        int gw = et_width(bb, n);
        for (int k = m->first + 1; k < n; k++) gw = et_width(bb, k) > gw ? et_width(bb, k) : gw;
        PIECE(gbuf[0], float *, B * gw * F);
        PIECE(gbuf[1], float *, B * gw * F);
    }
    if (m->kind == ET_SKIP) {
        const size_t nr = (size_t)et_skip_taps(bb, NULL, NULL) * m->rank;
        const size_t row = (size_t)et_skip_d_in(bb) + et_width(bb, n);
        PIECE(taps, float *, B * row * F);
        PIECE(rowp, const float **, B * (size_t)pointer_bytes);
        PIECE(u, float *, B * nr * F);
        PIECE(gu, float *, B * nr * F);
        if (bb->is_int8) { /* an int8 CNN's pass keeps every layer's input (an add reads its source's) */
            PIECE(qtaps, int8_t *, B * (et_backbone_is_dense(bb) ? (size_t)et_skip_d_in(bb) : int8_row(bb)));
            PIECE(acc, int32_t *, B * mw * 4);
        }
        if (!et_backbone_is_dense(bb) && !bb->is_int8) { /* the frozen forward runs layer by layer (chain_taps) */
            PIECE(walk[0], float *, B * mw * F);
            PIECE(walk[1], float *, B * mw * F);
            for (int k = 0; k < n; k++)
                if (is_source(bb, k)) PIECE(kept[k], float *, B * et_width(bb, k) * F);
            PIECE(scratch, float *, kernel_scratch(bb, m, batch, 0, 0));
        }
    } else {
        /* the sparse update on a chain of layers keeps nothing below its first trained layer: the
           frozen layers before it write their outputs into two buffers in turn (but an add's source) */
        const int prune = m->kind == ET_SPARSE && !et_backbone_is_dense(bb);
        /* on an int8 chain those layers run the integer pass from the samples: no float buffer before `first` */
        const int int8_chain = prune && bb->is_int8;
        size_t turn[2] = {0, 0}, chan = 0; /* the widest output each buffer takes; an in-place layer's channel */
        for (int k = 1, b = 1; prune && !int8_chain && k < m->first; b = walk_next(bb, m, k, b), k++) {
            if (!is_source(bb, k)) turn[b] = most(turn[b], (size_t)et_width(bb, k));
            if (in_place(bb, m, k)) chan = most(chan, (size_t)bb->layers[k].out_h * bb->layers[k].out_w);
        }
        if (turn[0]) PIECE(walk[0], float *, B * turn[0] * F);
        if (turn[1]) PIECE(walk[1], float *, B * turn[1] * F);
        if (chan) PIECE(chan, float *, chan * F);
        const int start = sp_start(bb, m);
        if (int8_chain) { /* the tables of what it keeps of each layer's input (kept_as; NULL: not that) */
            const size_t P = (size_t)pointer_bytes;
            PIECE(actq, int8_t **, (size_t)n * P);
            if (base) memset(L->actq, 0, (size_t)n * P);
            PIECE(actm, uint8_t **, (size_t)n * P);
            if (base) memset(L->actm, 0, (size_t)n * P);
        }
        for (int k = 0, b = 1; k <= n; b = k > 0 && prune && !int8_chain ? walk_next(bb, m, k, b) : b, k++) {
            /* an int8 chain keeps before `start` only what an add from `start` on reads */
            const int read_later = int8_chain ? read_between(bb, k, start, n) : is_source(bb, k);
            if (prune && (k > 0 || int8_chain) && k < start && !read_later) {
                if (base) L->act[k] = int8_chain ? NULL : L->walk[b]; /* b: act[k]'s buffer from k = 1 on */
                continue;
            }
            if (int8_chain && k < n && kept_as(bb, m, k) == KEPT_CODES) PIECE(actq[k], int8_t *, B * et_width(bb, k));
            else if (int8_chain && k < n && kept_as(bb, m, k) == KEPT_MASK) PIECE(actm[k], uint8_t *, (B * et_width(bb, k) + 7) / 8);
            else if (!int8_chain || k == n) PIECE(act[k], float *, B * et_width(bb, k) * F);
        }
        if (int8_chain) { /* the float copy of an input that a kernel reads (act_floats) */
            size_t dw = 0;
            for (int k = start; k < n; k++) {
                const et_layer *l = &bb->layers[k];
                if (l->kind == ET_LAYER_ADD) dw = most(dw, (size_t)et_width(bb, l->source));
                if (k >= m->first && (m->rows[k] > 0 || grad_reads_input(l))) dw = most(dw, (size_t)et_width(bb, k));
            }
            PIECE(deq, float *, B * dw * F);
        }
        if (int8_chain) { /* the integer pass up to `start`, a sample at a time (sp_int8_prefix) */
            size_t qw[2] = {0, 0}, held = 0, aw = 0; /* q[0]'s and q[1]'s widest input, the held inputs, the accumulator */
            for (int k = 0, b = 0; k <= start; k++) {
                const et_layer *l = &bb->layers[k];
                b = int8_turn(bb, start, k, b);
                if (b < 0) held += (size_t)et_width(bb, k);
                else qw[b] = most(qw[b], (size_t)et_width(bb, k));
                if (k < start) /* one output channel's positions (a flatten: its whole output) */
                    aw = most(aw, et_layer_has_weights(l) || int8_by_channel(l) ? (size_t)l->out_h * l->out_w
                                                                                 : (size_t)et_width(bb, k + 1));
            }
            PIECE(q[0], int8_t *, qw[0]);
            PIECE(q[1], int8_t *, qw[1]);
            PIECE(qheld, int8_t *, held);
            PIECE(acc, int32_t *, aw * 4);
        }
        if (m->kind == ET_LAYERWISE) {
            const size_t U = (size_t)max_lora_width(bb, m); /* an MLP's: the rank */
            PIECE(lora_u, float *, (size_t)n * B * U * F);
            PIECE(gu, float *, B * U * F);
            size_t pack = 0; /* layers whose input gradient needs W (out, in) that is not given */
            for (int k = m->first + 1; k < n; k++)
                if (m->off_weight[k] >= 0 || !bb->layers[k].w) {
                    const size_t p = et_layer_ops_of(bb->layers[k].kind)->scratch_floats(&bb->layers[k]);
                    pack = p > pack ? p : pack;
                }
            PIECE(pack, float *, pack * F);
            if (!et_backbone_is_dense(bb)) {
                PIECE(scratch, float *, kernel_scratch(bb, m, batch, 1, 0));
                PIECE(tmp, float *, B * mw * F);
                for (int k = m->first; k < n; k++)
                    if (is_source(bb, k)) PIECE(pend[k], float *, B * et_width(bb, k) * F);
            }
        } else if (!et_backbone_is_dense(bb)) { /* sparse on a chain of layers: the layer-wise path */
            /* an int8 chain runs the float kernels from its first trained layer on only */
            PIECE(scratch, float *, kernel_scratch(bb, m, batch, 1, bb->is_int8 ? sp_start(bb, m) : 0));
            for (int k = m->first; k < n; k++)
                if (is_source(bb, k)) PIECE(pend[k], float *, B * et_width(bb, k) * F);
            size_t sw = 0, sb = 0; /* one layer's assembled weight (or block of it; and int8 bias) at a time */
            for (int k = m->first; k < n; k++)
                if (sp_assembles(bb, m, k)) {
                    sw = most(sw, sp_weight_floats(bb, m, k));
                    if (bb->is_int8) sb = most(sb, (size_t)bb->layers[k].out_c);
                }
            PIECE(sw, float *, sw * F);
            PIECE(sb, float *, sb * F);
        } else if (bb->is_int8) {
            PIECE(wrow, float *, (size_t)mw * F);
            PIECE(q[0], int8_t *, B * mw);
            PIECE(q[1], int8_t *, B * mw);
            PIECE(acc, int32_t *, B * mw * 4);
        }
    }
    { /* the fused update: one trained tensor's gradient at a time, instead of all n_params */
        const int64_t g = fused_scratch_floats(bb, m);
        if (g > 0) PIECE(gstep, float *, (size_t)g * F);
    }
#undef PIECE
    return total;
}

/* The sparse update's rows and biases fit the layers: trained rows 0..out_c from `first` on and
 * tensors only on layers with weights. */
static int sparse_rows_ok(const et_backbone *bb, const et_method *m) {
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        const int weights = et_layer_has_weights(l);
        if (weights && !bb->is_int8 && !l->w) return 0; /* the float path reads W as stored */
        if (m->rows[k] < 0 || m->rows[k] > (weights ? l->out_c : 0) || (m->rows[k] > 0 && k < m->first)) return 0;
        if ((m->rows[k] > 0) != (m->off_weight[k] >= 0) || (m->off_bias[k] >= 0 && !weights)) return 0;
    }
    return 1;
}

/* et_backbone_check, and for an int8 backbone that is not an MLP (the skip methods and the sparse
 * update) the int8 pass's own checks (et_int8_backbone_check). */
static int32_t train_check(const et_backbone *bb, const et_method *m) {
    /* the sparse update (QAS) of an asymmetric int8 backbone is not supported yet */
    if (bb && bb->is_int8 == 1 && bb->n_layers >= 1 && bb->n_layers <= ET_MAX_LAYERS && bb->layers[0].asymmetric &&
        m && m->kind == ET_SPARSE)
        return ET_ERR_UNSUPPORTED;
    if (bb && bb->is_int8 == 1 && bb->n_layers >= 1 && bb->n_layers <= ET_MAX_LAYERS && !et_backbone_is_dense(bb)) {
        const int32_t rc = et_int8_backbone_check(bb);
        return rc != ET_OK ? rc : (m && m->kind == ET_LAYERWISE ? ET_ERR_UNSUPPORTED : ET_OK);
    }
    return et_backbone_check(bb);
}

size_t et_workspace_size_for(const et_backbone *bb, const et_method *m, const et_cache *cache, int32_t batch,
                             int32_t pointer_bytes) {
    (void)cache; /* an eager fill writes straight into the cache rows or reuses the batch buffers */
    if (train_check(bb, m) != ET_OK || !m || batch < 1 || m->n_params < 0) return 0;
    if (m->kind < ET_LAYERWISE || m->kind > ET_SPARSE || pointer_bytes < 1 || pointer_bytes > 16) return 0;
    if (m->kind != ET_SKIP && (m->first < 0 || m->first >= bb->n_layers)) return 0;
    if (m->kind == ET_SPARSE && !sparse_rows_ok(bb, m)) return 0;
    return plan_layout(bb, m, batch, pointer_bytes, NULL, NULL, NULL) + ALIGN; /* + ALIGN: the caller's pointer may be unaligned */
}

int32_t et_workspace_pieces(const et_backbone *bb, const et_method *m, int32_t batch, int32_t pointer_bytes,
                            const char **names, size_t *bytes, int32_t max) {
    if (et_workspace_size_for(bb, m, NULL, batch, pointer_bytes) == 0 || max < 0 || (max > 0 && (!names || !bytes)))
        return -1;
    piece_log log = {names, bytes, max, 0};
    plan_layout(bb, m, batch, pointer_bytes, NULL, NULL, &log);
    return log.count;
}

size_t et_workspace_size(const et_backbone *bb, const et_method *m, const et_cache *cache, int32_t batch) {
    return et_workspace_size_for(bb, m, cache, batch, (int32_t)sizeof(const float *));
}

/* ------------------------------------------------------------------ a run's context */
typedef struct {
    const et_backbone *bb;
    const et_method *m;
    const float *P;
    float *G;
    et_cache *cache;
    const float *x;
    const int32_t *width;                  /* L.width: et_width(bb, k) */
    int32_t n_taps;                        /* skip: the adapters (et_skip_taps) */
    const int32_t *tap_width;              /* L.tap_width: each adapter's input width */
    int32_t d_in;                          /* the sum of the taps' widths */
    int32_t batch;
    const int32_t *ids;                    /* the samples of the current batch (the int8 chain reads x by them) */
    const et_optimizer *opt;               /* the fused update (G == NULL): each tensor stepped as its gradient
                                              is ready, into params (Pw); NULL: gradients into G */
    float *Pw;
    int32_t wk, bk;                        /* sparse, not an MLP: the layer whose weight is in L.sw, whose bias is
                                              in L.sb (-1: none; each forward pass starts afresh) */
    layout L;
} ctx;

static int setup(ctx *c, const et_backbone *bb, const et_method *m, const float *P, float *G,
                 et_cache *cache, const float *x, int batch, void *ws, size_t ws_bytes) {
    const int32_t rc = train_check(bb, m);
    if (rc != ET_OK) return rc;
    if (!m || !x || batch < 1) return ET_ERR_ARGUMENT;
    if (m->kind < ET_LAYERWISE || m->kind > ET_SPARSE) return ET_ERR_UNSUPPORTED;
    if (et_workspace_size(bb, m, cache, batch) == 0) return ET_ERR_ARGUMENT;
    if (bb->is_int8 && m->kind == ET_LAYERWISE) return ET_ERR_UNSUPPORTED;
    if (m->n_params > 0 && (!P || (!G && !et_fused_update(bb, m)))) return ET_ERR_ARGUMENT;
    for (int k = m->first; m->kind == ET_SPARSE && bb->is_int8 && k < bb->n_layers; k++)
        if (et_layer_has_weights(&bb->layers[k]) && (!m->w_unit[k] || !m->b_unit[k])) return ET_ERR_ARGUMENT;
    if (!ws || ws_bytes < et_workspace_size(bb, m, cache, batch)) return ET_ERR_WORKSPACE;
    char *base = (char *)ws;
    const uintptr_t mis = (uintptr_t)base % ALIGN;
    if (mis) base += ALIGN - mis;
    c->bb = bb;
    c->m = m;
    c->P = P;
    c->G = G;
    c->opt = NULL;
    c->Pw = NULL;
    c->cache = cache;
    c->x = x;
    c->d_in = et_skip_d_in(bb);
    c->batch = batch;
    plan_layout(bb, m, batch, (int)sizeof(const float *), base, &c->L, NULL);
    for (int k = 0; k <= bb->n_layers; k++) c->L.width[k] = et_width(bb, k);
    c->n_taps = et_skip_taps(bb, NULL, c->L.tap_width);
    c->width = c->L.width;
    c->tap_width = c->L.tap_width;
    c->wk = c->bk = -1;
    return ET_OK;
}

/* Where the gradient of the tensor at offset `off` goes: grads, or in the fused update the workspace's
 * one-tensor scratch (stepped by step_tensor before the next tensor's gradient is written). */
static float *grad_of(const ctx *c, int64_t off) { return c->opt ? c->L.gstep : c->G + off; }

/* The fused update: the optimizer's step on the `count` parameters at `off`, from their gradient in
 * gstep; the same float operations per element as et_optimizer_step over all n_params (momentum and
 * Adam read their state at the same offsets; Adam's step number is advanced once per batch by
 * et_train_epochs, after the backward pass). Nothing in the two-phase path. */
static void step_tensor(ctx *c, int64_t off, int64_t count) {
    if (!c->opt || count <= 0) return;
    et_optimizer o = *c->opt;
    if (o.m) o.m += off;
    if (o.v) o.v += off;
    et_optimizer_step(&o, c->Pw + off, c->L.gstep, count);
}

static void add_bias(float *z, const float *b, int rows, int out, int ldz) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) z[(size_t)r * ldz + o] += b[o];
}

static void gather_rows(const float *x, int width, const int32_t *ids, int count, float *dst, int ldd) {
    for (int r = 0; r < count; r++) memcpy(dst + (size_t)r * ldd, x + (size_t)ids[r] * width, (size_t)width * sizeof(float));
}

static void column_sums(const float *g, int rows, int cols, float *out) {
    for (int o = 0; o < cols; o++) out[o] = 0.0f;
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < cols; o++) out[o] += g[(size_t)r * cols + o];
}

/* ================================================================== layer-wise (ft-*, lora-*) */
/* The sparse update on a chain of layers: layer k's weight as its passes use it (sp_assembles), assembled
 * into the workspace's one-layer scratch when a pass needs it: its trained rows from the parameters in
 * front of its frozen rows from the backbone; on an int8 chain the trained rows rounded to int8 and
 * both dequantised. The forward pass assembles each layer before running it, the backward pass again
 * where the input's gradient reads it (the last layer's is still there). The parameters of layer k
 * change only after its input's gradient (the fused update) or after the pass (the two-phase update),
 * so every assembly of a step gives the same floats. */
/* An int8 chain: entries [from, from + len) of row o of layer k's weight, dequantised into dst: a trained row
 * rounded to int8 (clamped to -127..127), a frozen one from the backbone's int8 weight, times the row's unit. */
static void sp_int8_row(const ctx *c, int k, int o, int from, int len, float *dst) {
    const et_method *m = c->m;
    const et_layer *l = &c->bb->layers[k];
    const size_t row = (size_t)et_layer_row_floats(l);
    const float unit = m->w_unit[k][o];
    if (o < m->rows[k]) {
        const float *p = c->P + m->off_weight[k] + o * row + from;
        for (int i = 0; i < len; i++) {
            float v = rintf(p[i]);
            v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
            dst[i] = v * unit;
        }
    } else {
        const int8_t *q = l->qw + o * row + from;
        for (int i = 0; i < len; i++) dst[i] = (float)q[i] * unit;
    }
}

static const float *sp_weight(ctx *c, int k) {
    const et_method *m = c->m;
    const et_layer *l = &c->bb->layers[k];
    if (!sp_assembles(c->bb, m, k)) return l->w;
    float *w = c->L.sw;
    if (c->wk == k) return w;
    const size_t row = (size_t)et_layer_row_floats(l), r = (size_t)m->rows[k];
    if (!c->bb->is_int8) {
        memcpy(w, c->P + m->off_weight[k], r * row * sizeof(float));
        memcpy(w + r * row, l->w + r * row, ((size_t)l->out_c - r) * row * sizeof(float));
    } else {
        for (int o = 0; o < l->out_c; o++) sp_int8_row(c, k, o, 0, (int)row, w + o * row);
    }
    c->wk = k;
    return w;
}

/* Layer k's weight in its forward layout, trained or frozen (dense: W^T (in, out); conv: as stored).
 * The sparse update's is always as stored (dense: W (out, in)): lw_weights says which. */
static const float *lw_weight_t(ctx *c, int k) {
    const et_layer *l = &c->bb->layers[k];
    if (c->m->kind == ET_SPARSE) return sp_weight(c, k);
    if (c->m->off_weight[k] >= 0) return c->P + c->m->off_weight[k];
    return l->kind == ET_LAYER_DENSE ? l->wt : l->w;
}

/* Layer k's weight as the ops take it: *wt the forward layout (dense layer-wise) or *w as stored. */
static void lw_weights(ctx *c, int k, const float **wt, const float **w) {
    const int forward_layout = c->m->kind != ET_SPARSE && c->bb->layers[k].kind == ET_LAYER_DENSE;
    *wt = forward_layout ? lw_weight_t(c, k) : NULL;
    *w = forward_layout ? NULL : lw_weight_t(c, k);
}

/* Layer k's bias as the forward pass uses it; the sparse update on an int8 chain dequantises it into the
 * workspace's one-layer scratch: the trained bias rounded to int32, else the backbone's. */
static const float *lw_bias(ctx *c, int k) {
    const et_method *m = c->m;
    const et_layer *l = &c->bb->layers[k];
    if (c->bb->is_int8 && sp_assembles(c->bb, m, k)) {
        float *b = c->L.sb;
        if (c->bk == k) return b;
        for (int o = 0; o < l->out_c; o++)
            b[o] = m->off_bias[k] >= 0 ? rintf(c->P[m->off_bias[k] + o]) * m->b_unit[k][o]
                                       : (float)((double)l->qbias[o] * (double)m->b_unit[k][o]);
        c->bk = k;
        return b;
    }
    return m->off_bias[k] >= 0 ? c->P + m->off_bias[k] : l->bias;
}

/* An int8 chain's dense, pointwise or depthwise layer k forward (sp_blocked): ROW_BLOCK output channels at a
 * time (sp_block), each block's rows assembled into the weight scratch and run as a layer of those channels
 * (its output's channels in place in z, whose rows are `out` wide; a depthwise block reads its own channels). */
static void sp_forward_blocks(ctx *c, int k, const float *h, int count, float *z) {
    const et_layer *l = &c->bb->layers[k];
    const int row = et_layer_row_floats(l), in = et_layer_in(l), out = et_layer_out(l), S = l->out_h * l->out_w;
    const float *bias = lw_bias(c, k);
    const size_t hw = (size_t)l->in_h * l->in_w;
    for (int o0 = 0, nb; o0 < l->out_c; o0 += nb) {
        et_layer part = *l;
        nb = sp_block(l, l->out_c - o0, ROW_BLOCK);
        part.out_c = nb;
        if (l->groups > 1) part.in_c = part.groups = nb; /* depthwise: the block's input channels */
        for (int o = 0; o < nb; o++) sp_int8_row(c, k, o0 + o, 0, row, c->L.sw + (size_t)o * row);
        et_layer_ops_of(l->kind)->forward(&part, NULL, c->L.sw, bias + o0, l->groups > 1 ? h + o0 * hw : h, in, count,
                                          z + (size_t)o0 * S, out, NULL, c->L.scratch);
    }
    c->wk = -1; /* the scratch holds a block, not the layer */
}

/* Its input's gradient dh = the adjoint of that forward applied to g: a block of input columns at a time (every
 * output channel's entries for them, assembled (out_c, block)), the same products as the whole layer's kernel
 * (dense_input_grad, et_conv_input_grad's pointwise case) over the columns of the block; a depthwise layer a
 * block of channels at a time (each reads only its own). */
static void sp_input_grad_blocks(ctx *c, int k, const float *g, int count, float *dh) {
    const et_layer *l = &c->bb->layers[k];
    const int in = et_layer_in(l), out = et_layer_out(l), S = l->out_h * l->out_w, oc = l->out_c;
    const int dense = l->kind == ET_LAYER_DENSE, step = dense ? COL_BLOCK : ROW_BLOCK;
    float *w = c->L.sw;
    if (l->groups > 1) { /* depthwise: a block of channels, its rows of the weight, a sample at a time */
        const size_t hw = (size_t)l->in_h * l->in_w, row = (size_t)et_layer_row_floats(l);
        for (int o0 = 0, nb; o0 < oc; o0 += nb) {
            et_layer part = *l;
            nb = sp_block(l, oc - o0, ROW_BLOCK);
            part.in_c = part.out_c = part.groups = nb;
            const et_conv_dims d = et_layer_dims(&part);
            for (int o = 0; o < nb; o++) sp_int8_row(c, k, o0 + o, 0, (int)row, w + (size_t)o * row);
            for (int n = 0; n < count; n++)
                et_conv_input_grad(&d, 1, g + (size_t)n * out + (size_t)o0 * S, w, dh + (size_t)n * in + o0 * hw,
                                   c->L.scratch);
        }
        c->wk = -1;
        return;
    }
    for (int i0 = 0; i0 < l->in_c; i0 += step) {
        const int nb = l->in_c - i0 < step ? l->in_c - i0 : step;
        for (int o = 0; o < oc; o++) sp_int8_row(c, k, o, i0, nb, w + (size_t)o * nb);
        if (dense) /* dh (count, in) = g W: its columns i0.. */
            et_gemm_nn(count, nb, out, g, out, w, nb, dh + i0, in, 0);
        else /* per sample, dx (in_c, S) = W^T g: its rows (channels) i0.. */
            for (int n = 0; n < count; n++)
                et_gemm_tn(nb, S, oc, w, nb, g + (size_t)n * out, S, dh + (size_t)n * in + (size_t)i0 * S, S, 0);
    }
    c->wk = -1;
}

/* Layer k's int8 input q of sample i, kept in actq[k] where it is (kept_as; its codes are its values:
 * -127..127). */
static void sp_keep(ctx *c, int k, int i, const int8_t *q) {
    if (c->L.actq[k]) memcpy(c->L.actq[k] + (size_t)i * c->width[k], q, (size_t)c->width[k]);
}

/* Layer k's kept input (`count` samples) as floats into dst: act_value of its codes, the floats the
 * forward pass computed. */
static float *act_floats(const ctx *c, int k, int count, float *dst) {
    const float s = c->bb->layers[k].act_scale;
    const int8_t *q = c->L.actq[k];
    for (size_t i = 0; i < (size_t)count * c->width[k]; i++) dst[i] = act_value(q[i], s);
    return dst;
}

/* Sparse on an int8 chain: the integer pass up to layer `start` (sp_start), a sample at a time and a
 * layer an output channel at a time (the int32 accumulator of one channel: a sample's or the batch's
 * would be the largest buffer; int8_by_channel), the same integers as et_int8_run_layers but with nothing
 * kept that no later layer reads (int8_held); its input and the inputs the adds from there on read
 * kept in actq[] (sp_keep); returns start. */
static int sp_int8_prefix(ctx *c, int count) {
    const et_backbone *bb = c->bb;
    const int start = sp_start(bb, c->m), n = bb->n_layers;
    for (int i = 0; i < count; i++) {
        int b = int8_turn(bb, start, 0, 0);
        int8_t *q = b < 0 ? c->L.qheld : c->L.q[b]; /* layer k's input */
        et_int8_quantize_input(bb, c->x + (size_t)c->ids[i] * c->width[0], c->width[0], 1, q, c->width[0]);
        for (int k = 0; k < start; k++) {
            const et_layer *l = &bb->layers[k];
            if (read_between(bb, k, start, n)) sp_keep(c, k, i, q);
            const int8_t *residual = l->kind == ET_LAYER_ADD ? c->L.qheld + held_col(bb, start, l->source) : NULL;
            b = int8_turn(bb, start, k + 1, b);
            int8_t *out = b < 0 ? c->L.qheld + held_col(bb, start, k + 1) : c->L.q[b];
            if (et_layer_has_weights(l)) {
                for (int ch = 0; ch < l->out_c; ch++) {
                    et_int8_accumulate_channel(bb, k, q, ch, c->L.acc);
                    et_int8_requantize_channel(bb, k, ch, c->L.acc, out);
                }
            } else if (int8_by_channel(l)) { /* pooling, gap, an add: the layer on one channel at a time */
                et_layer part = *l;
                const size_t hw = (size_t)l->in_h * l->in_w;
                part.in_c = part.out_c = 1;
                for (int ch = 0; ch < l->out_c; ch++) {
                    et_layer_ops_of(l->kind)->int8_accumulate(&part, q + ch * hw, (int)hw, 1, c->L.acc,
                                                              residual ? residual + ch * hw : NULL, (int)hw);
                    et_int8_requantize_channel(bb, k, ch, c->L.acc, out);
                }
            } else {
                et_layer_ops_of(l->kind)->int8_accumulate(l, q, c->width[k], 1, c->L.acc, residual, c->width[k]);
                et_int8_requantize(bb, k, c->L.acc, 1, out, c->width[k + 1]);
            }
            q = out;
        }
        sp_keep(c, start, i, q);
        const float s = bb->layers[start].act_scale; /* and as floats, the float pass's first input */
        float *h = c->L.gbuf[float_turn(bb, start)] + (size_t)i * c->width[start];
        for (int j = 0; j < c->width[start]; j++) h[j] = act_value(q[j], s);
    }
    return start;
}

/* Logits of `count` gathered inputs in act[0]; keeps what backward needs. Returns act[n]. */
static float *lw_forward(ctx *c, int count) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const int n = bb->n_layers, r = m->rank;
    const int int8_chain = bb->is_int8 && m->kind == ET_SPARSE;
    /* an int8 chain: layer k's input and output as floats in the two gradient buffers in turn (the backward
       pass has not started), each output kept as int8 codes in actq[k + 1] */
    const int turn = int8_chain ? float_turn(bb, sp_start(bb, m)) : 0; /* where the first input is */
    float *hz[2] = {c->L.gbuf[turn], c->L.gbuf[turn ^ 1]};
    int poisoned = 0; /* an int8 chain: a NaN among the outputs kept (a code cannot hold it) */
    const int from = int8_chain ? sp_int8_prefix(c, count) : 0;
    for (int k = from; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        const int in = et_layer_in(l), out = et_layer_out(l);
        const float *h = int8_chain ? hz[0] : c->L.act[k];
        float *z = int8_chain && k < n - 1 ? hz[1] : c->L.act[k + 1];
        const int dense = l->kind == ET_LAYER_DENSE;
        const float *residual = l->kind != ET_LAYER_ADD ? NULL
                                : int8_chain ? act_floats(c, l->source, count, c->L.deq) : c->L.act[l->source];
        const float *wt = NULL, *w = NULL;
        const int blocked = sp_blocked(bb, m, k);
        if (!blocked) lw_weights(c, k, &wt, &w);
        if (blocked) { /* an int8 chain's dense or pointwise layer: a block of rows at a time */
            sp_forward_blocks(c, k, h, count, z);
        } else if (z == h) { /* a frozen depthwise layer in place (in_place) */
            const et_conv_dims d = et_layer_dims(l);
            et_conv_depthwise_in_place(&d, count, z, in, w, lw_bias(c, k), c->L.chan);
        } else {
            et_layer_ops_of(l->kind)->forward(l, wt, w, lw_bias(c, k), h, in, count, z, out, residual, c->L.scratch);
        }
        if (m->off_lora_a[k] >= 0 && !dense) { /* z += s B(A(h)), A and B convolutions */
            const int U = lora_width(bb, m, k);
            float *u = c->L.lora_u + (size_t)k * count * max_lora_width(bb, m);
            et_conv_dims da, db;
            lora_dims(l, r, &da, &db);
            et_conv_forward(&da, count, h, in, c->P + m->off_lora_a[k], NULL, u, U, c->L.scratch);
            et_conv_forward(&db, count, u, U, c->P + m->off_lora_b[k], NULL, c->L.tmp, out, c->L.scratch);
            for (int i = 0; i < count * out; i++) z[i] += m->scale != 1.0f ? c->L.tmp[i] * m->scale : c->L.tmp[i];
        } else if (m->off_lora_a[k] >= 0) {
            const float *A = c->P + m->off_lora_a[k], *Bm = c->P + m->off_lora_b[k];
            float *u = c->L.lora_u + (size_t)k * count * max_lora_width(bb, m);
            et_gemm_nt(count, r, in, h, in, A, in, u, r, 0, NULL);    /* u = h A^T */
            for (int i = 0; i < count; i++) {                        /* z += s (u B^T) */
                for (int o = 0; o < out; o++) {
                    float d = 0.0f;
                    for (int j = 0; j < r; j++) d += u[(size_t)i * r + j] * Bm[(size_t)o * r + j];
                    if (m->scale != 1.0f) d *= m->scale;
                    z[(size_t)i * out + o] += d;
                }
            }
        }
        et_layer_activate(l, z, out, count);
        if (int8_chain && k < n - 1) { /* fake-quantise to layer k+1's int8 input, kept as its codes */
            const float s = bb->layers[k + 1].act_scale;
            int8_t *q = c->L.actq[k + 1];
            for (int i = 0; i < count * out; i++) {
                float v = rintf(z[i] / s);
                v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
                z[i] = v * s;
                poisoned |= v != v;
                if (q) q[i] = v != v ? 0 : act_code(v);
            }
            if (c->L.actm[k + 1]) { /* the mask only: a bit a value */
                uint8_t *bits = c->L.actm[k + 1];
                float f[ACT_BLOCK];
                for (int i0 = 0; i0 < count * out; i0 += ACT_BLOCK) {
                    const int len = count * out - i0 < ACT_BLOCK ? count * out - i0 : ACT_BLOCK;
                    grad_mask(bb, k + 1, z + i0, len, f);
                    for (int i = 0; i < len; i++) {
                        const int j = i0 + i;
                        if (f[i] != 0.0f) bits[j >> 3] |= (uint8_t)(1u << (j & 7));
                        else bits[j >> 3] &= (uint8_t)~(1u << (j & 7));
                    }
                }
            }
            float *t = hz[0]; /* z, as act_value gives it back, is layer k+1's input */
            hz[0] = hz[1];
            hz[1] = t;
        }
    }
    /* a NaN (non-finite parameters: the epoch diverges) reaches the loss as the float pass would carry it */
    if (poisoned)
        for (int i = 0; i < count * et_width(bb, n); i++) c->L.act[n][i] = NAN;
    if (m->off_bias_delta >= 0) add_bias(c->L.act[n], c->P + m->off_bias_delta, count, et_width(bb, n), et_width(bb, n));
    return c->L.act[n];
}

/* int8 units: d/dWq = s_W dW, d/dbq = s_x s_W db; QAS divides by the unit instead (s_W^-2 in all). */
static void int8_units(const et_method *m, int k, int from, int rows, size_t row, float *gw) {
    for (int o = 0; o < rows; o++) { /* gw: rows from..from + rows */
        const float u = m->w_unit[k][from + o], f = m->qas ? 1.0f / u : u;
        for (size_t i = 0; i < row; i++) gw[o * row + i] *= f;
    }
}
static void int8_bias_units(const et_method *m, int k, int out, float *gb) {
    for (int o = 0; o < out; o++) {
        const float u = m->b_unit[k][o];
        gb[o] *= m->qas ? 1.0f / u : u;
    }
}

/*
 * g: the loss gradient w.r.t. the logits (in act[n]). Per layer, from the last to `first`: the
 * gradient of its input first (it reads the layer's weights and LoRA pair), then each trained
 * tensor's gradient, which the fused update applies at once (grad_of, step_tensor): nothing
 * below reads this layer's tensors again.
 */
static void lw_backward(ctx *c, int count) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const int n = bb->n_layers, r = m->rank, U_max = max_lora_width(bb, m);
    float *g = c->L.act[n];
    int flip = 0;
    int32_t *pending = c->L.pending; /* pend[k] holds gradients for layer k's input from add layers */
    memset(pending, 0, (size_t)n * sizeof(int32_t));
    if (m->off_bias_delta >= 0) {
        column_sums(g, count, et_width(bb, n), grad_of(c, m->off_bias_delta));
        step_tensor(c, m->off_bias_delta, et_width(bb, n));
    }
    for (int k = n - 1; k >= m->first; k--) {
        const et_layer *l = &bb->layers[k];
        const et_layer_ops *ops = et_layer_ops_of(l->kind);
        const int in = et_layer_in(l), out = et_layer_out(l), dense = l->kind == ET_LAYER_DENSE;
        /* an int8 chain: the input as floats only where a kernel reads it; the masks below read its codes */
        const int int8_chain = bb->is_int8 && m->kind == ET_SPARSE;
        const float *h = !int8_chain ? c->L.act[k]
                         : m->rows[k] > 0 || grad_reads_input(l) ? act_floats(c, k, count, c->L.deq) : NULL;
        const float *A = NULL;
        const float *u = c->L.lora_u ? c->L.lora_u + (size_t)k * count * U_max : NULL;
        et_conv_dims da, db;
        if (m->off_lora_a[k] >= 0) { /* gu = s dL/du (dA and the input's gradient read it) */
            const float *Bm = c->P + m->off_lora_b[k];
            A = c->P + m->off_lora_a[k];
            if (!dense) {
                lora_dims(l, r, &da, &db);
                et_conv_input_grad(&db, count, g, Bm, c->L.gu, c->L.scratch);
            } else {
                et_gemm_nn(count, r, out, g, out, Bm, r, c->L.gu, r, 0);
            }
            if (m->scale != 1.0f)
                for (int i = 0; i < count * lora_width(bb, m, k); i++) c->L.gu[i] *= m->scale;
        }
        if (l->kind == ET_LAYER_ADD && l->source >= m->first) { /* the add's other input: its source's */
            float *p = c->L.pend[l->source];
            if (pending[l->source]) for (int i = 0; i < count * in; i++) p[i] += g[i];
            else memcpy(p, g, (size_t)count * in * sizeof(float));
            pending[l->source] = 1;
        }
        float *dh = NULL;
        if (k > m->first) {
            dh = c->L.gbuf[flip];
            flip ^= 1;
            if (sp_blocked(bb, m, k)) /* an int8 chain's dense or pointwise layer: a block of columns at a time */
                sp_input_grad_blocks(c, k, g, count, dh);
            else if (m->kind == ET_SPARSE) /* W as stored, assembled where rows train */
                ops->input_grad(l, NULL, lw_weight_t(c, k), h, g, count, dh, c->L.scratch);
            else if (dense) /* dh = g W: from the frozen W (out, in) where given, else from the trained or transposed one */
                ops->input_grad(l, lw_weight_t(c, k), m->off_weight[k] < 0 ? l->w : NULL, h, g, count, dh, c->L.pack);
            else
                ops->input_grad(l, NULL, lw_weight_t(c, k), h, g, count, dh, c->L.scratch);
            if (A && dense) et_gemm_nn(count, in, r, c->L.gu, r, A, in, dh, in, 1);
            if (A && !dense) {
                et_conv_input_grad(&da, count, c->L.gu, A, c->L.tmp, c->L.scratch);
                for (int i = 0; i < count * in; i++) dh[i] += c->L.tmp[i];
            }
            if (pending[k])
                for (int i = 0; i < count * in; i++) dh[i] += c->L.pend[k][i];
            if (!int8_chain) {
                et_act_grad_mul(bb->layers[k - 1].activation, dh, h, (int64_t)count * in);
            } else if (c->L.actm[k]) { /* the mask kept as bits (kept_as) */
                const uint8_t *bits = c->L.actm[k];
                for (int i = 0; i < count * in; i++) dh[i] *= (float)((bits[i >> 3] >> (i & 7)) & 1u);
            } else { /* the mask from the input's codes: the activation's derivative and the clamp (grad_mask) */
                const float s = l->act_scale;
                const int8_t *q = c->L.actq[k];
                float t[ACT_BLOCK], f[ACT_BLOCK]; /* a block of the input's floats at a time */
                for (int i0 = 0; i0 < count * in; i0 += ACT_BLOCK) {
                    const int len = count * in - i0 < ACT_BLOCK ? count * in - i0 : ACT_BLOCK;
                    for (int i = 0; i < len; i++) t[i] = act_value(q[i0 + i], s);
                    grad_mask(bb, k, t, len, f);
                    for (int i = 0; i < len; i++) dh[i0 + i] *= f[i];
                }
            }
        }
        /* the layer's trained tensors: each gradient, then (fused) its step */
        if (m->off_weight[k] >= 0 && sp_grad_blocked(bb, m, k)) { /* a block of trained rows at a time */
            const size_t row = (size_t)et_layer_row_floats(l);
            const int S = l->out_h * l->out_w;
            et_conv_dims d = et_layer_dims(l);
            for (int r0 = 0, nb; r0 < m->rows[k]; r0 += nb) {
                nb = grad_block(l, m->rows[k] - r0);
                float *gw = grad_of(c, m->off_weight[k] + (int64_t)r0 * row);
                if (dense) { /* dW[r0..] = g[:, r0..]^T h, as dense_weight_rows_grad's product */
                    et_gemm_tn(nb, in, count, g + r0, out, h, in, gw, in, 0);
                } else { /* the rows as a layer of nb outputs, summed over the samples in order */
                    d.out_c = nb;
                    for (int i = 0; i < count; i++)
                        et_conv_weight_grad_rows(&d, 1, h + (size_t)i * in, g + (size_t)i * out + (size_t)r0 * S, nb, gw,
                                                 i > 0, c->L.scratch);
                }
                int8_units(m, k, r0, nb, row, gw);
                step_tensor(c, m->off_weight[k] + (int64_t)r0 * row, (int64_t)nb * row);
            }
        } else if (m->off_weight[k] >= 0) {
            float *gw = grad_of(c, m->off_weight[k]);
            if (m->kind == ET_SPARSE) { /* the trained rows only */
                ops->weight_rows_grad(l, h, g, count, m->rows[k], gw, c->L.scratch);
                if (bb->is_int8) int8_units(m, k, 0, m->rows[k], (size_t)et_layer_row_floats(l), gw);
            } else {
                ops->weight_grad(l, h, g, count, gw, c->L.scratch);
            }
            step_tensor(c, m->off_weight[k], weight_floats(bb, m, k));
        }
        if (m->off_bias[k] >= 0) {
            float *gb = grad_of(c, m->off_bias[k]);
            ops->bias_grad(l, g, count, gb);
            if (bb->is_int8 && m->kind == ET_SPARSE) int8_bias_units(m, k, l->out_c, gb);
            step_tensor(c, m->off_bias[k], l->out_c);
        }
        if (A) { /* LoRA: dB = s g^T u, dA = gu^T h (convolutions: their weight gradients) */
            float *gB = grad_of(c, m->off_lora_b[k]);
            if (!dense) et_conv_weight_grad(&db, count, u, g, gB, 0, c->L.scratch);
            else et_gemm_tn(out, r, count, g, out, u, r, gB, r, 0);
            if (m->scale != 1.0f)
                for (int i = 0; i < l->out_c * r; i++) gB[i] *= m->scale; /* B: (out_c, rank[, 1, 1]) */
            step_tensor(c, m->off_lora_b[k], lora_b_floats(bb, m, k));
            float *gA = grad_of(c, m->off_lora_a[k]);
            if (!dense) et_conv_weight_grad(&da, count, h, c->L.gu, gA, 0, c->L.scratch);
            else et_gemm_tn(r, in, count, c->L.gu, r, h, in, gA, in, 0);
            step_tensor(c, m->off_lora_a[k], lora_a_floats(bb, m, k));
        }
        if (dh) g = dh;
    }
}

/* ================================================================== the skip adapters */
/* An MLP's rows [x | h_1 | ... | z_n] for `count` rows whose x part is already in place: each
 * layer writes its output straight into the next tap's columns. */
static void float_taps(const et_backbone *bb, float *rows, int ldr, int count) {
    const int n = bb->n_layers;
    int col = 0;
    for (int k = 0; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        const int in = et_layer_in(l);
        float *h = rows + col, *z = rows + col + in;
        et_layer_ops_of(l->kind)->forward(l, l->wt, l->w, l->bias, h, ldr, count, z, ldr, NULL, NULL);
        et_layer_activate(l, z, ldr, count);
        col += in;
    }
}

/*
 * Rows [t_1 | ... | t_n | z] (row stride ldd) of count <= batch samples ids, for any chain of
 * layers: each layer runs through its kind's operations from one workspace buffer into the
 * other; a layer with weights first writes its tap (its input, pooled to one value per channel
 * where spatial), a layer an add reads keeps its input, and the last writes the logits.
 */
static void chain_taps(ctx *c, const int32_t *ids, int count, float *dst, int ldd) {
    const et_backbone *bb = c->bb;
    const int n = bb->n_layers;
    float *h = c->L.walk[0];
    int cur = 0, col = 0;
    gather_rows(c->x, c->width[0], ids, count, h, c->width[0]);
    for (int k = 0; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        const int in = et_layer_in(l), out = et_layer_out(l);
        if (et_layer_has_weights(l)) {
            if (l->in_h * l->in_w > 1) {
                /* global average pooling: the window is the whole input (et_conv.h) */
                const et_conv_dims g = {l->in_c, l->in_h, l->in_w, l->in_c, 1, 1, l->in_h, l->in_w, 1, 1, 0, 0, 1};
                et_gap_forward(&g, count, h, in, dst + col, ldd);
                col += l->in_c;
            } else {
                for (int i = 0; i < count; i++)
                    memcpy(dst + (size_t)i * ldd + col, h + (size_t)i * in, (size_t)in * sizeof(float));
                col += in;
            }
        }
        if (c->L.kept[k]) memcpy(c->L.kept[k], h, (size_t)count * in * sizeof(float));
        const int last = k == n - 1;
        float *z = last ? dst + c->d_in : c->L.walk[cur ^ 1];
        const int ldz = last ? ldd : out;
        const float *residual = l->kind == ET_LAYER_ADD ? c->L.kept[l->source] : NULL;
        et_layer_ops_of(l->kind)->forward(l, l->wt, l->w, l->bias, h, in, count, z, ldz, residual, c->L.scratch);
        et_layer_activate(l, z, ldz, count);
        h = z;
        cur ^= 1;
    }
}

/*
 * An int8 CNN's rows [t_1 | ... | t_n | z] (row stride ldd) of count <= batch samples ids: the
 * integer pass (et_int8_run_layers) keeps every layer's int8 input; a tap is its layer's input
 * dequantised, and where spatial the mean per channel, the int32 sum times s / positions
 * (edgetune.quant.int8.int8_float_taps, bit for bit); the logits come from the last layer.
 */
static void int8_chain_taps(ctx *c, const int32_t *ids, int count, float *dst, int ldd) {
    const et_backbone *bb = c->bb;
    const int n = bb->n_layers, ldq = (int)int8_row(bb);
    int8_t *q = c->L.qtaps;
    for (int i = 0; i < count; i++)
        et_int8_quantize_input(bb, c->x + (size_t)ids[i] * c->width[0], c->width[0], 1, q + (size_t)i * ldq, ldq);
    et_int8_run_layers(bb, count, q, ldq, dst + c->d_in, ldd, c->L.acc);
    int qcol = 0, col = 0;
    for (int k = 0; k < n; k++) {
        const et_layer *l = &bb->layers[k];
        if (et_layer_has_weights(l)) {
            const float s = l->act_scale;
            const int npos = l->in_h * l->in_w;
            const float unit = s / (float)npos;
            for (int i = 0; i < count; i++) {
                const int8_t *qi = q + (size_t)i * ldq + qcol;
                float *t = dst + (size_t)i * ldd + col;
                if (npos > 1) {
                    for (int ch = 0; ch < l->in_c; ch++) {
                        int32_t total = 0;
                        for (int p = 0; p < npos; p++) total += qi[(size_t)ch * npos + p];
                        t[ch] = (float)(total - npos * l->zero_point) * unit; /* zero point: 0 if symmetric */
                    }
                } else {
                    for (int j = 0; j < l->in_c; j++) t[j] = (float)((int32_t)qi[j] - l->zero_point) * s;
                }
            }
            col += npos > 1 ? l->in_c : et_layer_in(l);
        }
        qcol += c->width[k];
    }
}

/* Taps rows for samples ids[0..count) into dst (row stride = row width), from x. */
static void compute_taps(ctx *c, const int32_t *ids, int count, float *dst) {
    const et_backbone *bb = c->bb;
    const int in0 = c->width[0], d = c->d_in, W = d + c->width[bb->n_layers];
    if (!et_backbone_is_dense(bb)) { /* a batch at a time: the workspace holds `batch` rows per layer */
        for (int lo = 0; lo < count; lo += c->batch) {
            const int rows = count - lo < c->batch ? count - lo : c->batch;
            if (bb->is_int8) int8_chain_taps(c, ids + lo, rows, dst + (size_t)lo * W, W);
            else chain_taps(c, ids + lo, rows, dst + (size_t)lo * W, W);
        }
        return;
    }
    gather_rows(c->x, in0, ids, count, dst, W);
    if (!bb->is_int8) {
        float_taps(bb, dst, W, count);
        return;
    }
    /* int8: run the integer pass, then dequantise each layer's input with its scale */
    et_int8_run(bb, dst, W, count, c->L.qtaps, d, dst + d, W, c->L.acc);
    for (int i = 0; i < count; i++) {
        const int8_t *q = c->L.qtaps + (size_t)i * d;
        float *row = dst + (size_t)i * W;
        int col = 0;
        for (int k = 0; k < bb->n_layers; k++) {
            const float s = bb->layers[k].act_scale;
            const int32_t zp = bb->layers[k].zero_point; /* 0 if symmetric */
            for (int j = 0; j < c->width[k]; j++) row[col + j] = (float)((int32_t)q[col + j] - zp) * s;
            col += c->width[k];
        }
    }
}

/* Round a computed row's d adapter inputs to an int8 cache's values (into q, when not NULL): every
 * epoch sees the rounded rows, whether the cache holds them or not (edgetune.quant.Int8SkipCache). */
static void int8_round(const et_cache *cache, float *row, int d, int8_t *q) {
    for (int j = 0; j < d; j++) {
        float v = rintf(row[j] / cache->col_scales[j]);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        if (q) q[j] = (int8_t)v;
        row[j] = v * cache->col_scales[j];
    }
}

/* Store a computed row in the cache; an int8 cache also rounds the row the batch will use. */
static void cache_store(et_cache *cache, int id, float *row, int d, int out) {
    if (cache->kind == ET_CACHE_FLOAT) {
        memcpy(cache->rows + (size_t)id * cache->row_width, row, (size_t)cache->row_width * sizeof(float));
    } else {
        int8_round(cache, row, d, cache->qrows + (size_t)id * d);
        memcpy(cache->logits + (size_t)id * out, row + d, (size_t)out * sizeof(float));
    }
    cache->filled[id] = 1;
}

static int cached(const et_cache *cache, int id) {
    return cache && cache->kind != ET_CACHE_NONE && id < cache->capacity && cache->filled[id];
}

/* Fill every missing cache row before training, in blocks (the eager fill). */
static void skip_fill_cache(ctx *c, int n_samples, int batch) {
    et_cache *cache = c->cache;
    const et_backbone *bb = c->bb;
    const int d = c->d_in, out = c->width[bb->n_layers], W = d + out;
    const int in_place = cache->kind == ET_CACHE_FLOAT && !bb->is_int8;
    const int block = in_place ? FILL_BLOCK : batch;
    const int cap = cache->capacity < n_samples ? cache->capacity : n_samples;
    int id = 0;
    while (id < cap) {
        if (cache->filled[id]) { id++; continue; }
        int end = id;
        while (end < cap && end - id < block && !cache->filled[end]) end++;
        const int count = end - id;
        for (int i = 0; i < count; i++) c->L.missing[i] = id + i;
        if (in_place) {
            compute_taps(c, c->L.missing, count, cache->rows + (size_t)id * W);
            for (int i = 0; i < count; i++) cache->filled[id + i] = 1;
        } else {
            compute_taps(c, c->L.missing, count, c->L.taps);
            for (int i = 0; i < count; i++) cache_store(cache, id + i, c->L.taps + (size_t)i * W, d, out);
        }
        cache->misses += count;
        id = end;
    }
}

/*
 * Adapter inputs for the batch: cache rows where filled, computed (and stored) elsewhere.
 * Returns 1 when the batch is read from an int8 cache in place: every sample has a cache row
 * (the computed ones were just stored), and skip_step reads the int8 values directly; the batch
 * buffer is then free and holds the folded A (A times the column scales: it needs n*rank x d_in
 * floats of the buffer's batch x row_width). Otherwise 0: L.rowp points at float rows, an int8
 * cache's hits widened into the batch buffer after the computed rows.
 */
static int skip_rows(ctx *c, const int32_t *ids, int count, int use_cache) {
    et_cache *cache = use_cache ? c->cache : NULL;
    const et_backbone *bb = c->bb;
    const int d = c->d_in, out = c->width[bb->n_layers], W = d + out;
    int n_missing = 0, all_stored = 1;
    for (int i = 0; i < count; i++) {
        c->L.rowp[i] = NULL;
        if (!cached(cache, ids[i])) c->L.missing[n_missing++] = i;
        if (!cache || ids[i] >= cache->capacity) all_stored = 0;
    }
    const int in_place = cache && cache->kind == ET_CACHE_INT8 && all_stored &&
                         (size_t)c->batch * (size_t)W >= (size_t)c->n_taps * (size_t)c->m->rank * (size_t)d;
    if (n_missing) {
        for (int j = 0; j < n_missing; j++) c->L.ids[j] = ids[c->L.missing[j]];
        compute_taps(c, c->L.ids, n_missing, c->L.taps);
        for (int j = 0; j < n_missing; j++) {
            const int i = c->L.missing[j], id = ids[i];
            float *row = c->L.taps + (size_t)j * W;
            if (cache && cache->kind != ET_CACHE_NONE && id < cache->capacity) cache_store(cache, id, row, d, out);
            else if (cache && cache->kind == ET_CACHE_INT8) int8_round(cache, row, d, NULL); /* past its capacity */
            c->L.rowp[i] = row;
        }
        if (cache) cache->misses += n_missing;
    }
    if (!cache || cache->kind == ET_CACHE_NONE) return 0;
    int next = n_missing; /* int8 hits are widened into the batch buffer after the computed rows */
    for (int i = 0; i < count; i++) {
        const int id = ids[i];
        if (c->L.rowp[i]) continue; /* computed above (and perhaps just stored) */
        cache->hits++;
        if (cache->kind == ET_CACHE_FLOAT) {
            c->L.rowp[i] = cache->rows + (size_t)id * W;
            continue;
        }
        if (in_place) continue;
        float *row = c->L.taps + (size_t)(next++) * W;
        const int8_t *q = cache->qrows + (size_t)id * d;
        for (int j = 0; j < d; j++) row[j] = (float)q[j] * cache->col_scales[j];
        memcpy(row + d, cache->logits + (size_t)id * out, (size_t)out * sizeof(float));
        c->L.rowp[i] = row;
    }
    return in_place;
}

/* logits = s (u B^T) + z_n (+ bias delta), u = A h per adapter; rows from skip_rows. */
static float *skip_forward(ctx *c, int count) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const int n = c->n_taps, r = m->rank, nr = n * r, d = c->d_in, out = c->width[bb->n_layers];
    const float *A = c->P + m->off_skip_a, *Bm = c->P + m->off_skip_b;
    float *logits = c->L.gbuf[0];
    for (int i = 0; i < count; i++) {
        const float *h = c->L.rowp[i];
        float *u = c->L.u + (size_t)i * nr;
        int col = 0;
        for (int k = 0; k < n; k++) {
            for (int j = 0; j < r; j++)
                u[k * r + j] = et_dot(A + (size_t)(k * r + j) * d + col, h + col, c->tap_width[k]);
            col += c->tap_width[k];
        }
        float *z = logits + (size_t)i * out;
        for (int o = 0; o < out; o++) {
            float s = 0.0f;
            for (int q = 0; q < nr; q++) s += u[q] * Bm[(size_t)o * nr + q];
            if (m->scale != 1.0f) s *= m->scale;
            s += h[d + o];
            if (m->off_bias_delta >= 0) s += c->P[m->off_bias_delta + o];
            z[o] = s;
        }
    }
    return logits;
}

/*
 * One batch of the skip adapters in one pass over its rows, SKIP_BLOCK rows at a time: u = A h per
 * adapter, the logits, their loss gradient (of the batch's mean loss), gu = s g B and
 * dA += gu h^T, the block's rows still in L1 when dA reads them (a row is fetched from memory once
 * per batch; the gradient of a sample needs only its own logits, and B is fixed until the step).
 * Rows from skip_rows: float rows (L.rowp), or with `in_place` an int8 cache's rows read as they
 * are stored, against A' = A times the column scales (folded once per batch into the batch
 * buffer); dA then accumulates sum_i gu_i q_i and skip_finish multiplies it by the scales. The
 * labels y are the batch's. Returns the sum of the batch's losses and leaves u and g (the logits'
 * gradient) of every row in the workspace; skip_finish completes the gradients (dB, the bias delta,
 * the column scales on dA).
 */
static double skip_step(ctx *c, const int32_t *ids, const int32_t *y, int count, int in_place) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const et_cache *cache = c->cache;
    const int n = c->n_taps, r = m->rank, nr = n * r, d = c->d_in, out = c->width[bb->n_layers];
    const float *A = c->P + m->off_skip_a, *Bm = c->P + m->off_skip_b;
    const float *bias = m->off_bias_delta >= 0 ? c->P + m->off_bias_delta : NULL;
    float *gA = c->G + m->off_skip_a;
    /* zero the gradients (dA's block entries only: the others are never written, so stay zero) */
    int col = 0;
    for (int k = 0; k < n; k++) {
        for (int j = 0; j < r; j++) memset(gA + (size_t)(k * r + j) * d + col, 0, (size_t)c->tap_width[k] * sizeof(float));
        col += c->tap_width[k];
    }
    const float *Au = A; /* the A the dot products read: A, or A' for int8 rows */
    if (in_place) {
        float *af = c->L.taps; /* free: the batch's rows are the cache's (skip_rows) */
        col = 0;
        for (int k = 0; k < n; k++) {
            for (int j = 0; j < r; j++) {
                const float *restrict a = A + (size_t)(k * r + j) * d + col, *restrict sc = cache->col_scales + col;
                float *restrict f = af + (size_t)(k * r + j) * d + col;
                for (int t = 0; t < c->tap_width[k]; t++) f[t] = a[t] * sc[t];
            }
            col += c->tap_width[k];
        }
        Au = af;
    }
    double total = 0.0;
    for (int lo = 0; lo < count; lo += SKIP_BLOCK) {
        const int bn = count - lo < SKIP_BLOCK ? count - lo : SKIP_BLOCK;
        const float *fr[SKIP_BLOCK] = {0}, *zn[SKIP_BLOCK];
        const int8_t *qr[SKIP_BLOCK] = {0};
        for (int i = 0; i < bn; i++) {
            if (in_place) {
                const int id = ids[lo + i];
                qr[i] = cache->qrows + (size_t)id * d;
                zn[i] = cache->logits + (size_t)id * out;
            } else {
                fr[i] = c->L.rowp[lo + i];
                zn[i] = fr[i] + d;
            }
        }
        float *u = c->L.u + (size_t)lo * nr, *gu = c->L.gu + (size_t)lo * nr, *z = c->L.gbuf[0] + (size_t)lo * out;
        col = 0;
        for (int k = 0; k < n; k++) { /* u = A h: each adapter row against the block's rows */
            const int w = c->tap_width[k];
            for (int j = 0; j < r; j++) {
                const float *a = Au + (size_t)(k * r + j) * d + col;
                if (in_place) et_dot_rows_i8(bn, a, qr, col, w, u + k * r + j, nr);
                else et_dot_rows(bn, a, fr, col, w, u + k * r + j, nr);
            }
            col += w;
        }
        for (int i = 0; i < bn; i++) /* logits = s (u B^T) + z_n (+ bias delta) */
            for (int o = 0; o < out; o++) {
                float v = 0.0f;
                for (int q = 0; q < nr; q++) v += u[(size_t)i * nr + q] * Bm[(size_t)o * nr + q];
                if (m->scale != 1.0f) v *= m->scale;
                v += zn[i][o];
                if (bias) v += bias[o];
                z[(size_t)i * out + o] = v;
            }
        total += et_softmax_xent_grad_of(z, y + lo, bn, out, count); /* z becomes g */
        for (int i = 0; i < bn; i++) { /* gu = s g B */
            const float *g = z + (size_t)i * out;
            for (int q = 0; q < nr; q++) {
                float acc = 0.0f;
                for (int o = 0; o < out; o++) acc += g[o] * Bm[(size_t)o * nr + q];
                gu[(size_t)i * nr + q] = m->scale != 1.0f ? acc * m->scale : acc;
            }
        }
        col = 0;
        for (int k = 0; k < n; k++) { /* dA += gu h^T over the block's rows, block by block of A */
            const int w = c->tap_width[k];
            for (int j = 0; j < r; j++) {
                float *ga = gA + (size_t)(k * r + j) * d + col;
                if (in_place) et_weighted_rows_i8(bn, gu + k * r + j, nr, qr, col, w, ga);
                else et_weighted_rows(bn, gu + k * r + j, nr, fr, col, w, ga);
            }
            col += w;
        }
    }
    return total;
}

/* The rest of the batch's gradients (see skip_step), from its u and g: dB = s g^T u (out x n*r, a few
 * hundred products), the bias delta's; with int8 rows dA *= the column scales. */
static void skip_finish(ctx *c, int count, int in_place) {
    const et_method *m = c->m;
    const int n = c->n_taps, r = m->rank, nr = n * r, d = c->d_in, out = c->width[c->bb->n_layers];
    const float *g = c->L.gbuf[0];
    float *gB = c->G + m->off_skip_b, *gA = c->G + m->off_skip_a;
    for (int o = 0; o < out; o++)
        for (int q = 0; q < nr; q++) {
            float acc = 0.0f;
            for (int i = 0; i < count; i++) acc += g[(size_t)i * out + o] * c->L.u[(size_t)i * nr + q];
            gB[(size_t)o * nr + q] = m->scale != 1.0f ? acc * m->scale : acc;
        }
    if (m->off_bias_delta >= 0) column_sums(g, count, out, c->G + m->off_bias_delta);
    if (!in_place) return;
    int col = 0;
    for (int k = 0; k < n; k++) {
        for (int j = 0; j < r; j++) {
            float *restrict ga = gA + (size_t)(k * r + j) * d + col;
            const float *restrict sc = c->cache->col_scales + col;
            for (int t = 0; t < c->tap_width[k]; t++) ga[t] *= sc[t];
        }
        col += c->tap_width[k];
    }
}

/* ================================================================== sparse update */
static int sp_trained_bias(const ctx *c, int k) { return c->m->off_bias[k] >= 0; }

/* Layer k's float weight row o as the forward pass uses it (int8: widened into wrow). */
static const float *sp_row(ctx *c, int k, int o) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const int in = c->width[k];
    if (!bb->is_int8)
        return o < m->rows[k] ? c->P + m->off_weight[k] + (size_t)o * in : bb->layers[k].w + (size_t)o * in;
    const float unit = m->w_unit[k][o];
    float *w = c->L.wrow;
    if (o < m->rows[k]) {
        const float *p = c->P + m->off_weight[k] + (size_t)o * in;
        for (int i = 0; i < in; i++) {
            float v = rintf(p[i]);
            v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
            w[i] = v * unit;
        }
    } else {
        const int8_t *q = bb->layers[k].qw + (size_t)o * in;
        for (int i = 0; i < in; i++) w[i] = (float)q[i] * unit;
    }
    return w;
}

static float sp_bias(const ctx *c, int k, int o) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    if (!bb->is_int8) return sp_trained_bias(c, k) ? c->P[m->off_bias[k] + o] : bb->layers[k].bias[o];
    if (sp_trained_bias(c, k)) return rintf(c->P[m->off_bias[k] + o]) * m->b_unit[k][o];
    return (float)((double)bb->layers[k].qbias[o] * (double)m->b_unit[k][o]);
}

/* Logits of the gathered inputs in act[0]; act[k] keeps layer k's input for k >= first. */
static float *sp_forward(ctx *c, int count) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const int n = bb->n_layers, first = m->first;
    const int start = first < n - 1 ? first : n - 1;
    if (bb->is_int8) { /* frozen layers before `first` run the integer kernel */
        int8_t *q = c->L.q[0];
        const int in0 = et_width(bb, 0);
        et_int8_quantize_input(bb, c->L.act[0], in0, count, q, in0);
        for (int k = 0; k < start; k++) {
            et_int8_accumulate(bb, k, q, et_width(bb, k), count, c->L.acc);
            int8_t *nq = c->L.q[(k + 1) & 1];
            et_int8_requantize(bb, k, c->L.acc, count, nq, et_width(bb, k + 1));
            q = nq;
        }
        const float s = bb->layers[start].act_scale;
        float *h = c->L.act[start];
        for (int i = 0; i < count * c->width[start]; i++) h[i] = (float)q[i] * s;
    } else {
        for (int k = 0; k < start; k++) { /* the frozen layers before `first`, from W (out, in) */
            const et_layer *l = &bb->layers[k];
            const int in = et_layer_in(l), out = et_layer_out(l);
            et_layer_ops_of(l->kind)->forward(l, NULL, l->w, l->bias, c->L.act[k], in, count, c->L.act[k + 1], out,
                                              NULL, NULL);
            et_layer_activate(l, c->L.act[k + 1], out, count);
        }
    }
    for (int k = start; k < n; k++) {
        const int in = et_width(bb, k), out = et_width(bb, k + 1);
        const float *h = c->L.act[k];
        float *z = c->L.act[k + 1];
        for (int o = 0; o < out; o++) {
            const float *w = sp_row(c, k, o);
            const float b = sp_bias(c, k, o);
            for (int i = 0; i < count; i++) z[(size_t)i * out + o] = et_dot(h + (size_t)i * in, w, in);
            for (int i = 0; i < count; i++) z[(size_t)i * out + o] += b;
        }
        et_layer_activate(&bb->layers[k], z, out, count);
        if (k == n - 1) break;
        if (bb->is_int8) { /* fake-quantise to layer k+1's int8 input */
            const float s = bb->layers[k + 1].act_scale;
            for (int i = 0; i < count * out; i++) {
                float v = rintf(z[i] / s);
                v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
                z[i] = v * s;
            }
        }
    }
    return c->L.act[n];
}

static void sp_backward(ctx *c, int count) {
    const et_backbone *bb = c->bb;
    const et_method *m = c->m;
    const int n = bb->n_layers;
    float *g = c->L.act[n];
    int flip = 0;
    for (int k = n - 1; k >= m->first; k--) {
        const int in = et_width(bb, k), out = et_width(bb, k + 1), rows = m->rows[k];
        const float *h = c->L.act[k];
        float *dh = NULL;
        if (k > m->first) { /* first: it reads the trained rows, which the fused update then steps */
            dh = c->L.gbuf[flip];
            flip ^= 1;
            for (int i = 0; i < count * in; i++) dh[i] = 0.0f;
            for (int o = 0; o < out; o++) {
                const float *w = sp_row(c, k, o);
                for (int i = 0; i < count; i++) et_axpy(in, g[(size_t)i * out + o], w, dh + (size_t)i * in);
            }
            /* where the gradient passes back through the activation (and the int8 clip) */
            const float top = bb->is_int8 ? 127.0f * bb->layers[k].act_scale : 0.0f;
            if (bb->layers[k - 1].activation == ET_RELU) et_act_grad_mul(ET_RELU, dh, h, (int64_t)count * in);
            if (bb->is_int8)
                for (int i = 0; i < count * in; i++) dh[i] *= (float)(h[i] < top);
        }
        if (rows > 0) {
            float *gw = grad_of(c, m->off_weight[k]);
            et_gemm_tn(rows, in, count, g, out, h, in, gw, in, 0);     /* dW[:rows] = g[:, :rows]^T h */
            if (bb->is_int8) int8_units(m, k, 0, rows, (size_t)in, gw); /* d/dWq = s_W dW; QAS: s_W^-2 */
            step_tensor(c, m->off_weight[k], (int64_t)rows * in);
        }
        if (sp_trained_bias(c, k)) {
            float *gb = grad_of(c, m->off_bias[k]);
            column_sums(g, count, out, gb);
            if (bb->is_int8) int8_bias_units(m, k, out, gb);
            step_tensor(c, m->off_bias[k], out);
        }
        if (dh) g = dh;
    }
}

/* ================================================================== one step, one epoch */
static float *forward(ctx *c, const int32_t *ids, int count, int use_cache) {
    if (c->m->kind == ET_SKIP) {
        skip_rows(c, ids, count, use_cache);
        return skip_forward(c, count);
    }
    c->ids = ids;
    c->wk = c->bk = -1; /* the sparse update's assembled layer: the parameters may have changed since */
    if (c->m->kind == ET_SPARSE && c->bb->is_int8 && !et_backbone_is_dense(c->bb)) /* reads x by ids */
        return lw_forward(c, count);
    gather_rows(c->x, et_width(c->bb, 0), ids, count, c->L.act[0], et_width(c->bb, 0));
    if (c->m->kind == ET_SPARSE && et_backbone_is_dense(c->bb)) return sp_forward(c, count);
    return lw_forward(c, count);
}

/* The backward pass of the layer-wise and sparse methods (the skip adapters' is in skip_step). */
static void backward(ctx *c, int count) {
    if (c->m->kind == ET_SPARSE && et_backbone_is_dense(c->bb)) sp_backward(c, count);
    else lw_backward(c, count);
}

static int all_finite(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(p[i])) return 0;
    return 1;
}

static double now(et_clock_fn clock) { return clock ? clock() : 0.0; }

int32_t et_train_epochs(const et_backbone *bb, const et_method *m, et_optimizer *opt, et_cache *cache,
                        float *params, float *grads, const float *x, const int32_t *y, int32_t n,
                        int32_t batch, const int32_t *orders, int32_t n_epochs, et_clock_fn clock,
                        void *workspace, size_t workspace_bytes, et_epoch_stats *stats) {
    ctx c;
    if (!opt || !y || !orders || !stats || n < 1 || n_epochs < 0) return ET_ERR_ARGUMENT;
    if (cache && cache->kind != ET_CACHE_NONE && (cache->n_samples != n || !cache->filled)) return ET_ERR_ARGUMENT;
    const int rc = setup(&c, bb, m, params, grads, cache, x, batch, workspace, workspace_bytes);
    if (rc != ET_OK) return rc;
    const int fused = grads == NULL; /* setup accepted it: et_fused_update(bb, m) */
    if (fused) {
        c.opt = opt;
        c.Pw = params;
    }
    const int out = et_width(bb, bb->n_layers);
    const int use_cache = m->kind == ET_SKIP && cache && cache->kind != ET_CACHE_NONE;
    for (int e = 0; e < n_epochs; e++) {
        const int32_t *order = orders + (size_t)e * n;
        et_epoch_stats *st = stats + e;
        double t_fwd = 0.0, t_bwd = 0.0, t_upd = 0.0, total = 0.0;
        memcpy(c.L.snapshot, params, (size_t)m->n_params * sizeof(float));
        const double start = now(clock);
        if (e == 0 && use_cache && cache->eager) {
            skip_fill_cache(&c, n, batch);
            t_fwd += now(clock) - start;
        }
        int batches = 0;
        for (int lo = 0; lo < n; lo += batch) {
            const int count = n - lo < batch ? n - lo : batch;
            const int32_t *ids = order + lo;
            const double t0 = now(clock);
            for (int i = 0; i < count; i++) c.L.ybuf[i] = y[ids[i]];
            double t1, t2;
            if (m->kind == ET_SKIP) { /* one pass: the forward timer holds it, the backward the gradients' last factors */
                const int in_place = skip_rows(&c, ids, count, use_cache);
                total += skip_step(&c, ids, c.L.ybuf, count, in_place);
                t1 = now(clock);
                skip_finish(&c, count, in_place);
                t2 = now(clock);
            } else {
                float *logits = forward(&c, ids, count, use_cache);
                t1 = now(clock);
                total += et_softmax_xent_grad(logits, c.L.ybuf, count, out);
                backward(&c, count); /* fused: every tensor stepped there */
                t2 = now(clock);
            }
            if (!fused) et_optimizer_step(opt, params, grads, m->n_params);
            else if (opt->kind == ET_ADAM) opt->t += 1; /* as et_optimizer_step does once per batch */
            const double t3 = now(clock);
            t_fwd += t1 - t0;
            t_bwd += t2 - t1;
            t_upd += t3 - t2;
            batches++;
        }
        st->seconds = now(clock) - start;
        st->loss = total / n;
        st->forward_seconds = t_fwd;
        st->backward_seconds = t_bwd;
        st->update_seconds = t_upd;
        st->batches = batches;
        st->diverged = !isfinite(st->loss) || !all_finite(params, m->n_params);
        if (st->diverged) {
            memcpy(params, c.L.snapshot, (size_t)m->n_params * sizeof(float));
            return e + 1;
        }
    }
    return n_epochs;
}

int32_t et_batch_gradient(const et_backbone *bb, const et_method *m, const float *params, float *grads,
                          const float *x, const int32_t *y, const int32_t *ids, int32_t count,
                          int32_t batch, void *workspace, size_t workspace_bytes, double *loss) {
    ctx c;
    if (!y || !ids || !loss || count < 1 || count > batch) return ET_ERR_ARGUMENT;
    if (m && m->n_params > 0 && !grads) return ET_ERR_ARGUMENT; /* it fills grads: no fused update here */
    const int rc = setup(&c, bb, m, params, grads, NULL, x, batch, workspace, workspace_bytes);
    if (rc != ET_OK) return rc;
    for (int i = 0; i < count; i++) c.L.ybuf[i] = y[ids[i]];
    if (m->kind == ET_SKIP) {
        skip_rows(&c, ids, count, 0);
        *loss = skip_step(&c, ids, c.L.ybuf, count, 0) / count;
        skip_finish(&c, count, 0);
        return ET_OK;
    }
    float *logits = forward(&c, ids, count, 0);
    *loss = et_softmax_xent_grad(logits, c.L.ybuf, count, et_width(bb, bb->n_layers)) / count;
    backward(&c, count);
    return ET_OK;
}

int32_t et_predict(const et_backbone *bb, const et_method *m, const float *params, const float *x,
                   int32_t count, int32_t batch, float *logits, void *workspace, size_t workspace_bytes) {
    ctx c;
    if (!logits || count < 1) return ET_ERR_ARGUMENT;
    /* the gradient pointer is never written by a forward pass */
    const int rc = setup(&c, bb, m, params, (float *)params, NULL, x, batch, workspace, workspace_bytes);
    if (rc != ET_OK) return rc;
    const int out = et_width(bb, bb->n_layers);
    for (int lo = 0; lo < count; lo += batch) {
        const int rows = count - lo < batch ? count - lo : batch;
        for (int i = 0; i < rows; i++) c.L.ybuf[i] = lo + i;
        const float *z = forward(&c, c.L.ybuf, rows, 0);
        memcpy(logits + (size_t)lo * out, z, (size_t)rows * out * sizeof(float));
    }
    return ET_OK;
}

int32_t et_skip_rows(const et_backbone *bb, const et_method *m, const float *x, int32_t count, int32_t batch,
                     float *rows, void *workspace, size_t workspace_bytes) {
    ctx c;
    float unused = 0.0f; /* the frozen forward pass reads no parameter: a stand-in for setup's check */
    if (!m || m->kind != ET_SKIP || !rows || count < 1) return ET_ERR_ARGUMENT;
    const int rc = setup(&c, bb, m, &unused, &unused, NULL, x, batch, workspace, workspace_bytes);
    if (rc != ET_OK) return rc;
    const size_t W = (size_t)c.d_in + (size_t)c.width[bb->n_layers];
    for (int lo = 0; lo < count; lo += batch) {
        const int n = count - lo < batch ? count - lo : batch;
        for (int i = 0; i < n; i++) c.L.ybuf[i] = lo + i;
        compute_taps(&c, c.L.ybuf, n, c.L.taps);
        memcpy(rows + (size_t)lo * W, c.L.taps, (size_t)n * W * sizeof(float));
    }
    return ET_OK;
}

int32_t et_skip_apply(const et_backbone *bb, const et_method *m, const float *params, const float *rows,
                      int32_t count, int32_t batch, float *logits, void *workspace, size_t workspace_bytes) {
    ctx c;
    if (!m || m->kind != ET_SKIP || !rows || !logits || count < 1) return ET_ERR_ARGUMENT;
    /* the gradient pointer is never written by a forward pass */
    const int rc = setup(&c, bb, m, params, (float *)params, NULL, rows, batch, workspace, workspace_bytes);
    if (rc != ET_OK) return rc;
    const size_t W = (size_t)c.d_in + (size_t)c.width[bb->n_layers], out = (size_t)c.width[bb->n_layers];
    for (int lo = 0; lo < count; lo += batch) {
        const int n = count - lo < batch ? count - lo : batch;
        for (int i = 0; i < n; i++) c.L.rowp[i] = rows + (size_t)(lo + i) * W;
        memcpy(logits + (size_t)lo * out, skip_forward(&c, n), (size_t)n * out * sizeof(float));
    }
    return ET_OK;
}
