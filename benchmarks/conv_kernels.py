"""Speed of the compiled convolution kernels against a large matrix product on the same core.

    python -m benchmarks.conv_kernels [--batch 20] [--repeats 7] [--json PATH]

The layers of the har-raw CNN (input 6 x 128: conv 32x5 same, maxpool 2, conv 64x5 same,
maxpool 2, conv 64x3 same), a batch of 20 rows: GFLOP/s of each C kernel (edgetune/core/
et_conv.c through edgetune.core.conv_binding, outputs and scratch allocated once) next to a
float32 1024 x 1024 matrix product in NumPy with one BLAS thread, measured in the same run
(timed in turn, each kernel for as long as one product: see side_by_side),
and the NumPy reference operations of edgetune.nn.layers (float32, one thread) for context.
A convolution's flops are 2 x out_c x (in_c / groups x kernel) x positions per row, the
same for the forward pass, the input gradient and the weight gradient. The backward total
is what a training step needs when every layer trains: the weight gradients of the three
layers and the input gradients of layers 2 and 3 (nothing needs the gradient of the input
data); the first layer's input gradient is timed and shown apart.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ._util import blas_description, emit, finish

TARGET = 0.30  # of the matrix product's GFLOP/s


def timed(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def side_by_side(matmul, fn_c, fn_np, repeats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds per call of the matrix product, the C kernel and the NumPy operation, timed in
    turn ``repeats`` times. Each timing of a kernel runs it as many times as fill one matrix
    product, so that the three share the machine with other jobs alike (a short call can
    slip between two time slices, a long one cannot); ratios are taken within each turn."""
    once = [timed(f, 1) for f in (matmul, fn_c, fn_np)]
    n_c, n_np = (max(1, round(once[0] / max(t, 1e-7))) for t in once[1:])
    out = np.array([(timed(matmul, 1), timed(fn_c, n_c), timed(fn_np, n_np)) for _ in range(repeats)])
    return out[:, 0], out[:, 1], out[:, 2]


def har_layers():
    from edgetune.nn.layers import LayerSpec

    c1 = LayerSpec.conv((6, 128), 32, 5, padding=2)
    p1 = LayerSpec.pool("max", c1.out_shape, 2)
    c2 = LayerSpec.conv(p1.out_shape, 64, 5, padding=2)
    p2 = LayerSpec.pool("max", c2.out_shape, 2)
    c3 = LayerSpec.conv(p2.out_shape, 64, 3, padding=1)
    return [("conv1", c1), ("pool1", p1), ("conv2", c2), ("pool2", p2), ("conv3", c3)]


