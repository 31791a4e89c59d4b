"""`edgetune export`: the exported C project builds, runs (natively and under emulation) and
reaches what the Python package's compiled engine reaches, inside the memory it was planned for."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edgetune as et
from edgetune.cli import main
from edgetune.quant import quantize
from edgetune.quant.cache import attach_int8_cache

from .conftest import DATA_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task():
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.fail(f"the shared data sets are expected at {DATA_DIR}")
    return et.load_task("damage1", DATA_DIR)


@pytest.fixture(scope="module")
def model_dir(task, tmp_path_factory):
    model, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=[96, 96], labels=task.labels, epochs=100)
    return model.save(tmp_path_factory.mktemp("export-model") / "model")


def export(model_dir, out, target, *extra) -> dict:
    code = main(["export", "--model", str(model_dir), "--target", target, "--out", str(out), "--task", "damage1",
                 "--data-dir", str(DATA_DIR), "--quiet", *extra])
    assert code == 0
    return json.loads((out / "export.json").read_text())


def needs(*tools: tuple[str, str]) -> None:
    for tool, package in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package})")


def make(out: Path, *goals: str, timeout: float = 120) -> str:
    """Run make in an exported project; every build is warning-free (-Werror) on every target."""
    res = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(out), "EXTRA_CFLAGS=-Werror", *goals],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def device_final_loss(text: str) -> float:
    """The last epoch's loss as the exact double a microcontroller program printed ("... bits HEX");
    its JSON line has 10 digits. Every build computes the same bits (docs/export.md)."""
    bits = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("epoch ") and " bits " in line]
    assert bits, text[-2000:]
    return struct.unpack(">d", bytes.fromhex(bits[-1]))[0]


def python_run(backbone, task, manifest, *, cache_capacity=None, int8_cache=False):
    """The same configuration on the Python package's compiled engine."""
    tr, te = manifest["train_indices"], manifest["test_indices"]
    kw = {}
    if cache_capacity is not None and cache_capacity < len(tr):
        d, n_out = sum(backbone.sizes[:-1]), backbone.sizes[-1]
        row = d + 4 * n_out if int8_cache else 4 * (d + n_out)  # bytes of one cache row
        kw = {"cache_budget": cache_capacity * row, "cache_overflow": "partial"}
    tuner = et.FineTuner(backbone, manifest["method"], epochs=manifest["epochs"], seed=manifest["seed"],
                         batch_size=manifest["batch_size"], lr=manifest["lr"], engine="c", **kw)
    if int8_cache:
        attach_int8_cache(tuner.method, len(tr))
        assert tuner.method.cache.capacity == manifest["cache_capacity"]
    tuner.fit(task.x_finetune[tr], task.y_finetune[tr])
    return tuner, tuner.history_.final_loss, tuner.score(task.x_test[te], task.y_test[te])


# ----------------------------------------------------------------------------- host
@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_host_program_reaches_the_python_loss_and_writes_a_loadable_adapter(model_dir, task, tmp_path, method):
    needs(("cc", "gcc"), ("make", "make"))
    out = tmp_path / "dev"
    man = export(model_dir, out, "host", "--method", method, "--epochs", "8")
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet", "--save-adapter", str(tmp_path / "adapter")],
                                   capture_output=True, text=True, timeout=60, check=True).stdout)
    model = et.Backbone.load(model_dir)
    tuner, loss, acc = python_run(model, task, man)
    assert res["epochs"] == 8 and res["samples"] == len(task.y_finetune) and res["shuffle"] == "edgetune"
    assert res["final_loss"] == pytest.approx(loss, rel=1e-5)
    assert res["accuracy_after"] == acc
    assert res["accuracy_before"] == pytest.approx(np.mean(model.forward(model.prepare(task.x_test)).argmax(1)
                                                           == task.y_test))
    assert res["arena_needed_bytes"] == man["memory"]["arena"]  # the memory model is the C arena, exactly
    loaded = et.FineTuner.load_adapter(model, tmp_path / "adapter")
    np.testing.assert_array_equal(loaded.predict(task.x_test), tuner.predict(task.x_test))
    np.testing.assert_allclose(loaded.decision_function(task.x_test), tuner.decision_function(task.x_test),
                               rtol=1e-4, atol=1e-5)


def test_host_program_shuffles_itself_beyond_the_exported_epochs(model_dir, tmp_path):
    needs(("cc", "gcc"), ("make", "make"))
    out = tmp_path / "dev"
    export(model_dir, out, "host", "--epochs", "2", "--max-samples", "60")
    make(out)
    res = last_json(subprocess.run([str(out / "train"), str(out / "samples.bin"), "--epochs", "4", "--quiet"],
                                   capture_output=True, text=True, timeout=60, check=True).stdout)
    assert res["epochs"] == 4 and res["samples"] == 60 and res["shuffle"] == "device"
    assert np.isfinite(res["final_loss"]) and res["accuracy_after"] > res["accuracy_before"]


