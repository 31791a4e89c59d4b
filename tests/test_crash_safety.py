"""Saves survive SIGKILL at any instant; concurrent writers and stale temporaries."""
from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import edgetune as et
from edgetune.io_atomic import write_bytes_atomic, write_dir_atomic

from .conftest import small_backbone

ROOT = Path(__file__).resolve().parents[1]

# Saves two models (seeds 1 and 2) into argv[1] alternately, forever.
SAVER = """
import sys
from tests.conftest import small_backbone
models = [small_backbone(sizes=(64, 256, 256, 3), seed=s) for s in (1, 2)]
kind = sys.argv[2]
i = 0
while True:
    m = models[i % 2]
    if kind == "int8":
        from edgetune.quant import quantize
        import numpy as np
        m = quantize(m, np.random.default_rng(0).normal(size=(32, 64)))
    if kind == "adapter":
        import edgetune as et
        t = et.FineTuner(m, "lora-all", rank=1)
        t.save_adapter(sys.argv[1], overwrite=True)
    else:
        m.save(sys.argv[1])
    i += 1
"""


def _saver(path, kind="float", env=None):
    return subprocess.Popen([sys.executable, "-c", SAVER, str(path), kind], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stderr=subprocess.PIPE)


def _digests():
    return {small_backbone(sizes=(64, 256, 256, 3), seed=s).digest() for s in (1, 2)}


def _loadable(path) -> str:
    return et.Backbone.load(path).digest()


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("step", ["file-written", "set-written", "moved-aside", "swapped"])
def test_kill_at_each_step_of_a_save_leaves_a_loadable_model(tmp_path, step, exchange):
    if step == "moved-aside" and exchange:
        pytest.skip("an atomic exchange has no moment with the old directory aside")
    out = tmp_path / "model"
    small_backbone(sizes=(64, 256, 256, 3), seed=2).save(out)
    env = {"EDGETUNE_TEST_HOOK": f"{step}=kill"}
    if not exchange:
        env["EDGETUNE_TEST_NO_EXCHANGE"] = "1"
    p = _saver(out, env=env)
    try:
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert _loadable(out) in _digests()
    # the next save cleans what the killed one left
    small_backbone(sizes=(64, 256, 256, 3), seed=1).save(out)
    assert [n for n in os.listdir(tmp_path) if "edgetune-" in n and not n.endswith("lock")] == []
    assert [n for n in os.listdir(out) if n.startswith(".")] == []


@pytest.mark.parametrize("kind,exchange", [("float", False), ("adapter", False), ("int8", True)])
def test_random_sigkills_during_saves_never_leave_neither(tmp_path, kind, exchange):
    out = tmp_path / "m"
    env = {} if exchange else {"EDGETUNE_TEST_NO_EXCHANGE": "1"}
    rnd = random.Random(0)
    base = small_backbone(sizes=(64, 256, 256, 3), seed=1)
    bad = 0
    for _ in range(3):
        p = _saver(out, kind, env)
        # Kill at a random instant once a first save has completed (before it, there is no old
        # set to keep: on a loaded machine the saver may take longer than the delay to start).
        deadline = time.monotonic() + 60
        while not (out / ("adapter_config.json" if kind == "adapter" else "config.json")).exists():
            assert p.poll() is None and time.monotonic() < deadline, "the saver never completed a save"
            time.sleep(0.02)
        time.sleep(0.05 + rnd.random() * 0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        try:
            if kind == "adapter":
                et.FineTuner.load_adapter(base, out, strict=False)
            elif kind == "int8":
                from edgetune.quant import load_any
                load_any(out)
            else:
                assert _loadable(out) in _digests()
        except et.errors.ModelFileError:
            bad += 1
    assert bad == 0


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    task = tmp_path / "t.npz"
    np.savez(task, x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    out = tmp_path / "model"
    args = [sys.executable, "-m", "edgetune", "pretrain", "--task", str(task), "--out", str(out), "--epochs", "2",
            "--quiet", "--hidden", "8"]
    first = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "EDGETUNE_TEST_HOOK": "locked=sleep:2"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".model.edgetune-lock"
    deadline = time.time() + 20
    while time.time() < deadline:  # wait until the first process holds the lock
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                break
            finally:
                os.close(fd)
        time.sleep(0.05)
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "being written by another edgetune process" in second.stderr
    assert first.wait(timeout=60) == 0, first.stderr.read()
    et.Backbone.load(out)


def test_stale_temporaries_of_dead_processes_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "r.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".r.json.edgetune-tmp-{dead}-abcd1234.tmp"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (1, 1))
    fresh_alive = tmp_path / f".r.json.edgetune-tmp-{os.getpid()}-abcd1234.tmp"
    fresh_alive.write_bytes(b"y")
    other = tmp_path / ".r.json.somebody-else.tmp"
    other.write_bytes(b"z")
    write_bytes_atomic(target, b"{}")
    assert not stale.exists() and fresh_alive.exists() and other.exists()
    d = tmp_path / "m"
    write_dir_atomic(d, {"a": b"1"})
    sd = tmp_path / f".m.edgetune-new-{dead}-0badf00d"
    sd.mkdir()
    (sd / "model.safetensors").write_bytes(b"x" * 100)
    os.utime(sd, (1, 1))
    write_dir_atomic(d, {"a": b"2"})
    assert not sd.exists() and (d / "a").read_bytes() == b"2"


def test_output_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "f", b"1")
        small_backbone().save(tmp_path / "m")
        os.umask(0o077)
        write_bytes_atomic(tmp_path / "g", b"1")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "g").stat().st_mode & 0o777 == 0o600
