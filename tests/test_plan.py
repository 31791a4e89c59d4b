"""`edgetune plan` and `finetune --budget`: exit codes and messages, no tracebacks."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgetune as et
from edgetune.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in [("pretrain", 80), ("finetune", 40), ("test", 40)]}
    ys = {s: (x[:, 0] > 0).astype(int) for s, x in xs.items()}
    np.savez(d / "t.npz", **{f"x_{s}": x for s, x in xs.items()}, **{f"y_{s}": y for s, y in ys.items()})
    et.Backbone.build([16, 12, 8, 2], seed=0).fit_normalizer(xs["pretrain"]).save(d / "m")
    return d


def test_plan_lists_fitting_candidates_and_recommends(files, capsys):
    out = files / "p.json"
    assert main(["plan", "--model", str(files / "m"), "--budget", "64KB", "--samples", "40", "--quiet",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recommended:" in text and "sparse[" in text
    res = json.loads(out.read_text())
    assert all(f["total"] <= 64 * 1024 for f in res["fits"])
    assert res["recommended"]["label"] == res["fits"][0]["label"]


def test_plan_with_task_measures_accuracy(files, capsys):
    assert main(["plan", "--model", str(files / "m"), "--budget", "1MB", "--task", str(files / "t.npz"),
                 "--epochs", "2", "--evaluate", "2", "--quiet"]) == 0
    assert "acc (2 ep)" in capsys.readouterr().out


def test_plan_nothing_fits_exits_1(files, capsys):
    assert main(["plan", "--model", str(files / "m"), "--budget", "100", "--quiet"]) == 1
    assert "nothing fits" in capsys.readouterr().out


@pytest.mark.parametrize("budget", ["256 parsecs", "-5KB", "", "0"])
def test_bad_budgets_are_usage_errors(files, capsys, budget):
    assert main(["plan", "--model", str(files / "m"), f"--budget={budget}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_finetune_budget_refuses_before_training(files, capsys):
    args = ["finetune", "--task", str(files / "t.npz"), "--model", str(files / "m"), "--method", "ft-all",
            "--epochs", "1", "--quiet"]
    assert main(args + ["--budget", "2KB"]) == 1
    err = capsys.readouterr().err
    assert "ft-all (float32) needs" in err and "over by" in err and "Traceback" not in err
    assert main(args + ["--budget", "1MB"]) == 0
    assert main(args + ["--budget", "lots"]) == 2


def test_planner_searches_batch_sizes_unless_one_is_given(files, capsys):
    from edgetune.memory import candidates, plan_memory

    model = et.Backbone.load(files / "m")
    budget = 12 * 1024
    cands = candidates(model, budget=budget, batch_size=[20, 8, 4, 1], n_samples=40)
    assert {c.plan.batch_size for c in cands if c.fits} >= {1, 20}  # some fit only at small batches
    for c in cands:
        kw = {"scheme": c.plan.scheme} if c.plan.method == "sparse" else {"cache": c.plan.cache or "float32"}
        again = plan_memory(model, c.plan.method, batch_size=c.plan.batch_size, n_samples=40,
                            int8=c.plan.backbone == "int8", **kw)
        assert again.total == c.plan.total and c.fits == (again.total <= budget)
        larger = [b for b in (20, 8, 4) if b > c.plan.batch_size]
        for b in larger:  # planned at the largest batch that fits
            assert plan_memory(model, c.plan.method, batch_size=b, n_samples=40, int8=c.plan.backbone == "int8",
                               **kw).total > budget
    out = files / "b.json"
    assert main(["plan", "--model", str(files / "m"), "--budget", "12KB", "--samples", "40", "--quiet",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the largest of 20, 8, 4, 1 that fits" in text and " at batch " in text
    fits = json.loads(out.read_text())["fits"]
    assert {f["batch_size"] for f in fits} >= {1, 20}
    assert main(["plan", "--model", str(files / "m"), "--budget", "12KB", "--samples", "40", "--batch-size", "20",
                 "--quiet", "--json", str(out)]) == 0
    assert "batch 20" in capsys.readouterr().out
    assert {f["batch_size"] for f in json.loads(out.read_text())["fits"]} == {20}


def test_weights_in_flash_leaves_frozen_weights_out_of_ram():
    from edgetune import Backbone
    from edgetune.memory import candidates, plan_memory

    bb = Backbone.build([512, 96, 96, 2], seed=0)
    ram = plan_memory(bb, "skip2-lora", batch_size=4, n_samples=470, int8=False)
    mcu = plan_memory(bb, "skip2-lora", batch_size=4, n_samples=470, int8=False, weights_in_flash=True)
    assert mcu.flash == ram.frozen_weights > 0 and ram.flash == 0
    assert ram.weight_copies > 0 and mcu.weight_copies == 0   # flash holds the forward layout
    assert mcu.total == ram.total - ram.frozen_weights - ram.weight_copies
    budget = (mcu.total + ram.total) // 2
    fits_mcu = {c.plan.label for c in candidates(bb, budget=budget, batch_size=4, n_samples=470,
                                                 weights_in_flash=True) if c.fits}
    fits_ram = {c.plan.label for c in candidates(bb, budget=budget, batch_size=4, n_samples=470) if c.fits}
    assert fits_ram < fits_mcu and "skip2-lora (float32)" in fits_mcu
