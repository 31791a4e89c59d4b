"""The Skip2-LoRA paper's evaluation, end to end: every method on every task.

For each task one backbone is pre-trained (seed 0) and saved; then each method is
fine-tuned from that same backbone for every seed, each (task, method) in a fresh
process so that its peak resident memory is its own. Results are written as they come
(``results.json`` is rewritten atomically after every method, so an interrupted run keeps
what it finished), then ``results.md`` holds the paper-style tables and, with the
``plot`` extra, ``curves_<task>.png`` the test accuracy after every epoch.
"""
from __future__ import annotations

import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError
from .io_atomic import write_bytes_atomic, write_json_atomic
from .methods import method_class
from .threads import get_blas_threads

PAPER_TASKS = ("damage1", "damage2", "har")
# The paper's seven methods; further registered methods run when named explicitly.
PAPER_METHODS = ("ft-all", "ft-last", "ft-bias", "lora-all", "lora-last", "skip-lora", "skip2-lora")
# Keys averaged over seeds in results.json (mean and std).
AVERAGED = ("accuracy_before", "accuracy_after", "silent_accuracy_before", "silent_accuracy_after",
            "train_seconds", "forward_seconds", "backward_seconds", "update_seconds",
            "first_epoch_seconds", "later_epoch_seconds", "final_loss")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import __version__, core
    want = os.environ.get("EDGETUNE_ENGINE", "auto") or "auto"
    engine = "c" if want != "numpy" and core.available() else "numpy"
    return {"edgetune": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "blas_threads": get_blas_threads(), "engine": engine}


def _run_method(task_name: str, data_dir: str | None, model_dir: str, method: str, seeds: list[int],
                train_options: dict[str, Any], curve: bool, threads: int | None) -> dict[str, Any]:
    """One method on one task, every seed; runs in its own process."""
    import resource

    from .threads import set_blas_threads

    if threads:
        set_blas_threads(threads)

    from .data.task import load_task
    from .experiment import finetune_on_task
    from .nn.mlp import Backbone

    task = load_task(task_name, data_dir)
    model = Backbone.load(model_dir)
    runs = []
    for seed in seeds:
        _, result = finetune_on_task(task, model, method, train_options={**train_options, "seed": seed},
                                     curve=curve)
        runs.append(result)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"runs": runs, "peak_rss_mb": peak_kb / 1024}


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in AVERAGED:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
            out[key + "_std"] = float(np.std(vals))
    for key in ("trainable_params", "epochs", "batch_size", "lr", "optimizer", "rank", "alpha",
                "finetune_samples", "test_samples", "cache_bytes"):
        if key in runs[0]:
            out[key] = runs[0][key]
    if runs[0].get("curve") is not None:
        out["curve"] = np.mean([r["curve"] for r in runs], axis=0).tolist()
    return out


