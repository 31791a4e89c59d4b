"""A bank of per-domain adapters over one frozen backbone, with automatic domain routing.

    bank = et.AdapterBank(backbone, "skip2-lora", epochs=100)
    bank.learn("room-A", x_a, y_a).learn("room-B", x_b, y_b)   # one adapter each; others untouched
    bank.route(x)            # each sample's domain name
    bank.predict(x)          # route, then apply that domain's adapter
    bank.novelty(x)          # how unlike every known domain (high: learn a new one)
    bank.save("bank"); et.AdapterBank.load("bank", backbone)

The detector reads the frozen features the skip-cache holds (the rows of
``Backbone.forward_taps``), so routing costs a few dot products on top of the forward pass
that prediction runs anyway. Detectors (``detector=``):

- ``centroid``: nearest mean (squared Euclidean distance);
- ``mahalanobis``: Gaussians with one shared (pooled) covariance;
- ``diag``: the same with the shared covariance's diagonal only (F numbers, not F x F);
- ``relative``: routes as ``mahalanobis``; novelty is the relative Mahalanobis distance
  (the distance to the nearest domain less the distance to one Gaussian over all domains),
  which separates near domains better;
- ``energy``: the domain whose adapter gives the largest log-sum-exp of its logits.

Each domain is described by one mean per class it was learned with (``components="class"``,
the class-conditional Gaussians of Lee et al., NeurIPS 2018; a domain's distance is that of
its nearest class mean) or by one mean (``components="domain"``).
``window=w`` routes each sample with the summed scores of the last ``w`` samples
(samples arrive in order), for a device that stays in one environment for a while.
A skip adapter adds ``s * sum_k B_k A_k h_k`` to the frozen logits, so adapters mix by a
weighted sum of those deltas (``mix="soft"``, and ``learn_mix`` for a new domain with few
labels, which trains only the mixing coefficients).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .api import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FineTuner
from .data.task import validate_xy
from .errors import ModelFileError, UsageError
from .nn.losses import softmax
from .nn.mlp import Backbone

BANK_FILE = "bank.json"
DETECTOR_FILE = "detector.safetensors"
BANK_FORMAT = "edgetune-adapter-bank"
BANK_FORMAT_VERSION = 1
DETECTORS = ("centroid", "mahalanobis", "diag", "relative", "energy")
FEATURES = ("input", "hidden", "last", "taps")
COMPONENTS = ("class", "domain")
SKIP_METHODS = ("skip2-lora", "skip-lora")
BANK_METHODS = (*SKIP_METHODS, "lora-all", "lora-last")
NOVELTY_QUANTILE = 0.99
ADAPTER_OPTIONS = ("rank", "alpha", "train_last_bias", "scheme", "qas")  # read from each adapter's own file
SHRINKAGE = 0.1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


@dataclass
class DomainEntry:
    """One domain: an adapter (or mixing coefficients over other domains' adapters) and its statistics."""
    name: str
    tuner: FineTuner | None            # None for a mixed domain
    mix: dict[str, float] | None       # mixed domain: {adapter domain: coefficient}
    means: np.ndarray                  # (M, F) float64 means of the detector features, one per component
    counts: np.ndarray                 # (M,) samples per component
    classes: np.ndarray                # (M,) the class of each component (-1: the whole domain)
    threshold: float                   # novelty above this (for samples routed here) is novel
    data_sha256: str
    used: int = 0                      # samples routed here since the bank was made
    learned: dict[str, Any] = field(default_factory=dict)


def auroc(normal: np.ndarray, novel: np.ndarray) -> float:
    """Area under the ROC curve of scores where higher means novel (ties count one half).

    The Mann-Whitney statistic from average ranks: exact for any (unbounded) scores."""
    normal, novel = np.asarray(normal, np.float64), np.asarray(novel, np.float64)
    if normal.size == 0 or novel.size == 0:
        raise UsageError("auroc needs at least one normal and one novel score")
    allv = np.concatenate([normal, novel])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size)
    sorted_v = allv[order]
    i = 0
    while i < allv.size:  # average ranks over ties
        j = i
        while j + 1 < allv.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_novel = ranks[normal.size:].sum()
    return float((r_novel - novel.size * (novel.size + 1) / 2.0) / (normal.size * novel.size))


