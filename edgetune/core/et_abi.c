/*
 * Build facts the binding checks at load: the ABI version, each struct's size and the name
 * and offset of each of its fields (in declaration order), and the names of the enums'
 * values. edgetune/core/__init__.py compares every ctypes field and every enum it uses
 * against these tables and refuses a library that disagrees.
 */
#include "et_conv.h"
#include "et_core.h"
#include "et_device.h"
#include "et_random.h"

#include <stddef.h>

#ifndef ET_BUILD_FLAGS
#define ET_BUILD_FLAGS "unknown"
#endif

typedef struct {
    const char *name;
    size_t offset;
} field;

#define F(type, f) {#f, offsetof(type, f)}

static const field LAYER[] = {
    F(et_layer, kind), F(et_layer, in_c), F(et_layer, in_h), F(et_layer, in_w), F(et_layer, out_c),
    F(et_layer, out_h), F(et_layer, out_w), F(et_layer, kernel_h), F(et_layer, kernel_w), F(et_layer, stride_h),
    F(et_layer, stride_w), F(et_layer, pad_h), F(et_layer, pad_w), F(et_layer, groups), F(et_layer, activation),
    F(et_layer, source), F(et_layer, wt), F(et_layer, w), F(et_layer, bias), F(et_layer, qw), F(et_layer, wscale),
    F(et_layer, qbias), F(et_layer, rq_mult), F(et_layer, rq_shift), F(et_layer, act_scale),
    F(et_layer, asymmetric), F(et_layer, zero_point), F(et_layer, out_zero_point), F(et_layer, source_zero_point)};
static const field BACKBONE[] = {F(et_backbone, n_layers), F(et_backbone, is_int8), F(et_backbone, layers)};
static const field METHOD[] = {
    F(et_method, kind), F(et_method, rank), F(et_method, scale), F(et_method, first), F(et_method, qas),
    F(et_method, n_params), F(et_method, off_weight), F(et_method, off_bias), F(et_method, off_lora_a),
    F(et_method, off_lora_b), F(et_method, rows), F(et_method, off_bias_delta), F(et_method, off_skip_a),
    F(et_method, off_skip_b), F(et_method, w_unit), F(et_method, b_unit)};
static const field OPTIMIZER[] = {
    F(et_optimizer, kind), F(et_optimizer, lr), F(et_optimizer, momentum), F(et_optimizer, weight_decay),
    F(et_optimizer, beta1), F(et_optimizer, beta2), F(et_optimizer, eps), F(et_optimizer, t), F(et_optimizer, m),
    F(et_optimizer, v)};
static const field CACHE[] = {
    F(et_cache, kind), F(et_cache, eager), F(et_cache, n_samples), F(et_cache, capacity), F(et_cache, row_width),
    F(et_cache, d_in), F(et_cache, rows), F(et_cache, qrows), F(et_cache, logits), F(et_cache, col_scales),
    F(et_cache, filled), F(et_cache, hits), F(et_cache, misses)};
static const field STATS[] = {
    F(et_epoch_stats, loss), F(et_epoch_stats, seconds), F(et_epoch_stats, forward_seconds),
    F(et_epoch_stats, backward_seconds), F(et_epoch_stats, update_seconds), F(et_epoch_stats, diverged),
    F(et_epoch_stats, batches)};
static const field MODEL_DESC[] = {
    F(et_model_desc, backbone), F(et_model_desc, method), F(et_model_desc, initial_params),
    F(et_model_desc, optimizer), F(et_model_desc, lr), F(et_model_desc, momentum), F(et_model_desc, weight_decay),
    F(et_model_desc, beta1), F(et_model_desc, beta2), F(et_model_desc, eps), F(et_model_desc, batch),
    F(et_model_desc, cache_kind), F(et_model_desc, cache_capacity), F(et_model_desc, col_scales),
    F(et_model_desc, max_samples), F(et_model_desc, store_samples), F(et_model_desc, input_mean),
    F(et_model_desc, input_std), F(et_model_desc, norm_channels), F(et_model_desc, n_tensors),
    F(et_model_desc, tensors)};
static const field CONV_DIMS[] = {
    F(et_conv_dims, in_c), F(et_conv_dims, in_h), F(et_conv_dims, in_w), F(et_conv_dims, out_c),
    F(et_conv_dims, out_h), F(et_conv_dims, out_w), F(et_conv_dims, kernel_h), F(et_conv_dims, kernel_w),
    F(et_conv_dims, stride_h), F(et_conv_dims, stride_w), F(et_conv_dims, pad_h), F(et_conv_dims, pad_w),
    F(et_conv_dims, groups)};
