"""edgetune.torch.skip2lora: Skip2-LoRA on any nn.Module, and skip_head deployment."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import UsageError

from .conftest import small_backbone

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from edgetune.torch import skip2lora, skip_head, to_torch  # noqa: E402


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def randomise_b(wrapped, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in wrapped.lora_B:
            b.weight.copy_(torch.randn(b.weight.shape, generator=g, dtype=b.weight.dtype))


def test_wrapped_equals_unwrapped_before_training():
    model = mlp()
    x = torch.randn(11, 7)
    want = model(x)
    w = skip2lora(model, rank=2)
    assert w.tap_names == ["0", "2", "4"] and w.in_widths == [7, 6, 5] and w.out_features == 3
    assert torch.equal(w(x), want)
    assert torch.equal(w(x, index=torch.arange(11)), want)
    assert all(not p.requires_grad for p in model.parameters())
    assert {n for n, p in w.named_parameters() if p.requires_grad} == {
        f"lora_{ab}.{k}.weight" for ab in "AB" for k in range(3)}
    for k, a in enumerate(w.lora_A):  # PEFT's kaiming-uniform(a=sqrt(5)) bound is 1/sqrt(in)
        assert a.weight.abs().max() <= 1 / np.sqrt(w.in_widths[k])
        assert a.weight.abs().max() > 0


def test_gradients_equal_autograd_of_the_written_out_formula():
    model = mlp(torch.float64)
    w = skip2lora(model, rank=2, alpha=3.0, train_last_bias=True, seed=1)
    randomise_b(w)
    x = torch.randn(9, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    nn.functional.cross_entropy(w(x), y).backward()
    # The same thing written by hand from the definition.
    leaves = [p.detach().clone().requires_grad_(True) for p in (*[a.weight for a in w.lora_A],
                                                                 *[b.weight for b in w.lora_B], w.bias)]
    a_s, b_s, bias = leaves[:3], leaves[3:6], leaves[6]
    h0 = x
    h1 = torch.relu(model[0](h0))
    h2 = torch.relu(model[2](h1))
    z = model[4](h2)
    logits = z + bias + 1.5 * sum(h @ a.T @ b.T for h, a, b in zip((h0, h1, h2), a_s, b_s))
    nn.functional.cross_entropy(logits, y).backward()
    got = [*[a.weight.grad for a in w.lora_A], *[b.weight.grad for b in w.lora_B], w.bias.grad]
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-12, atol=1e-14)


def test_matches_edgetune_skip_lora():
    """Same backbone, same adapters: the torch wrapper and edgetune's skip-lora agree."""
    bb = small_backbone(sizes=(7, 6, 5, 3))
    method = et.make_method("skip-lora", bb, seed=2, rank=2, alpha=4, train_last_bias=True)
    rng = np.random.default_rng(3)
    method.params.flat[...] = rng.normal(size=method.params.flat.shape)
    method.params["skip.lora_A"][...] *= method.params.masks["skip.lora_A"]
    w = skip2lora(to_torch(bb), rank=2, alpha=4, train_last_bias=True)
    t = method.adapter_tensors()
    with torch.no_grad():
        for k in range(3):
            w.lora_A[k].weight.copy_(torch.from_numpy(t[f"skip.{k}.lora_A"]))
            w.lora_B[k].weight.copy_(torch.from_numpy(t[f"skip.{k}.lora_B"]))
        w.bias.copy_(torch.from_numpy(t["head.bias_delta"]))
    x = rng.normal(size=(10, 7))
    y = rng.integers(0, 3, 10)
    ids = np.arange(10)
    logits = method.forward(x, ids)
    loss, g = et.nn.losses.softmax_cross_entropy(logits, y)
    method.backward(g)
    t_logits = w(torch.from_numpy(x), index=torch.from_numpy(ids))
    np.testing.assert_allclose(t_logits.detach().numpy(), logits, rtol=1e-12, atol=1e-13)
    nn.functional.cross_entropy(t_logits, torch.from_numpy(y)).backward()
    mask = method.params.masks["skip.lora_A"]
    r, offs = 2, method.offsets
    for k in range(3):
        ga = method.params.grads["skip.lora_A"][k * r:(k + 1) * r, offs[k]:offs[k + 1]]
        np.testing.assert_allclose(w.lora_A[k].weight.grad.numpy(), ga, rtol=1e-10, atol=1e-13)
        gb = method.params.grads["skip.lora_B"][:, k * r:(k + 1) * r]
        np.testing.assert_allclose(w.lora_B[k].weight.grad.numpy(), gb, rtol=1e-10, atol=1e-13)
    assert mask.sum() == sum(r * wd for wd in (7, 6, 5))
    np.testing.assert_allclose(w.bias.grad.numpy(), method.params.grads["head.bias_delta"], rtol=1e-12)


