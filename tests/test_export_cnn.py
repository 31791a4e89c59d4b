"""`edgetune export` of convolutional backbones: the exported project trains every layer kind
(conv1d/2d with stride, padding and groups, pooling, gap, flatten, residual add, per-layer
activations) and reaches the loss the Python package's compiled engine reaches: exactly on
the host, within float rounding (FMA) under emulation, inside the RAM it was planned for."""
from __future__ import annotations

import ctypes
import json
import subprocess

import numpy as np
import pytest

import edgetune as et
from edgetune.cli import main

from .conftest import DATA_DIR
from .test_export import last_json, make, needs, sections

pytestmark = pytest.mark.slow

#: conv1d with stride and padding, max and average pooling, a residual block around a
#: depthwise (groups = channels) and a pointwise convolution, flatten, dense; relu per layer.
ARCH_1D = ("conv:8:9:4:4,relu,maxpool:2,res(dwconv:3:1:1,relu,conv:8:1),conv:16:5:2:2,relu,avgpool:2,flatten,"
           "dense:32,relu")
#: conv2d, 2-D pooling, a depthwise 3x3, global average pooling, relu6 and tanh.
ARCH_2D = "conv:8:3x3:1:1,relu6,maxpool:2,dwconv:3x3:1:1,relu,conv:12:1,avgpool:2,gap,dense:16,tanh"


@pytest.fixture(scope="module")
def task1d():
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.fail(f"the shared data sets are expected at {DATA_DIR}")
    return et.load_task("damage1-1d", DATA_DIR), ["--task", "damage1-1d", "--data-dir", str(DATA_DIR)]


@pytest.fixture(scope="module")
def task2d(task1d, tmp_path_factory):
    """The fan spectra as two 16x16 channels (low and high bins): a 2-D input whose channels
    differ, so the per-channel input normalisation is exercised."""
    path = tmp_path_factory.mktemp("task2d") / "fan2d.npz"
    arrays = {}
    for split in ("pretrain", "finetune", "test"):
        x = getattr(task1d[0], f"x_{split}")
        arrays[f"x_{split}"] = x.reshape(len(x), 2, 16, 16)
        arrays[f"y_{split}"] = getattr(task1d[0], f"y_{split}")
    np.savez(path, **arrays)
    return et.load_task(str(path)), ["--task", str(path)]


def pretrained(task, arch, path, epochs, lr):
    task = task[0]
    model, _ = et.pretrain(task.x_pretrain, task.y_pretrain, arch=arch, labels=task.labels, epochs=epochs, lr=lr)
    return model.save(path)


@pytest.fixture(scope="module")
def cnn1d(task1d, tmp_path_factory):
    return pretrained(task1d, ARCH_1D, tmp_path_factory.mktemp("cnn1d") / "model", 4, 0.02)


@pytest.fixture(scope="module")
def cnn2d(task2d, tmp_path_factory):
    return pretrained(task2d, ARCH_2D, tmp_path_factory.mktemp("cnn2d") / "model", 10, 0.05)


def export(model_dir, task_option: list[str], out, target, *extra) -> dict:
    code = main(["export", "--model", str(model_dir), "--target", target, "--out", str(out), "--quiet",
                 *task_option, *extra])
    assert code == 0
    return json.loads((out / "export.json").read_text())


def python_run(backbone, task, manifest, *, cache_capacity=None):
    """The same configuration on the Python package's compiled engine."""
    tr, te = manifest["train_indices"], manifest["test_indices"]
    kw = {}
    if cache_capacity is not None and cache_capacity < len(tr):
        row = 4 * (sum(backbone.tap_widths) + backbone.sizes[-1])  # bytes of one float cache row
        kw = {"cache_budget": cache_capacity * row, "cache_overflow": "partial"}
    tuner = et.FineTuner(backbone, manifest["method"], epochs=manifest["epochs"], seed=manifest["seed"],
                         batch_size=manifest["batch_size"], lr=manifest["lr"], engine="c", **kw)
    tuner.fit(task.x_finetune[tr], task.y_finetune[tr])
    return tuner, tuner.history_.final_loss, tuner.score(task.x_test[te], task.y_test[te])


