"""Post-training int8 quantisation of a Backbone and the int8 forward pass.

Weights: symmetric int8 per output channel, ``W ~= s_w[:, None] * Wq`` with
``s_w = max|W[c, :]| / 127``. Activations: one symmetric scale per layer input,
``h_k ~= s_k * q_k``, calibrated on pre-training data. Biases: int32 in the accumulator's
unit, ``b ~= s_k * s_w * bq``. A layer is then

    acc   = q_k @ Wq.T + bq                       (int32 accumulation)
    q_k+1 = clip(requant(acc, s_k s_w / s_k+1), 0, 127)   (ReLU fused into the clip)

where ``requant`` is a fixed-point multiply and shift, as an MCU kernel does it. The last
layer's accumulator is dequantised to float logits. The input normalisation stays float
(it is folded into the input quantisation).

NumPy has no BLAS for integer matrices: an int32 matmul is about twice as slow as float32
here. The default kernel therefore multiplies the integer values in float32 (float64 when
the layer is too wide): every partial sum is an integer below 2**24 (2**53), so the result
is bit-identical to the int32 accumulation. ``kernel="int32"`` runs the integer matmul.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelFileError, UsageError
from ..nn.activations import get_activation
from ..nn.mlp import Backbone

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "edgetune-int8-backbone"
FORMAT_VERSION = 1
QMAX = 127
KERNELS = ("blas", "int32")
_F32_EXACT = 2 ** 24
#: Bytes of widened weight rows per matmul tile (a working buffer, not a copy of the model).
TILE_BYTES = 16 * 1024


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: returns (Wq int8 (out, in), s_w float32 (out,))."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / QMAX, 1.0)
    q = np.clip(np.rint(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_activation(h: np.ndarray, scale: float, *, relu: bool = False) -> np.ndarray:
    """Symmetric int8 with one scale; ``relu`` clips at 0 (a ReLU output is never negative)."""
    q = np.divide(h, np.float32(scale), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 0 if relu else -QMAX, QMAX, out=q)
    return q.astype(np.int8)


def requant_params(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point form of positive real multipliers: m ~= mult * 2**-shift, mult < 2**31."""
    frac, exp = np.frexp(np.asarray(m, dtype=np.float64))
    mult = np.rint(frac * 2.0 ** 31).astype(np.int64)
    carry = mult == 2 ** 31
    mult[carry] //= 2
    exp = exp + carry
    shift = 31 - exp.astype(np.int64)
    if np.any(shift < 1) or np.any(shift > 62):
        raise UsageError("requantisation multiplier out of range: the activation scales are degenerate")
    return mult, shift


