"""Training memory of MobileNetV2-class networks, beside "On-Device Training Under 256KB Memory".

    python -m benchmarks.tiny_training_memory            # writes its section of docs/budgets.md
    python -m benchmarks.tiny_training_memory --no-write --resolution 32 --blocks 4   # a quick look
    python -m benchmarks.tiny_training_memory --breakdown  # the int8 sparse update's workspace, piece by piece

For the paper's three networks (edgetune.torch.zoo: MobileNetV2-w0.35, an MCUNet-5fps-like and a
ProxylessNAS-w0.3-like network, random weights, the paper's 128x128 input), imported with
``from_torch`` (BatchNorm folded), at batch 1: the peak training memory of a full update
(ft-all), a paper-like sparse update and skip2-lora, from edgetune's NumPy planner
(``plan_memory``), from the compiled engine's device arena (``plan_device_memory`` for
cortex-m7: frozen weights in flash) with the fused update (each tensor stepped as soon as its
gradient is ready) and as the two-phase step would need it (the whole gradient vector, then
one step), and for the full update what PyTorch keeps on CPU (``torch_full_update_bytes``),
beside the paper's figures; then the sparse update on the network quantised to int8
(``edgetune.quant.quantize``, calibrated on random inputs: memory does not depend on the
weights' values), device arena only. Needs the torch extra.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._util import REPO, machine_info

#: The paper's peak training memory in KB (Lin et al. 2022: the full update, and the sparse update
#: with operator reordering; batch 1, its engine on an STM32F746).
PAPER_KB = {"mbv2-w0.35": (2939, 141), "mcunet-5fps": (3650, 173), "proxyless-w0.3": (2745, 135)}
TITLES = {"mbv2-w0.35": "MobileNetV2-w0.35", "mcunet-5fps": "MCUNet-5fps-like", "proxyless-w0.3": "ProxylessNAS-w0.3-like"}
SECTION = "tiny-training-memory"
BREAKDOWN_SECTION = "tiny-training-breakdown"
#: What each piece of the compiled engine's workspace holds (plan_layout's fields in et_train.c), for
#: the int8 sparse update on a CNN, in the order the workspace carves them.
PIECES = {
    "tables": "per-layer tables (widths, pointers)",
    "actq": "per-layer tables (widths, pointers)", "actm": "per-layer tables (widths, pointers)",
    "snapshot": "snapshot: the epoch's starting parameters",
    "ybuf": "the batch's labels, ids, uncached rows", "ids": None, "missing": None,
    "gbuf[0]": "gbuf[0], gbuf[1]: the gradients flowing back", "gbuf[1]": None,
    "act[k]": "act[k]: the inputs kept for the backward pass, float (int8 network: the logits only)",
    "actq[k]": "actq[k]: the inputs kept for the backward pass, int8",
    "actm[k]": "actm[k]: the inputs' gradient masks kept instead, a bit a value",
    "deq": "deq: the float inputs a layer reads, dequantised at use",
    "q[0]": "q[0], q[1]: the integer pass's int8 input and output", "q[1]": None,
    "qheld": "qheld: the integer pass's inputs an add reads later",
    "acc": "acc: the integer pass's int32 accumulator",
    "scratch": "scratch: the float kernels' scratch",
    "pend[k]": "pend[k]: an add's gradient waiting for its source",
    "sw": "sw: one layer's float weight, assembled", "sb": "sb: its float bias",
    "gstep": "gstep: the fused update's gradient of one tensor",
}
DOC = REPO / "docs" / "budgets.md"
TARGET = "cortex-m7"
FULL_INT8 = "full update (sparse[every bias, every weight])"  # the int8 network's full update


@dataclass
class Row:
    network: str
    layers: int
    params: int
    method: str                 # "ft-all", "sparse[...]", "skip2-lora"
    trainable: int
    numpy_plan: int | None      # plan_memory(...).total (a host process: every weight in RAM); None: int8 rows
    numpy_measured: int | None  # measure_memory(...)["peak"]: tracemalloc over two real NumPy steps
    device_arena: int           # plan_device_memory(...).arena at the target's pointer size (the fused update)
    device_two_phase: int       # the same arena for the two-phase step: the gradient vector (n_params floats,
                                # a 64-byte rounded piece) in place of the fused update's gradient scratch
    device_total: int           # the arena + the target's statics and stack
    torch_measured: int | None  # full update only
    flash_weights: int          # the frozen weights the device reads from flash
    device_state: int           # of the arena: parameters, gradients and optimizer state (their storage)
    device_workspace: int       # of the arena: the engine's workspace (activations, scratch, snapshot)
    backbone: str = "float32"   # "int8": the network quantised


def two_phase_arena(dev: Any) -> int:
    """The device arena of a DevicePlan as the two-phase step needs it: where the update is fused
    (no gradients piece), the gradient vector's piece (n_params floats, rounded to 64 bytes as
    et_device.c's pieces are) instead of the workspace's gradient scratch."""
    if dev.gradients:
        return dev.arena
    return dev.arena - dev.gradient_scratch + -(-4 * dev.n_params // 64) * 64


def load_network(name: str, resolution: int, blocks: int | None = None, classes: int = 10) -> tuple[Any, Any]:
    """(the torch module, its edgetune Backbone), checked: the outputs agree to 1e-4."""
    import torch

    from edgetune.torch import from_torch
    from edgetune.torch.zoo import build

    model = build(name, classes, blocks=blocks).eval()
    bb = from_torch(model, input_shape=(3, resolution, resolution))
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    err = float(np.abs(bb.forward(x.numpy().reshape(2, -1)) - ref).max())
    if err > 1e-4:
        raise RuntimeError(f"{name}: edgetune's forward differs from torch's by {err:.2e}")
    return model, bb


def sparse_scheme(bb: Any, bias_layers: int = 18, pointwise: int = 4) -> str:
    """A paper-like sparse update: the biases of the last ``bias_layers`` layers with weights, the
    weights of the first (expansion) 1x1 convolution of the last ``pointwise`` blocks that have one
    (a half of the output channels in the last two, a quarter before), and the classifier."""
    specs = [bb.specs[k] for k in bb.tap_layers]  # the layers with weights, as the scheme counts them
    expansions = [j for j in range(len(specs) - 1)
                  if specs[j].kind == "conv2d" and specs[j].kernel == (1, 1) and specs[j].groups == 1
                  and specs[j + 1].groups > 1]  # a 1x1 convolution feeding a depthwise one
    chosen = expansions[-pointwise:]
    parts = [f"b{min(bias_layers, len(specs))}"]
    parts += [f"w{j}:{'1/2' if i >= len(chosen) - 2 else '1/4'}" for i, j in enumerate(chosen)]
    return ",".join(parts + [f"w{len(specs) - 1}"])


def torch_full_update_bytes(model: Any, shape: tuple[int, ...]) -> int:
    """What PyTorch holds for one full-update step on CPU at batch 1: the tensors autograd saves
    for the backward pass (each storage once, through ``saved_tensors_hooks``), the parameters,
    their gradients and the input. A lower bound of the process's peak (the backward pass's
    transient buffers come on top), exact and independent of the allocator and of threads."""
    import torch

    model = model.train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(1, *shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0]))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    del loss
    return sum(storages.values()) + 2 * params + x.numel() * x.element_size()


def measure(name: str, resolution: int, blocks: int | None = None, n_samples: int = 2, int8: bool = True) -> list[Row]:
    """The rows of one network: each update planned and measured on ``n_samples`` samples (at
    batch 1, ``n_samples`` steps; the skip-cache holds that many rows); with ``int8`` also the
    sparse update's device arena on the network quantised (calibrated on those samples)."""
    from edgetune.export.targets import TARGETS
    from edgetune.memory import measure_memory, plan_device_memory, plan_memory
    from edgetune.methods import make_method

    target = TARGETS[TARGET]
    model, bb = load_network(name, resolution, blocks)
    scheme = sparse_scheme(bb)
    n_params = sum(int(np.prod(layer.weight.shape)) + int(layer.bias.size) for layer in bb.layers
                   if layer.spec.has_params)
    torch_bytes = torch_full_update_bytes(model, (3, resolution, resolution))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_samples, 3 * resolution * resolution)).astype(np.float32)
    y = np.arange(n_samples) % bb.sizes[-1]
    rows = []

    def device(m: Any, cache: str | None):
        return plan_device_memory(m, batch_size=1, max_samples=n_samples, cache=cache, store_samples=False,
                                  pointer_bytes=target.pointer_bytes, statics=target.statics, stack=target.stack)

    for method, kw in (("ft-all", {}), ("sparse", {"scheme": scheme}), ("skip2-lora", {})):
        cache = "float32" if method == "skip2-lora" else None
        plan = plan_memory(bb, method, batch_size=1, n_samples=n_samples, **kw)
        measured = measure_memory(bb, method, x, y, batch_size=1, **kw)["peak"]
        m = make_method(method, bb, **kw)
        dev = device(m, cache)
        rows.append(Row(network=name, layers=len(bb.specs), params=n_params,
                        method=f"sparse[{scheme}]" if method == "sparse" else method,
                        trainable=int(m.n_trainable),
                        numpy_plan=plan.total, numpy_measured=int(measured), device_arena=dev.arena,
                        device_two_phase=two_phase_arena(dev), device_total=dev.total,
                        torch_measured=torch_bytes if method == "ft-all" else None, flash_weights=plan_memory(bb, method, batch_size=1, n_samples=n_samples, weights_in_flash=True,
                                                  **kw).flash,
                        device_state=dev.params + dev.gradients + dev.optimizer_state,
                        device_workspace=dev.workspace))
    if int8:  # the sparse update on the int8 network (its int8 weights in flash)
        from edgetune.memory import backbone_bytes
        from edgetune.quant import quantize

        q = quantize(bb, x)
        m = make_method("sparse", q, scheme=scheme)
        dev = device(m, None)
        flash = backbone_bytes(q)  # every int8 tensor (plan_memory models int8 MLPs only)
        rows.append(Row(network=name, layers=len(q.specs), params=n_params, method=f"sparse[{scheme}]",
                        trainable=int(m.n_trainable), numpy_plan=None, numpy_measured=None, device_arena=dev.arena,
                        device_two_phase=two_phase_arena(dev), device_total=dev.total, torch_measured=None,
                        flash_weights=flash, device_state=dev.params + dev.gradients + dev.optimizer_state,
                        device_workspace=dev.workspace, backbone="int8"))
        # the full update on the int8 network: the sparse update's scheme with every bias and every
        # weight (the layer-wise ft-all needs float weights)
        n_weighted = len(q.tap_layers)
        every = ",".join([f"b{n_weighted}"] + [f"w{j}" for j in range(n_weighted)])
        m = make_method("sparse", q, scheme=every)
        dev = device(m, None)
        rows.append(Row(network=name, layers=len(q.specs), params=n_params, method=FULL_INT8,
                        trainable=int(m.n_trainable), numpy_plan=None, numpy_measured=None, device_arena=dev.arena,
                        device_two_phase=two_phase_arena(dev), device_total=dev.total, torch_measured=None,
                        flash_weights=flash, device_state=dev.params + dev.gradients + dev.optimizer_state,
                        device_workspace=dev.workspace, backbone="int8"))
    return rows


