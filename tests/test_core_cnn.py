"""The compiled engine on convolutional backbones: skip-lora and skip2-lora in C against NumPy,
the layer structs the binding builds, and what C refuses."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.core.engine import CoreError, CoreModel, CoreRunner, layer_backbone, resolve_engine
from edgetune.errors import UsageError
from edgetune.memory import core_workspace_for
from edgetune.methods import make_method
from edgetune.nn.arch import parse_arch
from edgetune.nn.layers import Layer, LayerSpec
from edgetune.optim import SGD

pytestmark = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

#: (architecture, one sample's input shape): 1-D and 2-D, groups (depthwise), max and average
#: pooling (padded), residual adds, relu6, flatten and gap.
ARCHS = {
    "1d-residual": ("conv:8:3:1:same,relu6,res(dwconv:3:1:1,relu6,conv:8:1),maxpool:2,conv:6:3:2:1:2,relu,gap,"
                    "dense:6,tanh", (3, 20)),
    "1d-flatten": ("conv:4:5:2:2,leaky_relu,avgpool:3:1,conv:4:3,sigmoid,flatten,dense:5,relu", (2, 17)),
    "2d": ("conv:6:3:1:1,relu,maxpool:2,conv:6:3:2:1:3,relu6,res(conv:6:1,relu),avgpool:2:1,gap,dense:4",
           (2, 9, 8)),
    "2d-flatten": ("conv:4:3x2:2x1:1x0,tanh,maxpool:2x1:1,flatten,dense:7,relu", (1, 7, 6)),
    # padded pooling (not in the architecture strings), written as layer descriptions
    "2d-padded-pool": ([LayerSpec.conv((2, 6, 7), 4, 3, padding=1, activation="relu"),
                        LayerSpec.pool("max", (4, 6, 7), 3, 2, padding=1),
                        LayerSpec.pool("avg", (4, 3, 4), 3, 1, padding=1),
                        LayerSpec.conv((4, 3, 4), 4, 1, activation="relu6"),
                        LayerSpec.gap((4, 3, 4)), LayerSpec.dense(4, 3)], (2, 6, 7)),
    "1d-padded-pool": ([LayerSpec.conv((2, 15), 4, 3, activation="tanh"), LayerSpec.pool("avg", (4, 13), 2, 1, 1),
                        LayerSpec.pool("max", (4, 14), 3, 2, 1), LayerSpec.flatten((4, 7)),
                        LayerSpec.dense(28, 3)], (2, 15)),
}


def _specs(arch, shape, classes: int = 3) -> list[LayerSpec]:
    return list(arch) if isinstance(arch, list) else parse_arch(arch, shape, classes)


def _backbone(arch, shape: tuple[int, ...], classes: int = 3, seed: int = 1) -> et.Backbone:
    specs = _specs(arch, shape, classes)
    rng = np.random.default_rng(seed)
    layers = [Layer(s, (rng.normal(size=s.weight_shape) * 0.5).astype(np.float32),
                    (rng.normal(size=s.bias_shape) * 0.1).astype(np.float32)) if s.has_params else Layer(s)
              for s in specs]
    return et.Backbone.from_layers(layers)


def _task(shape: tuple[int, ...], n: int = 41, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += 0.8 * y[:, None] if len(shape) == 2 else 0.8 * y[:, None, None]
    return x, y


def _fit(bb, method, x, y, engine, **kw):
    opts = dict(epochs=4, batch_size=7, lr=0.05, seed=3, rank=2, alpha=3.0)
    opts.update(kw)
    t = et.FineTuner(bb, method, engine=engine, **opts).fit(x, y)
    assert t.history_.engine == engine
    return t


def _losses(t) -> np.ndarray:
    return np.array([e.loss for e in t.history_.epochs])


@pytest.mark.parametrize("method", ["skip-lora", "skip2-lora"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_skip_methods_on_cnns_c_equals_numpy(name, method):
    arch, shape = ARCHS[name]
    bb = _backbone(arch, shape)
    assert not bb.is_plain_mlp()
    x, y = _task(shape)
    assert resolve_engine("auto", make_method(method, bb)) == "c"
    a = _fit(bb, method, x, y, "numpy")
    b = _fit(bb, method, x, y, "c")
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    assert _losses(a)[-1] < _losses(a)[0]  # it learned
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.predict_proba(x), a.predict_proba(x), rtol=1e-4, atol=1e-6)


def test_the_archs_cover_every_kind():
    specs = [s for arch, shape in ARCHS.values() for s in _specs(arch, shape)]
    assert {s.kind for s in specs} == set(core.ENUMS["layer"])
    assert any(s.groups > 1 and s.groups == s.in_shape[0] for s in specs)   # depthwise
    assert any(1 < s.groups < s.in_shape[0] for s in specs if s.has_params)  # grouped
    assert all(any(max(s.padding) > 0 for s in specs if s.kind == kind)
               for kind in ("conv1d", "conv2d", "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d"))
    assert {"relu6", "tanh", "sigmoid", "leaky_relu"} <= {s.activation for s in specs}


@pytest.mark.parametrize("name", ["1d-residual", "2d"])
def test_skip2_equals_skip_exactly_in_c_on_a_cnn(name):
    arch, shape = ARCHS[name]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=53)
    a = _fit(bb, "skip-lora", x, y, "c", epochs=5, optimizer="adam", lr=0.01, train_last_bias=True)
    for fill in ("eager", "lazy"):
        b = _fit(bb, "skip2-lora", x, y, "c", epochs=5, optimizer="adam", lr=0.01, train_last_bias=True,
                 cache_fill=fill)
        assert _losses(a).tolist() == _losses(b).tolist()
        np.testing.assert_array_equal(a.method.params.flat, b.method.params.flat)
        assert b.method.cache.complete


def test_a_partial_cache_on_a_cnn_matches_numpy_and_counts():
    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=50)
    row = (sum(bb.tap_widths) + 3) * 4
    kw = dict(cache_budget=20 * row, cache_overflow="partial", epochs=3)
    a = _fit(bb, "skip2-lora", x, y, "numpy", **kw)
    b = _fit(bb, "skip2-lora", x, y, "c", **kw)
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    assert b.method.cache.capacity == 20
    assert (b.method.cache.hits, b.method.cache.misses) == (a.method.cache.hits, a.method.cache.misses)


def test_the_eager_fill_in_blocks_larger_than_the_batch():
    """The cache fills 64 rows at a time; a CNN's workspace holds a batch: C splits the block."""
    arch, shape = ARCHS["2d"]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=150)
    a = _fit(bb, "skip2-lora", x, y, "numpy", batch_size=3, epochs=2)
    b = _fit(bb, "skip2-lora", x, y, "c", batch_size=3, epochs=2)
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    np.testing.assert_allclose(b.method.cache.data, a.method.cache.data, rtol=1e-5, atol=1e-6)


