"""The edgetune command: results, JSON, exit codes, and no tracebacks for user mistakes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgetune.cli import main

from .conftest import toy_task

FINETUNE_KEYS = {"method", "trainable_params", "epochs", "accuracy_before", "accuracy_after", "train_seconds",
                 "forward_seconds", "backward_seconds", "update_seconds", "final_loss"}


@pytest.fixture
def task_file(tmp_path):
    x0, y0 = toy_task(n=120, d=12, seed=1)
    x1, y1 = toy_task(n=60, d=12, seed=1, shift=1.5)
    x2, y2 = toy_task(n=60, d=12, seed=1, shift=1.5)
    p = tmp_path / "task.npz"
    np.savez(p, x_pretrain=x0, y_pretrain=y0, x_finetune=x1, y_finetune=y1, x_test=x2, y_test=y2,
             labels=np.array(["a", "b", "c"]))
    return p


def test_methods_lists_seven(capsys, tmp_path):
    assert main(["methods", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    for name in ["ft-all", "ft-last", "ft-bias", "lora-all", "lora-last", "skip-lora", "skip2-lora"]:
        assert name in out
    rows = json.loads((tmp_path / "m.json").read_text())["methods"]
    assert {r["method"]: r["trainable_params"] for r in rows}["skip2-lora"] == 710


def test_finetune_npz_writes_json(task_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["finetune", "--task", str(task_file), "--method", "skip2-lora", "--epochs", "15", "--lr", "0.05",
                 "--pretrain-epochs", "10", "--json", str(out), "--quiet", "--save-adapter", str(tmp_path / "ad")])
    assert code == 0
    r = json.loads(out.read_text())
    assert FINETUNE_KEYS <= r.keys()
    assert r["method"] == "skip2-lora" and r["epochs"] == 15 and r["trainable_params"] > 0
    assert 0 <= r["accuracy_before"] <= 1 and r["accuracy_after"] > r["accuracy_before"]
    assert r["train_seconds"] >= r["forward_seconds"] + r["backward_seconds"] + r["update_seconds"] > 0
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()


def test_pretrain_then_finetune_then_evaluate(task_file, tmp_path, capsys):
    assert main(["pretrain", "--task", str(task_file), "--out", str(tmp_path / "m"), "--epochs", "5", "--quiet"]) == 0
    assert main(["finetune", "--task", str(task_file), "--model", str(tmp_path / "m"), "--method", "lora-all",
                 "--epochs", "3", "--quiet", "--save-adapter", str(tmp_path / "a"),
                 "--json", str(tmp_path / "f.json")]) == 0
    assert main(["evaluate", "--task", str(task_file), "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "a"),
                 "--json", str(tmp_path / "e.json")]) == 0
    f = json.loads((tmp_path / "f.json").read_text())
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["accuracy_test"] == pytest.approx(f["accuracy_after"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,code,msg", [
    (["finetune", "--task", "TASK", "--method", "lora-everything"], 2, "unknown method"),
    (["finetune", "--task", "no-such-task"], 2, "unknown task"),
    (["finetune", "--task", "missing.npz"], 1, "not found"),
    (["finetune", "--task", "TASK", "--epochs", "0"], 2, "must be >= 1"),
    (["finetune", "--task", "TASK", "--cache-budget", "12 parsecs"], 2, "byte size"),
    (["finetune", "--task", "TASK", "--model", "nowhere"], 1, "model directory not found"),
    (["finetune", "--task", "CORRUPT"], 1, "not a valid .npz task file"),
    (["finetune", "--task", "TRUNC"], 1, "missing arrays"),
    (["methods", "--arch", "5,x"], 2, "comma-separated"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_cli_errors_are_clear(task_file, tmp_path, args, code, msg):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    np.savez(tmp_path / "trunc.npz", x_pretrain=np.zeros((2, 2)))
    subst = {"TASK": str(task_file), "CORRUPT": str(tmp_path / "bad.npz"), "TRUNC": str(tmp_path / "trunc.npz")}
    p = run_cli(*[subst.get(a, a) for a in args])
    assert p.returncode == code, p.stderr
    assert msg in p.stderr
    assert "Traceback" not in p.stderr


def test_npz_with_nan_is_refused_naming_the_split(tmp_path):
    x, y = toy_task(n=20)
    x_bad = x.copy()
    x_bad[4, 1] = np.nan
    np.savez(tmp_path / "t.npz", x_pretrain=x, y_pretrain=y, x_finetune=x_bad, y_finetune=y, x_test=x, y_test=y)
    p = run_cli("finetune", "--task", str(tmp_path / "t.npz"))
    assert p.returncode == 1 and "finetune: x contains NaN" in p.stderr and "sample 4" in p.stderr
