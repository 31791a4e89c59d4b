"""The compiled training engine: portable C99 sources beside this file, loaded with ctypes.

``pip install .`` compiles ``et_*.c`` into the shared library ``_edgetune_core``. This
module finds and loads it, mirrors its structs (``et_core.h``, ``et_device.h``) as ``ctypes``
structures, and before anything runs checks against the library's own tables
(``et_abi.c``) that both sides agree on every struct's size and every field's name and
offset, and on the name of every enum value the binding uses (``ENUMS``). If the library is
missing, does not load or disagrees, ``available()`` is False and ``unavailable_reason()``
says why; the NumPy engine then runs instead (see ``edgetune.core.engine``).

``EDGETUNE_CORE_LIB=/path/to/lib.so`` loads another build of the same sources (the test
suite uses it for a sanitizer build).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
import re
from pathlib import Path
from typing import Any

from ..nn.layers import LAYER_KINDS

ABI_VERSION = 4
SOURCE_DIR = Path(__file__).resolve().parent
#: The library's C sources, in the order they are compiled (the clock is POSIX-only).
SOURCES = ("et_kernels.c", "et_layers.c", "et_conv.c", "et_int8.c", "et_train.c", "et_device.c", "et_abi.c", "et_clock.c",
           "et_random.c")
HEADERS = ("et_core.h", "et_kernels.h", "et_layers.h", "et_conv.h", "et_int8.h", "et_device.h", "et_random.h")

#: The C enums the binding uses, each value's name at its number (et_abi.c's tables); checked at load.
ENUMS: dict[str, tuple[str, ...]] = {
    "activation": ("relu", "leaky_relu", "tanh", "sigmoid", "identity", "relu6"),
    "method": ("layerwise", "skip", "sparse"),
    "optimizer": ("sgd", "momentum", "adam"),
    "cache": ("none", "float", "int8"),
    "layer": LAYER_KINDS,  # the layer description's kinds, in its order
}
ENUM_IDS = {name: i for i, name in enumerate(ENUMS)}  # enum et_enum_id


def enum(name: str) -> dict[str, int]:
    """``{value name: number}`` of one C enum, e.g. ``enum("activation")["relu"] == 0``."""
    return {v: i for i, v in enumerate(ENUMS[name])}

ERRORS = {-1: "invalid argument", -2: "workspace too small", -3: "unsupported configuration"}


def library_path() -> Path | None:
    """Where the compiled library is (EDGETUNE_CORE_LIB, or beside this file), if anywhere."""
    override = os.environ.get("EDGETUNE_CORE_LIB")
    if override:
        return Path(override)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = SOURCE_DIR / f"_edgetune_core{suffix}"
        if p.is_file():
            return p
    return None


def _max_layers() -> int:
    """ET_MAX_LAYERS, the most layers the C structs hold: the library's et_max_layers(), or,
    without a library that loads, the #define in et_core.h beside this file (the sources an export
    compiles). The struct sizes are checked against the library at load either way."""
    path = library_path()
    if path is not None:
        try:
            lib = ctypes.CDLL(str(path))
            lib.et_max_layers.restype = ctypes.c_int32
            return int(lib.et_max_layers())
        except (OSError, AttributeError):
            pass  # load() says why
    found = re.search(r"^#define ET_MAX_LAYERS (\d+)", (SOURCE_DIR / "et_core.h").read_text(), re.MULTILINE)
    if found is None:
        raise ImportError(f"no ET_MAX_LAYERS in {SOURCE_DIR / 'et_core.h'}")
    return int(found.group(1))


#: The most layers a backbone may have in the compiled engine (C's ET_MAX_LAYERS).
MAX_LAYERS = _max_layers()
L = MAX_LAYERS
_f32p = ctypes.POINTER(ctypes.c_float)
_i8p = ctypes.POINTER(ctypes.c_int8)
_i32p = ctypes.POINTER(ctypes.c_int32)
_u8p = ctypes.POINTER(ctypes.c_uint8)


_i32 = ctypes.c_int32


class Layer(ctypes.Structure):
    _fields_ = [("kind", _i32), ("in_c", _i32), ("in_h", _i32), ("in_w", _i32),
                ("out_c", _i32), ("out_h", _i32), ("out_w", _i32), ("kernel_h", _i32), ("kernel_w", _i32),
                ("stride_h", _i32), ("stride_w", _i32), ("pad_h", _i32), ("pad_w", _i32), ("groups", _i32),
                ("activation", _i32), ("source", _i32), ("wt", _f32p), ("w", _f32p), ("bias", _f32p),
                ("qw", _i8p), ("wscale", _f32p), ("qbias", _i32p), ("rq_mult", _i32p), ("rq_shift", _i32p),
                ("act_scale", ctypes.c_float), ("asymmetric", _i32), ("zero_point", _i32),
                ("out_zero_point", _i32), ("source_zero_point", _i32)]


class Backbone(ctypes.Structure):
    _fields_ = [("n_layers", _i32), ("is_int8", _i32), ("layers", Layer * L)]


class Method(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("rank", ctypes.c_int32), ("scale", ctypes.c_float),
                ("first", ctypes.c_int32), ("qas", ctypes.c_int32), ("n_params", ctypes.c_int64),
                ("off_weight", ctypes.c_int64 * L), ("off_bias", ctypes.c_int64 * L),
                ("off_lora_a", ctypes.c_int64 * L), ("off_lora_b", ctypes.c_int64 * L),
                ("rows", ctypes.c_int32 * L), ("off_bias_delta", ctypes.c_int64),
                ("off_skip_a", ctypes.c_int64), ("off_skip_b", ctypes.c_int64),
                ("w_unit", _f32p * L), ("b_unit", _f32p * L)]


class Optimizer(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("lr", ctypes.c_double), ("momentum", ctypes.c_double),
                ("weight_decay", ctypes.c_double), ("beta1", ctypes.c_double), ("beta2", ctypes.c_double),
                ("eps", ctypes.c_double), ("t", ctypes.c_int64), ("m", _f32p), ("v", _f32p)]


class Cache(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("eager", ctypes.c_int32), ("n_samples", ctypes.c_int32),
                ("capacity", ctypes.c_int32), ("row_width", ctypes.c_int32), ("d_in", ctypes.c_int32),
                ("rows", _f32p), ("qrows", _i8p), ("logits", _f32p), ("col_scales", _f32p),
                ("filled", _u8p), ("hits", ctypes.c_int64), ("misses", ctypes.c_int64)]


class EpochStats(ctypes.Structure):
    _fields_ = [("loss", ctypes.c_double), ("seconds", ctypes.c_double), ("forward_seconds", ctypes.c_double),
                ("backward_seconds", ctypes.c_double), ("update_seconds", ctypes.c_double),
                ("diverged", ctypes.c_int32), ("batches", ctypes.c_int32)]


class ModelDesc(ctypes.Structure):
    """et_model_desc (et_device.h): what an exported device program is built around."""
    _fields_ = [("backbone", ctypes.POINTER(Backbone)), ("method", ctypes.POINTER(Method)),
                ("initial_params", _f32p), ("optimizer", _i32), ("lr", ctypes.c_double),
                ("momentum", ctypes.c_double), ("weight_decay", ctypes.c_double), ("beta1", ctypes.c_double),
                ("beta2", ctypes.c_double), ("eps", ctypes.c_double), ("batch", _i32), ("cache_kind", _i32),
                ("cache_capacity", _i32), ("col_scales", _f32p), ("max_samples", _i32), ("store_samples", _i32),
                ("input_mean", _f32p), ("input_std", _f32p), ("norm_channels", _i32), ("n_tensors", _i32),
                ("tensors", ctypes.c_void_p)]


class ConvDims(ctypes.Structure):
    """et_conv_dims (et_conv.h): one convolution's or pooling's shapes, as the kernels read them."""
    _fields_ = [(name, _i32) for name in ("in_c", "in_h", "in_w", "out_c", "out_h", "out_w", "kernel_h", "kernel_w",
                                          "stride_h", "stride_w", "pad_h", "pad_w", "groups")]


class Pcg64(ctypes.Structure):
    """et_pcg64 (et_random.h): NumPy's PCG64 state, its 128-bit numbers in 64-bit halves."""
    _fields_ = [("state_hi", ctypes.c_uint64), ("state_lo", ctypes.c_uint64), ("inc_hi", ctypes.c_uint64),
                ("inc_lo", ctypes.c_uint64), ("has_uint32", _i32), ("uinteger", ctypes.c_uint32)]