def reproduce(out_dir: str | os.PathLike, *, tasks: Sequence[str] = PAPER_TASKS,
              methods: Sequence[str] = PAPER_METHODS, seeds: int = 3, quick: bool = False,
              data_dir: str | os.PathLike | None = None, curves: bool = True,
              log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the evaluation and write ``results.json``, ``results.md`` and curves into ``out_dir``.

    ``quick`` divides the epoch counts by ten (pre-training by five) for a smoke run.
    """
    from .data.task import BUILTIN_TASKS, load_task
    from .experiment import pretrain_on_task

    for m in methods:
        method_class(m)
    for t in tasks:
        if t not in BUILTIN_TASKS and not str(t).endswith(".npz"):
            raise UsageError(f"unknown task '{t}': use {', '.join(BUILTIN_TASKS)} or an .npz task file")
    if seeds < 1:
        raise UsageError(f"seeds must be >= 1, got {seeds}")
    out = Path(out_dir)  # created by the first file written into it: a run that fails first leaves none
    data_dir = None if data_dir is None else str(data_dir)
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick, "seeds": list(range(seeds)),
                               "methods": list(methods), "tasks": {}}
    started = time.perf_counter()
    ctx = get_context("spawn")
    for task_name in tasks:
        task = load_task(task_name, data_dir)
        d = task.defaults
        epochs = d.get("epochs", 100)
        pre_epochs = d.get("pretrain_epochs", epochs)
        if quick:
            epochs, pre_epochs = max(2, epochs // 10), max(2, pre_epochs // 5)
        log(f"[{task.name}] {task.summary()}")
        model, pre = pretrain_on_task(task, epochs=pre_epochs, seed=0)
        model_dir = out / "models" / task.name
        model.save(model_dir)
        log(f"[{task.name}] pre-trained {pre.get('arch') or '-'.join(map(str, model.sizes))} in "
            f"{pre['pretrain_seconds']:.1f} s: "
            f"test accuracy {pre['accuracy_test']:.3f}")
        entry: dict[str, Any] = {"description": task.description, "summary": task.summary(),
                                 "backbone": {**pre, "model_dir": str(model_dir)},
                                 "epochs": epochs, "batch_size": d.get("batch_size", 20), "lr": d.get("lr", 0.01),
                                 "methods": {}}
        results["tasks"][task.name] = entry
        train = {"epochs": epochs}
        for method in methods:
            t0 = time.perf_counter()
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                res = pool.submit(_run_method, task_name, data_dir, str(model_dir), method,
                                  list(range(seeds)), train, curves, get_blas_threads()).result()
            agg = _aggregate(res["runs"])
            entry["methods"][method] = {**agg, "peak_rss_mb": res["peak_rss_mb"], "runs": res["runs"]}
            log(f"[{task.name}] {method:11s} accuracy {agg['accuracy_before']:.3f} -> {agg['accuracy_after']:.3f}"
                f" (+-{agg['accuracy_after_std']:.3f})  train {agg['train_seconds']:.3f} s"
                f"  peak RSS {res['peak_rss_mb']:.0f} MB  [{time.perf_counter() - t0:.1f} s]")
            _summarise(entry)
            write_json_atomic(out / "results.json", results)
    results["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(out / "results.json", results)
    write_bytes_atomic(out / "results.md", render_markdown(results).encode())
    if curves:
        results["plots"] = plot_curves(results, out)
    return results


def _summarise(entry: dict[str, Any]) -> None:
    ms = entry["methods"]
    if "lora-all" in ms and "skip2-lora" in ms:
        a, b = ms["lora-all"], ms["skip2-lora"]
        entry["skip2_vs_lora_all"] = {
            "time_reduction": 1 - b["train_seconds"] / a["train_seconds"],
            "speedup": a["train_seconds"] / b["train_seconds"],
            "later_epoch_speedup": (a["later_epoch_seconds"] / b["later_epoch_seconds"]
                                    if a.get("later_epoch_seconds") and b.get("later_epoch_seconds") else None),
            "accuracy_difference": b["accuracy_after"] - a["accuracy_after"],
        }


def _pm(m: dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
    if key not in m:
        return "-"
    s = fmt.format(m[key])
    std = m.get(key + "_std")
    return s if not std or math.isnan(std) else f"{s} ± {fmt.format(std)}"


def _engines(entry: dict[str, Any]) -> str:
    """Which engine ran the task's methods (a convolutional backbone runs on NumPy)."""
    used = sorted({r.get("engine") for m in entry["methods"].values() for r in m.get("runs", []) if r.get("engine")})
    return f", on the {' and '.join(used)} engine" if used else ""


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# edgetune reproduce: results", ""]
    mi = results["machine"]
    lines += [f"Machine: {mi['cpu']} ({mi['cores']} cores, BLAS threads: {mi.get('blas_threads')}), Python {mi['python']}, NumPy {mi['numpy']}, "
              f"edgetune {mi['edgetune']}, compiled engine {'built' if mi.get('engine') == 'c' else 'not used'}. Seeds: {len(results['seeds'])}"
              + (" (quick mode: epochs / 10)" if results.get("quick") else "") + ".", ""]
    for name, e in results["tasks"].items():
        b = e["backbone"]
        lines += [f"## {name}", "", e["summary"], "",
                  f"Backbone {b.get('arch') or '-'.join(map(str, b['sizes']))}, pre-trained {b['pretrain_epochs']} epochs "
                  f"(test accuracy {b['accuracy_test']:.3f}); fine-tuning {e['epochs']} epochs, batch "
                  f"{e['batch_size']}, SGD lr {e['lr']}{_engines(e)}. Mean ± std over seeds; times are training "
                  f"only.", ""]
        has_silent = any("silent_accuracy_after" in m for m in e["methods"].values())
        head = ["method", "trainable", "accuracy before", "accuracy after"]
        head += ["silent after"] if has_silent else []
        head += ["train s", "forward s", "backward s", "update s", "later epoch ms", "time vs lora-all",
                 "peak RSS MB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ref = e["methods"].get("lora-all", {}).get("train_seconds")
        for mname, m in e["methods"].items():
            row = [mname, str(m["trainable_params"]), f"{m['accuracy_before']:.3f}", _pm(m, "accuracy_after")]
            row += [_pm(m, "silent_accuracy_after")] if has_silent else []
            row += [_pm(m, "train_seconds"), f"{m['forward_seconds']:.3f}", f"{m['backward_seconds']:.3f}",
                    f"{m['update_seconds']:.3f}",
                    f"{1e3 * m['later_epoch_seconds']:.2f}" if m.get("later_epoch_seconds") else "-",
                    f"{m['train_seconds'] / ref:.3f}" if ref else "-", f"{m['peak_rss_mb']:.0f}"]
            lines.append("| " + " | ".join(row) + " |")
        s = e.get("skip2_vs_lora_all")
        if s:
            lines += ["", f"**skip2-lora vs lora-all**: fine-tuning time cut by {100 * s['time_reduction']:.1f}% "
                          f"({s['speedup']:.1f}x faster; {s['later_epoch_speedup']:.1f}x per epoch after the first), "
                          f"accuracy difference {100 * s['accuracy_difference']:+.1f} points."]
        lines.append("")
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], out: Path) -> list[str]:
    """Test accuracy after every epoch, one PNG per task (needs the ``plot`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for name, e in results["tasks"].items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for mname, m in e["methods"].items():
            if m.get("curve"):
                ax.plot(np.arange(1, len(m["curve"]) + 1), m["curve"], label=mname,
                        lw=2.2 if mname == "skip2-lora" else 1.2)
        ax.axhline(e["backbone"]["accuracy_test"], color="gray", ls=":", lw=1, label="pre-trained")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: test accuracy during fine-tuning (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        p = out / f"curves_{name}.png"
        tmp = out / f".curves_{name}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, p)
        paths.append(str(p))
    return paths
