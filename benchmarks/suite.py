"""The benchmark suite: edgetune's methods side by side, against PyTorch, and against the
hardware's limit. Every comparison is a ratio of two timings taken in the same process,
interleaved repeat by repeat, after a warm-up; each timing is a median over repeats.

Run from a source checkout:

    python -m benchmarks                  # full run, a few minutes
    python -m benchmarks --quick          # a smoke run (each section prints its time on stderr)
    edgetune bench --quick                # the same through the CLI

Sections: ``methods`` (every method on both engines vs the faster lora-all), ``torch``
(edgetune vs the same training in PyTorch), ``memory`` (peak RSS of complete fine-tuning
runs in child processes), ``scaling`` (per-epoch time vs samples, width, depth) and
``limit`` (cached skip2-lora epochs vs memory bandwidth and matmul throughput) and
``instructions`` (executed instructions per epoch under valgrind's callgrind).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._util import (DEFAULT_BLAS_THREADS, REPO, Report, Target, emit, get_blas_threads, machine_info,
                    median, peft_version, set_blas_threads, time_call, torch_available)

from edgetune.cli.bench_args import SECTIONS, add_arguments
BASELINE = "lora-all"
SAME_ACCURACY = 0.01   # |accuracy difference| that counts as "the same" for one method in two libraries


@dataclass
class Settings:
    quick: bool = False
    tiny: bool = False                 # smoke-test shapes: runs every code path, numbers meaningless
    data_dir: str | None = None
    sections: tuple[str, ...] = SECTIONS
    threads: int = 1                   # BLAS (and torch) threads for every measurement but "default" rows
    repeats: int = 3
    plot: str | None = None
    quiet: bool = False

    @property
    def pretrain_epochs(self) -> int:
        return 2 if self.tiny else (5 if self.quick else 20)

    def epochs(self, task: str, default: int) -> int:
        if self.tiny:
            return 3
        if self.quick:
            return 10
        return default

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


@dataclass
class Bench:
    """One fine-tuning workload: a pre-trained backbone and the data to fine-tune on."""
    name: str
    source: str
    backbone: Any
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    epochs: int
    lr: float = 0.01
    batch_size: int = 20
    task_arg: list[str] = field(default_factory=list)   # CLI arguments naming the task

    @property
    def shape(self) -> str:
        return "-".join(map(str, self.backbone.sizes))


def synthetic_xy(n: int, d: int, classes: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(classes, d)) * 1.5
    y = r.integers(0, classes, n)
    x = centers[y] + r.normal(size=(n, d)) + shift
    return x.astype(np.float32), y.astype(np.int64)


def make_benches(s: Settings) -> list[Bench]:
    import edgetune as et
    from edgetune.errors import EdgetuneError

    specs: list[tuple[str, Any, str]] = []
    if s.tiny:
        for name, (d, c, n) in {"tiny-a": (16, 2, 60), "tiny-b": (12, 3, 90)}.items():
            xp, yp = synthetic_xy(2 * n, d, c, 1)
            xf, yf = synthetic_xy(n, d, c, 2, shift=0.5)
            xt, yt = synthetic_xy(n, d, c, 3, shift=0.5)
            task = et.Task(name, xp, yp, xf, yf, xt, yt, defaults={"hidden": [8, 8], "epochs": 3})
            specs.append((name, task, f"synthetic, {n} fine-tune samples"))
    else:
        for name in ("damage1", "har"):
            try:
                task = et.load_task(name, s.data_dir)
                src = f"real {name} task"
            except EdgetuneError as e:
                if name == "damage1":
                    raise
                # The paper's HAR shapes with synthetic data, so the timings still mean something.
                xp, yp = synthetic_xy(4754, 150, 6, 1)
                xf, yf = synthetic_xy(2835, 150, 6, 2, shift=0.3)
                xt, yt = synthetic_xy(2758, 150, 6, 3, shift=0.3)
                task = et.Task("har", xp, yp, xf, yf, xt, yt, defaults={"hidden": [96, 96], "epochs": 200})
                src = f"SYNTHETIC data in the har task's shapes (real task unavailable: {e})"
            specs.append((name, task, src))
    benches = []
    for name, task, src in specs:
        d = task.defaults
        s.log(f"[setup] pre-training a backbone for {name} ({s.pretrain_epochs} epochs)")
        bb, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=d.get("hidden", [96, 96]), labels=task.labels,
                            epochs=s.pretrain_epochs, seed=0)
        benches.append(Bench(name, f"{src}, {len(task.y_finetune)} fine-tune / {len(task.y_test)} test samples",
                             bb, task.x_finetune, task.y_finetune, task.x_test, task.y_test,
                             epochs=s.epochs(name, d.get("epochs", 100)), lr=d.get("lr", 0.01),
                             batch_size=d.get("batch_size", 20), task_arg=["--task", name]))
    return benches


def run_edgetune(b: Bench, method: str, epochs: int | None = None, seed: int = 0,
                 engine: str | None = None) -> dict[str, Any]:
    """One complete fine-tuning with the public API; wall time of ``fit`` and per-epoch times."""
    from edgetune import FineTuner

    tuner = FineTuner(b.backbone, method, epochs=epochs or b.epochs, batch_size=b.batch_size, lr=b.lr, seed=seed,
                      engine=engine)
    t0 = time.perf_counter()
    tuner.fit(b.x, b.y)
    total = time.perf_counter() - t0
    ep = [e.seconds for e in tuner.history_.epochs]
    return {"total": total, "first": ep[0], "later": median(ep[1:]) if len(ep) > 1 else float("nan"),
            "tuner": tuner}


# ====================================================================== 1. methods

def section_methods(s: Settings, rep: Report, benches: list[Bench]) -> None:
    from edgetune import core
    from edgetune.methods import METHODS

    engines = ["c", "numpy"] if core.available() else ["numpy"]
    if not core.available():
        rep.findings.append(f"compiled engine unavailable ({core.unavailable_reason()}): NumPy rows only")
    rep.data["methods"] = {}
    short = 3 if s.tiny else 30                      # the short run the end-to-end target also asks about
    for b in benches:
        s.log(f"[methods] {b.name}: {len(METHODS)} methods x {len(engines)} engines x {s.repeats} repeats "
              f"x {b.epochs} epochs")
        runs_of = [(m, e) for m in METHODS for e in engines]
        for m, e in runs_of:                        # warm-up: imports, allocator, BLAS buffers
            run_edgetune(b, m, epochs=2, engine=e)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in runs_of}
        shorts: dict[tuple[str, str], list[float]] = {(m, e): [] for m in (BASELINE, "skip2-lora") for e in engines}
        for _ in range(s.repeats):
            for m, e in runs_of:                    # interleaved, so load changes hit every run alike
                r = run_edgetune(b, m, engine=e)
                r["acc"] = r.pop("tuner").score(b.x_test, b.y_test)
                runs[(m, e)].append(r)
            for m, e in shorts:
                shorts[(m, e)].append(run_edgetune(b, m, epochs=short, engine=e)["total"])
        med = {k: {q: median([r[q] for r in rs]) for q in ("total", "first", "later", "acc")} for k, rs in runs.items()}
        rep.data["methods"][b.name] = {f"{m}/{e}": v for (m, e), v in med.items()}
        # The baseline is the faster engine's lora-all: a ratio against a slow baseline does not count.
        base_e = min(engines, key=lambda e: med[(BASELINE, e)]["total"])
        base = med[(BASELINE, base_e)]
        base_later = min(med[(BASELINE, e)]["later"] for e in engines)
        t = rep.table(f"Method vs method: {b.name} ({b.shape}, batch {b.batch_size}, {b.epochs} epochs)",
                      [("method", "method"), ("engine", "engine"), ("total", "fine-tune s"), ("first", "1st epoch ms"),
                       ("later", "later epoch ms"), ("x_total", "speed-up vs fastest lora-all, end to end"),
                       ("x_later", "per later epoch"), ("acc", "test acc")])
        for (m, e), v in med.items():
            t.add(method=m, engine=e, total=v["total"], first=1e3 * v["first"], later=1e3 * v["later"],
                  x_total=base["total"] / v["total"], x_later=base_later / v["later"], acc=v["acc"])
        t.notes.append(f"data: {b.source}; backbone pre-trained {s.pretrain_epochs} epochs; speed-up = the faster "
                       f"engine's lora-all time ({base_e} end to end) / the row's time; fine-tune s is the wall time of "
                       f"FineTuner.fit (set-up, cache checks and epochs); medians of {s.repeats} runs")
        best = "c" if "c" in engines else "numpy"
        sk = med[("skip2-lora", best)]
        rep.targets.append(Target(f"{b.name}: skip2-lora vs the fastest lora-all, end to end ({b.epochs} epochs)",
                                  base["total"] / sk["total"], 25,
                                  detail=f"{base['total']:.3f} s ({base_e}) vs {sk['total']:.4f} s ({best})"))
        sb = min(median(shorts[(BASELINE, e)]) for e in engines)
        ss = median(shorts[("skip2-lora", best)])
        rep.targets.append(Target(f"{b.name}: skip2-lora vs the fastest lora-all, end to end ({short} epochs)",
                                  sb / ss, 15, detail=f"{sb:.4f} s vs {ss:.4f} s"))
        rep.targets.append(Target(f"{b.name}: skip2-lora vs the fastest lora-all, per epoch after the first",
                                  base_later / sk["later"], 30,
                                  detail=f"{1e3 * base_later:.3f} ms vs {1e3 * sk['later']:.3f} ms"))
        if "c" in engines:
            rep.targets.append(Target(f"{b.name}: lora-all, compiled engine vs NumPy+BLAS engine",
                                      med[(BASELINE, "numpy")]["total"] / med[(BASELINE, "c")]["total"], 1,
                                      detail="the baseline is at least as fast in C as with BLAS"))
        worst = max(abs(med[(m, e)]["acc"] - med[(m, engines[0])]["acc"]) for m, e in runs_of)
        rep.targets.append(Target(f"{b.name}: same accuracy, C vs NumPy engine (each method)", worst, SAME_ACCURACY,
                                  higher_is_better=False, unit="", detail="largest |accuracy difference|"))


# ====================================================================== 2. torch

def _torch_threads_configs(s: Settings) -> list[tuple[str, int, int]]:
    import torch

    configs = [(f"{s.threads} thread{'s' if s.threads > 1 else ''} each", s.threads, s.threads)]
    if s.quick:
        return configs          # the default-threads rows only in the full run
    nd, td = DEFAULT_BLAS_THREADS or s.threads, _TORCH_DEFAULT_THREADS or torch.get_num_threads()
    if (nd, td) != (s.threads, s.threads):
        configs.append((f"defaults (NumPy {nd}, torch {td})", nd, td))
    return configs


_TORCH_DEFAULT_THREADS: int | None = None


def section_torch(s: Settings, rep: Report, benches: list[Bench]) -> None:
    if not torch_available():
        rep.findings.append("edgetune vs PyTorch: skipped, torch is not installed (pip install edgetune[torch])")
        for b in benches:
            rep.targets.append(Target(f"{b.name}: edgetune vs PyTorch", None, 3, detail="torch not installed"))
        return
    import torch

    from . import torch_ref

    have_peft = peft_version() is not None and not s.tiny   # PEFT's import alone takes seconds
    methods = list(torch_ref.TORCH_METHODS)
    rep.data["torch"] = {}
    t = rep.table("edgetune vs PyTorch (same architecture, init, batches, epochs, SGD)",
                  [("task", "task"), ("threads", "threads"), ("epochs", "epochs"), ("method", "method"), ("et", "edgetune s"),
                   ("pt", "PyTorch s"), ("ratio", "PyTorch / edgetune"), ("et_acc", "edgetune acc"),
                   ("pt_acc", "PyTorch acc")])
    for b in benches:
        x_prep, xt_prep = b.backbone.prepare(b.x), b.backbone.prepare(b.x_test)
        for label, nthreads, tthreads in _torch_threads_configs(s):
            set_blas_threads(nthreads)
            torch.set_num_threads(tthreads)

            def torch_run(method: str, epochs: int, peft_model: bool = False) -> dict[str, Any]:
                from edgetune import FineTuner

                init = FineTuner(b.backbone, method, seed=0).method.adapter_tensors() if method != "ft-all" else {}
                if peft_model:
                    model = torch_ref.peft_lora_model(b.backbone)
                else:
                    model = torch_ref.build(method, b.backbone, init, len(x_prep))
                t0 = time.perf_counter()
                if peft_model:
                    times = torch_ref.finetune("lora-all", model, x_prep, b.y, epochs=epochs,
                                               batch_size=b.batch_size, lr=b.lr)
                else:
                    times = torch_ref.finetune(method, model, x_prep, b.y, epochs=epochs,
                                               batch_size=b.batch_size, lr=b.lr)
                total = time.perf_counter() - t0
                return {"total": total, "later": median(times[1:]), "model": model}

            matched = nthreads == s.threads and tthreads == s.threads
            # PyTorch is the slow side: the larger task runs fewer epochs here, and the
            # default-thread rows (many times slower on a shared machine, where BLAS threads
            # wait on each other) fewer still, once, so that the suite stays short.
            epochs = b.epochs if b.name != "har" else min(b.epochs, 20)
            repeats = s.repeats
            if not matched:
                epochs, repeats = min(epochs, 10), 1
            variants = [(m, False) for m in methods] + ([("lora-all", True)] if have_peft else [])
            s.log(f"[torch] {b.name}, {label}: {len(variants)} x 2 runs x {repeats} repeats x {epochs} epochs")
            for m, p in variants:                    # warm-up
                run_edgetune(b, m, epochs=2)
                torch_run(m, 2, p)
            et_runs: dict[str, list] = {m: [] for m in methods}
            pt_runs: dict[tuple[str, bool], list] = {v: [] for v in variants}
            for _ in range(repeats):
                for m, p in variants:
                    if not p:
                        r = run_edgetune(b, m, epochs=epochs)
                        r["acc"] = r.pop("tuner").score(b.x_test, b.y_test)
                        et_runs[m].append(r)
                    r = torch_run(m, epochs, p)
                    r["acc"] = torch_ref.accuracy(r.pop("model"), xt_prep, b.y_test)
                    pt_runs[(m, p)].append(r)
            et = {m: {k: median([r[k] for r in rs]) for k in ("total", "later", "acc")} for m, rs in et_runs.items()}
            pt = {v: {k: median([r[k] for r in rs]) for k in ("total", "later", "acc")} for v, rs in pt_runs.items()}
            rep.data["torch"][f"{b.name}/{label}"] = {"edgetune": et, "torch": {f"{m}{'/peft' if p else ''}": v
                                                                                 for (m, p), v in pt.items()}}
            for m in methods:
                t.add(task=b.name, threads=label, epochs=epochs, method=m, et=et[m]["total"], pt=pt[(m, False)]["total"],
                      ratio=pt[(m, False)]["total"] / et[m]["total"], et_acc=et[m]["acc"], pt_acc=pt[(m, False)]["acc"])
            if have_peft:
                v = pt[("lora-all", True)]
                t.add(task=b.name, threads=label, epochs=epochs, method="lora-all (PEFT)", et=et["lora-all"]["total"], pt=v["total"],
                      ratio=v["total"] / et["lora-all"]["total"], et_acc=et["lora-all"]["acc"], pt_acc=v["acc"])
            ptl = pt[("lora-all", False)]
            t.add(task=b.name, threads=label, epochs=epochs, method="edgetune skip2-lora vs PyTorch lora-all",
                  et=et["skip2-lora"]["total"], pt=ptl["total"], ratio=ptl["total"] / et["skip2-lora"]["total"],
                  et_acc=et["skip2-lora"]["acc"], pt_acc=ptl["acc"])
            if not matched:
                continue                           # targets are judged at matched thread counts
            for m in ("lora-all", "ft-all"):
                rep.targets.append(Target(
                    f"{b.name}: edgetune vs PyTorch, {m}, batch {b.batch_size}", pt[(m, False)]["total"] / et[m]["total"],
                    5 if m == "lora-all" else 3, detail=f"{label}; {et[m]['total']:.3f} s vs {pt[(m, False)]['total']:.3f} s"))
            rep.targets.append(Target(
                f"{b.name}: edgetune skip2-lora vs PyTorch lora-all, end to end", ptl["total"] / et["skip2-lora"]["total"],
                50, detail=f"{label}; acc {et['skip2-lora']['acc']:.4f} vs {ptl['acc']:.4f}"))
            worst = max(abs(et[m]["acc"] - pt[(m, False)]["acc"]) for m in methods)
            rep.targets.append(Target(f"{b.name}: same accuracy, edgetune vs PyTorch (each method)", worst, SAME_ACCURACY,
                                      higher_is_better=False, unit="",
                                      detail="largest |accuracy difference| over " + ", ".join(methods)))
    t.notes.append(f"ratio > 1: edgetune is faster. Both start from the same backbone and adapter tensors and see the "
                   f"same batches (edgetune's seeded permutation); PyTorch uses nn.Linear + LoRA modules, "
                   f"torch.optim.SGD and manual batching over tensors; its skip2-lora caches the frozen "
                   f"activations in a preallocated tensor filled in epoch 1. Medians of {s.repeats} runs "
                   f"(default-thread rows: 1 run).")
    if not have_peft:
        t.notes.append("PEFT is not installed: no PEFT row (pip install peft to add it).")
    set_blas_threads(s.threads)
    torch.set_num_threads(s.threads)


# ====================================================================== 3. memory

# A fork of this (large) process would start with this process's resident pages, and Linux
# keeps the largest RSS across exec in ru_maxrss; so a small launcher forks the command.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write("%d %d" % (usage.ru_maxrss, os.waitstatus_to_exitcode(status)))
"""


