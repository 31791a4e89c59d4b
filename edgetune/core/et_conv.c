/*
 * Spatial layer kernels: see et_conv.h.
 *
 * How a convolution runs. For each sample and group, the windows of the input are laid
 * out as a matrix (im2col) and one product with the weight does the work:
 *     forward        z_g (O/G, S)  = W_g (O/G, K) cols (K, S)          et_gemm_nn
 *     input grad     dcols (K, S)  = W_g^T g_g (O/G, S), then col2im   et_gemm_tn
 *     weight grad    dW_g^T (K, O/G) += cols (K, S) g_g^T (S, O/G)     et_gemm_nt
 * with K = in_c / groups * kernel_h * kernel_w and S = out_h * out_w. The weight gradient
 * is summed transposed over the rows (so that the product's wide side is O/G, a multiple
 * of 16 in most networks, where dW_g's would be K: 30 for a 6-channel input with kernel 5)
 * and transposed into dW once at the end. Products of these sizes are where the time goes,
 * and et_gemm's register-blocked kernel (vectorised by the compiler, AVX2 + FMA on x86-64,
 * NEON on the A53) runs them near the core's speed, where direct loops over the seven
 * indices would re-read the input kernel_h * kernel_w times from strided addresses. The
 * copy into the buffer costs one pass over K * S values against 2 * (O/G) * K * S flops.
 * The output comes out channels first with no transpose.
 * A pointwise layer (1x1, stride 1, no padding) needs no copy forward and backward: its
 * input is already the matrix.
 * Depthwise layers (one input channel per group) use direct loops instead: each product
 * would have one row (O/G = 1 or a small multiplier), too thin for the register blocks,
 * and there is no reuse for im2col to buy. The loops run the kernel taps outside and the
 * output positions inside, over the span of positions whose input is not padding, so
 * that the inner loop is a branch-free, contiguous (at stride 1) multiply-add.
 */
#include "et_conv.h"
#include "et_kernels.h"

#include <math.h>
#include <string.h>

/* The hot loops get an x86-64-v3 (AVX2 + FMA) clone as in et_kernels.c (see docs/core.md). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(ET_NO_CLONES)
#define ET_CONV_HOT __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define ET_CONV_HOT
#endif

size_t et_conv_dims_sizeof(void) { return sizeof(et_conv_dims); }

/* ------------------------------------------------------------------ dims */
#define INT_LIMIT 2147483647LL

/* The checks common to convolution and pooling windows (one axis at a time). */
static int window_axis(int32_t n, int32_t k, int32_t s, int32_t p, int32_t *out) {
    if (n < 1 || k < 1 || s < 1 || p < 0) return -1;
    const int64_t padded = (int64_t)n + 2 * (int64_t)p;
    if (padded < k || padded > INT_LIMIT) return -1; /* indices into the padded input fit an int */
    *out = (int32_t)((padded - k) / s + 1);
    return 0;
}

static int window_dims(et_conv_dims *d) {
    if (d->in_c < 1 || d->out_c < 1 || d->groups < 1) return -1;
    if (window_axis(d->in_h, d->kernel_h, d->stride_h, d->pad_h, &d->out_h)) return -1;
    if (window_axis(d->in_w, d->kernel_w, d->stride_w, d->pad_w, &d->out_w)) return -1;
    const int64_t in = (int64_t)d->in_c * d->in_h * d->in_w;
    const int64_t out = (int64_t)d->out_c * d->out_h * d->out_w;
    const int64_t window = (int64_t)d->kernel_h * d->kernel_w;
    return in > INT_LIMIT || out > INT_LIMIT || window > INT_LIMIT ? -1 : 0;
}

