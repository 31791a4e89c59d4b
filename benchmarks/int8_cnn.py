"""int8 CNNs: the forward pass of the preset CNNs, float against int8, NumPy against C, in one run.

    python -m benchmarks.int8_cnn --data-dir ../shared/data [--samples 500] [--repeats 5] [--epochs 20]

For damage1-1d's and har-raw's preset CNN (`--arch cnn`; pre-trained for a few epochs on a
subset: the timings do not depend on the weights' values), on `--samples` test windows,
one BLAS thread:
  float NumPy   Backbone.forward of the float model
  int8 NumPy    Backbone.forward of the int8 model (edgetune.quant.int8)
  int8 C        the compiled engine's int8 pass (edgetune.quant.native.native_forward_taps,
                which also writes every layer's int8 input)
with the ratios side by side, the bytes of both models' tensors, and whether the two int8
passes agree bit for bit; then skip2-lora fits (`--epochs`, the task's fine-tuning windows)
on the float and the int8 backbone, NumPy engine against C. Medians of interleaved repeats.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ._util import Table, emit, finish, median, set_blas_threads


def run(data_dir: str, samples: int, repeats: int, epochs: int) -> dict:
    import edgetune as et
    from edgetune import core
    from edgetune.quant import quantize
    from edgetune.quant.int8 import int8_forward_taps

    native = None
    if core.available():
        from edgetune.quant.native import native_forward_taps as native
    table = Table("int8 forward pass of the preset CNNs (seconds per call, median)",
                  [("task", "task"), ("samples", "samples"), ("float", "float NumPy"), ("int8", "int8 NumPy"),
                   ("c", "int8 C"), ("int8_vs_float", "int8 NumPy / float"), ("c_vs_int8", "int8 C / int8 NumPy"),
                   ("bytes", "bytes float -> int8"), ("identical", "C == NumPy")])
    fits = Table(f"skip2-lora on the preset CNNs, {epochs} epochs (seconds per fit, median)",
                 [("task", "task"), ("samples", "samples"), ("float_numpy", "float NumPy"), ("float_c", "float C"),
                  ("int8_numpy", "int8 NumPy"), ("int8_c", "int8 C"), ("int8_c_vs_numpy", "int8 C / NumPy"),
                  ("int8_c_vs_float_c", "int8 C / float C")])
    out: dict = {"tasks": {}, "fits": {}}
    from edgetune.data.fan import FAN_CNN
    from edgetune.data.har import HAR_CNN

    for name, arch in (("damage1-1d", FAN_CNN), ("har-raw", HAR_CNN)):
        task = et.load_task(name, data_dir)
        idx = np.random.default_rng(0).permutation(len(task.y_pretrain))[:500]
        model, _ = et.pretrain(task.x_pretrain[idx], task.y_pretrain[idx], labels=task.labels, arch=arch, epochs=3,
                               seed=0)
        q = quantize(model, task.x_pretrain[idx])
        x = model.prepare(task.x_test[:samples])
        calls = {"float": lambda: model.forward(x), "int8": lambda: q.forward(x)}
        if native is not None:
            calls["c"] = lambda: native(q, x)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for k in calls:
            calls[k]()  # warm-up
        for _ in range(repeats):
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        t = {k: median(v) for k, v in times.items()}
        identical = None
        if native is not None:
            rows, logits = int8_forward_taps(q, x)
            rows_c, logits_c = native(q, x)
            identical = bool(np.array_equal(rows, rows_c) and np.array_equal(logits, logits_c))
        row = {"task": name, "samples": len(x), "float": t["float"], "int8": t["int8"], "c": t.get("c"),
               "int8_vs_float": t["int8"] / t["float"], "c_vs_int8": t["c"] / t["int8"] if "c" in t else None,
               "bytes": f"{model.nbytes} -> {q.nbytes}", "identical": identical}
        table.add(**row)
        out["tasks"][name] = row
        if native is not None:
            xf, yf = task.x_finetune[:samples], task.y_finetune[:samples]
            d = task.defaults
            fit = {f"{b}_{e}": (lambda bb=bb, e=e: et.FineTuner(bb, "skip2-lora", epochs=epochs, lr=d["lr"],
                                                               batch_size=d["batch_size"], engine=e).fit(xf, yf))
                   for b, bb in (("float", model), ("int8", q)) for e in ("numpy", "c")}
            ft: dict[str, list[float]] = {k: [] for k in fit}
            for _ in range(repeats):
                for k, fn in fit.items():
                    t0 = time.perf_counter()
                    fn()
                    ft[k].append(time.perf_counter() - t0)
            f = {k: median(v) for k, v in ft.items()}
            frow = {"task": name, "samples": len(xf), **f, "int8_c_vs_numpy": f["int8_c"] / f["int8_numpy"],
                    "int8_c_vs_float_c": f["int8_c"] / f["float_c"]}
            fits.add(**frow)
            out["fits"][name] = frow
    emit(table.markdown())
    if fits.rows:
        emit("")
        emit(fits.markdown())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    set_blas_threads(1)
    results = run(args.data_dir, args.samples, args.repeats, args.epochs)
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
