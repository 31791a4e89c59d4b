/*
 * The spatial layer kernels (et_conv.c) against their definitions written as plain loops
 * in double, on a grid of shapes: 1-D and 2-D, stride above the kernel, padding, groups
 * 1, 2 and depthwise, one channel, odd lengths. Every buffer, scratch included, is
 * allocated with exactly the size the header documents or et_*_scratch_bytes returns, so
 * that a sanitizer build catches any read or write past it. Prints one line per result
 * ("name value": the sum of absolute values, for comparing builds on other machines) and
 * a last line "P passed, F failed" (tests/test_core_conv.py builds and runs it).
 *
 *   cc -std=c99 -O2 -I edgetune/core tests/c/test_conv.c edgetune/core/et_conv.c \
 *      edgetune/core/et_kernels.c -lm
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../edgetune/core/et_conv.h"

static int passed = 0, failed = 0;
#define CHECK(cond, what, name)                                                  \
    do {                                                                         \
        if (cond) {                                                              \
            passed++;                                                            \
        } else {                                                                 \
            printf("FAIL %s %s (line %d)\n", what, name, __LINE__);              \
            failed++;                                                            \
        }                                                                        \
    } while (0)

/* A small deterministic generator, so that every machine sees the same numbers. */
static unsigned long long state = 88172645463325252ULL;
static float uniform(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)((state >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

static float *random_floats(size_t n) {
    float *a = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = uniform();
    return a;
}

/* Exactly `bytes` of scratch, or none (NULL) where the kernel needs none. */
static float *scratch_of(size_t bytes) { return bytes ? malloc(bytes) : NULL; }

/* Every |got - ref| within 1e-5 of the entry's scale (the same sum over absolute values). */
static int close_to(const float *got, const double *ref, const double *scale, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - ref[i]) <= 1e-5 * scale[i] + 1e-30)) return 0;
    return 1;
}

static void report(const char *what, const char *name, const float *a, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += fabs((double)a[i]);
    printf("%s %s %.9g\n", what, name, s);
}

/* x[n, c, iy, ix] of a (count, in_c, in_h, in_w) batch, or 0 / -inf outside (the padding). */
static int inside(const et_conv_dims *d, int iy, int ix) { return iy >= 0 && iy < d->in_h && ix >= 0 && ix < d->in_w; }
static size_t at_in(const et_conv_dims *d, int n, int c, int iy, int ix) {
    return (((size_t)n * d->in_c + c) * d->in_h + iy) * d->in_w + ix;
}
static size_t at_out(const et_conv_dims *d, int n, int o, int oy, int ox) {
    return (((size_t)n * d->out_c + o) * d->out_h + oy) * d->out_w + ox;
}

