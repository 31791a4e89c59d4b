"""The compiled training engine: portable C99 sources beside this file, loaded with ctypes.

``pip install .`` compiles ``et_*.c`` into the shared library ``_edgetune_core``. This
module finds and loads it, mirrors its structs (``et_core.h``) as ``ctypes`` structures,
and checks that both sides agree on their sizes before anything runs. If the library is
missing or does not load, ``available()`` is False and ``unavailable_reason()`` says why;
the NumPy engine then runs instead (see ``edgetune.core.engine``).

``EDGETUNE_CORE_LIB=/path/to/lib.so`` loads another build of the same sources (the test
suite uses it for a sanitizer build).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Any

MAX_LAYERS = 16
ABI_VERSION = 1
SOURCE_DIR = Path(__file__).resolve().parent
#: The library's C sources, in the order they are compiled (the clock is POSIX-only).
SOURCES = ("et_kernels.c", "et_int8.c", "et_train.c", "et_clock.c")
HEADERS = ("et_core.h", "et_kernels.h", "et_int8.h")

ERRORS = {-1: "invalid argument", -2: "workspace too small", -3: "unsupported configuration"}

L = MAX_LAYERS
_f32p = ctypes.POINTER(ctypes.c_float)
_i8p = ctypes.POINTER(ctypes.c_int8)
_i32p = ctypes.POINTER(ctypes.c_int32)
_u8p = ctypes.POINTER(ctypes.c_uint8)


class Backbone(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("sizes", ctypes.c_int32 * (L + 1)),
                ("activation", ctypes.c_int32), ("is_int8", ctypes.c_int32),
                ("wt", _f32p * L), ("w", _f32p * L), ("bias", _f32p * L),
                ("qw", _i8p * L), ("wscale", _f32p * L), ("qbias", _i32p * L),
                ("rq_mult", _i32p * L), ("rq_shift", _i32p * L), ("act_scale", ctypes.c_float * L)]


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


STRUCTS = (Backbone, Method, Optimizer, Cache, EpochStats)  # the order of et_sizeof()

_lib: Any = None
_error: str | None = None
_loaded = False


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


def _declare(lib: Any) -> None:
    vp, sz, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32
    P = ctypes.POINTER
    lib.et_abi_version.restype = i32
    lib.et_sizeof.argtypes, lib.et_sizeof.restype = [i32], sz
    lib.et_build_info.restype = ctypes.c_char_p
    lib.et_workspace_size.argtypes = [P(Backbone), P(Method), P(Cache), i32]
    lib.et_workspace_size.restype = sz
    lib.et_train_epochs.argtypes = [P(Backbone), P(Method), P(Optimizer), P(Cache), vp, vp, vp, vp, i32, i32,
                                    vp, i32, vp, vp, sz, P(EpochStats)]
    lib.et_train_epochs.restype = i32
    lib.et_batch_gradient.argtypes = [P(Backbone), P(Method), vp, vp, vp, vp, vp, i32, i32, vp, sz,
                                      P(ctypes.c_double)]
    lib.et_batch_gradient.restype = i32
    lib.et_predict.argtypes = [P(Backbone), P(Method), vp, vp, i32, i32, vp, vp, sz]
    lib.et_predict.restype = i32
    lib.et_int8_forward_taps.argtypes = [P(Backbone), vp, i32, vp, vp, vp, sz]
    lib.et_int8_forward_taps.restype = i32
    lib.et_int8_workspace_size.argtypes = [P(Backbone), i32]
    lib.et_int8_workspace_size.restype = sz
    lib.et_clock_monotonic.restype = ctypes.c_double


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
        for i, st in enumerate(STRUCTS):
            if lib.et_sizeof(i) != ctypes.sizeof(st):
                raise OSError(f"struct {st.__name__} is {lib.et_sizeof(i)} bytes in C, "
                              f"{ctypes.sizeof(st)} in Python")
    except (OSError, AttributeError) as e:
        _error = f"the compiled engine at {path} does not load ({e}); reinstall with 'pip install .'"
        return None
    _lib = lib
    return lib


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
