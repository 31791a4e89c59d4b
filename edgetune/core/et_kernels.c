/* Numeric kernels: see et_kernels.h. */
#include "et_kernels.h"
#include "et_core.h"

#include <math.h>
#include <string.h>

/*
 * On x86-64 Linux with GCC the hot loops are compiled twice, for the x86-64 baseline and
 * for x86-64-v3 (AVX2 + FMA), and the loader picks one for the machine at run time. The
 * code is the same plain C; elsewhere (ARM, other compilers) it is compiled once. Every
 * build has -ffp-contract=off, so no clone fuses a multiply-add and all give the same bits.
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(ET_NO_CLONES)
#define ET_HOT __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define ET_HOT
#endif

#define NR 16 /* columns of C held in registers by the product kernel */

/* Small helpers inlined into their callers (vector values never cross a call). */
#if defined(__GNUC__)
#define ET_INLINE static inline __attribute__((always_inline))
#else
#define ET_INLINE static inline
#endif


/*
 * Two kernels (a dot product, a weighted sum of rows) reduce across a loop, which compilers
 * vectorise poorly from plain C. With GCC or Clang they are written with 8-float vector
 * types (the compiler maps them to AVX, SSE pairs, NEON pairs, or scalars on a
 * microcontroller); elsewhere the plain loops below are used.
 */
#if defined(__GNUC__) && !defined(ET_PLAIN_C)
#define ET_VECTOR 1
typedef float et_v8 __attribute__((vector_size(32)));
#endif

/*
 * C (M, N) = [C +] A B, where A's element (i, k) is A[i * sai + k * sak] (A or A^T, any
 * strides) and B is (K, N) row-major. Four rows of C times a 16-column panel accumulate
 * in registers over the whole of K; the narrower last panel and the last rows go row by row.
 */
/*
 * Columns j0..N-1 (fewer than 16) of one row of C: a dot product per column, with four
 * partial sums in registers (an accumulator in memory would chain every step through a
 * store and a load).
 */
ET_HOT static void narrow_columns(int j0, int N, int K, const float *a, int sak, const float *B, int ldb,
                                  float *c, int accumulate) {
    for (int j = j0; j < N; j++) {
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        int k = 0;
        for (; k + 4 <= K; k += 4) {
            s0 += a[(size_t)k * sak] * B[(size_t)k * ldb + j];
            s1 += a[(size_t)(k + 1) * sak] * B[(size_t)(k + 1) * ldb + j];
            s2 += a[(size_t)(k + 2) * sak] * B[(size_t)(k + 2) * ldb + j];
            s3 += a[(size_t)(k + 3) * sak] * B[(size_t)(k + 3) * ldb + j];
        }
        for (; k < K; k++) s0 += a[(size_t)k * sak] * B[(size_t)k * ldb + j];
        const float d = (s0 + s1) + (s2 + s3);
        c[j] = accumulate ? c[j] + d : d;
    }
}

