"""Backbone <-> torch.nn conversion. Imports torch: reach it through ``edgetune.torch``.

Parameters convert bit-exactly (the same float32 or float64 values, both ways). Outputs
agree to float rounding, not bit for bit: NumPy's and PyTorch's matrix products (and
their tanh/sigmoid) may sum or round in a different order.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..nn.layers import Layer
from ..nn.mlp import Backbone

ACTIVATION_MODULES = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "identity": nn.Identity,
}
SUPPORTED = "nn.Linear with ReLU, LeakyReLU(0.01), Tanh, Sigmoid or Identity between layers"


class NormalizedSequential(nn.Sequential):
    """``nn.Sequential`` that standardises its input first: ``(x - input_mean) / input_std``.

    The statistics are buffers (saved in ``state_dict``), not modules, so the layers keep
    the names "0", "1", ... that PEFT's ``target_modules`` refer to.
    """

    def __init__(self, *modules: nn.Module, input_mean: torch.Tensor | None = None,
                 input_std: torch.Tensor | None = None):
        super().__init__(*modules)
        self.register_buffer("input_mean", input_mean)
        self.register_buffer("input_std", input_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mean is not None:
            x = x - self.input_mean
        if self.input_std is not None:
            x = x / self.input_std
        return super().forward(x)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))


def _dense_to_torch(layer: Layer) -> nn.Module:
    # Built on the meta device, then given the backbone's tensors: no random
    # initialisation, so the global torch RNG is left untouched.
    spec = layer.spec
    lin = nn.Linear(spec.in_features, spec.out_channels, device="meta")
    lin.weight = nn.Parameter(_tensor(layer.weight))
    lin.bias = nn.Parameter(_tensor(layer.bias))
    return lin


#: One converter per layer kind (edgetune.nn.layers.LAYER_KINDS).
_TO_TORCH = {"dense": _dense_to_torch}


def to_torch(backbone: Backbone, *, normalize: bool = True) -> nn.Sequential:
    """An ``nn.Sequential`` computing what ``backbone`` computes (layer k at index 2k, its
    activation at 2k+1, as ``nn.Sequential(Linear, ReLU, ..., Linear)`` numbers them)."""
    if not isinstance(backbone, Backbone):
        raise UsageError(f"to_torch needs an edgetune Backbone, got {type(backbone).__name__}")
    if backbone.is_int8:
        raise UsageError("to_torch converts float backbones; for an int8 one use "
                         "edgetune.quant.dequantize(backbone) first")
    if not all(s.kind == "dense" for s in backbone.specs):
        from .graph import to_module
        return to_module(backbone, normalize=normalize)
    layers: list[nn.Module] = []
    last = backbone.n_layers - 1
    for k, layer in enumerate(backbone.layers):
        layers.append(_TO_TORCH[layer.spec.kind](layer))
        if k != last or layer.spec.activation != "identity":
            layers.append(ACTIVATION_MODULES[layer.spec.activation]())
    has_norm = backbone.input_mean is not None or backbone.input_std is not None
    if normalize and has_norm:
        return NormalizedSequential(
            *layers,
            input_mean=None if backbone.input_mean is None else _tensor(backbone.input_mean),
            input_std=None if backbone.input_std is None else _tensor(backbone.input_std))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- from torch
_ACT_TYPES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_ACT_FUNCTIONS = {
    torch.relu: "relu", torch.nn.functional.relu: "relu", torch.tanh: "tanh",
    torch.sigmoid: "sigmoid", torch.nn.functional.tanh: "tanh", torch.nn.functional.sigmoid: "sigmoid",
}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def _module_op(name: str, m: nn.Module) -> tuple[str, str, object]:
    """('linear', name, module) | ('act', name, activation) | ('skip', name, None)."""
    if type(m) is nn.Linear:
        return ("linear", name, m)
    if isinstance(m, nn.Identity):
        return ("skip", name, None)
    if type(m) is nn.LeakyReLU:
        if m.negative_slope != 0.01:
            raise UsageError(f"layer '{name}' is LeakyReLU(negative_slope={m.negative_slope}); "
                             f"only LeakyReLU(0.01) is supported (edgetune's leaky_relu)")
        return ("act", name, "leaky_relu")
    act = _ACT_TYPES.get(type(m))
    if act is None:
        raise UsageError(f"layer '{name}' ({type(m).__name__}) is not supported: from_torch converts "
                         f"chains of {SUPPORTED}")
    return ("act", name, act)


def _sequential_ops(seq: nn.Sequential, prefix: str = "") -> list[tuple[str, str, object]]:
    ops = []
    for name, child in seq.named_children():
        path = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            ops += _sequential_ops(child, path + ".")
        else:
            ops.append(_module_op(path, child))
    return ops


def _traced_ops(module: nn.Module) -> list[tuple[str, str, object]]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as e:  # fx raises many kinds of errors on dynamic code
        raise UsageError(f"cannot read {type(module).__name__}.forward as a chain of layers "
                         f"(torch.fx could not trace it: {e}); pass an nn.Sequential") from None
    ops = []
    prev = None
    modules = dict(module.named_modules())
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise UsageError(f"{type(module).__name__}.forward takes more than one input")
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise UsageError(f"{type(module).__name__}.forward does not return its last layer's output")
            break
        what = f"'{node.target}'" if node.op == "call_module" else f"{node.op} {getattr(node.target, '__name__', node.target)}"
        if not node.args or node.args[0] is not prev or any(
                isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            raise UsageError(f"{type(module).__name__}.forward is not a chain of layers: {what} "
                             f"does not simply transform the previous layer's output")
        if node.op == "call_module":
            ops.append(_module_op(str(node.target), modules[node.target]))
        elif node.op == "call_function" and node.target in _ACT_FUNCTIONS:
            ops.append(("act", what, _ACT_FUNCTIONS[node.target]))
        elif node.op == "call_function" and node.target is torch.nn.functional.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if slope != 0.01:
                raise UsageError(f"{what} has negative_slope={slope}; only 0.01 is supported")
            ops.append(("act", what, "leaky_relu"))
        elif node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
            ops.append(("act", what, _ACT_METHODS[node.target]))
        else:
            raise UsageError(f"{what} in {type(module).__name__}.forward is not supported: "
                             f"from_torch converts chains of {SUPPORTED}")
        prev = node
    return ops


def from_torch(module: nn.Module, *, labels: list[str] | None = None,
               input_shape: tuple[int, ...] | None = None) -> Backbone:
    if not isinstance(module, nn.Module):
        raise UsageError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    from .graph import LayerChain, from_chain
    if isinstance(module, LayerChain):
        return from_chain(module, labels=labels)
    if input_shape is not None and len(tuple(input_shape)) > 1:
        from .graph import from_graph
        return from_graph(module, tuple(input_shape), labels=labels)
    if any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in module.modules()):
        raise UsageError(f"{type(module).__name__} has convolutions: give the shape of one sample, "
                         f"from_torch(module, input_shape=(C, L)) or (C, H, W)")
    mean = std = None
    if type(module) in (nn.Sequential, NormalizedSequential):
        ops = _sequential_ops(module)
        if isinstance(module, NormalizedSequential):
            mean, std = module.input_mean, module.input_std
    else:
        ops = _traced_ops(module)
    ops = [op for op in ops if op[0] != "skip"]
    if not ops or ops[0][0] != "linear":
        first = f"'{ops[0][1]}' ({ops[0][2]})" if ops else "nothing"
        raise UsageError(f"the model must start with nn.Linear, it starts with {first}")
    if ops[-1][0] != "linear":
        raise UsageError(f"'{ops[-1][1]}' ({ops[-1][2]}) follows the last Linear layer: edgetune backbones "
                         f"output logits, so drop the final activation (it does not change argmax for "
                         f"softmax classifiers)")
    linears: list[tuple[str, nn.Linear]] = []
    gaps: list[tuple[str, str]] = []  # (activation, where) between consecutive Linear layers
    pending: list[tuple[str, str]] = []
    for kind, name, obj in ops:
        if kind == "linear":
            if linears:
                if len(pending) > 1:
                    raise UsageError(f"two activations in a row ({pending[0][1]}, {pending[1][1]}) "
                                     f"are not supported")
                gaps.append((pending[0][0], pending[0][1]) if pending else ("identity", f"before '{name}'"))
            linears.append((name, obj))
            pending = []
        else:
            pending.append((obj, name))
    acts = {a for a, _ in gaps}
    if len(acts) > 1:
        where = ", ".join(f"{a} at {w}" for a, w in gaps)
        raise UsageError(f"edgetune backbones use one activation between every pair of layers; this model "
                         f"mixes them ({where})")
    activation = acts.pop() if acts else "relu"
    weights, biases = [], []
    for name, lin in linears:
        w = lin.weight.detach().cpu().numpy()
        if w.dtype not in (np.float32, np.float64):
            raise UsageError(f"layer '{name}' has dtype {lin.weight.dtype}; convert the model to float32 "
                             f"or float64 first")
        weights.append(np.array(w, copy=True))
        biases.append(np.zeros(w.shape[0], w.dtype) if lin.bias is None
                      else np.array(lin.bias.detach().cpu().numpy(), dtype=w.dtype, copy=True))
    for k in range(1, len(weights)):
        if weights[k].shape[1] != weights[k - 1].shape[0]:
            raise UsageError(f"layer '{linears[k][0]}' takes {weights[k].shape[1]} inputs but "
                             f"'{linears[k - 1][0]}' gives {weights[k - 1].shape[0]}")
    if len({w.dtype for w in weights}) > 1:
        raise UsageError("all Linear layers must share one dtype")
    conv = (lambda t: None if t is None else np.array(t.detach().cpu().numpy(), dtype=weights[0].dtype, copy=True))
    return Backbone(weights, biases, activation=activation, labels=labels,
                    input_mean=conv(mean), input_std=conv(std))
