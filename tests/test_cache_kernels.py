"""The cached skip epoch's kernels: one pass over each block of rows, int8 rows read in place.

The compiled engine runs a skip batch's forward, loss gradient and backward in one pass over
blocks of 4 rows, and reads an int8 cache's rows as they are stored (A folded with the column
scales, dA scaled by them at the end). The NumPy engine widens the int8 rows to floats first:
the two must agree to rounding, for every batch size (blocks of 4 and a shorter last block),
with a partial cache (batches that mix cached and recomputed rows) and after invalidation.
"""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.cache import SkipCache
from edgetune.errors import UsageError
from edgetune.quant import Int8SkipCache, attach_int8_cache

from .conftest import small_backbone, toy_task

needs_c = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")


def _fit(bb, x, y, engine, *, int8=True, epochs=4, x_calib=None, **kw):
    opts = dict(epochs=epochs, batch_size=7, lr=0.05, seed=3, rank=2, alpha=3.0, train_last_bias=True)
    opts.update(kw)
    t = et.FineTuner(bb, "skip2-lora", engine=engine, **opts)
    if int8:
        attach_int8_cache(t.method, len(x), x_calib=x if x_calib is None else x_calib)
    t.fit(x, y)
    assert t.history_.engine == engine
    return t


def _assert_same(a, b):
    np.testing.assert_allclose([e.loss for e in b.history_.epochs], [e.loss for e in a.history_.epochs], rtol=1e-5)
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


@needs_c
@pytest.mark.parametrize("batch", [1, 3, 4, 7, 8, 45])
def test_int8_cache_on_a_float_backbone_c_equals_numpy(batch):
    bb = small_backbone(sizes=(9, 12, 10, 3), dtype=np.float32, seed=2)
    x, y = toy_task(n=45, d=9, classes=3, shift=0.7)
    a = _fit(bb, x, y, "numpy", batch_size=batch)
    b = _fit(bb, x, y, "c", batch_size=batch)
    _assert_same(a, b)
    assert a.history_.epochs[-1].loss < a.history_.epochs[0].loss
    np.testing.assert_array_equal(b.method.cache.data, a.method.cache.data)  # the same int8 rows were stored


@needs_c
@pytest.mark.parametrize("batch", [1, 4, 6, 20])
def test_float_cache_c_equals_numpy_for_every_block_size(batch):
    bb = small_backbone(sizes=(33, 20, 17, 4), dtype=np.float32, seed=4)  # widths not multiples of 16
    x, y = toy_task(n=41, d=33, classes=4, shift=0.5)
    a = _fit(bb, x, y, "numpy", int8=False, batch_size=batch)
    b = _fit(bb, x, y, "c", int8=False, batch_size=batch)
    _assert_same(a, b)


@needs_c
def test_partial_int8_cache_mixes_cached_and_recomputed_rows():
    bb = small_backbone(sizes=(10, 16, 12, 3), dtype=np.float32)
    x, y = toy_task(n=50, d=10, classes=3)
    row = 10 + 16 + 12 + 4 * 3   # int8 adapter inputs + float32 logits
    kw = dict(cache_budget=20 * row, cache_overflow="partial", epochs=3)
    a = _fit(bb, x, y, "numpy", **kw)
    b = _fit(bb, x, y, "c", **kw)
    _assert_same(a, b)
    assert b.method.cache.capacity == 20
    assert b.history_.cache["cache_misses"] == a.history_.cache["cache_misses"] == 20 + 3 * 30


@needs_c
def test_int8_cache_rows_follow_a_changed_backbone_and_changed_data():
    bb = small_backbone(sizes=(8, 12, 3), dtype=np.float32)
    x, y = toy_task(n=30, d=8, classes=3)
    t = _fit(bb, x, y, "c", epochs=2)
    assert t.history_.cache["cache_invalidations"] == 0
    bb.weights[0][0, 0] += 0.5                        # an in-place edit of the frozen backbone
    t.fit(x, y)
    assert t.history_.cache["cache_invalidations"] == 1
    x2 = x.copy()
    x2[4, 1] += 1.0                                   # one sample changes
    t.fit(x2, y)
    assert t.history_.cache["cache_invalidations"] == 2
    # what the kept cache serves now is what a fresh cache computes from this backbone and data
    fresh = _fit(bb, x2, y, "c", epochs=2, x_calib=x)
    np.testing.assert_array_equal(t.method.cache.data, fresh.method.cache.data)
    np.testing.assert_array_equal(t.method.cache.logits, fresh.method.cache.logits)


@pytest.mark.parametrize("dtype", [np.int8, np.float16, np.int32, np.complex64, object])
def test_a_float_cache_of_another_dtype_is_refused(dtype):
    with pytest.raises(UsageError, match="float32 or float64"):
        SkipCache(10, 5, dtype)


@pytest.mark.parametrize("scales,message", [
    (np.ones((2, 3), np.float32), "one scale per adapter input"),
    (np.array([1.0, 0.0, 2.0], np.float32), "finite and positive"),
    (np.array([1.0, np.nan, 2.0], np.float32), "finite and positive"),
    (np.array([], np.float32), "one scale per adapter input"),
])
def test_bad_int8_cache_scales_are_refused(scales, message):
    with pytest.raises(UsageError, match=message):
        Int8SkipCache(10, scales, 3)
