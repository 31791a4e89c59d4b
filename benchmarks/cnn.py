"""Convolutional backbones, measured side by side in one run (1 BLAS/torch thread each).

    python -m benchmarks.cnn --data-dir ../shared/data [--samples 500] [--quick]

On har-raw's preset 1-D CNN (docs/cnn.md), with the task's fine-tuning windows:
  1. skip2-lora against lora-all (edgetune, the engine `auto` picks for each), end to end at
     30 and 100 epochs, and per cached epoch; skip2-lora (100 epochs) and lora-all (30 epochs)
     on the C engine against the NumPy engine;
  2. the same CNN, batches and epochs in PyTorch: lora-all (LoRA as PEFT puts it on a
     convolution: A a convolution with R channels and the layer's kernel, B a 1x1 one),
     ft-all, against edgetune's lora-all, ft-all and skip2-lora;
  3. peak resident memory of a complete `edgetune finetune` of the CNN from the command line.
Ratios are medians of interleaved repeats; every timing is wall time of whole fits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def edgetune_fits(model, x, y, epochs: int, repeats: int) -> dict[str, float]:
    import edgetune as et

    out = {}
    for method in ("lora-all", "ft-all", "skip2-lora"):
        out[method] = _median_time(lambda: et.FineTuner(model, method, epochs=epochs, lr=0.01, seed=0).fit(x, y),
                                   repeats)
    return out


def engines(model) -> dict[str, str]:
    """The engine `auto` runs each method on for this backbone."""
    from edgetune.core.engine import resolve_engine
    from edgetune.methods import make_method

    return {m: resolve_engine("auto", make_method(m, model)) for m in ("lora-all", "ft-all", "skip2-lora")}


def on_engines(model, x, y, method: str, epochs: int, repeats: int) -> dict[str, float]:
    """``method`` end to end on each engine (the same math, tested equal)."""
    import edgetune as et
    from edgetune import core

    names = ("numpy", "c") if core.available() else ("numpy",)
    return {e: _median_time(lambda: et.FineTuner(model, method, epochs=epochs, lr=0.01, seed=0,
                                                 engine=e).fit(x, y), repeats) for e in names}


def later_epoch(model, x, y, method: str) -> float:
    """Seconds of one epoch after the first (the median of epochs 2..6)."""
    import edgetune as et

    t = et.FineTuner(model, method, epochs=6, lr=0.01, seed=0).fit(x, y)
    return statistics.median(e.seconds for e in t.history_.epochs[1:])


def torch_fits(model, x, y, epochs: int, repeats: int) -> dict[str, float]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from edgetune.torch import to_torch

    torch.set_num_threads(1)
    xt = torch.from_numpy(model.prepare(x).reshape((len(x),) + model.input_shape))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    n, bs = len(xt), 20

    class LoRAConv(nn.Module):
        def __init__(self, base: nn.Module, rank: int = 1):
            super().__init__()
            self.base = base.requires_grad_(False)
            if isinstance(base, nn.Linear):
                self.a, self.b = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features,
                                                                                          bias=False)
            else:
                cls = type(base)
                self.a = cls(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
                self.b = cls(rank, base.out_channels, 1, bias=False)
            nn.init.zeros_(self.b.weight)

        def forward(self, v):
            return self.base(v) + self.b(self.a(v))

    def build(method: str) -> tuple[nn.Module, list]:
        net = to_torch(model, normalize=False)
        if method == "lora-all":
            net.requires_grad_(False)
            for i, m in enumerate(net.layers):
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(m, "groups", 1) == 1:
                    net.layers[i] = LoRAConv(m)
        return net, [p for p in net.parameters() if p.requires_grad]

    def fit(method: str, epochs: int = epochs) -> None:
        net, params = build(method)
        opt = torch.optim.SGD(params, lr=0.01)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for lo in range(0, n, bs):
                ids = order[lo:lo + bs]
                opt.zero_grad()
                F.cross_entropy(net(xt[ids]), yt[ids]).backward()
                opt.step()

    for m in ("lora-all", "ft-all"):  # warm-up: torch's first calls choose kernels and allocate
        fit(m, 1)
    return {m: _median_time(lambda: fit(m), repeats) for m in ("lora-all", "ft-all")}


def cli_peak_rss(data_dir: str | None, epochs: int) -> dict[str, float]:
    """Peak RSS (MB) of `edgetune pretrain` + `edgetune finetune --method skip2-lora` on har-raw."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The command's own peak (VmHWM), printed by the process after the command returns. The
        # high-water mark is reset first: a child otherwise inherits this process's (torch's).
        base = [sys.executable, "-c", "import re, sys\nopen('/proc/self/clear_refs', 'w').write('5')\n"
                "from edgetune.cli import main\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
                "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
                "    print('PEAK_KB', hwm, file=sys.stderr)\nsys.exit(code)"]
        dd = ["--data-dir", data_dir] if data_dir else []
        for name, args in (("pretrain", ["pretrain", "--task", "har-raw", *dd, "--out", f"{tmp}/m", "--epochs", "1",
                                         "--quiet"]),
                           ("finetune skip2-lora", ["finetune", "--task", "har-raw", *dd, "--model", f"{tmp}/m",
                                                    "--method", "skip2-lora", "--epochs", str(epochs), "--quiet"])):
            res = subprocess.run(base + args, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "EDGETUNE_THREADS": "1"})
            if res.returncode != 0:
                raise SystemExit(f"{name} failed: {res.stderr[-2000:]}")
            kb = [int(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("PEAK_KB")]
            out[name] = kb[-1] / 1024
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--samples", type=int, default=500, help="fine-tuning windows used (default 500)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 and 5 epochs, 1 repeat (smoke run)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()

    from edgetune.threads import set_blas_threads
    set_blas_threads(1)
    import edgetune as et
    from edgetune.nn.arch import build_layers, parse_arch

    task = et.load_task("har-raw", args.data_dir)
    x, y = task.x_finetune[:args.samples], task.y_finetune[:args.samples]
    specs = parse_arch(task.defaults["arch"], task.input_shape, task.n_classes)
    model = et.Backbone.from_layers(build_layers(specs, seed=0), labels=task.labels).fit_normalizer(task.x_pretrain)
    short, long_, repeats = (2, 5, 1) if args.quick else (30, 100, args.repeats)
    eng = engines(model)
    print(f"har-raw preset CNN ({task.defaults['arch']}), {len(x)} windows of {list(task.input_shape)}, batch 20, "
          f"1 thread, {repeats} repeats; engines: " + ", ".join(f"{k} {v}" for k, v in eng.items()), flush=True)
    res: dict = {"samples": len(x), "epochs": [short, long_], "engines": eng}
    for epochs in (short, long_):
        et_t = edgetune_fits(model, x, y, epochs, repeats)
        res[f"edgetune_{epochs}"] = et_t
        print(f"{epochs} epochs, edgetune: " + ", ".join(f"{k} {v:.2f} s" for k, v in et_t.items())
              + f"; skip2-lora vs lora-all {et_t['lora-all'] / et_t['skip2-lora']:.1f}x", flush=True)
    for method, epochs in (("skip2-lora", long_), ("lora-all", short)):
        se = on_engines(model, x, y, method, epochs, repeats)
        res[f"engines_{method}_{epochs}"] = se
        if "c" in se:
            print(f"{epochs} epochs, {method}: C engine {se['c']:.3f} s, NumPy engine {se['numpy']:.3f} s "
                  f"({se['numpy'] / se['c']:.1f}x)", flush=True)
    cached = {m: later_epoch(model, x, y, m) for m in ("lora-all", "skip2-lora")}
    res["later_epoch"] = cached
    print(f"per later epoch: lora-all {cached['lora-all'] * 1e3:.1f} ms, skip2-lora {cached['skip2-lora'] * 1e3:.2f} ms"
          f" ({cached['lora-all'] / cached['skip2-lora']:.0f}x)", flush=True)
    try:
        tt = torch_fits(model, x, y, short, repeats)
        et_short = res[f"edgetune_{short}"]
        res[f"torch_{short}"] = tt
        print(f"{short} epochs, PyTorch: lora-all {tt['lora-all']:.2f} s, ft-all {tt['ft-all']:.2f} s; "
              f"edgetune lora-all {tt['lora-all'] / et_short['lora-all']:.2f}x, ft-all "
              f"{tt['ft-all'] / et_short['ft-all']:.2f}x, skip2-lora vs PyTorch lora-all "
              f"{tt['lora-all'] / et_short['skip2-lora']:.1f}x faster", flush=True)
    except ImportError:
        print("PyTorch is not installed: the comparison is skipped (pip install edgetune[torch])")
    rss = cli_peak_rss(args.data_dir, short)
    res["peak_rss_mb"] = rss
    print("peak RSS from the CLI: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
