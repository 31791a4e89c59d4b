"""The optimizers against their textbook update rules, written out step by step."""
from __future__ import annotations

import numpy as np
import pytest

from edgetune.errors import UsageError
from edgetune.methods.base import ParamStore
from edgetune.optim import make_optimizer


def run(name, steps=5, **kw):
    rng = np.random.default_rng(0)
    store = ParamStore({"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}, np.float64)
    opt = make_optimizer(name, store, 0.1, **kw)
    grads = [rng.normal(size=store.flat.shape) for _ in range(steps)]
    start = store.flat.copy()
    for g in grads:
        store.grad[...] = g
        opt.step()
    return start, grads, store


def test_sgd_with_weight_decay():
    p, grads, store = run("sgd", weight_decay=0.01)
    for g in grads:
        p = p - 0.1 * (g + 0.01 * p)
    np.testing.assert_allclose(store.flat, p, rtol=1e-12)
    # The named views see the same numbers as the flat vector.
    np.testing.assert_array_equal(store["a"].ravel(), store.flat[:6])


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_momentum(wd):
    p, grads, store = run("momentum", momentum=0.8, weight_decay=wd)
    v = np.zeros_like(p)
    for g in grads:
        v = 0.8 * v + g + wd * p
        p = p - 0.1 * v
    np.testing.assert_allclose(store.flat, p, rtol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam(wd):
    p, grads, store = run("adam", steps=7, weight_decay=wd)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g + wd * p
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        p = p - 0.1 * mhat / (np.sqrt(vhat) + 1e-8)
    np.testing.assert_allclose(store.flat, p, rtol=1e-9)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_masked_entries_stay_zero(name):
    mask = np.array([[True, False], [False, True]])
    store = ParamStore({"a": np.eye(2)}, np.float64, masks={"a": mask})
    opt = make_optimizer(name, store, 0.5, weight_decay=0.1)
    for _ in range(4):
        store.grad[...] = np.random.default_rng(1).normal(size=4) * mask.ravel()
        opt.step()
    assert store["a"][0, 1] == 0 and store["a"][1, 0] == 0
    assert store.n_trainable == 2


def test_bad_optimizer_options():
    store = ParamStore({"a": np.zeros(2)}, np.float64)
    with pytest.raises(UsageError):
        make_optimizer("sgd", store, 0.0)
    with pytest.raises(UsageError):
        make_optimizer("momentum", store, 0.1, momentum=1.0)
    with pytest.raises(UsageError):
        make_optimizer("lbfgs", store, 0.1)
