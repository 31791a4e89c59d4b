"""The training-memory model against what a real step allocates."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import BudgetError, UsageError
from edgetune.memory import check_budget, measure_memory, plan_memory, sparse_schemes
from edgetune.quant import quantize
from edgetune.units import parse_bytes

RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 512)).astype(np.float32)
Y = RNG.integers(0, 2, 120)
BB = et.Backbone.build([512, 96, 96, 2], seed=0).fit_normalizer(X)  # the paper's fan model
Q = quantize(BB, X)
CASES = [(BB, m, None, "float32") for m in ("ft-all", "ft-last", "ft-bias", "lora-all", "lora-last",
                                              "skip-lora", "skip2-lora")]
CASES += [(BB, "skip2-lora", None, "int8"), (Q, "skip-lora", None, "float32"), (Q, "skip2-lora", None, "int8"),
          (Q, "skip2-lora", None, "float32")]
CASES += [(b, "sparse", s, "float32") for b in (BB, Q) for s in ("b1", "b2,w2", "w1:1/8", "b3,w0:1/4,w1:1/2,w2")]


@pytest.mark.parametrize("batch", [1, 20, 100])
@pytest.mark.parametrize("bb,method,scheme,cache", CASES,
                         ids=[f"{'int8' if b is Q else 'f32'}-{m}-{s or ''}-{c}" for b, m, s, c in CASES])
def test_plan_matches_measurement(bb, method, scheme, cache, batch):
    # Enough samples for two full batches of cache misses (the skip-cache's worst step).
    n = max(len(X), 2 * batch)
    x, y = np.resize(X, (n, X.shape[1])), np.resize(Y, n)
    plan = plan_memory(bb, method, batch_size=batch, n_samples=n, scheme=scheme, cache=cache)
    got = measure_memory(bb, method, bb.prepare(x), y, batch_size=batch, scheme=scheme, cache=cache, x_calib=X)
    arrays = got["arrays"]
    # Persistent arrays: exact.
    assert plan.frozen_weights == arrays["frozen_weights"]
    assert plan.weight_copies == arrays["weight_copies"]
    assert plan.trainable == arrays["trainable"] and plan.gradients == arrays["gradients"]
    assert plan.optimizer_state == arrays["optimizer"] and plan.snapshot == arrays["snapshot"]
    assert plan.cache_bytes == arrays["cache"]
    # The whole step, transients included: within 10% of the tracemalloc peak.
    assert abs(plan.total - got["peak"]) <= 0.10 * got["peak"], (plan.total, got["peak"])


def test_optimizer_state_scales_with_the_optimizer():
    sgd = plan_memory(BB, "ft-last", optimizer="sgd")
    adam = plan_memory(BB, "ft-last", optimizer="adam")
    assert adam.optimizer_state == 4 * sgd.optimizer_state == 4 * sgd.trainable


def test_int8_cache_is_about_four_times_smaller():
    f = plan_memory(BB, "skip2-lora", n_samples=1000)
    q = plan_memory(BB, "skip2-lora", n_samples=1000, cache="int8")
    assert 3.0 < f.cache_bytes / q.cache_bytes < 4.0


def test_scheme_space_and_budget_errors():
    assert len(sparse_schemes(3)) == 4 * 5 ** 3 - 1
    plan = plan_memory(BB, "ft-all")
    with pytest.raises(BudgetError, match="over by"):
        check_budget(plan, plan.total - 1)
    check_budget(plan, plan.total)
    with pytest.raises(UsageError):
        plan_memory(Q, "lora-all")
    for bad in ["256 parsecs", "-5KB", "", "KB"]:
        with pytest.raises(UsageError, match="byte size"):
            parse_bytes(bad)