def test_host_program_refuses_a_damaged_samples_file(model_dir, tmp_path):
    needs(("cc", "gcc"), ("make", "make"))
    out = tmp_path / "dev"
    export(model_dir, out, "host", "--epochs", "1", "--max-samples", "20", "--test-samples", "5")
    make(out)
    blob = (out / "samples.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(blob[:len(blob) // 2])
    (tmp_path / "bad.bin").write_bytes(b"not samples")
    header = np.frombuffer(blob[8:24], "<i4").copy()
    nan_row = bytearray(blob)
    nan_row[24:28] = np.float32(np.nan).tobytes()  # the first training sample's first input
    (tmp_path / "nan.bin").write_bytes(bytes(nan_row))
    test_at = 24 + int(header[1]) * (4 * int(header[0]) + 4)
    inf_test = bytearray(blob)
    inf_test[test_at:test_at + 4] = np.float32(np.inf).tobytes()
    (tmp_path / "inf.bin").write_bytes(bytes(inf_test))
    for n_train in (0, -3):
        head = header.copy()
        head[1] = n_train
        (tmp_path / f"count{n_train}.bin").write_bytes(blob[:8] + head.tobytes() + blob[24:])
    said = {"cut.bin": "is truncated", "bad.bin": "not an edgetune samples file", "missing.bin": "cannot open",
            "nan.bin": "a training sample holds NaN or inf", "inf.bin": "a test sample holds NaN or inf",
            "count0.bin": "no training samples", "count-3.bin": "no training samples"}
    for f, why in said.items():
        res = subprocess.run([str(out / "train"), str(tmp_path / f)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and "train: error: " in res.stderr and why in res.stderr, (f, res.stderr)
        assert why in last_json(res.stdout)["error"]  # the last line is JSON, always


def test_host_program_reports_a_diverged_run_as_json(model_dir, tmp_path):
    """NaN is not JSON: a diverged run's last line is still JSON (a NaN or inf loss as null),
    with "diverged": true and exit status 1."""
    needs(("cc", "gcc"), ("make", "make"))
    out = tmp_path / "dev"
    export(model_dir, out, "host", "--epochs", "3", "--max-samples", "20", "--test-samples", "5", "--lr", "1e30")
    make(out)
    res = subprocess.run([str(out / "train"), "--quiet"], capture_output=True, text=True, timeout=60)
    last = res.stdout.strip().splitlines()[-1]
    doc = json.loads(last, parse_constant=lambda c: pytest.fail(f"{c} is not JSON: {last}"))
    assert res.returncode == 1 and doc["diverged"] is True, last
    assert doc["final_loss"] is None or np.isfinite(doc["final_loss"]), last
    assert "nan" not in last.lower()


# ----------------------------------------------------------------------------- aarch64
def test_aarch64_program_under_qemu_gives_the_same_numbers(model_dir, task, tmp_path):
    needs(("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user"))
    out = tmp_path / "pi"
    man = export(model_dir, out, "aarch64-linux", "--epochs", "5")
    res = last_json(make(out, "run", "ARGS=--quiet"))
    _, loss, acc = python_run(et.Backbone.load(model_dir), task, man)
    assert res["target"] == "aarch64-linux" and res["epochs"] == 5
    assert res["final_loss"] == loss  # the same bits (-ffp-contract=off, the engine's own exp and log)
    assert res["accuracy_after"] == acc
    assert res["arena_needed_bytes"] == man["memory"]["arena"]


# ----------------------------------------------------------------------------- Cortex-M
def sections(elf: Path) -> dict[str, int]:
    text = subprocess.run(["arm-none-eabi-size", "-A", "-d", str(elf)], capture_output=True, text=True,
                          check=True).stdout
    return {p[0]: int(p[1]) for p in (line.split() for line in text.splitlines()) if len(p) >= 2 and p[1].isdigit()}


def test_cortex_m4_int8_skip2lora_fits_256kb_and_matches_python(model_dir, task, tmp_path):
    needs(("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"))
    out = tmp_path / "m4"
    budget = 256 * 1024
    man = export(model_dir, out, "cortex-m4", "--int8", "--budget", "256KB", "--partial-cache",
                 "--max-samples", "200", "--test-samples", "100", "--epochs", "10")
    assert man["cache"] == "int8" and 0 < man["cache_capacity"] < 200  # the planner cut the cache to fit
    make(out)
    text = make(out, "run", timeout=120)
    res = last_json(text)
    q = quantize(et.Backbone.load(model_dir), task.x_pretrain)
    _, loss, acc = python_run(q, task, man, cache_capacity=man["cache_capacity"], int8_cache=True)
    assert res["target"] == "cortex-m4" and res["epochs"] == 10 and res["samples"] == 200
    assert res["accuracy_after"] == pytest.approx(acc)
    assert device_final_loss(text) == loss  # the same bits as the package's engine
    assert res["arena_needed_bytes"] == man["memory"]["arena"]  # 32-bit pointers, exactly
    # RAM as the linker placed it against the plan (what `edgetune export` printed)
    s = sections(out / "train.elf")
    ram = s[".data"] + s[".bss"] + s[".stack"]
    plan = man["memory"]["total"]
    assert ram <= budget and plan <= budget
    assert abs(ram - plan) <= 0.10 * plan, (ram, plan)
    # `edgetune plan --target` gives the same figure as the export, without writing a project
    pj = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model_dir), "--budget", "256KB", "--target", "cortex-m4", "--int8",
                 "--partial-cache", "--samples", "200", "--test-samples", "100", "--epochs", "10", "--task", "damage1",
                 "--data-dir", str(DATA_DIR), "--quiet", "--json", str(pj)]) == 0
    planned = json.loads(pj.read_text())["memory"]
    assert planned["total"] == plan and planned["cache_capacity"] == man["cache_capacity"]
    assert res["stack_used_bytes"] < res["stack_bytes"]
    # no heap: nothing in the firmware allocates
    syms = subprocess.run(["arm-none-eabi-nm", str(out / "train.elf")], capture_output=True, text=True,
                          check=True).stdout.split()
    assert "malloc" not in syms and "_malloc_r" not in syms
    size = make(out, "size")
    assert f"RAM {ram} bytes" in size and "flash" in size


