"""Peak memory of the command-line fine-tune that BENCHMARKS.md's "Peak memory" measures:

    edgetune finetune --task damage1 --data-dir DIR --method skip2-lora --quiet --json FILE

Peak RSS is the child's ru_maxrss (the suite's launcher, benchmarks/suite.py), with one BLAS
thread, for every source tree given (default: this checkout; e.g. a worktree of an older commit
as "before"), runs interleaved tree by tree. Two states of Python's bytecode, which moves the
peak by about 2 MB:

- compiled: every module read from a .pyc (a temporary PYTHONPYCACHEPREFIX, filled by a first
  run), as after ``pip install``;
- from source: PYTHONDONTWRITEBYTECODE=1 and no __pycache__ in the tree, so edgetune's modules
  are compiled in the process, as in a checkout that never wrote bytecode.

and a first run: compiled, with an empty parsed-data cache (XDG_CACHE_HOME), so the recordings'
CSV files are parsed in the process.

``--phases`` also shows where the peak happens: VmHWM and VmRSS (/proc/self/status) at the
command's stages, in one process of this checkout.

    python -m benchmarks.peak_memory --data-dir ../shared/data [--tree DIR ...] [--repeats 3] [--phases]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ._util import REPO, machine_info
from .suite import _LAUNCHER


def command(data_dir: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "edgetune", "finetune", "--task", "damage1", "--data-dir", data_dir,
            "--method", "skip2-lora", "--quiet", "--json", str(out)]


def peak_mb(tree: Path, cmd: list[str], env_extra: dict[str, str]) -> tuple[float, dict]:
    """(peak RSS in MB, the command's JSON result) of one run of ``cmd`` with ``tree`` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "rusage"
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(res), *cmd], cwd=tree, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        maxrss_kb, code = (int(v) for v in res.read_text().split())
    if code != 0 or proc.returncode != 0:
        raise RuntimeError(f"{tree}: the command failed ({code}):\n{proc.stdout.decode(errors='replace')[-2000:]}")
    return maxrss_kb / 1024, json.loads(Path(cmd[-1]).read_text())


def has_bytecode(tree: Path) -> bool:
    return any((tree / "edgetune").rglob("__pycache__"))


_PHASES = r"""
import sys
def mark(stage):
    v = {k: int(x.split()[0]) / 1024 for k, x in (l.split(":", 1) for l in open("/proc/self/status"))
         if k in ("VmHWM", "VmRSS")}
    print(f"{stage:42s} {v['VmRSS']:8.1f} {v['VmHWM']:8.1f}", file=sys.stderr)
def wrap(owner, name, label):
    f = getattr(owner, name)
    def w(*a, **k):
        mark("before " + label); r = f(*a, **k); mark("after  " + label); return r
    setattr(owner, name, w)
print(f"{'stage':42s} {'RSS MB':>8s} {'peak MB':>8s}", file=sys.stderr)
mark("python started")
import edgetune.cli as cli
cli._lighten_process("finetune")   # what main() does for the program, before NumPy is imported
import numpy
mark("numpy imported")
from edgetune import api, experiment
from edgetune.cli import _common
mark("the command's modules imported")
wrap(_common, "load_task_arg", "loading damage1")
wrap(experiment, "pretrain", "pre-training")
wrap(experiment, "backbone_accuracy", "scoring the backbone")
wrap(api.FineTuner, "fit", "a fit")
wrap(api.FineTuner, "score", "scoring the fine-tuned model")
cli.main(sys.argv[1:])
mark("end")
import collections, os
rss, name = collections.Counter(), None
for line in open("/proc/self/smaps"):
    f = line.split()
    if "-" in f[0] and not f[0].endswith(":"):
        name = f[5] if len(f) > 5 else "[anonymous]"
        name = "numpy/random/*.so" if "/numpy/random/" in name else os.path.basename(name) if "/" in name else name
    elif f[0] == "Rss:":
        rss[name] += int(f[1])
print("\nresident at the end, by mapping (MB):", file=sys.stderr)
for name, kb in rss.most_common(14):
    print(f"  {kb / 1024:6.2f} {name}", file=sys.stderr)
"""


def phases(data_dir: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(data_dir, Path(tmp) / "r.json")[3:]
        subprocess.run([sys.executable, "-c", _PHASES, *cmd], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)  # the command's report; the stages go to stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, metavar="DIR", help="where the shared data sets are")
    p.add_argument("--tree", action="append", metavar="DIR",
                   help="a source tree with its engine built in place (repeatable; default: this checkout)")
    p.add_argument("--repeats", type=int, default=2, help="runs per tree and bytecode state (default 2)")
    p.add_argument("--phases", action="store_true", help="also print the memory at the command's stages")
    args = p.parse_args(argv)
    data_dir = str(Path(args.data_dir).resolve())
    trees = [Path(t).resolve() for t in (args.tree or [REPO])]
    peaks: dict[tuple[Path, str], list[float]] = {}
    results: dict[Path, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        states = {"compiled": {"PYTHONPYCACHEPREFIX": str(Path(tmp) / "pyc"), "PYTHONDONTWRITEBYTECODE": ""},
                  "from source": {"PYTHONDONTWRITEBYTECODE": "1"}}
        for tree in trees:  # a first run fills the data's parsed cache and the compiled prefix
            peak_mb(tree, command(data_dir, Path(tmp) / "warm.json"), states["compiled"])
        for i in range(args.repeats):
            for state, env in states.items():
                for tree in trees:
                    mb, result = peak_mb(tree, command(data_dir, Path(tmp) / "r.json"), env)
                    peaks.setdefault((tree, state), []).append(mb)
                    results[tree] = result
            for tree in trees:
                cache = Path(tempfile.mkdtemp(prefix=f"cache{i}-", dir=tmp))
                mb, result = peak_mb(tree, command(data_dir, Path(tmp) / "r.json"),
                                     {**states["compiled"], "XDG_CACHE_HOME": str(cache)})
                peaks.setdefault((tree, "compiled, first run (data parsed)"), []).append(mb)
                results[tree] = result
    print("| tree | state | peak RSS MB (median) | runs |")
    print("|---|---|---|---|")
    for (tree, state), mbs in peaks.items():
        note = " (the tree has __pycache__: read, not compiled)" if state == "from source" and has_bytecode(tree) else ""
        print(f"| {tree} | {state}{note} | {statistics.median(mbs):.1f} | {', '.join(f'{v:.1f}' for v in mbs)} |")
    keys = ("accuracy_before", "accuracy_after", "silent_accuracy_before", "silent_accuracy_after", "final_loss",
            "loss_curve")
    same = all({k: r.get(k) for k in keys} == {k: results[trees[0]].get(k) for k in keys} for r in results.values())
    print(f"\n- command: `edgetune finetune --task damage1 --data-dir {args.data_dir} --method skip2-lora --quiet "
          f"--json FILE`; 1 BLAS thread; ru_maxrss of the child")
    print(f"- accuracy after: {results[trees[0]]['accuracy_after']:.4f}; the same accuracies, final loss and loss "
          f"curve in every tree: {'yes' if same else 'NO'}")
    info = machine_info()
    print("- " + "; ".join(f"{k}: {info[k]}" for k in ("cpu", "python", "numpy", "load")))
    if args.phases:  # in this environment's bytecode state
        print(f"\nstages (stderr), Python bytecode {'compiled in the process' if os.environ.get('PYTHONDONTWRITEBYTECODE') else 'from .pyc where written'}:", flush=True)
        phases(data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
