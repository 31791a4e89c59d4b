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

__all__ = ["KERNELS", "QMAX", "TILE_BYTES", "accumulate", "act_scales", "calibrate", "calibrate_layers",
           "check_int8_layers", "clamp_range", "dequantize", "int8_backbone", "int8_forward", "int8_forward_taps",
           "int8_float_taps", "layer_int8", "load_any", "logits_from", "quantize", "quantize_activation",
           "quantize_input", "quantize_weight", "requant_params", "requantize", "run_int8", "tap_scales"]

#: The activations an int8 layer fuses into its output clamp.
INT8_ACTIVATIONS = ("identity", "relu", "relu6")
#: Kinds whose output keeps the input's scale (no requantisation).
SAME_SCALE_KINDS = ("maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d", "gap", "flatten")


def _empty_quant(input_scale: float) -> QuantParams:
    """The int8 parameters of a layer without weights: its input scale only."""
    return QuantParams(np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros(0, np.int32), float(input_scale))


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: returns (Wq int8 as w (out, ...), s_w float32 (out,))."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / QMAX, 1.0)
    q = np.clip(np.rint(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))), -QMAX, QMAX).astype(np.int8)
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


def clamp_range(activation: str, out_scale: float) -> tuple[int, int]:
    """The int8 output range [lo, hi] that applies ``activation`` at output scale ``out_scale``."""
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
    if not layers[-1].spec.has_params:
        raise UsageError(f"the last layer of an int8 backbone gives the logits and must be dense or a convolution "
                         f"(it is {layers[-1].spec.kind})")
    for k, layer in enumerate(layers):
        q, spec = layer.quant, layer.spec
        if q is None:
            raise UsageError(f"layer {k} ({spec.kind}) has no int8 parameters: in an int8 backbone every layer "
                             f"carries its input scale")
        q.input_scale = _check_scale(k, q.input_scale)
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
        # int32 accumulator: |sum q_x q_w| <= fan_in * 128 * 127, plus the bias.
        fan_in = int(np.prod(spec.weight_shape[1:]))
        bound = fan_in * 128 * QMAX + int(np.abs(b.astype(np.int64)).max(initial=0))
        if bound >= 2 ** 31:
            raise UsageError(f"layer {k}: the int32 accumulator could overflow ({bound} >= 2**31)")
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


def accumulate(bb: Backbone, k: int, q: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """int32 result of layer k on int8 rows ``q`` (its kind's ``int8_accumulate``): the
    accumulator, bias included, of a dense or convolution layer; the output, before the clamp,
    of the others (``residual``: an add's source input)."""
    layer = bb.layers[k]
    return layer.spec.ops.int8_accumulate(layer.spec, q, layer.quant, bb.int8_kernel, residual)


def layer_int8(bb: Backbone, k: int, q: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """Hidden layer k on int8 inputs: the int8 input of layer k+1 (activation fused)."""
    layer = bb.layers[k]
    spec = layer.spec
    lo, hi = clamp_range(spec.activation, bb.layers[k + 1].quant.input_scale)
    acc = accumulate(bb, k, q, residual)
    if not spec.has_params:
        return np.clip(acc, lo, hi).astype(np.int8)
    mult, shift = layer.quant.requant
    npos = spec.out_features // spec.out_channels
    if npos == 1:
        return requantize(acc, mult, shift, lo, hi)
    out = requantize(acc.reshape(q.shape[0], spec.out_channels, npos), mult[:, None], shift[:, None], lo, hi)
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
            t = dst[:, cols[k]:cols[k] + spec.tap_width]
            if spec.spatial:
                npos = spec.in_features // spec.in_shape[0]
                total = q.reshape(q.shape[0], spec.in_shape[0], npos).sum(axis=2, dtype=np.int32)
                np.multiply(total, s / np.float32(npos), out=t)
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


def quantize(backbone: Backbone, x_calib: np.ndarray, *, percentile: float = 100.0,
             kernel: str = "blas") -> Backbone:
    """Post-training quantisation of a trained float backbone, calibrated on raw inputs ``x_calib``
    (pre-training data: the device never needs the fine-tuning data for this). Every layer kind
    is quantised; the last layer must be dense or a convolution, and the activations between
    layers identity, ReLU or ReLU6 (fused into the int8 clamp)."""
    if backbone.is_int8:
        raise UsageError("this backbone is already int8")
    if not backbone.layers[-1].spec.has_params:
        raise UsageError(f"int8 quantisation needs a last layer with weights (dense or convolution), this backbone "
                         f"ends with {backbone.layers[-1].spec.kind}")
    for k, layer in enumerate(backbone.layers[:-1]):
        if layer.spec.activation not in INT8_ACTIVATIONS:
            raise UsageError(f"int8 quantisation fuses the activations into the int8 clamp: "
                             f"{', '.join(INT8_ACTIVATIONS)}; layer {k} has '{layer.spec.activation}'")
    if all(s.kind == "dense" for s in backbone.specs):
        scales = calibrate(backbone, x_calib, percentile=percentile)[:-1]  # an MLP's taps are its layers' inputs
    else:
        scales = calibrate_layers(backbone, x_calib, percentile=percentile)
    layers = []
    for k, layer in enumerate(backbone.layers):
        if not layer.spec.has_params:
            layers.append(Layer(layer.spec, quant=_empty_quant(scales[k])))
            continue
        q, s = quantize_weight(layer.weight)
        bq = np.rint(np.asarray(layer.bias, np.float64) / (float(scales[k]) * s.astype(np.float64)))
        if np.abs(bq).max(initial=0) >= 2 ** 30:
            raise UsageError(f"layer {k}: the bias does not fit int32 at this scale (calibration data too narrow?)")
        layers.append(Layer(layer.spec, quant=QuantParams(q, s, bq.astype(np.int32), float(scales[k]))))
    return Backbone.from_layers(layers, labels=backbone.labels, input_mean=backbone.input_mean,
                                input_std=backbone.input_std, int8_kernel=kernel,
                                activation=backbone.activation.name)


def load_any(path: str | os.PathLike) -> Backbone:
    """A float or an int8 model directory, whichever ``path`` holds (``Backbone.load`` reads both)."""
    return Backbone.load(path)