def breakdown(name: str, resolution: int, blocks: int | None = None) -> dict[str, int]:
    """The compiled engine's workspace (cortex-m7 pointers, batch 1) of the sparse update on the int8
    network, piece by piece (``core_workspace_pieces``: C's et_workspace_pieces)."""
    from edgetune.export.targets import TARGETS
    from edgetune.memory import core_workspace_pieces
    from edgetune.methods import make_method
    from edgetune.quant import quantize

    _, bb = load_network(name, resolution, blocks)
    x = np.random.default_rng(0).normal(size=(2, 3 * resolution * resolution)).astype(np.float32)
    m = make_method("sparse", quantize(bb, x), scheme=sparse_scheme(bb))
    return core_workspace_pieces(m, 1, pointer_bytes=TARGETS[TARGET].pointer_bytes)


def breakdown_table(pieces: dict[str, dict[str, int]], resolution: int, command: str) -> str:
    """The markdown table of ``breakdown`` for each network: KB per piece (pieces under one label
    summed), the workspace's total (+ 64 bytes of alignment, as et_workspace_size_for counts it)."""
    names = list(pieces)
    labels: dict[str, str] = {}
    last = ""
    for key, label in PIECES.items():
        last = label or last
        labels[key] = last
    for piece in pieces.values():
        for key in piece:
            labels.setdefault(key, key)
    rows: dict[str, list[int]] = {}
    for key, label in labels.items():
        vals = [pieces[n].get(key, 0) for n in names]
        if any(vals):
            rows[label] = [a + b for a, b in zip(rows.get(label, [0] * len(names)), vals)]
    out = [f"The int8 sparse update's workspace at batch 1, {resolution}x{resolution} input, {TARGET} pointers, "
           f"in KB (`{command}`):", "",
           "| piece | " + " | ".join(TITLES.get(n, n) for n in names) + " |",
           "|---|" + "---|" * len(names)]
    for label, vals in rows.items():
        out.append(f"| {label} | " + " | ".join(_kb(v) for v in vals) + " |")
    totals = [sum(pieces[n].values()) + 64 for n in names]
    out.append("| **workspace** | " + " | ".join(f"**{_kb(v)}**" for v in totals) + " |")
    return "\n".join(out)