ET_HOT static void gemm_kernel(int M, int N, int K, const float *A, int sai, int sak, const float *B, int ldb,
                               float *C, int ldc, int accumulate) {
    int i0 = 0;
    for (; i0 + 4 <= M; i0 += 4) {
        const float *a0 = A + (size_t)i0 * sai, *a1 = a0 + sai, *a2 = a1 + sai, *a3 = a2 + sai;
        float *c0 = C + (size_t)i0 * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
        int j0 = 0;
        for (; j0 + NR <= N; j0 += NR) {
            float s0[NR], s1[NR], s2[NR], s3[NR];
            for (int j = 0; j < NR; j++) s0[j] = s1[j] = s2[j] = s3[j] = 0.0f;
            for (int k = 0; k < K; k++) {
                const float *b = B + (size_t)k * ldb + j0;
                const size_t ak = (size_t)k * sak;
                const float x0 = a0[ak], x1 = a1[ak], x2 = a2[ak], x3 = a3[ak];
                for (int j = 0; j < NR; j++) {
                    s0[j] += x0 * b[j];
                    s1[j] += x1 * b[j];
                    s2[j] += x2 * b[j];
                    s3[j] += x3 * b[j];
                }
            }
            if (accumulate) {
                for (int j = 0; j < NR; j++) {
                    c0[j0 + j] += s0[j]; c1[j0 + j] += s1[j]; c2[j0 + j] += s2[j]; c3[j0 + j] += s3[j];
                }
            } else {
                for (int j = 0; j < NR; j++) {
                    c0[j0 + j] = s0[j]; c1[j0 + j] = s1[j]; c2[j0 + j] = s2[j]; c3[j0 + j] = s3[j];
                }
            }
        }
        for (int r = 0; j0 < N && r < 4; r++) narrow_columns(j0, N, K, A + (size_t)(i0 + r) * sai, sak, B, ldb,
                                                             C + (size_t)(i0 + r) * ldc, accumulate);
    }
    for (; i0 < M; i0++) {
        const float *a = A + (size_t)i0 * sai;
        float *c = C + (size_t)i0 * ldc;
        int j0 = 0;
        if (N >= NR) { /* one row: 16-wide row updates, the row kept in cache */
            if (!accumulate) for (int j = 0; j < N; j++) c[j] = 0.0f;
            j0 = N / NR * NR;
            for (int k = 0; k < K; k++) {
                const float x = a[(size_t)k * sak];
                const float *b = B + (size_t)k * ldb;
                for (int j = 0; j < j0; j++) c[j] += x * b[j];
            }
        }
        narrow_columns(j0, N, K, a, sak, B, ldb, c, accumulate);
    }
}

void et_gemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate) {
    gemm_kernel(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate);
}

void et_gemm_tn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate) {
    gemm_kernel(M, N, K, A, 1, lda, B, ldb, C, ldc, accumulate);
}

/* A dot product with 16 independent partial sums. */
ET_HOT float et_dot(const float *a, const float *b, int n) {
    int i = 0;
#ifdef ET_VECTOR
    et_v8 s0 = {0}, s1 = {0}, x0, x1, y0, y1;
    for (; i + 16 <= n; i += 16) { /* memcpy: unaligned loads, any alignment of a and b */
        memcpy(&x0, a + i, sizeof x0);
        memcpy(&y0, b + i, sizeof y0);
        memcpy(&x1, a + i + 8, sizeof x1);
        memcpy(&y1, b + i + 8, sizeof y1);
        s0 += x0 * y0;
        s1 += x1 * y1;
    }
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    s0 += s1;
    return (((s0[0] + s0[4]) + (s0[2] + s0[6])) + ((s0[1] + s0[5]) + (s0[3] + s0[7]))) + tail;
#else
    float s[16];
    for (int l = 0; l < 16; l++) s[l] = 0.0f;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) s[l] += a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    for (int l = 0; l < 8; l++) s[l] += s[l + 8];
    return (((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]))) + tail;
#endif
}

ET_HOT void et_axpy(int n, float a, const float *x, float *y) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* out[t] += c0 r0[t] + c1 r1[t] + c2 r2[t] + c3 r3[t] (added in that order), rows of floats or int8. */
ET_INLINE void weighted4(const float *coef, int coef_stride, const void *r0, const void *r1, const void *r2,
                         const void *r3, int i8, int width, float *out) {
    const float c0 = coef[0], c1 = coef[coef_stride], c2 = coef[2 * (size_t)coef_stride],
                c3 = coef[3 * (size_t)coef_stride];
    if (i8) {
        const int8_t *restrict q0 = r0, *restrict q1 = r1, *restrict q2 = r2, *restrict q3 = r3;
        float *restrict o = out;
        for (int t = 0; t < width; t++) {
            float v = o[t];
            v += c0 * (float)q0[t];
            v += c1 * (float)q1[t];
            v += c2 * (float)q2[t];
            v += c3 * (float)q3[t];
            o[t] = v;
        }
    } else {
        const float *restrict f0 = r0, *restrict f1 = r1, *restrict f2 = r2, *restrict f3 = r3;
        float *restrict o = out;
        for (int t = 0; t < width; t++) {
            float v = o[t];
            v += c0 * f0[t];
            v += c1 * f1[t];
            v += c2 * f2[t];
            v += c3 * f3[t];
            o[t] = v;
        }
    }
}