def conv_flops(spec, rows: int) -> float:
    k = spec.in_shape[0] // spec.groups * int(np.prod(spec.kernel))
    return 2.0 * rows * spec.out_channels * k * (spec.out_features // spec.out_channels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    args = p.parse_args(argv)

    from edgetune import core
    from edgetune.threads import set_blas_threads

    if not core.available():
        emit(f"the compiled engine is not available: {core.unavailable_reason()}", file=sys.stderr)
        return 1
    from edgetune.core import conv_binding as cb

    load_at_start = os.getloadavg()
    set_blas_threads(1)
    rng = np.random.default_rng(0)
    n, reps = args.batch, args.repeats

    a = rng.normal(size=(1024, 1024)).astype(np.float32)
    b = rng.normal(size=(1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    mm_flops = 2.0 * 1024 ** 3

    def matmul() -> None:
        np.matmul(a, b, out=c)

    rows, mm_times = [], []

    def measure(layer: str, op: str, flops: float, fn_c, fn_np) -> None:
        t_mm, t_c, t_np = side_by_side(matmul, fn_c, fn_np, reps)
        mm_times.extend(t_mm)
        rows.append(dict(layer=layer, op=op, flops=flops, c_s=float(np.median(t_c)),
                         numpy_s=float(np.median(t_np)), numpy_over_c=float(np.median(t_np / t_c)),
                         of_matmul=float(np.median((flops / t_c) / (mm_flops / t_mm)))))

    for name, spec in har_layers():
        x = rng.normal(size=(n, spec.in_features)).astype(np.float32)
        g = rng.normal(size=(n, spec.out_features)).astype(np.float32)
        dx = np.empty_like(x)
        z = np.empty_like(g)
        ops = spec.ops
        if not spec.has_params:
            measure(name, "forward", 0.0, lambda: cb.pool_forward(spec, x, out=z), lambda: ops.forward(spec, x))
            measure(name, "input grad", 0.0, lambda: cb.pool_input_grad(spec, g, x, out=dx),
                    lambda: ops.input_grad(spec, g, None, x))
            continue
        w = (rng.normal(size=spec.weight_shape) / np.sqrt(np.prod(spec.weight_shape[1:]))).astype(np.float32)
        bias = np.zeros(spec.out_channels, np.float32)
        dw = np.empty_like(w)
        s_f = np.empty(max(1, cb.scratch_bytes(spec, "conv_forward", n) // 4), np.float32)
        s_i = np.empty(max(1, cb.scratch_bytes(spec, "conv_input_grad", n) // 4), np.float32)
        s_w = np.empty(max(1, cb.scratch_bytes(spec, "conv_weight_grad", n) // 4), np.float32)
        fl = conv_flops(spec, n)
        measure(name, "forward", fl, lambda: cb.conv_forward(spec, x, w, bias, out=z, scratch=s_f),
                lambda: ops.add_bias(spec, ops.forward(spec, x, w), bias))
        measure(name, "input grad", fl, lambda: cb.conv_input_grad(spec, g, w, out=dx, scratch=s_i),
                lambda: ops.input_grad(spec, g, w))
        measure(name, "weight grad", fl, lambda: cb.conv_weight_grad(spec, x, g, out=dw, scratch=s_w),
                lambda: ops.weight_grad(spec, x, g))

    def total(pick) -> dict:
        """A group of kernels as one: its flops over the time it takes at each kernel's ratio."""
        sel = [r for r in rows if r["flops"] and pick(r)]
        fl = sum(r["flops"] for r in sel)
        return dict(flops=fl, c_s=sum(r["c_s"] for r in sel), numpy_s=sum(r["numpy_s"] for r in sel),
                    of_matmul=fl / sum(r["flops"] / r["of_matmul"] for r in sel))

    fwd = total(lambda r: r["op"] == "forward")
    bwd = total(lambda r: r["op"] == "weight grad" or (r["op"] == "input grad" and r["layer"] != "conv1"))
    mm_t = np.array(mm_times)

    emit(f"### Convolution kernels: har-raw CNN layers, batch {n}, medians of {reps} side-by-side timings")
    emit("")
    emit(f"float32 1024 x 1024 matrix product, NumPy, 1 BLAS thread: median {mm_flops / np.median(mm_t) / 1e9:.1f} "
         f"GFLOP/s (from {mm_flops / mm_t.max() / 1e9:.1f} to {mm_flops / mm_t.min() / 1e9:.1f} over the run)")
    emit("")
    emit("| layer | op | MFLOP | C ms | C GFLOP/s | of the matrix product | NumPy ms | NumPy / C time |")
    emit("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gf, share = "-", "-"
        if r["flops"]:
            gf, share = f"{r['flops'] / r['c_s'] / 1e9:.1f}", f"{100 * r['of_matmul']:.0f} %"
        emit(f"| {r['layer']} | {r['op']} | {r['flops'] / 1e6:.1f} | {1e3 * r['c_s']:.3f} | {gf} | {share} | "
             f"{1e3 * r['numpy_s']:.3f} | {r['numpy_over_c']:.1f} |")
    results = {"batch": n, "matmul_gflops_median": mm_flops / float(np.median(mm_t)) / 1e9, "rows": rows}
    for label, t in (("forward (3 convolutions)", fwd), ("backward (what training needs)", bwd)):
        ok = "PASS" if t["of_matmul"] >= TARGET else "MISS"
        emit(f"| **{label}** | | {t['flops'] / 1e6:.1f} | {1e3 * t['c_s']:.3f} | {t['flops'] / t['c_s'] / 1e9:.1f} | "
             f"**{100 * t['of_matmul']:.0f} %** ({ok}: >= {100 * TARGET:.0f} %) | {1e3 * t['numpy_s']:.3f} | "
             f"{t['numpy_s'] / t['c_s']:.1f} |")
        results[label.split()[0]] = t
    emit("")
    emit(f"- blas: {blas_description()}")
    emit("- load: 1/5/15-min load average at start: " + " ".join(f"{v:.2f}" for v in load_at_start))
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