def test_the_batch_gradient_equals_numpy_on_a_cnn():
    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=12)
    m = make_method("skip-lora", bb, rank=2, train_last_bias=True)
    m.params["skip.lora_B"][...] = np.random.default_rng(2).normal(size=m.params["skip.lora_B"].shape) * 0.3
    xp = bb.prepare(x)
    ids = np.arange(5, dtype=np.int32)
    model = CoreModel(m, 8)
    loss_c = model.batch_gradient(xp, y.astype(np.int32), ids)
    grads_c = m.params.grad.copy()
    logits = m.forward(xp, ids)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss_np = -np.mean(np.log(p[np.arange(5), y[:5]]))
    g = p.copy()
    g[np.arange(5), y[:5]] -= 1
    m.backward(g / 5)
    np.testing.assert_allclose(loss_c, loss_np, rtol=1e-5)
    np.testing.assert_allclose(grads_c, m.params.grad, rtol=1e-4, atol=1e-6)
    assert np.any(grads_c != 0)


def test_a_real_har_raw_cnn_runs_in_c_as_in_numpy(data_dir):
    task = et.load_task("har-raw", data_dir)
    x, y = task.x_finetune[:60], task.y_finetune[:60]
    model, _ = et.pretrain(task.x_pretrain[:200], task.y_pretrain[:200], labels=task.labels, epochs=1, seed=0,
                           arch="conv:8:5:1:same,relu,maxpool:4,conv:8:3,relu,gap,dense:8,relu")
    a = _fit(model, "skip2-lora", x, y, "numpy", epochs=3)
    b = _fit(model, "skip2-lora", x, y, "c", epochs=3)
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    np.testing.assert_array_equal(a.predict(task.x_test[:50]), b.predict(task.x_test[:50]))


