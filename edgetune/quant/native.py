"""The int8 forward pass on the compiled engine (et_int8.c), for any int8 backbone.

    rows, logits = native_forward_taps(qmodel, qmodel.prepare(x))

gives what ``edgetune.quant.int8.int8_forward_taps`` gives (every layer's int8 input side
by side, and the float logits), bit for bit; the tests hold the two to that.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import UsageError
from ..nn.mlp import Backbone

__all__ = ["int8_c_backbone", "native_forward_taps"]

_INT32_MAX = 2 ** 31 - 1


def int8_c_backbone(bb: Backbone, keep: list) -> Any:
    """The et_backbone of an int8 backbone (the binding's ``int8_backbone``): its tensors read in
    place, the arrays the struct points into appended to ``keep``."""
    from ..core.engine import int8_backbone

    return int8_backbone(bb, keep)


def native_forward_taps(bb: Backbone, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows [q_0 | ... | q_{n-1}], float32 logits) of prepared inputs ``x`` (samples,
    sizes[0]) float32, computed by the compiled engine."""
    from .. import core

    lib = core.load()
    if lib is None:
        raise UsageError(f"the compiled engine is not available: {core.unavailable_reason()}")
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != bb.sizes[0] or x.shape[0] < 1:
        raise UsageError(f"x must be prepared inputs (samples, {bb.sizes[0]}), got {list(x.shape)}")
    if x.shape[0] > _INT32_MAX:
        raise UsageError("too many samples for one call")
    keep: list = []
    s = int8_c_backbone(bb, keep)
    n = x.shape[0]
    size = lib.et_int8_workspace_size(ctypes.byref(s), n)
    if size == 0:
        raise UsageError("the compiled engine refuses this int8 backbone")
    ws = np.empty(size, np.uint8)
    rows = np.empty((n, sum(bb.in_widths)), np.int8)
    logits = np.empty((n, bb.sizes[-1]), np.float32)
    rc = lib.et_int8_forward_taps(ctypes.byref(s), x.ctypes.data, n, rows.ctypes.data, logits.ctypes.data,
                                  ws.ctypes.data, ws.nbytes)
    if rc != 0:
        raise UsageError(f"the compiled int8 forward pass refused its arguments ({core.ERRORS.get(rc, rc)})")
    return rows, logits
