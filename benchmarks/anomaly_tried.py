"""What was tried to lift the detector's AUC on the fan damage tasks, each on the same six tasks
(on the 12 speed tasks every variant below scores 1.000, as docs/anomaly.md shows for the
configurations it keeps). Printed as a Markdown table of ROC AUCs:

- the ridge regularisation delta (0.1, 1, 10, 100) with 64 hidden units on the 512 bins;
- the OS-ELM's own leverage h'Ph (a Mahalanobis distance in its hidden space) as the score,
  alone, and summed or maxed with the reconstruction error (each divided by its 0.95
  quantile on the training data);
- averaging the amplitudes of 1, 2, 4 or 8 adjacent bins before the log (512, 256, 128 or 64
  bands), 64 hidden units.

With ``--held-out``, the band count of the default (128 hidden units) chosen without the
test labels of the task it is scored on: on all 18 built-in tasks, for each task the band
count among none (512 bins), 256, 128, 64, 32 and 16 chosen on the 17 OTHER tasks (leave one
task out: by the best mean AUC, or by the most tasks at or above the best baseline; see
benchmarks.anomaly.held_out), then that task's AUC with it against its best baseline
(IsolationForest, LOF, PCA, HalfSpaceTrees on the 512-bin log spectra, as benchmarks.anomaly
fits them). docs/anomaly.md carries the same table from benchmarks.anomaly's run.

With ``--combined``, on all 18 tasks, the same held-out choices for scores with a linear
reconstruction term beside the detector's (an identity-activation OS-ELM autoencoder with
bands/4 hidden units, or PCA(0.95) on the same bands; each divided by its spread on normal
data, summed or maxed), and the band count chosen on each task's own normal data (two rules);
docs/anomaly.md carries the summary ("Tried: ...") from benchmarks.anomaly's run.

    python -m benchmarks.anomaly_tried --data-dir ../shared/data      # about a minute
    python -m benchmarks.anomaly_tried --data-dir ../shared/data --held-out
    python -m benchmarks.anomaly_tried --data-dir ../shared/data --combined   # about a minute
    python -m benchmarks.anomaly_tried --data-dir ../shared/data --ensemble   # about a minute

With ``--ensemble``, on all 18 tasks and 3 detector seeds, the candidates of
ENSEMBLE_CANDIDATES (fixed before any was measured): sums or maxima over band counts of the
detector's error, each member on a scale from its own normal data (its threshold, or a robust
median / 0.95-point standardisation of its log out-of-sample normal errors), one with a linear
member; the candidate chosen by leaving each task out (as --held-out chooses a band count), and
what each would cost against the streaming (>= 10x HalfSpaceTrees) and state targets.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ._util import REPO, emit

TASKS = [f"fan-damage{d}-{e}" for d in (1, 2) for e in ("silentA", "silentB", "noisy")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--held-out", action="store_true",
                   help="the band count chosen by leaving each task out (all 18 tasks), against the baselines")
    p.add_argument("--combined", action="store_true",
                   help="held-out choices for scores with a linear reconstruction term, and a normal-data rule")
    p.add_argument("--ensemble", action="store_true",
                   help="ensembles over band counts, each member standardised on normal data, held out, 3 seeds")
    args = p.parse_args(argv)
    if args.ensemble:
        return ensemble(args.data_dir)
    if args.combined:
        return combined(args.data_dir)
    if args.held_out:
        return held_out(args.data_dir)
    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task
    from edgetune.stream.metrics import roc_auc
    from edgetune.threads import set_blas_threads
    set_blas_threads(1)

    rows: dict[str, list[float]] = {}

    def add(name, v):
        rows.setdefault(name, []).append(v)

    for name in TASKS:
        t = load_anomaly_task(name, args.data_dir)
        for delta in (0.1, 1.0, 10.0, 100.0):
            d = AnomalyDetector(transform="log", delta=delta).fit(t.x_train)
            add(f"512 bins, delta {delta:g}", roc_auc(t.y_test, -d.score_samples(t.x_test)))
        d = AnomalyDetector(transform="log").fit(t.x_train)
        env, m = d.environments_[0], d.environments_[0].model

        def scores(x):
            z = (d._features(x.astype(np.float64)) - env.mean) / env.std
            h = m.hidden(z)
            return np.mean((h @ m.beta_ - z) ** 2, axis=1), np.sum((h @ m.P_) * h, axis=1)

        (etr, ltr), (ete, lte) = scores(t.x_train), scores(t.x_test)
        ce, cl = np.quantile(etr, 0.95), np.quantile(ltr, 0.95)
        add("512 bins: reconstruction error (the detector)", roc_auc(t.y_test, ete))
        add("512 bins: leverage h'Ph", roc_auc(t.y_test, lte))
        add("512 bins: error + leverage", roc_auc(t.y_test, ete / ce + lte / cl))
        add("512 bins: max(error, leverage)", roc_auc(t.y_test, np.maximum(ete / ce, lte / cl)))
        for bands in (256, 128, 64):
            d = AnomalyDetector(transform="log", bands=bands).fit(t.x_train)
            add(f"{bands} bands", roc_auc(t.y_test, -d.score_samples(t.x_test)))
        emit(f"  {name} done", sys.stderr)
    emit("| variant (64 hidden units) | " + " | ".join(n[4:] for n in TASKS) + " |")
    emit("|---|" + "---|" * len(TASKS))
    for k, v in rows.items():
        emit(f"| {k} | " + " | ".join(f"{a:.3f}" for a in v) + " |")
    return 0


def held_out(data_dir: str) -> int:
    from edgetune.data.anomaly import builtin_names
    from edgetune.threads import set_blas_threads

    from .anomaly import band_aucs
    from .anomaly import held_out as held_out_lines
    set_blas_threads(1)
    t0 = time.perf_counter()
    tasks = [n for n in builtin_names() if not n.endswith("-move")]
    auc = band_aucs(tasks, data_dir)
    base, base_name = best_baselines(tasks, data_dir)
    for line in held_out_lines(tasks, auc, base, base_name):
        emit(line)
    emit(f"({time.perf_counter() - t0:.0f} s)")
    return 0

LINEAR_SHARE = 4   # the linear autoencoder's hidden units: the band count / LINEAR_SHARE


def _ratios(d, x):
    """Each sample's reconstruction error / the detector's threshold (its out-of-sample 0.95
    point on the normal training data): the score normalised by its spread on normal data."""
    return -d.score_samples(x)


def _pca_ratio(x_train, x_test, bands):
    """PCA(0.95) reconstruction error on the detector's own features (bands, log, standardised),
    normalised like the detector's: by the 0.95 point of its errors on a normal half it was not
    fitted on (the other half), then refitted on all the normal data."""
    from sklearn.decomposition import PCA

    from edgetune import AnomalyDetector
    f = lambda x: AnomalyDetector(transform="log", bands=bands)._features(x.astype(np.float64))  # noqa: E731
    ftr = f(x_train)
    mean, std = ftr.mean(0), ftr.std(0)
    std[std < 1e-8] = 1.0
    z = (ftr - mean) / std
    order = np.random.default_rng(0).permutation(len(z))
    a, b = order[: len(z) // 2], order[len(z) // 2:]
    err = lambda p, q: np.mean((p.inverse_transform(p.transform(q)) - q) ** 2, axis=1)  # noqa: E731
    scale = np.quantile(err(PCA(0.95, random_state=0).fit(z[a]), z[b]), 0.95)
    p = PCA(0.95, random_state=0).fit(z)
    return err(p, (f(x_test) - mean) / std) / scale


def _stability(x_train, bands, n_hidden=128):
    """Two normal-data-only figures of a band count: fit on one half of the normal data, score
    the other half (both ways), the errors divided by the fitted half's threshold. *spread*: their
    0.95 point / median (the smaller, the tighter normal data sit under the threshold);
    *calibration*: how far their 0.95 point is from 1, in ratio (none when the threshold set on
    one half holds on the other: the normalised error is stable from one half to the other)."""
    from edgetune import AnomalyDetector
    order = np.random.default_rng(1).permutation(len(x_train))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    spread, calib = [], []
    for a, b in (halves, halves[::-1]):
        d = AnomalyDetector(transform="log", bands=bands, n_hidden=n_hidden).fit(x_train[a])
        e = -d.score_samples(x_train[b])
        spread.append(np.quantile(e, 0.95) / np.median(e))
        calib.append(abs(np.log(np.quantile(e, 0.95))))
    return float(np.mean(spread)), float(np.mean(calib))


KINDS = ("sigmoid (the detector)", f"linear (identity, bands/{LINEAR_SHARE} hidden)", "sigmoid + linear",
         "max(sigmoid, linear)", "PCA(0.95) on the same features", "sigmoid + PCA", "max(sigmoid, PCA)")
RULES = ("spread: the smallest 0.95 point / median", "calibration: the 0.95 point closest to 1 (in ratio)")


def combined_measure(tasks, data_dir):
    """(kind -> (tasks, band counts) ROC AUCs, (rules, tasks, band counts) normal-data figures).
    Every score is an error over its own threshold-like spread on normal data (no test labels),
    so sums and maxima of two of them weigh both alike."""
    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task
    from edgetune.stream.metrics import roc_auc

    from .anomaly import HELD_OUT_BANDS as bands
    auc = {k: np.zeros((len(tasks), len(bands))) for k in KINDS}
    stab = np.zeros((len(RULES), len(tasks), len(bands)))
    for i, name in enumerate(tasks):
        t = load_anomaly_task(name, data_dir)
        for j, b in enumerate(bands):
            n_in = b or t.x_train.shape[1]
            sig = _ratios(AnomalyDetector(transform="log", bands=b, n_hidden=128).fit(t.x_train), t.x_test)
            lin = _ratios(AnomalyDetector(transform="log", bands=b, n_hidden=max(2, n_in // LINEAR_SHARE),
                                          activation="identity").fit(t.x_train), t.x_test)
            pca = _pca_ratio(t.x_train, t.x_test, b)
            for k, s in zip(KINDS, (sig, lin, sig + lin, np.maximum(sig, lin), pca, sig + pca,
                                    np.maximum(sig, pca))):
                auc[k][i, j] = roc_auc(t.y_test, s)
            stab[:, i, j] = _stability(t.x_train, b)
        emit(f"  {name}: " + "  ".join(f"{k[:8]} {auc[k][i].round(3).tolist()}" for k in KINDS), sys.stderr)
    return auc, stab


def combined_summary(tasks, auc, stab, base) -> list[str]:
    """One row per score: tasks won per band count (in-sample) and by each held-out choice; then
    the band count chosen on each task's own normal data."""
    from .anomaly import HELD_OUT_BANDS as bands
    from .anomaly import _bands_label, held_out_choice
    n = len(tasks)
    out = ["| score (128 hidden units; linear: bands/4) | " + " | ".join(_bands_label(b) for b in bands)
           + " | held out: mean AUC | held out: tasks won | tasks lost by either held-out choice |",
           "|---|" + "---|" * (len(bands) + 3)]
    for k in KINDS:
        won, by_mean, by_wins, win_mean, win_wins = held_out_choice(auc[k], base)
        lost = sorted({tasks[i] for i in range(n) if not (win_mean[i] and win_wins[i])})
        out.append(f"| {k} | " + " | ".join(f"{int(won[:, j].sum())}" for j in range(len(bands)))
                   + f" | **{sum(win_mean)} of {n}** | **{sum(win_wins)} of {n}** | {', '.join(lost) or 'none'} |")
    out += ["", "| band count chosen on the task's own normal data (sigmoid detector) | chosen | tasks at or "
            "above the best baseline |", "|---|---|---|"]
    r3 = lambda v: round(float(v), 3)  # noqa: E731
    for r, rule in enumerate(RULES):
        js = [int(np.argmin(stab[r, i])) for i in range(n)]
        chosen = {}
        for j in js:
            chosen[_bands_label(bands[j])] = chosen.get(_bands_label(bands[j]), 0) + 1
        won = sum(r3(auc[KINDS[0]][i, j]) >= r3(base[i]) for i, j in enumerate(js))
        out.append(f"| {rule} | " + ", ".join(f"{c} on {v}" for c, v in chosen.items())
                   + f" | **{won} of {n}** |")
    return out


