"""Damaged files, odd configs and out-of-range options get a clear error, not a traceback."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from edgetune.data.task import load_npz_task
from edgetune.errors import DataError

from .conftest import toy_task


def _task_arrays(n=20):
    x, y = toy_task(n=n)
    return dict(x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)


def _patch_shape(npy: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite the shape in a version-1.0 .npy header, keeping the header's length."""
    hlen = int.from_bytes(npy[8:10], "little")
    header = npy[10:10 + hlen].replace(old, new, 1)
    header = header.rstrip(b" \n")
    header = header + b" " * (hlen - 1 - len(header)) + b"\n"
    assert len(header) == hlen and new in header
    return npy[:10] + header + npy[10 + hlen:]


def test_npz_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **_task_arrays())
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "x_finetune.npy":
                data = _patch_shape(data, b"(20, 7)", b"(8000000000000, 7)")
            zout.writestr(info.filename, data)
    with pytest.raises(DataError, match=r"huge\.npz.*'x_finetune'.*8000000000000x7"):
        load_npz_task(bad)


def test_random_bytes_npz_is_not_a_valid_task_file(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"noise\.npz: not a valid \.npz task file") as e:
        load_npz_task(path)
    assert "allow_pickle" not in str(e.value)


def test_label_out_of_range_names_the_array_and_the_labels_list(tmp_path):
    arrays = _task_arrays()
    y_bad = arrays["y_test"].copy()
    y_bad[3] = 5
    np.savez(tmp_path / "t.npz", **{**arrays, "y_test": y_bad})
    with pytest.raises(DataError, match=r"largest label is 5 \(in y_test\)"):
        load_npz_task(tmp_path / "t.npz")
    np.savez(tmp_path / "n.npz", **arrays, labels=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"y_pretrain: labels must be in 0\.\.1 "
                                        r"\(the 'labels' array names 2 classes: a, b\)"):
        load_npz_task(tmp_path / "n.npz")
    np.savez(tmp_path / "e.npz", **arrays, labels=np.array(["a", "b", "c"]),
             x_eval_other=arrays["x_test"], y_eval_other=y_bad)
    with pytest.raises(DataError, match=r"y_eval_other: labels must be in 0\.\.2"):
        load_npz_task(tmp_path / "e.npz")


@pytest.mark.parametrize("args,option", [
    (["finetune", "--task", "TASK", "--budget", "-5KB"], "--budget"),
    (["finetune", "--task", "TASK", "--method", "skip2-lora", "--cache-budget", "-1"], "--cache-budget"),
    (["plan", "--model", "m", "--budget", "-5KB"], "--budget"),
    (["export", "--model", "m", "--target", "linux", "--out", "OUT", "--budget", "-.5MB"], "--budget"),
    (["plan", "--model", "m", "--budget=-5KB"], "--budget"),
])
def test_negative_budget_is_a_usage_error_not_an_unknown_option(tmp_path, capsys, args, option):
    from edgetune.cli import main

    np.savez(tmp_path / "t.npz", **_task_arrays())
    subst = {"TASK": str(tmp_path / "t.npz"), "OUT": str(tmp_path / "out")}
    args = [subst.get(a, a) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{option} must be a positive size" in err and "expected one argument" not in err


def _edit_json(path, **fields):
    import json

    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value", [
    ("labels", 5), ("labels", ["a", "b"]), ("labels", [1, 2, 3]), ("sizes", [7, "5", 3]), ("sizes", [7, 0, 3]),
    ("sizes", 7), ("activation", "swish"), ("activation", 3), ("dtype", "int4"),
])
def test_model_config_fields_are_checked_by_name(tmp_path, field, value):
    import edgetune as et
    from edgetune.errors import ModelFileError
    from edgetune.quant import quantize

    from .conftest import small_backbone

    bb = small_backbone(dtype=np.float32)
    bb.save(tmp_path / "m")
    _edit_json(tmp_path / "m" / "config.json", **{field: value})
    with pytest.raises(ModelFileError, match=rf"config\.json: field '{field}' must be"):
        et.Backbone.load(tmp_path / "m")
    if field == "dtype":
        return
    quantize(bb, toy_task(n=20)[0]).save(tmp_path / "q")
    _edit_json(tmp_path / "q" / "config.json", **{field: value})
    with pytest.raises(ModelFileError, match=rf"config\.json: field '{field}' must be"):
        et.Backbone.load(tmp_path / "q")


