"""The cost of a checkpoint save early and late in a long run, side by side.

    python -m benchmarks.checkpoint_cost --epochs 2000

A fine-tune saves its checkpoint after every epoch (``checkpoint_every=1``); each save's wall
time, CPU time and bytes written are recorded. A save writes the parameters, the optimizer
state and the epochs since the last save (the history journal), so its cost should not grow
with the epoch: the ratio of the last saves' median to the first saves' median should stay
near 1. Each save fsyncs its files,
so the wall time is mostly the disk's and varies with the machine's load; the CPU time and
the bytes written do not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--window", type=int, default=50, help="saves per median (first and last)")
    args = p.parse_args(argv)

    from edgetune import Backbone, checkpoint
    from edgetune.methods import make_method
    from edgetune.train import TrainConfig, fit

    from ._util import machine_info

    rng = np.random.default_rng(0)
    bb = Backbone.build([7, 12, 8, 3], seed=0)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    cfg = TrainConfig(epochs=args.epochs, batch_size=8, lr=0.01)
    times: list[float] = []
    cpu: list[float] = []  # the save's CPU time: without the wait for the disk (fsync), which varies with load
    written: list[int] = []  # bytes a save wrote: the checkpoint file and what it appended to the journal
    real_save = checkpoint.save

    def timed(path, **kw):
        journal = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.edgetune-history")
        before = os.path.getsize(journal) if os.path.exists(journal) else 0
        t0, c0 = time.perf_counter(), time.process_time()
        real_save(path, **kw)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        after = os.path.getsize(journal) if os.path.exists(journal) else 0
        written.append(os.path.getsize(path) + after - before)

    checkpoint.save = timed
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=os.path.join(d, "c"), checkpoint_every=1)
            with_ck = time.perf_counter() - t0
    finally:
        checkpoint.save = real_save
    t0 = time.perf_counter()
    fit(make_method("skip2-lora", bb), x, y, cfg)
    without = time.perf_counter() - t0
    w = min(args.window, len(times) // 2)
    first, last = float(np.median(times[:w])), float(np.median(times[-w:]))
    info = machine_info()
    print(f"machine: {info.get('cpu', '?')}; {args.epochs} epochs of skip2-lora on a 7-12-8-3 model, 50 samples")
    cpu_first, cpu_last = float(np.median(cpu[:w])), float(np.median(cpu[-w:]))
    print("| saves | median save ms (wall) | median save ms (CPU) | median bytes written |")
    print("|---|---|---|---|")
    print(f"| first {w} | {1e3 * first:.2f} | {1e3 * cpu_first:.2f} | {int(np.median(written[:w]))} |")
    print(f"| last {w} | {1e3 * last:.2f} | {1e3 * cpu_last:.2f} | {int(np.median(written[-w:]))} |")
    print(f"last / first: wall {last / first:.2f}, CPU {cpu_last / cpu_first:.2f}, bytes "
          f"{np.median(written[-w:]) / np.median(written[:w]):.2f}")
    print(f"whole fit: {with_ck:.2f} s with a checkpoint every epoch, {without:.2f} s without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
