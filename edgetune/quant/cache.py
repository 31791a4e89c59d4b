"""An int8 skip-cache: the adapters' inputs stored as int8 with one scale per column block.

A row ``[x | h_1 | ... | h_{n-1} | z_n]`` costs ``D + 4 * out`` bytes instead of
``4 * (D + out)``: the D adapter inputs as int8, the frozen logits kept float32 (they are
added to the output as they are, and there are only ``out`` of them). On an int8 backbone
the taps *are* int8 values times the layer's input scale, so this cache is lossless; on a
float backbone, and on an int8 CNN (whose taps are int8 inputs pooled per channel), it rounds
the taps to scales calibrated on them (see ``docs/budgets.md`` for the accuracy effect).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..cache import SkipCache
from ..errors import UsageError
from .int8 import QMAX, calibrate, tap_scales


class Int8SkipCache(SkipCache):
    def __init__(self, n_samples: int, col_scales: np.ndarray, n_outputs: int, *,
                 budget_bytes: int | None = None, overflow: str = "error"):
        col_scales = np.asarray(col_scales, np.float32)
        if col_scales.ndim != 1 or col_scales.size == 0:
            raise UsageError(f"col_scales: one scale per adapter input, a 1-D array; got shape {col_scales.shape}")
        if not np.all(np.isfinite(col_scales) & (col_scales > 0)):
            raise UsageError("col_scales must be finite and positive (a zero or NaN scale cannot round a column)")
        d_in = int(col_scales.shape[0])
        self._init_rows(n_samples, d_in + n_outputs, d_in + 4 * n_outputs, budget_bytes, overflow,
                        "the int8 skip-cache", f"{n_samples} samples x ({d_in} int8 + {n_outputs} float32)")
        self.d_in = d_in
        self.col_scales = col_scales
        self.data = np.empty((self.capacity, d_in), np.int8)
        self.logits = np.empty((self.capacity, n_outputs), np.float32)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.logits.nbytes + self.col_scales.nbytes + self.filled.nbytes

    def refresh(self, backbone_key: str, x: np.ndarray) -> None:
        """int8 rows hold rounded inputs, so the data is identified by its digest instead."""
        from ..cache import data_digest

        self.validate((backbone_key, data_digest(x)))

    def _quantize(self, h: np.ndarray) -> np.ndarray:
        q = np.rint(h / self.col_scales)
        np.clip(q, -QMAX, QMAX, out=q)
        return q.astype(np.int8)

    def fetch(self, ids: np.ndarray, compute: Callable[[np.ndarray], np.ndarray],
              out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((len(ids), self.row_width), np.float32)
        hit = self.filled[ids]
        miss = ~hit
        if miss.any():
            mids = ids[miss]
            rows = np.asarray(compute(mids), np.float32)
            q = self._quantize(rows[:, :self.d_in])
            # Every epoch sees the rounded rows, whether they come from the cache or not.
            rows[:, :self.d_in] = q * self.col_scales
            out[miss] = rows
            keep = mids < self.capacity
            if keep.any():
                sids = mids[keep]
                self.data[sids] = q[keep]
                self.logits[sids] = rows[keep, self.d_in:]
                self.filled[sids] = True
        if hit.any():
            hids = ids[hit]
            rows = np.empty((len(hids), self.row_width), np.float32)
            np.multiply(self.data[hids], self.col_scales, out=rows[:, :self.d_in])
            rows[:, self.d_in:] = self.logits[hids]
            out[hit] = rows
        self.hits += int(hit.sum())
        self.misses += int(miss.sum())
        return out


def attach_int8_cache(method, n_samples: int, *, x_calib: np.ndarray | None = None,
                      percentile: float = 100.0) -> Int8SkipCache:
    """Give a ``skip2-lora`` method an int8 cache for ``n_samples`` training samples.

    On an int8 backbone the column scales are the backbone's own input scales; on a float
    backbone they are calibrated on raw inputs ``x_calib`` (pre-training data).
    """
    if not getattr(method, "uses_cache", False):
        raise UsageError(f"method {method.name} has no skip-cache")
    bb = method.backbone
    if bb.is_int8 and not any(s.spatial for s in bb.specs):
        scales = tap_scales(bb)  # an int8 MLP's taps are its int8 values: lossless
    else:
        if x_calib is None:
            raise UsageError("an int8 cache on a float backbone, or on an int8 CNN (its taps are pooled floats), "
                             "needs calibration inputs (x_calib)")
        s = calibrate(bb, x_calib, percentile=percentile)[:-1]
        scales = np.repeat(s, bb.tap_widths).astype(np.float32)
    opts = method.options
    method.cache = Int8SkipCache(n_samples, scales, bb.sizes[-1], budget_bytes=opts.cache_budget,
                                 overflow=opts.cache_overflow)
    return method.cache
