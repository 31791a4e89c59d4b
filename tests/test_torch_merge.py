"""Merging skip adapters for deployment (NumPy side; the torch export is in test_torch_skip2lora)."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import UsageError

from .conftest import small_backbone


def trained(name, train_last_bias=True, rank=2, activation="relu", seed=0):
    rng = np.random.default_rng(seed)
    bb = small_backbone(sizes=(7, 6, 5, 3), activation=activation)
    m = et.make_method(name, bb, seed=seed, rank=rank, alpha=3.0, train_last_bias=train_last_bias)
    m.params.flat[...] = rng.normal(scale=0.4, size=m.params.flat.shape)
    m.params["skip.lora_A"][...] *= m.params.masks["skip.lora_A"]
    return m, rng.normal(size=(15, 7))


@pytest.mark.parametrize("name", ["skip-lora", "skip2-lora"])
@pytest.mark.parametrize("train_last_bias", [False, True])
def test_merge_parts_reproduce_the_method(name, train_last_bias):
    m, x = trained(name, train_last_bias)
    folded, rest = m.merge_parts()
    assert sorted(rest) == [0, 1]  # the last layer's adapter folded, the others cannot
    taps = folded.forward_taps(x)
    offs = np.cumsum([0, *folded.sizes[:-1]])
    logits = taps[:, offs[-1]:].copy()
    for k, (a, sb) in rest.items():
        logits += taps[:, offs[k]:offs[k + 1]] @ a.T @ sb.T
    np.testing.assert_allclose(logits, m.predict_logits(x), rtol=1e-12, atol=1e-12)
    assert m.backbone.digest() != folded.digest()  # a copy: the frozen backbone is untouched


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_merged_backbone_when_only_the_last_adapter_is_nonzero(activation):
    m, x = trained("skip2-lora", activation=activation)
    r = m.options.rank
    m.params["skip.lora_B"][:, :2 * r] = 0  # adapters on layers 0 and 1 are zero
    merged = m.merged_backbone()
    assert isinstance(merged, et.Backbone)
    np.testing.assert_allclose(merged.forward(x), m.predict_logits(x), rtol=1e-12, atol=1e-12)


def test_merged_backbone_explains_what_cannot_fold():
    m, _ = trained("skip-lora")
    with pytest.raises(UsageError) as e:
        m.merged_backbone()
    msg = str(e.value)
    assert "layers [0, 1]" in msg and "skip_head" in msg and "merge_parts" in msg


def test_finetuner_merged_for_untrained_skip_adapters_is_the_backbone():
    bb = small_backbone()
    t = et.FineTuner(bb, "skip2-lora", rank=2)
    assert t.merged().digest() == bb.digest()  # B = 0: every product is zero


def test_single_layer_backbone_folds_completely():
    bb = small_backbone(sizes=(7, 3))
    m = et.make_method("skip-lora", bb, seed=0, rank=2, train_last_bias=True)
    m.params.flat[...] = np.random.default_rng(0).normal(size=m.params.flat.shape)
    x = np.random.default_rng(1).normal(size=(5, 7))
    np.testing.assert_allclose(m.merged_backbone().forward(x), m.predict_logits(x), rtol=1e-12)
