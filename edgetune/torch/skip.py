"""Skip2-LoRA for any PyTorch module. Imports torch: reach it through ``edgetune.torch``.

    logits = model(x) + s * sum_k B_k A_k h_k        (s = alpha / rank)

where h_k is the input of tap module k, captured by a forward pre-hook. The model is
frozen and always runs in eval mode, so for a given sample its tap inputs and output
never change: with ``index`` given, they are computed once and kept in the skip-cache,
and later epochs skip the model's forward pass for that sample entirely.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UsageError


class Skip2LoRAModule(nn.Module):
    """A frozen ``model`` plus rank-R skip adapters from each tap's input to its output.

    Parameters: ``lora_A.<k>.weight`` (rank, in_k), kaiming-uniform as PEFT initialises
    LoRA A; ``lora_B.<k>.weight`` (out, rank), zero, so the wrapped model starts out
    computing exactly what ``model`` computes; ``bias`` (out,) if ``train_last_bias``.

    ``forward(x, index=None)``: ``index`` (one int per row of ``x``) keys the skip-cache;
    without it nothing is cached. The cache is keyed by index alone, so use one index
    space for one data set (pass no index for other data). It is dropped automatically
    when a backbone parameter or buffer changes in place or is replaced (PyTorch's tensor
    version counters); a change made through ``.data`` bypasses those counters, so call
    ``invalidate_cache()`` after one.
    """

    def __init__(self, model: nn.Module, *, taps: Sequence[str] | None = None, rank: int = 1,
                 alpha: float | None = None, cache: bool = True, train_last_bias: bool = False,
                 example_input: torch.Tensor | None = None, seed: int | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise UsageError(f"skip2lora wraps a torch.nn.Module, got {type(model).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise UsageError(f"rank must be a whole number >= 1, got {rank!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise UsageError(f"alpha must be a positive number, got {alpha!r}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        modules = dict(model.named_modules())
        if taps is None:
            taps = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not taps:
                raise UsageError(f"{type(model).__name__} has no nn.Linear layer to tap; name the taps")
        taps = [str(t) for t in taps]
        unknown = [t for t in taps if t not in modules]
        if unknown:
            raise UsageError(f"unknown tap module(s) {unknown}; the model has {sorted(n for n in modules if n)}")
        if len(set(taps)) != len(taps):
            raise UsageError(f"taps must be distinct, got {taps}")
        self.tap_names = taps
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scale = self.alpha / self.rank
        self.cache_enabled = bool(cache)
        params = list(model.parameters())
        self._dtype = params[0].dtype if params else torch.get_default_dtype()
        device = params[0].device if params else None

        self._captured: list[torch.Tensor | None] | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_invalidations = 0
        self.backbone_calls = 0
        self._hooks = [modules[t].register_forward_pre_hook(self._make_hook(i)) for i, t in enumerate(taps)]
        in_widths, out_width = self._widths(modules, example_input)
        self.in_widths = in_widths
        self.out_features = out_width

        gen = None
        if seed is not None:
            gen = torch.Generator(device=device or "cpu").manual_seed(int(seed))
        self.lora_A = nn.ModuleList()
        self.lora_B = nn.ModuleList()
        for w in in_widths:
            a = nn.Linear(w, self.rank, bias=False, device="meta")
            a.weight = nn.Parameter(torch.empty(self.rank, w, dtype=self._dtype, device=device))
            # PEFT's LoRA A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5), generator=gen)
            b = nn.Linear(self.rank, out_width, bias=False, device="meta")
            b.weight = nn.Parameter(torch.zeros(out_width, self.rank, dtype=self._dtype, device=device))
            self.lora_A.append(a)
            self.lora_B.append(b)
        self.bias = (nn.Parameter(torch.zeros(out_width, dtype=self._dtype, device=device))
                     if train_last_bias else None)

        # One tensor per tap plus one for the output, a row per sample: gathers give
        # contiguous batches, which keeps the adapters' backward pass on the fast path.
        self._store: list[torch.Tensor] | None = None
        self._filled: torch.Tensor | None = None
        self._key: tuple | None = None

    # ------------------------------------------------------------------ set-up helpers
    def _make_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._captured is None:
                return
            if self._captured[i] is not None:
                raise UsageError(f"tap '{self.tap_names[i]}' ran twice in one forward pass "
                                 f"(a shared module?); tap a module that runs once")
            if not args or not isinstance(args[0], torch.Tensor):
                raise UsageError(f"tap '{self.tap_names[i]}' was not called with a tensor")
            self._captured[i] = args[0]
        return hook

    def _widths(self, modules: dict[str, nn.Module], example: torch.Tensor | None) -> tuple[list[int], int]:
        if example is not None:
            with torch.no_grad():
                hs, z = self._run(example)
            if z.ndim != 2:
                raise UsageError(f"the model's output must be (batch, outputs), got shape {tuple(z.shape)}")
            return [int(h[0].numel()) for h in hs], int(z.shape[1])
        not_linear = [t for t in self.tap_names if not isinstance(modules[t], nn.Linear)]
        if not_linear:
            raise UsageError(f"taps {not_linear} are not nn.Linear, so their input width is unknown: "
                             f"pass example_input (one batch of inputs)")
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        return [modules[t].in_features for t in self.tap_names], linears[-1].out_features

    # ------------------------------------------------------------------ the backbone
    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen model's tap inputs (flattened per sample) and output for ``x``."""
        self._captured = [None] * len(self.tap_names)
        try:
            z = self.model(x)
            captured = self._captured
        finally:
            self._captured = None
        self.backbone_calls += 1
        missing = [t for t, h in zip(self.tap_names, captured) if h is None]
        if missing:
            raise UsageError(f"tap(s) {missing} did not run in the model's forward pass")
        return [h.reshape(h.shape[0], -1) for h in captured], z

    def _check_output(self, z: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.out_features:
            raise UsageError(f"the model's output has shape {tuple(z.shape)}, expected (batch, "
                             f"{self.out_features}); pass example_input to measure it")

    def train(self, mode: bool = True) -> "Skip2LoRAModule":
        super().train(mode)
        self.model.eval()  # frozen and cached: dropout and batch statistics stay off
        return self

    # ------------------------------------------------------------------ the skip-cache
    def _backbone_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, tuple(t.shape))
                     for t in (*self.model.parameters(), *self.model.buffers()))

    def invalidate_cache(self) -> None:
        """Forget every cached row (the model changed in a way the cache cannot see)."""
        if self._filled is not None and bool(self._filled.any()):
            self.cache_invalidations += 1
            self._filled.zero_()

    @property
    def cache_nbytes(self) -> int:
        if self._store is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._store) + self._filled.numel()

    def _cached(self, x: torch.Tensor, index: Any) -> list[torch.Tensor]:
        """[h_0, ..., h_{m-1}, output] for the rows of ``x``, from the cache where filled."""
        idx = torch.as_tensor(index).reshape(-1)
        if idx.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise UsageError(f"index must hold integer sample ids, got dtype {idx.dtype}")
        idx = idx.to(device=x.device, dtype=torch.long)
        if idx.numel() != x.shape[0]:
            raise UsageError(f"index has {idx.numel()} entries for a batch of {x.shape[0]} samples")
        if idx.numel() == 0:
            hs, z = self._run(x)
            return [*hs, z]
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0:
            raise UsageError("index must hold sample ids >= 0")
        key = self._backbone_key()
        if key != self._key:
            self.invalidate_cache()
            self._key = key
        widths = [*self.in_widths, self.out_features]
        have = self._filled.shape[0] if self._filled is not None else 0
        if hi >= have:
            cap = max(hi + 1, 2 * have)
            store = [torch.empty(cap, w, dtype=self._dtype, device=x.device) for w in widths]
            filled = torch.zeros(cap, dtype=torch.bool, device=x.device)
            if self._store is not None:
                for new, old in zip(store, self._store):
                    new[:have] = old
                filled[:have] = self._filled
            self._store, self._filled = store, filled
        hit = self._filled[idx]
        n_hit = int(hit.sum())
        self.cache_hits += n_hit
        self.cache_misses += idx.numel() - n_hit
        if n_hit == idx.numel():
            return [t[idx] for t in self._store]
        miss = ~hit
        with torch.no_grad():
            hs, z = self._run(x[miss])
        self._check_output(z)
        out = []
        for t, new in zip(self._store, (*hs, z)):
            new = new.to(self._dtype)
            rows = torch.empty(idx.numel(), t.shape[1], dtype=self._dtype, device=x.device)
            rows[miss] = new
            if n_hit:
                rows[hit] = t[idx[hit]]
            t[idx[miss]] = new
            out.append(rows)
        self._filled[idx[miss]] = True
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, index: Any = None) -> torch.Tensor:
        if index is not None and self.cache_enabled:
            hs = self._cached(x, index)
            z = hs.pop()
        else:
            hs, z = self._run(x)
            self._check_output(z)
        out = z
        for h, a, b in zip(hs, self.lora_A, self.lora_B):
            d = b(a(h))
            out = out + (d * self.scale if self.scale != 1.0 else d)
        if self.bias is not None:
            out = out + self.bias
        return out

    def unwrap(self) -> nn.Module:
        """Remove the hooks and return the (still frozen) model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.model

    def extra_repr(self) -> str:
        return (f"taps={self.tap_names}, rank={self.rank}, alpha={self.alpha:g}, "
                f"cache={self.cache_enabled}")


def skip_head(method: Any, *, normalize: bool = True) -> nn.Module:
    """Deployable torch model of a trained edgetune skip method (see ``SkipLoRA.merge_parts``)."""
    from ..methods.skip_lora import SkipLoRA
    from .convert import to_torch

    if not isinstance(method, SkipLoRA):
        raise UsageError(f"skip_head needs a skip-lora or skip2-lora method, got {type(method).__name__}; "
                         f"other methods merge into a plain backbone (merged_backbone / to_torch)")
    folded, rest = method.merge_parts()
    seq = to_torch(folded, normalize=normalize)
    if not rest:
        return seq
    if not folded.is_plain_mlp():
        raise UsageError("skip_head deploys the adapters of an MLP's layers as torch modules; on this backbone "
                         "(convolutions, pooling or adds) deploy with edgetune.onnx.to_onnx, which writes the "
                         "pooled skip branches, or edgetune export")
    r = method.options.rank
    layers = sorted(rest)
    wrapped = Skip2LoRAModule(seq, taps=[str(2 * k) for k in layers], rank=r, alpha=r, cache=False)
    with torch.no_grad():
        for i, k in enumerate(layers):
            a, sb = rest[k]
            wrapped.lora_A[i].weight.copy_(torch.from_numpy(np.ascontiguousarray(a)))
            wrapped.lora_B[i].weight.copy_(torch.from_numpy(np.ascontiguousarray(sb)))
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped.eval()
