"""One description of a layer, read by every part of edgetune.

A backbone is a list of ``Layer``: a ``LayerSpec`` (what the layer is: its kind, the shape
of one sample's input, its output channels, kernel, stride, padding, groups and the
activation applied to its output; every other shape is derived from these) and the
tensors it holds, float (``weight``, ``bias``) or int8 (``quant``). The NumPy engine, the
compiled engine's binding, the memory planner, the exporter, the converters and the model
files all read layers through this module; nothing else spells out "apply layer k".

Shapes are channels-first, as in PyTorch: one sample's input is ``(C,)`` for a dense
layer. A dense layer is the 1x1 case of a convolution (kernel, stride and padding empty,
groups 1). Each kind supplies one table of operations (``LayerOps``): forward, the
gradient of the input, the gradient of the weight, and the int8 accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import UsageError
from .activations import ACTIVATIONS, Activation, get_activation

#: The layer kinds this version builds, in the order their ids are given to C.
LAYER_KINDS = ("dense",)
#: The fields of a layer description as written in model files.
SPEC_FIELDS = ("kind", "in_shape", "out_channels", "kernel", "stride", "padding", "groups", "activation")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise UsageError(f"{what} must be a list of whole numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise UsageError(f"{what} must be a list of whole numbers, got {value!r}")
        out.append(int(v))
    return tuple(out)


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

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise UsageError(f"unknown layer kind {self.kind!r}: this edgetune builds {', '.join(LAYER_KINDS)}")
        object.__setattr__(self, "in_shape", _ints(self.in_shape, "in_shape"))
        for name in ("kernel", "stride", "padding"):
            object.__setattr__(self, name, _ints(getattr(self, name), name))
        for name in ("out_channels", "groups"):
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
        self.ops.check(self)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def dense(cls, in_features: int, out_features: int, activation: str = "identity") -> "LayerSpec":
        """A fully-connected layer: (in_features,) -> (out_features,)."""
        return cls("dense", (in_features,), out_features, activation=activation)

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
        return int(np.prod(self.in_shape))

    @property
    def out_features(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.ops.weight_shape(self)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_channels,)

    @property
    def n_params(self) -> int:
        return int(np.prod(self.weight_shape)) + self.out_channels

    @property
    def act(self) -> Activation:
        return get_activation(self.activation)

    # -- files --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_shape": list(self.in_shape), "out_channels": self.out_channels,
                "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
                "groups": self.groups, "activation": self.activation}

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
        return f"{self.kind} {list(self.in_shape)} -> {list(self.out_shape)}" + (
            f" {self.activation}" if self.activation != "identity" else "")


@dataclass
class QuantParams:
    """A layer's int8 tensors: ``W ~= wscale[:, None] * qweight``, its input ``~= input_scale * q``,
    the bias in the accumulator's unit (``b ~= input_scale * wscale * qbias``), and for a layer
    followed by another the fixed-point requantiser of its output to the next layer's scale."""

    qweight: np.ndarray                  # int8, the layer's weight shape
    wscale: np.ndarray                   # float32 (out_channels,)
    qbias: np.ndarray                    # int32 (out_channels,)
    input_scale: float
    requant: tuple[np.ndarray, np.ndarray] | None = None  # (mult, shift) int64 (out_channels,)

    @property
    def nbytes(self) -> int:
        n = self.qweight.nbytes + self.wscale.nbytes + self.qbias.nbytes + 4
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
            return [q.qweight, q.wscale, q.qbias, np.asarray([q.input_scale], np.float32)]
        return [self.weight, self.bias]

    @property
    def nbytes(self) -> int:
        return self.quant.nbytes if self.quant is not None else self.weight.nbytes + self.bias.nbytes