int et_conv_dims_derive(et_conv_dims *d) {
    if (window_dims(d)) return -1;
    if (d->in_c % d->groups || d->out_c % d->groups) return -1;
    const int64_t taps = (int64_t)d->kernel_h * d->kernel_w;
    const int64_t k = (int64_t)(d->in_c / d->groups) * taps;
    if ((int64_t)d->out_c * k > INT_LIMIT) return -1;                      /* the weight */
    if (k * d->out_h * d->out_w > INT_LIMIT) return -1;                    /* the im2col buffer */
    return 0;
}

int et_pool_dims_derive(et_conv_dims *d) {
    if (d->out_c != d->in_c || d->groups != 1) return -1;
    if (2 * (int64_t)d->pad_h > d->kernel_h || 2 * (int64_t)d->pad_w > d->kernel_w) return -1;
    return window_dims(d);
}

int et_gap_dims_derive(et_conv_dims *d) {
    if (d->out_c != d->in_c || d->groups != 1) return -1;
    if (d->kernel_h != d->in_h || d->kernel_w != d->in_w || d->stride_h != 1 || d->stride_w != 1 ||
        d->pad_h != 0 || d->pad_w != 0)
        return -1;
    return window_dims(d);
}

/* ------------------------------------------------------------------ helpers */
static size_t in_size(const et_conv_dims *d) { return (size_t)d->in_c * d->in_h * d->in_w; }
static size_t out_positions(const et_conv_dims *d) { return (size_t)d->out_h * d->out_w; }
static size_t out_size(const et_conv_dims *d) { return (size_t)d->out_c * out_positions(d); }
static int taps(const et_conv_dims *d) { return d->kernel_h * d->kernel_w; }

static int is_depthwise(const et_conv_dims *d) { return d->groups > 1 && d->in_c == d->groups; }
static int is_pointwise(const et_conv_dims *d) {
    return d->kernel_h == 1 && d->kernel_w == 1 && d->stride_h == 1 && d->stride_w == 1 && d->pad_h == 0 &&
           d->pad_w == 0;
}

/*
 * The output positions o in [*lo, *hi) (of n_out) whose input index o * s + t - p lies in
 * [0, n): the span where kernel tap t reads the input, not the padding.
 */
static void valid_span(int n, int n_out, int s, int p, int t, int *lo, int *hi) {
    const int64_t first = (int64_t)p - t;        /* o * s >= first */
    const int64_t last = (int64_t)n - 1 + p - t; /* o * s <= last */
    int64_t a = first <= 0 ? 0 : (first + s - 1) / s, b = last < 0 ? 0 : last / s + 1;
    if (b > n_out) b = n_out;
    if (a > b) a = b;
    *lo = (int)a;
    *hi = (int)b;
}

/*
 * cols (K, S) from `channels` input channels x (channels, in_h, in_w): row (c, i, j) holds
 * what kernel tap (i, j) of channel c sees at every output position, 0 in the padding.
 */
ET_CONV_HOT static void im2col(const et_conv_dims *d, const float *x, int channels, float *cols) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w;
    const int sh = d->stride_h, sw = d->stride_w;
    for (int c = 0; c < channels; c++) {
        for (int i = 0; i < d->kernel_h; i++) {
            int ylo, yhi;
            valid_span(H, OH, sh, d->pad_h, i, &ylo, &yhi);
            for (int j = 0; j < d->kernel_w; j++) {
                int xlo, xhi;
                valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                float *row = cols + ((size_t)(c * d->kernel_h + i) * d->kernel_w + j) * (size_t)OH * OW;
                for (int oy = 0; oy < OH; oy++) {
                    float *r = row + (size_t)oy * OW;
                    if (oy < ylo || oy >= yhi) {
                        for (int ox = 0; ox < OW; ox++) r[ox] = 0.0f;
                        continue;
                    }
                    const float *xr = x + ((size_t)c * H + (size_t)(oy * sh - d->pad_h + i)) * W;
                    for (int ox = 0; ox < xlo; ox++) r[ox] = 0.0f;
                    if (sw == 1) { /* a contiguous piece of the input row */
                        if (xhi > xlo) memcpy(r + xlo, xr + (xlo + j - d->pad_w), (size_t)(xhi - xlo) * sizeof(float));
                    } else {
                        for (int ox = xlo; ox < xhi; ox++) r[ox] = xr[ox * sw + j - d->pad_w];
                    }
                    for (int ox = xhi; ox < OW; ox++) r[ox] = 0.0f;
                }
            }
        }
    }
}

