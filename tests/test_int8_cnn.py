"""int8 convolutional backbones: every layer kind in int8, NumPy and the compiled engine bit for
bit, within tolerance of the float model, files, the quantize command on a real CNN."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import edgetune as et
from edgetune import core
from edgetune.cli import main
from edgetune.errors import ModelFileError, UsageError
from edgetune.nn.arch import build_layers, parse_arch
from edgetune.nn.layers import Layer, LayerSpec, QuantParams, round_div
from edgetune.quant import dequantize, quantize
from edgetune.quant.int8 import clamp_range, int8_forward_taps

needs_c = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")


def _backbone(specs, seed=1, n=60):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *specs[0].in_shape)).astype(np.float32)
    x[:, 0] += 0.5
    bb = et.Backbone.from_layers(build_layers(specs, seed=seed)).fit_normalizer(x)
    return bb, x


def _arch(arch, shape, classes=3, seed=1, n=60):
    return _backbone(parse_arch(arch, shape, classes), seed, n)


def _both(q, x):
    """int8 rows and logits from NumPy and (when built) from C: they must be equal bit for bit."""
    xp = q.prepare(x)
    rows, logits = int8_forward_taps(q, xp)
    if core.available():
        from edgetune.quant.native import native_forward_taps
        rows_c, logits_c = native_forward_taps(q, xp)
        np.testing.assert_array_equal(rows_c, rows)
        np.testing.assert_array_equal(logits_c, logits)
    return rows, logits


def _close_to_float(bb, q, x, rtol=0.08):
    xp = bb.prepare(x)
    f, i = bb.forward(xp), q.forward(xp)
    assert np.abs(f - i).max() <= rtol * np.abs(f).max() + 1e-6, (np.abs(f - i).max(), np.abs(f).max())
    return f, i


# ---------------------------------------------------------------------------- every kind, NumPy == C
ARCHS = {
    "1d-all-kinds": ("conv:8:5:2:2,relu,maxpool:2,res(conv:8:3:1:same,relu,dwconv:3:1:1,relu6),avgpool:3:2,"
                     "conv:6:1,relu,gap,dense:5,relu", (3, 33)),
    "1d-flatten": ("conv:4:5:2:2,relu,avgpool:3:1,conv:4:3,relu6,flatten,dense:5,relu", (2, 17)),
    "2d": ("conv:6:3:1:1,relu,maxpool:2,conv:6:3:2:1:3,relu6,res(conv:6:1,relu),avgpool:2:1,gap,dense:4", (2, 9, 8)),
    "2d-flatten": ("conv:4:3x2:2x1:1x0,relu,maxpool:2x1:1,flatten,dense:7,relu", (1, 7, 6)),
    "one-channel-odd": ("conv:1:3,relu,maxpool:3,conv:3:1,gap,dense:3", (1, 13)),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_kind_numpy_and_c_bit_identical_and_close_to_float(name):
    arch, shape = ARCHS[name]
    bb, x = _arch(arch, shape)
    q = quantize(bb, x)
    assert q.is_int8 and q.specs == bb.specs
    assert all(layer.quant is not None for layer in q.layers)
    rows, logits = _both(q, x)
    assert rows.shape == (len(x), sum(bb.in_widths))
    np.testing.assert_array_equal(logits, q.forward(q.prepare(x)))
    f, i = _close_to_float(bb, q, x)
    assert np.mean(f.argmax(1) == i.argmax(1)) >= 0.9
    # the two NumPy kernels (exact float products, integer matmul) agree
    q32 = q.copy()
    q32.int8_kernel = "int32"
    np.testing.assert_array_equal(q32.forward(q.prepare(x)), i)


@st.composite
def _one_layer_case(draw):
    """A CNN around one drawn conv or pooling layer: 1-D or 2-D, odd lengths, one channel,
    groups (depthwise and grouped), stride, padding."""
    rank = draw(st.sampled_from([1, 2]))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    sp = tuple(draw(st.integers(1, 9)) for _ in range(rank))
    kind = draw(st.sampled_from(["conv", "max", "avg"]))
    k = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    s = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    if kind == "conv":
        p = tuple(draw(st.integers(0, 2)) for _ in range(rank))
        g = draw(st.sampled_from([d for d in (1, 2, c) if c % d == 0]))
        o = g * draw(st.integers(1, 3))
        act = draw(st.sampled_from(["identity", "relu", "relu6"]))
        make = lambda: LayerSpec.conv((c, *sp), o, k, stride=s, padding=p, groups=g, activation=act)  # noqa: E731
    else:
        p = tuple(draw(st.integers(0, kk // 2)) for kk in k)
        make = lambda: LayerSpec.pool(kind, (c, *sp), k, s, p)  # noqa: E731
    return rank, c, sp, kind, k, p, make, draw(st.integers(0, 2 ** 16))


@given(_one_layer_case())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_one_drawn_layer_numpy_equals_c(case):
    rank, c, sp, kind, k, p, make, seed = case
    if any(n + 2 * pp < kk for n, kk, pp in zip(sp, k, p)):
        with pytest.raises(UsageError, match="longer than the padded input"):
            make()
        return
    spec = make()
    first = LayerSpec.conv((c, *sp), c, 1, activation="relu")
    specs = [first, spec]
    tail = (LayerSpec.flatten(spec.out_shape) if seed % 2 else LayerSpec.gap(spec.out_shape))
    specs += [tail, LayerSpec.dense(tail.out_shape[0], 3)]
    bb, x = _backbone(specs, seed=seed % 97, n=23)
    q = quantize(bb, x)
    _both(q, x)


def test_a_wide_convolution_multiplies_in_float64_exactly():
    """fan_in * 128 * 127 >= 2**24: the default kernel multiplies in float64; still the integers."""
    specs = [LayerSpec.conv((70, 20), 4, 15, activation="relu"), LayerSpec.gap((4, 6)), LayerSpec.dense(4, 3)]
    bb, x = _backbone(specs, n=20)
    q = quantize(bb, x)
    _both(q, x)
    q32 = q.copy()
    q32.int8_kernel = "int32"
    xp = q.prepare(x)
    np.testing.assert_array_equal(int8_forward_taps(q32, xp)[0], int8_forward_taps(q, xp)[0])


def test_kernel_longer_than_input_refused():
    with pytest.raises(UsageError, match="longer than the padded input"):
        LayerSpec.conv((2, 4), 3, 5)
    with pytest.raises(UsageError, match="longer than the padded input"):
        LayerSpec.pool("max", (2, 3, 3), 4)


# ---------------------------------------------------------------------------- the integer rules
def test_int8_conv_accumulator_equals_a_direct_loop():
    """The accumulator of a padded, strided, grouped conv1d against Python integers."""
    bb, x = _arch("conv:4:3:2:1:2,relu,gap,dense:3", (4, 9))
    q = quantize(bb, x)
    xp = q.prepare(x[:3])
    qin = np.clip(np.rint(xp / np.float32(q.layers[0].quant.input_scale)), -127, 127).astype(np.int64)
    acc = q.layers[0].spec.ops.int8_accumulate(q.layers[0].spec, qin.astype(np.int8), q.layers[0].quant, "blas")
    w, b = q.layers[0].quant.qweight.astype(np.int64), q.layers[0].quant.qbias.astype(np.int64)
    xin = qin.reshape(3, 4, 9)
    want = np.zeros((3, 4, 5), np.int64)
    for n in range(3):
        for o in range(4):
            g = o // 2
            for t in range(5):
                s = int(b[o])
                for ci in range(2):
                    for kk in range(3):
                        i = 2 * t - 1 + kk
                        if 0 <= i < 9:  # the padding reads the zero point, 0
                            s += int(xin[n, g * 2 + ci, i]) * int(w[o, ci, kk])
                want[n, o, t] = s
    np.testing.assert_array_equal(acc.reshape(3, 4, 5), want)


def test_average_rounds_half_away_from_zero_and_relu6_clamps():
    np.testing.assert_array_equal(round_div(np.array([3, -3, 5, -5, 1, -1, 6, -6]), 2), [2, -2, 3, -3, 1, -1, 3, -3])
    np.testing.assert_array_equal(round_div(np.array([5, -5, 6, -6]), 4), [1, -1, 2, -2])
    spec = LayerSpec.pool("avg", (1, 4), 2)
    got = spec.ops.int8_accumulate(spec, np.array([[1, 2, -1, -2]], np.int8), None, "blas")
    np.testing.assert_array_equal(got, [[2, -2]])
    spec = LayerSpec.pool("max", (1, 5), 3, 2, 1)  # padding never wins, even over -127
    got = spec.ops.int8_accumulate(spec, np.array([[-127, -100, -127, -127, -127]], np.int8), None, "blas")
    np.testing.assert_array_equal(got, [[-100, -100, -127]])
    assert clamp_range("relu6", 6 / 127) == (0, 127)
    assert clamp_range("relu6", 0.1) == (0, 60)
    assert clamp_range("identity", 1.0) == (-127, 127)
    with pytest.raises(UsageError, match="tanh"):
        clamp_range("tanh", 1.0)


def test_add_rescales_both_inputs_to_its_output_scale():
    bb, x = _arch("conv:4:3:1:same,relu,res(conv:4:3:1:same),gap,dense:3", (2, 11))
    q = quantize(bb, x)
    add = next(k for k, s in enumerate(q.specs) if s.kind == "add")
    mult, shift = q.layers[add].quant.requant
    assert mult.shape == shift.shape == (2,) and shift[0] == shift[1]
    s_out = q.layers[add + 1].quant.input_scale
    for m, src in zip(mult, (add, q.specs[add].source)):
        assert abs(m * 2.0 ** -shift[0] - q.layers[src].quant.input_scale / s_out) <= 2.0 ** -shift[0]
    _both(q, x)


def test_pooling_keeps_its_input_scale():
    bb, x = _arch("conv:4:3,relu,maxpool:2,avgpool:2,conv:3:1,relu,flatten,dense:3", (2, 14))
    q = quantize(bb, x)
    s = [layer.quant.input_scale for layer in q.layers]
    assert s[1] == s[2] == s[3] and s[4] == s[5]
    layers = [Layer(layer.spec, quant=QuantParams(layer.quant.qweight, layer.quant.wscale, layer.quant.qbias,
                                                  layer.quant.input_scale * (1.5 if k == 2 else 1.0)))
              for k, layer in enumerate(q.layers)]
    with pytest.raises(UsageError, match="keeps its input's scale"):
        et.Backbone.from_layers(layers)


def test_a_percentile_narrows_the_scales_on_a_bounded_sample(monkeypatch):
    """Below 100 each layer's range is this percentile of its inputs, taken on at most
    PERCENTILE_VALUES of them (every j-th): here forced small, so the strided sample is used."""
    import edgetune.quant.int8 as q8

    bb, x = _arch("conv:4:3:1:same,relu,maxpool:2,conv:4:3,relu,gap,dense:3", (2, 16), n=50)
    full = q8.calibrate_layers(bb, x)
    p99 = q8.calibrate_layers(bb, x, percentile=99.0)
    assert np.all(p99 <= full) and np.any(p99 < full)
    assert p99[1] == p99[2] and full[1] == full[2]  # after max pooling: the scale before it
    monkeypatch.setattr(q8, "PERCENTILE_VALUES", 64)
    sampled = q8.calibrate_layers(bb, x, percentile=99.0)
    assert np.all(sampled > 0) and not np.array_equal(sampled, p99)
    q = quantize(bb, x, percentile=99.0)
    np.testing.assert_array_equal(np.float32([layer.quant.input_scale for layer in q.layers]), sampled)
    _both(q, x)
    with pytest.raises(UsageError, match="percentile"):
        q8.calibrate_layers(bb, x, percentile=40.0)


def test_refusals_name_the_reason():
    bb, x = _arch("conv:4:3,tanh,gap,dense:3", (2, 9))
    with pytest.raises(UsageError, match="tanh"):
        quantize(bb, x)
    specs = [LayerSpec.conv((2, 9), 3, 9), LayerSpec.gap((3, 1))]  # the logits from a gap
    bb, x = _backbone(specs)
    with pytest.raises(UsageError, match="last layer with weights"):
        quantize(bb, x)
    bb, x = _arch("conv:4:3,relu,gap,dense:3", (2, 9))
    q = quantize(bb, x)
    with pytest.raises(UsageError, match="already int8"):
        quantize(q, x)
    layers = [Layer(layer.spec, quant=None if not layer.spec.has_params else layer.quant) for layer in q.layers]
    with pytest.raises(UsageError, match="no int8 parameters"):
        et.Backbone.from_layers(layers)


@needs_c
def test_c_refuses_what_python_did_not_check():
    """The compiled pass checks the int8 tensors itself: a broken requantiser is refused."""
    import ctypes
    from edgetune.quant.native import int8_c_backbone

    bb, x = _arch("conv:4:3,relu,res(conv:4:1),gap,dense:3", (2, 9))
    q = quantize(bb, x)
    lib = core.load()
    keep: list = []
    s = int8_c_backbone(q, keep)
    assert lib.et_int8_workspace_size(ctypes.byref(s), 4) > 0
    add = next(k for k, sp in enumerate(q.specs) if sp.kind == "add")
    bad = np.array([1, 1], np.int32)
    s.layers[add].rq_shift = bad.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    bad[1] = 2  # two shifts that differ
    assert lib.et_int8_workspace_size(ctypes.byref(s), 4) == 0
    s = int8_c_backbone(q, keep)
    s.layers[0].act_scale = 0.0
    assert lib.et_int8_workspace_size(ctypes.byref(s), 4) == 0
    s = int8_c_backbone(q, keep)
    s.layers[q.n_layers - 1].kind = 7  # training refuses int8 CNNs; the int8 pass a wrong shape
    assert lib.et_int8_workspace_size(ctypes.byref(s), 4) == 0


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_and_a_missing_scale(tmp_path):
    arch, shape = ARCHS["1d-all-kinds"]
    bb, x = _arch(arch, shape)
    q = quantize(bb, x)
    q.save(tmp_path / "q")
    r = et.Backbone.load(tmp_path / "q")
    assert r.is_int8 and r.specs == q.specs and r.digest() == q.digest()
    xp = q.prepare(x)
    np.testing.assert_array_equal(r.forward(xp), q.forward(xp))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization" in cfg
    from edgetune.safetensors import dumps, loads
    tensors, _ = loads((tmp_path / "q" / "model.safetensors").read_bytes(), "m")
    pool = next(k for k, s in enumerate(q.specs) if s.kind == "maxpool1d")
    assert f"layers.{pool}.input_scale" in tensors and f"layers.{pool}.weight" not in tensors
    del tensors[f"layers.{pool}.input_scale"]
    blob = dumps(tensors, {"format": "edgetune-backbone"})
    import hashlib
    cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (tmp_path / "q" / "model.safetensors").write_bytes(blob)
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="input_scale"):
        et.Backbone.load(tmp_path / "q")
    # the float model the int8 one approximates
    d = dequantize(q)
    assert not d.is_int8 and d.specs == q.specs
    np.testing.assert_allclose(d.forward(xp), bb.forward(xp), atol=0.1 * np.abs(bb.forward(xp)).max())


# ---------------------------------------------------------------------------- adapters on an int8 CNN
def test_skip_adapters_on_an_int8_cnn_numpy_and_clear_refusals():
    bb, x = _arch("conv:6:3:1:same,relu,maxpool:2,res(conv:6:3:1:same,relu),gap,dense:8,relu", (3, 20), n=80)
    y = (x[:, 0].mean(axis=1) > 0.5).astype(int) + (x[:, 1].mean(axis=1) > 0)
    q = quantize(bb, x)
    taps = q.forward_taps(q.prepare(x))
    np.testing.assert_allclose(taps, bb.forward_taps(bb.prepare(x)), atol=0.1 * np.abs(taps).max())
    t = et.FineTuner(q, "skip2-lora", epochs=8, lr=0.05, engine="numpy").fit(x, y)
    losses = [e.loss for e in t.history_.epochs]
    assert losses[-1] < losses[0]
    with pytest.raises(UsageError, match="float weights of an int8 backbone"):  # sparse runs: test_int8_sparse_cnn
        et.FineTuner(q, "ft-last", epochs=1, engine="numpy").fit(x, y)
    from edgetune.quant import Int8SkipCache, attach_int8_cache
    with pytest.raises(UsageError, match="pooled floats"):  # the taps' scales need calibration
        attach_int8_cache(t.method, len(x))
    # an int8 skip-cache on an int8 CNN: the pooled taps rounded to scales calibrated on them
    t2 = et.FineTuner(q, "skip2-lora", epochs=8, lr=0.05, engine="numpy")
    t2.fit(x[:2], y[:2])
    attach_int8_cache(t2.method, len(x), x_calib=x)
    t2.fit(x, y)
    assert isinstance(t2.method.cache, Int8SkipCache) and t2.method.cache.hits > 0
    np.testing.assert_allclose(t2.decision_function(x), t.decision_function(x), atol=0.05)


@needs_c
@pytest.mark.parametrize("name", ["1d-all-kinds", "2d", "1d-flatten"])
@pytest.mark.parametrize("method", ["skip-lora", "skip2-lora"])
def test_skip_methods_on_an_int8_cnn_c_equals_numpy(name, method):
    """The compiled engine's skip rows on an int8 CNN are NumPy's bit for bit (the integer pass,
    then each tap pooled from its int8 input); the fits agree as the float ones do."""
    arch, shape = ARCHS[name]
    bb, x = _arch(arch, shape, n=45)
    y = np.random.default_rng(2).integers(0, 3, len(x))
    q = quantize(bb, x)
    runs = {}
    for engine in ("numpy", "c"):
        t = et.FineTuner(q, method, epochs=4, batch_size=7, lr=0.05, seed=3, engine=engine).fit(x, y)
        assert t.history_.engine == engine
        runs[engine] = t
    la, lb = ([e.loss for e in runs[k].history_.epochs] for k in ("numpy", "c"))
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    np.testing.assert_array_equal(runs["numpy"].predict(x), runs["c"].predict(x))
    assert et.FineTuner(q, method, engine="auto").fit(x[:8], y[:8]).history_.engine == "c"

    import ctypes
    from edgetune.core.engine import CoreModel
    from edgetune.methods import make_method

    lib = core.load()
    model = CoreModel(make_method(method, q), 6)
    xp = q.prepare(x)
    ws = np.empty(lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 6), np.uint8)
    assert ws.nbytes > 0
    rows = np.empty((len(xp), sum(q.tap_widths) + q.sizes[-1]), np.float32)
    rc = lib.et_skip_rows(ctypes.byref(model.bb), ctypes.byref(model.m), xp.ctypes.data, len(xp), 6,
                          rows.ctypes.data, ws.ctypes.data, ws.nbytes)
    assert rc == 0
    np.testing.assert_array_equal(rows, q.forward_taps(xp))


@needs_c
def test_an_int8_skip_cache_on_an_int8_cnn_c_equals_numpy():
    from edgetune.quant import Int8SkipCache, attach_int8_cache

    arch, shape = ARCHS["1d-all-kinds"]
    bb, x = _arch(arch, shape, n=40)
    y = np.random.default_rng(4).integers(0, 3, len(x))
    q = quantize(bb, x)
    losses = {}
    for engine in ("numpy", "c"):
        t = et.FineTuner(q, "skip2-lora", epochs=5, batch_size=6, lr=0.05, seed=1, engine=engine)
        t.fit(x[:3], y[:3])
        attach_int8_cache(t.method, len(x), x_calib=x)
        t.fit(x, y)
        assert isinstance(t.method.cache, Int8SkipCache) and t.history_.engine == engine
        losses[engine] = [e.loss for e in t.history_.epochs]
    np.testing.assert_allclose(losses["c"], losses["numpy"], rtol=1e-5)


@needs_c
def test_the_compiled_engine_trains_int8_cnns_with_the_skip_methods_and_sparse():
    import ctypes
    from edgetune.core.engine import KINDS, CoreModel, unsupported_reason
    from edgetune.methods import make_method

    bb, x = _arch("conv:4:3,relu,gap,dense:3", (2, 9))
    q = quantize(bb, x)
    model = CoreModel(make_method("skip-lora", q), 4)
    lib = core.load()
    assert lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4) > 0
    model.m.kind = KINDS["layerwise"]  # a layer-wise method on an int8 CNN: refused by C too
    assert lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4) == 0
    model.m.kind = KINDS["skip"]
    model.bb.layers[0].act_scale = float("nan")  # the int8 pass's own checks apply
    assert lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 4) == 0
    assert unsupported_reason(make_method("skip2-lora", q)) is None


# ---------------------------------------------------------------------------- real data
def test_damage1_1d_preset_cnn_accuracy_before_and_after(data_dir):
    from edgetune.data.fan import FAN_CNN

    task = et.load_task("damage1-1d", data_dir)
    idx = np.random.default_rng(0).permutation(len(task.y_pretrain))[:400]
    model, _ = et.pretrain(task.x_pretrain[idx], task.y_pretrain[idx], labels=task.labels, epochs=15, seed=0,
                           arch=FAN_CNN)
    q = quantize(model, task.x_pretrain[idx])
    xt, yt = task.x_test[:300], task.y_test[:300]
    f, i = _close_to_float(model, q, xt, rtol=0.1)
    acc_f, acc_i = np.mean(f.argmax(1) == yt), np.mean(i.argmax(1) == yt)
    assert acc_f > 0.55 and abs(acc_f - acc_i) <= 0.03, (acc_f, acc_i)
    assert np.mean(f.argmax(1) == i.argmax(1)) >= 0.95
    _both(q, xt[:40])


def test_quantize_command_on_a_cnn(data_dir, tmp_path):
    from edgetune.data.fan import FAN_CNN

    task = et.load_task("damage1-1d", data_dir)
    idx = np.random.default_rng(1).permutation(len(task.y_pretrain))[:400]
    model, _ = et.pretrain(task.x_pretrain[idx], task.y_pretrain[idx], labels=task.labels, epochs=15, seed=0,
                           arch=FAN_CNN)
    model.save(tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["quantize", "--model", str(tmp_path / "m"), "--task", "damage1-1d", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "q"), "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["bytes_int8"] < r["bytes_float"] / 3
    assert r["accuracy_float"] > 0.55 and abs(r["accuracy_int8"] - r["accuracy_float"]) <= 0.03
    assert r["agreement"] >= 0.9
    assert any(line.startswith("conv1d") for line in r["layers"])
    q = et.Backbone.load(tmp_path / "q")
    assert q.is_int8 and q.specs == model.specs
    acc = float(np.mean(q.forward(q.prepare(task.x_test)).argmax(1) == task.y_test))
    assert acc == pytest.approx(r["accuracy_int8"])
    # evaluate and predict take an int8 model without an adapter (the model as it is)
    assert main(["evaluate", "--model", str(tmp_path / "q"), "--task", "damage1-1d", "--data-dir", str(data_dir),
                 "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy_test"] == pytest.approx(acc)
    np.save(tmp_path / "x.npy", task.x_test[:7].reshape(7, -1))
    assert main(["predict", "--model", str(tmp_path / "q"), "--input", str(tmp_path / "x.npy"),
                 "--json", str(tmp_path / "p.json"), "--quiet"]) == 0
    want = q.forward(q.prepare(task.x_test[:7])).argmax(1)
    assert json.loads((tmp_path / "p.json").read_text())["classes"] == want.tolist()
