"""The compiled kernels of the spatial layer kinds (edgetune/core/et_conv.c) against the NumPy
operations of edgetune.nn.layers, and the binding's refusals.

Every kernel runs in float32; the NumPy reference runs in float64 on the same float32
values, and each entry must agree within 1e-5 of its own scale: the same operation on the
absolute values (|x| and |w| for a convolution), which bounds what float32 rounding can
move that entry. Max pooling picks the same element, so its forward pass is exact.
tests/c/test_conv.c checks the same kernels from C, with warnings as errors, under
AddressSanitizer and UndefinedBehaviorSanitizer with scratch buffers of exactly the size C
asks for, and on aarch64 under QEMU (the tests at the end of this file build and run it).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgetune import core
from edgetune.errors import UsageError
from edgetune.nn.layers import LayerSpec

pytestmark = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

from edgetune.core import conv_binding as cb  # noqa: E402

RTOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "edgetune" / "core"
PROGRAM = ROOT / "tests" / "c" / "test_conv.c"
C_SOURCES = [CORE / "et_conv.c", CORE / "et_kernels.c"]
C_FLAGS = ["-std=c99", "-O2", "-ffp-contract=fast", "-fno-wrapv", f"-I{CORE}", "-Wall", "-Wextra", "-Werror"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def _close(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, what: str) -> None:
    """|got - ref| <= RTOL * scale entry by entry (scale: the operation on absolute values)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert got.dtype == np.float32, what
    err = np.abs(got.astype(np.float64) - ref)
    tol = RTOL * np.asarray(scale, np.float64) + 1e-30
    worst = np.argmax(err - tol)
    assert np.all(err <= tol), (f"{what}: entry {worst} is {got.flat[worst]}, NumPy {ref.flat[worst]} "
                                f"(allowed {tol.flat[worst]})")


def _data(spec: LayerSpec, n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, spec.in_features)).astype(np.float32)
    g = rng.normal(size=(n, spec.out_features)).astype(np.float32)
    w = rng.normal(size=spec.weight_shape).astype(np.float32) if spec.has_params else None
    b = rng.normal(size=spec.out_channels).astype(np.float32) if spec.has_params else None
    return x, g, w, b


def _f64(a):
    return None if a is None else a.astype(np.float64)


def check_conv(spec: LayerSpec, n: int = 3, seed: int = 0) -> None:
    ops = spec.ops
    x, g, w, b = _data(spec, n, seed)
    X, G, W, B = map(_f64, (x, g, w, b))
    aX, aG, aW = np.abs(X), np.abs(G), np.abs(W)
    # forward, with and without the bias
    ref = ops.forward(spec, X, W)
    scale = ops.forward(spec, aX, aW)
    _close(cb.conv_forward(spec, x, w), ref, scale, f"{spec.describe()} forward")
    ref_b = ops.add_bias(spec, ref.copy(), B)
    _close(cb.conv_forward(spec, x, w, b), ref_b, ops.add_bias(spec, scale.copy(), np.abs(B)),
           f"{spec.describe()} forward + bias")
    # input gradient
    _close(cb.conv_input_grad(spec, g, w), ops.input_grad(spec, G, W), ops.input_grad(spec, aG, aW),
           f"{spec.describe()} input grad")
    # weight gradient: written, then added to what is there
    ref_w, scale_w = ops.weight_grad(spec, X, G), ops.weight_grad(spec, aX, aG)
    _close(cb.conv_weight_grad(spec, x, g), ref_w, scale_w, f"{spec.describe()} weight grad")
    start = np.random.default_rng(seed + 1).normal(size=spec.weight_shape).astype(np.float32)
    out = start.copy()
    assert cb.conv_weight_grad(spec, x, g, out=out, accumulate=True) is out
    _close(out, start + ref_w, np.abs(start) + scale_w, f"{spec.describe()} weight grad accumulated")
    # bias gradient
    ref_b, scale_b = ops.bias_grad(spec, G), ops.bias_grad(spec, aG)
    _close(cb.conv_bias_grad(spec, g), ref_b, scale_b, f"{spec.describe()} bias grad")
    start = np.ones(spec.out_channels, np.float32)
    out = start.copy()
    cb.conv_bias_grad(spec, g, out=out, accumulate=True)
    _close(out, start + ref_b, start + scale_b, f"{spec.describe()} bias grad accumulated")


