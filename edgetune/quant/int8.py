"""Post-training int8 quantisation of a Backbone and the int8 forward pass.

Weights: symmetric int8 per output channel, ``W ~= s_w[:, None] * Wq`` with
``s_w = max|W[c, :]| / 127``. Activations: one symmetric scale per layer input,
``h_k ~= s_k * q_k``, calibrated on pre-training data. Biases: int32 in the accumulator's
unit, ``b ~= s_k * s_w * bq``. A layer is then

    acc   = q_k @ Wq.T + bq                       (int32 accumulation)
    q_k+1 = clip(requant(acc, s_k s_w / s_k+1), 0, 127)   (ReLU fused into the clip)

where ``requant`` is a fixed-point multiply and shift, as an MCU kernel does it. The last
layer's accumulator is dequantised to float logits. The input normalisation stays float
(it is folded into the input quantisation).

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
from ..nn.layers import QMAX, TILE_BYTES, Layer, QuantParams, chain_specs
from ..nn.mlp import INT8_KERNELS as KERNELS, Backbone

__all__ = ["KERNELS", "QMAX", "TILE_BYTES", "accumulate", "act_scales", "calibrate", "check_int8_layers",
           "dequantize", "int8_backbone", "int8_forward", "int8_forward_taps", "layer_int8", "load_any",
           "logits_from", "quantize", "quantize_activation", "quantize_input", "quantize_weight",
           "requant_params", "requantize", "run_int8", "tap_scales"]


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: returns (Wq int8 (out, in), s_w float32 (out,))."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / QMAX, 1.0)
    q = np.clip(np.rint(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_activation(h: np.ndarray, scale: float, *, relu: bool = False) -> np.ndarray:
    """Symmetric int8 with one scale; ``relu`` clips at 0 (a ReLU output is never negative)."""
    q = np.divide(h, np.float32(scale), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 0 if relu else -QMAX, QMAX, out=q)
    return q.astype(np.int8)


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


def requantize(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(acc * mult * 2**-shift), clipped to [lo, hi], as int8 (round half up)."""
    prod = acc.astype(np.int64) * mult
    prod += np.left_shift(np.int64(1), shift - 1)
    np.right_shift(prod, shift, out=prod)
    return np.clip(prod, lo, hi).astype(np.int8)


def check_int8_layers(layers: Sequence[Layer]) -> None:
    """Check every int8 layer's tensors and set its requantiser (from its own and the next
    layer's input scales). Raises UsageError naming the layer."""
    n = len(layers)
    for k, layer in enumerate(layers):
        if layer.spec.kind != "dense":
            raise UsageError(f"layer {k} is {layer.spec.kind}: int8 backbones are MLPs (dense layers) in this "
                             f"version")
        q, spec = layer.quant, layer.spec
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
        if isinstance(q.input_scale, bool) or not np.isfinite(q.input_scale) or not q.input_scale > 0:
            raise UsageError("activation scales must be positive and finite")
        q.input_scale = float(np.float32(q.input_scale))
        # int32 accumulator: |sum q_x q_w| <= fan_in * 128 * 127, plus the bias.
        fan_in = int(np.prod(spec.weight_shape[1:]))
        bound = fan_in * 128 * QMAX + int(np.abs(b.astype(np.int64)).max(initial=0))
        if bound >= 2 ** 31:
            raise UsageError(f"layer {k}: the int32 accumulator could overflow ({bound} >= 2**31)")
        if k < n - 1 and spec.activation not in ("relu", "identity"):
            raise UsageError(f"the int8 forward pass fuses ReLU into requantisation; "
                             f"activation '{spec.activation}' is not supported")
    for k in range(n - 1):
        q = layers[k].quant
        m = np.float64(np.float32(q.input_scale)) * q.wscale / np.float32(layers[k + 1].quant.input_scale)
        q.requant = requant_params(m)
    layers[-1].quant.requant = None


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
    """Prepared (normalised) float inputs -> int8 at the first layer's input scale."""
    return quantize_activation(x, bb.layers[0].quant.input_scale)


def accumulate(bb: Backbone, k: int, q: np.ndarray) -> np.ndarray:
    """int32 accumulator of layer k for int8 inputs ``q`` (samples, in_k), bias included."""
    layer = bb.layers[k]
    return layer.spec.ops.int8_accumulate(layer.spec, q, layer.quant, bb.int8_kernel)


def layer_int8(bb: Backbone, k: int, q: np.ndarray) -> np.ndarray:
    """Hidden layer k on int8 inputs: the int8 input of layer k+1 (ReLU fused)."""
    layer = bb.layers[k]
    mult, shift = layer.quant.requant
    lo = 0 if layer.spec.activation == "relu" else -QMAX
    return requantize(accumulate(bb, k, q), mult, shift, lo, QMAX)


