"""Adapter banks: learning without touching earlier adapters, routing, files, PEFT, errors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import edgetune as et
from edgetune.bank import DETECTORS, _windowed, auroc
from edgetune.errors import BackboneMismatch, ModelFileError, UsageError

os.environ["HF_HUB_OFFLINE"] = "1"

D, CLASSES = 8, 3


def domain_data(offset: float, n: int = 90, seed: int = 0, centers_seed: int = 0):
    """One domain: the same classes (fixed centres) shifted by ``offset`` along a fixed direction."""
    centers = np.random.default_rng(centers_seed).normal(size=(CLASSES, D)) * 2
    direction = np.random.default_rng(99).normal(size=D)
    direction /= np.linalg.norm(direction)
    r = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = centers[y] + 0.5 * r.normal(size=(n, D)) + offset * direction * 15
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def backbone():
    x, y = domain_data(0.0, n=150, seed=1)
    bb, _ = et.pretrain(x, y, hidden=[12, 10], epochs=20, lr=0.05, seed=0)
    return bb


OFFSETS = {"a": 0.0, "b": 1.0, "c": -1.0}


def make_bank(backbone, method="skip2-lora", **kw):
    bank = et.AdapterBank(backbone, method, epochs=15, lr=0.05, **kw)
    for i, (name, off) in enumerate(OFFSETS.items()):
        bank.learn(name, *domain_data(off, seed=10 + i))
    return bank


def test_learning_a_domain_never_touches_earlier_adapters(backbone):
    bank = et.AdapterBank(backbone, epochs=10, lr=0.05)
    seen = {}
    for i, (name, off) in enumerate(OFFSETS.items()):
        bank.learn(name, *domain_data(off, seed=10 + i))
        for old, files in seen.items():
            assert bank.tuner(old).adapter_files() == files
        seen[name] = bank.tuner(name).adapter_files()
    assert bank.domains == list(OFFSETS)
    # the adapters differ from each other (each domain trained its own)
    assert seen["a"] != seen["b"] != seen["c"]


def test_oracle_logits_are_each_domain_fine_tuners(backbone):
    bank = make_bank(backbone)
    x, _ = domain_data(1.0, seed=50)
    for name in OFFSETS:
        np.testing.assert_allclose(bank.decision_function(x, domain=name),
                                   bank.tuner(name).decision_function(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("detector", [d for d in DETECTORS if d != "energy"])
@pytest.mark.parametrize("features", ["input", "hidden"])
@pytest.mark.parametrize("components", ["class", "domain"])
def test_routing_on_separated_domains_finds_the_domain(backbone, detector, features, components):
    bank = make_bank(backbone, detector=detector, features=features, components=components)
    for i, (name, off) in enumerate(OFFSETS.items()):
        x, _ = domain_data(off, seed=100 + i)
        routed = bank.route(x)
        assert np.mean(routed == name) >= 0.95, (name, np.unique(routed, return_counts=True))


def test_novelty_is_higher_far_from_every_domain(backbone):
    bank = make_bank(backbone)
    x_known = np.concatenate([domain_data(off, seed=200 + i)[0] for i, off in enumerate(OFFSETS.values())])
    x_far, _ = domain_data(3.0, seed=300)
    a = auroc(bank.novelty(x_known), bank.novelty(x_far))
    assert a > 0.95
    assert bank.is_novel(x_far).mean() > 0.9
    assert bank.is_novel(x_known).mean() < 0.2


def test_window_sums_the_scores_of_the_recent_samples():
    s = np.arange(12, dtype=float).reshape(6, 2)
    w = _windowed(s, 3)
    for t in range(6):
        np.testing.assert_array_equal(w[t], s[max(0, t - 2):t + 1].sum(axis=0))
    np.testing.assert_array_equal(_windowed(s, 1), s)


def test_window_routes_a_stream_through_noise(backbone):
    bank = make_bank(backbone, detector="centroid", features="input", components="domain")
    x, _ = domain_data(1.0, seed=400)
    x = x.copy()
    x[::4] = domain_data(0.0, seed=401)[0][::4]  # every fourth sample looks like domain a
    assert np.mean(bank.route(x) == "b") < 0.8
    assert np.mean(bank.route(x, window=8)[8:] == "b") == 1.0


def test_auroc_matches_pairwise_counting():
    r = np.random.default_rng(0)
    a, b = r.normal(size=40).round(1), (r.normal(size=30) + 0.7).round(1)  # ties on purpose
    pairs = np.mean([(bj > ai) + 0.5 * (bj == ai) for ai in a for bj in b])
    assert auroc(a, b) == pytest.approx(pairs)
    assert auroc(np.zeros(3), np.ones(2)) == 1.0


@pytest.mark.parametrize("options", [{}, {"rank": 2, "alpha": 3.0, "train_last_bias": True}])
def test_save_load_round_trip_gives_identical_outputs(backbone, tmp_path, options):
    bank = make_bank(backbone, **options)
    x = np.concatenate([domain_data(off, seed=500 + i)[0] for i, off in enumerate(OFFSETS.values())])
    bank.learn_mix("m", *domain_data(0.5, n=12, seed=600))
    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == \
        ["a", "b", "bank.json", "c", "detector.safetensors"]
    assert sorted(p.name for p in (tmp_path / "bank" / "a").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    back = et.AdapterBank.load(tmp_path / "bank", backbone)
    assert back.domains == bank.domains
    np.testing.assert_array_equal(back.route(x), bank.route(x))
    np.testing.assert_array_equal(back.decision_function(x), bank.decision_function(x))
    np.testing.assert_array_equal(back.decision_function(x, domain="m"), bank.decision_function(x, domain="m"))
    np.testing.assert_array_equal(back.novelty(x), bank.novelty(x))
    np.testing.assert_array_equal(back.is_novel(x), bank.is_novel(x))
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert [d["name"] for d in meta["domains"]] == ["a", "b", "c", "m"]
    assert meta["domains"][3]["mix"].keys() == {"a", "b", "c"}
    # a bank learned further after loading still leaves the loaded adapters alone
    files = back.tuner("a").adapter_files()
    back.learn("d", *domain_data(2.0, seed=700))
    assert back.tuner("a").adapter_files() == files


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "bank.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "bank.json").write_text(json.dumps({"format": "other"})), "not an edgetune adapter bank"),
    (lambda p: shutil.rmtree(p / "b"), "adapter of domain 'b' is missing"),
    (lambda p: (p / "bank.json").unlink(), "bank.json is missing"),
    (lambda p: (p / "detector.safetensors").write_bytes(b"x" * 64), "checksum differs"),
    (lambda p: _flip_byte(p / "c" / "adapter_model.safetensors"), "checksum differs"),
    (lambda p: _edit(p, lambda m: m.pop("domains")), "bad or missing field"),
    (lambda p: _edit(p, lambda m: m["domains"][0].update(threshold="high")), "domain 0"),
    (lambda p: _edit(p, lambda m: m["domains"][1].update(n_samples=5)), "domain 1"),
    (lambda p: _edit(p, lambda m: m["domains"][1].update(components=[1, 2])), "differ in length"),
    (lambda p: _edit(p, lambda m: m.update(detector="magic")), "unknown detector"),
])
def test_damaged_bank_is_refused_with_a_clear_error(backbone, tmp_path, damage, message):
    make_bank(backbone).save(tmp_path / "bank")
    damage(tmp_path / "bank")
    with pytest.raises(ModelFileError, match=message):
        et.AdapterBank.load(tmp_path / "bank", backbone)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit(path, change):
    meta = json.loads((path / "bank.json").read_text())
    change(meta)
    (path / "bank.json").write_text(json.dumps(meta))


def test_bank_of_another_backbone_is_refused(backbone, tmp_path):
    make_bank(backbone).save(tmp_path / "bank")
    other = backbone.copy()
    other.weights[0][0, 0] += 1.0
    with pytest.raises(BackboneMismatch):
        et.AdapterBank.load(tmp_path / "bank", other)
    small = et.Backbone.build([D, 4, CLASSES])
    with pytest.raises(ModelFileError, match="sizes"):
        et.AdapterBank.load(tmp_path / "bank", small)


def test_bad_arguments_are_usage_errors(backbone):
    with pytest.raises(UsageError, match="method"):
        et.AdapterBank(backbone, "ft-all")
    with pytest.raises(UsageError, match="detector"):
        et.AdapterBank(backbone, detector="knn")
    with pytest.raises(UsageError, match="window"):
        et.AdapterBank(backbone, window=0)
    with pytest.raises(UsageError, match="lr"):
        et.AdapterBank(backbone, lr=-1)
    bank = et.AdapterBank(backbone, epochs=2)
    with pytest.raises(UsageError, match="no domain yet"):
        bank.route(domain_data(0.0)[0])
    bank.learn("a", *domain_data(0.0))
    with pytest.raises(UsageError, match="already in the bank"):
        bank.learn("a", *domain_data(0.0))
    with pytest.raises(UsageError, match="domain name"):
        bank.learn("../x", *domain_data(0.0))
    with pytest.raises(UsageError, match="no domain 'z'"):
        bank.predict(domain_data(0.0)[0], domain="z")


def test_soft_mix_and_mix_learning(backbone):
    bank = make_bank(backbone)
    x, y = domain_data(1.0, seed=800)
    # far inside one domain, the soft mix is that domain's adapter
    np.testing.assert_allclose(bank.predict_proba(x, mix="soft"), bank.predict_proba(x, domain="b"), atol=1e-3)
    xs, ys = domain_data(0.5, n=20, seed=801)
    bank.learn_mix("half", xs, ys)
    coef = bank.domains_["half"].mix
    assert set(coef) == {"a", "b", "c"} and bank.nbytes()["per_domain"]["half"]["adapter"] == 12
    lora = et.AdapterBank(backbone, "lora-all", epochs=2)
    lora.learn("a", *domain_data(0.0))
    with pytest.raises(UsageError, match="skip adapters"):
        lora.learn_mix("m", xs, ys)


@pytest.mark.parametrize("strategy", ["merge", "drop"])
def test_budget_shrinks_the_bank(backbone, strategy):
    bank = make_bank(backbone)
    x = domain_data(0.0, seed=900)[0]
    bank.route(x)  # domain a is used, so a drop removes another one
    total = bank.nbytes()["total"]
    per = bank.nbytes()["per_domain"]
    steps = bank.fit_budget(total - 1, strategy=strategy)
    assert len(steps) == 1 and bank.nbytes()["total"] <= total - 1
    assert len(bank.domains) == 2 and sum(per[n]["total"] for n in per) > \
        sum(v["total"] for v in bank.nbytes()["per_domain"].values())
    if strategy == "drop":
        assert "a" in bank.domains
    with pytest.raises(et.BudgetError):
        bank.fit_budget(10)


def test_lora_bank_folders_load_in_peft_and_back(backbone, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from edgetune.torch import to_torch

    bank = make_bank(backbone, "lora-all")
    bank.save(tmp_path / "bank")
    x = domain_data(1.0, seed=1000)[0]
    model = peft.PeftModel.from_pretrained(to_torch(backbone), str(tmp_path / "bank" / "a"), adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(str(tmp_path / "bank" / name), adapter_name=name)
    for name in OFFSETS:
        model.set_adapter(name)
        got = model(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, bank.decision_function(x, domain=name), rtol=1e-5, atol=1e-5)
    # PEFT writes the adapters back (one sub-folder per adapter); a bank reads them again
    model.save_pretrained(str(tmp_path / "peft"), selected_adapters=list(OFFSETS))
    again = et.AdapterBank(backbone, "lora-all", epochs=15, lr=0.05)
    for i, (name, off) in enumerate(OFFSETS.items()):
        tuner = et.FineTuner.load_adapter(backbone, tmp_path / "peft" / name)
        again.add_adapter(name, tuner, *domain_data(off, seed=10 + i))
    np.testing.assert_allclose(again.decision_function(x), bank.decision_function(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again.route(x), bank.route(x))
    # an adapter of another rank than the bank's options keeps its own shape
    t2 = et.FineTuner(backbone, "lora-all", rank=2, epochs=3, lr=0.05).fit(*domain_data(0.5))
    again.add_adapter("r2", t2, *domain_data(0.5))
    np.testing.assert_allclose(again.decision_function(x, domain="r2"), t2.decision_function(x), rtol=1e-5, atol=1e-5)
    t2.fit(*domain_data(0.7))  # the bank holds its own copy
    assert not np.allclose(again.decision_function(x, domain="r2"), t2.decision_function(x))


def test_skip_bank_on_real_fan_rooms(private_cache, data_dir):
    """Two real rooms with one adapter each: the earlier room keeps its accuracy exactly."""
    from edgetune.data.domains import fan_rooms

    seq = fan_rooms(data_dir)
    a, noisy = seq.domains[0], seq.domains[2]
    bb, _ = et.pretrain(seq.x_pretrain, seq.y_pretrain, hidden=[32], labels=seq.labels, epochs=10)
    bank = et.AdapterBank(bb, epochs=20)
    bank.learn(a.name, a.x_train, a.y_train)
    before = bank.score(a.x_test, a.y_test, domain=a.name)
    bank.learn(noisy.name, noisy.x_train, noisy.y_train)
    assert bank.score(a.x_test, a.y_test, domain=a.name) == before
    assert np.mean(bank.route(noisy.x_test) == noisy.name) > 0.9


# ---------------------------------------------------------------------- command line

@pytest.fixture
def cli_files(backbone, tmp_path):
    backbone.save(tmp_path / "model")
    for i, (name, off) in enumerate(OFFSETS.items()):
        x, y = domain_data(off, seed=10 + i)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        xt, yt = domain_data(off, seed=20 + i)
        np.savez(tmp_path / f"{name}-test.npz", x=xt, y=yt)
    return tmp_path


def test_cli_learn_list_route_evaluate(cli_files, capsys):
    from edgetune.cli import main

    p = cli_files
    common = ["--model", str(p / "model"), "--bank", str(p / "bank")]
    for name in OFFSETS:
        assert main(["bank", "learn", *common, "--domain", name, "--data", str(p / f"{name}.npz"),
                     "--epochs", "10", "--lr", "0.05", "--quiet", "--json", str(p / f"learn-{name}.json")]) == 0
    learned = json.loads((p / "learn-c.json").read_text())
    assert learned["domains"] == ["a", "b", "c"] and learned["samples"] == 90
    bank = et.AdapterBank.load(p / "bank", et.Backbone.load(p / "model"))
    assert bank.options["epochs"] == 10 and bank.domains == ["a", "b", "c"]
    assert main(["bank", "list", *common, "--json", str(p / "list.json")]) == 0
    listed = json.loads((p / "list.json").read_text())
    assert [d["domain"] for d in listed["domains"]] == ["a", "b", "c"]
    assert main(["bank", "route", *common, "--data", str(p / "b-test.npz"), "--json", str(p / "route.json")]) == 0
    routed = json.loads((p / "route.json").read_text())
    assert routed["counts"]["b"] >= 85 and len(routed["domains"]) == 90
    assert routed["domains"] == bank.route(domain_data(1.0, seed=21)[0]).tolist()
    assert main(["bank", "evaluate", *common, "--data", str(p / "c-test.npz"), "--domain", "c",
                 "--json", str(p / "ev.json")]) == 0
    ev = json.loads((p / "ev.json").read_text())["domains"][0]
    x, y = domain_data(-1.0, seed=22)
    assert ev["accuracy_routed"] == pytest.approx(bank.score(x, y))
    assert ev["accuracy_told"] == pytest.approx(bank.score(x, y, domain="c"))
    assert ev["routing_accuracy"] >= 0.95


@pytest.mark.parametrize("argv, code, message", [
    (["bank"], 2, "choose an action"),
    (["bank", "list", "--model", "M", "--bank", "nowhere"], 1, "no adapter bank here"),
    (["bank", "learn", "--model", "M", "--bank", "B", "--domain", "a"], 2, "give --data"),
    (["bank", "learn", "--model", "M", "--bank", "B", "--domain", "a", "--data", "missing.npz"], 1, "no such file"),
    (["bank", "learn", "--model", "M", "--bank", "B", "--domain", "a", "--data", "BAD"], 1, "not a readable"),
    (["bank", "learn", "--model", "M", "--bank", "B", "--domain", "a", "--data", "XONLY"], 1, "needs an array 'y'"),
    (["bank", "learn", "--model", "M", "--bank", "B", "--domain", "a", "--data", "A", "--epochs", "0"], 2, ">= 1"),
    (["bank", "learn", "--model", "M", "--bank", "B", "--domain", "a b", "--data", "A"], 2, "domain name"),
    (["bank", "route", "--model", "M", "--bank", "B", "--data", "A", "--window", "0"], 2, ">= 1"),
    (["bank", "list", "--model", "M", "--bank", "B", "--json", "B/bank.json"], 2, "write over an input"),
    (["bank", "route", "--model", "M", "--bank", "B", "--data", "A", "--json", "A"], 2, "write over an input"),
])
def test_cli_errors_exit_cleanly(cli_files, argv, code, message):
    import subprocess
    import sys

    p = cli_files
    (p / "bad.npz").write_bytes(b"not a zip")
    np.savez(p / "xonly.npz", x=np.zeros((3, D)))
    # a bank for the commands that read one
    et.AdapterBank(et.Backbone.load(p / "model"), epochs=2).learn("a", *domain_data(0.0)).save(p / "bank")
    subs = {"M": str(p / "model"), "B": str(p / "bank"), "A": str(p / "a.npz"), "BAD": str(p / "bad.npz"),
            "XONLY": str(p / "xonly.npz"), "nowhere": str(p / "nowhere")}
    argv = [subs.get(a, a).replace("B/", subs["B"] + "/") for a in argv]
    r = subprocess.run([sys.executable, "-m", "edgetune", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_window_and_domain_name_validation_never_crashes(backbone):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    bank = et.AdapterBank(backbone, epochs=2).learn("a", *domain_data(0.0))
    x = domain_data(0.0, n=6)[0]

    @settings(max_examples=60, deadline=None)
    @given(st.one_of(st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans()))
    def check_window(w):
        try:
            out = bank.route(x, window=w)
        except UsageError:
            assert w is not None and not (isinstance(w, int) and not isinstance(w, bool) and w >= 1)
        else:
            assert len(out) == len(x) and (w is None or (isinstance(w, int) and w >= 1))

    @settings(max_examples=60, deadline=None)
    @given(st.text(max_size=80))
    def check_name(name):
        try:
            bank._check_new_name(name)
        except UsageError:
            pass
        else:
            assert name != "a" and "/" not in name and name not in (".", "..") and 0 < len(name) <= 64

    check_window()
    check_name()
