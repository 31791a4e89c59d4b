"""The same fine-tuning written the way a PyTorch user would write it.

Plain ``nn.Linear`` layers, LoRA as a small module beside a frozen ``nn.Linear``, a
standard loop (``zero_grad`` / ``cross_entropy`` / ``backward`` / ``torch.optim.SGD``) over
manual mini-batches of tensors. Skip2-LoRA is the straightforward PyTorch version: skip
adapters from every layer's input to the output, and a preallocated cache of the frozen
activations filled in the first epoch.

To make the accuracy comparison exact, models start from the edgetune backbone's weights
and the edgetune method's initial adapter tensors, and batches follow the same seeded
permutation as ``edgetune.train.fit``. Import only where torch is installed.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

TORCH_METHODS = ("ft-all", "lora-all", "skip2-lora")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scale * B(A(x))``."""

    def __init__(self, base: nn.Linear, rank: int = 1, scale: float = 1.0):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def mlp_from_backbone(backbone: Any) -> nn.Sequential:
    """An ``nn.Sequential`` of Linear/ReLU with the edgetune backbone's weights."""
    layers: list[nn.Module] = []
    for k, (w, b) in enumerate(zip(backbone.weights, backbone.biases)):
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            lin.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
        layers.append(lin)
        if k < backbone.n_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def add_lora(model: nn.Sequential, a_init: list[np.ndarray] | None, rank: int = 1) -> nn.Sequential:
    """Replace every Linear by a LoRALinear (A initialised from ``a_init`` if given)."""
    model.requires_grad_(False)
    k = 0
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            lora = LoRALinear(m, rank)
            if a_init is not None:
                with torch.no_grad():
                    lora.lora_A.weight.copy_(torch.from_numpy(a_init[k]))
            model[i] = lora
            k += 1
    return model


class Skip2LoRA(nn.Module):
    """Frozen MLP + skip adapters (input of every layer -> output) + a skip-cache."""

    def __init__(self, mlp: nn.Sequential, n_samples: int, rank: int = 1,
                 a_init: list[np.ndarray] | None = None):
        super().__init__()
        self.mlp = mlp.requires_grad_(False)
        self.linears = [m for m in mlp if isinstance(m, nn.Linear)]
        self.in_widths = [m.in_features for m in self.linears]
        out = self.linears[-1].out_features
        self.A = nn.ModuleList(nn.Linear(w, rank, bias=False) for w in self.in_widths)
        self.B = nn.ModuleList(nn.Linear(rank, out, bias=False) for _ in self.in_widths)
        for k, (a, b) in enumerate(zip(self.A, self.B)):
            nn.init.zeros_(b.weight)
            if a_init is not None:
                with torch.no_grad():
                    a.weight.copy_(torch.from_numpy(a_init[k]))
        self.offsets = np.concatenate([[0], np.cumsum(self.in_widths)]).tolist()
        self.d_in = self.offsets[-1]
        self.cache = torch.empty(n_samples, self.d_in + out)
        self.filled = torch.zeros(n_samples, dtype=torch.bool)

    @torch.no_grad()
    def taps(self, x: torch.Tensor) -> torch.Tensor:
        outs, h = [], x
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                outs.append(h)
            h = m(h)
        outs.append(h)
        return torch.cat(outs, dim=1)

    def rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if bool(self.filled[ids].all()):
            return self.cache[ids]
        r = self.taps(x[ids])
        self.cache[ids] = r
        self.filled[ids] = True
        return r

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        out = rows[:, self.d_in:]
        for k, (a, b) in enumerate(zip(self.A, self.B)):
            out = out + b(a(rows[:, self.offsets[k]:self.offsets[k + 1]]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # inference, no cache
        return self.head(self.taps(x))


def build(method: str, backbone: Any, init: dict[str, np.ndarray], n_samples: int, rank: int = 1) -> nn.Module:
    """The PyTorch model for ``method``, initialised like the edgetune method (``init``:
    its ``adapter_tensors()`` before training)."""
    mlp = mlp_from_backbone(backbone)
    n = backbone.n_layers
    if method == "ft-all":
        return mlp
    if method == "lora-all":
        return add_lora(mlp, [init[f"layers.{k}.lora_A"] for k in range(n)], rank)
    if method == "skip2-lora":
        return Skip2LoRA(mlp, n_samples, rank, [init[f"skip.{k}.lora_A"] for k in range(n)])
    raise ValueError(f"no PyTorch reference for {method}")


def finetune(method: str, model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
             batch_size: int = 20, lr: float = 0.01, seed: int = 0) -> list[float]:
    """Train ``model``; returns the seconds of every epoch. ``x`` is already normalised."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    rng = np.random.default_rng(seed)          # the same batches as edgetune.train.fit
    n = len(xt)
    skip = isinstance(model, Skip2LoRA)
    model.train()
    times = []
    clock = time.perf_counter
    for _ in range(epochs):
        t0 = clock()
        order = torch.from_numpy(rng.permutation(n))
        for lo in range(0, n, batch_size):
            ids = order[lo:lo + batch_size]
            opt.zero_grad()
            logits = model.head(model.rows(xt, ids)) if skip else model(xt[ids])
            loss = F.cross_entropy(logits, yt[ids])
            loss.backward()
            opt.step()
        times.append(clock() - t0)
    return times


def peft_lora_model(backbone: Any, rank: int = 1) -> nn.Module:
    """PEFT's LoRA on the same MLP (every Linear targeted). Raises ImportError without peft."""
    from peft import LoraConfig, get_peft_model

    mlp = mlp_from_backbone(backbone)
    names = [str(i) for i, m in enumerate(mlp) if isinstance(m, nn.Linear)]
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0, bias="none")
    return get_peft_model(mlp, cfg)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    model.train()
    return float((logits.argmax(dim=1).numpy() == np.asarray(y)).mean())
