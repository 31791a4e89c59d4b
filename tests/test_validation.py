"""Bad input gets a clear error naming the problem."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as hst

import edgetune as et
from edgetune.data.task import validate_xy
from edgetune.errors import DataError, UsageError
from edgetune.train import TrainingDiverged
from edgetune.units import parse_bytes

from .conftest import small_backbone, toy_task


@pytest.fixture
def tuner():
    return et.FineTuner(small_backbone(dtype=np.float32), "skip2-lora", epochs=1)


@pytest.mark.parametrize("x,y,msg", [
    (np.zeros((4, 6)), np.zeros(4, int), r"shape \(samples, 7\)"),
    (np.zeros((4, 7)), np.zeros(3, int), "4 samples but y has 3"),
    (np.zeros((0, 7)), np.zeros(0, int), "empty"),
    (np.full((4, 7), np.nan), np.zeros(4, int), "NaN or inf"),
    (np.zeros((4, 7)), np.array([0, 1, 2, 3]), r"labels must be in 0\.\.2"),
    (np.zeros((4, 7)), np.array([0, -1, 0, 0]), "labels must be"),
    (np.zeros((4, 7)), np.array([0.5, 1, 0, 0]), "whole class indices"),
    (np.zeros(7), np.zeros(1, int), "2-D"),
])
def test_fit_rejects_bad_data(tuner, x, y, msg):
    with pytest.raises(DataError, match=msg):
        tuner.fit(x, y)


def test_unknown_names_and_bad_options():
    bb = small_backbone(dtype=np.float32)
    with pytest.raises(UsageError, match="unknown method 'lora-al'.*lora-all"):
        et.FineTuner(bb, "lora-al")
    with pytest.raises(UsageError, match="rank"):
        et.FineTuner(bb, "lora-all", rank=0)
    with pytest.raises(UsageError, match="lr"):
        et.FineTuner(bb, "lora-all", lr=-1)
    with pytest.raises(UsageError, match="optimizer"):
        et.FineTuner(bb, "lora-all", optimizer="rmsprop")
    with pytest.raises(UsageError, match="epochs"):
        et.FineTuner(bb, "lora-all", epochs=0)
    with pytest.raises(UsageError, match="activation"):
        et.Backbone.build([3, 2], activation="swish")


def test_divergence_restores_parameters():
    bb = small_backbone(dtype=np.float32)
    x, y = toy_task(n=40)
    t = et.FineTuner(bb, "ft-all", epochs=5, lr=1e30)
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        t.fit(x, y)
    assert np.all(np.isfinite(t.method.params.flat))


@settings(max_examples=60, deadline=None)
@given(hst.integers(1, 5), hst.integers(1, 5), hst.integers(2, 4))
def test_validate_xy_accepts_any_good_shape(n, d, classes):
    x = np.random.default_rng(n * d).normal(size=(n, d))
    y = np.arange(n) % classes
    vx, vy = validate_xy(x, y, n_classes=classes)
    assert vx.shape == (n, d) and vy.dtype == np.int64


@pytest.mark.parametrize("text,value", [("256KB", 262144), ("256 kb", 262144), ("1.5MB", 1572864),
                                        ("64KiB", 65536), ("4096", 4096), ("1GB", 1 << 30), ("10b", 10)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["256 parsecs", "-5KB", "", "KB", "1.2.3MB", "ten"])
def test_parse_bytes_rejects(text):
    with pytest.raises(UsageError, match="byte size"):
        parse_bytes(text)


@settings(max_examples=100, deadline=None)
@given(hst.text(max_size=12))
def test_parse_bytes_never_crashes(text):
    try:
        assert parse_bytes(text) >= 0
    except UsageError:
        pass