/* The adjoint of im2col: dx (channels, in_h, in_w) += every entry of cols (K, S) at its place. */
ET_CONV_HOT static void col2im_add(const et_conv_dims *d, const float *cols, int channels, float *dx) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w;
    const int sh = d->stride_h, sw = d->stride_w;
    for (int c = 0; c < channels; c++) {
        for (int i = 0; i < d->kernel_h; i++) {
            int ylo, yhi;
            valid_span(H, OH, sh, d->pad_h, i, &ylo, &yhi);
            for (int j = 0; j < d->kernel_w; j++) {
                int xlo, xhi;
                valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                const float *row = cols + ((size_t)(c * d->kernel_h + i) * d->kernel_w + j) * (size_t)OH * OW;
                for (int oy = ylo; oy < yhi; oy++) {
                    const float *r = row + (size_t)oy * OW;
                    float *xr = dx + ((size_t)c * H + (size_t)(oy * sh - d->pad_h + i)) * W;
                    if (sw == 1 && xhi > xlo) { /* contiguous: a loop the compiler vectorises */
                        float *dst = xr + (xlo + j - d->pad_w);
                        const float *src = r + xlo;
                        for (int t = 0; t < xhi - xlo; t++) dst[t] += src[t];
                    } else {
                        for (int ox = xlo; ox < xhi; ox++) xr[ox * sw + j - d->pad_w] += r[ox];
                    }
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ depthwise (direct loops) */
/* One output channel o of a depthwise convolution: zo (OH x OW) from its input channel xc. */
ET_CONV_HOT static void depthwise_channel(const et_conv_dims *d, const float *xc, const float *wo, float *zo) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, kh = d->kernel_h, kw = d->kernel_w;
    const int sh = d->stride_h, sw = d->stride_w;
    for (int s = 0; s < OH * OW; s++) zo[s] = 0.0f;
    for (int i = 0; i < kh; i++) {
        int ylo, yhi;
        valid_span(H, OH, sh, d->pad_h, i, &ylo, &yhi);
        for (int j = 0; j < kw; j++) {
            int xlo, xhi;
            valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
            const float wv = wo[i * kw + j];
            for (int oy = ylo; oy < yhi; oy++) {
                const float *xr = xc + (size_t)(oy * sh - d->pad_h + i) * W;
                float *zr = zo + (size_t)oy * OW;
                for (int ox = xlo; ox < xhi; ox++) zr[ox] += wv * xr[ox * sw + j - d->pad_w];
            }
        }
    }
}

/* One sample: z (out_c, S) from x (in_c, H, W); output channel o reads input channel o / m. */
ET_CONV_HOT static void depthwise_forward(const et_conv_dims *d, const float *x, const float *w, float *z) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, kh = d->kernel_h, kw = d->kernel_w;
    const int m = d->out_c / d->groups;
    for (int o = 0; o < d->out_c; o++)
        depthwise_channel(d, x + (size_t)(o / m) * H * W, w + (size_t)o * kh * kw, z + (size_t)o * OH * OW);
}

int et_conv_in_place_ok(const et_conv_dims *d) {
    return is_depthwise(d) && d->out_c == d->in_c && d->out_h == d->in_h && d->out_w == d->in_w;
}

void et_conv_depthwise_in_place(const et_conv_dims *d, int count, float *x, int ldx, const float *w, const float *bias,
                                float *chan) {
    const size_t S = (size_t)d->out_h * d->out_w;
    for (int n = 0; n < count; n++)
        for (int o = 0; o < d->out_c; o++) {
            float *xc = x + (size_t)n * ldx + (size_t)o * S;
            depthwise_channel(d, xc, w + (size_t)o * d->kernel_h * d->kernel_w, chan);
            if (bias)
                for (size_t s = 0; s < S; s++) chan[s] += bias[o];
            memcpy(xc, chan, S * sizeof(float));
        }
}

/* One sample: dx (in_c, H, W) += the adjoint of depthwise_forward applied to g (out_c, S). */
ET_CONV_HOT static void depthwise_input_grad(const et_conv_dims *d, const float *g, const float *w, float *dx) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, kh = d->kernel_h, kw = d->kernel_w;
    const int sh = d->stride_h, sw = d->stride_w, m = d->out_c / d->groups;
    for (int o = 0; o < d->out_c; o++) {
        float *dc = dx + (size_t)(o / m) * H * W;
        const float *wo = w + (size_t)o * kh * kw, *go = g + (size_t)o * OH * OW;
        for (int i = 0; i < kh; i++) {
            int ylo, yhi;
            valid_span(H, OH, sh, d->pad_h, i, &ylo, &yhi);
            for (int j = 0; j < kw; j++) {
                int xlo, xhi;
                valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                const float wv = wo[i * kw + j];
                for (int oy = ylo; oy < yhi; oy++) {
                    float *dr = dc + (size_t)(oy * sh - d->pad_h + i) * W;
                    const float *gr = go + (size_t)oy * OW;
                    for (int ox = xlo; ox < xhi; ox++) dr[ox * sw + j - d->pad_w] += wv * gr[ox];
                }
            }
        }
    }
}

/* One sample: dw (out_rows, 1, kh, kw) += sum over positions of g (out_c, S) times the input
 * seen, for the first out_rows output channels. */
ET_CONV_HOT static void depthwise_weight_grad(const et_conv_dims *d, const float *x, const float *g, float *dw,
                                              int out_rows) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, kh = d->kernel_h, kw = d->kernel_w;
    const int sh = d->stride_h, sw = d->stride_w, m = d->out_c / d->groups;
    for (int o = 0; o < out_rows; o++) {
        const float *xc = x + (size_t)(o / m) * H * W, *go = g + (size_t)o * OH * OW;
        float *dwo = dw + (size_t)o * kh * kw;
        for (int i = 0; i < kh; i++) {
            int ylo, yhi;
            valid_span(H, OH, sh, d->pad_h, i, &ylo, &yhi);
            for (int j = 0; j < kw; j++) {
                int xlo, xhi;
                valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                float s = 0.0f;
                for (int oy = ylo; oy < yhi; oy++) {
                    const float *xr = xc + (size_t)(oy * sh - d->pad_h + i) * W;
                    const float *gr = go + (size_t)oy * OW;
                    if (sw == 1 && xhi > xlo) { /* contiguous: the vectorised dot product */
                        s += et_dot(gr + xlo, xr + (xlo + j - d->pad_w), xhi - xlo);
                    } else {
                        for (int ox = xlo; ox < xhi; ox++) s += gr[ox] * xr[ox * sw + j - d->pad_w];
                    }
                }
                dwo[i * kw + j] += s;
            }
        }
    }
}

