"""Architecture strings: a backbone written as one line, for ``edgetune pretrain --arch``.

Items are separated by commas; the input shape comes from the data and every other shape
follows. A final dense layer with one output per class is added after the last item.

    conv:C:K[:S[:P[:G]]]   convolution with C output channels, kernel K, stride S (1),
                           zero padding P (0; 'same' keeps the length at stride 1), groups G (1);
                           1-D or 2-D by the input (C, L) or (C, H, W); K, S, P may be '3x3'
    dwconv:K[:S[:P]]       depthwise convolution (one filter per channel)
    maxpool:K[:S]          max pooling (stride defaults to the kernel), also avgpool:K[:S]
    gap                    global average pooling to one value per channel
    flatten                a spatial input as one flat row
    dense:N                fully-connected layer with N outputs
    relu relu6 tanh sigmoid leaky_relu
                           the activation of the item before it
    res(ITEMS)             a residual block: ITEMS, then their input added to their output

Example, a 1-D CNN for raw inertial windows (6, 128):
    conv:32:5:1:same,relu,maxpool:2,conv:64:5:1:same,relu,maxpool:2,conv:64:3:1:same,relu,gap,dense:64,relu
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError
from .activations import ACTIVATIONS
from .layers import Layer, LayerSpec, check_chain

__all__ = ["build_layers", "parse_arch"]


def _split(text: str) -> list[str]:
    """Top-level comma-separated items (commas inside res(...) stay inside)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"architecture {text!r}: a ')' without its '('")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise UsageError(f"architecture {text!r}: a '(' is not closed")
    items.append(cur.strip())
    if any(not i for i in items):
        raise UsageError(f"architecture {text!r}: an empty item (two commas in a row?)")
    return items


def _dims(tok: str, rank: int, what: str, item: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in tok.lower().split("x"))
    except ValueError:
        raise UsageError(f"architecture item {item!r}: {what} must be a whole number (or AxB), got {tok!r}") from None
    if len(vals) == 1:
        vals = vals * rank
    if len(vals) != rank:
        raise UsageError(f"architecture item {item!r}: {what} {tok!r} has {len(vals)} values for a "
                         f"{rank}-D input")
    return vals


