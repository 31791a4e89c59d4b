"""The compiled kernels of the spatial layer kinds (``et_conv.h``), called from Python.

Each wrapper takes the layer's ``LayerSpec`` and NumPy arrays, checks every dtype, shape,
contiguity, alignment, overlap and buffer size here, and only then calls C: C never reads a
size that was not checked. The layer's ``et_conv_dims`` is derived by C (the output size
and the limits of the kernels come from one place) and compared with the spec's shapes.
A 1-D layer (C, L) goes to C as a 2-D one of height 1; global average pooling as the
average pooling whose window is the whole input.

Outputs are allocated when not given; scratch (the im2col buffer) likewise, of the size C
asks for (``scratch_bytes``). The results equal the NumPy operations of
``edgetune.nn.layers`` (tests/test_core_conv.py).
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import UsageError
from ..nn.layers import LayerSpec
from . import ConvDims, load, unavailable_reason

INT32_MAX = 2 ** 31 - 1
#: et_conv_dims's fields: the struct mirror lives with the others in edgetune.core, whose load
#: checks every field's name and offset against C.
DIM_FIELDS = tuple(name for name, _ in ConvDims._fields_)
CONV_KINDS = ("conv1d", "conv2d")
POOL_KINDS = ("maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d")
#: Which derive function checks a family's dims, and which scratch-size function each operation has.
_DERIVE = {"conv": "et_conv_dims_derive", "pool": "et_pool_dims_derive", "gap": "et_gap_dims_derive"}
_SCRATCH = {"conv_forward": "et_conv_forward_scratch_bytes", "conv_input_grad": "et_conv_input_grad_scratch_bytes",
            "conv_weight_grad": "et_conv_weight_grad_scratch_bytes", "pool": "et_pool_scratch_bytes",
            "gap": "et_gap_scratch_bytes"}


_declared: Any = None


def _lib() -> Any:
    """The library with the kernels' prototypes declared (once per loaded library)."""
    global _declared
    lib = load()
    if lib is None:
        raise UsageError(f"the compiled engine is not available: {unavailable_reason()}")
    if _declared is lib:
        return lib
    P, vp, i32, sz = ctypes.POINTER(ConvDims), ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t
    for name in _DERIVE.values():
        getattr(lib, name).argtypes, getattr(lib, name).restype = [P], i32
    for name in _SCRATCH.values():
        getattr(lib, name).argtypes, getattr(lib, name).restype = [P, i32], sz
    protos = {
        "et_conv_forward": [P, i32, vp, i32, vp, vp, vp, i32, vp],
        "et_conv_input_grad": [P, i32, vp, vp, vp, vp],
        "et_conv_weight_grad": [P, i32, vp, vp, vp, i32, vp],
        "et_conv_bias_grad": [P, i32, vp, vp, i32],
        "et_maxpool_forward": [P, i32, vp, i32, vp, i32],
        "et_maxpool_input_grad": [P, i32, vp, vp, vp],
        "et_avgpool_forward": [P, i32, vp, i32, vp, i32],
        "et_avgpool_input_grad": [P, i32, vp, vp],
        "et_gap_forward": [P, i32, vp, i32, vp, i32],
        "et_gap_input_grad": [P, i32, vp, vp],
    }
    for name, args in protos.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    _declared = lib
    return lib


# ---------------------------------------------------------------------- dims
def derive_dims(family: str, **fields: int) -> ConvDims:
    """An ``et_conv_dims`` from its input fields (everything but out_h, out_w), checked and
    completed by C's derive function of ``family`` ('conv', 'pool' or 'gap'); UsageError
    when C refuses it."""
    if family not in _DERIVE:
        raise UsageError(f"family must be one of {', '.join(_DERIVE)}, got {family!r}")
    missing = sorted(set(DIM_FIELDS) - {"out_h", "out_w"} - set(fields))
    extra = sorted(set(fields) - set(DIM_FIELDS))
    if missing or extra:
        raise UsageError(f"dims: missing {missing}, unexpected {extra}")
    d = ConvDims()
    for name, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -INT32_MAX - 1 <= v <= INT32_MAX:
            raise UsageError(f"dims: {name} must be a 32-bit whole number, got {v!r}")
        setattr(d, name, int(v))
    if getattr(_lib(), _DERIVE[family])(ctypes.byref(d)) != 0:
        shown = {k: v for k, v in ((n, int(getattr(d, n))) for n in DIM_FIELDS) if k not in ("out_h", "out_w")}
        raise UsageError(f"the compiled {family} kernels refuse the layer {shown}")
    return d


