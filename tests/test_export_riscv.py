"""`edgetune export --target riscv32 / riscv32f`: the RISC-V projects build warning-free,
run under qemu-system-riscv32 and reach what the Python package's compiled engine reaches,
inside the RAM the planner figured."""
from __future__ import annotations

import json
import subprocess

import pytest

import edgetune as et
from edgetune.cli import main
from edgetune.quant import quantize

from .conftest import DATA_DIR
from .test_export import device_final_loss, export, last_json, make, model_dir, needs, python_run, sections, task  # noqa: F401

pytestmark = pytest.mark.slow

CC = "riscv64-unknown-elf-gcc"
TOOLS = ((CC, "gcc-riscv64-unknown-elf"), ("qemu-system-riscv32", "qemu-system-misc"))


def build(out) -> None:
    # -Werror on top of the project's -Wall -Wextra: the engine and the startup build clean
    make(out, f"CC={CC} -Werror", timeout=300)


def symbols(elf) -> set[str]:
    return set(subprocess.run(["riscv64-unknown-elf-nm", str(elf)], capture_output=True, text=True,
                              check=True).stdout.split())


def test_riscv32_soft_float_skip2lora_matches_python(model_dir, task, tmp_path):
    needs(*TOOLS)
    out = tmp_path / "rv"
    budget = 512 * 1024
    man = export(model_dir, out, "riscv32", "--budget", "512KB", "--max-samples", "120", "--test-samples", "100",
                 "--epochs", "5")
    assert man["cache"] == "float32" and man["cache_capacity"] == 120
    build(out)
    text = make(out, "run", timeout=300)
    res = last_json(text)
    _, loss, acc = python_run(et.Backbone.load(model_dir), task, man)
    assert res["target"] == "riscv32" and res["epochs"] == 5 and res["samples"] == 120
    assert res["accuracy_after"] == pytest.approx(acc)
    assert device_final_loss(text) == loss
    assert res["arena_needed_bytes"] == man["memory"]["arena"]      # 32-bit pointers, exactly
    s = sections(out / "train.elf")
    ram, plan = s[".data"] + s[".bss"] + s[".stack"], man["memory"]["total"]
    assert ram <= budget and plan <= budget and abs(ram - plan) <= 0.01 * plan, (ram, plan)
    syms = symbols(out / "train.elf")
    assert "malloc" not in syms
    assert "__mulsf3" in syms and "__addsf3" in syms                  # no FPU: float math in software
    size = make(out, "size")
    assert f"RAM {ram} bytes" in size and "flash" in size
    pj = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model_dir), "--budget", "512KB", "--target", "riscv32", "--samples", "120",
                 "--test-samples", "100", "--epochs", "5", "--task", "damage1", "--data-dir", str(DATA_DIR),
                 "--quiet", "--json", str(pj)]) == 0
    assert json.loads(pj.read_text())["memory"]["total"] == plan


def test_riscv32f_int8_skip2lora_fits_256kb_and_matches_python(model_dir, task, tmp_path):
    needs(*TOOLS)
    out = tmp_path / "rvf"
    man = export(model_dir, out, "riscv32f", "--int8", "--budget", "256KB", "--partial-cache",
                 "--max-samples", "200", "--test-samples", "100", "--epochs", "6")
    assert man["cache"] == "int8" and 0 < man["cache_capacity"] < 200
    build(out)
    text = make(out, "run", timeout=300)
    res = last_json(text)
    q = quantize(et.Backbone.load(model_dir), task.x_pretrain)
    _, loss, acc = python_run(q, task, man, cache_capacity=man["cache_capacity"], int8_cache=True)
    assert res["target"] == "riscv32f" and res["epochs"] == 6
    assert res["accuracy_after"] == pytest.approx(acc)
    assert device_final_loss(text) == loss                           # the same bits as the host
    assert res["arena_needed_bytes"] == man["memory"]["arena"]
    s = sections(out / "train.elf")
    assert s[".data"] + s[".bss"] + s[".stack"] <= 256 * 1024
    assert "__mulsf3" not in symbols(out / "train.elf")              # the FPU does the float math
    assert res["stack_used_bytes"] < res["stack_bytes"]


def test_unknown_target_lists_the_riscv_ones(model_dir, tmp_path, capsys):
    code = main(["export", "--model", str(model_dir), "--target", "esp32", "--out", str(tmp_path / "x")])
    assert code == 2 and "riscv32" in capsys.readouterr().err and not (tmp_path / "x").exists()
