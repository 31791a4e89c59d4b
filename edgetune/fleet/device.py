"""One device's side of a fleet: its data, its FineTuner kept across rounds, its own state.

NumPy only (no Flower here). The Flower ClientApp (``apps.py``) hands each round's global
adapter to a ``DeviceTrainer`` and sends back what it returns.

Why the FineTuner is kept: with ``skip2-lora`` the skip-cache fills during the device's
first round, and every later round reads the frozen activations from it, so the device
never runs its backbone again. The trainer lives in a process-wide registry (the
simulation engine runs many rounds of a device in one process). Flower's deployment
runtime starts a fresh ClientApp process for every message, so a device also keeps its
state in a directory of its own (``state_dir``): the skip-cache rows, written once when
full, and its personal tensors, written every round. A fresh process, a restarted
client or a restarted server therefore find the cache and the personal tensors again.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import unwritable
from ..errors import UsageError
from ..nn.mlp import Backbone
from .aggregate import Tensors, payload_bytes
from .partition import DeviceData

# Methods whose trainable tensors are small enough to send every round.
FLEET_METHODS = ("skip2-lora", "skip-lora", "lora-all", "lora-last", "ft-last", "ft-bias")
PERSONAL = ("none", "bias")


@dataclass(frozen=True)
class TrainSpec:
    """What the server asks every device to do in a round (sent in its config)."""
    method: str = "skip2-lora"
    rank: int = 1
    epochs: int = 20
    batch_size: int = 20
    lr: float = 0.01
    seed: int = 0
    personal: str = "none"      # "bias": the last layer's bias (or bias delta) stays on the device
    keep_cache: bool = True     # False: a fresh FineTuner every round (the comparison without the cache)

    def __post_init__(self) -> None:
        if self.method not in FLEET_METHODS:
            raise UsageError(f"method {self.method!r} does not suit a fleet: use one of {', '.join(FLEET_METHODS)} "
                             f"(their trainable tensors are small enough to send every round)")
        if self.personal not in PERSONAL:
            raise UsageError(f"personal must be one of {', '.join(PERSONAL)}, got {self.personal!r}")

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainSpec":
        kw = {}
        for f in cls.__dataclass_fields__:
            key = f.replace("_", "-")
            if key in cfg:
                kw[f] = cfg[key]
        for f, typ in (("rank", int), ("epochs", int), ("batch_size", int), ("seed", int), ("lr", float)):
            if f in kw:
                kw[f] = typ(kw[f])
        if "keep_cache" in kw:
            kw["keep_cache"] = bool(kw["keep_cache"])
        return cls(**kw)


def read_only_copy(backbone: Backbone) -> Backbone:
    """A copy of a float backbone whose every tensor no one can write (``cache.unwritable``);
    an int8 backbone as it is (its key is a hash every call either way)."""
    if backbone.is_int8:
        return backbone
    from ..nn.layers import Layer

    def ro(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else unwritable(a)

    layers = [Layer(layer.spec, ro(layer.weight), ro(layer.bias)) for layer in backbone.layers]
    return Backbone.from_layers(layers, labels=backbone.labels, input_mean=ro(backbone.input_mean),
                                input_std=ro(backbone.input_std), activation=backbone.activation.name)


def make_tuner(backbone: Backbone, spec: TrainSpec):
    from ..api import FineTuner

    return FineTuner(backbone, spec.method, rank=spec.rank, train_last_bias=spec.personal == "bias"
                     and spec.method not in ("ft-last", "ft-bias"),
                     epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed)


def personal_keys(names: list[str] | set[str], spec: TrainSpec, n_layers: int) -> set[str]:
    """The tensors that stay on the device (never sent, never averaged)."""
    if spec.personal == "none":
        return set()
    return {k for k in names if k == "head.bias_delta" or k == f"layers.{n_layers - 1}.bias"}


def global_tensors(backbone: Backbone, spec: TrainSpec) -> Tensors:
    """The initial global adapter: what every device starts from (the personal part left out)."""
    t = make_tuner(backbone, spec).method.adapter_tensors()
    keep = personal_keys(set(t), spec, backbone.n_layers)
    return {k: v for k, v in t.items() if k not in keep}


class DeviceTrainer:
    """A device: trains the global adapter on its own data, keeps its cache and personal part."""

    def __init__(self, backbone: Backbone, data: DeviceData, spec: TrainSpec, state_dir: str | Path | None = None):
        # The device's own read-only copy of the backbone, as a device that loaded it from its file
        # holds it: no one can change it between rounds, so each round's backbone key check is a
        # check of identity, not a comparison of every weight (the caller's object stays theirs).
        self.backbone, self.data, self.spec = read_only_copy(backbone), data, spec
        # The device's samples as arrays no one can write: each round's fit checks them once, not again.
        self._x, self._y = unwritable(data.x_train), unwritable(data.y_train)
        self._x_test, self._y_test = unwritable(data.x_test), unwritable(data.y_test)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.tuner = make_tuner(self.backbone, spec)
        names = set(self.tuner.method.adapter_tensors())
        self.personal_names = personal_keys(names, spec, backbone.n_layers)
        self.personal: Tensors = {k: v for k, v in self.tuner.method.adapter_tensors().items()
                                  if k in self.personal_names}
        self.rounds_trained = 0
        self._cache_saved = False
        self._load_state()

    # -- the rounds ----------------------------------------------------------------------
    def _load_global(self, tensors: Tensors) -> None:
        full = self.tuner.method.adapter_tensors()
        full.update({k: np.asarray(v, full[k].dtype) if k in full else v for k, v in tensors.items()})
        full.update(self.personal)
        self.tuner.method.load_adapter_tensors(full)

    def train(self, tensors: Tensors) -> tuple[Tensors, dict[str, float]]:
        """One round: start from the global ``tensors``, fine-tune locally, return the update."""
        if not self.spec.keep_cache:  # the comparison: nothing kept but the adapter itself
            self.tuner = make_tuner(self.backbone, self.spec)
        self._load_global(tensors)
        t0 = time.perf_counter()
        self.tuner.fit(self._x, self._y)
        seconds = time.perf_counter() - t0
        out = self.tuner.method.adapter_tensors()
        self.personal = {k: out[k] for k in self.personal_names}
        wire = {k: v for k, v in out.items() if k not in self.personal_names}
        self.rounds_trained += 1
        hist = self.tuner.history_
        stats = dict(hist.cache) if hist is not None and hist.cache else {}
        metrics = {
            "num-examples": int(len(self.data.y_train)),
            "train-seconds": float(seconds),
            "local-accuracy-after-training": float(self.tuner.score(self._x_test, self._y_test)),
            "cache-hits": int(stats.get("cache_hits", 0)),
            "cache-misses": int(stats.get("cache_misses", 0)),
            "bytes-up": payload_bytes(wire),
            "rounds-trained": self.rounds_trained,
        }
        self._save_state()
        return wire, metrics

    def evaluate(self, tensors: Tensors) -> dict[str, float]:
        """Accuracy on the device's own test data of the global adapter plus its personal part."""
        self._load_global(tensors)
        return {"num-examples": int(len(self.data.y_test)),
                "accuracy": float(self.tuner.score(self._x_test, self._y_test))}

    # -- the device's own files ----------------------------------------------------------
    def _state_file(self, name: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / name

    def _identity(self) -> dict[str, Any]:
        from ..cache import data_digest

        return {"backbone": self.backbone.digest(), "data": data_digest(self.data.x_train, self.data.y_train),
                "spec": self.spec.to_config()}

    def _save_state(self) -> None:
        if self.state_dir is None:
            return
        from ..io_atomic import write_atomic, write_json_atomic

        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_dir / "personal.npz", lambda f: np.savez(f, **self.personal))
        write_json_atomic(self.state_dir / "device.json", {**self._identity(), "rounds_trained": self.rounds_trained})
        cache = getattr(self.tuner.method, "cache", None)
        if self.spec.keep_cache and cache is not None and not self._cache_saved and cache.complete \
                and hasattr(cache, "data"):
            write_atomic(self.state_dir / "skip_cache.npz", lambda f: np.savez(
                f, data=cache.data, filled=cache.filled, key=np.array(list(cache.key))))
            self._cache_saved = True

    def _load_state(self) -> None:
        meta = self._state_file("device.json")
        if meta is None or not meta.is_file():
            return
        try:
            saved = json.loads(meta.read_text())
        except (OSError, ValueError):
            return  # unreadable state is rebuilt, never trusted
        if saved.get("backbone") != self._identity()["backbone"] or saved.get("data") != self._identity()["data"] \
                or saved.get("spec") != self.spec.to_config():
            return
        self.rounds_trained = int(saved.get("rounds_trained", 0))
        try:
            with np.load(self.state_dir / "personal.npz") as z:
                loaded = {k: z[k] for k in z.files}
            if set(loaded) == self.personal_names:
                self.personal = loaded
        except (OSError, ValueError):
            pass
        if self.spec.keep_cache:
            self._load_cache()

    def _load_cache(self) -> None:
        """Put the saved skip-cache rows back (the key check in ``fit`` still guards them)."""
        from ..cache import SkipCache

        method = self.tuner.method
        f = self._state_file("skip_cache.npz")
        if not getattr(method, "uses_cache", False) or f is None or not f.is_file():
            return
        try:
            with np.load(f) as z:
                data, filled, key = z["data"], z["filled"], tuple(str(k) for k in z["key"])
        except (OSError, ValueError, KeyError):
            return
        if data.shape[0] != len(self.data.y_train) or data.shape[1] != getattr(method, "row_width", -1) \
                or data.dtype != self.backbone.dtype:
            return
        cache = SkipCache(data.shape[0], data.shape[1], data.dtype)
        cache.data[...] = data
        cache.filled[...] = filled
        cache.key = key
        cache.complete = bool(filled.all())
        method.cache = cache
        self._cache_saved = True


# Devices alive in this process, so that a device's FineTuner (and its cache) outlives a round.
_REGISTRY: dict[tuple, DeviceTrainer] = {}


def get_device(key: tuple, build) -> DeviceTrainer:
    """The device registered under ``key``, made by ``build()`` the first time."""
    dev = _REGISTRY.get(key)
    if dev is None:
        dev = _REGISTRY[key] = build()
    return dev
