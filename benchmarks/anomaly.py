"""Anomaly detection learned from normal data only: edgetune beside scikit-learn and river.

Every detector is fitted on the same normal data of each built-in task (the cooling-fan
tasks of docs/anomaly.md) and sees the same input, log(spectrum + 0.001), standardised
with the training data's mean and std (HalfSpaceTrees: scaled to [0, 1] by the training
data's min and max, as it expects):

    edgetune   AnomalyDetector(transform="log", bands=64, n_hidden=128): OS-ELM autoencoder over
               64 bands of the spectrum (other configurations beside it)
    IForest    sklearn IsolationForest(random_state=0)
    LOF        sklearn LocalOutlierFactor(novelty=True)
    PCA        reconstruction error of sklearn PCA(0.95 of the variance)
    HST        river HalfSpaceTrees(seed=0, window_size=100), learned one sample at a time

Then the move from the quiet rooms to the noisy one (before, after the move without and
with re-learning, the quiet rooms after re-learning; scikit-learn and river re-learn by
fitting again on the old and new normal data together), a test-then-train stream with the
change detector, and the streaming throughput (samples scored and learned per second, one
thread) of edgetune and HalfSpaceTrees on the same stream, in the same run; the band count
chosen by leaving each task out; and `edgetune detect stream` on a file, learn_one per line
against the compiled loop.

    python -m benchmarks.anomaly --data-dir ../shared/data --out docs/anomaly.md
    python -m benchmarks.anomaly --quick      # a few tasks, a short stream
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ._util import REPO, emit, machine_info

EPS = 1e-3


def _need():
    try:
        import river  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("benchmarks.anomaly needs scikit-learn and river: pip install -c constraints.txt '.[anomaly-bench]'")


class Standard:
    def __init__(self, x):
        self.mean = x.mean(0)
        self.std = x.std(0)
        self.std[self.std < 1e-8] = 1.0
        self.lo, self.hi = x.min(0), x.max(0)

    def z(self, x):
        return (x - self.mean) / self.std

    def unit(self, x):
        return np.clip((x - self.lo) / np.where(self.hi > self.lo, self.hi - self.lo, 1.0), 0.0, 1.0)


def _hst(seed=0):
    """Its scores stay 0 until two windows are learned: a window of 100 fits every task's data."""
    from river.anomaly import HalfSpaceTrees
    return HalfSpaceTrees(seed=seed, window_size=100)


def band(x: np.ndarray, bands: int) -> np.ndarray:
    """Mean of adjacent bins, as AnomalyDetector(bands=) computes it."""
    e = np.linspace(0, x.shape[1], bands + 1).round().astype(np.int64)
    return np.add.reduceat(x, e[:-1], axis=1) / np.diff(e)


def baselines_on_bands(x_train: np.ndarray, bands: int) -> dict[str, object]:
    """IForest, LOF and PCA on the same 64-band input as edgetune's default."""
    out = fit_all(band(x_train, bands), fit_et=False, hst=False)
    return {k: (lambda x, f=v: f(band(x, bands))) for k, v in out.items()}


