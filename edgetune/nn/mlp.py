"""The backbone: a multi-layer perceptron of n fully-connected layers.

Weights use PyTorch's layout, ``weight`` of shape (out, in), so ``z = h @ W.T + b``; that
keeps files and interop with ``nn.Linear`` a matter of names, not transposes. The model
also carries the input normalisation fitted on pre-training data and the label names.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, ModelFileError, UsageError
from .activations import get_activation

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "edgetune-backbone"
FORMAT_VERSION = 1


class Backbone:
    """A frozen-or-not MLP: ``layers`` of (weight (out, in), bias (out,)), ReLU between them."""

    def __init__(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], *,
                 activation: str = "relu", labels: Sequence[str] | None = None,
                 input_mean: np.ndarray | None = None, input_std: np.ndarray | None = None):
        if len(weights) < 1 or len(weights) != len(biases):
            raise UsageError("a backbone needs one bias per weight and at least one layer")
        self.weights = [np.asarray(w) for w in weights]
        self.biases = [np.asarray(b) for b in biases]
        dtype = self.weights[0].dtype
        if dtype not in (np.float32, np.float64):
            raise UsageError(f"backbone weights must be float32 or float64, got {dtype}")
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise UsageError(f"layer {k}: weight {w.shape} and bias {b.shape} do not fit (out, in) / (out,)")
            if k and w.shape[1] != self.weights[k - 1].shape[0]:
                raise UsageError(f"layer {k} takes {w.shape[1]} inputs but layer {k - 1} gives {self.weights[k - 1].shape[0]}")
            if w.dtype != dtype or b.dtype != dtype:
                raise UsageError(f"layer {k}: all tensors must share dtype {dtype}")
        self.activation = get_activation(activation)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(self.sizes[-1])]
        if len(self.labels) != self.sizes[-1]:
            raise UsageError(f"{len(self.labels)} label names for {self.sizes[-1]} outputs")
        self.input_mean = None if input_mean is None else np.asarray(input_mean, dtype)
        self.input_std = None if input_std is None else np.asarray(input_std, dtype)
        for name in ("input_mean", "input_std"):
            v = getattr(self, name)
            if v is not None and v.shape != (self.sizes[0],):
                raise UsageError(f"{name} has shape {v.shape}, expected ({self.sizes[0]},)")

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
        return self.astype(self.dtype)

    def astype(self, dtype: type) -> "Backbone":
        """A deep copy in another float dtype (float64 for gradient checks)."""
        conv = (lambda a: None if a is None else np.array(a, dtype=dtype))
        return Backbone([conv(w) for w in self.weights], [conv(b) for b in self.biases],
                        activation=self.activation.name, labels=self.labels,
                        input_mean=conv(self.input_mean), input_std=conv(self.input_std))

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> np.dtype:
        return self.weights[0].dtype

    @property
    def sizes(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_params(self) -> int:
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes + b.nbytes for w, b in zip(self.weights, self.biases))

    def __repr__(self) -> str:
        return f"Backbone(sizes={self.sizes}, activation='{self.activation.name}', dtype={self.dtype})"

    # ------------------------------------------------------------------ input normalisation
    def fit_normalizer(self, x: np.ndarray) -> "Backbone":
        """Standardise inputs with the mean and std of ``x`` (pre-training data only)."""
        # Two passes over blocks of rows in float64: the numbers of a float64 copy of x,
        # without holding one (and its deviations) whole.
        x = np.asarray(x)
        n, block = x.shape[0], 256
        mean = np.zeros(x.shape[1])
        for lo in range(0, n, block):
            mean += x[lo:lo + block].sum(axis=0, dtype=np.float64)
        mean /= n
        var = np.zeros(x.shape[1])
        for lo in range(0, n, block):
            d = x[lo:lo + block].astype(np.float64)
            d -= mean
            var += np.einsum("ij,ij->j", d, d)
        std = np.sqrt(var / n)
        std[std < 1e-8] = 1.0  # a constant feature is left unscaled, never divided by ~0
        self.input_mean = mean.astype(self.dtype)
        self.input_std = std.astype(self.dtype)
        return self

    def prepare(self, x: np.ndarray, what: str = "x") -> np.ndarray:
        """Validate raw inputs and return them normalised, contiguous, in the backbone dtype."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise DataError(f"{what} must have shape (samples, {self.sizes[0]}), got {x.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{what} is empty (0 samples)")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{what} must be real numbers, got dtype {x.dtype}")
        out = np.array(x, dtype=self.dtype, order="C", copy=True)
        if not np.all(np.isfinite(out)):
            bad = np.argwhere(~np.isfinite(out))[0]
            raise DataError(f"{what} contains NaN or inf (first at sample {bad[0]}, feature {bad[1]})")
        if self.input_mean is not None:
            out -= self.input_mean
        if self.input_std is not None:
            out /= self.input_std
        return out

    # ------------------------------------------------------------------ forward
    def transposed_weights(self, layers: Sequence[int] | None = None) -> list[np.ndarray | None] | None:
        """Contiguous (in, out) copies of the weights of ``layers`` (default all), None elsewhere.

        ``h @ W.T`` with W stored (out, in) makes BLAS multiply by a transposed operand,
        measured 2.5x slower than ``h @ Wt`` with a contiguous Wt at the paper's shapes
        (47 vs 19 us for 20x512 @ 512x96). A method that keeps layers frozen for a whole fit
        holds these copies for its forward pass; the backward pass wants W as stored.
        """
        wanted = range(self.n_layers) if layers is None else layers
        return [np.ascontiguousarray(w.T) if k in wanted else None for k, w in enumerate(self.weights)]

    def forward(self, x: np.ndarray, wts: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """Logits for already-prepared inputs (``wts``: see ``transposed_weights``)."""
        h = x
        last = self.n_layers - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = h @ (w.T if wts is None or wts[k] is None else wts[k])
            z += b
            h = z if k == last else self.activation.forward(z)
        return h

    def forward_taps(self, x: np.ndarray, out: np.ndarray | None = None,
                     wts: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """The input of every layer and the final logits, side by side in one row per sample.

        Row layout: [h_0 = x | h_1 | ... | h_{n-1} | z_n]; this is exactly what the skip
        adapters read, and what the skip-cache stores.
        """
        sizes = self.sizes
        width = sum(sizes[:-1]) + sizes[-1]
        if out is None:
            out = np.empty((x.shape[0], width), dtype=self.dtype)
        out[:, :sizes[0]] = x
        h = x
        col = sizes[0]
        last = self.n_layers - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            dst = out[:, col:col + sizes[k + 1]]
            np.matmul(h, w.T if wts is None or wts[k] is None else wts[k], out=dst)
            dst += b
            if k != last:
                self.activation.forward(dst)
            h = dst
            col += sizes[k + 1]
        return out

    # ------------------------------------------------------------------ identity
    def digest(self) -> str:
        """A hash of everything that determines the backbone's outputs."""
        hsh = hashlib.blake2b(digest_size=16)
        hsh.update(json.dumps([self.sizes, self.activation.name, str(self.dtype)]).encode())
        for a in (*self.weights, *self.biases, self.input_mean, self.input_std):
            hsh.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
        return hsh.hexdigest()

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, np.ndarray]:
        t = {}
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            t[f"layers.{k}.weight"] = w
            t[f"layers.{k}.bias"] = b
        if self.input_mean is not None:
            t["input.mean"] = self.input_mean
        if self.input_std is not None:
            t["input.std"] = self.input_std
        return t

    def save(self, path: str | os.PathLike) -> Path:
        """Save to a directory: ``model.safetensors`` (tensors) + ``config.json``.

        The two files are written as one set (``write_dir_atomic``): a crash leaves the old
        model or the new one. The config records the weights' SHA-256, so files mixed by
        hand are detected at load time.
        """
        from ..io_atomic import json_text, write_dir_atomic
        from ..safetensors import dumps

        blob = dumps(self.tensors(), {"format": FORMAT})
        config = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "sizes": self.sizes, "activation": self.activation.name, "dtype": str(self.dtype),
            "labels": self.labels, "normalization": self.input_mean is not None,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        path = write_dir_atomic(path, {WEIGHTS_NAME: blob, CONFIG_NAME: json_text(config).encode()})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Backbone":
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
        if cfg.get("format") != FORMAT:
            raise ModelFileError(f"{cfg_path}: not an edgetune backbone config (format != '{FORMAT}')")
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFileError(f"{cfg_path}: format version {cfg['format_version']} is newer than this edgetune reads ({FORMAT_VERSION})")
        check_model_config(cfg, cfg_path)
        check_config_field(cfg, cfg_path, "dtype", lambda v: v in ("float32", "float64"), "float32 or float64")
        blob = w_path.read_bytes()
        want = cfg.get("weights_sha256")
        if want and hashlib.sha256(blob).hexdigest() != want:
            raise ModelFileError(f"{w_path} does not match {cfg_path.name} (checksum differs: "
                                 f"the files come from different saves, or one is damaged)")
        tensors, _ = loads(blob, str(w_path))
        try:
            sizes = [int(s) for s in cfg["sizes"]]
            n = len(sizes) - 1
            dtype = np.dtype(cfg.get("dtype", "float32"))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{cfg_path}: bad or missing field ({e})") from None
        weights, biases = [], []
        for k in range(n):
            for kind, shape, dst in (("weight", (sizes[k + 1], sizes[k]), weights), ("bias", (sizes[k + 1],), biases)):
                name = f"layers.{k}.{kind}"
                t = tensors.get(name)
                if t is None:
                    raise ModelFileError(f"{w_path}: tensor '{name}' is missing")
                if t.shape != shape or t.dtype != dtype:
                    raise ModelFileError(f"{w_path}: tensor '{name}' is {t.dtype}{list(t.shape)}, "
                                         f"config says {dtype}{list(shape)}")
                dst.append(t)
        extra = set(tensors) - {f"layers.{k}.{kind}" for k in range(n) for kind in ("weight", "bias")} - {"input.mean", "input.std"}
        if extra:
            raise ModelFileError(f"{w_path}: unexpected tensors {sorted(extra)}")
        for name in ("input.mean", "input.std"):
            t = tensors.get(name)
            if t is not None and t.shape != (sizes[0],):
                raise ModelFileError(f"{w_path}: tensor '{name}' has shape {list(t.shape)}, expected [{sizes[0]}]")
        for name, t in tensors.items():
            if not np.all(np.isfinite(t)):
                raise ModelFileError(f"{w_path}: tensor '{name}' contains NaN or inf")
        check_input_std(tensors.get("input.std"), w_path)
        try:
            return cls(weights, biases, activation=cfg.get("activation", "relu"), labels=cfg.get("labels"),
                       input_mean=tensors.get("input.mean"), input_std=tensors.get("input.std"))
        except UsageError as e:
            raise ModelFileError(f"{cfg_path}: {e}") from None
