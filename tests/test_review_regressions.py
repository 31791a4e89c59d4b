"""Bad input and edge cases found in review: each once gave a traceback, a stale value or
lost results."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.data.task import Task
from edgetune.errors import DataError, OutputError, UsageError
from edgetune.io_atomic import write_json_atomic
from edgetune.methods import make_method
from edgetune.train import TrainConfig, fit
from edgetune.units import parse_bytes

from .conftest import small_backbone, toy_task
from .test_cli import run_cli


@pytest.mark.parametrize("bad,msg", [(100000, "without gaps"), ("str", "integers"), ("nan", "whole class")])
def test_task_labels_are_checked_before_counting_classes(bad, msg):
    x = np.zeros((4, 3))
    y = np.array([0, 1, 0, 1])
    if bad == "str":
        yb = np.array(["a", "b", "a", "b"])
    elif bad == "nan":
        yb = np.array([0, 1, np.nan, 1])
    else:
        yb = y.copy()
        yb[0] = bad
    with pytest.raises(DataError, match=msg):
        Task("t", x, y, x, yb, x, y)


def test_output_under_a_file_fails_first_and_cleanly(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_json_atomic(afile / "out.json", {})
    x, y = toy_task(n=30, d=5)
    np.savez(tmp_path / "t.npz", x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    for args in (["pretrain", "--task", str(tmp_path / "t.npz"), "--out", str(afile / "m")],
                 ["reproduce", "--out", str(afile / "r")],
                 ["finetune", "--task", str(tmp_path / "t.npz"), "--json", str(afile / "j.json")]):
        p = run_cli(*args)
        assert p.returncode == 1, p.stderr
        assert "is a file" in p.stderr and "Traceback" not in p.stderr


def test_negative_seed_is_a_usage_error():
    p = run_cli("finetune", "--task", "x.npz", "--seed", "-1")
    assert p.returncode == 2 and "must be >= 0" in p.stderr
    with pytest.raises(UsageError, match="seed"):
        TrainConfig(seed=-1)


def test_skip2_forward_outside_fit_never_reads_the_cache():
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=30)
    m = make_method("skip2-lora", bb)
    xp = bb.prepare(x)
    fit(m, xp, y, TrainConfig(epochs=2, lr=0.1))
    x2 = xp + 1.0
    ids = np.arange(5)
    np.testing.assert_allclose(m.forward(x2, ids), m.predict_logits(x2[ids]), rtol=1e-6)


def test_cache_statistics_are_per_fit():
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=30)
    t = et.FineTuner(bb, "skip2-lora", epochs=2, batch_size=10)
    t.fit(x, y)
    t.fit(x, y)
    assert t.history_.cache["cache_misses"] == 0 and t.history_.cache["cache_hits"] == 60


def test_patience_needs_validation_data():
    bb = small_backbone(dtype=np.float32)
    x, y = toy_task(n=30)
    with pytest.raises(UsageError, match="validation"):
        et.FineTuner(bb, "lora-all", epochs=3, patience=1).fit(x, y)


def test_resuming_an_early_stopped_run_trains_nothing_more(tmp_path):
    bb = small_backbone(sizes=(7, 8, 3), dtype=np.float32)
    x, y = toy_task(n=40)
    xv, yv = toy_task(n=20, seed=5, shift=3.0)      # a shifted validation set: the loss soon stops improving
    xp, xvp = bb.prepare(x), bb.prepare(xv)
    cfg = TrainConfig(epochs=60, lr=0.5, patience=2)
    m1 = make_method("lora-all", bb)
    h1 = fit(m1, xp, y, cfg, x_val=xvp, y_val=yv, checkpoint=tmp_path / "c")
    assert h1.stopped_early and len(h1.epochs) < 60
    m2 = make_method("lora-all", bb, seed=4)
    h2 = fit(m2, xp, y, cfg, x_val=xvp, y_val=yv, checkpoint=tmp_path / "c")
    assert h2.stopped_early and len(h2.epochs) == len(h1.epochs)
    np.testing.assert_array_equal(m2.params.flat, m1.params.flat)
    with pytest.raises(UsageError, match="validation"):  # another validation set: another run
        fit(make_method("lora-all", bb), xp, y, cfg, x_val=xvp[:10], y_val=yv[:10], checkpoint=tmp_path / "c")


@pytest.mark.parametrize("value", [float("inf"), "1e400", "inf KB"])
def test_absurd_byte_sizes(value):
    with pytest.raises(UsageError):
        parse_bytes(value)


@pytest.mark.parametrize("kw", [{"rank": True}, {"alpha": "2"}, {"lr": True}])
def test_option_types(kw):
    with pytest.raises(UsageError):
        et.FineTuner(small_backbone(dtype=np.float32), "lora-all", **kw)


def test_numpy_scalars_are_fine_options():
    t = et.FineTuner(small_backbone(dtype=np.float32), "lora-all", lr=np.float32(0.1), epochs=np.int64(2),
                     rank=np.int64(2))
    x, y = toy_task(n=20)
    t.fit(x, y)
    assert t.config.lr == pytest.approx(0.1) and len(t.history_.epochs) == 2


def test_complex_and_ragged_inputs_are_refused():
    t = et.FineTuner(small_backbone(dtype=np.float32), "lora-all")
    with pytest.raises(DataError, match="real numbers"):
        t.predict(np.zeros((2, 7), complex))
    with pytest.raises(DataError, match="rectangular"):
        t.fit([[1, 2], [3]], [0, 1])


def test_finetune_refuses_unmergeable_save_model_before_training(tmp_path):
    x, y = toy_task(n=30, d=5)
    np.savez(tmp_path / "t.npz", x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    p = run_cli("finetune", "--task", str(tmp_path / "t.npz"), "--method", "skip2-lora",
                "--save-model", str(tmp_path / "m"), "--json", str(tmp_path / "j.json"))
    assert p.returncode == 2 and "does not fold" in p.stderr
    assert "pre-training" not in p.stderr          # refused before any work
    p = run_cli("finetune", "--task", str(tmp_path / "t.npz"), "--method", "lora-all", "--cache-budget", "1KB")
    assert p.returncode == 2 and "skip-cache" in p.stderr


def test_finetune_checkpoint_resumes_from_the_cli(tmp_path):
    x, y = toy_task(n=40, d=5)
    np.savez(tmp_path / "t.npz", x_pretrain=x, y_pretrain=y, x_finetune=x + 1, y_finetune=y, x_test=x + 1, y_test=y)
    args = ["finetune", "--task", str(tmp_path / "t.npz"), "--epochs", "4", "--pretrain-epochs", "3", "--quiet",
            "--checkpoint", str(tmp_path / "ck"), "--json"]
    assert run_cli(*args, str(tmp_path / "a.json")).returncode == 0
    assert (tmp_path / "ck").is_file()
    assert run_cli(*args, str(tmp_path / "b.json")).returncode == 0   # finished run: resumes to the same end
    import json
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["accuracy_after"] == b["accuracy_after"] and a["final_loss"] == b["final_loss"]
