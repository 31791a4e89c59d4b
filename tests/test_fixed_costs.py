"""What a call costs beyond its arithmetic: the backbone key kept between fits, the engine's
structs kept per tuner, partial_fit. Nothing here may weaken the skip-cache's guard: every
way of changing a backbone or the data in place must still drop the rows it made stale."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.cache import BackboneKey, SkipCache, backbone_key
from edgetune.core import load
from edgetune.errors import BudgetError, DataError, UsageError
from edgetune.nn.mlp import Backbone

from .conftest import small_backbone, toy_task

ENGINES = ["numpy", "c"] if load() is not None else ["numpy"]


def _same_rows(cache_rows, want):
    """The C engine's kernels round differently from NumPy's: a stale row is off by far more."""
    np.testing.assert_allclose(cache_rows, want, rtol=1e-5, atol=1e-6)


def _bb(seed: int = 0) -> Backbone:
    return small_backbone(sizes=(7, 16, 16, 3), dtype=np.float32, seed=seed)


def _tuner(bb, engine, **kw):
    opts = dict(epochs=2, batch_size=8, lr=0.1, seed=3, engine=engine)
    opts.update(kw)
    return et.FineTuner(bb, "skip2-lora", **opts)


def _fresh_result(bb, x, y, engine, fits=1):
    """What a tuner that never kept anything computes on ``bb`` now (a copy: no shared state)."""
    t = _tuner(bb.copy(), engine)
    for _ in range(fits):
        t.fit(x, y)
    return t.method.params.flat.copy()


# -- the backbone key -------------------------------------------------------------------
def test_key_hashes_once_while_nothing_changes():
    bb = _bb()
    key = BackboneKey()
    d = key.digest(bb)
    assert d == bb.digest()
    for _ in range(3):
        assert key.digest(bb) == d
    assert key.hashes == 1


def _views_backbone():
    """A backbone whose first weight is a view of a larger base array the caller keeps."""
    bb = _bb()
    base = np.zeros((2,) + bb.weights[0].shape, np.float32)
    base[0] = bb.weights[0]
    w = [base[0]] + [np.array(a) for a in bb.weights[1:]]
    return Backbone(w, [np.array(b) for b in bb.biases], activation="relu"), base


EDITS = {
    "weight in place": lambda bb, base: bb.weights[1].__setitem__((0, 0), bb.weights[1][0, 0] + 0.25),
    "bias in place": lambda bb, base: bb.biases[2].__setitem__(1, bb.biases[2][1] - 0.5),
    "base array through another view": lambda bb, base: base.__setitem__((0, 2, 3), base[0, 2, 3] + 1.0),
    "made writeable again by its owner": None,  # below
    "layer replaced": lambda bb, base: setattr(bb.layers[2], "weight", bb.weights[2] * 1.5),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_every_in_place_edit_of_the_backbone_drops_the_rows(edit, engine):
    bb, base = _views_backbone()
    x, y = toy_task(n=40, shift=0.5)
    if edit == "made writeable again by its owner":
        base.flags.writeable = False    # read-only from the start: still compared, never trusted
        bb.weights[0].flags.writeable = False
    t = _tuner(bb, engine).fit(x, y)
    if edit == "made writeable again by its owner":
        base.flags.writeable = True     # the owner of the memory writes anyway...
        base[0, 0, 0] += 2.0
        base.flags.writeable = False    # ...and makes it read-only again
    else:
        EDITS[edit](bb, base)
    before = backbone_key(bb).hashes
    t.fit(x, y)
    assert backbone_key(bb).hashes == before + 1
    assert t.history_.cache["cache_invalidations"] >= 1
    _same_rows(t.method.cache.data, bb.forward_taps(bb.prepare(x)))
    # the kept engine structs were rebuilt: the second fit is what a fresh tuner computes from
    # the first fit's parameters on the edited backbone
    ref = _tuner(bb.copy(), engine)
    ref.method.params.flat[...] = _first_fit_params(bb, base, x, y, engine, edit)
    ref.fit(x, y)
    np.testing.assert_array_equal(t.method.params.flat, ref.method.params.flat)


def _first_fit_params(bb, base, x, y, engine, edit):
    """Redo the run up to the edit on an untouched copy of the original backbone."""
    orig, _ = _views_backbone()
    return _tuner(orig, engine).fit(x, y).method.params.flat.copy()


def test_key_sees_the_sign_of_a_zero():
    bb = _bb()
    bb.biases[0][0] = 0.0
    key = BackboneKey()
    d = key.digest(bb)
    bb.biases[0][0] = -0.0                          # equal as numbers, other bytes: another digest
    assert key.digest(bb) == bb.digest() != d and key.hashes == 2


def test_a_backbone_nobody_can_write_is_not_compared():
    bb = _bb()
    frozen = Backbone([np.frombuffer(w.tobytes(), np.float32).reshape(w.shape) for w in bb.weights],
                      [np.frombuffer(b.tobytes(), np.float32) for b in bb.biases], activation="relu")
    with pytest.raises(ValueError):
        frozen.weights[0].flags.writeable = True   # NumPy refuses: the memory belongs to bytes
    key = BackboneKey()
    d = key.digest(frozen)
    assert d == bb.digest() and key.digest(frozen) == d and key.hashes == 1
    assert all(key._reference[k] is a for k, a in frozen.tensors().items())  # kept by reference, no copy


@pytest.mark.parametrize("engine", ENGINES)
def test_in_place_edit_of_the_inputs_drops_their_rows(engine):
    bb = _bb()
    x, y = toy_task(n=40, shift=0.5)
    x = x.astype(np.float32)
    t = _tuner(bb, engine).fit(x, y)
    x[5, 1] += 3.0                                  # the same array object, edited
    t.fit(x, y)
    assert t.history_.cache["cache_invalidations"] == 1
    _same_rows(t.method.cache.data, bb.forward_taps(bb.prepare(x)))


@pytest.mark.parametrize("engine", ENGINES)
def test_kept_structs_give_bit_identical_results(engine):
    bb = _bb()
    x, y = toy_task(n=40, shift=0.5)
    kept = _tuner(bb, engine)
    rebuilt = _tuner(bb, engine)
    for _ in range(3):
        kept.fit(x, y)
        rebuilt._kept.clear()                       # nothing kept: every struct built again
        rebuilt.fit(x, y)
    assert kept.history_.engine == engine
    np.testing.assert_array_equal(kept.method.params.flat, rebuilt.method.params.flat)
    np.testing.assert_array_equal(kept.method.params.flat, _fresh_result(bb, x, y, engine, fits=3))
    if engine == "c":
        assert kept._kept["core"][2] is not None


# -- partial_fit -------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_partial_fit_equals_fit_on_the_data_so_far(engine):
    bb = _bb()
    x, y = toy_task(n=45, shift=0.5)
    stream = _tuner(bb, engine)
    ref = _tuner(bb, engine)
    for k, lo in enumerate(range(0, 45, 9)):
        stream.partial_fit(x[lo:lo + 9], y[lo:lo + 9])
        ref.config.epochs, ref.config.seed = 1, 3 + k
        ref.fit(x[:lo + 9], y[:lo + 9])
        np.testing.assert_array_equal(stream.method.params.flat, ref.method.params.flat)
        # the rows of earlier samples are kept: only the new ones go through the backbone
        assert stream.history_.cache["cache_misses"] == 9
    _same_rows(stream.method.cache.data, bb.forward_taps(bb.prepare(x)))


@pytest.mark.parametrize("engine", ENGINES)
def test_one_sample_at_a_time(engine):
    bb = _bb()
    x, y = toy_task(n=30, shift=0.5)
    t = _tuner(bb, engine)
    for i in range(30):
        t.partial_fit(x[i:i + 1], y[i:i + 1])
        assert t.history_.cache["cache_misses"] == 1
    assert t.method.cache.n_samples == 30
    _same_rows(t.method.cache.data, bb.forward_taps(bb.prepare(x)))


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_capacity_oldest_out(engine):
    bb = _bb()
    x, y = toy_task(n=25, shift=0.5)
    t = _tuner(bb, engine, stream_capacity=10)
    for lo in range(0, 25, 5):
        t.partial_fit(x[lo:lo + 5], y[lo:lo + 5])
    mem = t._stream
    assert mem.n == 10
    # slots 0..9 hold samples 20..24 (slots 0-4, the newest) and 15..19 (slots 5-9)
    np.testing.assert_array_equal(mem.x[:10], bb.prepare(np.concatenate([x[20:25], x[15:20]])))
    assert t.method.cache.n_samples == 10
    _same_rows(t.method.cache.data, bb.forward_taps(mem.x[:10]))  # replaced rows recomputed


def test_stream_capacity_reservoir_keeps_a_uniform_sample():
    bb = _bb()
    x, y = toy_task(n=200, shift=0.5)
    kept = np.zeros(200)
    for seed in range(20):
        t = _tuner(bb, "numpy", stream_capacity=20, stream_policy="reservoir", seed=seed, epochs=1)
        t.partial_fit(x, y)
        mem = bb.prepare(x)
        rows = t._stream.x[:20]
        ids = [int(np.flatnonzero((mem == r).all(axis=1))[0]) for r in rows]
        assert len(set(ids)) == 20
        kept[ids] += 1
    # every sample is kept with probability 20/200: the first and the second half equally often
    assert abs(kept[:100].sum() - kept[100:].sum()) < 0.3 * kept.sum()
    _same_rows(t.method.cache.data, bb.forward_taps(t._stream.x[:20]))


def test_partial_fit_refuses_bad_options_and_data():
    bb = _bb()
    x, y = toy_task(n=10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="stream_capacity"):
            et.FineTuner(bb, "skip2-lora", stream_capacity=bad)
    with pytest.raises(UsageError, match="stream_policy"):
        et.FineTuner(bb, "skip2-lora", stream_policy="newest")
    t = et.FineTuner(bb, "skip2-lora")
    t.partial_fit(x, y)
    with pytest.raises(DataError):
        t.partial_fit(x[:, :5], y)
    with pytest.raises(DataError):
        t.partial_fit(x, np.full(len(y), 7))


def test_partial_fit_works_for_methods_without_a_cache():
    bb = _bb()
    x, y = toy_task(n=20, shift=0.5)
    a = et.FineTuner(bb, "lora-all", batch_size=5, seed=1)
    a.partial_fit(x[:10], y[:10]).partial_fit(x[10:], y[10:])
    b = et.FineTuner(bb, "lora-all", batch_size=5, seed=1, epochs=1)
    b.fit(x[:10], y[:10])
    b.config.seed = 2
    b.fit(x, y)
    np.testing.assert_array_equal(a.method.params.flat, b.method.params.flat)


# -- the cache grows -----------------------------------------------------------------------
def test_cache_grow_keeps_rows_and_respects_the_budget():
    c = SkipCache(3, 2, np.float32)
    c.validate(("a", "b"))
    compute = lambda ids: np.stack([ids, ids * 10], axis=1).astype(np.float32)
    c.fetch(np.array([0, 1, 2]), compute)
    c.grow(5)
    assert c.n_samples == c.capacity == 5 and c.filled.tolist() == [True] * 3 + [False] * 2
    np.testing.assert_array_equal(c.data[:3], compute(np.arange(3)))
    assert c.data.flags.c_contiguous and c.data.shape == (5, 2)
    c.grow(6)  # within the doubled buffer: no copy
    assert np.shares_memory(c.data, c._buffer) and c._buffer.shape[0] == 6
    tight = SkipCache(3, 2, np.float32, budget_bytes=40)
    with pytest.raises(BudgetError, match="budget"):
        tight.grow(6)
    part = SkipCache(3, 2, np.float32, budget_bytes=40, overflow="partial")
    part.grow(9)
    assert (part.n_samples, part.capacity) == (9, 5) and part.nbytes <= 40 + 9


def test_key_holds_no_copy_of_the_weights():
    bb = _bb()
    key = BackboneKey()
    key.digest(bb)
    wt = key.transposed_weights(bb, key.digest(bb))
    for k, w in enumerate(bb.weights):
        assert key._reference[f"layers.{k}.weight"] is wt[k]       # compared with the forward's copy
        np.testing.assert_array_equal(wt[k], w.T)
        assert not wt[k].flags.writeable
    held = sum(a.nbytes for k, a in key._reference.items() if "weight" not in k)
    assert held == sum(b.nbytes for b in bb.biases)


def test_int8_backbones_are_hashed_every_call():
    from edgetune.quant import quantize

    x, y = toy_task(n=40, shift=0.5)
    q = quantize(_bb(), x.astype(np.float32))
    key = BackboneKey()
    assert key.digest(q) == key.digest(q) == q.digest() and key.hashes == 2
    q.layers[0].quant.qweight[0, 0] ^= 1
    assert key.digest(q) == q.digest()


# -- start-up: import only what is used -------------------------------------------------------
def test_import_edgetune_loads_only_the_errors_until_a_name_is_used():
    import subprocess
    import sys

    code = ("import sys, edgetune as et; assert 'edgetune.api' not in sys.modules and 'numpy' not in sys.modules; "
            "et.FineTuner; assert 'edgetune.api' in sys.modules; et.quant.quantize; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_cli_builds_only_the_command_it_runs():
    from edgetune.cli import _command_in, build_parser

    assert _command_in(["--threads", "2", "finetune", "--task", "x"]) == "finetune"
    assert _command_in(["--engine", "c", "info"]) == "info"
    assert _command_in(["--help"]) is None and _command_in(["nosuch"]) is None and _command_in([]) is None
    sub = next(a for a in build_parser("info")._actions if a.dest == "command")
    assert list(sub.choices) == ["info"]
    full = next(a for a in build_parser()._actions if a.dest == "command")
    assert "finetune" in full.choices and "info" in full.choices


# -- inputs no one can write are validated once ------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_unwritable_inputs_are_prepared_once_and_results_unchanged(engine, monkeypatch):
    from edgetune.cache import unwritable
    import edgetune.api as api

    bb = _bb()
    x, y = toy_task(n=40, shift=0.5)
    xu, yu = unwritable(x), unwritable(y)
    with pytest.raises(ValueError):
        xu.flags.writeable = True
    calls = []
    real = api.validate_xy
    monkeypatch.setattr(api, "validate_xy", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = _tuner(bb, engine)
    for _ in range(3):
        a.fit(xu, yu)
    assert len(calls) == 1
    b = _tuner(bb, engine)
    for _ in range(3):
        b.fit(x, y)                                   # writable arrays: checked every call
    assert len(calls) == 4
    np.testing.assert_array_equal(a.method.params.flat, b.method.params.flat)


def test_prepared_inputs_follow_the_normalisation():
    from edgetune.cache import unwritable

    bb = _bb()
    x, y = toy_task(n=40, shift=0.5)
    bb.fit_normalizer(x)
    xu, yu = unwritable(x), unwritable(y)
    t = _tuner(bb, "numpy").fit(xu, yu)
    bb.input_mean[0] += 1.0                           # the backbone's normalisation edited in place
    t.fit(xu, yu)
    np.testing.assert_array_equal(t.method.cache.data[:, :7], bb.prepare(x))


# -- the epochs' orders, drawn in C ------------------------------------------------------
def _c_draws(lib, rng, n, count):
    """The orders and the final (state, has_uint32, uinteger) of ``lib``'s et_permutations from
    ``rng``'s state (``rng`` itself untouched)."""
    import ctypes

    from edgetune.core import Pcg64

    st = rng.bit_generator.state
    s, inc = st["state"]["state"], st["state"]["inc"]
    c = Pcg64(s >> 64, s & (2 ** 64 - 1), inc >> 64, inc & (2 ** 64 - 1), st["has_uint32"], st["uinteger"])
    out = np.full((count, n), -1, np.int32)
    assert lib.et_permutations(ctypes.byref(c), n, count, out.ctypes.data) == 0
    return out, ((c.state_hi << 64) | c.state_lo, c.has_uint32, c.uinteger)


