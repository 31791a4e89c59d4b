"""Every method's analytic gradient against central finite differences in float64."""
from __future__ import annotations

import numpy as np
import pytest

from edgetune import METHODS, make_method
from edgetune.nn.losses import softmax_cross_entropy

from .conftest import small_backbone


def loss_and_grad(method, x, y, ids):
    logits = method.forward(x, ids)
    loss, g = softmax_cross_entropy(logits, y[ids])
    method.params.grad[...] = np.nan  # every trainable entry must be written by backward
    method.backward(g)
    return loss


def check_method(method, x, y, rng, eps=1e-6):
    # Random non-zero adapter weights, so that no gradient is trivially zero (B = 0 at init).
    method.params.flat[...] = rng.normal(scale=0.5, size=method.params.flat.shape)
    for name, mask in method.params.masks.items():
        method.params[name][...] *= mask
    ids = np.arange(len(x))
    loss_and_grad(method, x, y, ids)
    analytic = method.params.grad.copy()
    assert np.all(np.isfinite(analytic)), "backward left some gradient entries unwritten"
    trainable = method.params.trainable_mask()
    assert np.all(analytic[~trainable] == 0), "structurally-zero entries received a gradient"
    numeric = np.zeros_like(analytic)
    flat = method.params.flat
    for i in np.flatnonzero(trainable):
        old = flat[i]
        flat[i] = old + eps
        lp = softmax_cross_entropy(method.forward(x, ids), y[ids])[0]
        flat[i] = old - eps
        lm = softmax_cross_entropy(method.forward(x, ids), y[ids])[0]
        flat[i] = old
        numeric[i] = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(analytic[trainable], numeric[trainable], rtol=1e-5, atol=1e-8)
    return int(trainable.sum())


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("rank,alpha,last_bias", [(1, None, False), (2, 3.0, True)])
def test_gradient_matches_finite_differences(name, rank, alpha, last_bias, rng):
    bb = small_backbone()
    x = rng.normal(size=(9, 7))
    y = rng.integers(0, 3, 9)
    m = make_method(name, bb, rank=rank, alpha=alpha, train_last_bias=last_bias, seed=3)
    m.begin_fit(x)
    checked = check_method(m, x, y, rng)
    assert checked == m.n_trainable


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "leaky_relu", "identity"])
@pytest.mark.parametrize("name", ["ft-all", "lora-all", "skip-lora"])
def test_gradient_other_activations_and_depths(name, activation, rng):
    bb = small_backbone(sizes=(6, 5, 5, 4, 2), activation=activation)
    x = rng.normal(size=(8, 6))
    y = rng.integers(0, 2, 8)
    m = make_method(name, bb, seed=1)
    check_method(m, x, y, rng)


def test_two_layer_backbone(rng):
    bb = small_backbone(sizes=(4, 3))
    x = rng.normal(size=(5, 4))
    y = rng.integers(0, 3, 5)
    for name in METHODS:
        m = make_method(name, bb, seed=0)
        m.begin_fit(x)
        check_method(m, x, y, rng)


def test_trainable_counts_512_96_96_2():
    bb = small_backbone(sizes=(512, 96, 96, 2), dtype=np.float32)
    counts = {n: make_method(n, bb).n_trainable for n in METHODS}
    assert counts["ft-all"] == bb.n_params == 512 * 96 + 96 + 96 * 96 + 96 + 96 * 2 + 2
    assert counts["ft-last"] == 96 * 2 + 2
    assert counts["ft-bias"] == 96 + 96 + 2
    assert counts["lora-all"] == (512 + 96) + (96 + 96) + (96 + 2)
    assert counts["lora-last"] == 96 + 2
    assert counts["skip-lora"] == counts["skip2-lora"] == (512 + 96 + 96) + 3 * 2


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "identity"])
def test_forward_taps_agree_with_forward(activation, rng):
    """The skip adapters' inputs are the real activations: taps and logits match forward()."""
    bb = small_backbone(sizes=(6, 5, 4, 3), activation=activation)
    x = rng.normal(size=(10, 6)) * 3
    rows = bb.forward_taps(x)
    np.testing.assert_allclose(rows[:, -3:], bb.forward(x), rtol=1e-12)
    h1 = bb.activation.forward(x @ bb.weights[0].T + bb.biases[0])
    np.testing.assert_allclose(rows[:, 6:11], h1, rtol=1e-12)
    if activation != "identity":
        assert not np.allclose(h1, x @ bb.weights[0].T + bb.biases[0])


def test_sigmoid_is_stable_for_large_inputs():
    z = np.array([[-1000.0, -30.0, 0.0, 30.0, 1000.0]])
    from edgetune.nn.activations import get_activation
    h = get_activation("sigmoid").forward(z.copy())
    assert np.all(np.isfinite(h)) and h[0, 0] == 0.0 and h[0, 2] == 0.5 and h[0, 4] == 1.0


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_training_loss_gradient_matches_softmax_cross_entropy(classes, rng):
    """The in-place training gradient (with its two-class shortcut) is the textbook one."""
    from edgetune.nn.losses import SoftmaxCrossEntropyGrad

    logits = rng.normal(size=(7, classes)) * 4
    logits[0, 0] = 800.0                      # extreme margins must not give NaN
    logits[1, -1] = -800.0
    y = rng.integers(0, classes, 7)
    loss, want = softmax_cross_entropy(logits.copy(), y)
    lg = SoftmaxCrossEntropyGrad(classes)
    lg.start_epoch(7, np.dtype(np.float64))
    with np.errstate(over="ignore"):  # exp overflows to inf for the -800 margin, by design (fit() sets this)
        got = lg(logits.copy(), y)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
    assert lg.epoch_loss() == pytest.approx(loss, rel=1e-9)
