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
static void train(const char *name, const et_backbone *bb, const et_method *m, int opt_kind, et_cache *cache,
                  float *out_params, double *losses) {
    static float keep[MAX_P];
    et_optimizer o = optimizer(opt_kind);
    et_epoch_stats st[EPOCHS];
    memcpy(keep, P, sizeof(float) * m->n_params);
    const size_t need = et_workspace_size(bb, m, cache, BATCH);
    CHECK(need > 0 && need <= WS_BYTES, "workspace size");
    const int done = et_train_epochs(bb, m, &o, cache, P, G, X, Y, N_SAMPLES, BATCH, ORDERS, EPOCHS, NULL, WS,
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

static et_cache float_cache(int eager, int capacity) {
    et_cache c;
    memset(&c, 0, sizeof c);
    memset(FILLED, 0, sizeof FILLED);
    c.kind = ET_CACHE_FLOAT;
    c.eager = eager;
    c.n_samples = N_SAMPLES;
    c.capacity = capacity;
    c.d_in = IN + H1 + H2;
    c.row_width = c.d_in + OUT;
    c.rows = CACHE_ROWS;
    c.filled = FILLED;
    return c;
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