def _numpy_draws(rng, n, count):
    out = np.stack([rng.permutation(n) for _ in range(count)]) if n else np.empty((count, 0), np.int64)
    st = rng.bit_generator.state
    return out, (st["state"]["state"], st["has_uint32"], st["uinteger"])


def _generators(seeds):
    """Fresh generators of ``seeds``, and for each seed one with a 32-bit half buffered
    (has_uint32 set: one uint32 drawn) and one advanced by an odd number of such draws."""
    for seed in seeds:
        yield seed, 0
        yield seed, 1
        yield seed, 7


def _pair(seed, skip):
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    if skip:
        a.integers(0, 2 ** 32, size=skip, dtype=np.uint32)
        b.integers(0, 2 ** 32, size=skip, dtype=np.uint32)
    return a, b


@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
@pytest.mark.parametrize("n", [0, 1, 2, 3, 470, 2 ** 16 + 3])
def test_c_permutations_equal_numpys_and_leave_the_same_state(n):
    lib = load()
    seeds = range(30) if n < 1000 else range(3)
    for seed, skip in _generators(seeds):
        a, b = _pair(seed, skip)
        if skip:
            assert a.bit_generator.state["has_uint32"] == skip % 2
        got, got_state = _c_draws(lib, a, n, 3)
        want, want_state = _numpy_draws(b, n, 3)
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, {skip} uint32 drawn before")
        assert got_state == want_state, (seed, skip)


