"""ONNX graph -> edgetune Backbone, one table entry per operator.

The graph is walked in its (topological) node order along one data path, from the graph's
input to its output. Each operator is an entry of ``OPS``: a function that checks the
node and updates the model being built (``_Build``), a chain of edgetune layers
(``edgetune.nn.layers.LayerSpec``: dense, conv1d/2d, max/avg pooling, gap, flatten, add).
An operator that is not in the table, or that the table's function cannot express as such
a chain (a branch, an Add of a tensor that is not an earlier layer's input, a dilated
convolution, asymmetric padding, ...), is refused with the node's name and op type,
before anything is returned. A new layer kind is one more entry.

Before the first layer, per-feature Add/Sub/Mul/Div become the backbone's input
normalisation and Transpose/Reshape/Flatten a permutation of a first dense layer's
columns, so a Keras-style NHWC input with a leading Transpose, or a graph exported by
``to_onnx`` (Sub mean, Div std), imports exactly. A first convolution reads its input as
the graph stores it, channels first, (N, C, L) or (N, C, H, W), normalised per channel.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ModelFileError, UsageError
from ..nn.layers import Layer, LayerSpec
from ..nn.mlp import Backbone
from .reader import MAX_TENSOR_BYTES, TensorHeader, check_tensor, load_model

MIN_OPSET = 7
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: The most values one sample may have at any layer's output (what a 1 GB float32 tensor holds).
MAX_FEATURES = MAX_TENSOR_BYTES // 4


@dataclass
class OnnxImport:
    """What ``read_onnx`` found: the backbone and how the graph mapped onto it."""
    backbone: Backbone
    input_name: str
    input_shape: list[int | str]          # as the graph declares it (batch first)
    opset: int
    nodes: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        b = self.backbone
        return {"sizes": b.sizes, "activation": b.activation.name, "dtype": str(b.dtype),
                "normalization": b.input_mean is not None, "input": self.input_name,
                "input_shape": self.input_shape, "layers": [s.describe() for s in b.specs],
                "opset": self.opset, "nodes": self.nodes, "notes": self.notes}


@dataclass
class _Layer:
    spec: LayerSpec                     # its activation is set when the walk reaches it
    weight: np.ndarray | None           # dense (out, in); conv (out, in/groups, *kernel)
    bias: np.ndarray | None
    node: str
    activation: str | None = None       # the activation that follows, once seen
    act_node: str = ""


class _Build:
    """The model as the walk has read it so far, and the data path's current tensor."""

    def __init__(self, where: str, consts: dict[str, TensorHeader | np.ndarray], input_name: str,
                 feat_shape: tuple[int, ...]):
        self.where = where
        self.consts = consts
        self.path = input_name                  # the tensor the data path is at
        self.seen_path = {input_name}           # every tensor the data path went through
        self.feat_shape = feat_shape            # per-sample shape of self.path, as ONNX sees it
        n = math.prod(feat_shape)
        self.n_inputs = n
        # Before the first layer: which input feature each element of the current tensor is,
        # and the per-feature affine map x * scale + shift applied so far (float64).
        self.index = np.arange(n).reshape(feat_shape)
        self.scale = np.ones(n)
        self.shift = np.zeros(n)
        self.affine_nodes: list[str] = []
        self.affine_ops: list[tuple[str, np.ndarray]] = []   # (op, per input feature), in order
        self.layers: list[_Layer] = []
        self.open = False                       # the path is the last layer's output, before any activation
        self.final: str = ""                    # a Softmax/LogSoftmax at the output (dropped)
        self.notes: list[str] = []
        # Residual adds: the tensors that are a layer's input (name -> layer), and the names
        # the current value goes by (an Identity or Dropout gives it another).
        self.layer_inputs: dict[str, tuple[int, tuple[int, ...]]] = {}   # name -> (layer, ONNX shape)
        self.aliases = [input_name]

    @property
    def bias_open(self) -> bool:
        """The path is a dense or conv layer's output before its activation: a bias or a
        BatchNormalization folds into that layer."""
        return self.open and bool(self.layers) and self.layers[-1].spec.has_params

    # -- helpers for the op functions ------------------------------------------------------
    def refuse(self, node: Any, why: str) -> UsageError:
        return UsageError(f"{self.where}: node '{node.name or '(unnamed)'}' ({node.op_type}) {why}")

    def const(self, node: Any, name: str) -> np.ndarray:
        v = self.consts.get(name)
        if v is None:
            if name in self.seen_path:
                raise self.refuse(node, f"takes the data path twice or as a weight ('{name}'): branches and "
                                        f"data-dependent weights do not convert to a chain of layers")
            raise ModelFileError(f"{self.where}: node '{node.name}' ({node.op_type}) reads '{name}', which is "
                                 f"neither an initializer nor the output of an earlier node")
        if isinstance(v, TensorHeader):
            v = v.read()
            self.consts[name] = v
        return v

    def data_input(self, node: Any, *, position: int = 0) -> None:
        """Check that input ``position`` of ``node`` is the data path's current tensor."""
        if len(node.input) <= position or node.input[position] != self.path:
            got = node.input[position] if len(node.input) > position else "nothing"
            if got in self.seen_path:
                raise self.refuse(node, f"reads '{got}', an earlier tensor of the data path (a branch or "
                                        f"residual connection): edgetune backbones are chains of layers, with "
                                        f"residual adds of an earlier layer's input")
            raise self.refuse(node, f"does not read the data path (expected '{self.path}' as input "
                                    f"{position}, got '{got}')")
        if self.final:
            raise self.refuse(node, f"follows the output's {self.final}: {self.final} must be the last node")

    def advance(self, node: Any, feat_shape: tuple[int, ...] | None = None, *, same_value: bool = False) -> None:
        """Move the data path to the node's output (``same_value``: a no-op, the value keeps
        its other names)."""
        if len(node.output) < 1 or not node.output[0]:
            raise self.refuse(node, "has no output")
        self.path = node.output[0]
        self.seen_path.add(self.path)
        if same_value and (feat_shape is None or feat_shape == self.feat_shape):
            self.aliases.append(self.path)
        else:
            self.aliases = [self.path]
        if feat_shape is not None:
            self.feat_shape = feat_shape

    def attr(self, node: Any, name: str, default: Any) -> Any:
        import onnx

        for a in node.attribute:
            if a.name == name:
                v = onnx.helper.get_attribute_value(a)
                return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        return default

    def int_attr(self, node: Any, name: str, default: int) -> int:
        v = self.attr(node, name, None)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise self.refuse(node, f"has {name}={v!r}: expected a whole number")
        return int(v)

    def float_attr(self, node: Any, name: str, default: float) -> float:
        v = self.attr(node, name, None)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise self.refuse(node, f"has {name}={v!r}: expected a number")
        return float(v)

    def ints(self, node: Any, name: str, default: Sequence[int], n: int) -> tuple[int, ...]:
        v = self.attr(node, name, None)
        if v is None:
            return tuple(default)
        if not isinstance(v, (list, tuple)) or len(v) != n or not all(isinstance(i, int) for i in v):
            raise self.refuse(node, f"has {name}={v!r}: expected {n} whole numbers")
        return tuple(int(i) for i in v)

    def flat(self, node: Any) -> int:
        if len(self.feat_shape) != 1:
            raise self.refuse(node, f"multiplies a tensor of per-sample shape {list(self.feat_shape)}; a dense "
                                    f"layer takes flat samples (Flatten or Reshape first)")
        return self.feat_shape[0]

    def spatial_input(self, node: Any) -> tuple[int, ...]:
        """The (C, L) or (C, H, W) sample a convolution or pooling node reads."""
        shape = self.feat_shape
        if len(shape) not in (2, 3):
            raise self.refuse(node, f"reads samples of shape {list(shape)}: edgetune's convolutions and pooling "
                                    f"take (C, L) or (C, H, W) (inputs (N, C, L) or (N, C, H, W))")
        if self.layers and self.layers[-1].spec.out_shape != shape:
            raise self.refuse(node, f"reads samples of shape {list(shape)}, a regrouping of the previous layer's "
                                    f"output {list(self.layers[-1].spec.out_shape)}")
        return shape

    def per_feature(self, node: Any, c: np.ndarray, what: str) -> np.ndarray:
        """Constant ``c`` broadcast to the current per-sample shape, or a refusal."""
        c = np.asarray(c, dtype=np.float64)
        if c.ndim > len(self.feat_shape) + 1 or (c.ndim == len(self.feat_shape) + 1 and c.shape[0] != 1):
            raise self.refuse(node, f"{what} has shape {list(c.shape)}, not one value per feature of "
                                    f"{list(self.feat_shape)}")
        if c.ndim == len(self.feat_shape) + 1:
            c = c[0]
        try:
            return np.broadcast_to(c, self.feat_shape)
        except ValueError:
            raise self.refuse(node, f"{what} of shape {list(c.shape)} does not broadcast to the per-sample "
                                    f"shape {list(self.feat_shape)}") from None

    def spec(self, node: Any, make: Callable[[], LayerSpec]) -> LayerSpec:
        """A layer description, its own checks' refusal naming the node."""
        try:
            spec = make()
        except UsageError as e:
            raise self.refuse(node, f"does not convert: {e}") from None
        if spec.out_features > MAX_FEATURES:
            raise self.refuse(node, f"gives {spec.out_features:.3g} values per sample ({list(spec.out_shape)}), "
                                    f"more than the {MAX_TENSOR_BYTES >> 20} MB edgetune sizes a layer's output for")
        return spec

    def add_layer(self, node: Any, spec: LayerSpec, w: np.ndarray | None = None, b: np.ndarray | None = None,
                  onnx_shape: tuple[int, ...] | None = None) -> None:
        if (w is not None and not np.all(np.isfinite(w))) or (b is not None and not np.all(np.isfinite(b))):
            raise ModelFileError(f"{self.where}: node '{node.name}' ({node.op_type}) has NaN or inf weights")
        if not self.layers:
            if spec.kind == "dense":  # the first dense layer reads the input features in the graph's order
                cols = np.empty_like(w)
                cols[:, self.index.reshape(-1)] = w
                w = cols
            elif not np.array_equal(self.index.reshape(-1), np.arange(self.n_inputs)):
                raise self.refuse(node, "reads the graph's input reordered (a Transpose before it): a first "
                                        "convolution or pooling takes the input as stored, channels first")
        k = len(self.layers)
        for name in self.aliases:
            self.layer_inputs.setdefault(name, (k, self.feat_shape))
        self.layers.append(_Layer(spec, w, b, node.name or node.op_type))
        self.open = True
        self.advance(node, onnx_shape or spec.out_shape)


