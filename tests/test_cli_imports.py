"""What the ``edgetune`` program loads: a fine-tune imports the modules it runs, not the
planner, the int8 tools or OpenSSL (each is resident memory for the whole run; BENCHMARKS.md
"Peak memory"). These check module lists and mapped libraries, not sizes or times."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.data.task import Task

REPO = Path(__file__).resolve().parents[1]

# Runs the program as the console script does (main() without argv), then reports what the
# process holds: its modules, whether _hashlib was loaded, and the libraries it maps.
_PROGRAM = """
import json, sys
out = sys.argv[1]
sys.argv = ["edgetune", *sys.argv[2:]]
from edgetune.cli import main
code = main()
try:
    maps = open("/proc/self/maps").read()
except OSError:
    maps = ""
json.dump({"code": code, "modules": sorted(m for m, v in sys.modules.items() if v is not None),
           "hashlib_blocked": "_hashlib" in sys.modules and sys.modules["_hashlib"] is None,
           "libcrypto": "libcrypto" in maps}, open(out, "w"))
"""


def _program(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "state.json"
    r = subprocess.run([sys.executable, "-c", _PROGRAM, str(out), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    state = json.loads(out.read_text())
    assert state["code"] == 0, r.stderr
    return state


#: Modules a skip2-lora fine-tune of a float backbone never runs.
NOT_FOR_A_FINETUNE = ("edgetune.methods.sparse", "edgetune.checkpoint", "edgetune.safetensors", "edgetune.quant",
                      "edgetune.bank", "edgetune.stream", "edgetune.export", "edgetune.onnx", "edgetune.torch",
                      "edgetune.fleet", "edgetune.cli.cmd_plan", "edgetune.data.har", "edgetune.data.fetch")


def _unexpected(modules: list[str], banned: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == b or m.startswith(b + ".") for b in banned)]


def test_the_measured_finetune_imports_only_what_it_runs(tmp_path, data_dir, private_cache):
    """The command BENCHMARKS.md measures (fewer epochs: the same code path)."""
    state = _program(tmp_path, "finetune", "--task", "damage1", "--data-dir", str(data_dir), "--method", "skip2-lora",
                     "--epochs", "2", "--pretrain-epochs", "2", "--quiet", "--json", str(tmp_path / "r.json"))
    assert _unexpected(state["modules"], NOT_FOR_A_FINETUNE) == []
    commands = [m for m in state["modules"] if m.startswith("edgetune.cli.cmd_")]
    assert commands == ["edgetune.cli.cmd_finetune"]
    assert state["hashlib_blocked"]
    if sys.platform.startswith("linux"):
        assert not state["libcrypto"], "OpenSSL's libcrypto is mapped: something imported _hashlib or ssl"
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["cache_bytes"] > 0 and result["silent_accuracy_after"] is not None


def test_finetune_of_a_saved_model_does_not_import_the_planner(tmp_path):
    """With --model nothing is pre-trained: the training-memory planner is not needed either."""
    import edgetune as et

    r = np.random.default_rng(0)
    x = r.normal(size=(60, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "t.npz", x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    model, _ = et.pretrain(x, y, hidden=[8], epochs=2)
    model.save(tmp_path / "m")
    state = _program(tmp_path, "finetune", "--task", str(tmp_path / "t.npz"), "--model", str(tmp_path / "m"),
                     "--method", "lora-all", "--epochs", "2", "--quiet")
    reads_the_model = ("edgetune.quant", "edgetune.safetensors")  # load_any reads float and int8 models
    banned = tuple(m for m in NOT_FOR_A_FINETUNE if m not in reads_the_model) + ("edgetune.memory",)
    assert _unexpected(state["modules"], banned) == []


def test_main_called_from_python_keeps_the_interpreter_as_it_is(tmp_path):
    """Tests and notebooks call main(argv): OpenSSL's hashes stay importable afterwards."""
    code = ("import sys; from edgetune.cli import main; main(['methods', '--quiet']); "
            "import hashlib; assert sys.modules.get('_hashlib', 0) is not None; "
            "assert hasattr(hashlib, 'pbkdf2_hmac'); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "ok", r.stderr


def test_commands_that_reach_other_machines_keep_openssl(tmp_path, data_dir):
    """``edgetune data`` downloads: it is not one of the light commands."""
    state = _program(tmp_path, "data", "list", "--data-dir", str(data_dir))
    assert not state["hashlib_blocked"]


def test_drop_pretrain_frees_the_split_and_keeps_the_sample_shape():
    x = np.ones((4, 2, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    task = Task(name="t", x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    task.drop_pretrain()
    assert task.x_pretrain.shape == (0, 2, 3) and task.x_pretrain.dtype == np.float32
    assert task.y_pretrain.shape == (0,) and task.y_pretrain.dtype == y.dtype
    assert task.input_shape == (2, 3) and task.n_features == 6 and task.n_classes == 2
    assert task.x_finetune is x


@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_freeing_the_skip_cache_changes_no_result(method):
    """finetune_on_task(keep_cache=False), as the command runs it, reports the same numbers."""
    import edgetune as et
    from edgetune.experiment import finetune_on_task

    r = np.random.default_rng(1)
    x = r.normal(size=(80, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    task = Task(name="t", x_pretrain=x, y_pretrain=y, x_finetune=x[:40] + 0.5, y_finetune=y[:40],
                x_test=x[40:] + 0.5, y_test=y[40:], extra_tests={"other": (x[40:], y[40:])})
    model, _ = et.pretrain(x, y, hidden=[8], epochs=3)
    results = []
    for keep in (True, False):
        tuner, res = finetune_on_task(task, model, method, train_options={"epochs": 5}, keep_cache=keep)
        results.append({k: v for k, v in res.items() if not k.endswith("seconds")})
        if not keep:
            assert getattr(tuner.method, "cache", None) is None
    assert results[0] == results[1]
