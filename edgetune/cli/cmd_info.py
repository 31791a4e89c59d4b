"""edgetune info: versions, and which training engine runs here and how it was built."""
from __future__ import annotations

import argparse
import platform

from ._common import add_json_arg, write_json

NAME = "info"
HELP = "show versions and the training engine (compiled C or NumPy) that runs here"
DESCRIPTION = """Show edgetune's version, Python and NumPy, and whether the compiled C engine is
built and loads (its library, compiler and flags). 'auto' (the default engine) uses it when
it does; otherwise the NumPy engine runs and this says why.

example:
  edgetune info --json -"""
ORDER = 5


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_json_arg(p, "the facts")
    p.add_argument("--quiet", action="store_true", help="print only the engine line")


def engine_line() -> str:
    """One line: the engine 'auto' picks, and why."""
    import os

    from .. import core

    want = os.environ.get("EDGETUNE_ENGINE", "auto") or "auto"
    facts = core.info()
    if facts["available"]:
        return f"engine: {want}; compiled C engine available ({facts['build']})"
    return f"engine: {want}; compiled C engine NOT available, NumPy runs: {facts['reason']}"


def run(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from .. import __version__, core

    facts = {"edgetune": __version__, "python": platform.python_version(), "numpy": np.__version__,
             "machine": platform.machine(), "engine": os.environ.get("EDGETUNE_ENGINE", "auto") or "auto",
             "core": core.info()}
    if not args.quiet:
        print(f"edgetune {facts['edgetune']}, Python {facts['python']}, NumPy {facts['numpy']}, {facts['machine']}")
    print(engine_line())
    if facts["core"]["available"] and not args.quiet:
        print(f"library: {facts['core']['library']}")
    write_json(args.json, facts)
    return 0