# ---------------------------------------------------------------------- the operators
def _dense(node: Any, g: _Build, w: np.ndarray, bias: np.ndarray | None) -> None:
    spec = g.spec(node, lambda: LayerSpec.dense(w.shape[1], w.shape[0]))
    g.add_layer(node, spec, np.ascontiguousarray(w), bias)


def _op_gemm(node: Any, g: _Build) -> None:
    g.data_input(node)
    if g.int_attr(node, "transA", 0):
        raise g.refuse(node, "has transA=1: the data path must be A (samples, features)")
    n_in = g.flat(node)
    b_mat = g.const(node, node.input[1])
    if b_mat.ndim != 2:
        raise g.refuse(node, f"has a weight of shape {list(b_mat.shape)}, not 2-D")
    w = b_mat if g.int_attr(node, "transB", 0) else b_mat.T
    if w.shape[1] != n_in:
        raise g.refuse(node, f"takes {w.shape[1]} features but the data path has {n_in}")
    alpha, beta = g.float_attr(node, "alpha", 1.0), g.float_attr(node, "beta", 1.0)
    w = w * np.asarray(alpha, w.dtype) if alpha != 1.0 else w
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = g.const(node, node.input[2])
        try:
            bias = np.broadcast_to(np.asarray(c).reshape(-1) if c.ndim == 2 and c.shape[0] == 1 else c,
                                   (w.shape[0],)) * np.asarray(beta, c.dtype)
        except ValueError:
            raise g.refuse(node, f"has a bias of shape {list(c.shape)} for {w.shape[0]} outputs") from None
    _dense(node, g, w, None if bias is None else np.array(bias))


