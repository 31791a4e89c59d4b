"""edgetune model -> ONNX graph.

Float backbone: input -> Sub(mean) -> Div(std) -> one node per layer and its activation ->
logits, the graph ``from_onnx`` reads back into the same backbone. Each layer kind is one
entry of ``_LAYER_NODES``: dense a Gemm, conv1d/conv2d a Conv, pooling a MaxPool or
AveragePool, gap a GlobalAveragePool and a Flatten, flatten a Flatten, add an Add of the
input kept for its source layer. A spatial backbone takes its input as PyTorch does,
(batch, C, L) or (batch, C, H, W), normalised per channel.

Skip methods (skip-lora, skip2-lora): the adapters that fold (the last dense layer's, the
bias delta) are folded; each other adapter k adds ``t_k @ A_k^T @ (s B_k)^T`` to the
logits, a branch from the input of layer k (``merge_parts``), pooled to one value per
channel (GlobalAveragePool) where that input is spatial, as edgetune's skip taps are.

int8 backbone: a QDQ graph. Every layer input is QuantizeLinear/DequantizeLinear at the
backbone's activation scale (int8, zero point 0), every weight an int8 initializer with its
per-output-channel scale, every bias an int32 initializer at scale s_in * s_w: the same
integers edgetune's int8 kernel multiplies. ONNX Runtime may run it as integer kernels
whose rounding of the requantisation differs in the last step (round half to even against
edgetune's half up), so an element may differ by one quantisation step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..nn.layers import Layer
from ..nn.mlp import Backbone

_ACT_OPS = {"relu": ("Relu", {}), "relu6": ("Clip", {}), "leaky_relu": ("LeakyRelu", {"alpha": 0.01}),
            "tanh": ("Tanh", {}), "sigmoid": ("Sigmoid", {}), "identity": None}
PRODUCER = "edgetune"


class _Graph:
    def __init__(self, dtype: np.dtype):
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: set[str] = set()
        self.dtype = np.dtype(dtype)
        self.elem = 1 if self.dtype == np.float32 else 11

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.names.add(name)
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _normalise(g: _Graph, b: Backbone, x: str) -> str:
    """Sub mean, Div std: per feature, or per channel (shaped (C, 1[, 1]) to broadcast) of a
    spatial input."""
    shape = b.norm_shape + (1,) * (len(b.input_shape) - 1)
    if b.input_mean is not None:
        x = g.node("Sub", [x, g.const("input.mean", b.input_mean.astype(g.dtype).reshape(shape))], "input_centred",
                   "normalize_sub")
    if b.input_std is not None:
        x = g.node("Div", [x, g.const("input.std", b.input_std.astype(g.dtype).reshape(shape))], "input_scaled",
                   "normalize_div")
    return x


def _check_int8(b: Backbone) -> None:
    for k, layer in enumerate(b.layers):
        if layer.spec.kind != "dense":
            raise UsageError(f"to_onnx writes int8 backbones of dense layers; layer {k} is {layer.spec.describe()}")


def _activation(g: _Graph, x: str, k: int, name: str) -> str:
    if name not in _ACT_OPS:
        raise UsageError(f"to_onnx has no ONNX operator for activation '{name}' (layer {k})")
    act = _ACT_OPS[name]
    if act is None:
        return x
    inputs = [x]
    if name == "relu6":  # Clip's bounds are inputs from opset 11 on
        if "relu6.min" not in g.names:
            g.const("relu6.min", np.asarray(0, g.dtype))
            g.const("relu6.max", np.asarray(6, g.dtype))
        inputs += ["relu6.min", "relu6.max"]
    return g.node(act[0], inputs, f"layers.{k}.act", f"layers.{k}.{name}", **act[1])


def _dense_nodes(g: _Graph, k: int, layer: Layer, x: str, out: str, taps: list[str]) -> str:
    return g.node("Gemm", [x, g.const(f"layers.{k}.weight", layer.weight), g.const(f"layers.{k}.bias", layer.bias)],
                  out, f"layers.{k}", transB=1)


def _conv_nodes(g: _Graph, k: int, layer: Layer, x: str, out: str, taps: list[str]) -> str:
    s = layer.spec
    return g.node("Conv", [x, g.const(f"layers.{k}.weight", layer.weight), g.const(f"layers.{k}.bias", layer.bias)],
                  out, f"layers.{k}", kernel_shape=list(s.kernel), strides=list(s.stride),
                  pads=list(s.padding) * 2, group=s.groups, dilations=[1] * len(s.kernel))


def _pool_nodes(g: _Graph, k: int, layer: Layer, x: str, out: str, taps: list[str]) -> str:
    s = layer.spec
    window = {"kernel_shape": list(s.kernel), "strides": list(s.stride), "pads": list(s.padding) * 2}
    if s.kind.startswith("max"):
        return g.node("MaxPool", [x], out, f"layers.{k}", **window)
    return g.node("AveragePool", [x], out, f"layers.{k}", count_include_pad=1, **window)


def _gap_nodes(g: _Graph, k: int, layer: Layer, x: str, out: str, taps: list[str]) -> str:
    pooled = g.node("GlobalAveragePool", [x], f"layers.{k}.pooled", f"layers.{k}")
    return g.node("Flatten", [pooled], out, f"layers.{k}.flatten", axis=1)


def _flatten_nodes(g: _Graph, k: int, layer: Layer, x: str, out: str, taps: list[str]) -> str:
    return g.node("Flatten", [x], out, f"layers.{k}", axis=1)


def _add_nodes(g: _Graph, k: int, layer: Layer, x: str, out: str, taps: list[str]) -> str:
    return g.node("Add", [x, taps[layer.spec.source]], out, f"layers.{k}")


#: The nodes of each layer kind (float): one entry per kind of edgetune.nn.layers.LAYER_KINDS.
_LAYER_NODES = {"dense": _dense_nodes, "conv1d": _conv_nodes, "conv2d": _conv_nodes, "maxpool1d": _pool_nodes,
                "maxpool2d": _pool_nodes, "avgpool1d": _pool_nodes, "avgpool2d": _pool_nodes, "gap": _gap_nodes,
                "flatten": _flatten_nodes, "add": _add_nodes}


def _float_layers(g: _Graph, b: Backbone, x: str) -> tuple[str, list[str]]:
    """The float backbone's nodes; returns (logits, the input tensor of every layer)."""
    taps: list[str] = []
    last = b.n_layers - 1
    for k, layer in enumerate(b.layers):
        if layer.spec.kind not in _LAYER_NODES:
            raise UsageError(f"to_onnx has no ONNX nodes for layer {k}, {layer.spec.describe()}")
        taps.append(x)
        x = _LAYER_NODES[layer.spec.kind](g, k, layer, x, "logits_backbone" if k == last else f"layers.{k}.out",
                                          taps)
        x = _activation(g, x, k, layer.spec.activation)
    return x, taps


