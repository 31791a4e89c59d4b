"""Convolutional networks <-> edgetune backbones, read from the module's ``torch.fx`` graph.

``from_graph(module, input_shape)`` walks the traced graph once, in order, and turns it into
a chain of edgetune layers: Conv1d/Conv2d (any groups), BatchNorm folded into the layer
before it (eval statistics), the activations, Max/AvgPool, AdaptiveAvgPool to 1, Flatten,
Dropout (dropped), Linear, and residual adds whose second operand is the input of an
earlier layer (MobileNetV2's InvertedResidual). Everything is checked before any tensor is
copied: an unsupported module is refused naming the module and its kind, with the list of
what converts. ``to_module(backbone)`` builds the equivalent ``nn.Module``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..nn.layers import Layer, LayerSpec, check_chain
from ..nn.mlp import Backbone

CONVERTS = ("Conv1d, Conv2d (zero padding, dilation 1, any groups), BatchNorm1d/2d after a convolution or "
            "Linear (folded), ReLU, ReLU6, Hardtanh(0, 6), LeakyReLU(0.01), Tanh, Sigmoid, MaxPool1d/2d, "
            "AvgPool1d/2d, AdaptiveAvgPool1d/2d(1), Flatten, Dropout, Identity, Linear, and residual adds "
            "of an earlier layer's input")

_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_ACT_FUNCS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.nn.functional.relu6: "relu6",
              torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.nn.functional.tanh: "tanh",
              torch.nn.functional.sigmoid: "sigmoid"}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_NOOPS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


@dataclass
class _Value:
    """A tensor of the graph: the layer whose output it is (-1: the input) and its torch shape."""
    producer: int
    shape: tuple[int, ...]        # one sample's shape as torch sees it
    users: int = 0


@dataclass
class _Chain:
    specs: list[LayerSpec] = field(default_factory=list)
    tensors: list[tuple[np.ndarray | None, np.ndarray | None]] = field(default_factory=list)
    inputs: dict[int, int] = field(default_factory=dict)   # id(value) -> layer whose input it is


def _arr(t: torch.Tensor | None, dtype: np.dtype) -> np.ndarray | None:
    return None if t is None else np.array(t.detach().cpu().numpy(), dtype=dtype, copy=True)


def _ints(v: Any, rank: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * rank


def from_graph(module: nn.Module, input_shape: tuple[int, ...], *, labels: list[str] | None = None) -> Backbone:
    import torch.fx

    input_shape = tuple(int(v) for v in input_shape)
    if not 2 <= len(input_shape) <= 3 or min(input_shape) < 1:
        raise UsageError(f"input_shape must be (C, L) or (C, H, W) with positive sizes, got {list(input_shape)}")
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:  # fx raises many kinds of errors on dynamic code
        raise UsageError(f"cannot read {type(module).__name__}.forward (torch.fx could not trace it: {e})") from None
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    users = {n: len(n.users) for n in nodes}
    values: dict[Any, _Value] = {}
    chain = _Chain()
    dtype: np.dtype | None = None
    head = None  # the node whose value the chain ends with

    def value_of(node: Any, what: str) -> _Value:
        if node not in values:
            raise UsageError(f"{what} reads {node}, which is not a layer's output edgetune can follow")
        return values[node]

    def new_layer(node: Any, spec: LayerSpec, w: np.ndarray | None = None, b: np.ndarray | None = None,
                  torch_shape: tuple[int, ...] | None = None) -> None:
        nonlocal head
        k = len(chain.specs)
        chain.specs.append(spec)
        chain.tensors.append((w, b))
        values[node] = _Value(k, torch_shape or spec.out_shape)
        head = node

    def set_activation(node: Any, src: Any, name: str, what: str) -> None:
        nonlocal head
        v = value_of(src, what)
        if v.producer < 0 or users[src] != 1 or chain.specs[v.producer].activation != "identity" \
                or v.producer != len(chain.specs) - 1:
            raise UsageError(f"{what} ({name}) does not directly follow a layer edgetune can attach it to")
        s = chain.specs[v.producer]
        chain.specs[v.producer] = LayerSpec(s.kind, s.in_shape, s.out_channels, s.kernel, s.stride, s.padding,
                                            s.groups, name, s.source)
        values[node] = _Value(v.producer, v.shape)
        head = node

    def alias(node: Any, src: Any, shape: tuple[int, ...] | None = None) -> None:
        nonlocal head
        if src is not head:
            raise UsageError(f"{node} does not read the previous layer's output: edgetune backbones are chains "
                             f"(with residual adds)")
        v = value_of(src, str(node))
        values[node] = _Value(v.producer, shape or v.shape)
        head = node

    def flat_input(node: Any, src: Any, what: str) -> tuple[int, ...]:
        """The edgetune shape of ``src``: a pooled (C, 1, 1) counts as (C,)."""
        v = value_of(src, what)
        if src is not head:
            raise UsageError(f"{what} does not read the previous layer's output: edgetune backbones are chains "
                             f"(with residual adds)")
        shape = v.shape
        if len(shape) > 1 and all(d == 1 for d in shape[1:]) and v.producer >= 0 \
                and chain.specs[v.producer].kind == "gap":
            return (shape[0],)
        return shape

    def _flatten(node: Any, src: Any, what: str, start: int, end: int) -> None:
        shape = values[src].shape if src in values else None
        if shape is None:
            raise UsageError(f"{what} reads a tensor edgetune cannot follow")
        if start not in (1, -len(shape)) or end not in (-1, len(shape)):
            raise UsageError(f"{what} must flatten every dimension but the batch (start_dim=1)")
        flat = flat_input(node, src, what)
        if len(flat) == 1:  # already one value per channel (after pooling to 1) or flat
            alias(node, src, flat)
            return
        chain.inputs[id(src)] = len(chain.specs)
        new_layer(node, LayerSpec.flatten(flat))

    # Pass 1 finds what is unsupported before anything is converted.
    for node in nodes:
        if node.op == "call_module":
            m = modules[node.target]
            ok = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear, nn.MaxPool1d,
                                nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                nn.Flatten, nn.LeakyReLU, nn.Hardtanh, *_NOOPS, *_ACTS))
            if not ok:
                raise UsageError(f"module '{node.target}' ({type(m).__name__}) does not convert: from_torch "
                                 f"converts {CONVERTS}")
        elif node.op == "call_function" and node.target not in _ACT_FUNCS and node.target not in (
                operator.add, torch.add, torch.flatten, torch.nn.functional.leaky_relu,
                torch.nn.functional.dropout, torch.nn.functional.adaptive_avg_pool1d,
                torch.nn.functional.adaptive_avg_pool2d):
            raise UsageError(f"function {getattr(node.target, '__name__', node.target)} in "
                             f"{type(module).__name__}.forward does not convert: from_torch converts {CONVERTS}")
        elif node.op == "call_method" and node.target not in (*_ACT_METHODS, "flatten"):
            raise UsageError(f"tensor method .{node.target}() in {type(module).__name__}.forward does not convert: "
                             f"from_torch converts {CONVERTS}")

    for node in nodes:
        what = f"'{node.target}'" if node.op == "call_module" else f"{node.op} {getattr(node.target, '__name__', node.target)}"
        if node.op == "placeholder":
            if values:
                raise UsageError(f"{type(module).__name__}.forward takes more than one input")
            values[node] = _Value(-1, input_shape)
            head = node
            continue
        if node.op == "get_attr":
            raise UsageError(f"{type(module).__name__}.forward reads the attribute {node.target} directly")
        if node.op == "output":
            if node.args[0] is not head:
                raise UsageError(f"{type(module).__name__}.forward does not return its last layer's output")
            break
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op == "call_module":
            m = modules[node.target]
            src = tensor_args[0]
            if isinstance(m, _NOOPS):
                alias(node, src)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
                shape = flat_input(node, src, what)
                rank = 1 if isinstance(m, nn.Conv1d) else 2
                if len(shape) != rank + 1:
                    raise UsageError(f"{what} ({type(m).__name__}) gets samples of shape {list(shape)}")
                if m.padding_mode != "zeros" or any(d != 1 for d in _ints(m.dilation, rank)):
                    raise UsageError(f"{what}: only zero padding and dilation 1 convert")
                pad = m.padding
                if isinstance(pad, str):
                    if pad == "valid":
                        pad = (0,) * rank
                    else:  # 'same' at stride 1
                        k = _ints(m.kernel_size, rank)
                        if any(v % 2 == 0 for v in k):
                            raise UsageError(f"{what}: padding='same' with an even kernel does not convert")
                        pad = tuple((v - 1) // 2 for v in k)
                dtype = dtype or m.weight.detach().cpu().numpy().dtype
                spec = LayerSpec.conv(shape, m.out_channels, _ints(m.kernel_size, rank),
                                      stride=_ints(m.stride, rank), padding=_ints(pad, rank), groups=m.groups)
                chain.inputs[id(src)] = len(chain.specs)
                b = _arr(m.bias, dtype) if m.bias is not None else np.zeros(m.out_channels, dtype)
                new_layer(node, spec, _arr(m.weight, dtype), b)
            elif isinstance(m, nn.Linear):
                shape = flat_input(node, src, what)
                if len(shape) != 1:
                    raise UsageError(f"{what} (Linear) gets samples of shape {list(shape)}: flatten them first")
                dtype = dtype or m.weight.detach().cpu().numpy().dtype
                spec = LayerSpec.dense(shape[0], m.out_features)
                chain.inputs[id(src)] = len(chain.specs)
                b = _arr(m.bias, dtype) if m.bias is not None else np.zeros(m.out_features, dtype)
                new_layer(node, spec, _arr(m.weight, dtype), b)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                v = value_of(src, what)
                prev = chain.specs[v.producer] if v.producer >= 0 else None
                if prev is None or not prev.has_params or prev.activation != "identity" or users[src] != 1 \
                        or v.producer != len(chain.specs) - 1:
                    raise UsageError(f"{what} ({type(m).__name__}) does not directly follow a convolution or "
                                     f"Linear layer, so it cannot be folded into one")
                if m.running_mean is None or m.running_var is None:
                    raise UsageError(f"{what} ({type(m).__name__}) keeps no running statistics "
                                     f"(track_running_stats=False) to fold")
                w, b = chain.tensors[v.producer]
                f64 = np.float64
                scale = (m.weight.detach().cpu().numpy().astype(f64) if m.affine else 1.0) / np.sqrt(
                    m.running_var.detach().cpu().numpy().astype(f64) + m.eps)
                shift = m.bias.detach().cpu().numpy().astype(f64) if m.affine else 0.0
                w = (w.astype(f64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
                b = ((b.astype(f64) - m.running_mean.detach().cpu().numpy()) * scale + shift).astype(w.dtype)
                chain.tensors[v.producer] = (w, b)
                alias(node, src)
            elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
                shape = flat_input(node, src, what)
                rank = len(shape) - 1
                mode = "max" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avg"
                if getattr(m, "ceil_mode", False) or (mode == "max" and any(
                        d != 1 for d in _ints(m.dilation, rank))) or (mode == "avg" and (
                        not m.count_include_pad or getattr(m, "divisor_override", None))):
                    raise UsageError(f"{what} ({type(m).__name__}): ceil_mode, dilation, count_include_pad=False "
                                     f"and divisor_override do not convert")
                spec = LayerSpec.pool(mode, shape, _ints(m.kernel_size, rank),
                                      _ints(m.stride if m.stride is not None else m.kernel_size, rank),
                                      _ints(m.padding, rank))
                chain.inputs[id(src)] = len(chain.specs)
                new_layer(node, spec)
            elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
                shape = flat_input(node, src, what)
                if any(v != 1 for v in _ints(m.output_size, len(shape) - 1)):
                    raise UsageError(f"{what} ({type(m).__name__}) must pool to size 1 to convert")
                chain.inputs[id(src)] = len(chain.specs)
                new_layer(node, LayerSpec.gap(shape), torch_shape=(shape[0],) + (1,) * (len(shape) - 1))
            elif isinstance(m, nn.Flatten):
                _flatten(node, src, what, m.start_dim, m.end_dim)
            elif isinstance(m, nn.LeakyReLU):
                if m.negative_slope != 0.01:
                    raise UsageError(f"{what} is LeakyReLU({m.negative_slope}); only 0.01 converts")
                set_activation(node, src, "leaky_relu", what)
            elif isinstance(m, nn.Hardtanh):
                if (m.min_val, m.max_val) != (0.0, 6.0):
                    raise UsageError(f"{what} is Hardtanh({m.min_val}, {m.max_val}); only (0, 6) (ReLU6) converts")
                set_activation(node, src, "relu6", what)
            else:
                set_activation(node, src, _ACTS[type(m)], what)
            continue
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            if len(tensor_args) != 2 or len(node.args) != 2 or node.kwargs:
                raise UsageError(f"{what}: only the sum of two tensors converts")
            a, b = tensor_args
            cur, other = (a, b) if a is head else (b, a) if b is head else (None, None)
            if cur is None:
                raise UsageError(f"{what} does not add to the previous layer's output")
            if id(other) not in chain.inputs:
                raise UsageError(f"{what}: its second operand is not the input of an earlier layer (only such "
                                 f"residual adds convert)")
            shape = flat_input(node, cur, what)
            if values[other].shape != shape:
                raise UsageError(f"{what} adds samples of shape {list(values[other].shape)} to {list(shape)}")
            chain.inputs[id(cur)] = len(chain.specs)
            new_layer(node, LayerSpec.add(shape, chain.inputs[id(other)]))
            continue
        src = tensor_args[0] if tensor_args else None
        if node.op == "call_function" and node.target in _ACT_FUNCS:
            set_activation(node, src, _ACT_FUNCS[node.target], what)
        elif node.op == "call_function" and node.target is torch.nn.functional.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if slope != 0.01:
                raise UsageError(f"{what} has negative_slope={slope}; only 0.01 converts")
            set_activation(node, src, "leaky_relu", what)
        elif node.op == "call_function" and node.target is torch.nn.functional.dropout:
            alias(node, src)
        elif node.op == "call_function" and node.target in (torch.nn.functional.adaptive_avg_pool1d,
                                                            torch.nn.functional.adaptive_avg_pool2d):
            shape = flat_input(node, src, what)
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if any(v != 1 for v in _ints(size, len(shape) - 1)):
                raise UsageError(f"{what} must pool to size 1 to convert")
            chain.inputs[id(src)] = len(chain.specs)
            new_layer(node, LayerSpec.gap(shape), torch_shape=(shape[0],) + (1,) * (len(shape) - 1))
        elif (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            _flatten(node, src, what, start, end)
        elif node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
            set_activation(node, src, _ACT_METHODS[node.target], what)
        else:
            raise UsageError(f"{what} in {type(module).__name__}.forward does not convert: from_torch converts "
                             f"{CONVERTS}")

    if not chain.specs:
        raise UsageError(f"{type(module).__name__} has no layer that converts")
    last = values[head]
    if last.producer != len(chain.specs) - 1 or len(chain.specs[-1].out_shape) != 1:
        raise UsageError(f"{type(module).__name__} must end with one value per class (a Linear layer, or pooling "
                         f"and flatten), it ends with samples of shape {list(last.shape)}")
    check_chain(chain.specs)
    layers = [Layer(s, w, b) if s.has_params else Layer(s) for s, (w, b) in zip(chain.specs, chain.tensors)]
    return Backbone.from_layers(layers, labels=labels)



# ---------------------------------------------------------------------- to torch
_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": lambda: nn.LeakyReLU(0.01), "tanh": nn.Tanh,
                "sigmoid": nn.Sigmoid, "identity": nn.Identity}


class LayerChain(nn.Module):
    """A chain of layers as edgetune runs it: ``layers[k]`` then ``acts[k]``; an add layer
    (``None`` in ``layers``) adds the input kept for its source. Takes samples shaped
    (N, C, L) / (N, C, H, W) (or flat rows) and standardises each channel first when the
    backbone carries an input normalisation."""

    def __init__(self, layers: list[nn.Module | None], acts: list[nn.Module], sources: dict[int, int],
                 input_shape: tuple[int, ...], input_mean: torch.Tensor | None = None,
                 input_std: torch.Tensor | None = None, specs: list[LayerSpec] | None = None):
        super().__init__()
        self.specs = list(specs or [])     # the edgetune layer descriptions (from_torch reads them back)
        self.layers = nn.ModuleList([m if m is not None else nn.Identity() for m in layers])
        self.acts = nn.ModuleList(acts)
        self.adds = dict(sources)          # layer index -> source layer index
        self.input_shape = tuple(input_shape)
        self.register_buffer("input_mean", input_mean)
        self.register_buffer("input_std", input_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape((x.shape[0],) + self.input_shape)
        view = (1, -1) + (1,) * (len(self.input_shape) - 1)
        if self.input_mean is not None:
            x = x - self.input_mean.reshape(view)
        if self.input_std is not None:
            x = x / self.input_std.reshape(view)
        wanted = set(self.adds.values())
        kept: dict[int, torch.Tensor] = {}
        for k, (layer, act) in enumerate(zip(self.layers, self.acts)):
            if k in wanted:
                kept[k] = x
            x = x + kept[self.adds[k]] if k in self.adds else layer(x)
            x = act(x)
        return x


def _module(spec: LayerSpec, w: np.ndarray | None, b: np.ndarray | None) -> nn.Module | None:
    rank = len(spec.in_shape) - 1
    if spec.kind == "dense":
        m = nn.Linear(spec.in_features, spec.out_channels, device="meta")
    elif spec.kind in ("conv1d", "conv2d"):
        cls = nn.Conv1d if rank == 1 else nn.Conv2d
        m = cls(spec.in_shape[0], spec.out_channels, spec.kernel, stride=spec.stride, padding=spec.padding,
                groups=spec.groups, device="meta")
    elif spec.kind.startswith(("maxpool", "avgpool")):
        cls = {"maxpool1d": nn.MaxPool1d, "maxpool2d": nn.MaxPool2d, "avgpool1d": nn.AvgPool1d,
               "avgpool2d": nn.AvgPool2d}[spec.kind]
        return cls(spec.kernel, spec.stride, spec.padding)
    elif spec.kind == "gap":
        pool = nn.AdaptiveAvgPool1d(1) if rank == 1 else nn.AdaptiveAvgPool2d(1)
        return nn.Sequential(pool, nn.Flatten())
    elif spec.kind == "flatten":
        return nn.Flatten()
    elif spec.kind == "add":
        return None
    else:  # pragma: no cover - every kind is listed above
        raise UsageError(f"layer kind {spec.kind} has no torch module")
    # Built on the meta device, then given the backbone's tensors: no random initialisation.
    m.weight = nn.Parameter(torch.from_numpy(np.array(w, copy=True)))
    m.bias = nn.Parameter(torch.from_numpy(np.array(b, copy=True)))
    return m


def to_module(backbone: Backbone, *, normalize: bool = True) -> LayerChain:
    layers = [_module(layer.spec, layer.weight, layer.bias) for layer in backbone.layers]
    acts = [_ACT_MODULES[layer.spec.activation]() for layer in backbone.layers]
    sources = {k: s.source for k, s in enumerate(backbone.specs) if s.kind == "add"}
    t = (lambda a: None if a is None or not normalize else torch.from_numpy(np.array(a, copy=True)))
    return LayerChain(layers, acts, sources, backbone.input_shape, t(backbone.input_mean), t(backbone.input_std),
                      specs=backbone.specs)


def from_chain(chain: LayerChain, *, labels: list[str] | None = None) -> Backbone:
    """The backbone a ``LayerChain`` (made by ``to_module``) computes: its layer descriptions,
    with the tensors of its modules, checked against them."""
    if len(chain.specs) != len(chain.layers):
        raise UsageError("this LayerChain carries no layer descriptions to read back")
    layers = []
    for k, (spec, m) in enumerate(zip(chain.specs, chain.layers)):
        if not spec.has_params:
            layers.append(Layer(spec))
            continue
        w, b = m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy()
        if w.shape != spec.weight_shape or b.shape != spec.bias_shape:
            raise UsageError(f"LayerChain layer {k}: weight {list(w.shape)} / bias {list(b.shape)} do not fit "
                             f"{spec.describe()}")
        layers.append(Layer(spec, np.array(w, copy=True), np.array(b, copy=True)))
    arr = (lambda t: None if t is None else np.array(t.detach().cpu().numpy(), copy=True))
    return Backbone.from_layers(layers, labels=labels, input_mean=arr(chain.input_mean),
                                input_std=arr(chain.input_std))
