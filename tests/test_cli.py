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


def test_methods_counts_from_the_widths_without_allocating(tmp_path, capsys):
    """A huge architecture is counted, not built; the counts equal real methods' on small ones."""
    import json

    import numpy as np

    from edgetune.methods import METHODS, count_trainable, make_method
    from edgetune.nn.mlp import Backbone

    for sizes in ([7, 5, 3], [9, 6, 4, 2], [5, 8, 8, 8, 3]):
        bb = Backbone.build(sizes, seed=0, dtype=np.float32)
        for name in METHODS:
            for rank, tlb in ((1, False), (3, True)):
                m = make_method(name, bb, rank=rank, train_last_bias=tlb)
                assert count_trainable(name, sizes, rank=rank, train_last_bias=tlb) == m.n_trainable, (name, sizes)
    out = tmp_path / "m.json"
    assert main(["methods", "--arch", "100000000,100000000,2", "--json", str(out)]) == 0  # 1e16 weights: no allocation
    rows = {r["method"]: r["trainable_params"] for r in json.loads(out.read_text())["methods"]}
    assert rows["ft-bias"] == 100000002 and rows["skip-lora"] == 200000000 + 2 * 2


def test_pretrain_refuses_a_model_larger_than_the_machine(tmp_path, capsys):
    """Sizes are checked against the memory plan and the machine before anything is allocated."""
    from edgetune.memory import available_memory

    assert available_memory() is not None
    npz = tmp_path / "t.npz"
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 2, 20)
    np.savez(npz, x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    code = main(["pretrain", "--task", str(npz), "--hidden", "100000,100000", "--out", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "needs about" in err and "available" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_failed_runs_leave_no_empty_output_directories(tmp_path, capsys):
    missing = tmp_path / "no-data"
    for argv in (["pretrain", "--task", "damage1", "--data-dir", str(missing), "--out", str(tmp_path / "a" / "model")],
                 ["reproduce", "--tasks", "damage1", "--data-dir", str(missing), "--out", str(tmp_path / "b" / "paper")]):
        assert main([*argv, "--quiet"]) == 1, argv
    assert not (tmp_path / "a" / "model").exists() and not (tmp_path / "b").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_every_command_has_json_and_quiet():
    """What the README promises: every command takes --json PATH (and -) and --quiet."""
    import argparse

    from edgetune.cli import build_parser

    def leaves(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
            return
        for name, sub in subs[0].choices.items():
            yield from leaves(sub, [*path, name])

    missing = []
    for path, parser in leaves(build_parser(), []):
        opts = {o for a in parser._actions for o in a.option_strings}
        for want in ("--json", "--quiet"):
            if want not in opts:
                missing.append(f"{' '.join(path)} {want}")
    # A fleet client runs until its server ends the run: the results are the server's --json.
    assert missing == ["fleet client --json"], missing


def test_engine_option_does_not_leak_into_the_caller(monkeypatch):
    import os

    monkeypatch.delenv("EDGETUNE_ENGINE", raising=False)
    assert main(["--engine", "numpy", "methods", "--quiet"]) == 0
    assert "EDGETUNE_ENGINE" not in os.environ
