"""edgetune.torch.to_torch / from_torch: exact parameters both ways, clear errors."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import UsageError

from .conftest import small_backbone

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgetune.torch import from_torch, to_torch  # noqa: E402

ACTS = ["relu", "leaky_relu", "tanh", "sigmoid", "identity"]


def assert_same_backbone(a: et.Backbone, b: et.Backbone) -> None:
    assert a.sizes == b.sizes and a.activation.name == b.activation.name and a.dtype == b.dtype
    for u, v in zip([*a.weights, *a.biases], [*b.weights, *b.biases]):
        assert u.dtype == v.dtype and np.array_equal(u, v)  # bit-exact
    for u, v in ((a.input_mean, b.input_mean), (a.input_std, b.input_std)):
        assert (u is None and v is None) or np.array_equal(u, v)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_bit_exact_and_outputs_agree(activation, dtype):
    rng = np.random.default_rng(0)
    bb = small_backbone(sizes=(7, 6, 5, 3), activation=activation, dtype=dtype)
    bb.fit_normalizer(rng.normal(2.0, 3.0, size=(40, 7)))
    seq = to_torch(bb)
    assert isinstance(seq, nn.Sequential)
    assert [n for n, m in seq.named_children() if isinstance(m, nn.Linear)] == ["0", "2", "4"]
    assert_same_backbone(from_torch(seq), bb)
    x = rng.normal(2.0, 3.0, size=(25, 7))
    want = bb.forward(bb.prepare(x))
    got = seq(torch.from_numpy(x.astype(dtype))).detach().numpy()
    assert got.dtype == dtype
    # Two BLAS libraries may sum in different orders: equal to float rounding.
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-13)
    # Re-exporting the re-imported model gives the same state_dict, bit for bit.
    again = to_torch(from_torch(seq)).state_dict()
    for k, v in seq.state_dict().items():
        assert torch.equal(again[k], v)


def test_normalisation_off_gives_plain_sequential_on_prepared_inputs():
    rng = np.random.default_rng(1)
    bb = small_backbone(dtype=np.float32)
    bb.fit_normalizer(rng.normal(size=(30, 7)) * 5)
    seq = to_torch(bb, normalize=False)
    assert type(seq) is nn.Sequential
    x = rng.normal(size=(6, 7)) * 5
    np.testing.assert_allclose(seq(torch.from_numpy(bb.prepare(x))).detach().numpy(),
                               bb.forward(bb.prepare(x)), rtol=1e-5, atol=1e-6)
    back = from_torch(seq)
    assert back.input_mean is None and back.input_std is None


def test_state_dict_carries_normalisation():
    bb = small_backbone(dtype=np.float32)
    bb.fit_normalizer(np.random.default_rng(2).normal(size=(30, 7)))
    sd = to_torch(bb).state_dict()
    assert {"input_mean", "input_std", "0.weight", "0.bias", "4.weight"} <= set(sd)


def test_to_torch_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    to_torch(small_backbone())
    assert torch.equal(torch.rand(3), a)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5, bias=False)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.tanh(self.fc1(x))
        x = self.fc2(x).tanh()
        return self.out(x)


def test_custom_module_forward_chain_is_traced():
    net = Net().double()
    bb = from_torch(net, labels=["a", "b"])
    assert bb.sizes == [4, 6, 5, 2] and bb.activation.name == "tanh" and bb.labels == ["a", "b"]
    assert np.array_equal(bb.biases[1], np.zeros(5))  # bias=False becomes a zero bias
    x = torch.randn(8, 4, dtype=torch.float64)
    np.testing.assert_allclose(bb.forward(x.numpy()), net(x).detach().numpy(), rtol=1e-12, atol=1e-13)


def test_nested_sequential_and_identity():
    m = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.01)), nn.Identity(), nn.Linear(4, 2))
    bb = from_torch(m)
    assert bb.sizes == [3, 4, 2] and bb.activation.name == "leaky_relu"
    bb = from_torch(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    assert bb.activation.name == "identity"


@pytest.mark.parametrize("model, words", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), ["'1'", "GELU"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)), ["'1'", "Dropout"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)), ["negative_slope=0.2"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(1)), ["'3'", "Softmax"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid()), ["'3'", "last Linear"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), ["mixes"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2)), ["two activations"]),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), ["start with nn.Linear"]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)), ["takes 5 inputs"]),
    (lambda: nn.Sequential(nn.Conv1d(1, 1, 3)), ["Conv1d"]),
])
def test_unsupported_models_raise_usage_error_naming_the_layer(model, words):
    with pytest.raises(UsageError) as e:
        from_torch(model())
    for w in words:
        assert w in str(e.value)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


def test_non_chain_forward_is_refused():
    with pytest.raises(UsageError, match="not a chain"):
        from_torch(Residual())


def test_half_precision_is_refused():
    with pytest.raises(UsageError, match="float32 or float64"):
        from_torch(nn.Sequential(nn.Linear(3, 2)).half())


def test_wrong_argument_types():
    with pytest.raises(UsageError, match="Backbone"):
        to_torch(nn.Linear(2, 2))
    with pytest.raises(UsageError, match="torch.nn.Module"):
        from_torch(small_backbone())


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    prelude = "import sys; sys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_core_and_peft_files_work_without_torch(tmp_path):
    r = run_without_torch(f"""
        import numpy as np, edgetune as et, edgetune.torch, edgetune.peft_format
        bb = et.Backbone.build([4, 3, 2])
        t = et.FineTuner(bb, "lora-all", epochs=1).fit(np.random.rand(10, 4), np.arange(10) % 2)
        t.save_adapter({str(tmp_path)!r}, format="peft")
        et.FineTuner.load_adapter(bb, {str(tmp_path)!r})
        assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        try:
            edgetune.torch.to_torch(bb)
        except ImportError as e:
            print("ERR", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "pip install edgetune[torch]" in r.stdout


def test_importing_edgetune_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, edgetune, edgetune.torch, edgetune.peft_format, "
                        "edgetune.methods.skip_lora; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
