"""Every method's hand-written backward pass against PyTorch autograd, in float64.

The same model is written a second time in torch, directly from each method's math
(not through edgetune.torch), and autograd's gradients of the same loss must match
``method.params.grads`` for every trainable tensor.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgetune import make_method
from edgetune.nn.losses import softmax_cross_entropy

from .conftest import small_backbone

torch = pytest.importorskip("torch")

SEVEN = ["ft-all", "ft-last", "ft-bias", "lora-all", "lora-last", "skip-lora", "skip2-lora"]
TORCH_ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
             "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01), "identity": lambda z: z}


def torch_logits(method, x: np.ndarray, p: dict) -> "torch.Tensor":
    """The method's logits from its own definition, with ``p`` the trainable torch leaves."""
    bb = method.backbone
    act = TORCH_ACT[bb.activation.name]
    s = method.options.scale
    n = bb.n_layers
    const = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731
    h = const(x)
    inputs = []
    for k in range(n):
        # A trained weight is stored transposed, (in, out), as layers.K.weight_t.
        w = p[f"layers.{k}.weight_t"].T if f"layers.{k}.weight_t" in p else const(bb.weights[k])
        b = p.get(f"layers.{k}.bias", const(bb.biases[k]))
        inputs.append(h)
        z = h @ w.T + b
        if f"layers.{k}.lora_A" in p:  # LoRA beside layer k: W + s B A
            z = z + s * ((h @ p[f"layers.{k}.lora_A"].T) @ p[f"layers.{k}.lora_B"].T)
        h = z if k == n - 1 else act(z)
    logits = h
    if "skip.lora_A" in p:  # skip adapters: z_n + s * sum_k B_k A_k h_{k-1}, stacked
        taps = torch.cat(inputs, dim=1)
        logits = logits + s * ((taps @ p["skip.lora_A"].T) @ p["skip.lora_B"].T)
    if "head.bias_delta" in p:
        logits = logits + p["head.bias_delta"]
    return logits


def check_against_autograd(method, x, y, rng):
    # Non-zero adapter weights (B = 0 at init would make some gradients trivially zero).
    method.params.flat[...] = rng.normal(scale=0.5, size=method.params.flat.shape)
    for name, mask in method.params.masks.items():
        method.params[name][...] *= mask
    ids = rng.permutation(len(x))
    if hasattr(method, "begin_fit"):
        method.begin_fit(x)
    logits = method.forward(x, ids)
    loss, g = softmax_cross_entropy(logits, y[ids])
    method.params.grad[...] = np.nan
    method.backward(g)
    method.end_fit()

    p = {k: torch.tensor(np.array(v), dtype=torch.float64, requires_grad=True)
         for k, v in method.params.values.items()}
    t_logits = torch_logits(method, x[ids], p)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(y[ids]).long())
    t_loss.backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    assert set(method.params.grads) == set(p), "the torch model must cover every trainable tensor"
    for name, grad in method.params.grads.items():
        want = p[name].grad.numpy()
        if name in method.params.masks:  # structural zeros never train
            want = want * method.params.masks[name]
        np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-13, err_msg=f"{method.name}: {name}")


@pytest.mark.parametrize("name", SEVEN)
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("train_last_bias", [False, True])
def test_gradients_equal_autograd(name, rank, train_last_bias):
    rng = np.random.default_rng(7)
    bb = small_backbone()
    x = rng.normal(size=(13, 7))
    y = rng.integers(0, 3, 13)
    method = make_method(name, bb, seed=3, rank=rank, alpha=1.5 * rank if rank == 2 else None,
                         train_last_bias=train_last_bias)
    check_against_autograd(method, x, y, rng)


def check_activation(name, activation):
    rng = np.random.default_rng(11)
    bb = small_backbone(sizes=(6, 5, 5, 4, 3), activation=activation)
    x = rng.normal(size=(9, 6))
    y = rng.integers(0, 3, 9)
    check_against_autograd(make_method(name, bb, seed=1, rank=2, train_last_bias=True), x, y, rng)


@pytest.mark.parametrize("name", ["ft-all", "lora-all"])
@pytest.mark.parametrize("activation", ["leaky_relu", "tanh", "sigmoid", "identity"])
def test_layerwise_gradients_other_activations(name, activation):
    check_activation(name, activation)


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh", "sigmoid", "identity"])
def test_skip_gradients_other_activations(activation):
    check_activation("skip-lora", activation)


def test_torch_model_is_independent_of_the_method():
    """The reference is not vacuous: a wrong gradient is caught."""
    rng = np.random.default_rng(0)
    bb = small_backbone()
    x, y = rng.normal(size=(8, 7)), rng.integers(0, 3, 8)
    method = make_method("lora-all", bb, seed=0, rank=2)
    original = method.backward

    def broken(g):
        original(g)
        method.params.grads["layers.0.lora_A"][0, 0] += 1e-6
    method.backward = broken
    with pytest.raises(AssertionError):
        check_against_autograd(method, x, y, rng)