def _peak_rss(cmd: list[str], threads: int) -> tuple[int, str]:
    """Peak resident set size (bytes) of a command, from its own rusage, and its output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "rusage"
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(res), *cmd], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.stdout.decode(errors="replace")
        maxrss_kb, code = (int(v) for v in res.read_text().split())
    if code != 0 or proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({code}):\n{out[-2000:]}")
    return maxrss_kb * 1024, out


def section_memory(s: Settings, rep: Report, benches: list[Bench]) -> None:
    b = benches[0]
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    task_args = list(b.task_arg)
    extra: list[str] = []
    if s.data_dir and not s.tiny:
        task_args += ["--data-dir", s.data_dir]
    if s.tiny:   # a task file, so the CLI can read it
        npz = tmp / "tiny.npz"
        xp, yp = synthetic_xy(120, 16, 2, 1)
        np.savez(npz, x_pretrain=xp, y_pretrain=yp, x_finetune=b.x, y_finetune=b.y, x_test=b.x_test, y_test=b.y_test)
        task_args = ["--task", str(npz)]
        extra = ["--hidden", "8,8", "--epochs", "3", "--pretrain-epochs", "2"]
    elif s.quick:   # buffers are allocated once: fewer epochs, the same peak
        extra = ["--epochs", "10", "--pretrain-epochs", "10"]
    js = tmp / "et.json"
    et_cmd = [py, "-m", "edgetune", "finetune", *task_args, "--method", "skip2-lora", "--quiet", "--json", str(js), *extra]
    pt_cmd = [py, str(REPO / "benchmarks" / "torch_finetune.py"), *task_args, "--method", "skip2-lora", *extra]
    have_torch = torch_available()
    rows = [("python + import numpy", [py, "-c", "import numpy"])]
    if not s.tiny:   # more baselines (the smoke test skips them: each is a second of start-up)
        rows.append(("python + import edgetune CLI", [py, "-c", "import edgetune.cli; edgetune.cli.build_parser()"]))
    rows.append(("edgetune finetune (complete run)", et_cmd))
    if have_torch:
        if not s.tiny:
            rows.append(("python + import torch", [py, "-c", "import torch"]))
        rows.append(("PyTorch equivalent (complete run)", pt_cmd))
    t = rep.table(f"Peak memory: a complete skip2-lora fine-tuning run on {b.name}",
                  [("what", "process"), ("mb", "peak RSS MB"), ("vs", "vs edgetune run")])
    peaks: dict[str, int] = {}
    outs: dict[str, str] = {}
    try:
        for what, cmd in rows:
            s.log(f"[memory] {what}")
            peaks[what], outs[what] = _peak_rss(cmd, s.threads)
        result = json.loads(js.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    et_peak = peaks["edgetune finetune (complete run)"]
    for what, _ in rows:
        t.add(what=what, mb=peaks[what] / 2**20, vs=peaks[what] / et_peak)
    cache_bytes = int(result.get("cache_bytes", 0))
    t.add(what="skip-cache (part of the edgetune run)", mb=cache_bytes / 2**20, vs=cache_bytes / et_peak)
    t.notes.append("command: `" + shlex.join(["edgetune", *et_cmd[3:]]).replace(str(tmp), "$TMP") + "`"
                   + " (pre-trains a backbone first, as the command does without --model)")
    if have_torch:
        t.notes.append("PyTorch: `" + shlex.join(["python", "benchmarks/torch_finetune.py", *pt_cmd[2:]]).replace(str(tmp), "$TMP") +
                       "` (the same pre-training and skip2-lora fine-tuning with nn.Linear, autograd and a tensor cache)")
        t.notes.append("accuracy: edgetune " + f"{result['accuracy_after']:.4f}" + ", PyTorch " +
                       outs["PyTorch equivalent (complete run)"].strip().splitlines()[-1])
    t.notes.append(f"peak RSS = ru_maxrss of the child process (os.wait4), run with {s.threads} BLAS/OpenMP "
                   f"thread(s) like the rest of the suite")
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not any((REPO / "edgetune").rglob("__pycache__")):
        t.notes.append("edgetune's modules compiled in each process (PYTHONDONTWRITEBYTECODE is set and the checkout "
                       "has no __pycache__): about 2 MB more than with .pyc files, as after pip install "
                       "(python -m benchmarks.peak_memory measures both)")
    else:
        t.notes.append("edgetune's modules read from .pyc files (python -m benchmarks.peak_memory also measures them "
                       "compiled in the process)")
    rep.data["memory"] = {k: v for k, v in peaks.items()} | {"cache_bytes": cache_bytes}
    rep.targets.append(Target(f"{b.name}: peak RSS of a complete edgetune fine-tune", et_peak / 2**20, 45,
                              higher_is_better=False, unit=" MB", detail=f"skip-cache {cache_bytes} B"))
    if have_torch:
        pt_peak = peaks["PyTorch equivalent (complete run)"]
        rep.targets.append(Target(f"{b.name}: peak RSS, PyTorch / edgetune", pt_peak / et_peak, 3,
                                  detail=f"{pt_peak / 2**20:.1f} MB vs {et_peak / 2**20:.1f} MB"))


# ====================================================================== 4. scaling

def section_scaling(s: Settings, rep: Report) -> None:
    from edgetune import Backbone, FineTuner

    if s.tiny:
        sweeps = {"samples N": [(n, [16, 8, 8, 2]) for n in (40, 80)],
                  "hidden width": [(60, [16, w, w, 2]) for w in (4, 8)],
                  "hidden layers": [(60, [16] + [8] * d + [2]) for d in (1, 2)]}
        epochs = 3
    else:
        ns = (250, 1000, 4000) if s.quick else (250, 500, 1000, 2000, 4000)
        ws = (32, 96, 384) if s.quick else (32, 64, 96, 192, 384)
        ds = (1, 2, 4) if s.quick else (1, 2, 4, 8)
        sweeps = {"samples N": [(n, [512, 96, 96, 2]) for n in ns],
                  "hidden width": [(470, [512, w, w, 2]) for w in ws],
                  "hidden layers": [(470, [512] + [96] * d + [2]) for d in ds]}
        epochs = 3 if s.quick else 5
    t = rep.table("Scaling: per-epoch time (ms) vs samples, width and depth (synthetic data, batch 20)",
                  [("sweep", "sweep"), ("value", "value"), ("sizes", "sizes"), ("lora", "lora-all ms/epoch"),
                   ("first", "skip2-lora 1st epoch ms"), ("cached", "skip2-lora cached epoch ms"),
                   ("ratio", "lora-all / skip2 cached")])
    points: dict[str, list[dict[str, float]]] = {}
    for sweep, cases in sweeps.items():
        s.log(f"[scaling] {sweep}: {len(cases)} points")
        for n, sizes in cases:
            x, y = synthetic_xy(n, sizes[0], sizes[-1], 5)
            bb = Backbone.build(sizes, seed=0)
            res: dict[str, list] = {"lora-all": [], "skip2-lora": []}
            for m in res:
                FineTuner(bb, m, epochs=1).fit(x[:40], y[:40])   # warm-up
            for _ in range(1 if s.quick or s.tiny else 2):
                for m in res:
                    tuner = FineTuner(bb, m, epochs=epochs).fit(x, y)
                    res[m].append([e.seconds for e in tuner.history_.epochs])
            lora = median([v for r in res["lora-all"] for v in r])
            first = median([r[0] for r in res["skip2-lora"]])
            cached = median([v for r in res["skip2-lora"] for v in r[1:]])
            value = n if sweep == "samples N" else (sizes[1] if sweep == "hidden width" else len(sizes) - 2)
            points.setdefault(sweep, []).append({"value": value, "lora": lora, "first": first, "cached": cached})
            t.add(sweep=sweep, value=value, sizes="-".join(map(str, sizes)) + (f", N={n}" if sweep != "samples N" else ""),
                  lora=1e3 * lora, first=1e3 * first, cached=1e3 * cached, ratio=lora / cached)
    t.notes.append(f"{epochs} epochs per run; medians over epochs{'' if s.quick or s.tiny else ' and 2 runs'}")
    rep.data["scaling"] = points
    if s.plot:
        try:
            import matplotlib
        except ImportError:
            t.notes.append("no plot: matplotlib is not installed (pip install edgetune[plot])")
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, (sweep, pts) in zip(axes, points.items()):
            xs = [p["value"] for p in pts]
            for key, label, style in (("lora", "lora-all", "o-"), ("first", "skip2-lora 1st epoch", "s--"),
                                      ("cached", "skip2-lora cached epoch", "^-")):
                ax.loglog(xs, [1e3 * p[key] for p in pts], style, label=label)
            ax.set_xlabel(sweep)
            ax.set_ylabel("ms per epoch")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend()
        fig.suptitle("edgetune per-epoch time, batch 20 (log-log)")
        fig.tight_layout()
        Path(s.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(s.plot, dpi=90)
        plt.close(fig)
        t.notes.append(f"plot: {os.path.relpath(s.plot, REPO) if Path(s.plot).is_absolute() else s.plot}")


# ====================================================================== 5. the physical limit

def section_limit(s: Settings, rep: Report, benches: list[Bench]) -> None:
    big = 128 if s.tiny else (512 if s.quick else 1024)
    a = np.random.default_rng(0).standard_normal((big, big), dtype=np.float32)
    bm = np.random.default_rng(1).standard_normal((big, big), dtype=np.float32)
    out = np.empty_like(a)
    t_mm = time_call(lambda: np.matmul(a, bm, out=out), repeats=7, number=3)
    flops_rate = 2.0 * big**3 / t_mm
    t = rep.table("The physical limit: cached skip2-lora epochs vs memory bandwidth and matmul throughput",
                  [("task", "task"), ("cached", "cached epoch ms"), ("bytes", "cache bytes/epoch"),
                   ("t_mem", "memcpy of the cache ms"), ("flops", "adapter MFLOP/epoch"), ("t_flop", "t_flop ms"),
                   ("limit", "limit ms"), ("ratio", "measured / limit"), ("per_batch", "us per batch")])
    br = rep.table("Where a batch goes (microseconds per batch, from the trainer's phase timers, epochs after the first)",
                   [("task", "task"), ("method", "method"), ("engine", "engine"), ("forward", "forward"),
                    ("backward", "loss grad + backward"), ("update", "optimizer step"), ("rest", "rest"),
                    ("batch", "batch")])
    rep.data["limit"] = {"matmul_gflops": flops_rate / 1e9}
    for b in benches:
        s.log(f"[limit] {b.name}")
        epochs = 5 if s.tiny else (10 if s.quick else 30)
        runs = [run_edgetune(b, "skip2-lora", epochs=epochs) for _ in range(1 if s.tiny else 3)]
        cached = median([e.seconds for r in runs for e in r["tuner"].history_.epochs[1:]])
        method = runs[-1]["tuner"].method
        n, row = len(b.y), method.row_width
        itemsize = np.dtype(b.backbone.dtype).itemsize
        nbytes = n * row * itemsize
        src = np.random.default_rng(2).standard_normal((n, row)).astype(b.backbone.dtype)
        dst = np.empty_like(src)
        t_mem = time_call(lambda: np.copyto(dst, src), repeats=15, number=20)   # the cache's bytes / memcpy bandwidth
        r, layers, n_out = method.options.rank, b.backbone.n_layers, b.backbone.sizes[-1]
        flops = 4 * n * r * method.d_in + 6 * n * layers * r * n_out   # u=hA^T, dA; logits, dB, du
        t_flop = flops / flops_rate
        limit = max(t_mem, t_flop)
        n_batches = -(-n // b.batch_size)
        t.add(task=b.name, cached=1e3 * cached, bytes=nbytes, t_mem=1e3 * t_mem, flops=flops / 1e6,
              t_flop=1e3 * t_flop, limit=1e3 * limit, ratio=cached / limit, per_batch=1e6 * cached / n_batches)
        rep.targets.append(Target(f"{b.name}: cached skip2-lora epoch vs the memory floor", cached / limit, 2,
                                  higher_is_better=False, detail=f"{1e3 * cached:.3f} ms vs {1e3 * limit:.4f} ms"))
        for m in ("lora-all", "skip2-lora"):
            for engine in ("c", "numpy"):
                mruns = runs if (m, engine) == ("skip2-lora", runs[-1]["tuner"].history_.engine) else \
                    [run_edgetune(b, m, epochs=epochs, engine=engine) for _ in range(len(runs))]
                hist = mruns[-1]["tuner"].history_
                if hist.engine != engine:
                    continue                   # the compiled engine is not built here
                recs = [e for r in mruns for e in r["tuner"].history_.epochs[1:]]
                ph = {k: median([getattr(e, f"{k}_seconds") for e in recs]) / n_batches
                      for k in ("forward", "backward", "update")}
                ph["batch"] = median([e.seconds for e in recs]) / n_batches
                ph["rest"] = ph["batch"] - ph["forward"] - ph["backward"] - ph["update"]
                br.add(task=b.name, method=m if m == "lora-all" else "skip2-lora (cached)", engine=engine,
                       **{k: 1e6 * v for k, v in ph.items()})
    t.notes.append(f"t_mem = the time of one memcpy of the cache's bytes (NumPy copyto of an array of the same size: "
                   f"cache bytes / memcpy bandwidth); t_flop = the adapters' minimal FLOPs (forward u = h A^T and "
                   f"logits, backward dB, du, dA) / throughput of a {big}x{big} float32 matmul "
                   f"({flops_rate / 1e9:.1f} GFLOP/s); limit = max(t_mem, t_flop); cached epochs on the default engine")
    br.notes.append("forward (with cache reads and, in C, the eager fill in epoch 1) / loss grad + backward / "
                    "optimizer step: the trainer's per-phase timers (the compiled engine times them in C) divided by "
                    "the batches; rest = epoch time - the three phases (the clocks, the loop). skip2-lora in C runs a "
                    "batch in one pass over blocks of cached rows (forward, loss gradient and dA together), timed as "
                    "forward; its backward column holds the gradients' last factors (dB, the column scales). "
                    "lora-all in C steps each tensor as soon as its gradient is ready (the fused update), timed "
                    "within backward: its optimizer-step column is then 0.")


# ====================================================================== 6. instructions

_COUNT = """import sys, numpy as np, edgetune as et
from edgetune.data.task import load_task
method, epochs = sys.argv[1], int(sys.argv[2])
bb = et.Backbone.load(sys.argv[3])
d = np.load(sys.argv[4])
et.FineTuner(bb, method, epochs=epochs, engine="c").fit(d["x"], d["y"])
"""


def _instructions(model: Path, data: Path, method: str, epochs: int, tmp: Path) -> int:
    """Instructions executed inside the calls into the compiled engine (valgrind's callgrind), for a whole fit."""
    out = tmp / f"cg.{method}.{epochs}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=ffi_call*",
           sys.executable, "-c", _COUNT, method, str(epochs), str(model), str(data)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=1800)
    for line in out.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def section_instructions(s: Settings, rep: Report, benches: list[Bench]) -> None:
    from edgetune import core

    if shutil.which("valgrind") is None or not core.available():
        rep.findings.append("instruction counts: skipped (needs valgrind and the compiled engine)")
        return
    if s.tiny:   # a Python process under valgrind takes tens of seconds: not for the smoke test
        rep.findings.append("instruction counts: not run with --tiny")
        return
    t = rep.table("Executed instructions per epoch (valgrind callgrind, inside the compiled engine)",
                  [("task", "task"), ("lora", "lora-all / epoch"), ("first", "skip2-lora 1st epoch"),
                   ("cached", "skip2-lora cached epoch"), ("ratio", "lora-all / skip2 cached"),
                   ("ratio100", "lora-all / skip2-lora, 100 epochs")])
    rep.data["instructions"] = {}
    for b in benches[:1] if s.quick else benches:
        s.log(f"[instructions] {b.name} under callgrind")
        k = 10
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            b.backbone.save(tmp / "model")
            np.savez(tmp / "data.npz", x=b.x, y=b.y)
            counts = {(m, e): _instructions(tmp / "model", tmp / "data.npz", m, e, tmp)
                      for m in ("lora-all", "skip2-lora") for e in (1, 1 + k)}
        lora = (counts[("lora-all", 1 + k)] - counts[("lora-all", 1)]) / k
        first = counts[("skip2-lora", 1)]
        cached = (counts[("skip2-lora", 1 + k)] - first) / k
        r100 = 100 * lora / (first + 99 * cached)
        rep.data["instructions"][b.name] = {"lora_epoch": lora, "skip2_first": first, "skip2_cached": cached}
        t.add(task=b.name, lora=f"{lora / 1e6:.2f} M", first=f"{first / 1e6:.2f} M", cached=f"{cached / 1e6:.3f} M",
              ratio=lora / cached, ratio100=r100)
        rep.targets.append(Target(f"{b.name}: executed instructions, lora-all / cached skip2-lora epoch", lora / cached,
                                  30, detail="callgrind, x86-64, a machine-independent count"))
    t.notes.append("Counted with `valgrind --tool=callgrind --toggle-collect=ffi_call*` (every call from Python into the compiled engine) over a whole fit of 1 and "
                   "1+k epochs; per epoch = the difference / k. Instruction counts do not depend on the machine's load "
                   "and stand in for an in-order core such as the Cortex-A53, where time follows instructions more "
                   "closely than on this out-of-order x86.")


