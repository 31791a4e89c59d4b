"""Profile fine-tuning epochs on a paper task: where the time of a batch goes.

    python benchmarks/profile_epoch.py --data-dir ../shared/data [--task damage1] [--method skip2-lora]

Runs ``--epochs`` epochs with the public API under cProfile (1 BLAS thread) and prints,
per batch, the calls and the microseconds of the functions that take the most time, then
the floor of one NumPy call of the shapes involved. Used to write "What limits it" in
BENCHMARKS.md; profiling inflates every Python call, so the suite's un-profiled
breakdown table is the one to quote for absolute microseconds.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import set_blas_threads, time_call  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="damage1")
    p.add_argument("--data-dir")
    p.add_argument("--method", action="append", help="method(s) to profile (default lora-all and skip2-lora)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    set_blas_threads(1)

    import edgetune as et

    task = et.load_task(args.task, args.data_dir)
    bb, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=task.defaults.get("hidden", [96, 96]),
                        labels=task.labels, epochs=5)
    n_batches = -(-len(task.y_finetune) // 20)
    for method in args.method or ["lora-all", "skip2-lora"]:
        et.FineTuner(bb, method, epochs=2).fit(task.x_finetune, task.y_finetune)   # warm-up
        tuner = et.FineTuner(bb, method, epochs=args.epochs)
        prof = cProfile.Profile()
        prof.enable()
        tuner.fit(task.x_finetune, task.y_finetune)
        prof.disable()
        batches = n_batches * args.epochs
        later = np.median([e.seconds for e in tuner.history_.epochs[1:]])
        print(f"\n== {method} on {task.name}: {args.epochs} epochs x {n_batches} batches; "
              f"later epoch {1e3 * later:.2f} ms under the profiler")
        st = pstats.Stats(prof)
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
            rows.append((tt, nc, ct, f"{Path(file).name}:{line}({fn})" if line else fn))
        rows.sort(reverse=True)
        total_calls = sum(r[1] for r in rows)
        print(f"   {total_calls / batches:.1f} function calls per batch (Python and C, as counted by cProfile)")
        print(f"   {'calls/batch':>11} {'own us/batch':>12} {'cum us/batch':>12}  function")
        for tt, nc, ct, name in rows[:args.top]:
            print(f"   {nc / batches:11.2f} {1e6 * tt / batches:12.2f} {1e6 * ct / batches:12.2f}  {name}")

    # The floor of a NumPy call on this machine, for the shapes of a cached skip2-lora batch.
    rng = np.random.default_rng(0)
    width = sum(bb.sizes[:-1])
    h = rng.standard_normal((20, width), dtype=np.float32)
    a = rng.standard_normal((3, width), dtype=np.float32)
    cache = rng.standard_normal((len(task.y_finetune), width + bb.sizes[-1]), dtype=np.float32)
    ids = rng.permutation(len(cache))[:20]
    small = rng.standard_normal((20, 2), dtype=np.float32)
    print(f"\n== NumPy call floor (1 thread), batch of 20, adapter input width {width}")
    for what, fn in [("h @ A.T (20x{w} @ {w}x3)".format(w=width), lambda: h @ a.T),
                     ("cache[ids] (gather 20 rows)", lambda: cache[ids]),
                     ("small + small (20x2)", lambda: small + small),
                     ("small.max(axis=1, keepdims=True)", lambda: small.max(axis=1, keepdims=True)),
                     ("np.exp(small)", lambda: np.exp(small))]:
        print(f"   {1e6 * time_call(fn, repeats=7, number=2000):7.2f} us  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