@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
def test_engine_permutations_hand_the_state_back_to_numpy():
    from edgetune.core.engine import permutations

    for seed, skip in _generators(range(10)):
        a, b = _pair(seed, skip)
        got = permutations(a, 470, 5)
        want, _ = _numpy_draws(b, 470, 5)
        assert got.dtype == np.int32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
        assert a.bit_generator.state == b.bit_generator.state
        assert a.random() == b.random() and a.integers(0, 1000) == b.integers(0, 1000)  # NumPy carries on
    # what C does not draw is left to NumPy: another bit generator, a size past int32
    mt = np.random.Generator(np.random.MT19937(0))
    assert permutations(mt, 10, 2) is None
    assert permutations(np.random.default_rng(0), 2 ** 31, 1) is None


def test_epoch_orders_are_numpys_permutations_on_every_path(monkeypatch):
    from edgetune.core import engine
    from edgetune.train import epoch_orders

    for make in (lambda: np.random.default_rng(5), lambda: np.random.Generator(np.random.MT19937(5))):
        a, b = make(), make()
        np.testing.assert_array_equal(epoch_orders(a, 33, 4), np.stack([b.permutation(33) for _ in range(4)]))
        np.testing.assert_array_equal(a.integers(0, 2 ** 62, size=4), b.integers(0, 2 ** 62, size=4))
    monkeypatch.setattr(engine, "permutations", lambda rng, n, count: None)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(epoch_orders(a, 33, 4), np.stack([b.permutation(33) for _ in range(4)]))
    np.testing.assert_array_equal(epoch_orders(a, 5, 2, shuffle=False), [np.arange(5)] * 2)


