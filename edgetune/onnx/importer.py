"""ONNX graph -> edgetune Backbone, one table entry per operator.

The graph is walked in its (topological) node order along one data path, from the graph's
input to its output. Each operator is an entry of ``OPS``: a function that checks the
node and updates the model being built (``_Build``). An operator that is not in the table,
or that the table's function cannot express on the MLP (a residual Add, a Transpose that
reorders features after the first layer, ...), is refused with the node's name and op
type, before anything is returned. A new layer kind is one more entry.

Before the first layer, per-feature Add/Sub/Mul/Div become the backbone's input
normalisation and Transpose/Reshape/Flatten a permutation of the first layer's columns,
so a Keras-style NHWC input with a leading Transpose, or a graph exported by
``to_onnx`` (Sub mean, Div std), imports exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ModelFileError, UsageError
from ..nn.mlp import Backbone
from .reader import MAX_TENSOR_BYTES, TensorHeader, check_tensor, load_model

MIN_OPSET = 7
_DEFAULT_DOMAINS = ("", "ai.onnx")


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
                "input_shape": self.input_shape, "opset": self.opset, "nodes": self.nodes, "notes": self.notes}


@dataclass
class _Layer:
    weight: np.ndarray                  # (out, in)
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
        self.feat_shape = feat_shape            # per-sample shape of self.path
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
        self.bias_open = False                  # the path is a layer's output, its bias may follow
        self.final: str = ""                    # a Softmax/LogSoftmax at the output (dropped)
        self.notes: list[str] = []

    # -- helpers for the op functions ------------------------------------------------------
    def refuse(self, node: Any, why: str) -> UsageError:
        return UsageError(f"{self.where}: node '{node.name or '(unnamed)'}' ({node.op_type}) {why}")

    def const(self, node: Any, name: str) -> np.ndarray:
        v = self.consts.get(name)
        if v is None:
            if name in self.seen_path:
                raise self.refuse(node, f"takes the data path twice or as a weight ('{name}'): residual "
                                        f"connections and data-dependent weights do not convert to an MLP")
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
                                        f"residual connection): edgetune backbones are chains of layers")
            raise self.refuse(node, f"does not read the data path (expected '{self.path}' as input "
                                    f"{position}, got '{got}')")
        if self.final:
            raise self.refuse(node, f"follows the output's {self.final}: {self.final} must be the last node")

    def advance(self, node: Any, feat_shape: tuple[int, ...] | None = None) -> None:
        if len(node.output) < 1 or not node.output[0]:
            raise self.refuse(node, "has no output")
        self.path = node.output[0]
        self.seen_path.add(self.path)
        if feat_shape is not None:
            self.feat_shape = feat_shape

    def attr(self, node: Any, name: str, default: Any) -> Any:
        import onnx

        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def flat(self, node: Any) -> int:
        if len(self.feat_shape) != 1:
            raise self.refuse(node, f"multiplies a tensor of per-sample shape {list(self.feat_shape)}; a dense "
                                    f"layer takes flat samples (Flatten or Reshape first)")
        return self.feat_shape[0]

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

    def add_layer(self, node: Any, w: np.ndarray, b: np.ndarray | None) -> None:
        if not np.all(np.isfinite(w)) or (b is not None and not np.all(np.isfinite(b))):
            raise ModelFileError(f"{self.where}: node '{node.name}' ({node.op_type}) has NaN or inf weights")
        if not self.layers:  # the first layer reads the input features in the graph's order
            cols = np.empty_like(w)
            cols[:, self.index.reshape(-1)] = w
            w = cols
        self.layers.append(_Layer(w, b, node.name or node.op_type))
        self.bias_open = True
        self.advance(node, (w.shape[0],))


# ---------------------------------------------------------------------- the operators
def _op_gemm(node: Any, g: _Build) -> None:
    g.data_input(node)
    if g.attr(node, "transA", 0):
        raise g.refuse(node, "has transA=1: the data path must be A (samples, features)")
    n_in = g.flat(node)
    b_mat = g.const(node, node.input[1])
    if b_mat.ndim != 2:
        raise g.refuse(node, f"has a weight of shape {list(b_mat.shape)}, not 2-D")
    w = b_mat if g.attr(node, "transB", 0) else b_mat.T
    if w.shape[1] != n_in:
        raise g.refuse(node, f"takes {w.shape[1]} features but the data path has {n_in}")
    alpha, beta = float(g.attr(node, "alpha", 1.0)), float(g.attr(node, "beta", 1.0))
    w = w * np.asarray(alpha, w.dtype) if alpha != 1.0 else w
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = g.const(node, node.input[2])
        try:
            bias = np.broadcast_to(np.asarray(c).reshape(-1) if c.ndim == 2 and c.shape[0] == 1 else c,
                                   (w.shape[0],)) * np.asarray(beta, c.dtype)
        except ValueError:
            raise g.refuse(node, f"has a bias of shape {list(c.shape)} for {w.shape[0]} outputs") from None
    g.add_layer(node, np.ascontiguousarray(w), None if bias is None else np.array(bias))


def _op_matmul(node: Any, g: _Build) -> None:
    g.data_input(node)
    n_in = g.flat(node)
    w = g.const(node, node.input[1])
    if w.ndim != 2 or w.shape[0] != n_in:
        raise g.refuse(node, f"multiplies {n_in} features by a weight of shape {list(w.shape)} "
                             f"(expected ({n_in}, outputs))")
    g.add_layer(node, np.ascontiguousarray(w.T), None)


def _data_and_const(node: Any, g: _Build) -> tuple[np.ndarray, int]:
    """(the constant operand, the data path's position) of a binary elementwise node."""
    if len(node.input) != 2:
        raise g.refuse(node, "needs two inputs")
    pos = 0 if node.input[0] == g.path else 1
    g.data_input(node, position=pos)
    return g.const(node, node.input[1 - pos]), pos


def _op_add(node: Any, g: _Build) -> None:
    c, _ = _data_and_const(node, g)
    if g.layers and g.bias_open:
        layer = g.layers[-1]
        try:
            b = np.broadcast_to(c.reshape(-1) if c.ndim == 2 and c.shape[0] == 1 else c, (layer.weight.shape[0],))
        except ValueError:
            raise g.refuse(node, f"adds a constant of shape {list(c.shape)} to {layer.weight.shape[0]} outputs "
                                 f"of '{layer.node}'") from None
        layer.bias = np.array(b, dtype=layer.weight.dtype) if layer.bias is None else layer.bias + b
        g.advance(node)
        return
    if g.layers:
        raise g.refuse(node, "adds a constant where it is not a layer's bias (after an activation)")
    v = _in_input_order(g, g.per_feature(node, c, "the addend"))
    g.shift = g.shift + v
    g.affine_nodes.append(node.name)
    g.affine_ops.append(("Add", v))
    g.advance(node)


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


def _activation(name: str) -> Callable[[Any, _Build], None]:
    def op(node: Any, g: _Build) -> None:
        g.data_input(node)
        if node.op_type == "LeakyRelu":
            alpha = float(g.attr(node, "alpha", 0.01))
            if abs(alpha - 0.01) > 1e-7:
                raise g.refuse(node, f"has alpha={alpha}; edgetune's leaky_relu has slope 0.01")
        if not g.layers or not g.bias_open:
            where = "before the first layer" if not g.layers else "right after another activation"
            raise g.refuse(node, f"is an activation {where}: edgetune backbones have one activation between "
                                 f"every pair of layers")
        layer = g.layers[-1]
        layer.activation, layer.act_node = name, node.name or node.op_type
        g.bias_open = False
        g.advance(node)
    return op


def _op_batchnorm(node: Any, g: _Build) -> None:
    """Inference BatchNormalization: y = (x - mean) * gamma / sqrt(var + eps) + beta, per channel
    (axis 1), folded into the layer before it, or into the input normalisation."""
    g.data_input(node)
    if int(g.attr(node, "training_mode", 0)) or len(node.output) > 1 and any(node.output[1:]):
        raise g.refuse(node, "runs in training mode (running statistics as outputs)")
    if len(node.input) != 5:
        raise g.refuse(node, "needs scale, bias, mean and variance inputs")
    gamma, beta, mean, var = (np.asarray(g.const(node, n), np.float64).reshape(-1) for n in node.input[1:5])
    eps = float(g.attr(node, "epsilon", 1e-5))
    channels = g.feat_shape[0] if g.feat_shape else 1
    if not all(v.shape == (channels,) for v in (gamma, beta, mean, var)):
        raise g.refuse(node, f"has statistics of shapes {[list(v.shape) for v in (gamma, beta, mean, var)]} for "
                             f"{channels} channels")
    if np.any(var + eps <= 0):
        raise g.refuse(node, "has a variance + epsilon that is not positive")
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    if g.layers and g.bias_open:  # fold into the dense layer whose output this is
        layer = g.layers[-1]
        dt = layer.weight.dtype
        layer.weight = (layer.weight * scale[:, None]).astype(dt)
        b = np.zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
        layer.bias = (b * scale + shift).astype(dt)
    elif g.layers:
        raise g.refuse(node, "follows an activation: only a BatchNormalization right after a dense layer (or "
                             "before the first) folds")
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
    g.advance(node)


def _op_flatten(node: Any, g: _Build) -> None:
    g.data_input(node)
    rank = len(g.feat_shape) + 1
    axis = int(g.attr(node, "axis", 1))
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
    allowzero = int(g.attr(node, "allowzero", 0))
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
    if not g.layers:
        g.index = g.index.reshape(feats)
    g.advance(node, feats)


def _op_transpose(node: Any, g: _Build) -> None:
    g.data_input(node)
    rank = len(g.feat_shape) + 1
    perm = [int(p) for p in g.attr(node, "perm", list(range(rank))[::-1])]
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
    g.advance(node, new_shape)


def _op_softmax(node: Any, g: _Build) -> None:
    g.data_input(node)
    axis = int(g.attr(node, "axis", -1))
    if len(g.feat_shape) != 1 or axis not in (1, -1) or not g.layers or not g.bias_open:
        raise g.refuse(node, "is not a softmax over the last layer's outputs")
    g.final = node.op_type
    g.notes.append(f"{node.op_type} '{node.name}' at the output dropped: edgetune backbones output logits "
                   f"(predict_proba applies softmax; argmax is unchanged)")
    g.advance(node)


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
    "Add": OpRule(_op_add, "a layer's bias, or an input shift before the first layer"),
    "Sub": OpRule(_affine("Sub"), "before the first layer: input normalisation"),
    "Mul": OpRule(_affine("Mul"), "before the first layer: input normalisation"),
    "Div": OpRule(_affine("Div"), "before the first layer: input normalisation"),
    "BatchNormalization": OpRule(_op_batchnorm, "folded into the dense layer before it, or the input "
                                                "normalisation"),
    "Relu": OpRule(_activation("relu"), "activation relu"),
    "LeakyRelu": OpRule(_activation("leaky_relu"), "activation leaky_relu (alpha 0.01)"),
    "Tanh": OpRule(_activation("tanh"), "activation tanh"),
    "Sigmoid": OpRule(_activation("sigmoid"), "activation sigmoid"),
    "Identity": OpRule(_op_passthrough, "nothing"),
    "Dropout": OpRule(_op_passthrough, "nothing (inference)"),
    "Flatten": OpRule(_op_flatten, "nothing (axis 1)"),
    "Reshape": OpRule(_op_reshape, "nothing (keeps the batch)"),
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
                         f"an MLP has one")
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
    if n > MAX_TENSOR_BYTES // 4:  # no first layer edgetune reads could take it: refused before any work
        raise UsageError(f"{where}: input '{inp.name}' has shape {dims}, {n:.3g} features per sample, more than "
                         f"a dense layer of at most {MAX_TENSOR_BYTES >> 20} MB can take")
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
        raise UsageError(f"{where}: the graph's outputs are {outputs}; an MLP has one, the end of its chain "
                         f"('{g.path}')")
    if labels is None:  # the label names edgetune's own export records, when they fit
        meta = {p.key: p.value for p in model.metadata_props}.get("labels")
        if meta and len(meta.split(",")) == g.feat_shape[0]:
            labels = meta.split(",")
    return OnnxImport(_backbone(g, labels), input_name, dims, opset, len(graph.node), g.notes)