STRUCTS = (Backbone, Method, Optimizer, Cache, EpochStats, Layer, ModelDesc, ConvDims, Pcg64)  # numbered as in et_sizeof()
#: The arena's pieces in et_device_arena_breakdown() (enum et_device_piece).
DEVICE_PIECES = ("params", "gradients", "optimizer", "cache", "samples", "order", "workspace", "alignment")

_lib: Any = None
_error: str | None = None
_loaded = False


def _declare(lib: Any) -> None:
    vp, sz, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32
    P = ctypes.POINTER
    lib.et_abi_version.restype = i32
    lib.et_max_layers.restype = i32
    lib.et_sizeof.argtypes, lib.et_sizeof.restype = [i32], sz
    lib.et_build_info.restype = ctypes.c_char_p
    lib.et_field_name.argtypes, lib.et_field_name.restype = [i32, i32], ctypes.c_char_p
    lib.et_field_offset.argtypes, lib.et_field_offset.restype = [i32, i32], ctypes.c_int64
    lib.et_enum_name.argtypes, lib.et_enum_name.restype = [i32, i32], ctypes.c_char_p
    lib.et_backbone_check.argtypes, lib.et_backbone_check.restype = [P(Backbone)], i32
    lib.et_int8_backbone_check.argtypes, lib.et_int8_backbone_check.restype = [P(Backbone)], i32
    lib.et_skip_taps.argtypes, lib.et_skip_taps.restype = [P(Backbone), P(i32), P(i32)], i32
    lib.et_skip_d_in.argtypes, lib.et_skip_d_in.restype = [P(Backbone)], i32
    lib.et_workspace_size.argtypes = [P(Backbone), P(Method), P(Cache), i32]
    lib.et_workspace_size.restype = sz
    lib.et_workspace_size_for.argtypes = [P(Backbone), P(Method), P(Cache), i32, i32]
    lib.et_workspace_size_for.restype = sz
    lib.et_workspace_pieces.argtypes = [P(Backbone), P(Method), i32, i32, P(ctypes.c_char_p), P(sz), i32]
    lib.et_workspace_pieces.restype = i32
    lib.et_fused_update.argtypes, lib.et_fused_update.restype = [P(Backbone), P(Method)], i32
    lib.et_fused_scratch_bytes.argtypes, lib.et_fused_scratch_bytes.restype = [P(Backbone), P(Method)], sz
    lib.et_device_arena_bytes.argtypes, lib.et_device_arena_bytes.restype = [P(ModelDesc)], sz
    lib.et_device_arena_breakdown.argtypes = [P(ModelDesc), i32, P(sz)]
    lib.et_device_arena_breakdown.restype = sz
    lib.et_train_epochs.argtypes = [P(Backbone), P(Method), P(Optimizer), P(Cache), vp, vp, vp, vp, i32, i32,
                                    vp, i32, vp, vp, sz, P(EpochStats)]
    lib.et_train_epochs.restype = i32
    lib.et_batch_gradient.argtypes = [P(Backbone), P(Method), vp, vp, vp, vp, vp, i32, i32, vp, sz,
                                      P(ctypes.c_double)]
    lib.et_batch_gradient.restype = i32
    lib.et_predict.argtypes = [P(Backbone), P(Method), vp, vp, i32, i32, vp, vp, sz]
    lib.et_predict.restype = i32
    lib.et_skip_rows.argtypes = [P(Backbone), P(Method), vp, i32, i32, vp, vp, sz]
    lib.et_skip_rows.restype = i32
    lib.et_skip_apply.argtypes = [P(Backbone), P(Method), vp, vp, i32, i32, vp, vp, sz]
    lib.et_skip_apply.restype = i32
    lib.et_int8_forward_taps.argtypes = [P(Backbone), vp, i32, vp, vp, vp, sz]
    lib.et_int8_forward_taps.restype = i32
    lib.et_int8_workspace_size.argtypes = [P(Backbone), i32]
    lib.et_int8_workspace_size.restype = sz
    lib.et_clock_monotonic.restype = ctypes.c_double
    lib.et_permutations.argtypes, lib.et_permutations.restype = [P(Pcg64), i32, i32, vp], i32
    for name in ("et_expf", "et_logf", "et_log1pf", "et_tanhf"):  # the engine's own, same bits everywhere
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_float], ctypes.c_float