def run_int8(bb: Backbone, q: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Hidden layers ``start .. stop-1`` on int8 input of layer ``start``; int8 input of ``stop``."""
    stop = bb.n_layers - 1 if stop is None else stop
    for k in range(start, stop):
        q = layer_int8(bb, k, q)
    return q


def logits_from(bb: Backbone, q_last: np.ndarray) -> np.ndarray:
    """Float logits from the int8 input of the last layer."""
    k = bb.n_layers - 1
    q = bb.layers[k].quant
    acc = accumulate(bb, k, q_last)
    return (acc * (np.float32(q.input_scale) * q.wscale)).astype(np.float32)


def int8_forward(bb: Backbone, x: np.ndarray) -> np.ndarray:
    """Float logits for prepared inputs, computed by the int8 kernel."""
    _need_int8(bb)
    return logits_from(bb, run_int8(bb, quantize_input(bb, x)))


def int8_forward_taps(bb: Backbone, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows [q_0 | ... | q_{n-1}], float32 logits): the skip adapters' inputs, exactly."""
    _need_int8(bb)
    widths = bb.in_widths
    rows = np.empty((x.shape[0], sum(widths)), np.int8)
    q = quantize_input(bb, x)
    col = 0
    for k in range(bb.n_layers):
        rows[:, col:col + widths[k]] = q
        col += widths[k]
        if k < bb.n_layers - 1:
            q = layer_int8(bb, k, q)
    return rows, logits_from(bb, q)


def tap_scales(bb: Backbone) -> np.ndarray:
    """One dequantisation scale per column of the int8 tap rows."""
    return np.repeat(act_scales(bb), bb.in_widths).astype(np.float32)


def dequantize(bb: Backbone) -> Backbone:
    """The float model an int8 model approximates (for comparison, not deployment)."""
    _need_int8(bb)
    layers = []
    for layer in bb.layers:
        q = layer.quant
        w = (q.qweight * q.wscale.reshape((-1,) + (1,) * (q.qweight.ndim - 1))).astype(np.float32)
        b = (q.qbias * (np.float32(q.input_scale) * q.wscale)).astype(np.float32)
        layers.append(Layer(layer.spec, w, b))
    return Backbone.from_layers(layers, labels=bb.labels, input_mean=bb.input_mean, input_std=bb.input_std,
                                activation=bb.activation.name)


def calibrate(backbone: Backbone, x: np.ndarray, *, percentile: float = 100.0) -> np.ndarray:
    """Per-tensor scales of every skip tap (each weighted layer's input; an MLP's every layer
    input) and of the logits, last, on raw inputs ``x``."""
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (50, 100], got {percentile}")
    taps = backbone.forward_taps(backbone.prepare(x, "calibration x"))
    scales = []
    col = 0
    for w in [*backbone.tap_widths, backbone.sizes[-1]]:
        seg = np.abs(taps[:, col:col + w])
        amax = float(np.percentile(seg, percentile)) if percentile < 100 else float(seg.max())
        scales.append(amax / QMAX if amax > 0 else 1.0)
        col += w
    return np.asarray(scales, np.float32)


def quantize(backbone: Backbone, x_calib: np.ndarray, *, percentile: float = 100.0,
             kernel: str = "blas") -> Backbone:
    """Post-training quantisation of a trained float backbone, calibrated on raw inputs ``x_calib``
    (pre-training data: the device never needs the fine-tuning data for this)."""
    if backbone.is_int8:
        raise UsageError("this backbone is already int8")
    for layer in backbone.layers:
        if layer.spec.kind != "dense":
            raise UsageError(f"int8 quantisation supports MLPs (dense layers) in this version; this backbone has "
                             f"a {layer.spec.kind} layer")
    for layer in backbone.layers[:-1]:
        if layer.spec.activation not in ("relu", "identity"):
            raise UsageError(f"int8 quantisation supports ReLU MLPs, not '{layer.spec.activation}'")
    scales = calibrate(backbone, x_calib, percentile=percentile)[:-1]
    qw, ws, qb = [], [], []
    for k, (w, b) in enumerate(zip(backbone.weights, backbone.biases)):
        q, s = quantize_weight(w)
        bq = np.rint(np.asarray(b, np.float64) / (float(scales[k]) * s.astype(np.float64)))
        if np.abs(bq).max(initial=0) >= 2 ** 30:
            raise UsageError(f"layer {k}: the bias does not fit int32 at this scale (calibration data too narrow?)")
        qw.append(q)
        ws.append(s)
        qb.append(bq.astype(np.int32))
    layers = [Layer(layer.spec, quant=QuantParams(q, s, b, float(a)))
              for layer, q, s, b, a in zip(backbone.layers, qw, ws, qb, scales)]
    return Backbone.from_layers(layers, labels=backbone.labels, input_mean=backbone.input_mean,
                                input_std=backbone.input_std, int8_kernel=kernel,
                                activation=backbone.activation.name)


def load_any(path: str | os.PathLike) -> Backbone:
    """A float or an int8 model directory, whichever ``path`` holds (``Backbone.load`` reads both)."""
    return Backbone.load(path)
