"""Cooling-fan loader and the damage1/damage2 tasks, on the real published zips."""
from __future__ import annotations

import csv
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgetune.data import fan
from edgetune.data.locate import find_dataset
from edgetune.errors import DataError, UsageError

from .conftest import DATA_DIR as DATA

FAN = DATA / "cooling-fan"
needs_data = pytest.mark.skipif(not FAN.is_dir(), reason=f"real data not found at {FAN}")


pytestmark = pytest.mark.usefixtures("private_cache")


def test_parse_recording_name():
    assert fan.parse_recording_name("12cm_hmlo_damage1_noisy_1") == ("12cm", "hmlo", "damage1", "noisy", "1")
    assert fan.parse_recording_name("8cm_h_normal_silentA") == ("8cm", "h", "normal", "silentA", "")
    assert fan.parse_recording_name("README") is None


@needs_data
def test_list_recordings_filters():
    recs = fan.list_recordings(DATA, size="12cm", speed="hmlo", type="damage1")
    assert [r.name for r in recs] == [
        "12cm_hmlo_damage1_noisy_1", "12cm_hmlo_damage1_noisy_2",
        "12cm_hmlo_damage1_silentA_1", "12cm_hmlo_damage1_silentA_2",
        "12cm_hmlo_damage1_silentB_1", "12cm_hmlo_damage1_silentB_2"]
    assert len(fan.list_recordings(DATA, size="8cm")) == 6
    assert [r.name for r in fan.list_recordings(FAN, size="12cm", speed="h", environment=["noisy"])] == [
        "12cm_h_normal_noisy"]
    assert len(fan.list_recordings(DATA, size="12cm", part="")) == 12
    assert len(fan.list_recordings(DATA, type=["damage1", "damage2"], part="_2")) == 6
    with pytest.raises(UsageError, match="unknown fan speed 'fast'"):
        fan.list_recordings(DATA, speed="fast")


@needs_data
def test_read_recording_values_and_time_order():
    path = FAN / "12cm_hmlo_damage1_noisy_1.zip"
    x, times = fan.read_recording_zip(path)
    assert x.shape == (235, 512) and x.dtype == np.float32
    assert times == sorted(times) and len(set(times)) == 235
    with zipfile.ZipFile(path) as z:
        first = min(n for n in z.namelist() if n.endswith(".csv"))
        last = max(n for n in z.namelist() if n.endswith(".csv"))
        rows0 = list(csv.reader(io.TextIOWrapper(z.open(first))))
        rowsN = list(csv.reader(io.TextIOWrapper(z.open(last))))
    assert first.endswith(times[0] + ".csv")
    np.testing.assert_array_equal(x[0], np.array([float(r[1]) for r in rows0], np.float32))
    np.testing.assert_array_equal(x[-1], np.array([float(r[1]) for r in rowsN], np.float32))
    assert 0.9 < x.max() <= 1.0 + 1e-6 and x.min() >= 0.0  # spectra are peak-normalised