def _kb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1024:,.0f}"


def table(rows: list[Row], resolution: int, command: str, comparable: bool = True) -> str:
    """The markdown table; the paper's figures only beside the whole networks at its resolution
    (``comparable``)."""
    out = [f"Peak training memory at batch 1, {resolution}x{resolution} input, in KB (`{command}`):", "",
           "| network (layers) | update | weights | trainable | edgetune NumPy engine: planned / measured "
           f"| edgetune C engine, {TARGET}: arena, two-phase step -> fused update | + stack, statics (fused) "
           "| of the fused arena: parameters + gradients, workspace | PyTorch CPU | paper |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER_KB.get(r.network, (None, None)) if comparable else (None, None)
        cite = {"ft-all": f"{paper[0]:,} (full update)" if paper[0] else "-",
                "skip2-lora": "- (not in the paper)"}.get(r.method.split("[")[0], "-")
        if r.method.startswith("sparse"):
            cite = f"{paper[1]:,} (sparse + reordering, int8)" if paper[1] else "-"
        elif r.method == FULL_INT8:
            cite = f"{paper[0]:,} (full update)" if paper[0] else "-"
        numpy = "-" if r.numpy_plan is None else f"{_kb(r.numpy_plan)} / {_kb(r.numpy_measured)}"
        arena = (f"{_kb(r.device_arena)} (the skip adapters keep their gradient)" if r.device_two_phase == r.device_arena
                 else f"{_kb(r.device_two_phase)} -> {_kb(r.device_arena)}")
        out.append(f"| {TITLES.get(r.network, r.network)} ({r.layers}) | {r.method} | {r.backbone} | {r.trainable:,} | "
                   f"{numpy} | {arena} | {_kb(r.device_total)} | "
                   f"{_kb(r.device_state)}, {_kb(r.device_workspace)} | {_kb(r.torch_measured)} | {cite} |")
    out += ["", "Read from these rows:"]
    for name in dict.fromkeys(r.network for r in rows):
        mine = [r for r in rows if r.network == name]
        full, sparse, skip = (next(r for r in mine if r.backbone == "float32" and r.method.startswith(m))
                              for m in ("ft-all", "sparse", "skip2-lora"))
        q = next((r for r in mine if r.backbone == "int8" and r.method.startswith("sparse")), None)
        q_full = next((r for r in mine if r.method == FULL_INT8), None)
        paper = PAPER_KB.get(name) if comparable else None
        line = (f"- {TITLES.get(name, name)}: the fused update saves {_kb(full.device_two_phase - full.device_arena)} KB "
                f"of the full update's arena ({full.device_arena / full.device_two_phase:.0%} of the two-phase one) and "
                f"{_kb(sparse.device_two_phase - sparse.device_arena)} KB of the sparse update's "
                f"({sparse.device_arena / sparse.device_two_phase:.0%}); on the device the sparse update needs "
                f"{sparse.device_total / full.device_total:.0%} of the full update's RAM")
        if paper:
            line += (f"; edgetune's device (float32, fused) against the paper's figures: "
                     f"{full.device_total / 1024 / paper[0]:.1f}x (full update), "
                     f"{sparse.device_total / 1024 / paper[1]:.1f}x (sparse; the paper's int8 with reordering)")
            if q is not None:
                line += f", {q.device_total / 1024 / paper[1]:.1f}x (edgetune's sparse update on int8)"
            if q_full is not None:
                line += f", {q_full.device_total / 1024 / paper[0]:.1f}x (edgetune's full update on int8)"
        line += (f"; skip2-lora stores its {skip.trainable:,} trainable values in a masked block matrix "
                 f"of {skip.device_state // 8:,} values (parameters and gradients: {_kb(skip.device_state)} KB).")
        out.append(line)
    return "\n".join(out)


def write_section(text: str, path: Path = DOC, section: str = SECTION) -> None:
    """Replace the benchmark's marked ``section`` of ``path`` with ``text`` (appended the first time)."""
    from edgetune.io_atomic import write_bytes_atomic

    start, end = f"<!-- {section}: start -->", f"<!-- {section}: end -->"
    doc = path.read_text()
    block = f"{start}\n{text}\n{end}"
    if start in doc:
        doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.DOTALL)
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    write_bytes_atomic(path, doc.encode())