/* ------------------------------------------------------------------ convolution */
static size_t cols_bytes(const et_conv_dims *d) {
    return (size_t)(d->in_c / d->groups) * taps(d) * out_positions(d) * sizeof(float);
}

size_t et_conv_forward_scratch_bytes(const et_conv_dims *d, int count) {
    (void)count;
    return is_depthwise(d) || is_pointwise(d) ? 0 : cols_bytes(d);
}

size_t et_conv_input_grad_scratch_bytes(const et_conv_dims *d, int count) {
    return et_conv_forward_scratch_bytes(d, count);
}

/* Weight gradient: cols (K, S) (not for pointwise), g_g^T packed (S, O/G), the sum dW_g^T (K, O/G). */
size_t et_conv_weight_grad_scratch_bytes(const et_conv_dims *d, int count) {
    return et_conv_weight_grad_rows_scratch_bytes(d, count, d->out_c);
}

/* The sum dW_g^T holds the trained channels of one group only: (K, min(O/G, out_rows)). */
size_t et_conv_weight_grad_rows_scratch_bytes(const et_conv_dims *d, int count, int out_rows) {
    (void)count;
    const size_t K = (size_t)(d->in_c / d->groups) * taps(d), og = (size_t)(d->out_c / d->groups);
    const size_t on = out_rows < 1 ? 0 : ((size_t)out_rows < og ? (size_t)out_rows : og);
    if (is_depthwise(d) || on == 0) return 0;
    return (is_pointwise(d) ? 0 : cols_bytes(d)) + (og * out_positions(d) + K * on) * sizeof(float);
}