def combined(data_dir: str) -> int:
    """The held-out choice of the band count for scores with a linear reconstruction term."""
    from edgetune.data.anomaly import builtin_names
    from edgetune.threads import set_blas_threads

    from .anomaly import HELD_OUT_BANDS, _bands_label
    from .anomaly import held_out as held_out_lines
    set_blas_threads(1)
    t0 = time.perf_counter()
    tasks = [n for n in builtin_names() if not n.endswith("-move")]
    base, base_name = best_baselines(tasks, data_dir)
    auc, stab = combined_measure(tasks, data_dir)
    for line in combined_summary(tasks, auc, stab, base):
        emit(line)
    for k in KINDS:
        emit(f"\n#### {k}\n")
        for line in held_out_lines(tasks, auc[k], base, base_name):
            emit(line)
    for r, rule in enumerate(RULES):
        emit(f"\n#### {rule} of the out-of-sample normalised normal errors\n")
        emit("| task | " + " | ".join(_bands_label(b) for b in HELD_OUT_BANDS) + " |")
        emit("|---|" + "---|" * len(HELD_OUT_BANDS))
        for i, name in enumerate(tasks):
            emit(f"| {name} | " + " | ".join(f"{v:.2f}" for v in stab[r, i]) + " |")
    emit(f"({time.perf_counter() - t0:.0f} s)")
    return 0


