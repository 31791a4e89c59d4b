"""`skip-lora`: rank-R adapters from the input of every layer straight to the output.

logits = z_n + s * sum_k B_k A_k h_{k-1}, k = 1..n, with h_0 = x and z_n the frozen
backbone's logits. The backward pass needs only the adapters' inputs, never the
backbone's weights: the gradient never enters the backbone.

The n adapters are stored stacked: A as one (n*R, D) matrix whose k-th block row is
non-zero only over layer k's input columns (D = sum of layer input widths), B as one
(out, n*R) matrix. A training step is then a few matrix products however deep the
backbone is; the off-block entries are masked and stay exactly zero.
"""
from __future__ import annotations

import numpy as np

from ..nn.layers import LayerSpec
from ..nn.mlp import Backbone
from .base import CoreSpec, Method, MethodOptions, ParamStore, init_lora_a


class SkipLoRA(Method):
    name = "skip-lora"
    description = "Rank-R skip adapters from every layer's input to the last layer's output; backbone frozen."
    uses_cache = False

    @classmethod
    def count_trainable(cls, specs: list[LayerSpec], options: MethodOptions) -> int:
        r, out = options.rank, specs[-1].out_features
        taps = [s.tap_width for s in specs if s.has_params]
        return r * sum(taps) + out * len(taps) * r + (out if options.train_last_bias else 0)

    def __init__(self, backbone: Backbone, options: MethodOptions | None = None,
                 rng: np.random.Generator | None = None):
        super().__init__(backbone, options, rng)
        bb = self.backbone
        sizes = bb.sizes
        n, r, out = len(bb.tap_layers), self.options.rank, sizes[-1]
        self.scale = self.options.scale
        self.in_widths = bb.tap_widths          # adapter k reads layer tap_layers[k]'s input
        self.tap_layers = bb.tap_layers
        self.check_rank(sorted(set(self.in_widths) | {out}))
        self.offsets = np.concatenate([[0], np.cumsum(self.in_widths)]).astype(int)
        self.d_in = int(self.offsets[-1])
        self.row_width = self.d_in + out
        a = np.zeros((n * r, self.d_in), bb.dtype)
        mask = np.zeros(a.shape, bool)
        for k, w in enumerate(self.in_widths):
            cols = slice(self.offsets[k], self.offsets[k + 1])
            a[k * r:(k + 1) * r, cols] = init_lora_a(self.rng, r, w, bb.dtype)
            mask[k * r:(k + 1) * r, cols] = True
        tensors = {"skip.lora_A": a, "skip.lora_B": np.zeros((out, n * r), bb.dtype)}
        if self.options.train_last_bias:
            tensors["head.bias_delta"] = np.zeros(out, bb.dtype)
        self.params = ParamStore(tensors, bb.dtype, masks={"skip.lora_A": mask})
        self._mask = mask.astype(bb.dtype)
        self._h: np.ndarray | None = None
        self._u: np.ndarray | None = None
        self._wt: list[np.ndarray | None] | None = None

    # -- where the adapters' inputs come from ------------------------------------------
    def begin_fit(self, x: np.ndarray) -> None:
        # The backbone is frozen for the whole fit: its forward uses contiguous weight copies.
        self._wt = self.backbone.transposed_weights()

    @property
    def transposed_bytes(self) -> int:
        return sum(w.nbytes for w in self._wt or () if w is not None)

    def compute_taps(self, x: np.ndarray) -> np.ndarray:
        if self._wt is None:
            return self.backbone.forward_taps(x)
        return self.backbone.forward_taps(x, wts=self._wt)

    def taps(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows [x | h_1 | ... | h_{n-1} | z_n] for samples ``ids``: here, always computed."""
        return self.compute_taps(x[ids])

    # -- the adapters --------------------------------------------------------------------
    def _head(self, rows: np.ndarray, keep: bool) -> np.ndarray:
        h = rows[:, :self.d_in]
        u = h @ self.params["skip.lora_A"].T
        logits = u @ self.params["skip.lora_B"].T
        if self.scale != 1.0:
            logits *= self.scale
        logits += rows[:, self.d_in:]
        if self.options.train_last_bias:
            logits += self.params["head.bias_delta"]
        if keep:
            self._h, self._u = h, u
        return logits

    def forward(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self._head(self.taps(x, ids), keep=True)

    def backward(self, g: np.ndarray) -> None:
        grads, s = self.params.grads, self.scale
        gb = grads["skip.lora_B"]
        np.matmul(g.T, self._u, out=gb)
        gu = g @ self.params["skip.lora_B"]
        if s != 1.0:
            gb *= s
            gu *= s
        ga = grads["skip.lora_A"]
        np.matmul(gu.T, self._h, out=ga)
        ga *= self._mask
        if self.options.train_last_bias:
            np.sum(g, axis=0, out=grads["head.bias_delta"])

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        return self._head(self.compute_taps(x), keep=False)

    def core_spec(self) -> CoreSpec:
        """This method as the compiled engine sees it (see edgetune/core/engine.py)."""
        wt = self._wt if self._wt is not None else self.backbone.transposed_weights()
        off = self.params.offset
        return CoreSpec("skip", rank=self.options.rank, scale=self.scale, first=0, skip_a=off("skip.lora_A"),
                        skip_b=off("skip.lora_B"), bias_delta=off("head.bias_delta"), wt=wt)

    def end_fit(self) -> None:
        self._h = self._u = None
        self._wt = None

    # -- files: one (A_k, B_k) pair per adapter, as a reader expects ------------------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        r = self.options.rank
        a, b = self.params["skip.lora_A"], self.params["skip.lora_B"]
        out = {}
        for k, layer in enumerate(self.tap_layers):
            out[f"skip.{layer}.lora_A"] = np.ascontiguousarray(a[k * r:(k + 1) * r, self.offsets[k]:self.offsets[k + 1]])
            out[f"skip.{layer}.lora_B"] = np.ascontiguousarray(b[:, k * r:(k + 1) * r])
        if self.options.train_last_bias:
            out["head.bias_delta"] = self.params["head.bias_delta"].copy()
        return out

    def load_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        self.check_adapter_tensors(tensors)
        r = self.options.rank
        a, b = self.params["skip.lora_A"], self.params["skip.lora_B"]
        for k, layer in enumerate(self.tap_layers):
            a[k * r:(k + 1) * r, self.offsets[k]:self.offsets[k + 1]] = tensors[f"skip.{layer}.lora_A"]
            b[:, k * r:(k + 1) * r] = tensors[f"skip.{layer}.lora_B"]
        if self.options.train_last_bias:
            self.params["head.bias_delta"][...] = tensors["head.bias_delta"]

    # -- deployment: fold what folds ----------------------------------------------------
    def merge_parts(self) -> tuple[Backbone, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """The backbone with every adapter that folds folded in, and those that cannot.

        The adapter on the last layer's input adds s B A h_{n-1} to the logits, exactly
        what W_n + s B A computes, and the bias delta adds to b_n: both fold. An adapter
        on an earlier layer's input h_{k-1} cannot: the last layer only sees h_{n-1}, a
        nonlinear function of h_{k-1}. Those come back as ``{k: (A_k, s * B_k)}`` (layer
        k's input, 0-based), adapters whose product is exactly zero left out.
        """
        from ..errors import UsageError

        if self.backbone.is_int8:
            raise UsageError(f"{self.name} adapters on an int8 backbone cannot be folded into its int8 weights; "
                             f"deploy them beside the backbone (edgetune export, or merge onto the float model)")
        out = self.backbone.copy()
        t = self.adapter_tensors()
        last = out.n_layers - 1
        if out.specs[last].kind != "dense":
            raise UsageError(f"{self.name} folds its last adapter into a last dense layer; this backbone ends "
                             f"with a {out.specs[last].kind} layer. Deploy the adapters beside the backbone")
        rest: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in self.tap_layers:
            a, sb = t[f"skip.{k}.lora_A"], (self.scale * t[f"skip.{k}.lora_B"]).astype(out.dtype)
            if k == last:
                out.layers[k].weight += (sb @ a).astype(out.dtype)
            elif np.any(sb @ a):
                rest[k] = (a, sb)
        if self.options.train_last_bias:
            out.layers[last].bias += t["head.bias_delta"]
        return out, rest

    def merged_backbone(self) -> Backbone:
        """A plain backbone, when every adapter but the last layer's is zero; else UsageError."""
        from ..errors import UsageError

        out, rest = self.merge_parts()
        if rest:
            raise UsageError(
                f"{self.name} cannot be merged into a plain backbone: the adapters on the inputs of layers "
                f"{sorted(rest)} (0-based, of {out.n_layers}) read tensors that reach the last layer only "
                f"through the layers in between, so no change of W_n reproduces them. Only the last "
                f"layer's adapter and bias fold. "
                f"Deploy with edgetune.torch.skip_head(method), or method.merge_parts() (the folded "
                f"backbone plus the remaining rank-{self.options.rank} products)")
        return out
