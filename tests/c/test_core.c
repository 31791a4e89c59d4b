/*
 * The compiled engine's own test program: every method kind, every optimizer, the float
 * and int8 caches, on small deterministic networks. It checks what must hold exactly
 * (skip2-lora == skip-lora, eager fill == lazy fill, refused arguments) and prints every
 * epoch's loss, so that builds for other machines (aarch64 under QEMU) and sanitizer
 * builds can be compared line by line (tests/test_core_native.py).
 *
 *   cc -std=c99 -O2 -I edgetune/core tests/c/test_core.c edgetune/core/et_*.c -lm
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../edgetune/core/et_core.h"
#include "../../edgetune/core/et_layers.h"

#define N_SAMPLES 37
#define BATCH 6
#define EPOCHS 4
#define MAX_P 4096
#define WS_BYTES (1 << 20)

static int failures = 0;
#define CHECK(cond, what)                                                   \
    do {                                                                    \
        if (!(cond)) {                                                      \
            printf("FAIL %s (line %d)\n", what, __LINE__);                  \
            failures++;                                                     \
        }                                                                   \
    } while (0)

/* A small deterministic generator, so that every machine builds the same network. */
static unsigned long long state = 88172645463325252ULL;
static float uniform(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)((state >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

enum { IN = 9, H1 = 12, H2 = 10, OUT = 3, NL = 3 };
static const int SIZES[NL + 1] = {IN, H1, H2, OUT};
static float W[NL][16 * 16], WT[NL][16 * 16], BIAS[NL][16];
static float X[N_SAMPLES * IN];
static int32_t Y[N_SAMPLES];
static int32_t ORDERS[EPOCHS * N_SAMPLES];
static float P[MAX_P], G[MAX_P], M1[MAX_P], M2[MAX_P];
static unsigned char WS[WS_BYTES];

static void build_data(void) {
    for (int k = 0; k < NL; k++) {
        const int in = SIZES[k], out = SIZES[k + 1];
        for (int o = 0; o < out; o++) {
            for (int i = 0; i < in; i++) {
                W[k][o * in + i] = uniform() / sqrtf((float)in);
                WT[k][i * out + o] = W[k][o * in + i];
            }
            BIAS[k][o] = 0.1f * uniform();
        }
    }
    for (int s = 0; s < N_SAMPLES; s++) {
        Y[s] = s % OUT;
        for (int i = 0; i < IN; i++) X[s * IN + i] = uniform() + (i % OUT == Y[s] ? 1.0f : 0.0f);
    }
    for (int e = 0; e < EPOCHS; e++) { /* a shuffle per epoch (Fisher-Yates) */
        int32_t *o = ORDERS + e * N_SAMPLES;
        for (int s = 0; s < N_SAMPLES; s++) o[s] = s;
        for (int s = N_SAMPLES - 1; s > 0; s--) {
            const int j = (int)((uniform() + 1.0f) * 0.5f * (float)(s + 1)) % (s + 1);
            const int32_t t = o[s];
            o[s] = o[j];
            o[j] = t;
        }
    }
}

static et_backbone float_backbone(int activation) {
    et_backbone bb;
    memset(&bb, 0, sizeof bb);
    bb.n_layers = NL;
    for (int k = 0; k < NL; k++) { /* the activation between layers; none after the last */
        et_layer *l = &bb.layers[k];
        et_layer_dense(l, SIZES[k], SIZES[k + 1], k < NL - 1 ? activation : ET_IDENTITY);
        l->wt = WT[k];
        l->w = W[k];
        l->bias = BIAS[k];
    }
    return bb;
}

static et_method empty_method(int kind) {
    et_method m;
    memset(&m, 0, sizeof m);
    m.kind = kind;
    m.rank = 1;
    m.scale = 1.0f;
    for (int k = 0; k < ET_MAX_LAYERS; k++) m.off_weight[k] = m.off_bias[k] = m.off_lora_a[k] = m.off_lora_b[k] = -1;
    m.off_bias_delta = m.off_skip_a = m.off_skip_b = -1;
    return m;
}

/* Layer-wise: LoRA on every layer (rank 2, alpha 4) plus a trained last bias. */
static et_method lora_all(void) {
    et_method m = empty_method(ET_LAYERWISE);
    int64_t off = 0;
    m.rank = 2;
    m.scale = 2.0f;
    for (int k = 0; k < NL; k++) {
        m.off_lora_a[k] = off;
        for (int i = 0; i < 2 * SIZES[k]; i++) P[off + i] = 0.3f * uniform();
        off += 2 * SIZES[k];
        m.off_lora_b[k] = off;
        for (int i = 0; i < 2 * SIZES[k + 1]; i++) P[off + i] = 0.1f * uniform();
        off += 2 * SIZES[k + 1];
    }
    m.off_bias[NL - 1] = off;
    memcpy(P + off, BIAS[NL - 1], sizeof(float) * OUT);
    off += OUT;
    m.n_params = off;
    return m;
}

/* ft-all: every weight (as W^T) and bias in the parameters. */
static et_method ft_all(void) {
    et_method m = empty_method(ET_LAYERWISE);
    int64_t off = 0;
    for (int k = 0; k < NL; k++) {
        m.off_weight[k] = off;
        memcpy(P + off, WT[k], sizeof(float) * SIZES[k] * SIZES[k + 1]);
        off += SIZES[k] * SIZES[k + 1];
        m.off_bias[k] = off;
        memcpy(P + off, BIAS[k], sizeof(float) * SIZES[k + 1]);
        off += SIZES[k + 1];
    }
    m.n_params = off;
    return m;
}

/* Skip adapters: A stacked (n*r, D) block-diagonal, B (out, n*r), a bias delta. */
static et_method skip(void) {
    et_method m = empty_method(ET_SKIP);
    const int D = IN + H1 + H2, nr = NL;
    const unsigned long long saved = state;
    state = 2463534242ULL; /* the same adapters every time: skip-lora and skip2-lora start alike */
    memset(P, 0, sizeof P);
    m.off_skip_a = 0;
    int col = 0;
    for (int k = 0; k < NL; k++) {
        for (int i = 0; i < SIZES[k]; i++) P[k * D + col + i] = 0.3f * uniform();
        col += SIZES[k];
    }
    m.off_skip_b = nr * D;
    for (int i = 0; i < OUT * nr; i++) P[m.off_skip_b + i] = 0.2f * uniform();
    m.off_bias_delta = m.off_skip_b + OUT * nr;
    m.n_params = m.off_bias_delta + OUT;
    state = saved;
    return m;
}

/* Sparse: half the rows of layer 1, all of layer 2, biases of the last two layers. */
static et_method sparse(void) {
    et_method m = empty_method(ET_SPARSE);
    int64_t off = 0;
    m.first = 1;
    m.rows[1] = H2 / 2;
    m.rows[2] = OUT;
    for (int k = 1; k < NL; k++) {
        m.off_weight[k] = off;
        memcpy(P + off, W[k], sizeof(float) * m.rows[k] * SIZES[k]);
        off += m.rows[k] * SIZES[k];
        m.off_bias[k] = off;
        memcpy(P + off, BIAS[k], sizeof(float) * SIZES[k + 1]);
        off += SIZES[k + 1];
    }
    m.n_params = off;
    return m;
}

static et_optimizer optimizer(int kind) {
    et_optimizer o;
    memset(&o, 0, sizeof o);
    o.kind = kind;
    o.lr = kind == ET_ADAM ? 0.01 : 0.05;
    o.momentum = 0.9;
    o.weight_decay = 0.001;
    o.beta1 = 0.9;
    o.beta2 = 0.999;
    o.eps = 1e-8;
    memset(M1, 0, sizeof M1);
    memset(M2, 0, sizeof M2);
    o.m = M1;
    o.v = M2;
    return o;
}

/* Train from the parameters in P (kept), print the epoch losses under `name`. */
static const float *train_x = X; /* the inputs train() runs on */

static void train(const char *name, const et_backbone *bb, const et_method *m, int opt_kind, et_cache *cache,
                  float *out_params, double *losses) {
    static float keep[MAX_P];
    et_optimizer o = optimizer(opt_kind);
    et_epoch_stats st[EPOCHS];
    memcpy(keep, P, sizeof(float) * m->n_params);
    const size_t need = et_workspace_size(bb, m, cache, BATCH);
    CHECK(need > 0 && need <= WS_BYTES, "workspace size");
    const int done = et_train_epochs(bb, m, &o, cache, P, G, train_x, Y, N_SAMPLES, BATCH, ORDERS, EPOCHS, NULL, WS,
                                     need, st);
    CHECK(done == EPOCHS, name);
    printf("%s", name);
    for (int e = 0; e < done; e++) {
        printf(" %.9g", st[e].loss);
        if (losses) losses[e] = st[e].loss;
        CHECK(isfinite(st[e].loss) && !st[e].diverged, "finite loss");
    }
    printf("\n");
    CHECK(done == EPOCHS && st[EPOCHS - 1].loss < st[0].loss, "the loss goes down");
    if (out_params) memcpy(out_params, P, sizeof(float) * m->n_params);
    memcpy(P, keep, sizeof(float) * m->n_params);
}

static float CACHE_ROWS[N_SAMPLES * (IN + H1 + H2 + OUT)];
static uint8_t FILLED[N_SAMPLES];

static et_cache float_cache_of(int eager, int capacity, int d_in) {
    et_cache c;
    memset(&c, 0, sizeof c);
    memset(FILLED, 0, sizeof FILLED);
    c.kind = ET_CACHE_FLOAT;
    c.eager = eager;
    c.n_samples = N_SAMPLES;
    c.capacity = capacity;
    c.d_in = d_in;
    c.row_width = c.d_in + OUT;
    c.rows = CACHE_ROWS;
    c.filled = FILLED;
    return c;
}

static et_cache float_cache(int eager, int capacity) { return float_cache_of(eager, capacity, IN + H1 + H2); }

/* ------------------------------------------------------------------ convolutional backbones */
/* One input of 25 values per sample: (1, 25) for the 1-D network, (1, 5, 5) for the 2-D one. */
enum { CIN = 25, CW_MAX = 64 };
static float XC[N_SAMPLES * CIN];
static float CWT[8][CW_MAX * 16], CB[8][16];

static et_layer spatial(int kind, int c, int h, int w, int oc, int kh, int kw, int s, int p, int g, int act) {
    et_layer l;
    memset(&l, 0, sizeof l);
    l.kind = kind;
    l.in_c = c, l.in_h = h, l.in_w = w, l.out_c = oc;
    l.kernel_h = kh, l.kernel_w = kw, l.stride_h = kind == ET_LAYER_CONV1D || kind == ET_LAYER_MAXPOOL1D
                                                        || kind == ET_LAYER_AVGPOOL1D ? 1 : s;
    l.stride_w = s, l.pad_h = h == 1 ? 0 : p, l.pad_w = p, l.groups = g, l.activation = act, l.source = -1;
    l.out_h = (h + 2 * l.pad_h - kh) / l.stride_h + 1;
    l.out_w = (w + 2 * p - kw) / s + 1;
    return l;
}

/* Random weights for every layer with weights (dense: wt (in, out) and w (out, in) alike). */
static void conv_weights(et_backbone *bb) {
    for (int k = 0; k < bb->n_layers; k++) {
        et_layer *l = &bb->layers[k];
        if (!et_layer_has_weights(l)) continue;
        const int in = l->kind == ET_LAYER_DENSE ? et_layer_in(l) : l->in_c / l->groups * l->kernel_h * l->kernel_w;
        for (int i = 0; i < in * l->out_c; i++) CWT[k][i] = uniform() / sqrtf((float)in);
        for (int o = 0; o < l->out_c; o++) CB[k][o] = 0.1f * uniform();
        l->bias = CB[k];
        if (l->kind == ET_LAYER_DENSE) l->wt = CWT[k]; /* a random matrix: its layout does not matter */
        else l->w = CWT[k];
    }
}

/* conv1d (relu6) - maxpool - grouped conv1d (relu) - add - avgpool (padded) - gap - dense */
static et_backbone cnn1d(void) {
    et_backbone bb;
    memset(&bb, 0, sizeof bb);
    bb.n_layers = 7;
    bb.layers[0] = spatial(ET_LAYER_CONV1D, 1, 1, 25, 4, 1, 5, 1, 2, 1, ET_RELU6);
    bb.layers[1] = spatial(ET_LAYER_MAXPOOL1D, 4, 1, 25, 4, 1, 2, 2, 0, 1, ET_IDENTITY);
    bb.layers[2] = spatial(ET_LAYER_CONV1D, 4, 1, 12, 4, 1, 3, 1, 1, 2, ET_RELU);
    bb.layers[3] = spatial(ET_LAYER_ADD, 4, 1, 12, 4, 1, 1, 1, 0, 1, ET_IDENTITY);
    bb.layers[3].source = 2;
    bb.layers[4] = spatial(ET_LAYER_AVGPOOL1D, 4, 1, 12, 4, 1, 3, 1, 1, 1, ET_IDENTITY);
    bb.layers[5] = spatial(ET_LAYER_GAP, 4, 1, 12, 4, 1, 12, 1, 0, 1, ET_IDENTITY);
    et_layer_dense(&bb.layers[6], 4, OUT, ET_IDENTITY);
    conv_weights(&bb);
    return bb;
}

/* conv2d (tanh, stride 2, padded) - maxpool2d - flatten - dense (relu) - dense */
static et_backbone cnn2d(void) {
    et_backbone bb;
    memset(&bb, 0, sizeof bb);
    bb.n_layers = 5;
    bb.layers[0] = spatial(ET_LAYER_CONV2D, 1, 5, 5, 3, 3, 3, 2, 1, 1, ET_TANH);
    bb.layers[1] = spatial(ET_LAYER_MAXPOOL2D, 3, 3, 3, 3, 2, 2, 1, 0, 1, ET_IDENTITY);
    bb.layers[2] = spatial(ET_LAYER_FLATTEN, 3, 2, 2, 12, 1, 1, 1, 0, 1, ET_IDENTITY);
    bb.layers[2].out_h = bb.layers[2].out_w = 1;
    et_layer_dense(&bb.layers[3], 12, 6, ET_RELU);
    et_layer_dense(&bb.layers[4], 6, OUT, ET_IDENTITY);
    conv_weights(&bb);
    return bb;
}

/* Skip adapters over the taps C derives (et_skip_taps), as skip() over an MLP's layers. */
static et_method skip_taps(const et_backbone *bb) {
    et_method m = empty_method(ET_SKIP);
    int32_t widths[ET_MAX_LAYERS];
    const int n = et_skip_taps(bb, NULL, widths), D = et_skip_d_in(bb);
    const unsigned long long saved = state;
    state = 2463534242ULL;
    memset(P, 0, sizeof P);
    m.off_skip_a = 0;
    int col = 0;
    for (int k = 0; k < n; k++) {
        for (int i = 0; i < widths[k]; i++) P[k * D + col + i] = 0.3f * uniform();
        col += widths[k];
    }
    m.off_skip_b = n * D;
    for (int i = 0; i < OUT * n; i++) P[m.off_skip_b + i] = 0.2f * uniform();
    m.off_bias_delta = m.off_skip_b + OUT * n;
    m.n_params = m.off_bias_delta + OUT;
    state = saved;
    return m;
}

/* ft-all (lora = 0: every weight in its forward layout and bias) or lora-all (lora = 1: rank 2,
 * alpha 4, A and B beside every layer with weights but grouped convolutions, as PEFT places them,
 * and the last bias) over a CNN's layers. */
static et_method layerwise_cnn(const et_backbone *bb, int lora) {
    et_method m = empty_method(ET_LAYERWISE);
    int64_t off = 0;
    m.rank = 2;
    m.scale = 2.0f;
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        if (!et_layer_has_weights(l)) continue;
        const int dense = l->kind == ET_LAYER_DENSE;
        const int wsize = dense ? et_layer_in(l) * l->out_c
                                : l->out_c * (l->in_c / l->groups) * l->kernel_h * l->kernel_w;
        if (!lora) {
            m.off_weight[k] = off;
            memcpy(P + off, dense ? l->wt : l->w, sizeof(float) * wsize);
            off += wsize;
            m.off_bias[k] = off;
            memcpy(P + off, l->bias, sizeof(float) * l->out_c);
            off += l->out_c;
        } else if (l->groups == 1) {
            const int a = 2 * (dense ? et_layer_in(l) : l->in_c * l->kernel_h * l->kernel_w), b = 2 * l->out_c;
            m.off_lora_a[k] = off;
            for (int i = 0; i < a; i++) P[off + i] = 0.3f * uniform();
            off += a;
            m.off_lora_b[k] = off;
            for (int i = 0; i < b; i++) P[off + i] = 0.1f * uniform();
            off += b;
        }
    }
    if (lora) {
        const et_layer *l = &bb->layers[bb->n_layers - 1];
        m.off_bias[bb->n_layers - 1] = off;
        memcpy(P + off, l->bias, sizeof(float) * l->out_c);
        off += l->out_c;
    }
    m.n_params = off;
    return m;
}

/* The sparse update on a CNN: the first rows[k] output channels of layer k where rows[k] > 0, and
 * the biases of the layers with weights from bias_from on. */
static et_method sparse_cnn(const et_backbone *bb, const int *rows, int bias_from) {
    et_method m = empty_method(ET_SPARSE);
    int64_t off = 0;
    m.first = bb->n_layers;
    for (int k = 0; k < bb->n_layers; k++) {
        const et_layer *l = &bb->layers[k];
        if (!et_layer_has_weights(l)) continue;
        const int row = et_layer_row_floats(l);
        if (rows[k] > 0) {
            m.rows[k] = rows[k];
            m.off_weight[k] = off;
            memcpy(P + off, l->w, sizeof(float) * rows[k] * row);
            off += rows[k] * row;
        }
        if (k >= bias_from) {
            m.off_bias[k] = off;
            memcpy(P + off, l->bias, sizeof(float) * l->out_c);
            off += l->out_c;
        }
        if ((rows[k] > 0 || k >= bias_from) && k < m.first) m.first = k;
    }
    m.n_params = off;
    return m;
}

/* A CNN as the sparse update reads it: every layer's W as stored (dense: w, here the same random matrix). */
static et_backbone with_w(const et_backbone *bb) {
    et_backbone out = *bb;
    for (int k = 0; k < out.n_layers; k++)
        if (out.layers[k].kind == ET_LAYER_DENSE) out.layers[k].w = out.layers[k].wt;
    return out;
}

/* skip-lora and skip2-lora (eager, lazy with a partial cache) on a CNN: the same numbers exactly;
 * lora-all, ft-all and the sparse update (`rows`, `bias_from`: sparse_cnn) through the convolutions,
 * pooling, gap, flatten and adds. */
static void train_cnn(const char *what, const et_backbone *bb, const int *rows, int bias_from) {
    static float pa[MAX_P], pb[MAX_P];
    char name[96];
    double l0[EPOCHS], l1[EPOCHS];
    CHECK(et_backbone_check(bb) == ET_OK, "the convolutional backbone is accepted");
    train_x = XC;
    for (int o = 0; o < 3; o += 2) {
        static const char *opts[] = {"sgd", "momentum", "adam"};
        et_method m = skip_taps(bb);
        snprintf(name, sizeof name, "skip-lora %s %s", what, opts[o]);
        train(name, bb, &m, o, NULL, pa, l0);
        for (int eager = 0; eager < 2; eager++) {
            et_cache c = float_cache_of(eager, eager ? N_SAMPLES : 20, et_skip_d_in(bb));
            m = skip_taps(bb);
            snprintf(name, sizeof name, "skip2-lora %s %s %s", what, opts[o], eager ? "eager" : "lazy-partial");
            train(name, bb, &m, o, &c, pb, l1);
            CHECK(memcmp(l0, l1, sizeof l0) == 0, "CNN: skip2-lora losses == skip-lora losses");
            CHECK(memcmp(pa, pb, sizeof(float) * m.n_params) == 0, "CNN: skip2-lora params == skip-lora params");
        }
        m = layerwise_cnn(bb, 1);
        snprintf(name, sizeof name, "lora-all %s %s", what, opts[o]);
        train(name, bb, &m, o, NULL, NULL, NULL);
        m = layerwise_cnn(bb, 0);
        snprintf(name, sizeof name, "ft-all %s %s", what, opts[o]);
        train(name, bb, &m, o, NULL, NULL, NULL);
        const et_backbone sb = with_w(bb);
        m = sparse_cnn(&sb, rows, bias_from);
        snprintf(name, sizeof name, "sparse %s %s", what, opts[o]);
        train(name, &sb, &m, o, NULL, NULL, NULL);
    }
    train_x = X;
}

/* Convolutional structs that do not hold together are refused before anything runs. */
static void refuse_cnn(void) {
    const et_backbone good = cnn1d();
    et_method m = skip_taps(&good);
    et_optimizer o = optimizer(ET_SGD);
    et_epoch_stats st[1];
    et_backbone bb;
    int32_t layers[ET_MAX_LAYERS], widths[ET_MAX_LAYERS];
    CHECK(et_skip_taps(&good, layers, widths) == 3 && layers[0] == 0 && layers[1] == 2 && layers[2] == 6,
          "the taps are the layers with weights");
    CHECK(widths[0] == 1 && widths[1] == 4 && widths[2] == 4 && et_skip_d_in(&good) == 9,
          "a spatial tap is one value per channel");
#define REFUSED(change, code, what)                                                                         \
    do {                                                                                                  \
        bb = good;                                                                                        \
        change;                                                                                           \
        CHECK(et_backbone_check(&bb) == (code), what);                                                    \
        CHECK(et_workspace_size(&bb, &m, NULL, BATCH) == 0, what);                                        \
        CHECK(et_train_epochs(&bb, &m, &o, NULL, P, G, XC, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, WS_BYTES, \
                              st) == (code), what);                                                       \
    } while (0)
    REFUSED(bb.layers[0].out_w = 24, ET_ERR_ARGUMENT, "a convolution's output length that its kernel does not give");
    REFUSED((bb.layers[2].out_w = 11, bb.layers[3].in_w = 11), ET_ERR_ARGUMENT, "a wrong output length, chained");
    REFUSED(bb.layers[2].groups = 3, ET_ERR_ARGUMENT, "groups that do not divide the channels");
    REFUSED(bb.layers[0].kernel_h = 2, ET_ERR_ARGUMENT, "a 1-D convolution with a 2-high kernel");
    REFUSED(bb.layers[0].pad_w = -1, ET_ERR_ARGUMENT, "negative padding");
    REFUSED(bb.layers[0].stride_w = 0, ET_ERR_ARGUMENT, "a zero stride");
    REFUSED(bb.layers[0].kernel_w = 40, ET_ERR_ARGUMENT, "a kernel longer than the padded input");
    REFUSED(bb.layers[1].pad_w = 2, ET_ERR_ARGUMENT, "pooling padded by more than half its kernel");
    REFUSED(bb.layers[1].out_c = 5, ET_ERR_ARGUMENT, "pooling that changes the channels");
    REFUSED(bb.layers[5].kernel_w = 6, ET_ERR_ARGUMENT, "a gap whose window is not the whole input");
    REFUSED(bb.layers[3].source = 3, ET_ERR_ARGUMENT, "an add that reads its own input");
    REFUSED(bb.layers[3].source = 5, ET_ERR_ARGUMENT, "an add that reads a later layer");
    REFUSED(bb.layers[3].source = 0, ET_ERR_ARGUMENT, "an add whose source has another shape");
    REFUSED(bb.layers[3].source = -1, ET_ERR_ARGUMENT, "an add without a source");
    REFUSED(bb.layers[4].source = 2, ET_ERR_ARGUMENT, "a source on a layer that is not an add");
    REFUSED(bb.layers[6].activation = ET_RELU6 + 1, ET_ERR_ARGUMENT, "an unknown activation");
    REFUSED(bb.n_layers = 5, ET_ERR_ARGUMENT, "logits that are not flat");
    REFUSED(bb.layers[4].kind = ET_LAYER_ADD + 1, ET_ERR_UNSUPPORTED, "an unknown layer kind");
#undef REFUSED
    /* an int8 CNN trains with the skip methods once its int8 tensors pass the int8 pass's checks;
       these float layers have none */
    bb = good;
    bb.is_int8 = 1;
    CHECK(et_backbone_check(&bb) == ET_ERR_UNSUPPORTED, "int8 convolutions outside the int8 pass");
    CHECK(et_workspace_size(&bb, &m, NULL, BATCH) == 0, "an int8 CNN without int8 tensors");
    CHECK(et_train_epochs(&bb, &m, &o, NULL, P, G, XC, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, WS_BYTES, st)
              == ET_ERR_ARGUMENT, "an int8 CNN without int8 tensors");
    bb = cnn2d();
    bb.layers[2].out_c = 11;
    bb.layers[3].in_c = 11;
    CHECK(et_backbone_check(&bb) == ET_ERR_ARGUMENT, "a flatten that loses values");
    bb = good;
    bb.n_layers = 1;
    bb.layers[0] = spatial(ET_LAYER_GAP, 4, 1, 12, 4, 1, 12, 1, 0, 1, ET_IDENTITY);
    CHECK(et_backbone_check(&bb) == ET_ERR_ARGUMENT, "a backbone without weights (nothing to tap)");
    /* the sparse update's rows must fit the layers, and it reads every W as stored */
    static const int rows[ET_MAX_LAYERS] = {2, 0, 4, 0, 0, 0, OUT};
    bb = with_w(&good);
    m = sparse_cnn(&bb, rows, 2);
    CHECK(et_workspace_size(&bb, &m, NULL, BATCH) > 0, "sparse on a CNN: a workspace");
#define SPARSE_REFUSED(change, what)                                                                        \
    do {                                                                                                  \
        et_backbone sb = with_w(&good);                                                                   \
        et_method sm = sparse_cnn(&sb, rows, 2);                                                          \
        change;                                                                                           \
        CHECK(et_workspace_size(&sb, &sm, NULL, BATCH) == 0, what);                                       \
        CHECK(et_train_epochs(&sb, &sm, &o, NULL, P, G, XC, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, WS_BYTES, \
                              st) == ET_ERR_ARGUMENT, what);                                              \
    } while (0)
    SPARSE_REFUSED(sm.rows[0] = 5, "sparse: more rows than output channels");
    SPARSE_REFUSED(sm.rows[0] = -1, "sparse: negative rows");
    SPARSE_REFUSED((sm.rows[1] = 1, sm.off_weight[1] = 0), "sparse: rows on a pooling layer");
    SPARSE_REFUSED(sm.off_bias[5] = 0, "sparse: a bias on gap");
    SPARSE_REFUSED(sm.off_weight[0] = -1, "sparse: rows without a weight tensor");
    SPARSE_REFUSED(sm.first = 1, "sparse: rows before the first trained layer");
    SPARSE_REFUSED(sb.layers[6].w = NULL, "sparse: a dense layer without W as stored");
#undef SPARSE_REFUSED
    /* a workspace one byte short is refused */
    m = skip_taps(&good);
    const size_t need = et_workspace_size(&good, &m, NULL, BATCH);
    CHECK(need > 0 && et_train_epochs(&good, &m, &o, NULL, P, G, XC, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS,
                                      need - 1, st) == ET_ERR_WORKSPACE, "CNN: a small workspace is refused");
}

int main(void) {
    static const char *acts[] = {"relu", "leaky_relu", "tanh", "sigmoid", "identity"};
    static const char *opts[] = {"sgd", "momentum", "adam"};
    static float pa[MAX_P], pb[MAX_P];
    char name[96];
    build_data();
    for (int a = 0; a < 5; a++) {
        et_backbone bb = float_backbone(a);
        for (int o = 0; o < 3; o++) {
            et_method m = lora_all();
            snprintf(name, sizeof name, "lora-all %s %s", acts[a], opts[o]);
            train(name, &bb, &m, o, NULL, NULL, NULL);
            m = ft_all();
            snprintf(name, sizeof name, "ft-all %s %s", acts[a], opts[o]);
            train(name, &bb, &m, o, NULL, NULL, NULL);
            /* skip-lora without a cache, then with one (eager and lazy): the same numbers exactly */
            double l0[EPOCHS], l1[EPOCHS];
            m = skip();
            snprintf(name, sizeof name, "skip-lora %s %s", acts[a], opts[o]);
            train(name, &bb, &m, o, NULL, pa, l0);
            for (int eager = 0; eager < 2; eager++) {
                et_cache c = float_cache(eager, eager ? N_SAMPLES : 20);
                m = skip();
                snprintf(name, sizeof name, "skip2-lora %s %s %s", acts[a], opts[o], eager ? "eager" : "lazy-partial");
                train(name, &bb, &m, o, &c, pb, l1);
                CHECK(memcmp(l0, l1, sizeof l0) == 0, "skip2-lora losses == skip-lora losses");
                CHECK(memcmp(pa, pb, sizeof(float) * m.n_params) == 0, "skip2-lora params == skip-lora params");
                CHECK(c.misses == (eager ? N_SAMPLES : 20 + EPOCHS * (N_SAMPLES - 20)), "cache misses");
            }
            if (a == ET_RELU || a == ET_IDENTITY) {
                m = sparse();
                snprintf(name, sizeof name, "sparse %s %s", acts[a], opts[o]);
                train(name, &bb, &m, o, NULL, NULL, NULL);
            }
        }
    }
    for (int s = 0; s < N_SAMPLES; s++)
        for (int i = 0; i < CIN; i++) XC[s * CIN + i] = uniform() + (i % OUT == Y[s] ? 0.5f : 0.0f);
    {
        const et_backbone c1 = cnn1d(), c2 = cnn2d();
        static const int rows1[ET_MAX_LAYERS] = {2, 0, 4, 0, 0, 0, OUT}; /* below the add; grouped; the head */
        static const int rows2[ET_MAX_LAYERS] = {1, 0, 0, 0, OUT};       /* a strided, padded conv2d; the head */
        train_cnn("cnn1d", &c1, rows1, 2);
        train_cnn("cnn2d", &c2, rows2, 3);
        refuse_cnn();
    }
    /* Refused calls: nothing runs, nothing is written. */
    {
        et_backbone bb = float_backbone(ET_RELU);
        et_method m = skip();
        et_optimizer o = optimizer(ET_SGD);
        et_epoch_stats st[1];
        const size_t need = et_workspace_size(&bb, &m, NULL, BATCH);
        CHECK(et_train_epochs(&bb, &m, &o, NULL, P, G, X, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, need - 1, st)
                  == ET_ERR_WORKSPACE, "a small workspace is refused");
        CHECK(et_train_epochs(&bb, &m, &o, NULL, P, G, X, Y, 0, BATCH, ORDERS, 1, NULL, WS, need, st) == ET_ERR_ARGUMENT,
              "no samples is refused");
        CHECK(et_train_epochs(NULL, &m, &o, NULL, P, G, X, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, need, st)
                  == ET_ERR_ARGUMENT, "no backbone is refused");
        /* a layer kind this build does not implement: refused where the backbone is checked */
        bb.layers[1].kind = 99;
        CHECK(et_backbone_check(&bb) == ET_ERR_UNSUPPORTED, "an unknown layer kind is refused");
        CHECK(et_workspace_size(&bb, &m, NULL, BATCH) == 0, "no workspace for an unknown layer kind");
        CHECK(et_train_epochs(&bb, &m, &o, NULL, P, G, X, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, need, st)
                  == ET_ERR_UNSUPPORTED, "training with an unknown layer kind is refused");
        bb = float_backbone(ET_RELU);
        bb.layers[1].in_c = H1 + 1; /* layer 1 no longer reads layer 0's output */
        CHECK(et_backbone_check(&bb) == ET_ERR_ARGUMENT, "layers that do not chain are refused");
        CHECK(et_train_epochs(&bb, &m, &o, NULL, P, G, X, Y, N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, need, st)
                  == ET_ERR_ARGUMENT, "training layers that do not chain is refused");
        bb = float_backbone(ET_RELU);
        bb.layers[0].kernel_w = 3; /* a dense layer is the 1x1 case */
        CHECK(et_backbone_check(&bb) == ET_ERR_ARGUMENT, "a dense layer with a 3-wide kernel is refused");
        bb = float_backbone(ET_RELU);
        bb.layers[2].activation = 17;
        CHECK(et_backbone_check(&bb) == ET_ERR_ARGUMENT, "an unknown activation is refused");
        bb = float_backbone(ET_RELU);
        CHECK(et_backbone_check(&bb) == ET_OK, "the test backbone is accepted");
        /* the workspace for 4-byte pointers differs from the 8-byte one only by the batch's row pointers */
        CHECK(et_workspace_size_for(&bb, &m, NULL, BATCH, (int32_t)sizeof(void *)) == need,
              "et_workspace_size is et_workspace_size_for at this machine's pointer size");
        bb.n_layers = ET_MAX_LAYERS + 1;
        CHECK(et_workspace_size(&bb, &m, NULL, BATCH) == 0 && et_train_epochs(&bb, &m, &o, NULL, P, G, X, Y,
              N_SAMPLES, BATCH, ORDERS, 1, NULL, WS, WS_BYTES, st) == ET_ERR_ARGUMENT, "too many layers is refused");
    }
    printf("%d passed, %d failed\n", failures ? 0 : 1, failures);
    return failures ? 1 : 0;
}