/* ------------------------------------------------------------------ convolution */
static void check_conv(const char *name, int in_c, int in_h, int in_w, int out_c, int kh, int kw, int sh, int sw,
                       int ph, int pw, int groups, int count) {
    et_conv_dims d = {in_c, in_h, in_w, out_c, 0, 0, kh, kw, sh, sw, ph, pw, groups};
    CHECK(et_conv_dims_derive(&d) == 0, "derive", name);
    const int cg = in_c / groups, og = out_c / groups;
    const size_t IN = (size_t)in_c * in_h * in_w, OUT = (size_t)out_c * d.out_h * d.out_w;
    const size_t WN = (size_t)out_c * cg * kh * kw;
    float *x = random_floats(count * IN), *w = random_floats(WN), *b = random_floats(out_c);
    float *g = random_floats(count * OUT), *z = malloc(count * OUT * sizeof(float));
    float *dx = malloc(count * IN * sizeof(float)), *dw = malloc(WN * sizeof(float));
    float *db = malloc(out_c * sizeof(float));
    double *rz = calloc(count * OUT, sizeof(double)), *sz = calloc(count * OUT, sizeof(double));
    double *rdx = calloc(count * IN, sizeof(double)), *sdx = calloc(count * IN, sizeof(double));
    double *rdw = calloc(WN, sizeof(double)), *sdw = calloc(WN, sizeof(double));
    double *rdb = calloc(out_c, sizeof(double)), *sdb = calloc(out_c, sizeof(double));
    /* the definition: every output, every tap */
    for (int n = 0; n < count; n++)
        for (int o = 0; o < out_c; o++)
            for (int oy = 0; oy < d.out_h; oy++)
                for (int ox = 0; ox < d.out_w; ox++) {
                    const size_t zi = at_out(&d, n, o, oy, ox);
                    rz[zi] = b[o];
                    sz[zi] = fabs(b[o]);
                    rdb[o] += g[zi];
                    sdb[o] += fabs(g[zi]);
                    for (int c = 0; c < cg; c++)
                        for (int i = 0; i < kh; i++)
                            for (int j = 0; j < kw; j++) {
                                const int iy = oy * sh - ph + i, ix = ox * sw - pw + j;
                                if (!inside(&d, iy, ix)) continue;
                                const size_t xi = at_in(&d, n, (o / og) * cg + c, iy, ix);
                                const size_t wi = (((size_t)o * cg + c) * kh + i) * kw + j;
                                rz[zi] += (double)w[wi] * x[xi];
                                sz[zi] += fabs((double)w[wi] * x[xi]);
                                rdx[xi] += (double)w[wi] * g[zi];
                                sdx[xi] += fabs((double)w[wi] * g[zi]);
                                rdw[wi] += (double)x[xi] * g[zi];
                                sdw[wi] += fabs((double)x[xi] * g[zi]);
                            }
                }
    float *scratch = scratch_of(et_conv_forward_scratch_bytes(&d, count));
    et_conv_forward(&d, count, x, (int)IN, w, b, z, (int)OUT, scratch);
    CHECK(close_to(z, rz, sz, count * OUT), "forward", name);
    report("forward", name, z, count * OUT);
    /* rows inside wider rows: the same values, and nothing beside them read or written */
    const size_t ldx = IN + 3, ldz = OUT + 5;
    float *xw = malloc(count * ldx * sizeof(float)), *zw = malloc(count * ldz * sizeof(float));
    for (size_t i = 0; i < count * ldx; i++) xw[i] = NAN;
    for (size_t i = 0; i < count * ldz; i++) zw[i] = -7.0f;
    for (int r = 0; r < count; r++) memcpy(xw + r * ldx, x + r * IN, IN * sizeof(float));
    et_conv_forward(&d, count, xw, (int)ldx, w, b, zw, (int)ldz, scratch);
    int same = 1;
    for (int r = 0; r < count; r++)
        for (size_t i = 0; i < ldz; i++)
            same &= i < OUT ? zw[r * ldz + i] == z[r * OUT + i] : zw[r * ldz + i] == -7.0f;
    CHECK(same, "forward with row strides", name);
    free(xw), free(zw);
    free(scratch);

    scratch = scratch_of(et_conv_input_grad_scratch_bytes(&d, count));
    et_conv_input_grad(&d, count, g, w, dx, scratch);
    CHECK(close_to(dx, rdx, sdx, count * IN), "input_grad", name);
    report("input_grad", name, dx, count * IN);
    free(scratch);

    scratch = scratch_of(et_conv_weight_grad_scratch_bytes(&d, count));
    et_conv_weight_grad(&d, count, x, g, dw, 0, scratch);
    CHECK(close_to(dw, rdw, sdw, WN), "weight_grad", name);
    report("weight_grad", name, dw, WN);
    /* accumulate: the same gradient added again gives twice it */
    et_conv_weight_grad(&d, count, x, g, dw, 1, scratch);
    for (size_t i = 0; i < WN; i++) {
        rdw[i] *= 2.0;
        sdw[i] *= 2.0;
    }
    CHECK(close_to(dw, rdw, sdw, WN), "weight_grad accumulated", name);
    free(scratch);

    et_conv_bias_grad(&d, count, g, db, 0);
    CHECK(close_to(db, rdb, sdb, out_c), "bias_grad", name);
    report("bias_grad", name, db, out_c);

    free(x), free(w), free(b), free(g), free(z), free(dx), free(dw), free(db);
    free(rz), free(sz), free(rdx), free(sdx), free(rdw), free(sdw), free(rdb), free(sdb);
}

