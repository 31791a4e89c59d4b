"""The skip-cache: frozen activations per sample, computed once, read every later epoch.

Each sample id owns one preallocated row ``[x | h_1 | ... | h_{n-1} | z_n]`` (the inputs
of every skip adapter and the frozen logits). The cache is keyed by a digest of the
backbone, and every row carries its sample's inputs: if the backbone changes every row is
invalidated, if a sample changes its row is, so a stale activation is never served.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from .errors import BudgetError
from .units import format_bytes


def data_digest(*arrays: np.ndarray) -> str:
    """A hash of arrays' shapes, dtypes and bytes: identifies a training set."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)
    return h.hexdigest()


class SkipCache:
    def __init__(self, n_samples: int, row_width: int, dtype: np.dtype, *,
                 budget_bytes: int | None = None, overflow: str = "error"):
        dtype = np.dtype(dtype)
        self._init_rows(n_samples, row_width, row_width * dtype.itemsize, budget_bytes, overflow,
                        "the skip-cache", f"{n_samples} samples x {row_width} values x {dtype.itemsize} B")
        self.data = np.empty((self.capacity, row_width), dtype=dtype)

    def _init_rows(self, n_samples: int, row_width: int, row_bytes: int, budget_bytes: int | None,
                   overflow: str, what: str, layout: str) -> None:
        """The bookkeeping every skip-cache shares: capacity under the budget, fill mask, key, counts."""
        need = n_samples * row_bytes
        capacity = n_samples
        if budget_bytes is not None and need > budget_bytes:
            if overflow == "error":
                raise BudgetError(
                    f"{what} needs {format_bytes(need)} ({layout}) but the budget is {format_bytes(budget_bytes)}; "
                    f"raise the budget, or allow a partial cache (samples beyond it are recomputed every epoch)")
            capacity = int(budget_bytes // row_bytes)
        self.n_samples = n_samples
        self.capacity = capacity
        self.row_width = row_width
        self.filled = np.zeros(n_samples, dtype=bool)
        self.key: tuple[str, str] | None = None
        self.complete = False
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (rows plus the filled-mask)."""
        return self.data.nbytes + self.filled.nbytes

    @property
    def n_filled(self) -> int:
        return int(self.filled.sum())

    def validate(self, key: tuple[str, str]) -> None:
        """Drop every row unless ``key`` (backbone digest, data digest) is what filled them."""
        if key != self.key:
            if self.key is not None:
                self.invalidations += 1
            self.filled[:] = False
            self.complete = False
            self.key = key

    def refresh(self, backbone_key: str, x: np.ndarray) -> None:
        """Keep exactly the rows that this backbone computed from these inputs; drop the rest.

        A row begins with its sample's inputs, so comparing them with ``x`` is an exact
        check that needs no hash of the data (and drops only the samples that changed).
        """
        if self.key is None or self.key[0] != backbone_key:
            self.validate((backbone_key, "rows"))
            return
        cap, w = self.capacity, x.shape[1]
        if self.filled[:cap].all():
            changed = np.flatnonzero(np.any(self.data[:cap, :w] != x[:cap], axis=1))
        else:
            ids = np.flatnonzero(self.filled[:cap])
            changed = ids[np.any(self.data[ids, :w] != x[ids], axis=1)]
        if changed.size:
            self.filled[changed] = False
            self.complete = False
            self.invalidations += 1

    def reset_stats(self) -> None:
        """Count hits and misses from zero (the trainer does this at the start of each fit)."""
        self.hits = self.misses = 0

    def fetch(self, ids: np.ndarray, compute: Callable[[np.ndarray], np.ndarray],
              out: np.ndarray | None = None) -> np.ndarray:
        """Rows for ``ids``: read from the cache where filled, else ``compute(ids_missing)``."""
        if self.complete:  # every later epoch: one gather, no bookkeeping
            self.hits += len(ids)
            return self.data[ids] if out is None else np.take(self.data, ids, axis=0, out=out)
        hit = self.filled[ids]
        if hit.all():
            self.hits += len(ids)
            if out is None:
                return self.data[ids]
            return np.take(self.data, ids, axis=0, out=out)
        if out is None:
            out = np.empty((len(ids), self.row_width), dtype=self.data.dtype)
        miss = ~hit
        rows = compute(ids[miss])
        out[miss] = rows
        if hit.any():
            out[hit] = self.data[ids[hit]]
        self.hits += int(hit.sum())
        self.misses += int(miss.sum())
        storable = miss & (ids < self.capacity)
        if storable.any():
            sids = ids[storable]
            self.data[sids] = out[storable]
            self.filled[sids] = True
            self.complete = self.capacity == self.n_samples and bool(self.filled.all())
        return out

    def stats(self) -> dict[str, int]:
        return {"cache_bytes": self.nbytes, "cache_capacity": self.capacity, "cache_filled": self.n_filled,
                "cache_hits": self.hits, "cache_misses": self.misses,
                "cache_invalidations": self.invalidations}
