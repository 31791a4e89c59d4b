"""OS-ELM: an online sequential extreme learning machine, the NumPy reference.

A single hidden layer ``h = g(W x + b)`` whose input weights ``W`` and biases ``b`` are
random and never trained: they are regenerated from a seed by a counter-based hash
(:func:`random_uniform`, the same function as ``et_oselm_uniform`` in the C engine), so a
saved model and a device keep only the seed. The output weights ``beta`` (hidden, outputs)
are learned by recursive least squares (RLS), one sample or a chunk at a time:

- ``P = R^-1`` with ``R = delta I + sum h h^T`` starts at ``I / delta``, so learning starts
  with the first sample (no batch "boot" phase is needed; :meth:`OSELM.fit` is the same
  ridge solution computed in one go);
- one sample is the inverse-free Sherman-Morrison update ``k = P h / (lam + h^T P h)``,
  ``beta += k e^T``, ``P = (P - k (P h)^T) / lam``; a chunk uses the Woodbury identity;
- an optional forgetting factor ``lam < 1`` discounts old samples. Plain exponential
  forgetting also discounts the regularisation (``lam^n delta I``) until ``P`` blows up in
  directions the data do not excite; here the regularisation is kept alive: every update
  also adds ``c e_j e_j^T`` to ``R`` for one coordinate ``j`` (cycling through all of
  them, ``c = L (1 - lam) delta``), a second Sherman-Morrison step, so that ``R`` keeps about
  ``delta`` on its diagonal for ever;
- ``P`` is symmetrised every ``symmetrize_every`` updates;
- a sample that is not finite, or that would make ``P`` or ``beta`` non-finite or ``P``
  lose a positive diagonal, is refused and the state stays exactly as it was.

:func:`ridge_oracle` computes the same solution in batch (float64), which is what the
tests check the recursion against.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import DataError, UsageError

ACTIVATIONS = ("sigmoid", "tanh", "relu", "identity")
_GOLDEN = np.uint32(0x9E3779B9)


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash (Wellons' "lowbias32"); C: ``et_oselm_hash32``."""
    x = np.asarray(x, dtype=np.uint32).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def random_uniform(seed: int, start: int, count: int) -> np.ndarray:
    """Numbers ``start .. start+count-1`` of the stream of ``seed``, float32 in [-1, 1).

    Counter-based: number ``i`` is ``hash(hash(seed) + i)``, so any element is computed
    on its own (the device regenerates a weight where it needs it, nothing is stored). The
    top 24 bits make the float, so the value is exact in float32 on every machine."""
    key = _hash32(np.uint32(seed & 0xFFFFFFFF))
    idx = (np.arange(count, dtype=np.uint64) + np.uint64(start)).astype(np.uint32)
    with np.errstate(over="ignore"):
        z = _hash32(idx + key)
    return ((z >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)).astype(np.float32)


