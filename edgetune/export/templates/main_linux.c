/*
 * The example program of a Linux export: read labelled samples, fine-tune the adapter on
 * the device, report the test accuracy before and after, write the adapter files.
 *
 *   ./train [SAMPLES] [--epochs N] [--save-adapter DIR] [--quiet]
 *
 * SAMPLES (default: samples.bin beside this program) holds raw inputs, labels and the
 * trainer's per-epoch shuffles; its format is written by edgetune export:
 *   "ETSMPL01", int32 features, n_train, n_test, n_orders, then float32 x_train, int32
 *   y_train, float32 x_test, int32 y_test, int32 orders (n_orders, n_train); little-endian.
 * The last line printed is one JSON object.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "et_device.h"
#include "et_model.h"

/* The one arena: everything the training changes. */
static double arena[(ET_MODEL_ARENA_BYTES + sizeof(double) - 1) / sizeof(double)];
static et_device dev;
static float row[ET_MODEL_INPUTS], prepared[ET_MODEL_INPUTS];
static unsigned char seen[ET_MODEL_MAX_SAMPLES];

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "train: error: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    return 1;
}

static int read_exact(FILE *f, void *dst, size_t bytes) { return fread(dst, 1, bytes, f) == bytes; }

/* Test accuracy: each raw test sample normalised and classified. */
static int accuracy(FILE *f, long at, int32_t n_test, double *acc) {
    int32_t right = 0;
    float logits[ET_MODEL_CLASSES];
    if (fseek(f, at, SEEK_SET) != 0) return 0;
    for (int32_t i = 0; i < n_test; i++) {
        int32_t label;
        long pos = at + (long)i * (long)sizeof(row);
        if (fseek(f, pos, SEEK_SET) != 0 || !read_exact(f, row, sizeof(row))) return 0;
        if (fseek(f, at + (long)n_test * (long)sizeof(row) + 4L * i, SEEK_SET) != 0 || !read_exact(f, &label, 4))
            return 0;
        et_device_normalize(&dev, row, prepared);
        if (et_device_predict(&dev, prepared, 1, logits) != ET_OK) return 0;
        int32_t best = 0;
        for (int32_t c = 1; c < ET_MODEL_CLASSES; c++)
            if (logits[c] > logits[best]) best = c;
        right += best == label;
    }
    *acc = n_test ? (double)right / n_test : 0.0;
    return 1;
}

static int write_file(const char *dir, const char *name, const void *a, size_t na, const void *b, size_t nb) {
    char path[4096], tmp[4096 + 16];
    if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path)) return 0;
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return 0;
    int ok = fwrite(a, 1, na, f) == na && (nb == 0 || fwrite(b, 1, nb, f) == nb);
    ok = (fclose(f) == 0) && ok;
    if (ok) ok = rename(tmp, path) == 0; /* a reader sees the old file or the new one, never half */
    else remove(tmp);
    return ok;
}

static int save_adapter(const char *dir) {
    static uint8_t bytes[ET_MODEL_ADAPTER_BYTES];
    const size_t n = et_device_adapter_bytes(&et_model);
    if (n > sizeof(bytes)) return 0;
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return 0;
    et_device_read_adapter(&dev, bytes);
    return write_file(dir, "adapter_model.safetensors", et_adapter_header, et_adapter_header_bytes, bytes, n) &&
           write_file(dir, "adapter_config.json", et_adapter_config, strlen(et_adapter_config), NULL, 0);
}

