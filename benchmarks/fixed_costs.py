"""What a small call costs around its arithmetic: wall time of fit / partial_fit / predict vs
the time the engine spends in it, side by side in one run.

    python -m benchmarks.fixed_costs --data-dir ../shared/data [--repeats 200] [--fleet-rounds 50]

On the real damage1 task (512-96-96-2 backbone pre-trained 20 epochs), skip2-lora, batch 20:
the engine time of a fit is its epochs as the history records them (``train_seconds``); of a
predict, one call of the compiled ``et_predict`` on the prepared row (through ctypes, the
floor of any call from Python), taking turns with the predicts (half the calls each) so that
both run after the same other cases. Cases alternate, medians over ``--repeats`` calls. The fleet
row is ``benchmarks.fleet_rounds`` (HAR, one device, its cache kept between rounds). Prints a
Markdown table with the targets; BENCHMARKS.md keeps the latest.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

TARGETS = {"fit 20 samples, 1 epoch, new FineTuner": 3.0, "fit 20 samples, 1 epoch, same FineTuner": 3.0,
           "partial_fit of 1 sample (stream of 100)": 3.0, "predict of 1 sample": 3.0,
           "fleet round (HAR, cache kept)": 1.3}


def _predict_floor(tuner, row: np.ndarray):
    """A function timing one et_predict call on one prepared row (the engine's share of a
    predict): called in the same loop as the predicts, so both find the caches as the other
    cases left them."""
    from edgetune.core.engine import CoreModel

    model = CoreModel(tuner.method, 1)
    out = np.empty((1, model.sizes[-1]), np.float32)
    ws = model.workspace()
    args = (ctypes.byref(model.bb), ctypes.byref(model.m), model.params.ctypes.data, row.ctypes.data, 1, 1,
            out.ctypes.data, ws.ctypes.data, ws.nbytes)
    fn = model.lib.et_predict

    def once() -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0
    once.keep = (model, out, ws, row)  # what args points into lives as long as the function
    return once


def measure(data_dir: str | None, repeats: int) -> list[dict]:
    import edgetune as et

    task = et.load_task("damage1", data_dir)
    bb, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=task.defaults.get("hidden", [96, 96]),
                        labels=task.labels, epochs=20)
    x, y = task.x_finetune, task.y_finetune
    rows: dict[str, list[tuple[float, float]]] = {}

    def record(name: str, wall: float, engine: float) -> None:
        rows.setdefault(name, []).append((wall, engine))

    same = et.FineTuner(bb, "skip2-lora", epochs=1)
    stream = et.FineTuner(bb, "skip2-lora", stream_capacity=100) if hasattr(same, "partial_fit") else None
    if stream is not None:
        stream.partial_fit(x[:100], y[:100])
    fitted = et.FineTuner(bb, "skip2-lora", epochs=5).fit(x, y)
    row = np.ascontiguousarray(bb.prepare(x[:1]))
    floor, floors = _predict_floor(fitted, row), []
    for i in range(repeats):
        t0 = time.perf_counter()
        t = et.FineTuner(bb, "skip2-lora", epochs=1)
        t.fit(x[:20], y[:20])
        record("fit 20 samples, 1 epoch, new FineTuner", time.perf_counter() - t0, t.history_.train_seconds)
        t0 = time.perf_counter()
        same.fit(x[:20], y[:20])
        record("fit 20 samples, 1 epoch, same FineTuner", time.perf_counter() - t0, same.history_.train_seconds)
        if i % 4 == 0:
            for epochs in (1, 100):
                t0 = time.perf_counter()
                t = et.FineTuner(bb, "skip2-lora", epochs=epochs)
                t.fit(x, y)
                record(f"fit {len(x)} samples, {epochs} epoch{'s' * (epochs > 1)}, new FineTuner",
                       time.perf_counter() - t0, t.history_.train_seconds)
        if stream is not None:
            j = 100 + i % (len(x) - 100)
            t0 = time.perf_counter()
            stream.partial_fit(x[j:j + 1], y[j:j + 1])
            record("partial_fit of 1 sample (stream of 100)", time.perf_counter() - t0, stream.history_.train_seconds)
        if i % 2:  # predict and the engine's floor take turns, each after the same other cases
            floors.append(floor())
        else:
            t0 = time.perf_counter()
            fitted.predict(x[:1])
            record("predict of 1 sample", time.perf_counter() - t0, np.nan)
    out = []
    for name, vals in rows.items():
        a = np.asarray(vals)
        wall = float(np.median(a[:, 0]))
        engine = float(np.median(floors)) if name.startswith("predict") else float(np.median(a[:, 1]))
        out.append({"case": name, "calls": len(a), "wall_ms": wall * 1e3, "engine_ms": engine * 1e3,
                    "ratio": wall / engine})
    return out


def setup_pieces(repeats: int) -> list[tuple[str, float, float]]:
    """Pieces of a fit's set-up, before and after they were kept or moved to C: (what, old us, new us)."""
    import edgetune as et

    try:
        from edgetune.cache import backbone_key
    except ImportError:  # a version that hashes the backbone every fit: nothing to compare
        return []
    bb = et.Backbone.build([512, 96, 96, 2], seed=0)
    key = backbone_key(bb)
    key.digest(bb)
    state = np.random.default_rng(0).bit_generator.state
    gen = np.random.default_rng(0)

    def reset() -> None:
        gen.bit_generator.state = state

    pieces = [("backbone digest: blake2b of every tensor vs the bit-exact check against the kept copies", bb.digest,
               lambda: key.digest(bb)),
              ("batches' generator: default_rng(seed) vs reset to its seeded state",
               lambda: np.random.default_rng(0), reset)]
    try:
        from edgetune.core.engine import permutations
    except ImportError:  # a version that draws every order with NumPy
        permutations = None
    if permutations is not None and permutations(gen, 1, 1) is not None:
        def numpy_orders() -> None:
            for _ in range(100):
                gen.permutation(470)
        pieces.append(("100 epochs' orders of 470 samples: rng.permutation per epoch vs drawn in C "
                       "(the same numbers)", numpy_orders, lambda: permutations(gen, 470, 100)))
    out = []
    for what, old, new in pieces:
        t_old, t_new = [], []
        for _ in range(repeats):
            for fn, dst in ((old, t_old), (new, t_new)):
                t0 = time.perf_counter()
                fn()
                dst.append(time.perf_counter() - t0)
        out.append((what, 1e6 * float(np.median(t_old)), 1e6 * float(np.median(t_new))))
    return out