def check_pool(spec: LayerSpec, x: np.ndarray, g: np.ndarray) -> None:
    ops = spec.ops
    X, G = x.astype(np.float64), g.astype(np.float64)
    z = cb.pool_forward(spec, x)
    if spec.kind.startswith("max"):  # the same element is picked: exact, NaN where NumPy has NaN
        np.testing.assert_array_equal(z, ops.forward(spec, x))
        ref_dx = ops.input_grad(spec, G, None, X)
        scale_dx = ops.input_grad(spec, np.abs(G), None, X)
        dx = cb.pool_input_grad(spec, g, x)
    else:
        _close(z, ops.forward(spec, X), ops.forward(spec, np.abs(X)), f"{spec.describe()} forward")
        ref_dx, scale_dx = ops.input_grad(spec, G, None, X), ops.input_grad(spec, np.abs(G), None, X)
        dx = cb.pool_input_grad(spec, g)
    _close(dx, ref_dx, scale_dx, f"{spec.describe()} input grad")


# ---------------------------------------------------------------------- the grid
CONV_CASES = [
    # in_shape, out, kernel, stride, padding, groups
    ((4, 11), 6, 3, 2, 1, 2),          # groups 2, odd length
    ((3, 7), 3, 3, 1, 0, 3),           # depthwise
    ((3, 9), 6, 3, 1, 1, 3),           # depthwise, two outputs per channel
    ((2, 5), 4, 5, 1, 2, 1),           # padding, kernel = length
    ((6, 9), 6, 1, 1, 0, 1),           # pointwise
    ((4, 10), 8, 1, 1, 0, 2),          # grouped pointwise
    ((4, 6), 4, 1, 1, 0, 4),           # pointwise and depthwise at once
    ((2, 3), 2, 3, 4, 1, 1),           # stride > kernel
    ((1, 8), 1, 8, 1, 0, 1),           # one channel, one output
    ((1, 13), 5, 4, 3, 2, 1),          # one input channel, even kernel
    ((6, 128), 32, 5, 1, 2, 1),        # the first layer of the har-raw CNN
    ((4, 7, 6), 8, (3, 2), (2, 1), (1, 0), 2),
    ((3, 5, 5), 3, 3, 1, 1, 3),        # depthwise 2-D
    ((4, 9, 7), 4, 3, 2, 1, 4),        # depthwise, stride 2
    ((2, 4, 4), 5, 1, 1, 0, 1),        # pointwise 2-D
    ((2, 5, 3), 4, 1, 2, 0, 1),        # 1x1 with stride: not pointwise
    ((2, 6, 5), 4, (2, 3), (3, 2), (1, 1), 1),
    ((1, 7, 9), 3, 3, (4, 5), 2, 1),   # stride > kernel, padding 2
    ((6, 5, 5), 6, 3, 1, 1, 2),        # groups 2, 2-D
]


@pytest.mark.parametrize("shape,o,k,s,p,g", CONV_CASES)
def test_conv_kernels_equal_numpy(shape, o, k, s, p, g):
    check_conv(LayerSpec.conv(shape, o, k, stride=s, padding=p, groups=g))


POOL_CASES = [((3, 10), 3, 2, 1), ((2, 7), 2, None, 0), ((1, 9), 2, 3, 1), ((3, 6, 7), (3, 2), (2, 2), (1, 1)),
              ((2, 4, 4), 2, None, 0), ((2, 5, 5), 3, 1, 1), ((1, 3, 8), (1, 3), (2, 4), (0, 1))]


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape,k,s,p", POOL_CASES)
def test_pool_kernels_equal_numpy(mode, shape, k, s, p):
    spec = LayerSpec.pool(mode, shape, k, s, p)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, spec.in_features)).astype(np.float32)
    g = rng.normal(size=(3, spec.out_features)).astype(np.float32)
    check_pool(spec, x, g)
    # ties everywhere: the gradient goes to the first maximum of each window
    check_pool(spec, np.round(x).clip(-1, 1).astype(np.float32), g)