/* s as a JSON string (quotes, backslashes and control characters escaped), or null. */
static void print_json_string(const char *s) {
    if (!s) {
        fputs("null", stdout);
        return;
    }
    putchar('"');
    for (; *s; s++) {
        const unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    const char *samples = NULL, *adapter_dir = NULL;
    char default_path[4096];
    int32_t epochs = ET_MODEL_EPOCHS;
    int quiet = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--epochs") && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 1 || v > 1000000) return fail("--epochs must be a whole number >= 1", argv[i]);
            epochs = (int32_t)v;
        } else if (!strcmp(argv[i], "--save-adapter") && i + 1 < argc) {
            adapter_dir = argv[++i];
        } else if (!strcmp(argv[i], "--quiet")) {
            quiet = 1;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: %s [SAMPLES] [--epochs N] [--save-adapter DIR] [--quiet]\n", argv[0]);
            return 0;
        } else if (argv[i][0] != '-' && !samples) {
            samples = argv[i];
        } else {
            fprintf(stderr, "usage: %s [SAMPLES] [--epochs N] [--save-adapter DIR] [--quiet]\n", argv[0]);
            return 2;
        }
    }
    if (!samples) { /* samples.bin beside the program */
        const char *slash = strrchr(argv[0], '/');
        int len = slash ? (int)(slash - argv[0]) : 1;
        snprintf(default_path, sizeof(default_path), "%.*s/samples.bin", len, slash ? argv[0] : ".");
        samples = default_path;
    }
    FILE *f = fopen(samples, "rb");
    if (!f) return fail("cannot open the samples file", samples);
    char magic[8];
    int32_t head[4];
    if (!read_exact(f, magic, 8) || memcmp(magic, "ETSMPL01", 8) || !read_exact(f, head, sizeof(head)))
        return fail("not an edgetune samples file", samples);
    const int32_t features = head[0], n_train = head[1], n_test = head[2], n_orders = head[3];
    if (features != ET_MODEL_INPUTS) return fail("the samples do not have the model's number of inputs", samples);
    if (n_train < 1 || n_train > ET_MODEL_MAX_SAMPLES || n_test < 0 || n_orders < 0)
        return fail("the samples file holds more training samples than the export's --max-samples", samples);
    int32_t rc = et_device_init(&dev, &et_model, arena, sizeof(arena), ET_MODEL_SEED);
    if (rc != ET_OK) return fail("the arena does not fit the model", NULL);
    const long x_at = 8 + (long)sizeof(head);
    const long y_at = x_at + (long)n_train * (long)sizeof(row);
    for (int32_t i = 0; i < n_train; i++) {
        int32_t label;
        if (fseek(f, x_at + (long)i * (long)sizeof(row), SEEK_SET) || !read_exact(f, row, sizeof(row)) ||
            fseek(f, y_at + 4L * i, SEEK_SET) || !read_exact(f, &label, 4))
            return fail("the samples file is truncated", samples);
        if (et_device_add_sample(&dev, row, label) != ET_OK) return fail("a label is out of range", samples);
    }
    const long test_at = y_at + 4L * n_train;
    const long orders_at = test_at + (long)n_test * ((long)sizeof(row) + 4);
    double acc_before = 0.0, acc_after = 0.0, seconds = 0.0, loss = 0.0;
    if (!accuracy(f, test_at, n_test, &acc_before)) return fail("the samples file is truncated", samples);
    int32_t run = 0;
    for (int32_t e = 0; e < epochs; e++) {
        const int32_t *order = NULL; /* beyond the exported shuffles: the device's own */
        if (e < n_orders) {
            if (fseek(f, orders_at + 4L * e * n_train, SEEK_SET) || !read_exact(f, dev.order, 4 * (size_t)n_train))
                return fail("the samples file is truncated", samples);
            memset(seen, 0, sizeof(seen));
            for (int32_t i = 0; i < n_train; i++) { /* the engine trusts an order: check it is one */
                if (dev.order[i] < 0 || dev.order[i] >= n_train || seen[dev.order[i]])
                    return fail("a shuffle in the samples file is not a permutation", samples);
                seen[dev.order[i]] = 1;
            }
            order = dev.order;
        }
        et_epoch_stats st;
        rc = et_device_train_epoch(&dev, order, et_clock_monotonic, &st);
        if (rc != ET_OK) return fail("the engine refused to train", NULL);
        seconds += st.seconds;
        loss = st.loss;
        run++;
        if (!quiet) fprintf(stderr, "epoch %d loss %.6f\n", (int)(e + 1), st.loss);
        if (st.diverged) {
            fprintf(stderr, "train: the loss diverged in epoch %d; parameters restored\n", (int)(e + 1));
            break;
        }
    }
    if (!accuracy(f, test_at, n_test, &acc_after)) return fail("the samples file is truncated", samples);
    fclose(f);
    if (adapter_dir && !save_adapter(adapter_dir)) return fail("cannot write the adapter into", adapter_dir);
    printf("{\"target\": \"%s\", \"method\": \"%s\", \"epochs\": %d, \"samples\": %d, \"test_samples\": %d, "
           "\"final_loss\": %.17g, \"accuracy_before\": %.17g, \"accuracy_after\": %.17g, "
           "\"train_seconds\": %.9f, \"arena_bytes\": %lu, \"arena_needed_bytes\": %lu, \"cache_hits\": %lld, \"cache_misses\": %lld, "
           "\"shuffle\": \"%s\", \"adapter\": ",
           et_model_target, et_model_method, (int)run, (int)n_train, (int)n_test, loss, acc_before, acc_after,
           seconds, (unsigned long)sizeof(arena), (unsigned long)et_device_arena_bytes(&et_model), (long long)dev.cache.hits, (long long)dev.cache.misses,
           epochs <= n_orders ? "edgetune" : "device");
    print_json_string(adapter_dir);
    puts("}");
    return 0;
}
