"""A fleet device's training time per round, with and without its skip-cache kept.

    python -m benchmarks.fleet_rounds --data-dir ../shared/data

No Flower here: one device's ``DeviceTrainer`` (what the ClientApp calls each round) on
the paper's pre-trained backbones, rounds with the cache kept and rounds that start from a
fresh FineTuner (``--no-keep-cache``) interleaved, medians over ``--rounds`` rounds each.
Per round it reports the whole fit (what the results JSON calls ``client_train_seconds``),
the part spent inside the engine's epochs, and the backbone's forward pass over the
device's samples alone (what the kept cache saves per round).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

CASES = (("har", "by-subject", 8), ("damage1", "by-room", 3))


def _pretrained(task):
    import edgetune as et

    bb, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=task.defaults.get("hidden", [96, 96]),
                        labels=task.labels, epochs=task.defaults.get("pretrain_epochs", 50))
    return bb


def measure(task_name: str, partition: str, clients: int, data_dir: str | None, rounds: int,
            epochs: int) -> dict:
    from edgetune.fleet.device import DeviceTrainer, TrainSpec, global_tensors
    from edgetune.fleet.partition import make_fleet

    fleet = make_fleet(task_name, data_dir, partition, clients)
    bb = _pretrained(fleet.task)
    data = fleet.devices[0]
    kept = DeviceTrainer(bb, data, TrainSpec(epochs=epochs, keep_cache=True))
    fresh = DeviceTrainer(bb, data, TrainSpec(epochs=epochs, keep_cache=False))
    g = global_tensors(bb, kept.spec)
    kept.train(g), fresh.train(g)  # warm up both; the kept device's cache is full from here on
    x = bb.prepare(data.x_train)
    rows: dict[str, list[float]] = {"kept": [], "fresh": [], "kept_engine": [], "fresh_engine": [], "forward": []}
    misses = {"kept": 0, "fresh": 0}
    for _ in range(rounds):
        for name, dev in (("kept", kept), ("fresh", fresh)):
            _, m = dev.train(g)
            rows[name].append(m["train-seconds"])
            rows[f"{name}_engine"].append(dev.tuner.history_.summary()["train_seconds"])
            misses[name] += m["cache-misses"]
        t0 = time.perf_counter()
        bb.forward_taps(x)
        rows["forward"].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    return {"task": task_name, "device": data.name, "samples": int(len(data.y_train)), "backbone": bb.sizes,
            "epochs_per_round": epochs, "rounds": rounds, "engine": kept.tuner.history_.engine,
            "median_seconds": med, "cache_misses_per_round": {k: v / rounds for k, v in misses.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_rounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--rounds", type=int, default=200, help="rounds per variant (default 200)")
    p.add_argument("--epochs", type=int, default=20, help="local epochs per round (default 20)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    from edgetune.threads import set_blas_threads

    set_blas_threads(1)
    results = [measure(t, part, k, args.data_dir, args.rounds, args.epochs) for t, part, k in CASES]
    print("| task (device, samples) | round, cache kept | round, fresh FineTuner | engine epochs kept / fresh "
          "| backbone forward (NumPy) | misses per round kept / fresh |")
    print("|---|---|---|---|---|---|")
    for r in results:
        m = r["median_seconds"]
        print(f"| {r['task']} ({r['device']}, {r['samples']}) | {m['kept'] * 1e3:.3f} ms | {m['fresh'] * 1e3:.3f} ms "
              f"| {m['kept_engine'] * 1e3:.3f} / {m['fresh_engine'] * 1e3:.3f} ms | {m['forward'] * 1e3:.3f} ms "
              f"| {r['cache_misses_per_round']['kept']:g} / {r['cache_misses_per_round']['fresh']:g} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