/* ------------------------------------------------------------------ pooling */
static void check_pool(const char *name, int is_max, int in_c, int in_h, int in_w, int kh, int kw, int sh, int sw,
                       int ph, int pw, int count, int ties) {
    et_conv_dims d = {in_c, in_h, in_w, in_c, 0, 0, kh, kw, sh, sw, ph, pw, 1};
    CHECK(et_pool_dims_derive(&d) == 0, "derive", name);
    CHECK(et_pool_scratch_bytes(&d, count) == 0, "scratch", name);
    const size_t IN = (size_t)in_c * in_h * in_w, OUT = (size_t)in_c * d.out_h * d.out_w;
    float *x = random_floats(count * IN), *g = random_floats(count * OUT);
    if (ties)
        for (size_t i = 0; i < count * IN; i++) x[i] = roundf(x[i]);
    float *z = malloc(count * OUT * sizeof(float)), *dx = malloc(count * IN * sizeof(float));
    double *rz = calloc(count * OUT, sizeof(double)), *sz = calloc(count * OUT, sizeof(double));
    double *rdx = calloc(count * IN, sizeof(double)), *sdx = calloc(count * IN, sizeof(double));
    for (int n = 0; n < count; n++)
        for (int c = 0; c < in_c; c++)
            for (int oy = 0; oy < d.out_h; oy++)
                for (int ox = 0; ox < d.out_w; ox++) {
                    const size_t zi = at_out(&d, n, c, oy, ox);
                    double best = -INFINITY;
                    long where = -1;
                    for (int i = 0; i < kh; i++)
                        for (int j = 0; j < kw; j++) {
                            const int iy = oy * sh - ph + i, ix = ox * sw - pw + j;
                            const double pad = is_max ? -INFINITY : 0.0;
                            const double v = inside(&d, iy, ix) ? x[at_in(&d, n, c, iy, ix)] : pad;
                            if (is_max) {
                                if (v > best) { /* strictly greater: the first maximum */
                                    best = v;
                                    where = inside(&d, iy, ix) ? (long)at_in(&d, n, c, iy, ix) : -1;
                                }
                            } else {
                                rz[zi] += v / (kh * kw);
                                sz[zi] += fabs(v) / (kh * kw);
                                if (inside(&d, iy, ix)) {
                                    rdx[at_in(&d, n, c, iy, ix)] += g[zi] / (double)(kh * kw);
                                    sdx[at_in(&d, n, c, iy, ix)] += fabs(g[zi]) / (kh * kw);
                                }
                            }
                        }
                    if (is_max) {
                        rz[zi] = best;
                        sz[zi] = 0.0; /* the same element: exact */
                        if (where >= 0) {
                            rdx[where] += g[zi];
                            sdx[where] += fabs(g[zi]);
                        }
                    }
                }
    if (is_max) {
        et_maxpool_forward(&d, count, x, (int)IN, z, (int)OUT);
        et_maxpool_input_grad(&d, count, x, g, dx);
    } else {
        et_avgpool_forward(&d, count, x, (int)IN, z, (int)OUT);
        et_avgpool_input_grad(&d, count, g, dx);
    }
    CHECK(close_to(z, rz, sz, count * OUT), "forward", name);
    CHECK(close_to(dx, rdx, sdx, count * IN), "input_grad", name);
    report(is_max ? "maxpool_forward" : "avgpool_forward", name, z, count * OUT);
    report(is_max ? "maxpool_input_grad" : "avgpool_input_grad", name, dx, count * IN);
    free(x), free(g), free(z), free(dx), free(rz), free(sz), free(rdx), free(sdx);
}

