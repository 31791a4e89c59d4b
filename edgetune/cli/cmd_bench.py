"""edgetune bench: run the benchmark suite of a source checkout (benchmarks/)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

NAME = "bench"
HELP = "run the benchmark suite: methods, PyTorch, peak memory, scaling, the hardware limit"
DESCRIPTION = """Run the benchmark suite that lives in benchmarks/ of an edgetune source checkout
and print tables of ratios measured side by side, with the machine and library versions.
Not a test: numbers depend on the machine and its load. PyTorch parts need the torch extra,
the plot needs the plot extra.

examples:
  edgetune bench --quick --data-dir ../shared/data
  edgetune bench --data-dir ../shared/data --markdown BENCHMARKS.md --plot benchmarks/results/scaling.png"""
ORDER = 80


def _suite() -> ModuleType | None:
    """benchmarks.suite from the checkout this edgetune was imported from, if there is one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "suite.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.suite")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .bench_args import add_arguments as add_bench_arguments

    add_bench_arguments(p)  # the options only: building the parser must not import the suite


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    suite = _suite()
    if suite is None:
        raise UsageError("the benchmark suite ships with the source checkout (benchmarks/), "
                         "not with the installed package; run this from a clone of edgetune")
    try:
        settings = suite.settings_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return suite.run(args, settings, prog="edgetune bench")
