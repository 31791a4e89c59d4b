"""edgetune model -> ONNX graph.

Float backbone: input -> Sub(mean) -> Div(std) -> Gemm -> activation -> ... -> Gemm -> logits,
the graph ``from_onnx`` reads back into the same backbone.

Skip methods (skip-lora, skip2-lora): the adapters that fold (the last layer's, the bias
delta) are folded; each other adapter k adds ``h_k @ A_k^T @ (s B_k)^T`` to the logits, a
branch from the input of layer k (``merge_parts``).

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
from ..nn.mlp import Backbone

_ACT_OPS = {"relu": ("Relu", {}), "leaky_relu": ("LeakyRelu", {"alpha": 0.01}), "tanh": ("Tanh", {}),
            "sigmoid": ("Sigmoid", {}), "identity": None}
PRODUCER = "edgetune"


class _Graph:
    def __init__(self, dtype: np.dtype):
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.dtype = np.dtype(dtype)
        self.elem = 1 if self.dtype == np.float32 else 11

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _normalise(g: _Graph, b: Backbone, x: str) -> str:
    if b.input_mean is not None:
        x = g.node("Sub", [x, g.const("input.mean", b.input_mean.astype(g.dtype))], "input_centred", "normalize_sub")
    if b.input_std is not None:
        x = g.node("Div", [x, g.const("input.std", b.input_std.astype(g.dtype))], "input_scaled", "normalize_div")
    return x


def _check_dense(b: Backbone) -> None:
    for k, layer in enumerate(b.layers):
        if layer.spec.kind != "dense":
            raise UsageError(f"to_onnx writes dense layers; layer {k} is {layer.spec.describe()}")


def _activation(g: _Graph, x: str, k: int, name: str) -> str:
    if name not in _ACT_OPS:
        raise UsageError(f"to_onnx has no ONNX operator for activation '{name}' (layer {k})")
    act = _ACT_OPS[name]
    if act is None:
        return x
    return g.node(act[0], [x], f"layers.{k}.act", f"layers.{k}.{name}", **act[1])


def _float_layers(g: _Graph, b: Backbone, x: str) -> tuple[str, list[str]]:
    """The float backbone's nodes; returns (logits, the input tensor of every layer)."""
    taps = []
    last = b.n_layers - 1
    for k, layer in enumerate(b.layers):
        taps.append(x)
        x = g.node("Gemm", [x, g.const(f"layers.{k}.weight", layer.weight), g.const(f"layers.{k}.bias", layer.bias)],
                   "logits_backbone" if k == last else f"layers.{k}.out", f"layers.{k}", transB=1)
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


def _skip_branch(g: _Graph, logits: str, taps: list[str], branches: dict[int, tuple[np.ndarray, np.ndarray]],
                 bias_delta: np.ndarray | None) -> str:
    """logits + sum_k (h_k @ A_k^T) @ (s B_k)^T (+ the bias delta)."""
    for k in sorted(branches):
        a, sb = branches[k]
        u = g.node("MatMul", [taps[k], g.const(f"skip.{k}.lora_A_t", np.ascontiguousarray(a.T.astype(g.dtype)))],
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
        if model.backbone.is_int8:  # int8 weights do not take a fold: every adapter is a branch
            t = method.adapter_tensors()
            s = np.float32(method.scale)
            branches = {k: (t[f"skip.{k}.lora_A"], s * t[f"skip.{k}.lora_B"]) for k in range(model.backbone.n_layers)}
            return model.backbone, branches, t.get("head.bias_delta"), f"{model.method_name} on an int8 backbone"
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
    _check_dense(backbone)
    int8 = backbone.is_int8
    g = _Graph(np.float32 if int8 else backbone.dtype)
    x = _normalise(g, backbone, "input")
    logits, taps = (_int8_layers if int8 else _float_layers)(g, backbone, x)
    logits = _skip_branch(g, logits, taps, branches, bias_delta)
    # The graph's output is named "logits" whatever produced it last.
    g.nodes[-1].output[0] = "logits"
    inp = helper.make_tensor_value_info("input", g.elem, ["batch", backbone.sizes[0]])
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
