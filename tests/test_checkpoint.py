"""An interrupted fine-tune resumes from its checkpoint and ends bit-identical."""
from __future__ import annotations

import numpy as np
import pytest

from edgetune.errors import ModelFileError, UsageError
from edgetune.methods import make_method
from edgetune.train import TrainConfig, fit

from .conftest import small_backbone, toy_task


class Crash(Exception):
    pass


def _data():
    bb = small_backbone(sizes=(7, 12, 8, 3), dtype=np.float32)
    x, y = toy_task(n=50, shift=0.7)
    return bb, bb.prepare(x), y


@pytest.mark.parametrize("name,optimizer", [("skip2-lora", "sgd"), ("lora-all", "adam"), ("ft-all", "momentum")])
def test_resume_is_bit_identical(tmp_path, name, optimizer):
    bb, x, y = _data()
    cfg = TrainConfig(epochs=7, batch_size=8, lr=0.05, optimizer=optimizer, seed=3)
    straight = make_method(name, bb, seed=1)
    h1 = fit(straight, x, y, cfg)

    path = tmp_path / "run.ckpt"
    first = make_method(name, bb, seed=1)

    def crash_after_4(rec):
        if rec.epoch == 4:
            raise Crash
    with pytest.raises(Crash):
        fit(first, x, y, cfg, checkpoint=path, checkpoint_every=1, callback=crash_after_4)
    assert path.is_file()

    resumed = make_method(name, bb, seed=99)   # other initial values: the checkpoint must win
    h2 = fit(resumed, x, y, cfg, checkpoint=path)
    np.testing.assert_array_equal(resumed.params.flat, straight.params.flat)
    assert [e.loss for e in h2.epochs] == [e.loss for e in h1.epochs]
    assert len(h2.epochs) == 7


def test_checkpoint_every_and_finished_run(tmp_path):
    bb, x, y = _data()
    cfg = TrainConfig(epochs=5, batch_size=8, lr=0.05)
    path = tmp_path / "c"
    m = make_method("skip2-lora", bb)
    fit(m, x, y, cfg, checkpoint=path, checkpoint_every=2)
    again = make_method("skip2-lora", bb, seed=7)
    h = fit(again, x, y, cfg, checkpoint=path)   # already finished: nothing more to train
    np.testing.assert_array_equal(again.params.flat, m.params.flat)
    assert len(h.epochs) == 5


def test_checkpoint_of_another_run_is_refused(tmp_path):
    bb, x, y = _data()
    path = tmp_path / "c"
    fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=2), checkpoint=path)
    with pytest.raises(UsageError, match="another run.*config"):
        fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=3), checkpoint=path)
    with pytest.raises(UsageError, match="another run.*data"):
        fit(make_method("skip2-lora", bb), x[:-1], y[:-1], TrainConfig(epochs=2), checkpoint=path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelFileError):
        fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=2), checkpoint=path)


def test_checkpoint_saves_by_time_unless_told_an_epoch_count(tmp_path, monkeypatch):
    """Saving fsyncs the whole state: a short run saves at the end, not after every epoch."""
    from edgetune import checkpoint as ckpt
    from edgetune import train

    saved = []
    real_save = ckpt.save
    monkeypatch.setattr(ckpt, "save", lambda *a, **kw: (saved.append(kw["epoch"]), real_save(*a, **kw)))
    bb, x, y = _data()
    cfg = TrainConfig(epochs=30, batch_size=8, lr=0.05)
    fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=tmp_path / "a")
    assert saved == [30]                             # well under CHECKPOINT_SECONDS of training
    saved.clear()
    fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=tmp_path / "b", checkpoint_every=10)
    assert saved == [10, 20, 30]
    saved.clear()
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)   # every epoch is "due" by time
    fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=4, batch_size=8), checkpoint=tmp_path / "c")
    assert saved == [1, 2, 3, 4]
    with pytest.raises(UsageError, match="checkpoint_every"):
        fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=tmp_path / "d", checkpoint_every=0)


def test_checkpoint_with_nan_or_edited_is_refused_and_settings_are_named(tmp_path):
    from edgetune.checkpoint import _digest
    from edgetune.safetensors import load_file, save_file

    bb, x, y = _data()
    path = tmp_path / "c"
    fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=2), checkpoint=path)
    with pytest.raises(UsageError, match=r"epochs 3 \(checkpoint: 2\)"):
        fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=3), checkpoint=path)
    tensors, meta = load_file(path)
    tensors["params"] = tensors["params"].copy()
    tensors["params"][0] = np.nan
    save_file(tensors, path, meta)  # the old checksum: refused as edited
    with pytest.raises(ModelFileError, match="checksum"):
        fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=2), checkpoint=path)
    save_file(tensors, path, {**meta, "sha256": _digest(tensors)})  # consistent, but NaN
    with pytest.raises(ModelFileError, match="NaN"):
        fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=2), checkpoint=path)
