"""The compiled engine behind the trainer: a method's tensors handed to C, whole epochs per call.

``CoreModel`` describes a method on its backbone to C: it checks every array's shape,
dtype and contiguity and every offset into the parameter vector *here*, so that the C
code only ever reads sizes that were checked, and keeps the arrays alive while C holds
pointers into them. ``CoreRunner`` runs epochs for the trainer; ``batch_gradient`` and
``predict`` serve the tests.

``resolve_engine`` picks the engine: ``"auto"`` (the default, or ``EDGETUNE_ENGINE``)
uses C when it is built and supports the configuration, NumPy otherwise.
"""
from __future__ import annotations

import ctypes
import operator
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EdgetuneError, UsageError
from . import MAX_LAYERS, ERRORS, Backbone as CBackbone, Cache as CCache, EpochStats, Method as CMethod
from . import Optimizer as COptimizer, Pcg64, enum, load, unavailable_reason
from ..nn.layers import lora_specs

ENGINES = ("auto", "c", "numpy")
# The C enums, as the binding checked them against the library at load (edgetune/core/__init__.py).
ACTIVATIONS = enum("activation")
KINDS = enum("method")
LAYER_KINDS = enum("layer")
CACHE_KINDS = enum("cache")
OPTIMIZERS = {cls: enum("optimizer")[cls.lower()] for cls in ("SGD", "Momentum", "Adam")}
INT32_MAX = 2 ** 31 - 1
_warned = False


class CoreError(EdgetuneError):
    """The compiled engine refused a call (a size or argument it was not built for)."""


