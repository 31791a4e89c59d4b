"""Sparse update: scheme parsing, gradients by finite differences, pruned backward, QAS factors."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import UsageError
from edgetune.methods.sparse import SparseOptions, SparseScheme, SparseUpdate
from edgetune.nn.losses import softmax_cross_entropy
from edgetune.quant import quantize


def _bb(dtype=np.float64):
    return et.Backbone.build([7, 8, 6, 3], seed=0, dtype=dtype)


def _grad_check(m, x, y, eps=1e-6):
    rng = np.random.default_rng(5)
    m.params.flat[...] += rng.normal(scale=0.3, size=m.params.flat.shape)
    ids = np.arange(len(x))
    _, g = softmax_cross_entropy(m.forward(x, ids), y)
    m.params.grad[...] = np.nan
    m.backward(g)
    analytic = m.params.grad.copy()
    numeric = np.empty_like(analytic)
    for i in range(len(analytic)):
        old = m.params.flat[i]
        m.params.flat[i] = old + eps
        lp = softmax_cross_entropy(m.forward(x, ids), y)[0]
        m.params.flat[i] = old - eps
        lm = softmax_cross_entropy(m.forward(x, ids), y)[0]
        m.params.flat[i] = old
        numeric[i] = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scheme", ["b1", "b3", "w0:1/8", "b2,w1:1/2", "b1,w0:1/4,w2", "w1:1/4,w2:1/2"])
def test_sparse_gradients_match_finite_differences(scheme):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 7)), rng.integers(0, 3, 9)
    m = SparseUpdate(_bb(), SparseOptions(scheme=scheme))
    _grad_check(m, x, y)


def test_scheme_parsing_and_errors():
    s = SparseScheme.parse("b2, w-1:1/2, w0:0.125").resolve(3)
    assert s.bias_layers == 2 and dict(s.weights) == {0: 0.125, 2: 0.5}
    assert s.channels([8, 6, 3]) == {0: 1, 2: 2}
    for bad in ["", "x1", "w1:1/3", "w1,w1", "w9"]:
        with pytest.raises(UsageError):
            SparseScheme.parse(bad).resolve(3)


def test_backward_keeps_only_what_gradients_need():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 7)).astype(np.float32), rng.integers(0, 3, 10)
    m = SparseUpdate(_bb(np.float32), SparseOptions(scheme="b1,w2:1/2"))
    _, g = softmax_cross_entropy(m.forward(x, np.arange(10)), y)
    m.backward(g)
    assert m.first == 2  # nothing before the last layer: no backward into layers 0 and 1
    assert m._kept[2] is not None and m._kept[0] is None and m._kept[1] is None
    m2 = SparseUpdate(_bb(np.float32), SparseOptions(scheme="b3"))
    m2.forward(x, np.arange(10))
    # biases only: no activation kept, only ReLU masks (bool) where the gradient passes through
    assert all(a is None for a in m2._kept) and m2._masks[1].dtype == bool and m2._masks[0] is None


def test_frozen_tensors_bit_identical_after_training():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 7)).astype(np.float32), rng.integers(0, 3, 40)
    bb = _bb(np.float32)
    before = [w.copy() for w in bb.weights] + [b.copy() for b in bb.biases]
    m = SparseUpdate(bb, SparseOptions(scheme="b1,w1:1/4"))
    et.fit(m, bb.prepare(x), y, et.TrainConfig(epochs=3, batch_size=8, lr=0.1))
    assert all(np.array_equal(a, b) for a, b in zip(before, bb.weights + bb.biases))
    merged = m.merged_backbone()
    assert not np.array_equal(merged.weights[1][:2], before[1][:2])
    assert np.array_equal(merged.weights[1][2:], before[1][2:])  # rows beyond the ratio: frozen
    assert np.array_equal(merged.weights[0], before[0]) and np.array_equal(merged.biases[0], before[3])
    np.testing.assert_allclose(merged.forward(bb.prepare(x)), m.predict_logits(bb.prepare(x)), rtol=1e-5, atol=1e-6)


def test_int8_frozen_tensors_bit_identical_and_qas_factors():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 7)).astype(np.float32), rng.integers(0, 3, 60)
    bb = _bb(np.float32).fit_normalizer(x)
    q = quantize(bb, x)
    xp = q.prepare(x)
    qw = lambda bb: [layer.quant.qweight for layer in bb.layers]  # noqa: E731
    qb = lambda bb: [layer.quant.qbias for layer in bb.layers]  # noqa: E731
    before = [w.copy() for w in qw(q)] + [b.copy() for b in qb(q)]
    ids = np.arange(20)
    grads = {}
    for qas in (False, True):
        m = SparseUpdate(q, SparseOptions(scheme="b1,w2", qas=qas))
        _, g = softmax_cross_entropy(m.forward(xp, ids), y[ids])
        m.backward(g)
        grads[qas] = {k: v.copy() for k, v in m.params.grads.items()}
        # Direct derivation: dL/dW (float) = g^T h; W = s_W Wq  =>  dL/dWq = s_W dL/dW.
        h = m._kept[2]
        gw = g.T @ h
        s_w, s_x = q.layers[2].quant.wscale, np.float32(q.layers[2].quant.input_scale)
        np.testing.assert_allclose(grads[qas]["layers.2.weight"],
                                   gw / s_w[:, None] if qas else gw * s_w[:, None], rtol=1e-4, atol=1e-7)
        gb = g.sum(0)
        np.testing.assert_allclose(grads[qas]["layers.2.bias"], gb / (s_w * s_x) if qas else gb * (s_w * s_x),
                                   rtol=1e-4, atol=1e-9)
    # QAS = plain gradient times s_W^-2 (weights) and (s_W s_x)^-2 (biases), per output channel
    np.testing.assert_allclose(grads[True]["layers.2.weight"],
                               grads[False]["layers.2.weight"] / q.layers[2].quant.wscale[:, None] ** 2, rtol=1e-4)
    m = SparseUpdate(q, SparseOptions(scheme="b1,w2:1/2"))
    et.fit(m, xp, y, et.TrainConfig(epochs=3, batch_size=10, lr=0.05))
    assert all(np.array_equal(a, b) for a, b in zip(before, qw(q) + qb(q)))
    merged = m.merged_backbone()
    assert merged.is_int8 and qw(merged)[2].dtype == np.int8
    assert np.array_equal(qw(merged)[0], before[0]) and np.array_equal(qw(merged)[2][2:], before[2][2:])


def test_registry_default_scheme():
    m = et.make_method("sparse", _bb())
    assert str(m.scheme) == "b2,w2" and m.n_trainable == 6 * 3 + 3 + 6


def test_scheme_through_api_adapter_files_and_refused_elsewhere(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 7)).astype(np.float32), rng.integers(0, 3, 60)
    bb = _bb(np.float32).fit_normalizer(x)
    for model in (bb, quantize(bb, x)):
        t = et.FineTuner(model, "sparse", scheme="b1,w1:1/4", epochs=2, batch_size=10, lr=0.05).fit(x, y)
        assert str(t.method.scheme) == "b1,w1:1/4" and t.n_trainable == 2 * 8 + 3
        assert t.method.qas == (model is not bb)
        t.save_adapter(tmp_path / str(id(model)))
        back = et.FineTuner.load_adapter(model, tmp_path / str(id(model)))
        assert str(back.method.scheme) == "b1,w1:1/4" and back.method.qas == t.method.qas
        np.testing.assert_array_equal(back.predict_proba(x), t.predict_proba(x))
    assert et.FineTuner(quantize(bb, x), "sparse", qas=False).method.qas is False
    for name in ("skip-lora", "skip2-lora", "ft-all", "lora-last"):
        with pytest.raises(UsageError, match="sparse method only"):
            et.FineTuner(bb, name, scheme="b1")
    with pytest.raises(UsageError, match="sparse method only"):
        et.FineTuner(bb, "skip-lora", qas=True)
    with pytest.raises(UsageError, match="channel ratio"):
        et.FineTuner(bb, "sparse", scheme="w1:1/3")


def test_scheme_through_cli(tmp_path, capsys):
    from edgetune.cli import main

    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=(40, 7)).astype(np.float32) for s in ("pretrain", "finetune", "test")}
    np.savez(tmp_path / "t.npz", **{f"x_{s}": v for s, v in xs.items()},
             **{f"y_{s}": (v[:, 0] > 0).astype(int) for s, v in xs.items()})
    bb = et.Backbone.build([7, 8, 6, 2], seed=0).fit_normalizer(xs["pretrain"])
    bb.save(tmp_path / "m")
    quantize(bb, xs["pretrain"]).save(tmp_path / "q")
    base = ["finetune", "--task", str(tmp_path / "t.npz"), "--epochs", "2", "--quiet"]
    for model in ("m", "q"):
        out = tmp_path / f"a-{model}"
        assert main(base + ["--model", str(tmp_path / model), "--method", "sparse", "--scheme", "b1,w-1:1/2",
                            "--save-adapter", str(out)]) == 0
        assert "sparse on" in capsys.readouterr().out
        loaded = et.FineTuner.load_adapter(et.quant.load_any(tmp_path / model), out)
        assert str(loaded.method.scheme) == "b1,w2:1/2" and loaded.n_trainable == 6 + 2
    assert main(base + ["--model", str(tmp_path / "m"), "--method", "skip-lora", "--scheme", "b1"]) == 2
    assert "sparse method only" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "m"), "--method", "sparse", "--scheme", "w7"]) == 2
