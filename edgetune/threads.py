"""How many threads NumPy's BLAS uses, changed at run time.

Fine-tuning at batch 20 multiplies small matrices; BLAS threads cost more than they
bring there, and on a busy machine they can make a step several times slower (threads
spin waiting for a core). The edgetune command therefore runs BLAS single-threaded
unless told otherwise (``--threads`` or ``EDGETUNE_THREADS``). Works with the OpenBLAS
that NumPy wheels bundle, or with any BLAS through ``threadpoolctl`` where installed.
"""
from __future__ import annotations

import ctypes
import glob
from pathlib import Path
from typing import Any

import numpy as np

_lib: Any = None
_names: tuple[str, str] | None = None


def _openblas() -> tuple[Any, tuple[str, str]] | None:
    global _lib, _names
    if _lib is not None:
        return _lib, _names  # type: ignore[return-value]
    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(glob.glob(str(libdir / "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"),
                               ("openblas_", "")):
            if hasattr(lib, f"{prefix}set_num_threads{suffix}"):
                _lib, _names = lib, (prefix, suffix)
                return _lib, _names
    return None


def get_blas_threads() -> int | None:
    """The BLAS thread count, or None where it cannot be read."""
    found = _openblas()
    if found is not None:
        lib, (p, s) = found
        return int(getattr(lib, f"{p}get_num_threads{s}")())
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return int(info["num_threads"])
    return None


def set_blas_threads(n: int) -> bool:
    """Set the BLAS thread count; False where this BLAS cannot be controlled."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    found = _openblas()
    if found is not None:
        lib, (p, s) = found
        getattr(lib, f"{p}set_num_threads{s}")(ctypes.c_int(int(n)))
        return True
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(n, user_api="blas")
    return True
