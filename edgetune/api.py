"""The Python API: pre-train a backbone, fine-tune it with any method, save adapters.

    import edgetune as et
    model = et.Backbone.load("model")                    # or et.pretrain(x0, y0)
    tuner = et.FineTuner(model, "skip2-lora", epochs=100).fit(x, y)
    print(tuner.score(x_test, y_test))
    tuner.save_adapter("adapter")
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .cache import _immutable, _same_bits
from .data.task import validate_xy
from .errors import BackboneMismatch, DataError, ModelFileError, UsageError
from .methods import make_method, method_class
from .methods.base import Method, describe_options
from .nn.losses import softmax
from .nn.mlp import Backbone
from .train import EpochRecord, History, TrainConfig, evaluate, fit, predict_logits
from .units import parse_bytes

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "edgetune-adapter"
#: ``predict`` of at most this many rows runs in C one row at a time, reading the tensors in place
#: (``core.engine.Predictor``); more rows go through NumPy's matrix products.
PREDICT_ROWS = 16
class FineTuner:
    """Fine-tune a backbone with one method; scikit-learn style ``fit/predict/score``.

    ``method`` is a name from ``edgetune methods``; ``rank``/``alpha`` follow PEFT (scale
    alpha/rank, default alpha = rank). ``scheme`` (and ``qas``) choose the ``sparse``
    method's update scheme, e.g. ``"b2,w-1:1/2"``; other methods refuse them. The backbone
    passed in is never modified: methods that train backbone tensors work on a copy (see
    ``merged()``). ``engine`` runs the epochs: 'auto' (the compiled C engine when built,
    else NumPy; also what None means unless ``EDGETUNE_ENGINE`` says otherwise), 'c' or
    'numpy'. ``cache_fill`` ('eager' or 'lazy') fills the skip-cache before the first batch
    or as batches come (same math). ``stream_capacity`` and ``stream_policy`` ('oldest' or
    'reservoir') bound the samples ``partial_fit`` keeps (see docs/streaming.md).
    """

    def __init__(self, backbone: Backbone, method: str = "skip2-lora", *, rank: int = 1,
                 alpha: float | None = None, train_last_bias: bool = False,
                 cache_budget: int | str | None = None, cache_overflow: str = "error",
                 cache_fill: str = "eager", scheme: str | None = None, qas: bool | None = None,
                 epochs: int = 100, batch_size: int = 20, lr: float = 0.01, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 patience: int | None = None, progress: bool | None = False, engine: str | None = None,
                 stream_capacity: int | None = None, stream_policy: str = "oldest"):
        # The constructor's arguments, as given: get_params/set_params (scikit-learn's clone, GridSearchCV).
        self._params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if not isinstance(backbone, Backbone):
            raise UsageError(f"backbone must be an edgetune Backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.method_name = method
        self.config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                                  momentum=momentum, weight_decay=weight_decay, seed=seed, patience=patience)
        budget = None if cache_budget is None else parse_bytes(cache_budget)
        self.method: Method = make_method(method, backbone, seed=seed, rank=rank, alpha=alpha,
                                          train_last_bias=train_last_bias, cache_budget=budget,
                                          cache_overflow=cache_overflow, cache_fill=cache_fill, scheme=scheme,
                                          qas=qas)
        from .core.engine import ENGINES
        if engine is not None and engine not in ENGINES:
            raise UsageError(f"unknown engine '{engine}': use one of {', '.join(ENGINES)}")
        self.engine = engine
        self.progress = progress
        self.history_: History | None = None
        self._kept: dict = {}  # the engine's structs, kept between fits (train.make_runner)
        self._prepared: dict[str, tuple] = {}  # _xy's last arrays per use, when no one can write them
        if stream_capacity is not None and (not isinstance(stream_capacity, (int, np.integer))
                                            or isinstance(stream_capacity, bool) or stream_capacity < 1):
            raise UsageError(f"stream_capacity must be a whole number >= 1 or None (no limit), got {stream_capacity!r}")
        if stream_policy not in STREAM_POLICIES:
            raise UsageError(f"stream_policy must be one of {', '.join(STREAM_POLICIES)}, got {stream_policy!r}")
        self.stream_capacity = None if stream_capacity is None else int(stream_capacity)
        self.stream_policy = stream_policy
        self._stream: _Stream | None = None

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments (scikit-learn's estimator protocol; ``deep`` has no nested
        estimators to expand)."""
        return dict(self._params)

    def set_params(self, **params: Any) -> "FineTuner":
        """Change constructor arguments and start over: the method is rebuilt (an unfitted
        adapter), as scikit-learn's ``set_params`` followed by ``fit`` expects."""
        unknown = sorted(set(params) - set(self._params))
        if unknown:
            raise UsageError(f"unknown parameter(s) {', '.join(unknown)}; FineTuner takes "
                             f"{', '.join(self._params)}")
        self.__init__(**{**self._params, **params})
        return self

    def __sklearn_tags__(self):
        """A classifier, for scikit-learn's model selection (imported only when scikit-learn asks)."""
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags())

    @property
    def n_trainable(self) -> int:
        return self.method.n_trainable

    def _xy(self, x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Validated labels and prepared (normalised) inputs. Arrays no one can write (read-only
        views of ``bytes``: ``edgetune.cache.unwritable``) are validated once: the same two
        arrays again, with the same input normalisation, give the same prepared arrays (one pair
        per use: training, validation and evaluation data each keep theirs)."""
        bb = self.backbone
        memo = self._prepared.get(what)
        if memo is not None and memo[0] is x and memo[1] is y and memo[2] == what and all(
                (a is b and _immutable(b)) or _same_bits(a, b)
                for a, b in zip((bb.input_mean, bb.input_std), memo[3]) if b is not None) \
                and (bb.input_mean is None) == (memo[3][0] is None) and (bb.input_std is None) == (memo[3][1] is None):
            return memo[4], memo[5]
        self._prepared.pop(what, None)  # before the new copy is made: never two of one use at once
        xv, yv = validate_xy(x, y, n_classes=bb.sizes[-1], what=what)
        xp = self._prepare(xv, f"{what} x")
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and _immutable(x) and _immutable(y):
            xp.flags.writeable = yv.flags.writeable = False  # ours: kept as they are for the next call
            # the normalisation as it is now: kept by reference if no one can write it, else copied
            norm = tuple(None if a is None else a if _immutable(a) else np.array(a, copy=True)
                         for a in (bb.input_mean, bb.input_std))
            self._prepared[what] = (x, y, what, norm, xp, yv)
        return xp, yv

    def fit(self, x: Any, y: Any, *, x_val: Any = None, y_val: Any = None,
            callback: Callable[[EpochRecord], bool | None] | None = None,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None) -> "FineTuner":
        """Train on ``x`` (samples, features) and integer labels ``y``; returns self.

        A second ``fit`` continues from the current adapter with a fresh optimizer (a warm
        start); make a new FineTuner to start over. With ``checkpoint`` the run is saved
        every ``checkpoint_every`` epochs (default: every 10 s of training, and at the end)
        and, if interrupted, resumes from that file.
        """
        xp, yp = self._xy(x, y, "training data")
        xv = yv = None
        if (x_val is None) != (y_val is None):
            raise UsageError("give both x_val and y_val, or neither")
        if x_val is not None:
            xv, yv = self._xy(x_val, y_val, "validation data")
        self.history_ = fit(self.method, xp, yp, self.config, x_val=xv, y_val=yv,
                            callback=callback, progress=self.progress, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every, engine=self.engine, keep=self._kept)
        return self

    def partial_fit(self, x: Any, y: Any) -> "FineTuner":
        """Learn from new samples as they arrive (scikit-learn's ``partial_fit``); returns self.

        The samples join the tuner's stream memory (every sample so far, or at most
        ``stream_capacity``: when full, a new sample replaces the oldest, or with
        ``stream_policy="reservoir"`` a uniformly drawn one, so the memory stays a uniform
        sample of the stream), then one epoch runs over the memory, in batches of
        ``batch_size`` shuffled by the generator of ``seed`` + the number of earlier calls.
        skip2-lora keeps the skip-cache rows of the samples it already holds, so each call
        runs the frozen backbone on the new samples only. As with a second ``fit``, the
        optimizer starts afresh each call (momentum and Adam state are not carried); with
        SGD, calls on chunks equal ``fit`` on the memory so far, call by call (tested).
        """
        xp, yp = self._xy(x, y, "training data")
        if self._stream is None:
            self._stream = _Stream(xp.shape[1], xp.dtype, self.stream_capacity, self.stream_policy, self.config.seed)
        xs, ys = self._stream.add(xp, yp)
        config = replace(self.config, epochs=1, patience=None, seed=self.config.seed + self._stream.calls)
        self._stream.calls += 1
        self.history_ = fit(self.method, xs, ys, config, progress=False, engine=self.engine, keep=self._kept)
        return self

    def _prepare(self, x: Any, what: str = "x", out: np.ndarray | None = None) -> np.ndarray:
        """``backbone.prepare(x, what)``, bit for bit, without its generic checks when ``x`` is
        already what they look for: a non-empty 2-D float array of finite values, one flat row
        per sample. Anything else (and every refusal, with its message) is ``prepare``'s.
        ``out``: where to write the result, of its shape and the backbone's dtype (returned)."""
        bb = self.backbone
        if type(x) is np.ndarray and x.ndim == 2 and x.shape[0] and (x.dtype == np.float32 or x.dtype == np.float64):
            in_shape = bb.layers[0].spec.in_shape
            if len(in_shape) == 1 and x.shape[1] == in_shape[0] and (out is None or out.dtype == bb.dtype):
                if out is None:
                    xp = np.array(x, dtype=bb.dtype, order="C", copy=True)
                else:
                    xp = out
                    np.copyto(xp, x, casting="same_kind")
                if np.isfinite(xp).all():
                    if bb.input_mean is not None:
                        xp -= bb.input_mean
                    if bb.input_std is not None:
                        xp /= bb.input_std
                    return xp
        xp = bb.prepare(x, what)
        if out is not None:
            out[...] = xp
            return out
        return xp

    def decision_function(self, x: Any) -> np.ndarray:
        if type(x) is np.ndarray and x.ndim == 2 and 1 <= len(x) <= PREDICT_ROWS:
            from .core.engine import predictor

            c, self._kept["predict"] = predictor(self.method, self.engine, PREDICT_ROWS, self._kept.get("predict"))
            if c is not None and x.shape[1] == c.width:
                with c.lock:
                    self._prepare(x, out=c.rows(len(x)))
                    return c.logits(len(x))
        return predict_logits(self.method, self._prepare(x))

    def predict_proba(self, x: Any) -> np.ndarray:
        return softmax(self.decision_function(x))

    def predict(self, x: Any) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)

    def score(self, x: Any, y: Any) -> float:
        """Accuracy on ``x``, ``y``."""
        xp, yp = self._xy(x, y, "evaluation data")
        return evaluate(self.method, xp, yp)[1]

    def release(self) -> "FineTuner":
        """Free what is kept only to make the next ``fit`` cheaper: the skip-cache (the next fit
        fills it again), the compiled engine's run state (workspace, cache struct, the training
        arrays it points into) and the prepared copies of training and validation data. The
        adapter, ``history_`` and ``predict`` are unaffected; returns self."""
        if getattr(self.method, "cache", None) is not None:
            self.method.cache = None
        self._kept.pop("runner", None)
        for what in ("training data", "validation data"):
            self._prepared.pop(what, None)
        return self

    def merged(self) -> Backbone:
        """A plain backbone that computes the fine-tuned model (no adapter at run time)."""
        return self.method.merged_backbone()

    # -- adapter files -----------------------------------------------------------------
    def save_adapter(self, path: str | os.PathLike, *, format: str = "edgetune", overwrite: bool = False) -> Path:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into directory ``path``.

        A ``path`` that already holds an adapter or a model is replaced only with
        ``overwrite=True`` (the command line's ``--force``); the replacement is atomic.

        ``format="peft"`` (``lora-all``/``lora-last`` only) writes Hugging Face PEFT's key
        names and config, loadable by PEFT onto ``edgetune.torch.to_torch(backbone)`` and
        by ``load_adapter``; see ``edgetune.peft_format``.
        """
        from .io_atomic import write_dir_atomic

        return write_dir_atomic(path, self.adapter_files(format=format), overwrite=overwrite)

    def adapter_files(self, *, format: str = "edgetune") -> dict[str, bytes]:
        """The two files of ``save_adapter`` as bytes, by file name (nothing written)."""
        from .io_atomic import json_text
        from .safetensors import dumps

        if format not in ("edgetune", "peft"):
            raise UsageError(f"format must be 'edgetune' or 'peft', got {format!r}")
        if format == "peft":
            from .peft_format import peft_files
            tensors, peft_config, metadata = peft_files(self.method)
            return {ADAPTER_WEIGHTS: dumps(tensors, metadata), ADAPTER_CONFIG: json_text(peft_config).encode()}
        blob = dumps(self.method.adapter_tensors(), {"format": ADAPTER_FORMAT, "method": self.method_name})
        opts = describe_options(self.method.options)
        config = {
            "format": ADAPTER_FORMAT, "format_version": 1, "method": self.method_name,
            "r": opts["rank"], "lora_alpha": opts["alpha"], "train_last_bias": opts["train_last_bias"],
            **self._scheme_config(),
            "base_model_sizes": self.backbone.sizes, "base_model_digest": self.backbone.digest(),
            "adapter_sha256": hashlib.sha256(blob).hexdigest(),
        }
        return {ADAPTER_WEIGHTS: blob, ADAPTER_CONFIG: json_text(config).encode()}

    def _scheme_config(self) -> dict[str, Any]:
        """The sparse method's resolved scheme and QAS switch (nothing for other methods)."""
        if not getattr(self.method, "takes_scheme", False):
            return {}
        return {"scheme": str(self.method.scheme), "qas": bool(self.method.qas)}

    @classmethod
    def load_adapter(cls, backbone: Backbone, path: str | os.PathLike, *, strict: bool = True,
                     **train_options: Any) -> "FineTuner":
        """Rebuild a FineTuner from an adapter directory saved for ``backbone``.

        ``strict`` refuses an adapter trained on a different backbone (its outputs would be
        meaningless); same-shaped but different weights are only accepted with strict=False.
        PEFT LoRA adapters load too (``lora-all``/``lora-last``); one written by PEFT itself
        records no backbone digest, so only its shapes can be checked.
        """
        from .safetensors import loads

        from .io_atomic import check_adapter_config, read_json_config

        path = Path(path)
        cfg, cfg_path, w_path = read_json_config(path, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "an edgetune adapter")
        if "peft_type" in cfg:  # a PEFT LoRA adapter (edgetune.peft_format)
            from .peft_format import read_peft_adapter
            peft = read_peft_adapter(path, backbone)
            if strict and peft["digest"] not in (None, backbone.digest()):
                raise BackboneMismatch("adapter was trained on a different backbone (same shape, other weights); "
                                       "pass strict=False to load it anyway")
            tuner = cls(backbone, peft["method"], rank=peft["rank"], alpha=peft["alpha"],
                        train_last_bias=peft["train_last_bias"], **train_options)
            tuner.method.load_adapter_tensors(peft["tensors"])
            return tuner
        if not isinstance(cfg, dict) or cfg.get("format") != ADAPTER_FORMAT:
            raise ModelFileError(f"{cfg_path}: not an edgetune adapter config")
        check_adapter_config(cfg, cfg_path)
        blob = w_path.read_bytes()
        if cfg.get("adapter_sha256") and hashlib.sha256(blob).hexdigest() != cfg["adapter_sha256"]:
            raise ModelFileError(f"{w_path} does not match {cfg_path.name} (checksum differs)")
        if "base_model_sizes" not in cfg:
            raise ModelFileError(f"{cfg_path}: field 'base_model_sizes' is missing (the sizes of the backbone the "
                                 f"adapter was made for)")
        if cfg["base_model_sizes"] != backbone.sizes:
            raise ModelFileError(f"adapter was made for a backbone of sizes {cfg['base_model_sizes']}, "
                                 f"this backbone has {backbone.sizes}")
        if strict and cfg.get("base_model_digest") != backbone.digest():
            raise BackboneMismatch("adapter was trained on a different backbone (same shape, other weights); "
                                   "pass strict=False to load it anyway")
        from_file = {"rank": int(cfg.get("r", 1)), "alpha": cfg.get("lora_alpha"),
                     "train_last_bias": bool(cfg.get("train_last_bias", False)), "scheme": cfg.get("scheme"),
                     "qas": cfg.get("qas")}
        try:  # what the file says, on its own: a refusal here is the file's
            method_class(cfg["method"])
            cls(backbone, cfg["method"], **from_file)
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise ModelFileError(f"{cfg_path}: bad adapter config ({e})") from None
        tuner = cls(backbone, cfg["method"], **from_file, **train_options)  # a refusal here is the caller's
        tensors, _ = loads(blob, str(w_path))
        for name, t in tensors.items():
            if t.dtype.kind != "f":
                raise ModelFileError(f"{w_path}: tensor '{name}' holds {t.dtype} values; adapter tensors are "
                                     f"floating point")
        tuner.method.load_adapter_tensors(tensors)
        return tuner


STREAM_POLICIES = ("oldest", "reservoir")


class _Stream:
    """The samples ``partial_fit`` trains on: all so far, or ``capacity`` of them chosen by ``policy``.

    Rows live in one buffer that doubles as the stream grows (or is allocated once at
    ``capacity``); ``add`` returns contiguous views of the rows in use."""

    def __init__(self, width: int, dtype: np.dtype, capacity: int | None, policy: str, seed: int):
        self.capacity, self.policy = capacity, policy
        rows = capacity if capacity is not None else 64
        self.x = np.empty((rows, width), dtype)
        self.y = np.empty(rows, np.int64)
        self.n = 0          # rows in use
        self.seen = 0       # samples offered so far
        self.calls = 0      # partial_fit calls so far
        self.rng = np.random.default_rng([seed, 0x5EED])  # reservoir draws, apart from the batches' generator

    def add(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cap = self.capacity
        if x.shape[1] != self.x.shape[1]:
            raise DataError(f"training data has {x.shape[1]} features, earlier partial_fit calls had {self.x.shape[1]}")
        if cap is None and self.n + len(x) > len(self.x):
            rows = max(self.n + len(x), 2 * len(self.x))
            bx, by = np.empty((rows, self.x.shape[1]), self.x.dtype), np.empty(rows, np.int64)
            bx[:self.n], by[:self.n] = self.x[:self.n], self.y[:self.n]
            self.x, self.y = bx, by
        for i in range(len(x)):
            if cap is None or self.n < cap:
                slot = self.n
                self.n += 1
            elif self.policy == "oldest":
                slot = self.seen % cap  # the memory filled slots 0..cap-1 in order: this one is the oldest
            else:  # reservoir (Vitter's algorithm R): keep the new sample with probability cap / (seen + 1)
                j = int(self.rng.integers(0, self.seen + 1))
                slot = j if j < cap else -1
            if slot >= 0:
                self.x[slot], self.y[slot] = x[i], y[i]
            self.seen += 1
        return self.x[:self.n], self.y[:self.n]


def pretrain(x: Any, y: Any, *, hidden: Sequence[int] = (96, 96), arch: str | None = None,
             labels: Sequence[str] | None = None,
             activation: str = "relu", epochs: int = 100, batch_size: int = 20, lr: float = 0.01,
             optimizer: str = "sgd", momentum: float = 0.9, seed: int = 0,
             x_val: Any = None, y_val: Any = None, patience: int | None = None,
             progress: bool | None = False, backbone: Backbone | None = None) -> tuple[Backbone, History]:
    """Train a backbone from scratch (or continue ``backbone``) with every tensor trainable.

    The backbone is an MLP of ``hidden`` widths, or the architecture string ``arch``
    (edgetune.nn.arch: convolutions, pooling, residual blocks...) on samples of ``x``'s shape.
    The input normalisation is fitted on ``x`` (pre-training data only) and saved with
    the model.
    """
    x_arr, y_arr = validate_xy(x, y, what="pre-training data")
    n_classes = len(labels) if labels is not None else int(y_arr.max()) + 1
    if labels is not None and y_arr.max() >= n_classes:
        raise DataError(f"pre-training labels go up to {int(y_arr.max())} but only {n_classes} label names were given")
    if backbone is None and arch is not None:
        from .nn.arch import build_layers, parse_arch
        specs = parse_arch(arch, x_arr.shape[1:], n_classes)
        backbone = Backbone.from_layers(build_layers(specs, seed=seed), labels=labels, activation=activation)
        backbone.fit_normalizer(x_arr)
    elif backbone is None:
        if x_arr.ndim > 2:
            raise UsageError(f"samples of shape {list(x_arr.shape[1:])} need an architecture (arch=...) or "
                             f"flat rows for an MLP")
        if any(int(h) < 1 for h in hidden):
            raise UsageError(f"hidden widths must be >= 1, got {list(hidden)}")
        from .memory import check_fits_machine
        check_fits_machine([x_arr.shape[1], *map(int, hidden), n_classes], "ft-all", batch_size=batch_size,
                           n_samples=len(x_arr), optimizer=optimizer, what="pre-training")
        backbone = Backbone.build([x_arr.shape[1], *hidden, n_classes], activation=activation, seed=seed,
                                  labels=labels)
        backbone.fit_normalizer(x_arr)
    tuner = FineTuner(backbone, "ft-all", epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      momentum=momentum, seed=seed, patience=patience, progress=progress)
    tuner.fit(x_arr, y_arr, x_val=x_val, y_val=y_val)
    trained = tuner.method.backbone.copy()  # detach from the optimizer's flat buffer
    assert tuner.history_ is not None
    return trained, tuner.history_