def save_for_export(name: str, resolution: int, model_dir: Path, task_path: Path, classes: int = 2,
                    per_split: int = 8, seed: int = 0) -> None:
    """The network as an edgetune model directory and a tiny synthetic task file (``per_split``
    samples per split, random images whose class shifts the first channel), for
    ``edgetune export``: what a device's training run costs does not depend on the data."""
    from edgetune.io_atomic import write_bytes_atomic

    _, bb = load_network(name, resolution, classes=classes)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("pretrain", "finetune", "test"):
        y = np.arange(per_split) % classes
        x = rng.normal(size=(per_split, 3, resolution, resolution)).astype(np.float32)
        x[:, 0] += 0.5 * y[:, None, None]
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int64)
    bb.fit_normalizer(arrays["x_pretrain"])
    bb.save(model_dir)
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(task_path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=list(PAPER_KB), help="default: all three")
    ap.add_argument("--resolution", type=int, default=None,
                    help="input height and width (default: the paper's, edgetune.torch.zoo.RESOLUTION)")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (a quick look)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave docs/budgets.md alone")
    ap.add_argument("--no-int8", action="store_true", help="leave out the int8 sparse rows")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the int8 sparse update's workspace, piece by piece (its own section of docs/budgets.md)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    ap.add_argument("--save-model", metavar="DIR", type=Path,
                    help="save the first network as a model directory (with --save-task) and stop")
    ap.add_argument("--save-task", metavar="FILE.npz", type=Path, help="a tiny synthetic task for it")
    args = ap.parse_args(argv)
    from edgetune.torch.zoo import RESOLUTION

    args.resolution = args.resolution or RESOLUTION
    if args.save_model or args.save_task:
        if not (args.save_model and args.save_task):
            ap.error("--save-model and --save-task go together")
        save_for_export(args.networks[0], args.resolution, args.save_model, args.save_task)
        print(f"wrote {args.save_model} and {args.save_task}")
        return 0
    command = "python -m benchmarks.tiny_training_memory" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    if args.breakdown:
        pieces = {name: breakdown(name, args.resolution, args.blocks) for name in args.networks}
        text = breakdown_table(pieces, args.resolution, command)
        print(text)
        print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(pieces, indent=1))
        if not args.no_write:
            write_section(text, section=BREAKDOWN_SECTION)
        return 0
    rows = [r for name in args.networks for r in measure(name, args.resolution, args.blocks, int8=not args.no_int8)]
    text = table(rows, args.resolution, command, comparable=args.resolution == RESOLUTION and not args.blocks)
    info = machine_info()
    text += "\n\n" + "\n".join(f"- {k}: {info[k]}" for k in ("cpu", "python", "numpy", "torch"))
    print(text)
    print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
