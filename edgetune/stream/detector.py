"""``AnomalyDetector``: learned from normal data only, in scikit-learn's novelty conventions.

- ``fit(x_normal)``; ``partial_fit(x)`` learns only the samples well inside the threshold
  (error / threshold <= ``learn_below``, 0.8 by default): a sample flagged as anomalous is
  never learned as normal, nor is one just under the threshold (on the fan stream of
  docs/anomaly.md, learning everything under the threshold let damaged spectra near it in
  one by one, and the detector's TPR fell from 0.96 to 0.81);
- ``score_samples(x)``: higher is more normal; it is ``-(error / threshold)`` of the
  environment that explains the sample best, so ``-1`` is the alarm boundary;
- ``decision_function(x) = score_samples(x) - offset_`` (``offset_ = -1``); ``predict(x)``
  is +1 (inlier) where the decision is >= 0, else -1 (outlier).

The threshold comes from normal data alone, with no guess of how much is anomalous:
``fit`` learns the normal samples in a seeded random order, scores every chunk *before*
learning it (test-then-train, so every calibration score is out of sample), and sets the
threshold at the ``1 - fpr`` point of those errors: the empirical quantile
(``threshold="quantile"``), a gamma fit of them (``"gamma"``, as the DCASE baselines do) or
mean + z std (``"ksigma"``). ``adapt`` recalibrates its own environment.

An *environment* is one learned room: its input standardisation, its OS-ELM autoencoder and
its threshold. ``adapt(x_new_normal)`` adds a new environment beside the old ones, so the
old room is not forgotten: a sample is normal if any environment finds it normal.

``transform="log"`` learns ``log(x + 0.001)`` of non-negative inputs: on the cooling-fan
spectra it lifts the AUC (docs/anomaly.md); the default ``"none"`` takes any real input.
``bands=B`` first averages the inputs over B equal groups of adjacent features (frequency
bands of a spectrum, before the log): a spectrum's fine bins are noisy, the bands carry its
shape, and the autoencoder and its state shrink with them (docs/anomaly.md: 64 bands of the
fans' 512 bins lift the AUC on every damage task and cut the state 4x).

Kinds:
- ``"oselm"``: an OS-ELM autoencoder over the standardised input (reconstruction error);
- ``"backbone"``: the same autoencoder over a frozen backbone's hidden activations (the
  features its skip-cache rows hold), ``backbone=`` a :class:`edgetune.Backbone`.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from ..errors import DataError, ModelFileError, UsageError
from .drift import PageHinkley
from .oselm import ACTIVATIONS, OSELM

KINDS = ("oselm", "backbone")
THRESHOLDS = ("quantile", "gamma", "ksigma")
RELEARN = ("confirm", "auto")
TRANSFORMS = ("none", "log")
LOG_EPS = 1e-3
FORMAT = "edgetune-detector"
FORMAT_VERSION = 1
CONFIG_NAME = "detector_config.json"
WEIGHTS_NAME = "detector.safetensors"
MIN_SAMPLES = 10


def _int(lo: int, hi: int | None = None):
    return lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _num(lo: float, hi: float, lo_open: bool = True, hi_open: bool = False):
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


# name -> (check, what a valid value is): checked once, in fit, for every parameter.
_parameter_constraints: dict[str, tuple[Any, str]] = {
    "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "transform": (lambda v: v in TRANSFORMS, f"one of {', '.join(TRANSFORMS)}"),
    "n_hidden": (_int(1, 4096), "a whole number in 1..4096"),
    "bands": (lambda v: v is None or _int(1, 1 << 20)(v), "None or a whole number >= 1"),
    "seed": (_int(0, 2 ** 32 - 1), "a whole number in 0..2**32-1"),
    "delta": (_num(0, 1e12), "a positive number (the ridge regularisation)"),
    "forgetting": (_num(0, 1), "a number in (0, 1]"),
    "activation": (lambda v: v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
    "threshold": (lambda v: v in THRESHOLDS, f"one of {', '.join(THRESHOLDS)}"),
    "fpr": (_num(0, 0.5, hi_open=True), "a false-positive rate in (0, 0.5)"),
    "drift_threshold": (_num(0, 1e12), "a positive number"),
    "drift_delta": (_num(0, 1e12, lo_open=False), "a non-negative number"),
    "relearn": (lambda v: v in RELEARN, f"one of {', '.join(RELEARN)}"),
    "relearn_samples": (_int(MIN_SAMPLES), f"a whole number >= {MIN_SAMPLES}"),
    "max_environments": (_int(1, 64), "a whole number in 1..64"),
    "learn_below": (_num(0, 1), "a number in (0, 1]"),
}


@dataclass
class Environment:
    """One learned room: standardisation, autoencoder, threshold (a reconstruction error)."""
    mean: np.ndarray
    std: np.ndarray
    model: OSELM
    threshold: float
    n_fit: int

    def errors(self, f: np.ndarray) -> np.ndarray:
        z = (f - self.mean) / self.std
        return np.mean((self.model.predict(z) - z) ** 2, axis=1)


def threshold_from(errors: np.ndarray, method: str, fpr: float) -> float:
    """The error above which a normal sample is flagged with probability ``fpr``."""
    e = np.asarray(errors, np.float64)
    if method == "quantile":
        return float(np.quantile(e, 1.0 - fpr, method="higher"))
    z = NormalDist().inv_cdf(1.0 - fpr)
    mean, std = float(e.mean()), float(e.std())
    if method == "ksigma" or std == 0:
        return mean + z * std
    # gamma by the method of moments, its quantile by Wilson-Hilferty (no SciPy needed)
    k, theta = (mean / std) ** 2, std ** 2 / mean
    c = 1.0 / (9.0 * k)
    return float(k * theta * max(1.0 - c + z * math.sqrt(c), 0.0) ** 3)


class AnomalyDetector:
    """A detector of anomalies learned from normal data only (see the module text)."""

    offset_ = -1.0

    def __init__(self, kind: str = "oselm", *, transform: str = "none", bands: int | None = None, n_hidden: int = 64,
                 seed: int = 0, delta: float = 1.0,
                 forgetting: float = 1.0, activation: str = "sigmoid", threshold: str = "quantile",
                 fpr: float = 0.05, backbone: Any = None, drift_threshold: float = 50.0,
                 drift_delta: float = 0.1, relearn: str = "confirm", relearn_samples: int = 100,
                 max_environments: int = 4, learn_below: float = 0.8):
        self.kind, self.transform, self.bands = kind, transform, bands
        self.n_hidden, self.seed, self.delta = n_hidden, seed, delta
        self.forgetting, self.activation, self.threshold, self.fpr = forgetting, activation, threshold, fpr
        self.backbone = backbone
        self.drift_threshold, self.drift_delta = drift_threshold, drift_delta
        self.relearn, self.relearn_samples, self.max_environments = relearn, relearn_samples, max_environments
        self.learn_below = learn_below

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> None:
        for name, (ok, what) in _parameter_constraints.items():
            v = getattr(self, name)
            if not ok(v):
                raise UsageError(f"AnomalyDetector: {name} must be {what}, got {v!r}")
        if self.kind == "backbone":
            from ..nn.mlp import Backbone
            if not isinstance(self.backbone, Backbone):
                raise UsageError("AnomalyDetector(kind='backbone') needs backbone=<an edgetune.Backbone>")
            if self.backbone.n_layers < 2:
                raise UsageError("kind='backbone' reads hidden activations: the backbone needs >= 2 layers")
        elif self.backbone is not None:
            raise UsageError(f"backbone= is only used by kind='backbone', not kind={self.kind!r}")
        if self.bands is not None and self.kind == "backbone":
            raise UsageError("bands= is for kind='oselm' (a backbone reads the inputs it was trained on)")

    def _check_fitted(self) -> None:
        if not getattr(self, "environments_", None):
            raise UsageError("this AnomalyDetector is not fitted yet: call fit(x_normal) first")

    def _check_x(self, x: Any, what: str, *, allow_nonfinite: bool = False, dtype: Any = np.float64) -> np.ndarray:
        try:
            x = np.asarray(x)
        except ValueError as e:
            raise DataError(f"{what}: x must be a rectangular array ({e})") from None
        if x.ndim == 1 and hasattr(self, "n_features_in_"):
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] == 0:
            raise DataError(f"{what}: x must be a 2-D array (samples, features) with samples, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{what}: x must be real numbers, got dtype {x.dtype}")
        n_in = getattr(self, "n_features_in_", None)
        if n_in is not None and x.shape[1] != n_in:
            raise DataError(f"{what}: x has {x.shape[1]} features, the detector was fitted on {n_in}")
        if not allow_nonfinite and not np.all(np.isfinite(x)):
            bad = np.argwhere(~np.isfinite(x))[0]
            raise DataError(f"{what}: x contains NaN or inf (first at sample {bad[0]}, feature {bad[1]})")
        return x.astype(dtype, copy=False)

    # ------------------------------------------------------------------ features
    def band_edges(self) -> np.ndarray:
        """Feature index where each band starts, and the end: ``bands + 1`` whole numbers."""
        return np.linspace(0, self.n_features_in_, self.bands + 1).round().astype(np.int64)

    def _band(self, x: np.ndarray) -> np.ndarray:
        if self.bands is None:
            return x
        if x.shape[1] % self.bands == 0:   # equal bands: a reshape (the fast path of a stream)
            w = x.shape[1] // self.bands
            acc = x[:, 0::w].copy()
            for i in range(1, w):
                acc += x[:, i::w]
            return acc / x.dtype.type(w)
        e = self.band_edges()
        return np.add.reduceat(x, e[:-1], axis=1) / np.diff(e).astype(x.dtype)

    def _features(self, x: np.ndarray) -> np.ndarray:
        x = self._band(x)
        if self.transform == "log":
            if np.any(x < 0):
                raise DataError("transform='log' takes non-negative inputs (amplitude spectra); "
                                "this x has negative values")
            x = np.log(x + LOG_EPS)
        if self.kind == "oselm":
            return x
        bb = self.backbone
        taps = bb.forward_taps(bb.prepare(x))
        sizes = bb.sizes
        return np.asarray(taps[:, sizes[0]:sum(sizes[:-1])], np.float64)

    # ------------------------------------------------------------------ learning
    def _new_environment(self, f: np.ndarray) -> Environment:
        n = f.shape[0]
        if n < MIN_SAMPLES:
            raise DataError(f"learning an environment needs at least {MIN_SAMPLES} normal samples, got {n}")
        mean = f.mean(axis=0)
        std = f.std(axis=0)
        std[std < 1e-8] = 1.0                      # a constant feature is left unscaled
        d = f.shape[1]
        model = OSELM(d, d, self.n_hidden, seed=self.seed, delta=self.delta, forgetting=self.forgetting,
                      activation=self.activation)
        env = Environment(mean, std, model, math.inf, n)
        z = (f - mean) / std
        order = np.random.default_rng(self.seed).permutation(n)
        z = z[order]
        # test-then-train: boot on the first half, then score each chunk before learning it
        boot = max(n // 2, 1)
        model.fit(z[:boot], z[:boot])
        step = max(1, (n - boot) // 16)
        cal = []
        for lo in range(boot, n, step):
            chunk = z[lo:lo + step]
            cal.append(np.mean((model.predict(chunk) - chunk) ** 2, axis=1))
            model.partial_fit(chunk, chunk)
        env.threshold = threshold_from(np.concatenate(cal), self.threshold, self.fpr)
        if not (math.isfinite(env.threshold) and env.threshold > 0):
            raise DataError("the normal data give no usable threshold (all reconstruction errors are 0?)")
        return env

    def fit(self, x: Any, y: Any = None) -> "AnomalyDetector":
        """Learn from normal samples only (``y`` is ignored, as in scikit-learn's novelty API)."""
        self._validate_params()
        for name in ("n_features_in_",):
            self.__dict__.pop(name, None)
        x = self._check_x(x, "fit")
        if self.kind == "backbone" and x.shape[1] != self.backbone.sizes[0]:
            raise DataError(f"fit: x has {x.shape[1]} features, the backbone takes {self.backbone.sizes[0]}")
        if self.bands is not None and self.bands > x.shape[1]:
            raise UsageError(f"bands={self.bands} needs at least as many features; x has {x.shape[1]}")
        self.n_features_in_ = x.shape[1]
        self.environments_ = [self._new_environment(self._features(x))]
        self._drift = PageHinkley(delta=self.drift_delta, threshold=self.drift_threshold)
        self._pending: list[np.ndarray] | None = None
        self.n_learned_ = 0
        self.n_refused_ = 0
        return self

    def adapt(self, x_normal: Any) -> "AnomalyDetector":
        """Learn a new environment from its normal samples, beside the ones already learned."""
        self._check_fitted()
        x = self._check_x(x_normal, "adapt")
        if len(self.environments_) >= self.max_environments:
            raise UsageError(f"the detector already holds {len(self.environments_)} environments "
                             f"(max_environments={self.max_environments})")
        self.environments_.append(self._new_environment(self._features(x)))
        self._drift.reset()
        return self

    def _relearn(self, x: np.ndarray) -> None:
        """The automatic re-learning after a change: nobody vouched for these samples, so each
        half is scored by an environment learned from the other half (out of sample: an
        autoencoder reconstructs what it has learned, damage included), the samples either
        flags are left out, and the new environment is learned from the rest."""
        f = self._features(x)
        n = f.shape[0]
        keep = np.ones(n, bool)
        if n >= 4 * MIN_SAMPLES:
            order = np.random.default_rng(self.seed + 1).permutation(n)
            halves = (order[: n // 2], order[n // 2:])
            for a, b in (halves, halves[::-1]):
                env = self._new_environment(f[a])
                keep[b] = env.errors(f[b]) <= env.threshold
        env = self._new_environment(f[keep] if keep.sum() >= MIN_SAMPLES else f)
        self.environments_.append(env)
        self._drift.reset()

    def _ratios(self, f: np.ndarray) -> np.ndarray:
        """(n, environments) reconstruction error / threshold."""
        return np.stack([env.errors(f) / env.threshold for env in self.environments_], axis=1)

    def partial_fit(self, x: Any, y: Any = None) -> "AnomalyDetector":
        """Learn the samples well inside the threshold into the environment that explains each best."""
        self._check_fitted()
        x = self._check_x(x, "partial_fit")
        f = self._features(x)
        r = self._ratios(f)
        best = r.argmin(axis=1)
        normal = r[np.arange(len(r)), best] <= self.learn_below
        for k, env in enumerate(self.environments_):
            rows = f[normal & (best == k)]
            if len(rows):
                z = (rows - env.mean) / env.std
                env.model.partial_fit(z, z)
                self.n_learned_ += len(rows)
        return self

    # ------------------------------------------------------------------ scoring
    def score_samples(self, x: Any) -> np.ndarray:
        """Higher is more normal: -(error / threshold) in the best-fitting environment."""
        self._check_fitted()
        return -self._ratios(self._features(self._check_x(x, "score_samples"))).min(axis=1)

    def decision_function(self, x: Any) -> np.ndarray:
        return self.score_samples(x) - self.offset_

    def predict(self, x: Any) -> np.ndarray:
        """+1 for inliers (normal), -1 for outliers (anomalies)."""
        return np.where(self.decision_function(x) >= 0, 1, -1)

    # ------------------------------------------------------------------ streaming
    def learn_one(self, x: Any) -> dict[str, Any]:
        """Score one sample, then learn it if normal; watch the scores for a change of room.

        Returns ``{"score", "alarm", "drift", "learned", "environment", "relearning"}``. A
        sample with NaN or inf is refused (``"refused": True``), never learned. On a sustained
        rise of the scores ``drift`` is True once; with ``relearn="auto"`` the next
        ``relearn_samples`` samples then become a new environment (``relearning`` counts
        them; the ones the new environment flags are left out); with ``"confirm"`` the detector only reports it (``adapt`` is the user's call).
        """
        self._check_fitted()
        x = self._check_x(x, "learn_one", allow_nonfinite=True)
        if x.shape[0] != 1:
            raise DataError(f"learn_one takes one sample, got {x.shape[0]}")
        if not np.all(np.isfinite(x)):
            self.n_refused_ += 1
            return {"score": None, "alarm": None, "drift": False, "learned": False, "environment": None,
                    "refused": True}
        f = self._features(x)
        r = self._ratios(f)[0]
        k = int(r.argmin())
        ratio = float(r[k])
        alarm = ratio > 1.0
        out: dict[str, Any] = {"score": -ratio, "alarm": bool(alarm), "drift": False, "learned": False,
                               "environment": k}
        if self._pending is not None:  # relearning after a change: these samples are the new room
            self._pending.append(x[0])
            out["relearning"] = len(self._pending)
            if len(self._pending) >= self.relearn_samples:
                self._relearn(np.stack(self._pending))
                self._pending = None
                out["new_environment"] = len(self.environments_) - 1
            return out
        if self._drift.update(ratio):
            out["drift"] = True
            if self.relearn == "auto" and len(self.environments_) < self.max_environments:
                self._pending = []
            return out
        if ratio <= self.learn_below:
            env = self.environments_[k]
            z = (f - env.mean) / env.std
            if env.model._update_hidden(env.model.hidden(z)[0], z[0]):
                out["learned"] = True
                self.n_learned_ += 1
            else:
                self.n_refused_ += 1
        return out

    def learn_many(self, x: Any, *, engine: str = "auto") -> dict[str, np.ndarray]:
        """:meth:`learn_one` over the rows of x in order, with the same rules (a flagged sample
        is never learned, the change detector sees every scored sample), as arrays: ``score``
        (NaN where refused), ``alarm``, ``drift``, ``learned``, ``refused``, ``environment``
        (-1 where refused) and ``relearning`` (the sample was kept for a new environment).

        ``engine="auto"`` runs the loop in the compiled engine when it is built (float32: the
        scores equal the NumPy loop's within float tolerance, and the state copied back is
        rounded to float32), ``"c"`` requires it, ``"numpy"`` calls :meth:`learn_one` per row.
        """
        self._check_fitted()
        if engine not in ("auto", "c", "numpy"):
            raise UsageError(f"engine must be auto, c or numpy, got {engine!r}")
        stream = None if engine == "numpy" else self._native_stream(required=engine == "c")
        x = self._check_x(x, "learn_many", allow_nonfinite=True,
                          dtype=np.float64 if stream is None else np.float32)
        n = x.shape[0]
        out = {"score": np.full(n, np.nan), "alarm": np.zeros(n, bool), "drift": np.zeros(n, bool),
               "learned": np.zeros(n, bool), "refused": np.zeros(n, bool), "environment": np.full(n, -1),
               "relearning": np.zeros(n, bool)}
        i = 0
        while i < n:
            if stream is None or self._pending is not None:
                o = self.learn_one(x[i])
                if o.get("refused"):
                    out["refused"][i] = True
                else:
                    out["score"][i], out["alarm"][i], out["drift"][i] = o["score"], o["alarm"], o["drift"]
                    out["learned"][i], out["environment"][i] = o["learned"], o["environment"]
                    out["relearning"][i] = "relearning" in o
                i += 1
                continue
            i = self._learn_native(stream, x, i, out)
        return out

    def learn_rows(self, x: Any, *, engine: str = "auto") -> list[dict[str, Any]]:
        """:meth:`learn_many` with :meth:`learn_one`'s result per row: one dict each, with the
        same keys (``relearning`` counts the samples kept for a new environment, and
        ``new_environment`` marks the sample that completes it). Rows run in the compiled
        loop where :meth:`learn_many` runs them (scores within float32 tolerance of
        :meth:`learn_one`'s); the samples of a re-learning, through :meth:`learn_one` on x as
        given. ``engine="numpy"`` is :meth:`learn_one` on every row."""
        self._check_fitted()
        if engine not in ("auto", "c", "numpy"):
            raise UsageError(f"engine must be auto, c or numpy, got {engine!r}")
        stream = None if engine == "numpy" else self._native_stream(required=engine == "c")
        x = self._check_x(x, "learn_rows", allow_nonfinite=True)
        n = x.shape[0]
        if stream is None:
            return [self.learn_one(row) for row in x]
        x32 = x.astype(np.float32)
        out = {"score": np.full(n, np.nan), "alarm": np.zeros(n, bool), "drift": np.zeros(n, bool),
               "learned": np.zeros(n, bool), "refused": np.zeros(n, bool), "environment": np.full(n, -1),
               "relearning": np.zeros(n, bool)}
        res: list[dict[str, Any]] = []
        i = 0
        while i < n:
            if self._pending is not None:
                res.append(self.learn_one(x[i]))
                i += 1
                continue
            j = self._learn_native(stream, x32, i, out)
            for k in range(i, j):
                if out["refused"][k]:
                    res.append({"score": None, "alarm": None, "drift": False, "learned": False,
                                "environment": None, "refused": True})
                else:
                    res.append({"score": float(out["score"][k]), "alarm": bool(out["alarm"][k]),
                                "drift": bool(out["drift"][k]), "learned": bool(out["learned"][k]),
                                "environment": int(out["environment"][k])})
            i = j
        return res

    _CHUNK = 256   # rows transformed per C call: the float32 features stay in the cache

    def _learn_native(self, stream: Any, x: np.ndarray, i: int, out: dict[str, np.ndarray]) -> int:
        """learn_many's rows i.. in C, until the end or a change that starts a re-learning;
        returns the next row."""
        from .native import ALARM, DRIFT, LEARNED, NOT_FINITE, UPDATE_REFUSED

        n = x.shape[0]
        auto = self.relearn == "auto" and len(self.environments_) < self.max_environments
        stream.load()
        try:
            while i < n:
                rows = x[i:i + self._CHUNK]
                if self.kind == "oselm":   # in float32; C refuses the rows with NaN or inf
                    if self.transform == "log":
                        if not rows.min() >= 0 and np.any((rows < 0) & np.isfinite(rows).all(axis=1)[:, None]):
                            raise DataError("transform='log' takes non-negative inputs (amplitude spectra); "
                                            "this x has negative values")
                        with np.errstate(invalid="ignore"):
                            f = np.log(self._band(rows) + np.float32(LOG_EPS))
                    else:
                        f = self._band(rows)
                else:
                    finite = np.isfinite(rows).all(axis=1)
                    f = self._features(np.where(finite[:, None], rows, 0.0).astype(np.float64))
                    f[~finite] = np.nan                      # refused in C, as learn_one refuses it
                done, ratio, env, flags = stream.run(f, self._drift, stop_on_drift=auto)
                sl = slice(i, i + done)
                bad = (flags & NOT_FINITE) != 0
                out["score"][sl] = np.where(bad, np.nan, -ratio)
                out["alarm"][sl] = (flags & ALARM) != 0
                out["drift"][sl] = (flags & DRIFT) != 0
                out["learned"][sl] = (flags & LEARNED) != 0
                out["refused"][sl] = bad
                out["environment"][sl] = env
                self.n_learned_ += int(out["learned"][sl].sum())
                self.n_refused_ += int(bad.sum() + ((flags & UPDATE_REFUSED) != 0).sum())
                i += done
                if auto and done and out["drift"][i - 1]:
                    self._pending = []
                    break
        finally:
            stream.store()
        return i

    def _native_stream(self, required: bool) -> Any:
        """The compiled stream of this detector's environments (kept between calls), or None."""
        try:
            from .native import NativeStream
            if getattr(self, "_native", None) is None or self._native.det is not self:
                self._native = NativeStream(self)
            return self._native
        except ImportError:
            if required:
                raise
            return None

    # ------------------------------------------------------------------ files
    def _config(self) -> dict[str, Any]:
        params = {k: getattr(self, k) for k in _parameter_constraints}
        envs = [{"threshold": e.threshold, "n_fit": e.n_fit, "n_updates": e.model.n_updates_,
                 "n_refused": e.model.n_refused_} for e in self.environments_]
        cfg: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "params": params,
                               "n_features_in": self.n_features_in_, "environments": envs,
                               "drift": self._drift.state(), "n_learned": self.n_learned_,
                               "n_refused": self.n_refused_}
        if self.kind == "backbone":
            cfg["backbone"] = {"sizes": self.backbone.sizes, "activation": self.backbone.activation.name,
                               "labels": self.backbone.labels, "digest": self.backbone.digest()}
        return cfg

    def save(self, path: str | os.PathLike) -> Path:
        """A directory: ``detector.safetensors`` + ``detector_config.json`` (with the tensors'
        SHA-256), written as one set, and for ``kind="backbone"`` the backbone as a model
        directory ``backbone/`` (its digest in the config). The random input weights are not
        stored: the seed is."""
        from ..io_atomic import json_text, write_dir_atomic
        from ..safetensors import dumps

        self._check_fitted()
        tensors: dict[str, np.ndarray] = {}
        for k, e in enumerate(self.environments_):
            tensors[f"env.{k}.mean"], tensors[f"env.{k}.std"] = e.mean, e.std
            tensors[f"env.{k}.P"], tensors[f"env.{k}.beta"] = e.model.P_, e.model.beta_
        blob = dumps(tensors, {"format": FORMAT})
        cfg = self._config()
        cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        out = write_dir_atomic(path, {WEIGHTS_NAME: blob, CONFIG_NAME: json_text(cfg).encode()})
        if self.kind == "backbone":  # in its own format, beside; the config holds its digest
            self.backbone.save(Path(path) / "backbone")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AnomalyDetector":
        from ..io_atomic import read_json_config
        from ..safetensors import loads

        path = Path(path)
        if not path.is_dir():
            raise ModelFileError(f"detector directory not found: {path}")
        cfg, cfg_path, w_path = read_json_config(path, CONFIG_NAME, WEIGHTS_NAME, "an edgetune detector")
        if cfg.get("format") != FORMAT:
            raise ModelFileError(f"{cfg_path}: not an edgetune detector (format != '{FORMAT}')")
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFileError(f"{cfg_path}: format version {cfg['format_version']} is newer than this "
                                 f"edgetune reads ({FORMAT_VERSION})")
        blob = w_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != cfg.get("weights_sha256"):
            raise ModelFileError(f"{w_path} does not match {cfg_path.name} (checksum differs: a torn or "
                                 f"mixed save)")
        tensors, _ = loads(blob, str(w_path))
        try:
            params = dict(cfg["params"])
            n_in = int(cfg["n_features_in"])
            envs = list(cfg["environments"])
            backbone = None
            if params.get("kind") == "backbone":
                from ..nn.mlp import Backbone
                backbone = Backbone.load(path / "backbone")
                if backbone.digest() != cfg["backbone"]["digest"]:
                    raise ModelFileError(f"{path / 'backbone'} is not the backbone this detector was "
                                         f"learned on (digest differs)")
            det = cls(**params, backbone=backbone)
            det._validate_params()
            det.n_features_in_ = n_in
            det.environments_ = []
            for k, e in enumerate(envs):
                mean, std = tensors[f"env.{k}.mean"], tensors[f"env.{k}.std"]
                d = mean.shape[0]
                model = OSELM(d, d, det.n_hidden, seed=det.seed, delta=det.delta, forgetting=det.forgetting,
                              activation=det.activation)
                model.set_state(tensors[f"env.{k}.P"], tensors[f"env.{k}.beta"], e["n_updates"], e["n_refused"])
                det.environments_.append(Environment(mean.astype(np.float64), std.astype(np.float64), model,
                                                     float(e["threshold"]), int(e["n_fit"])))
            det._drift = PageHinkley(delta=det.drift_delta, threshold=det.drift_threshold)
            det._drift.set_state(cfg["drift"])
            det._pending = None
            det.n_learned_, det.n_refused_ = int(cfg["n_learned"]), int(cfg["n_refused"])
        except (KeyError, TypeError, ValueError, UsageError, DataError) as e:
            raise ModelFileError(f"{path}: the detector files do not fit together ({e})") from None
        if not det.environments_:
            raise ModelFileError(f"{cfg_path}: no environment learned")
        return det

    def __repr__(self) -> str:
        n = len(getattr(self, "environments_", []))
        return f"AnomalyDetector(kind={self.kind!r}, n_hidden={self.n_hidden}, environments={n})"
