"""AnomalyDetector: scikit-learn's novelty conventions, thresholds from normal data, drift."""
from __future__ import annotations

import numpy as np
import pytest

from edgetune import AnomalyDetector
from edgetune.errors import DataError, ModelFileError, UsageError
from edgetune.stream.drift import PageHinkley
from edgetune.stream.metrics import pauc, roc_auc


def _normal(n, d=6, seed=0):
    r = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(3, d))     # data on a 3-dim subspace + noise
    return r.normal(size=(n, 3)) @ mix + 0.1 * r.normal(size=(n, d))


def test_conventions_match_scikit_learn_on_a_toy_case():
    from sklearn.neighbors import LocalOutlierFactor

    x = _normal(500)
    inl = _normal(50, seed=1)
    outl = _normal(50, seed=2) + 4.0
    q = np.vstack([inl, outl])
    ours = AnomalyDetector(n_hidden=32).fit(x)
    lof = LocalOutlierFactor(novelty=True).fit(x)
    for det in (ours, lof):
        s, d, p = det.score_samples(q), det.decision_function(q), det.predict(q)
        assert s.shape == d.shape == p.shape == (100,)
        np.testing.assert_allclose(d, s - det.offset_)          # decision = score_samples - offset_
        assert set(np.unique(p)) <= {-1, 1}
        np.testing.assert_array_equal(p, np.where(d < 0, -1, 1))  # 0 is an inlier
        assert s[50:].mean() < s[:50].mean()                      # higher is more normal
        assert (p[50:] == -1).all()                              # far points are outliers
    assert (ours.predict(inl) == lof.predict(inl)).mean() > 0.8


def test_auc_and_pauc_equal_scikit_learn():
    from sklearn.metrics import roc_auc_score

    r = np.random.default_rng(3)
    y = r.integers(0, 2, 400)
    s = np.round(r.normal(size=400) + y, 1)  # rounded: many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pauc(y, s, 0.1) == pytest.approx(roc_auc_score(y, s, max_fpr=0.1), abs=1e-12)


@pytest.mark.parametrize("method", ["quantile", "gamma", "ksigma"])
def test_threshold_from_normal_data_gives_the_stated_false_positive_rate(method):
    x = _normal(3000)
    held_out = _normal(4000, seed=5)
    for fpr in (0.05, 0.1):
        det = AnomalyDetector(n_hidden=16, threshold=method, fpr=fpr).fit(x)
        measured = (det.predict(held_out) == -1).mean()
        if method == "quantile":   # distribution-free: the stated rate
            assert abs(measured - fpr) <= 0.02, (method, fpr, measured)
        else:  # a gamma or normal shape assumed for right-skewed errors: fewer alarms than stated
            assert fpr / 4 <= measured <= fpr + 0.02, (method, fpr, measured)


def test_anomalies_are_never_learned_as_normal():
    x = _normal(400)
    det = AnomalyDetector(n_hidden=16).fit(x)
    env = det.environments_[0]
    before = env.model.get_state()
    outl = _normal(30, seed=2) + 5.0
    assert (det.predict(outl) == -1).all()
    det.partial_fit(outl)
    assert np.array_equal(before["P"], env.model.P_) and det.n_learned_ == 0
    for row in outl:
        assert det.learn_one(row)["learned"] is False
    assert np.array_equal(before["beta"], env.model.beta_)
    det.partial_fit(_normal(40, seed=7))
    assert det.n_learned_ > 30


def test_adapt_keeps_the_old_environment():
    x_old = _normal(400)
    x_new = _normal(400, seed=3) * 0.5 + 3.0
    det = AnomalyDetector(n_hidden=16).fit(x_old)
    assert (det.predict(_normal(200, seed=4) * 0.5 + 3.0) == -1).mean() > 0.9
    det.adapt(x_new)
    assert (det.predict(_normal(200, seed=4) * 0.5 + 3.0) == 1).mean() > 0.85
    assert (det.predict(_normal(200, seed=6)) == 1).mean() > 0.85     # the old room