def _int8_layers(g: _Graph, b: Backbone, x: str) -> tuple[str, list[str]]:
    """The int8 backbone as QDQ nodes; returns (logits, the dequantised input of every layer)."""
    taps = []
    last = b.n_layers - 1
    zero8 = g.const("zero_int8", np.zeros((), np.int8))
    for k, layer in enumerate(b.layers):
        qp = layer.quant
        s_in = np.float32(qp.input_scale)
        scale = g.const(f"layers.{k}.input_scale", np.asarray(s_in, np.float32))
        q = g.node("QuantizeLinear", [x, scale, zero8], f"layers.{k}.input_q", f"layers.{k}.quantize")
        x = g.node("DequantizeLinear", [q, scale, zero8], f"layers.{k}.input", f"layers.{k}.dequantize")
        taps.append(x)
        ws = np.asarray(qp.wscale, np.float32)
        w = g.node("DequantizeLinear", [g.const(f"layers.{k}.weight_q", np.ascontiguousarray(qp.qweight.T)),
                                        g.const(f"layers.{k}.weight_scale", ws),
                                        g.const(f"layers.{k}.weight_zero", np.zeros(ws.shape, np.int8))],
                   f"layers.{k}.weight", f"layers.{k}.weight_dequantize", axis=1)
        bs = (ws * s_in).astype(np.float32)
        bias = g.node("DequantizeLinear", [g.const(f"layers.{k}.bias_q", np.asarray(qp.qbias, np.int32)),
                                           g.const(f"layers.{k}.bias_scale", bs),
                                           g.const(f"layers.{k}.bias_zero", np.zeros(bs.shape, np.int32))],
                      f"layers.{k}.bias", f"layers.{k}.bias_dequantize", axis=0)
        z = g.node("MatMul", [x, w], f"layers.{k}.matmul", f"layers.{k}.matmul")
        x = g.node("Add", [z, bias], "logits_backbone" if k == last else f"layers.{k}.out", f"layers.{k}.add")
        x = _activation(g, x, k, layer.spec.activation)  # relu: the int8 kernel's clip at 0
    return x, taps


