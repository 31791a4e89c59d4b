"""skip2-lora is skip-lora plus a cache: same math, fewer forward passes, never stale."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.cache import SkipCache
from edgetune.errors import BudgetError

from .conftest import small_backbone, toy_task


def _pair(epochs=6, **kw):
    bb = small_backbone(sizes=(7, 16, 16, 3), dtype=np.float32)
    x, y = toy_task(n=57, shift=0.5)
    a = et.FineTuner(bb, "skip-lora", epochs=epochs, batch_size=8, lr=0.1, seed=5, **kw).fit(x, y)
    b = et.FineTuner(bb, "skip2-lora", epochs=epochs, batch_size=8, lr=0.1, seed=5, **kw).fit(x, y)
    return a, b, x, y


def test_skip2_equals_skip_lora_losses_and_predictions():
    a, b, x, y = _pair()
    la = [e.loss for e in a.history_.epochs]
    lb = [e.loss for e in b.history_.epochs]
    np.testing.assert_allclose(la, lb, rtol=2e-5)
    assert la[-1] < la[0] * 0.9  # it did learn something
    np.testing.assert_allclose(a.predict_proba(x), b.predict_proba(x), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_allclose(a.method.params.flat, b.method.params.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["numpy", "c"])
@pytest.mark.parametrize("fill", ["eager", "lazy"])
def test_cache_fills_once_then_only_hits(fill, engine):
    _, b, x, _ = _pair(epochs=4, cache_fill=fill, engine=engine)
    assert b.history_.engine == engine
    stats = b.history_.cache
    assert stats["cache_misses"] == len(x)             # each sample computed exactly once
    # every later visit is a hit; an eager fill computes every row before the first batch reads it
    assert stats["cache_hits"] == (4 if fill == "eager" else 3) * len(x)
    assert stats["cache_filled"] == len(x)
    # One row per sample: [x | h1 | h2 | logits] = 7 + 16 + 16 + 3 values of 4 bytes.
    assert b.method.cache.data.shape == (len(x), 7 + 16 + 16 + 3)
    assert stats["cache_bytes"] == len(x) * 42 * 4 + len(x)


def test_cached_rows_are_the_backbone_activations():
    _, b, x, _ = _pair(epochs=1)
    bb = b.backbone
    rows = bb.forward_taps(bb.prepare(x))
    np.testing.assert_allclose(b.method.cache.data, rows, rtol=1e-6, atol=1e-6)


def test_cache_invalidated_when_data_changes():
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=30)
    t = et.FineTuner(bb, "skip2-lora", epochs=2, batch_size=10, lr=0.1)
    t.fit(x, y)
    assert t.history_.cache["cache_invalidations"] == 0
    x2 = x.copy()
    x2[3, 2] += 1.0                                   # one value of one sample changes
    t.fit(x2, y)
    assert t.history_.cache["cache_invalidations"] == 1
    np.testing.assert_allclose(t.method.cache.data[3], bb.forward_taps(bb.prepare(x2[3:4]))[0], rtol=1e-6)
    t.fit(x2, y)                                      # same data again: the cache stays valid
    assert t.history_.cache["cache_invalidations"] == 1


def test_cache_invalidated_when_backbone_changes():
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=30)
    t = et.FineTuner(bb, "skip2-lora", epochs=1, batch_size=10, lr=0.1).fit(x, y)
    bb.weights[0][0, 0] += 0.5                        # someone edits the frozen backbone in place
    t.fit(x, y)
    assert t.history_.cache["cache_invalidations"] == 1
    np.testing.assert_allclose(t.method.cache.data, bb.forward_taps(bb.prepare(x)), rtol=1e-6, atol=1e-6)


def test_cache_budget_refuses_with_numbers():
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=30)
    t = et.FineTuner(bb, "skip2-lora", epochs=1, cache_budget="1KB")
    with pytest.raises(BudgetError, match=r"needs 2\.1 KB .*30 samples x 18 values"):
        t.fit(x, y)


def test_partial_cache_same_result_as_full():
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=30)
    full = et.FineTuner(bb, "skip2-lora", epochs=3, batch_size=7, lr=0.1).fit(x, y)
    part = et.FineTuner(bb, "skip2-lora", epochs=3, batch_size=7, lr=0.1,
                        cache_budget=10 * 18 * 4, cache_overflow="partial").fit(x, y)
    assert part.method.cache.capacity == 10
    assert part.history_.cache["cache_misses"] == 30 + 2 * 20  # epoch 1 all; then the 20 uncached, every epoch
    np.testing.assert_allclose(full.method.params.flat, part.method.params.flat, rtol=1e-5, atol=1e-7)


def test_skip_cache_fetch_mixed_hits():
    c = SkipCache(5, 2, np.float32)
    c.validate(("a", "b"))
    compute = lambda ids: np.stack([ids, ids * 10], axis=1).astype(np.float32)
    np.testing.assert_array_equal(c.fetch(np.array([1, 3]), compute), [[1, 10], [3, 30]])
    got = c.fetch(np.array([3, 0, 1]), compute)
    np.testing.assert_array_equal(got, [[3, 30], [0, 0], [1, 10]])
    assert (c.hits, c.misses) == (2, 3)
    c.validate(("a", "other"))
    assert c.n_filled == 0
