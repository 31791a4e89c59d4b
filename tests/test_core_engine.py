"""The compiled engine against the NumPy reference: same losses, same predictions, same files."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.core.engine import CoreModel, CoreRunner, resolve_engine
from edgetune.errors import UsageError
from edgetune.memory import core_workspace_bytes, core_workspace_for
from edgetune.methods import make_method

from .conftest import small_backbone, toy_task

pytestmark = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

METHODS = ["ft-all", "ft-last", "ft-bias", "lora-all", "lora-last", "skip-lora", "skip2-lora", "sparse"]
ACTS = ["relu", "leaky_relu", "tanh", "sigmoid", "identity"]


def _run(bb, method, x, y, engine, epochs=4, **kw):
    opts = dict(epochs=epochs, batch_size=7, lr=0.05, seed=3)
    opts.update(kw)
    t = et.FineTuner(bb, method, engine=engine, **opts).fit(x, y)
    assert t.history_.engine == engine
    return t


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("depth,rank", [(2, 1), (3, 2), (4, 1)])
def test_c_equals_numpy(method, act, depth, rank):
    if method == "sparse" and act not in ("relu", "identity"):
        pytest.skip("sparse update supports ReLU and identity")
    sizes = (9, 12, 10, 11, 3)[: depth] + (3,)
    bb = small_backbone(sizes=sizes, activation=act, dtype=np.float32)
    x, y = toy_task(n=45, d=sizes[0], classes=3, shift=0.7)
    kw = {} if method.startswith("ft") or method == "sparse" else {"rank": rank, "alpha": 2.0 * rank}
    a = _run(bb, method, x, y, "numpy", **kw)
    b = _run(bb, method, x, y, "c", **kw)
    la = np.array([e.loss for e in a.history_.epochs])
    lb = np.array([e.loss for e in b.history_.epochs])
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    assert la[-1] < la[0]  # it learned
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("method", ["lora-all", "skip2-lora", "ft-all"])
def test_optimizers_match(optimizer, method):
    bb = small_backbone(sizes=(8, 16, 3), dtype=np.float32)
    x, y = toy_task(n=40, d=8, classes=3)
    kw = dict(optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05, weight_decay=0.01, train_last_bias=True) \
        if method != "ft-all" else dict(optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05, weight_decay=0.01)
    a = _run(bb, method, x, y, "numpy", epochs=5, **kw)
    b = _run(bb, method, x, y, "c", epochs=5, **kw)
    np.testing.assert_allclose([e.loss for e in b.history_.epochs], [e.loss for e in a.history_.epochs], rtol=1e-5)
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


def test_skip2_equals_skip_exactly_in_c():
    bb = small_backbone(sizes=(10, 16, 12, 4), dtype=np.float32)
    x, y = toy_task(n=53, d=10, classes=4)
    a = _run(bb, "skip-lora", x, y, "c", epochs=6, rank=2)
    for fill in ("eager", "lazy"):
        b = _run(bb, "skip2-lora", x, y, "c", epochs=6, rank=2, cache_fill=fill)
        assert [e.loss for e in a.history_.epochs] == [e.loss for e in b.history_.epochs]
        np.testing.assert_array_equal(a.method.params.flat, b.method.params.flat)


def test_partial_cache_matches_numpy_and_counts():
    bb = small_backbone(sizes=(10, 16, 12, 3), dtype=np.float32)
    x, y = toy_task(n=50, d=10, classes=3)
    row = (10 + 16 + 12 + 3) * 4
    kw = dict(cache_budget=20 * row, cache_overflow="partial", epochs=3)
    a = _run(bb, "skip2-lora", x, y, "numpy", **kw)
    b = _run(bb, "skip2-lora", x, y, "c", **kw)
    np.testing.assert_allclose([e.loss for e in b.history_.epochs], [e.loss for e in a.history_.epochs], rtol=1e-5)
    sa, sb = a.history_.cache, b.history_.cache
    assert sb["cache_capacity"] == 20 and sb["cache_filled"] == 20
    assert (sb["cache_hits"], sb["cache_misses"]) == (sa["cache_hits"], sa["cache_misses"])
    assert sb["cache_misses"] == 20 + 3 * 30  # rows past the budget are recomputed every epoch


def test_divergence_restores_and_raises():
    from edgetune.train import TrainingDiverged

    bb = small_backbone(sizes=(6, 8, 2), dtype=np.float32)
    x, y = toy_task(n=30, d=6, classes=2)
    t = et.FineTuner(bb, "lora-all", epochs=5, lr=1e30, engine="c")
    before = t.method.params.flat.copy()
    with pytest.raises(TrainingDiverged):
        t.fit(x * 1e6, y)
    assert np.all(np.isfinite(t.method.params.flat))
    assert t.method.params.flat.shape == before.shape


def _pack(m) -> int:
    """The largest weight the layer-wise backward pass transposes (what core_workspace_bytes takes)."""
    spec, sizes = m.core_spec(), m.backbone.sizes
    return max([0] + [sizes[k] * sizes[k + 1] for k in range(spec.first + 1, len(sizes) - 1)
                      if spec.kind == "layerwise" and spec.weight[k] >= 0])


def _fused_piece(m) -> int:
    """The fused update's gradient scratch in the workspace: the largest trained tensor, 64-byte
    rounded (the tensors' sizes are the gaps between their offsets); 0 for the skip adapters."""
    spec = m.core_spec()
    if spec.kind == "skip":
        return 0
    offs = sorted({o for lst in (spec.weight, spec.bias, spec.lora_a, spec.lora_b) if lst for o in lst if o >= 0}
                  | ({spec.bias_delta} if spec.bias_delta >= 0 else set()))
    ends = offs[1:] + [m.params.flat.size]
    return -(-4 * max(e - o for o, e in zip(offs, ends)) // 64) * 64


def test_the_planner_asks_c_for_the_workspace_the_trainer_allocates():
    """core_workspace_bytes (sizes only, no weights) is C's figure for the structs the trainer runs on,
    but the fused update's gradient scratch (a sizes-only struct has no tensors)."""
    from edgetune.optim import make_optimizer
    from edgetune.quant.int8 import quantize

    x, y = toy_task(n=20, d=9, classes=3)
    for sizes in [(9, 12, 3), (9, 20, 10, 3), (9, 5, 7, 6, 3)]:
        bb = small_backbone(sizes=sizes, dtype=np.float32)
        for int8 in (False, True):
            b = quantize(bb, x) if int8 else bb
            for method in METHODS:
                if int8 and method.startswith(("ft-", "lora-")):
                    continue
                for batch in (1, 7, 20):
                    m = make_method(method, b, rank=2 if "lora" in method else 1)
                    runner = CoreRunner(m, make_optimizer("sgd", m.params, 0.1), b.prepare(x), y, batch)
                    spec = m.core_spec()
                    planned = core_workspace_bytes(sizes, spec.kind, batch=batch, n_params=m.params.flat.size,
                                                   rank=spec.rank, int8=int8, first=spec.first, pack=_pack(m))
                    assert runner.ws.nbytes == planned + _fused_piece(m) == core_workspace_for(m, batch), \
                        (sizes, method, batch)
                    # a 32-bit target differs only by pointers: the batch's row pointers (skip methods)
                    # and the per-layer tables (3n + 1 int32 rounded to a pointer, then 3n + 1 pointers)
                    small = core_workspace_bytes(sizes, spec.kind, batch=batch, n_params=m.params.flat.size,
                                                 rank=spec.rank, int8=int8, first=spec.first, pack=_pack(m),
                                                 pointer_bytes=4)
                    assert small + _fused_piece(m) == core_workspace_for(m, batch, pointer_bytes=4)
                    n = len(sizes) - 1

                    def tables(p: int) -> int:
                        return -(-(-(-(3 * n + 1) * 4 // p) * p + (3 * n + 1) * p) // 64) * 64

                    assert (planned - small) == tables(8) - tables(4) + (0 if spec.kind != "skip" else
                                                 -(-8 * batch // 64) * 64 - -(-4 * batch // 64) * 64)


@pytest.mark.parametrize("sizes,kw,message", [
    ([5, 2 ** 40, 2], {}, "layer width 1"), ([5, 0, 2], {}, "layer width 1"), ([5], {}, f"1..{core.MAX_LAYERS} layers"),
    (list(range(2, core.MAX_LAYERS + 4)), {}, f"1..{core.MAX_LAYERS} layers"), ([5, 8, 2], {"batch": 2 ** 32 + 4}, "batch"),
    ([5, 8, 2], {"pointer_bytes": 2}, "pointer_bytes"), ([5, 8, 2], {"first": 2}, "first"),
    ([5, 8, 2], {"pack": 7, "kind": "layerwise"}, "pack 7"), ([5, 8, 2], {"kind": "conv"}, "unknown method kind")])
def test_the_planner_refuses_what_c_cannot_take(sizes, kw, message):
    """Every value is checked before it reaches a ctypes int32 (which would wrap silently)."""
    kw = {"kind": "skip", "batch": 4, "n_params": 10, **kw}
    with pytest.raises(UsageError, match=message):
        core_workspace_bytes(sizes, kw.pop("kind"), **kw)


def test_the_device_arena_is_what_the_device_needs():
    """plan_device_memory's arena is exactly what et_device_init accepts: not one byte less."""
    from edgetune.memory import device_model_desc, plan_device_memory

    lib = core.load()
    lib.et_device_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.c_uint32]
    lib.et_device_init.restype = ctypes.c_int32
    bb = small_backbone(sizes=(9, 20, 10, 3), dtype=np.float32)
    for method, cache in [("skip2-lora", "float32"), ("skip-lora", None), ("lora-all", None), ("ft-last", None),
                          ("sparse", None)]:
        m = make_method(method, bb)
        for optimizer in ("sgd", "momentum", "adam"):
            for store, capacity in ((True, 50), (False, 17)):
                kw = dict(optimizer=optimizer, cache=cache, cache_capacity=capacity, max_samples=50,
                          store_samples=store)
                plan = plan_device_memory(m, batch_size=7, pointer_bytes=ctypes.sizeof(ctypes.c_void_p), **kw)
                model = CoreModel(m, 7)
                desc = device_model_desc(model, **{**kw, "cache_capacity": capacity if cache else 0})
                assert plan.arena == lib.et_device_arena_bytes(ctypes.byref(desc))
                assert plan.workspace == model.workspace_bytes()
                assert plan.params == 4 * m.params.flat.size  # the fused update keeps no gradient vector:
                assert plan.gradients == (plan.params if method.startswith("skip") else 0)
                assert plan.optimizer_state == {"sgd": 0, "momentum": 1, "adam": 2}[optimizer] * plan.params
                assert plan.samples == (50 * 4 * 9 + 50 * 4 if store else 0) and plan.order == 50 * 4
                assert 0 <= plan.alignment < 64 * 12
                device = np.zeros(4096, np.uint8)
                arena = np.zeros(plan.arena + 64, np.uint8)
                base = arena.ctypes.data + (-arena.ctypes.data) % 64  # aligned: no slack taken at the start
                assert lib.et_device_init(device.ctypes.data, ctypes.addressof(desc), base, plan.arena - 1, 1) == -2
                assert lib.et_device_init(device.ctypes.data, ctypes.addressof(desc), base, plan.arena, 1) == 0


def test_a_wrong_field_offset_refuses_the_library(monkeypatch):
    lib = core.load()
    core.check_layout(lib, core.STRUCTS, core.ENUMS)  # the real binding agrees with C

    class Method(ctypes.Structure):  # `scale` widened to a double: the fields after it move
        _fields_ = [(n, ctypes.c_double if n == "scale" else t) for n, t in core.Method._fields_]

    bad = tuple(Method if s is core.Method else s for s in core.STRUCTS)
    with pytest.raises(OSError, match=r"struct Method: field 'first' is at offset 12 in C, 16 in Python"):
        core.check_layout(lib, bad, core.ENUMS)

    class Layer(ctypes.Structure):  # a field missing
        _fields_ = [f for f in core.Layer._fields_ if f[0] != "groups"]

    bad = tuple(Layer if s is core.Layer else s for s in core.STRUCTS)
    with pytest.raises(OSError, match=r"struct Layer: field 13 is 'groups' in C, 'activation' in Python"):
        core.check_layout(lib, bad, core.ENUMS)
    enums = {**core.ENUMS, "activation": ("relu", "tanh", "leaky_relu", "sigmoid", "identity")}
    with pytest.raises(OSError, match=r"enum activation: value 1 is 'leaky_relu' in C, 'tanh' in Python"):
        core.check_layout(lib, core.STRUCTS, enums)
    with pytest.raises(OSError, match=r"enum layer: value 1 is 'conv1d' in C, 'conv2d' in Python"):
        core.check_layout(lib, core.STRUCTS, {**core.ENUMS, "layer": ("dense", "conv2d")})
    with pytest.raises(OSError, match=r"enum layer: value 10 \('lstm'\) is not in C"):
        core.check_layout(lib, core.STRUCTS, {**core.ENUMS, "layer": core.ENUMS["layer"] + ("lstm",)})
    with pytest.raises(OSError, match=r"enum layer: value 9 \('add'\) is in C, not in Python"):
        core.check_layout(lib, core.STRUCTS, {**core.ENUMS, "layer": core.ENUMS["layer"][:-1]})
    # at load: the library is refused, with the struct and field named
    monkeypatch.setattr(core, "STRUCTS", tuple(Method if s is core.Method else s for s in core.STRUCTS))
    monkeypatch.setattr(core, "_loaded", False)
    monkeypatch.setattr(core, "_lib", None)
    monkeypatch.setattr(core, "_error", None)
    assert core.load() is None and not core.available()
    assert "struct Method: field 'first' is at offset 12 in C, 16 in Python" in core.unavailable_reason()


def test_an_unknown_layer_kind_is_refused_by_c():
    from edgetune.core.engine import CoreError

    lib = core.load()
    bb = small_backbone(sizes=(6, 8, 3), dtype=np.float32)
    x, y = toy_task(n=12, d=6, classes=3)
    model = CoreModel(make_method("lora-all", bb), 4)
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == 0
    model.bb.layers[1].kind = len(core.ENUMS["layer"])  # one past the last kind C builds
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == -3  # ET_ERR_UNSUPPORTED
    with pytest.raises(CoreError, match="refused"):
        model.batch_gradient(bb.prepare(x).astype(np.float32), y.astype(np.int32), np.arange(3, dtype=np.int32))
    model.bb.layers[1].kind = 0
    model.bb.layers[1].in_c = 9  # layer 1 no longer reads layer 0's 8 outputs
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == -1
    model.bb.layers[1].in_c = 8
    model.bb.layers[1].kind = core.ENUMS["layer"].index("gap")  # a known kind whose shapes do not fit it
    assert lib.et_backbone_check(ctypes.byref(model.bb)) == -1


def test_engine_selection(monkeypatch):
    bb = small_backbone(sizes=(6, 8, 2), dtype=np.float32)
    m = make_method("skip2-lora", bb)
    assert resolve_engine("auto", m) == "c"
    assert resolve_engine("numpy", m) == "numpy"
    monkeypatch.setenv("EDGETUNE_ENGINE", "numpy")
    assert resolve_engine(None, m) == "numpy"
    with pytest.raises(UsageError, match="unknown engine"):
        resolve_engine("gpu", m)
    m64 = make_method("skip2-lora", small_backbone(sizes=(6, 8, 2), dtype=np.float64))
    assert resolve_engine("auto", m64) == "numpy"  # float64 stays on the reference engine
    with pytest.raises(UsageError, match="float32"):
        resolve_engine("c", m64)
    with pytest.raises(UsageError, match="unknown engine"):
        et.FineTuner(bb, "skip2-lora", engine="cuda")


def test_bad_arrays_are_refused_before_c_runs():
    bb = small_backbone(sizes=(6, 8, 3), dtype=np.float32)
    m = make_method("lora-all", bb)
    x, y = toy_task(n=12, d=6, classes=3)
    x = bb.prepare(x)
    from edgetune.optim import make_optimizer
    opt = make_optimizer("sgd", m.params, 0.1)
    m.begin_fit(x)
    r = CoreRunner(m, opt, x, y, 4)
    good = np.stack([np.arange(12, dtype=np.int32)])
    assert len(r.run(good)) == 1
    for bad, msg in [(good.astype(np.int64), "dtype"), (good[:, :6], "shape"), (good + 12, "0..11"),
                     (good - 1, "0..11"), (np.asfortranarray(np.stack([good[0], good[0]])), "contiguous"),
                     (good[0], "2-D"), ([list(range(12))], "2-D")]:
        with pytest.raises(UsageError, match=msg):
            r.run(bad)
    strided = np.zeros((1, 24), np.int32)[:, ::2]
    with pytest.raises(UsageError, match="contiguous"):
        r.run(strided)
    model = CoreModel(m, 4)
    for bad_x, msg in [(x.astype(np.float64), "dtype"), (x[:, :5], "shape"), (x[0], "2-D"), (np.asfortranarray(x), "contiguous")]:
        with pytest.raises(UsageError, match=msg):
            model.predict(bad_x)
    with pytest.raises(UsageError, match="labels"):
        CoreRunner(m, opt, x, np.full(12, 7), 4)
    with pytest.raises(UsageError, match="batch_size"):
        CoreModel(m, 0)
    with pytest.raises(UsageError, match="batch_size"):
        CoreModel(m, 10 ** 12)
    with pytest.raises(UsageError, match="ids"):
        model.batch_gradient(x, y.astype(np.int32), np.arange(5, dtype=np.int32))  # more than the batch
    with pytest.raises(UsageError, match="ids"):
        model.batch_gradient(x, y.astype(np.int32), np.array([0, 99], np.int32))
    # A tensor offset past the parameter vector is caught in Python.
    spec = m.core_spec()
    spec.lora_a[0] = m.params.flat.size - 1
    m.core_spec = lambda: spec
    with pytest.raises(UsageError, match="runs past"):
        CoreModel(m, 4)
    m.end_fit()


def test_c_gradient_matches_finite_differences():
    """The C engine's batch gradient against central differences of the float64 NumPy model."""
    from edgetune.train import evaluate

    for method in METHODS:
        bb = small_backbone(sizes=(5, 7, 6, 3), dtype=np.float32, seed=1)
        x, y = toy_task(n=6, d=5, classes=3, seed=2)
        m = make_method(method, bb, seed=4, rank=2 if "lora" in method else 1)
        m.params.flat[...] += np.random.default_rng(0).normal(0, 0.3, m.params.flat.size).astype(np.float32) \
            * m.params.trainable_mask()
        xp = bb.prepare(x)
        model = CoreModel(m, 6)
        loss = model.batch_gradient(xp, y.astype(np.int32), np.arange(6, dtype=np.int32))
        g = m.params.grad.copy()
        m64 = make_method(method, bb.astype(np.float64), seed=4, rank=2 if "lora" in method else 1)
        m64.params.flat[...] = m.params.flat
        x64 = xp.astype(np.float64)
        assert abs(loss - evaluate(m64, x64, y)[0]) < 1e-5
        eps = 1e-5
        mask = m.params.trainable_mask()
        for i in np.flatnonzero(mask)[:: max(1, mask.sum() // 25)]:
            p0 = m64.params.flat[i]
            m64.params.flat[i] = p0 + eps
            lp = evaluate(m64, x64, y)[0]
            m64.params.flat[i] = p0 - eps
            lm = evaluate(m64, x64, y)[0]
            m64.params.flat[i] = p0
            fd = (lp - lm) / (2 * eps)
            assert abs(g[i] - fd) <= 2e-4 + 1e-3 * abs(fd), (method, i, g[i], fd)


def test_int8_forward_is_bit_identical():
    from edgetune.quant.int8 import int8_forward_taps, quantize

    bb = small_backbone(sizes=(12, 20, 16, 4), dtype=np.float32, seed=3)
    x, _ = toy_task(n=37, d=12, classes=4, seed=5)
    q = quantize(bb, x)
    xp = q.prepare(x)
    rows, logits = int8_forward_taps(q, xp)
    m = make_method("skip-lora", q)
    model = CoreModel(m, 8)
    lib = core.load()
    taps = np.empty_like(rows)
    out = np.empty_like(logits)
    ws = np.empty(lib.et_int8_workspace_size(ctypes.byref(model.bb), len(xp)), np.uint8)
    rc = lib.et_int8_forward_taps(ctypes.byref(model.bb), xp.ctypes.data, len(xp), taps.ctypes.data,
                                  out.ctypes.data, ws.ctypes.data, ws.nbytes)
    assert rc == 0
    np.testing.assert_array_equal(taps, rows)
    np.testing.assert_array_equal(out, logits)


@pytest.mark.parametrize("method,kw", [("skip2-lora", {}), ("skip-lora", {}), ("sparse", {"scheme": "b2,w1:1/2"}),
                                       ("sparse", {"scheme": "b1,w0:1/4,w2", "qas": False})])
def test_int8_backbones_match_numpy(method, kw):
    from edgetune.quant.cache import attach_int8_cache
    from edgetune.quant.int8 import quantize

    bb = small_backbone(sizes=(12, 20, 16, 3), dtype=np.float32, seed=3)
    x, y = toy_task(n=41, d=12, classes=3, seed=5)
    q = quantize(bb, x)
    res = []
    for engine in ("numpy", "c"):
        t = et.FineTuner(q, method, epochs=4, batch_size=6, lr=0.05, engine=engine, **kw)
        if method == "skip2-lora":
            attach_int8_cache(t.method, len(x))
        t.fit(x, y)
        res.append(t)
    np.testing.assert_allclose([e.loss for e in res[1].history_.epochs], [e.loss for e in res[0].history_.epochs],
                               rtol=1e-5)
    np.testing.assert_array_equal(res[0].predict(x), res[1].predict(x))


def test_checkpoint_resume_is_bit_identical_in_c(tmp_path):
    bb = small_backbone(sizes=(8, 12, 3), dtype=np.float32)
    x, y = toy_task(n=30, d=8, classes=3)
    full = et.FineTuner(bb, "skip2-lora", epochs=6, engine="c").fit(x, y)
    ck = tmp_path / "run.ckpt"
    part = et.FineTuner(bb, "skip2-lora", epochs=6, engine="c")
    part.fit(x, y, checkpoint=ck, callback=lambda rec: rec.epoch == 3)
    again = et.FineTuner(bb, "skip2-lora", epochs=6, engine="c").fit(x, y, checkpoint=ck)
    np.testing.assert_array_equal(again.method.params.flat, full.method.params.flat)
