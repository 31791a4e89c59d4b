/*
 * edgetune's compiled training engine: the public interface.
 *
 * Portable C99, float32, libc and libm only, single-threaded, re-entrant (no global
 * state), and no allocation: the caller owns every buffer. The same files build the
 * Python extension, a Linux-board program and a microcontroller firmware.
 *
 * The model is described by four plain structs that hold sizes and pointers:
 *   et_backbone   the frozen network (float32 or int8 weights)
 *   et_method     what trains, as offsets into one flat parameter vector
 *   et_optimizer  SGD, momentum or Adam, with its state arrays
 *   et_cache      the skip-cache (float32 or int8 rows), or none
 * and one call runs whole epochs:
 *   et_train_epochs(...)   n_epochs over the training set, one shuffled order per epoch
 * The scratch memory it needs is one caller-owned workspace of et_workspace_size() bytes.
 *
 * Layouts: all matrices are row-major. A float layer's weight is given transposed,
 * wt[k] of shape (in, out), because the forward pass reads it that way; the backward
 * pass of the layer-wise methods reads w[k] (out, in) where given (else it transposes wt
 * into the workspace), and the sparse method reads w[k] only. int8 weights are (out, in).
 */
#ifndef ET_CORE_H
#define ET_CORE_H

#include <stddef.h>
#include <stdint.h>

#define ET_MAX_LAYERS 16
#define ET_ABI_VERSION 1

/* Return codes (negative: the call was refused before anything ran). */
#define ET_OK 0
#define ET_ERR_ARGUMENT (-1)
#define ET_ERR_WORKSPACE (-2)
#define ET_ERR_UNSUPPORTED (-3)

enum et_activation { ET_RELU = 0, ET_LEAKY_RELU = 1, ET_TANH = 2, ET_SIGMOID = 3, ET_IDENTITY = 4 };
enum et_method_kind { ET_LAYERWISE = 0, ET_SKIP = 1, ET_SPARSE = 2 };
enum et_optimizer_kind { ET_SGD = 0, ET_MOMENTUM = 1, ET_ADAM = 2 };
enum et_cache_kind { ET_CACHE_NONE = 0, ET_CACHE_FLOAT = 1, ET_CACHE_INT8 = 2 };

/* The frozen backbone: n_layers fully-connected layers, sizes[0] inputs .. sizes[n] outputs. */
typedef struct et_backbone {
    int32_t n_layers;
    int32_t sizes[ET_MAX_LAYERS + 1];
    int32_t activation;                     /* enum et_activation, between layers */
    int32_t is_int8;                        /* 0: float32 weights; 1: int8 weights */
    /* float32 backbone */
    const float *wt[ET_MAX_LAYERS];         /* (in, out); NULL where unused */
    const float *w[ET_MAX_LAYERS];          /* (out, in), or NULL: see above */
    const float *bias[ET_MAX_LAYERS];       /* (out) */
    /* int8 backbone: W ~= wscale[o] * qw[o, i]; layer k's input ~= act_scale[k] * q */
    const int8_t *qw[ET_MAX_LAYERS];        /* (out, in) */
    const float *wscale[ET_MAX_LAYERS];     /* (out) */
    const int32_t *qbias[ET_MAX_LAYERS];    /* (out), in the accumulator's unit */
    const int32_t *rq_mult[ET_MAX_LAYERS];  /* (out) hidden layers: requantise acc * mult >> shift */
    const int32_t *rq_shift[ET_MAX_LAYERS]; /* (out), 1..62 */
    float act_scale[ET_MAX_LAYERS];
} et_backbone;

/*
 * What trains. Every trainable tensor lives in one flat vector `params` (its gradient at
 * the same offset in `grads`); an offset of -1 means "absent".
 *
 * ET_LAYERWISE (ft-*, lora-*): per layer a trained weight wt (in, out), a trained bias
 *   (out), a LoRA pair A (rank, in) and B (out, rank); `first` is the first layer with
 *   anything trainable (the backward pass stops there).
 * ET_SKIP (skip-lora, skip2-lora): A stacked (n*rank, D), block k over layer k's input
 *   columns (D = sum of the layers' input widths; off-block entries stay zero), B (out, n*rank).
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
 * The skip-cache: one row per sample id < capacity, [x | h_1 | ... | h_{n-1} | z_n]
 * (row_width = d_in + out floats). The int8 kind stores the d_in adapter inputs as int8
 * (qrows, times col_scales) and the logits as float32. filled[i] says row i is valid;
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

/* Bytes of workspace et_train_epochs needs at this batch size (64-byte aligned pieces). */
size_t et_workspace_size(const et_backbone *bb, const et_method *m, const et_cache *cache,
                         int32_t batch);

/*
 * Run n_epochs epochs. x (n, sizes[0]) prepared inputs, y (n) labels, orders
 * (n_epochs, n) a permutation of 0..n-1 per epoch; mini-batches of `batch` rows in
 * that order. Writes one et_epoch_stats per epoch run. Stops after an epoch whose
 * loss or parameters are not finite (restoring that epoch's starting parameters).
 * Returns the number of epochs run, or a negative ET_ERR_* code.
 */
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

/* The int8 backbone's forward pass: int8 taps (count, d_in) and float logits (count, out). */
int32_t et_int8_forward_taps(const et_backbone *bb, const float *x, int32_t count, int8_t *taps,
                             float *logits, void *workspace, size_t workspace_bytes);
size_t et_int8_workspace_size(const et_backbone *bb, int32_t rows);

/* Compile-time facts for `edgetune info`: ABI version, struct sizes, compiler and flags. */
int32_t et_abi_version(void);
size_t et_sizeof(int32_t which);            /* 0 backbone, 1 method, 2 optimizer, 3 cache, 4 stats */
const char *et_build_info(void);

/* A POSIX monotonic clock (et_clock.c; not part of microcontroller builds). */
double et_clock_monotonic(void);

#endif
