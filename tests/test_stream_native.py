"""The compiled OS-ELM (et_oselm.c) against the NumPy reference."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edgetune.errors import DataError, UsageError
from edgetune.stream.oselm import OSELM, random_uniform

native = pytest.importorskip("edgetune.stream.native", reason="needs the compiled engine")
try:
    native.library()
except ImportError as e:  # pragma: no cover - the engine is built by pip install .
    pytest.fail(f"the compiled engine is expected to be built: {e}")


def _data(n, d, m, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)), r.normal(size=(n, m))


def test_the_seed_gives_the_same_weights_in_C_and_numpy():
    lib = native.library()
    ref = random_uniform(12345, 0, 500)
    got = np.array([lib.et_oselm_uniform(12345, i) for i in range(500)], np.float32)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("keep_weights", [True, False])
@pytest.mark.parametrize("forgetting", [1.0, 0.99])
def test_updates_match_numpy_within_float_tolerance(keep_weights, forgetting):
    x, t = _data(1500, 12, 3)
    c = native.NativeOSELM(12, 3, 24, delta=0.5, forgetting=forgetting, keep_weights=keep_weights, seed=9)
    p = OSELM(12, 3, 24, delta=0.5, forgetting=forgetting, seed=9)
    np.testing.assert_allclose(c.hidden(x[0]), p.hidden(x[0])[0], atol=1e-6)
    for i in range(len(x)):
        assert c.learn_one(x[i], t[i])
        assert p.learn_one(x[i], t[i])
    assert np.abs(c.beta_ - p.beta_).max() <= 1e-4 * np.abs(p.beta_).max()
    assert np.abs(c.P_ - p.P_).max() <= 1e-4 * np.abs(p.P_).max()
    # float32 against float64 after 1500 rank-one updates: 0.9e-5 apart when the build fused multiply-adds,
    # 1.9e-5 without (-ffp-contract=off, every build's flag since)
    np.testing.assert_allclose(c.predict(x[0]), p.predict(x[0])[0], rtol=1e-4, atol=3e-5)


def test_autoencoder_stream_matches_numpy_test_then_train():
    x, _ = _data(300, 16, 1, seed=2)
    c = native.NativeOSELM(16, 16, 20, keep_weights=False)
    p = OSELM(16, 16, 20)
    err, learned = c.ae_stream(x, 1e30)
    ref = []
    for row in x:
        ref.append(np.mean((p.predict(row)[0] - row) ** 2))
        p.learn_one(row, row)
    np.testing.assert_allclose(err, ref, rtol=1e-4)
    assert (learned == 1).all()
    err2, learned2 = c.ae_stream(x[:5], 0.0)          # nothing under the bar: nothing learned
    assert (learned2 == 0).all()


def test_non_finite_sample_refused_state_bytes_unchanged():
    x, t = _data(50, 8, 2)
    c = native.NativeOSELM(8, 2, 10)
    for i in range(50):
        c.learn_one(x[i], t[i])
    before_P, before_b = c.P_.copy(), c.beta_.copy()
    for bad in (np.nan, np.inf):
        xb = x[0].copy()
        xb[2] = bad
        assert c.learn_one(xb, t[0]) is False
        assert c.learn_one(x[0], [bad, 0.0]) is False
    np.testing.assert_array_equal(c.P_, before_P)
    np.testing.assert_array_equal(c.beta_, before_b)
    lin = native.NativeOSELM(3, 1, 4, activation="identity")
    P0 = lin.P_.copy()
    assert lin.learn_one([1e30, 1e30, 1e30], [1.0]) is False    # h'Ph overflows: would poison P
    np.testing.assert_array_equal(lin.P_, P0)
    z = np.vstack([x[:2], np.full((1, 8), np.nan)])
    ae = native.NativeOSELM(8, 8, 10)
    err, learned = ae.ae_stream(z, 1e30)
    assert np.isnan(err[2]) and learned.tolist() == [1, 1, 2]


def test_state_size_comes_from_C_and_the_header_is_checked():
    lib = native.library()
    c = native.NativeOSELM(512, 512, 64, keep_weights=False)
    size = lib.et_oselm_state_size(ctypes.byref(c.cfg))
    assert size == c.nbytes and size >= 4 * (64 * 64 + 64 * 512)
    assert lib.et_oselm_check(c.state.ctypes.data, c.state.nbytes) == 0
    assert lib.et_oselm_check(c.state.ctypes.data, c.state.nbytes - 16) != 0   # a short buffer
    bad = c.state.copy()
    bad.view(np.uint32)[0] ^= 1                                               # the magic
    assert lib.et_oselm_check(bad.ctypes.data, bad.nbytes) != 0
    before = c.checksum()
    c.learn_one(np.ones(512), np.ones(512))
    assert c.checksum() != before
    with pytest.raises(UsageError, match="invalid OS-ELM configuration"):
        native.NativeOSELM(4, 4, 0)
    with pytest.raises(DataError, match="must have 4 values"):
        native.NativeOSELM(4, 4, 3).learn_one(np.ones(3), np.ones(4))


def test_native_detector_scores_like_the_python_detector():
    from edgetune import AnomalyDetector

    r = np.random.default_rng(0)
    x = np.abs(r.normal(size=(400, 20))) + 0.1
    det = AnomalyDetector(transform="log", n_hidden=16).fit(x)
    q = np.abs(r.normal(size=(30, 20))) + 0.1
    expected = det.score_samples(q[:1])
    s, learned = native.NativeDetector(det).stream(q)
    np.testing.assert_allclose(s[0], expected[0], rtol=1e-4)


@pytest.mark.parametrize("sanitize", [False, True])
def test_c_program_warning_free_and_sanitizer_clean(tmp_path, sanitize):
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("gcc not found: install the Debian package gcc")
    root = Path(__file__).resolve().parent.parent
    core = root / "edgetune" / "core"
    flags = ["-std=c99", "-O2", "-ffp-contract=fast", "-fno-wrapv", "-Wall", "-Wextra", "-Werror", f"-I{core}"]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    exe = tmp_path / "test_oselm"
    r = subprocess.run([cc, *flags, str(root / "tests" / "c" / "test_oselm.c"), str(core / "et_oselm.c"),
                        str(core / "et_kernels.c"), "-lm", "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("passed, 0 failed")
