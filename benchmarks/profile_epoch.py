"""Profile fine-tuning epochs on a paper task: where the time of a batch goes.

    python benchmarks/profile_epoch.py --data-dir ../shared/data [--task damage1] [--method skip2-lora]
    python -m benchmarks.profile_epoch --data-dir ../shared/data --limit [--tasks damage1,har]
    python -m benchmarks.profile_epoch --data-dir ../shared/data --instructions [--tasks damage1,har]

``--limit``: the cached skip2-lora epoch (compiled engine) of each skip-cache precision
against one memcpy of that cache's bytes, measured side by side in one process (the memory
floor of BENCHMARKS.md), and the end-to-end ratio to the compiled lora-all at 30 and at the
task's epochs. ``--instructions``: the instructions a cached skip2-lora epoch executes inside
the compiled engine per cache dtype (valgrind's callgrind over fits of 1 and 6 epochs; a count
that does not depend on the machine's load). Without either: runs ``--epochs`` epochs with the public API under cProfile (1 BLAS thread) and prints,
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
    p.add_argument("--limit", action="store_true", help="cached epoch vs one memcpy of the cache, per cache dtype")
    p.add_argument("--tasks", default="damage1,har", help="--limit: comma-separated tasks")
    p.add_argument("--repeats", type=int, default=3, help="--limit: interleaved repeats (median)")
    p.add_argument("--instructions", action="store_true", help="callgrind instruction counts per cache dtype")
    args = p.parse_args()
    set_blas_threads(1)
    if args.limit:
        return limit(args)
    if args.instructions:
        return instructions(args)

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


def limit(args) -> int:
    """Cached skip2-lora epochs per cache dtype vs a memcpy of the cache, and vs lora-all; one run."""
    import time

    import edgetune as et
    from edgetune.experiment import pretrain_on_task
    from edgetune.quant import attach_int8_cache

    print("| task | cache | cache bytes | cached epoch ms | memcpy ms | epoch / memcpy "
          "| lora-all / skip2-lora, 30 epochs | at the task's epochs |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        task = et.load_task(name, args.data_dir)
        d = task.defaults
        model, _ = pretrain_on_task(task, seed=0)
        x, y = task.x_finetune, task.y_finetune

        def fit(method: str, epochs: int, dtype: str | None = None):
            tuner = et.FineTuner(model, method, epochs=epochs, batch_size=d["batch_size"], lr=d["lr"], seed=0,
                                 engine="c")
            if dtype == "int8":
                attach_int8_cache(tuner.method, len(y), x_calib=task.x_pretrain)
            t0 = time.perf_counter()
            tuner.fit(x, y)
            return time.perf_counter() - t0, tuner

        dtypes = ["float32", "int8"]
        fit("lora-all", 2)
        for dt in dtypes:
            fit("skip2-lora", 2, dt)
        res: dict = {dt: {"epoch": [], "e2e30": [], "e2e": []} for dt in dtypes}
        lora30, lora = [], []
        for _ in range(args.repeats):   # interleaved: every measurement sees the same load
            lora30.append(fit("lora-all", 30)[0])
            lora.append(fit("lora-all", d["epochs"])[0])
            for dt in dtypes:
                res[dt]["e2e30"].append(fit("skip2-lora", 30, dt)[0])
                sec, tuner = fit("skip2-lora", d["epochs"], dt)
                res[dt]["e2e"].append(sec)
                res[dt]["epoch"].append(float(np.median([e.seconds for e in tuner.history_.epochs[1:]])))
                res[dt]["bytes"] = _cache_bytes(tuner.method.cache)
        for dt in dtypes:
            nbytes = res[dt]["bytes"]
            src = np.ones(nbytes, np.uint8)
            dst = np.empty_like(src)
            t_mem = time_call(lambda: np.copyto(dst, src), repeats=51, number=1)  # short windows, as an epoch is
            ep = float(np.median(res[dt]["epoch"]))
            r30 = float(np.median(lora30)) / float(np.median(res[dt]["e2e30"]))
            rn = float(np.median(lora)) / float(np.median(res[dt]["e2e"]))
            print(f"| {name} | {dt} | {nbytes} | {1e3 * ep:.4f} | {1e3 * t_mem:.4f} | {ep / t_mem:.2f} "
                  f"| {r30:.1f}x | {rn:.1f}x ({d['epochs']} epochs) |")
    print("\ncache bytes = the rows read by an epoch (float32: n x row floats; int8: n x (d_in int8 + out float32)); "
          "memcpy = NumPy copyto of that many bytes; cached epoch = median of the epochs after the first")
    return 0


_COUNT = """import sys, numpy as np, edgetune as et
from edgetune.quant import attach_int8_cache
epochs, dtype = int(sys.argv[1]), sys.argv[2]
d = np.load(sys.argv[4])
t = et.FineTuner(et.Backbone.load(sys.argv[3]), "skip2-lora", epochs=epochs, engine="c")
if dtype == "int8":
    attach_int8_cache(t.method, len(d["y"]), x_calib=d["xc"])
t.fit(d["x"], d["y"])
"""


def instructions(args) -> int:
    """Instructions per cached skip2-lora epoch inside the compiled engine, per cache dtype."""
    import shutil
    import subprocess
    import tempfile

    import edgetune as et
    from edgetune.experiment import pretrain_on_task

    if shutil.which("valgrind") is None:
        print("needs valgrind", file=sys.stderr)
        return 1

    def count(tmp: Path, epochs: int, dtype: str) -> int:
        out = tmp / f"cg.{epochs}.{dtype}"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=ffi_call*",
                        sys.executable, "-c", _COUNT, str(epochs), dtype, str(tmp / "model"), str(tmp / "data.npz")],
                       check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1], timeout=1800)
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"no instruction total in {out}")

    print("| task | cache | skip2-lora 1st epoch | cached epoch | per sample |")
    print("|---|---|---|---|---|")
    for name in args.tasks.split(","):
        task = et.load_task(name, args.data_dir)
        model, _ = pretrain_on_task(task, seed=0)
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            model.save(tmp / "model")
            np.savez(tmp / "data.npz", x=task.x_finetune, y=task.y_finetune, xc=task.x_pretrain)
            for dtype in ("float32", "int8"):
                first, more = count(tmp, 1, dtype), count(tmp, 6, dtype)
                cached = (more - first) / 5
                print(f"| {name} | {dtype} | {first / 1e6:.2f} M | {cached / 1e6:.3f} M | "
                      f"{cached / len(task.y_finetune):.0f} |", flush=True)
    print("\nvalgrind --tool=callgrind --toggle-collect='ffi_call*' over fits of 1 and 6 epochs (batch 20, the "
          "task's pre-trained backbone, seed 0); cached epoch = the difference / 5")
    return 0


def _cache_bytes(cache) -> int:
    """The bytes of the rows an epoch reads (not the fill mask nor the scales)."""
    return int(cache.data.nbytes + getattr(cache, "logits", np.empty(0)).nbytes)


if __name__ == "__main__":
    sys.exit(main())