class LayerOps:
    """The operations of one layer kind (NumPy). Every function reads shapes from the spec."""

    kind: ClassVar[str] = ""

    def check(self, spec: LayerSpec) -> None:
        """Raise UsageError unless the spec's fields make sense for this kind."""

    def out_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        raise NotImplementedError

    def forward(self, spec: LayerSpec, h: np.ndarray, w: np.ndarray, wt: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
        """The layer's output before bias and activation, for rows ``h`` (samples, in_features)."""
        raise NotImplementedError

    def input_grad(self, spec: LayerSpec, g: np.ndarray, w: np.ndarray) -> np.ndarray:
        """d loss / d input (samples, in_features) from ``g`` = d loss / d output (before activation)."""
        raise NotImplementedError

    def weight_grad(self, spec: LayerSpec, h: np.ndarray, g: np.ndarray, out: np.ndarray | None = None,
                    transposed: bool = False) -> np.ndarray:
        """d loss / d weight, summed over the rows (``transposed``: in the (in, out) layout)."""
        raise NotImplementedError

    def int8_accumulate(self, spec: LayerSpec, q: np.ndarray, quant: QuantParams, kernel: str) -> np.ndarray:
        """The int32 accumulator (samples, out_features) for int8 inputs ``q``, bias included."""
        raise NotImplementedError


#: Bytes of widened int8 weight rows per matmul tile (a working buffer, not a copy of the model).
TILE_BYTES = 16 * 1024
#: Every partial sum of int8 x int8 products below this is exact in float32.
_F32_EXACT = 2 ** 24
QMAX = 127


class DenseOps(LayerOps):
    """A fully-connected layer, ``z = h W^T + b``, W stored (out, in) as in ``nn.Linear``."""

    kind = "dense"

    def check(self, spec: LayerSpec) -> None:
        if len(spec.in_shape) != 1:
            raise UsageError(f"a dense layer takes a flat input (C,), got {list(spec.in_shape)}")
        if spec.kernel or spec.stride or spec.padding or spec.groups != 1:
            raise UsageError("a dense layer has no kernel, stride, padding or groups")

    def out_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        return (spec.out_channels,)

    def weight_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        return (spec.out_channels, spec.in_shape[0])

    def forward(self, spec, h, w, wt=None, out=None):
        # h @ Wt with a contiguous (in, out) copy is 2.5x faster than h @ W.T in BLAS at the
        # paper's shapes; callers that keep W frozen for a whole fit pass that copy.
        return np.matmul(h, w.T if wt is None else wt, out=out)

    def input_grad(self, spec, g, w):
        return g @ w

    def weight_grad(self, spec, h, g, out=None, transposed=False):
        return np.matmul(h.T, g, out=out) if transposed else np.matmul(g.T, h, out=out)

    def int8_accumulate(self, spec, q, quant, kernel):
        w = quant.qweight
        out_k, in_k = w.shape
        if kernel == "int32":
            ft = np.int32
        else:  # integer values multiplied exactly in float (see edgetune.quant.int8)
            ft = np.float32 if in_k * 128 * QMAX < _F32_EXACT else np.float64
        qc = q.astype(ft)
        acc = np.empty((q.shape[0], out_k), np.int32)
        t = max(1, TILE_BYTES // (in_k * 4))
        for r0 in range(0, out_k, t):
            acc[:, r0:r0 + t] = qc @ w[r0:r0 + t].astype(ft).T
        acc += quant.qbias
        return acc


OPS: dict[str, LayerOps] = {ops.kind: ops for ops in (DenseOps(),)}


def apply_layer(layer: Layer, h: np.ndarray, wt: np.ndarray | None = None, out: np.ndarray | None = None,
                *, activate: bool = True) -> np.ndarray:
    """A float layer on rows ``h``: forward, bias, and (``activate``) the layer's activation."""
    spec = layer.spec
    z = spec.ops.forward(spec, h, layer.weight, wt, out=out)
    z += layer.bias
    return spec.act.forward(z) if activate else z


def chain_specs(sizes: list[int], activation: str) -> list[LayerSpec]:
    """Dense specs of an MLP with widths ``sizes``: ``activation`` between layers, none after the last."""
    n = len(sizes) - 1
    return [LayerSpec.dense(sizes[k], sizes[k + 1], activation if k < n - 1 else "identity") for k in range(n)]


def check_chain(specs: list[LayerSpec]) -> None:
    """Each layer must take what the previous one gives."""
    for k in range(1, len(specs)):
        if specs[k].in_features != specs[k - 1].out_features:
            raise UsageError(f"layer {k} takes {specs[k].in_features} inputs but layer {k - 1} gives "
                             f"{specs[k - 1].out_features}")

