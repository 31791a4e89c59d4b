/*
 * edgetune's compiled training engine: the public interface.
 *
 * Portable C99, float32, libc and libm only, single-threaded, re-entrant (no global
 * state), and no allocation: the caller owns every buffer. The same files build the
 * Python extension, a Linux-board program and a microcontroller firmware.
 *
 * The model is described by four plain structs that hold sizes and pointers:
 *   et_backbone   the frozen network: one et_layer per layer (float32 or int8 tensors)
 *   et_method     what trains, as offsets into one flat parameter vector
 *   et_optimizer  SGD, momentum or Adam, with its state arrays
 *   et_cache      the skip-cache (float32 or int8 rows), or none
 * and one call runs whole epochs:
 *   et_train_epochs(...)   n_epochs over the training set, one shuffled order per epoch
 * The scratch memory it needs is one caller-owned workspace of et_workspace_size() bytes.
 * What a layer computes is looked up in a table of operations per layer kind (et_layers.h).
 *
 * Layouts: all matrices are row-major. A float dense layer's weight is given transposed,
 * wt (in, out), because the forward pass reads it that way; the backward pass of the
 * layer-wise methods reads w (out, in) where given (else it transposes wt into the
 * workspace), and the sparse method reads w only. int8 weights are (out, in).
 */
#ifndef ET_CORE_H
#define ET_CORE_H

#include <stddef.h>
#include <stdint.h>

/* The most layers a backbone holds (a MobileNetV2 imported layer by layer has about 65). The
 * structs below hold fixed tables of this size (et_backbone and et_method are const data, in
 * flash on a microcontroller); a run's per-layer tables sit in its workspace, sized by the
 * backbone's own layers. The binding reads it through et_max_layers(). */
#define ET_MAX_LAYERS 128
#define ET_ABI_VERSION 4

/* Return codes (negative: the call was refused before anything ran). */
#define ET_OK 0
#define ET_ERR_ARGUMENT (-1)
#define ET_ERR_WORKSPACE (-2)
#define ET_ERR_UNSUPPORTED (-3)

enum et_activation { ET_RELU = 0, ET_LEAKY_RELU = 1, ET_TANH = 2, ET_SIGMOID = 3, ET_IDENTITY = 4, ET_RELU6 = 5 };
enum et_method_kind { ET_LAYERWISE = 0, ET_SKIP = 1, ET_SPARSE = 2 };
enum et_optimizer_kind { ET_SGD = 0, ET_MOMENTUM = 1, ET_ADAM = 2 };
enum et_cache_kind { ET_CACHE_NONE = 0, ET_CACHE_FLOAT = 1, ET_CACHE_INT8 = 2 };
/* Layer kinds, numbered as edgetune.nn.layers.LAYER_KINDS (checked at load). A 1-D layer is a
 * 2-D one of height 1 (in_h = out_h = kernel_h = stride_h = 1, pad_h = 0); gap's window is
 * its whole input (kernel in_h x in_w, stride 1); flatten and add have none (kernel 1x1,
 * stride 1, padding 0); an add's `source` names the earlier layer whose input it adds. */
enum et_layer_kind {
    ET_LAYER_DENSE = 0, ET_LAYER_CONV1D = 1, ET_LAYER_CONV2D = 2, ET_LAYER_MAXPOOL1D = 3, ET_LAYER_MAXPOOL2D = 4,
    ET_LAYER_AVGPOOL1D = 5, ET_LAYER_AVGPOOL2D = 6, ET_LAYER_GAP = 7, ET_LAYER_FLATTEN = 8, ET_LAYER_ADD = 9
};
/* The enums by number, for et_enum_name(): the binding reads every name from here. */
enum et_enum_id { ET_ENUM_ACTIVATION = 0, ET_ENUM_METHOD = 1, ET_ENUM_OPTIMIZER = 2, ET_ENUM_CACHE = 3,
                  ET_ENUM_LAYER = 4 };

/*
 * One layer, described as a convolution in the manner of CMSIS-NN's dims structs:
 * input (in_c, in_h, in_w) channels-first, output (out_c, out_h, out_w), kernel, stride,
 * padding and groups. A dense layer is the 1x1 case: in_h = in_w = out_h = out_w = 1,
 * kernel 1x1, stride 1, padding 0, groups 1, in = in_c inputs and out = out_c outputs.
 * `activation` is applied to this layer's output (identity on the last layer).
 * Tensors: float32 (wt, w, bias) or int8 (qw .. act_scale), as the backbone's is_int8 says.
 */