@pytest.mark.parametrize("method", ["lora-all", "ft-all", "lora-last", "ft-last", "ft-bias"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_layer_wise_methods_on_cnns_c_equals_numpy(name, method):
    """The backward pass through convolutions, pooling, gap, flatten and residual adds in C;
    LoRA beside a convolution as PEFT builds it (A a convolution with the layer's kernel, B 1x1)."""
    arch, shape = ARCHS[name]
    bb = _backbone(arch, shape)
    x, y = _task(shape)
    assert resolve_engine("auto", make_method(method, bb)) == "c"
    a = _fit(bb, method, x, y, "numpy")
    b = _fit(bb, method, x, y, "c")
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    assert _losses(a)[-1] < _losses(a)[0]
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_layer_wise_on_a_cnn_with_optimizers_and_a_trained_last_bias(optimizer):
    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    x, y = _task(shape)
    kw = dict(optimizer=optimizer, lr=0.01, weight_decay=0.01, train_last_bias=True, rank=3, alpha=1.5)
    a = _fit(bb, "lora-all", x, y, "numpy", **kw)
    b = _fit(bb, "lora-all", x, y, "c", **kw)
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora-all", "ft-all"])
def test_the_layer_wise_batch_gradient_equals_numpy_on_a_cnn(method):
    arch, shape = ARCHS["2d"]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=12)
    m = make_method(method, bb, rank=2, train_last_bias=True)
    rng = np.random.default_rng(4)
    for name in m.params.values:  # LoRA B away from zero, so that A's gradient is not zero
        if name.endswith("lora_B"):
            m.params[name][...] = rng.normal(size=m.params[name].shape) * 0.3
    xp = bb.prepare(x)
    ids = np.arange(6, dtype=np.int32)
    model = CoreModel(m, 8)
    loss_c = model.batch_gradient(xp, y.astype(np.int32), ids)
    grads_c = m.params.grad.copy()
    logits = m.forward(xp, ids)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = p.copy()
    g[np.arange(6), y[:6]] -= 1
    m.backward(g / 6)
    np.testing.assert_allclose(loss_c, -np.mean(np.log(p[np.arange(6), y[:6]])), rtol=1e-5)
    np.testing.assert_allclose(grads_c, m.params.grad, rtol=2e-4, atol=2e-6)
    assert all(np.any(grads_c[m.params.slices[name]] != 0) for name in m.params.values)


# ----------------------------------------------------------------------------- what runs where
def test_the_sparse_method_on_a_cnn_runs_in_c():
    """One case here so that it also runs against the sanitizer build (tests/test_core_native.py);
    the schemes, kinds and optimizers are in tests/test_core_sparse_cnn.py."""
    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    x, y = _task(shape)
    scheme = "b2,w0:1/4,w1:1/2"  # below the residual add, a depthwise convolution
    assert resolve_engine("auto", make_method("sparse", bb, scheme=scheme)) == "c"
    kw = dict(scheme=scheme, optimizer="adam", lr=0.01)
    a = et.FineTuner(bb, "sparse", engine="numpy", epochs=3, batch_size=7, seed=3, **kw).fit(x, y)
    b = et.FineTuner(bb, "sparse", engine="c", epochs=3, batch_size=7, seed=3, **kw).fit(x, y)
    assert b.history_.engine == "c"
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


def test_a_float64_cnn_stays_on_numpy():
    bb = _backbone(*ARCHS["1d-flatten"])
    m = make_method("skip2-lora", bb.astype(np.float64))
    assert resolve_engine("auto", m) == "numpy"  # float64: NumPy (gradient checks)


@pytest.mark.parametrize("method", ["skip2-lora", "lora-all", "ft-all"])
def test_the_planner_workspace_is_what_the_trainer_allocates_on_a_cnn(method):
    arch, shape = ARCHS["2d"]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=30)
    m = make_method(method, bb)
    runner = CoreRunner(m, SGD(m.params, 0.05), bb.prepare(x), y, 6)
    assert core_workspace_for(m, 6) == runner.ws.nbytes
    # C takes exactly that, not one byte less
    orders = np.arange(30, dtype=np.int32)[None]
    short = runner._fn(*runner._args_head, orders.ctypes.data, 1, None, runner.ws.ctypes.data, runner.ws.nbytes - 1,
                       runner._stats)
    assert short == -2  # ET_ERR_WORKSPACE
    assert runner.run(orders)[0].loss > 0


