"""Fine-tuning methods, one module each, found by name in ``METHODS``.

Adding a method: write ``edgetune/methods/<name>.py`` with a ``Method`` subclass and add
one line below.
"""
from __future__ import annotations

import importlib

import numpy as np

from ..errors import UsageError
from ..nn.mlp import Backbone
from .base import Method, MethodOptions

METHODS: dict[str, str] = {
    "ft-all": "edgetune.methods.ft_all:FTAll",
    "ft-last": "edgetune.methods.ft_last:FTLast",
    "ft-bias": "edgetune.methods.ft_bias:FTBias",
    "lora-all": "edgetune.methods.lora_all:LoRAAll",
    "lora-last": "edgetune.methods.lora_last:LoRALast",
    "skip-lora": "edgetune.methods.skip_lora:SkipLoRA",
    "skip2-lora": "edgetune.methods.skip2_lora:Skip2LoRA",
    "sparse": "edgetune.methods.sparse:SparseUpdate",
}


def method_class(name: str) -> type[Method]:
    try:
        target = METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}': use one of {', '.join(METHODS)}") from None
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def make_method(name: str, backbone: Backbone, *, seed: int | np.random.Generator = 0,
                **options) -> Method:
    """Instantiate method ``name`` on ``backbone`` with ``MethodOptions`` fields as keywords."""
    cls = method_class(name)
    try:
        opts = MethodOptions(**options)
    except TypeError as e:
        raise UsageError(str(e)) from None
    return cls(backbone, opts, rng=np.random.default_rng(seed))


def count_trainable(name: str, sizes: list[int], *, rank: int = 1, train_last_bias: bool = False) -> int:
    """Parameters method ``name`` trains on an MLP of layer widths ``sizes``, counted from the
    sizes alone (nothing allocated: any architecture can be asked about). Each method counts
    its own (``Method.count_trainable`` over layer descriptions)."""
    from ..nn.layers import chain_specs

    cls = method_class(name)
    return cls.count_trainable(chain_specs([int(s) for s in sizes], "relu"),
                               MethodOptions(rank=rank, train_last_bias=train_last_bias))


__all__ = ["METHODS", "count_trainable", "Method", "MethodOptions", "make_method", "method_class"]
