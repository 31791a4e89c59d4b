"""A float backbone's skip-cache in float32 or in int8 with per-column scales: accuracy and the
cached epoch, side by side.

    python -m benchmarks.cache_precision --data-dir ../shared/data [--seeds 3]

For every built-in task (damage1, damage2, har) and three more tasks of the cooling-fan data
(below), per seed: pre-train a float backbone (the task's defaults), then fine-tune skip2-lora
twice from it with the task's epochs, batch and lr: with the float32 cache, and with the int8
cache whose column scales are calibrated on the pre-training inputs
(``edgetune.quant.attach_int8_cache``). Reports test accuracy (mean over seeds), the
difference in points, the cache's bytes and the median cached epoch of each (compiled engine),
and, per seed, 30 epochs of skip2-lora with each cache end to end against 30 epochs of
lora-all on the same engine, timed side by side (the median ratio over seeds).
The int8 cache may become the default only if no task loses more than 0.5 point.

The other cooling-fan tasks (constant-speed recordings; 200 spectra per recording to train,
the last 100 to test):
- ``speed-12cm``: the 12 cm fan's speed h/m/l/o, pre-train in the silent rooms (silentA,
  silentB), fine-tune and test next to the ventilation fan (noisy).
- ``speed-8cm`` / ``speed-14cm``: the same four speeds, pre-train on the 12 cm fan (silentA),
  fine-tune and test on another fan size (silentA).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SPEEDS = ("h", "m", "l", "o")
BUILTIN = ("damage1", "damage2", "har")
FAN_TASKS = ("speed-12cm", "speed-8cm", "speed-14cm")


def speed_task(name: str, data_dir: str | None):
    """A speed-classification task of the cooling-fan data (see the module's docstring)."""
    from edgetune.data.fan import list_recordings, load_recording
    from edgetune.data.task import Task

    def spectra(size: str, env: str, speed: str) -> np.ndarray:
        recs = list_recordings(data_dir, size=size, speed=speed, type="normal", environment=env, part="")
        if len(recs) != 1:
            raise SystemExit(f"cooling-fan: expected one recording {size}_{speed}_normal_{env}, found {len(recs)}")
        return load_recording(recs[0].path)[0]

    def split(size: str, envs: tuple[str, ...], rows: slice) -> tuple[np.ndarray, np.ndarray]:
        xs = [(spectra(size, env, s)[rows], c) for c, s in enumerate(SPEEDS) for env in envs]
        return np.concatenate([x for x, _ in xs]), np.concatenate([np.full(len(x), c) for x, c in xs])

    first, last = slice(0, 200), slice(-100, None)
    if name == "speed-12cm":
        pre, ft, te = split("12cm", ("silentA", "silentB"), first), split("12cm", ("noisy",), first), \
            split("12cm", ("noisy",), last)
    else:
        size = name.split("-")[1]
        pre, ft, te = split("12cm", ("silentA",), first), split(size, ("silentA",), first), \
            split(size, ("silentA",), last)
    return Task(name=name, labels=list(SPEEDS), x_pretrain=pre[0], y_pretrain=pre[1], x_finetune=ft[0],
                y_finetune=ft[1], x_test=te[0], y_test=te[1],
                defaults={"hidden": [96, 96], "epochs": 100, "batch_size": 20, "lr": 0.01, "pretrain_epochs": 100})


def run_task(task, seeds: list[int], log) -> dict:
    import edgetune as et
    from edgetune.experiment import pretrain_on_task
    from edgetune.quant import attach_int8_cache

    d = task.defaults
    res = {"task": task.name, "epochs": d["epochs"], "acc": {"f32": [], "int8": []}, "epoch_ms": {"f32": [], "int8": []},
           "vs_lora30": {"f32": [], "int8": []}}

    def fit(model, method: str, epochs: int, seed: int, key: str | None = None):
        tuner = et.FineTuner(model, method, epochs=epochs, batch_size=d["batch_size"], lr=d["lr"], seed=seed)
        if key == "int8":
            attach_int8_cache(tuner.method, len(task.y_finetune), x_calib=task.x_pretrain)
        t0 = time.perf_counter()
        tuner.fit(task.x_finetune, task.y_finetune)
        return tuner, time.perf_counter() - t0

    for seed in seeds:
        t0 = time.perf_counter()
        model, _ = pretrain_on_task(task, seed=seed)
        lora30 = min(fit(model, "lora-all", 30, seed)[1] for _ in range(2))
        for key in ("f32", "int8"):
            res["vs_lora30"][key].append(lora30 / min(fit(model, "skip2-lora", 30, seed, key)[1] for _ in range(2)))
        for key in ("f32", "int8"):
            tuner, _ = fit(model, "skip2-lora", d["epochs"], seed, key)
            res["acc"][key].append(tuner.score(task.x_test, task.y_test))
            res["epoch_ms"][key].append(1e3 * float(np.median([e.seconds for e in tuner.history_.epochs[1:]])))
            res[f"bytes_{key}"] = tuner.method.cache.nbytes
            res["engine"] = tuner.history_.engine
        log(f"{task.name} seed {seed}: f32 {res['acc']['f32'][-1]:.4f} int8 {res['acc']['int8'][-1]:.4f} "
            f"({time.perf_counter() - t0:.1f} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--seeds", type=int, default=3, help="seeds per task (default 3)")
    p.add_argument("--tasks", default=",".join(BUILTIN + FAN_TASKS))
    args = p.parse_args(argv)
    from edgetune.threads import set_blas_threads

    import edgetune as et

    set_blas_threads(1)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for name in args.tasks.split(","):
        task = speed_task(name, args.data_dir) if name in FAN_TASKS else et.load_task(name, args.data_dir)
        results.append(run_task(task, list(range(args.seeds)), log))
    print(f"skip2-lora on a float backbone, mean over {args.seeds} seeds; cached epoch = median of the epochs "
          f"after the first ({results[0]['engine']} engine)\n")
    print("| task | epochs | acc, float32 cache | acc, int8 cache | int8 - float32, points | cache bytes f32 / int8 "
          "| cached epoch ms f32 / int8 | f32 / int8 epoch | lora-all / skip2-lora, 30 epochs, f32 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in results:
        a32, a8 = np.mean(r["acc"]["f32"]), np.mean(r["acc"]["int8"])
        e32, e8 = np.median(r["epoch_ms"]["f32"]), np.median(r["epoch_ms"]["int8"])
        worst = min(worst, 100 * (a8 - a32))
        print(f"| {r['task']} | {r['epochs']} | {a32:.4f} | {a8:.4f} | {100 * (a8 - a32):+.2f} "
              f"| {r['bytes_f32']} / {r['bytes_int8']} | {e32:.4g} / {e8:.4g} | {e32 / e8:.2f} "
              f"| {np.median(r['vs_lora30']['f32']):.1f}x / {np.median(r['vs_lora30']['int8']):.1f}x |")
    print("\nlora-all / skip2-lora: 30 epochs end to end (fit() wall time, the better of two fits each), the "
          "median over seeds; the same engine (auto: compiled)")
    print(f"\nlargest loss of the int8 cache: {-worst:.2f} points; "
          + ("within 0.5 point on every task" if worst >= -0.5 else "more than 0.5 point on some task: "
             "float32 stays the default"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