@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
def test_portable_128_bit_path_draws_the_same(tmp_path):
    """Compilers without 128-bit integers (32-bit microcontrollers) take the 64x64->128 path."""
    import ctypes
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    core_dir = Path(__file__).resolve().parent.parent / "edgetune" / "core"
    lib_path = tmp_path / "librandom_portable.so"
    r = subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                        "-DET_RANDOM_NO_INT128", f"-I{core_dir}", str(core_dir / "et_random.c"), "-o", str(lib_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from edgetune.core import Pcg64

    lib = ctypes.CDLL(str(lib_path))
    lib.et_permutations.argtypes = [ctypes.POINTER(Pcg64), ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    lib.et_permutations.restype = ctypes.c_int32
    for seed, skip in _generators(range(10)):
        a, b = _pair(seed, skip)
        got, got_state = _c_draws(lib, a, 470, 2)
        want, want_state = _numpy_draws(b, 470, 2)
        np.testing.assert_array_equal(got, want)
        assert got_state == want_state


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_fits_are_bit_identical_with_numpys_permutations(engine, method, monkeypatch):
    from edgetune.core import engine as core_engine

    bb = _bb()
    x, y = toy_task(n=45, d=7)

    def run():
        t = et.FineTuner(bb, method, epochs=7, batch_size=8, lr=0.05, seed=11, engine=engine)
        t.fit(x, y)
        t.fit(x, y)  # a second fit on the kept generator
        return t.method.params.flat.copy(), [e.loss for e in t.history_.epochs]

    calls = []
    real = core_engine.permutations
    monkeypatch.setattr(core_engine, "permutations", lambda *a: calls.append(a[1:]) or real(*a))
    drawn_in_c = run()
    assert calls and (load() is None or all(n == 45 for n, _ in calls))
    monkeypatch.setattr(core_engine, "permutations", lambda rng, n, count: None)
    drawn_by_numpy = run()
    np.testing.assert_array_equal(drawn_in_c[0], drawn_by_numpy[0])
    assert drawn_in_c[1] == drawn_by_numpy[1]


# -- predict of a few rows, in C ---------------------------------------------------------
def _numpy_logits(t, x):
    from edgetune.train import predict_logits

    return predict_logits(t.method, t.backbone.prepare(x))


@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
@pytest.mark.parametrize("method", ["skip2-lora", "skip-lora", "lora-all", "ft-all", "lora-last"])
def test_predict_of_a_few_rows_in_c_equals_numpys(method):
    from edgetune.core.engine import Predictor

    x, y = toy_task(n=40, d=7)
    # a pre-trained backbone stores its dense weights as W^T (in, out), the layout every method reads
    bb, _ = et.pretrain(x, y, hidden=[16, 16], epochs=2)
    t = et.FineTuner(bb, method, epochs=3, batch_size=8, lr=0.1, seed=1).fit(x, y)
    for rows in (1, 2, 16):
        got = t.decision_function(x[:rows])
        assert isinstance(t._kept["predict"][2], Predictor)
        want = _numpy_logits(t, x[:rows])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(t.predict(x[:rows]), want.argmax(axis=1))
        np.testing.assert_allclose(t.predict_proba(x[:rows]).sum(axis=1), 1, rtol=1e-6)
    out = t.decision_function(x[:1])
    out[...] = 0  # the caller's array, not the predictor's buffer
    np.testing.assert_allclose(t.decision_function(x[:1]), _numpy_logits(t, x[:1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.decision_function(x[:17]), _numpy_logits(t, x[:17]), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
@pytest.mark.parametrize("edit", ["weight in place", "bias in place", "base array", "replaced weight",
                                  "replaced layer", "adapter in place", "normalisation"])
def test_predict_in_c_sees_every_change(edit):
    bb = _bb()
    bb.input_mean = np.zeros(7, np.float32)
    bb.input_std = np.ones(7, np.float32)
    x, y = toy_task(n=40, d=7)
    t = et.FineTuner(bb, "skip2-lora", epochs=2, batch_size=8, lr=0.1).fit(x, y)
    before = t.decision_function(x[:3])
    layer = bb.layers[0]
    if edit == "weight in place":
        layer.weight[0, :] += 1.0
    elif edit == "bias in place":
        bb.layers[1].bias[:] = 0.5
    elif edit == "base array":
        base = layer.weight.base if layer.weight.base is not None else layer.weight
        base.reshape(-1)[:5] *= -3.0
    elif edit == "replaced weight":
        layer.weight = np.ascontiguousarray(layer.weight * 2.0)
    elif edit == "replaced layer":
        from edgetune.nn.layers import Layer
        bb.layers[1] = Layer(bb.layers[1].spec, np.ascontiguousarray(bb.layers[1].weight[::-1]),
                             bb.layers[1].bias.copy())
    elif edit == "adapter in place":
        t.method.params["skip.lora_B"][...] += 0.25  # (A is block-masked: the engines agree within the blocks)
    else:
        bb.input_mean += 0.5
    after = t.decision_function(x[:3])
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, _numpy_logits(t, x[:3]), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
def test_predict_falls_back_to_numpy_where_c_cannot_read_in_place(monkeypatch):
    bb = _bb()
    x, y = toy_task(n=40, d=7)
    t = et.FineTuner(bb, "skip2-lora", epochs=2, batch_size=8).fit(x, y)
    t.decision_function(x[:1])
    bb.layers[0].weight = np.asfortranarray(bb.layers[0].weight)[:, ::1]  # F-order: read as W^T in place
    np.testing.assert_allclose(t.decision_function(x[:2]), _numpy_logits(t, x[:2]), rtol=1e-6, atol=1e-6)
    bb.layers[0].weight = np.repeat(bb.layers[0].weight, 2, axis=1)[:, ::2]  # strided: C cannot read it
    np.testing.assert_array_equal(t.decision_function(x[:2]), _numpy_logits(t, x[:2]))
    assert t._kept["predict"][2] is None
    numpy_tuner = et.FineTuner(_bb(), "skip2-lora", engine="numpy").fit(x, y)
    np.testing.assert_array_equal(numpy_tuner.decision_function(x[:1]), _numpy_logits(numpy_tuner, x[:1]))
    assert numpy_tuner._kept["predict"][2] is None
    monkeypatch.setenv("EDGETUNE_ENGINE", "numpy")
    t2 = et.FineTuner(_bb(), "skip2-lora").fit(x, y)
    np.testing.assert_array_equal(t2.decision_function(x[:1]), _numpy_logits(t2, x[:1]))


def test_predict_refuses_bad_rows_as_before():
    t = et.FineTuner(_bb(), "skip2-lora", epochs=1)
    x, y = toy_task(n=20, d=7)
    t.fit(x, y)
    bad = x[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(DataError, match="NaN or inf .first at sample 1, feature 3"):
        t.predict(bad)
    with pytest.raises(DataError, match="must have shape"):
        t.predict(x[:2, :5])
    with pytest.raises(DataError, match="must have shape"):
        t.predict(x[0])
    np.testing.assert_array_equal(t.predict(x[:2].astype(np.float64)), t.predict(x[:2]))
    np.testing.assert_array_equal(t.predict(x[:2].tolist()), t.predict(x[:2]))


def test_fast_prepare_is_prepare_bit_for_bit():
    bb = _bb()
    rng = np.random.default_rng(0)
    bb.input_mean = rng.normal(size=7).astype(np.float32)
    bb.input_std = rng.uniform(0.5, 2, size=7).astype(np.float32)
    t = et.FineTuner(bb, "skip2-lora")
    for x in (rng.normal(size=(3, 7)), rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(7, 2)).T):
        want = bb.prepare(x)
        np.testing.assert_array_equal(t._prepare(x), want)
        out = np.empty_like(want)
        assert t._prepare(x, out=out) is out
        np.testing.assert_array_equal(out, want)


# -- what the trainer keeps between fits: the cache struct, the workspace, the epoch chunk --
@pytest.mark.skipif(load() is None, reason="the compiled engine is not built")
def test_kept_runner_shares_the_cache_struct_only_for_the_same_arrays(monkeypatch):
    from edgetune.core.engine import CoreRunner

    calls = []
    run = CoreRunner.run
    monkeypatch.setattr(CoreRunner, "run", lambda self, orders: calls.append(len(orders)) or run(self, orders))
    bb = _bb()
    x, y = toy_task(n=40, shift=0.5)
    t = _tuner(bb, "c", epochs=6)
    t.fit(x, y)
    assert calls == [1, 5]  # a new tuner runs one epoch first, to learn how long one takes
    first = t._kept["runner"]
    assert list(t._kept["chunk"]) == [40] and t._kept["chunk"][40] >= 6  # tiny epochs: many per call
    t.fit(x.copy(), y.copy())  # other arrays, the same cache: the struct and workspace are reused
    assert calls == [1, 5, 6]  # the kept tuner knows: every epoch in one call
    second = t._kept["runner"]
    assert second is not first and second.c_cache is first.c_cache and second.ws is first.ws
    t.fit(x[:30], y[:30])      # another number of samples: a new cache, a new struct
    third = t._kept["runner"]
    assert third.c_cache is not second.c_cache and third.n == 30
    fresh = _tuner(bb.copy(), "c", epochs=6)
    for xs, ys in ((x, y), (x.copy(), y.copy()), (x[:30], y[:30])):
        fresh._kept.clear()
        fresh.fit(xs, ys)
    np.testing.assert_array_equal(t.method.params.flat, fresh.method.params.flat)
    assert t.history_.cache["cache_hits"] == fresh.history_.cache["cache_hits"]
    assert t.history_.cache["cache_misses"] == fresh.history_.cache["cache_misses"]


# -- a fleet device's backbone ------------------------------------------------------------
def test_a_fleet_device_trains_on_a_read_only_copy_with_the_same_results():
    from edgetune.cache import _immutable, unwritable
    from edgetune.fleet.device import DeviceTrainer, TrainSpec, global_tensors, read_only_copy
    from edgetune.fleet.partition import DeviceData

    bb = _bb()
    bb.input_mean, bb.input_std = np.full(7, 0.1, np.float32), np.full(7, 2.0, np.float32)
    x, y = toy_task(n=40, shift=0.5)
    xt, yt = toy_task(n=10, seed=1)
    data = DeviceData(name="d0", x_train=x, y_train=y, x_test=xt, y_test=yt)
    spec = TrainSpec(epochs=3, batch_size=8)
    dev = DeviceTrainer(bb, data, spec)
    assert dev.backbone is not bb and dev.tuner.backbone is dev.backbone
    assert all(_immutable(a) for a in dev.backbone.tensors().values())
    assert dev.backbone.digest() == bb.digest()
    g = global_tensors(bb, spec)
    wires = [dev.train(g)[0] for _ in range(3)]
    prepared = dev.tuner._prepared["training data"]
    assert prepared is not None and prepared[3][0] is dev.backbone.input_mean  # read-only: kept by reference
    dev.train(g)
    assert dev.tuner._prepared["training data"] is prepared  # the samples were prepared once, not every round
    dev.backbone.input_mean = unwritable(dev.backbone.input_mean + 1)  # another normalisation: prepared again
    assert dev.tuner._xy(dev._x, dev._y, "training data")[0] is not prepared[4]
    dev.backbone.input_mean = prepared[3][0]
    same = DeviceTrainer(bb, data, spec)
    same.backbone = bb  # what a device trained on before: the caller's own object
    same.tuner = et.FineTuner(bb, spec.method, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr)
    for wire in wires:
        got = same.train(g)[0]
        assert got.keys() == wire.keys()
        for k in wire:
            np.testing.assert_array_equal(got[k], wire[k])
    bb.layers[0].weight[...] = 0  # the caller's object is theirs: the device's copy is unchanged
    assert dev.backbone.digest() != bb.digest()
    int8_like = read_only_copy(dev.backbone)
    assert int8_like.digest() == dev.backbone.digest()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_release_frees_the_kept_state_and_changes_no_result(engine, method):
    x, y = toy_task(n=40, d=7, classes=3, seed=2)
    x, y = x.astype(np.float32), y
    bb = _bb()
    kept, freed = (_tuner(bb, engine) if method == "skip2-lora" else et.FineTuner(bb, method, epochs=2, batch_size=8,
                                                                                 lr=0.1, seed=3, engine=engine)
                   for _ in range(2))
    for t in (kept, freed):
        t.fit(x, y)
    before = freed.predict_proba(x[:3])
    assert freed.release() is freed
    assert getattr(freed.method, "cache", None) is None and "runner" not in freed._kept
    assert "training data" not in freed._prepared
    np.testing.assert_array_equal(freed.predict_proba(x[:3]), before)  # the adapter is untouched
    for t in (kept, freed):  # the next fit rebuilds what was freed and computes the same
        t.fit(x, y)
    np.testing.assert_array_equal(freed.method.params.flat, kept.method.params.flat)
    if method == "skip2-lora":
        assert freed.method.cache is not None and freed.method.cache.filled.all()