def _backbone(g: _Build, labels: Sequence[str] | None) -> Backbone:
    if not g.layers:
        raise UsageError(f"{g.where}: the graph has no dense layer (Gemm or MatMul)")
    last = g.layers[-1]
    if last.activation is not None:
        raise UsageError(f"{g.where}: node '{last.act_node}' ({last.activation}) follows the last layer: "
                         f"edgetune backbones output logits, so export the model without its final activation "
                         f"(a final Softmax is dropped by itself)")
    gaps = [(l.activation or "identity", l.act_node or f"after '{l.node}'") for l in g.layers[:-1]]
    acts = {a for a, _ in gaps}
    if len(acts) > 1:
        raise UsageError(f"{g.where}: edgetune backbones use one activation between every pair of layers; this "
                         f"graph mixes them ({', '.join(f'{a} at {w}' for a, w in gaps)})")
    activation = acts.pop() if acts else "relu"
    dtypes = {l.weight.dtype for l in g.layers}
    dtype = np.float64 if dtypes == {np.dtype(np.float64)} else np.float32
    weights = [np.ascontiguousarray(l.weight, dtype=dtype) for l in g.layers]
    biases = [np.zeros(w.shape[0], dtype) if l.bias is None else np.ascontiguousarray(l.bias, dtype=dtype)
              for w, l in zip(weights, g.layers)]
    mean = std = None
    if g.affine_nodes:
        if np.any(g.scale == 0):
            raise UsageError(f"{g.where}: the input normalisation ({', '.join(g.affine_nodes)}) multiplies a "
                             f"feature by zero")
        kinds = [k for k, _ in g.affine_ops]
        if kinds in (["Sub"], ["Sub", "Div"], ["Div"]):  # (x - mean) / std as written: taken exactly
            vals = dict(g.affine_ops)
            mean = None if "Sub" not in vals else vals["Sub"].astype(dtype)
            std = None if "Div" not in vals else vals["Div"].astype(dtype)
        else:
            std = (1.0 / g.scale).astype(dtype)
            mean = (-g.shift / g.scale).astype(dtype)
    try:
        return Backbone(weights, biases, activation=activation, labels=labels, input_mean=mean, input_std=std)
    except UsageError as e:
        raise UsageError(f"{g.where}: {e}") from None