static const field PCG64[] = {F(et_pcg64, state_hi), F(et_pcg64, state_lo), F(et_pcg64, inc_hi),
                              F(et_pcg64, inc_lo),   F(et_pcg64, has_uint32), F(et_pcg64, uinteger)};
#undef F

#define COUNT(a) ((int32_t)(sizeof(a) / sizeof((a)[0])))

static const struct {
    const field *fields;
    int32_t count;
    size_t size;
} STRUCTS[] = {
    {BACKBONE, COUNT(BACKBONE), sizeof(et_backbone)},   {METHOD, COUNT(METHOD), sizeof(et_method)},
    {OPTIMIZER, COUNT(OPTIMIZER), sizeof(et_optimizer)}, {CACHE, COUNT(CACHE), sizeof(et_cache)},
    {STATS, COUNT(STATS), sizeof(et_epoch_stats)},       {LAYER, COUNT(LAYER), sizeof(et_layer)},
    {MODEL_DESC, COUNT(MODEL_DESC), sizeof(et_model_desc)}, {CONV_DIMS, COUNT(CONV_DIMS), sizeof(et_conv_dims)},
    {PCG64, COUNT(PCG64), sizeof(et_pcg64)},
};

/* Value v of each enum is its name at index v (the enums are numbered 0, 1, 2, ...). */
static const char *const ACTIVATION[] = {"relu", "leaky_relu", "tanh", "sigmoid", "identity", "relu6"};
static const char *const METHOD_KIND[] = {"layerwise", "skip", "sparse"};
static const char *const OPTIMIZER_KIND[] = {"sgd", "momentum", "adam"};
static const char *const CACHE_KIND[] = {"none", "float", "int8"};
static const char *const LAYER_KIND[] = {"dense",     "conv1d",    "conv2d", "maxpool1d", "maxpool2d",
                                         "avgpool1d", "avgpool2d", "gap",    "flatten",   "add"};

static const struct {
    const char *const *names;
    int32_t count;
} ENUMS[] = {
    {ACTIVATION, COUNT(ACTIVATION)}, {METHOD_KIND, COUNT(METHOD_KIND)}, {OPTIMIZER_KIND, COUNT(OPTIMIZER_KIND)},
    {CACHE_KIND, COUNT(CACHE_KIND)}, {LAYER_KIND, COUNT(LAYER_KIND)},
};

/* The tables above must list every value the enums declare (a compile-time check). */
typedef char check_activation[COUNT(ACTIVATION) == ET_RELU6 + 1 ? 1 : -1];
typedef char check_method[COUNT(METHOD_KIND) == ET_SPARSE + 1 ? 1 : -1];
typedef char check_optimizer[COUNT(OPTIMIZER_KIND) == ET_ADAM + 1 ? 1 : -1];
typedef char check_cache[COUNT(CACHE_KIND) == ET_CACHE_INT8 + 1 ? 1 : -1];
typedef char check_layer[COUNT(LAYER_KIND) == ET_LAYER_ADD + 1 ? 1 : -1];

int32_t et_abi_version(void) { return ET_ABI_VERSION; }

int32_t et_max_layers(void) { return ET_MAX_LAYERS; }

size_t et_sizeof(int32_t which) {
    return which >= 0 && which < COUNT(STRUCTS) ? STRUCTS[which].size : 0;
}

const char *et_field_name(int32_t which, int32_t index) {
    if (which < 0 || which >= COUNT(STRUCTS) || index < 0 || index >= STRUCTS[which].count) return NULL;
    return STRUCTS[which].fields[index].name;
}

int64_t et_field_offset(int32_t which, int32_t index) {
    if (which < 0 || which >= COUNT(STRUCTS) || index < 0 || index >= STRUCTS[which].count) return -1;
    return (int64_t)STRUCTS[which].fields[index].offset;
}

const char *et_enum_name(int32_t which, int32_t value) {
    if (which < 0 || which >= COUNT(ENUMS) || value < 0 || value >= ENUMS[which].count) return NULL;
    return ENUMS[which].names[value];
}

const char *et_build_info(void) {
#ifdef __VERSION__
    return "compiler " __VERSION__ "; flags " ET_BUILD_FLAGS;
#else
    return "flags " ET_BUILD_FLAGS;
#endif
}
