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

    python -m benchmarks.anomaly_tried --data-dir ../shared/data      # about a minute
    python -m benchmarks.anomaly_tried --data-dir ../shared/data --held-out
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
    args = p.parse_args(argv)
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
    from edgetune.data.anomaly import builtin_names, load_anomaly_task
    from edgetune.stream.metrics import roc_auc
    from edgetune.threads import set_blas_threads

    from .anomaly import band_aucs, fit_all
    from .anomaly import held_out as held_out_lines
    set_blas_threads(1)
    t0 = time.perf_counter()
    tasks = [n for n in builtin_names() if not n.endswith("-move")]
    auc = band_aucs(tasks, data_dir)
    base, base_name = [], []
    for name in tasks:
        t = load_anomaly_task(name, data_dir)
        b = {k: roc_auc(t.y_test, f(t.x_test)) for k, f in fit_all(t.x_train, fit_et=False).items()}
        base_name.append(max(b, key=b.get))
        base.append(b[base_name[-1]])
    for line in held_out_lines(tasks, auc, base, base_name):
        emit(line)
    emit(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