def _skip_branch(g: _Graph, b: Backbone, logits: str, taps: list[str],
                 branches: dict[int, tuple[np.ndarray, np.ndarray]], bias_delta: np.ndarray | None) -> str:
    """logits + sum_k (t_k @ A_k^T) @ (s B_k)^T (+ the bias delta), t_k the input of layer k,
    pooled to one value per channel where it is spatial."""
    for k in sorted(branches):
        a, sb = branches[k]
        t = taps[k]
        if b.layers[k].spec.spatial:
            t = g.node("GlobalAveragePool", [t], f"skip.{k}.pooled", f"skip.{k}.pool")
            t = g.node("Flatten", [t], f"skip.{k}.tap", f"skip.{k}.flatten", axis=1)
        u = g.node("MatMul", [t, g.const(f"skip.{k}.lora_A_t", np.ascontiguousarray(a.T.astype(g.dtype)))],
                   f"skip.{k}.down", f"skip.{k}.down")
        v = g.node("MatMul", [u, g.const(f"skip.{k}.lora_B_scaled_t", np.ascontiguousarray(sb.T.astype(g.dtype)))],
                   f"skip.{k}.up", f"skip.{k}.up")
        logits = g.node("Add", [logits, v], f"logits_skip{k}", f"skip.{k}.add")
    if bias_delta is not None:
        logits = g.node("Add", [logits, g.const("head.bias_delta", bias_delta.astype(g.dtype))], "logits_bias",
                        "head.bias_delta")
    return logits


def _parts(model: Any) -> tuple[Backbone, dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray | None, str]:
    """(backbone, skip branches, bias delta, what) for a Backbone or a FineTuner."""
    from ..api import FineTuner
    from ..methods.skip_lora import SkipLoRA

    if isinstance(model, Backbone):
        return model, {}, None, "int8 backbone" if model.is_int8 else "backbone"
    if not isinstance(model, FineTuner):
        raise UsageError(f"to_onnx needs an edgetune Backbone or FineTuner, got {type(model).__name__}")
    method = model.method
    if isinstance(method, SkipLoRA):
        bb = model.backbone
        if bb.is_int8 or bb.specs[-1].kind != "dense":
            # int8 weights take no fold, nor does a last layer without weights: every adapter is a branch
            t = method.adapter_tensors()
            s = np.float32(method.scale)
            branches = {k: (t[f"skip.{k}.lora_A"], s * t[f"skip.{k}.lora_B"]) for k in bb.tap_layers}
            what = "on an int8 backbone" if bb.is_int8 else f"({len(branches)} skip branches)"
            return bb, branches, t.get("head.bias_delta"), f"{model.method_name} {what}"
        folded, rest = method.merge_parts()
        return folded, rest, None, f"{model.method_name} (folded backbone + {len(rest)} skip branches)"
    try:
        merged = model.merged()
    except NotImplementedError as e:
        raise UsageError(f"{model.method_name} cannot be written as one ONNX graph: {e}") from None
    return merged, {}, None, f"{model.method_name}, merged"


def build_model(model: Any, *, opset: int = 17) -> Any:
    """The ONNX ModelProto of ``model`` (see ``to_onnx``)."""
    from onnx import checker, helper

    if not 13 <= int(opset) <= 21:
        raise UsageError(f"opset must be between 13 and 21, got {opset}")
    backbone, branches, bias_delta, what = _parts(model)
    int8 = backbone.is_int8
    if int8:
        _check_int8(backbone)
    g = _Graph(np.float32 if int8 else backbone.dtype)
    x = _normalise(g, backbone, "input")
    logits, taps = (_int8_layers if int8 else _float_layers)(g, backbone, x)
    logits = _skip_branch(g, backbone, logits, taps, branches, bias_delta)
    # The graph's output is named "logits" whatever produced it last.
    g.nodes[-1].output[0] = "logits"
    inp = helper.make_tensor_value_info("input", g.elem, ["batch", *backbone.input_shape])
    out = helper.make_tensor_value_info("logits", g.elem, ["batch", backbone.sizes[-1]])
    graph = helper.make_graph(g.nodes, "edgetune", [inp], [out], g.inits)
    onnx_model = helper.make_model(graph, producer_name=PRODUCER, opset_imports=[helper.make_opsetid("", int(opset))],
                                   doc_string=f"edgetune {what}; sizes {backbone.sizes}, activation "
                                              f"{backbone.activation.name}; labels {backbone.labels}")
    onnx_model.ir_version = min(onnx_model.ir_version, 9)  # readable by ONNX Runtime releases of 2023 on
    helper.set_model_props(onnx_model, {"labels": ",".join(backbone.labels)})
    checker.check_model(onnx_model)
    return onnx_model


def to_onnx(model: Any, path: str | os.PathLike, *, opset: int = 17) -> Path:
    from ..io_atomic import write_bytes_atomic

    proto = build_model(model, opset=opset)
    return write_bytes_atomic(Path(os.fspath(path)), proto.SerializeToString())
