"""Every build of an exported project computes the same float32 bits: the host program and the
Cortex-M4 under QEMU (and the other emulated targets) give the same loss after every epoch, bit
for bit, on an int8 CNN trained with the sparse update for 30 epochs (where a last-bit difference
once grew to 0.9% after 20 epochs on har-raw).

Two things made the builds differ (docs/export.md#the-same-bits-on-every-target): fused
multiply-adds (arm-none-eabi-gcc contracts a * b + c for an FPU target, the x86-64 baseline
build cannot) and the C libraries' exp and log. Every exported project builds with
-ffp-contract=off and -DET_PORTABLE_MATH (the engine's own et_expf/et_logf/et_log1pf/et_tanhf).
The Python package's engine keeps the C library's functions: it reaches the same losses within
float32 rounding."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.cli import main
from edgetune.export.project import epoch_losses
from edgetune.quant import load_any

from .conftest import DATA_DIR
from .test_export import make, needs

pytestmark = pytest.mark.slow

EPOCHS = 30
#: the damage1-1d preset CNN (docs/export.md), quantised to int8: the sparse update rounds its
#: trained weights and activations to int8 every step, so one differing float32 bit can grow
ARCH = "conv:8:9:4:4,relu,maxpool:2,conv:16:5:2:2,relu,maxpool:2,flatten,dense:32,relu"


@pytest.fixture(scope="module")
def int8_cnn(tmp_path_factory):
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.fail(f"the shared data sets are expected at {DATA_DIR}")
    work = tmp_path_factory.mktemp("agreement")
    task = ["--task", "damage1-1d", "--data-dir", str(DATA_DIR), "--quiet"]
    assert main(["pretrain", *task, "--arch", ARCH, "--epochs", "5", "--out", str(work / "float")]) == 0
    assert main(["quantize", "--model", str(work / "float"), *task, "--out", str(work / "int8")]) == 0
    return work / "int8"


def export(model_dir, out, target: str, *options: str, task: str = "damage1-1d") -> dict:
    """The same project (samples, shuffles, seed, scheme) for each target; its export.json."""
    options = options or ("--method", "sparse")
    assert main(["export", "--model", str(model_dir), "--target", target, "--out", str(out), "--task", task,
                 "--data-dir", str(DATA_DIR), "--epochs", str(EPOCHS), "--max-samples", "60", "--test-samples", "10",
                 "--quiet", *options]) == 0
    return json.loads((out / "export.json").read_text())


def curve(output: str) -> list[float]:
    """The per-epoch losses a program printed ("epoch N loss ... bits HEX"), as the exact doubles."""
    found = epoch_losses(output)
    assert [e for e, _ in found] == list(range(1, EPOCHS + 1)), output[-2000:]
    return [loss for _, loss in found]


@pytest.fixture(scope="module")
def host_curve(int8_cnn, tmp_path_factory):
    needs(("cc", "gcc"), ("make", "make"))
    out = tmp_path_factory.mktemp("host") / "dev"
    export(int8_cnn, out, "host")
    make(out)
    res = subprocess.run([str(out / "train")], capture_output=True, text=True, timeout=60, check=True)
    return curve(res.stderr)


def run(out, *make_args: str) -> str:
    """`make run` (building first); what the program wrote (a Linux program's epochs go to stderr)."""
    res = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(out), *make_args, "run"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def first_difference(a: list[float], b: list[float]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"epoch {i + 1}: {x!r} vs {y!r} (relative {(x - y) / y:+.1e})"
    return "none"


def test_the_host_program_follows_the_python_engine(int8_cnn, host_curve, tmp_path):
    man = export(int8_cnn, tmp_path / "dev", "host")
    task = et.load_task("damage1-1d", DATA_DIR)
    tr = man["train_indices"]
    tuner = et.FineTuner(load_any(int8_cnn), "sparse", scheme=man["scheme"], epochs=EPOCHS, seed=man["seed"],
                         batch_size=man["batch_size"], lr=man["lr"], engine="c")
    tuner.fit(task.x_finetune[tr], task.y_finetune[tr])
    python = [e.loss for e in tuner.history_.epochs]
    # the package's engine calls the C library's exp and log: the same losses to float32 rounding
    np.testing.assert_allclose(python, host_curve, rtol=1e-4)


@pytest.mark.parametrize("target, tools", [
    ("cortex-m4", (("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"))),
    ("aarch64-linux", (("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user"))),
    ("riscv32f", (("riscv64-unknown-elf-gcc", "gcc-riscv64-unknown-elf"), ("qemu-system-riscv32", "qemu-system-misc"))),
    ("riscv32", (("riscv64-unknown-elf-gcc", "gcc-riscv64-unknown-elf"), ("qemu-system-riscv32", "qemu-system-misc"))),
])
def test_the_device_reaches_the_host_loss_bit_for_bit(int8_cnn, host_curve, tmp_path, target, tools):
    needs(*tools)
    out = tmp_path / "dev"
    export(int8_cnn, out, target)
    make(out)  # -Werror
    device = curve(run(out))
    assert device == host_curve, first_difference(device, host_curve)


def test_fused_multiply_adds_change_the_bits(int8_cnn, host_curve, tmp_path):
    """The check above can tell: the same Cortex-M4 project built with the flags it had before
    (-ffp-contract=fast, the compiler fusing multiply-adds) leaves the host's losses."""
    needs(("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"))
    out = tmp_path / "dev"
    export(int8_cnn, out, "cortex-m4")
    assert curve(run(out, "EXTRA_CFLAGS=-ffp-contract=fast")) != host_curve


@pytest.fixture(scope="module")
def tanh_mlp(tmp_path_factory):
    """A float MLP whose frozen layers use tanh and sigmoid (et_tanhf, et_expf in the forward pass)."""
    out = tmp_path_factory.mktemp("mlp") / "model"
    assert main(["pretrain", "--task", "damage1", "--data-dir", str(DATA_DIR), "--arch",
                 "dense:32,tanh,dense:16,sigmoid", "--epochs", "5", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("which, task, options", [
    ("int8_cnn", "damage1-1d", ("--method", "sparse", "--optimizer", "adam", "--lr", "0.001")),
    ("tanh_mlp", "damage1", ("--method", "lora-all")),
    ("tanh_mlp", "damage1", ("--method", "skip2-lora")),
])
def test_other_optimizers_and_activations_agree_on_the_m4(which, task, options, request, tmp_path):
    """Adam (its bias corrections in double), tanh and sigmoid layers, lora-all and skip2-lora."""
    needs(("cc", "gcc"), ("make", "make"), ("arm-none-eabi-gcc", "gcc-arm-none-eabi"),
          ("qemu-system-arm", "qemu-system-arm"))
    model = request.getfixturevalue(which)
    found = {}
    for target in ("host", "cortex-m4"):
        out = tmp_path / target
        export(model, out, target, *options, task=task)
        make(out)
        found[target] = curve(run(out))
    assert found["cortex-m4"] == found["host"], first_difference(found["cortex-m4"], found["host"])


# ----------------------------------------------------------------------------- the functions
def _function(name: str):
    lib = core.load()
    if lib is None:
        pytest.fail(core.unavailable_reason())
    f = getattr(lib, name)
    return np.vectorize(lambda v: f(float(v)), otypes=[np.float32])


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at the exact value."""
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("name, exact, xs, bound", [
    ("et_expf", np.exp, [(-87.0, 88.7), (-1.0, 1.0)], 1.0),
    ("et_logf", np.log, [(1e-37, 3e38, "log"), (0.5, 2.0)], 1.0),
    ("et_log1pf", np.log1p, [(0.0, 1.0), (1e-30, 1.0, "log")], 2.5),
    ("et_tanhf", np.tanh, [(-10.0, 10.0), (-0.7, 0.7), (1e-20, 0.5, "log")], 1.5),
])
def test_the_engines_functions_are_within_bounds_of_the_exact_values(name, exact, xs, bound):
    rng = np.random.default_rng(0)
    parts = []
    for lo, hi, *log in xs:
        parts.append(np.exp(rng.uniform(np.log(lo), np.log(hi), 4000)) if log else rng.uniform(lo, hi, 4000))
    x = np.concatenate(parts).astype(np.float32)
    got = _function(name)(x)
    err = _ulps(got, exact(x.astype(np.float64)))
    assert err.max() <= bound, (name, float(x[err.argmax()]), float(err.max()))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN results, asserted below
def test_the_engines_functions_at_the_edges():
    expf, logf, log1pf, tanhf = (_function(n) for n in ("et_expf", "et_logf", "et_log1pf", "et_tanhf"))
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    assert expf(0.0) == 1.0 and expf(-np.inf) == 0.0 and expf(np.inf) == inf and expf(89.0) == inf
    assert expf(-104.0) == 0.0 and 0.0 < expf(-100.0) < np.finfo(np.float32).tiny  # subnormal results
    assert np.isnan(expf(nan)) and np.isnan(logf(nan)) and np.isnan(tanhf(nan))
    assert logf(1.0) == 0.0 and logf(0.0) == -inf and np.isnan(logf(-1.0)) and logf(np.inf) == inf
    tiny = np.float32(1e-45)  # the smallest subnormal
    assert logf(tiny) == pytest.approx(np.log(np.float64(tiny)), rel=1e-7)
    assert log1pf(1e-30) == np.float32(1e-30) and log1pf(0.0) == 0.0
    assert tanhf(50.0) == 1.0 and tanhf(-50.0) == -1.0 and tanhf(0.0) == 0.0
