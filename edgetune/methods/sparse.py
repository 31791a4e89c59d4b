"""`sparse`: sparse update (Lin et al., NeurIPS 2022) on a float or an int8 backbone.

A scheme names what trains: the biases of the last ``k`` layers and the weights of chosen
layers, each at a channel ratio ``r`` (the first ``ceil(r * out)`` output channels train).
Scheme strings: ``"b2,w2:1/4,w1:1/8"`` = biases of the last 2 layers, a quarter of layer
2's weight rows, an eighth of layer 1's (layers count from 0; ``w-1`` is the last layer).

The backward pass is pruned to the scheme: it stops at the first layer with anything
trainable, computes a weight gradient only for the trained rows, and keeps a layer's input
only where that layer's weight trains; where the gradient merely passes through a ReLU it
keeps a boolean mask instead of the activation.

On an int8 backbone (``backbone.is_int8``, an MLP or a CNN) the layers before the first trained
one run the real int8 kernel (a CNN's residual sources below it are dequantised from their
int8 inputs); from there on the graph is fake-quantised (weights rounded to int8,
activations to their int8 scales, gradients straight through). Trained tensors live in
int8 units (weight ``Wq``, bias ``bq``, as float shadows so small steps accumulate), and
with Quantization-Aware Scaling (on by default for int8) their gradients are scaled as in
the paper's Eq. 4: ``G_Wq * s_W^-2`` and ``G_bq * (s_W s_x)^-2`` per output channel. That
restores the float graph's ratio of update to weight, so plain SGD works again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..errors import UsageError
from ..nn.layers import LayerSpec, apply_layer
from ..nn.mlp import Backbone
from .base import CoreSpec, Method, MethodOptions, ParamStore

RATIOS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
#: The scheme name that asks for a search under a memory budget (edgetune.scheme_search).
AUTO = "auto"
_TOKEN = re.compile(r"^(?:b(\d+)|w(-?\d+)(?::([0-9./]+))?)$")


@dataclass(frozen=True)
class SparseScheme:
    """What trains: biases of the last ``bias_layers`` layers; ``weights`` = ((layer, ratio), ...)."""
    bias_layers: int = 0
    weights: tuple[tuple[int, Fraction], ...] = ()

    @classmethod
    def parse(cls, text: "str | SparseScheme") -> "SparseScheme":
        if isinstance(text, SparseScheme):
            return text
        if not isinstance(text, str) or not text.strip():
            raise UsageError("a sparse scheme must be a non-empty string such as 'b2,w-1:1/2'")
        if text.strip().lower() == AUTO:
            raise UsageError("scheme 'auto' is chosen for a memory budget before training: "
                             "edgetune.scheme_search.auto_scheme (in Python), or --scheme auto with --budget "
                             "(edgetune finetune, edgetune plan); pass the scheme it chose here")
        bias, weights = 0, {}
        for tok in text.replace(" ", "").split(","):
            m = _TOKEN.match(tok)
            if not m:
                raise UsageError(f"bad sparse-scheme item {tok!r}: write bK (biases of the last K layers) "
                                 f"or wL[:R] (layer L's weight at channel ratio R in 1/8, 1/4, 1/2, 1)")
            if m.group(1) is not None:
                bias = max(bias, int(m.group(1)))
                continue
            layer = int(m.group(2))
            try:
                ratio = Fraction(m.group(3) or "1")
            except (ValueError, ZeroDivisionError):
                raise UsageError(f"bad channel ratio in {tok!r}") from None
            if ratio not in RATIOS:
                raise UsageError(f"channel ratio {ratio} in {tok!r}: use one of 1/8, 1/4, 1/2, 1")
            if layer in weights:
                raise UsageError(f"layer {layer} appears twice in the sparse scheme {text!r}")
            weights[layer] = ratio
        return cls(bias, tuple(sorted(weights.items())))

    def resolve(self, n_layers: int) -> "SparseScheme":
        """Layer numbers made non-negative and checked against a backbone of ``n_layers``."""
        if self.bias_layers > n_layers:
            raise UsageError(f"scheme trains the biases of the last {self.bias_layers} layers, "
                             f"but the backbone has {n_layers}")
        out = {}
        for layer, ratio in self.weights:
            k = layer + n_layers if layer < 0 else layer
            if not 0 <= k < n_layers:
                raise UsageError(f"scheme names layer {layer}, but the backbone has layers 0..{n_layers - 1}")
            if k in out:
                raise UsageError(f"layer {k} appears twice in the sparse scheme")
            out[k] = ratio
        return SparseScheme(self.bias_layers, tuple(sorted(out.items())))

    def __str__(self) -> str:
        items = [f"b{self.bias_layers}"] if self.bias_layers else []
        items += [f"w{k}" + ("" if r == 1 else f":{r}") for k, r in self.weights]
        return ",".join(items) or "(nothing)"

    def channels(self, out_widths: list[int]) -> dict[int, int]:
        """Trained rows per layer with a trained weight (layers must be resolved)."""
        return {k: max(1, math.ceil(r * out_widths[k])) for k, r in self.weights}

    def bias_set(self, n_layers: int) -> set[int]:
        return set(range(n_layers - self.bias_layers, n_layers))


DEFAULT_SCHEME = "b2,w-1"


@dataclass
class SparseOptions(MethodOptions):
    """``MethodOptions`` with the sparse default scheme filled in (``qas`` None: on for int8)."""
    scheme: str | None = DEFAULT_SCHEME

    def __post_init__(self) -> None:
        super().__post_init__()
        SparseScheme.parse(self.scheme or DEFAULT_SCHEME)


class SparseUpdate(Method):
    name = "sparse"
    description = "Sparse update: biases of the last k layers + chosen weight rows; int8 backbones with QAS."
    takes_scheme = True
    mergeable = True

    @staticmethod
    def resolve_scheme(text: str | None, n_layers: int, train_last_bias: bool = False) -> SparseScheme:
        """The scheme a sparse update runs on ``n_layers`` layers (the default adapts to a
        shallow backbone; ``train_last_bias`` adds the last layer's bias)."""
        text = text or DEFAULT_SCHEME
        scheme = SparseScheme.parse(text)
        if text == DEFAULT_SCHEME:
            scheme = SparseScheme(min(scheme.bias_layers, n_layers), scheme.weights)
        scheme = scheme.resolve(n_layers)
        if train_last_bias and scheme.bias_layers == 0:
            scheme = SparseScheme(1, scheme.weights)
        return scheme

    @classmethod
    def count_trainable(cls, specs: list[LayerSpec], options: MethodOptions) -> int:
        specs = [s for s in specs if s.has_params]
        scheme = cls.resolve_scheme(options.scheme, len(specs), options.train_last_bias)
        rows = scheme.channels([s.out_channels for s in specs])
        fan_in = [int(np.prod(s.weight_shape[1:])) for s in specs]
        return sum(c * fan_in[k] for k, c in rows.items()) + sum(specs[k].out_channels
                                                                for k in scheme.bias_set(len(specs)))

    def __init__(self, backbone: Backbone, options: MethodOptions | None = None,
                 rng: np.random.Generator | None = None):
        if options is not None and not isinstance(options, SparseOptions):
            options = SparseOptions(**{f: getattr(options, f) for f in MethodOptions.__dataclass_fields__})
        super().__init__(backbone, options or SparseOptions(), rng)
        bb = self.backbone
        n = bb.n_layers
        opts: SparseOptions = self.options  # type: ignore[assignment]
        # The scheme counts the layers with weights (for an MLP: every layer).
        weighted = bb.tap_layers
        self.scheme = self.resolve_scheme(opts.scheme, len(weighted), opts.train_last_bias)
        self.int8 = bb.is_int8
        if self.int8 and bb.layers[0].quant.asymmetric:
            raise UsageError("the sparse update (QAS) on an int8 model with asymmetric activations is not supported "
                             "yet: quantize with --activations symmetric (the skip methods run on both)")
        self.qas = self.int8 if opts.qas is None else bool(opts.qas)
        dt = bb.dtype
        self.rows = {weighted[i]: c for i, c in
                     self.scheme.channels([bb.specs[k].out_channels for k in weighted]).items()}
        self.train_bias = {weighted[i] for i in self.scheme.bias_set(len(weighted))}
        # An MLP runs the pruned, tiled path below (the compiled engine's twin); any other
        # chain of layers runs one generic loop.
        self.generic = not all(s.kind == "dense" for s in bb.specs)
        self._sources = bb.sources
        tensors: dict[str, np.ndarray] = {}
        for k in range(n):
            if k in self.rows:
                w = bb.layers[k].quant.qweight if self.int8 else bb.layers[k].weight
                tensors[f"layers.{k}.weight"] = np.asarray(w[:self.rows[k]], dt)
            if k in self.train_bias:
                b = bb.layers[k].quant.qbias if self.int8 else bb.layers[k].bias
                tensors[f"layers.{k}.bias"] = np.asarray(b, dt)
        self.params = ParamStore(tensors, dt)
        trainable = sorted(set(self.rows) | self.train_bias)
        self.first = trainable[0] if trainable else n
        # Per-layer float scales: the weight unit s_W (out,) and the bias unit s_x s_W (out,).
        if self.int8:
            q = [layer.quant for layer in bb.layers]
            self.w_unit = [p.wscale.astype(dt) for p in q]
            self.b_unit = [(p.wscale * np.float32(p.input_scale)).astype(dt) for p in q]
        self._kept: list[np.ndarray | None] = [None] * n
        self._masks: list[np.ndarray | None] = [None] * n
        self._frozen_float: dict[int, np.ndarray] = {}  # int8 chain: frozen rows dequantised, once

    # -- the layers' float weights, a block of rows at a time ----------------------------
    def _blocks(self, k: int):
        """(r0, r1, float rows r0:r1 of layer k's weight as the forward pass uses them).

        Float frozen rows are views; int8 rows are widened one small tile at a time, so the
        int8 path never holds a float copy of a whole layer.
        """
        bb = self.backbone
        c = self.rows.get(k, 0)
        if not self.int8:
            if c:
                yield 0, c, self.params[f"layers.{k}.weight"]
            if c < bb.sizes[k + 1]:
                yield c, bb.sizes[k + 1], bb.layers[k].weight[c:]
            return
        from ..quant.int8 import TILE_BYTES
        qweight = bb.layers[k].quant.qweight
        out_k, in_k = qweight.shape
        t = max(1, TILE_BYTES // (in_k * 4))
        unit = self.w_unit[k]
        for lo, hi in ((0, c), (c, out_k)):
            for r0 in range(lo, hi, t):
                r1 = min(r0 + t, hi)
                if r0 < c:
                    w = np.clip(np.rint(self.params[f"layers.{k}.weight"][r0:r1]), -127, 127)
                else:
                    w = qweight[r0:r1].astype(bb.dtype)
                w *= unit[r0:r1, None]
                yield r0, r1, w

    def _linear(self, h: np.ndarray, k: int) -> np.ndarray:
        z = np.empty((h.shape[0], self.backbone.sizes[k + 1]), h.dtype)
        for r0, r1, w in self._blocks(k):
            np.matmul(h, w.T, out=z[:, r0:r1])
        z += self._bias(k)
        return z

    def _linear_back(self, g: np.ndarray, k: int) -> np.ndarray:
        dh = np.zeros((g.shape[0], self.backbone.sizes[k]), g.dtype)
        tmp = np.empty_like(dh)
        for r0, r1, w in self._blocks(k):
            np.matmul(g[:, r0:r1], w, out=tmp)
            dh += tmp
        return dh

    def _bias(self, k: int) -> np.ndarray:
        bb = self.backbone
        if not self.int8:
            return self.params[f"layers.{k}.bias"] if k in self.train_bias else bb.layers[k].bias
        b = np.rint(self.params[f"layers.{k}.bias"]) if k in self.train_bias else bb.layers[k].quant.qbias
        return (b * self.b_unit[k]).astype(bb.dtype)

    # -- forward / backward -------------------------------------------------------------
    def _start(self, x: np.ndarray) -> np.ndarray:
        """The float input of layer ``first`` (frozen layers before it run as they are)."""
        bb = self.backbone
        start = min(self.first, bb.n_layers - 1)
        if self.int8:
            from ..quant.int8 import quantize_input, run_int8
            q = run_int8(bb, quantize_input(bb, x), 0, start)
            return q * np.float32(bb.layers[start].quant.input_scale)
        h = x
        for layer in bb.layers[:start]:
            h = apply_layer(layer, h)
        return h

    def _run(self, x: np.ndarray, keep: bool) -> np.ndarray:
        bb = self.backbone
        n = bb.n_layers
        if self.first >= n:  # nothing trains
            return bb.forward(x)
        h = self._start(x)
        last = n - 1
        for k in range(self.first, n):
            if keep:
                if k in self.rows:
                    self._kept[k] = h
                elif k > self.first:
                    self._masks[k] = self._mask_of(k, h)
            z = self._linear(h, k)
            if k == last:
                return z
            h = bb.layers[k].spec.act.forward(z)
            if self.int8:  # fake-quantise to layer k+1's int8 input
                s = np.float32(bb.layers[k + 1].quant.input_scale)
                h /= s
                np.rint(h, out=h)
                np.clip(h, -127, 127, out=h)
                h *= s
        raise AssertionError("unreachable")

    def _mask_of(self, k: int, h: np.ndarray) -> np.ndarray:
        """Where the gradient passes back through layer k-1's activation (and int8 clip)."""
        layers = self.backbone.layers
        mask = h > 0 if layers[k - 1].spec.activation == "relu" else np.ones(h.shape, bool)
        if self.int8:
            mask &= h < 127 * np.float32(layers[k].quant.input_scale)
        return mask

    def forward(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return (self._run_generic if self.generic else self._run)(x[ids], keep=True)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        if not self.generic:
            return self._run(x, keep=False)
        return np.concatenate([self._run_generic(x[b], keep=False) for b in self.backbone._blocks(x.shape[0])])

    # -- any chain of layers (convolutions, pooling, residual adds), float or int8 ---------
    def _weight(self, k: int) -> np.ndarray | None:
        """Layer k's weight as the forward pass uses it: the trained rows, then the frozen ones
        (int8: both dequantised, the trained rows rounded to int8 first)."""
        layer, c = self.backbone.layers[k], self.rows.get(k, 0)
        if not self.int8:
            if not c:
                return layer.weight
            return np.concatenate([self.params[f"layers.{k}.weight"], layer.weight[c:]])
        if not layer.spec.has_params:
            return None
        unit = self.w_unit[k].reshape((-1,) + (1,) * (layer.quant.qweight.ndim - 1))
        w = self._frozen_float.get(k)
        if w is None:
            w = self._frozen_float[k] = layer.quant.qweight.astype(self.backbone.dtype) * unit
        if not c:
            return w
        w = w.copy()
        w[:c] = np.clip(np.rint(self.params[f"layers.{k}.weight"]), -127, 127) * unit[:c]
        return w

    def _bias_generic(self, k: int) -> np.ndarray | None:
        if self.int8:
            return self._bias(k) if self.backbone.specs[k].has_params else None
        return self.params[f"layers.{k}.bias"] if k in self.train_bias else self.backbone.layers[k].bias

    def _start_generic(self, x: np.ndarray, kept: dict[int, np.ndarray]) -> tuple[int, np.ndarray]:
        """(start, float input of layer start): an int8 chain runs the integer kernels up to the
        first trained layer and dequantises that layer's input (and the inputs an add reads)."""
        bb = self.backbone
        if not self.int8:
            return 0, x
        from ..quant.int8 import quantize_input, run_int8
        start = min(self.first, bb.n_layers - 1)
        sources = self._sources

        def keep(k: int, q: np.ndarray) -> None:
            if k in sources:
                kept[k] = q * np.float32(bb.layers[k].quant.input_scale)

        q = run_int8(bb, quantize_input(bb, x), 0, start, on_input=keep)
        return start, q * np.float32(bb.layers[start].quant.input_scale)

    def _run_generic(self, h: np.ndarray, keep: bool) -> np.ndarray:
        bb = self.backbone
        n = bb.n_layers
        kept: dict[int, np.ndarray] = {}
        start, h = self._start_generic(h, kept)
        for k in range(start, n):
            layer = bb.layers[k]
            spec = layer.spec
            if keep and k >= self.first:
                self._kept[k] = h
            if k in self._sources:
                kept[k] = h
            residual = kept[spec.source] if spec.kind == "add" else None
            z = spec.ops.forward(spec, h, self._weight(k), residual=residual)
            if spec.has_params:
                z = spec.ops.add_bias(spec, z, self._bias_generic(k))
            h = spec.act.forward(z)
            if self.int8 and k < n - 1:  # fake-quantise to layer k+1's int8 input
                s = np.float32(bb.layers[k + 1].quant.input_scale)
                h = h / s  # a new array: a flatten's output is its (kept) input
                np.rint(h, out=h)
                np.clip(h, -127, 127, out=h)
                h *= s
        return h

    def _backward_generic(self, g: np.ndarray) -> None:
        from ..quant.int8 import clamp_range
        bb, grads = self.backbone, self.params.grads
        pending: dict[int, np.ndarray] = {}
        for k in range(bb.n_layers - 1, self.first - 1, -1):
            spec, h = bb.specs[k], self._kept[k]
            c = self.rows.get(k, 0)
            if c:
                gw = grads[f"layers.{k}.weight"]
                gw[...] = spec.ops.weight_grad(spec, h, g)[:c]
                if self.int8:  # d/dWq = s_W dW; QAS multiplies by s_W^-2
                    u = self.w_unit[k][:c]
                    gw *= (1 / u if self.qas else u).reshape((-1,) + (1,) * (gw.ndim - 1))
            if k in self.train_bias:
                gb = grads[f"layers.{k}.bias"]
                spec.ops.bias_grad(spec, g, out=gb)
                if self.int8:  # d/dbq = s_x s_W db; QAS multiplies by (s_x s_W)^-2
                    gb *= 1 / self.b_unit[k] if self.qas else self.b_unit[k]
            if spec.kind == "add" and spec.source >= self.first:
                pending[spec.source] = pending[spec.source] + g if spec.source in pending else g
            if k > self.first:
                dh = spec.ops.input_grad(spec, g, self._weight(k), h)
                if dh is g:
                    dh = g.copy()
                if k in pending:
                    dh = dh + pending.pop(k)
                bb.specs[k - 1].act.grad_mul(dh, h)
                if self.int8:  # straight through the int8 rounding, zero where the clamp held
                    s = np.float32(bb.layers[k].quant.input_scale)
                    hi = clamp_range(bb.specs[k - 1].activation, s)[1]  # ReLU6: its int8 top
                    dh *= (h < np.float32(hi) * s) & (h > np.float32(-127) * s)
                g = dh

    def backward(self, g: np.ndarray) -> None:
        bb, grads = self.backbone, self.params.grads
        if self.generic:
            return self._backward_generic(g)
        if any(layer.spec.activation not in ("relu", "identity") for layer in bb.layers[:-1]):
            raise UsageError("sparse update supports ReLU and identity activations")
        for k in range(bb.n_layers - 1, self.first - 1, -1):
            c = self.rows.get(k, 0)
            if c:
                gw = grads[f"layers.{k}.weight"]
                np.matmul(g[:, :c].T, self._kept[k], out=gw)
                if self.int8:  # d/dWq = s_W dW; QAS multiplies by s_W^-2
                    gw *= (1 / self.w_unit[k][:c] if self.qas else self.w_unit[k][:c])[:, None]
            if k in self.train_bias:
                gb = grads[f"layers.{k}.bias"]
                np.sum(g, axis=0, out=gb)
                if self.int8:  # d/dbq = s_x s_W db; QAS multiplies by (s_x s_W)^-2
                    gb *= 1 / self.b_unit[k] if self.qas else self.b_unit[k]
            if k > self.first:
                dh = self._linear_back(g, k)
                mask = self._masks[k] if self._masks[k] is not None else self._mask_of(k, self._kept[k])
                dh *= mask
                g = dh

    def end_fit(self) -> None:
        n = self.backbone.n_layers
        self._kept, self._masks = [None] * n, [None] * n
        self._frozen_float = {}

    def core_spec(self) -> CoreSpec:
        """This method as the compiled engine sees it (see edgetune/core/engine.py)."""
        n, off = self.backbone.n_layers, self.params.offset
        return CoreSpec("sparse", rank=1, scale=1.0, first=self.first, qas=self.qas,
                        rows=[self.rows.get(k, 0) for k in range(n)],
                        weight=[off(f"layers.{k}.weight") for k in range(n)],
                        bias=[off(f"layers.{k}.bias") for k in range(n)],
                        w_unit=self.w_unit if self.int8 else None, b_unit=self.b_unit if self.int8 else None)

    # -- deployment ---------------------------------------------------------------------
    def merged_backbone(self) -> Backbone:
        """The backbone with the trained rows written in (int8 values for an int8 backbone)."""
        bb = self.backbone
        if self.int8:
            qw = {}
            for k, c in self.rows.items():
                w = bb.layers[k].quant.qweight.copy()
                w[:c] = np.clip(np.rint(self.params[f"layers.{k}.weight"]), -127, 127)
                qw[k] = w
            qb = {k: np.rint(self.params[f"layers.{k}.bias"]) for k in self.train_bias}
            return bb.replace_int8(qw, qb)
        out = bb.copy()
        for k, c in self.rows.items():
            out.layers[k].weight[:c] = self.params[f"layers.{k}.weight"]
        for k in self.train_bias:
            out.layers[k].bias[...] = self.params[f"layers.{k}.bias"]
        return out

    def kept_bytes(self) -> int:
        """Bytes of activations and masks currently kept for backward."""
        return sum(a.nbytes for a in (*self._kept, *self._masks) if a is not None)
