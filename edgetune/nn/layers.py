"""One description of a layer, read by every part of edgetune.

A backbone is a list of ``Layer``: a ``LayerSpec`` (what the layer is: its kind, the shape
of one sample's input, its output channels, kernel, stride, padding, groups and the
activation applied to its output; every other shape is derived from these) and the
tensors it holds, float (``weight``, ``bias``) or int8 (``quant``). The NumPy engine, the
compiled engine's binding, the memory planner, the exporter, the converters and the model
files all read layers through this module; nothing else spells out "apply layer k".

Shapes are channels-first, as in PyTorch: one sample's input is ``(C,)`` for a dense
layer, ``(C, L)`` for conv1d and ``(C, H, W)`` for conv2d. Between layers a sample travels
as one flat row of ``in_features`` values in that (C-order) layout, so the engines, the
skip taps and the caches handle every kind alike. A dense layer is the 1x1 case of a
convolution (kernel, stride and padding empty, groups 1); conv1d is conv2d with a height
of 1 (one implementation). Each kind supplies one table of operations (``LayerOps``):
output shape, forward, the gradient of the input, the gradients of the weight and bias,
and the int8 accumulation.

Kinds: ``dense``, ``conv1d``, ``conv2d`` (stride, zero padding, groups: depthwise and
pointwise included), ``maxpool1d/2d`` and ``avgpool1d/2d`` (PyTorch's defaults: max pads
with -inf, average counts the zero padding), ``gap`` (global average pooling to one value
per channel), ``flatten`` (a change of shape only: the row is already flat) and ``add``
(a residual: the layer's input plus the input of an earlier layer ``source``, as in the
inverted-residual blocks of MobileNetV2 and MCUNet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import UsageError
from .activations import ACTIVATIONS, Activation, get_activation

#: The layer kinds this version builds, in the order their ids are given to C.
LAYER_KINDS = ("dense", "conv1d", "conv2d", "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d", "gap",
               "flatten", "add")
#: The fields of a layer description as written in model files.
SPEC_FIELDS = ("kind", "in_shape", "out_channels", "kernel", "stride", "padding", "groups", "activation",
               "source")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise UsageError(f"{what} must be a list of whole numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise UsageError(f"{what} must be a list of whole numbers, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _axes(value: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * rank
    return tuple(value)


@dataclass(frozen=True)
class LayerSpec:
    """What a layer is. ``in_shape`` is one sample's input, channels first."""

    kind: str
    in_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1
    activation: str = "identity"
    source: int = -1              # add: the earlier layer whose input is added to this layer's

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise UsageError(f"unknown layer kind {self.kind!r}: this edgetune builds {', '.join(LAYER_KINDS)}")
        object.__setattr__(self, "in_shape", _ints(self.in_shape, "in_shape"))
        for name in ("kernel", "stride", "padding"):
            object.__setattr__(self, name, _ints(getattr(self, name), name))
        for name in ("out_channels", "groups", "source"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise UsageError(f"{name} must be a whole number, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}: use one of {', '.join(sorted(ACTIVATIONS))}")
        if not self.in_shape or min(self.in_shape) < 1:
            raise UsageError(f"a {self.kind} layer's input shape must be whole numbers >= 1, got {list(self.in_shape)}")
        if self.out_channels < 1:
            raise UsageError(f"a {self.kind} layer needs at least one output channel, got {self.out_channels}")
        if self.kind != "add" and self.source != -1:
            raise UsageError(f"only an add layer has a source layer (a {self.kind} layer has source {self.source})")
        self.ops.check(self)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def dense(cls, in_features: int, out_features: int, activation: str = "identity") -> "LayerSpec":
        """A fully-connected layer: (in_features,) -> (out_features,)."""
        return cls("dense", (in_features,), out_features, activation=activation)

    @classmethod
    def conv(cls, in_shape: tuple[int, ...], out_channels: int, kernel: int | tuple[int, ...], *,
             stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0, groups: int = 1,
             activation: str = "identity") -> "LayerSpec":
        """conv1d for an input (C, L), conv2d for (C, H, W); a single number applies to every axis."""
        rank = len(in_shape) - 1
        kind = {1: "conv1d", 2: "conv2d"}.get(rank)
        if kind is None:
            raise UsageError(f"a convolution takes an input (C, L) or (C, H, W), got {list(in_shape)}")
        return cls(kind, tuple(in_shape), out_channels, _axes(kernel, rank), _axes(stride, rank),
                   _axes(padding, rank), groups, activation)

    @classmethod
    def pool(cls, mode: str, in_shape: tuple[int, ...], kernel: int | tuple[int, ...],
             stride: int | tuple[int, ...] | None = None, padding: int | tuple[int, ...] = 0) -> "LayerSpec":
        """``mode`` 'max' or 'avg'; the stride defaults to the kernel, as in PyTorch."""
        rank = len(in_shape) - 1
        if mode not in ("max", "avg") or rank not in (1, 2):
            raise UsageError(f"pooling is 'max' or 'avg' over an input (C, L) or (C, H, W), got {mode!r} "
                             f"and {list(in_shape)}")
        return cls(f"{mode}pool{rank}d", tuple(in_shape), in_shape[0], _axes(kernel, rank),
                   _axes(kernel if stride is None else stride, rank), _axes(padding, rank))

    @classmethod
    def gap(cls, in_shape: tuple[int, ...]) -> "LayerSpec":
        return cls("gap", tuple(in_shape), in_shape[0])

    @classmethod
    def flatten(cls, in_shape: tuple[int, ...]) -> "LayerSpec":
        return cls("flatten", tuple(in_shape), int(np.prod(in_shape)))

    @classmethod
    def add(cls, in_shape: tuple[int, ...], source: int, activation: str = "identity") -> "LayerSpec":
        return cls("add", tuple(in_shape), in_shape[0], activation=activation, source=source)

    # -- derived shapes -----------------------------------------------------------------
    @property
    def ops(self) -> "LayerOps":
        return OPS[self.kind]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.ops.out_shape(self)

    @property
    def in_features(self) -> int:
        """Values in one sample's input (the width of the layer's input as a flat row)."""
        return math.prod(map(int, self.in_shape))  # math.prod: np.prod costs ~5 us per call

    @property
    def out_features(self) -> int:
        return math.prod(map(int, self.out_shape))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.ops.weight_shape(self)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_channels,) if self.has_params else ()

    @property
    def has_params(self) -> bool:
        """True for the kinds with a weight and a bias (dense, conv)."""
        return self.ops.has_params

    @property
    def spatial(self) -> bool:
        """True when the input has a length or height and width beyond its channels."""
        return len(self.in_shape) > 1

    @property
    def tap_width(self) -> int:
        """Width of what a skip adapter reads from this layer's input: one value per channel
        after global average pooling for a spatial input, the input itself otherwise."""
        return self.in_shape[0] if self.spatial else self.in_features

    @property
    def n_params(self) -> int:
        return int(np.prod(self.weight_shape)) + self.out_channels if self.has_params else 0

    @property
    def act(self) -> Activation:
        return get_activation(self.activation)

    # -- files --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "in_shape": list(self.in_shape), "out_channels": self.out_channels,
             "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
             "groups": self.groups, "activation": self.activation}
        if self.kind == "add":
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "LayerSpec":
        """A spec from its file form; a field missing, extra or of the wrong type is a UsageError."""
        if not isinstance(d, Mapping):
            raise UsageError(f"a layer description must be an object, got {type(d).__name__}")
        extra = sorted(set(d) - set(SPEC_FIELDS))
        missing = [f for f in ("kind", "in_shape", "out_channels") if f not in d]
        if extra or missing:
            raise UsageError(f"layer description: missing {missing}, unexpected {extra}")
        if not isinstance(d["kind"], str) or not isinstance(d.get("activation", "identity"), str):
            raise UsageError("layer description: 'kind' and 'activation' must be strings")
        return cls(**{k: d[k] for k in SPEC_FIELDS if k in d})

    def describe(self) -> str:
        extra = ""
        if self.kernel:
            extra = f" k{list(self.kernel)} s{list(self.stride)} p{list(self.padding)}"
        if self.groups != 1:
            extra += f" groups {self.groups}"
        if self.kind == "add":
            extra += f" + input of layer {self.source}"
        return f"{self.kind} {list(self.in_shape)} -> {list(self.out_shape)}{extra}" + (
            f" {self.activation}" if self.activation != "identity" else "")


