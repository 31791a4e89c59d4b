/*
 * The compiled OS-ELM on its own, built with -Wall -Wextra -Werror and under AddressSanitizer
 * and UBSan by tests/test_stream_native.py: every entry point, with and without kept weights
 * and forgetting, refusals, a state buffer exactly as large as et_oselm_state_size says.
 * Prints "N passed, M failed".
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "et_core.h"
#include "et_oselm.h"

static int passed, failed;

static void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s\n", what);
    }
}

static void run(int keep, float lam) {
    enum { N = 24, L = 12, S = 400 };
    et_oselm_config cfg = {N, L, N, 3u, ET_OSELM_SIGMOID, 16, keep, 1.0f, lam};
    size_t bytes = et_oselm_state_size(&cfg);
    check(bytes > 0 && bytes % 16 == 0, "state size");
    void *buf = malloc(bytes);                 /* exactly the stated size: ASan sees any overrun */
    check(et_oselm_init(buf, bytes - 1, &cfg) == ET_ERR_WORKSPACE, "short buffer refused");
    check(et_oselm_init(buf, bytes, &cfg) == ET_OK, "init");
    check(et_oselm_check(buf, bytes) == ET_OK, "header");
    float x[N], y[N], err[S];
    int32_t learned[S];
    float *z = malloc(sizeof(float) * N * S);
    for (int i = 0; i < N * S; i++) z[i] = et_oselm_uniform(5u, (uint32_t)i);
    check(et_oselm_ae_stream(buf, z, S, 1e30f, err, learned) == ET_OK, "stream");
    int all = 1;
    for (int i = 0; i < S; i++) all &= learned[i] == 1 && isfinite(err[i]);
    check(all, "every sample learned");
    check(err[S - 1] < err[0], "the error falls as it learns");
    float *P = et_oselm_P(buf);
    int spd = 1;
    for (int i = 0; i < L; i++) spd &= P[i * L + i] > 0.0f && fabsf(P[i * L + (L - 1 - i)] - P[(L - 1 - i) * L + i]) < 1e-3f;
    check(spd, "P positive diagonal, near symmetric");
    unsigned char *copy = malloc(bytes);
    memcpy(copy, buf, bytes);
    memcpy(x, z, sizeof x);
    x[3] = NAN;
    check(et_oselm_update(buf, x, x) == ET_OSELM_REFUSED, "NaN refused");
    x[3] = INFINITY;
    check(et_oselm_update(buf, x, x) == ET_OSELM_REFUSED, "inf refused");
    check(memcmp((unsigned char *)buf + sizeof(et_oselm_header), copy + sizeof(et_oselm_header),
                 bytes - sizeof(et_oselm_header)) == 0, "state unchanged by refusals");
    check(((et_oselm_header *)buf)->n_refused == 2, "refusals counted");
    check(et_oselm_predict(buf, z, y) == ET_OK && isfinite(y[0]), "predict");
    check(et_oselm_update(NULL, x, x) == ET_ERR_ARGUMENT, "NULL refused");
    uint32_t c0 = et_oselm_checksum(buf);
    check(et_oselm_update(buf, z, z) == ET_OK && et_oselm_checksum(buf) != c0, "checksum follows the state");
    free(copy);
    free(z);
    free(buf);
}

int main(void) {
    et_oselm_config bad = {0, 4, 4, 0u, 0, 1, 0, 1.0f, 1.0f};
    check(et_oselm_state_size(&bad) == 0, "invalid config has no size");
    bad.n_inputs = 4;
    bad.forgetting = 1.5f;
    check(et_oselm_state_size(&bad) == 0, "forgetting > 1 refused");
    run(0, 1.0f);
    run(1, 1.0f);
    run(0, 0.98f);
    run(1, 0.98f);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
