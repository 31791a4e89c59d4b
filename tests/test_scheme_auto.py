"""--scheme auto: the contribution analysis, the search under a budget, and the commands."""
from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

import edgetune as et
from edgetune.cli import main
from edgetune.errors import BudgetError, UsageError
from edgetune.memory import plan_memory
from edgetune.methods.sparse import RATIOS
from edgetune.scheme_search import (Contributions, auto_scheme, choose_scheme, contribution_analysis, scheme_text,
                                    split_validation)


def _data(shape, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    flat = x.reshape(n, -1)
    y = (flat[:, 0] + flat[:, 1] > 0).astype(int)
    return x, y


def _mlp():
    x, y = _data((16,), 80, 1)
    return et.Backbone.build([16, 12, 8, 2], seed=0).fit_normalizer(x), x, y


def _cnn():
    from edgetune.nn.arch import build_layers, parse_arch

    specs = parse_arch("conv:4:5:2:2,relu,maxpool:2,conv:4:3:1:1,relu,gap,dense:8,relu", (1, 64), 2)
    x, y = _data((1, 64), 80, 2)
    return et.Backbone.from_layers(build_layers(specs, seed=0)).fit_normalizer(x), x, y


NETS = {"mlp": _mlp, "cnn": _cnn}
_CACHE: dict = {}


def net(name):
    if name not in _CACHE:
        _CACHE[name] = NETS[name]()
    return _CACHE[name]


def analysis(name, **kw):
    bb, x, y = net(name)
    key = (name, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = contribution_analysis(bb, x, y, epochs=2, batch_size=8, seed=0, **kw)
    return _CACHE[key]


def planner(bb, batch=8):
    return lambda s: plan_memory(bb, "sparse", scheme=s, batch_size=batch, n_samples=60)


# ---------------------------------------------------------------------------- the analysis
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_contributions_table_has_every_part(name):
    bb, x, y = net(name)
    n = len(bb.tap_layers)
    c = analysis(name)
    assert c.n_layers == n and c.baseline == f"b1,w{n - 1}"
    assert sorted(c.bias) == list(range(1, n + 1)) and c.bias[1] == 0.0
    assert set(c.weight) == {(k, r) for k in range(n - 1) for r in RATIOS}
    assert c.runs == 1 + (n - 1) + 4 * (n - 1) == len(c.accuracies)
    assert all(0.0 <= a <= 1.0 for a in c.accuracies.values())
    # each gain is its scheme's measured accuracy less the baseline's
    for (k, r), g in c.weight.items():
        assert g == pytest.approx(c.accuracies[scheme_text(n, 1, {k: r})] - c.baseline_accuracy)
    rows = c.table()
    assert len(rows) == n + 4 * (n - 1)
    assert {"part", "kind", "scheme", "val_accuracy", "gain"} <= set(rows[0])
    assert c.n_train + c.n_val == len(y) and c.seconds > 0


def test_analysis_can_be_limited_to_the_last_layers_and_some_ratios():
    c = analysis("cnn", layers=2, ratios=("1/2", "1"))
    n = c.n_layers
    assert sorted(c.bias) == [1, 2]
    assert set(c.weight) == {(n - 2, Fraction(1, 2)), (n - 2, Fraction(1))}
    assert c.runs == 4
    bb, x, y = net("cnn")
    with pytest.raises(UsageError, match="layers must be"):
        contribution_analysis(bb, x, y, layers=n + 1)
    with pytest.raises(UsageError, match="ratios"):
        contribution_analysis(bb, x, y, ratios=("1/3",))


def test_validation_rows_come_from_the_data_given_only():
    """By construction: the analysis is handed the fine-tuning data alone and splits it."""
    tr, va = split_validation(80, 0.25, 0)
    assert len(va) == 20 and len(tr) == 60
    assert not set(tr) & set(va) and set(tr) | set(va) == set(range(80))
    c = analysis("mlp")
    assert np.array_equal(c.val_indices, va)
    with pytest.raises(UsageError, match="validation"):
        split_validation(3, 0.1, 0)


# ---------------------------------------------------------------------------- the search
def fake_contributions(n: int, seed: int) -> Contributions:
    rng = np.random.default_rng(seed)
    bias = {1: 0.0, **{k: float(rng.normal(0, 0.05)) for k in range(2, n + 1)}}
    weight = {(k, r): float(rng.normal(0.05, 0.05)) for k in range(n - 1) for r in RATIOS}
    return Contributions(n, f"b1,w{n - 1}", 0.5, bias, weight, 1, 8, 0.01, 0, 60, 20, np.arange(20), 0, 0.0)


def all_schemes(c: Contributions):
    for k in c.bias:
        for genes in itertools.product([None, *RATIOS], repeat=c.n_layers - 1):
            yield k, dict(zip(range(c.n_layers - 1), genes))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_choice_fits_the_budget_and_is_the_best_that_does(name):
    bb, _, _ = net(name)
    n = len(bb.tap_layers)
    plan = planner(bb)
    sizes = sorted({plan(scheme_text(n, k, r)).total for k, r in all_schemes(fake_contributions(n, 0))})
    for seed in range(3):
        c = fake_contributions(n, seed)
        for budget in (sizes[0], sizes[len(sizes) // 3], sizes[len(sizes) // 2], sizes[-1]):
            ch = choose_scheme(c, plan, budget, strategy="exhaustive")
            assert ch.plan.total <= budget and plan(ch.scheme).total == ch.plan.total
            best = max(c.gain(k, r) for k, r in all_schemes(c) if plan(scheme_text(n, k, r)).total <= budget)
            assert ch.predicted_gain == pytest.approx(best)
            assert ch.predicted_accuracy == pytest.approx(min(1.0, 0.5 + best))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_exhaustive_and_evolutionary_search_agree_on_a_small_space(name):
    bb, _, _ = net(name)
    n = len(bb.tap_layers)
    plan = planner(bb)
    full = plan(scheme_text(n, n, {k: Fraction(1) for k in range(n - 1)})).total
    base = plan(scheme_text(n, 1, {})).total
    for seed in range(3):
        c = fake_contributions(n, seed)
        for budget in (base, (base + full) // 2, full):
            ex = choose_scheme(c, plan, budget, strategy="exhaustive")
            evo = choose_scheme(c, plan, budget, strategy="evolution", seed=seed)
            assert (evo.scheme, evo.predicted_gain) == (ex.scheme, ex.predicted_gain)
            assert evo.plan.total <= budget


def test_search_is_deterministic_with_a_seed():
    bb, _, _ = net("cnn")
    n = len(bb.tap_layers)
    c = fake_contributions(n, 5)
    plan = planner(bb)
    budget = plan(scheme_text(n, n, {k: Fraction(1, 2) for k in range(n - 1)})).total
    runs = [choose_scheme(c, plan, budget, strategy="evolution", seed=7, generations=3, population=4)
            for _ in range(2)]
    assert runs[0].scheme == runs[1].scheme and runs[0].planned == runs[1].planned


def test_nothing_fits_says_the_smallest_plan():
    bb, _, _ = net("mlp")
    n = len(bb.tap_layers)
    plan = planner(bb)
    smallest = min(plan(scheme_text(n, k, r)).total for k, r in all_schemes(fake_contributions(n, 0)))
    with pytest.raises(BudgetError, match=f"{smallest:,} bytes"):
        choose_scheme(fake_contributions(n, 0), plan, smallest - 1)
    with pytest.raises(UsageError):
        choose_scheme(fake_contributions(n, 0), plan, 1000, strategy="random")


def test_auto_scheme_verifies_and_reports_the_papers_baselines():
    bb, x, y = net("cnn")
    plan = planner(bb)
    n = len(bb.tap_layers)
    budget = plan(scheme_text(n, 2, {n - 2: Fraction(1, 4)})).total
    runs = [auto_scheme(bb, x, y, budget=budget, plan_fn=plan, epochs=2, batch_size=8, seed=3) for _ in range(2)]
    a, b = runs
    assert a.scheme == b.scheme and a.contributions.accuracies == b.contributions.accuracies  # seeded
    assert a.choice.plan.total <= budget and 0.0 <= a.measured_accuracy <= 1.0
    for name in ("last_k", "bias_only"):
        base = a.baselines[name]
        assert base["scheme"] is not None and base["ram_bytes"] <= budget and 0 <= base["val_accuracy"] <= 1
    d = a.as_dict()
    assert {"scheme", "ram_bytes", "breakdown", "contributions", "analysis_seconds",
            "predicted_val_accuracy", "measured_val_accuracy", "baselines"} <= set(d)
    with pytest.raises(BudgetError, match="smallest scheme"):
        auto_scheme(bb, x, y, budget=1000, plan_fn=plan, epochs=1, batch_size=8)


def test_a_scheme_named_auto_is_explained_in_the_api():
    bb, _, _ = net("mlp")
    with pytest.raises(UsageError, match="scheme_search"):
        et.FineTuner(bb, "sparse", scheme="auto")


# ---------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto")
    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in [("pretrain", 80), ("finetune", 60), ("test", 40)]}
    ys = {s: (x[:, 0] > 0).astype(int) for s, x in xs.items()}
    np.savez(d / "t.npz", **{f"x_{s}": x for s, x in xs.items()}, **{f"y_{s}": y for s, y in ys.items()})
    et.Backbone.build([16, 12, 8, 2], seed=0).fit_normalizer(xs["pretrain"]).save(d / "m")
    return d


def test_plan_scheme_auto_writes_the_choice(files, capsys):
    out = files / "auto.json"
    assert main(["plan", "--model", str(files / "m"), "--method", "sparse", "--scheme", "auto", "--budget", "8KB",
                 "--weights-in-flash", "--task", str(files / "t.npz"), "--auto-epochs", "2", "--json", str(out)]) == 0
    cap = capsys.readouterr()
    assert "chosen: sparse[" in cap.out and "run it: edgetune finetune" in cap.out
    assert "contribution analysis:" in cap.err  # progress on stderr
    res = json.loads(out.read_text())
    assert res["ram_bytes"] <= 8 * 1024 and res["ram_bytes"] == sum(res["breakdown"].values()) - \
        res["breakdown"]["frozen_weights"]
    assert len(res["contributions"]["table"]) == 3 + 4 * 2 and res["analysis_seconds"] > 0
    assert f"--scheme {res['scheme']}" in res["command"]
    assert main(["plan", "--model", str(files / "m"), "--method", "sparse", "--scheme", "auto", "--budget", "8KB",
                 "--weights-in-flash", "--task", str(files / "t.npz"), "--auto-epochs", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_plan_auto_never_reads_the_test_split(files, monkeypatch, capsys):
    from edgetune.data import task as task_mod

    real = task_mod.load_task

    class NoTest:
        def __init__(self, t):
            self._t = t

        def __getattr__(self, name):
            if "test" in name:
                raise AssertionError(f"the test split was read: {name}")
            return getattr(self._t, name)

    monkeypatch.setattr(task_mod, "load_task", lambda *a, **k: NoTest(real(*a, **k)))
    assert main(["plan", "--model", str(files / "m"), "--method", "sparse", "--scheme", "auto", "--budget", "1MB",
                 "--task", str(files / "t.npz"), "--auto-epochs", "1", "--quiet"]) == 0


def test_plan_auto_tries_only_the_layers_and_ratios_asked(files, capsys):
    out = files / "lim.json"
    assert main(["plan", "--model", str(files / "m"), "--method", "sparse", "--scheme", "auto", "--budget", "1MB",
                 "--task", str(files / "t.npz"), "--auto-epochs", "1", "--auto-layers", "2", "--auto-ratios",
                 "1/4, 1", "--quiet", "--json", str(out)]) == 0
    table = json.loads(out.read_text())["contributions"]["table"]
    assert [r["scheme"] for r in table] == ["b1,w2", "b2,w2", "b1,w1:1/4,w2", "b1,w1,w2"]
    with pytest.raises(SystemExit) as e:  # argparse refuses it
        main(["plan", "--model", str(files / "m"), "--method", "sparse", "--scheme", "auto", "--budget", "1MB",
              "--task", str(files / "t.npz"), "--auto-ratios", "1/3", "--quiet"])
    assert e.value.code == 2 and "1/8, 1/4, 1/2, 1" in capsys.readouterr().err


def test_finetune_scheme_auto_trains_the_chosen_scheme(files, capsys):
    out = files / "ft.json"
    assert main(["finetune", "--task", str(files / "t.npz"), "--model", str(files / "m"), "--method", "sparse",
                 "--scheme", "auto", "--budget", "1MB", "--epochs", "2", "--auto-epochs", "1", "--quiet",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["scheme"] == res["scheme_search"]["scheme"]
    assert res["scheme_search"]["ram_bytes"] <= 1024 * 1024
    assert "scheme auto: sparse[" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["finetune", "--method", "sparse", "--scheme", "auto"], 2, "give --budget"),
    (["finetune", "--method", "ft-all", "--scheme", "auto", "--budget", "1MB"], 2, "--method sparse"),
    (["finetune", "--method", "sparse", "--scheme", "auto", "--budget", "1KB"], 1, "smallest scheme"),
    (["plan", "--method", "lora-all", "--scheme", "auto", "--budget", "1MB"], 2, "--method sparse"),
    (["plan", "--method", "sparse", "--scheme", "auto", "--budget", "1MB", "--no-task"], 2, "give --task"),
    (["plan", "--method", "sparse", "--scheme", "b2", "--budget", "1MB"], 2, "--scheme auto"),
    (["plan", "--method", "sparse", "--scheme", "auto", "--budget", "1MB", "--int8"], 2, "--target"),
    (["plan", "--method", "sparse", "--scheme", "auto", "--budget", "1MB", "--auto-val-split", "1.5"], 2,
     "less than 1"),
])
def test_scheme_auto_refusals(files, capsys, argv, code, message):
    args = list(argv) + ["--model", str(files / "m"), "--quiet"]
    if "--no-task" in args:
        args.remove("--no-task")
    else:
        args += ["--task", str(files / "t.npz")]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_evolution_finds_what_greedy_misses():
    """A knapsack where the single best part (layer 0) crowds out two that together buy more."""
    from types import SimpleNamespace

    from edgetune.methods.sparse import SparseScheme

    n = 4
    gains = {0: 0.10, 1: 0.06, 2: 0.06}
    cost = {0: 60, 1: 40, 2: 40}
    c = Contributions(n, "b1,w3", 0.5, {1: 0.0, 2: -1.0, 3: -1.0, 4: -1.0},
                      {(k, r): (gains[k] if r == 1 else -1.0) for k in range(3) for r in RATIOS},
                      1, 8, 0.01, 0, 60, 20, np.arange(20), 0, 0.0)

    def plan(s):
        sch = SparseScheme.parse(s)
        return SimpleNamespace(total=100 + 10 * sch.bias_layers + sum(cost[k] for k, _ in sch.weights if k < 3))

    ex = choose_scheme(c, plan, 190, strategy="exhaustive")
    assert ex.scheme == "b1,w1,w2,w3" and ex.predicted_gain == pytest.approx(0.12)
    from edgetune.scheme_search import _greedy  # what the evolutionary search starts from

    key = lambda k, genes: (None if plan(scheme_text(n, k, dict(zip(range(3), genes)))).total > 190
                            else (-c.gain(k, dict(zip(range(3), genes))), 0, ""))
    assert _greedy((1, (None,) * 3), [1, 2, 3, 4], [None, *RATIOS], key)[1][0] == Fraction(1)  # greedy takes layer 0
    for seed in range(3):
        assert choose_scheme(c, plan, 190, strategy="evolution", seed=seed).scheme == ex.scheme