void et_conv_forward(const et_conv_dims *d, int count, const float *x, int ldx, const float *w, const float *bias,
                     float *z, int ldz, float *scratch) {
    const int G = d->groups, cg = d->in_c / G, og = d->out_c / G;
    const int S = (int)out_positions(d), K = cg * taps(d);
    const size_t HW = (size_t)d->in_h * d->in_w;
    for (int n = 0; n < count; n++) {
        const float *xn = x + (size_t)n * ldx;
        float *zn = z + (size_t)n * ldz;
        if (is_depthwise(d)) {
            depthwise_forward(d, xn, w, zn);
        } else {
            for (int g = 0; g < G; g++) {
                const float *cols = xn + (size_t)g * cg * HW; /* pointwise: the input is (cg, S) */
                if (!is_pointwise(d)) {
                    im2col(d, cols, cg, scratch);
                    cols = scratch;
                }
                et_gemm_nn(og, S, K, w + (size_t)g * og * K, K, cols, S, zn + (size_t)g * og * S, S, 0);
            }
        }
        if (bias)
            for (int o = 0; o < d->out_c; o++) {
                float *zo = zn + (size_t)o * S;
                for (int s = 0; s < S; s++) zo[s] += bias[o];
            }
    }
}

void et_conv_input_grad(const et_conv_dims *d, int count, const float *g, const float *w, float *dx,
                        float *scratch) {
    const int G = d->groups, cg = d->in_c / G, og = d->out_c / G;
    const int S = (int)out_positions(d), K = cg * taps(d);
    const size_t HW = (size_t)d->in_h * d->in_w;
    for (int n = 0; n < count; n++) {
        const float *gn = g + (size_t)n * out_size(d);
        float *dxn = dx + (size_t)n * in_size(d);
        if (is_pointwise(d)) { /* dx_g (cg, S) = W_g^T g_g, written in place */
            for (int gr = 0; gr < G; gr++)
                et_gemm_tn(cg, S, og, w + (size_t)gr * og * K, K, gn + (size_t)gr * og * S, S,
                           dxn + (size_t)gr * cg * HW, S, 0);
            continue;
        }
        memset(dxn, 0, in_size(d) * sizeof(float));
        if (is_depthwise(d)) {
            depthwise_input_grad(d, gn, w, dxn);
            continue;
        }
        for (int gr = 0; gr < G; gr++) {
            et_gemm_tn(K, S, og, w + (size_t)gr * og * K, K, gn + (size_t)gr * og * S, S, scratch, S, 0);
            col2im_add(d, scratch, cg, dxn + (size_t)gr * cg * HW);
        }
    }
}

void et_conv_weight_grad(const et_conv_dims *d, int count, const float *x, const float *g, float *dw,
                         int accumulate, float *scratch) {
    et_conv_weight_grad_rows(d, count, x, g, d->out_c, dw, accumulate, scratch);
}

