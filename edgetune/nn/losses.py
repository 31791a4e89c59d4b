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

    For a batch of logits, overwrites ``logits`` with d(mean loss)/d(logits) and records
    per sample what its loss needs (the true class's shifted logit and the softmax sum, or
    for two classes the signed margin), so the epoch's mean loss costs one vectorised,
    numerically exact pass per epoch instead of several calls per batch.
    """

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self._offsets = np.zeros(0, dtype=np.intp)
        self.a: np.ndarray = np.zeros(0)
        self.b: np.ndarray = np.zeros(0)
        self.count = 0

    def start_epoch(self, n_samples: int, dtype: np.dtype) -> None:
        if self.a.shape != (n_samples,) or self.a.dtype != dtype:
            self.a = np.empty(n_samples, dtype=dtype)
            self.b = np.empty(n_samples, dtype=dtype)
        self.count = 0

    def __call__(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.n_classes == 2:
            return self._binary(logits, y)
        n = logits.shape[0]
        if len(self._offsets) < n:
            self._offsets = np.arange(n, dtype=np.intp) * self.n_classes
        rows = slice(self.count, self.count + n)
        self.count += n
        logits -= logits.max(axis=1, keepdims=True)
        flat = logits.reshape(-1)
        idx = self._offsets[:n] + y
        np.take(flat, idx, out=self.a[rows])            # z_true - max
        np.exp(logits, out=logits)
        s = logits.sum(axis=1, keepdims=True)
        self.b[rows] = s[:, 0]                           # loss_i = log(s_i) - a_i
        logits /= s
        flat[idx] -= 1
        logits *= 1.0 / n
        return logits

    def _binary(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Two classes: softmax of (l0, l1) is a sigmoid of l1 - l0, with no row reductions.

        p1 = 1 / (1 + exp(l0 - l1)); d(loss)/d(l1) = p1 - y = -d(loss)/d(l0). The loss is
        softplus(-margin), margin = l_true - l_other. Half the calls of the general path.
        """
        n = logits.shape[0]
        rows = slice(self.count, self.count + n)
        self.count += n
        d = logits[:, 0] - logits[:, 1]                  # l0 - l1
        m = self.a[rows]
        np.copyto(m, d)                                  # -margin for y = 1 ...
        np.negative(d, out=m, where=y == 0)              # ... and for y = 0
        np.exp(d, out=d)                                 # inf for huge margins: p1 -> 0, as it should
        d += 1
        np.reciprocal(d, out=d)                          # p1
        d -= y
        d *= 1.0 / n
        logits[:, 1] = d
        np.negative(d, out=logits[:, 0])
        return logits

    def epoch_loss(self) -> float:
        a = self.a[:self.count].astype(np.float64)
        if self.n_classes == 2:
            return float(np.mean(np.logaddexp(0.0, a)))
        return float(np.mean(np.log(self.b[:self.count].astype(np.float64)) - a))
