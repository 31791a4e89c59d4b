"""What the fleet's server does with the adapters it receives: check them, then average.

NumPy only (no Flower here), so every rule can be tested on plain arrays.

Two ways to average LoRA adapters ``(A_i, B_i)`` from K devices with weights ``w_i``:

- ``fedavg``: average A and B apart. The global adapter computes ``mean(B) mean(A)``,
  which is not ``mean(B A)``: the cross terms ``B_i A_j`` of different devices creep in.
- ``product``: average the products ``M = sum_i w_i B_i A_i`` (what each device's adapter
  adds to the output), then factor ``M`` back into rank R by a truncated SVD, the best
  rank-R approximation (Eckart-Young). With one device, or devices that agree, it is exact;
  otherwise the part of ``M`` beyond rank R is lost, and ``product_residual`` says how much.
  The new A keeps the scale of the global A (``refactor``).

Before averaging, ``screen_updates`` refuses what must not be averaged, measuring each
device's distance on what the aggregation averages (factors for ``fedavg``, products for
``product``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Tensors = dict[str, np.ndarray]

AGGREGATIONS = ("fedavg", "product")


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """The (A, B) name pairs of the LoRA adapters among ``names`` (``x.lora_A`` / ``x.lora_B``)."""
    have = set(names)
    return [(n, n[:-len("lora_A")] + "lora_B") for n in sorted(names)
            if n.endswith("lora_A") and n[:-len("lora_A")] + "lora_B" in have]


def payload_bytes(tensors: Tensors) -> int:
    """Bytes of the tensors' values (what crosses the network, framing aside)."""
    return int(sum(np.asarray(t).nbytes for t in tensors.values()))


def update_norm(update: Tensors, reference: Tensors, how: str = "fedavg") -> float:
    """How far a device moved from the global adapter: the L2 norm of ``update - reference``
    measured on what ``how`` averages.

    ``fedavg`` averages every tensor, so every tensor's difference counts. ``product``
    averages the LoRA products ``B A``, so a pair counts by ``|B_u A_u - B_r A_r|_F`` (the
    change of what the adapter adds to the output), other tensors as in ``fedavg``. The
    factors of one product are not unique (``B A = (B c)(A / c)``, and after a refactoring
    the factors of the global adapter are rebalanced), so distances between factors say
    little there; distances between products are the same for every factorisation.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")
    pairs = lora_pairs(list(reference)) if how == "product" else []
    in_pairs = {k for pair in pairs for k in pair}
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for ka, kb in pairs:
            d = (np.asarray(update[kb], np.float64) @ np.asarray(update[ka], np.float64)
                 - np.asarray(reference[kb], np.float64) @ np.asarray(reference[ka], np.float64))
            total += float(np.sum(d * d))
        for k, ref in reference.items():
            if k in in_pairs:
                continue
            d = np.asarray(update[k], np.float64) - np.asarray(ref, np.float64)
            total += float(np.sum(d * d))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def check_update(update: Tensors, reference: Tensors, *, max_norm: float | None, how: str = "fedavg") -> str | None:
    """Why a device's update must not be averaged, or None when it is acceptable.

    Refused: missing or extra tensors, a wrong shape, NaN or inf, or a distance from the
    global adapter (``update_norm`` for the aggregation ``how``) above ``max_norm`` (an
    absurd update, malicious or diverged).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"tensors do not match the adapter: missing {missing}, unexpected {extra}"
    for k, ref in reference.items():
        u = np.asarray(update[k])
        if u.shape != ref.shape:
            return f"tensor '{k}' has shape {list(u.shape)}, expected {list(ref.shape)}"
        if not np.issubdtype(u.dtype, np.floating):
            return f"tensor '{k}' has dtype {u.dtype}, expected floating point"
        if not np.all(np.isfinite(u)):
            return f"tensor '{k}' contains NaN or inf"
    if max_norm is not None:
        n = update_norm(update, reference, how)
        if not n <= max_norm:
            return f"update norm {n:.4g} exceeds the limit {max_norm:.4g}"
    return None