def test_max_pool_nan_and_all_minus_infinity_windows_follow_numpy():
    spec = LayerSpec.pool("max", (2, 4, 5), 3, 2, 1)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, spec.in_features)).astype(np.float32)
    x[0, 7] = np.nan                  # a NaN wins its windows
    x[1, :20] = -np.inf               # channel 0 of sample 1: only -inf, the padding included
    g = rng.normal(size=(2, spec.out_features)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        check_pool(spec, x, g)
    assert np.isnan(cb.pool_forward(spec, x)[0]).any()


@pytest.mark.parametrize("shape", [(3, 5, 4), (3, 7), (1, 1), (4, 1, 1), (2, 128)])
def test_gap_kernels_equal_numpy(shape):
    spec = LayerSpec.gap(shape)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, spec.in_features)).astype(np.float32)
    g = rng.normal(size=(4, spec.out_features)).astype(np.float32)
    ops = spec.ops
    X, G = x.astype(np.float64), g.astype(np.float64)
    _close(cb.gap_forward(spec, x), ops.forward(spec, X), ops.forward(spec, np.abs(X)), "gap forward")
    _close(cb.gap_input_grad(spec, g), ops.input_grad(spec, G), ops.input_grad(spec, np.abs(G)), "gap grad")


@pytest.mark.parametrize("spec", [LayerSpec.conv((3, 4, 5), 6, 3, padding=1), LayerSpec.conv((4, 9), 4, 3, groups=4),
                                  LayerSpec.conv((6, 7), 5, 1), LayerSpec.pool("max", (3, 8), 2),
                                  LayerSpec.pool("avg", (2, 5, 6), 3, 2, 1), LayerSpec.gap((3, 7))])
def test_forward_passes_read_and_write_rows_inside_wider_rows(spec):
    """x and out as column slices of wider arrays (the layer table's forward operation reads
    a layer's rows inside wider ones): the same values, nothing beside them read or written."""
    x, _, w, b = _data(spec, 3, 4)
    forward = {"conv": lambda xx, out=None: cb.conv_forward(spec, xx, w, b, out=out),
               "pool": lambda xx, out=None: cb.pool_forward(spec, xx, out=out),
               "gap": lambda xx, out=None: cb.gap_forward(spec, xx, out=out)}[cb._family(spec)]
    ref = forward(x)
    wide_x = np.full((3, spec.in_features + 5), np.nan, np.float32)   # a NaN read would show
    wide_x[:, 2:2 + spec.in_features] = x
    wide_z = np.full((3, spec.out_features + 7), -7.0, np.float32)
    got = forward(wide_x[:, 2:2 + spec.in_features], out=wide_z[:, 3:3 + spec.out_features])
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(wide_z[:, 3:3 + spec.out_features], ref)
    assert np.all(wide_z[:, :3] == -7.0) and np.all(wide_z[:, 3 + spec.out_features:] == -7.0)


def test_zero_rows():
    spec = LayerSpec.conv((3, 6), 4, 3, padding=1)
    x = np.zeros((0, spec.in_features), np.float32)
    g = np.zeros((0, spec.out_features), np.float32)
    w = np.ones(spec.weight_shape, np.float32)
    assert cb.conv_forward(spec, x, w).shape == (0, spec.out_features)
    assert cb.conv_input_grad(spec, g, w).shape == (0, spec.in_features)
    np.testing.assert_array_equal(cb.conv_weight_grad(spec, x, g, out=np.full(spec.weight_shape, 7, np.float32)), 0)
    np.testing.assert_array_equal(cb.conv_bias_grad(spec, g), 0)


# ---------------------------------------------------------------------- hypothesis over shapes
@settings(max_examples=120, deadline=None)
@given(c=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 12), o=st.integers(1, 6),
       kh=st.integers(1, 4), kw=st.integers(1, 6), sh=st.integers(1, 4), sw=st.integers(1, 5),
       ph=st.integers(0, 3), pw=st.integers(0, 3), g=st.integers(1, 6), one_d=st.booleans(), n=st.integers(1, 3),
       depthwise=st.booleans())
