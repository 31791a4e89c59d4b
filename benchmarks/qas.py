"""Quantization-Aware Scaling: sparse update of int8 weights with and without QAS.

For every task and seed a float backbone is pre-trained (task default epochs) and
quantised post-training; then the same sparse scheme is fine-tuned with plain SGD
(no momentum, batch 20, task default epochs) over one lr grid on

    float SGD          the float backbone, float weights updated
    int8 SGD           the int8 graph, int8-unit weights/biases updated, raw gradients
    int8 SGD + QAS     the same, gradients scaled by s_W^-2 (weights), (s_W s_x)^-2 (biases)

Reported: test accuracy per lr (mean over seeds) and each row's best lr. Then, as in the
paper's Fig. 3, the per-tensor ratio ||W|| / ||G|| (weights in their own unit, gradient of
the mean loss, averaged over the fine-tune batches before any update): QAS should bring
the int8 ratios back to the float ones.

    python -m benchmarks.qas                   # damage1, damage2; 3 seeds; lr grid 1e-3..1e6
    python -m benchmarks.qas --quick           # damage1, 2 seeds, short epochs
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from ._util import REPO, emit, finish

TASKS = ("damage1", "damage2")
MODES = (("float", "float SGD"), ("int8", "int8 SGD, no QAS"), ("int8+qas", "int8 SGD + QAS"))
# From a usual SGD lr up to where raw int8-unit gradients (||W||/||G|| ~1e5..1e8 larger than
# float) could start to move the weights: every row gets the whole grid.
LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6)
SCHEME = "b3,w1,w2"


def _fit_score(bb, mode: str, scheme: str, lr: float, epochs: int, seed: int, task) -> float | None:
    import edgetune as et
    from edgetune.train import TrainingDiverged

    qas = None if mode == "float" else mode == "int8+qas"
    tuner = et.FineTuner(bb, "sparse", scheme=scheme, qas=qas, epochs=epochs, batch_size=20, lr=lr, seed=seed)
    try:
        tuner.fit(task.x_finetune, task.y_finetune)
    except TrainingDiverged:
        return None
    return tuner.score(task.x_test, task.y_test)


def grad_ratios(bb, mode: str, scheme: str, task) -> dict[str, float]:
    """||W|| / ||G|| per trained tensor, G the mean over fine-tune batches of 20, no update."""
    import edgetune as et
    from edgetune.nn.losses import softmax_cross_entropy

    qas = None if mode == "float" else mode == "int8+qas"
    m = et.FineTuner(bb, "sparse", scheme=scheme, qas=qas).method
    x = bb.prepare(task.x_finetune)
    ratios: dict[str, list[float]] = {k: [] for k in m.params}
    for lo in range(0, len(x), 20):
        ids = np.arange(lo, min(lo + 20, len(x)))
        _, g = softmax_cross_entropy(m.forward(x, ids), task.y_finetune[ids])
        m.backward(g)
        for k in m.params:
            ratios[k].append(float(np.linalg.norm(m.params[k]) / max(np.linalg.norm(m.params.grads[k]), 1e-30)))
    m.end_fit()
    return {k: float(np.median(v)) for k, v in ratios.items()}


def run_task(name: str, seeds: list[int], lrs: list[float], scheme: str, data_dir: str, quick: bool, log) -> dict:
    import edgetune as et
    from edgetune.experiment import backbone_accuracy, pretrain_on_task
    from edgetune.quant import quantize

    task = et.load_task(name, data_dir)
    d = task.defaults
    pre_epochs = 10 if quick else d.get("pretrain_epochs", d["epochs"])
    epochs = 10 if quick else d["epochs"]
    res: dict = {"task": name, "scheme": scheme, "pretrain_epochs": pre_epochs, "epochs": epochs, "seeds": seeds,
                 "lrs": lrs, "acc": {m: {str(lr): [] for lr in lrs} for m, _ in MODES},
                 "before_float": [], "before_int8": [], "ratios": {}}
    for seed in seeds:
        t0 = time.perf_counter()
        model, _ = pretrain_on_task(task, epochs=pre_epochs, seed=seed)
        q = quantize(model, task.x_pretrain)
        res["before_float"].append(backbone_accuracy(model, task.x_test, task.y_test))
        res["before_int8"].append(backbone_accuracy(q, task.x_test, task.y_test))
        for mode, _ in MODES:
            bb = model if mode == "float" else q
            if seed == seeds[0]:
                res["ratios"][mode] = grad_ratios(bb, mode, scheme, task)
            for lr in lrs:
                res["acc"][mode][str(lr)].append(_fit_score(bb, mode, scheme, lr, epochs, seed, task))
        log(f"{name} seed {seed}: done in {time.perf_counter() - t0:.1f} s")
    return res


def _mean(v: list[float | None]) -> float | None:
    return None if any(a is None for a in v) else float(np.mean(v))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="damage1 only, 10+10 epochs, 2 seeds, 6 lrs")
    p.add_argument("--tasks", help=f"comma-separated (default {','.join(TASKS)})")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3, --quick 2)")
    p.add_argument("--scheme", default=SCHEME, help=f"sparse scheme to train (default {SCHEME})")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="where the data sets are")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    tasks = (args.tasks or ("damage1" if args.quick else ",".join(TASKS))).split(",")
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    lrs = [0.001, 0.01, 0.1, 1.0, 1e3, 1e6] if args.quick else list(LRS)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = [run_task(t, seeds, lrs, args.scheme, args.data_dir, args.quick, log) for t in tasks]

    cmd = "python -m benchmarks.qas" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    emit(f"`{cmd}`\n")
    for r in results:
        emit(f"### {r['task']}: sparse[{r['scheme']}], SGD, batch 20, {r['epochs']} epochs "
             f"(backbone pre-trained {r['pretrain_epochs']}); test accuracy, mean over {len(seeds)} seeds\n")
        emit(f"Before fine-tuning: float {np.mean(r['before_float']):.4f}, int8 {np.mean(r['before_int8']):.4f}.\n")
        head = ["update", "best lr", "best acc (± std)"] + [f"lr {lr:g}" for lr in r["lrs"]]
        emit("| " + " | ".join(head) + " |")
        emit("|" + "|".join("---" for _ in head) + "|")
        r["best"] = {}
        for mode, label in MODES:
            means = {lr: _mean(r["acc"][mode][str(lr)]) for lr in r["lrs"]}
            ok = {lr: v for lr, v in means.items() if v is not None}
            best = max(ok, key=lambda lr: ok[lr]) if ok else None
            r["best"][mode] = best
            if best is None:
                cells = [label, "-", "diverged"]
            else:
                sd = np.std(r["acc"][mode][str(best)], ddof=1) if len(seeds) > 1 else 0.0
                cells = [label, f"{best:g}", f"{ok[best]:.4f} ± {sd:.4f}"]
            cells += ["diverged" if means[lr] is None else f"{means[lr]:.4f}" for lr in r["lrs"]]
            emit("| " + " | ".join(cells) + " |")
        emit("")
        emit(f"||W|| / ||G|| per trained tensor (seed {seeds[0]}, median over batches; W in its own unit: "
             f"float, or int8 steps)\n")
        emit("| tensor | float | int8, no QAS | int8 + QAS | no-QAS / float |")
        emit("|---|---|---|---|---|")
        for k in r["ratios"]["float"]:
            f, n, qq = (r["ratios"][m][k] for m, _ in MODES)
            emit(f"| {k} | {f:.3g} | {n:.3g} | {qq:.3g} | {n / f:.3g} |")
        emit("")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