ET_HOT void et_weighted_rows(int count, const float *coef, int coef_stride, const float *const *rows, int offset,
                             int width, float *out) {
    if (count == 4) { /* a block of the fused skip pass */
        weighted4(coef, coef_stride, rows[0] + offset, rows[1] + offset, rows[2] + offset, rows[3] + offset, 0,
                  width, out);
        return;
    }
    int t0 = 0;
    for (; t0 + NR <= width; t0 += NR) { /* 16 outputs in registers while every row passes by */
#ifdef ET_VECTOR
        et_v8 s0, s1, r0, r1;
        memcpy(&s0, out + t0, sizeof s0);
        memcpy(&s1, out + t0 + 8, sizeof s1);
        for (int i = 0; i < count; i++) {
            const float c = coef[(size_t)i * coef_stride];
            memcpy(&r0, rows[i] + offset + t0, sizeof r0);
            memcpy(&r1, rows[i] + offset + t0 + 8, sizeof r1);
            s0 += c * r0;
            s1 += c * r1;
        }
        memcpy(out + t0, &s0, sizeof s0);
        memcpy(out + t0 + 8, &s1, sizeof s1);
#else
        float s[NR];
        for (int l = 0; l < NR; l++) s[l] = out[t0 + l];
        for (int i = 0; i < count; i++) {
            const float c = coef[(size_t)i * coef_stride];
            const float *r = rows[i] + offset + t0;
            for (int l = 0; l < NR; l++) s[l] += c * r[l];
        }
        for (int l = 0; l < NR; l++) out[t0 + l] = s[l];
#endif
    }
    for (int t = t0; t < width; t++) {
        float s = out[t];
        for (int i = 0; i < count; i++) s += coef[(size_t)i * coef_stride] * rows[i][offset + t];
        out[t] = s;
    }
}

#ifdef ET_VECTOR
typedef int32_t et_i4 __attribute__((vector_size(16)));
typedef int32_t et_i8 __attribute__((vector_size(32)));
/*
 * v0, v1 = the 16 int8 values at p (any alignment) as floats. Each group of four bytes is copied
 * into four int32 lanes and each lane shifts its own byte to the top and back (a sign extension):
 * GCC compiles a direct int8 -> float conversion of a vector into scalar code, this into a few
 * vector instructions (AVX2: vpermd, vpsllvd, vpsrad, vcvtdq2ps).
 */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ET_WIDEN_SHIFTS 1
#endif
#endif
ET_INLINE void widen16(et_v8 *v0, et_v8 *v1, const int8_t *p) {
#ifndef ET_WIDEN_SHIFTS /* an older compiler, or big-endian: one value at a time */
    for (int l = 0; l < 8; l++) {
        (*v0)[l] = (float)p[l];
        (*v1)[l] = (float)p[8 + l];
    }
#else
    et_i4 w;
    memcpy(&w, p, sizeof w);
    const et_i8 up = {24, 16, 8, 0, 24, 16, 8, 0};
    et_i8 lo = __builtin_shufflevector(w, w, 0, 0, 0, 0, 1, 1, 1, 1);
    et_i8 hi = __builtin_shufflevector(w, w, 2, 2, 2, 2, 3, 3, 3, 3);
    lo = (lo << up) >> 24;
    hi = (hi << up) >> 24;
    *v0 = __builtin_convertvector(lo, et_v8);
    *v1 = __builtin_convertvector(hi, et_v8);
#endif
}
#endif

