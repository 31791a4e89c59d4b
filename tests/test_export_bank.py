"""edgetune bank export: an adapter bank as a C project that routes and applies adapters in C,
checked sample by sample against AdapterBank; and `edgetune bank route --save-counts`."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.bank import BANK_FILE
from edgetune.errors import ModelFileError, UsageError
from edgetune.export.bank import (BankExportOptions, check_bank_export, export_bank, make_size, run_bank_export)
from edgetune.export.targets import get_target

pytestmark = pytest.mark.skipif(not core.available(), reason="the compiled engine is not built")

SHIFTS = [np.zeros(10), np.full(10, 2.0), np.array([-2.0, 2.0] * 5)]


def _domain(rng, shift, n):
    x = (rng.normal(size=(n, 10)) + shift).astype(np.float32)
    return x, (x[:, 0] > shift[0]).astype(int) + 2 * (x[:, 1] > shift[1]).astype(int)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A bank of 3 synthetic domains (skip2-lora, the default detector) saved with its backbone,
    test samples of each domain and a few unlike all of them, and an .npz of those samples."""
    rng = np.random.default_rng(0)
    x0, y0 = _domain(rng, SHIFTS[0], 150)
    backbone, _ = et.pretrain(x0, y0, hidden=[16, 12], epochs=20)
    bank = et.AdapterBank(backbone, "skip2-lora", epochs=5)
    for i, s in enumerate(SHIFTS):
        bank.learn(f"room-{i}", *_domain(rng, s, 120))
    x = np.concatenate([_domain(rng, s, 40)[0] for s in SHIFTS] + [(3 * rng.normal(size=(20, 10))).astype(np.float32)])
    d = tmp_path_factory.mktemp("bank")
    backbone.save(d / "model")
    bank.save(d / "bank")
    np.savez(d / "x.npz", x=x)
    return bank, x, d


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_engine_rows_and_apply_match_numpy(made):
    """et_skip_rows is the NumPy backbone's forward_taps; et_skip_apply a domain's logits on them."""
    from edgetune.core.engine import CoreModel

    bank, x, _ = made
    tuner = bank.tuner("room-1")
    c = CoreModel(tuner.method, 4)
    xp = bank.backbone.prepare(x)
    rows = np.zeros((len(xp), c.d_in + bank.backbone.sizes[-1]), np.float32)
    ws = np.zeros(c.workspace_bytes(), np.uint8)
    bb, m = ctypes.byref(c.bb), ctypes.byref(c.m)
    assert c.lib.et_skip_rows(bb, m, xp.ctypes.data, len(xp), 4, rows.ctypes.data, ws.ctypes.data, ws.nbytes) == 0
    np.testing.assert_allclose(rows, bank.backbone.forward_taps(xp), rtol=1e-5, atol=1e-5)
    logits = np.zeros((len(xp), bank.backbone.sizes[-1]), np.float32)
    p = np.ascontiguousarray(tuner.method.params.flat, np.float32)
    assert c.lib.et_skip_apply(bb, m, p.ctypes.data, rows.ctypes.data, len(xp), 4, logits.ctypes.data,
                               ws.ctypes.data, ws.nbytes) == 0
    np.testing.assert_allclose(logits, bank.copy().decision_function(x, domain="room-1"), atol=1e-5)
    # a workspace too small is refused, not overrun
    assert c.lib.et_skip_rows(bb, m, xp.ctypes.data, len(xp), 4, rows.ctypes.data, ws.ctypes.data, 64) == -2


@pytest.mark.parametrize("detector,window", [("mahalanobis", 1), ("relative", 5)])
def test_host_export_equals_python(made, tmp_path, detector, window):
    """Built and run on the host: routed domains, predictions and novelty flags identical to the
    bank's, logits within 1e-5; the routing spreads over the domains (not a constant)."""
    if get_target("host").missing_tools():
        pytest.skip("no C compiler")
    bank, x, _ = made
    if detector != bank.detector:  # the same adapters and statistics under another detector
        other = bank.copy()
        other.detector, other.window = detector, window
        other._cov_cache = other._gprec_cache = other._lin_cache = None
        bank = other
    export_bank(bank, BankExportOptions(target="host", out=str(tmp_path / "p")), x)
    report = check_bank_export(bank, x, run_bank_export(tmp_path / "p"), target="host")
    assert report["ok"], report
    assert report["samples"] == len(x) and report["window"] == window
    out = subprocess.run(["./bank"], cwd=tmp_path / "p", capture_output=True, text=True, timeout=60).stdout
    assert all(json.loads(line) for line in out.splitlines())  # every line one JSON object, nothing left over
    assert min(report["routed_counts"].values()) >= 20
    assert report["max_logit_difference_scaled"] <= 1e-5


