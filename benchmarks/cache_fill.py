"""Eager vs lazy skip-cache fill: the first epoch and the whole fit, side by side.

    python -m benchmarks.cache_fill --data-dir ../shared/data

The eager fill computes every cache row before the first batch, in blocks of 64 rows; the
lazy fill computes a batch's rows when the batch first needs them (the paper's order).
The math is the same; this measures which is faster, per engine.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_fill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--task", default="damage1")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    import time

    import edgetune as et
    from edgetune import core
    from edgetune.threads import set_blas_threads

    set_blas_threads(1)
    task = et.load_task(args.task, args.data_dir)
    bb, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=task.defaults.get("hidden", [96, 96]),
                        labels=task.labels, epochs=5)
    engines = ["c", "numpy"] if core.available() else ["numpy"]
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for engine in engines:
            for fill in ("eager", "lazy"):
                t = et.FineTuner(bb, "skip2-lora", epochs=10, cache_fill=fill, engine=engine)
                t0 = time.perf_counter()
                t.fit(task.x_finetune, task.y_finetune)
                runs.setdefault((engine, fill), []).append((t.history_.epochs[0].seconds, time.perf_counter() - t0))
    print(f"skip2-lora on {args.task}, 10 epochs, medians of {args.repeats} interleaved runs")
    print("| engine | fill | first epoch ms | whole fit ms | eager / lazy, first epoch |")
    print("|---|---|---|---|---|")
    for engine in engines:
        lazy = np.median([r[0] for r in runs[(engine, "lazy")]])
        for fill in ("eager", "lazy"):
            first = np.median([r[0] for r in runs[(engine, fill)]])
            total = np.median([r[1] for r in runs[(engine, fill)]])
            print(f"| {engine} | {fill} | {1e3 * first:.3f} | {1e3 * total:.3f} | {first / lazy:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
