"""The sparse update's numbers on the compiled engine, as digests to compare between two builds.

    python benchmarks/int8_sparse_identity.py --against /path/to/another/checkout

A change to how the engine lays out its workspace (what it keeps for the backward pass, and in
which form) must not change a number the training computes. This script runs a fixed set of fits
of the sparse update in C (int8 and float CNNs: residual adds, depthwise, grouped and strided
convolutions, pooling, dense heads; a MobileNetV2-w0.35 cut to its first blocks when torch is
installed; several schemes, SGD, momentum and Adam with weight decay, QAS on and off, the fused
update and the two-phase step, batches of 1 and 7) and prints one SHA-256 per fit of the final
parameters, the optimizer state and every epoch's loss, as bytes. With ``--against TREE`` it also
runs itself on the edgetune of TREE (a checkout with its compiled engine built in place) and
compares: exit 0 when every digest is the same, 1 otherwise. Both builds must run on the same
machine (the kernels' vector clones differ between CPUs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

CNN_1D = ("conv:8:3:1:same,relu6,res(dwconv:3:1:1,relu6,conv:8:1),maxpool:2,conv:6:3:2:1:2,relu,gap,dense:6,relu",
          (3, 20))
CNN_2D = ("conv:6:3:2:1,relu,res(conv:6:3:1:1,relu),maxpool:2,flatten,dense:5,relu", (2, 11, 9))
CNN_FLAT = ("conv:4:5:2:2,relu,avgpool:3:1,conv:4:3,flatten,dense:5,relu", (2, 17))
#: an inverted residual block as MobileNetV2's (1x1 expansion, depthwise, linear 1x1 projection, add)
CNN_MB = ("conv:8:3:2:1,relu6,res(conv:16:1,relu6,dwconv:3:1:1,relu6,conv:8:1),conv:16:1,relu6,dwconv:3:2:1,relu6,"
          "conv:12:1,res(conv:24:1,relu6,dwconv:3:1:1,relu6,conv:12:1),gap,dense:8,relu", (3, 12, 12))
#: channel counts that are not multiples of 4 (pointwise layers of 10, 6 and 7 outputs; a dense layer of 42 inputs)
CNN_ODD = ("conv:6:3:1:1,relu,conv:10:1,relu6,conv:6:1,res(conv:6:1,relu),flatten,dense:7,relu", (3, 7))
#: depthwise layers of 9 and 6 channels (blocks of 4 + 5 and 4 + 2), one strided
CNN_DW = ("conv:9:1,relu6,dwconv:3:1:1,relu6,conv:6:1,relu6,dwconv:3:2:1,relu,gap,dense:5,relu", (3, 10, 10))
#: trained rows in several blocks: pointwise layers of 40 and 35 outputs (16 + 24, 16 + 19), a dense one of 13
CNN_WIDE = ("conv:8:3:1:1,relu,conv:40:1,relu6,conv:35:1,relu,gap,dense:13,relu", (3, 6, 6))

#: (architecture, scheme) pairs; the int8 and float backbones of each are fitted
CASES = [(CNN_1D, "w0:1/4,b2"), (CNN_1D, "w1,b3"), (CNN_1D, "w-1,b2"), (CNN_1D, "w0:1/4,w1:1/2,b2"),
         (CNN_2D, "w1:1/2,w2:1/8,b1"), (CNN_2D, "w0:1/4"), (CNN_2D, "b1"), (CNN_FLAT, "b2,w1:1/4"),
         (CNN_MB, "b4,w5:1/2,w-1"), (CNN_MB, "b8"), (CNN_MB, "w3:1/4,b6"),
         (CNN_ODD, "b5,w2:1/2"), (CNN_ODD, "w1:1/4,w-1"), (CNN_DW, "w0:1/4,b3"), (CNN_DW, "w1,b4"),
         (CNN_WIDE, "w1,w2,w3,b4"), (CNN_WIDE, "w1:1/2,w3:1/2,b2")]


def _data(arch, n=23, classes=3, seed=1):
    import edgetune as et
    from edgetune.nn.arch import build_layers, parse_arch

    spec, shape = arch
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += (0.8 * y).reshape(-1, *([1] * (len(shape) - 1)))
    bb = et.Backbone.from_layers(build_layers(parse_arch(spec, shape, classes), seed=seed)).fit_normalizer(x)
    return bb, x, y


def _fit(bb, scheme, optimizer, x, y, *, fused, batch, qas=None, epochs=3) -> str:
    """SHA-256 of the parameters, the optimizer state and the losses after `epochs` epochs in C."""
    from edgetune.core.engine import CoreRunner
    from edgetune.methods import make_method
    from edgetune.optim import make_optimizer

    opts = {"scheme": scheme} if qas is None else {"scheme": scheme, "qas": qas}
    m = make_method("sparse", bb, seed=5, **opts)
    xp = bb.prepare(x).reshape(len(x), -1).astype(np.float32)
    m.begin_fit(xp)
    lr = {"adam": 0.3 if bb.is_int8 else 0.01}.get(optimizer, 0.05)
    opt = make_optimizer(optimizer, m.params, lr, weight_decay=0.01)
    runner = CoreRunner(m, opt, xp, y, batch, fused=fused)
    orders = np.stack([np.random.default_rng(e).permutation(len(x)).astype(np.int32) for e in range(epochs)])
    res = runner.run(orders)
    h = hashlib.sha256(np.ascontiguousarray(m.params.flat).tobytes())
    for a in (getattr(opt, "v", None), getattr(opt, "m", None)):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.array([r.loss for r in res], dtype=np.float64).tobytes())
    h.update(repr([(r.diverged, getattr(opt, "t", None)) for r in res]).encode())
    return h.hexdigest()[:16]


def digests() -> dict[str, str]:
    from edgetune.quant import quantize

    out = {}
    for arch, scheme in CASES:
        bb, x, y = _data(arch)
        q = quantize(bb, x)
        name = arch[0].split(",")[0] + "..." + f"[{len(arch[0])}]"
        for optimizer in ("sgd", "momentum", "adam"):
            for batch in (1, 7):
                for fused in (True, False):
                    for qas in (True, False):
                        key = f"int8 {name} {scheme} {optimizer} batch {batch} fused {fused} qas {qas}"
                        out[key] = _fit(q, scheme, optimizer, x, y, fused=fused, batch=batch, qas=qas)
                key = f"float {name} {scheme} {optimizer} batch {batch}"
                out[key] = _fit(bb, scheme, optimizer, x, y, fused=True, batch=batch)
    try:
        import torch  # noqa: F401
    except ImportError:
        return out
    out.update(_mobilenet())
    return out


def _mobilenet() -> dict[str, str]:
    """MobileNetV2-w0.35 (edgetune.torch.zoo) cut to its first 5 blocks at 32x32, int8 and float."""
    from edgetune.quant import quantize
    from edgetune.torch import from_torch
    from edgetune.torch.zoo import build

    model = build("mbv2-w0.35", 4, blocks=5).eval()
    bb = from_torch(model, input_shape=(3, 32, 32))
    rng = np.random.default_rng(0)
    y = np.arange(9) % 4
    x = rng.normal(size=(9, 3, 32, 32)).astype(np.float32)
    x[:, 0] += 0.5 * y[:, None, None]
    bb.fit_normalizer(x)
    q = quantize(bb, x)
    out = {}
    for scheme in ("b6,w-3:1/2,w-1", "b3,w-1"):
        for optimizer in ("sgd", "adam"):
            out[f"int8 mbv2 {scheme} {optimizer}"] = _fit(q, scheme, optimizer, x, y, fused=True, batch=3, epochs=2)
            out[f"float mbv2 {scheme} {optimizer}"] = _fit(bb, scheme, optimizer, x, y, fused=True, batch=3, epochs=2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="TREE", help="compare with the edgetune of another checkout")
    ap.add_argument("--json", action="store_true", help="print the digests as JSON (what --against reads)")
    args = ap.parse_args(argv)
    import edgetune

    mine = digests()
    if args.json:
        print(json.dumps(mine))
        return 0
    if not args.against:
        for k, v in mine.items():
            print(f"{v}  {k}")
        print(f"{len(mine)} fits ({os.path.dirname(edgetune.__file__)})")
        return 0
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.against)}
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], env=env, capture_output=True,
                         text=True, check=True)
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    differ = [k for k in mine if theirs.get(k) != mine[k]]
    missing = [k for k in mine if k not in theirs]
    for k in differ:
        print(f"differs: {k}: {theirs.get(k)} (theirs) != {mine[k]} (this tree)")
    print(f"{len(mine) - len(differ)} of {len(mine)} fits bit-identical between {os.path.dirname(edgetune.__file__)} "
          f"and {os.path.abspath(args.against)}" + (f" ({len(missing)} not run there)" if missing else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