class Indexed(Dataset):
    """What the docs recommend: the data set returns each sample's index."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def train(cache: bool, epochs=4, seed=0):
    torch.manual_seed(123)
    x = torch.randn(64, 7)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = mlp(seed=seed)
    w = skip2lora(model, rank=2, cache=cache, seed=0)
    opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(Indexed(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(epochs):
        total = 0.0
        for xb, yb, ib in loader:
            loss = nn.functional.cross_entropy(w(xb, index=ib), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        losses.append(total / len(x))
    return losses, w


def test_cache_on_and_off_give_the_same_losses_with_a_dataloader():
    with_cache, w1 = train(cache=True)
    without, w0 = train(cache=False)
    assert with_cache[-1] < with_cache[0]  # it learns
    np.testing.assert_allclose(with_cache, without, rtol=1e-6)
    assert w1.backbone_calls == 4 and w1.cache_hits == 3 * 64 and w1.cache_misses == 64
    assert w0.backbone_calls == 16 and w0.cache_hits == 0
    assert w1.cache_nbytes >= 64 * (7 + 6 + 5 + 3) * 4


def same(a, b):
    # Cached rows are read through strided views, which may round a matrix product
    # differently in the last bit: equal to float32 rounding, far below a real change.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_cache_is_invalidated_when_the_backbone_changes():
    model = mlp()
    w = skip2lora(model, rank=1)
    randomise_b(w)
    x = torch.randn(5, 7)
    idx = torch.arange(5)
    before = w(x, index=idx)
    w(x, index=idx)
    assert w.cache_hits == 5
    with torch.no_grad():
        model[2].weight.mul_(2.0)  # an in-place change: the version counter moves
    after = w(x, index=idx)
    same(after, w(x))
    assert (after - before).abs().max() > 0.01
    assert w.cache_invalidations == 1
    model[4].weight = nn.Parameter(torch.randn(3, 5), requires_grad=False)  # replaced tensor
    same(w(x, index=idx), w(x))
    assert w.cache_invalidations == 2
    stale = w(x, index=idx)
    with torch.no_grad():
        model[0].bias.data.add_(1.0)  # .data bypasses version counters: invalidate by hand
    assert torch.equal(w(x, index=idx), stale)
    w.invalidate_cache()
    same(w(x, index=idx), w(x))
    assert (w(x) - stale).abs().max() > 0.01


def test_cache_grows_and_mixes_hits_and_misses():
    model = mlp(torch.float64)
    w = skip2lora(model, rank=1)
    randomise_b(w)
    x = torch.randn(40, 7, dtype=torch.float64)
    w(x[:3], index=[0, 1, 2])
    ids = torch.tensor([39, 1, 20, 1])
    same(w(x[ids], index=ids), w(x[ids]))
    assert w.cache_hits == 2 and w.cache_misses == 5


def test_backbone_stays_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    w = skip2lora(model, rank=1).train()
    assert w.training and not model.training
    x = torch.randn(6, 4)
    assert torch.equal(w(x), w(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_taps_on_any_module_with_example_input():
    model = TwoInputs()
    x = torch.randn(3, 3, 4)
    with pytest.raises(UsageError, match="example_input"):
        skip2lora(model, taps=["body.0", "head"])
    w = skip2lora(model, taps=["body.0", "head"], rank=2, example_input=x)
    assert w.in_widths == [12, 5] and w.out_features == 2
    assert torch.equal(w(x), model(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"taps": ["nope"]}, "unknown tap"),
    ({"taps": ["0", "0"]}, "distinct"),
    ({"rank": 0}, "rank"),
    ({"alpha": -1.0}, "alpha"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        skip2lora(mlp(), **kwargs)


def test_bad_index():
    w = skip2lora(mlp())
    x = torch.randn(4, 7)
    with pytest.raises(UsageError, match="entries"):
        w(x, index=[0, 1])
    with pytest.raises(UsageError, match="integer"):
        w(x, index=torch.zeros(4))
    with pytest.raises(UsageError, match=">= 0"):
        w(x, index=[0, 1, 2, -1])


def test_shared_module_tap_is_refused():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    w = skip2lora(model, taps=["0"])
    with pytest.raises(UsageError, match="twice"):
        w(torch.randn(2, 4))


def test_unwrap_removes_hooks():
    model = mlp()
    w = skip2lora(model)
    assert w.unwrap() is model
    assert not model[0]._forward_pre_hooks


# ------------------------------------------------------------------------------ merge
def trained_skip(name="skip2-lora", activation="relu", train_last_bias=True, rank=2):
    rng = np.random.default_rng(4)
    bb = small_backbone(sizes=(7, 6, 5, 3), activation=activation, dtype=np.float32)
    bb.fit_normalizer(rng.normal(1.0, 2.0, size=(30, 7)))
    m = et.make_method(name, bb, seed=0, rank=rank, train_last_bias=train_last_bias)
    m.params.flat[...] = rng.normal(scale=0.3, size=m.params.flat.shape)
    m.params["skip.lora_A"][...] *= m.params.masks["skip.lora_A"]
    return bb, m, rng


@pytest.mark.parametrize("name", ["skip-lora", "skip2-lora"])
def test_skip_head_reproduces_the_method(name):
    bb, m, rng = trained_skip(name)
    head = skip_head(m)
    x = rng.normal(1.0, 2.0, size=(20, 7))
    want = m.predict_logits(bb.prepare(x))
    got = head(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in head.parameters())
    # Only the adapters that cannot fold stay: layers 0 and 1, not the last.
    assert head.tap_names == ["0", "2"]


def test_skip_head_is_a_plain_sequential_when_everything_folds():
    bb, m, rng = trained_skip()
    m.params["skip.lora_B"][:, :4] = 0  # adapters on layers 0 and 1 are zero
    head = skip_head(m)
    assert isinstance(head, nn.Sequential)
    x = rng.normal(size=(9, 7))
    np.testing.assert_allclose(head(torch.from_numpy(x.astype(np.float32))).detach().numpy(),
                               m.predict_logits(bb.prepare(x)), rtol=1e-5, atol=1e-5)


def test_skip_head_refuses_other_methods():
    with pytest.raises(UsageError, match="skip-lora"):
        skip_head(et.make_method("lora-all", small_backbone()))
