"""Asymmetric int8 (``quantize(..., activations="asymmetric")``) held to TensorFlow Lite Micro's
reference int8 kernels, restated here independently from their definitions: plain loops over
one sample, Python integers, the saturating and rounding helpers written out, the requantisers
derived here from the model's scales (TFLM's QuantizeMultiplier and its add's preparation), not
read from the model. Both engines (NumPy and C) must give these integers bit for bit on random
layers of every kind, shape, stride, padding and group count. Also: the symmetric mode
unchanged, files, refusals."""
from __future__ import annotations

import ctypes
import json
import math

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.cli import main
from edgetune.errors import ModelFileError, UsageError
from edgetune.nn.arch import build_layers
from edgetune.nn.layers import (LayerSpec, Layer, QuantParams, multiply_by_quantized_multiplier,
                                rounding_divide_by_pot, rounding_doubling_high_mul)
from edgetune.quant import quantize
from edgetune.quant.int8 import calibrate_zero_points, int8_forward_taps, requant_params_tflm

needs_c = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


# ---------------------------------------------------------------------------- TFLM, restated
def srdhm(a: int, b: int) -> int:
    """SaturatingRoundingDoublingHighMul."""
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    t = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    q = abs(t) // (1 << 31)  # C's division truncates toward zero
    return q if t >= 0 else -q


