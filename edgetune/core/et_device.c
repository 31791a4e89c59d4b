/* The device API of an exported project: see et_device.h. Also compiled into edgetune's Python
 * extension, whose planner reads the arena's size and breakdown from et_device_arena_breakdown(). */
#include "et_device.h"

#include <math.h>
#include <string.h>

#define ALIGN 64

static size_t round_up(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

/*
 * The arena's pieces, in order; with base == NULL only their total (rounded pieces). With
 * `bytes`, each piece's exact size is added to bytes[its et_device_piece]. This is the only
 * place the arena's layout is written.
 */
static size_t layout(et_device *d, const et_model_desc *md, char *base, size_t *bytes) {
    const et_backbone *bb = md->backbone;
    const size_t P = (size_t)md->method->n_params, N = (size_t)md->max_samples, C = (size_t)md->cache_capacity;
    const size_t in = (size_t)et_width(bb, 0), out = (size_t)et_width(bb, bb->n_layers), din = (size_t)et_skip_d_in(bb);
    char *cur = base;
    size_t total = 0;
    int32_t what = ET_PIECE_PARAMS;
#define PIECE(dst, type, nbytes)                                  \
    do {                                                          \
        const size_t b_ = round_up(nbytes);                       \
        if (base) dst = (type)(void *)cur;                        \
        if (bytes) bytes[what] += (nbytes);                       \
        cur += b_;                                                \
        total += b_;                                              \
    } while (0)
    float *f = NULL;
    int8_t *q = NULL;
    int32_t *i32 = NULL;
    uint8_t *u8 = NULL;
    PIECE(f, float *, P * 4);
    if (d) d->params = f;
    what = ET_PIECE_GRADIENTS; /* none with the fused update: each tensor's gradient in the workspace */
    if (!et_fused_update(md->backbone, md->method)) {
        PIECE(f, float *, P * 4);
        if (d) d->grads = f;
    }
    what = ET_PIECE_OPTIMIZER;
    if (md->optimizer == ET_MOMENTUM || md->optimizer == ET_ADAM) {
        PIECE(f, float *, P * 4);
        if (d) d->opt.m = f;
    }
    if (md->optimizer == ET_ADAM) {
        PIECE(f, float *, P * 4);
        if (d) d->opt.v = f;
    }
    what = ET_PIECE_CACHE;
    if (md->cache_kind == ET_CACHE_FLOAT) {
        PIECE(f, float *, C * (din + out) * 4);
        if (d) d->cache.rows = f;
    } else if (md->cache_kind == ET_CACHE_INT8) {
        PIECE(q, int8_t *, C * din);
        if (d) d->cache.qrows = q;
        PIECE(f, float *, C * out * 4);
        if (d) d->cache.logits = f;
    }
    if (md->cache_kind != ET_CACHE_NONE) {
        PIECE(u8, uint8_t *, N);
        if (d) d->cache.filled = u8;
    }
    what = ET_PIECE_SAMPLES;
    if (md->store_samples) {
        PIECE(f, float *, N * in * 4);
        if (d) d->x = f;
        PIECE(i32, int32_t *, N * 4);
        if (d) d->y = i32;
    }
    what = ET_PIECE_ORDER;
    PIECE(i32, int32_t *, N * 4);
    if (d) d->order = i32;
#undef PIECE
    return total;
}

static size_t workspace_bytes(const et_model_desc *md, int32_t pointer_bytes) {
    et_cache c;
    memset(&c, 0, sizeof(c));
    c.kind = md->cache_kind;
    return et_workspace_size_for(md->backbone, md->method, &c, md->batch, pointer_bytes);
}

size_t et_device_arena_breakdown(const et_model_desc *md, int32_t pointer_bytes, size_t *bytes) {
    if (bytes)
        for (int32_t i = 0; i < ET_DEVICE_PIECES; i++) bytes[i] = 0;
    if (!md || !md->backbone || !md->method || md->max_samples < 1 || md->batch < 1) return 0;
    if (md->cache_capacity < 0 || md->cache_capacity > md->max_samples) return 0;
    if (md->optimizer < ET_SGD || md->optimizer > ET_ADAM) return 0;
    if (md->cache_kind < ET_CACHE_NONE || md->cache_kind > ET_CACHE_INT8) return 0;
    if ((md->input_mean || md->input_std) &&
        (md->norm_channels < 1 || et_width(md->backbone, 0) % md->norm_channels != 0))
        return 0;
    const size_t ws = workspace_bytes(md, pointer_bytes); /* 0: the backbone or method is refused */
    if (ws == 0) return 0;
    const size_t total = layout(NULL, md, NULL, bytes) + ws + ALIGN;
    if (bytes) {
        size_t exact = 0;
        for (int32_t i = 0; i < ET_PIECE_WORKSPACE; i++) exact += bytes[i];
        bytes[ET_PIECE_WORKSPACE] = ws;
        bytes[ET_PIECE_ALIGNMENT] = total - ws - exact;
    }
    return total;
}

size_t et_device_arena_bytes(const et_model_desc *md) {
    return et_device_arena_breakdown(md, (int32_t)sizeof(void *), NULL);
}

int32_t et_device_init(et_device *d, const et_model_desc *md, void *arena, size_t arena_bytes, uint32_t seed) {
    if (!d || !md || !arena) return ET_ERR_ARGUMENT;
    const size_t need = et_device_arena_bytes(md);
    if (need == 0) return ET_ERR_ARGUMENT;
    if (arena_bytes < need) return ET_ERR_WORKSPACE;
    memset(d, 0, sizeof(*d));
    char *base = (char *)arena;
    const uintptr_t mis = (uintptr_t)base % ALIGN;
    if (mis) base += ALIGN - mis;
    d->model = md;
    const size_t used = layout(d, md, base, NULL);
    d->workspace = base + used;
    d->workspace_bytes = workspace_bytes(md, (int32_t)sizeof(void *));
    const size_t P = (size_t)md->method->n_params;
    memcpy(d->params, md->initial_params, P * sizeof(float));
    if (d->grads) memset(d->grads, 0, P * sizeof(float));
    d->opt.kind = md->optimizer;
    d->opt.lr = md->lr;
    d->opt.momentum = md->momentum;
    d->opt.weight_decay = md->weight_decay;
    d->opt.beta1 = md->beta1;
    d->opt.beta2 = md->beta2;
    d->opt.eps = md->eps;
    d->opt.t = 0;
    if (d->opt.m) memset(d->opt.m, 0, P * sizeof(float));
    if (d->opt.v) memset(d->opt.v, 0, P * sizeof(float));
    const et_backbone *bb = md->backbone;
    d->cache.kind = md->cache_kind;
    d->cache.eager = 1;
    d->cache.d_in = et_skip_d_in(bb);
    d->cache.row_width = d->cache.d_in + et_width(bb, bb->n_layers);
    d->cache.col_scales = md->col_scales;
    if (d->cache.filled) memset(d->cache.filled, 0, (size_t)md->max_samples);
    d->xs = d->x;
    d->ys = d->y;
    d->rng = seed ? seed : 0x9E3779B9u;
    return ET_OK;
}

void et_device_normalize(const et_device *d, const float *raw, float *out) {
    const et_model_desc *md = d->model;
    const int32_t width = et_width(md->backbone, 0);
    const int32_t span = md->norm_channels > 0 ? width / md->norm_channels : width; /* features per value */
    for (int32_t i = 0; i < width; i++) {
        float v = raw[i];
        if (md->input_mean) v -= md->input_mean[i / span];
        if (md->input_std) v /= md->input_std[i / span];
        out[i] = v;
    }
}

int32_t et_device_add_sample(et_device *d, const float *raw, int32_t label) {
    const et_backbone *bb = d->model->backbone;
    if (!d->model->store_samples || d->xs != d->x) return ET_ERR_UNSUPPORTED;
    if (!raw || label < 0 || label >= et_width(bb, bb->n_layers)) return ET_ERR_ARGUMENT;
    if (d->n >= d->model->max_samples) return ET_ERR_FULL;
    et_device_normalize(d, raw, d->x + (size_t)d->n * et_width(bb, 0));
    d->y[d->n] = label;
    d->n++;
    return ET_OK;
}

int32_t et_device_use_samples(et_device *d, const float *x, const int32_t *y, int32_t n) {
    if (!x || !y || n < 1) return ET_ERR_ARGUMENT;
    if (n > d->model->max_samples) return ET_ERR_FULL;
    const et_backbone *bb = d->model->backbone;
    for (int32_t i = 0; i < n; i++)
        if (y[i] < 0 || y[i] >= et_width(bb, bb->n_layers)) return ET_ERR_ARGUMENT;
    d->xs = x;
    d->ys = y;
    d->n = n;
    if (d->cache.filled) memset(d->cache.filled, 0, (size_t)d->model->max_samples); /* other samples */
    return ET_OK;
}

static uint32_t xorshift32(uint32_t *s) {
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

int32_t et_device_train_epoch(et_device *d, const int32_t *order, et_clock_fn clock, et_epoch_stats *stats) {
    const et_model_desc *md = d->model;
    if (!stats || d->n < 1) return ET_ERR_ARGUMENT;
    if (!order) { /* Fisher-Yates in the device's own xorshift32 stream */
        for (int32_t i = 0; i < d->n; i++) d->order[i] = i;
        for (int32_t i = d->n - 1; i > 0; i--) {
            const int32_t j = (int32_t)(xorshift32(&d->rng) % (uint32_t)(i + 1));
            const int32_t t = d->order[i];
            d->order[i] = d->order[j];
            d->order[j] = t;
        }
        order = d->order;
    }
    d->cache.n_samples = d->n;
    d->cache.capacity = md->cache_capacity < d->n ? md->cache_capacity : d->n;
    const int32_t done = et_train_epochs(md->backbone, md->method, &d->opt,
                                         md->cache_kind != ET_CACHE_NONE ? &d->cache : NULL, d->params, d->grads,
                                         d->xs, d->ys, d->n, md->batch, order, 1, clock, d->workspace,
                                         d->workspace_bytes, stats);
    return done < 0 ? done : ET_OK;
}

int32_t et_device_predict(et_device *d, const float *x, int32_t count, float *logits) {
    const et_model_desc *md = d->model;
    return et_predict(md->backbone, md->method, d->params, x, count, md->batch, logits, d->workspace,
                      d->workspace_bytes);
}

size_t et_device_adapter_bytes(const et_model_desc *md) {
    size_t n = 0;
    for (int32_t t = 0; t < md->n_tensors; t++) n += (size_t)md->tensors[t].rows * md->tensors[t].cols;
    return n * sizeof(float);
}

void et_device_read_adapter(const et_device *d, uint8_t *out) {
    const et_model_desc *md = d->model;
    for (int32_t t = 0; t < md->n_tensors; t++) {
        const et_adapter_tensor *a = md->tensors + t;
        for (int32_t i = 0; i < a->rows; i++)
            for (int32_t j = 0; j < a->cols; j++) {
                const float v = d->params[a->offset + (int64_t)i * a->row_stride + (int64_t)j * a->col_stride];
                memcpy(out, &v, sizeof(float));
                out += sizeof(float);
            }
    }
}

int32_t et_device_write_adapter(et_device *d, const uint8_t *in) {
    const et_model_desc *md = d->model;
    const uint8_t *p = in;
    for (int32_t t = 0; t < md->n_tensors; t++) /* check everything before changing anything */
        for (int32_t i = 0; i < md->tensors[t].rows * md->tensors[t].cols; i++, p += sizeof(float)) {
            float v;
            memcpy(&v, p, sizeof(float));
            if (!isfinite(v)) return ET_ERR_ARGUMENT;
        }
    for (int32_t t = 0; t < md->n_tensors; t++) {
        const et_adapter_tensor *a = md->tensors + t;
        for (int32_t i = 0; i < a->rows; i++)
            for (int32_t j = 0; j < a->cols; j++) {
                memcpy(&d->params[a->offset + (int64_t)i * a->row_stride + (int64_t)j * a->col_stride], in,
                       sizeof(float));
                in += sizeof(float);
            }
    }
    return ET_OK;
}
