"""Softmax cross-entropy, the loss of every classification task here."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss over the batch and its gradient with respect to the logits."""
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
    e /= s
    e[rows, y] -= 1
    e /= n
    return loss, e


def cross_entropy_from_logits(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


class SoftmaxCrossEntropyGrad:
    """The training step's loss gradient, computed in place with few NumPy calls.

    For a batch of logits (rows ``ids`` of the epoch), overwrites ``logits`` with
    d(mean loss)/d(logits) and records each sample's probability of its true class, so
    the epoch's mean loss costs one ``log`` per epoch instead of several calls per batch.
    """

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self._offsets = np.zeros(0, dtype=np.intp)
        self.p_true: np.ndarray = np.zeros(0)
        self.count = 0

    def start_epoch(self, n_samples: int, dtype: np.dtype) -> None:
        if self.p_true.shape != (n_samples,) or self.p_true.dtype != dtype:
            self.p_true = np.empty(n_samples, dtype=dtype)
        self.count = 0

    def __call__(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = logits.shape[0]
        if len(self._offsets) < n:
            self._offsets = np.arange(n, dtype=np.intp) * self.n_classes
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        flat = logits.reshape(-1)
        idx = self._offsets[:n] + y
        np.take(flat, idx, out=self.p_true[self.count:self.count + n])
        self.count += n
        flat[idx] -= 1
        logits *= 1.0 / n
        return logits

    def epoch_loss(self) -> float:
        p = self.p_true[:self.count].astype(np.float64)
        return float(-np.mean(np.log(np.maximum(p, np.finfo(np.float64).tiny))))