# ====================================================================== driver

def settings_from_args(args: argparse.Namespace) -> Settings:
    sections = SECTIONS
    if args.only:
        sections = tuple(x.strip() for x in args.only.split(",") if x.strip())
        bad = [x for x in sections if x not in SECTIONS]
        if bad:
            raise ValueError(f"--only: unknown section(s) {', '.join(bad)}; use {', '.join(SECTIONS)}")
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    repeats = args.repeats or (1 if args.quick or args.tiny else 3)
    return Settings(quick=args.quick, tiny=args.tiny, data_dir=args.data_dir, sections=sections,
                    threads=args.threads, repeats=repeats, plot=args.plot, quiet=args.quiet)


def run_suite(s: Settings) -> Report:
    global _TORCH_DEFAULT_THREADS
    if torch_available():
        import torch

        _TORCH_DEFAULT_THREADS = _TORCH_DEFAULT_THREADS or torch.get_num_threads()
    info = machine_info(_TORCH_DEFAULT_THREADS)
    set_blas_threads(s.threads)
    rep = Report()
    rep.data["machine"] = info
    rep.data["settings"] = {"quick": s.quick, "tiny": s.tiny, "threads": s.threads, "repeats": s.repeats,
                            "blas_threads_now": get_blas_threads()}
    t0 = time.perf_counter()
    benches = make_benches(s) if set(s.sections) & {"methods", "torch", "memory", "limit", "instructions"} else []
    for name, fn in (("methods", section_methods), ("torch", section_torch), ("memory", section_memory),
                     ("scaling", lambda s_, r_, b_: section_scaling(s_, r_)), ("limit", section_limit),
                     ("instructions", section_instructions)):
        if name in s.sections:
            t1 = time.perf_counter()
            fn(s, rep, benches)
            s.log(f"[{name}] done in {time.perf_counter() - t1:.1f} s")
    if torch_available():
        import torch

        torch.set_num_threads(s.threads)
    rep.data["seconds"] = time.perf_counter() - t0
    return rep


