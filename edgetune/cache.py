"""The skip-cache: frozen activations per sample, computed once, read every later epoch.

Each sample id owns one preallocated row ``[x | h_1 | ... | h_{n-1} | z_n]`` (the inputs
of every skip adapter and the frozen logits). The cache is keyed by a digest of the
backbone, and every row carries its sample's inputs: if the backbone changes every row is
invalidated, if a sample changes its row is, so a stale activation is never served.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Callable

import numpy as np

from .errors import BudgetError, UsageError
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
        if dtype not in (np.float32, np.float64):
            raise UsageError(f"a skip-cache of floats holds float32 or float64 rows (the backbone's dtype), not "
                             f"{dtype}; for 8-bit rows use edgetune.quant.attach_int8_cache")
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
        self._budget, self._overflow = budget_bytes, overflow
        self._buffer: np.ndarray | None = None  # grow(): the doubling buffer ``data`` views
        self.filled = np.zeros(n_samples, dtype=bool)
        self.key: tuple[str, str] | None = None
        self.complete = False
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (rows, with the room made by ``grow``, plus the filled-mask)."""
        return (self.data if self._buffer is None else self._buffer).nbytes + self.filled.nbytes

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

    def refresh(self, backbone_key: str, x: np.ndarray, *, rows_begin_with_inputs: bool = True) -> None:
        """Keep exactly the rows that this backbone computed from these inputs; drop the rest.

        An MLP's row begins with its sample's inputs, so comparing them with ``x`` is an exact
        check that needs no hash of the data (and drops only the samples that changed). Where
        a row does not (a convolutional backbone taps its input pooled per channel), the data
        are identified by their digest: any change drops every row.
        """
        if not rows_begin_with_inputs:
            self.validate((backbone_key, data_digest(x)))
            return
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

    def grow(self, n_samples: int) -> None:
        """Make room for ``n_samples`` (more than now) keeping every filled row: the stream of
        ``FineTuner.partial_fit``. The rows live in a buffer that doubles, so that growing one
        sample at a time copies each row O(1) times on average; ``data`` stays a contiguous view."""
        if n_samples <= self.n_samples:
            return
        row_bytes = self.row_width * self.data.dtype.itemsize
        limit = None if self._budget is None else int(self._budget // row_bytes)
        capacity = n_samples
        if limit is not None and n_samples > limit:
            if self._overflow == "error":
                raise BudgetError(f"the skip-cache needs {format_bytes(n_samples * row_bytes)} for {n_samples} "
                                  f"samples but the budget is {format_bytes(self._budget)}; raise the budget, or "
                                  f"allow a partial cache")
            capacity = limit
        buf = self._buffer if self._buffer is not None else self.data
        if buf.shape[0] < capacity:
            rows = max(capacity, 2 * buf.shape[0])
            if limit is not None:
                rows = min(rows, limit)  # >= capacity, which is at most the limit
            new = np.empty((rows, self.row_width), self.data.dtype)
            new[:self.capacity] = self.data[:self.capacity]
            buf = new
        self._buffer = buf
        self.data = buf[:capacity]
        filled = np.zeros(n_samples, dtype=bool)
        filled[:self.n_samples] = self.filled
        self.filled = filled
        self.n_samples, self.capacity = n_samples, capacity
        self.complete = False

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


def _immutable(a: np.ndarray) -> bool:
    """True when no one can write ``a``'s memory: it is read-only and its memory belongs to a
    ``bytes`` object. NumPy refuses to make such an array writeable again (an array that owns
    its memory, or views a writeable array, can be made writeable by its owner; a base array
    can be written through another view), so only this case is trusted without a comparison."""
    if a.flags.writeable:
        return False
    base = a.base
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return type(base) is bytes


def unwritable(a: np.ndarray) -> np.ndarray:
    """A read-only copy of ``a`` that no one can make writeable (a view of a ``bytes`` object):
    edgetune trusts such arrays not to change between calls, and skips checking them again."""
    a = np.asarray(a)
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), a.dtype).reshape(a.shape)


