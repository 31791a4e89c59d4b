"""AnomalyDetector(bands=B): inputs averaged over B groups of adjacent features."""
from __future__ import annotations

import numpy as np
import pytest

from edgetune import AnomalyDetector
from edgetune.errors import UsageError


def _spectra(n, d=40, seed=0):
    r = np.random.default_rng(seed)
    shape = np.abs(np.random.default_rng(7).normal(size=(3, d)))
    return np.abs(r.normal(size=(n, 3))) @ shape + 0.05 * np.abs(r.normal(size=(n, d)))


def test_bands_are_means_of_adjacent_features_and_shrink_the_state(tmp_path):
    x = _spectra(300)
    det = AnomalyDetector(transform="log", bands=6, n_hidden=8).fit(x)
    e = det.band_edges()
    assert e[0] == 0 and e[-1] == 40 and len(e) == 7 and set(np.diff(e)) <= {6, 7}
    want = np.log(np.stack([x[:, a:b].mean(axis=1) for a, b in zip(e[:-1], e[1:])], axis=1) + 1e-3)
    np.testing.assert_allclose(det._features(x.astype(np.float64)), want, rtol=1e-12)
    env = det.environments_[0]
    assert env.mean.shape == (6,) and env.model.beta_.shape == (8, 6)
    det.save(tmp_path / "d")
    back = AnomalyDetector.load(tmp_path / "d")
    assert back.bands == 6
    q = np.vstack([_spectra(20, seed=1), _spectra(20, seed=2)[:, ::-1]])
    np.testing.assert_array_equal(back.score_samples(q), det.score_samples(q))
    s = det.score_samples(q)
    assert s[:20].mean() > s[20:].mean()


def test_bands_in_c_stream_match_numpy():
    pytest.importorskip("edgetune.stream.native", reason="needs the compiled engine")
    import copy

    x = _spectra(300)
    a = AnomalyDetector(transform="log", bands=5, n_hidden=8).fit(x)
    b = copy.deepcopy(a)
    q = np.vstack([_spectra(60, seed=3), _spectra(10, seed=4)[:, ::-1]])
    ra, rb = a.learn_many(q, engine="numpy"), b.learn_many(q, engine="c")
    np.testing.assert_array_equal(ra["learned"], rb["learned"])
    np.testing.assert_allclose(ra["score"], rb["score"], rtol=1e-4, atol=1e-5)


def test_bad_bands():
    with pytest.raises(UsageError, match="bands"):
        AnomalyDetector(bands=0).fit(_spectra(50))
    with pytest.raises(UsageError, match="bands=50"):
        AnomalyDetector(bands=50).fit(_spectra(50))
