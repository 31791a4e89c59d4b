"""Builds edgetune's compiled engine (edgetune/core/*.c) as a shared library loaded with ctypes.

The flags are portable on purpose: no -march=native (the engine must run on any machine of
the architecture it was built for); the hot loops carry their own per-function x86-64-v3
variant (see et_kernels.c), and the compiler vectorises the plain loops.
"""
from setuptools import Extension, setup

SOURCES = ["et_kernels.c", "et_layers.c", "et_conv.c", "et_int8.c", "et_train.c", "et_device.c", "et_abi.c", "et_clock.c", "et_oselm.c",
           "et_random.c"]
# -fno-wrapv undoes the -fwrapv of CPython's own flags: with wrapping signed counters GCC
# cannot vectorise the counted loops cleanly (measured: 10x the instructions in a dot product).
# -ffp-contract=off: no fused multiply-add, here or in any exported project (their Makefiles say the
# same), so every build of the engine computes the same float32 bits (docs/export.md#the-same-bits-on-every-target).
FLAGS = ["-std=c99", "-O3", "-ffp-contract=off", "-fno-wrapv"]

setup(ext_modules=[Extension(
    "edgetune.core._edgetune_core",
    sources=[f"edgetune/core/{s}" for s in SOURCES],
    include_dirs=["edgetune/core"],
    depends=[f"edgetune/core/{h}" for h in ("et_core.h", "et_kernels.h", "et_layers.h", "et_conv.h", "et_int8.h", "et_device.h", "et_oselm.h", "et_random.h")],
    extra_compile_args=FLAGS + ['-DET_BUILD_FLAGS="' + " ".join(FLAGS) + '"'],
    libraries=["m"],
)])