typedef struct et_layer {
    int32_t kind;                           /* enum et_layer_kind */
    int32_t in_c, in_h, in_w;
    int32_t out_c, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, groups;
    int32_t activation;                     /* enum et_activation, on this layer's output */
    int32_t source;                         /* add: the earlier layer whose input is added; else -1 */
    /* float32 */
    const float *wt;                        /* dense: (in, out); NULL where unused */
    const float *w;                         /* dense: (out, in), or NULL: see above;
                                               conv: (out_c, in_c / groups, kernel_h, kernel_w) */
    const float *bias;                      /* (out_c) */
    /* int8: W ~= wscale[o] * qw[o, ...]; this layer's input ~= act_scale * q (every kind) */
    const int8_t *qw;                       /* dense: (out, in); conv: as w */
    const float *wscale;                    /* (out_c) */
    const int32_t *qbias;                   /* (out_c), in the accumulator's unit */
    const int32_t *rq_mult;                 /* (out_c) hidden layers: requantise acc * mult >> shift;
                                               add: (2) its input's and its source's multipliers */
    const int32_t *rq_shift;                /* (out_c), 1..62; add: (2), equal */
    float act_scale;
    /* asymmetric int8 (TFLite Micro's arithmetic, et_int8.c): this layer's input ~= act_scale *
     * (q - zero_point); rq_mult / rq_shift are then TFLM's Q31 multipliers and exponents
     * (-31..30, > 0 shifts left), an add's three (its input's, its source's, its output's). */
    int32_t asymmetric;                     /* 0: symmetric (zero points 0); 1: asymmetric */
    int32_t zero_point;                     /* this layer's input zero point, -128..127 */
    int32_t out_zero_point;                 /* the next layer's input zero point */
    int32_t source_zero_point;              /* add: its source layer's input zero point */
} et_layer;

/* The frozen backbone: n_layers layers, each reading the previous one's output. */
typedef struct et_backbone {
    int32_t n_layers;
    int32_t is_int8;                        /* 0: float32 tensors; 1: int8 tensors */
    et_layer layers[ET_MAX_LAYERS];
} et_backbone;

/* Values in a layer's input and output (channels x height x width). */
static inline int32_t et_layer_in(const et_layer *l) { return l->in_c * l->in_h * l->in_w; }
static inline int32_t et_layer_out(const et_layer *l) { return l->out_c * l->out_h * l->out_w; }

/* Width of the activations between layers: k = 0 the input, else layer k-1's output
 * (k = n_layers: the logits). et_backbone_check() makes layer k's input the same width. */
static inline int32_t et_width(const et_backbone *bb, int32_t k) {
    return k == 0 ? et_layer_in(&bb->layers[0]) : et_layer_out(&bb->layers[k - 1]);
}

/*
 * ET_OK if every layer of bb is a kind this build implements with consistent shapes (each
 * layer's input is the previous one's output; a spatial layer's output what its kernel,
 * stride and padding give, as et_conv.h derives it; an add's source an earlier layer with
 * the same input shape) and a known activation; ET_ERR_UNSUPPORTED for an unknown layer kind
 * or an int8 backbone with a layer that is not dense; ET_ERR_ARGUMENT otherwise. Every entry
 * point checks this first.
 */
int32_t et_backbone_check(const et_backbone *bb);

/*
 * The skip taps: what the skip adapters read. Tap j is the input of the j-th layer with
 * weights (dense, conv), pooled to one value per channel by global average pooling where
 * it is spatial (width in_c), else the input itself (width in_c * in_h * in_w); an MLP's
 * taps are its layers' inputs. Writes the layers' indices and the taps' widths (arrays of
 * ET_MAX_LAYERS; either may be NULL) and returns the number of taps. bb must pass
 * et_backbone_check().
 */
int32_t et_skip_taps(const et_backbone *bb, int32_t *layers, int32_t *widths);
/* D, the sum of the taps' widths: the adapters' input columns in a skip-cache row. */
int32_t et_skip_d_in(const et_backbone *bb);

/*
 * What trains. Every trainable tensor lives in one flat vector `params` (its gradient at
 * the same offset in `grads`); an offset of -1 means "absent".
 *
 * ET_LAYERWISE (ft-*, lora-*): per layer a trained weight wt (in, out), a trained bias
 *   (out), a LoRA pair A (rank, in) and B (out, rank); `first` is the first layer with
 *   anything trainable (the backward pass stops there). A convolution's trained weight is as
 *   stored (out_c, in_c / groups, kernel_h, kernel_w), its bias (out_c), and its LoRA pair
 *   two convolutions: A (rank, in_c, kernel_h, kernel_w) with the layer's stride and padding,
 *   B (out_c, rank) a 1x1 one (groups 1 only).
 * ET_SKIP (skip-lora, skip2-lora): n adapters, one per skip tap (et_skip_taps: an MLP's
 *   layers' inputs), A stacked (n*rank, D), block k over tap k's columns (D = et_skip_d_in,
 *   the sum of the taps' widths; off-block entries stay zero), B (out, n*rank). The skip
 *   and layer-wise methods run on every float backbone; the sparse method on dense ones.
 * ET_SPARSE: the first rows[k] output channels of layer k train (stored (rows, in) at
 *   off_weight[k]), trained biases at off_bias[k]; on an int8 backbone trained values are
 *   in int8 units and w_unit/b_unit convert them (QAS scales their gradients).
 * bias_delta (out): a trainable offset added to the logits (frozen backbones).
 */
