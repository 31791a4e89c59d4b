/*
 * The device API of an exported edgetune project: the compiled engine (et_core.h) wrapped
 * for a program that collects labelled samples, fine-tunes on them and predicts.
 *
 *   et_device_init        hand over one caller-owned arena of et_device_arena_bytes() bytes
 *   et_device_add_sample  a raw labelled sample, normalised and kept in the arena
 *   et_device_use_samples samples kept elsewhere (flash), already normalised: read in place
 *   et_device_train_epoch one epoch, in a given order or in the device's own shuffle
 *   et_device_predict     logits of normalised inputs with the current adapter
 *   et_device_read_adapter / et_device_write_adapter   the adapter as bytes
 *
 * Nothing here allocates: every buffer is carved from the arena at init. No global state.
 */
#ifndef ET_DEVICE_H
#define ET_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "et_core.h"

#define ET_ERR_FULL (-4)   /* the sample store is full (max_samples) */

/* One adapter tensor in the parameter vector: element (i, j) is params[offset + i*row_stride + j*col_stride]. */
typedef struct et_adapter_tensor {
    const char *name;
    int64_t offset;
    int32_t rows, cols, row_stride, col_stride;
} et_adapter_tensor;

/* What the export writes (et_model.c): the model, the method, the training setup. */
typedef struct et_model_desc {
    const et_backbone *backbone;
    const et_method *method;
    const float *initial_params;       /* n_params: the adapter training starts from */
    int32_t optimizer;                 /* enum et_optimizer_kind */
    double lr, momentum, weight_decay, beta1, beta2, eps;
    int32_t batch;
    int32_t cache_kind;                /* enum et_cache_kind */
    int32_t cache_capacity;            /* rows of skip-cache (<= max_samples) */
    const float *col_scales;           /* int8 cache: (d_in) */
    int32_t max_samples;               /* samples the device trains on at most */
    int32_t store_samples;             /* 1: the arena keeps the samples; 0: they are given in place */
    const float *input_mean, *input_std; /* (norm_channels) raw -> normalised input, or NULL */
    int32_t norm_channels;             /* values in input_mean/std: et_width(backbone, 0), one per input
                                          feature (an MLP), or the input's channels, each applied to its
                                          et_width(backbone, 0) / norm_channels consecutive features (a CNN's
                                          channels-first rows) */
    int32_t n_tensors;
    const et_adapter_tensor *tensors;
} et_model_desc;

typedef struct et_device {
    const et_model_desc *model;
    et_optimizer opt;
    et_cache cache;
    float *params, *grads;             /* grads: NULL with the fused update (et_fused_update) */
    float *x;                          /* store: (max_samples, et_width(backbone, 0)) normalised inputs */
    int32_t *y;                        /* store: (max_samples) labels */
    const float *xs;                   /* the samples trained on (store or in place) */
    const int32_t *ys;
    int32_t n;                         /* samples so far */
    int32_t *order;                    /* (max_samples): the device's own shuffle */
    uint32_t rng;                      /* xorshift32 state for that shuffle */
    void *workspace;
    size_t workspace_bytes;
} et_device;

/* The arena's pieces, in the order et_device_init carves them (the engine's workspace last). */
enum et_device_piece { ET_PIECE_PARAMS = 0, ET_PIECE_GRADIENTS, ET_PIECE_OPTIMIZER, ET_PIECE_CACHE,
                       ET_PIECE_SAMPLES, ET_PIECE_ORDER, ET_PIECE_WORKSPACE, ET_PIECE_ALIGNMENT, ET_DEVICE_PIECES };

/* Bytes of arena et_device_init needs for this model (every piece 64-byte aligned, + 64); 0 if refused. */
size_t et_device_arena_bytes(const et_model_desc *model);
/*
 * The same total for a target whose pointers are pointer_bytes wide, and, with `bytes`
 * (ET_DEVICE_PIECES entries), each piece's exact size; ET_PIECE_ALIGNMENT receives the
 * rounding of the pieces to 64 bytes. edgetune's planner reads this through its binding.
 */
size_t et_device_arena_breakdown(const et_model_desc *model, int32_t pointer_bytes, size_t *bytes);

/* Carve the arena, copy the initial adapter, clear the cache. seed: the device's shuffle. */
int32_t et_device_init(et_device *d, const et_model_desc *model, void *arena, size_t arena_bytes, uint32_t seed);

/* Normalise raw (et_width(backbone, 0) floats) into the store with its label. ET_ERR_FULL when full. */
int32_t et_device_add_sample(et_device *d, const float *raw, int32_t label);

/* Train on n samples kept elsewhere: x (n, et_width(backbone, 0)) already normalised, y (n). n <= max_samples. */
int32_t et_device_use_samples(et_device *d, const float *x, const int32_t *y, int32_t n);

/* out (et_width(backbone, 0)) = the normalised raw input (the model's input mean and std, per feature
 * or per channel: norm_channels). */
void et_device_normalize(const et_device *d, const float *raw, float *out);

/*
 * One epoch over the samples: in `order` (a permutation of 0..n-1), or with order == NULL
 * in the device's own shuffle (xorshift32 + Fisher-Yates). stats receives the epoch's
 * loss (and seconds if clock is given). Returns ET_OK or a negative code.
 */
int32_t et_device_train_epoch(et_device *d, const int32_t *order, et_clock_fn clock, et_epoch_stats *stats);

/* logits (count, classes) for count normalised inputs x. */
int32_t et_device_predict(et_device *d, const float *x, int32_t count, float *logits);

/* The adapter as bytes: its tensors in the model's order, float32, little-endian host order. */
size_t et_device_adapter_bytes(const et_model_desc *model);
void et_device_read_adapter(const et_device *d, uint8_t *out);
int32_t et_device_write_adapter(et_device *d, const uint8_t *in);

#endif