static void check_gap(const char *name, int in_c, int in_h, int in_w, int count) {
    et_conv_dims d = {in_c, in_h, in_w, in_c, 0, 0, in_h, in_w, 1, 1, 0, 0, 1};
    CHECK(et_gap_dims_derive(&d) == 0 && d.out_h == 1 && d.out_w == 1, "derive", name);
    CHECK(et_gap_scratch_bytes(&d, count) == 0, "scratch", name);
    const size_t HW = (size_t)in_h * in_w, IN = in_c * HW;
    float *x = random_floats(count * IN), *g = random_floats((size_t)count * in_c);
    float *z = malloc((size_t)count * in_c * sizeof(float)), *dx = malloc(count * IN * sizeof(float));
    double *rz = calloc((size_t)count * in_c, sizeof(double)), *sz = calloc((size_t)count * in_c, sizeof(double));
    double *rdx = calloc(count * IN, sizeof(double)), *sdx = calloc(count * IN, sizeof(double));
    for (size_t r = 0; r < (size_t)count * in_c; r++)
        for (size_t i = 0; i < HW; i++) {
            rz[r] += x[r * HW + i] / (double)HW;
            sz[r] += fabs(x[r * HW + i]) / (double)HW;
            rdx[r * HW + i] = g[r] / (double)HW;
            sdx[r * HW + i] = fabs(g[r]) / (double)HW;
        }
    et_gap_forward(&d, count, x, (int)IN, z, in_c);
    et_gap_input_grad(&d, count, g, dx);
    CHECK(close_to(z, rz, sz, (size_t)count * in_c), "forward", name);
    CHECK(close_to(dx, rdx, sdx, count * IN), "input_grad", name);
    report("gap_forward", name, z, (size_t)count * in_c);
    report("gap_input_grad", name, dx, count * IN);
    free(x), free(g), free(z), free(dx), free(rz), free(sz), free(rdx), free(sdx);
}

/* ------------------------------------------------------------------ refused dims */
static void check_refusals(void) {
    const et_conv_dims ok = {4, 1, 11, 6, 0, 0, 1, 3, 1, 2, 0, 1, 2};
    et_conv_dims d = ok;
    CHECK(et_conv_dims_derive(&d) == 0 && d.out_h == 1 && d.out_w == 6, "derive conv1d", "4x11 k3 s2 p1 g2");
    d = ok, d.groups = 3;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "groups not dividing");
    d = ok, d.kernel_w = 14;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "kernel longer than the padded input");
    d = ok, d.stride_w = 0;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "stride 0");
    d = ok, d.pad_w = -1;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "negative padding");
    d = ok, d.in_c = 0;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "no channels");
    d = ok, d.in_w = 2147483647, d.pad_w = 1;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "padded length past int");
    d = ok, d.in_h = 65536, d.in_w = 65536;
    CHECK(et_conv_dims_derive(&d) == -1, "refuse", "input past int");
    d = ok, d.groups = 1, d.out_c = 4;
    CHECK(et_pool_dims_derive(&d) == 0, "derive pool", "4x11 k3 s2 p1");
    d = ok, d.groups = 1, d.out_c = 4, d.pad_w = 2;
    CHECK(et_pool_dims_derive(&d) == -1, "refuse", "pool padding over half the kernel");
    d = ok, d.groups = 1;
    CHECK(et_pool_dims_derive(&d) == -1, "refuse", "pool changing channels");
    d = (et_conv_dims){3, 4, 5, 3, 0, 0, 4, 5, 1, 1, 0, 0, 1};
    CHECK(et_gap_dims_derive(&d) == 0, "derive gap", "3x4x5");
    d.kernel_w = 4;
    CHECK(et_gap_dims_derive(&d) == -1, "refuse", "gap window smaller than the input");
    CHECK(et_conv_dims_sizeof() == 13 * sizeof(int32_t), "sizeof", "et_conv_dims");
}