def requantize(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(acc * mult * 2**-shift), clipped to [lo, hi], as int8 (round half up)."""
    prod = acc.astype(np.int64) * mult
    prod += np.left_shift(np.int64(1), shift - 1)
    np.right_shift(prod, shift, out=prod)
    return np.clip(prod, lo, hi).astype(np.int8)


class QuantBackbone(Backbone):
    """An int8 MLP, usable wherever the frozen backbone of ``skip-lora``/``skip2-lora`` or
    ``sparse`` is expected: ``forward``/``forward_taps`` return float32 like a Backbone.

    ``qweights[k]`` int8 (out, in), ``wscales[k]`` float32 (out,), ``qbiases[k]`` int32 (out,),
    ``act_scales[k]`` the float scale of layer k's input.
    """

    def __init__(self, qweights: Sequence[np.ndarray], wscales: Sequence[np.ndarray],
                 qbiases: Sequence[np.ndarray], act_scales: Sequence[float], *, activation: str = "relu",
                 labels: Sequence[str] | None = None, input_mean: np.ndarray | None = None,
                 input_std: np.ndarray | None = None, kernel: str = "blas"):
        # Backbone.__init__ validates float tensors; an int8 model validates its own.
        n = len(qweights)
        if n < 1 or not (len(wscales) == len(qbiases) == len(act_scales) == n):
            raise UsageError("an int8 backbone needs one weight, weight scale, bias and input scale per layer")
        self.qweights = [np.ascontiguousarray(w) for w in qweights]
        self.wscales = [np.asarray(s, np.float32) for s in wscales]
        self.qbiases = [np.asarray(b) for b in qbiases]
        self.act_scales = np.asarray(act_scales, np.float32).reshape(n)
        for k, (w, s, b) in enumerate(zip(self.qweights, self.wscales, self.qbiases)):
            if w.dtype != np.int8 or w.ndim != 2:
                raise UsageError(f"layer {k}: int8 weight (out, in) expected, got {w.dtype}{list(w.shape)}")
            if s.shape != (w.shape[0],) or b.shape != (w.shape[0],) or b.dtype != np.int32:
                raise UsageError(f"layer {k}: weight scale {s.shape} / int32 bias {b.dtype}{b.shape} "
                                 f"do not fit {w.shape[0]} output channels")
            if k and w.shape[1] != self.qweights[k - 1].shape[0]:
                raise UsageError(f"layer {k} takes {w.shape[1]} inputs but layer {k - 1} gives "
                                 f"{self.qweights[k - 1].shape[0]}")
            if not (np.all(np.isfinite(s)) and np.all(s > 0)):
                raise UsageError(f"layer {k}: weight scales must be positive and finite")
            # int32 accumulator: |sum q_x q_w| <= in * 128 * 127, plus the bias.
            bound = w.shape[1] * 128 * QMAX + int(np.abs(b.astype(np.int64)).max(initial=0))
            if bound >= 2 ** 31:
                raise UsageError(f"layer {k}: the int32 accumulator could overflow ({bound} >= 2**31)")
        if not (np.all(np.isfinite(self.act_scales)) and np.all(self.act_scales > 0)):
            raise UsageError("activation scales must be positive and finite")
        self.activation = get_activation(activation)
        if self.activation.name not in ("relu", "identity") and n > 1:
            raise UsageError(f"the int8 forward pass fuses ReLU into requantisation; "
                             f"activation '{self.activation.name}' is not supported")
        if kernel not in KERNELS:
            raise UsageError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.labels = list(labels) if labels is not None else [str(i) for i in range(self.sizes[-1])]
        if len(self.labels) != self.sizes[-1]:
            raise UsageError(f"{len(self.labels)} label names for {self.sizes[-1]} outputs")
        self.input_mean = None if input_mean is None else np.asarray(input_mean, np.float32)
        self.input_std = None if input_std is None else np.asarray(input_std, np.float32)
        self._requant = []
        for k in range(n - 1):
            m = self.act_scales[k].astype(np.float64) * self.wscales[k] / self.act_scales[k + 1]
            self._requant.append(requant_params(m))

    # -- the Backbone interface that does not apply to int8 weights ----------------------
    @property
    def weights(self):  # type: ignore[override]
        raise UsageError("this is an int8 backbone: its float weights do not exist. Methods that train or "
                         "read float weights (ft-*, lora-*) need the float model; on int8 use skip-lora, "
                         "skip2-lora or sparse (or .dequantize())")

    @property
    def biases(self):  # type: ignore[override]
        return self.weights

    def astype(self, dtype: type) -> "Backbone":
        raise UsageError("an int8 backbone cannot change dtype; use .dequantize() for a float model")

    def copy(self) -> "QuantBackbone":
        return self.replace()

    def replace(self, qweights: dict[int, np.ndarray] | None = None,
                qbiases: dict[int, np.ndarray] | None = None) -> "QuantBackbone":
        """A copy, with some layers' int8 weights / int32 biases replaced (same scales)."""
        qw = [np.array((qweights or {}).get(k, w), np.int8) for k, w in enumerate(self.qweights)]
        qb = [np.array((qbiases or {}).get(k, b), np.int32) for k, b in enumerate(self.qbiases)]
        return QuantBackbone(qw, [s.copy() for s in self.wscales], qb, self.act_scales.copy(),
                             activation=self.activation.name, labels=self.labels,
                             input_mean=self.input_mean, input_std=self.input_std, kernel=self.kernel)

    def fit_normalizer(self, x: np.ndarray) -> "Backbone":
        raise UsageError("the input normalisation of an int8 backbone is fixed at quantisation")

    # -- properties ---------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        """The dtype of what ``forward`` returns and of adapters trained on top."""
        return np.dtype(np.float32)

    @property
    def sizes(self) -> list[int]:
        return [self.qweights[0].shape[1]] + [w.shape[0] for w in self.qweights]

    @property
    def n_layers(self) -> int:
        return len(self.qweights)

    @property
    def n_params(self) -> int:
        return sum(w.size + b.size for w, b in zip(self.qweights, self.qbiases))

    @property
    def nbytes(self) -> int:
        """Bytes of everything the int8 model holds (weights, biases, scales, requantisers)."""
        total = sum(a.nbytes for a in (*self.qweights, *self.wscales, *self.qbiases, self.act_scales))
        total += sum(m.nbytes + s.nbytes for m, s in self._requant)
        total += sum(a.nbytes for a in (self.input_mean, self.input_std) if a is not None)
        return total

    def __repr__(self) -> str:
        return f"QuantBackbone(sizes={self.sizes}, int8, kernel='{self.kernel}')"

    # -- the int8 pass ------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Prepared (normalised) float inputs -> int8 at the first layer's input scale."""
        return quantize_activation(x, self.act_scales[0])

    def tile_rows(self, k: int) -> int:
        """Weight rows converted per matmul tile, so no layer's weight is ever widened whole."""
        return max(1, TILE_BYTES // (self.qweights[k].shape[1] * 4))

    def accumulate(self, k: int, q: np.ndarray) -> np.ndarray:
        """int32 accumulator of layer k for int8 inputs ``q`` (samples, in_k)."""
        w = self.qweights[k]
        out_k, in_k = w.shape
        if self.kernel == "int32":
            ft = np.int32
        else:
            ft = np.float32 if in_k * 128 * QMAX < _F32_EXACT else np.float64
        qc = q.astype(ft)
        acc = np.empty((q.shape[0], out_k), np.int32)
        t = self.tile_rows(k)
        for r0 in range(0, out_k, t):
            acc[:, r0:r0 + t] = qc @ w[r0:r0 + t].astype(ft).T
        acc += self.qbiases[k]
        return acc

    def layer_int8(self, k: int, q: np.ndarray) -> np.ndarray:
        """Hidden layer k on int8 inputs: the int8 input of layer k+1 (ReLU fused)."""
        mult, shift = self._requant[k]
        lo = 0 if self.activation.name == "relu" else -QMAX
        return requantize(self.accumulate(k, q), mult, shift, lo, QMAX)

    def run_int8(self, q: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Hidden layers ``start .. stop-1`` on int8 input of layer ``start``; int8 input of ``stop``."""
        stop = self.n_layers - 1 if stop is None else stop
        for k in range(start, stop):
            q = self.layer_int8(k, q)
        return q

    def logits_from(self, q_last: np.ndarray) -> np.ndarray:
        """Float logits from the int8 input of the last layer."""
        k = self.n_layers - 1
        acc = self.accumulate(k, q_last)
        return (acc * (self.act_scales[k] * self.wscales[k])).astype(np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Float logits for prepared inputs, computed by the int8 kernel."""
        return self.logits_from(self.run_int8(self.quantize_input(x)))

    def forward_taps_int8(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int8 rows [q_0 | ... | q_{n-1}], float32 logits): the skip adapters' inputs, exactly."""
        sizes = self.sizes
        rows = np.empty((x.shape[0], sum(sizes[:-1])), np.int8)
        q = self.quantize_input(x)
        col = 0
        for k in range(self.n_layers):
            rows[:, col:col + sizes[k]] = q
            col += sizes[k]
            if k < self.n_layers - 1:
                q = self.layer_int8(k, q)
        return rows, self.logits_from(q)

    def tap_scales(self) -> np.ndarray:
        """One dequantisation scale per column of the int8 tap rows."""
        return np.repeat(self.act_scales, self.sizes[:-1]).astype(np.float32)

    def transposed_weights(self, layers=None):  # type: ignore[override]
        """None: an int8 backbone has its own integer kernels, no float copies to make."""
        return None

    def forward_taps(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [x | h_1 | ... | h_{n-1} | z_n] as a float Backbone gives them, dequantised."""
        rows, logits = self.forward_taps_int8(x)
        d = rows.shape[1]
        if out is None:
            out = np.empty((x.shape[0], d + logits.shape[1]), np.float32)
        np.multiply(rows, self.tap_scales(), out=out[:, :d])
        out[:, d:] = logits
        return out

    def dequantize(self) -> Backbone:
        """The float model this int8 model approximates (for comparison, not deployment)."""
        ws = [(w * s[:, None]).astype(np.float32) for w, s in zip(self.qweights, self.wscales)]
        bs = [(b * (a * s)).astype(np.float32) for b, a, s in zip(self.qbiases, self.act_scales, self.wscales)]
        return Backbone(ws, bs, activation=self.activation.name, labels=self.labels,
                        input_mean=self.input_mean, input_std=self.input_std)

    # -- identity and files -----------------------------------------------------------
    def digest(self) -> str:
        hsh = hashlib.blake2b(digest_size=16)
        hsh.update(json.dumps([FORMAT, self.sizes, self.activation.name]).encode())
        for a in (*self.qweights, *self.wscales, *self.qbiases, self.act_scales, self.input_mean, self.input_std):
            hsh.update(b"-" if a is None else memoryview(np.ascontiguousarray(a)).cast("B"))
        return hsh.hexdigest()

    def tensors(self) -> dict[str, np.ndarray]:
        t: dict[str, np.ndarray] = {}
        for k in range(self.n_layers):
            t[f"layers.{k}.weight"] = self.qweights[k]
            t[f"layers.{k}.weight_scale"] = self.wscales[k]
            t[f"layers.{k}.bias"] = self.qbiases[k]
            t[f"layers.{k}.input_scale"] = self.act_scales[k:k + 1]
        if self.input_mean is not None:
            t["input.mean"] = self.input_mean
        if self.input_std is not None:
            t["input.std"] = self.input_std
        return t

    def save(self, path: str | os.PathLike) -> Path:
        """``model.safetensors`` (int8/int32/float32 tensors) + ``config.json``, written as one set."""
        from ..io_atomic import json_text, write_dir_atomic
        from ..safetensors import dumps

        blob = dumps(self.tensors(), {"format": FORMAT})
        config = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "sizes": self.sizes,
            "activation": self.activation.name, "labels": self.labels,
            "normalization": self.input_mean is not None, "quantization": {
                "weights": "int8 symmetric per output channel", "biases": "int32",
                "activations": "int8 symmetric per tensor"},
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        path = write_dir_atomic(path, {WEIGHTS_NAME: blob, CONFIG_NAME: json_text(config).encode()})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, kernel: str = "blas") -> "QuantBackbone":
        from ..io_atomic import check_model_config, read_json_config, recover_dir
        from ..safetensors import loads

        path = Path(path)
        if path.is_file() and path.name == CONFIG_NAME:
            path = path.parent
        path = recover_dir(path)
        if not path.is_dir():
            raise ModelFileError(f"model directory not found: {path}")
        cfg, cfg_path, w_path = read_json_config(path, CONFIG_NAME, WEIGHTS_NAME, "an edgetune model")
        if cfg.get("format") != FORMAT:
            raise ModelFileError(f"{cfg_path}: not an edgetune int8 model (format != '{FORMAT}')")
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFileError(f"{cfg_path}: format version {cfg['format_version']} is newer than this "
                                 f"edgetune reads ({FORMAT_VERSION})")
        check_model_config(cfg, cfg_path)
        blob = w_path.read_bytes()
        if cfg.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != cfg["weights_sha256"]:
            raise ModelFileError(f"{w_path} does not match {cfg_path.name} (checksum differs: the files come "
                                 f"from different saves, or one is damaged)")
        tensors, _ = loads(blob, str(w_path))
        try:
            sizes = [int(s) for s in cfg["sizes"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{cfg_path}: bad or missing field 'sizes' ({e})") from None
        n = len(sizes) - 1
        want: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for k in range(n):
            want[f"layers.{k}.weight"] = ((sizes[k + 1], sizes[k]), np.dtype(np.int8))
            want[f"layers.{k}.weight_scale"] = ((sizes[k + 1],), np.dtype(np.float32))
            want[f"layers.{k}.bias"] = ((sizes[k + 1],), np.dtype(np.int32))
            want[f"layers.{k}.input_scale"] = ((1,), np.dtype(np.float32))
        optional = {"input.mean": ((sizes[0],), np.dtype(np.float32)), "input.std": ((sizes[0],), np.dtype(np.float32))}
        extra = set(tensors) - set(want) - set(optional)
        if extra:
            raise ModelFileError(f"{w_path}: unexpected tensors {sorted(extra)}")
        for name, (shape, dt) in {**want, **optional}.items():
            t = tensors.get(name)
            if t is None:
                if name in want:
                    raise ModelFileError(f"{w_path}: tensor '{name}' is missing")
                continue
            if t.shape != shape or t.dtype != dt:
                raise ModelFileError(f"{w_path}: tensor '{name}' is {t.dtype}{list(t.shape)}, expected {dt}{list(shape)}")
            if dt.kind == "f" and not np.all(np.isfinite(t)):
                raise ModelFileError(f"{w_path}: tensor '{name}' contains NaN or inf")
        from ..io_atomic import check_input_std
        check_input_std(tensors.get("input.std"), w_path)
        try:
            return cls([tensors[f"layers.{k}.weight"] for k in range(n)],
                       [tensors[f"layers.{k}.weight_scale"] for k in range(n)],
                       [tensors[f"layers.{k}.bias"] for k in range(n)],
                       [float(tensors[f"layers.{k}.input_scale"][0]) for k in range(n)],
                       activation=cfg.get("activation", "relu"), labels=cfg.get("labels"),
                       input_mean=tensors.get("input.mean"), input_std=tensors.get("input.std"), kernel=kernel)
        except UsageError as e:
            raise ModelFileError(f"{cfg_path}: {e}") from None


def calibrate(backbone: Backbone, x: np.ndarray, *, percentile: float = 100.0) -> np.ndarray:
    """Per-tensor scales of every layer's input (and of the logits, last) on raw inputs ``x``."""
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (50, 100], got {percentile}")
    taps = backbone.forward_taps(backbone.prepare(x, "calibration x"))
    sizes = backbone.sizes
    scales = []
    col = 0
    for w in sizes:
        seg = np.abs(taps[:, col:col + w])
        amax = float(np.percentile(seg, percentile)) if percentile < 100 else float(seg.max())
        scales.append(amax / QMAX if amax > 0 else 1.0)
        col += w
    return np.asarray(scales, np.float32)


def quantize(backbone: Backbone, x_calib: np.ndarray, *, percentile: float = 100.0,
             kernel: str = "blas") -> QuantBackbone:
    """Post-training quantisation of a trained float backbone, calibrated on raw inputs ``x_calib``
    (pre-training data: the device never needs the fine-tuning data for this)."""
    if isinstance(backbone, QuantBackbone):
        raise UsageError("this backbone is already int8")
    if backbone.activation.name not in ("relu", "identity") and backbone.n_layers > 1:
        raise UsageError(f"int8 quantisation supports ReLU MLPs, not '{backbone.activation.name}'")
    scales = calibrate(backbone, x_calib, percentile=percentile)[:-1]
    qw, ws, qb = [], [], []
    for k, (w, b) in enumerate(zip(backbone.weights, backbone.biases)):
        q, s = quantize_weight(w)
        bq = np.rint(np.asarray(b, np.float64) / (float(scales[k]) * s.astype(np.float64)))
        if np.abs(bq).max(initial=0) >= 2 ** 30:
            raise UsageError(f"layer {k}: the bias does not fit int32 at this scale (calibration data too narrow?)")
        qw.append(q)
        ws.append(s)
        qb.append(bq.astype(np.int32))
    return QuantBackbone(qw, ws, qb, scales, activation=backbone.activation.name, labels=backbone.labels,
                         input_mean=backbone.input_mean, input_std=backbone.input_std, kernel=kernel)


def load_any(path: str | os.PathLike) -> Backbone:
    """A float or an int8 model directory, whichever ``path`` holds."""
    from ..io_atomic import recover_dir

    p = Path(path)
    cfg = recover_dir(p.parent if p.name == CONFIG_NAME else p) / CONFIG_NAME
    try:
        fmt = json.loads(cfg.read_text()).get("format") if cfg.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        fmt = None
    if fmt == FORMAT:
        return QuantBackbone.load(path)
    return Backbone.load(path)
