"""The docs say what the commands do today: their Python examples run as written, the command
outputs they show are the commands' current output, and the README's tables match the
commands they come from (as tests/test_readme.py runs the README's command lines)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.torch import MissingExtraError

from .conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _imports(code: str) -> set[str]:
    return {m.split(".")[0] for m in re.findall(r"^\s*(?:from|import) ([A-Za-z_][\w.]*)", code, re.M)}


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_the_python_examples_of_a_page_run_in_order(page, tmp_path, monkeypatch):
    """The blocks of one page run one after another in one namespace, in a scratch folder, as a
    reader pastes them: a name a block uses must come from an earlier block of the page."""
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.skip("the cooling-fan data set is not in ../shared/data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for i, code in enumerate(python_blocks(page)):
        missing = sorted(m for m in _imports(code) if importlib.util.find_spec(m) is None)
        if missing:  # an optional extra's example (torch, peft, scikit-learn): the rest of the page needs it too
            pytest.skip(f"{page.name} block {i + 1} needs {', '.join(missing)}")
        if "torch" in _imports(code):  # on a shared machine torch's thread pool only contends (90 s vs 3 s here)
            import torch
            torch.set_num_threads(1)
        code = code.replace('"../shared/data"', repr(str(DATA_DIR)))
        try:
            exec(compile(code, f"{page.name} python block {i + 1}", "exec"), namespace)
        except MissingExtraError as e:  # reached through edgetune (e.g. edgetune.onnx): the extra is not here
            pytest.skip(f"{page.name} block {i + 1}: {e}")
        ran += 1
    assert ran == len(python_blocks(page))


def test_every_generated_output_in_the_docs_is_current():
    """budgets.md's plan tables (and any other block marked for scripts/doc-outputs) are the
    output of their commands today."""
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.skip("the cooling-fan data set is not in ../shared/data")
    assert "<!-- doc-outputs" in (ROOT / "docs" / "budgets.md").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "doc-outputs"), "--check"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_the_readme_methods_table_is_what_edgetune_methods_prints():
    r = subprocess.run([sys.executable, "-m", "edgetune", "methods", "--json", "-"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    counted = {m["method"]: m["trainable_params"] for m in json.loads(r.stdout)["methods"]}
    table = (ROOT / "README.md").read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    shown = {m: int(n) for m, n in re.findall(r"^\| `([\w-]+)` \| (\d+) \|", table, re.M)}
    assert shown == counted


def test_plan_and_methods_count_the_same_trainable_parameters(tmp_path):
    """'trainable' means one thing: plan's column and --json agree with 'edgetune methods'."""
    import edgetune as et

    model = et.Backbone.build([512, 96, 96, 2], seed=0)
    model.save(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "edgetune", "plan", "--model", str(tmp_path / "m"), "--budget", "4MB",
                        "--no-int8", "--json", "-", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fits = {c["method"]: c["trainable_params"] for c in json.loads(r.stdout)["fits"] if c["method"] != "sparse"}
    from edgetune.methods import count_trainable

    assert fits and all(n == count_trainable(m, [512, 96, 96, 2]) for m, n in fits.items()), fits
    assert fits["skip-lora"] == 710


def test_plan_show_lists_the_most_trainable_unevaluated_schemes_first(tmp_path):
    """--show's help says in which order sparse schemes fill the table; with --task the ones not
    fine-tuned keep the ranking's order (most trainable first), not the smallest plans."""
    import numpy as np

    import edgetune as et

    from .conftest import toy_task

    x, y = toy_task(n=80, d=10, classes=2, seed=1)
    np.savez(tmp_path / "t.npz", x_pretrain=x, y_pretrain=y, x_finetune=x, y_finetune=y, x_test=x, y_test=y)
    model, _ = et.pretrain(x, y, hidden=[8, 8], epochs=3)
    model.save(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "edgetune", "plan", "--model", str(tmp_path / "m"), "--budget", "1MB",
                        "--task", str(tmp_path / "t.npz"), "--evaluate", "1", "--show", "3", "--json", "-"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fits = json.loads(r.stdout)["fits"]
    rest = [c["trainable_params"] for c in fits if c["accuracy"] is None and c["method"] == "sparse"]
    assert rest and rest == sorted(rest, reverse=True)
    from edgetune.cli.cmd_plan import add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    show = next(a for a in p._actions if "--show" in a.option_strings)
    assert "with --task" in show.help and "most trainable first" in show.help