def test_check_catches_a_wrong_program(made, tmp_path):
    """The checker is not vacuous: a program whose thresholds are altered disagrees on the flags."""
    if get_target("host").missing_tools():
        pytest.skip("no C compiler")
    bank, x, _ = made
    export_bank(bank, BankExportOptions(target="host", out=str(tmp_path / "p")), x)
    data = tmp_path / "p" / "et_bank_data.c"
    text = data.read_text()
    start = text.index("et_bank_thresholds[3] = {") + len("et_bank_thresholds[3] = {")
    data.write_text(text[:start] + "0.0, 0.0, 0.0" + text[text.index("}", start):])
    report = check_bank_export(bank, x, run_bank_export(tmp_path / "p"), target="host")
    assert not report["ok"] and report["novelty_flag_equal"] < len(x)


def test_cortex_m4_export_equals_python(made, tmp_path):
    if get_target("cortex-m4").missing_tools(run=True):
        pytest.skip("arm-none-eabi-gcc or qemu-system-arm is not installed")
    bank, x, _ = made
    export_bank(bank, BankExportOptions(target="cortex-m4", out=str(tmp_path / "m4")), x)
    records = run_bank_export(tmp_path / "m4")
    report = check_bank_export(bank, x, records, target="cortex-m4")
    assert report["ok"], report
    assert report["tolerance"] == 1e-4 and records[-1]["ticks"] > 0
    size = make_size(tmp_path / "m4")
    assert 0 < size["flash"] < get_target("cortex-m4").flash_bytes and size["ram"] > 0


def test_refuses_what_it_cannot_export(made, tmp_path):
    bank, x, _ = made
    energy = bank.copy()
    energy.detector = "energy"
    with pytest.raises(UsageError, match="energy"):
        export_bank(energy, BankExportOptions(target="host", out=str(tmp_path / "e")), x)
    with pytest.raises(UsageError, match="window"):
        export_bank(bank, BankExportOptions(target="host", out=str(tmp_path / "w"), window=10_000), x)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="--force"):
        export_bank(bank, BankExportOptions(target="host", out=str(tmp_path / "exists")), x)
    assert not (tmp_path / "e").exists() and not (tmp_path / "w").exists()


def test_cli_export_run_and_exit_codes(made, tmp_path):
    _, _, d = made
    base = ["bank", "export", "--model", d / "model", "--bank", d / "bank", "--data", d / "x.npz"]
    if not get_target("host").missing_tools():
        r = _cli(*base, "--target", "host", "--out", tmp_path / "p", "--run", "--json", tmp_path / "r.json")
        assert r.returncode == 0, r.stderr
        check = json.loads((tmp_path / "r.json").read_text())["check"]
        assert check["ok"] and check["samples"] == 140
    r = _cli(*base, "--target", "pdp-11", "--out", tmp_path / "q")
    assert r.returncode == 2 and "unknown target" in r.stderr and "Traceback" not in r.stderr
    r = _cli(*base, "--out", tmp_path / "q")  # --target missing
    assert r.returncode == 2
    r = _cli(*base, "--target", "host", "--out", d / "bank" / "inside")  # an output inside an input
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_corrupt_bank_refused(made, tmp_path):
    bank, _, d = made
    broken = tmp_path / "broken"
    shutil.copytree(d / "bank", broken)
    meta = json.loads((broken / BANK_FILE).read_text())
    adapter = broken / meta["domains"][1]["adapter"] / "adapter_model.safetensors"
    blob = bytearray(adapter.read_bytes())
    blob[-1] ^= 0xFF
    adapter.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="checksum"):
        et.AdapterBank.load(broken, bank.backbone)
    r = _cli("bank", "export", "--model", d / "model", "--bank", broken, "--data", d / "x.npz", "--target", "host",
             "--out", tmp_path / "p", "--no-toolchain-check")
    assert r.returncode == 1 and "checksum" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p").exists()
    (broken / BANK_FILE).write_text("{not json")
    r = _cli("bank", "export", "--model", d / "model", "--bank", broken, "--data", d / "x.npz", "--target", "host",
             "--out", tmp_path / "p", "--no-toolchain-check")
    assert r.returncode == 1 and "bank.json" in r.stderr and "Traceback" not in r.stderr