def test_conv_kernels_equal_numpy_over_shapes(c, h, w, o, kh, kw, sh, sw, ph, pw, g, one_d, n, depthwise):
    if depthwise:
        g, o = c, c * (1 + o % 2)
    assume(c % g == 0 and o % g == 0)
    if one_d:
        assume(w + 2 * pw >= kw)
        spec = LayerSpec.conv((c, w), o, kw, stride=sw, padding=pw, groups=g)
    else:
        assume(h + 2 * ph >= kh and w + 2 * pw >= kw)
        spec = LayerSpec.conv((c, h, w), o, (kh, kw), stride=(sh, sw), padding=(ph, pw), groups=g)
    check_conv(spec, n=n, seed=c * 100 + w)


@settings(max_examples=120, deadline=None)
@given(mode=st.sampled_from(["max", "avg"]), c=st.integers(1, 4), h=st.integers(1, 7), w=st.integers(1, 12),
       kh=st.integers(1, 4), kw=st.integers(1, 5), sh=st.integers(1, 4), sw=st.integers(1, 5),
       ph=st.integers(0, 2), pw=st.integers(0, 2), one_d=st.booleans(), ties=st.booleans())
def test_pool_kernels_equal_numpy_over_shapes(mode, c, h, w, kh, kw, sh, sw, ph, pw, one_d, ties):
    assume(2 * pw <= kw and w + 2 * pw >= kw)
    if one_d:
        spec = LayerSpec.pool(mode, (c, w), kw, sw, pw)
    else:
        assume(2 * ph <= kh and h + 2 * ph >= kh)
        spec = LayerSpec.pool(mode, (c, h, w), (kh, kw), (sh, sw), (ph, pw))
    rng = np.random.default_rng(c + 10 * w)
    x = rng.normal(size=(2, spec.in_features)).astype(np.float32)
    if ties:
        x = np.round(x).astype(np.float32)
    check_pool(spec, x, rng.normal(size=(2, spec.out_features)).astype(np.float32))


# ---------------------------------------------------------------------- dims: C refuses what LayerSpec refuses
def _spec_or_none(kind: str, shape, o, k, s, p, g):
    try:
        return LayerSpec(kind, shape, o, k, s, p, g)
    except UsageError:
        return None


small = st.integers(-1, 7)


@settings(max_examples=400, deadline=None)
@given(family=st.sampled_from(["conv", "pool"]), c=small, h=small, w=small, o=small, kh=small, kw=small,
       sh=small, sw=small, ph=small, pw=small, g=small)
def test_c_derives_the_shapes_layer_spec_derives_and_refuses_what_it_refuses(family, c, h, w, o, kh, kw, sh, sw,
                                                                                ph, pw, g):
    kind = "conv2d" if family == "conv" else "maxpool2d"
    spec = _spec_or_none(kind, (c, h, w), o, (kh, kw), (sh, sw), (ph, pw), g)
    fields = dict(in_c=c, in_h=h, in_w=w, out_c=o, kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph,
                  pad_w=pw, groups=g)
    if spec is None:
        with pytest.raises(UsageError, match="refuse"):
            cb.derive_dims(family, **fields)
    else:
        d = cb.derive_dims(family, **fields)
        assert (d.out_c, d.out_h, d.out_w) == spec.out_shape
        assert (d.out_c, d.out_h, d.out_w) == (o,) + spec.out_shape[1:]
    # the same layer in 1-D (height 1) and as average pooling
    if family == "pool":
        spec1 = _spec_or_none("avgpool1d", (c, w), o, (kw,), (sw,), (pw,), g)
        fields1 = {**fields, "in_h": 1, "kernel_h": 1, "stride_h": 1, "pad_h": 0}
    else:
        spec1 = _spec_or_none("conv1d", (c, w), o, (kw,), (sw,), (pw,), g)
        fields1 = {**fields, "in_h": 1, "kernel_h": 1, "stride_h": 1, "pad_h": 0}
    if spec1 is None:
        with pytest.raises(UsageError):
            cb.derive_dims(family, **fields1)
    else:
        assert cb.derive_dims(family, **fields1).out_w == spec1.out_shape[1]