def parse_arch(text: str, input_shape: Sequence[int], n_classes: int) -> list[LayerSpec]:
    """The layer descriptions of architecture ``text`` on samples of ``input_shape``, ending
    with a dense layer of ``n_classes`` outputs."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("an architecture is a non-empty string such as 'conv:16:5,relu,gap,dense:32,relu'")
    specs: list[LayerSpec] = []
    shape = tuple(int(v) for v in input_shape)
    shape = _parse_items(_split(text.strip()), shape, specs)
    if len(shape) != 1:
        raise UsageError(f"architecture {text!r} ends with samples of shape {list(shape)}: end it with gap or "
                         f"flatten before the classifier")
    specs.append(LayerSpec.dense(shape[0], n_classes))
    check_chain(specs)
    return specs


def _set_activation(specs: list[LayerSpec], name: str, item: str) -> None:
    if not specs:
        raise UsageError(f"architecture item {item!r}: an activation needs a layer before it")
    last = specs[-1]
    if last.activation != "identity":
        raise UsageError(f"architecture item {item!r}: layer {len(specs) - 1} already has activation "
                         f"{last.activation!r}")
    specs[-1] = LayerSpec(last.kind, last.in_shape, last.out_channels, last.kernel, last.stride, last.padding,
                          last.groups, name, last.source)


def _parse_items(items: list[str], shape: tuple[int, ...], specs: list[LayerSpec]) -> tuple[int, ...]:
    for item in items:
        low = item.lower()
        if low in ACTIVATIONS:
            _set_activation(specs, low, item)
            continue
        if low.startswith("res(") and low.endswith(")"):
            first = len(specs)
            out = _parse_items(_split(item[4:-1]), shape, specs)
            if len(specs) == first:
                raise UsageError(f"architecture item {item!r}: an empty residual block")
            if out != shape:
                raise UsageError(f"architecture item {item!r}: a residual block must give back its input's "
                                 f"shape {list(shape)}, it gives {list(out)}")
            specs.append(LayerSpec.add(shape, first))
            continue
        name, *args = low.split(":")
        rank = len(shape) - 1
        try:
            if name in ("conv", "dwconv"):
                if rank < 1:
                    raise UsageError(f"architecture item {item!r}: a convolution needs an input (C, L) or "
                                     f"(C, H, W), here it gets {list(shape)}")
                if name == "conv":
                    if not 2 <= len(args) <= 5:
                        raise UsageError(f"architecture item {item!r}: write conv:C:K[:S[:P[:G]]]")
                    out_c, k = int(args[0]), _dims(args[1], rank, "the kernel", item)
                    rest = args[2:]
                    groups = int(rest[2]) if len(rest) > 2 else 1
                else:
                    if not 1 <= len(args) <= 3:
                        raise UsageError(f"architecture item {item!r}: write dwconv:K[:S[:P]]")
                    out_c, k, rest, groups = shape[0], _dims(args[0], rank, "the kernel", item), args[1:], shape[0]
                s = _dims(rest[0], rank, "the stride", item) if rest else (1,) * rank
                if len(rest) > 1 and rest[1] == "same":
                    if any(v != 1 for v in s) or any(v % 2 == 0 for v in k):
                        raise UsageError(f"architecture item {item!r}: 'same' padding needs stride 1 and an odd kernel")
                    p = tuple((v - 1) // 2 for v in k)
                else:
                    p = _dims(rest[1], rank, "the padding", item) if len(rest) > 1 else (0,) * rank
                spec = LayerSpec.conv(shape, out_c, k, stride=s, padding=p, groups=groups)
            elif name in ("maxpool", "avgpool"):
                if rank < 1 or not 1 <= len(args) <= 2:
                    raise UsageError(f"architecture item {item!r}: write {name}:K[:S] after a spatial layer")
                k = _dims(args[0], rank, "the kernel", item)
                spec = LayerSpec.pool(name[:3], shape, k, _dims(args[1], rank, "the stride", item) if len(args) > 1
                                      else None)
            elif name == "gap" and not args:
                spec = LayerSpec.gap(shape)
            elif name == "flatten" and not args:
                spec = LayerSpec.flatten(shape)
            elif name == "dense" and len(args) == 1:
                if len(shape) != 1:
                    raise UsageError(f"architecture item {item!r}: dense takes a flat input, here {list(shape)}: "
                                     f"put gap or flatten before it")
                spec = LayerSpec.dense(shape[0], int(args[0]))
            else:
                raise UsageError(f"architecture item {item!r} is not understood: use conv, dwconv, maxpool, "
                                 f"avgpool, gap, flatten, dense, res(...) or an activation "
                                 f"({', '.join(ACTIVATIONS)})")
        except UsageError:
            raise
        except ValueError:
            raise UsageError(f"architecture item {item!r}: its numbers must be whole numbers") from None
        specs.append(spec)
        shape = spec.out_shape
    return shape


def build_layers(specs: Sequence[LayerSpec], *, seed: int | np.random.Generator = 0,
                 dtype: type = np.float32) -> list[Layer]:
    """Freshly initialised layers, as PyTorch initialises Linear and Conv: weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = input channels per group x kernel size."""
    rng = np.random.default_rng(seed)
    layers = []
    for spec in specs:
        if not spec.has_params:
            layers.append(Layer(spec))
            continue
        fan_in = int(np.prod(spec.weight_shape[1:]))
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, spec.weight_shape).astype(dtype)
        b = rng.uniform(-bound, bound, spec.bias_shape).astype(dtype)
        layers.append(Layer(spec, w, b))
    return layers