# ---------------------------------------------------------------- --ensemble
# The candidates, fixed before any of them was measured: (label, band counts, how each member's
# error is put on a common scale, how the members are combined, with a linear member or not).
# *ratio*: error / the member's threshold (its 0.95 point of the out-of-sample normal errors);
# *log-z*: (log error - median) / (0.95 point - median) of the log out-of-sample normal errors
# (a robust, quantile-based standardisation). No test label enters any of them.
ENSEMBLE_SEEDS = (0, 1, 2)
ENSEMBLE_LINEAR_BANDS = 64   # the linear member: identity OS-ELM on 64 bands, 64/LINEAR_SHARE hidden
ENSEMBLE_CANDIDATES = (
    ("64 bands alone (the default)", (64,), "ratio", "sum", False, 128),
    ("16/64/256 bands, sum of ratios", (16, 64, 256), "ratio", "sum", False, 128),
    ("16/64/256 bands, max of ratios", (16, 64, 256), "ratio", "max", False, 128),
    ("16/64/256 bands, sum of log-z", (16, 64, 256), "logz", "sum", False, 128),
    ("16/64/256 bands, max of log-z", (16, 64, 256), "logz", "max", False, 128),
    ("32/64/128 bands, sum of log-z", (32, 64, 128), "logz", "sum", False, 128),
    ("all six counts, sum of log-z", (None, 256, 128, 64, 32, 16), "logz", "sum", False, 128),
    ("16/64/256 bands + linear, sum of log-z", (16, 64, 256), "logz", "sum", True, 128),
    # a second round, fixed after the first round's cost (every member at 128 hidden units was too
    # slow for the streaming target) and before its AUCs: smaller members
    ("16/64/256 bands, 64 hidden each, sum of ratios", (16, 64, 256), "ratio", "sum", False, 64),
    ("16/64/256 bands, 64 hidden each, sum of log-z", (16, 64, 256), "logz", "sum", False, 64),
    ("32/64/128 bands, 64 hidden each, sum of ratios", (32, 64, 128), "ratio", "sum", False, 64),
    ("16/64/256 bands, 32 hidden each, sum of ratios", (16, 64, 256), "ratio", "sum", False, 32),
)


