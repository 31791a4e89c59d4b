/* OS-ELM in portable C99: see et_oselm.h for the layout and the numerics. */
#include "et_oselm.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "et_core.h"
#include "et_kernels.h"

#define ET_OSELM_ALIGN 16

/*
 * The two products of every sample (the hidden layer W x, the residual z - beta' h) run
 * through the kernels below, compiled as et_kernels.c's hot loops are: twice on x86-64 Linux
 * with GCC (baseline and x86-64-v3, picked at load time), once elsewhere; written with 8-float
 * vector types under GCC/Clang (AVX, SSE pairs, NEON pairs or scalars on a microcontroller).
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(ET_NO_CLONES)
#define OSELM_HOT __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define OSELM_HOT
#endif
#if defined(__GNUC__) && !defined(ET_PLAIN_C)
#define OSELM_VECTOR 1
typedef float oselm_v8 __attribute__((vector_size(32)));
static float hsum8(oselm_v8 v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }
#endif

/* y[j] = A_j . x for the L rows A_j (n floats each): four rows share each load of x. */
OSELM_HOT static void rows_dot(int32_t L, int32_t n, const float *A, const float *x, float *y) {
    int32_t j = 0;
#ifdef OSELM_VECTOR
    for (; j + 4 <= L; j += 4) {
        const float *a0 = A + (size_t)j * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        oselm_v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0}, xa, xb, v;
        int32_t i = 0;
        for (; i + 16 <= n; i += 16) {  /* memcpy: unaligned loads */
            memcpy(&xa, x + i, sizeof xa);
            memcpy(&xb, x + i + 8, sizeof xb);
            memcpy(&v, a0 + i, sizeof v); s0 += v * xa;
            memcpy(&v, a0 + i + 8, sizeof v); t0 += v * xb;
            memcpy(&v, a1 + i, sizeof v); s1 += v * xa;
            memcpy(&v, a1 + i + 8, sizeof v); t1 += v * xb;
            memcpy(&v, a2 + i, sizeof v); s2 += v * xa;
            memcpy(&v, a2 + i + 8, sizeof v); t2 += v * xb;
            memcpy(&v, a3 + i, sizeof v); s3 += v * xa;
            memcpy(&v, a3 + i + 8, sizeof v); t3 += v * xb;
        }
        float r0 = hsum8(s0 + t0), r1 = hsum8(s1 + t1), r2 = hsum8(s2 + t2), r3 = hsum8(s3 + t3);
        for (; i < n; i++) {
            r0 += a0[i] * x[i];
            r1 += a1[i] * x[i];
            r2 += a2[i] * x[i];
            r3 += a3[i] * x[i];
        }
        y[j] = r0;
        y[j + 1] = r1;
        y[j + 2] = r2;
        y[j + 3] = r3;
    }
#endif
    for (; j < L; j++) y[j] = et_dot(A + (size_t)j * n, x, n);
}

/* The same residual with a pending rank-1 update beta += k p' applied on the way (the
 * detector's stream learns a sample and scores the next one in one pass over beta). */
OSELM_HOT static float residual_pending(int32_t L, int32_t m, float *beta, const float *h, const float *t, float *e,
                                        const float *k, const float *p) {
    int32_t q = 0;
    float ss = 0.0f;
#ifdef OSELM_VECTOR
    oselm_v8 sq = {0};
    for (; q + 32 <= m; q += 32) {
        oselm_v8 a0, a1, a2, a3, p0, p1, p2, p3, v;
        memcpy(&a0, t + q, sizeof a0);
        memcpy(&a1, t + q + 8, sizeof a1);
        memcpy(&a2, t + q + 16, sizeof a2);
        memcpy(&a3, t + q + 24, sizeof a3);
        memcpy(&p0, p + q, sizeof p0);
        memcpy(&p1, p + q + 8, sizeof p1);
        memcpy(&p2, p + q + 16, sizeof p2);
        memcpy(&p3, p + q + 24, sizeof p3);
        for (int32_t j = 0; j < L; j++) {
            float *b = beta + (size_t)j * m + q;
            const float hj = h[j], kj = k[j];
            memcpy(&v, b, sizeof v); v += kj * p0; memcpy(b, &v, sizeof v); a0 -= hj * v;
            memcpy(&v, b + 8, sizeof v); v += kj * p1; memcpy(b + 8, &v, sizeof v); a1 -= hj * v;
            memcpy(&v, b + 16, sizeof v); v += kj * p2; memcpy(b + 16, &v, sizeof v); a2 -= hj * v;
            memcpy(&v, b + 24, sizeof v); v += kj * p3; memcpy(b + 24, &v, sizeof v); a3 -= hj * v;
        }
        memcpy(e + q, &a0, sizeof a0);
        memcpy(e + q + 8, &a1, sizeof a1);
        memcpy(e + q + 16, &a2, sizeof a2);
        memcpy(e + q + 24, &a3, sizeof a3);
        sq += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
    }
    ss = hsum8(sq);
#endif
    for (; q < m; q++) {
        float acc = t[q];
        for (int32_t j = 0; j < L; j++) {
            float *b = beta + (size_t)j * m + q;
            *b += k[j] * p[q];
            acc -= h[j] * *b;
        }
        e[q] = acc;
        ss += acc * acc;
    }
    return ss;
}