@dataclass
class QuantParams:
    """A layer's int8 tensors: ``W ~= wscale[:, None] * qweight``, its input ``~= input_scale * q``,
    the bias in the accumulator's unit (``b ~= input_scale * wscale * qbias``), and for a layer
    followed by another the fixed-point requantiser of its output to the next layer's scale.
    In an int8 backbone a layer without weights (pooling, gap, flatten, add) holds one too:
    empty tensors and its input scale; an add's ``requant`` rescales its two inputs to its
    output scale with one shift (``([m_input, m_source], [shift, shift])``).

    ``asymmetric``: the activations are asymmetric int8 in TFLite Micro's arithmetic (its
    input ``~= input_scale * (q - zero_point)``, -128..127); ``requant`` is then TFLM's
    (Q31 multiplier, exponent) per output channel, and an add's is three of them (its
    input's, its source's, its output's, after TFLM's left shift of 20). ``out_zero_point``
    (the next layer's input zero point) and an add's ``source_zero_point`` are derived, as
    ``requant`` is, when the backbone is built (edgetune.quant.int8.check_int8_layers)."""

    qweight: np.ndarray                  # int8, the layer's weight shape
    wscale: np.ndarray                   # float32 (out_channels,)
    qbias: np.ndarray                    # int32 (out_channels,)
    input_scale: float
    requant: tuple[np.ndarray, np.ndarray] | None = None  # (mult, shift) int64 (out_channels,)
    zero_point: int = 0                  # asymmetric: this layer's input zero point (0: symmetric)
    asymmetric: bool = False
    out_zero_point: int = 0              # derived: the next layer's input zero point
    source_zero_point: int = 0           # derived, add: its source layer's input zero point

    @property
    def nbytes(self) -> int:
        n = self.qweight.nbytes + self.wscale.nbytes + self.qbias.nbytes + 4 + (4 if self.asymmetric else 0)
        if self.requant is not None:
            n += sum(a.nbytes for a in self.requant)
        return n


@dataclass
class Layer:
    """A layer's description and its tensors: float ``weight``/``bias``, or int8 ``quant``."""

    spec: LayerSpec
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    quant: QuantParams | None = None

    @property
    def is_int8(self) -> bool:
        return self.quant is not None

    def tensors(self) -> list[np.ndarray]:
        """Every array the layer holds (what its outputs depend on)."""
        if self.quant is not None:
            q = self.quant
            zp = [np.asarray([q.zero_point], np.int32)] if q.asymmetric else []
            return [q.qweight, q.wscale, q.qbias, np.asarray([q.input_scale], np.float32), *zp]
        return [a for a in (self.weight, self.bias) if a is not None]

    @property
    def nbytes(self) -> int:
        return self.quant.nbytes if self.quant is not None else sum(a.nbytes for a in self.tensors())


