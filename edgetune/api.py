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
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

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


class FineTuner:
    """Fine-tune a backbone with one method; scikit-learn style ``fit/predict/score``.

    ``method`` is a name from ``edgetune methods``; ``rank``/``alpha`` follow PEFT (scale
    alpha/rank, default alpha = rank). ``scheme`` (and ``qas``) choose the ``sparse``
    method's update scheme, e.g. ``"b2,w-1:1/2"``; other methods refuse them. The backbone
    passed in is never modified: methods that train backbone tensors work on a copy (see
    ``merged()``). ``engine`` runs the epochs: 'auto' (the compiled C engine when built,
    else NumPy; also what None means unless ``EDGETUNE_ENGINE`` says otherwise), 'c' or
    'numpy'. ``cache_fill`` ('eager' or 'lazy') fills the skip-cache before the first batch
    or as batches come (same math).
    """

    def __init__(self, backbone: Backbone, method: str = "skip2-lora", *, rank: int = 1,
                 alpha: float | None = None, train_last_bias: bool = False,
                 cache_budget: int | str | None = None, cache_overflow: str = "error",
                 cache_fill: str = "eager", scheme: str | None = None, qas: bool | None = None,
                 epochs: int = 100, batch_size: int = 20, lr: float = 0.01, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 patience: int | None = None, progress: bool | None = False, engine: str | None = None):
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
        x, y = validate_xy(x, y, n_classes=self.backbone.sizes[-1], what=what)
        return self.backbone.prepare(x, f"{what} x"), y

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
                            checkpoint_every=checkpoint_every, engine=self.engine)
        return self

    def decision_function(self, x: Any) -> np.ndarray:
        return predict_logits(self.method, self.backbone.prepare(x))

    def predict_proba(self, x: Any) -> np.ndarray:
        return softmax(self.decision_function(x))

    def predict(self, x: Any) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)

    def score(self, x: Any, y: Any) -> float:
        """Accuracy on ``x``, ``y``."""
        xp, yp = self._xy(x, y, "evaluation data")
        return evaluate(self.method, xp, yp)[1]

    def merged(self) -> Backbone:
        """A plain backbone that computes the fine-tuned model (no adapter at run time)."""
        return self.method.merged_backbone()

    # -- adapter files -----------------------------------------------------------------
    def save_adapter(self, path: str | os.PathLike, *, format: str = "edgetune") -> Path:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into directory ``path``.

        ``format="peft"`` (``lora-all``/``lora-last`` only) writes Hugging Face PEFT's key
        names and config, loadable by PEFT onto ``edgetune.torch.to_torch(backbone)`` and
        by ``load_adapter``; see ``edgetune.peft_format``.
        """
        from .io_atomic import write_dir_atomic

        return write_dir_atomic(path, self.adapter_files(format=format))

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
        if cfg.get("base_model_sizes") != backbone.sizes:
            raise ModelFileError(f"adapter was made for a backbone of sizes {cfg.get('base_model_sizes')}, "
                                 f"this backbone has {backbone.sizes}")
        if strict and cfg.get("base_model_digest") != backbone.digest():
            raise BackboneMismatch("adapter was trained on a different backbone (same shape, other weights); "
                                   "pass strict=False to load it anyway")
        try:
            method_class(cfg["method"])
            tuner = cls(backbone, cfg["method"], rank=int(cfg.get("r", 1)), alpha=cfg.get("lora_alpha"),
                        train_last_bias=bool(cfg.get("train_last_bias", False)), scheme=cfg.get("scheme"),
                        qas=cfg.get("qas"), **train_options)
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise ModelFileError(f"{cfg_path}: bad adapter config ({e})") from None
        tensors, _ = loads(blob, str(w_path))
        tuner.method.load_adapter_tensors(tensors)
        return tuner


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