/* e = t - beta' h (beta: L rows of m), returns sum e^2: a block of output columns stays in
 * registers while the L rows pass by, so e is written once, not L times. */
OSELM_HOT static float residual(int32_t L, int32_t m, const float *beta, const float *h, const float *t, float *e) {
    int32_t q = 0;
    float ss = 0.0f;
#ifdef OSELM_VECTOR
    oselm_v8 sq = {0};
    for (; q + 32 <= m; q += 32) {
        oselm_v8 a0, a1, a2, a3, v;
        memcpy(&a0, t + q, sizeof a0);
        memcpy(&a1, t + q + 8, sizeof a1);
        memcpy(&a2, t + q + 16, sizeof a2);
        memcpy(&a3, t + q + 24, sizeof a3);
        for (int32_t j = 0; j < L; j++) {
            const float *b = beta + (size_t)j * m + q;
            const float hj = h[j];
            memcpy(&v, b, sizeof v); a0 -= hj * v;
            memcpy(&v, b + 8, sizeof v); a1 -= hj * v;
            memcpy(&v, b + 16, sizeof v); a2 -= hj * v;
            memcpy(&v, b + 24, sizeof v); a3 -= hj * v;
        }
        memcpy(e + q, &a0, sizeof a0);
        memcpy(e + q + 8, &a1, sizeof a1);
        memcpy(e + q + 16, &a2, sizeof a2);
        memcpy(e + q + 24, &a3, sizeof a3);
        sq += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
    }
    ss = hsum8(sq);
#endif
    for (; q < m; q++) {
        float acc = t[q];
        for (int32_t j = 0; j < L; j++) acc -= h[j] * beta[(size_t)j * m + q];
        e[q] = acc;
        ss += acc * acc;
    }
    return ss;
}

static size_t align_up(size_t v) { return (v + ET_OSELM_ALIGN - 1) / ET_OSELM_ALIGN * ET_OSELM_ALIGN; }

static int valid_config(const et_oselm_config *c) {
    if (!c) return 0;
    if (c->n_inputs < 1 || c->n_hidden < 1 || c->n_outputs < 1) return 0;
    if (c->n_inputs > (1 << 20) || c->n_hidden > 4096 || c->n_outputs > (1 << 20)) return 0;
    if ((int64_t)c->n_hidden * c->n_inputs + c->n_hidden > (int64_t)UINT32_MAX) return 0;
    if (c->activation < ET_OSELM_SIGMOID || c->activation > ET_OSELM_IDENTITY) return 0;
    if (c->symmetrize_every < 1 || (c->keep_weights != 0 && c->keep_weights != 1)) return 0;
    if (!(c->delta > 0.0f) || !isfinite(c->delta)) return 0;
    if (!(c->forgetting > 0.0f) || !(c->forgetting <= 1.0f)) return 0;
    return 1;
}

/* Offsets (in floats) of the arrays after the header. */
typedef struct layout { size_t P, beta, h, ph, k, e, y, W, end; } layout;

static layout layout_of(const et_oselm_config *c) {
    layout o;
    size_t L = (size_t)c->n_hidden, m = (size_t)c->n_outputs, n = (size_t)c->n_inputs;
    size_t head = align_up(sizeof(et_oselm_header)) / sizeof(float);
    o.P = head;
    o.beta = o.P + L * L;
    o.h = o.beta + L * m;
    o.ph = o.h + L;
    o.k = o.ph + L;
    o.e = o.k + L;
    o.y = o.e + m;
    o.W = o.y + m;
    o.end = o.W + (c->keep_weights ? L * n : 0);
    return o;
}