# ----------------------------------------------------------------------------- host
@pytest.mark.parametrize("which", ["cnn1d", "cnn2d"])
@pytest.mark.parametrize("method", ["lora-all", "skip2-lora", "ft-all", "sparse"])
def test_host_program_reaches_the_python_loss(which, method, request, tmp_path):
    needs(("cc", "gcc"), ("make", "make"))
    model_dir = request.getfixturevalue(which)
    task, task_option = request.getfixturevalue("task1d" if which == "cnn1d" else "task2d")
    out = tmp_path / "dev"
    man = export(model_dir, task_option, out, "host", "--method", method, "--epochs", "3", "--max-samples", "120",
                 "--test-samples", "80")
    assert man["input_shape"] == list(task.x_finetune.shape[1:]) and man["layers"][0].startswith("conv")
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet", "--save-adapter", str(tmp_path / "adapter")],
                                   capture_output=True, text=True, timeout=120, check=True).stdout)
    model = et.Backbone.load(model_dir)
    tuner, loss, acc = python_run(model, task, man)
    # the program reads raw samples and normalises them per channel itself; it computes without
    # fused multiply-adds and with the engine's own exp and log (ET_PORTABLE_MATH, as on every
    # target), the package with the C library's: the same loss to float32 rounding
    assert res["epochs"] == 3 and res["samples"] == 120 and res["shuffle"] == "edgetune"
    assert res["final_loss"] == pytest.approx(loss, rel=1e-6)
    assert res["accuracy_after"] == acc
    assert res["arena_needed_bytes"] == man["memory"]["arena"]  # the plan is the C arena, exactly
    te = man["test_indices"]
    loaded = et.FineTuner.load_adapter(model, tmp_path / "adapter")
    np.testing.assert_array_equal(loaded.predict(task.x_test[te]), tuner.predict(task.x_test[te]))


def test_host_program_starts_from_a_cnn_adapter(cnn2d, task2d, tmp_path):
    """--adapter: the program starts from a trained adapter, read into the exported parameters."""
    needs(("cc", "gcc"), ("make", "make"))
    task, task_option = task2d
    model = et.Backbone.load(cnn2d)
    tuner = et.FineTuner(model, "lora-all", epochs=3, lr=0.05, engine="c").fit(task.x_finetune[:80],
                                                                               task.y_finetune[:80])
    tuner.save_adapter(tmp_path / "adapter")
    out = tmp_path / "dev"
    man = export(cnn2d, task_option, out, "host", "--method", "lora-all", "--adapter", str(tmp_path / "adapter"),
                 "--epochs", "1", "--max-samples", "40")
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet"], capture_output=True, text=True, timeout=120,
                                   check=True).stdout)
    te = man["test_indices"]
    adapted = tuner.score(task.x_test[te], task.y_test[te])
    plain = np.mean(model.forward(model.prepare(task.x_test[te])).argmax(1) == task.y_test[te])
    assert adapted != plain  # the adapter changes the predictions, so the check below can tell
    assert res["accuracy_before"] == adapted


# ----------------------------------------------------------------------------- under emulation
def test_aarch64_cnn_program_under_qemu_matches_python(cnn1d, task1d, tmp_path):
    needs(("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user"))
    task, task_option = task1d
    out = tmp_path / "pi"
    man = export(cnn1d, task_option, out, "aarch64-linux", "--method", "skip2-lora", "--epochs", "3",
                 "--max-samples", "120", "--test-samples", "80")
    res = last_json(make(out, "run", "ARGS=--quiet", timeout=300))
    _, loss, acc = python_run(et.Backbone.load(cnn1d), task, man)
    assert res["target"] == "aarch64-linux" and res["epochs"] == 3
    assert res["final_loss"] == pytest.approx(loss, rel=1e-4)
    assert res["accuracy_after"] == pytest.approx(acc)
    assert res["arena_needed_bytes"] == man["memory"]["arena"]


def test_cortex_m4_cnn_skip2lora_fits_256kb_with_a_partial_cache(cnn1d, task1d, tmp_path):
    needs(("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"))
    task, task_option = task1d
    out = tmp_path / "m4"
    budget = 256 * 1024
    opts = ["--batch-size", "4", "--max-samples", "200", "--test-samples", "60", "--epochs", "3"]
    man = export(cnn1d, task_option, out, "cortex-m4", "--method", "skip2-lora", "--budget", "256KB",
                 "--partial-cache", *opts)
    assert man["cache"] == "float32" and 0 < man["cache_capacity"] < 200  # the planner cut the cache to fit
    make(out)
    res = last_json(make(out, "run", timeout=300))
    _, loss, acc = python_run(et.Backbone.load(cnn1d), task, man, cache_capacity=man["cache_capacity"])
    assert res["target"] == "cortex-m4" and res["epochs"] == 3 and res["samples"] == 200
    assert res["accuracy_after"] == pytest.approx(acc)
    assert res["final_loss"] == pytest.approx(loss, rel=1e-4)  # FMA on the M4: a few float32 roundings differ
    assert res["arena_needed_bytes"] == man["memory"]["arena"]  # 32-bit pointers, exactly
    s = sections(out / "train.elf")
    ram, plan = s[".data"] + s[".bss"] + s[".stack"], man["memory"]["total"]
    assert ram <= budget and plan <= budget and abs(ram - plan) <= 0.01 * plan, (ram, plan)
    assert res["stack_used_bytes"] < res["stack_bytes"]
    # `edgetune plan --target` gives the export's arena without writing a project ...
    pj = tmp_path / "plan.json"
    assert main(["plan", "--model", str(cnn1d), "--budget", "256KB", "--target", "cortex-m4", "--partial-cache",
                 "--samples", "200", "--test-samples", "60", "--epochs", "3", "--batch-size", "4", *task_option,
                 "--quiet", "--json", str(pj)]) == 0
    planned = json.loads(pj.read_text())["memory"]
    assert planned["arena"] == man["memory"]["arena"] and planned["total"] == plan


