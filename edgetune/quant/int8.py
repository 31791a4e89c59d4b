"""Post-training int8 quantisation of a Backbone and the int8 forward pass.

Weights: symmetric int8 per output channel, ``W ~= s_w[:, None] * Wq`` with
``s_w = max|W[c, ...]| / 127``. Activations: one symmetric scale per layer input (zero
point 0, values -127..127), ``h_k ~= s_k * q_k``, calibrated on pre-training data.
Biases: int32 in the accumulator's unit, ``b ~= s_k * s_w * bq``. A dense or convolution
layer is then

    acc   = q_k * Wq + bq                         (int32 accumulation; padding reads 0)
    q_k+1 = clip(requant(acc, s_k s_w / s_k+1), lo, hi)   (activation fused into the clip)

where ``requant`` is a fixed-point multiply and shift per output channel, as CMSIS-NN's
kernels do it (``round(acc * mult * 2**-shift)``, rounded half up), and [lo, hi] is the
activation's range: [-127, 127] identity, [0, 127] ReLU, [0, min(127, rint(6 / s_k+1))]
ReLU6. Pooling, gap and flatten keep their input's scale (max of the window; the window's
sum divided by its size rounded half away from zero); an add rescales both its inputs to
its output scale. The last layer (dense or convolution) gives float logits: its
accumulator times ``s_k s_w``. The input normalisation stays float (it is folded into the
input quantisation).

``activations="asymmetric"`` quantises in the conventions of CMSIS-NN and TensorFlow Lite
Micro instead: each layer input ``h_k ~= s_k * (q_k - zp_k)`` with its own zero point
(-128..127, the calibrated range made to include 0), the same symmetric per-channel weights
and int32 biases, and every kind computed in TFLM's reference arithmetic: products of
``q - zp_in`` (a convolution's padding contributes nothing), requantisation by
MultiplyByQuantizedMultiplier (a Q31 multiplier and an exponent from QuantizeMultiplier,
double rounding) plus ``zp_out``, the activation folded into [act_min, act_max], average
pooling over the valid elements only, and TFLM's add (left shift 20, one multiplier per input
and one for the output). ``tests/test_int8_tflm.py`` restates TFLM's kernels independently
and holds both engines to them bit for bit.

An int8 model is an ordinary ``Backbone`` whose layers hold ``QuantParams`` (``is_int8``);
this module quantises a float backbone and runs the int8 pass on one, layer by layer through
each kind's ``int8_accumulate`` (edgetune.nn.layers).

NumPy has no BLAS for integer matrices: an int32 matmul is about twice as slow as float32
here. The default kernel therefore multiplies the integer values in float32 (float64 when
the layer is too wide): every partial sum is an integer below 2**24 (2**53), so the result
is bit-identical to the int32 accumulation. ``kernel="int32"`` runs the integer matmul.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..nn.layers import (ADD_LEFT_SHIFT, QMAX, TILE_BYTES, Layer, QuantParams, chain_specs,
                         multiply_by_quantized_multiplier)
from ..nn.mlp import INT8_KERNELS as KERNELS, Backbone

__all__ = ["ACTIVATION_MODES", "KERNELS", "QMAX", "TILE_BYTES", "accumulate", "act_scales", "calibrate",
           "calibrate_layers", "calibrate_zero_points", "check_int8_layers", "clamp_range", "dequantize",
           "int8_backbone", "int8_float_taps", "int8_forward", "int8_forward_taps", "is_asymmetric", "layer_int8",
           "load_any", "logits_from", "quantize", "quantize_activation", "quantize_input", "quantize_weight",
           "requant_params", "requant_params_tflm", "requantize", "requantize_tflm", "round_half_away", "run_int8",
           "tap_scales"]

#: The activations an int8 layer fuses into its output clamp.
INT8_ACTIVATIONS = ("identity", "relu", "relu6")
#: How activations are quantised: edgetune's symmetric int8 (zero point 0, -127..127) or
#: asymmetric int8 with a zero point per tensor, in TFLite Micro's arithmetic.
ACTIVATION_MODES = ("symmetric", "asymmetric")
#: Kinds whose output keeps the input's scale (no requantisation).
SAME_SCALE_KINDS = ("maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d", "gap", "flatten")


def _empty_quant(input_scale: float, zero_point: int = 0, asymmetric: bool = False) -> QuantParams:
    """The int8 parameters of a layer without weights: its input scale (and zero point) only."""
    return QuantParams(np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros(0, np.int32), float(input_scale),
                       zero_point=int(zero_point), asymmetric=asymmetric)


def is_asymmetric(bb: Backbone) -> bool:
    """True for an int8 backbone with asymmetric activations (TFLM's arithmetic)."""
    return bool(bb.is_int8 and bb.layers[0].quant.asymmetric)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties away from zero (C's roundf / std::round), exactly."""
    v = np.asarray(v)
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: returns (Wq int8 as w (out, ...), s_w float32 (out,))."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / QMAX, 1.0)
    q = np.clip(np.rint(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))), -QMAX, QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_activation(h: np.ndarray, scale: float, *, relu: bool = False,
                        zero_point: int | None = None) -> np.ndarray:
    """Symmetric int8 with one scale; ``relu`` clips at 0 (a ReLU output is never negative).
    With a ``zero_point``: asymmetric, TFLM's quantize, ``clip(round(h / scale) + zero_point,
    -128, 127)`` (float32 division, rounded half away from zero)."""
    q = np.divide(h, np.float32(scale), dtype=np.float32)
    if zero_point is not None:
        q = round_half_away(q).astype(np.float32, copy=False) + np.float32(zero_point)
        np.clip(q, -QMAX - 1, QMAX, out=q)
        return q.astype(np.int8)
    np.rint(q, out=q)
    np.clip(q, 0 if relu else -QMAX, QMAX, out=q)
    return q.astype(np.int8)


def requant_params_tflm(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLM's QuantizeMultiplier of positive real multipliers: (Q31 multiplier in [2**30, 2**31),
    exponent), m ~= mult * 2**(exponent - 31); the fraction rounded half away from zero, a
    multiplier too small for an exponent of -31 becomes 0, one too large saturates (2**31 - 1,
    exponent 30)."""
    frac, exp = np.frexp(np.asarray(m, dtype=np.float64))
    mult = round_half_away(frac * 2.0 ** 31).astype(np.int64)
    carry = mult == 2 ** 31
    mult[carry] //= 2
    exp = exp.astype(np.int64) + carry
    small = exp < -31
    mult[small], exp[small] = 0, 0
    big = exp > 30
    mult[big], exp[big] = 2 ** 31 - 1, 30
    return mult, exp


def requant_params(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point form of positive real multipliers: m ~= mult * 2**-shift, mult < 2**31."""
    frac, exp = np.frexp(np.asarray(m, dtype=np.float64))
    mult = np.rint(frac * 2.0 ** 31).astype(np.int64)
    carry = mult == 2 ** 31
    mult[carry] //= 2
    exp = exp + carry
    shift = 31 - exp.astype(np.int64)
    if np.any(shift < 1) or np.any(shift > 62):
        raise UsageError("requantisation multiplier out of range: the activation scales are degenerate")
    return mult, shift


def requantize_tflm(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, zero_point: int, lo: int,
                    hi: int) -> np.ndarray:
    """TFLM's requantisation: MultiplyByQuantizedMultiplier(acc, mult, shift) + zero_point,
    clipped to [lo, hi] (act_min, act_max), as int8."""
    out = multiply_by_quantized_multiplier(acc, mult, shift) + zero_point
    return np.clip(out, lo, hi).astype(np.int8)


def requantize(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(acc * mult * 2**-shift), clipped to [lo, hi], as int8 (round half up)."""
    prod = acc.astype(np.int64) * mult
    prod += np.left_shift(np.int64(1), shift - 1)
    np.right_shift(prod, shift, out=prod)
    return np.clip(prod, lo, hi).astype(np.int8)


def clamp_range(activation: str, out_scale: float, zero_point: int | None = None) -> tuple[int, int]:
    """The int8 output range [lo, hi] that applies ``activation`` at output scale ``out_scale``;
    with a ``zero_point`` (asymmetric) TFLM's [act_min, act_max]: identity [-128, 127], ReLU
    [zp, 127], ReLU6 [zp, min(127, zp + round(6 / s))] (float32, rounded half away from zero)."""
    if zero_point is not None and activation in INT8_ACTIVATIONS:
        if activation == "identity":
            return -QMAX - 1, QMAX
        lo = max(int(zero_point), -QMAX - 1)
        if activation == "relu":
            return lo, QMAX
        six = float(round_half_away(np.float32(6.0) / np.float32(out_scale)))
        six = int(min(six, 2 * QMAX + 1))  # beyond the int8 range either way (inf for a tiny scale)
        return lo, min(QMAX, int(zero_point) + six)
    if activation == "identity":
        return -QMAX, QMAX
    if activation == "relu":
        return 0, QMAX
    if activation == "relu6":  # float32 division and rint, as et_int8.c
        return 0, int(min(QMAX, np.rint(np.float32(6.0) / np.float32(out_scale))))
    raise UsageError(f"the int8 forward pass fuses the activation into its output clamp: "
                     f"{', '.join(INT8_ACTIVATIONS)}, not '{activation}'")


def _check_scale(k: int, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v) \
            or not v > 0:
        raise UsageError(f"layer {k}: activation scales must be positive and finite")
    return float(np.float32(v))


def check_int8_layers(layers: Sequence[Layer]) -> None:
    """Check every int8 layer's tensors and set its requantiser (from its own and the next
    layer's input scales). Raises UsageError naming the layer."""
    n = len(layers)
    asym = bool(layers[0].quant.asymmetric) if layers[0].quant is not None else False
    span = 255 if asym else 128  # |q - zero point| at most
    if not layers[-1].spec.has_params:
        raise UsageError(f"the last layer of an int8 backbone gives the logits and must be dense or a convolution "
                         f"(it is {layers[-1].spec.kind})")
    for k, layer in enumerate(layers):
        q, spec = layer.quant, layer.spec
        if q is None:
            raise UsageError(f"layer {k} ({spec.kind}) has no int8 parameters: in an int8 backbone every layer "
                             f"carries its input scale")
        q.input_scale = _check_scale(k, q.input_scale)
        if bool(q.asymmetric) != asym:
            raise UsageError(f"layer {k}: the layers of an int8 backbone are all symmetric or all asymmetric")
        q.asymmetric = asym
        zp = q.zero_point
        if isinstance(zp, bool) or not isinstance(zp, (int, np.integer)) or not (-QMAX - 1 <= zp <= QMAX) \
                or (zp != 0 and not asym):
            raise UsageError(f"layer {k}: the input zero point must be a whole number in -128..127 "
                             f"(0 for symmetric activations), got {zp!r}")
        q.zero_point = int(zp)
        if k < n - 1:
            clamp_range(spec.activation, 1.0)
        if not spec.has_params:
            for name, dt in (("qweight", np.int8), ("wscale", np.float32), ("qbias", np.int32)):
                a = np.asarray(getattr(q, name))
                if a.size:
                    raise UsageError(f"layer {k} ({spec.kind}) has no weights, but int8 tensors were given")
                setattr(q, name, np.zeros(0, dt))
            continue
        q.qweight = np.ascontiguousarray(q.qweight)
        q.wscale = np.asarray(q.wscale, np.float32)
        q.qbias = np.asarray(q.qbias)
        w, s, b = q.qweight, q.wscale, q.qbias
        if w.dtype != np.int8 or w.shape != spec.weight_shape:
            raise UsageError(f"layer {k}: int8 weight {list(spec.weight_shape)} expected, got {w.dtype}{list(w.shape)}")
        if s.shape != spec.bias_shape or b.shape != spec.bias_shape or b.dtype != np.int32:
            raise UsageError(f"layer {k}: weight scale {s.shape} / int32 bias {b.dtype}{b.shape} "
                             f"do not fit {spec.out_channels} output channels")
        if not (np.all(np.isfinite(s)) and np.all(s > 0)):
            raise UsageError(f"layer {k}: weight scales must be positive and finite")
        # int32 accumulator: |sum q_x q_w| <= fan_in * 128 * 127 (255 asymmetric), plus the bias.
        fan_in = int(np.prod(spec.weight_shape[1:]))
        bound = fan_in * span * QMAX + int(np.abs(b.astype(np.int64)).max(initial=0))
        if bound >= 2 ** 31:
            raise UsageError(f"layer {k}: the int32 accumulator could overflow ({bound} >= 2**31)")
    if asym:
        _tflm_requantisers(layers)
        return
    for k in range(n - 1):
        spec, q = layers[k].spec, layers[k].quant
        s_out = np.float32(layers[k + 1].quant.input_scale)
        if spec.has_params:
            m = np.float64(np.float32(q.input_scale)) * q.wscale / s_out
            q.requant = requant_params(m)
        elif spec.kind == "add":
            m = np.asarray([np.float32(q.input_scale), np.float32(layers[spec.source].quant.input_scale)],
                           np.float64) / np.float64(s_out)
            _, shift = requant_params(m.max(keepdims=True))
            mult = np.minimum(np.rint(m * 2.0 ** shift[0]), 2 ** 31 - 1).astype(np.int64)
            q.requant = (mult, np.repeat(shift, 2))
        else:
            if np.float32(q.input_scale) != s_out:
                raise UsageError(f"layer {k} ({spec.kind}) keeps its input's scale: layer {k + 1}'s input scale "
                                 f"must equal it ({q.input_scale} != {float(s_out)})")
            q.requant = None
    layers[-1].quant.requant = None


def _tflm_requantisers(layers: Sequence[Layer]) -> None:
    """The derived int8 parameters of an asymmetric backbone, as TFLM prepares its kernels:
    each hidden weighted layer's per-channel (multiplier, exponent) of s_in * s_w[c] / s_out;
    an add's three (TFLM's add: its inputs' s / (2 max(s_in, s_src)) and the output's
    2 max(s_in, s_src) / (2**20 s_out)); the zero points of each layer's output and an add's source."""
    n = len(layers)
    for k in range(n):
        spec, q = layers[k].spec, layers[k].quant
        q.out_zero_point = layers[k + 1].quant.zero_point if k < n - 1 else 0
        q.source_zero_point = layers[spec.source].quant.zero_point if spec.kind == "add" else 0
        q.requant = None
        if k == n - 1:
            continue
        s_in, s_out = np.float64(np.float32(q.input_scale)), np.float64(np.float32(layers[k + 1].quant.input_scale))
        if spec.has_params:
            mult, shift = requant_params_tflm(s_in * q.wscale.astype(np.float64) / s_out)
            # MultiplyByQuantizedMultiplier shifts the int32 accumulator left first: it must fit
            fan_in = int(np.prod(spec.weight_shape[1:]))
            bound = fan_in * 255 * QMAX + np.abs(q.qbias.astype(np.int64))
            if np.any(bound >= np.left_shift(np.int64(1), 31 - np.maximum(shift, 0))):
                raise UsageError(f"layer {k}: a requantisation multiplier above 1 would overflow the int32 "
                                 f"accumulator (the activation scales are degenerate)")
            q.requant = (mult, shift)
        elif spec.kind == "add":
            s_src = np.float64(np.float32(layers[spec.source].quant.input_scale))
            twice_max = 2.0 * max(s_in, s_src)
            m = np.asarray([s_in / twice_max, s_src / twice_max, twice_max / ((1 << ADD_LEFT_SHIFT) * s_out)])
            mult, shift = requant_params_tflm(m)
            if np.any(shift > 0):
                raise UsageError(f"layer {k} (add): its output scale is too small for TFLM's add "
                                 f"(the output multiplier must be below 1)")
            q.requant = (mult, shift)
        elif np.float32(q.input_scale) != np.float32(s_out) or q.zero_point != layers[k + 1].quant.zero_point:
            raise UsageError(f"layer {k} ({spec.kind}) keeps its input's scale and zero point: layer {k + 1}'s "
                             f"input must have the same ({q.input_scale}, {q.zero_point} != "
                             f"{layers[k + 1].quant.input_scale}, {layers[k + 1].quant.zero_point})")


def int8_backbone(qweights: Sequence[np.ndarray], wscales: Sequence[np.ndarray], qbiases: Sequence[np.ndarray],
                  act_scales: Sequence[float], *, activation: str = "relu", labels: Sequence[str] | None = None,
                  input_mean: np.ndarray | None = None, input_std: np.ndarray | None = None,
                  kernel: str = "blas") -> Backbone:
    """An int8 MLP from its tensors: ``qweights[k]`` int8 (out, in), ``wscales[k]`` float32
    (out,), ``qbiases[k]`` int32 (out,), ``act_scales[k]`` the float scale of layer k's input."""
    n = len(qweights)
    if n < 1 or not (len(wscales) == len(qbiases) == len(act_scales) == n):
        raise UsageError("an int8 backbone needs one weight, weight scale, bias and input scale per layer")
    for k, w in enumerate(qweights):
        if np.ndim(w) != 2:
            raise UsageError(f"layer {k}: int8 weight (out, in) expected, got shape {list(np.shape(w))}")
    sizes = [np.shape(qweights[0])[1]] + [np.shape(w)[0] for w in qweights]
    specs = chain_specs(sizes, activation)
    scales = np.asarray(act_scales, np.float32).reshape(n)
    layers = [Layer(spec, quant=QuantParams(np.asarray(w), np.asarray(s), np.asarray(b), float(a)))
              for spec, w, s, b, a in zip(specs, qweights, wscales, qbiases, scales)]
    return Backbone.from_layers(layers, labels=labels, input_mean=input_mean, input_std=input_std,
                                int8_kernel=kernel, activation=activation)


def _need_int8(bb: Backbone) -> None:
    if not bb.is_int8:
        raise UsageError("this needs an int8 backbone (edgetune.quant.quantize makes one)")


def act_scales(bb: Backbone) -> np.ndarray:
    """The float scale of every layer's int8 input, (n_layers,) float32."""
    _need_int8(bb)
    return np.asarray([layer.quant.input_scale for layer in bb.layers], np.float32)


def quantize_input(bb: Backbone, x: np.ndarray) -> np.ndarray:
    """Prepared (normalised) float inputs -> int8 at the first layer's input scale (and zero point)."""
    q = bb.layers[0].quant
    return quantize_activation(x, q.input_scale, zero_point=q.zero_point if q.asymmetric else None)


def accumulate(bb: Backbone, k: int, q: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """int32 result of layer k on int8 rows ``q`` (its kind's ``int8_accumulate``): the
    accumulator, bias included, of a dense or convolution layer; the output, before the clamp,
    of the others (``residual``: an add's source input)."""
    layer = bb.layers[k]
    return layer.spec.ops.int8_accumulate(layer.spec, q, layer.quant, bb.int8_kernel, residual)


def layer_int8(bb: Backbone, k: int, q: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """Hidden layer k on int8 inputs: the int8 input of layer k+1 (activation fused)."""
    layer = bb.layers[k]
    spec, lq = layer.spec, layer.quant
    zp_out = lq.out_zero_point if lq.asymmetric else None
    lo, hi = clamp_range(spec.activation, bb.layers[k + 1].quant.input_scale, zp_out)
    acc = accumulate(bb, k, q, residual)
    if not spec.has_params:
        return np.clip(acc, lo, hi).astype(np.int8)
    mult, shift = lq.requant
    npos = spec.out_features // spec.out_channels
    if npos > 1:
        acc, mult, shift = acc.reshape(q.shape[0], spec.out_channels, npos), mult[:, None], shift[:, None]
    if lq.asymmetric:
        out = requantize_tflm(acc, mult, shift, zp_out, lo, hi)
    else:
        out = requantize(acc, mult, shift, lo, hi)
    return out.reshape(q.shape[0], spec.out_features)


def run_int8(bb: Backbone, q: np.ndarray, start: int = 0, stop: int | None = None,
             on_input=None) -> np.ndarray:
    """Hidden layers ``start .. stop-1`` on int8 input of layer ``start``; int8 input of ``stop``.
    ``on_input(k, q_k)`` sees every layer's int8 input on the way."""
    stop = bb.n_layers - 1 if stop is None else stop
    sources = bb.sources
    kept: dict[int, np.ndarray] = {}
    for k in range(start, stop):
        if on_input is not None:
            on_input(k, q)
        if k in sources:
            kept[k] = q
        spec = bb.layers[k].spec
        if spec.kind == "add" and spec.source not in kept:
            raise UsageError(f"layer {k} adds the input of layer {spec.source}, before the start layer {start}")
        q = layer_int8(bb, k, q, kept.get(spec.source) if spec.kind == "add" else None)
    return q


def logits_from(bb: Backbone, q_last: np.ndarray) -> np.ndarray:
    """Float logits from the int8 input of the last layer."""
    k = bb.n_layers - 1
    q = bb.layers[k].quant
    acc = accumulate(bb, k, q_last)
    return (acc * (np.float32(q.input_scale) * q.wscale)).astype(np.float32)


def _row_blocks(bb: Backbone, n: int):
    if bb.is_plain_mlp() or n <= Backbone.BLOCK_ROWS:
        yield slice(0, n)
        return
    for lo in range(0, n, Backbone.BLOCK_ROWS):
        yield slice(lo, min(n, lo + Backbone.BLOCK_ROWS))


def int8_forward(bb: Backbone, x: np.ndarray) -> np.ndarray:
    """Float logits for prepared inputs, computed by the int8 kernel."""
    _need_int8(bb)
    out = np.empty((x.shape[0], bb.sizes[-1]), np.float32)
    for b in _row_blocks(bb, x.shape[0]):
        q = run_int8(bb, quantize_input(bb, x[b]))
        out[b] = logits_from(bb, q)
    return out


def int8_forward_taps(bb: Backbone, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows [q_0 | ... | q_{n-1}], float32 logits): every layer's int8 input side by side
    (for an MLP the skip adapters' inputs, exactly), as et_int8_forward_taps gives them."""
    _need_int8(bb)
    widths = bb.in_widths
    cols = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    rows = np.empty((x.shape[0], int(cols[-1])), np.int8)
    logits = np.empty((x.shape[0], bb.sizes[-1]), np.float32)
    last = bb.n_layers - 1
    for b in _row_blocks(bb, x.shape[0]):
        dst = rows[b]

        def keep(k: int, q: np.ndarray) -> None:
            dst[:, cols[k]:cols[k + 1]] = q

        q = run_int8(bb, quantize_input(bb, x[b]), on_input=keep)
        keep(last, q)
        logits[b] = logits_from(bb, q)
    return rows, logits


def int8_float_taps(bb: Backbone, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``Backbone.forward_taps`` of an int8 backbone: [t_1 | ... | t_n | z] in float32, each tap
    the dequantised int8 input of a layer with weights (pooled to one value per channel,
    the mean of its int8 values times the scale, where it is spatial), z the logits."""
    _need_int8(bb)
    widths = bb.tap_widths
    d = sum(widths)
    if all(not s.spatial for s in bb.specs):
        rows, logits = int8_forward_taps(bb, x)  # before `out`: the pass's temporaries are freed by then
        if out is None:
            out = np.empty((x.shape[0], d + bb.sizes[-1]), np.float32)
        if is_asymmetric(bb):  # (q - zp) * s, the difference exact in float32
            zps = np.repeat([layer.quant.zero_point for layer in bb.layers], bb.in_widths).astype(np.float32)
            np.multiply(rows.astype(np.float32) - zps, np.repeat(act_scales(bb), bb.in_widths), out=out[:, :d])
        else:
            np.multiply(rows, tap_scales(bb), out=out[:, :d])
        out[:, d:] = logits
        return out
    if out is None:
        out = np.empty((x.shape[0], d + bb.sizes[-1]), np.float32)
    cols = dict(zip(bb.tap_layers, np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)))
    last = bb.n_layers - 1
    for b in _row_blocks(bb, x.shape[0]):
        dst = out[b]

        def tap(k: int, q: np.ndarray) -> None:
            if k not in cols:
                return
            spec = bb.layers[k].spec
            s = np.float32(bb.layers[k].quant.input_scale)
            zp = bb.layers[k].quant.zero_point  # 0 when symmetric
            t = dst[:, cols[k]:cols[k] + spec.tap_width]
            if spec.spatial:
                npos = spec.in_features // spec.in_shape[0]
                total = q.reshape(q.shape[0], spec.in_shape[0], npos).sum(axis=2, dtype=np.int32)
                if zp:
                    total -= np.int32(npos * zp)
                np.multiply(total, s / np.float32(npos), out=t)
            elif zp:
                np.multiply(q.astype(np.int32) - np.int32(zp), s, out=t)
            else:
                np.multiply(q, s, out=t)

        q = run_int8(bb, quantize_input(bb, x[b]), on_input=tap)
        tap(last, q)
        dst[:, d:] = logits_from(bb, q)
    return out


def tap_scales(bb: Backbone) -> np.ndarray:
    """One dequantisation scale per column of the int8 tap rows of an int8 MLP (an int8 skip-cache's
    column scales: a CNN's taps are pooled floats, not int8 values)."""
    _need_int8(bb)
    if is_asymmetric(bb):
        raise UsageError("an int8 skip-cache stores the symmetric int8 taps of an int8 MLP; this model has "
                         "asymmetric activations (not yet supported: use the float skip-cache)")
    if any(s.spatial for s in bb.specs):
        raise UsageError("an int8 skip-cache stores int8 MLP taps; an int8 CNN's taps are pooled floats "
                         "(use the float skip-cache)")
    return np.repeat(act_scales(bb), bb.in_widths).astype(np.float32)


def dequantize(bb: Backbone) -> Backbone:
    """The float model an int8 model approximates (for comparison, not deployment)."""
    _need_int8(bb)
    layers = []
    for layer in bb.layers:
        q = layer.quant
        if not layer.spec.has_params:
            layers.append(Layer(layer.spec))
            continue
        w = (q.qweight * q.wscale.reshape((-1,) + (1,) * (q.qweight.ndim - 1))).astype(np.float32)
        b = (q.qbias * (np.float32(q.input_scale) * q.wscale)).astype(np.float32)
        layers.append(Layer(layer.spec, w, b))
    return Backbone.from_layers(layers, labels=bb.labels, input_mean=bb.input_mean, input_std=bb.input_std,
                                activation=bb.activation.name)


def _check_percentile(percentile: float) -> None:
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (50, 100], got {percentile}")


def calibrate(backbone: Backbone, x: np.ndarray, *, percentile: float = 100.0) -> np.ndarray:
    """Per-tensor scales of every skip tap (each weighted layer's input; an MLP's every layer
    input) and of the logits, last, on raw inputs ``x``."""
    _check_percentile(percentile)
    taps = backbone.forward_taps(backbone.prepare(x, "calibration x"))
    scales = []
    col = 0
    for w in [*backbone.tap_widths, backbone.sizes[-1]]:
        seg = np.abs(taps[:, col:col + w])
        amax = float(np.percentile(seg, percentile)) if percentile < 100 else float(seg.max())
        scales.append(amax / QMAX if amax > 0 else 1.0)
        col += w
    return np.asarray(scales, np.float32)


#: Values of one layer's input kept for a percentile below 100 (a strided sample of the
#: calibration activations, so a CNN's calibration memory stays bounded).
PERCENTILE_VALUES = 2 ** 22


def calibrate_layers(backbone: Backbone, x: np.ndarray, *, percentile: float = 100.0) -> np.ndarray:
    """The int8 input scale of every layer, (n_layers,) float32, on raw inputs ``x``: this
    percentile of |input| / 127, except after a pooling, gap or flatten layer, which keeps
    its input's scale. With a percentile below 100 a spatial layer's range is taken on at
    most ``PERCENTILE_VALUES`` of its input values (every j-th, in order)."""
    _check_percentile(percentile)
    xp = backbone.prepare(x, "calibration x")
    n = backbone.n_layers
    amax = np.zeros(n)
    seen: list[list[np.ndarray]] = [[] for _ in range(n)]
    steps = [max(1, -(-xp.shape[0] * w // PERCENTILE_VALUES)) for w in backbone.in_widths]

    def record(k: int, h: np.ndarray) -> None:
        a = np.abs(h).ravel()
        if percentile < 100:
            seen[k].append(a[::steps[k]] if steps[k] > 1 else a.copy())
        elif a.size:
            amax[k] = max(amax[k], float(a.max()))

    for lo in range(0, xp.shape[0], Backbone.BLOCK_ROWS):
        backbone.walk(xp[lo:lo + Backbone.BLOCK_ROWS], on_input=record)
    scales = np.ones(n, np.float32)
    for k in range(n):
        if k > 0 and backbone.layers[k - 1].spec.kind in SAME_SCALE_KINDS:
            scales[k] = scales[k - 1]
            continue
        top = float(np.percentile(np.concatenate(seen[k]), percentile)) if percentile < 100 else amax[k]
        scales[k] = top / QMAX if top > 0 else 1.0
    return scales


def calibrate_zero_points(backbone: Backbone, x: np.ndarray, *, percentile: float = 100.0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric int8 (scale (n_layers,) float32, zero point (n_layers,) int32) of every layer's
    input on raw inputs ``x``, TFLite's way: the range [lo, hi] (the min and max, or the
    100 - P and P percentiles, on at most ``PERCENTILE_VALUES`` values per layer) made to include
    0, ``s = (hi - lo) / 255``, ``zp = round(-128 - lo / s)`` clamped to -128..127. After a
    pooling, gap or flatten layer the scale and zero point are the ones before it."""
    _check_percentile(percentile)
    xp = backbone.prepare(x, "calibration x")
    n = backbone.n_layers
    lows, highs = np.zeros(n), np.zeros(n)
    seen: list[list[np.ndarray]] = [[] for _ in range(n)]
    steps = [max(1, -(-xp.shape[0] * w // PERCENTILE_VALUES)) for w in backbone.in_widths]

    def record(k: int, h: np.ndarray) -> None:
        a = np.asarray(h).ravel()
        if percentile < 100:
            seen[k].append(a[::steps[k]] if steps[k] > 1 else a.copy())
        elif a.size:
            lows[k], highs[k] = min(lows[k], float(a.min())), max(highs[k], float(a.max()))

    for lo in range(0, xp.shape[0], Backbone.BLOCK_ROWS):
        backbone.walk(xp[lo:lo + Backbone.BLOCK_ROWS], on_input=record)
    scales = np.ones(n, np.float32)
    zps = np.zeros(n, np.int32)
    for k in range(n):
        if k > 0 and backbone.layers[k - 1].spec.kind in SAME_SCALE_KINDS:
            scales[k], zps[k] = scales[k - 1], zps[k - 1]
            continue
        if percentile < 100:
            v = np.concatenate(seen[k])
            lows[k], highs[k] = float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile))
        lo_k, hi_k = min(lows[k], 0.0), max(highs[k], 0.0)
        if hi_k - lo_k <= 0:
            continue  # an input that is always 0: any scale, zero point 0
        scale = (hi_k - lo_k) / 255.0
        scales[k] = scale
        zps[k] = int(np.clip(round_half_away(-128.0 - lo_k / float(np.float32(scale))), -QMAX - 1, QMAX))
    return scales, zps


def quantize(backbone: Backbone, x_calib: np.ndarray, *, percentile: float = 100.0,
             kernel: str = "blas", activations: str = "symmetric") -> Backbone:
    """Post-training quantisation of a trained float backbone, calibrated on raw inputs ``x_calib``
    (pre-training data: the device never needs the fine-tuning data for this). Every layer kind
    is quantised; the last layer must be dense or a convolution, and the activations between
    layers identity, ReLU or ReLU6 (fused into the int8 clamp). ``activations``: "symmetric"
    (edgetune's int8, zero point 0) or "asymmetric" (a zero point per layer input, computed in
    TFLite Micro's arithmetic; see the module's docstring)."""
    if activations not in ACTIVATION_MODES:
        raise UsageError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    if backbone.is_int8:
        raise UsageError("this backbone is already int8")
    if not backbone.layers[-1].spec.has_params:
        raise UsageError(f"int8 quantisation needs a last layer with weights (dense or convolution), this backbone "
                         f"ends with {backbone.layers[-1].spec.kind}")
    for k, layer in enumerate(backbone.layers[:-1]):
        if layer.spec.activation not in INT8_ACTIVATIONS:
            raise UsageError(f"int8 quantisation fuses the activations into the int8 clamp: "
                             f"{', '.join(INT8_ACTIVATIONS)}; layer {k} has '{layer.spec.activation}'")
    asym = activations == "asymmetric"
    zps = np.zeros(backbone.n_layers, np.int32)
    if asym:
        scales, zps = calibrate_zero_points(backbone, x_calib, percentile=percentile)
    elif all(s.kind == "dense" for s in backbone.specs):
        scales = calibrate(backbone, x_calib, percentile=percentile)[:-1]  # an MLP's taps are its layers' inputs
    else:
        scales = calibrate_layers(backbone, x_calib, percentile=percentile)
    layers = []
    for k, layer in enumerate(backbone.layers):
        if not layer.spec.has_params:
            layers.append(Layer(layer.spec, quant=_empty_quant(scales[k], int(zps[k]), asym)))
            continue
        q, s = quantize_weight(layer.weight)
        bq = np.rint(np.asarray(layer.bias, np.float64) / (float(scales[k]) * s.astype(np.float64)))
        if np.abs(bq).max(initial=0) >= 2 ** 30:
            raise UsageError(f"layer {k}: the bias does not fit int32 at this scale (calibration data too narrow?)")
        layers.append(Layer(layer.spec, quant=QuantParams(q, s, bq.astype(np.int32), float(scales[k]),
                                                          zero_point=int(zps[k]), asymmetric=asym)))
    return Backbone.from_layers(layers, labels=backbone.labels, input_mean=backbone.input_mean,
                                input_std=backbone.input_std, int8_kernel=kernel,
                                activation=backbone.activation.name)


def load_any(path: str | os.PathLike) -> Backbone:
    """A float or an int8 model directory, whichever ``path`` holds (``Backbone.load`` reads both)."""
    return Backbone.load(path)