void et_conv_weight_grad_rows(const et_conv_dims *d, int count, const float *x, const float *g, int out_rows,
                              float *dw, int accumulate, float *scratch) {
    const int G = d->groups, cg = d->in_c / G, og = d->out_c / G;
    const int S = (int)out_positions(d), K = cg * taps(d);
    const size_t HW = (size_t)d->in_h * d->in_w;
    if (!accumulate) memset(dw, 0, (size_t)out_rows * K * sizeof(float));
    if (is_depthwise(d)) {
        for (int n = 0; n < count; n++)
            depthwise_weight_grad(d, x + (size_t)n * in_size(d), g + (size_t)n * out_size(d), dw, out_rows);
        return;
    }
    float *cols = scratch, *pack = cols + (is_pointwise(d) ? 0 : (size_t)K * S), *sum = pack + (size_t)og * S;
    for (int gr = 0; gr * og < out_rows; gr++) { /* the groups that hold a trained channel */
        const int on = out_rows - gr * og < og ? out_rows - gr * og : og; /* their first `on` channels */
        memset(sum, 0, (size_t)K * on * sizeof(float));
        for (int n = 0; n < count; n++) {
            const float *xg = x + (size_t)n * in_size(d) + (size_t)gr * cg * HW;
            const float *gg = g + (size_t)n * out_size(d) + (size_t)gr * og * S;
            if (is_pointwise(d)) {
                et_gemm_nt(K, on, S, xg, S, gg, S, sum, on, 1, pack); /* the input is cols */
            } else {
                im2col(d, xg, cg, cols);
                et_gemm_nt(K, on, S, cols, S, gg, S, sum, on, 1, pack);
            }
        }
        float *dwg = dw + (size_t)gr * og * K;
        for (int o = 0; o < on; o++)
            for (int k = 0; k < K; k++) dwg[(size_t)o * K + k] += sum[(size_t)k * on + o];
    }
}

void et_conv_bias_grad(const et_conv_dims *d, int count, const float *g, float *db, int accumulate) {
    const size_t S = out_positions(d);
    if (!accumulate) memset(db, 0, (size_t)d->out_c * sizeof(float));
    for (int n = 0; n < count; n++)
        for (int o = 0; o < d->out_c; o++) {
            const float *go = g + (size_t)n * out_size(d) + (size_t)o * S;
            float s = 0.0f;
            for (size_t i = 0; i < S; i++) s += go[i];
            db[o] += s;
        }
}

/* ------------------------------------------------------------------ pooling */
size_t et_pool_scratch_bytes(const et_conv_dims *d, int count) {
    (void)d;
    (void)count;
    return 0;
}

size_t et_gap_scratch_bytes(const et_conv_dims *d, int count) {
    (void)d;
    (void)count;
    return 0;
}

/*
 * Pooling runs one output row at a time with the kernel taps outside and the output
 * positions inside (over the span where the tap reads the input, as the depthwise loops),
 * so the inner loops are long and free of bounds checks and data-dependent branches.
 */
#define POOL_CHUNK 64 /* outputs of a row whose maxima are tracked at once (on the stack) */

/*
 * Max pooling, one output row (oy) of one channel plane xc (H, W), outputs [a, b): best[]
 * the maxima and where[] their index in the plane (-1: the padding). Taps are visited in
 * row-major order with a strict comparison, so each window keeps its FIRST maximum, as
 * NumPy's argmax over the padded window (padding -inf, a NaN the maximum and kept): a
 * window whose first place is an input takes it unconditionally; one whose first place is
 * padding starts from -inf there.
 */
