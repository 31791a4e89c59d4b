"""One engine for the methods that live beside the backbone's layers (ft-*, lora-*).

A method is described by a ``LayerPlan`` per layer: does the weight train, does the bias
train, is there a LoRA adapter beside it. Forward keeps only what backward needs, and
backward stops at the first layer with anything trainable: ``lora-last`` and ``ft-last``
never propagate a gradient into the hidden layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..nn.layers import LayerSpec, apply_layer, lora_specs
from ..nn.mlp import Backbone
from .base import CoreSpec, Method, MethodOptions, ParamStore, init_lora_a


@dataclass(frozen=True)
class LayerPlan:
    weight: bool = False
    bias: bool = False
    lora: bool = False

    @property
    def any(self) -> bool:
        return self.weight or self.bias or self.lora


class LayerwiseMethod(Method):
    """Subclasses implement ``plan``; everything else is shared."""

    mergeable = True

    @classmethod
    def plan(cls, n_layers: int) -> list[LayerPlan]:
        raise NotImplementedError

    @classmethod
    def layer_plans(cls, specs: list[LayerSpec], rank: int = 1) -> list[LayerPlan]:
        """``plan`` spread over the layers with weights (layers without any get nothing; a LoRA
        adapter only where one fits, see ``lora_specs``)."""
        weighted = [k for k, s in enumerate(specs) if s.has_params]
        plans = [LayerPlan()] * len(specs)
        for k, p in zip(weighted, cls.plan(len(weighted))):
            plans[k] = LayerPlan(p.weight, p.bias, p.lora and lora_specs(specs[k], rank) is not None)
        return plans

    @classmethod
    def count_trainable(cls, specs: list[LayerSpec], options: MethodOptions) -> int:
        plans = cls.layer_plans(specs, options.rank)
        total = 0
        for spec, p in zip(specs, plans):
            total += (int(np.prod(spec.weight_shape)) if p.weight else 0) + (spec.out_channels if p.bias else 0)
            if p.lora:
                total += sum(int(np.prod(s.weight_shape)) for s in lora_specs(spec, options.rank))
        if options.train_last_bias and not plans[-1].bias:
            total += specs[-1].out_features
        return total

    def __init__(self, backbone: Backbone, options: MethodOptions | None = None,
                 rng: np.random.Generator | None = None):
        if backbone.is_int8:
            raise UsageError(f"{self.name} trains or reads the float weights of an int8 backbone, which it does not "
                             f"have; on int8 use skip-lora, skip2-lora or sparse (or fine-tune the float model)")
        super().__init__(backbone, options, rng)
        bb = self.backbone
        n = bb.n_layers
        r = self.options.rank
        self.plans = self.layer_plans(bb.specs, r)
        self.scale = self.options.scale
        self.check_rank(sorted({w for k, p in enumerate(self.plans) if p.lora
                                for w in (bb.specs[k].in_shape[0], bb.specs[k].out_channels)}))
        self.lora = {k: lora_specs(bb.specs[k], r) for k, p in enumerate(self.plans) if p.lora}
        # A trainable last-layer bias for methods that keep the backbone frozen is stored
        # as a delta (initially zero): the backbone itself is never modified.
        self.bias_delta = self.options.train_last_bias and not self.plans[-1].bias
        tensors: dict[str, np.ndarray] = {}
        for k, p in enumerate(self.plans):
            dense = bb.specs[k].kind == "dense"
            if p.weight:  # dense: trained as W^T, (in, out): the forward's fast layout (Backbone.transposed_weights)
                tensors[f"layers.{k}.weight_t" if dense else f"layers.{k}.weight"] = \
                    bb.layers[k].weight.T if dense else bb.layers[k].weight
            if p.bias:
                tensors[f"layers.{k}.bias"] = bb.layers[k].bias
            if p.lora:
                a, b = self.lora[k]
                fan_in = int(np.prod(a.weight_shape[1:]))
                tensors[f"layers.{k}.lora_A"] = init_lora_a(self.rng, r, fan_in, bb.dtype).reshape(a.weight_shape)
                tensors[f"layers.{k}.lora_B"] = np.zeros(b.weight_shape, bb.dtype)
        if self.bias_delta:
            tensors["head.bias_delta"] = np.zeros(bb.sizes[-1], bb.dtype)
        self.params = ParamStore(tensors, bb.dtype)
        # Trained backbone tensors become views into the flat parameter buffer (dense weights as
        # the (out, in) transpose of the stored (in, out) block).
        for k, p in enumerate(self.plans):
            if p.weight:
                bb.layers[k].weight = self.params[f"layers.{k}.weight_t"].T if bb.specs[k].kind == "dense" \
                    else self.params[f"layers.{k}.weight"]
            if p.bias:
                bb.layers[k].bias = self.params[f"layers.{k}.bias"]
        trainable = [k for k, p in enumerate(self.plans) if p.any]
        self.first = min(trainable) if trainable else n - 1
        self._sources = bb.sources
        self._hs: list[np.ndarray | None] = [None] * n
        self._us: list[np.ndarray | None] = [None] * n
        self._wt: list[np.ndarray | None] | None = None

    def begin_fit(self, x: np.ndarray) -> None:
        # Frozen weights do not change during a fit: their forward uses contiguous copies.
        self._wt = self.backbone.transposed_weights([k for k, p in enumerate(self.plans) if not p.weight])

    @property
    def transposed_bytes(self) -> int:
        return sum(w.nbytes for w in self._wt or () if w is not None)

    def _run(self, h: np.ndarray, keep: bool) -> np.ndarray:
        bb, plans, s, wt = self.backbone, self.plans, self.scale, self._wt
        kept: dict[int, np.ndarray] = {}
        for k, layer in enumerate(bb.layers):
            if keep and k >= self.first:
                self._hs[k] = h
            if k in self._sources:
                kept[k] = h
            spec = layer.spec
            residual = kept[spec.source] if spec.kind == "add" else None
            z = apply_layer(layer, h, None if wt is None else wt[k], activate=False, residual=residual)
            if plans[k].lora:
                a, b = self.lora[k]
                u = a.ops.forward(a, h, self.params[f"layers.{k}.lora_A"])
                if keep:
                    self._us[k] = u
                d = b.ops.forward(b, u, self.params[f"layers.{k}.lora_B"])
                if s != 1.0:
                    d *= s
                z += d
            h = spec.act.forward(z)
        if self.bias_delta:
            h += self.params["head.bias_delta"]
        return h

    def forward(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self._run(x[ids], keep=True)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        blocks = list(self.backbone._blocks(x.shape[0]))
        if len(blocks) == 1:
            return self._run(x, keep=False)
        return np.concatenate([self._run(x[b], keep=False) for b in blocks])

    def backward(self, g: np.ndarray) -> None:
        bb, s, grads = self.backbone, self.scale, self.params.grads
        last = bb.n_layers - 1
        if self.bias_delta:
            np.sum(g, axis=0, out=grads["head.bias_delta"])
        pending: dict[int, np.ndarray] = {}  # gradients that reach a layer's input through a residual
        for k in range(last, self.first - 1, -1):
            h, p, layer = self._hs[k], self.plans[k], bb.layers[k]
            spec = layer.spec
            if p.weight:
                if spec.kind == "dense":
                    spec.ops.weight_grad(spec, h, g, out=grads[f"layers.{k}.weight_t"], transposed=True)
                else:
                    spec.ops.weight_grad(spec, h, g, out=grads[f"layers.{k}.weight"])
            if p.bias:
                spec.ops.bias_grad(spec, g, out=grads[f"layers.{k}.bias"])
            gu = None
            if p.lora:
                sa, sb = self.lora[k]
                a, b = self.params[f"layers.{k}.lora_A"], self.params[f"layers.{k}.lora_B"]
                gb = grads[f"layers.{k}.lora_B"]
                sb.ops.weight_grad(sb, self._us[k], g, out=gb)
                gu = sb.ops.input_grad(sb, g, b)
                if s != 1.0:
                    gb *= s
                    gu *= s
                sa.ops.weight_grad(sa, h, gu, out=grads[f"layers.{k}.lora_A"])
            if spec.kind == "add" and spec.source >= self.first:
                pending[spec.source] = pending[spec.source] + g if spec.source in pending else g
            if k > self.first:
                dh = spec.ops.input_grad(spec, g, layer.weight, h)
                if dh is g:  # a shape-only layer or an add: g may also be waiting in `pending`
                    dh = g.copy()
                if gu is not None:
                    dh += sa.ops.input_grad(sa, gu, a)
                if k in pending:
                    dh = dh + pending.pop(k)
                bb.layers[k - 1].spec.act.grad_mul(dh, h)
                g = dh

    def core_spec(self) -> CoreSpec:
        """This method as the compiled engine sees it (see edgetune/core/engine.py)."""
        n, off = self.backbone.n_layers, self.params.offset
        wt = self._wt if self._wt is not None else self.backbone.transposed_weights(
            [k for k, p in enumerate(self.plans) if not p.weight])
        return CoreSpec("layerwise", rank=self.options.rank, scale=self.scale, first=self.first,
                        weight=[max(off(f"layers.{k}.weight_t"), off(f"layers.{k}.weight")) for k in range(n)],
                        bias=[off(f"layers.{k}.bias") for k in range(n)],
                        lora_a=[off(f"layers.{k}.lora_A") for k in range(n)],
                        lora_b=[off(f"layers.{k}.lora_B") for k in range(n)],
                        bias_delta=off("head.bias_delta"), wt=wt)

    def end_fit(self) -> None:
        self._hs = [None] * self.backbone.n_layers
        self._us = [None] * self.backbone.n_layers
        self._wt = None

    # -- files: trained weights are saved (out, in), as in model files and PyTorch -----------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return {(k[:-2] if k.endswith(".weight_t") else k): np.ascontiguousarray(v.T if k.endswith(".weight_t") else v)
                for k, v in self.params.values.items()}

    def load_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        self.check_adapter_tensors(tensors)
        for k in self.params:
            if k.endswith(".weight_t"):
                self.params[k][...] = tensors[k[:-2]].T
            else:
                self.params[k][...] = tensors[k]

    def merged_backbone(self) -> Backbone:
        out = self.backbone.copy()
        for k, p in enumerate(self.plans):
            if p.lora:
                a, b = self.params[f"layers.{k}.lora_A"], self.params[f"layers.{k}.lora_B"]
                w = out.layers[k].weight
                w += (self.scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).reshape(w.shape) \
                    .astype(out.dtype)
        if self.bias_delta:
            if out.layers[-1].bias is None:
                raise UsageError(f"{self.name} trained a bias on the logits, but the last layer "
                                 f"({out.specs[-1].kind}) has no bias to fold it into: deploy the adapter beside "
                                 f"the backbone, or end the backbone with a dense layer")
            out.layers[-1].bias += self.params["head.bias_delta"]
        return out