@needs_data
def test_parsed_cache_is_used_and_refreshed(tmp_path):
    src = tmp_path / "12cm_hmlo_normal_noisy_2.zip"
    shutil.copyfile(FAN / src.name, src)
    x1, t1 = fan.load_recording(src)
    cfile = fan._cache_file(src)
    assert cfile.is_file()
    with np.load(cfile) as z:
        np.testing.assert_array_equal(z["x"], x1)
    x2, t2 = fan.load_recording(src)
    np.testing.assert_array_equal(x1, x2)
    assert t1 == t2
    st_ = src.stat()
    os.utime(src, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # "changed" zip -> new key
    x3, _ = fan.load_recording(src)
    np.testing.assert_array_equal(x1, x3)
    assert not cfile.exists() and fan._cache_file(src).is_file()
    # A damaged cache entry is rebuilt, not trusted.
    fan._cache_file(src).write_bytes(b"not an npz")
    np.testing.assert_array_equal(fan.load_recording(src)[0], x1)


@needs_data
@pytest.mark.parametrize("name,epochs", [("damage1", 100), ("damage2", 60)])
def test_damage_task_splits(name, epochs):
    task = getattr(fan, f"{name}_task")(DATA)
    assert task.labels == ["normal", name]
    assert task.n_features == 512
    counts = {s: np.bincount(getattr(task, f"y_{s}"), minlength=2).tolist()
              for s in ("pretrain", "finetune", "test")}
    assert counts == {"pretrain": [470, 470], "finetune": [235, 235], "test": [235, 235]}
    x_si, y_si = task.extra_tests["silent"]
    assert np.bincount(y_si).tolist() == [470, 470]
    for x in (task.x_pretrain, task.x_finetune, task.x_test, x_si):
        assert x.dtype == np.float32 and np.isfinite(x).all()
    assert task.defaults == {"hidden": [96, 96], "epochs": epochs, "batch_size": 20, "lr": 0.01,
                             "pretrain_epochs": 100}
    # Splits are different recordings: no spectrum appears in two of them.
    seen: dict[bytes, str] = {}
    for split, x in [("pretrain", task.x_pretrain), ("finetune", task.x_finetune),
                     ("test", task.x_test), ("silent", x_si)]:
        for row in x:
            key = row.tobytes()
            assert seen.setdefault(key, split) == split, f"a spectrum is in {seen[key]} and {split}"
    # The fine-tune split is exactly the noisy_1 recordings, normal first.
    x_n1, _ = fan.load_recording(FAN / "12cm_hmlo_normal_noisy_1.zip")
    np.testing.assert_array_equal(task.x_finetune[:235], x_n1)


@needs_data
def test_damage_task_rejects_unknown_option():
    with pytest.raises(UsageError, match="unknown option"):
        fan.damage1_task(DATA, epochs=3)


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DataError) as e:
        fan.damage1_task(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "edgetune data fetch cooling-fan" in msg and "--data-dir" in msg


# ---------------------------------------------------------------- damaged input

def _spectrum_csv(values, index=None) -> bytes:
    index = range(len(values)) if index is None else index
    return "".join(f"{i}, {v:.6f}\n" for i, v in zip(index, values)).encode()


def _make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(path.stem + "/", b"")
        for name, data in files.items():
            z.writestr(f"{path.stem}/{name}", data)
    return path


GOOD = _spectrum_csv(np.linspace(0, 1, 512))


def test_small_zip_roundtrip_and_order(tmp_path):
    later = _spectrum_csv(np.full(512, 0.5))
    p = _make_zip(tmp_path / "12cm_hmlo_normal_noisy_1.zip",
                  {"2022-02-10-05-28-30.csv": later, "2022-02-10-05-25-26.csv": GOOD})
    x, times = fan.read_recording_zip(p)
    assert times == ["2022-02-10-05-25-26", "2022-02-10-05-28-30"]
    np.testing.assert_allclose(x[0], np.linspace(0, 1, 512), atol=1e-6)
    np.testing.assert_array_equal(x[1], np.full(512, 0.5, np.float32))


@pytest.mark.parametrize("bad,match", [
    (GOOD[: GOOD.rindex(b"510,")], r"has 510 lines, expected 512"),
    (GOOD + b"512, 0.1\n", r"has 513 lines"),
    (GOOD.replace(b"7, 0.013699", b"7, abc"), r"line 8: not a number: 'abc'"),
    (GOOD.replace(b"7, 0.013699", b"7, 0.1, 3"), r"line 8: expected 2 comma-separated values"),
    (GOOD.replace(b"7, 0.013699", b"9, 0.013699"), r"line 8: index is 9, expected 7"),
    (GOOD.replace(b"7, 0.013699", b"7, nan"), r"line 8: amplitude is not a finite number"),
    (b"", r"has 0 lines"),
])
def test_malformed_csv_names_file_and_line(tmp_path, bad, match):
    p = _make_zip(tmp_path / "12cm_h_normal_noisy.zip",
                  {"2022-02-10-01-00-00.csv": GOOD, "2022-02-10-01-00-01.csv": bad})
    with pytest.raises(DataError, match=match) as e:
        fan.read_recording_zip(p)
    assert "12cm_h_normal_noisy.zip" in str(e.value) and "2022-02-10-01-00-01.csv" in str(e.value)


@needs_data
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_zip_is_a_data_error(tmp_path, keep):
    data = (FAN / "12cm_hmlo_normal_noisy_1.zip").read_bytes()
    p = tmp_path / "12cm_hmlo_normal_noisy_1.zip"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match="damaged or truncated zip") as e:
        fan.load_recording(p)
    assert str(p) in str(e.value)


def test_corrupt_member_is_a_data_error(tmp_path):
    p = _make_zip(tmp_path / "12cm_h_normal_noisy.zip", {"2022-02-10-01-00-00.csv": GOOD})
    raw = bytearray(p.read_bytes())
    start = raw.index(b"2022-02-10-01-00-00.csv") + len("2022-02-10-01-00-00.csv")
    for i in range(start + 10, start + 60):  # scramble the compressed payload
        raw[i] ^= 0x5A
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="damaged or truncated zip"):
        fan.read_recording_zip(p)


def test_zip_without_spectra(tmp_path):
    p = _make_zip(tmp_path / "12cm_h_normal_noisy.zip", {"notes.txt": b"hello"})
    with pytest.raises(DataError, match="no spectrum files"):
        fan.read_recording_zip(p)


def test_find_dataset_accepts_the_fan_folder_itself(tmp_path):
    _make_zip(tmp_path / "12cm_h_normal_noisy.zip", {"2022-02-10-01-00-00.csv": GOOD})
    assert find_dataset("cooling-fan", tmp_path).path == tmp_path
    (tmp_path / "sub" / "cooling-fan").mkdir(parents=True)
    shutil.copy(tmp_path / "12cm_h_normal_noisy.zip", tmp_path / "sub" / "cooling-fan")
    assert find_dataset("cooling-fan", tmp_path / "sub").path == tmp_path / "sub" / "cooling-fan"


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.lists(st.floats(0, 2, allow_nan=False, width=32), min_size=1, max_size=16),
                       min_size=1, max_size=3),
       style=st.sampled_from(["{i}, {a!r}", "{i},{a:.6e}", "  {i} ,\t{a!r} "]),
       crlf=st.booleans(), trailing_newline=st.booleans())
def test_parser_roundtrip(pieces, style, crlf, trailing_newline):
    # Each spectrum repeats a short drawn pattern to 512 values (keeps examples small).
    values = np.array([np.resize(np.array(p, np.float32), 512) for p in pieces])
    blobs = []
    for v in values:
        text = "\n".join(style.format(i=i, a=float(a)) for i, a in enumerate(v))
        text += "\n" if trailing_newline else ""
        blobs.append(text.replace("\n", "\r\n").encode() if crlf else text.encode())
    x = fan.parse_spectrum_csvs(blobs, [f"f{i}.csv" for i in range(len(blobs))], "test.zip")
    assert x.dtype == np.float32 and x.shape == (len(values), 512)
    if "e}" in style:
        np.testing.assert_allclose(x, values, rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(x, values)