ET_CONV_HOT static void max_row(const et_conv_dims *d, const float *xc, int oy, int a, int b, float *best,
                                int32_t *where) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, sw = d->stride_w;
    for (int t = 0; t < b - a; t++) {
        best[t] = -INFINITY;
        where[t] = -1;
    }
    for (int i = 0; i < d->kernel_h; i++) {
        int ylo, yhi;
        valid_span(H, OH, d->stride_h, d->pad_h, i, &ylo, &yhi);
        if (oy < ylo || oy >= yhi) continue;
        const int iy = oy * d->stride_h - d->pad_h + i;
        const float *xr = xc + (size_t)iy * W;
        for (int j = 0; j < d->kernel_w; j++) {
            int xlo, xhi;
            valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
            xlo = xlo < a ? a : xlo;
            xhi = xhi > b ? b : xhi;
            const int base = iy * W + j - d->pad_w; /* where[t] = base + ox * sw */
            if (i == 0 && j == 0) { /* the window's first place, where it is an input */
                for (int ox = xlo; ox < xhi; ox++) {
                    best[ox - a] = xr[ox * sw + j - d->pad_w];
                    where[ox - a] = base + ox * sw;
                }
                continue;
            }
            for (int ox = xlo; ox < xhi; ox++) {
                /* selects, not a branch: on random data a branch mispredicts every other window */
                const float v = xr[ox * sw + j - d->pad_w], old = best[ox - a];
                const int take = (v > old) | ((v != v) & (old == old)); /* greater, or a first NaN */
                best[ox - a] = take ? v : old;
                where[ox - a] = take ? base + ox * sw : where[ox - a];
            }
        }
    }
}

/* The forward pass needs only the maxima: the same scan without positions (a NaN wins). */
ET_CONV_HOT void et_maxpool_forward(const et_conv_dims *d, int count, const float *x, int ldx, float *z, int ldz) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, sw = d->stride_w;
    const size_t HW = (size_t)H * W, S = out_positions(d);
    for (int n = 0; n < count; n++)
        for (int c = 0; c < d->in_c; c++) {
            const float *xc = x + (size_t)n * ldx + (size_t)c * HW;
            float *zc = z + (size_t)n * ldz + (size_t)c * S;
            for (int oy = 0; oy < OH; oy++) {
                float *zr = zc + (size_t)oy * OW;
                for (int ox = 0; ox < OW; ox++) zr[ox] = -INFINITY;
                for (int i = 0; i < d->kernel_h; i++) {
                    int ylo, yhi;
                    valid_span(H, OH, d->stride_h, d->pad_h, i, &ylo, &yhi);
                    if (oy < ylo || oy >= yhi) continue;
                    const float *xr = xc + (size_t)(oy * d->stride_h - d->pad_h + i) * W;
                    for (int j = 0; j < d->kernel_w; j++) {
                        int xlo, xhi;
                        valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                        for (int ox = xlo; ox < xhi; ox++) {
                            const float v = xr[ox * sw + j - d->pad_w];
                            zr[ox] = (v > zr[ox]) | (v != v) ? v : zr[ox];
                        }
                    }
                }
            }
        }
}

void et_maxpool_input_grad(const et_conv_dims *d, int count, const float *x, const float *g, float *dx) {
    const size_t HW = (size_t)d->in_h * d->in_w, S = out_positions(d);
    float best[POOL_CHUNK];
    int32_t where[POOL_CHUNK];
    memset(dx, 0, (size_t)count * in_size(d) * sizeof(float));
    for (int n = 0; n < count; n++)
        for (int c = 0; c < d->in_c; c++) {
            const size_t off = (size_t)n * in_size(d) + (size_t)c * HW;
            const float *gc = g + (size_t)n * out_size(d) + (size_t)c * S;
            for (int oy = 0; oy < d->out_h; oy++)
                for (int a = 0; a < d->out_w; a += POOL_CHUNK) {
                    const int b = a + POOL_CHUNK < d->out_w ? a + POOL_CHUNK : d->out_w;
                    max_row(d, x + off, oy, a, b, best, where);
                    const float *gr = gc + (size_t)oy * d->out_w + a;
                    for (int t = 0; t < b - a; t++)
                        if (where[t] >= 0) dx[off + (size_t)where[t]] += gr[t];
                }
        }
}