def load() -> Any:
    """The loaded library, or None (``unavailable_reason()`` says why). Loaded once."""
    global _lib, _error, _loaded
    if _loaded:
        return _lib
    _loaded = True
    path = library_path()
    if path is None:
        _error = (f"the compiled engine is not built (no _edgetune_core library in {SOURCE_DIR}); "
                  f"reinstall with 'pip install .' (needs a C compiler)")
        return None
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        if lib.et_abi_version() != ABI_VERSION:
            raise OSError(f"ABI version {lib.et_abi_version()}, expected {ABI_VERSION}")
        check_layout(lib, STRUCTS, ENUMS)
    except (OSError, AttributeError) as e:
        _error = f"the compiled engine at {path} does not load ({e}); reinstall with 'pip install .'"
        return None
    _lib = lib
    return lib


def check_layout(lib: Any, structs: tuple = STRUCTS, enums: dict[str, tuple[str, ...]] = ENUMS) -> None:
    """Raise OSError unless the library agrees with ``structs`` (numbered as in et_sizeof) on
    every struct's size and every field's name and offset, and with ``enums`` on every value's
    name; the message names the struct and field (or enum and value) that differ."""
    for i, st in enumerate(structs):
        for j, (name, _) in enumerate(st._fields_):
            c_name = lib.et_field_name(i, j)
            if c_name is None:
                raise OSError(f"struct {st.__name__}: field {j} ({name!r}) is not in C")
            if c_name.decode() != name:
                raise OSError(f"struct {st.__name__}: field {j} is {c_name.decode()!r} in C, {name!r} in Python")
            off = getattr(st, name).offset
            if lib.et_field_offset(i, j) != off:
                raise OSError(f"struct {st.__name__}: field {name!r} is at offset {lib.et_field_offset(i, j)} "
                              f"in C, {off} in Python")
        extra = lib.et_field_name(i, len(st._fields_))
        if extra is not None:
            raise OSError(f"struct {st.__name__}: field {extra.decode()!r} is in C, not in Python")
        if lib.et_sizeof(i) != ctypes.sizeof(st):
            raise OSError(f"struct {st.__name__} is {lib.et_sizeof(i)} bytes in C, {ctypes.sizeof(st)} in Python")
    for e, (name, values) in enumerate(enums.items()):
        for v, value in enumerate(values):
            c_name = lib.et_enum_name(e, v)
            if c_name is None:
                raise OSError(f"enum {name}: value {v} ({value!r}) is not in C")
            if c_name.decode() != value:
                raise OSError(f"enum {name}: value {v} is {c_name.decode()!r} in C, {value!r} in Python")
        extra = lib.et_enum_name(e, len(values))
        if extra is not None:
            raise OSError(f"enum {name}: value {len(values)} ({extra.decode()!r}) is in C, not in Python")


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _error


def info() -> dict[str, Any]:
    """What `edgetune info` prints: whether the engine is there, where, and how it was built."""
    lib = load()
    if lib is None:
        return {"available": False, "reason": _error}
    return {"available": True, "library": str(library_path()), "abi_version": lib.et_abi_version(),
            "build": lib.et_build_info().decode(errors="replace")}
