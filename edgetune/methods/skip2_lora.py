"""`skip2-lora`: `skip-lora` plus the skip-cache.

The backbone is frozen, so a sample's adapter inputs and frozen logits are the same in
every epoch. They are computed the first time the sample is seen and read from the cache
afterwards: from the second epoch on, the backbone's forward pass is skipped entirely.
The math is exactly ``skip-lora``'s.
"""
from __future__ import annotations

import numpy as np

from ..cache import SkipCache, backbone_key
from .skip_lora import SkipLoRA


class Skip2LoRA(SkipLoRA):
    name = "skip2-lora"
    description = "skip-lora plus the skip-cache: after the first epoch the backbone's forward pass is skipped."
    uses_cache = True
    cache: SkipCache | None = None
    _fitting = False
    #: The backbone key the current fit runs on (the trainer keeps the engine's structs for it).
    fit_key: str | None = None

    def begin_fit(self, x: np.ndarray) -> None:
        guard = backbone_key(self.backbone)
        key = guard.digest(self.backbone)
        # The frozen backbone's transposed weights, made once per backbone state and shared.
        self._wt = guard.transposed_weights(self.backbone, key)
        self.fit_key = key
        n = x.shape[0]
        if type(self.cache) is SkipCache and n > self.cache.n_samples:
            self.cache.grow(n)  # more samples than last fit (partial_fit): keep the rows already made
        if self.cache is None or self.cache.n_samples != n:
            self.cache = SkipCache(n, self.row_width, self.backbone.dtype,
                                   budget_bytes=self.options.cache_budget,
                                   overflow=self.options.cache_overflow)
        # Never serve stale rows: a changed backbone drops them all, a changed sample its own.
        bb = self.backbone
        raw = bb.tap_layers[0] == 0 and not bb.layers[0].spec.spatial  # the row starts with the input itself
        if type(self.cache) is SkipCache:
            self.cache.refresh(key, x, rows_begin_with_inputs=raw)
        else:
            self.cache.refresh(key, x)
        self.cache.reset_stats()
        self._fitting = True

    def end_fit(self) -> None:
        super().end_fit()
        self._fitting = False

    def taps(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if self.cache is None or not self._fitting:  # outside fit() the key is unchecked: no cache
            return super().taps(x, ids)
        return self.cache.fetch(ids, lambda missing: self.compute_taps(x[missing]))

    def fill_cache(self, x: np.ndarray, block: int = 64) -> None:
        """Fill every cacheable row now, in blocks (the eager fill; the math is the lazy fill's)."""
        if self.cache is None:
            return
        for lo in range(0, self.cache.capacity, block):
            ids = np.arange(lo, min(lo + block, self.cache.capacity))
            self.cache.fetch(ids, lambda missing: self.compute_taps(x[missing]))

    def memory_report(self) -> dict[str, int]:
        rep = super().memory_report()
        rep["cache_bytes"] = self.cache.nbytes if self.cache is not None else 0
        return rep
