"""The sparse update on convolutional backbones in the compiled engine: C against NumPy for
schemes that train biases, a last layer's weights, a convolution's first channels (depthwise,
grouped, pointwise, strided and padded 2-D), below a residual add; the weight gradient of a
layer's first channels only; the workspace C sizes; what is refused, and how."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.core.conv_binding import layer_dims
from edgetune.core.engine import CoreError, CoreModel, CoreRunner, resolve_engine
from edgetune.errors import UsageError
from edgetune.memory import core_workspace_for
from edgetune.methods import make_method
from edgetune.nn.arch import parse_arch
from edgetune.nn.layers import Layer, LayerSpec
from edgetune.optim import SGD

pytestmark = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

#: (architecture, one sample's input shape); parse_arch adds the head, a dense layer to the
#: classes. The schemes below count the layers with weights.
ARCHS = {
    # weighted: 0 conv (its output is the add's source), 1 depthwise, 2 pointwise, 3 grouped
    # (groups 2, stride 2, padding 1), 4 dense, 5 the head
    "1d-residual": ("conv:8:3:1:same,relu6,res(dwconv:3:1:1,relu6,conv:8:1),maxpool:2,conv:6:3:2:1:2,relu,gap,"
                    "dense:6,tanh", (3, 20)),
    # weighted: 0 conv2d (stride 2, padding 1), 1 conv2d inside a residual, 2 dense after flatten, 3 the head
    "2d-strided": ("conv:6:3:2:1,relu,res(conv:6:3:1:1,relu),maxpool:2,flatten,dense:5,leaky_relu", (2, 11, 9)),
    # weighted: 0 conv (stride 2, padding 2), 1 conv, 2 dense, 3 the head; average pooling, sigmoid
    "1d-flatten": ("conv:4:5:2:2,leaky_relu,avgpool:3:1,conv:4:3,sigmoid,flatten,dense:5,relu", (2, 17)),
}

#: (architecture, scheme, what it exercises)
CASES = [
    ("1d-residual", "b2", "biases only"),
    ("1d-residual", "b1,w-1", "the last layer's weights"),
    ("1d-residual", "w0:1/4", "a conv at 1/4, below a residual add: its gradient comes back through both paths"),
    ("1d-residual", "w0", "a whole conv below a residual add"),
    ("1d-residual", "w1:1/4", "depthwise at 1/4"),
    ("1d-residual", "b3,w1", "a whole depthwise conv and biases from the pointwise one on"),
    ("1d-residual", "w2:1/2,w3:1/4", "pointwise at 1/2, a grouped conv's first group only"),
    ("1d-residual", "w3", "a grouped conv, both groups"),
    ("2d-strided", "w0:1/4", "conv2d with stride and padding at 1/4"),
    ("2d-strided", "w0,b2", "conv2d with stride and padding, whole"),
    ("2d-strided", "w1:1/2,w2:1/8", "conv2d inside a residual, and the dense layer after flatten"),
    ("1d-flatten", "b1,w0:1/2", "a strided, padded conv under average pooling and sigmoid"),
]


def _backbone(name: str, classes: int = 3, seed: int = 1) -> et.Backbone:
    arch, shape = ARCHS[name]
    rng = np.random.default_rng(seed)
    layers = [Layer(s, (rng.normal(size=s.weight_shape) * 0.5).astype(np.float32),
                    (rng.normal(size=s.bias_shape) * 0.1).astype(np.float32)) if s.has_params else Layer(s)
              for s in parse_arch(arch, shape, classes)]
    return et.Backbone.from_layers(layers)


def _task(name: str, n: int = 41, classes: int = 3, seed: int = 0):
    shape = ARCHS[name][1]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += (0.8 * y).reshape(-1, *([1] * (len(shape) - 1)))
    return x, y


def _fit(bb, x, y, engine, **kw):
    opts = dict(epochs=4, batch_size=7, lr=0.05, seed=3)
    opts.update(kw)
    t = et.FineTuner(bb, "sparse", engine=engine, **opts).fit(x, y)
    assert t.history_.engine == engine
    return t


def _losses(t) -> np.ndarray:
    return np.array([e.loss for e in t.history_.epochs])


def _same(a, b, x) -> None:
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,scheme,what", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sparse_on_cnns_c_equals_numpy(name, scheme, what):
    bb = _backbone(name)
    x, y = _task(name)
    assert resolve_engine("auto", make_method("sparse", bb, scheme=scheme)) == "c"
    a = _fit(bb, x, y, "numpy", scheme=scheme)
    b = _fit(bb, x, y, "c", scheme=scheme)
    _same(a, b, x)
    assert _losses(a)[-1] < _losses(a)[0], what  # it learned
    assert np.any(b.method.params.flat != make_method("sparse", bb, scheme=scheme).params.flat)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("name,scheme", [("1d-residual", "b2,w0:1/4,w1:1/2"), ("2d-strided", "w0:1/2,w-1")])
def test_sparse_on_cnns_with_optimizers_and_weight_decay(name, scheme, optimizer):
    bb = _backbone(name)
    x, y = _task(name)
    kw = dict(optimizer=optimizer, lr=0.01, weight_decay=0.01, scheme=scheme, epochs=3)
    _same(_fit(bb, x, y, "numpy", **kw), _fit(bb, x, y, "c", **kw), x)


@pytest.mark.parametrize("name,scheme", [("1d-residual", "b5,w0:1/4,w1:1/8,w3:1/2"),
                                         ("2d-strided", "b3,w0:1/4,w1:1/2,w2:1/8")])
def test_the_sparse_batch_gradient_equals_numpy_on_a_cnn(name, scheme):
    """One step's gradients, every trained tensor at once, against the NumPy engine's."""
    bb = _backbone(name)
    x, y = _task(name, n=12)
    m = make_method("sparse", bb, scheme=scheme)
    xp = bb.prepare(x)
    ids = np.arange(6, dtype=np.int32)
    model = CoreModel(m, 8)
    m.params.grad[...] = np.nan  # C writes every entry
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
    assert all(np.any(grads_c[m.params.slices[k]] != 0) for k in m.params.values)


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("spec", [
    LayerSpec.conv((4, 13), 6, 3, stride=2, padding=1),             # im2col
    LayerSpec.conv((6, 12), 6, 3, padding=1, groups=6),             # depthwise
    LayerSpec.conv((6, 12), 12, 3, padding=1, groups=6),            # depthwise, 2 per channel
    LayerSpec.conv((4, 9), 6, 1, groups=2),                         # pointwise, grouped
    LayerSpec.conv((2, 7, 6), 8, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
], ids=["conv1d", "depthwise", "depthwise-x2", "pointwise-grouped", "conv2d-grouped"])
def test_the_weight_gradient_of_the_first_channels_is_the_full_ones_first_rows(spec):
    lib = core.load()
    rng = np.random.default_rng(0)
    n = 3
    x = rng.normal(size=(n, spec.in_features)).astype(np.float32)
    g = rng.normal(size=(n, spec.out_features)).astype(np.float32)
    d = layer_dims(spec)
    vp = ctypes.c_void_p
    lib.et_conv_weight_grad_scratch_bytes.restype = ctypes.c_size_t
    scratch = np.zeros(max(1, lib.et_conv_weight_grad_scratch_bytes(ctypes.byref(d), n)), np.uint8)
    full = np.empty(spec.weight_shape, np.float32)
    lib.et_conv_weight_grad(ctypes.byref(d), n, vp(x.ctypes.data), vp(g.ctypes.data), vp(full.ctypes.data), 0,
                            vp(scratch.ctypes.data))
    want = spec.ops.weight_grad(spec, x, g)
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
    for rows in sorted({1, 2, spec.out_channels // 2 + 1, spec.out_channels}):
        dw = np.full((rows, *spec.weight_shape[1:]), np.nan, np.float32)
        after = np.full(4, 7.0, np.float32)  # a guard: nothing past the rows is written
        buf = np.concatenate([dw.ravel(), after])
        lib.et_conv_weight_grad_rows(ctypes.byref(d), n, vp(x.ctypes.data), vp(g.ctypes.data), rows,
                                     vp(buf.ctypes.data), 0, vp(scratch.ctypes.data))
        np.testing.assert_allclose(buf[:dw.size].reshape(dw.shape), want[:rows], rtol=1e-5, atol=1e-5)
        assert np.all(buf[dw.size:] == 7.0)


# ----------------------------------------------------------------------------- memory, refusals
@pytest.mark.parametrize("scheme", ["b2", "w0:1/4,w-1"])
def test_the_planner_workspace_is_what_the_trainer_allocates_for_sparse_on_a_cnn(scheme):
    bb = _backbone("1d-residual")
    x, y = _task("1d-residual", n=30)
    m = make_method("sparse", bb, scheme=scheme)
    runner = CoreRunner(m, SGD(m.params, 0.05), bb.prepare(x), y, 6)
    assert core_workspace_for(m, 6) == runner.ws.nbytes
    orders = np.arange(30, dtype=np.int32)[None]
    short = runner._fn(*runner._args_head, orders.ctypes.data, 1, None, runner.ws.ctypes.data, runner.ws.nbytes - 1,
                       runner._stats)
    assert short == -2  # ET_ERR_WORKSPACE
    assert runner.run(orders)[0].loss > 0


def test_trained_rows_cost_workspace_and_biases_do_not_hold_weights():
    """The assembled weight of a layer with trained rows is in the workspace; biases alone add none."""
    bb = _backbone("2d-strided")
    sizes = {s: CoreModel(make_method("sparse", bb, scheme=s), 4).workspace_bytes() for s in ("b1", "b1,w-1:1/8")}
    dense = bb.specs[-1]
    assert sizes["b1,w-1:1/8"] - sizes["b1"] >= int(np.prod(dense.weight_shape)) * 4


def test_the_layers_with_trained_rows_share_one_assembled_weight():
    """Each layer's weight is assembled when a pass uses it, into one scratch for the largest: rows
    trained in a smaller layer beside a larger one cost only their parameters' pieces (the
    snapshot; the fused update's gradient scratch is the larger layer's rows either way), not a
    copy of the smaller layer's weight."""
    bb = _backbone("1d-residual")
    conv, depthwise = (bb.specs[k] for k in bb.tap_layers[:2])  # 8 x 3 x 3 and 8 x 1 x 3 floats
    assert np.prod(conv.weight_shape) > np.prod(depthwise.weight_shape)
    models = {s: CoreModel(make_method("sparse", bb, scheme=s), 4) for s in ("w0:1/8", "w0:1/8,w1:1/8")}
    one, two = models["w0:1/8"], models["w0:1/8,w1:1/8"]
    assert one.method.first == two.method.first
    assert two.method.params.flat.size > one.method.params.flat.size

    def piece(n_floats: int) -> int:  # a workspace piece: 64-byte rounded
        return -(-4 * n_floats // 64) * 64

    assert two.workspace_bytes() - one.workspace_bytes() == (piece(two.method.params.flat.size)
                                                             - piece(one.method.params.flat.size))


def test_nothing_below_the_first_trained_layer_stays_in_the_workspace():
    """The frozen layers before the first trained one write their outputs into two buffers in
    turn (an add's source keeps its own): training only the head needs less than that saves
    against training from layer 0 on."""
    bb = _backbone("1d-residual")
    batch = 4
    ws = {s: CoreModel(make_method("sparse", bb, scheme=s), batch).workspace_bytes() for s in ("b1", "w0:1/8,b1")}
    first = make_method("sparse", bb, scheme="b1").first
    assert first == bb.n_layers - 1
    pruned = [k for k in range(1, first) if k not in bb.sources]
    turns = [max([bb.sizes[k] for k in pruned if k % 2 == j], default=0) for j in (0, 1)]
    saved = batch * 4 * (sum(bb.sizes[k] for k in pruned) - sum(turns))
    assert saved > 0
    assert ws["w0:1/8,b1"] - ws["b1"] >= saved


def test_c_refuses_sparse_rows_that_do_not_fit_the_layers():
    bb = _backbone("1d-residual")
    m = make_method("sparse", bb, scheme="b2,w0:1/4")
    model = CoreModel(m, 4)
    lib = core.load()
    ok = lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4)
    assert ok > 0
    pool = [s.kind for s in bb.specs].index("maxpool1d")
    for field, k, value in (("rows", 0, 9), ("rows", 0, -1), ("rows", pool, 1), ("off_bias", pool, 0),
                            ("off_weight", 0, -1)):
        old = getattr(model.m, field)[k]
        getattr(model.m, field)[k] = value
        assert lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4) == 0, (field, k, value)
        getattr(model.m, field)[k] = old
    assert lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4) == ok
    x, y = _task("1d-residual", n=6)
    model.m.rows[pool] = 1
    with pytest.raises(CoreError, match="refused"):
        model.predict(bb.prepare(x))