def input_weights(n_inputs: int, n_hidden: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The random hidden layer: W (n_hidden, n_inputs) and b (n_hidden,), float32.

    ``W[j, i] = sqrt(3 / n_inputs) * u(j * n_inputs + i)`` (variance 1 / n_inputs, so a
    standardised input gives pre-activations of about unit variance) and
    ``b[j] = u(n_hidden * n_inputs + j)``, with ``u`` = :func:`random_uniform` of ``seed``."""
    scale = np.float32(math.sqrt(3.0 / n_inputs))
    w = (random_uniform(seed, 0, n_hidden * n_inputs) * scale).reshape(n_hidden, n_inputs)
    b = random_uniform(seed, n_hidden * n_inputs, n_hidden)
    return w.astype(np.float32), b


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)) without overflow warnings
    if activation == "tanh":
        return np.tanh(z)
    if activation == "relu":
        return np.maximum(z, 0.0)
    return z


class OSELM:
    """Single-hidden-layer network with RLS-learned output weights (see the module text).

    ``OSELM(n_inputs, n_outputs, n_hidden=64)``: ``fit(x, t)`` (closed-form ridge, resets),
    ``partial_fit(x, t)`` (a chunk), ``learn_one(x, t) -> bool`` (one sample; False if
    refused), ``predict(x)``. The state is ``P_`` (n_hidden, n_hidden) and ``beta_``
    (n_hidden, n_outputs), float64 by default (``dtype=np.float32`` mirrors the device).
    """

    def __init__(self, n_inputs: int, n_outputs: int, n_hidden: int = 64, *, seed: int = 0,
                 delta: float = 1.0, forgetting: float = 1.0, activation: str = "sigmoid",
                 symmetrize_every: int = 64, dtype: Any = np.float64):
        for name, v in (("n_inputs", n_inputs), ("n_outputs", n_outputs), ("n_hidden", n_hidden)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise UsageError(f"{name} must be a whole number >= 1, got {v!r}")
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
            raise UsageError(f"delta (the ridge regularisation) must be a positive number, got {delta!r}")
        if not (isinstance(forgetting, (int, float)) and 0 < forgetting <= 1):
            raise UsageError(f"forgetting must be in (0, 1], got {forgetting!r}")
        if activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {activation!r}: use {', '.join(ACTIVATIONS)}")
        if not isinstance(symmetrize_every, (int, np.integer)) or symmetrize_every < 1:
            raise UsageError(f"symmetrize_every must be a whole number >= 1, got {symmetrize_every!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
            raise UsageError(f"seed must be a whole number in 0..2**32-1, got {seed!r}")
        self.n_inputs, self.n_outputs, self.n_hidden = int(n_inputs), int(n_outputs), int(n_hidden)
        self.seed, self.delta, self.forgetting = int(seed), float(delta), float(forgetting)
        self.activation, self.symmetrize_every = activation, int(symmetrize_every)
        self.dtype = np.dtype(dtype)
        w, b = input_weights(self.n_inputs, self.n_hidden, self.seed)
        self._wt = np.ascontiguousarray(w.T, dtype=self.dtype)  # (n_inputs, n_hidden)
        self._b = b.astype(self.dtype)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> "OSELM":
        """Forget everything: ``P = I / delta``, ``beta = 0``."""
        self.P_ = np.eye(self.n_hidden, dtype=self.dtype) / self.dtype.type(self.delta)
        self.beta_ = np.zeros((self.n_hidden, self.n_outputs), dtype=self.dtype)
        self.n_updates_ = 0      # samples absorbed (drives the regulariser's coordinate)
        self.n_refused_ = 0
        return self

    def get_state(self) -> dict[str, Any]:
        return {"P": self.P_.copy(), "beta": self.beta_.copy(), "n_updates": self.n_updates_,
                "n_refused": self.n_refused_}

    def set_state(self, P: np.ndarray, beta: np.ndarray, n_updates: int = 0, n_refused: int = 0) -> "OSELM":
        L, m = self.n_hidden, self.n_outputs
        P = np.asarray(P)
        beta = np.asarray(beta)
        if P.shape != (L, L) or beta.shape != (L, m):
            raise DataError(f"OS-ELM state: P must be ({L}, {L}) and beta ({L}, {m}), "
                            f"got {P.shape} and {beta.shape}")
        if not (np.all(np.isfinite(P)) and np.all(np.isfinite(beta))):
            raise DataError("OS-ELM state: P or beta holds NaN or inf")
        self.P_ = np.array(P, dtype=self.dtype)
        self.beta_ = np.array(beta, dtype=self.dtype)
        self.n_updates_, self.n_refused_ = int(n_updates), int(n_refused)
        return self

    @property
    def _reg_step(self) -> float:
        return self.n_hidden * (1.0 - self.forgetting) * self.delta

    # ------------------------------------------------------------------ hidden layer
    def hidden(self, x: np.ndarray) -> np.ndarray:
        """H = g(x W^T + b) for rows x (n, n_inputs), in the model's dtype."""
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim == 1:
            x = x[None, :]
        return activate(x @ self._wt + self._b, self.activation)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.hidden(x) @ self.beta_

    # ------------------------------------------------------------------ learning
    def _check_xt(self, x: Any, t: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x)
        t = np.asarray(t)
        if x.ndim == 1:
            x = x[None, :]
        if t.ndim == 1:
            t = t[:, None] if self.n_outputs == 1 and t.shape[0] == x.shape[0] else t[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise DataError(f"{what}: x must have shape (samples, {self.n_inputs}), got {x.shape}")
        if t.shape != (x.shape[0], self.n_outputs):
            raise DataError(f"{what}: targets must have shape ({x.shape[0]}, {self.n_outputs}), got {t.shape}")
        if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(t.dtype, np.number)):
            raise DataError(f"{what}: x and targets must be numbers")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(t))):
            bad = int(np.flatnonzero(~(np.isfinite(x).all(axis=1) & np.isfinite(t).all(axis=1)))[0])
            raise DataError(f"{what}: sample {bad} holds NaN or inf; nothing was learned")
        return x, t

    def fit(self, x: Any, t: Any) -> "OSELM":
        """Reset and solve ``beta = (H^T H + delta I)^-1 H^T t`` in one go (the batch solution
        the recursion reaches with ``forgetting = 1``), with ``P`` its inverse."""
        x, t = self._check_xt(x, t, "fit")
        h = self.hidden(x)
        r = h.T @ h
        r[np.diag_indices_from(r)] += self.delta
        c = np.linalg.cholesky(r)                    # R is SPD: delta > 0
        ic = np.linalg.inv(c)
        P = ic.T @ ic
        beta = P @ (h.T @ t.astype(self.dtype))
        if not (np.all(np.isfinite(P)) and np.all(np.isfinite(beta))):
            raise DataError("fit: the solution is not finite (inputs too large?)")
        self.reset()
        self.P_, self.beta_ = 0.5 * (P + P.T), beta.astype(self.dtype)
        self.n_updates_ = x.shape[0]
        return self

    def partial_fit(self, x: Any, t: Any, chunk: int = 64) -> "OSELM":
        """Learn rows of x with targets t. Arrays with a NaN or inf are refused whole (DataError,
        the state unchanged). Without forgetting, chunks of ``chunk`` rows use the Woodbury
        identity; with forgetting, one Sherman-Morrison step per row."""
        x, t = self._check_xt(x, t, "partial_fit")
        h = self.hidden(x)
        t = t.astype(self.dtype)
        if self.forgetting < 1.0 or chunk <= 1:
            for i in range(h.shape[0]):
                if not self._update_hidden(h[i], t[i]):
                    raise DataError(f"partial_fit: sample {i} would make the state non-finite; "
                                    f"it and the rows after it were not learned")
            return self
        for lo in range(0, h.shape[0], chunk):
            if not self._update_chunk(h[lo:lo + chunk], t[lo:lo + chunk]):
                raise DataError(f"partial_fit: rows {lo}..{lo + chunk - 1} would make the state "
                                f"non-finite; they and the rows after them were not learned")
        return self

    def learn_one(self, x: Any, t: Any) -> bool:
        """Learn one sample; False (and nothing changes but ``n_refused_``) if it is refused."""
        x = np.asarray(x, dtype=self.dtype).reshape(-1)
        t = np.asarray(t, dtype=self.dtype).reshape(-1)
        if x.shape != (self.n_inputs,) or t.shape != (self.n_outputs,):
            raise DataError(f"learn_one: x must have {self.n_inputs} values and t {self.n_outputs}, "
                            f"got {x.shape[0]} and {t.shape[0]}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(t))):
            self.n_refused_ += 1
            return False
        return self._update_hidden(self.hidden(x)[0], t)

    def _commit(self, P: np.ndarray, beta: np.ndarray, n: int) -> bool:
        if not (np.all(np.isfinite(P)) and np.all(np.isfinite(beta)) and np.all(np.diagonal(P) > 0)):
            self.n_refused_ += n
            return False
        self.n_updates_ += n
        if self.n_updates_ // self.symmetrize_every != (self.n_updates_ - n) // self.symmetrize_every:
            P = 0.5 * (P + P.T)
        self.P_, self.beta_ = P, beta
        return True

    def _update_hidden(self, h: np.ndarray, t: np.ndarray) -> bool:
        """One Sherman-Morrison step on hidden vector h (L,) with target t (m,)."""
        lam = self.dtype.type(self.forgetting)
        P, beta = self.P_, self.beta_
        with np.errstate(all="ignore"):
            ph = P @ h
            denom = lam + h @ ph
            if not (np.isfinite(denom) and denom > 0):
                self.n_refused_ += 1
                return False
            k = ph / denom
            beta = beta + np.outer(k, t - h @ beta)
            P = (P - np.outer(k, ph)) / lam
            if self.forgetting < 1.0:                 # keep the regularisation alive
                j = self.n_updates_ % self.n_hidden
                c = self.dtype.type(self._reg_step)
                pj = P[:, j].copy()
                g = c / (1 + c * pj[j])
                beta = beta - g * np.outer(pj, beta[j])
                P = P - g * np.outer(pj, pj)
        return self._commit(P, beta, 1)

    def _update_chunk(self, h: np.ndarray, t: np.ndarray) -> bool:
        """Woodbury: P' = P - P H^T (I + H P H^T)^-1 H P (no forgetting)."""
        P, beta = self.P_, self.beta_
        with np.errstate(all="ignore"):
            ph = h @ P                                 # (k, L) = H P (P symmetric)
            s = ph @ h.T
            s[np.diag_indices_from(s)] += 1.0
            try:
                k = np.linalg.solve(s, ph).T           # (L, k) = P H^T S^-1
            except np.linalg.LinAlgError:
                self.n_refused_ += h.shape[0]
                return False
            beta = beta + k @ (t - h @ beta)
            P = P - k @ ph
        return self._commit(P, beta, h.shape[0])


def ridge_oracle(h: np.ndarray, t: np.ndarray, *, delta: float, forgetting: float = 1.0,
                 n_hidden: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The solution and inverse that :class:`OSELM`'s recursion must reach, in batch float64.

    Rows ``h`` (n, L) learned one by one from ``P = I / delta``: ``R = lam^n delta I +
    sum_i lam^(n-i) (h_i h_i^T + c e_(i mod L) e_(i mod L)^T)`` (the second term only when
    ``lam < 1``, see the module text), ``beta = R^-1 sum_i lam^(n-i) h_i t_i^T``."""
    h = np.asarray(h, np.float64)
    t = np.asarray(t, np.float64).reshape(h.shape[0], -1)
    n, L = h.shape
    lam = float(forgetting)
    w = lam ** np.arange(n - 1, -1, -1, dtype=np.float64)   # lam^(n-i) for rows i = 1..n
    R = (h * w[:, None]).T @ h + lam ** n * delta * np.eye(L)
    if lam < 1.0:
        c = L * (1.0 - lam) * delta
        np.add.at(R, (np.arange(n) % L, np.arange(n) % L), c * w)
    r = (h * w[:, None]).T @ t
    return np.linalg.solve(R, r), np.linalg.inv(R)