void et_avgpool_forward(const et_conv_dims *d, int count, const float *x, int ldx, float *z, int ldz) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, sw = d->stride_w;
    const size_t HW = (size_t)H * W, S = out_positions(d);
    const float window = (float)taps(d);
    for (int n = 0; n < count; n++)
        for (int c = 0; c < d->in_c; c++) {
            const float *xc = x + (size_t)n * ldx + (size_t)c * HW;
            float *zc = z + (size_t)n * ldz + (size_t)c * S;
            for (int oy = 0; oy < OH; oy++) {
                float *zr = zc + (size_t)oy * OW;
                for (int ox = 0; ox < OW; ox++) zr[ox] = 0.0f;
                for (int i = 0; i < d->kernel_h; i++) {
                    int ylo, yhi;
                    valid_span(H, OH, d->stride_h, d->pad_h, i, &ylo, &yhi);
                    if (oy < ylo || oy >= yhi) continue;
                    const float *xr = xc + (size_t)(oy * d->stride_h - d->pad_h + i) * W;
                    for (int j = 0; j < d->kernel_w; j++) {
                        int xlo, xhi;
                        valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                        for (int ox = xlo; ox < xhi; ox++) zr[ox] += xr[ox * sw + j - d->pad_w];
                    }
                }
                for (int ox = 0; ox < OW; ox++) zr[ox] /= window; /* zero padding counted */
            }
        }
}

void et_avgpool_input_grad(const et_conv_dims *d, int count, const float *g, float *dx) {
    const int H = d->in_h, W = d->in_w, OH = d->out_h, OW = d->out_w, sw = d->stride_w;
    const size_t HW = (size_t)H * W, S = out_positions(d);
    const float window = (float)taps(d);
    memset(dx, 0, (size_t)count * in_size(d) * sizeof(float));
    for (int n = 0; n < count; n++)
        for (int c = 0; c < d->in_c; c++) {
            float *dc = dx + (size_t)n * in_size(d) + (size_t)c * HW;
            const float *gc = g + (size_t)n * out_size(d) + (size_t)c * S;
            for (int oy = 0; oy < OH; oy++) {
                const float *gr = gc + (size_t)oy * OW;
                for (int i = 0; i < d->kernel_h; i++) {
                    int ylo, yhi;
                    valid_span(H, OH, d->stride_h, d->pad_h, i, &ylo, &yhi);
                    if (oy < ylo || oy >= yhi) continue;
                    float *dr = dc + (size_t)(oy * d->stride_h - d->pad_h + i) * W;
                    for (int j = 0; j < d->kernel_w; j++) {
                        int xlo, xhi;
                        valid_span(W, OW, sw, d->pad_w, j, &xlo, &xhi);
                        for (int ox = xlo; ox < xhi; ox++) dr[ox * sw + j - d->pad_w] += gr[ox] / window;
                    }
                }
            }
        }
}

void et_gap_forward(const et_conv_dims *d, int count, const float *x, int ldx, float *z, int ldz) {
    const size_t HW = (size_t)d->in_h * d->in_w;
    for (int n = 0; n < count; n++)
        for (int c = 0; c < d->in_c; c++) {
            const float *xc = x + (size_t)n * ldx + (size_t)c * HW;
            float s = 0.0f;
            for (size_t i = 0; i < HW; i++) s += xc[i];
            z[(size_t)n * ldz + c] = s / (float)HW;
        }
}

void et_gap_input_grad(const et_conv_dims *d, int count, const float *g, float *dx) {
    const size_t HW = (size_t)d->in_h * d->in_w;
    for (int n = 0; n < count; n++)
        for (int c = 0; c < d->in_c; c++) {
            float *dc = dx + (size_t)n * in_size(d) + (size_t)c * HW;
            const float v = g[(size_t)n * d->in_c + c] / (float)HW;
            for (size_t i = 0; i < HW; i++) dc[i] = v;
        }
}