def test_page_hinkley_fires_once_on_a_shift_and_not_on_a_burst():
    r = np.random.default_rng(0)
    ph = PageHinkley(threshold=50.0)
    quiet = np.abs(r.normal(0.5, 0.2, 400))
    fired = [ph.update(v) for v in quiet]
    assert not any(fired)
    burst = [ph.update(4.0) for _ in range(10)] + [ph.update(v) for v in quiet[:200]]
    assert not any(burst)
    shift = [ph.update(v) for v in np.abs(r.normal(3.0, 0.5, 300))]
    assert sum(shift) == 1 and shift.index(True) < 40


def test_stream_learns_detects_the_move_and_relearns():
    x_old = _normal(400)
    det = AnomalyDetector(n_hidden=16, relearn="auto", relearn_samples=60).fit(x_old)
    stream = np.vstack([_normal(150, seed=8), _normal(300, seed=9) * 0.5 + 3.0])
    outs = [det.learn_one(row) for row in stream]
    drifts = [i for i, o in enumerate(outs) if o["drift"]]
    assert len(drifts) == 1 and 150 <= drifts[0] < 200
    assert len(det.environments_) == 2
    tail = outs[drifts[0] + 61 + 20:]
    assert np.mean([o["alarm"] for o in tail]) < 0.2
    nan = det.learn_one(np.full(6, np.nan))
    assert nan["refused"] and nan["learned"] is False


def test_save_and_load_give_the_same_detector(tmp_path):
    x = _normal(300)
    det = AnomalyDetector(n_hidden=16, seed=3).fit(x)
    det.adapt(_normal(200, seed=3) + 1)
    det.save(tmp_path / "d")
    back = AnomalyDetector.load(tmp_path / "d")
    q = _normal(50, seed=9)
    np.testing.assert_array_equal(back.score_samples(q), det.score_samples(q))
    blob = tmp_path / "d" / "detector.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        AnomalyDetector.load(tmp_path / "d")


def test_backbone_kind_reads_hidden_features(tmp_path):
    from tests.conftest import small_backbone

    bb = small_backbone((6, 12, 12, 2))
    det = AnomalyDetector("backbone", backbone=bb, n_hidden=16).fit(_normal(300))
    q = np.vstack([_normal(50, seed=1), _normal(50, seed=2) + 5])
    s = det.score_samples(q)
    assert s[:50].mean() > s[50:].mean()
    det.save(tmp_path / "d")
    np.testing.assert_array_equal(AnomalyDetector.load(tmp_path / "d").score_samples(q), s)
    small_backbone((6, 12, 12, 2), seed=5).save(tmp_path / "d" / "backbone")   # another backbone
    with pytest.raises(ModelFileError, match="digest differs"):
        AnomalyDetector.load(tmp_path / "d")


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(UsageError, match="fpr must be"):
        AnomalyDetector(fpr=0.7).fit(_normal(50))
    with pytest.raises(UsageError, match="kind must be"):
        AnomalyDetector("nope").fit(_normal(50))
    with pytest.raises(UsageError, match="backbone="):
        AnomalyDetector("backbone").fit(_normal(50))
    with pytest.raises(UsageError, match="not fitted"):
        AnomalyDetector().predict(_normal(5))
    with pytest.raises(DataError, match="NaN or inf"):
        AnomalyDetector().fit(np.full((50, 3), np.nan))
    with pytest.raises(DataError, match="at least 10"):
        AnomalyDetector().fit(_normal(5))
    det = AnomalyDetector().fit(_normal(50))
    with pytest.raises(DataError, match="fitted on 6"):
        det.score_samples(np.zeros((2, 4)))
    with pytest.raises(DataError, match="non-negative"):
        AnomalyDetector(transform="log").fit(_normal(50))


@pytest.mark.slow
def test_fan_damage1_noisy_on_the_real_data(data_dir, private_cache):
    from edgetune.data.anomaly import load_anomaly_task

    t = load_anomaly_task("fan-damage1-noisy", data_dir)
    assert t.x_train.shape == (235, 512) and t.y_test.sum() == 235
    det = AnomalyDetector(transform="log").fit(t.x_train)
    assert roc_auc(t.y_test, -det.score_samples(t.x_test)) > 0.95
    m = load_anomaly_task("fan-damage1-move", data_dir)
    assert m.x_adapt.shape == (235, 512) and "silent" in m.extra_tests
