"""Why the tasks' CNN presets look as they do: pre-train each candidate architecture, then
fine-tune it with lora-all, skip2-lora and ft-all, and print the test accuracies.

    python -m benchmarks.cnn_presets --data-dir ../shared/data [--task damage1-1d] [--quick]

On the fan spectra a bin is a frequency: the preset flattens instead of pooling (docs/cnn.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

CANDIDATES = {
    "damage1-1d": {
        "flatten (preset)": "conv:8:9:4:4,relu,maxpool:2,conv:16:5:2:2,relu,maxpool:2,flatten,dense:32,relu",
        "global average pooling": "conv:8:9:4:4,relu,maxpool:2,conv:16:5:1:same,relu,gap,dense:32,relu",
    },
    "har-raw": {
        "preset": "conv:16:5:1:same,relu,maxpool:2,conv:32:5:1:same,relu,maxpool:2,conv:32:3:1:same,relu,gap,"
                  "dense:32,relu",
    },
}


def main() -> int:
    import edgetune as et

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--task", choices=sorted(CANDIDATES), action="append")
    p.add_argument("--quick", action="store_true", help="a tenth of the epochs (smoke run)")
    args = p.parse_args()
    for name in args.task or sorted(CANDIDATES):
        task = et.load_task(name, args.data_dir)
        d = task.defaults
        pre_epochs, epochs = d.get("pretrain_epochs", 30), min(d.get("epochs", 60), 60)
        if args.quick:
            pre_epochs, epochs = max(1, pre_epochs // 10), max(1, epochs // 10)
        for label, arch in CANDIDATES[name].items():
            t0 = time.perf_counter()
            model, _ = et.pretrain(task.x_pretrain, task.y_pretrain, arch=arch, labels=task.labels,
                                   epochs=pre_epochs, lr=d.get("pretrain_lr", 0.01), seed=0)
            before = float(np.mean(model.forward(model.prepare(task.x_test)).argmax(1) == task.y_test))
            print(f"{name} {label}: {arch}\n  pre-trained {pre_epochs} epochs in {time.perf_counter() - t0:.0f} s, "
                  f"test accuracy before fine-tuning {before:.3f}", flush=True)
            for method in ("lora-all", "skip2-lora", "ft-all"):
                t0 = time.perf_counter()
                tuner = et.FineTuner(model, method, epochs=epochs, lr=d.get("lr", 0.01)).fit(
                    task.x_finetune, task.y_finetune)
                print(f"  {method:10s} {epochs} epochs: test accuracy {tuner.score(task.x_test, task.y_test):.3f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
