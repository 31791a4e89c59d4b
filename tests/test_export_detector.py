"""edgetune detect export: the exported program scores and learns as Python does, on every target."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from edgetune import AnomalyDetector
from edgetune.errors import UsageError
from edgetune.export.detector import export_detector
from edgetune.export.targets import get_target

native = pytest.importorskip("edgetune.stream.native", reason="needs the compiled engine")


@pytest.fixture(scope="module")
def detector_and_stream():
    r = np.random.default_rng(0)
    mix = np.abs(r.normal(size=(3, 32)))
    normal = lambda n: np.abs(r.normal(size=(n, 3))) @ mix + 0.05 * np.abs(r.normal(size=(n, 32)))
    det = AnomalyDetector(transform="log", n_hidden=16).fit(normal(300))
    stream = np.vstack([normal(30), normal(10) * 3.0 + 1.0]).astype(np.float32)
    return det, stream


def _run(target: str, det, stream, tmp_path):
    t = get_target(target)
    missing = t.missing_tools(run=True)
    if missing:
        pytest.skip(f"target {target} needs {' and '.join(missing)}")
    out = tmp_path / target
    manifest = export_detector(det, target, out, stream)
    r = subprocess.run(["make", "-s", "-C", str(out), "run"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.strip().splitlines() if x.startswith("{")]
    if t.kind == "mcu":  # the linker's RAM (data + bss + stack) is within the plan
        tool = "riscv64-unknown-elf-size" if t.libc == "picolibc" else "arm-none-eabi-size"
        size = subprocess.run([tool, "-A", "-d", str(out / "detect.elf")], capture_output=True,
                              text=True, timeout=60).stdout
        sec = {ln.split()[0]: int(ln.split()[1]) for ln in size.splitlines() if ln.startswith(".")}
        ram = sec.get(".data", 0) + sec.get(".bss", 0) + sec.get(".stack", 0)
        assert manifest["state_bytes"] < ram <= manifest["planned_ram_bytes"], (ram, manifest)
    return manifest, lines[:-1], lines[-1]


def _reference(det, stream):
    """What the device must print: the C engine through Python, and the NumPy detector."""
    nat = native.NativeDetector(det, keep_weights=True)
    scores_c, learned_c = nat.stream(stream)
    return scores_c, learned_c


@pytest.mark.parametrize("target", ["host", "aarch64-linux", "cortex-m4", "cortex-m7", "riscv32", "riscv32f"])
def test_exported_detector_equals_python(target, detector_and_stream, tmp_path):
    det, stream = detector_and_stream
    manifest, rows, summary = _run(target, det, stream, tmp_path)
    assert summary["samples"] == len(stream) == len(rows)
    assert summary["state_bytes"] == manifest["state_bytes"]
    scores_c, learned_c = _reference(det, stream)
    device = np.array([row["score_1e6"] for row in rows]) / 1e6
    np.testing.assert_allclose(device, scores_c, atol=2e-5, rtol=1e-4)
    assert [row["learned"] for row in rows] == (learned_c == 1).tolist()
    assert [row["alarm"] for row in rows] == (scores_c < -1).tolist()
    alarms = np.array([r["alarm"] for r in rows])
    assert alarms[30:].mean() > 0.8 and alarms[:30].mean() < 0.3
    # the NumPy reference, learning the same samples one by one in float64
    ref = AnomalyDetector.load(_saved(det, tmp_path))
    env = ref.environments_[-1]
    for i, x in enumerate(stream.astype(np.float64)):
        z = (np.log(x + 1e-3) - env.mean) / env.std
        err = np.mean((env.model.predict(z)[0] - z) ** 2)
        assert abs(-err / env.threshold - device[i]) <= 1e-3 * max(1.0, abs(device[i]))
        if err <= ref.learn_below * env.threshold:
            env.model.learn_one(z, z)


def _saved(det, tmp_path):
    path = tmp_path / "saved"
    if not path.exists():
        det.save(path)
    return path


def test_export_refuses_what_it_cannot_do(detector_and_stream, tmp_path):
    det, stream = detector_and_stream
    with pytest.raises(UsageError, match="samples must have shape"):
        export_detector(det, "host", tmp_path / "a", stream[:, :5])
    with pytest.raises(UsageError, match="unknown target"):
        export_detector(det, "z80", tmp_path / "b", stream)
    from edgetune.errors import BudgetError
    big = AnomalyDetector(n_hidden=512).fit(np.random.default_rng(0).normal(size=(40, 512)))
    with pytest.raises(BudgetError, match="RAM"):
        export_detector(big, "cortex-m4", tmp_path / "c", np.zeros((1, 512)))
    from edgetune.export.detector import plan_detector
    plan = plan_detector(det, "cortex-m4")
    with pytest.raises(BudgetError, match="--budget"):
        export_detector(det, "cortex-m4", tmp_path / "d", stream, budget=plan["ram_bytes"] - 1)
    assert not (tmp_path / "d").exists()
    m = export_detector(det, "cortex-m4", tmp_path / "e", stream, budget=plan["ram_bytes"])
    assert m["planned_ram_bytes"] == plan["ram_bytes"] and m["state_bytes"] == plan["state_bytes"]


def test_damaged_blob_is_refused_on_the_device(detector_and_stream, tmp_path):
    det, stream = detector_and_stream
    if shutil.which("cc") is None:
        pytest.skip("cc not found: install the Debian package gcc")
    out = tmp_path / "p"
    export_detector(det, "host", out, stream[:3])
    src = (out / "et_detector.c").read_text()
    start = src.index("et_detector_blob[")
    first = src.index("{", start) + 1
    # flip one byte of P (after the 80-byte header), keeping the C valid
    nums = src[first:src.index("}", first)].split(",")
    nums[100] = str((int(nums[100].strip()) ^ 1))
    (out / "et_detector.c").write_text(src[:first] + ",".join(nums) + src[src.index("}", first):])
    r = subprocess.run(["make", "-s", "-C", str(out), "run"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "damaged" in r.stdout


def test_cli_export(detector_and_stream, tmp_path):
    from edgetune.cli import main
    from edgetune.data.anomaly import AnomalyTask

    det, stream = detector_and_stream
    det.save(tmp_path / "d")
    AnomalyTask("t", stream[:20], stream, np.r_[np.zeros(30), np.ones(10)].astype(int)).save_npz(tmp_path / "t.npz")
    assert main(["detect", "export", "--model", str(tmp_path / "d"), "--target", "host", "--task",
                 str(tmp_path / "t.npz"), "--samples", "5", "--out", str(tmp_path / "x"), "--quiet",
                 "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["samples"] == 5 and m["target"] == "host" and (tmp_path / "x" / "Makefile").is_file()
    assert main(["detect", "export", "--model", str(tmp_path / "d"), "--target", "host", "--task",
                 str(tmp_path / "t.npz"), "--out", str(tmp_path / "x"), "--quiet"]) == 2


@pytest.mark.parametrize("target", ["host", "cortex-m4"])
def test_exported_banded_detector_equals_python(target, tmp_path):
    """bands=: the device averages the inputs into the same bands before the log."""
    r = np.random.default_rng(1)
    mix = np.abs(r.normal(size=(3, 30)))
    normal = lambda n: np.abs(r.normal(size=(n, 3))) @ mix + 0.05 * np.abs(r.normal(size=(n, 30)))
    det = AnomalyDetector(transform="log", bands=7, n_hidden=12).fit(normal(300))   # uneven bands of 4-5
    stream = np.vstack([normal(30), normal(10) * 3.0 + 1.0]).astype(np.float32)
    manifest, rows, summary = _run(target, det, stream, tmp_path)
    assert manifest["state_bytes"] == native.NativeDetector(det, keep_weights=target == "host").native.nbytes
    scores_c, learned_c = _reference(det, stream)
    device = np.array([row["score_1e6"] for row in rows]) / 1e6
    np.testing.assert_allclose(device, scores_c, atol=2e-5, rtol=1e-4)
    assert [row["learned"] for row in rows] == (learned_c == 1).tolist()
    assert np.array([row["alarm"] for row in rows])[30:].mean() > 0.8
