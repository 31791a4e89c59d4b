"""Accuracy of skip2-lora on a float backbone vs its int8 version (and an int8 skip-cache).

For every task and seed: pre-train a float backbone (task default epochs), quantise it
post-training (per-channel int8 weights, activation scales calibrated on the pre-training
split), then fine-tune skip2-lora with the task's default epochs, batch size and lr on

    float            float backbone, float32 skip-cache
    int8             int8 backbone, float32 skip-cache
    int8 + int8 c.   int8 backbone, int8 skip-cache (lossless on an int8 backbone)
    float + int8 c.  float backbone, int8 skip-cache (taps rounded to calibrated scales)

and report test accuracy, mean +- std over seeds, with the backbones' accuracy before
fine-tuning and the cache sizes.

    python -m benchmarks.int8_accuracy                 # damage1, damage2, har; 3 seeds
    python -m benchmarks.int8_accuracy --quick         # short epochs, 2 seeds (a smoke run)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from ._util import REPO, emit, finish

TASKS = ("damage1", "damage2", "har")
VARIANTS = (("float", "float backbone"), ("int8", "int8 backbone"), ("int8+c8", "int8 backbone + int8 cache"),
            ("float+c8", "float backbone + int8 cache"))


def _ms(values: list[float]) -> str:
    a = np.asarray(values, float)
    return f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}"


def run_task(name: str, seeds: list[int], data_dir: str, quick: bool, log) -> dict:
    import edgetune as et
    from edgetune.experiment import backbone_accuracy, pretrain_on_task
    from edgetune.quant import attach_int8_cache, quantize

    task = et.load_task(name, data_dir)
    d = task.defaults
    pre_epochs = 10 if quick else d.get("pretrain_epochs", d["epochs"])
    epochs = 10 if quick else d["epochs"]
    res: dict = {"task": name, "pretrain_epochs": pre_epochs, "epochs": epochs, "lr": d["lr"],
                 "batch_size": d["batch_size"], "seeds": seeds, "acc": {v: [] for v, _ in VARIANTS},
                 "before_float": [], "before_int8": []}
    for seed in seeds:
        t0 = time.perf_counter()
        model, _ = pretrain_on_task(task, epochs=pre_epochs, seed=seed)
        q = quantize(model, task.x_pretrain)
        res["before_float"].append(backbone_accuracy(model, task.x_test, task.y_test))
        res["before_int8"].append(backbone_accuracy(q, task.x_test, task.y_test))
        for key, _ in VARIANTS:
            bb = q if key.startswith("int8") else model
            tuner = et.FineTuner(bb, "skip2-lora", epochs=epochs, batch_size=d["batch_size"], lr=d["lr"], seed=seed)
            if key.endswith("+c8"):
                attach_int8_cache(tuner.method, len(task.y_finetune), x_calib=task.x_pretrain)
            tuner.fit(task.x_finetune, task.y_finetune)
            res["acc"][key].append(tuner.score(task.x_test, task.y_test))
            if seed == seeds[0]:
                res[f"cache_bytes_{key}"] = tuner.method.cache.nbytes
        log(f"{name} seed {seed}: " + ", ".join(f"{k} {res['acc'][k][-1]:.4f}" for k, _ in VARIANTS)
            + f" ({time.perf_counter() - t0:.1f} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 pre-training and 10 fine-tuning epochs, 2 seeds")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default {','.join(TASKS)})")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3, --quick 2)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="where the data sets are")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = [run_task(t, seeds, args.data_dir, args.quick, log) for t in args.tasks.split(",")]

    cmd = "python -m benchmarks.int8_accuracy" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    emit(f"### skip2-lora test accuracy, float vs int8 (mean ± std over {len(seeds)} seeds)\n")
    emit(f"`{cmd}`\n")
    head = ["task", "epochs (pre/ft)", "before: float", "before: int8"] + [h for _, h in VARIANTS]
    emit("| " + " | ".join(head) + " |")
    emit("|" + "|".join("---" for _ in head) + "|")
    for r in results:
        cells = [r["task"], f"{r['pretrain_epochs']}/{r['epochs']}", _ms(r["before_float"]), _ms(r["before_int8"])]
        cells += [_ms(r["acc"][k]) for k, _ in VARIANTS]
        emit("| " + " | ".join(cells) + " |")
    emit("")
    emit("| task | int8 − float (ft acc, mean) | float cache bytes | int8 cache bytes |")
    emit("|---|---|---|---|")
    for r in results:
        diff = np.mean(r["acc"]["int8"]) - np.mean(r["acc"]["float"])
        emit(f"| {r['task']} | {diff:+.4f} | {r['cache_bytes_float']} | {r['cache_bytes_int8+c8']} |")
    emit("")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
