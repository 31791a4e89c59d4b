"""Optimizers on one flat parameter vector: each step is a handful of in-place vector ops."""
from __future__ import annotations

import math

import numpy as np

from .errors import UsageError
from .methods.base import ParamStore


class Optimizer:
    def __init__(self, params: ParamStore, lr: float, weight_decay: float = 0.0):
        if not (np.isfinite(lr) and lr > 0):
            raise UsageError(f"learning rate must be a positive number, got {lr!r}")
        if not (np.isfinite(weight_decay) and weight_decay >= 0):
            raise UsageError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.p, self.g = params.flat, params.grad
        self.lr = lr
        self.weight_decay = weight_decay
        self._tmp = np.empty_like(self.p)

    def _grad(self) -> np.ndarray:
        if not self.weight_decay:
            return self.g
        np.multiply(self.p, self.weight_decay, out=self._tmp)
        self._tmp += self.g
        return self._tmp

    def step(self) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that, with the parameters, let a run continue exactly where it stopped."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        mine = self.state()
        if set(state) != set(mine):
            raise UsageError(f"optimizer state has {sorted(state)}, expected {sorted(mine)}")
        for k, v in mine.items():
            if state[k].shape != v.shape:
                raise UsageError(f"optimizer state '{k}' has shape {list(state[k].shape)}, expected {list(v.shape)}")
        for k, v in mine.items():
            v[...] = state[k]
        if "t" in mine:
            self.t = int(state["t"][0])


class SGD(Optimizer):
    def step(self) -> None:
        np.multiply(self._grad(), self.lr, out=self._tmp)
        self.p -= self._tmp


class Momentum(Optimizer):
    def __init__(self, params: ParamStore, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        if not 0 <= momentum < 1:
            raise UsageError(f"momentum must be in [0, 1), got {momentum}")
        self.mu = momentum
        self.v = np.zeros_like(self.p)

    def step(self) -> None:
        self.v *= self.mu
        self.v += self._grad()
        np.multiply(self.v, self.lr, out=self._tmp)
        self.p -= self._tmp

    def state(self) -> dict[str, np.ndarray]:
        return {"v": self.v}


class Adam(Optimizer):
    def __init__(self, params: ParamStore, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = np.zeros_like(self.p)
        self.v = np.zeros_like(self.p)
        self.t = 0
        self._t_array = np.zeros(1, dtype=np.int64)
        self._den = np.empty_like(self.p)

    def step(self) -> None:
        self.t += 1
        g = self._grad()  # may be self._tmp (with weight decay): only _den is scratch here
        self.m *= self.b1
        np.multiply(g, 1 - self.b1, out=self._den)
        self.m += self._den
        self.v *= self.b2
        np.multiply(g, g, out=self._den)
        self._den *= 1 - self.b2
        self.v += self._den
        # The textbook (and PyTorch) form: p -= lr * m_hat / (sqrt(v_hat) + eps).
        np.sqrt(self.v, out=self._den)
        self._den *= 1 / math.sqrt(1 - self.b2 ** self.t)  # a Python float keeps float32 in float32
        self._den += self.eps
        np.divide(self.m, self._den, out=self._tmp)
        self._tmp *= self.lr / (1 - self.b1 ** self.t)
        self.p -= self._tmp

    def state(self) -> dict[str, np.ndarray]:
        self._t_array[0] = self.t
        return {"m": self.m, "v": self.v, "t": self._t_array}


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam}


def make_optimizer(name: str, params: ParamStore, lr: float, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> Optimizer:
    if name == "sgd":
        return SGD(params, lr, weight_decay)
    if name == "momentum":
        return Momentum(params, lr, momentum, weight_decay)
    if name == "adam":
        return Adam(params, lr, weight_decay=weight_decay)
    raise UsageError(f"unknown optimizer '{name}': use one of {', '.join(OPTIMIZERS)}")