def _family(spec: LayerSpec) -> str:
    if spec.kind in CONV_KINDS:
        return "conv"
    if spec.kind in POOL_KINDS:
        return "pool"
    if spec.kind == "gap":
        return "gap"
    raise UsageError(f"a {spec.kind} layer has no spatial kernel (conv, pooling and gap have)")


def layer_dims(spec: LayerSpec) -> ConvDims:
    """The ``et_conv_dims`` of a conv, pooling or gap layer (a 1-D layer as height 1)."""
    if not isinstance(spec, LayerSpec):
        raise UsageError(f"expected a LayerSpec, got {type(spec).__name__}")
    family = _family(spec)
    c, *sp = spec.in_shape
    if family == "gap":
        kernel, stride, pad = tuple(sp), (1,) * len(sp), (0,) * len(sp)
    else:
        kernel, stride, pad = spec.kernel, spec.stride, spec.padding
    if len(sp) == 1:  # (C, L) is (C, 1, L)
        sp, kernel, stride, pad = [1, sp[0]], (1, kernel[0]), (1, stride[0]), (0, pad[0])
    d = derive_dims(family, in_c=c, in_h=sp[0], in_w=sp[1], out_c=spec.out_channels, kernel_h=kernel[0],
                    kernel_w=kernel[1], stride_h=stride[0], stride_w=stride[1], pad_h=pad[0], pad_w=pad[1],
                    groups=spec.groups)
    got = d.out_c * d.out_h * d.out_w
    if got != spec.out_features:
        raise UsageError(f"{spec.describe()}: the compiled kernels derive {got} outputs, the layer "
                         f"{spec.out_features}")
    return d


def scratch_bytes(spec: LayerSpec, op: str, count: int) -> int:
    """Bytes of scratch C needs for ``op`` ('conv_forward', 'conv_input_grad',
    'conv_weight_grad', 'pool', 'gap') on ``count`` rows of ``spec``."""
    if op not in _SCRATCH:
        raise UsageError(f"op must be one of {', '.join(_SCRATCH)}, got {op!r}")
    d = layer_dims(spec)
    return int(getattr(_lib(), _SCRATCH[op])(ctypes.byref(d), _count(count)))


