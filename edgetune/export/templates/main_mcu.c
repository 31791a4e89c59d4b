/*
 * The example program of a microcontroller export: fine-tune on the samples linked into the
 * firmware (they stand in for a sensor), report the test accuracy before and after, and
 * print one JSON line over semihosting. Times come from SysTick at ET_MCU_TICK_HZ.
 * No printf (newlib's float formatting would allocate): numbers are formatted here.
 */
#include <stdint.h>
#include <string.h>

#include "et_device.h"
#include "et_mcu.h"
#include "et_model.h"
#include "et_samples.h"

/* The one arena: everything the training changes. */
static double arena[(ET_MODEL_ARENA_BYTES + sizeof(double) - 1) / sizeof(double)];
static et_device dev;
static char line[1024];

/* ------------------------------------------------------------------ formatting */
static char *put(char *p, const char *s) {
    while (*s) *p++ = *s++;
    return p;
}

static char *put_uint(char *p, uint64_t v) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) *p++ = tmp[--n];
    return p;
}

/* v with 10 significant digits, e.g. 1.234567890e-02 (a JSON number); null if not finite. */
static char *put_double(char *p, double v) {
    if (v != v || v > 1e300 || v < -1e300) return put(p, "null");
    if (v < 0) {
        *p++ = '-';
        v = -v;
    }
    if (v == 0.0) return put(p, "0");
    int e = 0;
    while (v >= 10.0) { v /= 10.0; e++; }
    while (v < 1.0) { v *= 10.0; e--; }
    uint64_t m = (uint64_t)(v * 1e9 + 0.5);
    if (m >= 10000000000ull) { m /= 10; e++; }
    char digits[12];
    for (int i = 9; i >= 0; i--) { digits[i] = (char)('0' + m % 10); m /= 10; }
    *p++ = digits[0];
    *p++ = '.';
    for (int i = 1; i < 10; i++) *p++ = digits[i];
    *p++ = 'e';
    if (e < 0) { *p++ = '-'; e = -e; }
    return put_uint(p, (uint64_t)e);
}

static char *field_str(char *p, const char *key, const char *v) {
    p = put(put(put(put(p, "\""), key), "\": \""), v);
    return put(p, "\", ");
}

static char *field_num(char *p, const char *key, double v, int last) {
    p = put_double(put(put(put(p, "\""), key), "\": "), v);
    return put(p, last ? "" : ", ");
}

static char *field_int(char *p, const char *key, uint64_t v) {
    p = put_uint(put(put(put(p, "\""), key), "\": "), v);
    return put(p, ", ");
}

/* ------------------------------------------------------------------ the run */
static double accuracy(void) {
    float logits[ET_MODEL_CLASSES];
    int32_t right = 0;
    for (int32_t i = 0; i < ET_TEST_SAMPLES; i++) {
        if (et_device_predict(&dev, et_test_x + (uint32_t)i * ET_MODEL_INPUTS, 1, logits) != ET_OK) return -1.0;
        int32_t best = 0;
        for (int32_t c = 1; c < ET_MODEL_CLASSES; c++)
            if (logits[c] > logits[best]) best = c;
        right += best == et_test_y[i];
    }
    return ET_TEST_SAMPLES ? (double)right / ET_TEST_SAMPLES : 0.0;
}

int main(void) {
    if (et_device_init(&dev, &et_model, arena, sizeof(arena), ET_MODEL_SEED) != ET_OK) {
        et_mcu_write("train: error: the arena does not fit the model\n");
        return 1;
    }
    if (ET_TRAIN_SAMPLES < 1 || et_device_use_samples(&dev, et_train_x, et_train_y, ET_TRAIN_SAMPLES) != ET_OK) {
        et_mcu_write("train: error: no usable samples are linked in (export with --task)\n");
        return 1;
    }
    const double acc_before = accuracy();
    double loss = 0.0;
    uint64_t total = 0, first = 0;
    int32_t run = 0;
    for (int32_t e = 0; e < ET_MODEL_EPOCHS; e++) {
        /* the exported shuffles, then the device's own */
        const int32_t *order = e < ET_ORDER_EPOCHS ? et_orders + (uint32_t)e * ET_TRAIN_SAMPLES : NULL;
        et_epoch_stats st;
        const uint64_t t0 = et_mcu_ticks();
        if (et_device_train_epoch(&dev, order, NULL, &st) != ET_OK) {
            et_mcu_write("train: error: the engine refused to train\n");
            return 1;
        }
        const uint64_t dt = et_mcu_ticks() - t0;
        total += dt;
        if (e == 0) first = dt;
        loss = st.loss;
        run++;
        if (st.diverged) break;
    }
    const double acc_after = accuracy();
    char *p = put(line, "{");
    p = field_str(p, "target", et_model_target);
    p = field_str(p, "method", et_model_method);
    p = field_int(p, "epochs", (uint64_t)run);
    p = field_int(p, "samples", ET_TRAIN_SAMPLES);
    p = field_int(p, "test_samples", ET_TEST_SAMPLES);
    p = field_int(p, "cache_capacity", (uint64_t)et_model.cache_capacity);
    p = field_int(p, "cache_hits", (uint64_t)dev.cache.hits);
    p = field_int(p, "cache_misses", (uint64_t)dev.cache.misses);
    p = field_int(p, "arena_bytes", sizeof(arena));
    p = field_int(p, "arena_needed_bytes", et_device_arena_bytes(&et_model));
    p = field_int(p, "static_ram_bytes", et_mcu_static_ram());
    p = field_int(p, "stack_bytes", et_mcu_stack_size());
    p = field_int(p, "stack_used_bytes", et_mcu_stack_used());
    p = field_int(p, "train_ticks", total);
    p = field_int(p, "first_epoch_ticks", first);
    p = field_int(p, "later_epoch_ticks", run > 1 ? (total - first) / (uint64_t)(run - 1) : 0);
    p = field_num(p, "tick_hz", ET_MCU_TICK_HZ, 0);
    p = field_num(p, "train_seconds", (double)total / ET_MCU_TICK_HZ, 0);
    p = field_num(p, "accuracy_before", acc_before, 0);
    p = field_num(p, "accuracy_after", acc_after, 0);
    p = field_num(p, "final_loss", loss, 1);
    put(p, "}\n");
    et_mcu_write(line);
    return acc_before < 0.0 || acc_after < 0.0;
}
