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
    save_file(tensors, path, {**meta, "sha256": _digest(tensors, meta)})  # consistent, but NaN
    with pytest.raises(ModelFileError, match="NaN"):
        fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=2), checkpoint=path)


def test_a_save_writes_only_the_epochs_since_the_last_one(tmp_path, monkeypatch):
    """A save's cost does not grow with the epoch: the checkpoint file keeps one size, and the
    history journal beside it only grows by the new epochs (earlier bytes never rewritten)."""
    from edgetune import checkpoint as ckpt

    sizes, journals = [], []
    real_save = ckpt.save

    def watch(path, **kw):
        real_save(path, **kw)
        sizes.append(path.stat().st_size)
        journals.append((path.parent / f".{path.name}.edgetune-history").read_bytes())

    monkeypatch.setattr(ckpt, "save", watch)
    bb, x, y = _data()
    fit(make_method("skip2-lora", bb), x, y, TrainConfig(epochs=60, batch_size=8), checkpoint=tmp_path / "c",
        checkpoint_every=1)
    assert len(sizes) == 60 and max(sizes) - min(sizes) <= 16  # a few digits of the epoch count
    for k in range(1, 60):
        assert journals[k].startswith(journals[k - 1]) and journals[k].count(b"\n") == k + 1


def test_a_checkpoint_of_the_earlier_format_still_resumes(tmp_path):
    """Format 1 kept the history in the metadata and checked only the tensors; it is read, checked
    field by field, and the run continues bit-identically into the new format."""
    import json
    from dataclasses import asdict

    from edgetune import checkpoint as ckpt
    from edgetune.safetensors import load_file, save_file

    bb, x, y = _data()
    cfg = TrainConfig(epochs=6, batch_size=8, lr=0.05)
    straight = fit(make_method("skip2-lora", bb), x, y, cfg)

    def stop_at_3(rec):
        return rec.epoch == 3

    path = tmp_path / "c"
    fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=path, checkpoint_every=1, callback=stop_at_3)
    tensors, meta = load_file(path)
    journal = ckpt.HistoryJournal(path)
    history = journal.read(meta, path)
    old = {k: v for k, v in meta.items() if not k.startswith("history_") and k != "format_version"}
    old["history"] = json.dumps(history)
    old["sha256"] = ckpt._digest(tensors)
    save_file(tensors, path, old)
    journal.path.unlink()
    resumed = fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=path)
    assert [e.loss for e in resumed.epochs] == [e.loss for e in straight.epochs]
    assert load_file(path)[1]["format_version"] == "2"
    old["epoch"] = "5"  # format 1's metadata was outside the checksum: its values are still checked
    save_file(tensors, path, old)
    with pytest.raises(ModelFileError, match="history of 3 epochs for epoch 5"):
        fit(make_method("skip2-lora", bb), x, y, cfg, checkpoint=path)
    assert asdict(resumed.epochs[0]).keys() == asdict(straight.epochs[0]).keys()