typedef struct et_method {
    int32_t kind;                           /* enum et_method_kind */
    int32_t rank;
    float scale;                            /* LoRA alpha / rank */
    int32_t first;
    int32_t qas;                            /* sparse on int8: Quantization-Aware Scaling */
    int64_t n_params;
    int64_t off_weight[ET_MAX_LAYERS];
    int64_t off_bias[ET_MAX_LAYERS];
    int64_t off_lora_a[ET_MAX_LAYERS];
    int64_t off_lora_b[ET_MAX_LAYERS];
    int32_t rows[ET_MAX_LAYERS];            /* sparse: trained output channels of layer k */
    int64_t off_bias_delta;
    int64_t off_skip_a;
    int64_t off_skip_b;
    const float *w_unit[ET_MAX_LAYERS];     /* sparse int8: (out) weight unit, s_W */
    const float *b_unit[ET_MAX_LAYERS];     /* sparse int8: (out) bias unit, s_x s_W */
} et_method;

typedef struct et_optimizer {
    int32_t kind;                           /* enum et_optimizer_kind */
    double lr, momentum, weight_decay, beta1, beta2, eps; /* rounded to float32 where used */
    int64_t t;                              /* Adam: steps taken so far (advanced here) */
    float *m;                               /* momentum velocity / Adam first moment (n_params) */
    float *v;                               /* Adam second moment (n_params) */
} et_optimizer;

/*
 * The skip-cache: one row per sample id < capacity, [t_1 | ... | t_n | z] (the skip taps and
 * the logits; an MLP's [x | h_1 | ... | h_{n-1} | z_n]), row_width = d_in + out floats.
 * The int8 kind stores the d_in adapter inputs as int8 (qrows, times col_scales) and the
 * logits as float32. filled[i] says row i is valid;
 * samples with id >= capacity are recomputed every epoch. With `eager` every missing row
 * is computed in blocks before the first batch; otherwise a row is filled the first time
 * its sample is in a batch. Hits and misses are added to the counters.
 */
typedef struct et_cache {
    int32_t kind;                           /* enum et_cache_kind */
    int32_t eager;
    int32_t n_samples, capacity, row_width, d_in;
    float *rows;                            /* float: (capacity, row_width) */
    int8_t *qrows;                          /* int8: (capacity, d_in) */
    float *logits;                          /* int8: (capacity, out) */
    const float *col_scales;                /* int8: (d_in) */
    uint8_t *filled;                        /* (n_samples) */
    int64_t hits, misses;
} et_cache;

/* Per epoch: mean training loss and seconds (forward includes cache reads and fills). */
typedef struct et_epoch_stats {
    double loss, seconds, forward_seconds, backward_seconds, update_seconds;
    int32_t diverged;                       /* loss or a parameter not finite: params restored */
    int32_t batches;
} et_epoch_stats;

/* A monotonic clock in seconds, or NULL for no timing (a microcontroller without one). */
typedef double (*et_clock_fn)(void);

/* Bytes of workspace et_train_epochs needs at this batch size (64-byte aligned pieces);
 * 0 when the backbone or method is refused. */
size_t et_workspace_size(const et_backbone *bb, const et_method *m, const et_cache *cache,
                         int32_t batch);
/* The same for a target whose pointers are pointer_bytes (4 or 8) wide: what a program built
 * for that target computes (edgetune's planner asks this for microcontrollers). */
size_t et_workspace_size_for(const et_backbone *bb, const et_method *m, const et_cache *cache,
                             int32_t batch, int32_t pointer_bytes);
/* The pieces of that workspace in the order it is carved (each 64-byte rounded; their sum + 64 is
 * et_workspace_size_for): up to `max` names (the layout's fields, e.g. "act[k]" once per layer) and
 * sizes; returns how many pieces there are (more than max: the first max written), -1 when refused. */
int32_t et_workspace_pieces(const et_backbone *bb, const et_method *m, int32_t batch, int32_t pointer_bytes,
                            const char **names, size_t *bytes, int32_t max);