def _members(cands=ENSEMBLE_CANDIDATES):
    """The (band count, hidden units) members the candidates need."""
    return sorted({(b, c[5]) for c in cands for b in c[1]}, key=lambda m: (-(m[0] or 1 << 30), m[1]))


def _member(x_train, x_test, bands, seed, activation="sigmoid", n_hidden=128):
    """One detector's test errors on two scales (ratio, log-z), from its own normal data: the
    out-of-sample calibration errors that fit sets its threshold from, captured as they pass."""
    from edgetune import AnomalyDetector
    from edgetune.stream import detector as detmod
    seen = []
    orig = detmod.threshold_from

    def capture(errors, method, fpr):
        seen.append(np.asarray(errors, np.float64).copy())
        return orig(errors, method, fpr)
    detmod.threshold_from = capture
    try:
        d = AnomalyDetector(transform="log", bands=bands, n_hidden=n_hidden, seed=seed,
                            activation=activation).fit(x_train)
    finally:
        detmod.threshold_from = orig
    env = d.environments_[0]
    if len(seen) != 1 or orig(seen[0], d.threshold, d.fpr) != env.threshold:
        raise RuntimeError("the calibration errors captured are not the ones fit set the threshold from")
    ratio = -d.score_samples(x_test)
    err = ratio * env.threshold
    cal = np.log(np.maximum(seen[-1], 1e-30))
    med, q95 = np.median(cal), np.quantile(cal, 0.95)
    logz = (np.log(np.maximum(err, 1e-30)) - med) / max(q95 - med, 1e-12)
    return {"ratio": ratio, "logz": logz}