def test_the_binding_checks_a_sparse_description_on_a_cnn():
    bb = _backbone("1d-residual")
    pool = [s.kind for s in bb.specs].index("maxpool1d")
    for field, k, value, message in (("rows", pool, 1, rf"layer {pool} \(maxpool1d\) has no weights to train"),
                                     ("bias", pool, 0, rf"layer {pool} \(maxpool1d\) has no weights to train"),
                                     ("rows", 0, 9, "layer 0: 9 trained rows of 8"),
                                     ("weight", 0, 10 ** 6, "layer 0 weight.*runs past")):
        bad = make_method("sparse", bb, scheme="b2,w0:1/4")
        original = bad.core_spec

        def patched(original=original, field=field, k=k, value=value):
            s = original()
            getattr(s, field)[k] = value
            return s

        bad.core_spec = patched
        with pytest.raises(UsageError, match=message):
            CoreModel(bad, 4)


@pytest.mark.parametrize("scheme,message", [("w6", "scheme names layer 6, but the backbone has layers 0..5"),
                                            ("b7", "biases of the last 7 layers, but the backbone has 6"),
                                            ("w0:1/3", "channel ratio 1/3"),
                                            ("w0,w0:1/2", "appears twice")])
def test_a_bad_scheme_on_a_cnn_is_refused_clearly(scheme, message):
    bb = _backbone("1d-residual")
    x, y = _task("1d-residual", n=10)
    with pytest.raises(UsageError, match=message):
        et.FineTuner(bb, "sparse", scheme=scheme, engine="c", epochs=1).fit(x, y)


