"""What every fine-tuning method provides to the trainer.

A method owns its trainable tensors (views into one flat buffer, so that an optimizer
step is a single vector operation) and runs forward and backward for a batch. The
trainer knows nothing else about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import UsageError
from ..nn.layers import LayerSpec
from ..nn.mlp import Backbone


class ParamStore:
    """Named trainable tensors stored contiguously; ``grad`` mirrors ``flat``.

    ``mask`` (optional, per tensor) marks entries that are structurally zero and never
    train, e.g. the off-diagonal blocks of the stacked skip adapters. Their gradient is
    always zero, so every optimizer here keeps them exactly zero.
    """

    def __init__(self, tensors: dict[str, np.ndarray], dtype: np.dtype,
                 masks: dict[str, np.ndarray] | None = None):
        total = sum(int(a.size) for a in tensors.values())
        self.flat = np.zeros(total, dtype=dtype)
        self.grad = np.zeros(total, dtype=dtype)
        self.values: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = dict(masks or {})
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, a in tensors.items():
            n = int(a.size)
            v = self.flat[offset:offset + n].reshape(a.shape)
            v[...] = a
            self.values[name] = v
            self.grads[name] = self.grad[offset:offset + n].reshape(a.shape)
            self.slices[name] = slice(offset, offset + n)
            offset += n

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def __iter__(self):
        return iter(self.values)

    def offset(self, name: str) -> int:
        """Where tensor ``name`` starts in ``flat`` (-1 if there is no such tensor)."""
        return self.slices[name].start if name in self.slices else -1

    def trainable_mask(self) -> np.ndarray:
        """A flat boolean mask over ``flat``: True where the entry actually trains."""
        out = np.ones(self.flat.shape, bool)
        for name, mask in self.masks.items():
            out[self.slices[name]] = mask.ravel()
        return out

    @property
    def n_trainable(self) -> int:
        """Entries that actually train (masked-out structural zeros not counted)."""
        return sum(int(self.masks[k].sum()) if k in self.masks else v.size for k, v in self.values.items())

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes


@dataclass
class CoreSpec:
    """A method as the compiled engine sees it: offsets of its tensors in the flat parameter
    vector (-1: absent), per layer where a list, and the frozen arrays C reads. The binding
    (edgetune/core/engine.py) checks every field before C runs."""

    kind: str                                  # "layerwise", "skip" or "sparse"
    rank: int = 1
    scale: float = 1.0
    first: int = 0                             # the first layer with anything trainable
    bias_delta: int = -1                       # a trainable offset added to the logits
    weight: list[int] | None = None            # layerwise: W^T (in, out); sparse: the trained rows
    bias: list[int] | None = None
    lora_a: list[int] | None = None
    lora_b: list[int] | None = None
    skip_a: int = -1                           # skip: A (n*rank, D), block-diagonal
    skip_b: int = -1                           # skip: B (out, n*rank)
    rows: list[int] | None = None              # sparse: trained output channels per layer
    qas: bool = False                          # sparse on int8: Quantization-Aware Scaling
    w_unit: list[np.ndarray] | None = None     # sparse on int8: weight unit s_W per layer
    b_unit: list[np.ndarray] | None = None     # sparse on int8: bias unit s_x s_W per layer
    wt: list[np.ndarray | None] | None = None  # frozen layers' (in, out) weights for the forward pass


@dataclass
class MethodOptions:
    """Options shared by the methods (each ignores what does not apply to it)."""
    rank: int = 1
    alpha: float | None = None          # scaling alpha / rank; default alpha = rank (scale 1)
    train_last_bias: bool = False       # LoRA/skip methods: also train the last layer's bias
    cache_budget: int | None = None     # skip2-lora: bytes the skip-cache may use
    cache_overflow: str = "error"       # "error" or "partial" (cache what fits, recompute the rest)
    cache_fill: str = "eager"           # "eager": every row before the first batch; "lazy": as batches come
    scheme: str | None = None           # sparse: update scheme, e.g. "b2,w-1:1/2" (None: the default)
    qas: bool | None = None             # sparse: Quantization-Aware Scaling (None: on for int8 backbones)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise UsageError(f"rank must be a whole number >= 1, got {self.rank!r}")
        self.rank = int(self.rank)
        if self.alpha is not None and (not isinstance(self.alpha, (int, float, np.integer, np.floating))
                                       or isinstance(self.alpha, bool)
                                       or not (np.isfinite(self.alpha) and self.alpha > 0)):
            raise UsageError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.cache_overflow not in ("error", "partial"):
            raise UsageError(f"cache_overflow must be 'error' or 'partial', got {self.cache_overflow!r}")
        if self.cache_fill not in ("eager", "lazy"):
            raise UsageError(f"cache_fill must be 'eager' or 'lazy', got {self.cache_fill!r}")
        if self.cache_budget is not None and self.cache_budget < 0:
            raise UsageError(f"cache_budget must be >= 0 bytes, got {self.cache_budget}")
        if self.scheme is not None and not isinstance(self.scheme, str):
            raise UsageError(f"scheme must be a string such as 'b2,w-1:1/2', got {self.scheme!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class Method:
    """Base class. Subclasses set ``name`` and ``description`` and build ``self.params``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True where training changes backbone tensors (the method then works on a copy).
    trains_backbone: ClassVar[bool] = False
    #: True where ``merged_backbone`` always gives a plain backbone (no adapter at run time).
    mergeable: ClassVar[bool] = False
    #: True for methods with a skip-cache (cache budget options apply).
    uses_cache: ClassVar[bool] = False
    #: True where the method reads ``options.scheme`` / ``options.qas`` (sparse update).
    takes_scheme: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, options: MethodOptions | None = None,
                 rng: np.random.Generator | None = None):
        self.options = options or MethodOptions()
        if not self.takes_scheme:
            for opt in ("scheme", "qas"):
                if getattr(self.options, opt, None) is not None:
                    raise UsageError(f"method {self.name} has no update scheme: '{opt}' applies to the sparse "
                                     f"method only (got {opt}={getattr(self.options, opt)!r})")
        self.backbone = backbone.copy() if self.trains_backbone else backbone
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.params: ParamStore = ParamStore({}, backbone.dtype)

    def check_rank(self, widths: list[int]) -> None:
        """Refuse a rank above every width its adapters touch: such a rank adds parameters
        and memory but no capacity (an adapter's rank cannot exceed its layer's width)."""
        r = self.options.rank
        if widths and r > max(widths):
            raise UsageError(f"rank {r} is larger than every layer width the {self.name} adapters apply to "
                             f"({', '.join(map(str, widths))}); use a rank of at most {max(widths)}")

    @classmethod
    def count_trainable(cls, specs: list[LayerSpec], options: MethodOptions) -> int:
        """Parameters this method trains on layers ``specs``, from the descriptions alone
        (nothing allocated). Equal to ``cls(backbone, options).n_trainable`` (tested)."""
        raise NotImplementedError

    # -- the trainer's interface -------------------------------------------------------
    def begin_fit(self, x: np.ndarray) -> None:
        """Called once per fit with all (prepared) training inputs, before the first batch."""

    def forward(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Logits for rows ``ids`` of ``x``; remember what backward needs."""
        raise NotImplementedError

    def backward(self, dlogits: np.ndarray) -> None:
        """Fill ``self.params.grad`` from the gradient of the loss w.r.t. the logits."""
        raise NotImplementedError

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for prepared inputs, no caching, nothing remembered."""
        raise NotImplementedError

    def end_fit(self) -> None:
        """Called after training; drop per-batch buffers."""

    # -- files and deployment -----------------------------------------------------------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        """The trained tensors as saved in ``adapter_model.safetensors``."""
        return {k: np.ascontiguousarray(v) for k, v in self.params.values.items()}

    def check_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Raise ModelFileError unless ``tensors`` has exactly this method's names and shapes."""
        from ..errors import ModelFileError

        want = self.adapter_tensors()
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise ModelFileError(f"adapter does not fit method {self.name}: missing {missing}, unexpected {extra}")
        for k, v in want.items():
            if tensors[k].shape != v.shape:
                raise ModelFileError(f"adapter tensor '{k}' has shape {list(tensors[k].shape)}, "
                                     f"expected {list(v.shape)}")
            if not np.all(np.isfinite(tensors[k])):
                raise ModelFileError(f"adapter tensor '{k}' contains NaN or inf")

    def load_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        self.check_adapter_tensors(tensors)
        for k in self.params:
            self.params[k][...] = tensors[k]

    def merged_backbone(self) -> Backbone:
        """A plain backbone computing what this method computes, for deployment."""
        raise NotImplementedError(f"{self.name} cannot be merged into a plain backbone")

    # -- reporting ----------------------------------------------------------------------
    @property
    def n_trainable(self) -> int:
        return self.params.n_trainable

    def memory_report(self) -> dict[str, int]:
        return {"trainable_bytes": self.params.nbytes, "grad_bytes": self.params.grad.nbytes}


def init_lora_a(rng: np.random.Generator, rank: int, fan_in: int, dtype: np.dtype) -> np.ndarray:
    """LoRA A as PEFT initialises it: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, (rank, fan_in)).astype(dtype)


def describe_options(opts: MethodOptions) -> dict[str, Any]:
    return {"rank": opts.rank, "alpha": opts.alpha if opts.alpha is not None else opts.rank,
            "train_last_bias": opts.train_last_bias, "scheme": opts.scheme, "qas": opts.qas}
