"""Shared fixtures: small float64 models for exact checks, and the real data location."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetune import Backbone

# Tests read the real data sets from ../shared/data beside the repository.
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"the shared data sets are expected at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """Parsed data caches go to a temporary folder shared by one test module, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        mp.delenv("EDGETUNE_DATA", raising=False)
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def small_backbone(sizes=(7, 5, 4, 3), activation="relu", dtype=np.float64, seed=0) -> Backbone:
    return Backbone.build(list(sizes), activation=activation, seed=seed, dtype=dtype)


def toy_task(n=60, d=7, classes=3, seed=0, shift=0.0):
    """Linearly separable-ish toy data; ``shift`` moves it away from the pre-training domain."""
    r = np.random.default_rng(seed)
    centers = r.normal(size=(classes, d)) * 2
    y = r.integers(0, classes, n)
    x = centers[y] + r.normal(size=(n, d)) + shift
    return x.astype(np.float32), y
