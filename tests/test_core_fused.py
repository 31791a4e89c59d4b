"""The fused update in the compiled engine (et_train_epochs with grads NULL): each trained
tensor stepped as soon as its gradient is ready gives the very parameters and optimizer state
of the two-phase path (the whole gradient, then one step), bit for bit, on MLP and CNN
backbones, for the layer-wise methods and the sparse update, float and int8 (with and without
QAS), with SGD, momentum and Adam with weight decay; which methods take it; and the workspace
and device arena it needs instead of a gradient per parameter."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.core.engine import CoreModel, CoreRunner
from edgetune.memory import core_workspace_for, plan_device_memory
from edgetune.methods import make_method
from edgetune.nn.arch import build_layers, parse_arch
from edgetune.optim import make_optimizer
from edgetune.quant import quantize

from .conftest import small_backbone, toy_task

pytestmark = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

#: weighted layers: 0 conv (the add's source), 1 depthwise, 2 pointwise, 3 grouped strided conv, 4 dense, 5 head
CNN = ("conv:8:3:1:same,relu6,res(dwconv:3:1:1,relu6,conv:8:1),maxpool:2,conv:6:3:2:1:2,relu,gap,dense:6,relu",
       (3, 20))
CNN_2D = ("conv:6:3:2:1,relu,res(conv:6:3:1:1,relu),maxpool:2,flatten,dense:5,relu", (2, 11, 9))


def _cnn(arch=CNN, n: int = 37, classes: int = 3, seed: int = 1):
    spec, shape = arch
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += (0.8 * y).reshape(-1, *([1] * (len(shape) - 1)))
    bb = et.Backbone.from_layers(build_layers(parse_arch(spec, shape, classes), seed=seed)).fit_normalizer(x)
    return bb, x, y


def _mlp(n: int = 37):
    x, y = toy_task(n=n, d=7, classes=3)
    return small_backbone((7, 6, 5, 3), dtype=np.float32).fit_normalizer(x), x, y


def _run(bb, method: str, optimizer: str, x, y, fused: bool, epochs: int = 3, batch: int = 8, **opts):
    """Parameters and optimizer state after `epochs` epochs in C, fused or two-phase."""
    m = make_method(method, bb, seed=5, **opts)
    xp = bb.prepare(x).reshape(len(x), -1).astype(np.float32)
    m.begin_fit(xp)
    opt = make_optimizer(optimizer, m.params, 0.05 if optimizer != "adam" else 0.01, weight_decay=0.01)
    runner = CoreRunner(m, opt, xp, y, batch, fused=fused)
    assert runner.fused == fused
    m.params.grad[:] = 7.0  # the fused update never writes the gradient vector
    orders = np.stack([np.random.default_rng(e).permutation(len(x)).astype(np.int32) for e in range(epochs)])
    res = runner.run(orders)
    assert len(res) == epochs and not any(r.diverged for r in res)
    if fused:
        assert (m.params.grad == 7.0).all()
    state = [np.array(a, copy=True) for a in (getattr(opt, "v", None), getattr(opt, "m", None)) if a is not None]
    return m.params.flat.copy(), state, [r.loss for r in res], getattr(opt, "t", None)


def _same(bb, method, optimizer, x, y, **opts):
    p0, s0, l0, t0 = _run(bb, method, optimizer, x, y, False, **opts)
    p1, s1, l1, t1 = _run(bb, method, optimizer, x, y, True, **opts)
    assert np.isfinite(p0).all() and p0.size > 0
    assert l0 == l1 and t0 == t1
    np.testing.assert_array_equal(p1, p0)
    assert len(s0) == len(s1)
    for a, b in zip(s0, s1):
        np.testing.assert_array_equal(b, a)
    # it trained: the parameters moved from where a fresh method starts
    fresh = make_method(method, bb, seed=5, **opts).params.flat
    assert not np.array_equal(p0, fresh)


OPTIMIZERS = ["sgd", "momentum", "adam"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method,opts", [("lora-all", {"rank": 2, "alpha": 4.0, "train_last_bias": True}),
                                         ("ft-all", {}), ("ft-last", {}), ("lora-last", {"rank": 2}),
                                         ("sparse", {"scheme": "b1,w-1:1/2"})])
def test_fused_equals_two_phase_on_an_mlp(method, opts, optimizer):
    bb, x, y = _mlp()
    _same(bb, method, optimizer, x, y, **opts)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("arch,method,opts", [
    (CNN, "lora-all", {"rank": 2, "alpha": 3.0, "train_last_bias": True}),  # LoRA convolutions, depthwise, an add
    (CNN, "ft-all", {}),
    (CNN, "sparse", {"scheme": "w0:1/4,w1:1/2,b2"}),  # below the residual add
    (CNN_2D, "ft-all", {}),
    (CNN_2D, "sparse", {"scheme": "w1:1/2,w2:1/8,b0"}),
])
def test_fused_equals_two_phase_on_a_cnn(arch, method, opts, optimizer):
    bb, x, y = _cnn(arch)
    _same(bb, method, optimizer, x, y, **opts)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("qas", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fused_equals_two_phase_on_int8_sparse(kind, qas, optimizer):
    bb, x, y = _mlp() if kind == "mlp" else _cnn()
    q = quantize(bb, bb.prepare(x) if kind == "mlp" else x)
    scheme = "w1:1/2,b1" if kind == "mlp" else "w1:1/2,w2,b3"
    _same(q, "sparse", optimizer, x, y, scheme=scheme, qas=qas)


def test_which_methods_take_the_fused_update():
    bb, x, _ = _mlp()
    lib = core.load()
    for method, fused in [("ft-all", 1), ("lora-all", 1), ("sparse", 1), ("skip2-lora", 0), ("skip-lora", 0)]:
        model = CoreModel(make_method(method, bb), 8)
        assert lib.et_fused_update(ctypes.byref(model.bb), ctypes.byref(model.m)) == fused, method
    # tensors that do not cover the parameters exactly once: the two-phase path only
    m = make_method("ft-all", bb)
    model = CoreModel(m, 8)
    model.m.n_params += 1
    assert lib.et_fused_update(ctypes.byref(model.bb), ctypes.byref(model.m)) == 0


def test_c_refuses_a_null_gradient_where_it_cannot_fuse():
    bb, x, y = _mlp()
    xp = bb.prepare(x).astype(np.float32)
    m = make_method("skip2-lora", bb)
    m.begin_fit(xp)
    runner = CoreRunner(m, make_optimizer("sgd", m.params, 0.1), xp, y, 8, fused=True)
    assert not runner.fused  # the skip adapters keep the two-phase step
    model = CoreModel(make_method("ft-all", bb), 8)
    loss = ctypes.c_double()
    y32, ids = y.astype(np.int32), np.arange(4, dtype=np.int32)
    ws = np.zeros(model.workspace_bytes(), np.uint8)
    rc = model.lib.et_batch_gradient(ctypes.byref(model.bb), ctypes.byref(model.m), model.params.ctypes.data, None,
                                     xp.ctypes.data, y32.ctypes.data, ids.ctypes.data, 4, 8, ws.ctypes.data,
                                     ws.nbytes, ctypes.byref(loss))
    assert rc == -1  # et_batch_gradient fills grads: never NULL


@pytest.mark.parametrize("method,opts", [("ft-all", {}), ("lora-all", {"rank": 2}), ("sparse", {"scheme": "w0,b1"})])
def test_the_device_arena_has_no_gradient_vector_when_fused(method, opts):
    """The device program's arena: the gradients piece is gone; the workspace holds the largest
    trained tensor's gradient instead, so SGD's arena shrinks by about P floats."""
    bb, _, _ = _cnn()
    m = make_method(method, bb, **opts)
    P = m.params.flat.size
    plan = plan_device_memory(m, batch_size=8, max_samples=64, optimizer="sgd")
    assert plan.gradients == 0 and plan.params == P * 4
    assert plan.workspace == core_workspace_for(m, 8, pointer_bytes=4)
    if method != "sparse":  # the scratch holds the largest tensor (the sparse update's: its trained rows)
        assert plan.workspace > max(m.params[name].size for name in m.params) * 4
    skip = make_method("skip2-lora", bb)
    splan = plan_device_memory(skip, batch_size=8, max_samples=64, optimizer="sgd")
    assert splan.gradients == skip.params.flat.size * 4  # the skip adapters keep their gradient vector


# ------------------------------------------------------------------ in-place depthwise (frozen prefix)
def _dw_arch(padding: int) -> tuple[str, tuple[int, int]]:
    """A narrow conv, a wide pointwise one, a depthwise one (padding 1: its output has its input's
    shape, so it runs in place; padding 0: two columns narrower, it cannot), then narrow again."""
    return (f"conv:4:3:1:same,relu,conv:16:1,relu6,dwconv:3:1:{padding},relu6,conv:4:1,relu,"
            "conv:4:3:1:same,relu,gap,dense:5,relu", (3, 24))


def test_a_frozen_depthwise_layer_runs_in_place_as_numpy_does():
    """The sparse update's frozen layers before its first trained one: the depthwise layer runs in
    its input's buffer (one channel at a time through a temporary), and training gives the NumPy
    engine's losses and parameters."""
    bb, x, y = _cnn(_dw_arch(1))
    scheme = "w5,b2"  # layers with weights: 0 conv, 1 pointwise, 2 depthwise, 3 pointwise, 4 conv, 5 dense, 6 head
    runs = {}
    for engine in ("numpy", "c"):
        t = et.FineTuner(bb, "sparse", scheme=scheme, engine=engine, epochs=3, batch_size=7, lr=0.05,
                         seed=3).fit(x, y)
        assert t.history_.engine == engine
        runs[engine] = t
    np.testing.assert_allclose([e.loss for e in runs["c"].history_.epochs],
                               [e.loss for e in runs["numpy"].history_.epochs], rtol=1e-5)
    np.testing.assert_allclose(runs["c"].method.params.flat, runs["numpy"].method.params.flat, atol=1e-5)


