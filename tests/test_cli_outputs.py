"""Where the CLI writes: --json through devices, FIFOs and links, never over inputs; --force."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgetune.cli import main

from .conftest import toy_task


@pytest.fixture
def task_file(tmp_path):
    x, y = toy_task(n=60, d=6, seed=1)
    p = tmp_path / "task.npz"
    np.savez(p, x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    return p


def _pretrain(task, out, *extra):
    return main(["pretrain", "--task", str(task), "--out", str(out), "--epochs", "1", "--hidden", "4", "--quiet", *extra])


def test_json_onto_the_task_file_is_refused(task_file, tmp_path, capsys):
    before = task_file.read_bytes()
    assert _pretrain(task_file, tmp_path / "m", "--json", str(task_file)) == 2
    assert "input" in capsys.readouterr().err
    assert task_file.read_bytes() == before


def test_existing_model_needs_force(task_file, tmp_path, capsys):
    assert _pretrain(task_file, tmp_path / "m") == 0
    assert _pretrain(task_file, tmp_path / "m") == 2
    assert "--force" in capsys.readouterr().err
    assert _pretrain(task_file, tmp_path / "m", "--force") == 0


def test_empty_json_path_is_refused(task_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _pretrain(task_file, tmp_path / "m", "--json", "")
    assert e.value.code == 2 and "empty path" in capsys.readouterr().err


def test_json_dash_writes_to_stdout(task_file, tmp_path, capsys):
    assert _pretrain(task_file, tmp_path / "m", "--json", "-") == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["model"] == str(tmp_path / "m")


def test_json_writes_through_a_symlink_and_a_fifo(task_file, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert _pretrain(task_file, tmp_path / "m", "--json", str(link)) == 0
    assert link.is_symlink() and "model" in json.loads(target.read_text())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    assert _pretrain(task_file, tmp_path / "m", "--force", "--json", str(fifo)) == 0
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and "model" in json.loads(got[0])


def test_json_to_dev_full_fails_and_keeps_the_device(task_file, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    r = subprocess.run([sys.executable, "-m", "edgetune", "pretrain", "--task", str(task_file), "--out",
                        str(tmp_path / "m"), "--epochs", "1", "--hidden", "4", "--quiet", "--json", "/dev/full"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot write /dev/full" in r.stderr and "Traceback" not in r.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