ET_HOT void et_weighted_rows_i8(int count, const float *coef, int coef_stride, const int8_t *const *rows,
                                int offset, int width, float *out) {
    if (count == 4) {
        weighted4(coef, coef_stride, rows[0] + offset, rows[1] + offset, rows[2] + offset, rows[3] + offset, 1,
                  width, out);
        return;
    }
    int t0 = 0;
    for (; t0 + NR <= width; t0 += NR) {
#ifdef ET_VECTOR
        et_v8 s0, s1;
        memcpy(&s0, out + t0, sizeof s0);
        memcpy(&s1, out + t0 + 8, sizeof s1);
        for (int i = 0; i < count; i++) {
            const float c = coef[(size_t)i * coef_stride];
            et_v8 r0, r1;
            widen16(&r0, &r1, rows[i] + offset + t0);
            s0 += c * r0;
            s1 += c * r1;
        }
        memcpy(out + t0, &s0, sizeof s0);
        memcpy(out + t0 + 8, &s1, sizeof s1);
#else
        float s[NR];
        for (int l = 0; l < NR; l++) s[l] = out[t0 + l];
        for (int i = 0; i < count; i++) {
            const float c = coef[(size_t)i * coef_stride];
            const int8_t *r = rows[i] + offset + t0;
            for (int l = 0; l < NR; l++) s[l] += c * (float)r[l];
        }
        for (int l = 0; l < NR; l++) out[t0 + l] = s[l];
#endif
    }
    for (int t = t0; t < width; t++) {
        float s = out[t];
        for (int i = 0; i < count; i++) s += coef[(size_t)i * coef_stride] * (float)rows[i][offset + t];
        out[t] = s;
    }
}

/*
 * The dot products of a with rows of floats (i8 = 0) or of int8 values (i8 = 1), written once:
 * each entry point passes a constant i8, and the inlined copy keeps only its own loads.
 */
ET_INLINE float row_value(const void *r, int i8, int t) {
    return i8 ? (float)((const int8_t *)r)[t] : ((const float *)r)[t];
}

#ifdef ET_VECTOR
/* v0, v1 = the row's 16 values from t on, as floats. */
ET_INLINE void row_values16(et_v8 *v0, et_v8 *v1, const void *r, int i8, int t) {
    if (i8) {
        widen16(v0, v1, (const int8_t *)r + t);
    } else {
        memcpy(v0, (const float *)r + t, sizeof *v0);
        memcpy(v1, (const float *)r + t + 8, sizeof *v1);
    }
}

ET_INLINE float hsum8(const et_v8 *v) {
    const et_v8 s = *v;
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}
#endif

/* out[0..4) = a . r0, a . r1, a . r2, a . r3 over width values, each summed in et_dot's order: 16
 * of a's values loaded once per step for the four rows (two partial sums per row, eight in registers). */
ET_INLINE void dot4(const float *a, const void *r0, const void *r1, const void *r2, const void *r3, int i8,
                    int width, float *out) {
    int t = 0;
    float head[4] = {0.0f, 0.0f, 0.0f, 0.0f}, tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#ifdef ET_VECTOR
    et_v8 a0, a1, x0, x1, s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};
    for (; t + 16 <= width; t += 16) {
        memcpy(&a0, a + t, sizeof a0);
        memcpy(&a1, a + t + 8, sizeof a1);
        row_values16(&x0, &x1, r0, i8, t);
        s00 += a0 * x0;
        s01 += a1 * x1;
        row_values16(&x0, &x1, r1, i8, t);
        s10 += a0 * x0;
        s11 += a1 * x1;
        row_values16(&x0, &x1, r2, i8, t);
        s20 += a0 * x0;
        s21 += a1 * x1;
        row_values16(&x0, &x1, r3, i8, t);
        s30 += a0 * x0;
        s31 += a1 * x1;
    }
    s00 += s01;
    s10 += s11;
    s20 += s21;
    s30 += s31;
    head[0] = hsum8(&s00);
    head[1] = hsum8(&s10);
    head[2] = hsum8(&s20);
    head[3] = hsum8(&s30);
#endif
    for (; t < width; t++) {
        tail[0] += a[t] * row_value(r0, i8, t);
        tail[1] += a[t] * row_value(r1, i8, t);
        tail[2] += a[t] * row_value(r2, i8, t);
        tail[3] += a[t] * row_value(r3, i8, t);
    }
    for (int l = 0; l < 4; l++) out[l] = head[l] + tail[l];
}