# ----------------------------------------------------------------------------- the structs
def _model(name: str = "1d-residual") -> tuple[CoreModel, et.Backbone]:
    arch, shape = ARCHS[name]
    bb = _backbone(arch, shape)
    return CoreModel(make_method("skip2-lora", bb), 4), bb


def test_the_binding_builds_each_layer_as_c_reads_it():
    model, bb = _model("2d")
    kinds = core.ENUMS["layer"]
    for k, spec in enumerate(bb.specs):
        layer = model.bb.layers[k]
        assert kinds[layer.kind] == spec.kind
        assert layer.in_c * layer.in_h * layer.in_w == spec.in_features
        assert layer.out_c * layer.out_h * layer.out_w == spec.out_features
        assert layer.groups == spec.groups
        assert layer.source == (spec.source if spec.kind == "add" else -1)
        assert core.ENUMS["activation"][layer.activation] == spec.activation
        if spec.kind == "conv2d":
            assert (layer.kernel_h, layer.kernel_w) == spec.kernel and (layer.stride_h, layer.stride_w) == spec.stride
            assert (layer.pad_h, layer.pad_w) == spec.padding and bool(layer.w) and not layer.wt
        if spec.kind == "gap":
            assert (layer.kernel_h, layer.kernel_w) == spec.in_shape[1:]
    model1, bb1 = _model("1d-residual")
    conv = model1.bb.layers[0]
    assert (conv.in_h, conv.out_h, conv.kernel_h, conv.stride_h, conv.pad_h) == (1, 1, 1, 1, 0)
    assert model1.tap_widths == bb1.tap_widths and model1.d_in == sum(bb1.tap_widths)


FUZZ = [  # (layer, field, value): each breaks what the layer's kind derives or what chains
    (0, "out_w", 19), (0, "kernel_w", 0), (0, "stride_w", 0), (0, "pad_w", -1), (0, "kernel_w", 40),
    (0, "in_h", 2), (0, "kernel_h", 3), (0, "groups", 0), (0, "groups", 5), (1, "groups", 3),
    (1, "out_c", 7), (3, "source", 3), (3, "source", 7), (3, "source", -1), (3, "source", 0), (2, "source", 1),
    (4, "pad_w", 2), (4, "out_c", 9), (4, "kernel_w", 25), (5, "groups", 4), (6, "kernel_w", 3),
    (6, "stride_w", 2), (7, "kernel_w", 3), (7, "out_w", 2), (8, "in_c", 7), (8, "activation", 6),
    (8, "activation", -1), (8, "out_h", 2),
]


@pytest.mark.parametrize("k,field,value", FUZZ)
def test_c_refuses_inconsistent_layer_structs(k, field, value):
    model, bb = _model()
    assert [s.kind for s in bb.specs][:5] == ["conv1d", "conv1d", "conv1d", "add", "maxpool1d"]
    lib = core.load()
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == 0
    setattr(model.bb.layers[k], field, value)
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == -1
    assert lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4) == 0
    x, y = _task((3, 20), n=6)
    with pytest.raises(CoreError, match="refused"):
        model.predict(bb.prepare(x))


def test_c_refuses_an_int8_cnn_and_unknown_kinds():
    model, _ = _model()
    lib = core.load()
    model.bb.is_int8 = 1
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == -3
    model.bb.is_int8 = 0
    model.bb.layers[4].kind = len(core.ENUMS["layer"])
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == -3