def best_baselines(tasks: list[str], data_dir: str) -> tuple[list[float], list[str]]:
    """Each task's best baseline (IsolationForest, LOF, PCA, HalfSpaceTrees fitted on its normal
    data): its test AUC and its name."""
    from edgetune.stream.metrics import roc_auc
    from edgetune.data.anomaly import load_anomaly_task

    from .anomaly import fit_all
    base, base_name = [], []
    for name in tasks:
        t = load_anomaly_task(name, data_dir)
        bs = {k: roc_auc(t.y_test, f(t.x_test)) for k, f in fit_all(t.x_train, fit_et=False).items()}
        base_name.append(max(bs, key=bs.get))
        base.append(bs[base_name[-1]])
    return base, base_name


def ensemble_measure(tasks, data_dir, seeds=ENSEMBLE_SEEDS):
    """(seeds, tasks, candidates) ROC AUCs of ENSEMBLE_CANDIDATES."""
    from edgetune.data.anomaly import load_anomaly_task
    from edgetune.stream.metrics import roc_auc
    auc = np.zeros((len(seeds), len(tasks), len(ENSEMBLE_CANDIDATES)))
    for i, name in enumerate(tasks):
        t = load_anomaly_task(name, data_dir)
        for s, seed in enumerate(seeds):
            m = {(b, h): _member(t.x_train, t.x_test, b, seed, n_hidden=h) for b, h in _members()}
            n_lin = max(2, ENSEMBLE_LINEAR_BANDS // LINEAR_SHARE)
            lin = _member(t.x_train, t.x_test, ENSEMBLE_LINEAR_BANDS, seed, "identity", n_lin)
            for c, (_, bands, scale, how, linear, h) in enumerate(ENSEMBLE_CANDIDATES):
                parts = [m[b, h][scale] for b in bands] + ([lin[scale]] if linear else [])
                score = np.sum(parts, axis=0) if how == "sum" else np.max(parts, axis=0)
                auc[s, i, c] = roc_auc(t.y_test, score)
        emit(f"  {name}: " + "  ".join(f"{a:.3f}" for a in auc[:, i].mean(axis=0)), sys.stderr)
    return auc


def ensemble_summary(tasks, auc, base, base_name) -> list[str]:
    """Per candidate: tasks at or above the best baseline by the seeds' mean AUC and by their
    minimum; then the candidate chosen by leaving each task out (held_out_choice on the seeds'
    mean AUC), the left-out task scored with it by its mean and its minimum over the seeds."""
    from .anomaly import held_out_choice
    r3 = lambda v: round(float(v), 3)  # noqa: E731
    n, nc = len(tasks), len(ENSEMBLE_CANDIDATES)
    mean, low = auc.mean(axis=0), auc.min(axis=0)
    won_mean = np.array([[r3(mean[i, c]) >= r3(base[i]) for c in range(nc)] for i in range(n)])
    won_low = np.array([[r3(low[i, c]) >= r3(base[i]) for c in range(nc)] for i in range(n)])
    out = [f"| candidate ({len(auc)} detector seeds) | mean AUC over the tasks | lowest AUC (any task, any seed) | "
           "tasks won: seeds' mean | tasks won: every seed | tasks lost (seeds' mean) |", "|---|---|---|---|---|---|"]
    for c, cand in enumerate(ENSEMBLE_CANDIDATES):
        lost = [tasks[i] for i in range(n) if not won_mean[i, c]]
        out.append(f"| {cand[0]} | {mean[:, c].mean():.4f} | {low[:, c].min():.3f} | {int(won_mean[:, c].sum())} of {n}"
                   f" | {int(won_low[:, c].sum())} of {n} | {', '.join(lost) or 'none'} |")
    _, by_mean, by_wins, _, _ = held_out_choice(mean, base)
    out += ["", f"| task | best baseline | chosen by mean AUC on the other {n - 1} | its AUC: seeds' mean (min) "
            f"| chosen by tasks won on the other {n - 1}: tied candidates, those that lose this task "
            "| won by both choices |", "|---|---|---|---|---|---|"]
    both_mean = both_low = 0
    for i, name in enumerate(tasks):
        j, tie = by_mean[i], by_wins[i]
        ok_mean = won_mean[i, j] and all(won_mean[i, k] for k in tie)
        ok_low = won_low[i, j] and all(won_low[i, k] for k in tie)
        both_mean += ok_mean
        both_low += ok_low
        losers = [ENSEMBLE_CANDIDATES[k][0] for k in tie if not won_mean[i, k]]
        out.append(f"| {name} | {base[i]:.3f} ({base_name[i]}) | {ENSEMBLE_CANDIDATES[j][0]} | {mean[i, j]:.3f} "
                   f"({low[i, j]:.3f}) | {len(tie)} tied; {', '.join(losers) or 'none loses it'} | "
                   f"{'yes, every seed' if ok_low else ('by the seeds mean only' if ok_mean else 'no')} |")
    by_m = sum(won_mean[i, by_mean[i]] for i in range(n))
    by_m_low = sum(won_low[i, by_mean[i]] for i in range(n))
    out += ["", f"Held out by mean AUC: at or above the best baseline on **{by_m} of {n}** tasks by the seeds' mean "
            f"AUC (**{by_m_low} of {n}** with every seed). Held out by both choices: **{both_mean} of {n}** "
            f"(**{both_low} of {n}** with every seed)."]
    return out


def ensemble(data_dir: str) -> int:
    """Ensembles over band counts (and a linear member), each member standardised on its own
    normal data, chosen by leaving each task out; 3 detector seeds."""
    from edgetune.data.anomaly import builtin_names
    from edgetune.threads import set_blas_threads

    set_blas_threads(1)
    t0 = time.perf_counter()
    tasks = [n for n in builtin_names() if not n.endswith("-move")]
    base, base_name = best_baselines(tasks, data_dir)
    auc = ensemble_measure(tasks, data_dir)
    for line in ensemble_summary(tasks, auc, base, base_name):
        emit(line)
    emit("\n| task | " + " | ".join(c[0] for c in ENSEMBLE_CANDIDATES) + " |")
    emit("|---|" + "---|" * len(ENSEMBLE_CANDIDATES))
    for i, name in enumerate(tasks):
        emit(f"| {name} | " + " | ".join(f"{m:.3f} ({lo:.3f})" for m, lo in
                                          zip(auc[:, i].mean(axis=0), auc[:, i].min(axis=0))) + " |")
    for line in ensemble_cost(data_dir)[0]:
        emit(line)
    emit(f"({time.perf_counter() - t0:.0f} s)")
    return 0


def ensemble_cost(data_dir: str, n: int = 5000, rounds: int = 3) -> tuple[list[str], dict[str, float]]:
    """What an ensemble would cost against the streaming and state targets: each member's
    learn_many (C) on the same stream as benchmarks.anomaly's throughput (fan-damage1-noisy,
    n samples, best of ``rounds`` interleaved rounds) beside river's HalfSpaceTrees, the members
    run one after the other (an ensemble runs every member on every sample: its rate is
    1 / the sum of 1 / the members' rates), and the members' C states on a Cortex-M4.
    Returns the Markdown lines and each candidate's rate / HalfSpaceTrees'."""
    n_lin = max(2, ENSEMBLE_LINEAR_BANDS // LINEAR_SHARE)
    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task

    from .anomaly import EPS, Standard, _hst, _state_bytes
    t = load_anomaly_task("fan-damage1-noisy", data_dir)
    x = np.vstack([t.x_test] * (n // len(t.x_test) + 1))[:n]
    rate: dict = {}
    st = Standard(np.log(t.x_train + EPS))
    keys = [f"f{i}" for i in range(x.shape[1])]
    m = min(n, 2000)
    for _ in range(rounds):
        n_lin = max(2, ENSEMBLE_LINEAR_BANDS // LINEAR_SHARE)
        for key in _members() + [("linear", n_lin)]:
            b, h = (ENSEMBLE_LINEAR_BANDS, n_lin) if key[0] == "linear" else key
            det = AnomalyDetector(transform="log", bands=b, n_hidden=h,
                                  activation="identity" if key[0] == "linear" else "sigmoid").fit(t.x_train)
            det.learn_many(x[:1], engine="c")
            t1 = time.perf_counter()
            det.learn_many(x[1:], engine="c")
            rate[key] = max(rate.get(key, 0.0), (n - 1) / (time.perf_counter() - t1))
        hst = _hst()
        for row in st.unit(np.log(t.x_train + EPS)):
            hst.learn_one(dict(zip(keys, row)))
        t1 = time.perf_counter()
        for row in x[:m]:
            d = dict(zip(keys, st.unit(np.log(row[None, :] + EPS))[0]))
            hst.score_one(d)
            hst.learn_one(d)
        rate["hst"] = max(rate.get("hst", 0.0), m / (time.perf_counter() - t1))
    out = ["", f"Cost of the candidates ({n:,} samples of fan-damage1-noisy, learn_many in C, one "
           f"thread, best of {rounds} rounds; river HalfSpaceTrees on the 512 bins: {rate['hst']:,.0f} samples/s in "
           "the same run; target >= 10x; state: one environment on a Cortex-M4, from C):", "",
           "| candidate | samples / s | vs HalfSpaceTrees | state on a Cortex-M4 (bytes) |", "|---|---|---|---|"]
    vs: dict[str, float] = {}
    for label, bands, _, _, linear, h in ENSEMBLE_CANDIDATES:
        keys = [(b, h) for b in bands] + ([("linear", n_lin)] if linear else [])
        r = 1.0 / sum(1.0 / rate[k] for k in keys)
        state = sum(_state_bytes(dict(bands=b, n_hidden=h)) for b in bands)
        state += _state_bytes(dict(bands=ENSEMBLE_LINEAR_BANDS, n_hidden=n_lin)) if linear else 0
        out.append(f"| {label} | {r:,.0f} | {r / rate['hst']:.1f}x | {state:,} |")
        vs[label] = r / rate["hst"]
    return out, vs

if __name__ == "__main__":
    sys.exit(main())
