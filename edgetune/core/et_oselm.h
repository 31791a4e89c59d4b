/*
 * OS-ELM (online sequential extreme learning machine) in portable C99: one hidden layer
 * h = g(W x + b) with random W, b regenerated from a seed, and output weights beta learned
 * by recursive least squares. The NumPy reference is edgetune/stream/oselm.py; this file
 * computes the same thing in float32.
 *
 * No allocation, no global state: the caller owns one state buffer of
 * et_oselm_state_size(cfg) bytes (aligned for float), laid out as
 *   et_oselm_header | P (L*L) | beta (L*m) | scratch (3L + 2m) | W (L*n) if keep_weights
 * with L = n_hidden, n = n_inputs, m = n_outputs. The header names its format and version
 * and the state carries a checksum (et_oselm_checksum), so a saved blob is checked on load.
 *
 * RLS numerics (see oselm.py): P = I/delta at init; one sample is the Sherman-Morrison
 * step k = P h / (lam + h'P h), beta += k e', P = (P - k (P h)') / lam; with lam < 1 one
 * more rank-1 step adds c e_j e_j' to P's inverse (j cycles over 0..L-1, c = L (1-lam) delta)
 * so the regularisation never decays; P is symmetrised every symmetrize_every updates. A
 * sample is refused (ET_OSELM_REFUSED, the state unchanged but for the refusal count) when
 * it or the update it implies is not finite, or when P would lose a positive diagonal.
 */
#ifndef ET_OSELM_H
#define ET_OSELM_H

#include <stddef.h>
#include <stdint.h>

#define ET_OSELM_MAGIC 0x4D4C4553u   /* "SELM" */
#define ET_OSELM_VERSION 1
#define ET_OSELM_REFUSED 1           /* a sample that was not learned (not an error) */

enum et_oselm_activation { ET_OSELM_SIGMOID = 0, ET_OSELM_TANH = 1, ET_OSELM_RELU = 2, ET_OSELM_IDENTITY = 3 };

typedef struct et_oselm_config {
    int32_t n_inputs;
    int32_t n_hidden;
    int32_t n_outputs;
    uint32_t seed;
    int32_t activation;          /* enum et_oselm_activation */
    int32_t symmetrize_every;    /* >= 1 */
    int32_t keep_weights;        /* 1: W is generated once into the state; 0: regenerated per sample */
    float delta;                 /* ridge regularisation, > 0 */
    float forgetting;            /* in (0, 1] */
} et_oselm_config;

typedef struct et_oselm_header {
    uint32_t magic;
    uint32_t version;
    et_oselm_config cfg;
    int64_t n_updates;
    int64_t n_refused;
    uint64_t total_bytes;
} et_oselm_header;

/* Bytes of the state for cfg, or 0 if cfg is invalid (sizes < 1, delta <= 0, ...). */
size_t et_oselm_state_size(const et_oselm_config *cfg);

/* Lay out a fresh state in buf (bytes >= et_oselm_state_size(cfg)): P = I/delta, beta = 0. */
int et_oselm_init(void *buf, size_t bytes, const et_oselm_config *cfg);

/* Check a state's header (magic, version, sizes) against its buffer size: 0 if usable. */
int et_oselm_check(const void *buf, size_t bytes);

/* The state's P (L*L, row-major) and beta (L*m, row-major), to read or set. */
float *et_oselm_P(void *buf);
float *et_oselm_beta(void *buf);

/* Weight number i of the seed's stream, in [-1, 1) (the same as oselm.random_uniform). */
float et_oselm_uniform(uint32_t seed, uint32_t i);

/* h (L) = g(W x + b) for one input x (n). */
int et_oselm_hidden(void *buf, const float *x, float *h);

/* y (m) = beta' h(x). */
int et_oselm_predict(void *buf, const float *x, float *y);

/* Learn one sample x (n) with target t (m): ET_OK, ET_OSELM_REFUSED, or < 0 on bad arguments. */
int et_oselm_update(void *buf, const float *x, const float *t);

/* The same from a hidden vector h (L) already computed. */
int et_oselm_update_hidden(void *buf, const float *h, const float *t);

/*
 * Autoencoder stream (n == m), test-then-train: for each of the n_samples rows z (n each,
 * already standardised), err[i] = mean((beta' h(z) - z)^2) before learning it, then learn it
 * if err[i] <= learn_below_err (learned[i] = 1; 0 if not learned, 2 if refused). learned may
 * be NULL. A row with NaN or inf gets err[i] = NaN and is refused.
 */
int et_oselm_ae_stream(void *buf, const float *z, int32_t n_samples, float learn_below_err,
                       float *err, int32_t *learned);

/* FNV-1a over the state's bytes after the header's first 8 (magic, version excluded). */
uint32_t et_oselm_checksum(const void *buf);

/*
 * The Page-Hinkley change detector of edgetune/stream/drift.py, in double precision, so a
 * stream scored in C signals a change on the same sample as the Python one.
 */
typedef struct et_oselm_drift {
    double delta, threshold, clip;
    int64_t min_samples;
    int64_t n;
    double mean, sum, min_sum;
    int64_t n_detections;
} et_oselm_drift;

/* sizeof(et_oselm_drift), for the binding to check its declaration against. */
size_t et_oselm_drift_size(void);

/* Feed one value: 1 on the sample where a sustained rise is detected (then it restarts). */
int et_oselm_drift_update(et_oselm_drift *d, double x);

/* Flags per sample of et_oselm_detect_stream. */
#define ET_DETECT_LEARNED 1      /* learned into its environment */
#define ET_DETECT_REFUSED 2      /* not finite: not scored, not learned */
#define ET_DETECT_ALARM 4        /* ratio > 1 */
#define ET_DETECT_DRIFT 8        /* the change detector fired on this sample (not learned) */
#define ET_DETECT_UPDATE_REFUSED 16
#define ET_DETECT_MAX_ENV 64 /* under the bar but the update was refused (state unchanged) */

/*
 * The detector's stream (AnomalyDetector.learn_one, sample after sample) over n_env
 * autoencoder environments (n == m, the same n for all): for each row x (n) of xs, every
 * environment e standardises it, z = (x - mean_e) * inv_std_e, and scores it, ratio_e =
 * mean((beta_e' h_e(z) - z)^2) / threshold_e; the best environment k = argmin (first of
 * equals) gives ratio[r] and env[r]. The ratio feeds the change detector; on a change the
 * sample is not learned and, if stop_on_drift, the call returns after it. Otherwise a
 * sample with ratio <= learn_below is learned into environment k (never an alarm: a
 * learn_below above 1 is the caller's to refuse). A row with NaN or inf is refused whole.
 * Every environment has the same n and the same L (n_hidden); n_env <= ET_DETECT_MAX_ENV.
 * mean, inv_std: n_env * n; threshold: n_env (> 0); zbuf: scratch of n_env * (n + 2 L) floats.
 * Returns the number of rows processed (n_samples unless it stopped at a change), or < 0.
 */
int32_t et_oselm_detect_stream(void *const *states, int32_t n_env, const float *mean, const float *inv_std,
                               const double *threshold, const float *xs, int32_t n_samples, double learn_below,
                               et_oselm_drift *drift, int32_t stop_on_drift, float *zbuf,
                               double *ratio, int32_t *env, int32_t *flags);

#endif