def test_route_saves_counts_only_when_asked(made, tmp_path):
    bank, x, d = made
    copy = tmp_path / "bank"
    shutil.copytree(d / "bank", copy)
    before = (copy / BANK_FILE).read_bytes()
    r = _cli("bank", "route", "--model", d / "model", "--bank", copy, "--data", d / "x.npz", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert (copy / BANK_FILE).read_bytes() == before  # read only by default
    routed = json.loads(r.stdout[r.stdout.index("{"):])["counts"]
    r = _cli("bank", "route", "--model", d / "model", "--bank", copy, "--data", d / "x.npz", "--save-counts")
    assert r.returncode == 0, r.stderr
    used = {rec["name"]: rec["used"] for rec in json.loads((copy / BANK_FILE).read_text())["domains"]}
    assert used == routed and sum(used.values()) == len(x)
    again = _cli("bank", "route", "--model", d / "model", "--bank", copy, "--data", d / "x.npz", "--save-counts")
    assert again.returncode == 0
    loaded = et.AdapterBank.load(copy, bank.backbone)
    assert {n: e.used for n, e in loaded.domains_.items()} == {n: 2 * v for n, v in routed.items()}
    # the drop policy reads them: the least routed-to domain goes first
    least = min(routed, key=lambda n: (routed[n], int(loaded.domains_[n].counts.sum())))
    assert loaded.fit_budget(loaded.nbytes()["total"] - 1, strategy="drop") == [f"drop {least}"]


def test_host_export_with_a_mixed_domain(made, tmp_path):
    """A domain learned with learn_mix (coefficients over the other adapters) is applied in C too."""
    if get_target("host").missing_tools():
        pytest.skip("no C compiler")
    bank, x, _ = made
    mixed = bank.copy()
    rng = np.random.default_rng(1)
    mixed.learn_mix("mixed", *_domain(rng, np.ones(10), 40))
    export_bank(mixed, BankExportOptions(target="host", out=str(tmp_path / "p")), x)
    report = check_bank_export(mixed, x, run_bank_export(tmp_path / "p"), target="host")
    assert report["ok"], report
    assert report["routed_counts"]["mixed"] > 0


def test_cnn_bank_in_python_and_exported(tmp_path):
    """A bank on a convolutional backbone: its features are the skip taps (Backbone.tap_widths),
    a domain's logits are its FineTuner's, and the exported program (the engine's forward pass
    through every layer kind) routes and predicts as Python does."""
    rng = np.random.default_rng(2)

    def dom(shift, n):
        x = (rng.normal(size=(n, 2, 32)) + shift).astype(np.float32)
        return x, (x[:, 0, :4].mean(axis=1) > shift).astype(int)

    backbone, _ = et.pretrain(*dom(0.0, 80), arch="conv:4:3:1:same,relu,maxpool:2,flatten,dense:8,relu", epochs=5)
    bank = et.AdapterBank(backbone, "skip2-lora", epochs=3)
    for i, s in enumerate([0.0, 1.0, -1.0]):
        bank.learn(f"d{i}", *dom(s, 80))
    assert bank.n_features == sum(backbone.tap_widths[1:])
    x = np.concatenate([dom(s, 20)[0] for s in [0.0, 1.0, -1.0]])
    np.testing.assert_allclose(bank.copy().decision_function(x, domain="d2"),
                               bank.tuner("d2").decision_function(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="MLP"):
        et.AdapterBank(backbone, "lora-all")
    if get_target("host").missing_tools():
        pytest.skip("no C compiler")
    export_bank(bank, BankExportOptions(target="host", out=str(tmp_path / "p")), x)
    report = check_bank_export(bank, x, run_bank_export(tmp_path / "p"), target="host")
    assert report["ok"], report
    assert min(report["routed_counts"].values()) >= 10


def test_lora_bank_exported(made, tmp_path):
    """A lora-all bank: the rows for routing come from a skip method's forward pass, the routed
    adapter runs inside the layers (et_predict)."""
    if get_target("host").missing_tools():
        pytest.skip("no C compiler")
    bank, x, _ = made
    rng = np.random.default_rng(3)
    lora = et.AdapterBank(bank.backbone, "lora-all", epochs=5)
    for i, s in enumerate(SHIFTS):
        lora.learn(f"room-{i}", *_domain(rng, s, 120))
    export_bank(lora, BankExportOptions(target="host", out=str(tmp_path / "p")), x)
    report = check_bank_export(lora, x, run_bank_export(tmp_path / "p"), target="host")
    assert report["ok"], report
    assert min(report["routed_counts"].values()) >= 20