def _same_bits(a: np.ndarray, snap: np.ndarray) -> bool:
    """``a`` holds exactly the bytes of ``snap`` (same shape and dtype; -0.0 differs from 0.0)."""
    if a.shape != snap.shape or a.dtype != snap.dtype:
        return False
    if a.dtype.kind == "f":  # compare bit patterns: NaN equals itself, -0.0 differs from 0.0
        unsigned = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(np.ascontiguousarray(a).view(unsigned), snap.view(unsigned)))
    return bool(np.array_equal(a, snap))


class BackboneKey:
    """A backbone's digest (the skip-cache's key), hashed again only when the backbone may have
    changed; one per backbone object (``backbone_key``).

    Hashing every tensor with blake2b costs many times a small fit's epochs. A float MLP's
    forward passes read contiguous transposed copies of its weights (``transposed_weights``);
    this keeps them, made when the digest is computed, shared read-only by every method on the
    backbone, and with them the digest. A later call compares every tensor that determines
    the outputs (``Backbone.tensors()``) bit for bit with what was hashed: each weight with
    its transposed copy, the small tensors (biases, input normalisation) with copies, and the
    layer descriptions; one pass over memory, several times cheaper than the hash (see
    ``benchmarks/fixed_costs.py``), and no extra copy of the weights. Any difference hashes
    again, whoever wrote it: an in-place edit of a weight, an edit of a base array through
    another view, an array made writeable again, a layer replaced. Tensors no one can write
    (read-only views of ``bytes``, see ``_immutable``) are kept by reference, not compared.
    Backbones without transposed copies (int8, convolutions) are hashed on every call.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the digest and drop the transposed copies (the next call hashes again)."""
        self._digest: str | None = None
        self._structure: tuple | None = None
        self._reference: dict[str, np.ndarray] = {}   # tensor name -> what it must equal
        self._transposed: set[str] = set()            # names whose reference is a transposed copy
        self._wt: list[np.ndarray | None] | None = None
        self.hashes = 0  # how many times the tensors were hashed (tests and benchmarks read it)

    @staticmethod
    def _describe(backbone) -> tuple:
        return tuple(backbone.specs), backbone.activation.name, backbone.is_int8

    def _unchanged(self, name: str, a: np.ndarray) -> bool:
        ref = self._reference[name]
        if a is ref and _immutable(a):
            return True
        return _same_bits(a, ref.T if name in self._transposed else ref)

    def digest(self, backbone) -> str:
        """``backbone.digest()``, from what was hashed when no tensor changed since."""
        tensors = backbone.tensors()
        structure = self._describe(backbone)
        if self._digest is not None and structure == self._structure and tensors.keys() == self._reference.keys() \
                and all(self._unchanged(k, a) for k, a in tensors.items()):
            return self._digest
        hashes = self.hashes
        self.clear()
        self.hashes = hashes + 1
        digest = backbone.digest()
        wt = backbone.transposed_weights()
        names = [f"layers.{k}.weight" for k in range(backbone.n_layers)]
        if wt is None or any(n in tensors and w is None for n, w in zip(names, wt)):
            return digest  # nothing to compare with short of a copy of every weight: hash every call
        for w in wt:
            if w is not None:
                w.flags.writeable = False
        reference = {k: a if _immutable(a) else np.array(a, copy=True) for k, a in tensors.items()
                     if k not in names}
        for n, w in zip(names, wt):
            if n in tensors:
                if _immutable(tensors[n]):
                    reference[n] = tensors[n]
                else:
                    reference[n] = w
                    self._transposed.add(n)
        self._digest, self._structure, self._reference, self._wt = digest, structure, reference, wt
        return digest

    def transposed_weights(self, backbone, digest: str) -> list[np.ndarray | None] | None:
        """``backbone.transposed_weights()`` for the tensors that gave ``digest`` (the value
        ``digest(backbone)`` just returned), read-only and shared; made anew when not kept."""
        if self._digest is not None and digest == self._digest and self._wt is not None:
            return self._wt
        return backbone.transposed_weights()


_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def backbone_key(backbone) -> BackboneKey:
    """The ``BackboneKey`` of this backbone object (made on first use, dropped with the backbone;
    ``backbone_key(b).clear()`` frees its transposed copies at once)."""
    key = _KEYS.get(backbone)
    if key is None:
        key = _KEYS[backbone] = BackboneKey()
    return key