size_t et_oselm_state_size(const et_oselm_config *cfg) {
    if (!valid_config(cfg)) return 0;
    return align_up(layout_of(cfg).end * sizeof(float));
}

static uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

float et_oselm_uniform(uint32_t seed, uint32_t i) {
    uint32_t z = hash32(hash32(seed) + i);
    return (float)(z >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

static et_oselm_header *head_of(void *buf) { return (et_oselm_header *)buf; }
static float *f_of(void *buf) { return (float *)buf; }

int et_oselm_check(const void *buf, size_t bytes) {
    const et_oselm_header *hd = (const et_oselm_header *)buf;
    if (!buf || bytes < sizeof(et_oselm_header)) return ET_ERR_ARGUMENT;
    if (hd->magic != ET_OSELM_MAGIC || hd->version != ET_OSELM_VERSION) return ET_ERR_UNSUPPORTED;
    if (!valid_config(&hd->cfg)) return ET_ERR_ARGUMENT;
    if (hd->total_bytes != et_oselm_state_size(&hd->cfg) || bytes < hd->total_bytes) return ET_ERR_WORKSPACE;
    return ET_OK;
}

int et_oselm_init(void *buf, size_t bytes, const et_oselm_config *cfg) {
    size_t need = et_oselm_state_size(cfg);
    if (!buf || need == 0) return ET_ERR_ARGUMENT;
    if (bytes < need) return ET_ERR_WORKSPACE;
    memset(buf, 0, need);
    et_oselm_header *hd = head_of(buf);
    hd->magic = ET_OSELM_MAGIC;
    hd->version = ET_OSELM_VERSION;
    hd->cfg = *cfg;
    hd->total_bytes = need;
    layout o = layout_of(cfg);
    float *s = f_of(buf);
    int32_t L = cfg->n_hidden;
    for (int32_t i = 0; i < L; i++) s[o.P + (size_t)i * L + i] = 1.0f / cfg->delta;
    if (cfg->keep_weights) {
        float scale = sqrtf(3.0f / (float)cfg->n_inputs);
        size_t nw = (size_t)L * cfg->n_inputs;
        for (size_t i = 0; i < nw; i++) s[o.W + i] = scale * et_oselm_uniform(cfg->seed, (uint32_t)i);
    }
    return ET_OK;
}

float *et_oselm_P(void *buf) { return f_of(buf) + layout_of(&head_of(buf)->cfg).P; }
float *et_oselm_beta(void *buf) { return f_of(buf) + layout_of(&head_of(buf)->cfg).beta; }

/*
 * The logistic function 1 / (1 + e^-z) without a libm call, so that the loop over the hidden
 * units vectorises: e^y = 2^k e^r with k = round(y / ln 2), |r| <= ln 2 / 2, e^r by Cephes'
 * expf polynomial (about 1 ulp), 2^k put into the exponent bits. Within 2e-7 of the libm
 * value; beyond |z| > 87 it saturates to 0 or 1 as the exact function does in float.
 */
OSELM_HOT static void sigmoid_rows(int32_t L, float *h) {
    for (int32_t j = 0; j < L; j++) {
        float y = -h[j];
        y = y > 87.0f ? 87.0f : (y < -87.0f ? -87.0f : y);
        float kf = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
        float r = (y - kf * 0.693359375f) - kf * -2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        union { int32_t i; float f; } two_k;
        two_k.i = ((int32_t)kf + 127) << 23;
        h[j] = 1.0f / (1.0f + p * two_k.f);
    }
}

static float activate(float z, int32_t act) {
    switch (act) {
    case ET_OSELM_SIGMOID: return 0.5f * (1.0f + tanhf(0.5f * z));
    case ET_OSELM_TANH: return tanhf(z);
    case ET_OSELM_RELU: return z > 0.0f ? z : 0.0f;
    default: return z;
    }
}

int et_oselm_hidden(void *buf, const float *x, float *h) {
    if (!buf || !x || !h) return ET_ERR_ARGUMENT;
    const et_oselm_config *c = &head_of(buf)->cfg;
    layout o = layout_of(c);
    const float *s = f_of(buf);
    int32_t n = c->n_inputs, L = c->n_hidden;
    float scale = sqrtf(3.0f / (float)n);
    uint32_t key = hash32(c->seed);
    if (c->keep_weights) rows_dot(L, n, s + o.W, x, h);
    for (int32_t j = 0; j < L; j++) {
        float acc = 0.0f;
        if (c->keep_weights) {
            acc = h[j];  /* W x, computed below for all rows at once */
        } else {
            uint32_t base = (uint32_t)j * (uint32_t)n;
            for (int32_t i = 0; i < n; i++) {
                uint32_t z = hash32(key + base + (uint32_t)i);
                acc += (scale * ((float)(z >> 8) * (1.0f / 8388608.0f) - 1.0f)) * x[i];
            }
        }
        float b = et_oselm_uniform(c->seed, (uint32_t)L * (uint32_t)n + (uint32_t)j);
        h[j] = c->activation == ET_OSELM_SIGMOID ? acc + b : activate(acc + b, c->activation);
    }
    if (c->activation == ET_OSELM_SIGMOID) sigmoid_rows(L, h);
    return ET_OK;
}

static void output(const et_oselm_config *c, const float *beta, const float *h, float *y) {
    int32_t L = c->n_hidden, m = c->n_outputs;
    for (int32_t q = 0; q < m; q++) y[q] = 0.0f;
    for (int32_t j = 0; j < L; j++) et_axpy(m, h[j], beta + (size_t)j * m, y);
}

int et_oselm_predict(void *buf, const float *x, float *y) {
    if (!buf || !x || !y) return ET_ERR_ARGUMENT;
    const et_oselm_config *c = &head_of(buf)->cfg;
    layout o = layout_of(c);
    float *s = f_of(buf);
    int rc = et_oselm_hidden(buf, x, s + o.h);
    if (rc) return rc;
    output(c, s + o.beta, s + o.h, y);
    return ET_OK;
}

static int refuse(et_oselm_header *hd) {
    hd->n_refused++;
    return ET_OSELM_REFUSED;
}

/* The RLS step from hidden vector h and the output error e = t - beta' h (held in the state's
 * e scratch on entry; the autoencoder stream has it from scoring, so it is not computed twice). */
static int update_with_error_defer(void *buf, const float *h, int defer, float *pend, int32_t *has_pend);

static int update_with_error(void *buf, const float *h) { return update_with_error_defer(buf, h, 0, NULL, NULL); }

/* P's rank-1 step P -= pk pph' applied row by row on the way to ph = P h. */
OSELM_HOT static void rank1_rows_dot(int32_t L, float *P, const float *pk, const float *pph, const float *h, float *ph) {
    for (int32_t i = 0; i < L; i++) {
        float *row = P + (size_t)i * L;
        const float ki = pk[i];
        int32_t j = 0;
        float acc = 0.0f;
#ifdef OSELM_VECTOR
        oselm_v8 s0 = {0}, s1 = {0}, v, w, x;
        for (; j + 16 <= L; j += 16) {
            memcpy(&v, row + j, sizeof v);
            memcpy(&w, pph + j, sizeof w);
            memcpy(&x, h + j, sizeof x);
            v -= ki * w;
            memcpy(row + j, &v, sizeof v);
            s0 += v * x;
            memcpy(&v, row + j + 8, sizeof v);
            memcpy(&w, pph + j + 8, sizeof w);
            memcpy(&x, h + j + 8, sizeof x);
            v -= ki * w;
            memcpy(row + j + 8, &v, sizeof v);
            s1 += v * x;
        }
        acc = hsum8(s0 + s1);
#endif
        for (; j < L; j++) {
            row[j] -= ki * pph[j];
            acc += row[j] * h[j];
        }
        ph[i] = acc;
    }
}

static void flush_pending_P(void *buf, float *pend, int32_t *has_pend) {
    if (!*has_pend) return;
    const et_oselm_config *c = &head_of(buf)->cfg;
    int32_t L = c->n_hidden;
    float *P = f_of(buf) + layout_of(c).P;
    for (int32_t i = 0; i < L; i++) et_axpy(L, -pend[i], pend + L, P + (size_t)i * L);
    *has_pend = 0;
}

/* With defer (and no forgetting), beta's rank-1 step beta += k e' is left to the caller: k
 * stays in the state's k scratch and e is copied to its y scratch; ET_OK + 100 says so. With
 * pend (2 L floats) too, P's step P -= k ph' waits there (*has_pend = 1) for the next update of
 * this state, which applies it while it computes P h (not when P is symmetrised). */
static int update_with_error_defer(void *buf, const float *h, int defer, float *pend, int32_t *has_pend) {
    et_oselm_header *hd = head_of(buf);
    const et_oselm_config *c = &hd->cfg;
    layout o = layout_of(c);
    float *s = f_of(buf);
    float *P = s + o.P, *beta = s + o.beta, *ph = s + o.ph, *k = s + o.k, *e = s + o.e;
    int32_t L = c->n_hidden, m = c->n_outputs;
    float lam = c->forgetting;
    for (int32_t j = 0; j < L; j++) if (!isfinite(h[j])) return refuse(hd);
    /* ph = P h (P symmetric: row j of P times h), denom = lam + h' P h */
    double denom = lam;
    float pmax = 0.0f;
    if (pend && *has_pend) {
        rank1_rows_dot(L, P, pend, pend + L, h, ph);
        *has_pend = 0;
    } else {
        rows_dot(L, L, P, h, ph);
    }
    for (int32_t i = 0; i < L; i++) {
        denom += (double)h[i] * ph[i];
        if (P[(size_t)i * L + i] > pmax) pmax = P[(size_t)i * L + i];
    }
    /* beyond float range the gain k would underflow to 0: the sample would be "learned" as nothing */
    if (!isfinite(denom) || !(denom > 0.0) || denom > (double)FLT_MAX) return refuse(hd);
    float inv = (float)(1.0 / denom), kmax = 0.0f, phmax = 0.0f;
    for (int32_t i = 0; i < L; i++) {
        k[i] = ph[i] * inv;
        if (!isfinite(k[i]) || !isfinite(ph[i])) return refuse(hd);
        if (fabsf(k[i]) > kmax) kmax = fabsf(k[i]);
        if (fabsf(ph[i]) > phmax) phmax = fabsf(ph[i]);
    }
    float emax = 0.0f;
    for (int32_t q = 0; q < m; q++) {
        if (!isfinite(e[q])) return refuse(hd);
        if (fabsf(e[q]) > emax) emax = fabsf(e[q]);
    }
    /* |P_ij| <= max diagonal (P is SPD): the update cannot overflow below these bounds */
    const float big = 1e30f;
    if (pmax > big || kmax * phmax > big || kmax * emax > big) return refuse(hd);
    for (int32_t i = 0; i < L; i++)  /* the new diagonal must stay positive */
        if (!((P[(size_t)i * L + i] - k[i] * ph[i]) > 0.0f)) return refuse(hd);
    /* commit */
    defer = defer && !(lam < 1.0f);
    if (defer) memcpy(s + o.y, e, (size_t)m * sizeof(float));
    else for (int32_t i = 0; i < L; i++) et_axpy(m, k[i], e, beta + (size_t)i * m);
    float il = 1.0f / lam;
    int defer_P = defer && pend && (hd->n_updates + 1) % c->symmetrize_every != 0;
    if (defer_P) {
        memcpy(pend, k, (size_t)L * sizeof(float));
        memcpy(pend + L, ph, (size_t)L * sizeof(float));
        *has_pend = 1;
    } else {
        for (int32_t i = 0; i < L; i++) {
            float *row = P + (size_t)i * L;
            et_axpy(L, -k[i], ph, row);
            if (lam < 1.0f) for (int32_t j = 0; j < L; j++) row[j] *= il;
        }
    }
    if (lam < 1.0f) {  /* keep the regularisation alive: R += c e_j e_j' */
        int32_t jj = (int32_t)(hd->n_updates % L);
        float cc = (float)L * (1.0f - lam) * c->delta;
        for (int32_t i = 0; i < L; i++) ph[i] = P[(size_t)i * L + jj];  /* column jj (reuses ph) */
        float g = cc / (1.0f + cc * ph[jj]);
        for (int32_t i = 0; i < L; i++) et_axpy(L, -g * ph[i], ph, P + (size_t)i * L);
        const float *bj = beta + (size_t)jj * m;
        for (int32_t q = 0; q < m; q++) e[q] = bj[q];
        for (int32_t i = 0; i < L; i++) et_axpy(m, -g * ph[i], e, beta + (size_t)i * m);
    }
    hd->n_updates++;
    if (hd->n_updates % c->symmetrize_every == 0) {
        for (int32_t i = 0; i < L; i++)
            for (int32_t j = i + 1; j < L; j++) {
                float v = 0.5f * (P[(size_t)i * L + j] + P[(size_t)j * L + i]);
                P[(size_t)i * L + j] = v;
                P[(size_t)j * L + i] = v;
            }
    }
    return defer ? ET_OK + 100 : ET_OK;
}

int et_oselm_update_hidden(void *buf, const float *h, const float *t) {
    if (!buf || !h || !t) return ET_ERR_ARGUMENT;
    et_oselm_header *hd = head_of(buf);
    const et_oselm_config *c = &hd->cfg;
    float *e = f_of(buf) + layout_of(c).e;
    for (int32_t q = 0; q < c->n_outputs; q++) if (!isfinite(t[q])) return refuse(hd);
    output(c, et_oselm_beta(buf), h, e);                 /* e = t - beta' h */
    for (int32_t q = 0; q < c->n_outputs; q++) e[q] = t[q] - e[q];
    return update_with_error(buf, h);
}

int et_oselm_update(void *buf, const float *x, const float *t) {
    if (!buf || !x || !t) return ET_ERR_ARGUMENT;
    et_oselm_header *hd = head_of(buf);
    layout o = layout_of(&hd->cfg);
    float *h = f_of(buf) + o.h;
    for (int32_t i = 0; i < hd->cfg.n_inputs; i++) if (!isfinite(x[i])) return refuse(hd);
    int rc = et_oselm_hidden(buf, x, h);
    if (rc) return rc;
    return et_oselm_update_hidden(buf, h, t);
}

int et_oselm_ae_stream(void *buf, const float *z, int32_t n_samples, float learn_below_err,
                       float *err, int32_t *learned) {
    if (!buf || !z || !err || n_samples < 0) return ET_ERR_ARGUMENT;
    et_oselm_header *hd = head_of(buf);
    const et_oselm_config *c = &hd->cfg;
    if (c->n_inputs != c->n_outputs) return ET_ERR_UNSUPPORTED;
    layout o = layout_of(c);
    float *s = f_of(buf);
    int32_t n = c->n_inputs;
    for (int32_t r = 0; r < n_samples; r++) {
        const float *x = z + (size_t)r * n;
        int finite = 1;
        for (int32_t i = 0; i < n; i++) if (!isfinite(x[i])) { finite = 0; break; }
        if (!finite) {
            err[r] = NAN;
            hd->n_refused++;
            if (learned) learned[r] = 2;
            continue;
        }
        et_oselm_hidden(buf, x, s + o.h);
        /* the error the update needs, too */
        err[r] = residual(c->n_hidden, n, s + o.beta, s + o.h, x, s + o.e) / (float)n;
        int got = 0;
        if (err[r] <= learn_below_err) got = update_with_error(buf, s + o.h) == ET_OK ? 1 : 2;
        if (learned) learned[r] = got;
    }
    return ET_OK;
}

uint32_t et_oselm_checksum(const void *buf) {
    const et_oselm_header *hd = (const et_oselm_header *)buf;
    const unsigned char *p = (const unsigned char *)buf;
    uint32_t hsh = 2166136261u;
    for (size_t i = 8; i < (size_t)hd->total_bytes; i++) {
        hsh ^= p[i];
        hsh *= 16777619u;
    }
    return hsh;
}

/* ------------------------------------------------------------------ the detector's stream */
size_t et_oselm_drift_size(void) { return sizeof(et_oselm_drift); }

int et_oselm_drift_update(et_oselm_drift *d, double x) {
    if (!isfinite(x)) return 0;  /* a non-finite score is not evidence of anything */
    if (x > d->clip) x = d->clip;
    d->n++;
    d->mean += (x - d->mean) / (double)d->n;
    d->sum += x - d->mean - d->delta;
    if (d->sum < d->min_sum) d->min_sum = d->sum;
    if (d->n >= d->min_samples && d->sum - d->min_sum > d->threshold) {
        d->n_detections++;
        d->n = 0;
        d->mean = d->sum = d->min_sum = 0.0;
        return 1;
    }
    return 0;
}

/* The autoencoder's score of z: h and e = z - beta' h left in the state's scratch (the
 * update reads them), the mean squared error returned. */
static float ae_score(void *buf, const float *z, int pending) {
    const et_oselm_config *c = &head_of(buf)->cfg;
    layout o = layout_of(c);
    float *s = f_of(buf);
    int32_t n = c->n_inputs;
    float *e = s + o.e;
    et_oselm_hidden(buf, z, s + o.h);
    if (pending) return residual_pending(c->n_hidden, n, s + o.beta, s + o.h, z, e, s + o.k, s + o.y) / (float)n;
    return residual(c->n_hidden, n, s + o.beta, s + o.h, z, e) / (float)n;
}

int32_t et_oselm_detect_stream(void *const *states, int32_t n_env, const float *mean, const float *inv_std,
                               const double *threshold, const float *xs, int32_t n_samples, double learn_below,
                               et_oselm_drift *drift, int32_t stop_on_drift, float *zbuf,
                               double *ratio, int32_t *env, int32_t *flags) {
    if (!states || n_env < 1 || !mean || !inv_std || !threshold || !xs || n_samples < 0 || !drift || !zbuf
        || !ratio || !env || !flags)
        return ET_ERR_ARGUMENT;
    int32_t n = head_of(states[0])->cfg.n_inputs, L0 = head_of(states[0])->cfg.n_hidden;
    if (n_env > ET_DETECT_MAX_ENV) return ET_ERR_ARGUMENT;
    int32_t has_pend[ET_DETECT_MAX_ENV];
    for (int32_t k = 0; k < n_env; k++) {
        const et_oselm_config *c = &head_of(states[k])->cfg;
        if (c->n_inputs != n || c->n_outputs != n || c->n_hidden != L0) return ET_ERR_UNSUPPORTED;
        if (!(threshold[k] > 0.0)) return ET_ERR_ARGUMENT;
        has_pend[k] = 0;
    }
    const size_t zw = (size_t)n + 2 * (size_t)L0;  /* per environment: z, then P's pending step */
    int32_t pending = -1;  /* the environment whose beta step waits for the next sample's pass */
    int32_t r = 0;
    for (; r < n_samples; r++) {
        const float *x = xs + (size_t)r * n;
        int finite = 1;
        for (int32_t i = 0; i < n; i++) if (!isfinite(x[i])) { finite = 0; break; }
        if (!finite) {
            ratio[r] = NAN;
            env[r] = -1;
            flags[r] = ET_DETECT_REFUSED;
            continue;
        }
        double best = INFINITY;
        int32_t kb = 0;
        for (int32_t k = 0; k < n_env; k++) {
            float *z = zbuf + (size_t)k * zw;
            const float *mu = mean + (size_t)k * n, *is = inv_std + (size_t)k * n;
            for (int32_t i = 0; i < n; i++) z[i] = (x[i] - mu[i]) * is[i];
            double q = (double)ae_score(states[k], z, k == pending) / threshold[k];
            if (q < best || (k == 0)) { best = q; kb = k; }
        }
        pending = -1;
        ratio[r] = best;
        env[r] = kb;
        int32_t f = best > 1.0 ? ET_DETECT_ALARM : 0;
        if (et_oselm_drift_update(drift, best)) {
            flags[r] = f | ET_DETECT_DRIFT;
            if (stop_on_drift) { r++; break; }
            continue;
        }
        if (best <= learn_below) {
            void *st = states[kb];
            int rc = update_with_error_defer(st, f_of(st) + layout_of(&head_of(st)->cfg).h, 1,
                                             zbuf + (size_t)kb * zw + n, &has_pend[kb]);
            if (rc == ET_OK + 100) pending = kb;
            f |= rc == ET_OK || rc == ET_OK + 100 ? ET_DETECT_LEARNED : ET_DETECT_UPDATE_REFUSED;
        }
        flags[r] = f;
    }
    if (pending >= 0) {  /* the last learned sample's beta step: the state is whole on return */
        void *st = states[pending];
        const et_oselm_config *c = &head_of(st)->cfg;
        layout o = layout_of(c);
        float *s = f_of(st);
        for (int32_t i = 0; i < c->n_hidden; i++) et_axpy(c->n_outputs, s[o.k + i], s + o.y, s + o.beta + (size_t)i * c->n_outputs);
    }
    for (int32_t k = 0; k < n_env; k++) flush_pending_P(states[k], zbuf + (size_t)k * zw + n, &has_pend[k]);
    return r;
}