def rdbpot(x: int, exponent: int) -> int:
    """RoundingDivideByPOT (arithmetic shift, as gemmlowp assumes)."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def mbqm(x: int, multiplier: int, shift: int) -> int:
    """MultiplyByQuantizedMultiplier."""
    left, right = (shift, 0) if shift > 0 else (0, -shift)
    v = x * (1 << left)
    assert INT32_MIN <= v <= INT32_MAX
    return rdbpot(srdhm(v, multiplier), right)


def mbqm_smaller_than_one(x: int, multiplier: int, left_shift: int) -> int:
    """MultiplyByQuantizedMultiplierSmallerThanOneExp (the add's)."""
    return rdbpot(srdhm(x, multiplier), -left_shift)


def tf_round(v: float) -> int:
    """TfLiteRound: half away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """QuantizeMultiplier: (Q31 significand, exponent)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = tf_round(q * (1 << 31))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    if shift > 30:
        shift, q_fixed = 30, (1 << 31) - 1
    return q_fixed, shift


def c_div(a: int, n: int) -> int:
    q = abs(a) // n
    return q if a >= 0 else -q


def act_range(activation: str, s_out: float, zp_out: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized (float32 division, TfLiteRound)."""
    if activation == "identity":
        return -128, 127
    lo = max(-128, zp_out)
    if activation == "relu":
        return lo, 127
    return lo, min(127, zp_out + tf_round(float(np.float32(6.0) / np.float32(s_out))))


def ref_quantize(x: np.ndarray, s: float, zp: int) -> list[int]:
    """AffineQuantize: round(x / s) + zp in float32, clamped to int8."""
    return [min(127, max(-128, tf_round(float(np.float32(v) / np.float32(s))) + zp)) for v in x]


def grid(spec: LayerSpec):
    """(C, H, W), (OC, OH, OW), kernel, stride, padding of a layer; 1-D as height 1."""
    def hw(shape):
        return (shape[0], 1, shape[1]) if len(shape) == 2 else (shape[0], 1, 1) if len(shape) == 1 else shape
    k = spec.kernel if len(spec.kernel) == 2 else (1, *spec.kernel) if spec.kernel else (1, 1)
    s = spec.stride if len(spec.stride) == 2 else (1, *spec.stride) if spec.stride else (1, 1)
    p = spec.padding if len(spec.padding) == 2 else (0, *spec.padding) if spec.padding else (0, 0)
    return hw(spec.in_shape), hw(spec.out_shape), k, s, p


def ref_conv_acc(spec: LayerSpec, x: list[int], w: np.ndarray, bias: np.ndarray, zp_in: int) -> list[int]:
    """TFLM's ConvPerChannel / DepthwiseConvPerChannel / FullyConnected accumulator: bias plus
    (input + input_offset) * filter over the window, where the input lies inside the map."""
    (c, h, wd), (o, oh, ow), (kh, kw), (sh, sw), (ph, pw) = grid(spec)
    cg, og = c // spec.groups, o // spec.groups
    wf = w.reshape(o, cg, kh, kw)
    out = []
    for oc in range(o):
        g = oc // og
        for oy in range(oh):
            for ox in range(ow):
                acc = 0
                for ci in range(cg):
                    ch = g * cg + ci
                    for ky in range(kh):
                        iy = oy * sh - ph + ky
                        for kx in range(kw):
                            ix = ox * sw - pw + kx
                            if 0 <= iy < h and 0 <= ix < wd:
                                acc += (x[(ch * h + iy) * wd + ix] - zp_in) * int(wf[oc, ci, ky, kx])
                out.append(acc + int(bias[oc]))
    return out


def ref_pool(spec: LayerSpec, x: list[int], lo: int, hi: int) -> list[int]:
    """MaxPool / AveragePool: over the window's valid elements; the average rounded half away."""
    (c, h, wd), (_, oh, ow), (kh, kw), (sh, sw), (ph, pw) = grid(spec)
    out = []
    for ch in range(c):
        for oy in range(oh):
            for ox in range(ow):
                vals = [x[(ch * h + iy) * wd + ix] for iy in range(oy * sh - ph, oy * sh - ph + kh)
                        for ix in range(ox * sw - pw, ox * sw - pw + kw) if 0 <= iy < h and 0 <= ix < wd]
                if spec.kind.startswith("max"):
                    v = max([-128] + vals)
                else:
                    acc, n = sum(vals), len(vals)
                    v = c_div(acc + n // 2, n) if acc > 0 else c_div(acc - n // 2, n)
                out.append(min(hi, max(lo, v)))
    return out


def ref_forward(bb: et.Backbone, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's int8 input side by side and the float logits of one prepared sample at a time."""
    layers = bb.layers
    n = len(layers)
    all_rows, all_logits = [], []
    for row in x:
        q0 = layers[0].quant
        cur = ref_quantize(row, q0.input_scale, q0.zero_point)
        inputs = []
        for k, layer in enumerate(layers):
            spec, q = layer.spec, layer.quant
            inputs.append(cur)
            s_in, zp_in = float(np.float32(q.input_scale)), q.zero_point
            if k == n - 1:
                acc = ref_conv_acc(spec, cur, q.qweight, q.qbias, zp_in)
                unit = [np.float32(np.float32(s_in) * np.float32(sw)) for sw in q.wscale]
                npos = len(acc) // spec.out_channels
                all_logits.append([np.float32(a * float(unit[i // npos])) for i, a in enumerate(acc)])
                break
            nxt = layers[k + 1].quant
            s_out, zp_out = float(np.float32(nxt.input_scale)), nxt.zero_point
            lo, hi = act_range(spec.activation, s_out, zp_out)
            if spec.has_params:
                acc = ref_conv_acc(spec, cur, q.qweight, q.qbias, zp_in)
                npos = len(acc) // spec.out_channels
                mq = [quantize_multiplier(s_in * float(sw) / s_out) for sw in q.wscale]
                cur = [min(hi, max(lo, mbqm(a, *mq[i // npos]) + zp_out)) for i, a in enumerate(acc)]
            elif spec.kind in ("maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d"):
                cur = ref_pool(spec, cur, lo, hi)
            elif spec.kind == "gap":  # TFLM's mean: the average pool over the whole map
                npos = spec.in_features // spec.in_shape[0]
                whole = LayerSpec.pool("avg", (spec.in_shape[0], npos), npos)
                cur = ref_pool(whole, cur, lo, hi)
            elif spec.kind == "flatten":
                cur = [min(hi, max(lo, v)) for v in cur]
            else:  # add: TFLM's PrepareGeneralSubOp and AddElementwise
                src = layers[spec.source].quant
                s1, s2 = s_in, float(np.float32(src.input_scale))
                twice_max = 2 * max(s1, s2)
                m1, e1 = quantize_multiplier(s1 / twice_max)
                m2, e2 = quantize_multiplier(s2 / twice_max)
                mo, eo = quantize_multiplier(twice_max / ((1 << 20) * s_out))
                other = inputs[spec.source]
                res = []
                for a, b in zip(cur, other):
                    sa = mbqm_smaller_than_one((a - zp_in) * (1 << 20), m1, e1)
                    sb = mbqm_smaller_than_one((b - src.zero_point) * (1 << 20), m2, e2)
                    res.append(min(hi, max(lo, mbqm_smaller_than_one(sa + sb, mo, eo) + zp_out)))
                cur = res
        all_rows.append(np.concatenate([np.asarray(r, np.int64) for r in inputs]))
    return np.asarray(all_rows).astype(np.int8), np.asarray(all_logits, np.float32)


# ---------------------------------------------------------------------------- random models
def _chain(in_shape, makers):
    specs, shape = [], tuple(in_shape)
    for make in makers:
        spec = make(shape, len(specs))
        specs.append(spec)
        shape = spec.out_shape
    return specs


conv = LayerSpec.conv
CASES = {
    "conv1d-stride-pad-groups-pools": ((4, 15), [
        lambda s, k: conv(s, 6, 5, stride=2, padding=2, activation="relu"),
        lambda s, k: LayerSpec.pool("avg", s, 3, 2, 1),
        lambda s, k: conv(s, 4, 3, padding=1, groups=2, activation="relu6"),
        lambda s, k: LayerSpec.pool("max", s, 2, 1, 1),
        lambda s, k: LayerSpec.gap(s),
        lambda s, k: LayerSpec.dense(s[0], 3)]),
    "conv2d-depthwise-avgpad-flatten": ((3, 7, 6), [
        lambda s, k: conv(s, 4, 3, padding=1, activation="relu"),
        lambda s, k: conv(s, 4, 3, stride=2, padding=1, groups=4, activation="relu6"),
        lambda s, k: LayerSpec.pool("avg", s, 3, 2, 1),
        lambda s, k: LayerSpec.flatten(s),
        lambda s, k: LayerSpec.dense(s[0], 3)]),
    "conv2d-rect-kernel-maxpool": ((2, 6, 5), [
        lambda s, k: conv(s, 4, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
        lambda s, k: LayerSpec.pool("max", s, (2, 2), (1, 2), (1, 1)),
        lambda s, k: conv(s, 3, 1, activation="relu"),
        lambda s, k: LayerSpec.gap(s),
        lambda s, k: LayerSpec.dense(s[0], 4)]),
    "residual-adds": ((3, 10), [
        lambda s, k: conv(s, 3, 3, padding=1, activation="relu"),
        lambda s, k: conv(s, 3, 3, padding=1),
        lambda s, k: LayerSpec.add(s, 0, activation="relu"),
        lambda s, k: conv(s, 3, 1, activation="relu6"),
        lambda s, k: LayerSpec.add(s, 2),
        lambda s, k: conv(s, 2, 3, stride=2),
        lambda s, k: LayerSpec.flatten(s),
        lambda s, k: LayerSpec.dense(s[0], 3)]),
    "mlp": ((9,), [
        lambda s, k: LayerSpec.dense(s[0], 7, "relu"),
        lambda s, k: LayerSpec.dense(s[0], 6, "relu6"),
        lambda s, k: LayerSpec.dense(s[0], 5),
        lambda s, k: LayerSpec.dense(s[0], 3)]),
    "plain-mlp": ((8,), [
        lambda s, k: LayerSpec.dense(s[0], 7, "relu"),
        lambda s, k: LayerSpec.dense(s[0], 5, "relu"),
        lambda s, k: LayerSpec.dense(s[0], 3)]),
}
SAME = ("maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d", "gap", "flatten")


def random_int8(specs, seed):
    """An asymmetric int8 backbone with random int8 tensors, scales and zero points (any in
    -128..127; a pooling, gap or flatten layer's output keeps its input's)."""
    rng = np.random.default_rng(seed)
    scales, zps = [], []
    for k in range(len(specs)):
        if k and specs[k - 1].kind in SAME:
            scales.append(scales[-1])
            zps.append(zps[-1])
        else:
            scales.append(float(np.float32(rng.uniform(0.02, 0.2))))
            zps.append(int(rng.integers(-128, 128)))
    layers = []
    for k, spec in enumerate(specs):
        if spec.has_params:
            w = rng.integers(-127, 128, spec.weight_shape).astype(np.int8)
            sw = rng.uniform(0.002, 0.03, spec.out_channels).astype(np.float32)
            b = rng.integers(-3000, 3000, spec.out_channels).astype(np.int32)
        else:
            w, sw, b = np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros(0, np.int32)
        layers.append(Layer(spec, quant=QuantParams(w, sw, b, scales[k], zero_point=zps[k], asymmetric=True)))
    return et.Backbone.from_layers(layers)


def _engines(q, xp):
    rows, logits = int8_forward_taps(q, xp)
    out = {"numpy": (rows, logits)}
    q32 = q.copy()
    q32.int8_kernel = "int32"
    out["numpy-int32"] = int8_forward_taps(q32, xp)
    if core.available():
        from edgetune.quant.native import native_forward_taps
        out["c"] = native_forward_taps(q, xp)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_int8_layers_of_every_kind_equal_tflm_bit_for_bit(name, seed):
    shape, makers = CASES[name]
    q = random_int8(_chain(shape, makers), seed)
    x = np.random.default_rng(seed + 10).normal(0, 4, (4, int(np.prod(shape)))).astype(np.float32)
    want_rows, want_logits = ref_forward(q, x)
    zps = {layer.quant.zero_point for layer in q.layers}
    assert len(zps) > 2  # zero points of both signs, not only -128 or 0
    for engine, (rows, logits) in _engines(q, x).items():
        np.testing.assert_array_equal(rows, want_rows, err_msg=engine)
        np.testing.assert_array_equal(logits, want_logits, err_msg=engine)
    # not a test that cannot fail: the symmetric arithmetic on the same tensors differs
    sym = et.Backbone.from_layers([Layer(l.spec, quant=QuantParams(l.quant.qweight, l.quant.wscale, l.quant.qbias,
                                                                   l.quant.input_scale)) for l in q.layers])
    assert not np.array_equal(int8_forward_taps(sym, x)[0], want_rows)


def test_requantisers_above_one_shift_left_first_and_overflow_is_refused():
    specs = [LayerSpec.dense(2, 4, "relu"), LayerSpec.dense(4, 3)]
    q = random_int8(specs, 2)
    q0 = q.layers[0].quant
    big = [Layer(l.spec, quant=QuantParams(l.quant.qweight, (l.quant.wscale * (400 if k == 0 else 1)).astype(
        np.float32), l.quant.qbias, l.quant.input_scale, zero_point=l.quant.zero_point, asymmetric=True))
        for k, l in enumerate(q.layers)]
    gain = et.Backbone.from_layers(big)
    assert gain.layers[0].quant.requant[1].max() > 0  # exponents above 0: x << e, then the Q31 multiply
    x = np.random.default_rng(1).normal(0, 3, (6, 2)).astype(np.float32)
    want = ref_forward(gain, x)
    for engine, got in _engines(gain, x).items():
        np.testing.assert_array_equal(got[0], want[0], err_msg=engine)
        np.testing.assert_array_equal(got[1], want[1], err_msg=engine)
    wide = [LayerSpec.dense(3000, 4, "relu"), LayerSpec.dense(4, 3)]
    w = random_int8(wide, 0)
    layers = [Layer(l.spec, quant=QuantParams(l.quant.qweight, (l.quant.wscale * (1e4 if k == 0 else 1)).astype(
        np.float32), l.quant.qbias, l.quant.input_scale, zero_point=l.quant.zero_point, asymmetric=True))
        for k, l in enumerate(w.layers)]
    with pytest.raises(UsageError, match="overflow"):
        et.Backbone.from_layers(layers)
    assert q0.requant[1].max() <= 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_calibrated_models_equal_tflm_and_stay_close_to_float(name):
    shape, makers = CASES[name]
    specs = _chain(shape, makers)
    rng = np.random.default_rng(3)
    x = rng.normal(0.7, 1.5, (40, int(np.prod(shape)))).astype(np.float32)
    bb = et.Backbone.from_layers(build_layers(specs, seed=3))
    q = quantize(bb, x, activations="asymmetric")
    assert all(layer.quant.asymmetric for layer in q.layers)
    want_rows, want_logits = ref_forward(q, x[:5])
    for engine, (rows, logits) in _engines(q, x[:5]).items():
        np.testing.assert_array_equal(rows, want_rows, err_msg=engine)
        np.testing.assert_array_equal(logits, want_logits, err_msg=engine)
    if any(s.kind.startswith("avgpool") and any(s.padding) for s in specs):
        return  # TFLM divides a padded window by its valid count, the float layer by the kernel's size
    f, i = bb.forward(x), q.forward(x)
    assert np.abs(f - i).max() <= 0.08 * np.abs(f).max() + 1e-6


def test_the_helpers_equal_their_definitions():
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.integers(-2 ** 27, 2 ** 27, 300), [0, 1, -1, 2 ** 20, -2 ** 20, 3, -3, 5, -5]])
    for e in (0, 1, 2, 5, 13, 31):
        np.testing.assert_array_equal(rounding_divide_by_pot(xs, e), [rdbpot(int(v), e) for v in xs])
    assert rdbpot(-5, 1) == -3 and rdbpot(5, 1) == 3 and rdbpot(-6, 2) == -2  # ties away from zero
    ms = rng.integers(2 ** 30, 2 ** 31, 300)
    np.testing.assert_array_equal(rounding_doubling_high_mul(xs[:300], ms), [srdhm(int(a), int(b))
                                                                            for a, b in zip(xs[:300], ms)])
    assert int(rounding_doubling_high_mul(INT32_MIN, INT32_MIN)) == INT32_MAX == srdhm(INT32_MIN, INT32_MIN)
    for shift in (-31, -20, -7, -1, 0, 2):
        small = xs[:300] >> 3
        np.testing.assert_array_equal(multiply_by_quantized_multiplier(small, ms, shift),
                                      [mbqm(int(a), int(b), shift) for a, b in zip(small, ms)])
    reals = np.concatenate([rng.uniform(1e-6, 4, 200), [0.5, 1.0, 2.0 ** -40, 2.0 ** 40, 0.75, 1 - 2 ** -40]])
    mult, shift = requant_params_tflm(reals)
    assert [(int(m), int(s)) for m, s in zip(mult, shift)] == [quantize_multiplier(float(r)) for r in reals]


def test_calibration_is_tflite_s_range_including_zero():
    bb = et.Backbone.from_layers(build_layers([LayerSpec.dense(2, 3, "relu"), LayerSpec.dense(3, 2)], seed=0))
    x = np.array([[-1.0, 3.0], [0.5, 2.0], [3.0, 1.0]], np.float32)  # inputs in [-1, 3]
    scales, zps = calibrate_zero_points(bb, x)
    assert scales[0] == np.float32(4 / 255) and zps[0] == tf_round(-128 + 1 / float(np.float32(4 / 255)))
    assert zps[1] == -128  # a ReLU's output: [0, max], zero point at the bottom
    pos = calibrate_zero_points(bb, np.abs(x) + 1)[1][0]  # all positive: the range still includes 0
    assert pos == -128


# ---------------------------------------------------------------------------- the modes, files
def _model(seed=0):
    specs = _chain(*CASES["conv1d-stride-pad-groups-pools"])
    x = np.random.default_rng(seed).normal(0.5, 1.0, (30, 60)).astype(np.float32)
    return et.Backbone.from_layers(build_layers(specs, seed=seed)).fit_normalizer(x), x


def test_symmetric_stays_the_default_and_unchanged():
    bb, x = _model()
    q = quantize(bb, x)
    assert q.layers[0].quant.asymmetric is False and {l.quant.zero_point for l in q.layers} == {0}
    assert np.array_equal(q.forward(q.prepare(x)), quantize(bb, x, activations="symmetric").forward(q.prepare(x)))
    with pytest.raises(UsageError, match="activations"):
        quantize(bb, x, activations="tflm")


def test_asymmetric_files_round_trip_and_old_files_load_as_symmetric(tmp_path):
    bb, x = _model()
    qa, qs = quantize(bb, x, activations="asymmetric"), quantize(bb, x)
    qa.save(tmp_path / "a")
    qs.save(tmp_path / "s")
    la = et.Backbone.load(tmp_path / "a")
    assert la.layers[0].quant.asymmetric and [l.quant.zero_point for l in la.layers] == \
        [l.quant.zero_point for l in qa.layers]
    np.testing.assert_array_equal(la.forward(la.prepare(x)), qa.forward(qa.prepare(x)))
    assert la.digest() == qa.digest() != qs.digest()
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    from edgetune.safetensors import loads
    assert not any("zero_point" in name for name in loads((tmp_path / "s" / "model.safetensors").read_bytes(), "s")[0])
    del cfg["quantization"]["activations"]  # a file from before the field existed
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    ls = et.Backbone.load(tmp_path / "s")
    assert not ls.layers[0].quant.asymmetric
    np.testing.assert_array_equal(ls.forward(ls.prepare(x)), qs.forward(qs.prepare(x)))


def _rewrite(path, edit_tensors=None, edit_cfg=None):
    import hashlib
    from edgetune.safetensors import dumps, loads

    blob = (path / "model.safetensors").read_bytes()
    tensors, _ = loads(blob, "m")
    tensors = dict(tensors)
    if edit_tensors:
        edit_tensors(tensors)
    blob = dumps(tensors, {"format": "edgetune-backbone"})
    (path / "model.safetensors").write_bytes(blob)
    cfg = json.loads((path / "config.json").read_text())
    cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    if edit_cfg:
        edit_cfg(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage", ["missing", "float", "shape", "out-of-range", "mode"])
def test_corrupt_zero_points_are_model_file_errors(tmp_path, damage):
    bb, x = _model()
    p = tmp_path / "m"
    quantize(bb, x, activations="asymmetric").save(p)
    edits = {
        "missing": dict(edit_tensors=lambda t: t.pop("layers.2.input_zero_point")),
        "float": dict(edit_tensors=lambda t: t.update({"layers.0.input_zero_point": np.zeros(1, np.float32)})),
        "shape": dict(edit_tensors=lambda t: t.update({"layers.0.input_zero_point": np.zeros(2, np.int32)})),
        "out-of-range": dict(edit_tensors=lambda t: t.update({"layers.0.input_zero_point": np.full(1, 200, np.int32)})),
        "mode": dict(edit_cfg=lambda c: c["quantization"].update({"activations": "int8 sideways"})),
    }
    _rewrite(p, **edits[damage])
    with pytest.raises(ModelFileError, match="zero_point|zero point|activations"):
        et.Backbone.load(p)


def test_a_zero_point_outside_int8_or_on_a_symmetric_layer_is_refused():
    specs = _chain(*CASES["mlp"])
    good = random_int8(specs, 0)
    for bad in (128, -129, 1.5, True):
        layers = [Layer(l.spec, quant=QuantParams(l.quant.qweight, l.quant.wscale, l.quant.qbias, l.quant.input_scale,
                                                  zero_point=bad if k == 1 else l.quant.zero_point, asymmetric=True))
                  for k, l in enumerate(good.layers)]
        with pytest.raises(UsageError, match="zero point"):
            et.Backbone.from_layers(layers)
    mixed = [Layer(l.spec, quant=QuantParams(l.quant.qweight, l.quant.wscale, l.quant.qbias, l.quant.input_scale,
                                             zero_point=0, asymmetric=k != 1)) for k, l in enumerate(good.layers)]
    with pytest.raises(UsageError, match="all symmetric or all asymmetric"):
        et.Backbone.from_layers(mixed)


@needs_c
def test_the_compiled_engine_checks_the_zero_points_itself():
    from edgetune.core.engine import int8_backbone

    q = random_int8(_chain(*CASES["residual-adds"]), 0)
    lib = core.load()
    keep: list = []
    s = int8_backbone(q, keep)
    assert lib.et_int8_workspace_size(ctypes.byref(s), 2) > 0
    for field, k, value in (("zero_point", 1, 128), ("out_zero_point", 0, q.layers[1].quant.zero_point + 1),
                            ("source_zero_point", 2, 5 if q.layers[0].quant.zero_point != 5 else 6),
                            ("asymmetric", 3, 0)):
        old = getattr(s.layers[k], field)
        setattr(s.layers[k], field, value)
        assert lib.et_int8_workspace_size(ctypes.byref(s), 2) == 0, field
        setattr(s.layers[k], field, old)
    assert lib.et_int8_workspace_size(ctypes.byref(s), 2) > 0
    sym = int8_backbone(quantize(*_model()), keep)  # symmetric: every zero point must be 0
    assert lib.et_int8_workspace_size(ctypes.byref(sym), 2) > 0
    sym.layers[1].zero_point = 3
    assert lib.et_int8_workspace_size(ctypes.byref(sym), 2) == 0


# ---------------------------------------------------------------------------- what uses the int8 pass
@pytest.mark.parametrize("name", ["conv1d-stride-pad-groups-pools", "residual-adds", "plain-mlp"])
def test_skip_methods_on_asymmetric_models_both_engines(name):
    shape, makers = CASES[name]
    rng = np.random.default_rng(5)
    x = rng.normal(0.3, 1.2, (36, int(np.prod(shape)))).astype(np.float32)
    y = rng.integers(0, 3, len(x))
    bb = et.Backbone.from_layers(build_layers(_chain(shape, makers), seed=5)).fit_normalizer(x)
    q = quantize(bb, x, activations="asymmetric")
    xp = q.prepare(x)
    taps = q.forward_taps(xp)
    rows, logits = int8_forward_taps(q, xp)
    # a tap is its layer's int8 input dequantised, (q - zp) * s (pooled per channel where spatial)
    k = q.tap_layers[0]
    lq, spec = q.layers[k].quant, q.layers[k].spec
    first = rows[:, :spec.in_features].astype(np.float64) - lq.zero_point
    want = first.reshape(len(x), spec.in_shape[0], -1).mean(axis=2) * lq.input_scale
    np.testing.assert_allclose(taps[:, :q.tap_widths[0]], want, rtol=1e-5, atol=1e-6)
    engines = ["numpy"] + (["c"] if core.available() else [])
    runs = {e: et.FineTuner(q, "skip2-lora", epochs=3, batch_size=7, lr=0.05, seed=3, engine=e).fit(x, y)
            for e in engines}
    if "c" in runs:
        assert runs["c"].history_.engine == "c"
        np.testing.assert_allclose([e.loss for e in runs["c"].history_.epochs],
                                   [e.loss for e in runs["numpy"].history_.epochs], rtol=1e-5)
        np.testing.assert_array_equal(runs["c"].predict(x), runs["numpy"].predict(x))
        from edgetune.core.engine import CoreModel
        from edgetune.methods import make_method

        lib = core.load()
        model = CoreModel(make_method("skip-lora", q), 6)
        ws = np.empty(lib.et_workspace_size(ctypes.byref(model.bb), ctypes.byref(model.m), None, 6), np.uint8)
        out = np.empty((len(xp), sum(q.tap_widths) + q.sizes[-1]), np.float32)
        assert lib.et_skip_rows(ctypes.byref(model.bb), ctypes.byref(model.m), xp.ctypes.data, len(xp), 6,
                                out.ctypes.data, ws.ctypes.data, ws.nbytes) == 0
        np.testing.assert_array_equal(out, taps)
    assert runs["numpy"].score(x, y) >= 0


def test_the_sparse_update_and_the_int8_mlp_cache_refuse_asymmetric_models(tmp_path, capsys):
    bb, x = _model()
    q = quantize(bb, x, activations="asymmetric")
    y = np.random.default_rng(0).integers(0, 3, len(x))
    with pytest.raises(UsageError, match="asymmetric"):
        et.FineTuner(q, "sparse", epochs=1, engine="numpy").fit(x, y)
    from edgetune.quant.int8 import tap_scales
    mlp = random_int8(_chain(*CASES["mlp"]), 0)
    with pytest.raises(UsageError, match="asymmetric"):
        tap_scales(mlp)
    q.save(tmp_path / "q")
    code = main(["export", "--model", str(tmp_path / "q"), "--method", "sparse", "--target", "host",
                 "--out", str(tmp_path / "dev"), "--quiet"])
    assert code == 2 and not (tmp_path / "dev").exists() and "asymmetric" in capsys.readouterr().err


@needs_c
def test_a_host_program_fine_tunes_an_asymmetric_cnn_to_the_python_loss_exactly(tmp_path):
    """skip2-lora exported for the host on an asymmetric int8 CNN: the device program's loss and
    accuracy are the compiled engine's in Python exactly (the zero points travel in et_layer)."""
    import subprocess
    from .conftest import DATA_DIR
    from .test_export import last_json, make, needs
    from .test_int8_sparse_cnn import _export, _python_run
    needs(("cc", "gcc"), ("make", "make"))
    task = et.load_task("damage1-1d", DATA_DIR)
    some = np.random.default_rng(0).permutation(len(task.y_pretrain))[:200]
    arch = "conv:4:9:4:4,relu,maxpool:2,res(dwconv:3:1:1,relu6,conv:4:1),avgpool:2,flatten,dense:8,relu"
    model, _ = et.pretrain(task.x_pretrain[some], task.y_pretrain[some], arch=arch, labels=task.labels, epochs=2,
                           lr=0.02, seed=0)
    path = quantize(model, task.x_pretrain[some], activations="asymmetric").save(tmp_path / "model")
    out = tmp_path / "dev"
    man = _export(path, ["--task", "damage1-1d", "--data-dir", str(DATA_DIR)], out, "host", "--method", "skip2-lora",
                  "--epochs", "2", "--max-samples", "60", "--test-samples", "40")
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet"], capture_output=True, text=True, timeout=120,
                                   check=True).stdout)
    loss, acc = _python_run(et.Backbone.load(path), task, man)
    assert res["final_loss"] == pytest.approx(loss, rel=1e-6) and res["accuracy_after"] == acc


@needs_c
def test_the_compiled_sparse_update_refuses_asymmetric_backbones():
    from edgetune.core.engine import CoreModel, int8_backbone
    from edgetune.methods import make_method

    bb, x = _model()
    qs, qa = quantize(bb, x), quantize(bb, x, activations="asymmetric")
    lib = core.load()
    sparse, skip = CoreModel(make_method("sparse", qs), 4), CoreModel(make_method("skip-lora", qa), 4)
    keep: list = []
    asym = int8_backbone(qa, keep)  # the same layers as qs: only the activations' quantisation differs
    assert lib.et_workspace_size(ctypes.byref(sparse.bb), ctypes.byref(sparse.m), None, 4) > 0
    assert lib.et_workspace_size(ctypes.byref(asym), ctypes.byref(skip.m), None, 4) > 0
    assert lib.et_workspace_size(ctypes.byref(asym), ctypes.byref(sparse.m), None, 4) == 0
    xp = qa.prepare(x)
    y, ids = np.zeros(len(x), np.int32), np.arange(4, dtype=np.int32)
    params = np.zeros(max(1, sparse.m.n_params), np.float32)
    grads, loss = np.zeros_like(params), ctypes.c_double()
    ws = np.empty(1 << 20, np.uint8)
    rc = lib.et_batch_gradient(ctypes.byref(asym), ctypes.byref(sparse.m), params.ctypes.data, grads.ctypes.data,
                               xp.ctypes.data, y.ctypes.data, ids.ctypes.data, 4, 4, ws.ctypes.data, ws.nbytes,
                               ctypes.byref(loss))
    assert rc == -3  # ET_ERR_UNSUPPORTED
    rc = lib.et_batch_gradient(ctypes.byref(sparse.bb), ctypes.byref(sparse.m), params.ctypes.data,
                               grads.ctypes.data, xp.ctypes.data, y.ctypes.data, ids.ctypes.data, 4, 4,
                               ws.ctypes.data, ws.nbytes, ctypes.byref(loss))
    assert rc == 0  # the same call on the symmetric backbone runs


def test_the_quantize_command_refuses_an_unknown_mode(tmp_path, capsys):
    bb, x = _model()
    bb.save(tmp_path / "f")
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", str(tmp_path / "f"), "--task", "damage1-1d", "--out", str(tmp_path / "q"),
              "--activations", "sideways"])
    assert e.value.code == 2 and "asymmetric" in capsys.readouterr().err
