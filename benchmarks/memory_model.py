"""The training-memory model against the measured peak, per path and batch size.

    python -m benchmarks.memory_model

Prints the table of docs/budgets.md: for each path (method, float or int8 backbone, cache
format, sparse scheme) the model's error against the tracemalloc peak of real training
steps, at batch 1, 20 and 100 (512-96-96-2, synthetic inputs: memory does not depend on
the values). tests/test_memory.py asserts the same cases stay within 10%.
"""
from __future__ import annotations

import numpy as np

import edgetune as et
from edgetune.memory import measure_memory, plan_memory
from edgetune.quant import quantize

BATCHES = (1, 20, 100)


def main() -> None:
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(120, 512)).astype(np.float32)
    y0 = rng.integers(0, 2, 120)
    bb = et.Backbone.build([512, 96, 96, 2], seed=0).fit_normalizer(x0)
    q = quantize(bb, x0)
    cases = [(f"{m} (float)", bb, m, None, "float32") for m in
             ("ft-all", "ft-last", "ft-bias", "lora-all", "lora-last", "skip-lora", "skip2-lora")]
    cases += [("skip2-lora (float, int8 cache)", bb, "skip2-lora", None, "int8"),
              ("skip-lora (int8)", q, "skip-lora", None, "float32"),
              ("skip2-lora (int8, float cache)", q, "skip2-lora", None, "float32"),
              ("skip2-lora (int8, int8 cache)", q, "skip2-lora", None, "int8")]
    cases += [(f"sparse[{s}] ({'int8' if b is q else 'float'})", b, "sparse", s, "float32")
              for b in (bb, q) for s in ("b1", "b2,w2", "w1:1/8", "b3,w0:1/4,w1:1/2,w2")]
    print("| path | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for label, b, method, scheme, cache in cases:
        cells = []
        for batch in BATCHES:
            n = max(len(x0), 2 * batch)
            x, y = np.resize(x0, (n, 512)), np.resize(y0, n)
            plan = plan_memory(b, method, batch_size=batch, n_samples=n, scheme=scheme, cache=cache)
            got = measure_memory(b, method, b.prepare(x), y, batch_size=batch, scheme=scheme, cache=cache,
                                 x_calib=x0)
            cells.append(f"{100 * (plan.total - got['peak']) / got['peak']:+.1f}%")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
