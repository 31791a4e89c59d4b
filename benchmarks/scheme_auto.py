"""--scheme auto: the scheme chosen for a RAM budget against the paper's baselines that fit.

For every case and seed: a backbone is pre-trained on the task's pre-train split (the task's
default model: an MLP for damage1, the CNN preset for damage1-1d and har-raw), the
contribution analysis runs on a validation split of the fine-tuning data
(``edgetune.scheme_search.auto_scheme``: 5-epoch fine-tunes, or --auto-epochs, on the
compiled engine), and three schemes are then fine-tuned in full (the task's epochs, lr) on the whole fine-tuning
split and tested on the test split: the chosen one, the last k layers with the largest k
that fits, and the biases of the last k layers with the largest k that fits. All at the
batch size ``edgetune plan --scheme auto`` uses: the largest of 20, 8, 4, 1 at which the
baseline (the last layer's weight and bias) fits.

    python -m benchmarks.scheme_auto               # damage1 64KB (weights in flash), damage1-1d 256KB, har-raw 256KB
    python -m benchmarks.scheme_auto --quick       # damage1 and damage1-1d, 1 seed
    python -m benchmarks.scheme_auto --tasks har-raw --auto-epochs 20
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from edgetune.scheme_search import DEFAULT_EPOCHS

from ._util import REPO, emit, finish

# (task, budget, frozen weights in flash)
CASES = (("damage1", "64KB", True), ("damage1-1d", "256KB", False), ("har-raw", "256KB", False))
BATCH_SIZES = (20, 8, 4, 1)


def run_case(task_name: str, budget_text: str, flash: bool, seeds: list[int], data_dir: str, auto_epochs: int,
             log) -> dict:
    import edgetune as et
    from edgetune.data.task import load_task
    from edgetune.experiment import backbone_accuracy, pretrain_on_task
    from edgetune.memory import plan_memory
    from edgetune.scheme_search import auto_scheme, largest_batch
    from edgetune.units import parse_bytes

    task = load_task(task_name, data_dir)
    budget = parse_bytes(budget_text)
    d = task.defaults
    epochs, lr = d.get("epochs", 100), d.get("lr", 0.01)
    arch = "cnn" if len(task.x_finetune.shape) > 2 else None
    out = {"task": task_name, "budget": budget, "weights_in_flash": flash, "epochs": epochs, "lr": lr,
           "auto_epochs": auto_epochs, "seeds": []}
    for seed in seeds:
        bb, _ = pretrain_on_task(task, arch=arch, seed=seed)
        n_layers = len(bb.tap_layers)

        def plan_at(scheme: str, batch: int):
            return plan_memory(bb, "sparse", scheme=scheme, batch_size=batch, n_samples=len(task.y_finetune),
                               weights_in_flash=flash)

        batch = largest_batch(plan_at, n_layers, budget, BATCH_SIZES)
        t0 = time.perf_counter()
        r = auto_scheme(bb, task.x_finetune, task.y_finetune, budget=budget, plan_fn=lambda s: plan_at(s, batch),
                        epochs=auto_epochs, batch_size=batch, lr=lr, seed=seed, engine="auto")
        log(f"{task_name} seed {seed}: chose sparse[{r.scheme}] at batch {batch} in {time.perf_counter() - t0:.2f} s")
        row = {"seed": seed, "batch_size": batch, "model": bb.sizes if arch is None else f"{bb.n_layers}-layer CNN",
               "before": backbone_accuracy(bb, task.x_test, task.y_test), "analysis_seconds": r.contributions.seconds,
               "runs": r.contributions.runs, "predicted_val": r.choice.predicted_accuracy,
               "measured_val": r.measured_accuracy, "schemes": {}, "auto": r.as_dict()}
        for name, scheme, val in (("chosen", r.scheme, r.measured_accuracy),
                                  ("last_k", r.baselines["last_k"]["scheme"], r.baselines["last_k"]["val_accuracy"]),
                                  ("bias_only", r.baselines["bias_only"]["scheme"],
                                   r.baselines["bias_only"]["val_accuracy"])):
            if scheme is None:
                row["schemes"][name] = None
                continue
            tuner = et.FineTuner(bb, "sparse", scheme=scheme, epochs=epochs, batch_size=batch, lr=lr, seed=seed,
                                 engine="auto")
            tuner.fit(task.x_finetune, task.y_finetune)
            row["schemes"][name] = {"scheme": scheme, "ram_bytes": plan_at(scheme, batch).total, "val": val,
                                    "test": float(tuner.score(task.x_test, task.y_test))}
            log(f"  {name} sparse[{scheme}]: test accuracy {row['schemes'][name]['test']:.4f}")
        out["seeds"].append(row)
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheme_auto", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="damage1 and damage1-1d, 1 seed")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3, --quick 1)")
    p.add_argument("--tasks", help=f"comma-separated, of {', '.join(c[0] for c in CASES)} (default all)")
    p.add_argument("--auto-epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"epochs of each fine-tune of the analysis (default {DEFAULT_EPOCHS})")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="where the data sets are")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    cases = CASES[:2] if args.quick else CASES
    if args.tasks:
        wanted = args.tasks.split(",")
        unknown = set(wanted) - {c[0] for c in CASES}
        if unknown:
            p.error(f"unknown task(s) {', '.join(sorted(unknown))}: use {', '.join(c[0] for c in CASES)}")
        cases = [c for c in CASES if c[0] in wanted]
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = [run_case(t, b, f, seeds, args.data_dir, args.auto_epochs, log) for t, b, f in cases]

    cmd = "python -m benchmarks.scheme_auto" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    emit(f"`{cmd}`\n")
    emit(f"Test accuracy after a full fine-tune, mean ± std over {len(seeds)} seed(s); validation accuracy after "
         f"the analysis' {args.auto_epochs}-epoch fine-tunes\n")
    emit("| task | budget | batch | analysis s (runs) | predicted val | measured val | chosen: test | "
         "last k: test | biases only: test | before |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rows = r["seeds"]
        budget = f"{r['budget'] // 1024} KB" + (" RAM (weights in flash)" if r["weights_in_flash"] else "")

        def test(name):
            return _ms([s["schemes"][name]["test"] for s in rows if s["schemes"][name]])
        emit(f"| {r['task']} | {budget} | {', '.join(sorted({str(s['batch_size']) for s in rows}))} | "
             f"{np.mean([s['analysis_seconds'] for s in rows]):.2f} ({rows[0]['runs']}) | "
             f"{_ms([s['predicted_val'] for s in rows])} | {_ms([s['measured_val'] for s in rows])} | "
             f"{test('chosen')} | {test('last_k')} | {test('bias_only')} | {_ms([s['before'] for s in rows])} |")
    emit(f"\nSchemes per seed (planned RAM; validation accuracy of the {args.auto_epochs}-epoch fine-tune -> test "
         f"after the full one)\n")
    emit("| task | seed | chosen | last k | biases only |")
    emit("|---|---|---|---|---|")
    for r in results:
        for s in r["seeds"]:
            cells = []
            for name in ("chosen", "last_k", "bias_only"):
                x = s["schemes"][name]
                cells.append("none fits" if x is None else
                             f"{x['scheme']} ({x['ram_bytes'] / 1024:.1f} KB; {x['val']:.4f} -> {x['test']:.4f})")
            emit(f"| {r['task']} | {s['seed']} | " + " | ".join(cells) + " |")
    emit("")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