@settings(max_examples=100, deadline=None)
@given(c=small, h=small, w=small, o=small)
def test_gap_dims(c, h, w, o):
    spec = _spec_or_none("gap", (c, h, w), o, (), (), (), 1)
    fields = dict(in_c=c, in_h=h, in_w=w, out_c=o, kernel_h=h, kernel_w=w, stride_h=1, stride_w=1, pad_h=0,
                  pad_w=0, groups=1)
    if spec is None:
        with pytest.raises(UsageError):
            cb.derive_dims("gap", **fields)
    else:
        d = cb.derive_dims("gap", **fields)
        assert (d.out_c, d.out_h, d.out_w) == (c, 1, 1)


def test_gap_dims_refuse_a_window_smaller_than_the_input():
    with pytest.raises(UsageError, match="refuse"):
        cb.derive_dims("gap", in_c=2, in_h=1, in_w=5, out_c=2, kernel_h=1, kernel_w=4, stride_h=1, stride_w=1,
                       pad_h=0, pad_w=0, groups=1)


def test_layers_too_big_for_the_kernels_are_refused():
    big = LayerSpec.conv((1, 50000, 50000), 1, 1)        # 2.5e9 inputs: past the kernels' int sizes
    with pytest.raises(UsageError, match="refuse"):
        cb.layer_dims(big)
    cols = LayerSpec.conv((1024, 170, 170), 1, 9, padding=4)  # im2col: 1024 * 81 x 170 * 170 floats > 2^31
    with pytest.raises(UsageError, match="refuse"):
        cb.layer_dims(cols)
    with pytest.raises(UsageError, match="32-bit"):
        cb.derive_dims("conv", in_c=2 ** 31, in_h=1, in_w=1, out_c=1, kernel_h=1, kernel_w=1, stride_h=1,
                       stride_w=1, pad_h=0, pad_w=0, groups=1)
    with pytest.raises(UsageError, match="missing"):
        cb.derive_dims("conv", in_c=1)
    with pytest.raises(UsageError, match="whole number"):
        cb.derive_dims("conv", in_c=True, in_h=1, in_w=1, out_c=1, kernel_h=1, kernel_w=1, stride_h=1,
                       stride_w=1, pad_h=0, pad_w=0, groups=1)
    with pytest.raises(UsageError, match="family"):
        cb.derive_dims("dense", in_c=1)


# ---------------------------------------------------------------------- scratch
def test_scratch_sizes_come_from_c_and_are_enough():
    dw = LayerSpec.conv((4, 9, 7), 4, 3, stride=2, padding=1, groups=4)
    pw = LayerSpec.conv((6, 9), 8, 1)
    full = LayerSpec.conv((6, 128), 32, 5, padding=2)
    for op in ("conv_forward", "conv_input_grad", "conv_weight_grad"):
        assert cb.scratch_bytes(dw, op, 20) == 0
    assert cb.scratch_bytes(pw, "conv_forward", 20) == cb.scratch_bytes(pw, "conv_input_grad", 20) == 0
    assert cb.scratch_bytes(pw, "conv_weight_grad", 20) == (8 * 9 + 6 * 8) * 4   # g^T packed, the sum
    assert cb.scratch_bytes(full, "conv_forward", 20) == 6 * 5 * 128 * 4             # im2col
    assert cb.scratch_bytes(full, "conv_weight_grad", 20) == (30 * 128 + 32 * 128 + 30 * 32) * 4
    assert cb.scratch_bytes(LayerSpec.pool("max", (3, 8), 2), "pool", 5) == 0
    assert cb.scratch_bytes(LayerSpec.gap((3, 8)), "gap", 5) == 0
    # with exactly that many bytes, nothing past them is touched
    x, g, w, b = _data(full, 2, 0)
    for op, call in (("conv_forward", lambda s: cb.conv_forward(full, x, w, b, scratch=s)),
                     ("conv_input_grad", lambda s: cb.conv_input_grad(full, g, w, scratch=s)),
                     ("conv_weight_grad", lambda s: cb.conv_weight_grad(full, x, g, scratch=s))):
        n = cb.scratch_bytes(full, op, 2) // 4
        buf = np.full(n + 64, 12345.0, np.float32)
        call(buf[:n])
        assert np.all(buf[n:] == 12345.0), op
        with pytest.raises(UsageError, match="needs"):
            call(buf[:n - 1])
    with pytest.raises(UsageError, match="op must be"):
        cb.scratch_bytes(full, "dense", 1)