def screen_updates(updates: Sequence[Tensors], reference: Tensors, *, max_norm: float | None,
                   outlier_factor: float | None = 20.0, how: str = "fedavg") -> list[str | None]:
    """``check_update`` for each update, plus a robust rule among three or more.

    With at least three acceptable updates, one whose distance from the global adapter
    exceeds ``outlier_factor`` times the median distance is refused too: a norm that is
    absurd relative to its peers, whatever the absolute limit. Distances are measured on
    what the aggregation ``how`` averages (see ``update_norm``).
    """
    reasons = [check_update(u, reference, max_norm=max_norm, how=how) for u in updates]
    ok = [i for i, r in enumerate(reasons) if r is None]
    if outlier_factor is not None and len(ok) >= 3:
        norms = {i: update_norm(updates[i], reference, how) for i in ok}
        med = float(np.median(list(norms.values())))
        for i, n in norms.items():
            if med > 0 and n > outlier_factor * med:
                reasons[i] = f"update norm {n:.4g} is more than {outlier_factor:g}x the median {med:.4g}"
    return reasons


def _weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def fedavg(updates: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Every tensor averaged apart, weighted (FedAvg: weights = training samples)."""
    w = _weights(weights)
    out = {}
    for k, first in updates[0].items():
        acc = np.zeros(first.shape, np.float64)
        for wi, u in zip(w, updates):
            acc += wi * np.asarray(u[k], np.float64)
        out[k] = acc.astype(first.dtype)
    return out


def refactor(m: np.ndarray, rank: int, a_row_norm: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(A, B) with B A the best rank-``rank`` approximation of ``m`` (out, in), and the
    relative Frobenius residual ``|m - B A| / |m|`` (0 when ``m`` is 0).

    The factors of a product are not unique; which ones the devices start the next round
    from decides how fast they learn (the gradient of B is proportional to A, that of A to
    B). With ``a_row_norm`` every row of A has that norm, ``A = c V^T`` and ``B = U S / c``:
    A keeps the scale LoRA initialised it with, as the devices' own adapters do. Without
    it the singular values are split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``; a
    small product then makes both factors small, and the devices' next updates crawl and
    spread widely (measured on HAR: the largest device's update 25x the median, against
    9x with the scale kept).
    """
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = min(rank, len(s))
    b = np.zeros((m.shape[0], rank))
    a = np.zeros((rank, m.shape[1]))
    if a_row_norm is not None and a_row_norm > 0 and math.isfinite(a_row_norm):
        a[:r] = a_row_norm * vt[:r]
        b[:, :r] = u[:, :r] * (s[:r] / a_row_norm)
    else:
        root = np.sqrt(s[:r])
        b[:, :r] = u[:, :r] * root
        a[:r] = root[:, None] * vt[:r]
    norm = float(np.linalg.norm(m))
    resid = float(np.sqrt(max(0.0, float(np.sum(s[r:] ** 2))))) / norm if norm > 0 else 0.0
    return a, b, resid


def product_average(updates: Sequence[Tensors], weights: Sequence[float],
                    reference: Tensors | None = None) -> tuple[Tensors, float]:
    """LoRA pairs averaged as products ``B A`` and refactored to their rank; other tensors
    as in ``fedavg``. With ``reference`` (the global adapter the devices started from) the
    new A keeps the mean row norm of the reference's A (see ``refactor``). Returns the
    tensors and the largest relative residual of the refactoring over the pairs (how much
    of the mean product rank R cannot hold)."""
    w = _weights(weights)
    out = fedavg(updates, weights)
    worst = 0.0
    for ka, kb in lora_pairs(list(updates[0])):
        a0, b0 = updates[0][ka], updates[0][kb]
        m = np.zeros((b0.shape[0], a0.shape[1]), np.float64)
        for wi, u in zip(w, updates):
            m += wi * (np.asarray(u[kb], np.float64) @ np.asarray(u[ka], np.float64))
        scale = None
        if reference is not None and ka in reference:
            # rows beyond the product's rank stay zero (rank > min(out, in)): they carry no scale
            norms = np.linalg.norm(np.asarray(reference[ka], np.float64), axis=1)
            scale = float(np.mean(norms[norms > 0])) if np.any(norms > 0) else None
        a, b, resid = refactor(m, a0.shape[0], scale)
        out[ka], out[kb] = a.astype(a0.dtype), b.astype(b0.dtype)
        worst = max(worst, resid)
    return out, worst


def aggregate(updates: Sequence[Tensors], weights: Sequence[float], how: str,
              reference: Tensors | None = None) -> tuple[Tensors, float]:
    """``fedavg`` or ``product`` (see the module docstring); returns (tensors, residual).
    ``reference``: the global adapter the updates started from (``product`` keeps its
    A's scale)."""
    if how == "fedavg":
        return fedavg(updates, weights), 0.0
    if how == "product":
        return product_average(updates, weights, reference)
    raise ValueError(f"unknown aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")
