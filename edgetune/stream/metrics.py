"""Ranking metrics of an anomaly detector: ROC AUC and partial AUC, NumPy only.

Scores are *anomaly* scores (higher = more anomalous, e.g. ``-score_samples``), labels 1 =
anomaly. Ties count half (the Mann-Whitney statistic), so unbounded or repeated scores give
the AUC the ROC curve has, and ``pauc`` is scikit-learn's (and the DCASE baselines')
``roc_auc_score(max_fpr=p)``: the area up to FPR p, McClish-standardised to 0.5..1.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError


def _check(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise DataError(f"labels ({y.shape[0]}) and scores ({s.shape[0]}) differ in length")
    if not np.all(np.isin(y, (0, 1))):
        raise DataError("labels must be 0 (normal) or 1 (anomaly)")
    if y.min(initial=1) == y.max(initial=0):
        raise DataError("an AUC needs both normal (0) and anomalous (1) samples")
    if not np.all(np.isfinite(s)):
        raise DataError("scores hold NaN or inf")
    return y.astype(bool), s


def roc_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    y, s = _check(y, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]   # the last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr = roc_curve(y, scores)
    return float(np.trapezoid(tpr, fpr))


def pauc(y: np.ndarray, scores: np.ndarray, max_fpr: float = 0.1) -> float:
    """Partial AUC over FPR 0..max_fpr, McClish-standardised (as scikit-learn's max_fpr)."""
    if not 0 < max_fpr <= 1:
        raise DataError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, tpr = roc_curve(y, scores)
    if max_fpr == 1:
        return float(np.trapezoid(tpr, fpr))
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x = np.r_[fpr[:stop], max_fpr]
    yy = np.r_[tpr[:stop], np.interp(max_fpr, fpr, tpr)]
    area = float(np.trapezoid(yy, x))
    lo, hi = 0.5 * max_fpr ** 2, max_fpr
    return 0.5 * (1 + (area - lo) / (hi - lo))


def rates_at(y: np.ndarray, alarm: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) of boolean alarms against labels (1 = anomaly)."""
    y, _ = _check(y, np.zeros(len(np.asarray(y))))
    alarm = np.asarray(alarm, dtype=bool).reshape(-1)
    return float(alarm[y].mean()), float(alarm[~y].mean())