def test_riscv32f_cnn_program_matches_python(cnn2d, task2d, tmp_path):
    needs(("riscv64-unknown-elf-gcc", "gcc-riscv64-unknown-elf"), ("qemu-system-riscv32", "qemu-system-misc"))
    task, task_option = task2d
    out = tmp_path / "rv"
    man = export(cnn2d, task_option, out, "riscv32f", "--method", "lora-all", "--batch-size", "4",
                 "--max-samples", "60", "--test-samples", "40", "--epochs", "2", "--lr", "0.05")
    make(out, timeout=300)
    res = last_json(make(out, "run", timeout=300))
    _, loss, acc = python_run(et.Backbone.load(cnn2d), task, man)
    assert res["target"] == "riscv32f" and res["epochs"] == 2 and res["samples"] == 60
    assert res["accuracy_after"] == pytest.approx(acc)
    assert res["final_loss"] == pytest.approx(loss, rel=1e-4)
    assert res["arena_needed_bytes"] == man["memory"]["arena"]


@pytest.mark.parametrize("target,method", [("cortex-m7", "sparse"), ("riscv32", "skip2-lora")])
def test_the_other_microcontrollers_run_a_cnn_as_python_does(target, method, cnn2d, task2d, tmp_path):
    """The Cortex-M7 (the sparse update's pruned backward) and the soft-float RV32IMAC."""
    from edgetune.export.targets import get_target

    t = get_target(target)
    needs((t.cc, t.cc_package.split()[0]), (t.qemu, t.qemu_package))
    task, task_option = task2d
    out = tmp_path / target
    man = export(cnn2d, task_option, out, target, "--method", method, "--batch-size", "4", "--max-samples", "40",
                 "--test-samples", "30", "--epochs", "2", "--lr", "0.05")
    make(out, timeout=300)
    res = last_json(make(out, "run", timeout=600))
    _, loss, acc = python_run(et.Backbone.load(cnn2d), task, man)
    assert res["target"] == target and res["epochs"] == 2 and res["samples"] == 40
    assert res["accuracy_after"] == pytest.approx(acc)
    assert res["final_loss"] == pytest.approx(loss, rel=1e-4)
    assert res["arena_needed_bytes"] == man["memory"]["arena"]


# ----------------------------------------------------------------------------- plans and refusals
def test_plan_target_gives_a_cnn_arena_and_refuses_a_small_budget(cnn1d, task1d, tmp_path, capsys):
    _, task_option = task1d
    base = ["plan", "--model", str(cnn1d), "--target", "cortex-m4", "--method", "skip2-lora", "--samples", "100",
            "--test-samples", "50", "--batch-size", "4", *task_option]
    pj = tmp_path / "plan.json"
    assert main(base + ["--budget", "256KB", "--quiet", "--json", str(pj)]) == 0
    memory = json.loads(pj.read_text())["memory"]
    out = capsys.readouterr().out
    assert f"{memory['total']:,} bytes" in out and memory["workspace"] > 0
    model = et.Backbone.load(cnn1d)  # the skip-cache row of a CNN: its pooled taps and the logits
    assert memory["cache_bytes"] == 4 * 100 * (sum(model.tap_widths) + model.sizes[-1]) + 100
    code = main(base + ["--budget", "150KB"])
    err = capsys.readouterr().err
    assert code == 1 and "150.0 KB" in err and "over by" in err and "workspace" in err and "--max-samples" in err


def test_int8_export_of_a_cnn_refuses_an_activation_int8_cannot_fuse(cnn2d, task2d, tmp_path, capsys):
    """int8 CNNs export (tests/test_int8_sparse_cnn.py); --int8 on one with tanh between its layers
    is refused by name, before anything is written."""
    _, task_option = task2d
    out = tmp_path / "dev"
    base = ["export", "--model", str(cnn2d), "--out", str(out), "--target", "cortex-m4", "--no-toolchain-check",
            *task_option]
    assert main(base + ["--int8"]) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "tanh" in err
    assert not out.exists()


def test_the_device_refuses_a_normalisation_that_does_not_divide_the_input(cnn2d):
    """C checks norm_channels against the input width before it reads input_mean/std."""
    from edgetune.core import load
    from edgetune.core.engine import CoreModel
    from edgetune.memory import device_model_desc

    model = et.Backbone.load(cnn2d)
    tuner = et.FineTuner(model, "skip2-lora", engine="c")
    core = CoreModel(tuner.method, 4)
    desc = device_model_desc(core, optimizer="sgd", cache=None, cache_capacity=0, max_samples=10,
                             store_samples=True)
    lib = load()
    mean = np.zeros(model.sizes[0], np.float32)
    desc.input_mean = mean.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    for channels, ok in ((2, True), (model.sizes[0], True), (3, False), (0, False), (-2, False)):
        desc.norm_channels = channels
        assert (lib.et_device_arena_breakdown(ctypes.byref(desc), 4, None) > 0) == ok, channels
