"""PyTorch interop (the optional extra ``edgetune[torch]``).

    from edgetune.torch import to_torch, from_torch, skip2lora
    seq = to_torch(backbone)              # nn.Sequential, Linear layers named "0", "2", ...
    backbone = from_torch(seq)            # back to an edgetune Backbone
    wrapped = skip2lora(any_module, rank=2)
    logits = wrapped(x, index=idx)        # skip-cache keyed by sample index

Importing this package never imports torch; each function does, on first use, and says
``pip install edgetune[torch]`` if it is missing. The core of edgetune never imports it.
See docs/torch.md.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import EdgetuneError

if TYPE_CHECKING:  # pragma: no cover - for readers and type checkers only
    import torch

    from ..methods.base import Method
    from ..nn.mlp import Backbone
    from .skip import Skip2LoRAModule


class MissingExtraError(EdgetuneError, ImportError):
    """An optional dependency is not installed."""


def require_torch() -> Any:
    """Import and return ``torch``, or raise with the install command."""
    try:
        return importlib.import_module("torch")
    except ImportError as e:
        raise MissingExtraError(
            f"this feature needs PyTorch, which is not installed ({e}); "
            "install it with: pip install edgetune[torch]") from None


def to_torch(backbone: "Backbone", *, normalize: bool = True) -> "torch.nn.Module":
    """An MLP as an ``nn.Sequential`` of Linear and activation modules ("0", "1", ...); any
    other backbone as a ``LayerChain`` module (edgetune.torch.graph) computing the same.

    With ``normalize`` (default) and a backbone that carries an input normalisation, the
    result subtracts the mean and divides by the std before layer "0", so it takes raw
    inputs like ``FineTuner.predict``; ``normalize=False`` gives a plain ``nn.Sequential``
    that expects already-normalised inputs (``backbone.prepare(x)``).
    """
    require_torch()
    from .convert import to_torch as impl
    return impl(backbone, normalize=normalize)


def from_torch(module: "torch.nn.Module", *, labels: list[str] | None = None,
               input_shape: tuple[int, ...] | None = None) -> "Backbone":
    """An edgetune Backbone from a PyTorch module.

    An MLP: a chain of ``nn.Linear`` (with or without bias) and ReLU, LeakyReLU(0.01), Tanh,
    Sigmoid or Identity, the same activation between every pair of Linear layers and none
    after the last. A convolutional network: give ``input_shape`` = (C, L) or (C, H, W) of
    one sample; its ``torch.fx`` graph is read (Conv1d/Conv2d with any groups, BatchNorm
    folded, ReLU/ReLU6/..., pooling, AdaptiveAvgPool to 1, Flatten, Dropout, Linear, nested
    Sequentials and residual adds such as torchvision's InvertedResidual; see docs/cnn.md).
    Anything else raises ``UsageError`` naming the module, before anything is built.
    """
    require_torch()
    from .convert import from_torch as impl
    return impl(module, labels=labels, input_shape=input_shape)


def skip2lora(model: "torch.nn.Module", taps: list[str] | None = None, rank: int = 1,
              alpha: float | None = None, cache: bool = True, *, train_last_bias: bool = False,
              example_input: "torch.Tensor | None" = None, seed: int | None = None) -> "Skip2LoRAModule":
    """Wrap ``model`` with Skip2-LoRA: frozen backbone, rank-R skip adapters, skip-cache.

    ``taps`` names the modules whose *input* feeds an adapter (default: every nn.Linear).
    Call the result as ``wrapped(x, index=idx)``; see ``Skip2LoRAModule``.
    """
    require_torch()
    from .skip import Skip2LoRAModule
    return Skip2LoRAModule(model, taps=taps, rank=rank, alpha=alpha, cache=cache,
                           train_last_bias=train_last_bias, example_input=example_input, seed=seed)


def skip_head(method: "Method", *, normalize: bool = True) -> "torch.nn.Module":
    """A deployable torch model for a trained ``skip-lora``/``skip2-lora`` method.

    What folds (the last layer's adapter, the bias delta) is folded into the backbone;
    the adapters on earlier layers' inputs stay as tiny rank-R products beside it.
    """
    require_torch()
    from .skip import skip_head as impl
    return impl(method, normalize=normalize)


def __getattr__(name: str) -> Any:
    if name in ("Skip2LoRAModule", "NormalizedSequential"):
        require_torch()
        mod = importlib.import_module(".skip" if name == "Skip2LoRAModule" else ".convert", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MissingExtraError", "from_torch", "require_torch", "skip2lora", "skip_head", "to_torch"]