# ---------------------------------------------------------------------- the binding refuses
def test_binding_refuses_bad_arrays():
    spec = LayerSpec.conv((3, 6, 5), 4, 3, padding=1)
    x, g, w, b = _data(spec, 2, 0)
    with pytest.raises(UsageError, match="dtype float64"):
        cb.conv_forward(spec, x.astype(np.float64), w)
    with pytest.raises(UsageError, match="shape"):
        cb.conv_forward(spec, x[:, :-1], w)
    with pytest.raises(UsageError, match="2-D"):
        cb.conv_forward(spec, x[0], w)
    with pytest.raises(UsageError, match="2-D"):
        cb.conv_forward(spec, [list(r) for r in x], w)
    wide = np.zeros((2, 2 * spec.in_features), np.float32)
    with pytest.raises(UsageError, match="rows must be contiguous"):
        cb.conv_forward(spec, wide[:, ::2], w)
    with pytest.raises(UsageError, match="rows must be contiguous"):
        cb.conv_forward(spec, wide[::-1, :spec.in_features], w)
    with pytest.raises(UsageError, match="C-contiguous"):
        cb.conv_input_grad(spec, np.zeros((2, 2 * spec.out_features), np.float32)[:, ::2], w)
    with pytest.raises(UsageError, match="weight: shape"):
        cb.conv_forward(spec, x, w.reshape(4, -1))
    with pytest.raises(UsageError, match="weight: dtype"):
        cb.conv_forward(spec, x, w.astype(np.float16))
    with pytest.raises(UsageError, match="bias: shape"):
        cb.conv_forward(spec, x, w, b[:3])
    with pytest.raises(UsageError, match="out: 3 rows, expected 2"):
        cb.conv_forward(spec, x, w, out=np.zeros((3, spec.out_features), np.float32))
    with pytest.raises(UsageError, match="out: shape"):
        cb.conv_input_grad(spec, g, w, out=np.zeros((2, spec.in_features + 1), np.float32))
    ro = np.zeros((2, spec.out_features), np.float32)
    ro.flags.writeable = False
    with pytest.raises(UsageError, match="writable"):
        cb.conv_forward(spec, x, w, out=ro)
    buf = np.zeros(2 * max(spec.in_features, spec.out_features), np.float32)
    with pytest.raises(UsageError, match="overlap"):
        cb.conv_forward(spec, buf[:2 * spec.in_features].reshape(2, -1), w,
                        out=buf[:2 * spec.out_features].reshape(2, -1))
    with pytest.raises(UsageError, match="scratch"):
        cb.conv_forward(spec, x, w, scratch=np.zeros((4, 4), np.float32))
    s = np.zeros(cb.scratch_bytes(spec, "conv_forward", 2) // 4, np.float32)
    with pytest.raises(UsageError, match="scratch must not overlap"):
        cb.conv_forward(spec, x, w, out=s[:2 * spec.out_features].reshape(2, -1), scratch=s)
    with pytest.raises(UsageError, match="rows"):
        cb.conv_weight_grad(spec, x, g[:1])
    with pytest.raises(UsageError, match="accumulate"):
        cb.conv_weight_grad(spec, x, g, accumulate=True)
    with pytest.raises(UsageError, match="accumulate"):
        cb.conv_bias_grad(spec, g, accumulate=True)
    with pytest.raises(UsageError, match="g: shape"):
        cb.conv_input_grad(spec, x, w)


def test_binding_refuses_the_wrong_layer_kind():
    conv = LayerSpec.conv((3, 8), 4, 3)
    pool = LayerSpec.pool("max", (3, 8), 2)
    x = np.zeros((1, 24), np.float32)
    with pytest.raises(UsageError, match="conv1d or conv2d"):
        cb.conv_forward(pool, x, np.zeros((1,), np.float32))
    with pytest.raises(UsageError, match="pool"):
        cb.pool_forward(conv, x)
    with pytest.raises(UsageError, match="gap"):
        cb.gap_forward(conv, x)
    with pytest.raises(UsageError, match="no spatial kernel"):
        cb.layer_dims(LayerSpec.dense(4, 2))
    with pytest.raises(UsageError, match="LayerSpec"):
        cb.layer_dims({"kind": "conv1d"})
    with pytest.raises(UsageError, match="needs the layer's input"):
        cb.pool_input_grad(pool, np.zeros((1, 12), np.float32))
    with pytest.raises(UsageError, match="rows"):
        cb.pool_input_grad(pool, np.zeros((1, 12), np.float32), np.zeros((2, 24), np.float32))
    with pytest.raises(UsageError, match="number of rows"):
        cb.scratch_bytes(conv, "conv_forward", -1)


# ---------------------------------------------------------------------- the C test program
def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found: install the Debian package {package}")
    return path


def _build_and_run(tmp_path: Path, cc: str, name: str, extra: list[str], runner: list[str]) -> dict[str, float]:
    exe = tmp_path / name
    r = subprocess.run([cc, *C_FLAGS, *extra, str(PROGRAM), *map(str, C_SOURCES), "-lm", "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], lines
    passed, _, failed, _ = lines[-1].split()
    assert int(failed) == 0 and int(passed) > 50, lines[-1]
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines[:-1]}


@pytest.fixture(scope="module")
def host_sums(tmp_path_factory) -> dict[str, float]:
    return _build_and_run(tmp_path_factory.mktemp("c"), _need("gcc", "gcc"), "test_conv", [], [])


def test_c_program_on_the_host(host_sums):
    assert len(host_sums) > 50


def test_c_program_under_sanitizers(tmp_path, host_sums):
    sums = _build_and_run(tmp_path, _need("gcc", "gcc"), "test_conv_san", SANITIZE, [])
    assert sums.keys() == host_sums.keys()


def test_c_program_on_aarch64_gives_the_same_results(tmp_path, host_sums):
    cc = _need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    qemu = _need("qemu-aarch64", "qemu-user")
    sums = _build_and_run(tmp_path, cc, "test_conv_aarch64", ["-static"], [qemu])
    assert sums.keys() == host_sums.keys()
    for name, v in sums.items():
        assert abs(v - host_sums[name]) <= 1e-5 * abs(host_sums[name]), (name, v, host_sums[name])


def test_kernels_compile_for_a_cortex_m4(tmp_path):
    """The same sources go into microcontroller exports: no warning there either."""
    cc = _need("arm-none-eabi-gcc", "gcc-arm-none-eabi")
    r = subprocess.run([cc, "-std=c99", "-O2", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16",
                        "-ffp-contract=fast", "-fno-wrapv", "-Wall", "-Wextra", "-Werror", f"-I{CORE}", "-c",
                        str(CORE / "et_conv.c"), "-o", str(tmp_path / "et_conv.o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_binding_tests_under_sanitizers(tmp_path):
    """The tests above, through the binding, against an ASan/UBSan build of the library: every
    pointer and size the binding hands C stays inside its arrays."""
    import os
    import sys

    from edgetune import core as core_pkg

    cc = _need("gcc", "gcc")
    lib = tmp_path / "libedgetune_core_san.so"
    flags = ["-std=c99", "-O2", "-ffp-contract=fast", "-fno-wrapv", f"-I{CORE}"]
    r = subprocess.run([cc, *flags, *SANITIZE, "-fPIC", "-shared", '-DET_BUILD_FLAGS="sanitized"',
                        *(str(CORE / s) for s in core_pkg.SOURCES), "-lm", "-o", str(lib)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runtimes = [subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                for name in ("libasan.so", "libubsan.so")]
    env = {**os.environ, "EDGETUNE_CORE_LIB": str(lib), "LD_PRELOAD": " ".join(runtimes),
           "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    check = "import edgetune.core as c; assert 'sanitized' in c.info()['build'], c.info()"
    r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                        "not c_program and not sanitizers and not cortex"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]


def test_the_benchmark_runs(tmp_path, capsys):
    """benchmarks/conv_kernels.py end to end at a tiny size (its numbers go to BENCHMARKS.md, not here)."""
    import json

    from benchmarks import conv_kernels

    out = tmp_path / "conv.json"
    assert conv_kernels.main(["--batch", "2", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("| conv") == 9 and text.count("| pool") == 4 and "of the matrix product" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 13 and all(r["c_s"] > 0 for r in data["rows"])
    assert data["forward"]["flops"] == sum(conv_kernels.conv_flops(s, 2) for name, s in conv_kernels.har_layers()
                                           if s.has_params)