@pytest.mark.parametrize("field,value", [
    ("r", "2"), ("r", 0), ("lora_alpha", "big"), ("method", 3), ("train_last_bias", "yes"),
])
def test_adapter_config_fields_are_checked_by_name(tmp_path, field, value):
    import edgetune as et
    from edgetune.errors import ModelFileError

    from .conftest import small_backbone

    bb = small_backbone(dtype=np.float32)
    et.FineTuner(bb, "lora-all", rank=2, epochs=1).save_adapter(tmp_path / "a")
    _edit_json(tmp_path / "a" / "adapter_config.json", **{field: value})
    with pytest.raises(ModelFileError, match=rf"adapter_config\.json: field '{field}' must be"):
        et.FineTuner.load_adapter(bb, tmp_path / "a")


def test_cli_reports_a_bad_labels_field_without_a_traceback(tmp_path, capsys):
    from edgetune.cli import main

    from .conftest import small_backbone

    small_backbone(dtype=np.float32).save(tmp_path / "m")
    _edit_json(tmp_path / "m" / "config.json", labels=5)
    np.savez(tmp_path / "t.npz", **_task_arrays())
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--task", str(tmp_path / "t.npz")]) == 1
    assert "field 'labels' must be a list of 3 class names" in capsys.readouterr().err


def test_bench_refuses_zero_repeats(capsys):
    from edgetune.cli import main

    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_exploding_finite_loss_is_divergence(engine, monkeypatch):
    import edgetune as et
    from edgetune import core
    from edgetune.train import TrainingDiverged

    from .conftest import small_backbone

    if engine == "c" and not core.available():
        pytest.skip("compiled engine not built")
    monkeypatch.setenv("EDGETUNE_ENGINE", engine)
    x, y = toy_task(n=60)
    bb = small_backbone(dtype=np.float32)
    t = et.FineTuner(bb, "lora-all", epochs=10, lr=1e6, optimizer="adam")
    start = t.method.params.flat.copy()
    with pytest.raises(TrainingDiverged, match=r"loss became .*e\+\d+ in epoch 1; .*Lower the learning rate"):
        t.fit(x, y)
    np.testing.assert_array_equal(t.method.params.flat, start)


def test_huge_inputs_are_blamed_instead_of_the_learning_rate():
    import edgetune as et
    from edgetune.train import TrainingDiverged

    from .conftest import small_backbone

    x, y = toy_task(n=40)
    x[:, 0] = 3e38
    with pytest.raises(TrainingDiverged, match=r"inputs reach 3e\+38 after normalisation: check the data's "
                                               r"units/scaling") as e:
        et.FineTuner(small_backbone(dtype=np.float32), "ft-all", epochs=3).fit(x, y)
    assert "Lower the learning rate" not in str(e.value)


def test_rank_above_every_width_is_refused():
    import edgetune as et
    from edgetune.errors import UsageError

    from .conftest import small_backbone

    bb = small_backbone(dtype=np.float32)  # 7-5-4-3
    for method, widths in [("lora-all", "3, 4, 5, 7"), ("lora-last", "3, 4"), ("skip2-lora", "3, 4, 5, 7")]:
        with pytest.raises(UsageError, match=rf"rank 1000 .*{method} adapters apply to \({widths}\)"):
            et.FineTuner(bb, method, rank=1000)
    et.FineTuner(bb, "lora-last", rank=4)  # up to the widest layer is accepted


def test_evaluate_no_strict_loads_an_adapter_of_another_backbone(tmp_path, capsys):
    import edgetune as et
    from edgetune.cli import main

    from .conftest import small_backbone

    small_backbone(dtype=np.float32, seed=0).save(tmp_path / "m0")
    small_backbone(dtype=np.float32, seed=1).save(tmp_path / "m1")
    et.FineTuner(et.Backbone.load(tmp_path / "m0"), "lora-all", rank=2, epochs=1).save_adapter(tmp_path / "a")
    np.savez(tmp_path / "t.npz", **_task_arrays())
    args = ["evaluate", "--task", str(tmp_path / "t.npz"), "--model", str(tmp_path / "m1"),
            "--adapter", str(tmp_path / "a")]
    assert main(args) == 1
    assert "pass strict=False (CLI: --no-strict)" in capsys.readouterr().err
    assert main(args + ["--no-strict"]) == 0
    assert "test       accuracy" in capsys.readouterr().out
