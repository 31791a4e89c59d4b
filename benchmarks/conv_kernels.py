"""Speed of the compiled convolution kernels against a large matrix product on the same core.

    python -m benchmarks.conv_kernels [--batch 20] [--repeats 7] [--json PATH]

The layers of the har-raw CNN (input 6 x 128: conv 32x5 same, maxpool 2, conv 64x5 same,
maxpool 2, conv 64x3 same), a batch of 20 rows: GFLOP/s of each C kernel (edgetune/core/
et_conv.c through edgetune.core.conv_binding, outputs and scratch allocated once) next to a
float32 1024 x 1024 matrix product in NumPy with one BLAS thread, measured in the same run,
and the NumPy reference operations of edgetune.nn.layers (float32, one thread) for context.
A convolution's flops are 2 x out_c x (in_c / groups x kernel) x positions per row, the
same for the forward pass, the input gradient and the weight gradient. The backward total
is what a training step needs when every layer trains: the weight gradients of the three
layers and the input gradients of layers 2 and 3 (nothing needs the gradient of the input
data); the first layer's input gradient is timed and shown apart.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ._util import emit, finish, time_call

TARGET = 0.30  # of the matrix product's GFLOP/s


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
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    args = p.parse_args(argv)

    from edgetune import core
    from edgetune.threads import set_blas_threads

    if not core.available():
        emit(f"the compiled engine is not available: {core.unavailable_reason()}", file=sys.stderr)
        return 1
    from edgetune.core import conv_binding as cb

    set_blas_threads(1)
    rng = np.random.default_rng(0)
    n, reps = args.batch, args.repeats

    a = rng.normal(size=(1024, 1024)).astype(np.float32)
    b = rng.normal(size=(1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    t_mm = time_call(lambda: np.matmul(a, b, out=c), repeats=reps)
    mm = 2 * 1024 ** 3 / t_mm / 1e9

    rows = []
    for name, spec in har_layers():
        x = rng.normal(size=(n, spec.in_features)).astype(np.float32)
        g = rng.normal(size=(n, spec.out_features)).astype(np.float32)
        dx = np.empty_like(x)
        z = np.empty_like(g)
        ops = spec.ops
        if not spec.has_params:
            t_f = time_call(lambda: cb.pool_forward(spec, x, out=z), repeats=reps, number=10)
            t_b = time_call(lambda: cb.pool_input_grad(spec, g, x, out=dx), repeats=reps, number=10)
            np_f = time_call(lambda: ops.forward(spec, x), repeats=reps, number=3)
            np_b = time_call(lambda: ops.input_grad(spec, g, None, x), repeats=reps, number=3)
            rows.append(dict(layer=name, op="forward", flops=0.0, c_s=t_f, numpy_s=np_f))
            rows.append(dict(layer=name, op="input grad", flops=0.0, c_s=t_b, numpy_s=np_b))
            continue
        w = (rng.normal(size=spec.weight_shape) / np.sqrt(np.prod(spec.weight_shape[1:]))).astype(np.float32)
        bias = np.zeros(spec.out_channels, np.float32)
        dw = np.empty_like(w)
        s_f = np.empty(max(1, cb.scratch_bytes(spec, "conv_forward", n) // 4), np.float32)
        s_i = np.empty(max(1, cb.scratch_bytes(spec, "conv_input_grad", n) // 4), np.float32)
        s_w = np.empty(max(1, cb.scratch_bytes(spec, "conv_weight_grad", n) // 4), np.float32)
        fl = conv_flops(spec, n)
        cases = [
            ("forward", lambda: cb.conv_forward(spec, x, w, bias, out=z, scratch=s_f),
             lambda: ops.add_bias(spec, ops.forward(spec, x, w), bias)),
            ("input grad", lambda: cb.conv_input_grad(spec, g, w, out=dx, scratch=s_i),
             lambda: ops.input_grad(spec, g, w)),
            ("weight grad", lambda: cb.conv_weight_grad(spec, x, g, out=dw, scratch=s_w),
             lambda: ops.weight_grad(spec, x, g)),
        ]
        for op, fn_c, fn_np in cases:
            t_c = time_call(fn_c, repeats=reps, number=5)
            t_np = time_call(fn_np, repeats=reps, number=2)
            rows.append(dict(layer=name, op=op, flops=fl, c_s=t_c, numpy_s=t_np))

    def total(pick) -> tuple[float, float, float]:
        sel = [r for r in rows if pick(r)]
        return (sum(r["flops"] for r in sel), sum(r["c_s"] for r in sel), sum(r["numpy_s"] for r in sel))

    fwd = total(lambda r: r["flops"] and r["op"] == "forward")
    bwd = total(lambda r: r["flops"] and (r["op"] == "weight grad" or (r["op"] == "input grad" and r["layer"] != "conv1")))

    emit(f"### Convolution kernels: har-raw CNN layers, batch {n}, medians of {reps}")
    emit("")
    emit(f"float32 1024 x 1024 matrix product, NumPy, 1 BLAS thread: {1e3 * t_mm:.2f} ms = {mm:.1f} GFLOP/s")
    emit("")
    emit("| layer | op | MFLOP | C ms | C GFLOP/s | of the matrix product | NumPy ms | NumPy / C time |")
    emit("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gf = r["flops"] / r["c_s"] / 1e9 if r["flops"] else None
        emit(f"| {r['layer']} | {r['op']} | {r['flops'] / 1e6:.1f} | {1e3 * r['c_s']:.3f} | "
             f"{'-' if gf is None else f'{gf:.1f}'} | {'-' if gf is None else f'{100 * gf / mm:.0f} %'} | "
             f"{1e3 * r['numpy_s']:.3f} | {r['numpy_s'] / r['c_s']:.1f} |")
    results = {"batch": n, "matmul_gflops": mm, "rows": rows}
    for label, (fl, tc, tn) in (("forward (3 convolutions)", fwd), ("backward (what training needs)", bwd)):
        gf = fl / tc / 1e9
        emit(f"| **{label}** | | {fl / 1e6:.1f} | {1e3 * tc:.3f} | {gf:.1f} | {100 * gf / mm:.0f} % "
             f"({'PASS' if gf >= TARGET * mm else 'MISS'} >= {100 * TARGET:.0f} %) | {1e3 * tn:.3f} | {tn / tc:.1f} |")
        results[label.split()[0] + "_gflops"] = gf
    emit("")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
