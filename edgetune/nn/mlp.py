"""The backbone: a chain of layers, each described by a ``LayerSpec`` (edgetune.nn.layers).

Weights use PyTorch's layout, a dense ``weight`` of shape (out, in), so ``z = h @ W.T + b``;
that keeps files and interop with ``nn.Linear`` a matter of names, not transposes. The
model also carries the input normalisation fitted on pre-training data and the label
names. A backbone's layers hold float tensors, or int8 ones (``is_int8``: quantised weights
and scales per layer, see edgetune.quant.int8); int8 is data on the same class, and code
asks ``is_int8`` rather than probing attributes.

``Backbone(weights, biases, activation=...)`` builds an MLP (dense layers, ``activation``
between them); ``Backbone.from_layers`` takes any chain of ``Layer``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, ModelFileError, UsageError
from .activations import Activation, get_activation
from .layers import Layer, LayerSpec, QuantParams, apply_layer, chain_specs, check_chain

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "edgetune-backbone"
#: 1: an MLP given by "sizes" and one "activation"; 2: a "layers" list of layer descriptions,
#: float or int8 tensors. Version 1 files (and the former "edgetune-int8-backbone") still load.
FORMAT_VERSION = 2
INT8_FORMAT_V1 = "edgetune-int8-backbone"
#: config.json's quantization.activations: symmetric (files without the field are) or asymmetric
#: (TFLite Micro's arithmetic, a zero point per layer input: tensors layers.K.input_zero_point).
INT8_SYMMETRIC = "int8 symmetric per tensor"
INT8_ASYMMETRIC = "int8 asymmetric per tensor, TFLite Micro arithmetic"
INT8_KERNELS = ("blas", "int32")


class Backbone:
    """A chain of layers (``layers``, each a ``LayerSpec`` and its tensors), frozen or not."""

    def __init__(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], *,
                 activation: str = "relu", labels: Sequence[str] | None = None,
                 input_mean: np.ndarray | None = None, input_std: np.ndarray | None = None):
        """An MLP: dense layers of ``weights`` (out, in) and ``biases`` (out,), ``activation``
        between consecutive layers and none after the last."""
        if len(weights) < 1 or len(weights) != len(biases):
            raise UsageError("a backbone needs one bias per weight and at least one layer")
        weights = [np.asarray(w) for w in weights]
        for k, w in enumerate(weights):
            if w.ndim != 2:
                raise UsageError(f"layer {k}: weight {w.shape} is not (out, in)")
        get_activation(activation)
        sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        if min(sizes) < 1:
            raise UsageError(f"layer widths must be >= 1, got {sizes}")
        for k in range(1, len(weights)):
            if weights[k].shape[1] != weights[k - 1].shape[0]:
                raise UsageError(f"layer {k} takes {weights[k].shape[1]} inputs but layer {k - 1} gives "
                                 f"{weights[k - 1].shape[0]}")
        specs = chain_specs(sizes, activation)
        layers = [Layer(spec, w, np.asarray(b)) for spec, w, b in zip(specs, weights, biases)]
        self._setup(layers, labels, input_mean, input_std, "blas", activation)

    @classmethod
    def from_layers(cls, layers: Sequence[Layer], *, labels: Sequence[str] | None = None,
                    input_mean: np.ndarray | None = None, input_std: np.ndarray | None = None,
                    int8_kernel: str = "blas", activation: str | None = None) -> "Backbone":
        """A backbone of any chain of layers, all float or all int8. ``activation`` names the
        activation between layers when the layers' own do not say it (a single layer)."""
        obj = cls.__new__(cls)
        obj._setup(list(layers), labels, input_mean, input_std, int8_kernel, activation)
        return obj

    def _setup(self, layers: list[Layer], labels, input_mean, input_std, int8_kernel: str,
               activation: str | None) -> None:
        if not layers or not all(isinstance(layer, Layer) for layer in layers):
            raise UsageError("a backbone needs at least one layer (edgetune.nn.layers.Layer)")
        check_chain([layer.spec for layer in layers])
        self.layers = layers
        if len(layers) > 1 or activation is None:
            activation = layers[0].spec.activation if len(layers) > 1 else "identity"
        self._activation = get_activation(activation)
        params = [layer for layer in layers if layer.spec.has_params]
        if not params:
            raise UsageError("a backbone needs at least one layer with weights (dense or conv)")
        int8 = [layer.is_int8 for layer in params]
        for k, layer in enumerate(layers):
            # an int8 backbone's layers without weights hold their input scale (quant)
            if not layer.spec.has_params and (layer.weight is not None or layer.bias is not None
                                              or (layer.quant is not None and not all(int8))):
                raise UsageError(f"layer {k} ({layer.spec.kind}) has no weights, but tensors were given")
        if any(int8) and not all(int8):
            raise UsageError("a backbone's layers must be all float or all int8")
        if int8_kernel not in INT8_KERNELS:
            raise UsageError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
        self.int8_kernel = int8_kernel
        if self.is_int8:
            from ..quant.int8 import check_int8_layers
            check_int8_layers(self.layers)
            dtype = np.dtype(np.float32)
        else:
            dtype = np.asarray(params[0].weight).dtype
            if dtype not in (np.float32, np.float64):
                raise UsageError(f"backbone weights must be float32 or float64, got {dtype}")
            for k, layer in enumerate(layers):
                if not layer.spec.has_params:
                    continue
                layer.weight, layer.bias = np.asarray(layer.weight), np.asarray(layer.bias)
                spec = layer.spec
                if layer.weight.shape != spec.weight_shape or layer.bias.shape != spec.bias_shape:
                    raise UsageError(f"layer {k}: weight {layer.weight.shape} and bias {layer.bias.shape} do not "
                                     f"fit {spec.weight_shape} / {spec.bias_shape}")
                if layer.weight.dtype != dtype or layer.bias.dtype != dtype:
                    raise UsageError(f"layer {k}: all tensors must share dtype {dtype}")
        self.labels = list(labels) if labels is not None else [str(i) for i in range(self.sizes[-1])]
        if len(self.labels) != self.sizes[-1]:
            raise UsageError(f"{len(self.labels)} label names for {self.sizes[-1]} outputs")
        self.input_mean = None if input_mean is None else np.asarray(input_mean, dtype)
        self.input_std = None if input_std is None else np.asarray(input_std, dtype)
        for name in ("input_mean", "input_std"):
            v = getattr(self, name)
            if v is not None and v.shape != self.norm_shape:
                raise UsageError(f"{name} has shape {v.shape}, expected {self.norm_shape}"
                                 + (" (one value per input channel)" if self.layers[0].spec.spatial else ""))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, sizes: Sequence[int], *, activation: str = "relu", seed: int | np.random.Generator = 0,
              dtype: type = np.float32, labels: Sequence[str] | None = None) -> "Backbone":
        """A freshly initialised MLP with layer widths ``sizes`` = [inputs, hidden..., outputs].

        Initialisation follows ``torch.nn.Linear``: U(-1/sqrt(in), 1/sqrt(in)).
        """
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise UsageError(f"sizes must list at least inputs and outputs, all >= 1; got {sizes}")
        rng = np.random.default_rng(seed)
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / np.sqrt(fan_in)
            weights.append(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(dtype))
            biases.append(rng.uniform(-bound, bound, fan_out).astype(dtype))
        return cls(weights, biases, activation=activation, labels=labels)

    def copy(self) -> "Backbone":
        """A deep copy (every tensor copied)."""
        if self.is_int8:
            return self.replace_int8()
        return self.astype(self.dtype)

    def astype(self, dtype: type) -> "Backbone":
        """A deep copy in another float dtype (float64 for gradient checks)."""
        if self.is_int8:
            raise UsageError("an int8 backbone cannot change dtype; use edgetune.quant.dequantize(backbone) "
                             "for a float model")
        conv = (lambda a: None if a is None else np.array(a, dtype=dtype))
        layers = [Layer(layer.spec, conv(layer.weight), conv(layer.bias)) for layer in self.layers]
        return Backbone.from_layers(layers, labels=self.labels, input_mean=conv(self.input_mean),
                                    input_std=conv(self.input_std), activation=self.activation.name)

    def replace_int8(self, qweights: dict[int, np.ndarray] | None = None,
                     qbiases: dict[int, np.ndarray] | None = None) -> "Backbone":
        """A copy of an int8 backbone, with some layers' int8 weights / int32 biases replaced
        (same scales)."""
        if not self.is_int8:
            raise UsageError("replace_int8 applies to int8 backbones")
        layers = []
        for k, layer in enumerate(self.layers):
            q = layer.quant
            layers.append(Layer(layer.spec, quant=QuantParams(
                np.array((qweights or {}).get(k, q.qweight), np.int8), q.wscale.copy(),
                np.array((qbiases or {}).get(k, q.qbias), np.int32), q.input_scale,
                zero_point=q.zero_point, asymmetric=q.asymmetric)))
        return Backbone.from_layers(layers, labels=self.labels, input_mean=self.input_mean,
                                    input_std=self.input_std, int8_kernel=self.int8_kernel,
                                    activation=self.activation.name)

    # ------------------------------------------------------------------ properties
    @property
    def specs(self) -> list[LayerSpec]:
        return [layer.spec for layer in self.layers]

    @property
    def is_int8(self) -> bool:
        """True when the layers hold int8 tensors (computed by the int8 kernels)."""
        return any(layer.is_int8 for layer in self.layers)

    @property
    def norm_shape(self) -> tuple[int, ...]:
        """The input normalisation's shape: one value per feature of a flat input, one per
        channel of a spatial one."""
        spec = self.layers[0].spec
        return (spec.in_shape[0],) if spec.spatial else (spec.in_features,)

    @property
    def tap_layers(self) -> list[int]:
        """The layers a skip adapter starts from: every layer with weights."""
        return [k for k, layer in enumerate(self.layers) if layer.spec.has_params]

    @property
    def tap_widths(self) -> list[int]:
        """Each skip adapter's input width (a spatial input pooled to one value per channel)."""
        return [self.layers[k].spec.tap_width for k in self.tap_layers]

    @property
    def sources(self) -> set[int]:
        """Layers whose input a later ``add`` layer reads."""
        return {layer.spec.source for layer in self.layers if layer.spec.kind == "add"}

    @property
    def weights(self) -> list[np.ndarray | None]:
        """Each layer's float weight (None for int8 layers); the arrays, not copies."""
        return [layer.weight for layer in self.layers]

    @property
    def biases(self) -> list[np.ndarray | None]:
        """Each layer's float bias (None for int8 layers); the arrays, not copies."""
        return [layer.bias for layer in self.layers]

    @property
    def dtype(self) -> np.dtype:
        """The dtype of what ``forward`` returns and of adapters trained on top."""
        if self.is_int8:
            return np.dtype(np.float32)
        return next(layer.weight.dtype for layer in self.layers if layer.weight is not None)

    @property
    def sizes(self) -> list[int]:
        """Flat widths: the first layer's input, then every layer's output."""
        return [self.layers[0].spec.in_features] + [layer.spec.out_features for layer in self.layers]

    @property
    def in_widths(self) -> list[int]:
        """Each layer's input width: the columns of the skip taps, layer by layer."""
        return [layer.spec.in_features for layer in self.layers]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape, channels first."""
        return self.layers[0].spec.in_shape

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def activation(self) -> Activation:
        """The activation between layers: the first layer's (a single layer keeps the one it
        was built with, so its identity and files do not change). Per-layer code reads
        ``layers[k].spec.act``."""
        return self.layers[0].spec.act if self.n_layers > 1 else self._activation

    @property
    def n_params(self) -> int:
        return sum(layer.spec.n_params for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the layers hold (int8: weights, biases, scales, requantisers)."""
        return sum(layer.nbytes for layer in self.layers)

    def __repr__(self) -> str:
        kind = "int8" if self.is_int8 else f"dtype={self.dtype}"
        return f"Backbone(sizes={self.sizes}, activation='{self.activation.name}', {kind})"

    # ------------------------------------------------------------------ input normalisation
    def fit_normalizer(self, x: np.ndarray) -> "Backbone":
        """Standardise inputs with the mean and std of ``x`` (pre-training data only)."""
        if self.is_int8:
            raise UsageError("the input normalisation of an int8 backbone is fixed at quantisation")
        # Two passes over blocks of rows in float64: the numbers of a float64 copy of x,
        # without holding one (and its deviations) whole. A spatial input is standardised
        # per channel: its rows are read as (samples, channels, positions).
        x = np.asarray(x)
        n, block = x.shape[0], 256
        c = self.norm_shape[0]
        rows = x.reshape(n, c, -1)
        count = n * rows.shape[2]
        mean = np.zeros(c)
        for lo in range(0, n, block):
            mean += rows[lo:lo + block].sum(axis=(0, 2), dtype=np.float64)
        mean /= count
        var = np.zeros(c)
        for lo in range(0, n, block):
            d = rows[lo:lo + block].astype(np.float64)
            d -= mean[:, None]
            var += np.einsum("ijk,ijk->j", d, d)
        std = np.sqrt(var / count)
        std[std < 1e-8] = 1.0  # a constant feature is left unscaled, never divided by ~0
        self.input_mean = mean.astype(self.dtype)
        self.input_std = std.astype(self.dtype)
        return self

    def prepare(self, x: np.ndarray, what: str = "x") -> np.ndarray:
        """Validate raw inputs and return them normalised, contiguous, in the backbone dtype, one
        flat row per sample. A spatial input may come as (samples, C, L) / (samples, C, H, W)
        or already flat."""
        x = np.asarray(x)
        shape, width = self.input_shape, self.sizes[0]
        if x.ndim >= 2 and x.shape[1:] == shape and len(shape) > 1:
            x = x.reshape(x.shape[0], width)
        if x.ndim != 2 or x.shape[1] != width:
            want = f"(samples, {width})" if len(shape) == 1 else \
                f"(samples, {', '.join(map(str, shape))}) or (samples, {width})"
            raise DataError(f"{what} must have shape {want}, got {x.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{what} is empty (0 samples)")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{what} must be real numbers, got dtype {x.dtype}")
        out = np.array(x, dtype=self.dtype, order="C", copy=True)
        if not np.all(np.isfinite(out)):
            bad = np.argwhere(~np.isfinite(out))[0]
            raise DataError(f"{what} contains NaN or inf (first at sample {bad[0]}, feature {bad[1]})")
        if len(shape) > 1:
            per_channel = out.reshape(out.shape[0], shape[0], -1)
            if self.input_mean is not None:
                per_channel -= self.input_mean[:, None]
            if self.input_std is not None:
                per_channel /= self.input_std[:, None]
            return out
        if self.input_mean is not None:
            out -= self.input_mean
        if self.input_std is not None:
            out /= self.input_std
        return out

    # ------------------------------------------------------------------ forward
    def transposed_weights(self, layers: Sequence[int] | None = None) -> list[np.ndarray | None] | None:
        """Contiguous (in, out) copies of the weights of ``layers`` (default all), None elsewhere;
        None for an int8 backbone (its integer kernels need no float copies).

        ``h @ W.T`` with W stored (out, in) makes BLAS multiply by a transposed operand,
        measured 2.5x slower than ``h @ Wt`` with a contiguous Wt at the paper's shapes
        (47 vs 19 us for 20x512 @ 512x96). A method that keeps layers frozen for a whole fit
        holds these copies for its forward pass; the backward pass wants W as stored.
        """
        if self.is_int8:
            return None
        wanted = range(self.n_layers) if layers is None else layers
        return [np.ascontiguousarray(layer.weight.T) if k in wanted and layer.spec.kind == "dense" else None
                for k, layer in enumerate(self.layers)]

    #: Rows per block when a backbone with spatial layers runs a large input (bounds the
    #: memory of the convolutions' window matrices).
    BLOCK_ROWS = 256

    def _blocks(self, n: int):
        if all(not layer.spec.spatial for layer in self.layers) or n <= self.BLOCK_ROWS:
            yield slice(0, n)
            return
        for lo in range(0, n, self.BLOCK_ROWS):
            yield slice(lo, min(n, lo + self.BLOCK_ROWS))

    def walk(self, x: np.ndarray, wts: Sequence[np.ndarray | None] | None = None, on_input=None) -> np.ndarray:
        """Run the float layers on prepared rows ``x``, calling ``on_input(k, h)`` with every layer's
        input; returns the logits. ``add`` layers read the input kept for their source."""
        sources = self.sources
        kept: dict[int, np.ndarray] = {}
        h = x
        for k, layer in enumerate(self.layers):
            if on_input is not None:
                on_input(k, h)
            if k in sources:
                kept[k] = h
            residual = kept[layer.spec.source] if layer.spec.kind == "add" else None
            h = apply_layer(layer, h, None if wts is None else wts[k], residual=residual)
        return h

    def forward(self, x: np.ndarray, wts: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """Logits for already-prepared inputs (``wts``: see ``transposed_weights``)."""
        if self.is_int8:
            from ..quant.int8 import int8_forward
            return int8_forward(self, x)
        blocks = list(self._blocks(x.shape[0]))
        if len(blocks) == 1:
            return self.walk(x, wts)
        out = np.empty((x.shape[0], self.sizes[-1]), self.dtype)
        for b in blocks:
            out[b] = self.walk(x[b], wts)
        return out

    def forward_taps(self, x: np.ndarray, out: np.ndarray | None = None,
                     wts: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """What every skip adapter reads and the final logits, side by side in one row per sample.

        Row layout: [t_1 | ... | t_n | z] with t_k the input of the k-th layer with weights
        (``tap_layers``), pooled to one value per channel where it is spatial, and z the
        logits; for an MLP [h_0 = x | h_1 | ... | h_{n-1} | z_n]. This is exactly what the
        skip adapters read, and what the skip-cache stores. An int8 backbone gives its int8
        inputs dequantised (``edgetune.quant.int8.int8_float_taps``; ``int8_forward_taps`` gives every
        layer's int8 input as int8).
        """
        if self.is_int8:
            from ..quant.int8 import int8_float_taps
            return int8_float_taps(self, x, out)
        widths = self.tap_widths
        d, n_out = sum(widths), self.sizes[-1]
        if out is None:
            out = np.empty((x.shape[0], d + n_out), dtype=self.dtype)
        if all(layer.spec.kind == "dense" for layer in self.layers):
            # an MLP: each layer writes its output straight into the next tap's columns
            sizes = self.sizes
            out[:, :sizes[0]] = x
            h = x
            col = sizes[0]
            for k, layer in enumerate(self.layers):
                dst = out[:, col:col + sizes[k + 1]]
                h = apply_layer(layer, h, None if wts is None else wts[k], out=dst)
                col += sizes[k + 1]
            return out
        cols = dict(zip(self.tap_layers, np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)))
        for b in self._blocks(x.shape[0]):
            rows = out[b]

            def tap(k: int, h: np.ndarray) -> None:
                if k in cols:
                    spec = self.layers[k].spec
                    dst = rows[:, cols[k]:cols[k] + spec.tap_width]
                    if spec.spatial:
                        np.mean(h.reshape(h.shape[0], spec.in_shape[0], -1), axis=2, out=dst)
                    else:
                        dst[...] = h

            rows[:, d:] = self.walk(x[b], wts, tap)
        return out

    # ------------------------------------------------------------------ identity
    def is_plain_mlp(self) -> bool:
        """Dense layers with one activation between them and none after: what format 1 described."""
        specs = self.specs
        return all(s.kind == "dense" for s in specs) and specs[-1].activation == "identity" and len(
            {s.activation for s in specs[:-1]}) <= 1

    def digest(self) -> str:
        """A hash of everything that determines the backbone's outputs.

        For an MLP it is the hash earlier versions computed (adapters record it), so adapters
        saved before layer descriptions existed still load onto their backbone.
        """
        hsh = hashlib.blake2b(digest_size=16)
        if self.is_plain_mlp():
            head: list[Any] = [self.sizes, self.activation.name]
        else:
            head = [[s.to_dict() for s in self.specs]]
        if self.is_int8:
            hsh.update(json.dumps([INT8_FORMAT_V1, *head]).encode())
            q = [layer.quant for layer in self.layers if layer.quant is not None]
            arrays = [*(p.qweight for p in q), *(p.wscale for p in q), *(p.qbias for p in q),
                      np.asarray([p.input_scale for p in q], np.float32), self.input_mean, self.input_std]
            if q[0].asymmetric:  # symmetric models keep the digest earlier versions computed
                arrays.append(np.asarray([p.zero_point for p in q], np.int32))
            for a in arrays:
                hsh.update(b"-" if a is None else memoryview(np.ascontiguousarray(a)).cast("B"))
            return hsh.hexdigest()
        hsh.update(json.dumps([*head, str(self.dtype)]).encode())
        params = [layer for layer in self.layers if layer.spec.has_params]
        for a in (*(p.weight for p in params), *(p.bias for p in params), self.input_mean, self.input_std):
            hsh.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
        return hsh.hexdigest()

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors as written in ``model.safetensors``."""
        t: dict[str, np.ndarray] = {}
        for k, layer in enumerate(self.layers):
            if layer.quant is not None:
                q = layer.quant
                if layer.spec.has_params:
                    t[f"layers.{k}.weight"] = q.qweight
                    t[f"layers.{k}.weight_scale"] = q.wscale
                    t[f"layers.{k}.bias"] = q.qbias
                t[f"layers.{k}.input_scale"] = np.asarray([q.input_scale], np.float32)
                if q.asymmetric:
                    t[f"layers.{k}.input_zero_point"] = np.asarray([q.zero_point], np.int32)
            elif layer.spec.has_params:
                t[f"layers.{k}.weight"] = layer.weight
                t[f"layers.{k}.bias"] = layer.bias
        if self.input_mean is not None:
            t["input.mean"] = self.input_mean
        if self.input_std is not None:
            t["input.std"] = self.input_std
        return t

    def config(self, blob: bytes) -> dict[str, Any]:
        """``config.json`` for the tensors ``blob``."""
        cfg: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "layers": [s.to_dict() for s in self.specs],
            "sizes": self.sizes, "activation": self.activation.name, "dtype": str(self.dtype),
            "labels": self.labels, "normalization": self.input_mean is not None,
        }
        if self.is_int8:
            asym = self.layers[0].quant.asymmetric
            cfg["quantization"] = {"weights": "int8 symmetric per output channel", "biases": "int32",
                                   "activations": INT8_ASYMMETRIC if asym else INT8_SYMMETRIC}
        cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        return cfg

    def save(self, path: str | os.PathLike) -> Path:
        """Save to a directory: ``model.safetensors`` (tensors) + ``config.json``.

        The two files are written as one set (``write_dir_atomic``): a crash leaves the old
        model or the new one. The config records the weights' SHA-256, so files mixed by
        hand are detected at load time.
        """
        from ..io_atomic import json_text, write_dir_atomic
        from ..safetensors import dumps

        blob = dumps(self.tensors(), {"format": FORMAT})
        return write_dir_atomic(path, {WEIGHTS_NAME: blob, CONFIG_NAME: json_text(self.config(blob)).encode()})

    @classmethod
    def load(cls, path: str | os.PathLike, *, int8_kernel: str = "blas") -> "Backbone":
        """A model directory: float or int8, format 2 or the format-1 files earlier versions wrote."""
        from ..io_atomic import (check_config_field, check_input_std, check_model_config, read_json_config,
                                 recover_dir)
        from ..safetensors import loads

        path = Path(path)
        if path.is_file() and path.name == CONFIG_NAME:
            path = path.parent
        path = recover_dir(path)
        if not path.is_dir():
            raise ModelFileError(f"model directory not found: {path}")
        cfg, cfg_path, w_path = read_json_config(path, CONFIG_NAME, WEIGHTS_NAME, "an edgetune model")
        fmt = cfg.get("format")
        if fmt not in (FORMAT, INT8_FORMAT_V1):
            raise ModelFileError(f"{cfg_path}: not an edgetune backbone config (format != '{FORMAT}')")
        version = cfg.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelFileError(f"{cfg_path}: field 'format_version' must be a whole number >= 1")
        if version > FORMAT_VERSION or (fmt == INT8_FORMAT_V1 and version > 1):
            raise ModelFileError(f"{cfg_path}: format version {version} is newer than this edgetune reads "
                                 f"({FORMAT_VERSION})")
        check_model_config(cfg, cfg_path)
        int8 = fmt == INT8_FORMAT_V1 or "quantization" in cfg
        asym = False
        if int8 and isinstance(cfg.get("quantization"), dict) and "activations" in cfg["quantization"]:
            mode = cfg["quantization"]["activations"]
            if mode not in (INT8_SYMMETRIC, INT8_ASYMMETRIC):
                raise ModelFileError(f"{cfg_path}: field 'quantization.activations' must be {INT8_SYMMETRIC!r} or "
                                     f"{INT8_ASYMMETRIC!r}, got {mode!r}")
            asym = mode == INT8_ASYMMETRIC
        if not int8:
            check_config_field(cfg, cfg_path, "dtype", lambda v: v in ("float32", "float64"), "float32 or float64")
        blob = w_path.read_bytes()
        want = cfg.get("weights_sha256")
        if want and hashlib.sha256(blob).hexdigest() != want:
            raise ModelFileError(f"{w_path} does not match {cfg_path.name} (checksum differs: "
                                 f"the files come from different saves, or one is damaged)")
        tensors, _ = loads(blob, str(w_path))
        sizes = [int(s) for s in cfg["sizes"]]
        activation = cfg.get("activation", "relu")
        try:
            if version >= 2:
                check_config_field(cfg, cfg_path, "layers", lambda v: isinstance(v, list) and len(v) >= 1,
                                   "a list of layer descriptions", required=True)
                specs = [LayerSpec.from_dict(d) for d in cfg["layers"]]
                check_chain(specs)
            else:
                specs = chain_specs(sizes, activation)
        except UsageError as e:
            raise ModelFileError(f"{cfg_path}: field 'layers': {e}") from None
        flat = [specs[0].in_features] + [s.out_features for s in specs]
        if flat != sizes:
            raise ModelFileError(f"{cfg_path}: field 'sizes' {sizes} does not match its layers ({flat})")
        dtype = np.dtype(np.float32) if int8 else np.dtype(cfg.get("dtype", "float32"))
        want_shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for k, spec in enumerate(specs):
            if not spec.has_params:
                if int8:  # an int8 layer without weights: its input scale
                    want_shapes[f"layers.{k}.input_scale"] = ((1,), np.dtype(np.float32))
                if asym:
                    want_shapes[f"layers.{k}.input_zero_point"] = ((1,), np.dtype(np.int32))
                continue
            if int8:
                want_shapes[f"layers.{k}.weight"] = (spec.weight_shape, np.dtype(np.int8))
                want_shapes[f"layers.{k}.weight_scale"] = (spec.bias_shape, np.dtype(np.float32))
                want_shapes[f"layers.{k}.bias"] = (spec.bias_shape, np.dtype(np.int32))
                want_shapes[f"layers.{k}.input_scale"] = ((1,), np.dtype(np.float32))
                if asym:
                    want_shapes[f"layers.{k}.input_zero_point"] = ((1,), np.dtype(np.int32))
            else:
                want_shapes[f"layers.{k}.weight"] = (spec.weight_shape, dtype)
                want_shapes[f"layers.{k}.bias"] = (spec.bias_shape, dtype)
        norm_dtype = np.dtype(np.float32) if int8 else dtype
        norm_shape = (specs[0].in_shape[0],) if specs[0].spatial else (sizes[0],)
        optional = {"input.mean": (norm_shape, norm_dtype), "input.std": (norm_shape, norm_dtype)}
        extra = set(tensors) - set(want_shapes) - set(optional)
        if extra:
            raise ModelFileError(f"{w_path}: unexpected tensors {sorted(extra)}")
        for name, (shape, dt) in {**want_shapes, **optional}.items():
            t = tensors.get(name)
            if t is None:
                if name in want_shapes:
                    raise ModelFileError(f"{w_path}: tensor '{name}' is missing")
                continue
            if t.shape != shape or t.dtype != dt:
                what = "config says" if not int8 else "expected"
                raise ModelFileError(f"{w_path}: tensor '{name}' is {t.dtype}{list(t.shape)}, "
                                     f"{what} {dt}{list(shape)}")
            if dt.kind == "f" and not np.all(np.isfinite(t)):
                raise ModelFileError(f"{w_path}: tensor '{name}' contains NaN or inf")
        check_input_std(tensors.get("input.std"), w_path)
        layers = []

        def zp(k: int) -> dict[str, Any]:
            return {"zero_point": int(tensors[f"layers.{k}.input_zero_point"][0]), "asymmetric": True} if asym else {}

        for k, spec in enumerate(specs):
            if not spec.has_params:
                layers.append(Layer(spec, quant=QuantParams(
                    np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros(0, np.int32),
                    float(tensors[f"layers.{k}.input_scale"][0]), **zp(k))) if int8 else Layer(spec))
            elif int8:
                layers.append(Layer(spec, quant=QuantParams(
                    tensors[f"layers.{k}.weight"], tensors[f"layers.{k}.weight_scale"], tensors[f"layers.{k}.bias"],
                    float(tensors[f"layers.{k}.input_scale"][0]), **zp(k))))
            else:
                layers.append(Layer(spec, tensors[f"layers.{k}.weight"], tensors[f"layers.{k}.bias"]))
        try:
            return cls.from_layers(layers, labels=cfg.get("labels"), input_mean=tensors.get("input.mean"),
                                   input_std=tensors.get("input.std"), int8_kernel=int8_kernel,
                                   activation=activation)
        except UsageError as e:
            raise ModelFileError(f"{cfg_path}: {e}") from None
