"""Training memory, planned before training and measured during it.

``plan_memory`` gives an analytic account of what one fine-tuning run holds at its peak:
the frozen weights (float or int8), the trainable tensors, their gradients, the optimizer's
arrays, the trainer's per-epoch snapshot of the trainable tensors, the activations kept for
backward, the skip-cache, and the working buffers of one step. ``measure_memory`` runs real
steps under ``tracemalloc`` to check it. ``search`` lists every method and sparse scheme
that fits a budget.
"""
from __future__ import annotations

import functools
import itertools
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import BudgetError, UsageError
from .nn.layers import CallBytes, activation_bytes, call_bytes, lora_specs
from .nn.mlp import Backbone
from .units import format_bytes

if TYPE_CHECKING:  # the sparse method's module is imported where a plan needs it
    from .methods.sparse import SparseScheme

F32 = 4
COMPONENTS = ("frozen_weights", "weight_copies", "trainable", "gradients", "optimizer", "snapshot", "activations",
              "cache", "working")
FLOAT_ONLY = ("ft-all", "ft-last", "ft-bias", "lora-all", "lora-last")
OPTIMIZER_COPIES = {"sgd": 1, "momentum": 2, "adam": 4}  # arrays the size of the parameters


@dataclass
class MemoryPlan:
    method: str
    backbone: str               # "float32" or "int8"
    batch_size: int
    n_samples: int
    optimizer: str
    n_trainable: int
    scheme: str | None = None
    cache: str | None = None    # "float32" / "int8" for skip2-lora
    frozen_weights: int = 0
    weight_copies: int = 0      # RAM: contiguous (in, out) copies of frozen float weights during a fit
    trainable: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    snapshot: int = 0
    activations: int = 0
    cache_bytes: int = 0
    working: int = 0
    #: Microcontroller layout: the frozen weights are read from flash, not held in RAM.
    weights_in_flash: bool = False

    @property
    def label(self) -> str:
        name = self.method if self.scheme is None else f"sparse[{self.scheme}]"
        extra = f" +{self.cache} cache" if self.cache == "int8" else ""
        return f"{name} ({self.backbone}{extra})"

    def breakdown(self) -> dict[str, int]:
        return {"frozen_weights": self.frozen_weights, "weight_copies": self.weight_copies,
                "trainable": self.trainable, "gradients": self.gradients,
                "optimizer": self.optimizer_state, "snapshot": self.snapshot, "activations": self.activations,
                "cache": self.cache_bytes, "working": self.working}

    @property
    def total(self) -> int:
        """Bytes of RAM: everything, less the frozen weights when they stay in flash."""
        return sum(self.breakdown().values()) - (self.frozen_weights if self.weights_in_flash else 0)

    @property
    def flash(self) -> int:
        """Bytes read from flash (the frozen weights) when ``weights_in_flash``, else 0."""
        return self.frozen_weights if self.weights_in_flash else 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label, "total": self.total, "flash": self.flash}

    def explain(self, budget: int | None = None) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in self.breakdown().items()
                          if v and not (k == "frozen_weights" and self.weights_in_flash))
        total = format_bytes(self.total) if budget is None else exact_bytes(self.total)
        text = f"{self.label} needs {total} of RAM ({parts})"
        if self.weights_in_flash:
            text += f", plus {format_bytes(self.flash)} of frozen weights in flash"
        if budget is not None:
            text += f"; the budget is {exact_bytes(budget)}"
        return text


def _frozen_float(sizes: list[int], norm: bool, itemsize: int) -> int:
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return itemsize * (params + (2 * sizes[0] if norm else 0))


def _frozen_int8(sizes: list[int], norm: bool) -> int:
    total = 0
    for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        total += i * o + 4 * o + 4 * o + 4          # int8 weight, f32 scales, int32 bias, input scale
        if k < len(sizes) - 2:
            total += 16 * o                           # fixed-point requantiser: int64 multiplier + shift
    return total + (8 * sizes[0] if norm else 0)