def test_cortex_m7_runs_lora_all_under_qemu(model_dir, task, tmp_path):
    needs(("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"))
    out = tmp_path / "m7"
    man = export(model_dir, out, "cortex-m7", "--method", "lora-all", "--max-samples", "60", "--test-samples", "40",
                 "--epochs", "3")
    text = make(out, "run", timeout=120)
    res = last_json(text)
    _, loss, acc = python_run(et.Backbone.load(model_dir), task, man)
    assert res["target"] == "cortex-m7" and res["epochs"] == 3
    assert res["accuracy_after"] == pytest.approx(acc)
    assert device_final_loss(text) == loss


# ----------------------------------------------------------------------------- bad input
def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_bad_input_is_refused_before_anything_is_written(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "dev"
    base = ["export", "--model", str(model_dir), "--out", str(out), "--quiet"]
    code, err = run_cli(base + ["--target", "esp32"], capsys)
    assert code == 2 and "unknown target 'esp32'" in err and "cortex-m4" in err
    # The plan's refusals do not depend on the device compiler being installed (it may not be).
    nocc = ["--no-toolchain-check"]
    code, err = run_cli(base + nocc + ["--target", "cortex-m4", "--int8", "--task", "damage1", "--data-dir",
                                       str(DATA_DIR), "--budget", "64KB"], capsys)
    assert code == 1 and "64.0 KB" in err and "over by" in err and "--batch-size" in err
    code, err = run_cli(base + nocc + ["--target", "cortex-m4", "--int8"], capsys)
    assert code == 2 and "--int8 on a float model needs --task" in err
    code, err = run_cli(base + nocc + ["--target", "cortex-m4", "--flash", "128KB", "--budget", "4MB"], capsys)
    assert code == 1 and "does not fit cortex-m4's flash" in err and "--int8" in err
    code, err = run_cli(base + ["--target", "host", "--method", "nope"], capsys)
    assert code == 2 and "nope" in err
    import edgetune.export.targets as targets
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    code, err = run_cli(base + ["--target", "aarch64-linux"], capsys)
    assert code == 1 and "gcc-aarch64-linux-gnu" in err
    code, err = run_cli(base + ["--target", "cortex-m7"], capsys)
    assert code == 1 and "gcc-arm-none-eabi" in err and "libnewlib-arm-none-eabi" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_an_existing_output_is_replaced_only_with_force(model_dir, tmp_path, capsys):
    out = tmp_path / "dev"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    base = ["export", "--model", str(model_dir), "--out", str(out), "--target", "host", "--quiet"]
    code, err = run_cli(base, capsys)
    assert code == 2 and "--force" in err and (out / "mine.txt").read_text() == "keep"
    assert main(base + ["--force"]) == 0
    assert (out / "et_train.c").is_file() and not (out / "mine.txt").exists()
    # no temporary folder left beside it (the lock file stays, as beside a model)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".edgetune-lock")] == ["dev"]


def test_the_project_holds_the_package_sources_unchanged(model_dir, tmp_path):
    from edgetune import core

    out = tmp_path / "dev"
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--target", "cortex-m4", "--quiet",
                 "--budget", "1MB", "--no-toolchain-check"]) == 0
    for f in (*core.SOURCES, *core.HEADERS):
        if f == "et_clock.c":
            assert not (out / f).exists()  # POSIX only: not in a microcontroller build
        else:
            assert (out / f).read_bytes() == (core.SOURCE_DIR / f).read_bytes()