def test_what_still_stays_on_numpy_says_why():
    """A chain of dense layers runs the MLP path, which passes gradients through ReLU and identity only."""
    rng = np.random.default_rng(0)
    specs = [LayerSpec.dense(5, 6, activation="tanh"), LayerSpec.dense(6, 4, activation="relu"),
             LayerSpec.dense(4, 3)]
    bb = et.Backbone.from_layers([Layer(s, rng.normal(size=s.weight_shape).astype(np.float32),
                                        np.zeros(s.bias_shape, np.float32)) for s in specs])
    m = make_method("sparse", bb)
    assert resolve_engine("auto", m) == "numpy"
    with pytest.raises(UsageError, match="sparse update supports ReLU and identity activations"):
        resolve_engine("c", m)


def test_a_chain_of_dense_layers_with_relu_and_identity_runs_the_mlp_path_in_c():
    rng = np.random.default_rng(0)
    specs = [LayerSpec.dense(5, 8, activation="relu"), LayerSpec.dense(8, 6), LayerSpec.dense(6, 7, activation="relu"),
             LayerSpec.dense(7, 3)]
    bb = et.Backbone.from_layers([Layer(s, (rng.normal(size=s.weight_shape) * 0.5).astype(np.float32),
                                        (rng.normal(size=s.bias_shape) * 0.1).astype(np.float32)) for s in specs])
    assert not bb.is_plain_mlp()
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    kw = dict(scheme="b2,w0:1/4,w2:1/2", optimizer="momentum")
    _same(_fit(bb, x, y, "numpy", **kw), _fit(bb, x, y, "c", **kw), x)


def test_sparse_on_a_real_damage_cnn_runs_in_c_as_in_numpy(data_dir):
    task = et.load_task("damage1-1d", data_dir)
    x, y = task.x_finetune[:60], task.y_finetune[:60]
    model, _ = et.pretrain(task.x_pretrain[:120], task.y_pretrain[:120], labels=task.labels, epochs=1, seed=0,
                           arch="conv:8:9:4:4,relu,maxpool:2,conv:8:5:2:2,relu,maxpool:2,flatten,dense:16,relu")
    a = _fit(model, x, y, "numpy", epochs=3, scheme="b2,w1:1/4,w-1")
    b = _fit(model, x, y, "c", epochs=3, scheme="b2,w1:1/4,w-1")
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5)
    np.testing.assert_array_equal(a.predict(task.x_test[:50]), b.predict(task.x_test[:50]))