class LayerOps:
    """The operations of one layer kind (NumPy). Every function reads shapes from the spec;
    rows are flat: ``h`` (samples, in_features) in, (samples, out_features) out."""

    kind: ClassVar[str] = ""
    has_params: ClassVar[bool] = False

    def check(self, spec: LayerSpec) -> None:
        """Raise UsageError unless the spec's fields make sense for this kind."""

    def out_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        return ()

    def forward(self, spec: LayerSpec, h: np.ndarray, w: np.ndarray | None, wt: np.ndarray | None = None,
                out: np.ndarray | None = None, residual: np.ndarray | None = None) -> np.ndarray:
        """The layer's output before bias and activation (``residual``: add's second input)."""
        raise NotImplementedError

    def add_bias(self, spec: LayerSpec, z: np.ndarray, b: np.ndarray) -> np.ndarray:
        z += b
        return z

    def input_grad(self, spec: LayerSpec, g: np.ndarray, w: np.ndarray | None, h: np.ndarray | None = None,
                   z: np.ndarray | None = None) -> np.ndarray:
        """d loss / d input from ``g`` = d loss / d output before the activation (``h`` the
        layer's input and ``z`` its output, for the kinds that need them: max pooling)."""
        raise NotImplementedError

    def weight_grad(self, spec: LayerSpec, h: np.ndarray, g: np.ndarray, out: np.ndarray | None = None,
                    transposed: bool = False) -> np.ndarray:
        """d loss / d weight summed over the rows (``transposed``: dense's (in, out) layout)."""
        raise NotImplementedError

    def bias_grad(self, spec: LayerSpec, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.sum(g, axis=0, out=out)

    def int8_accumulate(self, spec: LayerSpec, q: np.ndarray, quant: QuantParams, kernel: str,
                        residual: np.ndarray | None = None) -> np.ndarray:
        """The layer on int8 rows ``q`` in integers, (samples, out_features) int32. A kind with
        weights gives its accumulator ``q . Wq + bq`` (edgetune.quant.int8 requantises it per
        output channel); the others give their output already at the layer's output scale
        (max, rounded mean, copy, rescaled sum with ``residual``), before the activation's clamp."""
        raise UsageError(f"int8 {spec.kind} layers are not supported")


#: Bytes of widened int8 weight rows per matmul tile (a working buffer, not a copy of the model).
TILE_BYTES = 16 * 1024
#: Every partial sum of int8 x int8 products below this is exact in float32.
_F32_EXACT = 2 ** 24
QMAX = 127


def _int_dtype(fan_in: int, kernel: str, span: int = 128) -> type:
    """The dtype an int8 matmul multiplies in: int32 on request, else float32 (float64 for a
    wide layer), where every partial sum of products is an exact integer (inputs of magnitude
    up to ``span``: 128 for int8, 255 for int8 minus a zero point)."""
    if kernel == "int32":
        return np.int32
    return np.float32 if fan_in * span * QMAX < _F32_EXACT else np.float64


def _offset_input(q: np.ndarray, quant: QuantParams, ft: type) -> np.ndarray:
    """The int8 rows as the products read them: ``q`` itself (symmetric), or ``q - zero_point``
    (asymmetric: TFLM's input_offset; a convolution's padding then reads 0, i.e. the zero point)."""
    x = q.astype(ft)
    if quant.asymmetric and quant.zero_point:
        x -= ft(quant.zero_point)
    return x


def _span(quant: QuantParams) -> int:
    return 255 if quant.asymmetric else 128


INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


def rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """TFLM's SaturatingRoundingDoublingHighMul on int32 values (held in int64): the high 32
    bits of 2ab, rounded half away from zero; INT32_MIN * INT32_MIN saturates."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b
    t = ab + np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = np.where(t >= 0, t >> 31, -((-t) >> 31))          # division by 2**31 toward zero
    return np.where((a == INT32_MIN) & (b == INT32_MIN), np.int64(INT32_MAX), high)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """TFLM's RoundingDivideByPOT: x / 2**exponent rounded to nearest, ties away from zero."""
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, mult: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """TFLM's MultiplyByQuantizedMultiplier: x * mult * 2**(shift - 31) with its double rounding
    (``shift`` the exponent: > 0 shifts x left first; x << shift must fit int32, as checked
    when the backbone is built)."""
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    return rounding_divide_by_pot(rounding_doubling_high_mul(np.asarray(x, np.int64) << left, mult),
                                  np.maximum(-shift, 0))


#: TFLM's left shift of both inputs of an int8 add before they are rescaled.
ADD_LEFT_SHIFT = 20


def round_div(s: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Integer division of int32 sums by ``n`` rounded half away from zero (int8 average
    pooling, as TFLM's): the same integers as et_int8.c."""
    s = np.asarray(s, np.int64)
    return np.where(s >= 0, (s + n // 2) // n, -((-s + n // 2) // n)).astype(np.int32)


class DenseOps(LayerOps):
    """A fully-connected layer, ``z = h W^T + b``, W stored (out, in) as in ``nn.Linear``."""

    kind = "dense"
    has_params = True

    def check(self, spec: LayerSpec) -> None:
        if len(spec.in_shape) != 1:
            raise UsageError(f"a dense layer takes a flat input (C,), got {list(spec.in_shape)}: "
                             f"put a flatten or gap layer before it")
        if spec.kernel or spec.stride or spec.padding or spec.groups != 1:
            raise UsageError("a dense layer has no kernel, stride, padding or groups")

    def out_shape(self, spec):
        return (spec.out_channels,)

    def weight_shape(self, spec):
        return (spec.out_channels, spec.in_shape[0])

    def forward(self, spec, h, w, wt=None, out=None, residual=None):
        # h @ Wt with a contiguous (in, out) copy is 2.5x faster than h @ W.T in BLAS at the
        # paper's shapes; callers that keep W frozen for a whole fit pass that copy.
        return np.matmul(h, w.T if wt is None else wt, out=out)

    def input_grad(self, spec, g, w, h=None, z=None):
        return g @ w

    def weight_grad(self, spec, h, g, out=None, transposed=False):
        return np.matmul(h.T, g, out=out) if transposed else np.matmul(g.T, h, out=out)

    def int8_accumulate(self, spec, q, quant, kernel, residual=None):
        w = quant.qweight
        out_k, in_k = w.shape
        ft = _int_dtype(in_k, kernel, _span(quant))  # integers multiplied exactly in float (see edgetune.quant.int8)
        qc = _offset_input(q, quant, ft)
        acc = np.empty((q.shape[0], out_k), np.int32)
        t = max(1, TILE_BYTES // (in_k * 4))
        for r0 in range(0, out_k, t):
            acc[:, r0:r0 + t] = qc @ w[r0:r0 + t].astype(ft).T
        acc += quant.qbias
        return acc


# ---------------------------------------------------------------------- spatial kinds
def _grid(spec: LayerSpec) -> tuple[int, int, int, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(C, H, W, kernel, stride, padding) with a 1-D layer as a 2-D one of height 1."""
    c, *sp = spec.in_shape
    if len(sp) == 1:
        return c, 1, sp[0], (1, spec.kernel[0]), (1, spec.stride[0]), (0, spec.padding[0])
    return c, sp[0], sp[1], spec.kernel, spec.stride, spec.padding  # type: ignore[return-value]


def _out_len(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _check_window(spec: LayerSpec, rank: int, *, pad_limit: bool) -> None:
    if len(spec.in_shape) != rank + 1:
        raise UsageError(f"a {spec.kind} layer takes an input of {rank + 1} dimensions "
                         f"({'(C, L)' if rank == 1 else '(C, H, W)'}), got {list(spec.in_shape)}")
    for name in ("kernel", "stride", "padding"):
        if len(getattr(spec, name)) != rank:
            raise UsageError(f"a {spec.kind} layer needs {rank} value(s) of {name}, got {list(getattr(spec, name))}")
    if min(spec.kernel) < 1 or min(spec.stride) < 1 or min(spec.padding) < 0:
        raise UsageError(f"{spec.kind}: kernel and stride must be >= 1 and padding >= 0, got kernel "
                         f"{list(spec.kernel)}, stride {list(spec.stride)}, padding {list(spec.padding)}")
    if pad_limit and any(2 * p > k for p, k in zip(spec.padding, spec.kernel)):
        raise UsageError(f"{spec.kind}: padding {list(spec.padding)} is more than half the kernel "
                         f"{list(spec.kernel)}")
    for n, k, p in zip(spec.in_shape[1:], spec.kernel, spec.padding):
        if n + 2 * p < k:
            raise UsageError(f"{spec.kind}: the kernel {list(spec.kernel)} is longer than the padded input "
                             f"{list(spec.in_shape[1:])} (padding {list(spec.padding)})")


def _windows(x: np.ndarray, kernel, stride, padding, fill: float = 0.0) -> np.ndarray:
    """(N, C, OH, OW, kh, kw): a strided view of the padded (N, C, H, W) input's windows."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    v = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return v[:, :, ::sh, ::sw]


def _scatter_windows(d: np.ndarray, shape: tuple[int, ...], kernel, stride, padding) -> np.ndarray:
    """The adjoint of ``_windows``: sums window gradients d (N, C, OH, OW, kh, kw) into the
    (N, C, H, W) input."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = shape
    oh, ow = d.shape[2], d.shape[3]
    dx = np.zeros((n, c, h + 2 * ph, w + 2 * pw), d.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += d[:, :, :, :, i, j]
    return dx[:, :, ph:ph + h, pw:pw + w]


class ConvOps(LayerOps):
    """Convolution (cross-correlation, as PyTorch) with stride, zero padding and groups; weight
    (out, in/groups, *kernel). Computed as grouped matrix products over the input's windows."""

    has_params = True

    def __init__(self, rank: int):
        self.rank = rank
        self.kind = f"conv{rank}d"

    def check(self, spec):
        _check_window(spec, self.rank, pad_limit=False)
        c = spec.in_shape[0]
        if spec.groups < 1 or c % spec.groups or spec.out_channels % spec.groups:
            raise UsageError(f"{spec.kind}: groups {spec.groups} must divide the input channels ({c}) and the "
                             f"output channels ({spec.out_channels})")

    def out_shape(self, spec):
        return (spec.out_channels,) + tuple(_out_len(n, k, s, p) for n, k, s, p in zip(
            spec.in_shape[1:], spec.kernel, spec.stride, spec.padding))

    def weight_shape(self, spec):
        return (spec.out_channels, spec.in_shape[0] // spec.groups) + tuple(spec.kernel)

    def _cols(self, spec, h):
        """(N, G, OH*OW, C/G*kh*kw) window rows of the input, and the output grid."""
        c, hh, ww, k, s, p = _grid(spec)
        n, g = h.shape[0], spec.groups
        win = _windows(h.reshape(n, c, hh, ww), k, s, p)
        oh, ow = win.shape[2], win.shape[3]
        cols = win.reshape(n, g, c // g, oh, ow, k[0], k[1]).transpose(0, 1, 3, 4, 2, 5, 6)
        return cols.reshape(n, g, oh * ow, (c // g) * k[0] * k[1]), oh * ow

    def forward(self, spec, h, w, wt=None, out=None, residual=None):
        n, g, o = h.shape[0], spec.groups, spec.out_channels
        cols, npos = self._cols(spec, h)
        wm = w.reshape(g, o // g, -1)
        z = np.matmul(cols, wm.transpose(0, 2, 1))                  # (N, G, OH*OW, O/G)
        z = z.transpose(0, 1, 3, 2).reshape(n, o * npos)
        if out is not None:
            out[...] = z
            return out
        return z

    def add_bias(self, spec, z, b):
        z.reshape(z.shape[0], spec.out_channels, -1)[...] += b[:, None]
        return z

    def input_grad(self, spec, g, w, h=None, z=None):
        c, hh, ww, k, s, p = _grid(spec)
        n, gr, o = g.shape[0], spec.groups, spec.out_channels
        oh, ow = (1,) * (2 - self.rank) + tuple(spec.out_shape[1:])  # type: ignore[misc]
        gz = g.reshape(n, gr, o // gr, oh * ow).transpose(0, 1, 3, 2)  # (N, G, S, O/G)
        dcols = np.matmul(gz, w.reshape(gr, o // gr, -1))             # (N, G, S, C/G*kh*kw)
        d = dcols.reshape(n, gr, oh, ow, c // gr, k[0], k[1]).transpose(0, 1, 4, 2, 3, 5, 6)
        d = d.reshape(n, c, oh, ow, k[0], k[1])
        return _scatter_windows(d, (n, c, hh, ww), k, s, p).reshape(n, c * hh * ww)

    def weight_grad(self, spec, h, g, out=None, transposed=False):
        n, gr, o = h.shape[0], spec.groups, spec.out_channels
        cols, npos = self._cols(spec, h)                              # (N, G, S, K)
        gz = g.reshape(n, gr, o // gr, npos)                           # (N, G, O/G, S)
        dw = np.einsum("ngos,ngsk->gok", gz, cols).reshape(spec.weight_shape)
        if out is not None:
            out[...] = dw
            return out
        return dw

    def bias_grad(self, spec, g, out=None):
        return np.sum(g.reshape(g.shape[0], spec.out_channels, -1), axis=(0, 2), out=out)

    def int8_accumulate(self, spec, q, quant, kernel, residual=None):
        # the padding is 0: the zero point of symmetric activations; asymmetric ones are offset
        # by theirs first (TFLM's input_offset), so the padding contributes nothing
        n, g, o = q.shape[0], spec.groups, spec.out_channels
        ft = _int_dtype(int(np.prod(spec.weight_shape[1:])), kernel, _span(quant))
        cols, npos = self._cols(spec, _offset_input(q, quant, ft))    # (N, G, S, C/G*kh*kw)
        z = np.matmul(cols, quant.qweight.reshape(g, o // g, -1).astype(ft).transpose(0, 2, 1))
        acc = z.transpose(0, 1, 3, 2).reshape(n, o, npos).astype(np.int32)
        acc += quant.qbias[:, None]
        return acc.reshape(n, o * npos)


class PoolOps(LayerOps):
    """Max or average pooling over windows (no parameters)."""

    def __init__(self, mode: str, rank: int):
        self.mode, self.rank = mode, rank
        self.kind = f"{mode}pool{rank}d"

    def check(self, spec):
        _check_window(spec, self.rank, pad_limit=True)
        if spec.out_channels != spec.in_shape[0] or spec.groups != 1:
            raise UsageError(f"{spec.kind} keeps its {spec.in_shape[0]} channels (out_channels "
                             f"{spec.out_channels}, groups {spec.groups})")

    def out_shape(self, spec):
        return (spec.in_shape[0],) + tuple(_out_len(n, k, s, p) for n, k, s, p in zip(
            spec.in_shape[1:], spec.kernel, spec.stride, spec.padding))

    def _win(self, spec, h):
        c, hh, ww, k, s, p = _grid(spec)
        fill = -np.inf if self.mode == "max" else 0.0
        return _windows(h.reshape(h.shape[0], c, hh, ww), k, s, p, fill), (c, hh, ww, k, s, p)

    def forward(self, spec, h, w=None, wt=None, out=None, residual=None):
        win, (_, _, _, k, _, _) = self._win(spec, h)
        z = win.max(axis=(4, 5)) if self.mode == "max" else win.sum(axis=(4, 5)) / (k[0] * k[1])
        z = z.reshape(h.shape[0], -1).astype(h.dtype, copy=False)
        if out is not None:
            out[...] = z
            return out
        return z

    def input_grad(self, spec, g, w=None, h=None, z=None):
        win, (c, hh, ww, k, s, p) = self._win(spec, h)
        n = g.shape[0]
        oh, ow = win.shape[2], win.shape[3]
        gz = g.reshape(n, c, oh, ow)
        if self.mode == "max":  # the whole gradient to the first maximum of each window, as PyTorch
            flat = win.reshape(n, c, oh, ow, -1)
            first = flat.argmax(axis=4)
            d = np.zeros(flat.shape, g.dtype)
            np.put_along_axis(d, first[..., None], gz[..., None], axis=4)
            d = d.reshape(n, c, oh, ow, k[0], k[1])
        else:
            d = np.broadcast_to((gz / (k[0] * k[1]))[..., None, None], (n, c, oh, ow, k[0], k[1]))
        return _scatter_windows(d, (n, c, hh, ww), k, s, p).reshape(n, c * hh * ww)

    def int8_accumulate(self, spec, q, quant, kernel, residual=None):
        # the same scale in and out: max pads below every int8 value, average pads with 0
        # (counted, as the float layer) and rounds its mean half away from zero
        c, hh, ww, k, s, p = _grid(spec)
        x = q.astype(np.int32).reshape(q.shape[0], c, hh, ww)
        if self.mode == "max":
            z = _windows(x, k, s, p, -QMAX - 1).max(axis=(4, 5))
        elif quant is not None and quant.asymmetric:  # TFLM: the sum of the valid (non-padding) values over their count
            count = _windows(np.ones((1, 1, hh, ww), np.int32), k, s, p).sum(axis=(4, 5))
            z = round_div(_windows(x, k, s, p).sum(axis=(4, 5)), count)
        else:
            z = round_div(_windows(x, k, s, p).sum(axis=(4, 5)), k[0] * k[1])
        return z.reshape(q.shape[0], -1).astype(np.int32, copy=False)


class GapOps(LayerOps):
    """Global average pooling: (C, *spatial) -> (C,)."""

    kind = "gap"

    def check(self, spec):
        if len(spec.in_shape) < 2 or spec.out_channels != spec.in_shape[0]:
            raise UsageError(f"gap takes (C, L) or (C, H, W) to (C,); got {list(spec.in_shape)} -> "
                             f"{spec.out_channels}")
        if spec.kernel or spec.stride or spec.padding or spec.groups != 1:
            raise UsageError("gap has no kernel, stride, padding or groups")

    def out_shape(self, spec):
        return (spec.in_shape[0],)

    def forward(self, spec, h, w=None, wt=None, out=None, residual=None):
        return np.mean(h.reshape(h.shape[0], spec.in_shape[0], -1), axis=2, out=out)

    def input_grad(self, spec, g, w=None, h=None, z=None):
        c, npos = spec.in_shape[0], spec.in_features // spec.in_shape[0]
        d = np.repeat((g / g.dtype.type(npos))[:, :, None], npos, axis=2)
        return d.reshape(g.shape[0], c * npos)

    def int8_accumulate(self, spec, q, quant, kernel, residual=None):
        c = spec.in_shape[0]
        total = q.reshape(q.shape[0], c, -1).sum(axis=2, dtype=np.int32)
        return round_div(total, spec.in_features // c)


class FlattenOps(LayerOps):
    """(C, *spatial) -> (C * prod(spatial),): the flat row does not change."""

    kind = "flatten"

    def check(self, spec):
        if spec.out_channels != spec.in_features or spec.kernel or spec.stride or spec.padding or spec.groups != 1:
            raise UsageError(f"flatten gives {spec.in_features} features from {list(spec.in_shape)} and has no "
                             f"kernel, stride, padding or groups")

    def out_shape(self, spec):
        return (spec.in_features,)

    def forward(self, spec, h, w=None, wt=None, out=None, residual=None):
        if out is not None:
            out[...] = h
            return out
        return h.copy()

    def input_grad(self, spec, g, w=None, h=None, z=None):
        return g

    def int8_accumulate(self, spec, q, quant, kernel, residual=None):
        return q.astype(np.int32)


class AddOps(LayerOps):
    """A residual: this layer's input plus the input of the earlier layer ``source``."""

    kind = "add"

    def check(self, spec):
        if spec.source < 0:
            raise UsageError("an add layer names the earlier layer whose input it adds (source >= 0)")
        if spec.out_channels != spec.in_shape[0] or spec.kernel or spec.stride or spec.padding or spec.groups != 1:
            raise UsageError("an add layer keeps its input's shape and has no kernel, stride, padding or groups")

    def out_shape(self, spec):
        return spec.in_shape

    def forward(self, spec, h, w=None, wt=None, out=None, residual=None):
        return np.add(h, residual, out=out)

    def input_grad(self, spec, g, w=None, h=None, z=None):
        return g

    def int8_accumulate(self, spec, q, quant, kernel, residual=None):
        if quant is not None and quant.asymmetric:
            # TFLM's add: each input minus its zero point, shifted left by 20, rescaled by its own
            # multiplier; the sum rescaled by the output's, plus the output zero point
            (m1, m2, mo), (e1, e2, eo) = quant.requant
            a = (q.astype(np.int64) - quant.zero_point) << ADD_LEFT_SHIFT
            b = (residual.astype(np.int64) - quant.source_zero_point) << ADD_LEFT_SHIFT
            total = multiply_by_quantized_multiplier(a, m1, e1) + multiply_by_quantized_multiplier(b, m2, e2)
            return (multiply_by_quantized_multiplier(total, mo, eo) + quant.out_zero_point).astype(np.int32)
        # both inputs rescaled to the output scale with one shift: (q mx + r mr) / 2**shift,
        # rounded half up (quant.requant = ([mx, mr], [shift, shift]))
        (mx, mr), (sh, _) = quant.requant
        t = q.astype(np.int64) * int(mx) + residual.astype(np.int64) * int(mr) + (1 << (int(sh) - 1))
        return np.clip(t >> int(sh), -2 ** 15, 2 ** 15).astype(np.int32)


OPS: dict[str, LayerOps] = {ops.kind: ops for ops in (
    DenseOps(), ConvOps(1), ConvOps(2), PoolOps("max", 1), PoolOps("max", 2), PoolOps("avg", 1),
    PoolOps("avg", 2), GapOps(), FlattenOps(), AddOps())}


def apply_layer(layer: Layer, h: np.ndarray, wt: np.ndarray | None = None, out: np.ndarray | None = None,
                *, activate: bool = True, residual: np.ndarray | None = None) -> np.ndarray:
    """A float layer on rows ``h``: forward, bias, and (``activate``) the layer's activation.
    ``residual`` is the second input of an ``add`` layer."""
    spec = layer.spec
    ops = spec.ops
    z = ops.forward(spec, h, layer.weight, wt, out=out, residual=residual)
    if layer.bias is not None:
        z = ops.add_bias(spec, z, layer.bias)
    return spec.act.forward(z) if activate else z


def lora_specs(spec: LayerSpec, rank: int) -> tuple[LayerSpec, LayerSpec] | None:
    """The two layers of a LoRA adapter beside ``spec``, as PEFT builds them: A the layer's own
    kind with ``rank`` outputs (a convolution keeps its kernel, stride and padding), B a dense
    or 1x1-convolution map from ``rank`` to the layer's outputs. None where no adapter fits
    (layers without weights, grouped convolutions: their A x B product is not a grouped weight)."""
    if not spec.has_params or spec.groups != 1:
        return None
    if spec.kind == "dense":
        return LayerSpec.dense(spec.in_features, rank), LayerSpec.dense(rank, spec.out_channels)
    ones = (1,) * len(spec.kernel)
    a = LayerSpec(spec.kind, spec.in_shape, rank, spec.kernel, spec.stride, spec.padding)
    b = LayerSpec(spec.kind, (rank,) + a.out_shape[1:], spec.out_channels, ones, ones, (0,) * len(ones))
    return a, b


def chain_specs(sizes: list[int], activation: str) -> list[LayerSpec]:
    """Dense specs of an MLP with widths ``sizes``: ``activation`` between layers, none after the last."""
    n = len(sizes) - 1
    return [LayerSpec.dense(sizes[k], sizes[k + 1], activation if k < n - 1 else "identity") for k in range(n)]


def check_chain(specs: list[LayerSpec]) -> None:
    """Each layer must take what the previous one gives; an add's source must come before it
    and take the same shape."""
    for k in range(1, len(specs)):
        if specs[k].in_shape != specs[k - 1].out_shape:
            if not (specs[k].spatial or len(specs[k - 1].out_shape) > 1):
                raise UsageError(f"layer {k} takes {specs[k].in_features} inputs but layer {k - 1} gives "
                                 f"{specs[k - 1].out_features}")
            raise UsageError(f"layer {k} ({specs[k].kind}) takes {list(specs[k].in_shape)} but layer {k - 1} "
                             f"({specs[k - 1].kind}) gives {list(specs[k - 1].out_shape)}")
    for k, s in enumerate(specs):
        if s.kind == "add":
            if not 0 <= s.source < k:
                raise UsageError(f"layer {k} (add) names source layer {s.source}, which is not an earlier layer")
            if specs[s.source].in_shape != s.in_shape:
                raise UsageError(f"layer {k} (add) takes {list(s.in_shape)} but the input of its source layer "
                                 f"{s.source} is {list(specs[s.source].in_shape)}")
    if len(specs[-1].out_shape) != 1:
        raise UsageError(f"the last layer must give one value per class, but it gives {list(specs[-1].out_shape)}: "
                         f"end with a gap or flatten layer (and a dense one)")
    if specs[-1].activation != "identity":
        raise UsageError(f"the last layer gives the logits: no activation after it (it has {specs[-1].activation!r}; "
                         f"drop it: it does not change the argmax of a softmax classifier)")



# ---------------------------------------------------------------------- memory of one call
# What each operation above allocates, stated next to it so that the memory planner
# (edgetune.memory) reads it instead of re-deriving it. Keep these in step with the code.
@dataclass(frozen=True)
class CallBytes:
    """Bytes one call of a layer operation allocates on a batch: ``peak`` at its busiest
    moment (its result included when that exists by then), ``out`` what it returns newly
    allocated (0: a view of its input, or written into a given buffer)."""

    peak: int = 0
    out: int = 0


#: The calls whose bytes are stated: the forward pass, the gradient of the input and the
#: weight gradient returned as a new array (``out`` not given; with ``out`` given a dense
#: layer allocates nothing, a convolution still makes the array it then copies). Adding the
#: bias in place buffers the broadcast bias.
CALLS = ("forward", "add_bias", "input_grad", "weight_grad")


def call_bytes(spec: LayerSpec, call: str, n: int, itemsize: int = 4) -> CallBytes:
    """What ``spec.ops.<call>`` allocates on ``n`` rows of ``itemsize``-byte floats."""
    if call not in CALLS:
        raise UsageError(f"call must be one of {', '.join(CALLS)}, got {call!r}")
    if call == "add_bias":
        return CallBytes(_ufunc_buffer(n * spec.out_features, itemsize) if spec.has_params else 0)
    return _CALL_BYTES[spec.kind](spec, call, int(n), int(itemsize))


def activation_bytes(name: str, values: int, itemsize: int = 4) -> CallBytes:
    """What an activation's ``forward`` (peak) and ``grad_mul`` (out: its peak, nothing is
    returned) allocate on ``values`` values: the comparisons' boolean masks and temporaries."""
    fwd = {"leaky_relu": values, "sigmoid": values + 4 * values * itemsize}.get(name, 0)
    grad = {"relu": values, "relu6": 3 * values, "leaky_relu": 8 * values + values * itemsize + values,
            "tanh": 2 * values * itemsize, "sigmoid": 2 * values * itemsize}.get(name, 0)
    return CallBytes(fwd, grad)


def _padded(spec: LayerSpec, n: int, f: int) -> int:
    """The zero- (or -inf-) padded copy of the input that ``_windows`` makes; 0 without padding."""
    c, hh, ww, _, _, (ph, pw) = _grid(spec)
    return n * c * (hh + 2 * ph) * (ww + 2 * pw) * f if ph or pw else 0


def _scatter(spec: LayerSpec, n: int, f: int, buffered: bool = True) -> tuple[int, int]:
    """``_scatter_windows``: (its peak, what it returns): the padded gradient, and when padded
    the unpadded copy the final reshape makes (a view of the padded one, which it keeps, when
    the unpadded rows merge: one channel of one row)."""
    padded = _padded(spec, n, f)
    plain = n * spec.in_features * f
    c, hh, ww, _, _, (ph, pw) = _grid(spec)
    if padded and _merges((c, (hh + 2 * ph) * (ww + 2 * pw)), (hh, ww + 2 * pw), (ww, 1)):
        plain, padded = padded, 0
    # Each window offset adds a strided view of the gradient into a strided slice: buffered
    # (the gradient's slice; in 2-D or at a stride the slice of the padded rows too). Average
    # pooling's gradient is one value per window broadcast over it: its slices need none.
    values = n * c * (spec.out_features // spec.out_channels if spec.has_params else
                      spec.out_features // c)
    buffers = _ufunc_buffer(values, f) * (2 if len(spec.in_shape) == 3 or max(spec.stride) > 1 else 1) \
        if buffered else 0
    return (padded + plain + buffers, plain) if padded else (plain + buffers, plain)


def _dense_bytes(spec: LayerSpec, call: str, n: int, f: int) -> CallBytes:
    if call == "forward":
        return CallBytes(n * spec.out_features * f, n * spec.out_features * f)
    if call == "input_grad":
        return CallBytes(n * spec.in_features * f, n * spec.in_features * f)
    w = spec.n_params - spec.out_channels
    return CallBytes(w * f, w * f)


def _merges(*axes: tuple[int, int]) -> bool:
    """Whether NumPy can merge axes given as (size, stride) into one without a copy (what
    ``reshape`` checks): axes of size 1 do not count, each other stride must be the next
    one's times its size."""
    axes = tuple(a for a in axes if a[0] != 1)
    return all(s0 == n1 * s1 for (_, s0), (n1, s1) in zip(axes, axes[1:]))


def _ufunc_buffer(values: int, f: int) -> int:
    """One operand's buffer in an element-wise operation that NumPy cannot run in place on a
    strided or broadcast operand: up to 8192 elements (its default ``bufsize``)."""
    return min(values, 8192) * f


def _conv_bytes(spec: LayerSpec, call: str, n: int, f: int) -> CallBytes:
    c, hh, ww, k, s, p = _grid(spec)
    g, o = spec.groups, spec.out_channels
    cg, og = c // g, o // g
    oh, ow = ((1,) + spec.out_shape[1:]) if len(spec.out_shape) == 2 else spec.out_shape[1:]
    npos = oh * ow
    hp, wp = hh + 2 * p[0], ww + 2 * p[1]
    # _cols: the windows (N, G, C/G, OH, OW, kh, kw) of the (padded) input, strides in
    # elements, reshaped to rows (N, G, OH*OW, C/G*kh*kw): a view where the axes merge.
    view = _merges((oh, s[0] * wp), (ow, s[1])) and _merges((cg, hp * wp), (k[0], wp), (k[1], 1))
    cols = 0 if view else n * npos * c * k[0] * k[1] * f
    pad = _padded(spec, n, f)
    z = n * o * npos * f
    keep = pad if view else 0  # a view of the windows keeps the padded input alive
    if call == "forward":
        # matmul gives (N, G, S, O/G); (N, O*S) is its transpose (N, G, O/G, S), merged.
        relayout = 0 if _merges((g, npos * og), (og, 1), (npos, og)) else z
        return CallBytes(max(pad + cols, keep + cols + z + relayout), z)
    if call == "weight_grad":
        w = spec.n_params - o
        return CallBytes(max(pad + cols, keep + cols + w * f), w * f)
    kk = cg * k[0] * k[1]
    dcols = n * npos * c * k[0] * k[1] * f
    # (N, G, OH, OW, C/G, kh, kw) -> (N, C, OH, OW, kh, kw): G and C/G merge unless spread apart
    regroup = 0 if _merges((g, npos * kk), (cg, k[0] * k[1])) else dcols
    peak, out = _scatter(spec, n, f)
    return CallBytes(dcols + regroup + peak, out)


def _pool_bytes(spec: LayerSpec, call: str, n: int, f: int) -> CallBytes:
    _, _, ww, k, _, p = _grid(spec)
    o = n * spec.out_features * f
    pad = _padded(spec, n, f)
    mode = spec.kind[:3]
    if call == "forward":  # max: the reduction; avg: the sum and its quotient
        return CallBytes(pad + (o if mode == "max" else 2 * o), o)
    if call == "weight_grad":
        return CallBytes()
    peak, out = _scatter(spec, n, f, buffered=mode == "max")
    if mode == "avg":  # g / (kh*kw), broadcast over the windows (a view)
        return CallBytes(o + peak, out)
    # max: the windows flat (a copy unless a window is one row high, or the padded row wide),
    # the argmax (int64), the windows' gradient (put_along_axis: its indexed assignment buffers
    # the values; measured to stay held through the scatter), then the scatter.
    wide = o * k[0] * k[1]
    flat = 0 if k[0] == 1 or ww + 2 * p[1] == k[1] else wide
    return CallBytes(pad + flat + 2 * o + wide + _ufunc_buffer(o // f, f) + peak, out)


def _gap_bytes(spec: LayerSpec, call: str, n: int, f: int) -> CallBytes:
    small = n * spec.in_shape[0] * f
    if call == "forward":
        return CallBytes(small, small)
    if call == "weight_grad":
        return CallBytes()
    full = n * spec.in_features * f  # g / npos, repeated over the positions
    return CallBytes(small + full, full)


def _flatten_bytes(spec: LayerSpec, call: str, n: int, f: int) -> CallBytes:
    full = n * spec.in_features * f
    if call == "forward":   # a copy: the row is already flat
        return CallBytes(full, full)
    return CallBytes()      # the gradient passes through (the same array)


def _add_bytes(spec: LayerSpec, call: str, n: int, f: int) -> CallBytes:
    full = n * spec.in_features * f
    if call == "forward":
        return CallBytes(full, full)
    return CallBytes()


_CALL_BYTES = {"dense": _dense_bytes, "conv1d": _conv_bytes, "conv2d": _conv_bytes,
               "maxpool1d": _pool_bytes, "maxpool2d": _pool_bytes, "avgpool1d": _pool_bytes,
               "avgpool2d": _pool_bytes, "gap": _gap_bytes, "flatten": _flatten_bytes, "add": _add_bytes}