def test_the_in_place_depthwise_layer_is_counted_by_the_workspace():
    """With padding 1 the depthwise layer's 16 x 24 output shares its input's buffer: the workspace
    is smaller than with padding 0 (16 x 22 values, but a buffer of its own), though every layer's
    output is at least as wide."""
    sizes = {}
    for padding in (1, 0):
        bb, _, _ = _cnn(_dw_arch(padding))
        sizes[padding] = core_workspace_for(make_method("sparse", bb, scheme="w5,b2"), 16)
    assert sizes[1] < sizes[0]


def test_int8_sparse_steps_a_dense_or_pointwise_weight_a_block_of_rows_at_a_time():
    """On an int8 network the sparse update computes the trained rows' gradient of a dense layer 4 rows
    at a time and of a pointwise one 16 at a time (the last block with the rows left over: 16 + 24 of
    40), each block stepped at once: the gradient scratch holds a block (24 x 8 floats), not the largest
    tensor (13 x 40); the float update keeps the whole tensor's. The same parameters as the two-phase
    step (above) and as an earlier build (benchmarks/int8_sparse_identity.py)."""
    spec = ("conv:8:3:1:same,relu,conv:40:1,relu,gap,dense:13,relu", (3, 20))
    bb, x, y = _cnn(spec)
    lib = core.load()

    def scratch(backbone) -> int:
        model = CoreModel(make_method("sparse", backbone, scheme="w1,w2"), 4)
        return lib.et_fused_scratch_bytes(ctypes.byref(model.bb), ctypes.byref(model.m))

    assert scratch(quantize(bb, x)) == 24 * 8 * 4
    assert scratch(bb) == -(-13 * 40 * 4 // 64) * 64
    _same(quantize(bb, x), "sparse", "adam", x, y, scheme="w1,w2,b0")