class AdapterBank:
    """Per-domain adapters on one frozen backbone, a domain detector, and routing.

    ``method`` is ``skip2-lora`` (default), ``skip-lora``, ``lora-all`` or ``lora-last``;
    other keyword arguments are FineTuner options (``epochs``, ``lr``, ``rank``, ...) used
    for every domain. ``detector`` and ``features`` choose the domain detector (see the
    module docstring; ``features``: ``input`` = normalised inputs, ``hidden`` = every
    hidden layer's output, ``last`` = the last hidden layer's output, ``taps`` = the
    whole skip-cache row; on a convolutional backbone the skip taps, ``Backbone.tap_widths``:
    the inputs of the layers with weights, pooled per channel where spatial). ``window`` is
    the default routing window (1 = per sample). ``lora-*`` banks need an MLP backbone.
    """

    def __init__(self, backbone: Backbone, method: str = "skip2-lora", *, detector: str = "mahalanobis",
                 features: str = "hidden", components: str = "class", window: int = 1, **options: Any):
        if not isinstance(backbone, Backbone):
            raise UsageError(f"backbone must be an edgetune Backbone, got {type(backbone).__name__}")
        if method not in BANK_METHODS:
            raise UsageError(f"an adapter bank takes method {', '.join(BANK_METHODS)}, got {method!r}")
        if detector not in DETECTORS:
            raise UsageError(f"unknown detector {detector!r}: use one of {', '.join(DETECTORS)}")
        if features not in FEATURES:
            raise UsageError(f"unknown features {features!r}: use one of {', '.join(FEATURES)}")
        if len(backbone.tap_layers) < 2 and features in ("hidden", "last"):
            raise UsageError(f"features={features!r} needs a hidden layer; this backbone has one layer with weights")
        if method not in SKIP_METHODS and any(spec.kind != "dense" for spec in backbone.specs):
            raise UsageError(f"a {method} bank needs an MLP backbone (dense layers); on this one use a skip "
                             f"method ({', '.join(SKIP_METHODS)})")
        if components not in COMPONENTS:
            raise UsageError(f"components must be one of {', '.join(COMPONENTS)}, got {components!r}")
        _check_window(window)
        FineTuner(backbone, method, **options)  # refuse bad options now, not at the first learn
        self.backbone = backbone
        self.method = method
        self.detector = detector
        self.features = features
        self.components = components
        self.window = int(window)
        self.options = dict(options)
        self.domains_: dict[str, DomainEntry] = {}
        self._scatter: np.ndarray | None = None      # pooled within-domain scatter (F, F)
        self._n_total = 0
        self._cov_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._gprec_cache: np.ndarray | None = None
        self._lin_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def domains(self) -> list[str]:
        return list(self.domains_)

    @property
    def n_features(self) -> int:
        t = self.backbone.tap_widths  # an MLP's: its layers' input widths
        return {"input": t[0], "hidden": sum(t[1:]), "last": t[-1],
                "taps": sum(t) + self.backbone.sizes[-1]}[self.features]

    def __repr__(self) -> str:
        return (f"AdapterBank(method='{self.method}', detector='{self.detector}', features='{self.features}', "
                f"domains={self.domains})")

    # ------------------------------------------------------------------ features
    def taps(self, x: Any, what: str = "x") -> np.ndarray:
        """The frozen skip-cache rows [x | h_1 | ... | h_{n-1} | z_n] of raw inputs ``x``."""
        return self.backbone.forward_taps(self.backbone.prepare(x, what))

    def _features(self, rows: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        t = self.backbone.tap_widths
        d_in = sum(t)
        cols = {"input": slice(0, t[0]), "hidden": slice(t[0], d_in), "last": slice(d_in - t[-1], d_in),
                "taps": slice(0, rows.shape[1])}[self.features]
        return rows[:, cols].astype(dtype)

    # ------------------------------------------------------------------ learning
    def learn(self, domain: str, x: Any, y: Any, **fit_options: Any) -> "AdapterBank":
        """Train a new adapter for ``domain`` on ``x``, ``y`` (the other adapters are never touched).

        ``fit_options`` go to ``FineTuner.fit`` (``x_val``, ``y_val``, ``callback``, ...)."""
        self._check_new_name(domain)
        x_arr, y_arr = validate_xy(x, y, n_classes=self.backbone.sizes[-1], what=f"domain {domain!r} data")
        tuner = FineTuner(self.backbone, self.method, **self.options)
        tuner.fit(x_arr, y_arr, **fit_options)
        hist = tuner.history_.summary() if tuner.history_ is not None else {}
        learned = {k: hist[k] for k in ("train_seconds", "final_loss") if k in hist}
        self._add(domain, tuner, None, x_arr, y_arr, learned)
        return self

    def add_adapter(self, domain: str, tuner: FineTuner, x: Any, y: Any) -> "AdapterBank":
        """Add an adapter trained elsewhere (a FineTuner of this bank's method on this backbone)
        as ``domain``; ``x``, ``y`` (its training data) give the detector's statistics."""
        self._check_new_name(domain)
        if not isinstance(tuner, FineTuner) or tuner.method_name != self.method:
            raise UsageError(f"add_adapter takes a {self.method} FineTuner, got "
                             f"{getattr(tuner, 'method_name', type(tuner).__name__)}")
        if tuner.backbone is not self.backbone and tuner.backbone.digest() != self.backbone.digest():
            raise UsageError("add_adapter: the adapter was trained on another backbone")
        x_arr, y_arr = validate_xy(x, y, n_classes=self.backbone.sizes[-1], what=f"domain {domain!r} data")
        opts = tuner.method.options  # a copy with the adapter's own shape: later fits of ``tuner`` stay out
        train = {k: v for k, v in self.options.items() if k not in ADAPTER_OPTIONS}
        own = FineTuner(self.backbone, self.method, rank=opts.rank, alpha=opts.alpha,
                        train_last_bias=opts.train_last_bias, **train)
        own.method.load_adapter_tensors(tuner.method.adapter_tensors())
        self._add(domain, own, None, x_arr, y_arr, {})
        return self

    def copy(self) -> "AdapterBank":
        """An independent bank with the same adapters (copied), statistics and counts."""
        import copy as _copy

        new = _copy.copy(self)
        new.options = dict(self.options)
        new.domains_ = {}
        for n, e in self.domains_.items():
            tuner = None
            if e.tuner is not None:
                tuner = FineTuner(self.backbone, self.method, **self.options)
                tuner.method.load_adapter_tensors(e.tuner.method.adapter_tensors())
            new.domains_[n] = DomainEntry(n, tuner, None if e.mix is None else dict(e.mix), e.means.copy(),
                                          e.counts.copy(), e.classes.copy(), e.threshold, e.data_sha256, e.used,
                                          dict(e.learned))
        new._scatter = None if self._scatter is None else self._scatter.copy()
        new._cov_cache = new._gprec_cache = new._lin_cache = None
        return new

    def learn_mix(self, domain: str, x: Any, y: Any, *, epochs: int = 200, lr: float = 0.5) -> "AdapterBank":
        """A new domain as a mix of the adapters already learned: only the mixing coefficients
        train (one number per adapter), from their soft-routing values, by full-batch gradient
        descent on the cross-entropy. For few labelled samples (skip methods only)."""
        self._check_new_name(domain)
        self._need_skip("learn_mix")
        names = self._adapter_names()
        if not names:
            raise UsageError("learn_mix needs at least one learned adapter to mix")
        if not (isinstance(epochs, int) and epochs >= 1) or not (isinstance(lr, (int, float)) and 0 < lr < np.inf):
            raise UsageError(f"learn_mix needs epochs >= 1 and lr > 0, got epochs={epochs!r}, lr={lr!r}")
        x_arr, y_arr = validate_xy(x, y, n_classes=self.backbone.sizes[-1], what=f"domain {domain!r} data")
        rows = self.taps(x_arr)
        deltas = np.stack([self._delta(rows, self.domains_[n]) for n in names], axis=1)  # (n, K, C)
        base = rows[:, -self.backbone.sizes[-1]:].astype(np.float64)
        w = self._soft_weights(rows, names).mean(axis=0)
        onehot = np.eye(base.shape[1])[y_arr]
        for _ in range(epochs):
            logits = base + np.einsum("nkc,k->nc", deltas, w)
            g = (softmax(logits) - onehot) / len(y_arr)
            w -= lr * np.einsum("nc,nkc->k", g, deltas)
        self._add(domain, None, {n: float(v) for n, v in zip(names, w)}, x_arr, y_arr,
                  {"mix_epochs": epochs, "mix_lr": lr})
        return self

    def _check_new_name(self, domain: str) -> None:
        if not isinstance(domain, str) or not _NAME_RE.match(domain):
            raise UsageError(f"domain name must be 1-64 letters, digits, '.', '_', '+' or '-' (starting with a "
                             f"letter or digit), got {domain!r}")
        if domain in self.domains_:
            raise UsageError(f"domain {domain!r} is already in the bank; a bank never retrains a domain "
                             f"(drop it first, or learn it under a new name)")

    def _add(self, domain: str, tuner: FineTuner | None, mix: dict[str, float] | None, x_arr: np.ndarray,
             y_arr: np.ndarray, learned: dict[str, Any]) -> None:
        feats = self._features(self.taps(x_arr))
        groups = [np.arange(len(feats))] if self.components == "domain" else \
            [np.flatnonzero(y_arr == c) for c in np.unique(y_arr)]
        means = np.stack([feats[g].mean(axis=0) for g in groups])
        counts = np.array([len(g) for g in groups], np.int64)
        classes = np.array([-1] if self.components == "domain" else np.unique(y_arr), np.int64)
        scatter = np.zeros((feats.shape[1], feats.shape[1]))
        for g, m in zip(groups, means):
            centred = feats[g] - m
            scatter += centred.T @ centred
        self._scatter = scatter if self._scatter is None else self._scatter + scatter
        self._n_total += len(feats)
        self._cov_cache = self._gprec_cache = self._lin_cache = None
        digest = hashlib.sha256(np.ascontiguousarray(x_arr).tobytes()).hexdigest()
        entry = DomainEntry(domain, tuner, mix, means, counts, classes, float("inf"), digest, 0, learned)
        self.domains_[domain] = entry
        self._refresh_thresholds_with(domain, x_arr)

    def _refresh_thresholds_with(self, domain: str, x_arr: np.ndarray) -> None:
        """The new domain's novelty threshold: a high quantile of its own samples' novelty."""
        nov = self.novelty(x_arr)
        self.domains_[domain].threshold = float(np.quantile(nov, NOVELTY_QUANTILE))

    # ------------------------------------------------------------------ detector
    def _covariance(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shared precision (F, F), diagonal precision (F,), global mean (F,)) of the features.

        The pooled within-domain covariance is shrunk towards its mean variance
        (``SHRINKAGE``), so it stays invertible with fewer samples than features."""
        if self._cov_cache is None:
            if self._scatter is None:
                raise UsageError("the bank has no domain yet: learn one first")
            f = self._scatter.shape[0]
            dof = max(self._n_total - sum(len(e.counts) for e in self.domains_.values()), 1)
            cov = self._scatter / dof
            avg = float(np.trace(cov)) / f or 1.0
            cov = (1 - SHRINKAGE) * cov + SHRINKAGE * avg * np.eye(f)
            prec = np.linalg.inv(cov)
            diag = 1.0 / np.diag(cov)
            means, counts, _ = self._component_table()
            gmean = counts @ means / counts.sum()
            self._cov_cache = (prec, diag, gmean)
        return self._cov_cache

    def _global_precision(self) -> np.ndarray:
        """Precision of one Gaussian over every domain (within + between scatter), for ``relative``."""
        if self._gprec_cache is None:
            self._gprec_cache = self._compute_global_precision()
        return self._gprec_cache

    def _compute_global_precision(self) -> np.ndarray:
        _, _, gmean = self._covariance()
        f = len(gmean)
        means, counts, _ = self._component_table()
        d = means - gmean
        between = (d * counts[:, None]).T @ d
        cov = (self._scatter + between) / max(self._n_total - 1, 1)
        avg = float(np.trace(cov)) / f or 1.0
        return np.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * avg * np.eye(f))

    def _component_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every domain's component means stacked (M, F), their counts (M,), their domain index (M,)."""
        entries = list(self.domains_.values())
        return (np.concatenate([e.means for e in entries]),
                np.concatenate([e.counts for e in entries]).astype(np.float64),
                np.concatenate([np.full(len(e.counts), k) for k, e in enumerate(entries)]))

    def _metric(self) -> np.ndarray | None:
        if self.detector in ("centroid", "energy"):
            return None
        prec, diag, _ = self._covariance()
        return diag if self.detector == "diag" else prec

    def _distances(self, feats: np.ndarray) -> np.ndarray:
        """(n, K) squared distances of each sample to each domain (its nearest component)."""
        means, _, owner = self._component_table()
        d = _sq_dist(feats, means, self._metric())
        out = np.full((len(feats), len(self.domains_)), np.inf)
        for k in range(len(self.domains_)):
            out[:, k] = d[:, owner == k].min(axis=1)
        return out

    def domain_scores(self, x: Any) -> np.ndarray:
        """(n, K) per-sample scores, higher = more likely that domain (columns in ``domains`` order):
        minus half the squared distance to the domain's nearest component, up to a per-sample
        constant (``energy``: the log-sum-exp of each adapter's logits)."""
        return self._scores(self.taps(x))

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        if not self.domains_:
            raise UsageError("the bank has no domain yet: learn one first")
        if self.detector == "energy":
            return np.stack([_logsumexp(self._logits_one(rows, e)) for e in self.domains_.values()], axis=1)
        w, c, owner = self._linear()
        comp = self._features(rows, np.float32) @ w.T
        comp -= c
        out = np.empty((len(rows), len(self.domains_)))
        for k in range(len(self.domains_)):
            out[:, k] = comp[:, owner == k].max(axis=1)
        return out

    def _linear(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Routing as a linear map: -d_m(f)/2 = f.(P mu_m) - mu_m.P mu_m/2 - f.P f/2, and the last
        term is the same for every component, so it changes no argmax and no softmax. Routing
        then costs M x F multiply-adds a sample (M components), not F x F."""
        if self._lin_cache is None:
            means, _, owner = self._component_table()
            metric = self._metric()
            w = means if metric is None else (means * metric if metric.ndim == 1 else means @ metric)
            # float32, as a device computes it: the scores of a sample differ by O(1e-3) at most
            self._lin_cache = (np.ascontiguousarray(w, np.float32),
                               (0.5 * np.einsum("mf,mf->m", w, means)).astype(np.float32), owner)
        return self._lin_cache

    def route(self, x: Any, *, window: int | None = None) -> np.ndarray:
        """Each sample's domain name (a NumPy array of str); see ``route_index``."""
        names = np.array(self.domains, dtype=object)
        return names[self.route_index(x, window=window)]

    def route_index(self, x: Any, *, window: int | None = None) -> np.ndarray:
        """Each sample's domain as an index into ``domains``. With ``window`` w > 1, a
        sample is routed by the summed scores of itself and the w - 1 samples before it."""
        return self._route_rows(self.taps(x), window)

    def _route_rows(self, rows: np.ndarray, window: int | None, count: bool = True) -> np.ndarray:
        scores = _windowed(self._scores(rows), self._window(window))
        idx = scores.argmax(axis=1)
        if count:
            entries = list(self.domains_.values())
            for k, c in zip(*np.unique(idx, return_counts=True)):
                entries[k].used += int(c)
        return idx

    def _window(self, window: int | None) -> int:
        if window is None:
            return self.window
        _check_window(window)
        return int(window)

    def novelty(self, x: Any) -> np.ndarray:
        """How unlike every known domain each sample is (higher = more novel).

        Gaussian detectors: the smallest squared Mahalanobis distance to a domain (``relative``:
        less the distance to one Gaussian over all domains); ``centroid``: the smallest squared
        distance; ``energy``: minus the largest log-sum-exp of the adapters' logits."""
        return self._novelty_rows(self.taps(x))

    def _novelty_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.detector == "energy":
            return -self._scores(rows).max(axis=1)
        feats = self._features(rows)
        d = self._distances(feats).min(axis=1)
        if self.detector == "relative":
            _, _, gmean = self._covariance()
            d = d - _sq_dist(feats, gmean[None, :], self._global_precision())[:, 0]
        return d

    def is_novel(self, x: Any) -> np.ndarray:
        """True where a sample's novelty exceeds the threshold of the domain it routes to
        (the 99th percentile of that domain's own training samples' novelty when learned)."""
        rows = self.taps(x)
        idx = self._route_rows(rows, 1, count=False)
        thr = np.array([e.threshold for e in self.domains_.values()])
        return self._novelty_rows(rows) > thr[idx]

    # ------------------------------------------------------------------ applying adapters
    def _adapter_names(self) -> list[str]:
        return [n for n, e in self.domains_.items() if e.tuner is not None]

    def _need_skip(self, what: str) -> None:
        if self.method not in SKIP_METHODS:
            raise UsageError(f"{what} mixes skip adapters (weighted sums of their outputs); this bank's "
                             f"method is {self.method}")

    def _delta(self, rows: np.ndarray, entry: DomainEntry) -> np.ndarray:
        """What a skip adapter adds to the frozen logits: s * sum_k B_k A_k h_k (+ bias delta)."""
        if entry.tuner is None:
            assert entry.mix is not None
            return sum(w * self._delta(rows, self.domains_[n]) for n, w in entry.mix.items())
        t = entry.tuner.method.adapter_tensors()
        scale = entry.tuner.method.options.scale
        out = np.zeros((rows.shape[0], self.backbone.sizes[-1]), np.float64)
        col = 0
        for k, width in zip(self.backbone.tap_layers, self.backbone.tap_widths):
            h = rows[:, col:col + width]
            out += (h @ t[f"skip.{k}.lora_A"].T) @ t[f"skip.{k}.lora_B"].T
            col += width
        out *= scale
        if "head.bias_delta" in t:
            out += t["head.bias_delta"]
        return out

    def _logits_one(self, rows: np.ndarray, entry: DomainEntry, x_prepared: np.ndarray | None = None
                    ) -> np.ndarray:
        c = self.backbone.sizes[-1]
        if self.method in SKIP_METHODS:
            return rows[:, -c:].astype(np.float64) + self._delta(rows, entry)
        assert entry.tuner is not None
        x_prep = rows[:, :self.backbone.sizes[0]]  # the taps' first block is the prepared input
        from .train import predict_logits
        return predict_logits(entry.tuner.method, np.ascontiguousarray(x_prep)).astype(np.float64)

    def _soft_weights(self, rows: np.ndarray, names: Sequence[str], window: int = 1) -> np.ndarray:
        scores = _windowed(self._scores(rows), window)
        keep = [self.domains.index(n) for n in names]
        return softmax(scores[:, keep])

    def decision_function(self, x: Any, *, domain: str | None = None, window: int | None = None,
                          mix: str = "route") -> np.ndarray:
        """Logits: each sample through its routed domain's adapter (``mix="route"``), a soft
        mix of every adapter weighted by the detector's domain probabilities (``mix="soft"``,
        skip methods), or one given ``domain`` for every sample (an oracle)."""
        if mix not in ("route", "soft"):
            raise UsageError(f"mix must be 'route' or 'soft', got {mix!r}")
        rows = self.taps(x)
        c = self.backbone.sizes[-1]
        if domain is not None:
            return self._logits_one(rows, self._entry(domain))
        if mix == "soft":
            self._need_skip("mix='soft'")
            names = self.domains
            w = self._soft_weights(rows, names, self._window(window))
            out = rows[:, -c:].astype(np.float64)
            for k, n in enumerate(names):
                out += w[:, k:k + 1] * self._delta(rows, self.domains_[n])
            return out
        idx = self._route_rows(rows, window)
        out = np.empty((rows.shape[0], c), np.float64)
        for k, entry in enumerate(self.domains_.values()):
            sel = idx == k
            if sel.any():
                out[sel] = self._logits_one(rows[sel], entry)
        return out

    def predict_proba(self, x: Any, **kw: Any) -> np.ndarray:
        return softmax(self.decision_function(x, **kw))

    def predict(self, x: Any, **kw: Any) -> np.ndarray:
        return self.decision_function(x, **kw).argmax(axis=1)

    def score(self, x: Any, y: Any, **kw: Any) -> float:
        """Accuracy on ``x``, ``y`` (keywords as ``decision_function``)."""
        x_arr, y_arr = validate_xy(x, y, n_classes=self.backbone.sizes[-1], what="evaluation data")
        return float(np.mean(self.predict(x_arr, **kw) == y_arr))

    def _entry(self, domain: str) -> DomainEntry:
        if domain not in self.domains_:
            raise UsageError(f"no domain {domain!r} in the bank (it has {', '.join(self.domains) or 'none'})")
        return self.domains_[domain]

    def tuner(self, domain: str) -> FineTuner:
        """The FineTuner holding ``domain``'s adapter (a learned, not mixed, domain)."""
        entry = self._entry(domain)
        if entry.tuner is None:
            raise UsageError(f"domain {domain!r} is a mix of other adapters, it has none of its own")
        return entry.tuner

    # ------------------------------------------------------------------ budget
    def nbytes(self) -> dict[str, Any]:
        """Bytes a device stores, float32: per domain its adapter (the non-zero blocks, or one
        coefficient per mixed adapter) and statistics (component means, threshold, count), plus the
        detector's shared part (F x F precision, F diagonal, or nothing)."""
        f = self.n_features
        per: dict[str, dict[str, int]] = {}
        for n, e in self.domains_.items():
            if e.tuner is not None:
                adapter = sum(int(t.size) * 4 for t in e.tuner.method.adapter_tensors().values())
            else:
                adapter = 4 * len(e.mix or {})
            stats = 0 if self.detector == "energy" else 4 * f * len(e.counts)
            per[n] = {"adapter": adapter, "statistics": stats + 8, "total": adapter + stats + 8}
        shared = {"mahalanobis": 4 * f * f, "relative": 4 * (2 * f * f + f), "diag": 4 * f}.get(self.detector, 0)
        return {"per_domain": per, "shared": shared, "total": shared + sum(v["total"] for v in per.values())}

    def drop(self, domain: str) -> None:
        """Remove a domain (a mixed domain that mixed it loses that coefficient). The pooled
        covariance keeps the dropped domain's samples: it still estimates the within-domain spread."""
        self._entry(domain)
        del self.domains_[domain]
        for e in self.domains_.values():
            if e.mix is not None:
                e.mix.pop(domain, None)
        self._cov_cache = self._gprec_cache = self._lin_cache = None

    def merge(self, a: str, b: str, name: str | None = None) -> str:
        """Replace two learned domains by one: adapter tensors averaged (weighted by samples),
        the means of each class pooled (the spread between them moves into the shared covariance)."""
        ea, eb = self._entry(a), self._entry(b)
        if ea.tuner is None or eb.tuner is None:
            raise UsageError("merge takes two learned domains (not mixes)")
        name = name or f"{a}+{b}"
        if name not in (a, b):
            self._check_new_name(name)
        na, nb = int(ea.counts.sum()), int(eb.counts.sum())
        ta, tb = ea.tuner.method.adapter_tensors(), eb.tuner.method.adapter_tensors()
        if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
            raise UsageError(f"cannot merge {a!r} and {b!r}: their adapters differ in shape (rank or bias)")
        merged = {k: (na * ta[k] + nb * tb[k]) / (na + nb) for k in ta}
        tuner = FineTuner(self.backbone, self.method, **self.options)
        tuner.method.load_adapter_tensors({k: v.astype(ta[k].dtype) for k, v in merged.items()})
        means, counts, classes = [], [], []
        for c in np.union1d(ea.classes, eb.classes):
            parts = [(e.means[e.classes == c][0], int(e.counts[e.classes == c][0])) for e in (ea, eb)
                     if c in e.classes]
            n = sum(k for _, k in parts)
            means.append(sum(k * m for m, k in parts) / n)
            counts.append(n)
            classes.append(c)
            if len(parts) == 2:  # the spread between the two means joins the pooled scatter
                (m1, k1), (m2, k2) = parts
                self._scatter = self._scatter + (k1 * k2 / n) * np.outer(m1 - m2, m1 - m2)
        entry = DomainEntry(name, tuner, None, np.stack(means), np.array(counts, np.int64),
                            np.array(classes, np.int64),
                            max(ea.threshold, eb.threshold),
                            hashlib.sha256((ea.data_sha256 + eb.data_sha256).encode()).hexdigest(),
                            ea.used + eb.used, {"merged": [a, b]})
        order = list(self.domains_)
        new = {}
        for n in order:
            if n == a:
                new[name] = entry
            elif n != b:
                new[n] = self.domains_[n]
        for e in new.values():
            if e.mix is not None:
                wa, wb = e.mix.pop(a, 0.0), e.mix.pop(b, 0.0)
                if wa or wb:
                    e.mix[name] = e.mix.get(name, 0.0) + wa + wb
        self.domains_ = new
        self._cov_cache = self._gprec_cache = self._lin_cache = None
        return name

    def closest_pair(self) -> tuple[str, str]:
        """The two learned domains whose means are closest under the detector's metric."""
        names = self._adapter_names()
        if len(names) < 2:
            raise UsageError("closest_pair needs two learned domains")
        means = np.stack([self.domains_[n].counts @ self.domains_[n].means / self.domains_[n].counts.sum()
                          for n in names])
        d = _sq_dist(means, means, self._metric())
        d[np.diag_indices_from(d)] = np.inf
        i, j = np.unravel_index(np.argmin(d), d.shape)
        i, j = sorted((int(i), int(j)))
        return names[i], names[j]

    def fit_budget(self, budget: int | str, *, strategy: str = "merge") -> list[str]:
        """Shrink the bank until ``nbytes()["total"]`` fits ``budget`` bytes: ``merge`` the two
        closest domains, or ``drop`` the least used, one step at a time. Returns the steps."""
        from .units import parse_bytes

        limit = parse_bytes(budget)
        if strategy not in ("merge", "drop"):
            raise UsageError(f"strategy must be 'merge' or 'drop', got {strategy!r}")
        steps: list[str] = []
        while self.nbytes()["total"] > limit:
            if len(self.domains_) <= 1:
                from .errors import BudgetError
                raise BudgetError(f"one domain needs {self.nbytes()['total']} bytes, over the budget of {limit}")
            if strategy == "merge" and len(self._adapter_names()) >= 2:
                a, b = self.closest_pair()
                steps.append(f"merge {a} {b} -> {self.merge(a, b)}")
            else:
                least = min(self.domains_.values(), key=lambda e: (e.used, int(e.counts.sum())))
                self.drop(least.name)
                steps.append(f"drop {least.name}")
        return steps

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank directory: one sub-folder per learned domain (``adapter_model.safetensors``
        + ``adapter_config.json``, PEFT's multi-adapter layout; PEFT's own file format for
        ``lora-*`` banks), ``detector.safetensors`` (means and shared scatter) and ``bank.json``
        (names, counts, thresholds, options, digests), written as one set."""
        from .io_atomic import json_text, write_dir_atomic
        from .safetensors import dumps

        if not self.domains_:
            raise UsageError("the bank has no domain yet: nothing to save")
        files: dict[str, bytes] = {}
        fmt = "edgetune" if self.method in SKIP_METHODS else "peft"
        domains = []
        for n, e in self.domains_.items():
            rec: dict[str, Any] = {"name": n, "n_samples": int(e.counts.sum()), "components": e.counts.tolist(),
                                   "component_classes": e.classes.tolist(),
                                   "threshold": e.threshold,
                                   "data_sha256": e.data_sha256, "used": e.used, "learned": e.learned}
            if e.tuner is not None:
                adapter = e.tuner.adapter_files(format=fmt)
                files.update({f"{n}/{k}": v for k, v in adapter.items()})
                rec["adapter"] = n
                rec["adapter_sha256"] = hashlib.sha256(adapter[ADAPTER_WEIGHTS]).hexdigest()
            else:
                rec["mix"] = e.mix
            domains.append(rec)
        tensors = {"means": self._component_table()[0],
                   "scatter": np.asarray(self._scatter, np.float64)}
        det = dumps(tensors, {"format": BANK_FORMAT})
        files[DETECTOR_FILE] = det
        meta = {
            "format": BANK_FORMAT, "format_version": BANK_FORMAT_VERSION, "method": self.method,
            "options": self.options, "detector": self.detector, "features": self.features,
            "components": self.components,
            "window": self.window, "n_features": self.n_features, "n_samples_total": self._n_total,
            "novelty_quantile": NOVELTY_QUANTILE, "shrinkage": SHRINKAGE,
            "base_model_sizes": self.backbone.sizes, "base_model_digest": self.backbone.digest(),
            "detector_sha256": hashlib.sha256(det).hexdigest(), "domains": domains,
        }
        files[BANK_FILE] = json_text(meta).encode()
        return write_dir_atomic(path, files, carry_over=False)

    @classmethod
    def load(cls, path: str | os.PathLike, backbone: Backbone, *, strict: bool = True) -> "AdapterBank":
        """Read a bank directory written by ``save`` for ``backbone``; ModelFileError names what is wrong."""
        from .errors import BackboneMismatch
        from .io_atomic import recover_dir
        from .safetensors import loads

        path = recover_dir(Path(path))
        meta_path = path / BANK_FILE
        if not path.is_dir():
            raise ModelFileError(f"bank directory not found: {path}")
        if not meta_path.is_file():
            raise ModelFileError(f"{path} is not an adapter bank: {BANK_FILE} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
            raise ModelFileError(f"{meta_path}: not an edgetune adapter bank (format != '{BANK_FORMAT}')")
        if not isinstance(meta.get("format_version"), int) or meta["format_version"] > BANK_FORMAT_VERSION:
            raise ModelFileError(f"{meta_path}: format_version {meta.get('format_version')!r} is not one this "
                                 f"edgetune reads (<= {BANK_FORMAT_VERSION})")
        if meta.get("base_model_sizes") != backbone.sizes:
            raise ModelFileError(f"{meta_path}: the bank was made for a backbone of sizes "
                                 f"{meta.get('base_model_sizes')}, this backbone has {backbone.sizes}")
        if strict and meta.get("base_model_digest") != backbone.digest():
            raise BackboneMismatch(f"{meta_path}: the bank was made on a different backbone (same shape, other "
                                   f"weights); pass strict=False to load it anyway")
        try:
            options = meta["options"]
            if not isinstance(options, dict):
                raise TypeError("options is not an object")
            bank = cls(backbone, meta["method"], detector=meta["detector"], features=meta["features"],
                       components=meta["components"], window=meta["window"], **options)
            records = meta["domains"]
            if not isinstance(records, list) or not records:
                raise TypeError("domains must be a non-empty list")
            n_total = int(meta["n_samples_total"])
            comp = [[int(c) for c in r["components"]] for r in records]
            comp_classes = [[int(c) for c in r["component_classes"]] for r in records]
            if any(not c or min(c) < 1 for c in comp):
                raise ValueError("every domain needs components with at least one sample each")
            if any(len(a) != len(b) for a, b in zip(comp, comp_classes)):
                raise ValueError("components and component_classes differ in length")
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise ModelFileError(f"{meta_path}: bad or missing field ({e})") from None
        det_path = path / DETECTOR_FILE
        if not det_path.is_file():
            raise ModelFileError(f"{path}: {DETECTOR_FILE} is missing")
        det = det_path.read_bytes()
        if hashlib.sha256(det).hexdigest() != meta.get("detector_sha256"):
            raise ModelFileError(f"{det_path} does not match {BANK_FILE} (checksum differs)")
        tensors, _ = loads(det, str(det_path))
        f = bank.n_features
        means, scatter = tensors.get("means"), tensors.get("scatter")
        m_total = sum(len(c) for c in comp)
        if means is None or scatter is None or means.shape != (m_total, f) or scatter.shape != (f, f):
            raise ModelFileError(f"{det_path}: expected 'means' ({m_total}, {f}) and 'scatter' ({f}, {f})")
        starts = np.cumsum([0] + [len(c) for c in comp])
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(scatter))):
            raise ModelFileError(f"{det_path}: statistics contain NaN or inf")
        fmt_peft = bank.method not in SKIP_METHODS
        for i, rec in enumerate(records):
            try:
                name = rec["name"]
                bank._check_new_name(name)
                entry = DomainEntry(name, None, None, means[starts[i]:starts[i + 1]].astype(np.float64),
                                    np.array(comp[i], np.int64), np.array(comp_classes[i], np.int64),
                                    float(rec["threshold"]), str(rec["data_sha256"]), int(rec.get("used", 0)),
                                    dict(rec.get("learned", {})))
                if int(rec["n_samples"]) != int(entry.counts.sum()):
                    raise ValueError(f"n_samples {rec['n_samples']} is not the sum of its components")
            except (KeyError, TypeError, ValueError, UsageError) as e:
                raise ModelFileError(f"{meta_path}: domain {i}: bad or missing field ({e})") from None
            if "adapter" in rec:
                sub = path / str(rec["adapter"])
                if not (sub / ADAPTER_CONFIG).is_file() or not (sub / ADAPTER_WEIGHTS).is_file():
                    raise ModelFileError(f"{path}: the adapter of domain {name!r} is missing (expected "
                                         f"{sub}/{ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
                blob = (sub / ADAPTER_WEIGHTS).read_bytes()
                if rec.get("adapter_sha256") and hashlib.sha256(blob).hexdigest() != rec["adapter_sha256"]:
                    raise ModelFileError(f"{sub / ADAPTER_WEIGHTS} does not match {BANK_FILE} (checksum differs)")
                train_opts = {k: v for k, v in bank.options.items() if k not in ADAPTER_OPTIONS}
                tuner = FineTuner.load_adapter(backbone, sub, strict=strict, **train_opts)
                if tuner.method_name != bank.method and not fmt_peft:
                    raise ModelFileError(f"{sub}: a {tuner.method_name} adapter in a {bank.method} bank")
                entry.tuner = tuner
            elif isinstance(rec.get("mix"), dict):
                entry.mix = {str(k): float(v) for k, v in rec["mix"].items()}
            else:
                raise ModelFileError(f"{meta_path}: domain {name!r} has neither 'adapter' nor 'mix'")
            bank.domains_[name] = entry
        for e in bank.domains_.values():
            if e.mix is not None and not set(e.mix) <= set(bank._adapter_names()):
                raise ModelFileError(f"{meta_path}: domain {e.name!r} mixes unknown domains "
                                     f"{sorted(set(e.mix) - set(bank._adapter_names()))}")
        bank._scatter = scatter.astype(np.float64)
        bank._n_total = n_total
        return bank

    def summary(self) -> list[dict[str, Any]]:
        """One row per domain: name, kind, samples, times routed, bytes, threshold."""
        sizes = self.nbytes()["per_domain"]
        return [{"domain": n, "kind": "adapter" if e.tuner is not None else "mix", "samples": int(e.counts.sum()),
                 "routed": e.used, "bytes": sizes[n]["total"], "threshold": e.threshold,
                 **({"mix": e.mix} if e.mix is not None else {})} for n, e in self.domains_.items()]


# ---------------------------------------------------------------------- small functions

def _check_window(window: Any) -> None:
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
        raise UsageError(f"window must be a whole number >= 1, got {window!r}")


def _sq_dist(feats: np.ndarray, means: np.ndarray, metric: np.ndarray | None) -> np.ndarray:
    """(n, K) squared distances; ``metric`` None (Euclidean), (F,) diagonal or (F, F) precision."""
    if metric is None:
        return (np.einsum("nf,nf->n", feats, feats)[:, None] - 2.0 * feats @ means.T
                + np.einsum("kf,kf->k", means, means)[None, :])
    if metric.ndim == 1:
        fw = feats * metric
        return (np.einsum("nf,nf->n", fw, feats)[:, None] - 2.0 * fw @ means.T
                + np.einsum("kf,kf->k", means * metric, means)[None, :])
    fp = feats @ metric
    mp = means @ metric
    return (np.einsum("nf,nf->n", fp, feats)[:, None] - 2.0 * fp @ means.T
            + np.einsum("kf,kf->k", mp, means)[None, :])


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def _windowed(scores: np.ndarray, window: int) -> np.ndarray:
    """Each row replaced by the sum of itself and the ``window - 1`` rows before it."""
    if window <= 1 or len(scores) == 0:
        return scores
    c = np.cumsum(scores, axis=0)
    out = c.copy()
    out[window:] -= c[:-window]
    return out
