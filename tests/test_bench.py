"""The benchmark suite's code path on tiny shapes, so that it does not rot.

Correctness only: every table has every row and the accuracies are computed. No timing
is asserted (timings belong to BENCHMARKS.md, not to tests).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from edgetune.methods import METHODS  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def report():
    settings = suite.Settings(quick=True, tiny=True, repeats=1, quiet=True)
    return suite.run_suite(settings)


def _table(rep, prefix):
    found = [t for t in rep.tables if t.title.startswith(prefix)]
    assert found, f"no table '{prefix}...' in {[t.title for t in rep.tables]}"
    return found


def test_method_tables_have_every_method(report):
    tables = _table(report, "Method vs method")
    assert len(tables) == 2
    from edgetune import core

    engines = ["c", "numpy"] if core.available() else ["numpy"]
    for t in tables:
        assert [(r["method"], r["engine"]) for r in t.rows] == [(m, e) for m in METHODS for e in engines]
        for r in t.rows:
            assert 0.0 <= r["acc"] <= 1.0
            assert r["total"] > 0 and r["later"] > 0
        # the baseline is the faster engine's lora-all: its own ratio is 1, the other's at most 1
        base = [r["x_total"] for r in t.rows if r["method"] == suite.BASELINE]
        assert max(base) == pytest.approx(1.0)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs the torch extra")
def test_torch_table_compares_accuracies(report):
    (t,) = _table(report, "edgetune vs PyTorch")
    from benchmarks.torch_ref import TORCH_METHODS

    for task in ("tiny-a", "tiny-b"):
        rows = [r for r in t.rows if r["task"] == task]
        assert {r["method"] for r in rows} >= set(TORCH_METHODS)
        for r in rows:
            assert 0.0 <= r["et_acc"] <= 1.0 and 0.0 <= r["pt_acc"] <= 1.0
            assert r["ratio"] > 0
        # same init, same batches: the same method must land on the same accuracy
        for r in rows:
            if r["method"] in TORCH_METHODS:
                assert abs(r["et_acc"] - r["pt_acc"]) <= suite.SAME_ACCURACY, r


def test_memory_scaling_and_limit_tables(report):
    (mem,) = _table(report, "Peak memory")
    names = [r["what"] for r in mem.rows]
    assert "edgetune finetune (complete run)" in names
    assert ("PyTorch equivalent (complete run)" in names) == HAVE_TORCH
    assert all(r["mb"] > 0 for r in mem.rows)
    (sc,) = _table(report, "Scaling")
    assert {r["sweep"] for r in sc.rows} == {"samples N", "hidden width", "hidden layers"}
    assert all(r["cached"] > 0 and r["lora"] > 0 for r in sc.rows)
    (lim,) = _table(report, "The physical limit")
    assert [r["task"] for r in lim.rows] == ["tiny-a", "tiny-b"]
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in lim.rows)
    (br,) = _table(report, "Where a batch goes")
    from edgetune import core

    assert len(br.rows) == 2 * 2 * (2 if core.available() else 1)
    assert all(r["batch"] > 0 and r["forward"] > 0 for r in br.rows)


def test_every_target_is_judged(report):
    names = [t.name for t in report.targets]
    for task in ("tiny-a", "tiny-b"):
        assert any(n.startswith(f"{task}: skip2-lora vs the fastest lora-all, end to end") for n in names)
        assert any(n.startswith(f"{task}: skip2-lora vs the fastest lora-all, per epoch") for n in names)
        assert any(n.startswith(f"{task}: cached skip2-lora epoch") for n in names)
    assert any("peak RSS" in n for n in names)
    for t in report.targets:
        assert t.status in ("PASS", "MISS") or (t.status == "N/A" and not HAVE_TORCH)
    text = suite.render(report, "python -m benchmarks --tiny")
    assert "### Targets" in text and "numpy" in text and "blas" in text


def test_markdown_keeps_the_analysis(tmp_path, report):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# old\n\n## What limits it\n\nhand-written\n")
    suite.write_markdown(str(md), suite.render(report, "x"))
    out = md.read_text()
    assert out.count("## What limits it") == 1 and "hand-written" in out and "### Targets" in out


def test_cli_usage_error():
    from edgetune.cli import main

    assert main(["bench", "--only", "nope"]) == 2


def test_bench_without_a_source_checkout_says_why(monkeypatch, capsys):
    """An installed package has no benchmarks/: every bench call explains that, never 'unrecognized'."""
    from edgetune.cli import cmd_bench, main

    monkeypatch.setattr(cmd_bench, "_suite", lambda: None)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "unrecognized" not in err
