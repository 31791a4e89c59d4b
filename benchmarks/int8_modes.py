"""int8 activations, symmetric (edgetune's int8) vs asymmetric (TFLite Micro's arithmetic), side by side.

For each task: pre-train the task's convolutional preset (``edgetune pretrain --arch cnn``,
the task's default epochs, or ``--epochs``), quantise it both ways on the pre-train split
(``edgetune quantize [--activations asymmetric] [--percentile P]``), and print the test
accuracy of the float model and of both int8 models, and how often each int8 model predicts
the float model's class, in one run:

    python -m benchmarks.int8_modes --data-dir ../shared/data                 # damage1-1d and har-raw
    python -m benchmarks.int8_modes --data-dir ../shared/data --percentile 99.9
    python -m benchmarks.int8_modes --data-dir ../shared/data --epochs 5      # a quick run
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ._util import Table, emit, finish

TASKS = ("damage1-1d", "har-raw")


def run(data_dir: str, tasks: list[str], percentile: float, epochs: int | None, seed: int) -> dict:
    import edgetune as et
    from edgetune.experiment import pretrain_on_task
    from edgetune.quant import quantize

    results: dict = {"percentile": percentile, "epochs": epochs, "seed": seed, "tasks": {}}
    for name in tasks:
        task = et.load_task(name, data_dir)
        t0 = time.perf_counter()
        model, report = pretrain_on_task(task, arch="cnn", epochs=epochs, seed=seed)
        xt = model.prepare(task.x_test, "test x")
        pred_float = model.forward(xt).argmax(axis=1)
        row = {"pretrain_epochs": report["pretrain_epochs"],
               "accuracy_float": float(np.mean(pred_float == task.y_test))}
        for mode in ("symmetric", "asymmetric"):
            q = quantize(model, task.x_pretrain, percentile=percentile, activations=mode)
            pred = q.forward(xt).argmax(axis=1)
            row[f"accuracy_{mode}"] = float(np.mean(pred == task.y_test))
            row[f"agreement_{mode}"] = float(np.mean(pred == pred_float))
        row["seconds"] = time.perf_counter() - t0
        results["tasks"][name] = row
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks with a CNN preset")
    p.add_argument("--percentile", type=float, default=100.0, help="as quantize --percentile (default 100)")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.data_dir, [t for t in args.tasks.split(",") if t], args.percentile, args.epochs, args.seed)
    table = Table(f"int8 activations, symmetric vs asymmetric (TFLM); --percentile {args.percentile:g}, "
                  f"seed {args.seed}",
                  [("task", "task"), ("epochs", "pre-train epochs"), ("float", "float acc."),
                   ("sym", "int8 symmetric acc."), ("sym_same", "same as float"),
                   ("asym", "int8 asymmetric acc."), ("asym_same", "same as float ")])
    for name, r in res["tasks"].items():
        table.add(task=name, epochs=r["pretrain_epochs"], float=f"{r['accuracy_float']:.4f}",
                  sym=f"{r['accuracy_symmetric']:.4f}", sym_same=f"{r['agreement_symmetric']:.1%}",
                  asym=f"{r['accuracy_asymmetric']:.4f}", asym_same=f"{r['agreement_asymmetric']:.1%}")
    emit(table.markdown())
    finish(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
