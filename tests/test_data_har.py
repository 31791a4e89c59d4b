"""HAPT loader, window features and the har task."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from edgetune.data import har
from edgetune.errors import DataError, UsageError

from .conftest import DATA_DIR as DATA

HAPT_ZIP = DATA / "hapt" / "HAPT-RawData.zip"
needs_data = pytest.mark.skipif(not HAPT_ZIP.is_file(), reason=f"real data not found at {HAPT_ZIP}")
NAMES = har.HAR_FEATURE_NAMES


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def windows():
    return har.load_har_windows(DATA)


def feature(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, NAMES.index(name)]


# ---------------------------------------------------------------- features

def test_feature_names():
    assert len(NAMES) == len(set(NAMES)) == 8 * 18 + 6 == 150
    assert NAMES[0] == "acc_x_mean" and NAMES[-1] == "corr_gyro_yz"
    assert "gyro_mag_band_3_6hz" in NAMES and "acc_z_spec_entropy" in NAMES


def test_features_of_known_signals():
    t = np.arange(128) / 50.0
    w = np.zeros((2, 128, 6))
    f0 = 12 * 50.0 / 128  # 4.6875 Hz, exactly on an FFT bin
    w[0, :, 0] = 0.5 * np.sin(2 * np.pi * f0 * t)   # acc x: a pure tone
    w[0, :, 1] = 2.0 * w[0, :, 0]                    # acc y: the same tone, scaled
    w[0, :, 2] = 1.0                                 # acc z: gravity only
    w[1, :, 3] = np.where(np.arange(128) % 2 == 0, 1.0, -1.0)  # gyro x: 25 Hz square
    x = har.window_features(w)
    assert x.shape == (2, 150) and x.dtype == np.float32 and np.isfinite(x).all()
    assert feature(x, "acc_x_mean")[0] == pytest.approx(0.0, abs=1e-7)
    assert feature(x, "acc_x_std")[0] == pytest.approx(0.5 / np.sqrt(2), rel=1e-5)
    assert feature(x, "acc_x_energy")[0] == pytest.approx(0.125, rel=1e-5)
    assert feature(x, "acc_x_dom_freq")[0] == pytest.approx(f0)
    assert feature(x, "acc_x_spec_centroid")[0] == pytest.approx(f0, rel=1e-4)
    assert feature(x, "acc_x_spec_entropy")[0] == pytest.approx(0.0, abs=1e-4)
    assert feature(x, "acc_x_band_3_6hz")[0] == pytest.approx(1.0, abs=1e-5)
    assert feature(x, "acc_x_band_0_1.5hz")[0] == pytest.approx(0.0, abs=1e-5)
    assert feature(x, "acc_x_mean_cross_rate")[0] == pytest.approx(24 / 127, abs=1.5 / 127)
    assert feature(x, "acc_z_mean")[0] == 1.0 and feature(x, "acc_z_std")[0] == 0.0
    assert feature(x, "acc_z_dom_freq")[0] == 0.0  # constant: no frequency content
    assert feature(x, "acc_mag_max")[0] == pytest.approx(np.sqrt(1 + 5 * 0.25), rel=1e-5)
    assert feature(x, "corr_acc_xy")[0] == pytest.approx(1.0, abs=1e-5)
    assert feature(x, "corr_acc_xz")[0] == 0.0
    assert feature(x, "gyro_x_dom_freq")[1] == pytest.approx(25.0)
    assert feature(x, "gyro_x_band_12_25hz")[1] == pytest.approx(1.0, abs=1e-5)
    assert feature(x, "gyro_x_mean_cross_rate")[1] == pytest.approx(1.0)
    assert feature(x, "gyro_x_mean_abs_diff")[1] == pytest.approx(2.0)
    assert feature(x, "gyro_x_median")[1] == pytest.approx(0.0)
    assert feature(x, "gyro_mag_std")[1] == pytest.approx(0.0, abs=1e-6)
    # Band fractions of a non-constant channel sum to one.
    bands = [n for n in NAMES if n.startswith("acc_y_band_")]
    assert sum(feature(x, n)[0] for n in bands) == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, (3, 128, 6), elements=st.floats(-40, 40, allow_nan=False)))
def test_features_always_finite(w):
    x = har.window_features(w)
    assert x.shape == (3, 150) and np.isfinite(x).all()
    bands = [NAMES.index(n) for n in NAMES if "_band_" in n]
    assert (x[:, bands] >= -1e-6).all() and (x[:, bands] <= 1 + 1e-5).all()


def test_window_shape_is_checked():
    with pytest.raises(DataError, match=r"shape \(n, 128, 6\)"):
        har.window_features(np.zeros((2, 100, 6)))


# ---------------------------------------------------------------- real data

@needs_data
def test_windows_of_real_data(windows):
    hw = windows
    n = len(hw.x)
    assert n == 10411
    assert hw.x.shape == (n, 150) and hw.x.dtype == np.float32 and np.isfinite(hw.x).all()
    assert set(np.unique(hw.activity)) == set(range(6))
    assert set(np.unique(hw.subject)) == set(range(1, 31))
    # labels.txt line 1 is "1 1 5 250 1232": standing, 983 rows -> 14 windows of 128, step 64.
    seg0 = np.flatnonzero(hw.segment == 0)
    assert hw.start[seg0].tolist() == list(range(250, 250 + 14 * 64, 64))
    assert set(hw.activity[seg0]) == {4} and set(hw.experiment[seg0]) == {1}
    with zipfile.ZipFile(HAPT_ZIP) as z:
        acc = np.loadtxt(io.BytesIO(z.read("RawData/acc_exp01_user01.txt")))
        gyro = np.loadtxt(io.BytesIO(z.read("RawData/gyro_exp01_user01.txt")))
    raw = np.concatenate([acc[250:378], gyro[250:378]], axis=1)[None].astype(np.float32)
    np.testing.assert_allclose(hw.x[seg0[0]], har.window_features(raw)[0], rtol=1e-5, atol=1e-6)


@needs_data
def test_har_task_protocol(windows):
    task = har.har_task(DATA)
    assert task.labels == har.ACTIVITIES and task.n_features == 150
    assert (len(task.y_pretrain), len(task.y_finetune), len(task.y_test)) == (4754, 2835, 2758)
    for s in ("pretrain", "finetune", "test"):
        counts = np.bincount(getattr(task, f"y_{s}"), minlength=6)
        assert counts.min() > 0.6 * counts.max(), (s, counts)  # every class well represented
        x = getattr(task, f"x_{s}")
        assert x.dtype == np.float32 and np.isfinite(x).all()
    # Raw features by default (the backbone normalises); raw equals the window features.
    assert abs(task.x_pretrain.mean(axis=0)).max() > 0.1
    assert task.defaults == {"hidden": [96, 96], "epochs": 200, "batch_size": 20, "lr": 0.01,
                             "pretrain_epochs": 50}
    # standardize=True: z-scored with pre-training statistics only.
    z = har.har_task(DATA, standardize=True)
    np.testing.assert_allclose(z.x_pretrain.mean(axis=0), 0.0, atol=1e-3)
    assert abs(z.x_test.mean()) > 1e-3

    hw = windows
    pre = np.isin(hw.subject, range(1, 16))
    i_ft, i_te = har.split_by_time(hw, ~pre)
    assert len(i_ft) == 2835 and len(i_te) == 2758
    assert not set(hw.subject[pre]) & (set(hw.subject[i_ft]) | set(hw.subject[i_te]))
    assert set(hw.subject[i_ft]) == set(hw.subject[i_te]) == set(range(16, 31))
    assert not set(i_ft) & set(i_te)
    # No sample row is in a fine-tune window and a test window.
    for exp in np.unique(hw.experiment[i_te]):
        rows_ft = np.zeros(30000, bool)
        for s in hw.start[i_ft][hw.experiment[i_ft] == exp]:
            rows_ft[s:s + 128] = True
        for s in hw.start[i_te][hw.experiment[i_te] == exp]:
            assert not rows_ft[s:s + 128].any()
    # Fine-tune windows come before test windows, per subject and activity.
    for subj in range(16, 31):
        for act in range(6):
            a = (hw.subject[i_ft] == subj) & (hw.activity[i_ft] == act)
            b = (hw.subject[i_te] == subj) & (hw.activity[i_te] == act)
            if a.any() and b.any():
                ta = hw.experiment[i_ft][a] * 10**6 + hw.start[i_ft][a]
                tb = hw.experiment[i_te][b] * 10**6 + hw.start[i_te][b]
                assert ta.max() < tb.min()


@needs_data
def test_har_task_options():
    task = har.har_task(DATA, pretrain_subjects=range(1, 21), standardize=False, finetune_fraction=0.3)
    assert len(task.y_pretrain) > 6000 and len(task.y_finetune) < len(task.y_test)
    assert "pre-train subjects 1-20" in task.description
    with pytest.raises(UsageError, match="1..30"):
        har.har_task(DATA, pretrain_subjects=[0, 5])
    with pytest.raises(UsageError, match="leave no subject"):
        har.har_task(DATA, pretrain_subjects=range(1, 31))
    with pytest.raises(UsageError, match="finetune_fraction"):
        har.har_task(DATA, finetune_fraction=1.0)
    with pytest.raises(UsageError, match="unknown option"):
        har.har_task(DATA, window=64)


# ---------------------------------------------------------------- small synthetic RawData

def _fmt(a: np.ndarray) -> bytes:
    return "".join(" ".join(f"{v:.9e}" for v in row) + "\n" for row in a).encode()


def make_raw(root: Path, labels: str = "1 1 1 0 299\n1 1 7 300 350\n2 2 6 10 209\n",
             rows: int = 400) -> Path:
    raw = root / "hapt" / "RawData"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for exp, user in ((1, 1), (2, 2)):
        (raw / f"acc_exp{exp:02d}_user{user:02d}.txt").write_bytes(_fmt(rng.normal(size=(rows, 3))))
        (raw / f"gyro_exp{exp:02d}_user{user:02d}.txt").write_bytes(_fmt(rng.normal(size=(rows, 3))))
    (raw / "labels.txt").write_text(labels)
    return raw


def test_small_folder_windows(tmp_path):
    raw = make_raw(tmp_path)
    hw = har.extract_windows(raw)
    # 300 rows of walking -> 3 windows; the transition (7) is ignored; 200 rows laying -> 2.
    assert hw.start.tolist() == [0, 64, 128, 10, 74]
    assert hw.activity.tolist() == [0, 0, 0, 5, 5] and hw.subject.tolist() == [1, 1, 1, 2, 2]
    assert hw.x.shape == (5, 150)
    # Found through the data dir, and the same from a zip with a top folder inside.
    assert har.load_har_windows(tmp_path, cache=False).start.tolist() == hw.start.tolist()
    zpath = tmp_path / "alt" / "HAPT-RawData.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(raw.iterdir()):
            z.write(f, f"HAPT Data Set/RawData/{f.name}")
    hz = har.load_har_windows(zpath.parent)  # through the cache: first build, then read
    np.testing.assert_array_equal(hz.x, hw.x)
    np.testing.assert_array_equal(har.load_har_windows(zpath.parent).x, hw.x)


@pytest.mark.parametrize("damage,match", [
    ("labels_past_end", r"labels.txt line 3: segment ends at row 450 but acc_exp02_user02.txt has only 400 rows"),
    ("missing_gyro", r"gyro_exp02_user02.txt: missing \(labels.txt line 3"),
    ("non_numeric", r"acc_exp01_user01.txt line 5: not a number: 'x1'"),
    ("two_columns", r"gyro_exp01_user01.txt line 7: expected 3 numbers, got 2"),
    ("labels_float", r"labels.txt line 2: not an integer: '300.5'"),
    ("labels_short", r"labels.txt line 1: expected 5 numbers, got 4"),
])
def test_damaged_rawdata(tmp_path, damage, match):
    labels = "1 1 1 0 299\n1 1 7 300 350\n2 2 6 10 209\n"
    if damage == "labels_past_end":
        labels = labels.replace("10 209", "10 450")
    elif damage == "labels_float":
        labels = labels.replace("300 350", "300.5 350")
    elif damage == "labels_short":
        labels = labels.replace("1 1 1 0 299", "1 1 1 0")
    raw = make_raw(tmp_path, labels)
    if damage == "missing_gyro":
        (raw / "gyro_exp02_user02.txt").unlink()
    elif damage == "non_numeric":
        p = raw / "acc_exp01_user01.txt"
        lines = p.read_bytes().splitlines(keepends=True)
        lines[4] = b"x1 2 3\n"
        p.write_bytes(b"".join(lines))
    elif damage == "two_columns":
        p = raw / "gyro_exp01_user01.txt"
        lines = p.read_bytes().splitlines(keepends=True)
        lines[6] = b"1.0 2.0\n"
        p.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=match):
        har.extract_windows(raw)


@needs_data
def test_truncated_hapt_zip(tmp_path):
    p = tmp_path / "hapt" / "HAPT-RawData.zip"
    p.parent.mkdir()
    with open(HAPT_ZIP, "rb") as f:
        p.write_bytes(f.read(3_000_000))
    with pytest.raises(DataError, match="damaged or truncated zip") as e:
        har.har_task(tmp_path)
    assert str(p) in str(e.value)


def test_zip_without_rawdata(tmp_path):
    p = tmp_path / "HAPT-RawData.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("README.txt", "hello")
    with pytest.raises(DataError, match="no RawData/labels.txt inside"):
        har.extract_windows(p)


def test_missing_hapt_message(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as e:
        har.har_task()
    msg = str(e.value)
    assert str(tmp_path / "env") in msg and "$EDGETUNE_DATA" in msg and "user cache" in msg
    assert "edgetune data fetch hapt" in msg


@pytest.mark.skipif(not HAPT_ZIP.exists() and not (DATA / "hapt").is_dir(), reason="HAPT data not available")
def test_first_har_load_stays_small(tmp_path):
    """Feature extraction streams a block of windows at a time: a 512 MB board can parse HAPT."""
    import os
    import subprocess
    import sys

    # The peak is read as VmHWM after resetting it (clear_refs 5): a forked child otherwise starts
    # with its parent's high-water mark, which a test process holding torch is far above.
    code = ("import re; open('/proc/self/clear_refs', 'w').write('5'); from edgetune.data import har; "
            f"hw = har.load_har_windows({str(DATA)!r}); "
            "print(len(hw.x), re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # no parsed copy yet: the full extraction runs
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n, peak_kb = map(int, r.stdout.split())
    assert n > 10000 and any(tmp_path.rglob("*.npz"))
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
