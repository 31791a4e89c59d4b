"""Model and adapter files: round trips, interop with the reference safetensors, damage."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import edgetune as et
from edgetune import safetensors as st
from edgetune.errors import ModelFileError
from edgetune.io_atomic import write_atomic

from .conftest import small_backbone, toy_task


def test_safetensors_roundtrip_and_reference_interop(tmp_path):
    ref = pytest.importorskip("safetensors.numpy")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64),
               "c": np.zeros((0, 3), np.float64), "d": np.array([True, False]), "e": np.arange(5, dtype=np.int8)}
    st.save_file(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    theirs = ref.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
        assert theirs[k].dtype == v.dtype
    ref.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"x": "y"})
    back, meta = st.load_file(tmp_path / "ref.safetensors")
    assert meta == {"x": "y"}
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage", "empty", "bad_json", "bad_dtype",
                                    "overlap", "trailing"])
def test_damaged_safetensors_rejected(tmp_path, damage):
    blob = st.dumps({"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)})
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if damage == "truncate_data":
        blob = blob[:-5]
    elif damage == "truncate_header":
        blob = blob[:20]
    elif damage == "garbage":
        blob = os.urandom(200)
    elif damage == "empty":
        blob = b""
    elif damage == "bad_json":
        blob = blob[:8] + b"{" * n + blob[8 + n:]
    else:
        if damage == "bad_dtype":
            header["w"]["dtype"] = "Q9"
        elif damage == "overlap":
            header["w"]["data_offsets"] = [0, 64]
            header["b"]["data_offsets"] = [48, 64]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        tail = blob[8 + n:] + (b"xx" if damage == "trailing" else b"")
        blob = len(text).to_bytes(8, "little") + text + tail
    p = tmp_path / "m.safetensors"
    p.write_bytes(blob)
    with pytest.raises(ModelFileError, match="m.safetensors"):
        st.load_file(p)


def test_model_save_load_roundtrip(tmp_path):
    bb = small_backbone(dtype=np.float32)
    bb.labels = ["a", "b", "c"]
    bb.fit_normalizer(np.random.default_rng(0).normal(size=(20, 7)))
    bb.save(tmp_path / "m")
    back = et.Backbone.load(tmp_path / "m")
    assert back.sizes == bb.sizes and back.labels == ["a", "b", "c"] and back.digest() == bb.digest()
    x = np.random.default_rng(1).normal(size=(5, 7))
    np.testing.assert_array_equal(back.forward(back.prepare(x)), bb.forward(bb.prepare(x)))


def test_model_files_damaged_or_mismatched(tmp_path):
    bb = small_backbone(dtype=np.float32)
    bb.save(tmp_path / "m")
    with pytest.raises(ModelFileError, match="not found"):
        et.Backbone.load(tmp_path / "missing")
    w = tmp_path / "m" / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-3])
    with pytest.raises(ModelFileError, match="checksum"):
        et.Backbone.load(tmp_path / "m")
    # A weights file from another save: detected by the checksum in config.json.
    small_backbone(dtype=np.float32, seed=9).save(tmp_path / "other")
    w.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match="different saves"):
        et.Backbone.load(tmp_path / "m")
    w.write_bytes(good)
    cfg = tmp_path / "m" / "config.json"
    c = json.loads(cfg.read_text())
    c["sizes"] = [7, 5, 9, 3]
    cfg.write_text(json.dumps(c))
    with pytest.raises(ModelFileError, match=r"field 'sizes' \[7, 5, 9, 3\] does not match its layers"):
        et.Backbone.load(tmp_path / "m")
    # The layer descriptions and the tensors disagree: the tensor is named.
    c["sizes"] = [7, 5, 9, 3]
    c["layers"][1]["out_channels"] = 9
    c["layers"][2]["in_shape"] = [9]
    cfg.write_text(json.dumps(c))
    with pytest.raises(ModelFileError, match="layers.1.weight"):
        et.Backbone.load(tmp_path / "m")
    cfg.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        et.Backbone.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json is missing"):
        et.Backbone.load(tmp_path / "m")


@pytest.mark.parametrize("name", list(et.METHODS))
def test_adapter_roundtrip(tmp_path, name):
    bb = small_backbone(sizes=(7, 6, 5, 3), dtype=np.float32)
    x, y = toy_task(n=40, shift=1.0)
    t = et.FineTuner(bb, name, rank=2, alpha=4.0, train_last_bias=True, epochs=2, batch_size=8, lr=0.05).fit(x, y)
    t.save_adapter(tmp_path / "a")
    back = et.FineTuner.load_adapter(bb, tmp_path / "a")
    np.testing.assert_array_equal(back.decision_function(x), t.decision_function(x))
    assert back.method.options.rank == 2 and back.method.options.alpha == 4.0


def test_adapter_refuses_other_backbone(tmp_path):
    bb = small_backbone(dtype=np.float32)
    x, y = toy_task(n=20)
    et.FineTuner(bb, "skip2-lora", epochs=1).fit(x, y).save_adapter(tmp_path / "a")
    other = small_backbone(dtype=np.float32, seed=7)
    with pytest.raises(ModelFileError, match="different backbone"):
        et.FineTuner.load_adapter(other, tmp_path / "a")
    et.FineTuner.load_adapter(other, tmp_path / "a", strict=False)
    with pytest.raises(ModelFileError, match="sizes"):
        et.FineTuner.load_adapter(small_backbone(sizes=(7, 4, 3), dtype=np.float32), tmp_path / "a")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(p, boom)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]  # no temporary left behind
