"""OS-ELM's recursive least squares against a float64 batch ridge solve."""
from __future__ import annotations

import numpy as np
import pytest

from edgetune.errors import DataError, UsageError
from edgetune.stream.oselm import OSELM, input_weights, random_uniform, ridge_oracle


def _data(n=3000, d=10, m=3, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d))
    t = np.tanh(x @ r.normal(size=(d, m))) + 0.1 * r.normal(size=(n, m))
    return x, t


@pytest.mark.parametrize("forgetting", [1.0, 0.995, 0.98])
def test_one_sample_updates_match_batch_ridge(forgetting):
    x, t = _data()
    m = OSELM(10, 3, 24, delta=0.5, forgetting=forgetting, seed=7)
    for i in range(len(x)):
        assert m.learn_one(x[i], t[i])
    beta, P = ridge_oracle(m.hidden(x), t, delta=0.5, forgetting=forgetting)
    assert np.abs(m.beta_ - beta).max() <= 1e-6 * max(1.0, np.abs(beta).max())
    assert np.abs(m.P_ - P).max() <= 1e-6 * max(1.0, np.abs(P).max())


def test_chunks_and_fit_match_batch_ridge():
    x, t = _data(2000)
    beta, P = ridge_oracle(OSELM(10, 3, 24, delta=2.0).hidden(x), t, delta=2.0)
    for chunk in (1, 7, 64):
        m = OSELM(10, 3, 24, delta=2.0).partial_fit(x, t, chunk=chunk)
        np.testing.assert_allclose(m.beta_, beta, atol=1e-6 * np.abs(beta).max())
    m = OSELM(10, 3, 24, delta=2.0).fit(x, t)
    np.testing.assert_allclose(m.beta_, beta, atol=1e-6 * np.abs(beta).max())
    np.testing.assert_allclose(m.P_, P, atol=1e-6 * np.abs(P).max())


@pytest.mark.parametrize("forgetting", [1.0, 0.97])
def test_P_stays_symmetric_positive_definite(forgetting):
    x, t = _data(4000)
    x[2000:] *= 5  # a change of scale mid-stream
    m = OSELM(10, 3, 32, delta=1e-2, forgetting=forgetting)
    for i in range(len(x)):
        m.learn_one(x[i], t[i])
        if i % 500 == 499:
            assert np.abs(m.P_ - m.P_.T).max() <= 1e-9 * np.abs(m.P_).max()
            assert np.linalg.eigvalsh(0.5 * (m.P_ + m.P_.T)).min() > 0


def test_forgetting_keeps_the_regularisation_alive():
    """With plain exponential forgetting, P grows without bound along directions the data never
    excite; here it stays at about 1/delta."""
    r = np.random.default_rng(0)
    m = OSELM(4, 1, 8, delta=1.0, forgetting=0.9, activation="identity")
    x = np.zeros((3000, 4))
    x[:, 0] = r.normal(size=3000)  # only one input direction is ever excited
    for i in range(len(x)):
        assert m.learn_one(x[i], [x[i, 0]])
    assert np.linalg.eigvalsh(m.P_).max() < 10.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_sample_refused_without_changing_state(bad):
    x, t = _data(100)
    m = OSELM(10, 3, 16).partial_fit(x, t)
    before = m.get_state()
    xb = x[0].copy()
    xb[3] = bad
    assert m.learn_one(xb, t[0]) is False
    assert m.learn_one(x[0], [bad, 0, 0]) is False
    after = m.get_state()
    assert np.array_equal(before["P"], after["P"]) and np.array_equal(before["beta"], after["beta"])
    assert after["n_updates"] == before["n_updates"] and after["n_refused"] == before["n_refused"] + 2
    with pytest.raises(DataError, match="NaN or inf"):
        m.partial_fit(np.vstack([x[:3], xb[None]]), t[:4])
    assert np.array_equal(before["P"], m.P_)


def test_sample_that_would_poison_P_is_refused():
    m = OSELM(3, 1, 4, activation="identity", delta=1.0)
    before = m.get_state()
    assert m.learn_one([1e200, 1e200, 1e200], [1.0]) is False   # h^T P h overflows
    assert np.array_equal(before["P"], m.P_) and m.n_refused_ == 1


def test_random_weights_regenerated_from_the_seed():
    a = random_uniform(5, 0, 1000)
    assert a.dtype == np.float32 and a.min() >= -1 and a.max() < 1
    assert abs(a.mean()) < 0.1 and 0.25 < a.var() < 0.42            # uniform on [-1, 1): var 1/3
    np.testing.assert_array_equal(random_uniform(5, 300, 10), a[300:310])  # counter-based
    assert not np.array_equal(random_uniform(6, 0, 1000), a)
    w1, b1 = input_weights(20, 8, 3)
    w2, b2 = input_weights(20, 8, 3)
    assert np.array_equal(w1, w2) and np.array_equal(b1, b2)


def test_closed_form_classifier_head_over_backbone_features():
    """OS-ELM as a classifier head on a frozen backbone's hidden features (skip-cache rows)."""
    from tests.conftest import small_backbone, toy_task

    bb = small_backbone((7, 16, 16, 3))
    x, y = toy_task(n=300, d=7, classes=3)
    taps = bb.forward_taps(bb.prepare(x.astype(np.float64)))
    feats = taps[:, 7:7 + 16 + 16]
    head = OSELM(feats.shape[1], 3, 64, delta=1e-2).fit(feats[:200], np.eye(3)[y[:200]])
    acc = (head.predict(feats[200:]).argmax(axis=1) == y[200:]).mean()
    assert acc > 0.8


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="forgetting"):
        OSELM(3, 1, forgetting=1.5)
    with pytest.raises(UsageError, match="delta"):
        OSELM(3, 1, delta=0)
    with pytest.raises(UsageError, match="n_hidden"):
        OSELM(3, 1, 0)
    with pytest.raises(DataError, match=r"shape \(samples, 3\)"):
        OSELM(3, 1).partial_fit(np.zeros((4, 2)), np.zeros(4))