# ---------------------------------------------------------------------- checks
def _count(count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= INT32_MAX:
        raise UsageError(f"the number of rows must be 0..{INT32_MAX}, got {count!r}")
    return int(count)


def _array(a: Any, shape: tuple[int, ...], what: str, *, writable: bool = False) -> np.ndarray:
    """``a`` must be a C-contiguous, aligned float32 array of exactly ``shape`` (never copied:
    C writes into some)."""
    if not isinstance(a, np.ndarray):
        raise UsageError(f"{what}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise UsageError(f"{what}: dtype {a.dtype}, expected float32")
    if a.shape != tuple(shape):
        raise UsageError(f"{what}: shape {list(a.shape)}, expected {list(shape)}")
    if not a.flags.c_contiguous:
        raise UsageError(f"{what}: must be C-contiguous (strides {a.strides})")
    if not a.flags.aligned:
        raise UsageError(f"{what}: must be aligned")
    if writable and not a.flags.writeable:
        raise UsageError(f"{what}: must be writable")
    return a


def _rows(a: Any, width: int, what: str) -> tuple[np.ndarray, int]:
    """A batch: a 2-D float32 array of rows ``width`` wide; returns it and its row count."""
    if not isinstance(a, np.ndarray) or a.ndim != 2:
        raise UsageError(f"{what}: expected a 2-D array (rows, {width}), got "
                         f"{list(a.shape) if isinstance(a, np.ndarray) else type(a).__name__}")
    return _array(a, (a.shape[0], width), what), _count(a.shape[0])


def _strided_rows(a: Any, width: int, what: str, *, writable: bool = False) -> tuple[np.ndarray, int, int]:
    """A batch whose rows may sit inside wider ones (a column slice of a wider array: rows
    contiguous, any row stride >= width, as the forward passes take them). Returns the
    array, its row count and its row stride in floats."""
    if not isinstance(a, np.ndarray) or a.ndim != 2:
        raise UsageError(f"{what}: expected a 2-D array (rows, {width}), got "
                         f"{list(a.shape) if isinstance(a, np.ndarray) else type(a).__name__}")
    if a.dtype != np.float32:
        raise UsageError(f"{what}: dtype {a.dtype}, expected float32")
    if a.shape[1] != width:
        raise UsageError(f"{what}: shape {list(a.shape)}, expected [rows, {width}]")
    n = _count(a.shape[0])
    ld = a.strides[0] // 4 if n > 1 else width
    if (n and width > 1 and a.strides[1] != 4) or (n > 1 and (a.strides[0] % 4 or ld < width or ld > INT32_MAX)):
        raise UsageError(f"{what}: rows must be contiguous, at a row stride of at least {width} floats "
                         f"(strides {a.strides})")
    if not a.flags.aligned:
        raise UsageError(f"{what}: must be aligned")
    if writable and not a.flags.writeable:
        raise UsageError(f"{what}: must be writable")
    return a, n, ld


def _strided_output(out: Any, n: int, width: int, inputs: list[np.ndarray]) -> tuple[np.ndarray, int]:
    if out is None:
        return np.empty((n, width), np.float32), width
    z, nz, ld = _strided_rows(out, width, "out", writable=True)
    if nz != n:
        raise UsageError(f"out: {nz} rows, expected {n}")
    for a in inputs:
        if np.shares_memory(z, a):
            raise UsageError("out must not overlap an input")
    return z, ld


def _output(out: Any, shape: tuple[int, ...], what: str, inputs: list[np.ndarray]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    _array(out, shape, what, writable=True)
    for a in inputs:
        if np.shares_memory(out, a):
            raise UsageError(f"{what} must not overlap an input")
    return out


def _scratch(scratch: Any, nbytes: int, others: list[np.ndarray]) -> np.ndarray | None:
    if scratch is None:
        return np.empty(-(-nbytes // 4), np.float32) if nbytes else None
    if not isinstance(scratch, np.ndarray) or scratch.ndim != 1:
        raise UsageError("scratch: expected a 1-D float32 array")
    _array(scratch, scratch.shape, "scratch", writable=True)
    if scratch.nbytes < nbytes:
        raise UsageError(f"scratch: {scratch.nbytes} bytes, this call needs {nbytes}")
    for a in others:
        if np.shares_memory(scratch, a):
            raise UsageError("scratch must not overlap an input or output")
    return scratch


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _kind(spec: Any, kinds: tuple[str, ...]) -> LayerSpec:
    if not isinstance(spec, LayerSpec):
        raise UsageError(f"expected a LayerSpec, got {type(spec).__name__}")
    if spec.kind not in kinds:
        raise UsageError(f"expected a {' or '.join(kinds)} layer, got {spec.kind}")
    return spec


# ---------------------------------------------------------------------- convolution
def conv_forward(spec: LayerSpec, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None,
                 out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """(rows, out_features) = the convolution of x (rows, in_features) [+ bias per channel].
    x and out may be column slices of wider arrays (rows inside wider rows)."""
    _kind(spec, CONV_KINDS)
    d = layer_dims(spec)
    x, n, ldx = _strided_rows(x, spec.in_features, "x")
    _array(w, spec.weight_shape, "weight")
    if bias is not None:
        _array(bias, (spec.out_channels,), "bias")
    ins = [a for a in (x, w, bias) if a is not None]
    z, ldz = _strided_output(out, n, spec.out_features, ins)
    lib = _lib()
    s = _scratch(scratch, lib.et_conv_forward_scratch_bytes(ctypes.byref(d), n), ins + [z])
    lib.et_conv_forward(ctypes.byref(d), n, _ptr(x), ldx, _ptr(w), _ptr(bias), _ptr(z), ldz, _ptr(s))
    return z


def conv_input_grad(spec: LayerSpec, g: np.ndarray, w: np.ndarray, out: np.ndarray | None = None,
                    scratch: np.ndarray | None = None) -> np.ndarray:
    """d loss / d input (rows, in_features) from g = d loss / d output (rows, out_features)."""
    _kind(spec, CONV_KINDS)
    d = layer_dims(spec)
    g, n = _rows(g, spec.out_features, "g")
    _array(w, spec.weight_shape, "weight")
    dx = _output(out, (n, spec.in_features), "out", [g, w])
    lib = _lib()
    s = _scratch(scratch, lib.et_conv_input_grad_scratch_bytes(ctypes.byref(d), n), [g, w, dx])
    lib.et_conv_input_grad(ctypes.byref(d), n, _ptr(g), _ptr(w), _ptr(dx), _ptr(s))
    return dx


def conv_weight_grad(spec: LayerSpec, x: np.ndarray, g: np.ndarray, out: np.ndarray | None = None,
                     accumulate: bool = False, scratch: np.ndarray | None = None) -> np.ndarray:
    """d loss / d weight summed over the rows, written into ``out`` (or added to it: ``accumulate``)."""
    _kind(spec, CONV_KINDS)
    d = layer_dims(spec)
    x, n = _rows(x, spec.in_features, "x")
    g, ng = _rows(g, spec.out_features, "g")
    if ng != n:
        raise UsageError(f"g has {ng} rows, x {n}")
    if accumulate and out is None:
        raise UsageError("accumulate=True adds to an existing out array: pass one")
    dw = _output(out, spec.weight_shape, "out", [x, g])
    lib = _lib()
    s = _scratch(scratch, lib.et_conv_weight_grad_scratch_bytes(ctypes.byref(d), n), [x, g, dw])
    lib.et_conv_weight_grad(ctypes.byref(d), n, _ptr(x), _ptr(g), _ptr(dw), int(bool(accumulate)), _ptr(s))
    return dw


def conv_bias_grad(spec: LayerSpec, g: np.ndarray, out: np.ndarray | None = None,
                   accumulate: bool = False) -> np.ndarray:
    """d loss / d bias (out_channels,) summed over rows and positions (or added to ``out``)."""
    _kind(spec, CONV_KINDS)
    d = layer_dims(spec)
    g, n = _rows(g, spec.out_features, "g")
    if accumulate and out is None:
        raise UsageError("accumulate=True adds to an existing out array: pass one")
    db = _output(out, (spec.out_channels,), "out", [g])
    _lib().et_conv_bias_grad(ctypes.byref(d), n, _ptr(g), _ptr(db), int(bool(accumulate)))
    return db


# ---------------------------------------------------------------------- pooling
def pool_forward(spec: LayerSpec, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Max or average pooling (by the spec's kind) of x (rows, in_features); x and out may be
    column slices of wider arrays."""
    _kind(spec, POOL_KINDS)
    d = layer_dims(spec)
    x, n, ldx = _strided_rows(x, spec.in_features, "x")
    z, ldz = _strided_output(out, n, spec.out_features, [x])
    fn = _lib().et_maxpool_forward if spec.kind.startswith("max") else _lib().et_avgpool_forward
    fn(ctypes.byref(d), n, _ptr(x), ldx, _ptr(z), ldz)
    return z


def pool_input_grad(spec: LayerSpec, g: np.ndarray, x: np.ndarray | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """d loss / d input of a pooling layer; max pooling needs its input ``x`` (where the maxima are)."""
    _kind(spec, POOL_KINDS)
    d = layer_dims(spec)
    g, n = _rows(g, spec.out_features, "g")
    if spec.kind.startswith("max"):
        if x is None:
            raise UsageError("the gradient of max pooling needs the layer's input x")
        x, nx = _rows(x, spec.in_features, "x")
        if nx != n:
            raise UsageError(f"g has {n} rows, x {nx}")
        dx = _output(out, (n, spec.in_features), "out", [g, x])
        _lib().et_maxpool_input_grad(ctypes.byref(d), n, _ptr(x), _ptr(g), _ptr(dx))
        return dx
    dx = _output(out, (n, spec.in_features), "out", [g])
    _lib().et_avgpool_input_grad(ctypes.byref(d), n, _ptr(g), _ptr(dx))
    return dx


def gap_forward(spec: LayerSpec, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Global average pooling: (rows, C * positions) -> (rows, C); x and out may be column
    slices of wider arrays."""
    _kind(spec, ("gap",))
    d = layer_dims(spec)
    x, n, ldx = _strided_rows(x, spec.in_features, "x")
    z, ldz = _strided_output(out, n, spec.out_features, [x])
    _lib().et_gap_forward(ctypes.byref(d), n, _ptr(x), ldx, _ptr(z), ldz)
    return z


def gap_input_grad(spec: LayerSpec, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    _kind(spec, ("gap",))
    d = layer_dims(spec)
    g, n = _rows(g, spec.out_features, "g")
    dx = _output(out, (n, spec.in_features), "out", [g])
    _lib().et_gap_input_grad(ctypes.byref(d), n, _ptr(g), _ptr(dx))
    return dx
