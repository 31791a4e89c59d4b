"""The training-memory model of the CNN presets against the measured peak, per method.

    python -m benchmarks.memory_cnn

For the damage1-1d and har-raw preset CNNs (edgetune.data.fan.FAN_CNN, edgetune.data.har.HAR_CNN,
with random weights: memory does not depend on the values), every method and a few sparse
schemes at batch 1 and 20: the planned total and its error against the tracemalloc peak of two
real NumPy-engine steps. tests/test_memory_cnn.py asserts smaller CNNs of every layer kind.
"""
from __future__ import annotations

import argparse
import platform

import numpy as np

import edgetune as et
from edgetune.data.fan import FAN_CNN
from edgetune.data.har import HAR_CNN
from edgetune.memory import measure_memory, plan_memory
from edgetune.nn.arch import build_layers, parse_arch
from edgetune.units import format_bytes

PRESETS = {"damage1-1d": (FAN_CNN, (1, 512), 2), "har-raw": (HAR_CNN, (6, 128), 6)}
CASES = [("ft-all", None), ("ft-last", None), ("ft-bias", None), ("lora-all", None), ("lora-last", None),
         ("skip-lora", None), ("skip2-lora", None), ("sparse", None), ("sparse", "b1"), ("sparse", "b2,w0:1/4,w3")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 20], help="batch sizes (default 1 20)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}")
    print("| task | path | " + " | ".join(f"batch {b}: planned / measured (error)" for b in args.batch) + " |")
    print("|---|---|" + "---|" * len(args.batch))
    for task, (arch, shape, classes) in PRESETS.items():
        bb = et.Backbone.from_layers(build_layers(parse_arch(arch, shape, classes), seed=0))
        x0 = rng.normal(size=(max(120, 2 * max(args.batch)),) + shape).astype(np.float32)
        bb.fit_normalizer(x0)
        x, y = bb.prepare(x0), rng.integers(0, classes, len(x0))
        measure_memory(bb, "lora-all", x[:4], y[:4], batch_size=2)  # NumPy's first calls build tables: not a step
        weighted = len(bb.tap_layers)  # and the sparse scheme that trains every weight
        every = f"b{weighted}," + ",".join(f"w{k}" for k in range(weighted))
        for method, scheme in CASES + [("sparse", every)]:
            cells = []
            for batch in args.batch:
                plan = plan_memory(bb, method, batch_size=batch, n_samples=len(x), scheme=scheme)
                got = measure_memory(bb, method, x, y, batch_size=batch, scheme=scheme)["peak"]
                cells.append(f"{format_bytes(plan.total)} / {format_bytes(got)} ({100 * (plan.total - got) / got:+.1f}%)")
            print(f"| {task} | {plan.label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