/* a . r over width values, in et_dot's order. */
ET_INLINE float dot1(const float *a, const void *r, int i8, int width) {
    int t = 0;
    float head = 0.0f, tail = 0.0f;
#ifdef ET_VECTOR
    et_v8 a0, a1, x0, x1, s0 = {0}, s1 = {0};
    for (; t + 16 <= width; t += 16) {
        memcpy(&a0, a + t, sizeof a0);
        memcpy(&a1, a + t + 8, sizeof a1);
        row_values16(&x0, &x1, r, i8, t);
        s0 += a0 * x0;
        s1 += a1 * x1;
    }
    s0 += s1;
    head = hsum8(&s0);
#endif
    for (; t < width; t++) tail += a[t] * row_value(r, i8, t);
    return head + tail;
}

ET_HOT void et_dot_rows(int count, const float *a, const float *const *rows, int offset, int width, float *out,
                        int out_stride) {
    int i = 0;
    for (; i + 4 <= count; i += 4) {
        float d[4];
        dot4(a, rows[i] + offset, rows[i + 1] + offset, rows[i + 2] + offset, rows[i + 3] + offset, 0, width, d);
        for (int l = 0; l < 4; l++) out[(size_t)(i + l) * out_stride] = d[l];
    }
    for (; i < count; i++) out[(size_t)i * out_stride] = dot1(a, rows[i] + offset, 0, width);
}

ET_HOT void et_dot_rows_i8(int count, const float *a, const int8_t *const *rows, int offset, int width, float *out,
                           int out_stride) {
    int i = 0;
    for (; i + 4 <= count; i += 4) {
        float d[4];
        dot4(a, rows[i] + offset, rows[i + 1] + offset, rows[i + 2] + offset, rows[i + 3] + offset, 1, width, d);
        for (int l = 0; l < 4; l++) out[(size_t)(i + l) * out_stride] = d[l];
    }
    for (; i < count; i++) out[(size_t)i * out_stride] = dot1(a, rows[i] + offset, 1, width);
}

void et_transpose(int rows, int cols, const float *src, int lds, float *dst) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[(size_t)c * rows + r] = src[(size_t)r * lds + c];
}

void et_gemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc, int accumulate, float *pack) {
    if (pack && N >= NR) { /* wide: transpose B once into pack (K, N), then the register kernel */
        et_transpose(N, K, B, ldb, pack);
        gemm_kernel(M, N, K, A, lda, 1, pack, N, C, ldc, accumulate);
        return;
    }
    for (int i = 0; i < M; i++) { /* narrow (N adapters of rank r): one dot product each */
        const float *a = A + (size_t)i * lda;
        float *c = C + (size_t)i * ldc;
        for (int j = 0; j < N; j++) {
            const float d = et_dot(a, B + (size_t)j * ldb, K);
            c[j] = accumulate ? c[j] + d : d;
        }
    }
}

/* ------------------------------------------------------------------ exp, log, tanh */
/*
 * The engine's own exp, log, log1p and tanh in float32, so that every build computes the
 * same bits: C libraries differ in their last bits (glibc's expf is not newlib's, nor
 * picolibc's), and a last-bit difference in the loss gradient grows over a long run once an
 * int8 rounding goes the other way. Only +, -, *, / and exponent-bit arithmetic, each
 * correctly rounded by IEEE 754 on every target, so with -ffp-contract=off (no fused
 * multiply-add: every exported project's flags) the results are the same everywhere. The polynomials are
 * Cephes' (S. Moshier), within 2 ulp of the exact values (tests/test_export_agreement.py).
 */