/*
 * Run n_epochs epochs. x (n, et_width(bb, 0)) prepared inputs, y (n) labels, orders
 * (n_epochs, n) a permutation of 0..n-1 per epoch; mini-batches of `batch` rows in
 * that order. Writes one et_epoch_stats per epoch run. Stops after an epoch whose
 * loss or parameters are not finite (restoring that epoch's starting parameters).
 * Returns the number of epochs run, or a negative ET_ERR_* code.
 * grads (n_params) receives each batch's gradient before the optimizer steps over it; or,
 * where et_fused_update(bb, m), grads may be NULL: the fused update, each trained tensor's
 * gradient computed into the workspace (room for the largest tensor) and stepped at once,
 * after the input gradient that reads the old tensor; the same float operations, the same
 * parameters bit for bit (its update_seconds are then part of backward_seconds).
 */
/* 1 when et_train_epochs can take grads == NULL (the fused update): the layer-wise methods and the
 * sparse update, whose trained tensors cover the n_params parameters exactly once; 0 otherwise
 * (the skip adapters). Where 1, et_workspace_size counts the fused update's gradient scratch. */
int32_t et_fused_update(const et_backbone *bb, const et_method *m);
/* Bytes of et_workspace_size that are the fused update's gradient scratch (64-byte rounded), 0 where
 * et_fused_update is 0: the two-phase step's workspace is that much smaller. */
size_t et_fused_scratch_bytes(const et_backbone *bb, const et_method *m);

int32_t et_train_epochs(const et_backbone *bb, const et_method *m, et_optimizer *opt, et_cache *cache,
                        float *params, float *grads, const float *x, const int32_t *y, int32_t n,
                        int32_t batch, const int32_t *orders, int32_t n_epochs, et_clock_fn clock,
                        void *workspace, size_t workspace_bytes, et_epoch_stats *stats);

/*
 * One forward and backward pass on the samples ids[0..count) (count <= batch): fills
 * grads, returns the mean loss in *loss; nothing is updated and the cache is not used.
 * For gradient checks and tests.
 */
int32_t et_batch_gradient(const et_backbone *bb, const et_method *m, const float *params, float *grads,
                          const float *x, const int32_t *y, const int32_t *ids, int32_t count,
                          int32_t batch, void *workspace, size_t workspace_bytes, double *loss);

/* Logits (count, out) of the model with its current parameters; `batch` rows at a time. */
int32_t et_predict(const et_backbone *bb, const et_method *m, const float *params, const float *x,
                   int32_t count, int32_t batch, float *logits, void *workspace, size_t workspace_bytes);

/*
 * Skip methods (m->kind == ET_SKIP), the two halves of et_predict for a caller that reads the
 * frozen features between them (an adapter bank routes each sample on them):
 * et_skip_rows writes the skip-cache rows [t_1 | ... | t_n | z] (count, et_skip_d_in(bb) + out)
 * of count prepared inputs x (count, et_width(bb, 0)), the frozen forward pass only (no
 * parameter is read); et_skip_apply writes the logits (count, out) of the adapters in params
 * (m->n_params) on such rows. Both take `batch` rows at a time and the workspace
 * et_workspace_size(bb, m, NULL, batch) asks for.
 */
int32_t et_skip_rows(const et_backbone *bb, const et_method *m, const float *x, int32_t count, int32_t batch,
                     float *rows, void *workspace, size_t workspace_bytes);
int32_t et_skip_apply(const et_backbone *bb, const et_method *m, const float *params, const float *rows,
                      int32_t count, int32_t batch, float *logits, void *workspace, size_t workspace_bytes);

/* The int8 backbone's forward pass (any layer kinds, et_int8.h): every layer's int8 input side
 * by side, taps (count, sum of the layers' input widths), and float logits (count, out). */
int32_t et_int8_forward_taps(const et_backbone *bb, const float *x, int32_t count, int8_t *taps,
                             float *logits, void *workspace, size_t workspace_bytes);
size_t et_int8_workspace_size(const et_backbone *bb, int32_t rows);

/*
 * Compile-time facts, read by the binding at load (and by `edgetune info`): ABI version,
 * struct sizes and field offsets, the enums' names, compiler and flags. Structs by number:
 * 0 et_backbone, 1 et_method, 2 et_optimizer, 3 et_cache, 4 et_epoch_stats, 5 et_layer,
 * 6 et_model_desc (et_device.h).
 */
int32_t et_abi_version(void);
int32_t et_max_layers(void);            /* ET_MAX_LAYERS */
size_t et_sizeof(int32_t which);            /* 0 for an unknown struct */
/* Field `index` of struct `which` (declaration order): its name, and its byte offset; NULL / -1 past the end. */
const char *et_field_name(int32_t which, int32_t index);
int64_t et_field_offset(int32_t which, int32_t index);
/* The name of value `value` of enum `which` (enum et_enum_id), or NULL past the last one. */
const char *et_enum_name(int32_t which, int32_t value);
const char *et_build_info(void);

/* A POSIX monotonic clock (et_clock.c; not part of microcontroller builds). */
double et_clock_monotonic(void);

#endif