def _op_matmul(node: Any, g: _Build) -> None:
    g.data_input(node)
    n_in = g.flat(node)
    w = g.const(node, node.input[1])
    if w.ndim != 2 or w.shape[0] != n_in:
        raise g.refuse(node, f"multiplies {n_in} features by a weight of shape {list(w.shape)} "
                             f"(expected ({n_in}, outputs))")
    _dense(node, g, w.T, None)


def _pads(node: Any, g: _Build, shape: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...]
          ) -> tuple[int, ...]:
    """The symmetric zero padding per axis of a Conv or pooling node (auto_pad or pads)."""
    rank = len(kernel)
    auto = g.attr(node, "auto_pad", "NOTSET")
    if auto == "VALID":
        return (0,) * rank
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i, (n, k, s) in enumerate(zip(shape[1:], kernel, strides)):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            if total % 2:
                raise g.refuse(node, f"has auto_pad={auto}, which pads axis {i} asymmetrically here ({total} in "
                                     f"all): edgetune pads both ends alike")
            pads.append(total // 2)
        return tuple(pads)
    if auto != "NOTSET":
        raise g.refuse(node, f"has auto_pad={auto!r}")
    p = g.ints(node, "pads", (0,) * (2 * rank), 2 * rank)
    if p[:rank] != p[rank:]:
        raise g.refuse(node, f"has asymmetric pads {list(p)} (begin {list(p[:rank])}, end {list(p[rank:])}): "
                             f"edgetune pads both ends alike")
    return p[:rank]


def _window(node: Any, g: _Build, shape: tuple[int, ...], kernel: tuple[int, ...]
            ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(strides, pads) of a Conv or pooling node, dilations 1 checked."""
    rank = len(kernel)
    dil = g.ints(node, "dilations", (1,) * rank, rank)
    if any(d != 1 for d in dil):
        raise g.refuse(node, f"has dilations {list(dil)}: only dilation 1 converts")
    strides = g.ints(node, "strides", (1,) * rank, rank)
    if min(strides) < 1 or min(kernel) < 1:
        raise g.refuse(node, f"has kernel {list(kernel)} and strides {list(strides)}: both must be >= 1")
    return strides, _pads(node, g, shape, kernel, strides)


def _op_conv(node: Any, g: _Build) -> None:
    g.data_input(node)
    shape = g.spatial_input(node)
    rank = len(shape) - 1
    if len(node.input) < 2:
        raise g.refuse(node, "has no weight input")
    w = g.const(node, node.input[1])
    if w.ndim != rank + 2:
        raise g.refuse(node, f"has a weight of shape {list(w.shape)} for samples of shape {list(shape)} "
                             f"(expected (out, in/groups, {', '.join(['k'] * rank)}))")
    kernel = tuple(int(k) for k in w.shape[2:])
    if g.ints(node, "kernel_shape", kernel, rank) != kernel:
        raise g.refuse(node, f"has kernel_shape {g.attr(node, 'kernel_shape', None)} but a weight of shape "
                             f"{list(w.shape)}")
    groups = g.int_attr(node, "group", 1)
    if groups < 1 or w.shape[1] * groups != shape[0]:
        raise g.refuse(node, f"has group={groups} and a weight of shape {list(w.shape)} for {shape[0]} input "
                             f"channels")
    strides, pads = _window(node, g, shape, kernel)
    out = int(w.shape[0])
    bias = None
    if len(node.input) > 2 and node.input[2]:
        b = np.asarray(g.const(node, node.input[2]))
        if b.shape != (out,):
            raise g.refuse(node, f"has a bias of shape {list(b.shape)} for {out} output channels")
        bias = np.array(b, dtype=w.dtype)
    spec = g.spec(node, lambda: LayerSpec.conv(shape, out, kernel, stride=strides, padding=pads, groups=groups))
    g.add_layer(node, spec, np.ascontiguousarray(w), bias)


def _op_pool(node: Any, g: _Build) -> None:
    g.data_input(node)
    shape = g.spatial_input(node)
    rank = len(shape) - 1
    mode = "max" if node.op_type == "MaxPool" else "avg"
    if len(node.output) > 1 and node.output[1]:
        raise g.refuse(node, "returns the indices of its maxima, which edgetune does not compute")
    if g.int_attr(node, "ceil_mode", 0):
        raise g.refuse(node, "has ceil_mode=1: only ceil_mode 0 (PyTorch's default) converts")
    kernel = g.ints(node, "kernel_shape", (), rank)
    if not kernel:
        raise g.refuse(node, "has no kernel_shape")
    strides, pads = _window(node, g, shape, kernel)
    if mode == "avg" and any(pads) and not g.int_attr(node, "count_include_pad", 0):
        raise g.refuse(node, f"pads {list(pads)} with count_include_pad=0: edgetune's average pooling counts the "
                             f"zero padding (PyTorch's default, count_include_pad=1), or takes pads 0")
    spec = g.spec(node, lambda: LayerSpec.pool(mode, shape, kernel, strides, pads))
    g.add_layer(node, spec)


def _op_global_pool(node: Any, g: _Build) -> None:
    g.data_input(node)
    shape = g.spatial_input(node)
    spec = g.spec(node, lambda: LayerSpec.gap(shape))
    g.add_layer(node, spec, onnx_shape=(shape[0],) + (1,) * (len(shape) - 1))


def _data_and_const(node: Any, g: _Build) -> tuple[np.ndarray, int]:
    """(the constant operand, the data path's position) of a binary elementwise node."""
    if len(node.input) != 2:
        raise g.refuse(node, "needs two inputs")
    pos = 0 if node.input[0] == g.path else 1
    g.data_input(node, position=pos)
    return g.const(node, node.input[1 - pos]), pos


def _op_add(node: Any, g: _Build) -> None:
    if len(node.input) == 2 and not any(i in g.consts for i in node.input) and g.path in node.input:
        _residual(node, g)
        return
    c, _ = _data_and_const(node, g)
    if g.bias_open:
        layer = g.layers[-1]
        out = layer.spec.out_channels
        per = g.per_feature(node, c, "the addend").reshape(out, -1)
        if np.any(per != per[:, :1]):
            raise g.refuse(node, f"adds a constant of shape {list(c.shape)} that is not one value per output "
                                 f"channel of '{layer.node}' ({list(g.feat_shape)})")
        b = per[:, 0].astype(layer.weight.dtype)
        layer.bias = b if layer.bias is None else layer.bias + b
        g.advance(node)
        return
    if g.layers:
        raise g.refuse(node, "adds a constant where it is not a layer's bias (after an activation)")
    v = _in_input_order(g, g.per_feature(node, c, "the addend"))
    g.shift = g.shift + v
    g.affine_nodes.append(node.name)
    g.affine_ops.append(("Add", v))
    g.advance(node)


def _residual(node: Any, g: _Build) -> None:
    """Add of the data path and the input of an earlier layer: an ``add`` layer."""
    if g.final:
        raise g.refuse(node, f"follows the output's {g.final}: {g.final} must be the last node")
    other = node.input[1] if node.input[0] == g.path else node.input[0]
    if other not in g.layer_inputs or not g.layers:
        what = "an earlier tensor of the data path" if other in g.seen_path else "a tensor off the data path"
        raise g.refuse(node, f"adds '{other}', {what} that is not the input of an earlier layer: only residual "
                             f"adds of an earlier layer's input convert")
    source, other_shape = g.layer_inputs[other]
    shape = g.layers[-1].spec.out_shape
    want = g.layers[source].spec.in_shape
    if g.feat_shape != other_shape:  # ONNX would broadcast the two
        raise g.refuse(node, f"adds '{other}' of per-sample shape {list(other_shape)} to {list(g.feat_shape)}")
    if source == 0 and not np.array_equal(g.index.reshape(-1), np.arange(g.n_inputs)):
        raise g.refuse(node, "adds the graph's input reordered (a Transpose before the first layer); edgetune "
                             "adds the input as stored")
    if want != shape:
        raise g.refuse(node, f"adds the input of layer {source} ('{g.layers[source].node}', shape {list(want)}) "
                             f"to samples of shape {list(shape)}")
    spec = g.spec(node, lambda: LayerSpec.add(shape, source))
    g.add_layer(node, spec, onnx_shape=g.feat_shape)


def _in_input_order(g: _Build, v: np.ndarray) -> np.ndarray:
    """Per-element values of the current tensor, rearranged to the input features' order."""
    out = np.empty(g.n_inputs)
    out[g.index.reshape(-1)] = np.asarray(v).reshape(-1)
    return out


def _affine(kind: str) -> Callable[[Any, _Build], None]:
    def op(node: Any, g: _Build) -> None:
        c, pos = _data_and_const(node, g)
        if g.layers:
            raise g.refuse(node, f"{kind} after the first layer is not supported (only before it, where it "
                                 f"becomes the input normalisation)")
        if pos != 0 and kind in ("Sub", "Div"):
            raise g.refuse(node, f"computes constant {'-' if kind == 'Sub' else '/'} input, not input "
                                 f"{'-' if kind == 'Sub' else '/'} constant")
        v = _in_input_order(g, g.per_feature(node, c, "the constant"))
        if kind == "Sub":
            g.shift = g.shift - v
        elif kind == "Mul":
            g.scale, g.shift = g.scale * v, g.shift * v
        else:
            if np.any(v == 0):
                raise g.refuse(node, "divides by zero")
            g.scale, g.shift = g.scale / v, g.shift / v
        g.affine_nodes.append(node.name)
        g.affine_ops.append((kind, v))
        g.advance(node)
    return op


def _clip_bounds(node: Any, g: _Build) -> tuple[float | None, float | None]:
    """Clip's (min, max): attributes before opset 11, optional inputs after."""
    lo, hi = g.float_attr(node, "min", None), g.float_attr(node, "max", None)  # type: ignore[arg-type]
    for pos in (1, 2):
        if len(node.input) > pos and node.input[pos]:
            v = np.asarray(g.const(node, node.input[pos]))
            if v.size != 1:
                raise g.refuse(node, f"has a bound of shape {list(v.shape)}, not a scalar")
            if pos == 1:
                lo = float(v.reshape(-1)[0])
            else:
                hi = float(v.reshape(-1)[0])
    return lo, hi


def _activation(name: str) -> Callable[[Any, _Build], None]:
    def op(node: Any, g: _Build) -> None:
        g.data_input(node)
        act = name
        if node.op_type == "LeakyRelu":
            alpha = g.float_attr(node, "alpha", 0.01)
            if abs(alpha - 0.01) > 1e-7:
                raise g.refuse(node, f"has alpha={alpha}; edgetune's leaky_relu has slope 0.01")
        if node.op_type == "Clip":
            lo, hi = _clip_bounds(node, g)
            if (lo, hi) != (0.0, 6.0):
                raise g.refuse(node, f"clips to [{lo}, {hi}]: only Clip(0, 6) (ReLU6) converts")
        if not g.layers or not g.open:
            where = "before the first layer" if not g.layers else "right after another activation"
            raise g.refuse(node, f"is an activation {where}: edgetune backbones have one activation after a "
                                 f"layer")
        layer = g.layers[-1]
        layer.activation, layer.act_node = act, node.name or node.op_type
        g.open = False
        g.advance(node)
    return op


def _op_batchnorm(node: Any, g: _Build) -> None:
    """Inference BatchNormalization: y = (x - mean) * gamma / sqrt(var + eps) + beta, per channel
    (axis 1), folded into the dense or conv layer before it, or into the input normalisation."""
    g.data_input(node)
    if g.int_attr(node, "training_mode", 0) or len(node.output) > 1 and any(node.output[1:]):
        raise g.refuse(node, "runs in training mode (running statistics as outputs)")
    if len(node.input) != 5:
        raise g.refuse(node, "needs scale, bias, mean and variance inputs")
    gamma, beta, mean, var = (np.asarray(g.const(node, n), np.float64).reshape(-1) for n in node.input[1:5])
    eps = g.float_attr(node, "epsilon", 1e-5)
    channels = g.feat_shape[0] if g.feat_shape else 1
    if not all(v.shape == (channels,) for v in (gamma, beta, mean, var)):
        raise g.refuse(node, f"has statistics of shapes {[list(v.shape) for v in (gamma, beta, mean, var)]} for "
                             f"{channels} channels")
    if np.any(var + eps <= 0):
        raise g.refuse(node, "has a variance + epsilon that is not positive")
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    if g.bias_open:  # fold into the dense or conv layer whose output this is
        layer = g.layers[-1]
        if channels != layer.spec.out_channels:
            raise g.refuse(node, f"normalises {channels} channels of the {layer.spec.out_channels} of "
                                 f"'{layer.node}'")
        dt = layer.weight.dtype
        layer.weight = (layer.weight * scale.reshape((-1,) + (1,) * (layer.weight.ndim - 1))).astype(dt)
        b = np.zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
        layer.bias = (b * scale + shift).astype(dt)
    elif g.layers:
        why = "follows an activation" if not g.open else f"follows a {g.layers[-1].spec.kind} layer"
        raise g.refuse(node, f"{why}: only a BatchNormalization right after a dense or conv layer (or before "
                             f"the first) folds")
    else:  # before the first layer: per channel (axis 1) of the input
        expand = (channels,) + (1,) * (len(g.feat_shape) - 1)
        s_full = _in_input_order(g, np.broadcast_to(scale.reshape(expand), g.feat_shape))
        t_full = _in_input_order(g, np.broadcast_to(shift.reshape(expand), g.feat_shape))
        g.scale, g.shift = g.scale * s_full, g.shift * s_full + t_full
        g.affine_nodes.append(node.name)
        g.affine_ops.append(("BatchNormalization", s_full))
    g.advance(node)


def _op_passthrough(node: Any, g: _Build) -> None:
    """Identity, and Dropout at inference (its mask output must be unused)."""
    if node.op_type == "Identity" and node.input and node.input[0] in g.consts and node.output:
        g.consts[node.output[0]] = g.consts[node.input[0]]  # a constant under another name
        return
    g.data_input(node)
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = g.const(node, node.input[2])
        if bool(np.asarray(mode).reshape(-1)[0]):
            raise g.refuse(node, "runs in training mode")
    g.advance(node, same_value=True)


def _op_flatten(node: Any, g: _Build) -> None:
    g.data_input(node)
    rank = len(g.feat_shape) + 1
    axis = g.int_attr(node, "axis", 1)
    if axis < 0:
        axis += rank
    if axis != 1:
        raise g.refuse(node, f"has axis={g.attr(node, 'axis', 1)} on a tensor of rank {rank}: only axis 1 "
                             f"(keep the batch, flatten the sample) converts")
    _reshape_features(node, g, (math.prod(g.feat_shape),))


def _op_reshape(node: Any, g: _Build) -> None:
    g.data_input(node)
    if len(node.input) < 2:
        raise g.refuse(node, "has no shape input (an opset before 5)")
    shape = [int(s) for s in np.asarray(g.const(node, node.input[1])).reshape(-1)]
    n = math.prod(g.feat_shape)
    allowzero = g.int_attr(node, "allowzero", 0)
    if not shape or allowzero:
        raise g.refuse(node, f"reshapes to {shape}{' with allowzero' if allowzero else ''}")
    feats = [g.feat_shape[i - 1] if s == 0 and 0 < i <= len(g.feat_shape) else s for i, s in enumerate(shape)][1:]
    if shape[0] not in (0, -1) or feats.count(-1) > (0 if shape[0] == -1 else 1) or any(
            s < -1 or (s == 0) for s in feats):
        raise g.refuse(node, f"reshapes to {shape}: only shapes that keep the batch (first entry 0 or -1) "
                             f"and regroup the {n} features of a sample convert")
    if -1 in feats:
        known = math.prod([s for s in feats if s != -1])
        if known == 0 or n % known:
            raise g.refuse(node, f"reshapes {n} features to {shape}")
        feats[feats.index(-1)] = n // known
    if math.prod(feats) != n:
        raise g.refuse(node, f"reshapes a sample of {n} features to {shape} ({math.prod(feats)} features): "
                             f"the batch would change")
    _reshape_features(node, g, tuple(feats))


def _reshape_features(node: Any, g: _Build, feats: tuple[int, ...]) -> None:
    """Flatten or Reshape: before the first layer, an order of its input; after a layer with a
    spatial output, a flatten layer (to one row per sample) or nothing (the same shape)."""
    if not g.layers:
        g.index = g.index.reshape(feats)
        g.advance(node, feats)
        return
    out = g.layers[-1].spec.out_shape
    if len(out) == 1 or feats == g.feat_shape:  # already one row per sample: only the ONNX shape changes
        g.advance(node, feats, same_value=True)
        return
    if len(feats) != 1:
        raise g.refuse(node, f"regroups the output {list(g.feat_shape)} of '{g.layers[-1].node}' as "
                             f"{list(feats)}: after a convolution or pooling only a flatten to one row per "
                             f"sample converts")
    spec = g.spec(node, lambda: LayerSpec.flatten(out))
    g.add_layer(node, spec)


def _op_transpose(node: Any, g: _Build) -> None:
    g.data_input(node)
    rank = len(g.feat_shape) + 1
    perm = list(g.ints(node, "perm", list(range(rank))[::-1], rank))
    if sorted(perm) != list(range(rank)) or perm[0] != 0:
        raise g.refuse(node, f"has perm={perm}: the batch axis must stay first")
    fperm = [p - 1 for p in perm[1:]]
    new_shape = tuple(g.feat_shape[p] for p in fperm)
    moved = [p for p in fperm if g.feat_shape[p] != 1]
    if not g.layers:  # before the first layer: a permutation of its columns
        g.index = np.transpose(g.index, fperm)
        if moved != sorted(moved):
            g.notes.append(f"Transpose '{node.name}' (perm {perm}) folded into the first layer's columns")
    elif moved != sorted(moved):
        raise g.refuse(node, f"reorders the features of a layer's output (perm {perm} on {list(g.feat_shape)})")
    g.advance(node, new_shape, same_value=True)


def _op_softmax(node: Any, g: _Build) -> None:
    g.data_input(node)
    axis = g.int_attr(node, "axis", -1)
    if len(g.feat_shape) != 1 or axis not in (1, -1) or not g.layers or not g.open:
        raise g.refuse(node, "is not a softmax over the last layer's outputs")
    g.final = node.op_type
    g.notes.append(f"{node.op_type} '{node.name}' at the output dropped: edgetune backbones output logits "
                   f"(predict_proba applies softmax; argmax is unchanged)")
    g.advance(node, same_value=True)


def _op_constant(node: Any, g: _Build) -> None:
    for a in node.attribute:
        if a.name == "value":
            g.consts[node.output[0]] = check_tensor(a.t, Path("."), g.where, name=node.output[0])
            return
    raise g.refuse(node, "holds no tensor 'value' (only Constant value=tensor converts)")


@dataclass(frozen=True)
class OpRule:
    convert: Callable[[Any, _Build], None]
    what: str


#: Every ONNX operator from_onnx converts. A new layer kind is one entry here.
OPS: dict[str, OpRule] = {
    "Gemm": OpRule(_op_gemm, "a dense layer (transA=0)"),
    "MatMul": OpRule(_op_matmul, "a dense layer (data @ constant weight); an Add after it is its bias"),
    "Conv": OpRule(_op_conv, "a conv1d/conv2d layer (any group, dilation 1, symmetric padding)"),
    "MaxPool": OpRule(_op_pool, "a maxpool1d/2d layer (ceil_mode 0, symmetric padding)"),
    "AveragePool": OpRule(_op_pool, "an avgpool1d/2d layer (ceil_mode 0; padding counted: count_include_pad=1)"),
    "GlobalAveragePool": OpRule(_op_global_pool, "a gap layer (one value per channel)"),
    "Add": OpRule(_op_add, "a layer's bias, a residual add of an earlier layer's input, or an input shift "
                           "before the first layer"),
    "Sub": OpRule(_affine("Sub"), "before the first layer: input normalisation"),
    "Mul": OpRule(_affine("Mul"), "before the first layer: input normalisation"),
    "Div": OpRule(_affine("Div"), "before the first layer: input normalisation"),
    "BatchNormalization": OpRule(_op_batchnorm, "folded into the dense or conv layer before it, or the input "
                                                "normalisation"),
    "Relu": OpRule(_activation("relu"), "activation relu"),
    "Clip": OpRule(_activation("relu6"), "activation relu6 (min 0, max 6)"),
    "LeakyRelu": OpRule(_activation("leaky_relu"), "activation leaky_relu (alpha 0.01)"),
    "Tanh": OpRule(_activation("tanh"), "activation tanh"),
    "Sigmoid": OpRule(_activation("sigmoid"), "activation sigmoid"),
    "Identity": OpRule(_op_passthrough, "nothing"),
    "Dropout": OpRule(_op_passthrough, "nothing (inference)"),
    "Flatten": OpRule(_op_flatten, "a flatten layer after a convolution or pooling, else nothing (axis 1)"),
    "Reshape": OpRule(_op_reshape, "a flatten layer after a convolution or pooling, else nothing (keeps the batch)"),
    "Transpose": OpRule(_op_transpose, "before the first layer: its columns' order; after it: only no-ops"),
    "Softmax": OpRule(_op_softmax, "dropped at the output (logits)"),
    "LogSoftmax": OpRule(_op_softmax, "dropped at the output (logits)"),
    "Constant": OpRule(_op_constant, "a constant operand"),
}


def supported_ops() -> str:
    return ", ".join(sorted(OPS))


# ---------------------------------------------------------------------- the walk
def _graph_input(graph: Any, inits: set[str], where: str) -> tuple[str, list[int | str], tuple[int, ...]]:
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{where}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                         f"an edgetune backbone has one")
    inp = inputs[0]
    tt = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
    if tt is None or tt.elem_type not in (1, 11):
        raise UsageError(f"{where}: input '{inp.name}' is not a float or double tensor")
    if not tt.HasField("shape") or len(tt.shape.dim) < 2:
        raise UsageError(f"{where}: input '{inp.name}' declares no shape of rank >= 2 (batch, features...)")
    dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    feats = dims[1:]
    if any(not isinstance(d, int) or d < 1 for d in feats):
        raise UsageError(f"{where}: input '{inp.name}' has shape {dims}: every dimension after the batch must "
                         f"be a known size")
    n = math.prod(int(d) for d in feats)  # type: ignore[arg-type]
    if n > MAX_FEATURES:  # no first layer edgetune reads could take it: refused before any work
        raise UsageError(f"{where}: input '{inp.name}' has shape {dims}, {n:.3g} features per sample, more than "
                         f"a layer of at most {MAX_TENSOR_BYTES >> 20} MB can take")
    return inp.name, dims, tuple(int(d) for d in feats)  # type: ignore[arg-type]


def read_onnx(path: str | os.PathLike, *, labels: Sequence[str] | None = None) -> OnnxImport:
    path = Path(os.fspath(path))
    where = str(path)
    model = load_model(path)
    graph = model.graph
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise UsageError(f"{where}: opset {opset} is older than {MIN_OPSET}, the oldest edgetune reads")
    # Every node is checked against the table before anything is converted or read.
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in OPS:
            dom = f" of domain '{node.domain}'" if node.domain not in _DEFAULT_DOMAINS else ""
            raise UsageError(f"{where}: node '{node.name or '(unnamed)'}' has op type {node.op_type}{dom}, which "
                             f"does not convert to an edgetune backbone. What converts: {supported_ops()}")
    if graph.sparse_initializer:
        raise UsageError(f"{where}: sparse initializers are not supported")
    folder = path.parent
    consts: dict[str, TensorHeader | np.ndarray] = {}
    for t in graph.initializer:  # headers checked now; the values read when a node uses them
        consts[t.name] = check_tensor(t, folder, where)
    input_name, dims, feats = _graph_input(graph, set(consts), where)
    g = _Build(where, consts, input_name, feats)
    for node in graph.node:
        OPS[node.op_type].convert(node, g)
    outputs = [o.name for o in graph.output]
    if outputs != [g.path]:
        raise UsageError(f"{where}: the graph's outputs are {outputs}; an edgetune backbone has one, the end of "
                         f"its chain ('{g.path}')")
    if labels is None:  # the label names edgetune's own export records, when they fit
        meta = {p.key: p.value for p in model.metadata_props}.get("labels")
        if meta and g.layers and len(meta.split(",")) == g.layers[-1].spec.out_features:
            labels = meta.split(",")
    return OnnxImport(_backbone(g, labels), input_name, dims, opset, len(graph.node), g.notes)


def _normalisation(g: _Build, dtype: type, spatial: tuple[int, ...] | None
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(input_mean, input_std) of the affine nodes before the first layer: per feature, or per
    channel of a spatial first layer (where they must not vary within a channel)."""
    if not g.affine_nodes:
        return None, None
    if np.any(g.scale == 0):
        raise UsageError(f"{g.where}: the input normalisation ({', '.join(g.affine_nodes)}) multiplies a "
                         f"feature by zero")

    def shape(v: np.ndarray) -> np.ndarray:
        if spatial is None:
            return v.astype(dtype)
        per = v.reshape(spatial[0], -1)
        if np.any(per != per[:, :1]):
            raise UsageError(f"{g.where}: the input normalisation ({', '.join(g.affine_nodes)}) varies within a "
                             f"channel; a convolutional backbone normalises each input channel by one mean and std")
        return per[:, 0].astype(dtype)

    kinds = [k for k, _ in g.affine_ops]
    if kinds in (["Sub"], ["Sub", "Div"], ["Div"]):  # (x - mean) / std as written: taken exactly
        vals = dict(g.affine_ops)
        return (None if "Sub" not in vals else shape(vals["Sub"]),
                None if "Div" not in vals else shape(vals["Div"]))
    return shape(-g.shift / g.scale), shape(1.0 / g.scale)


def _backbone(g: _Build, labels: Sequence[str] | None) -> Backbone:
    if not any(layer.spec.has_params for layer in g.layers):
        raise UsageError(f"{g.where}: the graph has no dense or conv layer (Gemm, MatMul or Conv)")
    last = g.layers[-1]
    if last.activation is not None:
        raise UsageError(f"{g.where}: node '{last.act_node}' ({last.activation}) follows the last layer: "
                         f"edgetune backbones output logits, so export the model without its final activation "
                         f"(a final Softmax is dropped by itself)")
    if len(last.spec.out_shape) != 1:
        raise UsageError(f"{g.where}: the graph ends with samples of shape {list(last.spec.out_shape)} "
                         f"('{last.node}'): an edgetune backbone ends with one value per class (a dense layer, or "
                         f"global pooling / a flatten)")
    dtypes = {l.weight.dtype for l in g.layers if l.weight is not None}
    dtype = np.float64 if dtypes == {np.dtype(np.float64)} else np.float32
    first = g.layers[0].spec
    mean, std = _normalisation(g, dtype, first.in_shape if first.spatial else None)
    bias = (lambda l: np.zeros(l.weight.shape[0], dtype) if l.bias is None else np.ascontiguousarray(l.bias, dtype))
    try:
        if all(l.spec.kind == "dense" for l in g.layers):  # an MLP: one activation between its layers
            gaps = [(l.activation or "identity", l.act_node or f"after '{l.node}'") for l in g.layers[:-1]]
            acts = {a for a, _ in gaps}
            if len(acts) > 1:
                raise UsageError(f"edgetune MLPs use one activation between every pair of layers; this graph "
                                 f"mixes them ({', '.join(f'{a} at {w}' for a, w in gaps)})")
            return Backbone([np.ascontiguousarray(l.weight, dtype=dtype) for l in g.layers],
                            [bias(l) for l in g.layers], activation=acts.pop() if acts else "relu", labels=labels,
                            input_mean=mean, input_std=std)
        layers = []
        for l in g.layers:
            spec = replace(l.spec, activation=l.activation or "identity")
            if spec.has_params:
                layers.append(Layer(spec, np.ascontiguousarray(l.weight, dtype=dtype), bias(l)))
            else:
                layers.append(Layer(spec))
        return Backbone.from_layers(layers, labels=labels, input_mean=mean, input_std=std)
    except UsageError as e:
        raise UsageError(f"{g.where}: {e}") from None