def fit_all(x_train: np.ndarray, fit_et=True, hst=True) -> dict[str, object]:
    """Fitted detectors, each as a function x -> anomaly score (higher = more anomalous)."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor

    from edgetune import AnomalyDetector

    f = np.log(x_train + EPS)
    st = Standard(f)
    z = st.z(f)
    out = {}
    if fit_et:
        det = AnomalyDetector(**DEFAULT).fit(x_train)
        out["edgetune"] = lambda x, d=det: -d.score_samples(x)
        out["_det"] = det
    iso = IsolationForest(random_state=0).fit(z)
    out["IForest"] = lambda x: -iso.score_samples(st.z(np.log(x + EPS)))
    lof = LocalOutlierFactor(novelty=True).fit(z)
    out["LOF"] = lambda x: -lof.score_samples(st.z(np.log(x + EPS)))
    pca = PCA(0.95, random_state=0).fit(z)
    def pca_err(x):
        q = st.z(np.log(x + EPS))
        return np.mean((pca.inverse_transform(pca.transform(q)) - q) ** 2, axis=1)
    out["PCA"] = pca_err
    if not hst:
        return out
    hst = _hst()
    u = st.unit(f)
    keys = [f"f{i}" for i in range(u.shape[1])]
    for row in u:
        hst.learn_one(dict(zip(keys, row)))
    out["HST"] = lambda x: np.array([hst.score_one(dict(zip(keys, r))) for r in st.unit(np.log(x + EPS))])
    return out


NAMES = ("edgetune", "IForest", "LOF", "PCA", "HST")
# edgetune's configurations measured beside the default (none of them counted in the bold)
DEFAULT = dict(transform="log", bands=64, n_hidden=128)
CONFIGS = {"before: 512 bins, 64 hidden": dict(transform="log", n_hidden=64),
           "512 bins, 256 hidden": dict(transform="log", n_hidden=256),
           "64 bands, 64 hidden": dict(transform="log", bands=64, n_hidden=64),
           "128 bands, 128 hidden": dict(transform="log", bands=128, n_hidden=128)}
VARIANTS = tuple(CONFIGS) + ("edgetune backbone",)
BANDS = 64   # the baselines again, on the default's 64-band input


def speed_backbone(env, data_dir, _cache={}):
    """A speed classifier (h/m/l/o) pre-trained on the environment's constant-speed *normal*
    recordings: a frozen backbone whose features never saw a damaged fan."""
    if env not in _cache:
        from edgetune import pretrain
        from edgetune.data.fan import list_recordings, load_recording

        xs, ys = [], []
        for k, sp in enumerate("hmlo"):
            rec = list_recordings(data_dir, size="12cm", speed=sp, type="normal", environment=env, part="")[0]
            x = load_recording(rec.path)[0]
            xs.append(x)
            ys.append(np.full(len(x), k))
        _cache[env], _ = pretrain(np.log(np.concatenate(xs) + EPS), np.concatenate(ys), hidden=[96, 96],
                                  labels=list("hmlo"), epochs=30, seed=0)
    return _cache[env]


def per_task(tasks, data_dir):
    from edgetune.data.anomaly import load_anomaly_task
    from edgetune.stream.metrics import pauc, roc_auc

    from edgetune import AnomalyDetector

    rows = []
    for name in tasks:
        t = load_anomaly_task(name, data_dir)
        dets = fit_all(t.x_train)
        for k, cfg in CONFIGS.items():
            d = AnomalyDetector(**cfg).fit(t.x_train)
            dets[k] = lambda x, d=d: -d.score_samples(x)
        if "damage" in name:   # the rpm tasks' anomalies are other speeds: a speed backbone has seen them
            bb = speed_backbone(name.rsplit("-", 1)[1], data_dir)
            fd = AnomalyDetector("backbone", backbone=bb, transform="log").fit(t.x_train)
            dets["edgetune backbone"] = lambda x, d=fd: -d.score_samples(x)
        for k, f in baselines_on_bands(t.x_train, BANDS).items():
            dets[f"{k} (bands)"] = f
        r = {"task": name}
        for k in dets:
            if k.startswith("_"):
                continue
            s = dets[k](t.x_test)
            r[k] = (roc_auc(t.y_test, s), pauc(t.y_test, s, 0.1))
        rows.append(r)
        emit(f"  {name}: " + "  ".join(f"{k} {r[k][0]:.3f}" for k in NAMES + VARIANTS[:1]), sys.stderr)
    return rows


HELD_OUT_BANDS = (None, 256, 128, 64, 32, 16)   # the band counts a held-out choice picks from


def band_aucs(tasks, data_dir, bands=HELD_OUT_BANDS, n_hidden=128):
    """(tasks, band counts) ROC AUCs of AnomalyDetector(transform="log", bands=b, n_hidden)."""
    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task
    from edgetune.stream.metrics import roc_auc

    auc = np.zeros((len(tasks), len(bands)))
    for i, name in enumerate(tasks):
        t = load_anomaly_task(name, data_dir)
        for j, b in enumerate(bands):
            d = AnomalyDetector(transform="log", bands=b, n_hidden=n_hidden).fit(t.x_train)
            auc[i, j] = roc_auc(t.y_test, -d.score_samples(t.x_test))
        emit(f"  {name}: " + "  ".join(f"{_bands_label(b)} {a:.3f}" for b, a in zip(bands, auc[i])), sys.stderr)
    return auc


def _bands_label(b) -> str:
    return "512 bins" if b is None else f"{b} bands"


def held_out_choice(auc, base):
    """held_out's two leave-one-task-out choices over the columns of ``auc`` (tasks, choices):
    (won: (tasks, choices) at or above the best baseline to 3 decimals, the mean-AUC choice per
    task, the tied tasks-won choices per task, and whether each task is won by each rule)."""
    r3 = lambda v: round(float(v), 3)  # noqa: E731
    n, c = auc.shape
    won = np.array([[r3(auc[i, j]) >= r3(base[i]) for j in range(c)] for i in range(n)])
    by_mean, by_wins, win_mean, win_wins = [], [], [], []
    for i in range(n):
        mean = np.delete(auc, i, axis=0).mean(axis=0)
        j = max(k for k in range(c) if mean[k] >= mean.max() - 1e-9)
        by_mean.append(j)
        win_mean.append(bool(won[i, j]))
        w = np.delete(won, i, axis=0).sum(axis=0)
        tie = [k for k in range(c) if w[k] == w.max()]
        by_wins.append(tie)
        win_wins.append(all(won[i, k] for k in tie))
    return won, by_mean, by_wins, win_mean, win_wins


def held_out(tasks, auc, base, base_name, bands=HELD_OUT_BANDS) -> list[str]:
    """The band count chosen without the scored task's test labels: leave each task out, choose
    on the other tasks, score the left-out task with the choice against its best baseline (AUCs
    compared as printed, to 3 decimals, as the bold of the AUC table). Two choices:

    - *mean AUC*: the count with the best mean AUC over the other tasks (a tie, to 1e-9, goes to
      the fewer bands: the smaller state);
    - *tasks won*: the counts at or above the best baseline on the most other tasks; when several
      tie, the left-out task counts as won only if every one of them wins it."""
    won, by_mean, by_wins, win_mean, win_wins = held_out_choice(auc, base)
    lab = lambda js: " / ".join(_bands_label(bands[k]) for k in js)  # noqa: E731
    out = ["| task | " + " | ".join(_bands_label(b) for b in bands) + " | best baseline | chosen by mean AUC "
           "(its AUC) | chosen by tasks won |", "|---|" + "---|" * (len(bands) + 3)]
    for i, name in enumerate(tasks):
        out.append(f"| {name} | " + " | ".join(f"**{a:.3f}**" if won[i, k] else f"{a:.3f}"
                                               for k, a in enumerate(auc[i]))
                   + f" | {base[i]:.3f} ({base_name[i]}) | {lab([by_mean[i]])} ({auc[i, by_mean[i]]:.3f}) "
                   f"| {lab(by_wins[i])} |")
    out.append("| mean AUC over the tasks | " + " | ".join(f"{a:.4f}" for a in auc.mean(axis=0)) + " | | | |")
    out.append("| tasks at or above the best baseline | " + " | ".join(
        f"{int(won[:, k].sum())} of {len(tasks)}" for k in range(len(bands))) + " | | | |")
    counts = {}
    for j in by_mean:
        counts[_bands_label(bands[j])] = counts.get(_bands_label(bands[j]), 0) + 1
    ties = sorted({lab(t) for t in by_wins})
    out += ["", f"Held out by mean AUC: at or above the best baseline on **{sum(win_mean)} of {len(tasks)}** tasks "
            "(chosen: " + ", ".join(f"{k} on {v} of {len(tasks)}" for k, v in counts.items()) + "). "
            f"Held out by tasks won: **{sum(win_wins)} of {len(tasks)}** (the counts tied on the other tasks: "
            + "; ".join(ties) + ")."]
    return out


def move(tasks, data_dir):
    from edgetune.data.anomaly import load_anomaly_task
    from edgetune.stream.metrics import roc_auc

    rows = []
    for name in tasks:
        t = load_anomaly_task(name, data_dir)
        xs, ys = t.extra_tests["silent"]
        old = fit_all(t.x_train)
        new = fit_all(np.vstack([t.x_train, t.x_adapt]), fit_et=False)
        det = old["_det"]
        for k in NAMES:
            before, moved = roc_auc(ys, old[k](xs)), roc_auc(t.y_test, old[k](t.x_test))
            if k == "edgetune":
                det.adapt(t.x_adapt)
                after, kept = roc_auc(t.y_test, -det.score_samples(t.x_test)), roc_auc(ys, -det.score_samples(xs))
            else:
                after, kept = roc_auc(t.y_test, new[k](t.x_test)), roc_auc(ys, new[k](xs))
            rows.append({"task": name, "detector": k, "before": before, "moved": moved, "relearned": after,
                         "old_room": kept})
    return rows


def stream_curve(data_dir, block=50):
    """Test-then-train over the move: quiet-room normal samples, then the noisy room's normal
    training part, then its test part (normal and damaged, shuffled). Alarm rate per block on
    normal and on damaged samples, with the change detector reporting only (confirm) or
    re-learning (auto)."""
    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task

    t = load_anomaly_task("fan-damage1-move", data_dir)
    xs, ys = t.extra_tests["silent"]
    quiet = xs[ys == 0][::2][:200]
    order = np.random.default_rng(0).permutation(len(t.y_test))
    x = np.vstack([quiet, t.x_adapt, t.x_test[order]])
    y = np.r_[np.zeros(len(quiet) + len(t.x_adapt)), t.y_test[order]]
    phase = np.r_[np.zeros(len(quiet)), np.ones(len(t.x_adapt)), 2 * np.ones(len(order))]
    curves = {}
    for policy, below in (("confirm", 0.8), ("auto", 0.8), ("auto, learn_below 1", 1.0)):
        det = AnomalyDetector(**DEFAULT, relearn=policy.split(",")[0], relearn_samples=200,
                              learn_below=below).fit(t.x_train)
        outs = [det.learn_one(row) for row in x]
        alarm = np.array([o["alarm"] for o in outs], bool)
        drift = [i for i, o in enumerate(outs) if o["drift"]]
        blocks = []
        for lo in range(0, len(x), block):
            sl = slice(lo, lo + block)
            n_mask, a_mask = y[sl] == 0, y[sl] == 1
            blocks.append({"from": lo, "phase": int(phase[lo]),
                           "fpr": float(alarm[sl][n_mask].mean()) if n_mask.any() else None,
                           "tpr": float(alarm[sl][a_mask].mean()) if a_mask.any() else None})
        p2 = phase == 2
        curves[policy] = {"drift_at": drift, "blocks": blocks, "environments": len(det.environments_),
                          "tpr2": float(alarm[p2 & (y == 1)].mean()), "fpr2": float(alarm[p2 & (y == 0)].mean())}
    return curves, (len(quiet), len(t.x_adapt), len(order))


def throughput(data_dir, n, rounds=5):
    """Samples scored then learned per second on the same stream; the best of ``rounds``
    interleaved rounds (the machine is shared). edgetune as a user streams it: ``learn_one``
    per sample (NumPy) and ``learn_many`` over the stream (the loop in C: every environment
    scored, the change detector, the learning); HalfSpaceTrees one sample at a time."""
    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task

    t = load_anomaly_task("fan-damage1-noisy", data_dir)
    x = np.vstack([t.x_test] * (n // len(t.x_test) + 1))[:n]
    keys = [f"f{i}" for i in range(x.shape[1])]
    st = Standard(np.log(t.x_train + EPS))
    m = min(n, 2000)
    best: dict[str, float] = {}

    def keep(name, rate):
        best[name] = max(best.get(name, 0.0), rate)

    try:
        from edgetune.stream.native import library
        library()
        has_c = True
    except ImportError:
        has_c = False
    before = CONFIGS["before: 512 bins, 64 hidden"]
    stb = Standard(np.log(band(t.x_train, BANDS) + EPS))
    bkeys = keys[:BANDS]
    for _ in range(rounds):
        det = AnomalyDetector(**DEFAULT).fit(t.x_train)
        t0 = time.perf_counter()
        for row in x[:m]:
            det.learn_one(row)
        keep("edgetune learn_one (NumPy)", m / (time.perf_counter() - t0))
        if has_c:
            for name, cfg in (("edgetune learn_many (C)", DEFAULT),
                              ("edgetune learn_many (C), 512 bins, 64 hidden", before)):
                det = AnomalyDetector(**cfg).fit(t.x_train)
                det.learn_many(x[:1], engine="c")    # the C states are made once per detector
                t0 = time.perf_counter()
                det.learn_many(x[1:], engine="c")      # the transform and standardisation included
                keep(name, (n - 1) / (time.perf_counter() - t0))
        for name, scale, kk, b in (("river HalfSpaceTrees", st, keys, None),
                                   ("river HalfSpaceTrees, 64 bands", stb, bkeys, BANDS)):
            hst = _hst()
            for row in scale.unit(np.log((t.x_train if b is None else band(t.x_train, b)) + EPS)):
                hst.learn_one(dict(zip(kk, row)))
            t0 = time.perf_counter()
            for row in x[:m]:
                v = row[None, :] if b is None else band(row[None, :], b)
                d = dict(zip(kk, scale.unit(np.log(v + EPS))[0]))
                hst.score_one(d)
                hst.learn_one(d)
            keep(name, m / (time.perf_counter() - t0))
    best["_n"] = n
    if has_c:
        best["_update"] = update_cost(x, AnomalyDetector(**before).fit(t.x_train))
    return best


def cli_stream(data_dir, n, rounds=3):
    """``edgetune detect stream`` on a file of n CSV lines (fan-damage1-noisy's test spectra,
    6 significant digits), the default detector: the lines read together learned in the
    compiled loop (the default) against learn_one on each line (``--engine numpy``), and
    scoring only (``--no-learn``: each read's lines scored together by score_samples), best of
    ``rounds`` interleaved runs. samples / s from the command's own summary (the loop: read,
    parse, learn, write), and the whole process's wall time (start-up and loading included)."""
    import json
    import os
    import subprocess
    import tempfile

    from edgetune import AnomalyDetector
    from edgetune.data.anomaly import load_anomaly_task

    t = load_anomaly_task("fan-damage1-noisy", data_dir)
    x = np.vstack([t.x_test] * (n // len(t.x_test) + 1))[:n]
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.csv")
        with open(path, "w") as f:
            f.writelines(",".join(f"{v:.6g}" for v in row) + "\n" for row in x)
        AnomalyDetector(**DEFAULT).fit(t.x_train).save(os.path.join(tmp, "det"))
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        modes = {"numpy": ["--engine", "numpy"], "auto": ["--engine", "auto"], "no-learn": ["--no-learn"]}
        for _ in range(rounds):
            for engine, flags in modes.items():
                summary = os.path.join(tmp, "s.json")
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "edgetune", "detect", "stream", "--model",
                                    os.path.join(tmp, "det"), "--input", path, *flags, "--json", summary,
                                    "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                wall = time.perf_counter() - t0
                if r.returncode != 0:
                    raise SystemExit(f"edgetune detect stream failed: {r.stderr}")
                rate = json.loads(open(summary).read())["samples_per_second"]
                old = best.get(engine, (0.0, float("inf")))
                best[engine] = (max(old[0], rate), min(old[1], wall))
            for engine, flags in (("pipe no-learn", ["--no-learn"]), ("pipe", [])):
                best[engine] = max(best.get(engine, 0.0), _round_trips(os.path.join(tmp, "det"), x[:400], flags, env))
    return {"n": n, **best}


def _round_trips(model, x, flags, env):
    """Lines per second through ``edgetune detect stream`` on a stdin pipe when the writer waits
    for each line's answer before writing the next (start-up and the first line excluded)."""
    import subprocess
    lines = [",".join(f"{v:.6g}" for v in row) + "\n" for row in x]
    p = subprocess.Popen([sys.executable, "-m", "edgetune", "detect", "stream", "--model", model, *flags, "--quiet"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
    try:
        p.stdin.write(lines[0])
        p.stdin.flush()
        p.stdout.readline()
        t0 = time.perf_counter()
        for line in lines[1:]:
            p.stdin.write(line)
            p.stdin.flush()
            if not p.stdout.readline():
                raise SystemExit("edgetune detect stream stopped answering on a pipe")
        rate = (len(lines) - 1) / (time.perf_counter() - t0)
        p.stdin.close()
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    return rate


def update_cost(x, det, rounds=5):
    """One OS-ELM update in C against its arithmetic at the machine's measured rate.

    The update of an m-output model is 2 L^2 + 2 L m multiply-adds (P h, the rank-1 update of
    P, the output error, the rank-1 update of beta). Its time is the C stream's time per sample
    with every sample learned minus with none learned (scoring only). The machine's rate is
    the scoring pass's own: L n + L m multiply-adds (hidden layer, output) through the same
    kernels on the same state, so both sides see the same caches and the same shared CPU."""
    from edgetune.stream.native import NativeDetector

    env = det.environments_[0]
    z = np.ascontiguousarray((det._features(x) - env.mean) / env.std, dtype=np.float32)
    times = {}
    for mode, below in (("learn", 1e30), ("score", -1.0)):
        best = []
        for _ in range(rounds):
            nat = NativeDetector(det).native
            t0 = time.perf_counter()
            nat.ae_stream(z, below)
            best.append((time.perf_counter() - t0) / len(z))
        times[mode] = min(best)
    L, n_in = env.model.n_hidden, env.model.n_inputs
    macs = 2 * L * L + 2 * L * n_in
    rate = (L * n_in + L * n_in) / times["score"]
    upd = times["learn"] - times["score"]
    nat = NativeDetector(det)
    return {"L": L, "m": n_in, "update_us": upd * 1e6, "score_us": times["score"] * 1e6, "macs": macs,
            "rate_gmacs": rate / 1e9, "ideal_us": macs / rate * 1e6, "ratio": upd / (macs / rate),
            "state_bytes_kept": nat.native.nbytes,
            "state_bytes_regen": NativeDetector(det, keep_weights=False).native.nbytes}


def args_stream(tput):
    return f"{tput.get('_n', 0):,}"


def _cfg(cfg):
    bands = f"{cfg['bands']} bands" if cfg.get("bands") else "512 bins"
    return f"{bands}, {cfg['n_hidden']} hidden units"


def _state_bytes(cfg, n_in=512):
    """One environment's C state on a microcontroller (weights regenerated), from C."""
    from edgetune.stream.native import NativeOSELM
    d = cfg.get("bands") or n_in
    return NativeOSELM(d, d, cfg["n_hidden"], keep_weights=False).nbytes


def render(args, rows, moves, curves, sizes, tput, seconds, bands_auc=None, cli=None, tried=None,
           ensemble=None) -> str:
    import edgetune
    out = ["# Anomaly detection learned from normal data only", "",
           f"Generated by `python -m benchmarks.anomaly {' '.join(map(shlex.quote, args))}` "
           f"({seconds:.0f} s); do not edit by hand. What the detector is and how to use it: "
           "[docs/detect.md](detect.md).", ""]
    mi = machine_info()
    import river
    import sklearn
    out += [f"Machine: {mi.get('cpu')}; Python {mi.get('python')}, NumPy {mi.get('numpy')}, scikit-learn "
            f"{sklearn.__version__}, river {river.__version__}, edgetune {edgetune.__version__}.", "",
            "## ROC AUC (pAUC at FPR 0.1) per task", "",
            "Every detector is fitted on the task's normal training data alone. The baselines see the "
            "standardised log spectra (512 bins); edgetune (the default: " + _cfg(DEFAULT) + ") averages "
            "them into 64 bands itself. Best AUC of the row in bold.", "",
            "| task | " + " | ".join(NAMES) + " |", "|---|" + "---|" * len(NAMES)]
    wins = {k: 0 for k in ("edgetune",) + VARIANTS}
    for r in rows:
        best = max(r[k][0] for k in NAMES)
        base = max(r[k][0] for k in NAMES if k != "edgetune")
        cells = []
        for k in NAMES:
            a, p = r[k]
            c = f"{a:.3f} ({p:.3f})"
            cells.append(f"**{c}**" if a == best else c)
        for k in wins:
            wins[k] += k in r and r[k][0] >= base - 1e-12
        out.append(f"| {r['task']} | " + " | ".join(cells) + " |")
    n_damage = sum("damage" in r["task"] for r in rows)
    out += ["", f"edgetune (the default detector) has an AUC at or above the best baseline's on "
            f"**{wins['edgetune']} of {len(rows)}** tasks.", "",
            "### edgetune's configurations (same run, not counted in the bold)", "",
            "Each column is an AnomalyDetector fitted on the same normal data; *before* is the previous "
            "default. *backbone*: the same autoencoder over the 192 hidden features of a 512-96-96-4 speed "
            "classifier pre-trained (30 epochs) on the room's constant-speed normal recordings (damage tasks "
            "only: on the rpm tasks that backbone has seen the anomalies). State: one environment on a "
            "Cortex-M4 (the random input weights regenerated from the seed), from C's et_oselm_state_size.", "",
            "| task | default | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for r in rows:
        cells = [f"{r[k][0]:.3f}" if k in r else "" for k in ("edgetune",) + VARIANTS]
        out.append(f"| {r['task']} | " + " | ".join(cells) + " |")
    out.append("| tasks at or above the best baseline | " + " | ".join(
        f"{wins[k]} of {len(rows) if k != 'edgetune backbone' else n_damage}" for k in wins) + " |")
    out.append("| state on a Cortex-M4 (bytes) | " + " | ".join(
        f"{_state_bytes(c):,}" for c in [DEFAULT] + list(CONFIGS.values())) + " | |")
    bwins = 0
    out += ["", "### The baselines on the default's 64-band input", "",
            "The same baselines fitted on the 64 bands edgetune's default reads (log, standardised): the "
            "bands help them too.", "",
            "| task | edgetune | IForest (bands) | LOF (bands) | PCA (bands) |", "|---|---|---|---|---|"]
    for r in rows:
        ks = ("edgetune", "IForest (bands)", "LOF (bands)", "PCA (bands)")
        best = max(r[k][0] for k in ks)
        bwins += r["edgetune"][0] >= max(r[k][0] for k in ks[1:]) - 1e-12
        out.append(f"| {r['task']} | " + " | ".join(
            f"**{r[k][0]:.3f}**" if r[k][0] == best else f"{r[k][0]:.3f}" for k in ks) + " |")
    out += ["", f"On the same 64-band input, edgetune is at or above the best of these baselines on {bwins} of "
            f"{len(rows)} tasks.", ""]
    if bands_auc is not None:
        base = [max(r[k][0] for k in NAMES if k != "edgetune") for r in rows]
        base_name = [max((k for k in NAMES if k != "edgetune"), key=lambda k, r=r: r[k][0]) for r in rows]
        out += ["### The band count chosen without the scored task's labels", "",
                "The default's 64 bands were picked by looking at these tasks' test AUC. Here each task is "
                f"left out in turn, the band count (128 hidden units) is chosen on the {len(rows) - 1} others, and the "
                "left-out task is scored with it against its best baseline (the first table's). *mean "
                "AUC*: the count with the best mean AUC over the others (a tie goes to the fewer bands); "
                "*tasks won*: the counts at or above the best baseline on the most others (when several "
                "tie, the left-out task counts as won only if all of them win it). AUCs at or above the "
                "best baseline in bold (compared to 3 decimals, as printed). Also `python -m "
                "benchmarks.anomaly_tried --data-dir ../shared/data --held-out`.", ""]
        out += held_out([r["task"] for r in rows], bands_auc, base, base_name)
        out.append("")
    if tried is not None:
        from .anomaly_tried import LINEAR_SHARE, combined_summary
        base = [max(r[k][0] for k in NAMES if k != "edgetune") for r in rows]
        out += ["### Tried: a linear reconstruction term, and a band count from normal data alone", "",
                "Two ways to make the held-out choice of the band count win every task, measured on all "
                f"{len(rows)} tasks with the held-out choices above. (1) A linear reconstruction score beside the "
                "detector's (sigmoid, 128 hidden units): *linear*, the same OS-ELM autoencoder with the identity "
                f"activation and bands/{LINEAR_SHARE} hidden units (a rank-bands/{LINEAR_SHARE} linear "
                "reconstruction learned by the same recursive least squares: streaming, PCA-like), or, for "
                "reference, the batch PCA(0.95) reconstruction on the detector's own standardised bands. Each "
                "score is divided by its spread on normal data (the detector's threshold: the 0.95 point of its "
                "out-of-sample errors on the normal training data; PCA's: the 0.95 point of its errors on the "
                "half of the normal data it was not fitted on), then summed or maxed; no test labels. (2) The "
                "band count chosen on each task's own normal data (the detector fitted on one half, scored on "
                "the other, both ways): *spread*, the smallest 0.95 point / median of those normalised errors; "
                "*calibration*, the threshold that holds best on the other half (0.95 point closest to 1). "
                "Tasks at or above the best baseline (the first table's, 3 decimals) per band count, then with "
                "the count chosen by leaving each task out. Also `python -m benchmarks.anomaly_tried "
                "--data-dir ../shared/data --combined` (every per-task table).", ""]
        out += combined_summary([r["task"] for r in rows], tried[0], tried[1], base)
        out.append("")
    if ensemble is not None:
        from .anomaly_tried import ENSEMBLE_CANDIDATES, ENSEMBLE_SEEDS, ensemble_summary
        base = [max(r[k][0] for k in NAMES if k != "edgetune") for r in rows]
        base_name = [max((k for k in NAMES if k != "edgetune"), key=lambda k, r=r: r[k][0]) for r in rows]
        auc, cost = ensemble
        out += ["### Tried: an ensemble over band counts (no count to choose)", "",
                "Every member is the detector (sigmoid; 128 hidden units unless the candidate says) on one band "
                "count; its test error is put on a scale from its own normal data, then the members are summed "
                "or maxed. *ratio*: error / the member's threshold (the 0.95 point of its out-of-sample normal "
                "errors); *log-z*: (log error - median) / (0.95 point - median) of its log out-of-sample normal "
                "errors (robust, quantile-based). *+ linear*: one more member, the identity-activation "
                "autoencoder on 64 bands (16 hidden units). The first eight candidates were fixed before any was "
                "measured; the last four (smaller members) after the first eight's cost, before their AUCs. Each "
                f"is measured with detector seeds {', '.join(map(str, ENSEMBLE_SEEDS))} (AUC: the seeds' mean, "
                "their minimum in brackets) against the first table's best baseline (3 decimals). Then the "
                "candidate is chosen by leaving each task out, as the band count above (by mean AUC over the "
                "other tasks, or by tasks won there, where a tie counts as won only if every tied candidate wins "
                "it: a candidate that loses just one task ties with the others when that task is left out, so "
                "it costs that task). Also `python -m benchmarks.anomaly_tried --data-dir ../shared/data "
                "--ensemble` (with every candidate's AUC per task).", ""]
        out += ensemble_summary([r["task"] for r in rows], auc, base, base_name)
        lines, vs = cost
        out += lines
        r3 = lambda v: round(float(v), 3)  # noqa: E731
        _, by_mean, _, _, _ = held_out_choice(auc.mean(axis=0), base)
        picked = {}
        for j in by_mean:
            picked[ENSEMBLE_CANDIDATES[j][0]] = picked.get(ENSEMBLE_CANDIDATES[j][0], 0) + 1
        out += ["", "The held-out choice by mean AUC picks " + ", ".join(
            f"{k} ({v} of {len(rows)} tasks left out; {vs[k]:.1f}x HalfSpaceTrees)" for k, v in picked.items())
            + ". Ensembles that win every task with every seed and run at >= 10x HalfSpaceTrees in this run: "
            + (", ".join(f"{c[0]} ({vs[c[0]]:.1f}x, {c[5]} hidden units a member)" for c, j in
                         zip(ENSEMBLE_CANDIDATES, range(len(ENSEMBLE_CANDIDATES)))
                         if len(c[1]) > 1 and vs[c[0]] >= 10
                         and all(r3(auc[:, i, j].min()) >= r3(base[i]) for i in range(len(rows)))) or "none")
            + ". An ensemble runs every member on every sample: its cost and its state are the sums of its "
            "members'."]
        fast = [j for j, c in enumerate(ENSEMBLE_CANDIDATES) if vs[c[0]] >= 10]
        if fast:   # the streaming target as a filter (no labels), then the held-out choice among the rest
            _, sub_mean, _, sub_win, _ = held_out_choice(auc.mean(axis=0)[:, fast], base)
            picked = {}
            for j in sub_mean:
                name = ENSEMBLE_CANDIDATES[fast[j]][0]
                picked[name] = picked.get(name, 0) + 1
            out[-1] += (" Among the candidates at >= 10x HalfSpaceTrees in this run alone (a filter without "
                        "labels), the held-out choice by mean AUC picks " + ", ".join(
                            f"{k} ({v} of {len(rows)} tasks left out)" for k, v in picked.items())
                        + f": **{sum(sub_win)} of {len(rows)}** tasks at or above the best baseline.")
        out.append("")
    if moves:
        out += ["## The move from the quiet rooms to the noisy room (ROC AUC)", "",
                "Fitted on the quiet rooms' normal data (silentA_1 + silentB_1). *before*: quiet rooms' test "
                "set; *moved*: the noisy room's test set, no re-learning; *re-learned*: after learning the "
                "noisy room's normal data (edgetune: `adapt`, a second environment beside the first; the "
                "others: fitted again on both rooms' normal data); *old room*: the quiet rooms' test set "
                "after re-learning.", "",
                "| task | detector | before | moved | re-learned | old room |", "|---|---|---|---|---|---|"]
        for m in moves:
            out.append(f"| {m['task']} | {m['detector']} | {m['before']:.3f} | {m['moved']:.3f} | "
                       f"{m['relearned']:.3f} | {m['old_room']:.3f} |")
        out.append("")
    if curves:
        nq, na, nt = sizes
        out += ["## Test-then-train over a stream (fan-damage1-move)", "",
                f"One sample at a time, each scored then (if normal) learned: {nq} quiet-room normal spectra "
                f"(phase 0), the noisy room's {na} normal training spectra (phase 1), then its {nt} test "
                "spectra, normal and damaged shuffled (phase 2). Alarm rate per block of 50 on normal "
                "samples (FPR) and on damaged ones (TPR). *confirm* only reports a change of room; *auto* "
                "learns the 200 samples after it as a new environment.", ""]
        for policy, c in curves.items():
            out.append(f"- {policy}: change detected at sample {c['drift_at']}; {c['environments']} environment(s) at "
                       f"the end; over phase 2: TPR {c['tpr2']:.2f}, FPR {c['fpr2']:.2f}")
        a, b = curves["auto"], curves["auto, learn_below 1"]
        out += ["", "*auto, learn_below 1* learns every sample under the threshold instead of only those at most "
                f"0.8 of it (the default): over phase 2, TPR {b['tpr2']:.2f} and FPR {b['fpr2']:.2f} against "
                f"{a['tpr2']:.2f} and {a['fpr2']:.2f}."]
        if any(i >= nq + na for i in a["drift_at"]):
            out[-1] += (" The change found inside phase 2 is the damaged half of its samples raising the scores "
                        "for good: the Page-Hinkley test cannot tell that from a new room, and *auto* then learns "
                        "another environment from the samples after it (less those the out-of-sample check "
                        "flags), damaged ones among them.")
        out.append("")
        out += ["", "| from sample | phase | FPR confirm | FPR auto | TPR confirm | TPR auto |", "|---|---|---|---|---|---|"]
        f = lambda v: "" if v is None else f"{v:.2f}"
        for a, b in zip(curves["confirm"]["blocks"], curves["auto"]["blocks"]):
            out.append(f"| {a['from']} | {a['phase']} | {f(a['fpr'])} | {f(b['fpr'])} | {f(a['tpr'])} | {f(b['tpr'])} |")
        out.append("")
    if tput:
        upd = tput.pop("_update", None)
        n_stream = args_stream(tput)
        tput = {k: v for k, v in tput.items() if not k.startswith("_")}
        ref = max(tput["river HalfSpaceTrees"], tput["river HalfSpaceTrees, 64 bands"])
        out += ["## Streaming throughput (one thread, same stream, same run)", "",
                f"{n_stream} samples of fan-damage1-noisy (512 bins), each scored and then learned if "
                "normal, in order; best of 5 interleaved rounds. *learn_many (C)*: `AnomalyDetector.learn_many`, "
                "learn_one's loop (every environment scored, the change detector, only samples at most "
                "learn_below of the threshold learned) in the compiled engine, over the whole stream in one call "
                "(its log transform in float32 in NumPy, 256 rows at a time); *learn_one* and HalfSpaceTrees: one "
                "call per sample. Target: edgetune >= 10x HalfSpaceTrees.", "",
                "| detector | samples / s | vs the faster HalfSpaceTrees |", "|---|---|---|"]
        for k, v in tput.items():
            out.append(f"| {k} | {v:,.0f} | {v / ref:.1f}x |")
        out.append("")
    if cli:
        slow, fast = cli["numpy"], cli["auto"]
        out += ["## The `edgetune detect stream` command on a file (same run)", "",
                f"{cli['n']:,} lines of fan-damage1-noisy spectra (512 comma-separated numbers each, 6 "
                "significant digits) through `edgetune detect stream --model DIR --input FILE`, the default "
                "detector, output to /dev/null; best of 3 interleaved runs. *samples / s*: the command's "
                "own summary (`--json`: reading, parsing, learning, writing each JSON line); *wall*: the "
                "whole process, start-up and loading included.", "",
                "| path | samples / s | wall (s) |", "|---|---|---|",
                f"| `--engine numpy`: learn_one on each line (float64) | {slow[0]:,.0f} | {slow[1]:.2f} |",
                f"| default: the lines read together, learn_rows in the compiled loop | {fast[0]:,.0f} | "
                f"{fast[1]:.2f} |", "",
                f"The compiled loop: **{fast[0] / slow[0]:.1f}x** the samples per second of learn_one per line "
                "(same output lines; scores within 1e-4, tests/test_cli_detect.py).", ""]
        if "no-learn" in cli:
            nl = cli["no-learn"]
            out[-3:-3] = [f"| `--no-learn`: the lines of each read scored together (score_samples, float64) | "
                          f"{nl[0]:,.0f} | {nl[1]:.2f} |"]
            out += ["`--no-learn` on a FIFO or stdin answers each line before the next is read (the lines "
                    "of a read are those that have arrived; tests/test_cli_detect.py writes one line, reads "
                    "its answer, then writes the next)."]
        if "pipe" in cli:
            out[-1] += (" On a stdin pipe, a writer that waits for each line's answer before writing the next "
                        f"(399 lines, start-up excluded, best of 3) gets **{cli['pipe no-learn']:,.0f}** lines/s with "
                        f"`--no-learn` and **{cli['pipe']:,.0f}** learning them: one read, parse, score and write "
                        "per line.")
        out.append("")
        if upd:
            out += ["## One OS-ELM update in C against its arithmetic", "",
                    f"L = {upd['L']} hidden units, m = {upd['m']} outputs (the 512-bin autoencoder): an update is "
                    f"2 L^2 + 2 L m = {upd['macs']:,} multiply-adds. Measured: {upd['update_us']:.1f} us per update "
                    f"(scoring alone: {upd['score_us']:.1f} us, 2 L m multiply-adds, i.e. "
                    f"{upd['rate_gmacs']:.2f} G multiply-adds/s through the same kernels), so the arithmetic "
                    f"alone would take "
                    f"{upd['ideal_us']:.1f} us: the update costs **{upd['ratio']:.1f}x** its arithmetic.", "",
                    f"State of one detector environment in C: {upd['state_bytes_regen']:,} bytes with the random "
                    f"input weights regenerated from the seed per sample (what a Cortex-M4 would hold), "
                    f"{upd['state_bytes_kept']:,} bytes with them kept in the state (the host default, faster).", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    _need()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", help="write the Markdown report here (docs/anomaly.md)")
    p.add_argument("--quick", action="store_true", help="a few tasks and a short stream")
    p.add_argument("--stream-samples", type=int, default=5000)
    args = p.parse_args(argv)
    from edgetune.data.anomaly import builtin_names
    from edgetune.threads import set_blas_threads
    set_blas_threads(1)
    t0 = time.perf_counter()
    names = builtin_names()
    env_tasks = [n for n in names if not n.endswith("-move")]
    move_tasks = [n for n in names if n.endswith("-move")]
    if args.quick:
        env_tasks = ["fan-2500rpm-noisy", "fan-damage1-noisy", "fan-damage2-silentA"]
        move_tasks = ["fan-damage1-move"]
    rows = per_task(env_tasks, args.data_dir)
    moves = move(move_tasks, args.data_dir)
    curves, sizes = stream_curve(args.data_dir)
    bands_auc = band_aucs(env_tasks, args.data_dir)
    from .anomaly_tried import combined_measure
    tried = combined_measure(env_tasks, args.data_dir)
    from .anomaly_tried import ensemble_cost, ensemble_measure
    ensemble = (ensemble_measure(env_tasks, args.data_dir),
                ensemble_cost(args.data_dir, 1000 if args.quick else args.stream_samples))
    tput = throughput(args.data_dir, 1000 if args.quick else args.stream_samples)
    cli = cli_stream(args.data_dir, 1000 if args.quick else args.stream_samples)
    text = render(sys.argv[1:] if argv is None else argv, rows, moves, curves, sizes, tput, time.perf_counter() - t0,
                  bands_auc, cli, tried, ensemble)
    emit(text)
    if args.out:
        from edgetune.io_atomic import write_bytes_atomic
        write_bytes_atomic(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
