"""Fleets without Flower: screening, averaging, partitions, and a device's kept cache."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgetune import FineTuner, pretrain
from edgetune.fleet.aggregate import (aggregate, check_update, fedavg, lora_pairs, payload_bytes,
                                      product_average, screen_updates, update_norm)
from edgetune.fleet.device import DeviceTrainer, TrainSpec, global_tensors
from edgetune.fleet.partition import make_fleet, parse_partition_arg
from edgetune.errors import UsageError


def _pair(rng, out=4, inp=6, r=1):
    return {"l.lora_A": rng.normal(size=(r, inp)).astype(np.float32),
            "l.lora_B": rng.normal(size=(out, r)).astype(np.float32),
            "bias": rng.normal(size=out).astype(np.float32)}


def test_fedavg_weights_by_samples(rng):
    a, b = _pair(rng), _pair(rng)
    out = fedavg([a, b], [30, 10])
    for k in a:
        np.testing.assert_allclose(out[k], 0.75 * a[k] + 0.25 * b[k], rtol=1e-6)


def test_product_average_averages_products_not_factors(rng):
    a, b = _pair(rng), _pair(rng)
    w = [0.5, 0.5]
    mean_product = 0.5 * (a["l.lora_B"] @ a["l.lora_A"]) + 0.5 * (b["l.lora_B"] @ b["l.lora_A"])
    fa = fedavg([a, b], w)
    # averaging A and B apart is not the mean of the products
    assert np.linalg.norm(fa["l.lora_B"] @ fa["l.lora_A"] - mean_product) > 1e-3
    # rank 2 holds the mean of two rank-1 products exactly
    a2 = {k: np.pad(v, ((0, 1), (0, 0))) if k.endswith("A") else (np.pad(v, ((0, 0), (0, 1))) if k.endswith("B") else v)
          for k, v in a.items()}
    b2 = {k: np.pad(v, ((0, 1), (0, 0))) if k.endswith("A") else (np.pad(v, ((0, 0), (0, 1))) if k.endswith("B") else v)
          for k, v in b.items()}
    pa, resid = product_average([a2, b2], w)
    np.testing.assert_allclose(pa["l.lora_B"] @ pa["l.lora_A"], mean_product, atol=1e-5)
    assert resid < 1e-6
    # at rank 1 it is the best rank-1 approximation: its residual is the second singular value
    p1, resid1 = product_average([a, b], w)
    s = np.linalg.svd(mean_product, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(p1["l.lora_B"] @ p1["l.lora_A"] - mean_product), s[1], rtol=1e-4)
    assert resid1 == pytest.approx(s[1] / np.linalg.norm(s), rel=1e-4)
    np.testing.assert_allclose(p1["bias"], fa["bias"])  # tensors outside a pair: plain FedAvg
    # given the global adapter, A keeps its row norm (the scale LoRA initialised it with)
    ref = dict(a, **{"l.lora_A": 7.0 * a["l.lora_A"] / np.linalg.norm(a["l.lora_A"])})
    pk, resid_k = product_average([a, b], w, reference=ref)
    np.testing.assert_allclose(np.linalg.norm(pk["l.lora_A"], axis=1), [7.0], rtol=1e-5)
    np.testing.assert_allclose(pk["l.lora_B"] @ pk["l.lora_A"], p1["l.lora_B"] @ p1["l.lora_A"], atol=1e-5)
    assert resid_k == pytest.approx(resid1)
    # rank above min(out, in): the rows SVD cannot fill stay zero and do not shrink the scale
    wide = {"l.lora_A": rng.normal(size=(6, 6)).astype(np.float32), "l.lora_B": rng.normal(size=(4, 6)).astype(np.float32)}
    cur = wide
    for _ in range(3):
        cur, _ = product_average([cur, cur], w, reference=cur)
    norms = np.linalg.norm(cur["l.lora_A"], axis=1)
    np.testing.assert_allclose(norms[norms > 0], np.mean(np.linalg.norm(wide["l.lora_A"], axis=1)), rtol=1e-4)
    assert lora_pairs(list(a)) == [("l.lora_A", "l.lora_B")]


def test_screening_rejects_nan_shapes_norms_and_outliers(rng):
    ref = _pair(rng)
    good = [{k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()} for _ in range(3)]
    nan = dict(good[0], bias=np.full(4, np.nan, np.float32))
    shape = dict(good[0], bias=np.zeros(5, np.float32))
    missing = {k: v for k, v in good[0].items() if k != "bias"}
    huge = {k: v + 1e4 for k, v in ref.items()}
    assert check_update(good[0], ref, max_norm=100) is None
    assert "NaN" in check_update(nan, ref, max_norm=100)
    assert "shape" in check_update(shape, ref, max_norm=100)
    assert "missing" in check_update(missing, ref, max_norm=100)
    assert "norm" in check_update(huge, ref, max_norm=100)
    # relative to peers: 50x the others' distance is refused even under the absolute limit
    far = {k: v + 0.5 for k, v in ref.items()}
    reasons = screen_updates(good + [far], ref, max_norm=None)
    assert reasons[:3] == [None, None, None] and "median" in reasons[3]


def test_product_screening_measures_products_not_factors(rng):
    ref = _pair(rng)
    # the same products, factored differently: no distance for product averaging
    rescaled = {"l.lora_A": ref["l.lora_A"] * 50, "l.lora_B": ref["l.lora_B"] / 50, "bias": ref["bias"]}
    assert update_norm(rescaled, ref, "product") < 1e-4
    assert update_norm(rescaled, ref, "fedavg") > 10
    # a bias change counts alike for both
    moved = dict(ref, bias=ref["bias"] + np.array([3, 0, 0, 4], np.float32))
    assert update_norm(moved, ref, "product") == pytest.approx(5, rel=1e-6)
    assert update_norm(moved, ref, "fedavg") == pytest.approx(5, rel=1e-6)
    # peers that only rebalance their factors pass; one whose product moved far is refused
    honest = [{"l.lora_A": ref["l.lora_A"] * c, "l.lora_B": ref["l.lora_B"] / c + 0.01,
               "bias": ref["bias"]} for c in (1.0, 3.0, 0.2, 8.0)]
    far = dict(ref, **{"l.lora_B": ref["l.lora_B"] + 2.0})
    reasons = screen_updates(honest + [far], ref, max_norm=None, how="product")
    assert reasons[:4] == [None] * 4 and "median" in reasons[4]
    # overflowing products are an infinite distance, refused by the absolute limit
    huge = dict(ref, **{"l.lora_A": np.full_like(ref["l.lora_A"], 3e38), "l.lora_B": np.full_like(ref["l.lora_B"], 3e38)})
    assert "norm" in check_update(huge, ref, max_norm=100, how="product")
    with pytest.raises(ValueError):
        update_norm(ref, ref, "median")


def test_bytes_are_the_tensor_sizes(rng):
    t = _pair(rng)
    assert payload_bytes(t) == 4 * (6 + 4 + 4)


def test_partition_argument():
    assert parse_partition_arg("2/5") == (2, 5)
    for bad in ("5/5", "x", "1/0", "-1/3"):
        with pytest.raises(UsageError):
            parse_partition_arg(bad)


@pytest.fixture(scope="module")
def fan_fleet(private_cache):
    from .conftest import DATA_DIR

    return make_fleet("damage1", DATA_DIR, "by-room", 3)


def test_by_room_partition_covers_the_task_once(fan_fleet):
    task = fan_fleet.task
    assert sum(len(d.y_train) for d in fan_fleet.devices) == len(task.y_finetune)
    assert sum(len(d.y_test) for d in fan_fleet.devices) == len(task.y_test)
    # every stretch holds both classes (a stretch of the normal and of the damaged fan)
    assert all(set(np.unique(d.y_train)) == {0, 1} for d in fan_fleet.devices)
    with pytest.raises(UsageError, match="by-subject needs the har task"):
        make_fleet("damage1", None, "by-subject", 2, task=task)


def test_har_by_subject_one_person_per_device(private_cache, data_dir):
    fleet = make_fleet("har", data_dir, "by-subject", 4)
    assert [d.name for d in fleet.devices] == ["subject16", "subject17", "subject18", "subject19"]
    firsts = {d.name: d.x_train[0].tobytes() for d in fleet.devices}
    assert len(set(firsts.values())) == 4
    with pytest.raises(UsageError, match="15 subjects"):
        make_fleet("har", data_dir, "by-subject", 16, task=fleet.task)


@pytest.fixture(scope="module")
def fan_model(fan_fleet):
    t = fan_fleet.task
    model, _ = pretrain(t.x_pretrain, t.y_pretrain, hidden=[32, 32], labels=t.labels, epochs=15)
    return model


def test_device_keeps_its_skip_cache_between_rounds(fan_fleet, fan_model, tmp_path):
    spec = TrainSpec(method="skip2-lora", epochs=3)
    dev = DeviceTrainer(fan_model, fan_fleet.devices[0], spec, tmp_path / "dev0")
    g = global_tensors(fan_model, spec)
    _, m1 = dev.train(g)
    _, m2 = dev.train(g)
    n = len(fan_fleet.devices[0].y_train)
    assert m1["cache-misses"] == n and m2["cache-misses"] == 0 and m2["cache-hits"] == 3 * n
    assert dev.tuner.history_.cache["cache_misses"] == 0
    # a fresh process (deployment: one ClientApp process per message) finds the cache on disk
    again = DeviceTrainer(fan_model, fan_fleet.devices[0], spec, tmp_path / "dev0")
    _, m3 = again.train(g)
    assert m3["cache-misses"] == 0 and again.rounds_trained == 3
    # without the kept state every round runs the backbone again
    cold = DeviceTrainer(fan_model, fan_fleet.devices[0], TrainSpec(method="skip2-lora", epochs=3, keep_cache=False))
    assert cold.train(g)[1]["cache-misses"] == n and cold.train(g)[1]["cache-misses"] == n


def test_personal_bias_stays_on_the_device(fan_fleet, fan_model):
    spec = TrainSpec(method="skip2-lora", epochs=3, personal="bias", lr=0.05)
    dev = DeviceTrainer(fan_model, fan_fleet.devices[1], spec)
    wire, _ = dev.train(global_tensors(fan_model, spec))
    assert "head.bias_delta" not in wire and "head.bias_delta" in dev.personal
    assert np.any(dev.personal["head.bias_delta"] != 0)
    # a skip adapter goes on the wire as its small per-layer tensors, not the masked stacked matrix
    assert set(wire) == {f"skip.{k}.lora_{x}" for k in range(3) for x in "AB"}
    assert payload_bytes(wire) == 4 * sum(v.size for v in wire.values())


def test_fleet_methods_only(fan_model):
    with pytest.raises(UsageError, match="does not suit a fleet"):
        TrainSpec(method="ft-all")
    for m in ("lora-all", "ft-last", "ft-bias", "lora-last"):
        assert global_tensors(fan_model, TrainSpec(method=m))
    assert aggregate([{"x": np.ones(2)}], [1], "fedavg")[0]["x"].tolist() == [1, 1]


def test_the_core_never_imports_flower():
    code = ("import sys, edgetune, edgetune.api, edgetune.cli, edgetune.fleet, edgetune.fleet.aggregate, "
            "edgetune.fleet.partition, edgetune.fleet.device; "
            "from edgetune.cli import build_parser; build_parser(); "
            "assert 'flwr' not in sys.modules, 'flwr imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_flower_the_error_names_the_extra(monkeypatch, capsys):
    from edgetune.cli import main

    monkeypatch.setitem(sys.modules, "flwr", None)
    rc = main(["fleet", "simulate", "--task", "har", "--model", "m", "--clients", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and 'pip install "edgetune[fleet]"' in err and "Traceback" not in err


def test_product_averaging_keeps_every_honest_har_device(private_cache, data_dir):
    """HAR, one device per new subject, products averaged: the screening accepts all eight
    honest devices every round (distances measured on the products, A's scale kept)."""
    fleet = make_fleet("har", data_dir, "by-subject", 8)
    t = fleet.task
    model, _ = pretrain(t.x_pretrain, t.y_pretrain, hidden=[96, 96], labels=t.labels, epochs=50)
    spec = TrainSpec(method="skip2-lora", epochs=20, lr=0.01)
    devices = [DeviceTrainer(model, d, spec) for d in fleet.devices]
    current = global_tensors(model, spec)
    a_norm = np.linalg.norm(current["skip.0.lora_A"], axis=1).mean()
    for _ in range(4):
        updates = [d.train(current)[0] for d in devices]
        assert screen_updates(updates, current, max_norm=100, how="product") == [None] * 8
        current, resid = aggregate(updates, [len(d.data.y_train) for d in devices], "product", reference=current)
        assert 0 <= resid < 1
    # A keeps the scale it was initialised with, round after round
    assert np.linalg.norm(current["skip.0.lora_A"], axis=1).mean() == pytest.approx(a_norm, rel=1e-4)


def test_fleet_rounds_benchmark_compares_kept_and_fresh_caches(private_cache, data_dir, tmp_path, capsys):
    from benchmarks import fleet_rounds

    out = tmp_path / "rounds.json"
    assert fleet_rounds.main(["--data-dir", str(data_dir), "--rounds", "2", "--epochs", "2", "--json", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert [r["task"] for r in res] == ["har", "damage1"]
    for r in res:
        assert r["cache_misses_per_round"] == {"kept": 0, "fresh": r["samples"]}
        assert all(v > 0 for v in r["median_seconds"].values())
    assert "| har (subject16, " in capsys.readouterr().out
