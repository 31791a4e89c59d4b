/*
 * NumPy's default bit generator, PCG64 (XSL-RR 128/64), and Generator.permutation, drawn in C
 * with the same numbers NumPy draws: the trainer's shuffled epoch orders come from here without
 * a call into Python per epoch, and the generator's state goes back to NumPy afterwards exactly
 * where NumPy's own draws would have left it.
 */
#ifndef ET_RANDOM_H
#define ET_RANDOM_H

#include <stdint.h>

/* The state of numpy.random.PCG64, as its ``bit_generator.state`` dict holds it: the 128-bit
 * LCG state and increment split in 64-bit halves, and the buffered upper half of the last
 * 64-bit draw that a 32-bit draw did not use yet (has_uint32, uinteger). */
typedef struct {
    uint64_t state_hi;
    uint64_t state_lo;
    uint64_t inc_hi;
    uint64_t inc_lo;
    int32_t has_uint32;
    uint32_t uinteger;
} et_pcg64;

/* One 64-bit draw: the LCG steps (state = state * multiplier + inc, mod 2^128), then the new
 * state's high and low halves, xor-ed, are rotated right by the state's top 6 bits. */
uint64_t et_pcg64_next64(et_pcg64 *rng);

/* One 32-bit draw: the buffered upper half if there is one, else the lower half of a new 64-bit
 * draw (its upper half is buffered). */
uint32_t et_pcg64_next32(et_pcg64 *rng);

/* A uniform integer in [0, max]: draws masked to the smallest all-ones mask >= max until one is
 * <= max (32-bit draws while max fits in 32 bits, else 64-bit ones); 0 without a draw for max 0. */
uint64_t et_random_interval(et_pcg64 *rng, uint64_t max);

/* ``count`` permutations of 0..n-1, one after another in ``out`` (count * n int32 values), each
 * NumPy's ``Generator.permutation(n)``: 0..n-1 shuffled by Fisher-Yates from the last position
 * down to position 1, position i swapped with et_random_interval(i). Advances ``rng`` by every
 * draw. Returns 0, or -1 for a NULL pointer or n < 0 or count < 0 (nothing written). */
int32_t et_permutations(et_pcg64 *rng, int32_t n, int32_t count, int32_t *out);

#endif
