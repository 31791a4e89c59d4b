"""Convolutional backbones in the NumPy engine: each layer kind against PyTorch autograd and
finite differences, every method's gradient on a CNN with a residual block, shapes that must
be refused, architecture strings, files and PyTorch conversion."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetune as et
from edgetune.errors import UsageError
from edgetune.methods import METHODS, make_method, method_class
from edgetune.methods.base import MethodOptions
from edgetune.nn.arch import build_layers, parse_arch
from edgetune.nn.layers import Layer, LayerSpec
from edgetune.nn.losses import softmax_cross_entropy

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _check_against_torch(spec: LayerSpec, fn, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = 3
    x = rng.normal(size=(n,) + spec.in_shape)
    w = rng.normal(size=spec.weight_shape) if spec.has_params else None
    ops = spec.ops
    z = ops.forward(spec, x.reshape(n, -1), w)
    xt = torch.tensor(x, requires_grad=True)
    wt = None if w is None else torch.tensor(w, requires_grad=True)
    zt = fn(xt, wt)
    assert tuple(zt.shape[1:]) == spec.out_shape
    np.testing.assert_allclose(z, zt.detach().numpy().reshape(n, -1), rtol=1e-10, atol=1e-10)
    g = rng.normal(size=tuple(zt.shape))
    zt.backward(torch.tensor(g))
    dx = ops.input_grad(spec, g.reshape(n, -1), w, x.reshape(n, -1), z)
    np.testing.assert_allclose(dx, xt.grad.numpy().reshape(n, -1), rtol=1e-9, atol=1e-10)
    if w is not None:
        np.testing.assert_allclose(ops.weight_grad(spec, x.reshape(n, -1), g.reshape(n, -1)), wt.grad.numpy(),
                                   rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(ops.bias_grad(spec, g.reshape(n, -1)),
                                   g.reshape(n, spec.out_channels, -1).sum(axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("c,length,o,k,s,p,g", [
    (4, 11, 6, 3, 2, 1, 2), (3, 7, 3, 3, 1, 0, 3), (2, 5, 4, 5, 1, 2, 1), (6, 9, 6, 1, 1, 0, 1),
    (2, 3, 2, 3, 4, 1, 1), (1, 8, 1, 8, 1, 0, 1)])
def test_conv1d_equals_pytorch(c, length, o, k, s, p, g):
    spec = LayerSpec.conv((c, length), o, k, stride=s, padding=p, groups=g)
    _check_against_torch(spec, lambda x, w: F.conv1d(x, w, stride=s, padding=p, groups=g))


@pytest.mark.parametrize("c,h,w,o,k,s,p,g", [
    (4, 7, 6, 8, (3, 2), (2, 1), (1, 0), 2), (3, 5, 5, 3, 3, 1, 1, 3), (2, 4, 4, 5, 1, 1, 0, 1),
    (2, 6, 5, 4, (2, 3), (3, 2), (1, 1), 1)])
def test_conv2d_equals_pytorch(c, h, w, o, k, s, p, g):
    spec = LayerSpec.conv((c, h, w), o, k, stride=s, padding=p, groups=g)
    _check_against_torch(spec, lambda x, wt: F.conv2d(x, wt, stride=s, padding=p, groups=g))


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape,k,s,p", [((3, 10), 3, 2, 1), ((2, 7), 2, None, 0), ((3, 6, 7), (3, 2), (2, 2), (1, 1)),
                                         ((2, 4, 4), 2, None, 0)])
def test_pooling_equals_pytorch(mode, shape, k, s, p):
    spec = LayerSpec.pool(mode, shape, k, s, p)
    fn = {("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d, ("avg", 1): F.avg_pool1d,
          ("avg", 2): F.avg_pool2d}[mode, len(shape) - 1]
    _check_against_torch(spec, lambda x, w: fn(x, spec.kernel, spec.stride, spec.padding))


def test_gap_and_flatten_equal_pytorch():
    _check_against_torch(LayerSpec.gap((3, 5, 4)), lambda x, w: x.mean(dim=(2, 3)))
    _check_against_torch(LayerSpec.gap((3, 7)), lambda x, w: x.mean(dim=2))
    _check_against_torch(LayerSpec.flatten((3, 5, 4)), lambda x, w: x.flatten(1))


@settings(max_examples=150, deadline=None)
@given(c=st.integers(1, 4), length=st.integers(1, 12), o=st.integers(1, 4), k=st.integers(1, 14),
       s=st.integers(1, 6), p=st.integers(0, 3), g=st.integers(1, 4))
def test_any_conv1d_shape_is_built_or_refused_clearly(c, length, o, k, s, p, g):
    try:
        spec = LayerSpec.conv((c, length), o, k, stride=s, padding=p, groups=g)
    except UsageError as e:
        too_long = length + 2 * p < k
        assert too_long or c % g or o % g, str(e)
        assert ("longer than the padded input" in str(e)) if too_long else ("groups" in str(e))
        return
    assert spec.out_shape == (o, (length + 2 * p - k) // s + 1)
    _check_against_torch(spec, lambda x, w: F.conv1d(x, w, stride=s, padding=p, groups=g))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="conv1d", in_shape=(3,), out_channels=2, kernel=(3,), stride=(1,), padding=(0,)), "2 dimensions"),
    (dict(kind="conv1d", in_shape=(3, 8), out_channels=2, kernel=(3, 3), stride=(1,), padding=(0,)),
     "1 value"),
    (dict(kind="conv1d", in_shape=(3, 8), out_channels=2, kernel=(0,), stride=(1,), padding=(0,)), ">= 1"),
    (dict(kind="maxpool1d", in_shape=(3, 8), out_channels=3, kernel=(2,), stride=(2,), padding=(2,)),
     "more than half the kernel"),
    (dict(kind="maxpool1d", in_shape=(3, 8), out_channels=4, kernel=(2,), stride=(2,), padding=(0,)),
     "keeps its 3 channels"),
    (dict(kind="gap", in_shape=(5,), out_channels=5), "gap takes"),
    (dict(kind="add", in_shape=(3, 4), out_channels=3), "source"),
    (dict(kind="flatten", in_shape=(3, 4), out_channels=11), "gives 12 features"),
    (dict(kind="dense", in_shape=(3,), out_channels=2, source=0), "only an add layer has a source"),
])
def test_bad_spatial_specs_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        LayerSpec(**kwargs)


def _cnn(dtype=np.float64, act="tanh", seed=1) -> et.Backbone:
    """A small 1-D CNN with a depthwise/pointwise residual block, pooling and gap."""
    arch = (f"conv:8:3:1:same,{act},res(dwconv:3:1:1,{act},conv:8:1),avgpool:2,conv:6:3:2,{act},gap,"
            f"dense:6,{act}")
    specs = parse_arch(arch, (3, 12), 3)
    rng = np.random.default_rng(seed)
    layers = [Layer(s, rng.normal(size=s.weight_shape).astype(dtype) * 0.4,
                    rng.normal(size=s.bias_shape).astype(dtype) * 0.1) if s.has_params else Layer(s) for s in specs]
    return et.Backbone.from_layers(layers)


def test_a_cnn_backbone_equals_the_same_network_in_pytorch():
    bb = _cnn(act="relu6")
    kinds = [s.kind for s in bb.specs]
    assert kinds == ["conv1d", "conv1d", "conv1d", "add", "avgpool1d", "conv1d", "gap", "dense", "dense"]
    assert bb.specs[1].groups == 8 and bb.specs[3].source == 1
    from edgetune.torch import from_torch, to_torch

    x = np.random.default_rng(0).normal(size=(5, 3, 12))
    module = to_torch(bb)
    np.testing.assert_allclose(module(torch.tensor(x)).detach().numpy(), bb.forward(bb.prepare(x)), rtol=1e-10)
    back = from_torch(module, input_shape=(3, 12))
    assert back.specs == bb.specs and back.digest() == bb.digest()
    # taps: each weighted layer's input pooled per channel, then the logits
    taps = bb.forward_taps(bb.prepare(x))
    assert taps.shape == (5, sum(bb.tap_widths) + 3) and bb.tap_widths == [3, 8, 8, 8, 6, 6]
    np.testing.assert_allclose(taps[:, :3], x.mean(axis=2), rtol=1e-12)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_the_right_gradient_on_a_cnn(name):
    bb = _cnn()
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 36)), rng.integers(0, 3, 7)
    for rank in ((1, 2) if "lora" in name else (1,)):
        kw = dict(scheme="b3,w2:1/2,w0:1/4") if name == "sparse" else dict(rank=rank, train_last_bias=True)
        m = make_method(name, bb, seed=3, **kw)
        assert m.n_trainable == method_class(name).count_trainable(bb.specs, MethodOptions(**kw))
        for k in m.params:  # non-zero adapters, so that every gradient path is exercised
            mask = m.params.masks.get(k, 1)
            m.params[k][...] = rng.normal(size=m.params[k].shape) * 0.3 * mask
        m.begin_fit(x)
        _, g = softmax_cross_entropy(m.forward(x, np.arange(7)), y)
        m.backward(g)
        grad, flat = m.params.grad.copy(), m.params.flat
        idx = np.flatnonzero(m.params.trainable_mask())
        for i in rng.permutation(idx)[:30]:
            old = flat[i]
            flat[i] = old + 1e-6
            lp, _ = softmax_cross_entropy(m.predict_logits(x), y)
            flat[i] = old - 1e-6
            lm, _ = softmax_cross_entropy(m.predict_logits(x), y)
            flat[i] = old
            fd = (lp - lm) / 2e-6
            assert abs(fd - grad[i]) <= 1e-6 + 1e-5 * abs(fd), (name, rank, i, fd, grad[i])
        m.end_fit()


def test_skip2_lora_equals_skip_lora_on_a_cnn_and_never_runs_a_convolution_after_the_first_epoch(monkeypatch):
    bb = _cnn(dtype=np.float32)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 3, 12)).astype(np.float32), rng.integers(0, 3, 30)
    runs = {}
    for name in ("skip-lora", "skip2-lora"):
        t = et.FineTuner(bb, name, epochs=4, batch_size=8, lr=0.05, engine="numpy", seed=1).fit(x, y)
        runs[name] = ([e.loss for e in t.history_.epochs], t.predict_proba(x))
    np.testing.assert_allclose(runs["skip-lora"][0], runs["skip2-lora"][0], rtol=1e-6)
    np.testing.assert_allclose(runs["skip-lora"][1], runs["skip2-lora"][1], rtol=1e-5, atol=1e-7)
    calls = []
    ops = bb.specs[0].ops
    real = type(ops).forward
    monkeypatch.setattr(type(ops), "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    m = make_method("skip2-lora", bb)
    xp = bb.prepare(x)
    m.begin_fit(xp)
    m.forward(xp, np.arange(30))
    first = len(calls)
    assert first > 0
    m.forward(xp, np.arange(30))
    assert len(calls) == first  # the second pass read every row from the skip-cache


def test_architecture_strings_build_and_refuse_clearly():
    specs = parse_arch("conv:16:5:2:2,relu,maxpool:2,res(conv:16:3:1:same,relu6),flatten,dense:32,relu", (2, 64), 4)
    assert [s.kind for s in specs] == ["conv1d", "maxpool1d", "conv1d", "add", "flatten", "dense", "dense"]
    assert specs[0].out_shape == (16, 32) and specs[4].out_shape == (256,) and specs[-1].out_channels == 4
    layers = build_layers(specs, seed=0)
    assert all(layer.weight.dtype == np.float32 for layer in layers if layer.weight is not None)
    two_d = parse_arch("conv:4:3x3:1:same,relu,dwconv:3,gap", (3, 8, 8), 2)
    assert two_d[0].kind == "conv2d" and two_d[1].groups == 4 and two_d[1].out_shape == (4, 6, 6)
    # the MLP written as an architecture is Backbone.build's MLP, bit for bit
    mlp = et.Backbone.from_layers(build_layers(parse_arch("dense:5,relu,dense:4,relu", (7,), 3), seed=3))
    ref = et.Backbone.build([7, 5, 4, 3], seed=3)
    assert mlp.digest() == ref.digest()
    for text, message in (("conv:16", "conv:C:K"), ("conv:8:3,gap,dense:4,conv:2:1", "a convolution needs"),
                          ("conv:8:3", "end it with gap or flatten"), ("dense:4", "dense takes a flat input"),
                          ("res(conv:4:3)", "give back its input's shape"), ("relu", "needs a layer before"),
                          ("conv:8:3,relu,relu", "already has activation"), ("conv:8:x", "whole number"),
                          ("swish", "not understood"), ("conv:8:3,,gap", "empty item"), ("res(conv:3:1", "not closed"),
                          ("conv:8:4:1:same", "odd kernel")):
        with pytest.raises(UsageError, match=message):
            parse_arch(text, (3, 16), 2)


def test_cnn_files_round_trip_and_tasks_take_samples_of_any_shape(tmp_path):
    bb = _cnn(dtype=np.float32)
    x = np.random.default_rng(0).normal(size=(40, 3, 12)).astype(np.float32) * 3 + 1
    bb.fit_normalizer(x)
    assert bb.input_mean.shape == (3,)
    np.testing.assert_allclose(bb.prepare(x).reshape(40, 3, 12).mean(axis=(0, 2)), 0, atol=1e-5)
    bb.save(tmp_path / "m")
    back = et.Backbone.load(tmp_path / "m")
    assert back.specs == bb.specs and back.digest() == bb.digest()
    np.testing.assert_array_equal(back.forward(back.prepare(x)), bb.forward(bb.prepare(x)))
    with pytest.raises(et.DataError, match=r"\(samples, 3, 12\) or \(samples, 36\)"):
        bb.prepare(np.zeros((4, 12, 3)))
    y = np.arange(40) % 3
    task = et.Task("cnn", x, y, x, y, x, y)
    assert task.input_shape == (3, 12) and task.n_features == 36
    model, _ = et.pretrain(x, y, arch="conv:4:3,relu,gap", epochs=2, seed=0)
    assert model.input_shape == (3, 12)
    with pytest.raises(UsageError, match="need an architecture"):
        et.pretrain(x, y, epochs=1)


def test_from_torch_folds_batch_norm_and_refuses_what_does_not_convert():
    from torch import nn

    from edgetune.torch import from_torch

    torch.manual_seed(0)

    class InvertedResidual(nn.Module):  # the shape of torchvision's, on 1-D signals
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv1d(c, 2 * c, 1, bias=False), nn.BatchNorm1d(2 * c), nn.ReLU6(),
                nn.Conv1d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), nn.BatchNorm1d(2 * c), nn.ReLU6(),
                nn.Conv1d(2 * c, c, 1, bias=False), nn.BatchNorm1d(c))

        def forward(self, x):
            return x + self.conv(x)

    net = nn.Sequential(nn.Conv1d(6, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
                        InvertedResidual(8), nn.Conv1d(8, 12, 3, stride=2), nn.ReLU(), nn.Dropout(0.2),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(12, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    net.eval()
    bb = from_torch(net, input_shape=(6, 32))
    assert [s.kind for s in bb.specs].count("add") == 1
    x = np.random.default_rng(0).normal(size=(4, 6, 32)).astype(np.float32)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), net(torch.tensor(x)).detach().numpy(), atol=1e-5)
    with pytest.raises(UsageError, match="give the shape of one sample"):
        from_torch(net)
    for bad, message in ((nn.Sequential(nn.Conv1d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(24, 2)),
                          r"module '1' \(GELU\) does not convert: from_torch converts Conv1d"),
                         (nn.Sequential(nn.Conv1d(3, 4, 3, dilation=2), nn.Flatten(), nn.Linear(16, 2)),
                          "dilation 1"),
                         (nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.BatchNorm1d(4), nn.Flatten(),
                                        nn.Linear(24, 2)), "cannot be folded"),
                         (nn.Sequential(nn.Conv1d(3, 4, 3)), "must end with one value per class")):
        with pytest.raises(UsageError, match=message):
            from_torch(bad.eval(), input_shape=(3, 8))


@pytest.mark.parametrize("method", ["lora-all", "lora-last"])
def test_conv_lora_adapters_load_in_peft_and_back(tmp_path, method):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    peft = pytest.importorskip("peft")
    from edgetune.torch import to_torch

    bb = _cnn(dtype=np.float32, act="relu")
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 3, 12)).astype(np.float32), rng.integers(0, 3, 40)
    t = et.FineTuner(bb, method, rank=2, alpha=3, train_last_bias=True, epochs=3, lr=0.05).fit(x, y)
    t.save_adapter(tmp_path / "a", format="peft")
    import json

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # lora-all: every layer with weights but the depthwise one (groups > 1: no mergeable adapter)
    want = ["layers.0", "layers.2", "layers.5", "layers.7", "layers.8"] if method == "lora-all" else ["layers.8"]
    assert cfg["target_modules"] == want
    model = peft.PeftModel.from_pretrained(to_torch(bb), str(tmp_path / "a"))
    got = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, t.decision_function(x), rtol=1e-4, atol=1e-5)
    back = et.FineTuner.load_adapter(bb, tmp_path / "a")
    assert back.method_name == method
    np.testing.assert_allclose(back.decision_function(x), t.decision_function(x), rtol=1e-5, atol=1e-6)
    merged = t.merged()
    np.testing.assert_allclose(merged.forward(merged.prepare(x)), t.decision_function(x), rtol=1e-4, atol=1e-5)


def test_an_int8_skip_cache_on_a_cnn_rounds_each_pooled_tap_to_its_own_scale():
    from edgetune.quant import attach_int8_cache, quantize

    bb = _cnn(dtype=np.float32, act="relu")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 3, 12)).astype(np.float32), rng.integers(0, 3, 30)
    float_run = et.FineTuner(bb, "skip2-lora", epochs=3, lr=0.05, engine="numpy").fit(x, y)
    t = et.FineTuner(bb, "skip2-lora", epochs=3, lr=0.05, engine="numpy")
    t.fit(x[:2], y[:2])  # builds the method; the cache is attached for the real fit
    attach_int8_cache(t.method, 30, x_calib=x)
    assert t.method.cache.col_scales.shape == (sum(bb.tap_widths),)
    t.fit(x, y)
    from edgetune.quant import Int8SkipCache
    assert isinstance(t.method.cache, Int8SkipCache) and t.method.cache.hits > 0
    np.testing.assert_allclose(t.decision_function(x), float_run.decision_function(x), atol=0.05)
    q = quantize(bb, x)  # an int8 CNN (tests/test_int8_cnn.py)
    assert q.is_int8 and q.specs == bb.specs


def test_review_findings_on_cnns_stay_fixed(tmp_path):
    """A last-layer activation is refused (the engines' gradients treat the logits as linear);
    skip2-lora fits a CNN twice (its rows do not begin with the raw input: the data digest guards
    them); a replaced layer's activation changes the digest; a bias delta with no last bias is
    refused on merge; a module whose Identity reads an earlier value is refused."""
    from torch import nn

    from edgetune.torch import from_torch

    with pytest.raises(UsageError, match="no activation after it"):
        et.Backbone.from_layers([Layer(LayerSpec.dense(3, 2, "sigmoid"), np.ones((2, 3)), np.zeros(2))])
    with pytest.raises(UsageError, match="no activation after it"):
        from_torch(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(18, 2), nn.Sigmoid()).eval(),
                   input_shape=(2, 8))

    bb = _cnn(dtype=np.float32)
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(40, 3, 12)).astype(np.float32), rng.integers(0, 3, 40)
    t = et.FineTuner(bb, "skip2-lora", epochs=2, engine="numpy").fit(x, y)
    t.fit(x, y)
    assert t.method.cache.hits > 0  # same data: the rows were kept
    x2 = x.copy()
    x2[0, 0, 0] += 1
    t.fit(x2, y)
    assert t.method.cache.misses >= 40  # changed data: every row recomputed, never served stale

    mlp = et.Backbone.build([5, 4, 4, 2], activation="relu")
    before = mlp.digest()
    old = mlp.layers[0]
    mlp.layers[0] = Layer(LayerSpec.dense(5, 4, "tanh"), old.weight, old.bias)
    mlp.layers[1] = Layer(LayerSpec.dense(4, 4, "tanh"), mlp.layers[1].weight, mlp.layers[1].bias)
    assert mlp.activation.name == "tanh" and mlp.digest() != before

    specs = parse_arch("conv:4:3,relu,gap", (3, 12), 3)[:-1]  # ends with gap: no last bias
    layers = [Layer(s, rng.normal(size=s.weight_shape).astype(np.float32),
                    np.zeros(s.bias_shape, np.float32)) if s.has_params else Layer(s) for s in specs]
    with pytest.raises(UsageError, match="last layer must give one value per class|no bias to fold"):
        cnn = et.Backbone.from_layers(layers)
        t = et.FineTuner(cnn, "lora-last", train_last_bias=True, epochs=1).fit(x[:, :, :], y % 4)
        t.merged()

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.idn = nn.Conv1d(2, 2, 1), nn.Conv1d(2, 4, 3), nn.Identity()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.c1(x)
            h = self.idn(x)  # reads the input again, not h
            return self.fc(self.c2(h).mean(2))

    with pytest.raises(UsageError, match="previous layer's output|does not convert"):
        from_torch(Dead().eval(), input_shape=(2, 8))