def test_the_binding_checks_values_before_c():
    _, bb = _model()
    spec = bb.specs[0]
    with pytest.raises(UsageError, match="out of range"):
        layer_backbone([LayerSpec("conv1d", (3, 2 ** 31), 8, (3,), (1,), (1,))])
    with pytest.raises(UsageError, match=f"1..{core.MAX_LAYERS} layers"):
        layer_backbone([spec] * (core.MAX_LAYERS + 1))
    # a layer's tensor of the wrong dtype or shape is refused, naming it
    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    m = make_method("skip2-lora", bb)
    bb.layers[5].weight = bb.layers[5].weight.astype(np.float64)
    with pytest.raises(UsageError, match="layer 5 weight: dtype float64"):
        CoreModel(m, 4)
    bb.layers[5].weight = np.zeros((6, 4, 2), np.float32)
    with pytest.raises(UsageError, match=r"layer 5 weight: shape \[6, 4, 2\], expected \[6, 4, 3\]"):
        CoreModel(m, 4)
    bb = _backbone(arch, shape)
    bb.layers[5].bias = np.zeros(5, np.float32)
    with pytest.raises(UsageError, match="layer 5 bias"):
        CoreModel(make_method("skip2-lora", bb), 4)
    # a non-contiguous weight is read from a contiguous copy, with the same numbers
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=10)
    want = CoreModel(make_method("skip-lora", bb), 4).predict(bb.prepare(x))
    w = bb.layers[5].weight
    bb.layers[5].weight = np.asfortranarray(w)
    np.testing.assert_array_equal(CoreModel(make_method("skip-lora", bb), 4).predict(bb.prepare(x)), want)


def test_export_plans_a_cnn_with_every_method(tmp_path):
    """The device program runs a CNN with every method of the compiled engine
    (tests/test_export_cnn.py builds and runs them)."""
    from edgetune.export.project import ExportOptions, plan_export

    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    bb.save(tmp_path / "m")
    opts = {"model": str(tmp_path / "m"), "target": "host", "out": str(tmp_path / "p"), "toolchain_check": False}
    assert plan_export(ExportOptions(method="skip2-lora", **opts))["plan"].workspace > 0
    assert plan_export(ExportOptions(method="sparse", **opts))["plan"].workspace > 0
    assert not (tmp_path / "p").exists()  # planning writes nothing


def test_the_binding_checks_a_layer_wise_description_on_a_cnn():
    arch, shape = ARCHS["1d-residual"]
    bb = _backbone(arch, shape)
    m = make_method("lora-all", bb)
    spec = m.core_spec()
    assert spec.lora_a[1] == -1 and spec.lora_a[0] >= 0  # none beside the depthwise convolution
    # an adapter beside a grouped convolution, a tensor on a layer without weights, one past the end
    for field, k, value, message in (("lora_a", 1, 0, "no LoRA adapter fits a conv1d layer with groups 8"),
                                     ("bias", 4, 0, r"layer 4 \(maxpool1d\) has no weights to train"),
                                     ("lora_b", 0, m.params.flat.size - 1, "layer 0 lora_B.*runs past")):
        bad = make_method("lora-all", bb)
        original = bad.core_spec

        def patched(original=original, field=field, k=k, value=value):
            s = original()
            getattr(s, field)[k] = value
            return s

        bad.core_spec = patched
        with pytest.raises(UsageError, match=message):
            CoreModel(bad, 4)


@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_checkpoint_resume_on_a_cnn_is_bit_identical_in_c(tmp_path, method):
    arch, shape = ARCHS["2d"]
    bb = _backbone(arch, shape)
    x, y = _task(shape, n=30)
    full = et.FineTuner(bb, method, epochs=6, engine="c", optimizer="adam", lr=0.01).fit(x, y)
    ck = tmp_path / "run.ckpt"
    part = et.FineTuner(bb, method, epochs=6, engine="c", optimizer="adam", lr=0.01)
    part.fit(x, y, checkpoint=ck, callback=lambda rec: rec.epoch == 3)
    assert len(part.history_.epochs) < 6
    again = et.FineTuner(bb, method, epochs=6, engine="c", optimizer="adam", lr=0.01).fit(x, y, checkpoint=ck)
    assert again.history_.engine == "c"
    np.testing.assert_array_equal(again.method.params.flat, full.method.params.flat)
