"""Raw HAR windows (har-raw), the gravity filter, the one-channel fan tasks and the task registry."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgetune.data import BUILTIN_TASKS, fan, har, load_task
from edgetune.errors import DataError, UsageError

from .conftest import DATA_DIR as DATA
from .test_data_har import HAPT_ZIP, make_raw, needs_data

FAN_DIR = DATA / "cooling-fan"
needs_fan = pytest.mark.skipif(not FAN_DIR.is_dir(), reason=f"real data not found at {FAN_DIR}")

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def raw():
    return har.load_har_raw_windows(DATA)


# ---------------------------------------------------------------- the gravity filter, by hand

def butterworth_lowpass(order: int, cutoff: float, rate: float) -> tuple[list[float], list[float]]:
    """Digital Butterworth low-pass (b, a) designed by hand: analog poles on the unit circle's
    left half, prewarped, through the bilinear transform; zeros at z = -1; unit gain at DC."""
    warped = 2 * rate * np.tan(np.pi * cutoff / rate)
    s = warped * np.exp(1j * np.pi * (2 * np.arange(order) + order + 1) / (2 * order))
    z = (2 * rate + s) / (2 * rate - s)
    a = np.real(np.poly(z))
    b = np.poly(-np.ones(order)).real
    b = b * a.sum() / b.sum()
    return b.tolist(), a.tolist()


def lfilter(b: list[float], a: list[float], x: list[float]) -> list[float]:
    """The difference equation of a 3rd-order filter, sample by sample, from a zero state."""
    assert len(b) == len(a) == 4
    b0, b1, b2, b3 = (v / a[0] for v in b)
    _, a1, a2, a3 = (v / a[0] for v in a)
    x1 = x2 = x3 = y1 = y2 = y3 = 0.0
    y = []
    for v in x:
        out = b0 * v + b1 * x1 + b2 * x2 + b3 * x3 - a1 * y1 - a2 * y2 - a3 * y3
        x3, x2, x1 = x2, x1, v
        y3, y2, y1 = y2, y1, out
        y.append(out)
    return y


def gravity_by_hand(sig: np.ndarray) -> np.ndarray:
    """The recording and its mirror repeat with a period of 2n - 2 rows; run the filter
    forward over three periods and backward over the result, and keep the middle period:
    the state left from the start has decayed by then (the slowest pole is ~0.98)."""
    b, a = butterworth_lowpass(har.GRAVITY_ORDER, har.GRAVITY_CUTOFF_HZ, har.RATE_HZ)
    out = np.empty_like(sig, dtype=np.float64)
    for c in range(sig.shape[1]):
        x = sig[:, c].astype(np.float64)
        period = np.concatenate([x, x[-2:0:-1]])
        ext = np.tile(period, 3).tolist()
        fwd = lfilter(b, a, ext)
        both = lfilter(b, a, fwd[::-1])[::-1]
        out[:, c] = both[len(period):len(period) + len(x)]
    return out


def test_gravity_is_forward_backward_butterworth():
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(scale=0.05, size=(2500, 2)), axis=0) + [1.0, -0.3]
    np.testing.assert_allclose(har.gravity(walk), gravity_by_hand(walk), rtol=0, atol=1e-7)


def test_gravity_of_known_signals():
    t = np.arange(6000) / har.RATE_HZ
    sig = np.stack([0.98 + 0.5 * np.sin(2 * np.pi * 5.0 * t),       # gravity + a 5 Hz motion
                    np.sin(2 * np.pi * 0.3 * t),                      # at the cut-off frequency
                    0.2 * np.sin(2 * np.pi * 0.02 * t)], axis=1)      # a slow tilt
    g = har.gravity(sig)
    mid = slice(1000, 5000)  # 20 s from the ends, where the mirror image is felt
    np.testing.assert_allclose(g[mid, 0], 0.98, atol=1e-6)
    np.testing.assert_allclose(g[:, 0], 0.98, atol=0.03)
    assert np.abs(g[mid, 1]).max() == pytest.approx(0.5, abs=2e-3)  # filtfilt: -6 dB at 0.3 Hz
    np.testing.assert_allclose(g[mid, 2], sig[mid, 2], atol=1e-4)
    body = har.raw_signals(np.concatenate([sig, sig], axis=1))
    np.testing.assert_allclose(body[mid, 0], 0.5 * np.sin(2 * np.pi * 5.0 * t[mid]), atol=1e-6)
    np.testing.assert_array_equal(body[:, 3:], sig)  # the gyroscope is kept as recorded
    # A recording of one row or two is still defined (no reflection is possible).
    assert har.gravity(np.ones((1, 3))).tolist() == [[1.0, 1.0, 1.0]]
    np.testing.assert_allclose(har.gravity(np.ones((2, 3))), 1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.data())
def test_gather_in_place_is_fancy_indexing(n, data):
    order = np.array(data.draw(st.permutations(range(n)))[:data.draw(st.integers(1, n))])
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    want = x[order].copy()
    got = har._gather_in_place(x, order)
    assert np.shares_memory(got, x)
    np.testing.assert_array_equal(got, want)


def test_cache_files_are_npz_files():
    arrays = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, :, ::2], "n": np.array(5),
              "empty": np.zeros((0, 3)), "long": np.arange(300_001, dtype=np.int64)}
    buf = io.BytesIO()
    har._save_npz(buf, arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(arrays)
        for k, a in arrays.items():
            assert z[k].dtype == a.dtype and z[k].shape == a.shape, k
            np.testing.assert_array_equal(z[k], a)


# ---------------------------------------------------------------- real data

@needs_data
def test_raw_windows_of_real_data(raw):
    feats = har.load_har_windows(DATA)
    assert raw.x.shape == (10411, 6, 128) and raw.x.dtype == np.float32 and np.isfinite(raw.x).all()
    # The same windows, in the same order, with the same labels as har.
    for k in ("activity", "subject", "experiment", "start", "segment"):
        np.testing.assert_array_equal(getattr(raw, k), getattr(feats, k), err_msg=k)
    # Gravity is gone from the body acceleration; the total acceleration's mean is not ~0.
    body_mean = raw.x[:, 0:3].mean(axis=(0, 2))
    assert np.abs(body_mean).max() < 0.01, body_mean
    acc_mean = np.array([feats.x[:, har.HAR_FEATURE_NAMES.index(f"acc_{a}_mean")].mean() for a in "xyz"])
    assert np.abs(acc_mean).max() > 0.5
    # Every channel moves: walking windows shake more than laying ones.
    std = raw.x.std(axis=2)  # (n, 6)
    walking, laying = raw.activity == 0, raw.activity == 5
    assert (std[walking].mean(axis=0) > 3 * std[laying].mean(axis=0)).all()


@needs_data
def test_windowing_by_hand_on_one_recording(raw):
    with zipfile.ZipFile(HAPT_ZIP) as z:
        acc = np.loadtxt(io.BytesIO(z.read("RawData/acc_exp01_user01.txt")))
        gyro = np.loadtxt(io.BytesIO(z.read("RawData/gyro_exp01_user01.txt")))
    n = min(len(acc), len(gyro))
    body = acc[:n] - gravity_by_hand(acc[:n])
    # labels.txt line 1 is "1 1 5 250 1232": standing, 14 windows of 128 rows, step 64.
    seg0 = np.flatnonzero(raw.segment == 0)
    assert raw.start[seg0].tolist() == list(range(250, 250 + 14 * 64, 64))
    for i, s in zip(seg0, raw.start[seg0]):
        want = np.concatenate([body[s:s + 128], gyro[s:s + 128]], axis=1).T
        np.testing.assert_allclose(raw.x[i], want, rtol=0, atol=2e-6)
    # How many windows lie within 10 s (500 rows) of their recording's start or end, where
    # the gravity estimate depends on how the recording is extended (docs/data.md).
    with zipfile.ZipFile(HAPT_ZIP) as z:
        rows = {}
        for e, u in set(zip(raw.experiment.tolist(), raw.subject.tolist())):
            rows[e] = min(z.read(f"RawData/{k}_exp{e:02d}_user{u:02d}.txt").count(b"\n") for k in ("acc", "gyro"))
    ends = np.array([rows[e] for e in raw.experiment.tolist()])
    assert np.sum((raw.start < 500) | (raw.start + 128 > ends - 500)) == 134
    # Every window of experiment 1 is its rows, gravity removed.
    exp1 = np.flatnonzero(raw.experiment == 1)
    assert len(exp1) > 100
    for i in exp1[::7]:
        s = raw.start[i]
        np.testing.assert_allclose(raw.x[i, 3:], gyro[s:s + 128].T, rtol=0, atol=1e-6)
        np.testing.assert_allclose(raw.x[i, :3], body[s:s + 128].T, rtol=0, atol=2e-6)


@needs_data
def test_har_raw_task_protocol(raw):
    task = load_task("har-raw", DATA)
    ref = har.har_task(DATA)
    assert task.name == "har-raw" and task.labels == har.ACTIVITIES
    assert task.input_shape == (6, 128) and task.n_features == 768
    assert (len(task.y_pretrain), len(task.y_finetune), len(task.y_test)) == (4754, 2835, 2758)
    for s in ("pretrain", "finetune", "test"):
        np.testing.assert_array_equal(getattr(task, f"y_{s}"), getattr(ref, f"y_{s}"))
        x = getattr(task, f"x_{s}")
        assert x.dtype == np.float32 and x.shape[1:] == (6, 128) and np.isfinite(x).all()
    # Windows are those of the same split indices as har; subjects are disjoint.
    i_pre, i_ft, i_te = har.subject_splits(raw, set(range(1, 16)), 0.5)
    np.testing.assert_array_equal(task.x_pretrain, raw.x[i_pre])
    np.testing.assert_array_equal(task.x_finetune, raw.x[i_ft])
    np.testing.assert_array_equal(task.x_test, raw.x[i_te])
    assert set(raw.subject[i_pre]) == set(range(1, 16))
    assert set(raw.subject[i_ft]) == set(raw.subject[i_te]) == set(range(16, 31))
    # Not standardised by the loader: channel scales differ (g versus rad/s, body motion).
    assert "subjects 1-15" in task.description and "body acc" in task.description
    assert "hidden" not in task.defaults
    with pytest.raises(UsageError, match="har-raw: unknown option.*standardize"):
        har.har_raw_task(DATA, standardize=True)
    with pytest.raises(UsageError, match="1..30"):
        har.har_raw_task(DATA, pretrain_subjects=[31])
    with pytest.raises(UsageError, match="finetune_fraction"):
        har.har_raw_task(DATA, finetune_fraction=0)
    small = har.har_raw_task(DATA, pretrain_subjects=range(1, 21), finetune_fraction=0.3)
    assert len(small.y_pretrain) > 6000 and len(small.y_finetune) < len(small.y_test)


@needs_data
def test_a_conv_backbone_normalises_the_raw_channels():
    """The loader leaves the channels raw; a conv backbone standardises them per channel."""
    from edgetune import Backbone
    from edgetune.nn.layers import Layer, LayerSpec

    task = load_task("har-raw", DATA)
    rng = np.random.default_rng(0)
    specs = [LayerSpec.conv((6, 128), 8, 5, stride=2, activation="relu"), None, None]
    specs[1] = LayerSpec.gap(specs[0].out_shape)
    specs[2] = LayerSpec.dense(8, 6)
    layers = [Layer(s, rng.normal(size=s.weight_shape).astype(np.float32) * 0.1,
                    np.zeros(s.bias_shape, np.float32)) if s.has_params else Layer(s) for s in specs]
    bb = Backbone.from_layers(layers, labels=task.labels).fit_normalizer(task.x_pretrain)
    per_channel = task.x_pretrain.transpose(1, 0, 2).reshape(6, -1).astype(np.float64)
    np.testing.assert_allclose(bb.input_mean.ravel(), per_channel.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bb.input_std.ravel(), per_channel.std(axis=1), rtol=1e-5)
    assert bb.input_std.ravel()[3:].min() > 0.05 and bb.input_std.ravel()[:3].min() > 0.02
    prepared = bb.prepare(task.x_test[:50])
    assert bb.forward(prepared).shape == (50, 6)


@needs_data
def test_a_small_cnn_learns_har_raw_across_subjects():
    """The raw windows carry the activity: a two-layer 1-D CNN trained for 5 epochs on 1,000
    pre-training windows classifies new subjects far above chance (1/6)."""
    import edgetune as et
    from edgetune.nn.layers import Layer, LayerSpec

    task = load_task("har-raw", DATA)
    rng = np.random.default_rng(0)
    c1 = LayerSpec.conv((6, 128), 16, 5, stride=2, activation="relu")
    c2 = LayerSpec.conv(c1.out_shape, 16, 5, stride=2, activation="relu")
    specs = [c1, c2, LayerSpec.gap(c2.out_shape), LayerSpec.dense(16, 6)]

    def layer(s):
        if not s.has_params:
            return Layer(s)
        fan_in = int(np.prod(s.weight_shape[1:]))
        return Layer(s, (rng.normal(size=s.weight_shape) * np.sqrt(2 / fan_in)).astype(np.float32),
                     np.zeros(s.bias_shape, np.float32))

    bb = et.Backbone.from_layers([layer(s) for s in specs], labels=task.labels)
    bb.fit_normalizer(task.x_pretrain)
    idx = rng.choice(len(task.y_pretrain), 1000, replace=False)
    tuner = et.FineTuner(bb, "ft-all", epochs=5, batch_size=20, lr=0.05, seed=0)
    tuner.fit(task.x_pretrain[idx], task.y_pretrain[idx])
    assert tuner.score(task.x_test, task.y_test) > 0.4


# ---------------------------------------------------------------- small synthetic RawData

def test_small_folder_raw_windows(tmp_path):
    folder = make_raw(tmp_path)
    hw = har.extract_raw_windows(folder)
    ref = har.extract_windows(folder)
    assert hw.x.shape == (5, 6, 128) and hw.start.tolist() == ref.start.tolist() == [0, 64, 128, 10, 74]
    np.testing.assert_array_equal(hw.activity, ref.activity)
    acc = np.loadtxt(folder / "acc_exp02_user02.txt")
    gyro = np.loadtxt(folder / "gyro_exp02_user02.txt")
    np.testing.assert_allclose(hw.x[3, :3], (acc - gravity_by_hand(acc))[10:138].T, rtol=0, atol=1e-6)
    np.testing.assert_allclose(hw.x[4, 3:], gyro[74:202].T, rtol=0, atol=1e-6)
    # Through the cache: built once, then read back the same; features live beside it.
    first = har.load_har_raw_windows(tmp_path)
    np.testing.assert_array_equal(first.x, hw.x)
    np.testing.assert_array_equal(har.load_har_raw_windows(tmp_path).x, hw.x)
    np.testing.assert_array_equal(har.load_har_windows(tmp_path).x, ref.x)


def test_damaged_raw_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_raw(tmp_path)
    want = har.load_har_raw_windows(tmp_path).x
    (entry,) = (tmp_path / "cache").rglob("raw-*.npz")
    entry.write_bytes(entry.read_bytes()[:200])
    np.testing.assert_array_equal(har.load_har_raw_windows(tmp_path).x, want)


@pytest.mark.parametrize("damage,match", [
    ("labels_past_end", r"labels.txt line 3: segment ends at row 450 but acc_exp02_user02.txt has only 400 rows"),
    ("missing_acc", r"acc_exp01_user01.txt: missing \(labels.txt line 1"),
    ("non_numeric", r"gyro_exp02_user02.txt line 9: not a number: 'nan\?'"),
    ("not_finite", r"acc_exp02_user02.txt line 3: value is not a finite number"),
    ("bad_segment", r"labels.txt line 3: bad segment 209..10"),
    ("no_windows", r"no window of 128 samples fits"),
])
def test_damaged_rawdata_for_raw_windows(tmp_path, damage, match):
    labels = "1 1 1 0 299\n1 1 7 300 350\n2 2 6 10 209\n"
    if damage == "labels_past_end":
        labels = labels.replace("10 209", "10 450")
    elif damage == "bad_segment":
        labels = labels.replace("10 209", "209 10")
    elif damage == "no_windows":
        labels = "1 1 1 0 100\n2 2 6 10 20\n"
    folder = make_raw(tmp_path, labels)
    if damage == "missing_acc":
        (folder / "acc_exp01_user01.txt").unlink()
    elif damage in ("non_numeric", "not_finite"):
        p = folder / ("gyro_exp02_user02.txt" if damage == "non_numeric" else "acc_exp02_user02.txt")
        lines = p.read_bytes().splitlines(keepends=True)
        i, line = (8, b"0.1 nan? 0.3\n") if damage == "non_numeric" else (2, b"0.1 inf 0.3\n")
        lines[i] = line
        p.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=match):
        har.extract_raw_windows(folder)


@needs_data
def test_truncated_zip_for_har_raw(tmp_path):
    p = tmp_path / "hapt" / "HAPT-RawData.zip"
    p.parent.mkdir()
    with open(HAPT_ZIP, "rb") as f:
        p.write_bytes(f.read(2_000_000))
    with pytest.raises(DataError, match="damaged or truncated zip") as e:
        load_task("har-raw", tmp_path)
    assert str(p) in str(e.value)


def test_missing_hapt_for_har_raw(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match="edgetune data fetch hapt"):
        load_task("har-raw")


@pytest.mark.skipif(not HAPT_ZIP.exists(), reason="HAPT data not available")
def test_first_har_raw_load_stays_small(tmp_path):
    """The raw windows are one preallocated array filled a recording at a time."""
    import os
    import subprocess
    import sys

    code = ("import re; open('/proc/self/clear_refs', 'w').write('5'); from edgetune.data import har; "
            f"t = har.har_raw_task({str(DATA)!r}); "
            "print(len(t.y_pretrain), re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # no parsed copy yet: the full extraction runs
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n, peak_kb = map(int, r.stdout.split())
    assert n == 4754 and any(tmp_path.rglob("raw-*.npz"))
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"


# ---------------------------------------------------------------- fan spectra as one channel

@needs_fan
@pytest.mark.parametrize("damage", ["damage1", "damage2"])
def test_one_channel_fan_tasks(damage):
    flat = load_task(damage, DATA)
    one = load_task(f"{damage}-1d", DATA)
    assert one.name == f"{damage}-1d" and one.labels == flat.labels
    assert one.input_shape == (1, 512) and one.n_features == flat.n_features == 512
    for s in ("pretrain", "finetune", "test"):
        x = getattr(one, f"x_{s}")
        assert x.shape == (len(getattr(flat, f"x_{s}")), 1, 512)
        np.testing.assert_array_equal(x[:, 0], getattr(flat, f"x_{s}"))
        np.testing.assert_array_equal(getattr(one, f"y_{s}"), getattr(flat, f"y_{s}"))
    (xs, ys), (fs, fy) = one.extra_tests["silent"], flat.extra_tests["silent"]
    assert xs.shape == (940, 1, 512)
    np.testing.assert_array_equal(xs[:, 0], fs)
    np.testing.assert_array_equal(ys, fy)
    assert "hidden" not in one.defaults and one.defaults["epochs"] == flat.defaults["epochs"]
    with pytest.raises(UsageError, match="unknown option"):
        load_task(f"{damage}-1d", DATA, channels=2)


def test_one_channel_fan_task_missing_recording(tmp_path):
    (tmp_path / "cooling-fan").mkdir()
    with zipfile.ZipFile(tmp_path / "cooling-fan" / "12cm_hmlo_normal_silentA_1.zip", "w") as z:
        z.writestr("12cm_hmlo_normal_silentA_1/2020-01-01-00-00-00.csv",
                   "".join(f"{i}, 0.5\n" for i in range(512)))
    with pytest.raises(DataError, match=r"12cm_hmlo_normal_silentB_1.zip is missing \(needed by the damage2 task\)"):
        fan.damage2_1d_task(tmp_path)


# ---------------------------------------------------------------- the registry and the CLI

def test_registry_lists_the_new_tasks():
    shapes = {name: t.input_shape for name, t in BUILTIN_TASKS.items()}
    assert shapes == {"damage1": (512,), "damage2": (512,), "damage1-1d": (1, 512),
                      "damage2-1d": (1, 512), "har": (150,), "har-raw": (6, 128)}
    assert {t.data_set for t in BUILTIN_TASKS.values()} == {"cooling-fan", "hapt"}


@needs_data
@needs_fan
def test_declared_shapes_are_the_loaded_ones():
    for name, entry in BUILTIN_TASKS.items():
        assert load_task(name, DATA).input_shape == entry.input_shape, name


@needs_data
@needs_fan
def test_cli_data_list_and_info_show_shapes(capsys):
    from edgetune.cli import main

    assert main(["data", "list", "--data-dir", str(DATA), "--json", "-"]) == 0
    out, err = capsys.readouterr()  # with --json -, stdout is the JSON alone and the report goes to stderr
    assert "tasks: har 150, har-raw (6, 128)" in err
    assert "tasks: damage1 512, damage2 512, damage1-1d (1, 512), damage2-1d (1, 512)" in err
    listed = json.loads(out)
    hapt = next(d for d in listed["data_sets"] if d["name"] == "hapt")
    assert hapt["tasks"] == {"har": [150], "har-raw": [6, 128]}

    assert main(["data", "info", "har-raw", "--data-dir", str(DATA), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert "har-raw: samples of shape (6, 128), 6 classes" in err
    info = json.loads(out)
    (fact,) = info["tasks"]
    assert fact["input_shape"] == [6, 128] and fact["data_set"] == "hapt"
    assert fact["samples"] == {"pretrain": 4754, "finetune": 2835, "test": 2758}

    assert main(["data", "info", "damage2-1d", "--data-dir", str(DATA), "--quiet"]) == 0
    assert "damage2-1d: samples of shape (1, 512), 2 classes" in capsys.readouterr().out
    assert main(["data", "info", "har-rawx", "--data-dir", str(DATA)]) == 2
    assert "har-raw" in capsys.readouterr().err