int main(void) {
    /* name, in_c, in_h, in_w, out_c, kh, kw, sh, sw, ph, pw, groups, count */
    check_conv("c1d_groups2_odd", 4, 1, 11, 6, 1, 3, 1, 2, 0, 1, 2, 3);
    check_conv("c1d_depthwise", 3, 1, 7, 3, 1, 3, 1, 1, 0, 0, 3, 2);
    check_conv("c1d_depthwise_x2", 3, 1, 9, 6, 1, 3, 1, 1, 0, 1, 3, 2);
    check_conv("c1d_depthwise_s3", 5, 1, 17, 5, 1, 4, 1, 3, 0, 2, 5, 2);
    check_conv("c1d_pad2", 2, 1, 5, 4, 1, 5, 1, 1, 0, 2, 1, 3);
    check_conv("c1d_pointwise", 6, 1, 9, 6, 1, 1, 1, 1, 0, 0, 1, 2);
    check_conv("c1d_pointwise_g2", 4, 1, 10, 8, 1, 1, 1, 1, 0, 0, 2, 2);
    check_conv("c1d_pointwise_depthwise", 4, 1, 6, 4, 1, 1, 1, 1, 0, 0, 4, 2);
    check_conv("c1d_stride_over_kernel", 2, 1, 3, 2, 1, 3, 1, 4, 0, 1, 1, 3);
    check_conv("c1d_one_channel", 1, 1, 8, 1, 1, 8, 1, 1, 0, 0, 1, 2);
    check_conv("c1d_one_in_channel", 1, 1, 13, 5, 1, 4, 1, 3, 0, 2, 1, 2);
    check_conv("c1d_har_layer1", 6, 1, 128, 32, 1, 5, 1, 1, 0, 2, 1, 2);
    check_conv("c1d_har_layer2", 32, 1, 64, 64, 1, 5, 1, 1, 0, 2, 1, 1);
    check_conv("c2d_groups2", 4, 7, 6, 8, 3, 2, 2, 1, 1, 0, 2, 2);
    check_conv("c2d_depthwise", 3, 5, 5, 3, 3, 3, 1, 1, 1, 1, 3, 2);
    check_conv("c2d_depthwise_s2", 4, 9, 7, 4, 3, 3, 2, 2, 1, 1, 4, 2);
    check_conv("c2d_pointwise", 2, 4, 4, 5, 1, 1, 1, 1, 0, 0, 1, 2);
    check_conv("c2d_1x1_stride2", 2, 5, 3, 4, 1, 1, 2, 2, 0, 0, 1, 2);
    check_conv("c2d_uneven", 2, 6, 5, 4, 2, 3, 3, 2, 1, 1, 1, 2);
    check_conv("c2d_stride_over_kernel", 1, 7, 9, 3, 3, 3, 4, 5, 2, 2, 1, 2);
    check_conv("c2d_wide", 5, 6, 7, 20, 3, 3, 1, 1, 1, 1, 1, 2);
    /* name, max?, in_c, in_h, in_w, kh, kw, sh, sw, ph, pw, count, ties */
    for (int ties = 0; ties < 2; ties++) {
        const char *t = ties ? "_ties" : "";
        char name[64];
        for (int is_max = 0; is_max < 2; is_max++) {
            snprintf(name, sizeof name, "p1d_k3s2p1%s", t);
            check_pool(name, is_max, 3, 1, 10, 1, 3, 1, 2, 0, 1, 2, ties);
            snprintf(name, sizeof name, "p1d_k2_odd%s", t);
            check_pool(name, is_max, 2, 1, 7, 1, 2, 1, 2, 0, 0, 2, ties);
            snprintf(name, sizeof name, "p1d_stride_over_kernel%s", t);
            check_pool(name, is_max, 1, 1, 9, 1, 2, 1, 3, 0, 1, 2, ties);
            snprintf(name, sizeof name, "p2d_uneven%s", t);
            check_pool(name, is_max, 3, 6, 7, 3, 2, 2, 2, 1, 1, 2, ties);
            snprintf(name, sizeof name, "p2d_overlap%s", t);
            check_pool(name, is_max, 2, 5, 5, 3, 3, 1, 1, 1, 1, 2, ties);
        }
    }
    check_gap("gap_2d", 3, 5, 4, 3);
    check_gap("gap_1d", 3, 1, 7, 2);
    check_gap("gap_1x1", 4, 1, 1, 2);
    check_refusals();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