def plan_memory(backbone: Backbone, method: str, *, batch_size: int = 20, n_samples: int = 1,
                optimizer: str = "sgd", rank: int = 1, train_last_bias: bool = False,
                scheme: str | SparseScheme | None = None, int8: bool | None = None,
                cache: str = "float32", weights_in_flash: bool = False) -> MemoryPlan:
    """Bytes one fine-tuning run holds at its peak, component by component.

    Any float backbone of the layer kinds in ``edgetune.nn.layers`` (convolutions, pooling,
    residual adds: ``_plan_layers``); int8 backbones and the int8 skip-cache are planned for
    backbones of dense layers only in this version (UsageError otherwise).
    ``int8`` plans for the int8 version of ``backbone`` (default: whatever it is); ``cache``
    is the skip-cache's row format for ``skip2-lora`` ("float32" or "int8"). With
    ``weights_in_flash`` (a microcontroller, whose budget is its RAM) the frozen weights are
    reported as flash and left out of ``total``.
    """
    from .methods import method_class

    method_class(method)
    if optimizer not in OPTIMIZER_COPIES:
        raise UsageError(f"unknown optimizer '{optimizer}': use one of {', '.join(OPTIMIZER_COPIES)}")
    if batch_size < 1 or n_samples < 1:
        raise UsageError("batch_size and n_samples must be >= 1")
    if cache not in ("float32", "int8"):
        raise UsageError(f"cache must be 'float32' or 'int8', got {cache!r}")
    if scheme is not None and method != "sparse":
        raise UsageError(f"method {method} has no update scheme: a scheme applies to the sparse method only")
    is_q = backbone.is_int8
    int8 = is_q if int8 is None else int8
    if any(spec.kind != "dense" for spec in backbone.specs):
        kinds = ", ".join(sorted({s.kind for s in backbone.specs} - {"dense"}))
        if int8:
            raise UsageError(f"the memory planner models int8 backbones of dense layers only in this version; this "
                             f"backbone has {kinds} layers: plan its float version")
        if cache == "int8":
            raise UsageError(f"the memory planner models the int8 skip-cache on backbones of dense layers only in "
                             f"this version; this backbone has {kinds} layers: plan the float skip-cache")
        return _plan_layers(backbone, method, batch_size=batch_size, n_samples=n_samples, optimizer=optimizer,
                            rank=rank, train_last_bias=train_last_bias, scheme=scheme,
                            weights_in_flash=weights_in_flash)
    if is_q and not int8:
        raise UsageError("an int8 backbone cannot be planned as float")
    if int8 and method in FLOAT_ONLY:
        raise UsageError(f"{method} trains or reads float weights; on an int8 backbone use skip-lora, "
                         f"skip2-lora or sparse")
    s = backbone.sizes
    n = len(s) - 1
    norm = backbone.input_mean is not None
    fi = 4 if int8 else np.dtype(backbone.dtype).itemsize
    B, N, L = batch_size, n_samples, n
    D, out = sum(s[:-1]), s[-1]
    frozen = _frozen_int8(s, norm) if int8 else _frozen_float(s, norm, fi)
    tlb = out if train_last_bias else 0
    copies = 0
    kept = 0
    working = 2 * B * out * fi + B * s[0] * fi       # logits and their gradient, the input batch
    cache_bytes = 0
    sch_text = None
    if method in FLOAT_ONLY:
        layer = [(i * o, o) for i, o in zip(s[:-1], s[1:])]
        if method == "ft-all":
            p = sum(w + b for w, b in layer)
            first = 0
        elif method == "ft-last":
            p = sum(layer[-1])
            first = L - 1
        elif method == "ft-bias":
            p = sum(b for _, b in layer)
            first = 0
        elif method == "lora-all":
            p = sum(rank * (i + o) for i, o in zip(s[:-1], s[1:])) + tlb
            first = 0
        else:  # lora-last
            p = rank * (s[-2] + s[-1]) + tlb
            first = L - 1
        if method.startswith("ft-"):  # ft-* train the backbone's own tensors, kept in the parameter buffer
            frozen -= fi * p
        # Frozen weights run forward from contiguous (in, out) copies during a fit.
        copies = sum(i * o * fi for k, (i, o) in enumerate(zip(s[:-1], s[1:]))
                      if not (method == "ft-all" or (method == "ft-last" and k == L - 1)))
        kept = sum(B * s[k] * fi for k in range(max(first, 1), L))  # layer 0's input is the batch itself
        if method.startswith("lora"):
            kept += sum(B * rank * fi for k in range(first, L))
        # Forward: the previous step's kept batch is still held when the new batch is gathered
        # (first == 0), else layer 0's output beside the batch; backward: dh, the gradient it
        # replaces and the ReLU mask.
        fwd = B * s[0] * fi if first == 0 else B * s[1] * fi
        bwd = max([0] + [B * (s[k] + s[k + 1]) * fi + B * s[k] for k in range(max(first, 1), L)])
        working += max(fwd, bwd)
    elif method in ("skip-lora", "skip2-lora"):
        p = L * rank * D + out * L * rank + tlb
        if not int8:  # the frozen weights' contiguous (in, out) copies for the forward pass
            copies = sum(i * o * fi for i, o in zip(s[:-1], s[1:]))
        kept = B * (D + out) * fi + B * L * rank * fi
        # ``kept`` is the previous step's rows and adapter products: they stay referenced until
        # this step's head replaces them, so they overlap with the new rows being computed.
        rows = B * (D + out) * fi
        if int8:  # the int8 pass beside the int8 taps, then the taps dequantised into float rows
            taps = B * D + max(max(_int8_layer_work(s, k, B) for k in range(L)),
                               B * out * 4 + rows + _ufunc_buffers(B * D, 3))
        else:  # rows filled layer by layer: ReLU/bias in place on column views of the rows
            taps = rows + _ufunc_buffers(B * max(s[1:-1] or [out]), 3)
        phase = taps  # beside the gathered batch (counted above)
        if method == "skip2-lora":
            phase += rows  # the cache's output rows, beside the computed ones on a miss
            if cache == "int8":  # then the computed rows rounded to int8 (the batch is released by then)
                phase = max(phase, 2 * rows + 2 * B * D * 4 + _ufunc_buffers(B * D, 2) - B * s[0] * fi)
        working += phase + B * out * fi + L * rank * D * fi  # + the float A mask
        if method == "skip2-lora":
            if cache == "int8":
                cache_bytes = N * D + N * out * 4 + D * 4 + N
            else:
                cache_bytes = N * (D + out) * fi + N
    else:  # sparse
        from fractions import Fraction  # with the sparse method: imported by its plans only

        from .methods.sparse import SparseScheme

        sch = SparseScheme.parse(scheme) if scheme else SparseScheme(min(2, L), ((-1, Fraction(1)),))
        sch = sch.resolve(L)
        sch_text = str(sch)
        rows = sch.channels(s[1:])
        biases = sch.bias_set(L)
        p = sum(c * s[k] for k, c in rows.items()) + sum(s[k + 1] for k in biases)
        trained = sorted(set(rows) | biases)
        first = trained[0] if trained else L
        kept = sum(B * s[k] * fi if k in rows else (B * s[k] if k > first else 0) for k in range(first, L))
        pre = 0
        if int8:  # quantise the batch, run the frozen layers before ``first`` with the int8 kernel
            pre = B * s[0] * (4 + 1)
            if first > 0:
                pre = max([pre] + [_int8_layer_work(s, k, B) for k in range(min(first, L - 1))])
        else:
            pre = max([0] + [B * s[k + 1] * fi + (B * s[k] * fi if k else 0) for k in range(min(first, L - 1))])
        if 0 in rows and not int8:
            kept -= B * s[0] * fi  # layer 0's kept input is the batch itself
            pre = max(pre, B * s[0] * fi)  # ... and the previous step's batch is held while it is gathered
        step = 0
        for k in range(first, L):
            # int8: a widened weight tile, scaled in place by its per-row units (broadcast: buffered)
            tile = _tile(s[k], s[k + 1]) + _ufunc_buffers(_tile(s[k], s[k + 1]) // 4, 2) if int8 else 0
            fwd = B * s[k + 1] * fi + tile + (B * s[k] * fi if int8 else 0)
            bwd = (2 * B * s[k] * fi + tile) if k > first else 0
            step = max(step, fwd, bwd)
        working += max(pre, step)
    grads = p * fi
    plan = MemoryPlan(method=method, backbone="int8" if int8 else "float32", batch_size=B, n_samples=N,
                      optimizer=optimizer, n_trainable=int(p), scheme=sch_text,
                      cache=cache if method == "skip2-lora" else None,
                      frozen_weights=int(frozen), weights_in_flash=weights_in_flash,
                      # On a microcontroller the weights sit in flash in the layout the forward
                      # pass reads: the engine's RAM copies are not made there.
                      weight_copies=0 if weights_in_flash else int(copies),
                      trainable=int(p * fi), gradients=int(grads),
                      optimizer_state=OPTIMIZER_COPIES[optimizer] * p * fi, snapshot=p * fi,
                      activations=int(kept), cache_bytes=int(cache_bytes), working=int(working))
    return plan


# ---------------------------------------------------------------------------- any chain of layers
class _Live:
    """Bytes a simulated training step holds (beyond the persistent arrays), and its peak.
    ``call`` books one operation: its peak on top of what is held, then what it returns."""

    def __init__(self, held: int = 0):
        self.now = self.peak = held

    def call(self, cb: CallBytes) -> None:
        self.peak = max(self.peak, self.now + cb.peak)
        self.now += cb.out

    def alloc(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n: int) -> None:
        self.now -= n


#: What a step of the NumPy engine holds per layer call beyond its arrays' data: array headers,
#: views, NumPy's iterators, Python frames. Measured with tracemalloc on the CNNs of
#: tests/test_memory_cnn.py: about 1 KB per layer of the forward pass and 2 KB more per layer
#: the backward pass enters (the sparse update's pruned backward: per trained layer; a skip
#: method's head: 2 KB per layer in all); at batch 1 it is a tenth to a fifth of the step.
OBJECTS_FORWARD, OBJECTS_BACKWARD, OBJECTS_SKIP = 1024, 2048, 2048


def _plan_layers(backbone: Backbone, method: str, *, batch_size: int, n_samples: int, optimizer: str, rank: int,
                 train_last_bias: bool, scheme: str | SparseScheme | None, weights_in_flash: bool) -> MemoryPlan:
    """``plan_memory`` for a float backbone of any layer kinds (convolutions, pooling, residual adds).

    The persistent arrays are counted from the layer descriptions; the step's transients by
    walking one training step of the NumPy engine layer by layer, as the methods run it,
    booking what each operation allocates (``edgetune.nn.layers.call_bytes``, stated next to
    the operations) and when each array is released.
    """
    from .methods import method_class
    from .methods.base import MethodOptions
    from .methods.layerwise import LayerwiseMethod
    from .methods.sparse import SparseUpdate

    specs = backbone.specs
    f = np.dtype(backbone.dtype).itemsize
    B, N = batch_size, n_samples
    n = len(specs)
    out = specs[-1].out_features
    norm = 2 * backbone.norm_shape[0] * f if backbone.input_mean is not None else 0
    frozen = f * sum(s.n_params for s in specs) + norm
    cls = method_class(method)
    opts = MethodOptions(rank=rank, train_last_bias=train_last_bias,
                         scheme=None if scheme is None else str(scheme))
    copies = cache_bytes = extra = 0
    sch_text = None
    if issubclass(cls, LayerwiseMethod):
        plans = cls.layer_plans(specs, rank)
        p = cls.count_trainable(specs, opts)
        if cls.trains_backbone:  # ft-*: the trained tensors live in the parameter buffer
            frozen -= f * sum((s.n_params - s.out_channels if pl.weight else 0) + (s.out_channels if pl.bias else 0)
                              for s, pl in zip(specs, plans))
        copies = sum(f * (s.n_params - s.out_channels) for s, pl in zip(specs, plans)
                     if s.kind == "dense" and not pl.weight)
        trainable = [k for k, pl in enumerate(plans) if pl.any]
        first = min(trainable) if trainable else n - 1
        lora = {k: lora_specs(specs[k], rank) for k, pl in enumerate(plans) if pl.lora}
        kept, peak = _step_chain(tuple(specs), B, f, first=first, lora=tuple(sorted(lora.items())),
                                 weight=frozenset(k for k, pl in enumerate(plans) if pl.weight))
        objects = OBJECTS_FORWARD * n + OBJECTS_BACKWARD * (n - first)
    elif cls is SparseUpdate:
        weighted = [k for k, s in enumerate(specs) if s.has_params]
        sch = SparseUpdate.resolve_scheme(opts.scheme, len(weighted), train_last_bias)
        sch_text = str(sch)
        p = cls.count_trainable(specs, opts)
        rows = {weighted[i]: c for i, c in sch.channels([specs[k].out_channels for k in weighted]).items()}
        biases = {weighted[i] for i in sch.bias_set(len(weighted))}
        trained = sorted(set(rows) | biases)
        first = trained[0] if trained else n
        # Only which layers train rows matters to the step (their weights are joined), not how many.
        kept, peak = _step_chain(tuple(specs), B, f, first=first, joined=frozenset(k for k, c in rows.items() if c))
        objects = OBJECTS_FORWARD * n + OBJECTS_BACKWARD * len(trained)  # the pruned backward: trained layers
    else:  # skip-lora, skip2-lora
        taps = backbone.tap_widths
        L, D = len(taps), sum(taps)
        p = L * rank * D + out * L * rank + (out if train_last_bias else 0)  # A stored as one masked block
        copies = sum(f * (s.n_params - s.out_channels) for s in specs if s.kind == "dense")
        kept, peak = _step_skip(tuple(specs), B, f, row=D + out, adapters=L * rank, cached=method == "skip2-lora")
        extra = L * rank * D * f  # the float mask of A's blocks
        objects = OBJECTS_SKIP * n
        if method == "skip2-lora":
            cache_bytes = N * (D + out) * f + N
    return MemoryPlan(method=method, backbone="float32" if f == 4 else "float64", batch_size=B, n_samples=N,
                      optimizer=optimizer, n_trainable=int(p), scheme=sch_text,
                      cache="float32" if method == "skip2-lora" else None,
                      frozen_weights=int(frozen), weights_in_flash=weights_in_flash,
                      weight_copies=0 if weights_in_flash else int(copies),
                      trainable=int(p * f), gradients=int(p * f),
                      optimizer_state=OPTIMIZER_COPIES[optimizer] * p * f, snapshot=p * f,
                      activations=int(kept), cache_bytes=int(cache_bytes),
                      working=int(peak - kept + extra + objects))


def _loss(live: _Live, B: int, out: int, f: int) -> None:
    """softmax_cross_entropy beside the logits: the shifted logits and their exponentials; the
    latter become the gradient."""
    live.alloc(2 * B * out * f)
    live.free(B * out * f)


@functools.lru_cache(maxsize=4096)
def _step_chain(specs: tuple, B: int, f: int, *, first: int, lora: tuple = (), weight: frozenset = frozenset(),
                joined: frozenset | None = None) -> tuple[int, int]:
    """(bytes kept for backward, peak) of one step of a method that trains beside the layers:
    the layer-wise methods (``lora``: (layer, (A, B)) adapters, trained ``weight`` layers) or
    the sparse update (``joined``: the layers whose forward and backward read the trained rows
    and the frozen ones joined into one new array; ``weight`` unused). The previous step's kept
    inputs stay held until this step's forward replaces them, layer by layer. Cached: a search
    plans thousands of sparse schemes that differ only in counts."""
    lora = dict(lora)
    joined = joined or frozenset()
    n = len(specs)
    sources = {s.source for s in specs if s.kind == "add"}
    kept_h = {k: B * specs[k].in_features * f for k in range(first, n)}
    kept_u = {k: B * a.out_features * f for k, (a, _) in lora.items()}
    kept = sum(kept_h.values()) + sum(kept_u.values())
    live = _Live(kept)
    live.alloc(2 * B * 8)  # the batch's ids
    h = B * specs[0].in_features * f
    live.alloc(h)  # the batch
    held_sources = held_d = 0
    for k, spec in enumerate(specs):
        held = False
        if k >= first:  # replaces the previous step's input of layer k
            live.free(kept_h[k])
            held = True
        if k in sources:
            held = True
            if k < first:
                held_sources += h
        w = spec.n_params * f if k in joined else 0  # the joined weight, alive during the call
        live.alloc(w)
        live.call(call_bytes(spec, "forward", B, f))
        live.free(w)
        z = B * spec.out_features * f
        live.call(call_bytes(spec, "add_bias", B, f))
        if k in lora:
            a, b = lora[k]
            live.call(call_bytes(a, "forward", B, f))
            live.free(kept_u[k])
            live.call(call_bytes(b, "forward", B, f))
            live.free(held_d)  # the adapter's previous output, held by its name until now
            held_d = B * b.out_features * f
        live.call(CallBytes(activation_bytes(spec.activation, B * spec.out_features, f).peak))
        if not held:
            live.free(h)
        h = z
    live.free(held_sources + held_d)
    _loss(live, B, specs[-1].out_features, f)
    # Gradients as handles ([bytes]): one is released when neither the loop, the caller (the
    # first) nor a pending residual holds it.
    g = caller = [B * specs[-1].out_features * f]
    pending: dict[int, list[int]] = {}

    def release(arr: list[int]) -> None:
        if arr is not caller and all(arr is not v for v in pending.values()):
            live.free(arr[0])

    for k in range(n - 1, first - 1, -1):
        spec = specs[k]
        w = spec.n_params * f if k in joined else 0
        if k in joined:  # a new array, its trained rows copied into the gradient
            live.call(CallBytes(call_bytes(spec, "weight_grad", B, f).peak))
        elif k in weight and spec.kind != "dense":  # a dense gradient is written in place
            live.call(CallBytes(call_bytes(spec, "weight_grad", B, f).peak))
        gu = 0
        if k in lora:
            a, b = lora[k]
            if b.kind != "dense":
                live.call(CallBytes(call_bytes(b, "weight_grad", B, f).peak))
            ig = call_bytes(b, "input_grad", B, f)
            live.call(ig)
            gu = ig.out
            if a.kind != "dense":
                live.call(CallBytes(call_bytes(a, "weight_grad", B, f).peak))
        if spec.kind == "add" and spec.source >= first:
            if spec.source in pending:  # pending + g: a new sum replaces the held gradient
                old = pending[spec.source]
                pending[spec.source] = [B * spec.in_features * f]
                live.alloc(pending[spec.source][0])
                release(old)
            else:
                pending[spec.source] = g
        if k > first:
            live.alloc(w)
            ig = call_bytes(spec, "input_grad", B, f)
            live.call(ig)
            live.free(w)
            dh = [ig.out]
            if spec.kind in ("flatten", "add"):  # the gradient itself comes back: copied
                dh = [B * spec.in_features * f]
                live.alloc(dh[0])
            if gu:
                live.call(CallBytes(call_bytes(lora[k][0], "input_grad", B, f).peak))
            if k in pending:  # dh + the residual's gradient: a new array
                summed = [dh[0]]
                live.alloc(summed[0])
                live.free(dh[0])
                dh = summed
                release(pending.pop(k))
            live.call(CallBytes(activation_bytes(specs[k - 1].activation, B * spec.in_features, f).out))
            old, g = g, dh
            release(old)
        live.free(gu)
    new_kept = sum(kept_h.values()) + sum(kept_u.values())
    return new_kept, live.peak


@functools.lru_cache(maxsize=256)
def _step_skip(specs: tuple, B: int, f: int, *, row: int, adapters: int, cached: bool) -> tuple[int, int]:
    """(bytes kept for backward, peak) of one skip-lora step: the taps' rows computed by the
    backbone's forward pass (skip2-lora: every sample missed, the cache's output rows beside),
    then the adapters. The previous step's rows and adapter products stay held until this
    step's head replaces them."""
    kept = B * row * f + B * adapters * f
    live = _Live(kept)
    live.alloc(2 * B * 8)
    if cached:
        live.alloc(B * row * f + 2 * B + B * 8)  # the output rows, hit and miss masks, the missing ids
    live.alloc(B * specs[0].in_features * f)     # the batch
    live.alloc(B * row * f)                      # the rows the forward pass fills
    sources = {s.source for s in specs if s.kind == "add"}
    h = B * specs[0].in_features * f
    first = True
    held_sources = 0
    for k, spec in enumerate(specs):
        held = first or k in sources  # the batch is held by the caller
        if k in sources and not first:
            held_sources += h
        live.call(call_bytes(spec, "forward", B, f))
        live.call(call_bytes(spec, "add_bias", B, f))
        live.call(CallBytes(activation_bytes(spec.activation, B * spec.out_features, f).peak))
        if not held:
            live.free(h)
        h, first = B * spec.out_features * f, False
    live.free(held_sources + h + B * specs[0].in_features * f)  # logits copied into the rows; the batch
    if cached:
        live.free(B * row * f)  # the computed rows, copied into the output rows
    live.alloc(B * adapters * f + B * specs[-1].out_features * f)  # u, logits
    live.free(kept)  # the previous step's rows and products
    out = specs[-1].out_features
    _loss(live, B, out, f)
    live.alloc(B * adapters * f)  # gu
    return kept, live.peak


def _core_lib(what: str) -> Any:
    """The compiled engine's library, which alone knows its memory layout; a clear error without it."""
    from .core import load, unavailable_reason

    lib = load()
    if lib is None:
        raise UsageError(f"{what} is computed by the compiled engine, which is not available here: "
                         f"{unavailable_reason()}")
    return lib


def core_workspace_bytes(sizes: Sequence[int], kind: str, *, batch: int, n_params: int, rank: int = 1,
                         int8: bool = False, first: int = 0, pack: int = 0, pointer_bytes: int = 8) -> int:
    """The compiled engine's workspace for a dense backbone of ``sizes``, as C computes it
    (``et_workspace_size_for`` in et_train.c, asked through the binding: nothing is re-derived here).

    ``kind`` is "layerwise", "skip" or "sparse"; ``pack`` the largest (in x out) weight that
    the layer-wise backward pass transposes into the workspace (a trained weight after the
    first trained layer; 0: none); ``pointer_bytes`` 4 on a 32-bit target. Needs the
    compiled engine (UsageError naming the reason without it). A struct of sizes names no
    trained tensor, so this is the two-phase workspace: the fused update's gradient scratch
    (the largest trained tensor, et_fused_update) is in ``core_workspace_for``'s figure only.
    """
    import ctypes

    from .core import Method as CMethod
    from .core.engine import KINDS, dense_backbone

    lib = _core_lib("the compiled engine's workspace")
    if kind not in KINDS:
        raise UsageError(f"unknown method kind {kind!r}: use one of {', '.join(KINDS)}")
    bb = dense_backbone([int(v) for v in sizes], "relu")
    for name, v, lo, hi in (("batch", batch, 1, 2 ** 31 - 1), ("rank", rank, 1, 2 ** 31 - 1),
                            ("first", first, 0, len(sizes) - 2), ("n_params", n_params, 0, 2 ** 62),
                            ("pack", pack, 0, 2 ** 62), ("pointer_bytes", pointer_bytes, 4, 8)):
        if not isinstance(v, (int, np.integer)) or not lo <= v <= hi:  # ctypes would wrap an int32 silently
            raise UsageError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
    bb.is_int8 = int(bool(int8))
    n = bb.n_layers
    # Weights are not needed for a size; C reads only whether a layer's W (out, in) is given.
    given = (ctypes.c_float * 1)()
    for k in range(n):
        bb.layers[k].w = given
    if pack:
        need = [k for k in range(first + 1, n) if int(sizes[k]) * int(sizes[k + 1]) == pack]
        if not need:
            raise UsageError(f"pack {pack}: no layer after the first trained one ({first}) has in x out = {pack}")
        bb.layers[need[0]].w = None
    m = CMethod()
    m.kind, m.rank, m.first, m.n_params = KINDS[kind], int(rank), int(first), int(n_params)
    for k in range(len(m.off_weight)):
        m.off_weight[k] = m.off_bias[k] = m.off_lora_a[k] = m.off_lora_b[k] = -1
    m.off_bias_delta = m.off_skip_a = m.off_skip_b = -1
    nbytes = lib.et_workspace_size_for(ctypes.byref(bb), ctypes.byref(m), None, int(batch), int(pointer_bytes))
    if nbytes == 0:
        raise UsageError(f"the compiled engine refuses a {kind} workspace for sizes {list(sizes)} at batch {batch}")
    return int(nbytes)


def core_workspace_for(method: Any, batch: int, pointer_bytes: int | None = None) -> int:
    """The workspace the trainer allocates for a method instance: C's figure for its structs."""
    from .core.engine import CoreModel

    _core_lib("the compiled engine's workspace")
    return CoreModel(method, batch).workspace_bytes(pointer_bytes=pointer_bytes)


def core_workspace_pieces(method: Any, batch: int, pointer_bytes: int | None = None) -> dict[str, int]:
    """The compiled engine's workspace for a method instance piece by piece, as C carves it
    (``et_workspace_pieces``): bytes per field of its layout, the per-layer ones summed ("act[k]":
    every layer's kept input), 64-byte rounded; their sum + 64 is ``core_workspace_for``'s figure."""
    import ctypes

    from .core.engine import CoreModel

    lib = _core_lib("the compiled engine's workspace")
    core = CoreModel(method, batch)
    pb = int(pointer_bytes) if pointer_bytes is not None else ctypes.sizeof(ctypes.c_void_p)
    args = (ctypes.byref(core.bb), ctypes.byref(core.m), int(batch), pb)
    count = lib.et_workspace_pieces(*args, None, None, 0)
    if count < 0:
        raise UsageError(f"the compiled engine refuses the workspace of {method.name} at batch {batch}")
    names, sizes = (ctypes.c_char_p * max(count, 1))(), (ctypes.c_size_t * max(count, 1))()
    lib.et_workspace_pieces(*args, names, sizes, count)
    out: dict[str, int] = {}
    for name, size in zip(names[:count], sizes[:count]):
        out[name.decode()] = out.get(name.decode(), 0) + int(size)
    return out


def _ufunc_buffers(n: int, operands: int, itemsize: int = 4) -> int:
    """NumPy's buffers for an element-wise operation on strided or broadcast 2-D operands: one
    buffer of up to 8192 elements per operand (numpy's default ``bufsize``)."""
    return operands * min(n, 8192) * itemsize


def _tile(width: int, rows: int) -> int:
    """Bytes of one widened (float32) weight tile of a layer with ``rows`` outputs of ``width`` inputs."""
    from .quant.int8 import TILE_BYTES

    return min(rows, max(1, TILE_BYTES // (width * 4))) * width * 4


def _int8_layer_work(s: list[int], k: int, B: int) -> int:
    """Peak of one int8 layer beside its int8 input: the multiply (input widened to float, a weight
    tile and its product, the int32 accumulator), then the fixed-point requantisation (int64)."""
    from .quant.int8 import TILE_BYTES

    t = max(1, TILE_BYTES // (s[k] * 4))
    mul = B * s[k] * 4 + _tile(s[k], s[k + 1]) + B * min(t, s[k + 1]) * 4 + B * s[k + 1] * 4
    req = B * s[k + 1] * 4 + 2 * B * s[k + 1] * 8 + B * s[k + 1]
    return B * s[k] + max(mul, req)


# ---------------------------------------------------------------------------- measurement
def measure_memory(backbone: Backbone, method: str, x: np.ndarray, y: np.ndarray, *, batch_size: int = 20,
                   optimizer: str = "sgd", rank: int = 1, train_last_bias: bool = False,
                   scheme: str | None = None, cache: str = "float32", steps: int = 2,
                   x_calib: np.ndarray | None = None, warm_up: bool = True) -> dict[str, int]:
    """Run ``steps`` training steps on prepared ``x`` under tracemalloc (after one untraced step of
    another instance when ``warm_up``).

    Returns ``held`` (bytes allocated by method, optimizer, cache and snapshot after
    ``begin_fit``, plus the caller's backbone when the method does not copy it), ``peak``
    (the same, at the peak of the steps) and ``arrays`` (sum of nbytes of the arrays held
    after the steps, by component).
    """
    from .methods import make_method
    from .methods.sparse import SparseOptions, SparseUpdate
    from .nn.losses import softmax_cross_entropy
    from .optim import make_optimizer

    from .cache import backbone_key
    # Modules the methods import on first use: imported here, outside the traced region, so the
    # figure is the step's memory and not the first import's (which made it depend on what ran before).
    from .quant import cache as _qcache, int8 as _qint8  # noqa: F401

    def build() -> tuple[Any, Any]:
        if method == "sparse":
            m = SparseUpdate(backbone, SparseOptions(scheme=scheme or "b2,w-1", train_last_bias=train_last_bias),
                             rng=np.random.default_rng(0))
        else:
            m = make_method(method, backbone, rank=rank, train_last_bias=train_last_bias)
        if cache == "int8" and method == "skip2-lora":
            from .quant.cache import attach_int8_cache

            attach_int8_cache(m, len(x), x_calib=x_calib)
        return m, make_optimizer(optimizer, m.params, 0.01)

    def run(m: Any, opt: Any, count: int) -> None:
        for i in range(count):
            ids = np.arange(i * batch_size, (i + 1) * batch_size) % len(x)
            logits = m.forward(x, ids)
            _, g = softmax_cross_entropy(logits, y[ids])
            m.backward(g)
            opt.step()
            del logits, g

    was_tracing = tracemalloc.is_tracing()
    if warm_up and not was_tracing:
        # One untraced step of a throwaway instance first: what the first call in a process makes
        # and keeps (NumPy's and the interpreter's lazily built tables, first imports) is then not
        # counted as the step's memory, so the figure does not depend on what ran before it.
        m, opt = build()
        m.begin_fit(x)
        run(m, opt, 1)
        m.end_fit()
        del m, opt
    backbone_key(backbone).clear()  # measure a first fit: the transposed copies it keeps are made inside
    if not was_tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        m, opt = build()
        m.begin_fit(x)
        snapshot = m.params.flat.copy()
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        run(m, opt, steps)
        peak = tracemalloc.get_traced_memory()[1] - base
        external = 0 if m.trains_backbone else backbone_bytes(backbone)
        cache_obj = getattr(m, "cache", None)
        arrays = {"frozen_weights": backbone_bytes(m.backbone) - (m.params.nbytes if m.trains_backbone else 0),
                  "weight_copies": getattr(m, "transposed_bytes", 0),
                  "trainable": m.params.flat.nbytes, "gradients": m.params.grad.nbytes,
                  "optimizer": sum(a.nbytes for a in _optimizer_arrays(opt)), "snapshot": snapshot.nbytes,
                  "cache": cache_obj.nbytes if cache_obj is not None else 0}
        m.end_fit()
        return {"held": held + external, "peak": peak + external, "arrays": arrays}
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _optimizer_arrays(opt) -> list[np.ndarray]:
    return [v for v in vars(opt).values() if isinstance(v, np.ndarray) and v is not opt.p and v is not opt.g]


def backbone_bytes(bb: Backbone) -> int:
    """Bytes of every array a backbone holds (weights, biases, scales, normalisation)."""
    return bb.nbytes + sum(a.nbytes for a in (bb.input_mean, bb.input_std) if a is not None)


# ---------------------------------------------------------------------------- search
def sparse_schemes(n_layers: int) -> list[str]:
    """Every scheme: biases of the last k layers (k = 0..n) x, per layer, no weight or a ratio.
    A scheme counts the layers with weights (``len(backbone.tap_layers)``; for an MLP every
    layer), as the sparse method does: pooling, flatten and add layers have nothing to train."""
    from .methods.sparse import RATIOS

    out = []
    for k in range(n_layers + 1):
        for ratios in itertools.product((None, *RATIOS), repeat=n_layers):
            items = [f"b{k}"] if k else []
            items += [f"w{layer}" + ("" if r == 1 else f":{r}") for layer, r in enumerate(ratios) if r is not None]
            if items:
                out.append(",".join(items))
    return out


@dataclass
class Candidate:
    plan: MemoryPlan
    fits: bool
    accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def candidates(backbone: Backbone, *, budget: int, batch_size: int | Sequence[int] = 20, n_samples: int = 1,
               optimizer: str = "sgd", rank: int = 1, int8_available: bool = True,
               weights_in_flash: bool = False) -> list[Candidate]:
    """Every method (float and int8 backbone, float and int8 skip-cache) and every sparse scheme,
    with its plan and whether it fits ``budget``.

    ``batch_size`` may be a list: each candidate is then planned at the largest of those batch
    sizes at which it fits (or at the smallest, when it fits at none).
    """
    from .methods import METHODS

    sizes = sorted({int(b) for b in ([batch_size] if isinstance(batch_size, (int, np.integer)) else batch_size)},
                   reverse=True)
    if not sizes or sizes[-1] < 1:
        raise UsageError(f"batch sizes must be >= 1, got {batch_size!r}")

    def best(method: str, **kw) -> Candidate:
        for b in sizes:
            p = plan_memory(backbone, method, batch_size=b, n_samples=n_samples, optimizer=optimizer,
                            weights_in_flash=weights_in_flash, **kw)
            if p.total <= budget:
                return Candidate(p, True)
        return Candidate(p, False)

    is_q = backbone.is_int8
    mlp = all(spec.kind == "dense" for spec in backbone.specs)
    if is_q and not mlp:
        raise UsageError("the memory planner models int8 backbones of dense layers only in this version; plan the "
                         "float version of this convolutional backbone")
    # int8 backbones and the int8 skip-cache are planned for MLPs only in this version.
    variants = [True] if is_q else ([False, True] if int8_available and mlp else [False])
    out = []
    for int8 in variants:
        for name in METHODS:
            if name == "sparse" or (int8 and name in FLOAT_ONLY):
                continue
            caches = ("float32", "int8") if name == "skip2-lora" and mlp else ("float32",)
            for c in caches:
                out.append(best(name, rank=rank, int8=int8, cache=c))
        for sch in sparse_schemes(len(backbone.tap_layers)):
            out.append(best("sparse", scheme=sch, int8=int8))
    return out


def make_planned_method(backbone: Backbone, plan: MemoryPlan, *, x_calib: np.ndarray | None = None,
                        n_samples: int | None = None, rank: int = 1, seed: int = 0):
    """The method a plan describes, on ``backbone`` (already float or int8 as planned)."""
    from .methods import make_method
    from .methods.sparse import SparseOptions, SparseUpdate

    if plan.method == "sparse":
        return SparseUpdate(backbone, SparseOptions(scheme=plan.scheme or "b2,w-1"), rng=np.random.default_rng(seed))
    m = make_method(plan.method, backbone, rank=rank, seed=seed)
    if plan.cache == "int8":
        from .quant.cache import attach_int8_cache

        attach_int8_cache(m, n_samples or plan.n_samples, x_calib=x_calib)
    return m


def evaluate_candidate(backbone: Backbone, plan: MemoryPlan, task, *, epochs: int = 20, lr: float = 0.01,
                       seed: int = 0) -> float:
    """Test accuracy of ``plan``'s method after a short fine-tune on ``task``."""
    from .train import TrainConfig, evaluate, fit

    m = make_planned_method(backbone, plan, x_calib=task.x_pretrain, n_samples=len(task.y_finetune), seed=seed)
    fit(m, backbone.prepare(task.x_finetune), task.y_finetune,
        TrainConfig(epochs=epochs, batch_size=plan.batch_size, lr=lr, optimizer=plan.optimizer, seed=seed))
    return evaluate(m, backbone.prepare(task.x_test), task.y_test)[1]


def available_memory() -> int | None:
    """Bytes of memory this machine can still give a process (Linux: MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_machine(sizes: Sequence[int], method: str = "ft-all", *, batch_size: int = 20,
                       n_samples: int = 1, optimizer: str = "sgd", rank: int = 1, what: str = "training") -> None:
    """Refuse, before anything is allocated, a run whose planned memory exceeds what this machine has."""
    from types import SimpleNamespace

    from .nn.layers import chain_specs

    widths = [int(v) for v in sizes]
    shape_only = SimpleNamespace(sizes=widths, input_mean=None, dtype=np.float32, is_int8=False,
                                 specs=chain_specs(widths, "relu"))
    plan = plan_memory(shape_only, method, batch_size=batch_size, n_samples=n_samples, optimizer=optimizer,
                       rank=rank)  # type: ignore[arg-type]
    have = available_memory()
    if have is not None and plan.total > have:
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in plan.breakdown().items() if v)
        raise BudgetError(f"{what} a {'-'.join(map(str, sizes))} model with {method} needs about "
                          f"{format_bytes(plan.total)} of memory ({parts}); this machine has "
                          f"{format_bytes(have)} available. Use smaller layers.")


def exact_bytes(n: int) -> str:
    """A size with its exact byte count where rounding could hide a difference ("256.0 KB
    (262,145 bytes)"): budgets are compared to the byte."""
    n = int(n)
    return format_bytes(n) if abs(n) < 1024 else f"{format_bytes(n)} ({n:,} bytes)"


def check_budget(plan: MemoryPlan, budget: int) -> None:
    """Raise BudgetError, with the numbers, unless ``plan`` fits ``budget`` bytes."""
    if plan.total > budget:
        raise BudgetError(plan.explain(budget) + f": over by {exact_bytes(plan.total - budget)}")



# ---------------------------------------------------------------------------- device (export)
@dataclass
class DevicePlan:
    """RAM of an exported device program (edgetune export): the compiled engine's arena, the
    program's static data and its stack. The frozen weights are ``const`` data (flash on a
    microcontroller) and are reported apart, in ``flash_weights``."""
    method: str
    backbone: str               # "float32" or "int8"
    batch_size: int
    max_samples: int
    optimizer: str
    n_params: int
    cache: str | None           # "float32", "int8" or None
    cache_capacity: int
    params: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    cache_bytes: int = 0
    samples: int = 0            # the arena's sample store (inputs and labels)
    order: int = 0              # the device's own shuffle
    workspace: int = 0          # et_workspace_size(), the engine's scratch (with its parameter snapshot)
    gradient_scratch: int = 0   # of the workspace: the fused update's gradient of one tensor at a time (the
                                # largest, et_fused_scratch_bytes); 0: the two-phase step's `gradients` instead
    alignment: int = 0          # 64-byte rounding of the arena's pieces
    statics: int = 0            # the program's other static data (device struct, libc, startup)
    stack: int = 0
    flash_weights: int = 0
    scheme: str | None = None   # the sparse method's update scheme (None for other methods)

    def breakdown(self) -> dict[str, int]:
        return {"params": self.params, "gradients": self.gradients, "optimizer": self.optimizer_state,
                "cache": self.cache_bytes, "samples": self.samples, "order": self.order,
                "workspace": self.workspace, "alignment": self.alignment, "statics": self.statics,
                "stack": self.stack}

    @property
    def arena(self) -> int:
        """Bytes of the one static arena (et_device_arena_bytes)."""
        return sum(self.breakdown().values()) - self.statics - self.stack

    @property
    def total(self) -> int:
        return sum(self.breakdown().values())

    @property
    def label(self) -> str:
        cache = f" +{self.cache} cache ({self.cache_capacity} of {self.max_samples} rows)" if self.cache else ""
        scheme = f"[{self.scheme}]" if self.scheme is not None else ""
        return f"{self.method}{scheme} ({self.backbone}{cache})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label, "arena": self.arena, "total": self.total}

    def explain(self, budget: int | None = None) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown().items() if v)
        total = format_bytes(self.total) if budget is None else exact_bytes(self.total)
        text = f"{self.label} at batch {self.batch_size} needs {total} of RAM ({parts})"
        if budget is not None:
            text += f"; the budget is {exact_bytes(budget)}"
        return text


def device_model_desc(core: Any, *, optimizer: str, cache: str | None, cache_capacity: int, max_samples: int,
                      store_samples: bool) -> Any:
    """The et_model_desc (et_device.h) of a ``CoreModel``'s structs, as the export writes it; it
    points into ``core``, which must outlive it."""
    import ctypes

    from .core import ModelDesc, enum
    from .core.engine import CACHE_KINDS

    desc = ModelDesc()
    desc.backbone = ctypes.pointer(core.bb)
    desc.method = ctypes.pointer(core.m)
    desc.initial_params = core.params.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    desc.optimizer = enum("optimizer")[optimizer]
    desc.batch = core.batch
    desc.cache_kind = CACHE_KINDS[{None: "none", "float32": "float", "int8": "int8"}[cache]]
    desc.cache_capacity = int(cache_capacity)
    desc.max_samples = int(max_samples)
    desc.store_samples = int(bool(store_samples))
    return desc


def plan_device_memory(method: Any, *, batch_size: int, max_samples: int, optimizer: str = "sgd",
                       cache: str | None = None, cache_capacity: int | None = None, store_samples: bool = True,
                       pointer_bytes: int = 4, statics: int = 0, stack: int = 0) -> DevicePlan:
    """RAM of the exported program for ``method`` (an instance: its parameters and backbone).

    The arena is what ``et_device_arena_breakdown`` (edgetune/core/et_device.c) reports for
    the very structs the export writes, at ``pointer_bytes``: parameters, gradients, optimizer
    state, the skip-cache (``cache_capacity`` rows and a fill flag per sample), the sample
    store (when ``store_samples``), the shuffle order, the engine's workspace and the 64-byte
    rounding of the pieces; ``statics`` and ``stack`` are added as the caller measured them.
    The layer-wise methods and the sparse update run the fused update on the device (each
    tensor stepped as soon as its gradient is ready): no gradients piece, and the workspace
    holds ``gradient_scratch``, the largest trained tensor's gradient; the skip adapters keep
    the gradient vector.
    Needs the compiled engine (UsageError naming the reason without it).
    """
    import ctypes

    from .core import DEVICE_PIECES
    from .core.engine import CoreModel

    if optimizer not in OPTIMIZER_COPIES:
        raise UsageError(f"unknown optimizer '{optimizer}': use one of {', '.join(OPTIMIZER_COPIES)}")
    if batch_size < 1 or max_samples < 1:
        raise UsageError("batch_size and max_samples must be >= 1")
    if cache not in (None, "float32", "int8"):
        raise UsageError(f"cache must be None, 'float32' or 'int8', got {cache!r}")
    N = int(max_samples)
    C = N if cache_capacity is None else int(cache_capacity)
    if cache is None:
        C = 0
    if not 0 <= C <= N:
        raise UsageError(f"cache_capacity {C} is outside 0..{N}")
    if N > 2 ** 31 - 1:
        raise UsageError(f"max_samples {N} is too large for the compiled engine")
    lib = _core_lib("the device arena")
    core = CoreModel(method, batch_size)
    desc = device_model_desc(core, optimizer=optimizer, cache=cache, cache_capacity=C, max_samples=N,
                             store_samples=store_samples)
    pieces = (ctypes.c_size_t * len(DEVICE_PIECES))()
    arena = lib.et_device_arena_breakdown(ctypes.byref(desc), int(pointer_bytes), pieces)
    if arena == 0:
        raise UsageError(f"the compiled engine refuses the device arena for {method.name} at batch {batch_size}")
    got = dict(zip(DEVICE_PIECES, (int(v) for v in pieces)))
    plan = DevicePlan(method=method.name, backbone="int8" if method.backbone.is_int8 else "float32",
                      batch_size=int(batch_size), max_samples=N, optimizer=optimizer,
                      n_params=int(method.params.flat.size), cache=cache, cache_capacity=C, params=got["params"],
                      gradients=got["gradients"], optimizer_state=got["optimizer"], cache_bytes=got["cache"],
                      samples=got["samples"], order=got["order"], workspace=got["workspace"],
                      gradient_scratch=int(lib.et_fused_scratch_bytes(ctypes.byref(core.bb), ctypes.byref(core.m))),
                      alignment=got["alignment"], statics=int(statics), stack=int(stack),
                      scheme=str(method.scheme) if method.takes_scheme else None)
    if plan.arena != arena:  # the pieces C reports add up to its total
        raise RuntimeError(f"the device arena's pieces add up to {plan.arena}, C's total is {arena}")
    return plan

__all__ = ["MemoryPlan", "plan_memory", "measure_memory", "sparse_schemes", "candidates", "check_budget",
           "backbone_bytes", "COMPONENTS", "DevicePlan", "plan_device_memory"]
