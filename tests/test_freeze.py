"""Methods freeze exactly what they say; the caller's backbone is never modified."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et

from .conftest import small_backbone, toy_task

# Which backbone tensors each method may change (layer k weight "w{k}", bias "b{k}").
TRAINS = {
    "ft-all": {"w0", "b0", "w1", "b1", "w2", "b2"},
    "ft-last": {"w2", "b2"},
    "ft-bias": {"b0", "b1", "b2"},
    "lora-all": set(), "lora-last": set(), "skip-lora": set(), "skip2-lora": set(),
}


@pytest.mark.parametrize("name", list(TRAINS))
def test_frozen_tensors_bit_identical(name):
    bb = small_backbone(sizes=(7, 6, 5, 3), dtype=np.float32)
    before = {f"w{k}": w.copy() for k, w in enumerate(bb.weights)} | {f"b{k}": b.copy() for k, b in enumerate(bb.biases)}
    x, y = toy_task(n=40, shift=1.0)
    t = et.FineTuner(bb, name, epochs=3, batch_size=8, lr=0.05, train_last_bias=True).fit(x, y)
    # The caller's backbone: untouched by every method.
    for k in range(3):
        assert np.array_equal(bb.weights[k], before[f"w{k}"]) and np.array_equal(bb.biases[k], before[f"b{k}"])
    # The method's own view of the backbone: only the trained tensors moved.
    trained = t.method.backbone
    for key, old in before.items():
        new = (trained.weights if key[0] == "w" else trained.biases)[int(key[1])]
        if key in TRAINS[name]:
            assert not np.array_equal(new, old), f"{name} should train {key}"
        else:
            assert np.array_equal(new, old), f"{name} changed frozen tensor {key}"


@pytest.mark.parametrize("name", ["lora-all", "lora-last", "ft-all", "ft-last", "ft-bias"])
def test_merged_backbone_computes_the_same(name):
    bb = small_backbone(sizes=(7, 6, 5, 3), dtype=np.float32)
    x, y = toy_task(n=40, shift=1.0)
    t = et.FineTuner(bb, name, epochs=3, batch_size=8, lr=0.05, train_last_bias=True).fit(x, y)
    merged = t.merged()
    np.testing.assert_allclose(merged.forward(merged.prepare(x)), t.decision_function(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(TRAINS))
def test_fresh_adapter_leaves_model_unchanged(name):
    bb = small_backbone(sizes=(7, 6, 5, 3), dtype=np.float32)
    x, _ = toy_task(n=20)
    t = et.FineTuner(bb, name)
    np.testing.assert_allclose(t.decision_function(x), bb.forward(bb.prepare(x)), rtol=1e-6, atol=1e-6)