def render(rep: Report, command: str) -> str:
    info = rep.data["machine"]
    st = rep.data["settings"]
    lines = [f"command: `{command}`",
             f"run took {rep.data['seconds']:.0f} s; measurements with {st['threads']} BLAS/torch thread(s) "
             f"unless a row says otherwise; {st['repeats']} repeat(s)" + (" (--quick)" if st["quick"] else "")
             + (" (--tiny: smoke-test shapes, numbers meaningless)" if st["tiny"] else ""), ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines.append("")
    for t in [*rep.tables, rep.targets_table()]:
        lines += [t.markdown(), ""]
    if rep.findings:
        lines += [f"- {f}" for f in rep.findings]
    return "\n".join(lines)


FINDINGS_HEADING = "## What limits it"


def write_markdown(path: str, body: str) -> None:
    """Write BENCHMARKS.md: the generated tables, then the hand-written analysis kept from
    the previous file (everything from ``## What limits it`` on)."""
    p = Path(path)
    kept = ""
    if p.exists():
        old = p.read_text()
        i = old.find(FINDINGS_HEADING)
        if i >= 0:
            kept = old[i:]
    head = ("# Benchmarks\n\nThe latest run of the benchmark suite (`benchmarks/`). Every number that compares "
            "two things is a ratio of timings taken side by side in one process, so it survives a noisy machine "
            "better than the absolute times, which are shown for context only. Regenerate with the command "
            "below; the analysis at the end is kept. The machine has 2 cores shared with other jobs: a load "
            "average above ~1 at the start means the suite competed for the CPU, which shows in absolute times "
            "and adds noise to the ratios (+-20 %).\n\n")
    p.write_text(head + body.rstrip() + "\n\n" + (kept or f"{FINDINGS_HEADING}\n\n(not written yet)\n"))


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        s = settings_from_args(args)
    except ValueError as e:
        p.error(str(e))
    return run(args, s, prog)


def run(args: argparse.Namespace, s: Settings | None = None, prog: str = "edgetune bench") -> int:
    s = s or settings_from_args(args)
    argv = sys.argv[1:] if prog == "python -m benchmarks" else sys.argv[2:]
    command = prog + (" " + shlex.join(argv) if argv else "")
    rep = run_suite(s)
    text = render(rep, command)
    emit(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    if args.json == "-":  # stdout, which 'edgetune bench --json -' keeps for the JSON alone
        from edgetune.cli import _common

        out = _common.JSON_STDOUT or sys.stdout
        out.write(json.dumps(rep.data, indent=2, default=str) + "\n")
        out.flush()
    elif args.json:
        Path(args.json).write_text(json.dumps(rep.data, indent=2, default=str))
    missed = text.count("| MISS ")
    if missed:  # a target is a goal set for this project, not a test: the benchmark still exits 0
        print(f"{missed} target(s) not reached on this machine (MISS rows above); a benchmark reports them "
              f"and exits 0: the tests check correctness", file=sys.stderr)
    return 0
