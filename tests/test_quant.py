"""int8 backbone: quantisation round trips, the int8 forward pass, files, adapters on top."""
from __future__ import annotations


import numpy as np
import pytest

import edgetune as et
from edgetune.errors import ModelFileError, UsageError
from edgetune.quant import attach_int8_cache, dequantize, load_any, quantize, quantize_weight
from edgetune.quant.int8 import requant_params, requantize

from .conftest import DATA_DIR as DATA



def _model(sizes=(20, 16, 12, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, sizes[0])).astype(np.float32)
    bb = et.Backbone.build(list(sizes), seed=seed).fit_normalizer(x)
    return bb, x


def test_weight_round_trip_within_half_a_step():
    w = np.random.default_rng(0).normal(size=(8, 30)).astype(np.float32)
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.shape == (8,)
    assert np.abs(q).max() == 127  # every channel uses its full range
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] / 2 + 1e-7)


def test_requantize_matches_real_multiplication():
    rng = np.random.default_rng(1)
    acc = rng.integers(-2**20, 2**20, size=(50, 6)).astype(np.int32)
    m = rng.uniform(1e-5, 0.9, 6)
    mult, shift = requant_params(m)
    prod = acc.astype(np.int64) * mult + (np.int64(1) << (shift - 1))
    got = prod >> shift
    assert np.all(np.abs(got - acc * m) <= 0.5 + 1e-6 * np.abs(acc * m) + 1)
    clipped = requantize(acc, mult, shift, 0, 127)
    assert clipped.dtype == np.int8 and clipped.min() >= 0


def test_int8_forward_close_to_float_and_kernels_identical():
    bb, x = _model()
    q = quantize(bb, x)
    xp = bb.prepare(x)
    f, i = bb.forward(xp), q.forward(xp)
    assert np.abs(f - i).max() < 0.05 * np.abs(f).max()
    assert np.mean(f.argmax(1) == i.argmax(1)) > 0.95
    q32 = q.copy()
    q32.int8_kernel = "int32"
    np.testing.assert_array_equal(q32.forward(xp), i)
    taps = q.forward_taps(xp)
    np.testing.assert_allclose(taps, bb.forward_taps(xp), atol=0.1 * np.abs(taps).max())
    np.testing.assert_allclose(dequantize(q).forward(xp), f, atol=0.05 * np.abs(f).max())


def test_save_load_round_trip_and_bad_files(tmp_path):
    bb, x = _model()
    q = quantize(bb, x)
    q.save(tmp_path / "q")
    back = load_any(tmp_path / "q")
    assert back.is_int8 and back.digest() == q.digest()
    np.testing.assert_array_equal(back.forward(bb.prepare(x)), q.forward(bb.prepare(x)))
    f = load_any(bb.save(tmp_path / "f"))
    assert isinstance(f, et.Backbone) and not f.is_int8
    blob = (tmp_path / "q" / "model.safetensors").read_bytes()
    (tmp_path / "q" / "model.safetensors").write_bytes(blob[:-3])
    with pytest.raises(ModelFileError, match="checksum"):
        et.Backbone.load(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text("{")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        et.Backbone.load(tmp_path / "q")


def test_float_only_methods_refused_on_int8():
    bb, x = _model()
    q = quantize(bb, x)
    for name in ("ft-all", "lora-all", "lora-last"):
        with pytest.raises(UsageError, match="int8"):
            et.make_method(name, q)


def test_skip_adapters_and_int8_cache_on_int8_backbone():
    bb, x = _model()
    q = quantize(bb, x)
    y = np.random.default_rng(2).integers(0, 3, len(x))
    plain = et.FineTuner(q, "skip-lora", epochs=3, batch_size=10, lr=0.05).fit(x, y)
    cached = et.FineTuner(q, "skip2-lora", epochs=3, batch_size=10, lr=0.05)
    c = attach_int8_cache(cached.method, len(x))
    cached.fit(x, y)
    # On an int8 backbone the int8 cache is lossless: same training as recomputing every epoch.
    np.testing.assert_allclose(cached.method.params.flat, plain.method.params.flat, rtol=1e-5, atol=1e-6)
    d, out, n = sum(q.sizes[:-1]), q.sizes[-1], len(x)
    assert c.nbytes == n * (d + 4 * out) + 4 * d + n  # int8 taps, float32 logits, scales, filled-mask
    assert c.hits > 0


@pytest.mark.skipif(not (DATA / "cooling-fan").is_dir(), reason="real data not found")
def test_damage1_int8_accuracy_within_one_point():
    task = et.load_task("damage1", DATA)
    from edgetune.experiment import backbone_accuracy, pretrain_on_task

    # The task's full pre-training: an under-trained backbone (20 epochs) loses 1.2 points here.
    model, _ = pretrain_on_task(task)
    q = quantize(model, task.x_pretrain)
    for x, y in [(task.x_pretrain, task.y_pretrain), *task.extra_tests.values()]:
        assert abs(backbone_accuracy(q, x, y) - backbone_accuracy(model, x, y)) <= 0.01
    f = et.FineTuner(model, "skip2-lora", epochs=task.defaults["epochs"]).fit(task.x_finetune, task.y_finetune)
    i = et.FineTuner(q, "skip2-lora", epochs=task.defaults["epochs"]).fit(task.x_finetune, task.y_finetune)
    assert abs(f.score(task.x_test, task.y_test) - i.score(task.x_test, task.y_test)) <= 0.01