static float pow2i(int n) { /* 2^n for -126 <= n <= 127 */
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float et_expf(float x) {
    if (x != x) return x;
    if (x > 88.72283905f) return HUGE_VALF;
    if (x < -103.972084f) return 0.0f;
    /* x = k ln2 + r, |r| <= ln2 / 2; k rounded to nearest by the 1.5 * 2^23 shift */
    float k = x * 1.44269504f;
    k = (k + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693359375f; /* ln2 in two parts: k * 0.693359375 is exact */
    r = r - k * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    const int n = (int)k, half = n / 2; /* two factors: 2^n may be subnormal */
    return p * pow2i(half) * pow2i(n - half);
}

float et_logf(float x) {
    if (x != x || x == HUGE_VALF) return x;
    if (x <= 0.0f) return x == 0.0f ? -HUGE_VALF : NAN;
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int e = 0;
    if (bits < 0x00800000u) { /* subnormal: scale by 2^24 first */
        x *= 16777216.0f;
        memcpy(&bits, &x, sizeof bits);
        e = -24;
    }
    e += (int)(bits >> 23) - 126;
    bits = (bits & 0x007fffffu) | 0x3f000000u; /* x = m 2^e, m in [0.5, 1) */
    float m;
    memcpy(&m, &bits, sizeof m);
    if (m < 0.707106781f) {
        e -= 1;
        m = m + m - 1.0f;
    } else {
        m = m - 1.0f;
    }
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fe = (float)e;
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    return (m + y) + fe * 0.693359375f;
}

float et_log1pf(float x) {
    const float u = 1.0f + x;
    if (u == 1.0f) return x;
    if (u == HUGE_VALF) return u;
    return et_logf(u) * (x / (u - 1.0f)); /* the rounding of 1 + x compensated */
}

float et_tanhf(float x) {
    const float a = fabsf(x);
    if (a > 44.0f) return x > 0.0f ? 1.0f : -1.0f; /* and NaN falls through to the polynomial */
    if (a >= 0.625f) {
        const float t = 1.0f - 2.0f / (et_expf(a + a) + 1.0f);
        return x < 0.0f ? -t : t;
    }
    if (x == 0.0f) return x;
    const float s = x * x;
    float p = -5.70498872745e-3f;
    p = p * s + 2.06390887954e-2f;
    p = p * s - 5.37397155531e-2f;
    p = p * s + 1.33314422036e-1f;
    p = p * s - 3.33332819422e-1f;
    return p * s * x + x;
}

/*
 * Which exp, log, log1p and tanh the training loop calls. An exported project's Makefile defines
 * ET_PORTABLE_MATH (with -ffp-contract=off), so the device and the host build of the same project
 * compute the same bits (docs/export.md). The Python package's engine keeps the C library's
 * functions and its build's contraction: its documented numbers were measured with them.
 */
#ifdef ET_PORTABLE_MATH
#define ET_EXPF et_expf
#define ET_LOGF et_logf
#define ET_LOG1PF et_log1pf
#define ET_TANHF et_tanhf
#else
#define ET_EXPF expf
#define ET_LOGF logf
#define ET_LOG1PF log1pf
#define ET_TANHF tanhf
#endif

/* ------------------------------------------------------------------ activations */
ET_HOT void et_act_forward(int act, float *z, int64_t n) {
    int64_t i;
    switch (act) {
    case ET_RELU:
        for (i = 0; i < n; i++) z[i] = z[i] < 0.0f ? 0.0f : z[i];
        break;
    case ET_RELU6:
        for (i = 0; i < n; i++) z[i] = z[i] < 0.0f ? 0.0f : (z[i] > 6.0f ? 6.0f : z[i]);
        break;
    case ET_LEAKY_RELU:
        for (i = 0; i < n; i++) z[i] = z[i] < 0.0f ? z[i] * 0.01f : z[i];
        break;
    case ET_TANH:
        for (i = 0; i < n; i++) z[i] = ET_TANHF(z[i]);
        break;
    case ET_SIGMOID: /* written so that a large |z| never overflows */
        for (i = 0; i < n; i++) {
            const float e = ET_EXPF(-fabsf(z[i]));
            z[i] = z[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        }
        break;
    default: /* identity */
        break;
    }
}

/* Written without branches on the data (a comparison's 0/1 as a factor), so the loops vectorise. */
ET_HOT void et_act_grad_mul(int act, float *dh, const float *h, int64_t n) {
    int64_t i;
    switch (act) {
    case ET_RELU:
        for (i = 0; i < n; i++) dh[i] *= (float)(h[i] > 0.0f);
        break;
    case ET_RELU6:
        for (i = 0; i < n; i++) dh[i] *= (float)(h[i] > 0.0f) * (float)(h[i] < 6.0f);
        break;
    case ET_LEAKY_RELU:
        for (i = 0; i < n; i++) dh[i] *= 0.01f + 0.99f * (float)(h[i] > 0.0f);
        break;
    case ET_TANH:
        for (i = 0; i < n; i++) dh[i] *= 1.0f - h[i] * h[i];
        break;
    case ET_SIGMOID:
        for (i = 0; i < n; i++) dh[i] *= h[i] * (1.0f - h[i]);
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------ loss */
double et_softmax_xent_grad(float *logits, const int32_t *y, int rows, int classes) {
    return et_softmax_xent_grad_of(logits, y, rows, classes, rows);
}

double et_softmax_xent_grad_of(float *logits, const int32_t *y, int rows, int classes, int batch_rows) {
    const float inv = (float)(1.0 / batch_rows);
    double total = 0.0;
    for (int r = 0; r < rows; r++) {
        float *z = logits + (size_t)r * classes;
        const int t = y[r];
        if (classes == 2) {
            /* Two classes: p1 = 1 / (1 + exp(l0 - l1)), the loss is softplus(-margin). */
            float d = z[0] - z[1];
            const float m = t == 0 ? -d : d;      /* minus the margin */
            const float e = ET_EXPF(-fabsf(d));      /* one exponential serves the loss and p1 */
            total += (double)((m > 0.0f ? m : 0.0f) + ET_LOG1PF(e));
            d = d >= 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
            d = (d - (float)t) * inv;
            z[1] = d;
            z[0] = -d;
            continue;
        }
        float mx = z[0];
        for (int c = 1; c < classes; c++) mx = z[c] > mx ? z[c] : mx;
        float s = 0.0f;
        for (int c = 0; c < classes; c++) {
            z[c] = z[c] - mx;
        }
        const float a = z[t];
        for (int c = 0; c < classes; c++) {
            z[c] = ET_EXPF(z[c]);
            s += z[c];
        }
        total += (double)(ET_LOGF(s) - a);
        for (int c = 0; c < classes; c++) z[c] /= s;
        z[t] -= 1.0f;
        for (int c = 0; c < classes; c++) z[c] *= inv;
    }
    return total;
}

/* ------------------------------------------------------------------ optimizers */
ET_HOT void et_optimizer_step(struct et_optimizer *opt, float *p, const float *g, int64_t n) {
    const float lr = (float)opt->lr, wd = (float)opt->weight_decay;
    int64_t i;
    if (opt->kind == ET_SGD) {
        if (wd != 0.0f) {
            for (i = 0; i < n; i++) p[i] -= (p[i] * wd + g[i]) * lr;
        } else {
            for (i = 0; i < n; i++) p[i] -= g[i] * lr;
        }
    } else if (opt->kind == ET_MOMENTUM) {
        float *v = opt->m;
        const float mu = (float)opt->momentum;
        for (i = 0; i < n; i++) {
            const float gi = wd != 0.0f ? p[i] * wd + g[i] : g[i];
            v[i] = v[i] * mu + gi;
            p[i] -= v[i] * lr;
        }
    } else {
        float *m = opt->m, *v = opt->v;
        opt->t += 1;
        const double t = (double)opt->t;
        const float b1 = (float)opt->beta1, b2 = (float)opt->beta2;
        const float one_b1 = (float)(1.0 - opt->beta1), one_b2 = (float)(1.0 - opt->beta2);
        const float corr2 = (float)(1.0 / sqrt(1.0 - pow(opt->beta2, t)));
        const float step = (float)(opt->lr / (1.0 - pow(opt->beta1, t)));
        const float eps = (float)opt->eps;
        for (i = 0; i < n; i++) {
            const float gi = wd != 0.0f ? p[i] * wd + g[i] : g[i];
            m[i] = m[i] * b1 + gi * one_b1;
            v[i] = v[i] * b2 + (gi * gi) * one_b2;
            const float den = sqrtf(v[i]) * corr2 + eps;
            p[i] -= (m[i] / den) * step;
        }
    }
}
