"""A short reproduce run on real data: every key present, tables and curves written."""
from __future__ import annotations

import json

import pytest

from edgetune.cli import main
from edgetune.threads import get_blas_threads, set_blas_threads

from .test_cli import FINETUNE_KEYS


def test_reproduce_quick_writes_everything(tmp_path, data_dir, capsys):
    out = tmp_path / "r"
    code = main(["reproduce", "--out", str(out), "--tasks", "damage1", "--methods", "lora-all,skip-lora,skip2-lora",
                 "--seeds", "2", "--quick", "--data-dir", str(data_dir), "--quiet"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    task = res["tasks"]["damage1"]
    assert set(task["methods"]) == {"lora-all", "skip-lora", "skip2-lora"}
    for name, m in task["methods"].items():
        assert len(m["runs"]) == 2
        for run in m["runs"]:
            assert FINETUNE_KEYS <= run.keys()
            assert run["epochs"] == 10                   # damage1: 100 epochs / 10 in quick mode
            assert len(run["curve"]) == 10
        for key in ("accuracy_after", "train_seconds", "forward_seconds", "backward_seconds", "update_seconds"):
            assert key in m and key + "_std" in m
        assert 10 < m["peak_rss_mb"] < 2000
        assert m["accuracy_after"] > task["backbone"]["accuracy_test"] + 0.1   # fine-tuning helps on noisy
    # Same seeds, same math: skip2-lora reproduces skip-lora's accuracy.
    assert task["methods"]["skip2-lora"]["accuracy_after"] == pytest.approx(
        task["methods"]["skip-lora"]["accuracy_after"], abs=0.005)
    s = task["skip2_vs_lora_all"]
    assert s["speedup"] == pytest.approx(task["methods"]["lora-all"]["train_seconds"]
                                         / task["methods"]["skip2-lora"]["train_seconds"])
    md = (out / "results.md").read_text()
    assert "| skip2-lora | 710 |" in md and "skip2-lora vs lora-all" in md
    assert (out / "curves_damage1.png").stat().st_size > 1000
    assert (out / "models" / "damage1" / "model.safetensors").is_file()
    assert "| lora-all |" in capsys.readouterr().out


def test_reproduce_rejects_unknown_names(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path), "--methods", "skip3-lora"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path), "--tasks", "mnist"]) == 2


def test_threads_setting(capsys):
    before = get_blas_threads()
    if before is None:
        pytest.skip("this BLAS does not report its threads")
    try:
        assert set_blas_threads(2) and get_blas_threads() == 2
        assert main(["--threads", "1", "methods"]) == 0
        assert get_blas_threads() == 1
        assert main(["--threads", "0", "methods"]) == 2
    finally:
        set_blas_threads(before)