def _f32(a: Any) -> Any:
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _check(a: Any, shape: tuple[int, ...], dtype: Any, what: str) -> np.ndarray:
    """``a`` must be a C-contiguous array of exactly this shape and dtype (no copy is made:
    C writes into some of these arrays)."""
    if not isinstance(a, np.ndarray):
        raise UsageError(f"{what}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise UsageError(f"{what}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.shape != tuple(shape):
        raise UsageError(f"{what}: shape {list(a.shape)}, expected {list(shape)}")
    if not a.flags.c_contiguous:
        raise UsageError(f"{what}: must be C-contiguous (strides {a.strides})")
    if not a.flags.aligned:
        raise UsageError(f"{what}: must be aligned")
    return a


def unsupported_reason(method: Any, optimizer: str | None = None) -> str | None:
    """Why the compiled engine cannot run this method (None: it can)."""
    spec_fn = getattr(method, "core_spec", None)
    if spec_fn is None:
        return f"method {method.name} has no compiled implementation"
    bb = method.backbone
    if bb.n_layers > MAX_LAYERS:
        return f"the compiled engine takes at most {MAX_LAYERS} layers (this backbone has {bb.n_layers})"
    if max(_widths(bb)) > INT32_MAX // 64:
        return "a layer is too wide for the compiled engine"
    if np.dtype(bb.dtype) != np.float32:
        return f"the compiled engine computes in float32 (this backbone is {bb.dtype})"
    if not bb.is_plain_mlp():
        # any chain of layers runs the skip, layer-wise and sparse methods (float32)
        if _core_kind(method) not in ("skip", "layerwise", "sparse"):
            kinds = sorted({s.kind for s in bb.specs} - {"dense"})
            why = f"{', '.join(kinds)} layers" if kinds else "an activation per layer"
            return (f"the compiled engine runs {method.name} on MLPs only (dense layers, one activation "
                    f"between layers and none after the last); this backbone has {why}")
        if bb.is_int8 and all(s.kind == "dense" for s in bb.specs):
            return "the compiled engine runs int8 backbones that are MLPs only"
        if bb.is_int8 and _core_kind(method) not in ("skip", "sparse"):
            return "the compiled engine runs the skip methods and sparse on int8 CNNs (the others need float weights)"
        for k, spec in enumerate(bb.specs):
            if spec.activation not in ACTIVATIONS:
                return f"activation {spec.activation} (layer {k}) has no compiled implementation"
    elif bb.activation.name not in ACTIVATIONS:
        return f"activation {bb.activation.name} has no compiled implementation"
    if getattr(method, "takes_scheme", False):
        if method.first >= bb.n_layers:
            return "the sparse scheme trains nothing"
        # dense layers only run the pruned MLP path (as in NumPy), which passes gradients back
        # through ReLU and identity; any other chain of layers runs every activation
        if all(s.kind == "dense" for s in bb.specs) and any(s.activation not in ("relu", "identity")
                                                            for s in bb.specs[:-1]):
            return "sparse update supports ReLU and identity activations"
    if optimizer is not None and optimizer not in ("sgd", "momentum", "adam"):
        return f"optimizer {optimizer} has no compiled implementation"
    return None


def _widths(bb: Any) -> list[int]:
    """Every layer's input and output width (values per sample)."""
    return [s.in_features for s in bb.specs] + [s.out_features for s in bb.specs]


def _core_kind(method: Any) -> str | None:
    """The kind of engine a method is in C ("layerwise", "skip", "sparse"), None if it cannot say."""
    try:
        return method.core_spec().kind
    except Exception:  # a method that cannot describe itself on this backbone is not run in C
        return None


def resolve_engine(requested: str | None, method: Any, optimizer: str | None = None) -> str:
    """The engine that will run: 'c' or 'numpy'. ``requested`` None reads EDGETUNE_ENGINE."""
    global _warned
    if requested is None:
        requested = os.environ.get("EDGETUNE_ENGINE", "auto") or "auto"
    if requested not in ENGINES:
        raise UsageError(f"unknown engine '{requested}': use one of {', '.join(ENGINES)}")
    if requested == "numpy":
        return "numpy"
    if load() is None:
        if requested == "c":
            raise UsageError(f"engine 'c' was asked for, but {unavailable_reason()}")
        if not _warned:
            _warned = True
            warnings.warn(f"edgetune runs on the NumPy engine: {unavailable_reason()}", RuntimeWarning,
                          stacklevel=3)
        return "numpy"
    reason = unsupported_reason(method, optimizer)
    if reason is not None:
        if requested == "c":
            raise UsageError(f"engine 'c' cannot run this configuration: {reason}")
        return "numpy"
    return "c"


class CoreModel:
    """A method on its backbone, as C structs; every array it points into is checked and kept."""

    def __init__(self, method: Any, batch_size: int, *, live: bool = False):
        """``live``: C reads the backbone's weights and biases in place, as they are at each call
        (every one must be a C-contiguous float32 array; dense weights as stored, (out, in)), not
        the transposed copies the trainer keeps under the backbone key: a forward-only model
        (``Predictor``) that needs no key check."""
        lib = load()
        if lib is None:
            raise UsageError(f"the compiled engine is not available: {unavailable_reason()}")
        reason = unsupported_reason(method)
        if reason is not None:
            raise UsageError(f"engine 'c' cannot run this configuration: {reason}")
        if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= INT32_MAX // max(
                _widths(method.backbone) + [1]) // 64:
            raise UsageError(f"batch_size {batch_size!r} is out of range for the compiled engine")
        self.lib = lib
        self.method = method
        self.batch = int(batch_size)
        self._keep: list[np.ndarray] = []
        self.params = _check(method.params.flat, (method.params.flat.size,), np.float32, "parameters")
        self.grads = _check(method.params.grad, self.params.shape, np.float32, "gradients")
        spec = method.core_spec()
        self.spec = spec
        self.live = live
        self.bb = self._backbone(method.backbone, spec)
        self.tap_widths = self._taps(method.backbone)
        self.d_in = sum(self.tap_widths)
        self.m = self._method(method, spec)
        self.sizes = list(method.backbone.sizes)
        self.params_ptr, self.grads_ptr = self.params.ctypes.data, self.grads.ctypes.data
        self.fusable: bool | None = None  # et_fused_update for these structs (CoreRunner asks once)

    def _keep_array(self, a: np.ndarray) -> np.ndarray:
        return _kept(self._keep, a)

    def _backbone(self, bb: Any, spec: Any) -> CBackbone:
        if bb.is_int8:  # every kind's int8 tensors, read in place; C checks them (scales, requantisers)
            s = int8_backbone(bb, self._keep)
            rc = self.lib.et_int8_backbone_check(ctypes.byref(s))
        else:
            s = self._float_backbone(bb, spec)
            rc = self.lib.et_backbone_check(ctypes.byref(s))
        if rc != 0:
            raise CoreError(f"the compiled engine refused the backbone: {ERRORS.get(rc, rc)}")
        return s

    def _float_backbone(self, bb: Any, spec: Any) -> CBackbone:
        s = layer_backbone(bb.specs)
        sizes = bb.sizes
        wt = spec.wt
        if self.live:
            for k, layer in enumerate(bb.layers):
                if layer.spec.has_params:
                    w = layer.weight
                    if layer.spec.kind == "dense" and isinstance(w, np.ndarray) and w.ndim == 2 \
                            and not w.flags.c_contiguous and w.T.flags.c_contiguous:  # stored as W^T (in, out)
                        s.layers[k].wt = _f32(self._keep_array(_check(w.T, layer.spec.weight_shape[::-1], np.float32,
                                                                      f"layer {k} weight")))
                    else:
                        s.layers[k].w = _f32(self._keep_array(_check(w, layer.spec.weight_shape, np.float32,
                                                                     f"layer {k} weight")))
                    s.layers[k].bias = _f32(self._keep_array(_check(layer.bias, layer.spec.bias_shape, np.float32,
                                                                    f"layer {k} bias")))
            return s
        for k in range(bb.n_layers):
            shape = (sizes[k + 1], sizes[k])
            layer = s.layers[k]
            lspec = bb.specs[k]
            if not lspec.has_params:
                continue
            # Frozen tensors C reads in place; a non-contiguous one (a view) is read from a copy.
            bias = self._keep_array(np.ascontiguousarray(bb.biases[k]))
            layer.bias = _f32(_check(bias, lspec.bias_shape, np.float32, f"layer {k} bias"))
            if lspec.kind != "dense":  # a convolution reads its weight as stored (out, in/groups, *kernel)
                w = self._keep_array(np.ascontiguousarray(bb.weights[k]))
                layer.w = _f32(_check(w, lspec.weight_shape, np.float32, f"layer {k} weight"))
                continue
            frozen = spec.kind == "sparse" or (spec.kind == "layerwise" and spec.weight[k] < 0)
            if frozen:  # the sparse method's weights, and the layer-wise backward pass's frozen W
                w = self._keep_array(np.ascontiguousarray(bb.weights[k]))
                layer.w = _f32(_check(w, shape, np.float32, f"layer {k} weight"))
            if spec.kind != "sparse" and wt is not None and wt[k] is not None:
                layer.wt = _f32(self._keep_array(_check(wt[k], shape[::-1], np.float32,
                                                        f"layer {k} transposed weight")))
        return s

    def _taps(self, bb: Any) -> list[int]:
        """The skip taps' widths as C derives them from the layers, checked against the backbone's."""
        widths = (ctypes.c_int32 * MAX_LAYERS)()
        n = self.lib.et_skip_taps(ctypes.byref(self.bb), None, widths)
        got = [int(v) for v in widths[:n]]
        if got != list(bb.tap_widths):
            raise CoreError(f"the compiled engine derives skip taps of widths {got}, the backbone {bb.tap_widths}")
        return got

    def _offset(self, off: int, shape: tuple[int, ...], name: str) -> int:
        """A tensor's offset into the parameters, checked against the tensor C will read there."""
        if off < 0:
            return -1
        size = int(np.prod(shape))
        if off + size > self.params.size:
            raise UsageError(f"tensor {name} ({size} values at {off}) runs past the parameters ({self.params.size})")
        return off

    def _method(self, method: Any, spec: Any) -> CMethod:
        s = CMethod()
        sizes = method.backbone.sizes
        n = len(sizes) - 1
        r = int(spec.rank)
        s.kind = KINDS[spec.kind]
        s.rank = r
        s.scale = float(spec.scale)
        s.first = int(spec.first)
        s.qas = int(bool(spec.qas))
        s.n_params = self.params.size
        if not 0 <= s.first < n:
            raise UsageError(f"first trained layer {s.first} is outside 0..{n - 1}")
        for k in range(MAX_LAYERS):
            s.off_weight[k] = s.off_bias[k] = s.off_lora_a[k] = s.off_lora_b[k] = -1
        s.off_bias_delta = self._offset(spec.bias_delta, (sizes[-1],), "head.bias_delta")
        s.off_skip_a = s.off_skip_b = -1
        if spec.kind == "layerwise":
            for k, lspec in enumerate(method.backbone.specs):
                dense = lspec.kind == "dense"
                offs = (spec.weight[k], spec.bias[k], spec.lora_a[k], spec.lora_b[k])
                if not lspec.has_params:
                    if any(o >= 0 for o in offs):
                        raise UsageError(f"layer {k} ({lspec.kind}) has no weights to train")
                    continue
                lora = lora_specs(lspec, r)
                if lora is None and (spec.lora_a[k] >= 0 or spec.lora_b[k] >= 0):
                    raise UsageError(f"layer {k}: no LoRA adapter fits a {lspec.kind} layer with groups {lspec.groups}")
                a_shape, b_shape = (lora[0].weight_shape, lora[1].weight_shape) if lora else ((0,), (0,))
                w_shape = (sizes[k], sizes[k + 1]) if dense else lspec.weight_shape  # dense: W^T (in, out)
                s.off_weight[k] = self._offset(spec.weight[k], w_shape, f"layer {k} weight")
                s.off_bias[k] = self._offset(spec.bias[k], lspec.bias_shape, f"layer {k} bias")
                s.off_lora_a[k] = self._offset(spec.lora_a[k], a_shape, f"layer {k} lora_A")
                s.off_lora_b[k] = self._offset(spec.lora_b[k], b_shape, f"layer {k} lora_B")
                if (s.off_lora_a[k] < 0) != (s.off_lora_b[k] < 0):
                    raise UsageError(f"layer {k}: a LoRA adapter needs both A and B")
                if s.off_weight[k] < 0 and not (self.bb.layers[k].wt if dense else self.bb.layers[k].w):
                    raise UsageError(f"layer {k}: no weight for the forward pass")
        elif spec.kind == "skip":
            d, taps = self.d_in, len(self.tap_widths)
            s.off_skip_a = self._offset(spec.skip_a, (taps * r, d), "skip.lora_A")
            s.off_skip_b = self._offset(spec.skip_b, (sizes[-1], taps * r), "skip.lora_B")
            if s.off_skip_a < 0 or s.off_skip_b < 0:
                raise UsageError("skip adapters need both A and B")
            specs = method.backbone.specs
            if not self.bb.is_int8 and any(specs[k].has_params and not (self.bb.layers[k].wt or self.bb.layers[k].w)
                                           for k in range(n)):
                raise UsageError("skip adapters need every layer's weight (dense: transposed)")
        else:
            for k, lspec in enumerate(method.backbone.specs):
                rows = int(spec.rows[k])
                if not lspec.has_params:
                    if rows or spec.weight[k] >= 0 or spec.bias[k] >= 0:
                        raise UsageError(f"layer {k} ({lspec.kind}) has no weights to train")
                    continue
                if not 0 <= rows <= lspec.out_channels:
                    raise UsageError(f"layer {k}: {rows} trained rows of {lspec.out_channels}")
                if rows and k < s.first:
                    raise UsageError(f"layer {k} trains rows but comes before the first trained layer")
                s.rows[k] = rows
                # the first `rows` output channels, each as stored: (in,) dense, (in/groups, *kernel) conv
                s.off_weight[k] = self._offset(spec.weight[k], (rows, *lspec.weight_shape[1:]), f"layer {k} weight") \
                    if rows else -1
                s.off_bias[k] = self._offset(spec.bias[k], lspec.bias_shape, f"layer {k} bias")
                if rows and s.off_weight[k] < 0:
                    raise UsageError(f"layer {k}: trained rows without a weight tensor")
                if self.bb.is_int8:
                    for name, units in (("w_unit", spec.w_unit), ("b_unit", spec.b_unit)):
                        a = self._keep_array(_check(units[k], lspec.bias_shape, np.float32, f"layer {k} {name}"))
                        getattr(s, name)[k] = _f32(a)
        return s

    # -- calls ---------------------------------------------------------------------------
    def workspace_bytes(self, cache: CCache | None = None, pointer_bytes: int | None = None) -> int:
        """Bytes of workspace C needs for these structs (et_workspace_size), or for a target with
        ``pointer_bytes``-wide pointers (et_workspace_size_for)."""
        c = ctypes.byref(cache) if cache is not None else None
        if pointer_bytes is None:
            nbytes = self.lib.et_workspace_size(ctypes.byref(self.bb), ctypes.byref(self.m), c, self.batch)
        else:
            nbytes = self.lib.et_workspace_size_for(ctypes.byref(self.bb), ctypes.byref(self.m), c, self.batch,
                                                    int(pointer_bytes))
        if nbytes == 0:
            raise CoreError("the compiled engine refused the model's sizes")
        return int(nbytes)

    def workspace(self, cache: CCache | None = None) -> np.ndarray:
        """A buffer of exactly the workspace C asks for."""
        return np.empty(self.workspace_bytes(cache), np.uint8)

    def _inputs(self, x: np.ndarray, what: str = "x") -> np.ndarray:
        if not (isinstance(x, np.ndarray) and x.ndim == 2):
            raise UsageError(f"{what} must be a 2-D float32 array")
        if x.shape[0] > INT32_MAX or x.shape[0] < 1:
            raise UsageError(f"{what} has {x.shape[0]} rows; the compiled engine takes 1..{INT32_MAX}")
        return _check(x, (x.shape[0], self.sizes[0]), np.float32, what)

    def _labels(self, y: np.ndarray, n: int) -> np.ndarray:
        _check(y, (n,), np.int32, "labels")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.sizes[-1]):
            raise UsageError(f"labels must be in 0..{self.sizes[-1] - 1}")
        return y

    def _call(self, rc: int) -> None:
        if rc < 0:
            raise CoreError(f"the compiled engine refused the call: {ERRORS.get(rc, rc)}")

    def batch_gradient(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> float:
        """Fill the method's gradient for samples ``ids`` (no update); returns the mean loss."""
        x = self._inputs(x)
        y = self._labels(y, x.shape[0])
        if not (isinstance(ids, np.ndarray) and ids.ndim == 1):
            raise UsageError("ids must be a 1-D int32 array of sample indices")
        _check(ids, ids.shape, np.int32, "ids")
        if not 1 <= ids.size <= self.batch or int(ids.min()) < 0 or int(ids.max()) >= x.shape[0]:
            raise UsageError(f"ids must be 1..{self.batch} sample indices in 0..{x.shape[0] - 1}")
        ws = self.workspace()
        loss = ctypes.c_double()
        self._call(self.lib.et_batch_gradient(ctypes.byref(self.bb), ctypes.byref(self.m), self.params.ctypes.data,
                                              self.grads.ctypes.data, x.ctypes.data, y.ctypes.data, ids.ctypes.data,
                                              ids.size, self.batch, ws.ctypes.data, ws.nbytes, ctypes.byref(loss)))
        return loss.value

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = self._inputs(x)
        out = np.empty((x.shape[0], self.sizes[-1]), np.float32)
        ws = self.workspace()
        self._call(self.lib.et_predict(ctypes.byref(self.bb), ctypes.byref(self.m), self.params.ctypes.data,
                                       x.ctypes.data, x.shape[0], self.batch, out.ctypes.data, ws.ctypes.data,
                                       ws.nbytes))
        return out


_U64 = (1 << 64) - 1


def permutations(rng: np.random.Generator, n: int, count: int) -> np.ndarray | None:
    """``count`` epochs' orders, row i what ``rng.permutation(n)`` would give on the i-th call,
    drawn in C (et_random.c: NumPy's PCG64 and shuffle, bit for bit); ``rng`` is then where
    those NumPy calls would have left it. None when C cannot draw them (no compiled engine, a
    bit generator other than PCG64, n past int32): the caller draws with NumPy."""
    lib = load()
    if lib is None or not 0 <= n <= INT32_MAX or not 0 <= count <= INT32_MAX // max(n, 1):
        return None
    bitgen = rng.bit_generator
    st = bitgen.state
    if st.get("bit_generator") != "PCG64":
        return None
    state, inc = st["state"]["state"], st["state"]["inc"]
    c = Pcg64(state >> 64, state & _U64, inc >> 64, inc & _U64, int(st["has_uint32"]), int(st["uinteger"]))
    out = np.empty((count, n), np.int32)
    if lib.et_permutations(ctypes.byref(c), n, count, out.ctypes.data) != 0:
        raise CoreError("the compiled engine refused to draw the epochs' orders")
    st["state"] = {"state": (c.state_hi << 64) | c.state_lo, "inc": inc}
    st["has_uint32"], st["uinteger"] = int(c.has_uint32), int(c.uinteger)
    bitgen.state = st
    return out


def _live_refs(method: Any) -> list[Any]:
    """What a live model's structs were built from: the method's parameters, the backbone's
    layers, their descriptions and tensors. Kept by reference (so no object can be freed and
    its id reused) and compared by identity."""
    refs: list[Any] = [method.params.flat, method.params.grad, method.backbone.layers]
    for layer in method.backbone.layers:
        refs += (layer, layer.spec, layer.weight, layer.bias, layer.quant)
    return refs


class Predictor:
    """Logits of a few prepared rows in C through a batch-1 model that reads every tensor in
    place (``CoreModel(live=True)``): what a predict reads, the NumPy engine reads too, at the
    time of the call, so no key check is needed; only that the structs still describe the same
    objects (``current``). Built by ``predictor``, which says None where C cannot serve.

    ``rows(n)`` is its own input buffer, where the caller prepares up to ``max_rows`` rows in
    place; ``logits(n)`` runs them (the pointers are fixed, so a call converts no array). The
    buffers are shared: hold ``lock`` from filling the rows to reading the logits."""

    def __init__(self, method: Any, max_rows: int):
        self.method = method
        self.model = CoreModel(method, 1, live=True)
        self.refs = _live_refs(method)
        self.arrays = [a for a in self.refs[3:] if isinstance(a, np.ndarray)]
        self.shapes = [a.shape for a in self.arrays]
        self.width, self.classes = self.model.sizes[0], self.model.sizes[-1]
        self.max_rows = int(max_rows)
        self.lock = threading.Lock()
        self.ws = self.model.workspace()
        self._x = np.empty((self.max_rows, self.width), np.float32)
        self._out = np.empty((self.max_rows, self.classes), np.float32)
        m = self.model
        self._fn = m.lib.et_predict
        self._head = (ctypes.byref(m.bb), ctypes.byref(m.m), m.params.ctypes.data, self._x.ctypes.data)
        self._tail = (1, self._out.ctypes.data, self.ws.ctypes.data, self.ws.nbytes)

    def current(self) -> bool:
        """The structs still point at the method's and backbone's tensors: the same objects,
        of the same shapes (an array resized in place fails the shape check)."""
        now = _live_refs(self.method)
        return len(now) == len(self.refs) and all(map(operator.is_, now, self.refs)) and \
            [a.shape for a in self.arrays] == self.shapes

    def rows(self, n: int) -> np.ndarray:
        """The first ``n`` rows of the input buffer (C-contiguous float32, (n, width))."""
        if not 1 <= n <= self.max_rows:
            raise UsageError(f"the predictor takes 1..{self.max_rows} rows, got {n}")
        return self._x[:n]

    def logits(self, n: int) -> np.ndarray:
        """Logits of the first ``n`` rows of the input buffer (a new array)."""
        if not 1 <= n <= self.max_rows:
            raise UsageError(f"the predictor takes 1..{self.max_rows} rows, got {n}")
        self.model._call(self._fn(*self._head, n, *self._tail))
        return self._out[:n].copy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of prepared rows ``x`` ((rows, width), any float dtype), ``max_rows`` at a time."""
        x = self.model._inputs(np.ascontiguousarray(x, np.float32))
        out = np.empty((x.shape[0], self.classes), np.float32)
        with self.lock:
            for lo in range(0, x.shape[0], self.max_rows):
                n = min(self.max_rows, x.shape[0] - lo)
                self._x[:n] = x[lo:lo + n]
                out[lo:lo + n] = self.logits(n)
        return out


def predictor(method: Any, engine: str | None, max_rows: int, kept: Any = None) -> tuple[Predictor | None, Any]:
    """``(a Predictor for method, what to keep)``: a Predictor when ``engine`` (None:
    EDGETUNE_ENGINE) resolves to C for the method (the skip and layer-wise methods on a float
    backbone whose tensors are contiguous float32), else None (NumPy predicts). ``kept``: the
    second value of an earlier call, whose answer stands while the question and the objects
    are the same."""
    question = (engine, os.environ.get("EDGETUNE_ENGINE"))
    if kept is not None and kept[0] == question and kept[1] is method:
        answer = kept[2]
        if answer is not None and answer.current():
            return answer, kept
        if answer is None and all(map(operator.is_, _live_refs(method), kept[3])):
            return None, kept
    answer = None
    try:
        if resolve_engine(engine, method) == "c" and not method.backbone.is_int8 \
                and method.core_spec().kind in ("skip", "layerwise"):
            answer = Predictor(method, max_rows)
    except UsageError:  # a tensor C cannot read in place (a strided view, another dtype): NumPy predicts
        answer = None
    return answer, (question, method, answer, _live_refs(method))


@dataclass
class EpochResult:
    loss: float
    seconds: float
    forward_seconds: float
    backward_seconds: float
    update_seconds: float
    diverged: bool


def _optimizer_struct(opt: Any, n_params: int, keep: list) -> COptimizer:
    s = COptimizer()
    kind = type(opt).__name__
    if kind not in OPTIMIZERS:
        raise UsageError(f"optimizer {kind} has no compiled implementation")
    s.kind = OPTIMIZERS[kind]
    s.lr = float(opt.lr)
    s.weight_decay = float(opt.weight_decay)
    s.momentum = float(getattr(opt, "mu", 0.0))
    s.beta1 = float(getattr(opt, "b1", 0.9))
    s.beta2 = float(getattr(opt, "b2", 0.999))
    s.eps = float(getattr(opt, "eps", 1e-8))
    s.t = int(getattr(opt, "t", 0))
    if kind == "Momentum":
        s.m = _f32(_kept(keep, _check(opt.v, (n_params,), np.float32, "momentum velocity")))
    elif kind == "Adam":
        s.m = _f32(_kept(keep, _check(opt.m, (n_params,), np.float32, "Adam first moment")))
        s.v = _f32(_kept(keep, _check(opt.v, (n_params,), np.float32, "Adam second moment")))
    return s


def int8_backbone(bb: Any, keep: list) -> CBackbone:
    """The et_backbone of an int8 backbone of any layer kinds, its tensors read in place (the
    arrays the struct points into are appended to ``keep``: hold it as long as the struct)."""
    if not bb.is_int8:
        raise UsageError("this needs an int8 backbone (edgetune.quant.quantize makes one)")
    s = layer_backbone(bb.specs)
    s.is_int8 = 1
    for k, layer in enumerate(bb.layers):
        spec, q, c = layer.spec, layer.quant, s.layers[k]
        c.act_scale = float(q.input_scale)
        if q.asymmetric:  # the zero points, checked in -128..127 when the backbone was built
            for name in ("zero_point", "out_zero_point", "source_zero_point"):
                v = int(getattr(q, name))
                if not -128 <= v <= 127:
                    raise UsageError(f"layer {k}: {name} {v} is outside -128..127")
                setattr(c, name, v)
            c.asymmetric = 1
        if spec.has_params:
            out = (spec.out_channels,)
            c.qw = _kept(keep, _check(q.qweight, spec.weight_shape, np.int8, f"layer {k} int8 weight")) \
                .ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
            c.wscale = _f32(_kept(keep, _check(q.wscale, out, np.float32, f"layer {k} weight scale")))
            c.qbias = _kept(keep, _check(q.qbias, out, np.int32, f"layer {k} int32 bias")) \
                .ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        if q.requant is not None:  # hidden layers with weights: per channel; an add: its two inputs
            mult, shift = (np.asarray(a) for a in q.requant)
            n = (spec.out_channels,) if spec.has_params else (3 if q.asymmetric else 2,)
            lo, hi = (-31, 30) if q.asymmetric else (1, 62)  # TFLM's exponents; edgetune's right shifts
            if np.any(mult < 0) or np.any(mult > INT32_MAX) or np.any(shift < lo) or np.any(shift > hi):
                raise UsageError(f"layer {k}: requantisation parameters out of range")
            m32 = _kept(keep, _check(np.ascontiguousarray(mult, np.int32), n, np.int32,
                                     f"layer {k} requant multiplier"))
            s32 = _kept(keep, _check(np.ascontiguousarray(shift, np.int32), n, np.int32,
                                     f"layer {k} requant shift"))
            c.rq_mult = m32.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            c.rq_shift = s32.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    return s


def _kept(keep: list, a: np.ndarray) -> np.ndarray:
    """``a``, remembered in ``keep`` so that it lives as long as the struct that points into it."""
    keep.append(a)
    return a


def dense_backbone(sizes: Any, activation: str) -> CBackbone:
    """An et_backbone of dense layers ``sizes[0] -> ... -> sizes[-1]`` without tensors: each
    layer the 1x1 case, ``activation`` after every layer but the last (identity there)."""
    s = CBackbone()
    n = len(sizes) - 1
    if not 1 <= n <= MAX_LAYERS:
        raise UsageError(f"the compiled engine takes 1..{MAX_LAYERS} layers (got {n})")
    if activation not in ACTIVATIONS:
        raise UsageError(f"activation {activation} has no compiled implementation")
    for k, v in enumerate(sizes):  # ctypes would wrap a value past int32 silently
        if not isinstance(v, (int, np.integer)) or not 1 <= v <= INT32_MAX:
            raise UsageError(f"layer width {k} is {v!r}; the compiled engine takes 1..{INT32_MAX}")
    s.n_layers = n
    for k in range(n):
        layer = s.layers[k]
        layer.kind = LAYER_KINDS["dense"]
        layer.in_c, layer.out_c = int(sizes[k]), int(sizes[k + 1])
        layer.in_h = layer.in_w = layer.out_h = layer.out_w = 1
        layer.kernel_h = layer.kernel_w = layer.stride_h = layer.stride_w = layer.groups = 1
        layer.source = -1
        layer.activation = ACTIVATIONS[activation if k < n - 1 else "identity"]
    return s


def _layer_fields(spec: Any) -> dict[str, int]:
    """An et_layer's shape fields from a layer description: channels first, a 1-D layer as a
    2-D one of height 1, a flat one as 1x1; gap's window is its whole input."""
    def grid(shape: tuple[int, ...]) -> tuple[int, int, int]:
        if len(shape) == 1:
            return shape[0], 1, 1
        if len(shape) == 2:
            return shape[0], 1, shape[1]
        if len(shape) == 3:
            return shape[0], shape[1], shape[2]
        raise UsageError(f"the compiled engine takes inputs of 1 to 3 dimensions, got {list(shape)}")

    (ic, ih, iw), (oc, oh, ow) = grid(spec.in_shape), grid(spec.out_shape)
    f = dict(in_c=ic, in_h=ih, in_w=iw, out_c=oc, out_h=oh, out_w=ow, kernel_h=1, kernel_w=1, stride_h=1,
             stride_w=1, pad_h=0, pad_w=0, groups=int(spec.groups), source=int(spec.source))
    if spec.kernel:
        pad = (1,) * (2 - len(spec.kernel))
        f["kernel_h"], f["kernel_w"] = pad + tuple(spec.kernel)
        f["stride_h"], f["stride_w"] = pad + tuple(spec.stride)
        f["pad_h"], f["pad_w"] = (0,) * (2 - len(spec.padding)) + tuple(spec.padding)
    if spec.kind == "gap":
        f["kernel_h"], f["kernel_w"] = ih, iw
    if spec.kind != "add":
        f["source"] = -1
    return f


def layer_backbone(specs: Any) -> CBackbone:
    """An et_backbone of the layer descriptions ``specs`` without tensors: kinds, shapes, kernels,
    strides, padding, groups, each layer's own activation and an add's source. Every value is
    checked to fit C's int32 here; C checks that the shapes chain (et_backbone_check)."""
    s = CBackbone()
    n = len(specs)
    if not 1 <= n <= MAX_LAYERS:
        raise UsageError(f"the compiled engine takes 1..{MAX_LAYERS} layers (got {n})")
    s.n_layers = n
    for k, spec in enumerate(specs):
        if spec.kind not in LAYER_KINDS:
            raise UsageError(f"layer {k}: kind {spec.kind} has no compiled implementation")
        if spec.activation not in ACTIVATIONS:
            raise UsageError(f"layer {k}: activation {spec.activation} has no compiled implementation")
        layer = s.layers[k]
        layer.kind = LAYER_KINDS[spec.kind]
        layer.activation = ACTIVATIONS[spec.activation]
        for name, v in _layer_fields(spec).items():  # ctypes would wrap a value past int32 silently
            if not -1 <= v <= INT32_MAX:
                raise UsageError(f"layer {k}: {name} {v} is out of range for the compiled engine")
            setattr(layer, name, v)
    return s


def _cache_struct(cache: Any, n: int, row_width: int, d_in: int, n_out: int, eager: bool, keep: list) -> CCache:
    s = CCache()
    s.n_samples, s.row_width, s.d_in, s.eager = n, row_width, d_in, int(eager)
    if cache is None:
        s.kind = CACHE_KINDS["none"]
        return s
    if cache.n_samples != n or cache.row_width != row_width:
        raise UsageError(f"the skip-cache holds {cache.n_samples} rows of {cache.row_width}, "
                         f"the data {n} rows of {row_width}")
    cap = int(cache.capacity)
    if not 0 <= cap <= n:
        raise UsageError(f"skip-cache capacity {cap} is outside 0..{n}")
    s.capacity = cap
    filled = _check(cache.filled, (n,), np.bool_, "skip-cache fill mask")
    s.filled = _kept(keep, filled).ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    if hasattr(cache, "col_scales"):  # the int8 cache
        s.kind = CACHE_KINDS["int8"]
        s.qrows = _kept(keep, _check(cache.data, (cap, d_in), np.int8, "int8 cache rows")) \
            .ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        s.logits = _f32(_kept(keep, _check(cache.logits, (cap, n_out), np.float32, "int8 cache logits")))
        s.col_scales = _f32(_kept(keep, _check(cache.col_scales, (d_in,), np.float32, "int8 cache scales")))
    else:
        s.kind = CACHE_KINDS["float"]
        s.rows = _f32(_kept(keep, _check(cache.data, (cap, row_width), np.float32, "cache rows")))
    return s


_STATS_DTYPE = np.dtype(EpochStats)  # et_epoch_stats as NumPy reads it (the fields' offsets are ctypes')


def _cache_arrays(cache: Any) -> tuple:
    """The arrays a cache struct points into (compared by identity to reuse the struct)."""
    if cache is None:
        return ()
    return tuple(getattr(cache, name, None) for name in ("data", "filled", "logits", "col_scales"))


class CoreRunner:
    """Runs the trainer's epochs in C: one call for as many epochs as it is given orders."""

    name = "c"

    def __init__(self, method: Any, opt: Any, x: np.ndarray, y: np.ndarray, batch_size: int,
                 model: CoreModel | None = None, previous: "CoreRunner | None" = None, fused: bool = True):
        """``model``: the structs of an earlier fit of the same method on the same backbone tensors
        (the trainer keeps them between fits); None builds them. ``previous``: the runner of the
        caller's last fit, whose cache struct and workspace are reused when they describe the
        same cache arrays and sample count (the inputs, labels and optimizer are always new).
        ``fused``: apply each trained tensor's step as soon as its gradient is ready
        (et_fused_update: the layer-wise methods and the sparse update; the same parameters bit
        for bit, ``method.params.grad`` not written); False: the whole gradient first, then one step."""
        if model is not None and (model.method is not method or model.batch != batch_size):
            raise UsageError("a kept CoreModel belongs to another method or batch size")
        self.model = model if model is not None else CoreModel(method, batch_size)
        self.method, self.opt = method, opt
        self.x = self.model._inputs(x)
        self.n = self.x.shape[0]
        self.y = self.model._labels(np.ascontiguousarray(y, np.int32), self.n)
        self._keep: list[np.ndarray] = []
        self.c_opt = _optimizer_struct(opt, self.model.params.size, self._keep)
        sizes = self.model.sizes
        d_in = self.model.d_in
        cache = getattr(method, "cache", None) if self.model.spec.kind == "skip" else None
        eager = getattr(method.options, "cache_fill", "eager") == "eager"
        self.cache = cache
        self._cache_of = (cache, self.n, eager, *_cache_arrays(cache))
        if previous is not None and previous.model is self.model and len(previous._cache_of) == len(self._cache_of) \
                and all(map(operator.is_, previous._cache_of, self._cache_of)) \
                and (cache is None or cache.capacity == previous.c_cache.capacity):
            # C only counts hits and misses in it; _cache_of holds the arrays it points into
            self.c_cache, self.ws, self._ws_args = previous.c_cache, previous.ws, previous._ws_args
        else:
            self.c_cache = _cache_struct(cache, self.n, d_in + sizes[-1], d_in, sizes[-1], eager, self._keep)
            self.ws = self.model.workspace(self.c_cache)
            self._ws_args = (self.ws.ctypes.data, self.ws.nbytes)
        lib = self.model.lib
        if self.model.fusable is None:  # C's answer for these structs, asked once
            self.model.fusable = bool(lib.et_fused_update(ctypes.byref(self.model.bb), ctypes.byref(self.model.m)))
        self.fused = bool(fused) and self.model.fusable
        self._fn = lib.et_train_epochs
        self._clock = previous._clock if previous is not None else \
            ctypes.cast(lib.et_clock_monotonic, ctypes.c_void_p).value
        m = self.model
        self._args_head = (ctypes.byref(m.bb), ctypes.byref(m.m), ctypes.byref(self.c_opt),
                           ctypes.byref(self.c_cache), m.params_ptr, None if self.fused else m.grads_ptr,
                           self.x.ctypes.data, self.y.ctypes.data, self.n, m.batch)
        self._stats = previous._stats if previous is not None else (EpochStats * 1)()
        self._predictor: CoreModel | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of prepared inputs, in C, 64 rows at a time: evaluation between epochs keeps
        to small buffers and so leaves the skip-cache in the CPU caches (a NumPy forward of a
        whole test set evicted it and doubled the next cached epoch, measured on HAR)."""
        if self._predictor is None:
            self._predictor = CoreModel(self.method, 64)
        return self._predictor.predict(np.ascontiguousarray(x, np.float32))

    def run(self, orders: np.ndarray) -> list[EpochResult]:
        """Train one epoch per row of ``orders`` (each a permutation of the sample ids)."""
        if not (isinstance(orders, np.ndarray) and orders.ndim == 2):
            raise UsageError("orders must be a 2-D array, one permutation per epoch")
        epochs = orders.shape[0]
        _check(orders, (epochs, self.n), np.int32, "orders")
        if epochs and (int(orders.min()) < 0 or int(orders.max()) >= self.n):
            raise UsageError(f"orders must hold sample ids in 0..{self.n - 1}")
        if len(self._stats) < epochs:
            self._stats = (EpochStats * epochs)()
        c = self.c_cache
        hits0, misses0 = c.hits, c.misses
        done = self._fn(*self._args_head, orders.ctypes.data, epochs, self._clock, *self._ws_args, self._stats)
        self.model._call(done)
        if hasattr(self.opt, "t"):
            self.opt.t = int(self.c_opt.t)
        if self.cache is not None:
            self.cache.hits += c.hits - hits0
            self.cache.misses += c.misses - misses0
            self.cache.complete = self.cache.capacity == self.cache.n_samples and bool(self.cache.filled.all())
        # one NumPy view of the stats read as tuples: reading ctypes fields one by one costs more
        # than an epoch of a small fit
        return [EpochResult(loss, sec, fwd, bwd, upd, bool(div))
                for loss, sec, fwd, bwd, upd, div, _ in np.frombuffer(self._stats, _STATS_DTYPE, done).tolist()]
