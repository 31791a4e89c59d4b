"""AnomalyDetector.learn_many: the stream loop in C gives learn_one's results."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from edgetune import AnomalyDetector
from edgetune.errors import DataError, UsageError

native = pytest.importorskip("edgetune.stream.native", reason="needs the compiled engine")


def _normal(n, d=6, seed=0):
    r = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(3, d))
    return r.normal(size=(n, 3)) @ mix + 0.1 * r.normal(size=(n, d))


def _stream():
    """Normal rows, a few far ones, a NaN and an inf row, then a moved room."""
    s = np.vstack([_normal(120, seed=8), _normal(10, seed=4) + 6.0, _normal(60, seed=5),
                   _normal(250, seed=9) * 0.5 + 3.0])
    s[17, 2] = np.nan
    s[40, 0] = np.inf
    return s


def _one_by_one(det, x):
    outs = [det.learn_one(row) for row in x]
    return {"score": np.array([np.nan if o["score"] is None else o["score"] for o in outs]),
            "alarm": np.array([bool(o["alarm"]) for o in outs]),
            "drift": np.array([o["drift"] for o in outs]),
            "learned": np.array([o["learned"] for o in outs]),
            "refused": np.array([bool(o.get("refused")) for o in outs]),
            "environment": np.array([-1 if o["environment"] is None else o["environment"] for o in outs]),
            "relearning": np.array(["relearning" in o for o in outs])}


@pytest.mark.parametrize("relearn", ["confirm", "auto"])
@pytest.mark.parametrize("transform", ["none", "log"])
def test_c_stream_gives_learn_one_results(relearn, transform):
    shift = 8.0 if transform == "log" else 0.0       # log takes non-negative inputs
    x = _stream() + shift
    ref = AnomalyDetector(n_hidden=24, relearn=relearn, relearn_samples=60, transform=transform).fit(
        _normal(400) + shift)
    ref.adapt(_normal(200, seed=3) * 0.8 + shift)     # two environments scored per sample
    c = copy.deepcopy(ref)
    want = _one_by_one(ref, x)
    got = {}
    for part in (x[:100], x[100:101], x[101:]):       # across calls: the state carries over
        o = c.learn_many(part, engine="c")
        got = {k: np.concatenate([got[k], o[k]]) if k in got else o[k] for k in o}
    for k in ("alarm", "drift", "learned", "refused", "environment", "relearning"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert want["drift"].sum() == 1 and want["learned"].sum() > 100 and want["refused"].sum() == 2
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-4, atol=1e-5, equal_nan=True)
    assert (c.n_learned_, c.n_refused_) == (ref.n_learned_, ref.n_refused_)
    assert len(c.environments_) == len(ref.environments_) == (3 if relearn == "auto" else 2)
    for a, b in zip(c.environments_, ref.environments_):
        assert a.model.n_updates_ == b.model.n_updates_
        assert np.abs(a.model.beta_ - b.model.beta_).max() <= 1e-3 * np.abs(b.model.beta_).max()
        assert np.abs(a.model.P_ - b.model.P_).max() <= 1e-3 * np.abs(b.model.P_).max()
    assert c._drift.state()["n_detections"] == ref._drift.state()["n_detections"]
    q = _normal(30, seed=11) + shift                   # the state copied back scores as the reference
    np.testing.assert_allclose(c.score_samples(q), ref.score_samples(q), rtol=1e-3, atol=1e-4)


def test_a_flagged_sample_is_never_learned_in_c():
    det = AnomalyDetector(n_hidden=16, learn_below=0.8).fit(_normal(300))
    x = np.vstack([_normal(50, seed=2), _normal(50, seed=3) + 5.0])
    o = det.learn_many(x, engine="c")
    assert o["learned"].sum() > 20
    assert not np.any(o["learned"] & (o["score"] < -0.8))
    assert np.all(o["alarm"] == (o["score"] < -1.0))


def test_numpy_engine_and_bad_input():
    det = AnomalyDetector(n_hidden=16).fit(_normal(300))
    o = det.learn_many(_normal(5, seed=1), engine="numpy")
    assert o["score"].shape == (5,)
    with pytest.raises(UsageError, match="engine"):
        det.learn_many(_normal(5), engine="gpu")
    with pytest.raises(DataError, match="features"):
        det.learn_many(np.zeros((3, 4)))
    log = AnomalyDetector(n_hidden=16, transform="log").fit(np.abs(_normal(300)))
    with pytest.raises(DataError, match="non-negative"):
        log.learn_many(-np.abs(_normal(3)))
    with pytest.raises(UsageError, match="not fitted"):
        AnomalyDetector().learn_many(_normal(3))


@pytest.mark.parametrize("relearn", ["confirm", "auto"])
def test_learn_rows_gives_learn_ones_dicts(relearn):
    """learn_rows (what 'edgetune detect stream' calls on the lines read together): learn_one's
    dict per row, keys included (relearning counts, new_environment), in chunks of any size."""
    x = _stream()
    ref = AnomalyDetector(n_hidden=24, relearn=relearn, relearn_samples=60).fit(_normal(400))
    c = copy.deepcopy(ref)
    want = [ref.learn_one(row) for row in x]
    got = []
    for lo, hi in ((0, 1), (1, 100), (100, 101), (101, 250), (250, len(x))):
        got += c.learn_rows(x[lo:hi], engine="c")
    assert len(got) == len(want)
    assert sum(o["drift"] for o in want) == 1 and sum(bool(o.get("refused")) for o in want) == 2
    assert (relearn == "auto") == any("new_environment" in o for o in want)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
        assert (a["score"] is None) == (b["score"] is None)
        if b["score"] is not None:
            assert abs(a["score"] - b["score"]) <= 1e-4 * max(1.0, abs(b["score"]))
    assert (c.n_learned_, c.n_refused_) == (ref.n_learned_, ref.n_refused_)
    assert len(c.environments_) == len(ref.environments_)
    assert c.learn_rows(_normal(3, seed=12), engine="numpy")[0].keys() == want[0].keys()
    with pytest.raises(UsageError, match="engine"):
        c.learn_rows(_normal(3), engine="gpu")
