/* NumPy's PCG64 and Generator.permutation in portable C99 (see et_random.h). */
#include "et_random.h"

#include <stddef.h>

/* PCG's default 128-bit multiplier, in 64-bit halves. */
#define MULT_HI UINT64_C(0x2360ED051FC65DA4)
#define MULT_LO UINT64_C(0x4385DF649FCCF645)

/* A compiler with 128-bit integers multiplies in one; ET_RANDOM_NO_INT128 (the tests) or any other
 * compiler takes the portable 64x64->128 path. */
#if defined(__SIZEOF_INT128__) && !defined(ET_RANDOM_NO_INT128)
__extension__ typedef unsigned __int128 u128;

static void lcg_step(et_pcg64 *rng) {
    u128 s = ((u128)rng->state_hi << 64) | rng->state_lo;
    u128 m = ((u128)MULT_HI << 64) | MULT_LO;
    u128 c = ((u128)rng->inc_hi << 64) | rng->inc_lo;
    s = s * m + c;
    rng->state_hi = (uint64_t)(s >> 64);
    rng->state_lo = (uint64_t)s;
}
#else
/* The full 128-bit product of two 64-bit numbers, from 32-bit halves. */
static void mul_64x64(uint64_t a, uint64_t b, uint64_t *hi, uint64_t *lo) {
    uint64_t a_lo = a & 0xffffffffu, a_hi = a >> 32, b_lo = b & 0xffffffffu, b_hi = b >> 32;
    uint64_t ll = a_lo * b_lo, lh = a_lo * b_hi, hl = a_hi * b_lo, hh = a_hi * b_hi;
    uint64_t mid = (ll >> 32) + (lh & 0xffffffffu) + (hl & 0xffffffffu);
    *lo = (mid << 32) | (ll & 0xffffffffu);
    *hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
}

static void lcg_step(et_pcg64 *rng) {
    uint64_t hi, lo;
    mul_64x64(rng->state_lo, MULT_LO, &hi, &lo);  /* the product mod 2^128: the low halves in full, */
    hi += rng->state_hi * MULT_LO + rng->state_lo * MULT_HI;  /* the cross terms' low halves on top */
    lo += rng->inc_lo;
    hi += rng->inc_hi + (lo < rng->inc_lo);
    rng->state_hi = hi;
    rng->state_lo = lo;
}
#endif

/* The draws as static functions: a shared library's exported functions cannot be inlined into
 * each other (-fPIC), and the permutation loop below needs them inlined. */
static uint64_t next64(et_pcg64 *rng) {
    uint64_t x;
    unsigned rot;
    lcg_step(rng);
    x = rng->state_hi ^ rng->state_lo;
    rot = (unsigned)(rng->state_hi >> 58);
    return (x >> rot) | (x << ((64u - rot) & 63u));
}

static uint32_t next32(et_pcg64 *rng) {
    uint64_t next;
    if (rng->has_uint32) {
        rng->has_uint32 = 0;
        return rng->uinteger;
    }
    next = next64(rng);
    rng->has_uint32 = 1;
    rng->uinteger = (uint32_t)(next >> 32);
    return (uint32_t)next;
}

uint64_t et_pcg64_next64(et_pcg64 *rng) { return next64(rng); }

uint32_t et_pcg64_next32(et_pcg64 *rng) { return next32(rng); }

uint64_t et_random_interval(et_pcg64 *rng, uint64_t max) {
    uint64_t mask = max, value;
    if (max == 0) return 0;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    if (max <= UINT64_C(0xffffffff)) {
        do value = next32(rng) & mask; while (value > max);
    } else {
        do value = next64(rng) & mask; while (value > max);
    }
    return value;
}

/* One permutation, the draws of et_random_interval(i) for i = n-1 .. 1 (n <= 2^31, so 32-bit
 * draws). Written without a branch on whether a draw is kept: a rejected draw swaps position i
 * with itself and i stays, so the loop's only unpredictable test is gone; the mask halves when
 * i falls to its lower half (i drops by one at a time). */
static void permutation(et_pcg64 *rng, int32_t n, int32_t *order) {
    uint32_t i, mask = 1;
    for (i = 0; i < (uint32_t)n; i++) order[i] = (int32_t)i;
    if (n < 2) return;
    i = (uint32_t)n - 1;
    while (mask < i) mask = (mask << 1) | 1u;
    while (i >= 1) {
        uint32_t v = next32(rng) & mask;
        uint32_t keep = v <= i;
        uint32_t j = keep ? v : i;
        int32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
        i -= keep;
        mask >>= (i <= (mask >> 1));
    }
}

int32_t et_permutations(et_pcg64 *rng, int32_t n, int32_t count, int32_t *out) {
    et_pcg64 r;
    int32_t e;
    if (rng == NULL || n < 0 || count < 0 || (out == NULL && n > 0 && count > 0)) return -1;
    r = *rng;  /* a local copy the compiler keeps in registers */
    for (e = 0; e < count; e++) permutation(&r, n, out + (size_t)e * (size_t)n);
    *rng = r;
    return 0;
}