RATIO_CASES = (("damage1", 100, 25.0), ("speed-12cm", 30, 15.0), ("speed-8cm", 30, 15.0))


def end_to_end(data_dir: str | None, runs: int) -> list[dict]:
    """skip2-lora vs lora-all, whole ``fit`` wall time (new FineTuner each), interleaved runs."""
    import edgetune as et

    from .cache_precision import FAN_TASKS, speed_task

    out = []
    for name, epochs, want in RATIO_CASES:
        task = speed_task(name, data_dir) if name in FAN_TASKS else et.load_task(name, data_dir)
        bb, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=[96, 96], labels=task.labels, epochs=20)
        times: dict[str, list[float]] = {"skip2-lora": [], "lora-all": []}
        for i in range(runs + 1):
            for method in times:
                t0 = time.perf_counter()
                et.FineTuner(bb, method, epochs=epochs).fit(task.x_finetune, task.y_finetune)
                if i:  # the first run of each warms up
                    times[method].append(time.perf_counter() - t0)
        s2, la = float(np.median(times["skip2-lora"])), float(np.median(times["lora-all"]))
        out.append({"task": name, "epochs": epochs, "samples": len(task.y_finetune), "skip2_ms": s2 * 1e3,
                    "lora_ms": la * 1e3, "ratio": la / s2, "want": want})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fixed_costs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--repeats", type=int, default=200, help="calls per case (default 200)")
    p.add_argument("--fleet-rounds", type=int, default=50, help="fleet rounds (0: no fleet row; default 50)")
    p.add_argument("--ratio-runs", type=int, default=10, help="runs per method, end to end (0: none; default 10)")
    args = p.parse_args(argv)
    from edgetune.threads import set_blas_threads

    set_blas_threads(1)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res = measure(args.data_dir, args.repeats)
    if args.fleet_rounds:
        from .fleet_rounds import measure as fleet

        f = fleet("har", "by-subject", 8, args.data_dir, args.fleet_rounds, 20)["median_seconds"]
        res.append({"case": "fleet round (HAR, cache kept)", "calls": args.fleet_rounds, "wall_ms": f["kept"] * 1e3,
                    "engine_ms": f["kept_engine"] * 1e3, "ratio": f["kept"] / f["kept_engine"]})
    print(f"load average at start: {load}; medians; skip2-lora, damage1 unless named\n")
    print("| call | calls | wall ms | engine ms | wall / engine | target | status |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        want = TARGETS.get(r["case"])
        status = "" if want is None else ("PASS" if r["ratio"] <= want else "MISS")
        print(f"| {r['case']} | {r['calls']} | {r['wall_ms']:.4g} | {r['engine_ms']:.4g} | {r['ratio']:.3g} "
              f"| {'' if want is None else f'<= {want:g}'} | {status} |")
    pieces = setup_pieces(args.repeats)
    if pieces:
        print("\n| set-up piece (512-96-96-2 backbone) | before us | now us | before / now |")
        print("|---|---|---|---|")
        for what, old, new in pieces:
            print(f"| {what} | {old:.3g} | {new:.3g} | {old / new:.3g} |")
    if args.ratio_runs:
        print("\n| skip2-lora vs lora-all, end to end (compiled engine, new FineTuner) | samples | epochs "
              "| lora-all ms | skip2-lora ms | ratio | target | status |")
        print("|---|---|---|---|---|---|---|---|")
        for r in end_to_end(args.data_dir, args.ratio_runs):
            print(f"| {r['task']} | {r['samples']} | {r['epochs']} | {r['lora_ms']:.4g} | {r['skip2_ms']:.4g} "
                  f"| {r['ratio']:.3g} | >= {r['want']:g} | {'PASS' if r['ratio'] >= r['want'] else 'MISS'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
